//! The database stopped and started again under load: a relay on a PostgreSQL cluster of the
//! test's own takes mail from several clients at once while an administrator stops the server
//! (`pg_ctl stop -m fast`) and starts it again. While it is down the relay is not ready and
//! answers `451 4.3.0`, never `250`; every message it acknowledged, before, during or after, is
//! delivered; afterwards it takes and delivers mail again without a restart of its own.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::fixtures::data_block;
use common::postgres::{PrivateCluster, query_texts, relay_on};
use common::process::with_upstream;
use common::smtp::Client;
use smtp_oauth_relay::sim::RateMode;

/// Messages each client sends at most (the clients also stop when told).
const PER_CLIENT: usize = 400;
const CLIENTS: usize = 4;

/// What the relay answered for one message: the final reply's code (`None`: refused or cut
/// before DATA ended), and when.
struct Sent {
    marker: String,
    code: Option<u16>,
    text: String,
    at: Instant,
}

/// One session per message, so a session the outage breaks does not hide the next message.
async fn send_one(addr: SocketAddr, marker: &str) -> (Option<u16>, String) {
    let Ok(mut c) = Client::try_connect(addr).await else {
        return (None, "connect failed".into());
    };
    c.set_timeout(Duration::from_secs(20));
    let steps = [
        "EHLO app.legacy.test".to_string(),
        "MAIL FROM:<app@legacy.test>".to_string(),
        "RCPT TO:<someone@example.org>".to_string(),
        "DATA".to_string(),
    ];
    match c.try_reply().await {
        Ok(r) if r.code == 220 => {}
        Ok(r) => return (None, r.text()),
        Err(e) => return (None, e.to_string()),
    }
    for step in &steps {
        match c.try_command(step).await {
            Ok(r) if r.code < 400 => {}
            Ok(r) => return (None, format!("{step}: {}", r.text())),
            Err(e) => return (None, format!("{step}: {e}")),
        }
    }
    let message = data_block(format!(
        "Subject: {marker}\r\nX-Marker: {marker}\r\n\r\nbody of {marker}\r\n"
    ));
    if let Err(e) = c.try_send(&message).await {
        return (None, e.to_string());
    }
    match c.try_reply().await {
        Ok(r) => (Some(r.code), r.text()),
        Err(e) => (None, e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_stopped_and_started_under_load_loses_no_acknowledged_mail() {
    let cluster = PrivateCluster::start();
    let url = cluster.url();
    let sim = common::sim::start().await;
    // The load is the database's, not Exchange's: the mailbox takes it all.
    sim.control()
        .set_rate_limit(1_000_000, Duration::from_secs(1), RateMode::Reject);
    let work = tempfile::tempdir().expect("tempdir");
    let fragment = with_upstream(&sim.relay_config_fragment(), "rate = \"1000/s\"");
    let relay = relay_on(work.path(), &url, "lease = \"5s\"", &fragment);
    relay.wait_readyz(200).await;

    let addr = SocketAddr::from(([127, 0, 0, 1], relay.port));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for n in 0..PER_CLIENT {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let marker = format!("restart-{client}-{n}");
                let (code, text) = send_one(addr, &marker).await;
                // A refused client waits a little longer before its next message, as a
                // sender's queue does (and its count lasts through the outage).
                let pause = if code == Some(250) { 20 } else { 100 };
                sent.push(Sent {
                    marker,
                    code,
                    text,
                    at: Instant::now(),
                });
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            sent
        }));
    }

    tokio::time::sleep(Duration::from_millis(800)).await;
    let stopped_at = Instant::now();
    cluster.stop_server();
    relay.wait_readyz(503).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.start_server();
    let started_at = Instant::now();
    relay.wait_readyz(200).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    for client in clients {
        sent.extend(client.await.expect("client task"));
    }

    let acknowledged: Vec<&Sent> = sent.iter().filter(|s| s.code == Some(250)).collect();
    let refused: Vec<&Sent> = sent.iter().filter(|s| s.code != Some(250)).collect();
    let before = acknowledged.iter().filter(|s| s.at < stopped_at).count();
    let after = acknowledged.iter().filter(|s| s.at > started_at).count();
    assert!(before > 0, "no message was acknowledged before the stop");
    assert!(after > 0, "no message was acknowledged after the start");
    assert!(
        !refused.is_empty(),
        "the stop hit no message ({} sent, all acknowledged)",
        sent.len()
    );
    for s in &refused {
        // Refused at DATA end: 451 4.3.0; earlier refusals and cut sessions carry no code.
        if let Some(code) = s.code {
            assert!(
                code == 451 && s.text.contains("4.3.0"),
                "{}: {code} {}",
                s.marker,
                s.text
            );
        }
    }

    // Every acknowledged message arrives (at least once), and the queue empties.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let texts: Vec<String> = sim
            .messages()
            .expect("mailbox")
            .iter()
            .map(|m| m.text())
            .collect();
        let missing: Vec<&str> = acknowledged
            .iter()
            .filter(|s| {
                let needle = format!("X-Marker: {}\r\n", s.marker);
                !texts.iter().any(|t| t.contains(&needle))
            })
            .map(|s| s.marker.as_str())
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} acknowledged messages not delivered (first: {:?}); relay log:\n{}",
            missing.len(),
            acknowledged.len(),
            missing.first(),
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = query_texts(&url, "SELECT count(*)::text FROM relay_message");
        if left == [Some("0".to_string())] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the queue did not empty: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "{} messages: {} acknowledged ({before} before the stop, {after} after the start), \
         {} refused",
        sent.len(),
        acknowledged.len(),
        refused.len()
    );
}
