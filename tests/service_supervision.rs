//! A relay that accepts mail but does not deliver it must never persist.
//!
//! - `queue.retry_min = "30m"` (RFC 5321 §4.5.4.1's suggested interval) delivers: the retry
//!   bounds once made the dispatcher panic at start, while the relay kept answering 250.
//! - Every long-running task (inbound listener, dispatcher, token refresher, admin server,
//!   SIGHUP reloader) is supervised: when one dies, the relay says which in an error line and
//!   exits 1, so that the service manager restarts it. A failpoint (`RELAY_FAILPOINT=task-NAME`,
//!   src/failpoint.rs) makes a task panic.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::process::{Relay, base_config, with_upstream};
use common::{Client, queued_id};

async fn healthz(relay: &Relay) -> serde_json::Value {
    let url = format!("http://{}/healthz", relay.admin());
    let body = reqwest::get(&url)
        .await
        .expect("GET /healthz")
        .text()
        .await
        .expect("body");
    serde_json::from_str(&body).expect("JSON")
}

fn relay_config(smtp: u16, admin: u16, spool: &std::path::Path, queue: &str, sim: &str) -> String {
    base_config(
        SocketAddr::from(([127, 0, 0, 1], smtp)),
        SocketAddr::from(([127, 0, 0, 1], admin)),
        spool,
    )
    .replace("[queue]\n", &format!("[queue]\n{queue}\n"))
        + "\n"
        + &with_upstream(sim, "rate = \"1000/s\"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thirty_minute_retry_min_delivers() {
    let sim = common::sim::start().await;
    let fragment = sim.relay_config_fragment();
    let relay = Relay::builder()
        .config(|s| {
            relay_config(
                s.smtp,
                s.admin,
                &s.spool,
                "retry_min = \"30m\"\nretry_max = \"1h\"",
                &fragment,
            )
        })
        .start();
    let mut c = Client::connect(relay.smtp()).await;
    c.begin_message("app@legacy.test", &["someone@example.org"])
        .await;
    c.send(b"Subject: thirty minutes\r\nX-Marker: thirty\r\n\r\nhi\r\n.\r\n")
        .await;
    let reply = c.reply().await;
    assert!(reply.starts_with("250 2.0.0"), "{reply:?}");
    let id = queued_id(&reply);
    c.cmd_expect("QUIT", "221").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sim
        .messages()
        .unwrap()
        .iter()
        .any(|m| m.text().contains("X-Marker: thirty"))
    {
        assert!(
            Instant::now() < deadline,
            "{id} not delivered with retry_min = 30m; log:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every task reports itself in /healthz.
    let health = healthz(&relay).await;
    for task in [
        "inbound",
        "dispatcher",
        "refresher",
        "admin",
        "reload",
        "maildrop",
    ] {
        assert_eq!(health["tasks"][task], "running", "{health:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_dies_stops_the_relay_with_exit_1_naming_it() {
    let sim = common::sim::start().await;
    let fragment = sim.relay_config_fragment();
    let work = tempfile::tempdir().unwrap();
    for task in [
        "dispatcher",
        "refresher",
        "admin",
        "inbound",
        "reload",
        "maildrop",
    ] {
        let failpoint = format!("task-{task}");
        // Started without waiting for the listener: a task may die before it is bound.
        let mut relay = Relay::builder()
            .work(work.path())
            .tag(task)
            .spool(&work.path().join(format!("spool-{task}")))
            .env("RELAY_FAILPOINT", &failpoint)
            .config(|s| relay_config(s.smtp, s.admin, &s.spool, "", &fragment))
            .notify_socket(None)
            .start();
        let status = relay.wait_exit_status(Duration::from_secs(30)).await;
        let log = relay.log_text();
        assert_eq!(status.code(), Some(1), "{task}: {status:?}\n{log}");
        let line = log
            .lines()
            .find(|l| l.contains("ERROR") && l.contains(&format!("task={task}")))
            .unwrap_or_else(|| panic!("{task}: no error line naming the task:\n{log}"));
        assert!(line.contains("died"), "{line}");
    }
}
