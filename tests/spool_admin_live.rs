//! Operator commands reach the running deliverer: `queue release` from another process gets a
//! held message delivered without a restart; `queue hold` and `queue delete` take a message
//! out of the deliverer's schedule at once (it is never attempted again), and a later release
//! puts it back.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::delivery::start_delivering;
use common::process::{Relay, queue_cli, relay_toml, with_upstream};
use smtp_oauth_relay::sim::{SimConfig, SmtpFault, SmtpStage};
use smtp_oauth_relay::spool::{EntryState, Envelope, MailParams, Recipient, Spool};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_on_a_running_relay_is_delivered_without_a_restart() {
    let sim = common::sim::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    // A held message in the spool before the relay starts (the spool lock is released when
    // `spool` is dropped).
    let id = {
        let (spool, _) = Spool::open(&spool_dir).unwrap();
        let envelope = Envelope {
            mail_from: "app@legacy.test".into(),
            mail_params: MailParams::default(),
            recipients: vec![Recipient::new("someone@example.org")],
            client: "127.0.0.1:1".into(),
            helo: "app.test".into(),
            auth_user: None,
            received_at: SystemTime::now(),
            route: "default".into(),
        };
        let mut m = spool.create(&envelope).await.unwrap();
        m.write_all(b"Subject: held then released\r\nX-Marker: released-1\r\n\r\nhi\r\n")
            .await
            .unwrap();
        let id = m.commit().await.unwrap();
        spool.hold(&id).unwrap();
        id
    };
    let fragment = with_upstream(&sim.relay_config_fragment(), "rate = \"1000/s\"");
    let relay = Relay::start_with(dir.path(), "live", &[], |port| {
        relay_toml(
            port,
            &spool_dir,
            "",
            "",
            &format!("[log]\nlevel = \"info\"\n\n{fragment}"),
        )
    });
    // The deliverer runs (it has its token) and has the held message in its spool.
    relay.wait_log("access token obtained", 0).await;
    assert!(
        sim.messages().unwrap().is_empty(),
        "a held message was sent"
    );

    let out = queue_cli(dir.path(), &spool_dir, &["release", &id]);
    assert_eq!(out.trim(), format!("released {id} (was held)"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = sim.messages().unwrap();
        if got
            .iter()
            .any(|m| m.text().contains("X-Marker: released-1"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the released message was not delivered; relay log:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sim.messages().unwrap().len(), 1);
}

/// Waits (bounded: 20 s) until the deliverer counts `n` messages as its own (queued or in
/// flight).
async fn wait_scheduled(r: &common::delivery::DeliveringRelay, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = r.delivery.status();
        if status.queued == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the deliverer still counts {} messages, expected {n}",
            status.queued
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_and_delete_take_a_message_out_of_the_running_schedule() {
    // A deferral waits an hour: only an operator command can change what happens to it.
    let r = start_delivering(
        "[queue]\nretry_min = \"1h\"\nretry_max = \"2h\"\n[upstream]\nrate = \"1000/s\"\n",
        SimConfig::default(),
    )
    .await;
    r.sim
        .control()
        .script_smtp_fault(SmtpStage::Mail, SmtpFault::Reply451, 1);
    let id = r.send("deferred for an hour").await;
    r.wait_for("the first attempt recorded", |relay| {
        relay
            .spool
            .read_state(&id)
            .ok()
            .flatten()
            .is_some_and(|s| s.attempts == 1 && s.next_attempt.is_some())
    })
    .await;
    wait_scheduled(&r, 1, "after the deferral").await;
    let work = tempfile::tempdir().unwrap();
    let spool = r.relay.spool_dir().to_path_buf();

    // Held by an operator in another process: the deliverer drops it from its schedule.
    let out = queue_cli(work.path(), &spool, &["hold", &id]);
    assert_eq!(out.trim(), format!("held {id} (was queued)"));
    wait_scheduled(&r, 0, "after queue hold").await;

    // Released: back in the schedule, at its recorded next attempt.
    queue_cli(work.path(), &spool, &["release", &id]);
    wait_scheduled(&r, 1, "after queue release").await;

    // Deleted: gone from the schedule too.
    queue_cli(work.path(), &spool, &["delete", &id]);
    wait_scheduled(&r, 0, "after queue delete").await;
    assert!(r.relay.spool.list().unwrap().is_empty());
    assert!(r.sim.messages().unwrap().is_empty(), "never delivered");
    assert_eq!(r.spool_in(EntryState::Held), 0);
}
