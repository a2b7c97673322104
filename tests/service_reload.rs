//! SIGHUP: an invalid new config is refused and the relay keeps serving with the old one; a
//! valid one is applied (log level live, restart-only keys reported) and systemd sees
//! RELOADING=1 then READY=1.

mod common;

use std::time::Duration;

use common::process::{self, Relay};
use common::{Client, queued_id};

async fn send_one(relay: &Relay) -> String {
    let mut c = Client::connect(relay.smtp()).await;
    c.begin_message("app@legacy.test", &["someone@example.org"])
        .await;
    c.send(b"Subject: t\r\n\r\nhello\r\n.\r\n").await;
    let reply = c.reply().await;
    assert!(reply.starts_with("250 2.0.0"), "{reply:?}");
    c.cmd_expect("QUIT", "221").await;
    queued_id(&reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_refuses_a_broken_config_and_applies_a_valid_one() {
    let relay = Relay::daemon(|c| c, Some(Duration::from_secs(60))).await;
    relay.wait_notify("READY=1", Duration::from_secs(30)).await;
    let good = std::fs::read_to_string(&relay.config).unwrap();
    // `health` reads a config too: give it one that stays valid.
    let health_config = relay.dir.join("health.toml");
    std::fs::write(&health_config, &good).unwrap();
    // A connection that stays open across both reloads.
    let mut open = Client::connect(relay.smtp()).await;
    open.expect("220 ").await;
    open.cmd_expect("EHLO long.test", "250").await;

    // 1. Broken: an unknown key and a bad value. Refused, old config stays, mail still flows.
    std::fs::write(
        &relay.config,
        good.replace("[log]", "[log]\nlevle = \"debug\"") + "\n[upstream]\nport = \"x\"\n",
    )
    .unwrap();
    let mark = relay.log_text().len();
    relay.signal(libc::SIGHUP);
    let notes = relay.wait_notify("READY=1", Duration::from_secs(10)).await;
    assert!(notes.iter().any(|n| n.contains("RELOADING=1")), "{notes:?}");
    let line = relay.wait_log("new configuration refused", mark).await;
    assert!(line.contains("log.levle"), "{line}");
    let id = send_one(&relay).await;
    assert!(!id.is_empty());
    assert_eq!(process::health_with(&health_config).0, 0);
    assert!(
        !relay.log_text()[mark..].contains("connection opened"),
        "still at info"
    );

    // 2. Valid: log level to debug (applied now), max_recipients (needs a restart).
    std::fs::write(
        &relay.config,
        good.replace("level = \"info\"", "level = \"debug\"")
            .replace("[smtp]", "[smtp]\nmax_recipients = 200"),
    )
    .unwrap();
    let mark = relay.log_text().len();
    relay.signal(libc::SIGHUP);
    let line = relay.wait_log("SIGHUP: configuration reloaded", mark).await;
    assert!(line.contains("applied=log.level"), "{line}");
    assert!(line.contains("needs_restart=smtp.max_recipients"), "{line}");
    relay
        .wait_log("take effect at the next restart", mark)
        .await;
    // Debug logging is live: a new connection is logged.
    send_one(&relay).await;
    relay.wait_log("connection opened", mark).await;

    // The connection opened before both reloads still works.
    open.cmd_expect("NOOP", "250").await;
    open.cmd_expect("QUIT", "221").await;
    assert_eq!(relay.queued_files(), 2);
}
