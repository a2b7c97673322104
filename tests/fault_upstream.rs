//! Scenario 2 of the fault campaign: upstream faults, via the in-process simulator.
//!
//! The relay (listener + deliverer + token refresher, wired like `serve`) delivers to the
//! simulator; the deliverer is built here with short upstream timeouts (connect 1 s, command
//! 1 s, final reply 2 s) so stalls longer than the timeouts are exercised in seconds, and with a
//! 50 ms session idle limit so every message opens a fresh session (AUTH is re-checked).
//!
//! For each fault: every message acknowledged is delivered once the fault clears, none ends up
//! in `failed/`, held mail resumes after the fix; duplicates are counted and reported.

mod common;

use std::time::{Duration, Instant};

use common::delivery::{DeliveringRelay, Tuning, start_tuned};
use common::fixtures::report;
use common::logs;
use smtp_oauth_relay::deliver::MailboxState;
use smtp_oauth_relay::deliver::classify::HoldCause;
use smtp_oauth_relay::sim::{SimConfig, Simulator, SmtpFault, SmtpStage, TokenFault};
use smtp_oauth_relay::spool::EntryState;
use smtp_oauth_relay::transport::smtp::session::{Timeouts, UpstreamTarget};

const RELAY: &str = "[queue]\nretry_min = \"200ms\"\nretry_max = \"1s\"\n\
                     [upstream]\nrate = \"1000/s\"\nconnections = 3\n";

/// Connect 1 s, command 1 s, final reply 2 s; a fresh session for every message.
fn tuning() -> Tuning {
    Tuning {
        timeouts: Some(Timeouts {
            connect: Duration::from_secs(1),
            command: Duration::from_secs(1),
            data_end: Duration::from_secs(2),
        }),
        // Zero: never reused, whatever the machine's load (50 ms let a busy CI reuse one).
        session_max_idle: Some(Duration::ZERO),
        ..Default::default()
    }
}

/// Simulator (stalls end after 4 s, well after the relay's timeouts; `sim_setup` before the
/// first token request) + spool + deliverer (target changed by `target`) + listener.
async fn start(
    sim_setup: impl FnOnce(&Simulator),
    target: impl FnOnce(&mut UpstreamTarget),
) -> DeliveringRelay {
    start_tuned(
        RELAY,
        SimConfig::default(),
        |sim| {
            sim.control().set_stall_duration(Duration::from_secs(4));
            sim_setup(sim);
        },
        tuning(),
        target,
    )
    .await
}

/// Sends `n` tracked messages on one connection; returns their markers and queue ids.
async fn send(h: &DeliveringRelay, prefix: &str, n: usize) -> (Vec<String>, Vec<String>) {
    h.send_tracked(prefix, n).await.into_iter().unzip()
}

/// Waits (bounded) until every one of `ids` has a recorded delivery attempt whose last reply
/// contains `needle`; returns those replies.
async fn wait_attempted(h: &DeliveringRelay, ids: &[String], needle: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let replies: Vec<Option<String>> = ids
            .iter()
            .map(|id| {
                h.delivery_state(id)
                    .filter(|s| s.attempts >= 1)
                    .and_then(|s| s.last_reply)
                    .map(|r| r.to_string())
                    .filter(|r| r.contains(needle))
            })
            .collect();
        if replies.iter().all(Option::is_some) {
            return replies.into_iter().flatten().collect();
        }
        assert!(
            Instant::now() < deadline,
            "not every message attempted with {needle:?}: {:?}",
            ids.iter()
                .map(|id| h.delivery_state(id))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every fault scripted for `stage` fired `times` times in all.
fn assert_fired(h: &DeliveringRelay, stage: SmtpStage, times: u64) {
    assert_eq!(
        h.sim.control().smtp_faults_fired(stage),
        times,
        "faults fired at {stage:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_replies_and_drops_at_every_step_lose_nothing() {
    let h = start(|_| {}, |_| {}).await;
    let c = h.sim.control();
    for stage in [
        SmtpStage::Greeting,
        SmtpStage::Ehlo,
        SmtpStage::StartTls,
        SmtpStage::Auth,
        SmtpStage::Mail,
        SmtpStage::Rcpt,
        SmtpStage::Data,
        SmtpStage::DataEnd,
    ] {
        c.script_smtp_fault(stage, SmtpFault::Reply421, 1);
    }
    c.script_smtp_fault(SmtpStage::Mail, SmtpFault::Reply451, 1);
    c.script_smtp_fault(SmtpStage::Rcpt, SmtpFault::Reply451, 1);
    c.script_smtp_fault(SmtpStage::DataEnd, SmtpFault::Reply430, 1);
    // Throttling: 432 4.3.2 at the end of DATA.
    c.script_smtp_fault(
        SmtpStage::DataEnd,
        SmtpFault::Reply {
            code: 432,
            text: "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded".into(),
        },
        2,
    );
    // Dropped before the final dot (not kept) and after it (kept, reply lost: a duplicate).
    c.script_smtp_fault(SmtpStage::DataBody, SmtpFault::Drop, 1);
    c.script_smtp_fault(SmtpStage::DataEnd, SmtpFault::Drop, 1);
    c.script_smtp_fault(SmtpStage::DataEnd, SmtpFault::DropAfterAccept, 1);
    let (markers, _) = send(&h, "steps", 12).await;
    let dups = h.drain(&markers, "421/451/432/drops").await;
    // Every scripted fault met a session of the relay (a delivery passes every stage, so none
    // can be left once all are delivered).
    assert_eq!(c.smtp_faults_pending(), 0, "scripted faults never used");
    for (stage, times) in [
        (SmtpStage::Greeting, 1),
        (SmtpStage::Ehlo, 1),
        (SmtpStage::StartTls, 1),
        (SmtpStage::Auth, 1),
        (SmtpStage::Mail, 2),
        (SmtpStage::Rcpt, 2),
        (SmtpStage::Data, 1),
        (SmtpStage::DataBody, 1),
        (SmtpStage::DataEnd, 6),
    ] {
        assert_fired(&h, stage, times);
    }
    report(&format!(
        "upstream/421-451-432-drops acked={} delivered={} lost=0 duplicates={dups} failed=0",
        markers.len(),
        markers.len()
    ));
    // DropAfterAccept: Exchange kept a copy whose 250 never arrived.
    assert!(dups <= 1, "more duplicates than lost 250s: {dups}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalls_longer_than_the_timeouts_are_retried() {
    logs::capture();
    let h = start(|_| {}, |_| {}).await;
    let c = h.sim.control();
    let stages = [
        SmtpStage::Greeting,
        SmtpStage::Ehlo,
        SmtpStage::Auth,
        SmtpStage::Mail,
        SmtpStage::DataBody,
        SmtpStage::DataEnd,
    ];
    for stage in stages {
        c.script_smtp_fault(stage, SmtpFault::Stall, 1);
    }
    let (markers, ids) = send(&h, "stall", 5).await;
    let dups = h.drain(&markers, "stalls").await;
    assert_eq!(c.smtp_faults_pending(), 0, "stalls never met");
    for stage in stages {
        assert_fired(&h, stage, 1);
    }
    // The relay gave up on its own timeout (not on the simulator closing 4 s later): one
    // "no reply within" attempt per stall, on this test's messages.
    let timeouts: Vec<String> = logs::lines_with(&["delivery attempt failed", "no reply within"])
        .into_iter()
        .filter(|l| ids.iter().any(|id| l.contains(id.as_str())))
        .collect();
    assert!(
        timeouts.len() >= stages.len(),
        "{} timeouts for {} stalls: {timeouts:#?}",
        timeouts.len(),
        stages.len()
    );
    report(&format!(
        "upstream/stalls(6 stages, 4s > timeouts 1s/2s) acked={} delivered={} lost=0 duplicates={dups} failed=0",
        markers.len(),
        markers.len()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_auth_revoked_mid_run_holds_then_resumes() {
    let h = start(|_| {}, |_| {}).await;
    let (mut markers, _) = send(&h, "before", 3).await;
    h.drain(&markers, "before the revocation").await;
    h.sim.control().set_smtp_auth_disabled(true);
    markers.extend(send(&h, "revoked", 4).await.0);
    let (cause, _) = h.wait_held().await;
    assert_eq!(cause, HoldCause::SmtpAuthDisabled);
    // Held, not failed: while the deliverer probes (two more sessions, each refused with
    // 535 5.7.139), the messages wait in queue/.
    let seen = h.sim.control().smtp_connections();
    let deadline = Instant::now() + Duration::from_secs(20);
    while h.sim.control().smtp_connections() < seen + 2 {
        assert!(Instant::now() < deadline, "no probe while held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        matches!(h.status(), MailboxState::Held { .. }),
        "{:?}",
        h.status()
    );
    assert_eq!(h.spool_in(EntryState::Failed), 0);
    assert_eq!(h.spool_in(EntryState::Queued), 4);
    h.sim.control().set_smtp_auth_disabled(false);
    let dups = h.drain(&markers, "after re-enabling SMTP AUTH").await;
    assert_eq!(h.status(), MailboxState::Running);
    report(&format!(
        "upstream/535-5.7.139-mid-run acked={} delivered={} lost=0 duplicates={dups} failed=0 held_then_resumed=yes",
        markers.len(),
        markers.len()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_errors_slowness_and_garbage_keep_mail_queued() {
    // Scripted before the first token request: the refresher meets all of them in turn.
    let setup = |sim: &Simulator| {
        let c = sim.control();
        // One of each: the refresher backs off 1 s, 2 s, 4 s between them (by design).
        c.script_token_fault(TokenFault::InternalServerError, 1);
        c.script_token_fault(
            TokenFault::TooManyRequests {
                retry_after_secs: 1,
            },
            1,
        );
        c.script_token_fault(TokenFault::MalformedJson, 1);
        c.script_token_fault(TokenFault::Slow(Duration::from_millis(1500)), 1);
    };
    let h = start(setup, |_| {}).await;
    let c = h.sim.control();
    let (markers, _) = send(&h, "token", 5).await;
    let dups = h.drain(&markers, "token faults").await;
    // Every scripted fault answered one of the refresher's requests (the slow one then issued
    // the token the mail went out with).
    assert_eq!(c.token_faults_fired(), 4, "token faults fired");
    assert_eq!(c.token_faults_pending(), 0);
    report(&format!(
        "upstream/token-500-429-garbage-slow acked={} delivered={} lost=0 duplicates={dups} failed=0 token_requests={}",
        markers.len(),
        markers.len(),
        c.token_requests()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_and_tls_failures_keep_mail_until_fixed() {
    // Phase 1: nothing listens at the upstream address (connection refused).
    let closed = common::process::free_port();
    let mut h = start(|_| {}, |t| t.address = format!("127.0.0.1:{closed}")).await;
    let (markers, ids) = send(&h, "down", 6).await;
    // Every message was tried and met the refusal (recorded as its last reply).
    for reply in wait_attempted(&h, &ids, "Connect: ").await {
        assert!(reply.to_lowercase().contains("refused"), "{reply}");
    }
    assert_eq!(h.spool_in(EntryState::Queued), 6, "refused: still queued");
    assert_eq!(h.spool_in(EntryState::Failed), 0);
    assert!(h.delivered_markers().is_empty());
    h.stop_deliverer().await;

    // Phase 2: TLS handshake fails (a CA that did not sign the server's certificate).
    let other_ca = rcgen::generate_simple_self_signed(vec!["other.test".to_string()]).unwrap();
    let ca_path = h.relay.spool_dir().with_file_name("wrong-ca.pem");
    std::fs::write(&ca_path, other_ca.cert.pem()).unwrap();
    let wrong = smtp_oauth_relay::transport::smtp::session::tls_connector(Some(&ca_path)).unwrap();
    h.start_deliverer(|t| t.connector = wrong);
    let (cause, _) = h.wait_held().await;
    assert_eq!(cause, HoldCause::CertificateInvalid);
    assert_eq!(h.spool_in(EntryState::Failed), 0);
    assert!(h.delivered_markers().is_empty());
    h.stop_deliverer().await;

    // Phase 3: fixed; everything drains.
    h.start_deliverer(|_| {});
    let dups = h.drain(&markers, "after the fix").await;
    report(&format!(
        "upstream/refused-then-bad-tls-then-fixed acked={} delivered={} lost=0 duplicates={dups} failed=0",
        markers.len(),
        markers.len()
    ));
    h.relay.shutdown.cancel();
}
