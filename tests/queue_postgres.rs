//! The relay process with `queue.backend = "postgres"`: it accepts mail, delivers it to the
//! simulator, and operator commands in other processes see and change the database's queue.
//! With the database unreachable (a proxy between relay and database is cut) `/readyz` says
//! 503 and a message ends with `451` at DATA end, never `250`; once the database is back the
//! relay resumes by itself. A relay started while the database is down waits for it, not
//! ready, and then delivers what was already queued.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::fixtures::data_block;
use common::postgres::{fresh_database, query_texts, relay_on};
use common::process::{Relay, run_cli, with_upstream};
use common::proxy::Proxy;
use common::smtp::Client;
use smtp_oauth_relay::config::{Backend, DbUrl, QueueConfig};
use smtp_oauth_relay::sim::{SmtpFault, SmtpStage};
use smtp_oauth_relay::store::{EntryState, Envelope, MailParams, Recipient};

/// The database's address and its URL through `addr` instead.
fn through(url: &str, addr: SocketAddr) -> (SocketAddr, String) {
    let mut u = url::Url::parse(url).expect("url");
    let target: SocketAddr = format!(
        "{}:{}",
        u.host_str().expect("host"),
        u.port().unwrap_or(5432)
    )
    .parse()
    .expect("the test cluster listens on an IP address");
    u.set_port(Some(addr.port())).expect("port");
    (target, u.to_string())
}

fn queue_cli(work: &Path, url: &str, args: &[&str]) -> String {
    let config = work.join("operator.toml");
    std::fs::write(
        &config,
        format!(
            "[queue]\ndir = \"{}\"\nbackend = \"postgres\"\nurl = \"{url}\"\n",
            work.join("operator-spool").display()
        ),
    )
    .expect("write operator config");
    let mut full = vec!["queue"];
    full.extend_from_slice(args);
    let out = run_cli(&config, &full, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "queue {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn send(relay: &Relay, marker: &str) -> common::smtp::Reply {
    let mut c = Client::connect(SocketAddr::from(([127, 0, 0, 1], relay.port))).await;
    c.begin_message("app@legacy.test", &["someone@example.org"])
        .await;
    c.send(&data_block(format!(
        "Subject: {marker}\r\nX-Marker: {marker}\r\n\r\nbody of {marker}\r\n"
    )))
    .await;
    c.read_reply().await.expect("reply to the final dot")
}

/// Waits (bounded: 60 s) until the simulator holds a message with `marker`.
async fn wait_delivered(sim: &common::sim::TestSim, relay: &Relay, marker: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let needle = format!("X-Marker: {marker}\r\n");
    loop {
        let got = sim.messages().expect("simulator mailbox");
        if got.iter().any(|m| m.text().contains(&needle)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{marker} was not delivered; relay log:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_on_postgres_delivers_survives_an_outage_and_shares_its_queue() {
    let sim = common::sim::start().await;
    let work = tempfile::tempdir().expect("tempdir");
    let direct = fresh_database();
    let (target, _) = through(&direct, "127.0.0.1:1".parse().expect("addr"));
    let proxy = Proxy::start(target).await;
    let (_, relay_url) = through(&direct, proxy.addr);
    let fragment = with_upstream(&sim.relay_config_fragment(), "rate = \"1000/s\"");
    let spool = work.path().join("spool");
    let relay = relay_on(work.path(), &relay_url, "", &fragment);
    relay.wait_readyz(200).await;

    // Accepted (after COMMIT), delivered, gone from the database.
    let reply = send(&relay, "pg-first").await;
    reply.assert(250, "2.0.0");
    wait_delivered(&sim, &relay, "pg-first").await;
    assert!(
        !spool.join("queue").exists()
            || std::fs::read_dir(spool.join("queue"))
                .map(|d| d.count())
                .unwrap_or(0)
                == 0,
        "nothing in a local spool"
    );

    // Another process sees the database's queue: a held message put there by an operator
    // store, released by `queue release` in yet another process and delivered by the relay.
    let operator = smtp_oauth_relay::store::open_for_operator(&QueueConfig {
        dir: work.path().join("operator-spool"),
        backend: Backend::Postgres,
        url: Some(DbUrl::new(direct.clone())),
        ..Default::default()
    })
    .expect("operator store");
    let envelope = Envelope {
        mail_from: "app@legacy.test".into(),
        mail_params: MailParams::default(),
        recipients: vec![Recipient::new("someone@example.org")],
        client: "127.0.0.1:1".into(),
        helo: "app.legacy.test".into(),
        auth_user: None,
        received_at: std::time::SystemTime::now(),
        route: "default".into(),
    };
    // Every attempt is refused with 451 at MAIL until the hold is in place, so the relay
    // (told of the commit at once) cannot deliver it first.
    sim.control()
        .script_smtp_fault(SmtpStage::Mail, SmtpFault::Reply451, 10_000);
    let mut incoming = operator.put(&envelope).await.expect("put");
    incoming
        .write(b"Subject: pg-held\r\nX-Marker: pg-held\r\n\r\nheld\r\n")
        .await
        .expect("write");
    let held = incoming.commit().await.expect("commit");
    // A hold during an attempt wins once the attempt ends.
    assert_eq!(
        operator.hold(&held).await.expect("hold"),
        EntryState::Queued
    );
    // An attempt claimed before the hold may still be on its way to MAIL FROM: the faults
    // stay until it has ended (its lease is given back), or it could deliver once they are gone.
    let deadline = Instant::now() + Duration::from_secs(30);
    while query_texts(
        &direct,
        &format!("SELECT lease_owner FROM relay_message WHERE id = '{held}'"),
    ) != [None]
    {
        assert!(
            Instant::now() < deadline,
            "the attempt on {held} never ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sim.control().clear_faults();
    let listing = queue_cli(work.path(), &direct, &["list"]);
    assert!(
        listing.contains(&held) && listing.contains("held"),
        "{listing}"
    );
    let copies = |sim: &common::sim::TestSim| {
        sim.messages()
            .expect("mailbox")
            .iter()
            .filter(|m| m.text().contains("X-Marker: pg-held\r\n"))
            .count()
    };
    assert_eq!(copies(&sim), 0, "a held message was delivered");
    let before = 0;
    let out = queue_cli(work.path(), &direct, &["release", &held]);
    assert!(
        out.contains(&format!("released {held} (was held)")),
        "{out}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while copies(&sim) == before {
        assert!(
            Instant::now() < deadline,
            "the released message was not delivered; relay log:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Delivered and removed before the outage below.
    let deadline = Instant::now() + Duration::from_secs(30);
    while operator
        .list()
        .await
        .expect("list")
        .iter()
        .any(|e| e.id == held)
    {
        assert!(Instant::now() < deadline, "{held} still in the queue");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The database goes away: not ready, and a message gets 451 at DATA end, never 250.
    proxy.cut();
    relay.wait_readyz(503).await;
    for i in 0..3 {
        let reply = send(&relay, &format!("pg-down-{i}")).await;
        assert_eq!(reply.code, 451, "{reply:?}");
        assert!(reply.text().contains("4.3.0"), "{reply:?}");
    }

    // Back: ready again and delivering, without a restart.
    proxy.restore();
    relay.wait_readyz(200).await;
    let reply = send(&relay, "pg-after").await;
    reply.assert(250, "2.0.0");
    wait_delivered(&sim, &relay, "pg-after").await;
    let texts: Vec<String> = sim
        .messages()
        .expect("mailbox")
        .iter()
        .map(|m| m.text())
        .collect();
    assert!(
        !texts.iter().any(|t| t.contains("X-Marker: pg-down-")),
        "a message answered 451 was delivered"
    );
    let listing = queue_cli(work.path(), &direct, &["list"]);
    assert!(!listing.contains(&held), "{listing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_while_the_database_is_down_waits_for_it() {
    let sim = common::sim::start().await;
    let work = tempfile::tempdir().expect("tempdir");
    let direct = fresh_database();
    let (target, _) = through(&direct, "127.0.0.1:1".parse().expect("addr"));
    let proxy = Proxy::start(target).await;
    let (_, relay_url) = through(&direct, proxy.addr);
    // A message already queued (by another relay) before this one starts.
    let other = smtp_oauth_relay::store::open_for_operator(&QueueConfig {
        dir: work.path().join("other-spool"),
        backend: Backend::Postgres,
        url: Some(DbUrl::new(direct.clone())),
        ..Default::default()
    })
    .expect("store");
    let envelope = Envelope {
        mail_from: "app@legacy.test".into(),
        mail_params: MailParams::default(),
        recipients: vec![Recipient::new("someone@example.org")],
        client: "127.0.0.1:1".into(),
        helo: "app.legacy.test".into(),
        auth_user: None,
        received_at: std::time::SystemTime::now(),
        route: "default".into(),
    };
    let mut incoming = other.put(&envelope).await.expect("put");
    incoming
        .write(b"Subject: waiting\r\nX-Marker: pg-waiting\r\n\r\nqueued before\r\n")
        .await
        .expect("write");
    incoming.commit().await.expect("commit");

    proxy.cut();
    let fragment = with_upstream(&sim.relay_config_fragment(), "rate = \"1000/s\"");
    let relay = relay_on(work.path(), &relay_url, "", &fragment);
    relay.wait_readyz(503).await;
    let reply = send(&relay, "pg-refused").await;
    assert_eq!(reply.code, 451, "{reply:?}");

    proxy.restore();
    relay.wait_readyz(200).await;
    wait_delivered(&sim, &relay, "pg-waiting").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_newer_than_this_relay_is_refused() {
    let work = tempfile::tempdir().expect("tempdir");
    let url = fresh_database();
    let queue = QueueConfig {
        dir: work.path().join("spool"),
        backend: Backend::Postgres,
        url: Some(DbUrl::new(url.clone())),
        ..Default::default()
    };
    let store = smtp_oauth_relay::store::open_for_operator(&queue).expect("store");
    assert!(store.list().await.expect("migrated and listed").is_empty());
    let known = smtp_oauth_relay::store::postgres::schema_version();
    common::postgres::execute(
        &url,
        &format!("INSERT INTO relay_schema (version) VALUES ({})", known + 1),
    );
    let store = smtp_oauth_relay::store::open_for_operator(&queue).expect("store");
    let refused = store.list().await.expect_err("a newer schema");
    assert!(
        refused.to_string().contains("newer than this relay"),
        "{refused}"
    );
    assert!(
        store.readiness(1).await.is_err(),
        "not ready on a newer schema"
    );

    let config = work.path().join("operator.toml");
    std::fs::write(
        &config,
        format!("[queue]\nbackend = \"postgres\"\nurl = \"{url}\"\n"),
    )
    .expect("write config");
    let out = run_cli(&config, &["queue", "list"], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("newer than this relay"), "{stderr}");
}
