//! The relay under a (simulated) systemd: READY=1 only once it accepts SMTP, WATCHDOG=1 at
//! half of WATCHDOG_USEC, STOPPING=1 on SIGTERM and a clean exit; `/readyz` and `health`
//! follow the listener; and the SIGTERM drain with 100 messages in flight.

mod common;

use std::time::{Duration, Instant};

use common::Client;
use common::process::{self, Relay};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_when_listening_then_watchdog_then_stopping() {
    let mut relay = Relay::daemon(|c| c, Some(Duration::from_millis(400))).await;
    let before_ready = relay.wait_notify("READY=1", Duration::from_secs(30)).await;
    // Nothing but READY (with STATUS) came first; and at READY the listener already accepts.
    assert_eq!(before_ready.len(), 1, "{before_ready:?}");
    assert!(
        before_ready[0].contains("STATUS=accepting SMTP"),
        "{before_ready:?}"
    );
    let mut client = Client::connect(relay.smtp()).await;
    client.expect("220 ").await;
    assert_eq!(relay.health(), (0, "ready\n".into()));

    // WATCHDOG_USEC=400ms: a ping every ~200 ms. Each wait is only a hang guard, far above
    // the interval (systemd kills at 400 ms; this test checks that pings come, not their pace).
    for _ in 0..3 {
        relay
            .wait_notify("WATCHDOG=1", Duration::from_secs(10))
            .await;
    }

    relay.signal(libc::SIGTERM);
    relay
        .wait_notify("STOPPING=1", Duration::from_secs(5))
        .await;
    // The idle session is told to go away, and the process exits 0.
    assert!(client.reply().await.starts_with("421"));
    let status = relay.wait_exit_status(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}\n{}", relay.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_an_unwritable_spool_and_a_full_disk() {
    let relay = Relay::daemon(|c| c, None).await;
    assert_eq!(relay.health(), (0, "ready\n".into()));

    // Replace tmp/ with a file: the probe cannot be created.
    let tmp = relay.spool_dir().join("tmp");
    std::fs::rename(&tmp, relay.spool_dir().join("tmp.away")).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();
    let (code, out) = relay.health();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("503 not ready: spool not writable"),
        "{out}"
    );
    std::fs::remove_file(&tmp).unwrap();
    std::fs::rename(relay.spool_dir().join("tmp.away"), &tmp).unwrap();
    assert_eq!(relay.health().0, 0);
    drop(relay);

    let relay = Relay::daemon(
        |c| c.replace("min_free_space = 1", "min_free_space = 9000000000000000000"),
        None,
    )
    .await;
    let (code, out) = relay.health();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("503 not ready: spool disk nearly full"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_exit_codes_without_a_relay() {
    let dir = tempfile::tempdir().unwrap();
    let unset = dir.path().join("unset.toml");
    std::fs::write(&unset, "[log]\nlevel = \"info\"\n").unwrap();
    assert_eq!(process::health_with(&unset).0, 2);
    let nobody = dir.path().join("nobody.toml");
    let addr = process::free_addr();
    std::fs::write(&nobody, format!("[admin]\nlisten = \"{addr}\"\n")).unwrap();
    let (code, out) = process::health_with(&nobody);
    assert_eq!(code, 1);
    assert!(out.starts_with("unreachable: cannot connect"), "{out}");
}

/// 100 clients are in the middle of DATA when SIGTERM arrives; they then finish. Every one gets
/// its 250, everything is on disk, and the time from SIGTERM to exit is printed (the README and
/// the issue quote it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_100_messages_in_flight() {
    const N: usize = 100;
    let mut relay = Relay::daemon(|c| c, Some(Duration::from_secs(60))).await;
    relay.wait_notify("READY=1", Duration::from_secs(30)).await;
    let body = "Subject: drain\r\n\r\n".to_string() + &"x".repeat(70) + "\r\n";
    let mut clients = Vec::new();
    for i in 0..N {
        let mut c = Client::connect(relay.smtp()).await;
        c.begin_message(&format!("app{i}@legacy.test"), &["someone@example.org"])
            .await;
        c.send(body.repeat(100).as_bytes()).await; // ~9 KB of the body, no end yet
        clients.push(c);
    }
    let sigterm = Instant::now();
    relay.signal(libc::SIGTERM);
    relay
        .wait_notify("STOPPING=1", Duration::from_secs(5))
        .await;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let body = body.clone();
            tokio::spawn(async move {
                c.send(body.repeat(100).as_bytes()).await;
                c.send(b".\r\n").await;
                c.reply().await
            })
        })
        .collect();
    for t in tasks {
        let reply = t.await.unwrap();
        assert!(reply.starts_with("250 2.0.0"), "{reply:?}");
    }
    let status = relay.wait_exit_status(Duration::from_secs(30)).await;
    let drain = sigterm.elapsed();
    assert!(status.success(), "{status:?}");
    assert_eq!(relay.queued_files(), N);
    // A figure for the README, not an assertion: wait_exit above already bounds it.
    eprintln!("DRAIN: {N} messages in flight at SIGTERM: all 250, exit after {drain:?}");
}
