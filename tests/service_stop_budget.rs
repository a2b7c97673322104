//! One stop budget (`service.stop_timeout`): at SIGTERM, a client stuck in DATA and a delivery
//! attempt stuck at Exchange share one deadline; the relay then exits 0 (long before the 20 s
//! drain plus 25 s deliverer wait it used to take one after the other), keeping the
//! unfinished message queued for the next start.

mod common;

use std::time::{Duration, Instant};

use common::Client;
use common::process::{Relay, relay_toml, with_upstream};
use smtp_oauth_relay::sim::{SmtpFault, SmtpStage};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_client_and_a_stuck_attempt_share_one_stop_deadline() {
    let sim = common::sim::start().await;
    // Exchange takes the whole message and then says nothing for two minutes.
    sim.control().set_stall_duration(Duration::from_secs(120));
    sim.control()
        .script_smtp_fault(SmtpStage::DataEnd, SmtpFault::Stall, 1);
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let fragment = with_upstream(&sim.relay_config_fragment(), "rate = \"1000/s\"");
    let mut relay = Relay::start_with(dir.path(), "stop", &[], |port| {
        relay_toml(
            port,
            &spool_dir,
            "",
            "",
            &format!("[service]\nstop_timeout = \"3s\"\n\n{fragment}"),
        )
    });

    let mut sent = Client::connect(relay.addr()).await;
    sent.begin_message("app@legacy.test", &["someone@example.org"])
        .await;
    sent.send(b"Subject: stuck upstream\r\n\r\nhi\r\n.\r\n")
        .await;
    let queued = sent.expect("250 2.0.0 queued as").await;
    // The attempt reached the end of DATA at the simulator, which now stalls.
    let deadline = Instant::now() + Duration::from_secs(20);
    while sim.control().smtp_faults_fired(SmtpStage::DataEnd) == 0 {
        assert!(Instant::now() < deadline, "no attempt reached DATA");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A second client is in the middle of DATA and sends nothing more.
    let mut stuck = Client::connect(relay.addr()).await;
    stuck
        .begin_message("app@legacy.test", &["someone@example.org"])
        .await;
    stuck.send(b"Subject: never finished\r\n\r\npart").await;

    relay.signal(libc::SIGTERM);
    // A hang guard well above the budget, far below the old 20 s + 25 s.
    let status = relay.wait_exit_status(Duration::from_secs(15)).await;
    assert!(status.success(), "{status:?}\n{}", relay.log_text());
    let log = relay.log_text();
    assert!(
        log.contains("sessions still open at the stop deadline"),
        "{log}"
    );
    assert!(
        log.contains("stop deadline: delivery attempts still running are abandoned"),
        "{log}"
    );
    // The abandoned attempt's message is still queued; the unfinished one was never stored.
    let id = queued.queued_id().expect("queue id");
    let queue: Vec<String> = std::fs::read_dir(spool_dir.join("queue"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(queue, vec![format!("{id}.msg")], "{queue:?}");
}
