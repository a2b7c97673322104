//! Two relay processes on one PostgreSQL queue: mail is sent to both, the one holding a claim
//! while its upstream session hangs after the final dot is SIGKILLed, and the other delivers
//! every acknowledged message (the dead relay's claimed message once its lease expires,
//! logged as a possible duplicate). Two relays share each mailbox's budget: together they stay
//! within its rate and session limits, as the simulator counts them, and a mailbox one relay
//! holds (535 5.7.139) is held by the other too until the first sees it work again.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::fixtures::data_block;
use common::postgres::{fresh_database, query_texts};
use common::process::{Relay, relay_toml, with_upstream};
use common::smtp::Client;
use smtp_oauth_relay::sim::{RateMode, SmtpFault, SmtpStage};

async fn send(relay: &Relay, marker: &str) {
    let mut c = Client::connect(SocketAddr::from(([127, 0, 0, 1], relay.port))).await;
    c.begin_message("app@legacy.test", &["someone@example.org"])
        .await;
    c.send(&data_block(format!(
        "Subject: {marker}\r\nX-Marker: {marker}\r\n\r\nbody of {marker}\r\n"
    )))
    .await;
    c.read_reply()
        .await
        .expect("reply to the final dot")
        .assert(250, "2.0.0");
}

fn start(work: &std::path::Path, tag: &str, url: &str, fragment: &str) -> Relay {
    start_with(work, tag, url, "retry_max = \"1s\"", fragment)
}

/// `retry`: the `queue.retry_max` line (a held mailbox probes that often, 5 min at most).
fn start_with(work: &std::path::Path, tag: &str, url: &str, retry: &str, fragment: &str) -> Relay {
    start_queue(
        work,
        tag,
        url,
        &format!("retry_min = \"200ms\"\n{retry}"),
        fragment,
    )
}

/// `retry`: the `queue.retry_min` and `retry_max` lines (a throttle pauses `retry_min`).
fn start_queue(work: &std::path::Path, tag: &str, url: &str, retry: &str, fragment: &str) -> Relay {
    let spool = work.join(format!("spool-{tag}"));
    Relay::builder()
        .work(work)
        .tag(tag)
        .config(|s| {
            relay_toml(
                s.smtp,
                &spool,
                "",
                &format!(
                    "backend = \"postgres\"\nurl = \"{url}\"\nlease = \"5s\"\n\
                     {retry}\nmin_free_space = 1"
                ),
                &format!("[log]\nlevel = \"info\"\n\n{fragment}"),
            )
        })
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_delivery_loses_no_acknowledged_mail() {
    let sim = common::sim::start().await;
    // The first session to send a final dot hears nothing back (the relay waits, its claim
    // held) until long after this test.
    sim.control().set_stall_duration(Duration::from_secs(300));
    sim.control()
        .script_smtp_fault(SmtpStage::DataEnd, SmtpFault::Stall, 1);
    let work = tempfile::tempdir().expect("tempdir");
    let url = fresh_database();
    // Two sessions for the mailbox across both relays: the stalled one holds one of them
    // until the kill (and then until its lease expires), the rest go through the other.
    let fragment = with_upstream(
        &sim.relay_config_fragment(),
        "rate = \"1000/s\"\nconnections = 2",
    );
    let mut a = start(work.path(), "a", &url, &fragment);
    let mut b = start(work.path(), "b", &url, &fragment);

    let mut markers = Vec::new();
    for i in 0..6 {
        let marker = format!("replica-{i}");
        send(if i % 2 == 0 { &a } else { &b }, &marker).await;
        markers.push(marker);
    }

    // Everything but the stalled message arrives; that one is claimed by one of the relays.
    let deadline = Instant::now() + Duration::from_secs(60);
    let owner = loop {
        let delivered = sim.messages().expect("mailbox").len();
        let owners = query_texts(
            &url,
            "SELECT lease_owner FROM relay_message WHERE lease_owner IS NOT NULL",
        );
        if delivered >= markers.len() - 1
            && let Some(Some(owner)) = owners.first()
        {
            break owner.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{delivered} delivered, leases {owners:?}; logs:\n{}\n{}",
            a.log_text(),
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // lease_owner is host/pid/random.
    let pid: u32 = owner
        .split('/')
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("pid in the lease owner");
    // While its attempt runs, the claimer renews the lease: longer than a lease later, the
    // message is still its own and not delivered by the other relay.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let owners = query_texts(
        &url,
        "SELECT lease_owner FROM relay_message WHERE lease_owner IS NOT NULL",
    );
    assert_eq!(owners, vec![Some(owner.clone())], "the lease was renewed");
    assert_eq!(
        sim.messages().expect("mailbox").len(),
        markers.len() - 1,
        "the claimed message was not taken over while its relay lived"
    );
    let (dead, survivor) = if pid == a.pid() {
        (&mut a, &b)
    } else {
        assert_eq!(pid, b.pid(), "the lease belongs to one of the two relays");
        (&mut b, &a)
    };
    dead.kill();

    // The survivor takes the message once the lease expires, and says it may be a duplicate.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let texts: Vec<String> = sim
            .messages()
            .expect("mailbox")
            .iter()
            .map(|m| m.text())
            .collect();
        let missing: Vec<&String> = markers
            .iter()
            .filter(|m| {
                !texts
                    .iter()
                    .any(|t| t.contains(&format!("X-Marker: {m}\r\n")))
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not delivered: {missing:?}; survivor log:\n{}",
            survivor.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    survivor.wait_log("possible duplicate", 0).await;
    let left = query_texts(&url, "SELECT id FROM relay_message");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut left = left;
    while !left.is_empty() {
        assert!(Instant::now() < deadline, "still queued: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = query_texts(&url, "SELECT id FROM relay_message");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_mailbox_rate_and_session_budget() {
    let sim = common::sim::start().await;
    let mailbox = sim.config().mailboxes[0].address.clone();
    // The simulator refuses (432 4.3.2) a third session and a 31st message within a second,
    // and takes a moment to answer each end of DATA, so sessions overlap: each relay alone
    // stays within that at 20/s and 2 sessions, two that do not share their budget do not.
    sim.control().set_connections_per_mailbox(2);
    sim.control()
        .set_rate_limit(30, Duration::from_secs(1), RateMode::Reject);
    sim.control().set_data_end_delay(Duration::from_millis(250));
    let work = tempfile::tempdir().expect("tempdir");
    let url = fresh_database();
    let fragment = with_upstream(
        &sim.relay_config_fragment(),
        "rate = \"20/s\"\nconnections = 2",
    );
    let a = start(work.path(), "a", &url, &fragment);
    let b = start(work.path(), "b", &url, &fragment);

    let total = 40;
    for i in 0..total {
        send(if i % 2 == 0 { &a } else { &b }, &format!("shared-{i}")).await;
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let delivered = sim.messages().expect("mailbox").len();
        let left = query_texts(&url, "SELECT id FROM relay_message");
        if delivered >= total && left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{delivered} of {total} delivered, {} left; logs:\n{}\n{}",
            left.len(),
            a.log_text(),
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        sim.control().throttled(&mailbox),
        0,
        "432 4.3.2 answers: the two relays went past the mailbox's limits; logs:\n{}\n{}",
        a.log_text(),
        b.log_text()
    );
    assert!(
        sim.control().peak_sessions(&mailbox) <= 2,
        "{} sessions at once",
        sim.control().peak_sessions(&mailbox)
    );
    assert_eq!(
        sim.messages().expect("mailbox").len(),
        total,
        "each message once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_one_replica_holds_is_held_by_the_other_until_it_resumes() {
    let sim = common::sim::start().await;
    let mailbox = sim.config().mailboxes[0].address.clone();
    sim.control().set_mailbox_smtp_auth_disabled(&mailbox, true);
    let work = tempfile::tempdir().expect("tempdir");
    let url = fresh_database();
    // A held mailbox probes every 5 minutes: within this test only a wake-up probes it.
    let retry = "retry_max = \"10m\"";
    let fragment = with_upstream(&sim.relay_config_fragment(), "rate = \"30/min\"");
    let a = start_with(work.path(), "a", &url, retry, &fragment);
    send(&a, "held-0").await;
    a.wait_log("delivery held", 0).await;
    assert!(
        a.log_text().contains("5.7.139"),
        "held for 535 5.7.139:\n{}",
        a.log_text()
    );

    // B starts after the hold: it never tried the mailbox, yet holds it too.
    let b = start_with(work.path(), "b", &url, retry, &fragment);
    let line = b.wait_log("delivery held", 0).await;
    assert!(line.contains("by_another_relay=true"), "{line}");
    let connections = sim.control().smtp_connections();
    for i in 1..5 {
        send(if i % 2 == 0 { &a } else { &b }, &format!("held-{i}")).await;
    }
    // Neither sends while held (their next probe is minutes away).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sim.control().smtp_connections(),
        connections,
        "a relay sent to the held mailbox; B's log:\n{}",
        b.log_text()
    );
    assert!(sim.messages().expect("mailbox").is_empty());

    // Fixed; a reload (a changed rate) makes A probe at once. Its delivery resumes B too
    // (whose own probe is minutes away), and together they deliver everything.
    sim.control()
        .set_mailbox_smtp_auth_disabled(&mailbox, false);
    let config = std::fs::read_to_string(&a.config).expect("A's config");
    std::fs::write(
        &a.config,
        config.replace("rate = \"30/min\"", "rate = \"31/min\""),
    )
    .expect("rewrite A's config");
    a.signal(libc::SIGHUP);
    a.wait_log("delivery resumed", 0).await;
    let line = b.wait_log("delivery resumed", 0).await;
    assert!(line.contains("by_another_relay=true"), "{line}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while sim.messages().expect("mailbox").len() < 5 {
        assert!(
            Instant::now() < deadline,
            "not all delivered; logs:\n{}\n{}",
            a.log_text(),
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttle_one_replica_hears_pauses_both_until_it_ends() {
    let sim = common::sim::start().await;
    let mailbox = sim.config().mailboxes[0].address.clone();
    // The first transaction to reach the final dot is throttled.
    sim.control().script_smtp_fault(
        SmtpStage::DataEnd,
        SmtpFault::Reply {
            code: 432,
            text: "4.3.2 STOREDRV.ClientSubmit; sender submission rate exceeded".into(),
        },
        1,
    );
    let work = tempfile::tempdir().expect("tempdir");
    let url = fresh_database();
    // A throttle pauses the mailbox for `retry_min`. One session across both relays: the
    // throttled attempt holds it until its pause is recorded, so any later transaction, by
    // either relay, started after it; alone, the other relay would send 5 a second.
    let pause = Duration::from_secs(3);
    let retry = "retry_min = \"3s\"\nretry_max = \"10s\"";
    let fragment = with_upstream(
        &sim.relay_config_fragment(),
        "rate = \"5/s\"\nconnections = 1",
    );
    let a = start_queue(work.path(), "a", &url, retry, &fragment);
    let b = start_queue(work.path(), "b", &url, retry, &fragment);
    let total = 8;
    for i in 0..total {
        send(if i % 2 == 0 { &a } else { &b }, &format!("throttled-{i}")).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let delivered = sim.messages().expect("mailbox").len();
        let left = query_texts(&url, "SELECT id FROM relay_message");
        if delivered >= total && left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{delivered} of {total} delivered, {} left; logs:\n{}\n{}",
            left.len(),
            a.log_text(),
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sim.control().smtp_faults_fired(SmtpStage::DataEnd), 1);
    let times = sim.control().mail_times(&mailbox);
    // One session at a time: the first transaction is the throttled one.
    let (throttled, later) = times.split_first().expect("transactions");
    let gaps: Vec<Duration> = later.iter().map(|t| t.duration_since(*throttled)).collect();
    println!("transactions after the throttled one at {gaps:?}");
    // The pause starts after the throttled transaction began, as recorded by the database
    // clock: a little slack for two clocks counting the same seconds.
    let earliest = pause - Duration::from_millis(100);
    assert!(
        gaps.iter().all(|g| *g >= earliest),
        "a transaction started {gaps:?} after the throttled one, within its {pause:?} pause; \
         logs:\n{}\n{}",
        a.log_text(),
        b.log_text()
    );
    assert_eq!(
        times.len(),
        total + 1,
        "each message once, the throttled one twice"
    );
    // Both relays honoured the pause: one recorded it, the other heard of it.
    let (heard, other) = if a.log_text().contains("paused for every relay") {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert!(
        heard.log_text().contains("paused for every relay"),
        "neither relay recorded the pause; logs:\n{}\n{}",
        a.log_text(),
        b.log_text()
    );
    assert!(
        other.log_text().contains("mailbox paused by another relay"),
        "the other relay did not see the pause:\n{}",
        other.log_text()
    );
    // Which relay delivers the rest is a race for each claim: not asserted (the delivery of
    // every message after the pause is).
}
