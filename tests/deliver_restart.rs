//! A restart with messages in every state: queued ones are delivered (respecting a recorded
//! next attempt), held and failed ones are left alone.

mod common;

use std::time::{Duration, SystemTime};

use common::delivery::start_delivering_with;
use smtp_oauth_relay::sim::SimConfig;
use smtp_oauth_relay::spool::{DeliveryState, EntryState, Envelope, Recipient, Spool};

/// One upstream session at a time: messages go in the order they are due, so a message sent
/// last is delivered after anything the deliverer considers due before it.
const ONE_AT_A_TIME: &str = "[queue]\nretry_min = \"200ms\"\nretry_max = \"1s\"\n\
                             [upstream]\nrate = \"1000/s\"\nconnections = 1\n";

async fn put(spool: &Spool, subject: &str) -> String {
    let envelope = Envelope {
        mail_from: "app@legacy.test".into(),
        mail_params: Default::default(),
        recipients: vec![Recipient::new("b@example.org")],
        client: "127.0.0.1:1".into(),
        helo: "app".into(),
        auth_user: None,
        received_at: SystemTime::now(),
        route: "default".into(),
    };
    let mut incoming = spool.create(&envelope).await.expect("create");
    incoming
        .write_all(format!("Subject: {subject}\r\n\r\nbody\r\n").as_bytes())
        .await
        .expect("write");
    incoming.commit().await.expect("commit")
}

#[tokio::test]
async fn restart_delivers_queued_mail_and_leaves_held_and_failed_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool_dir = dir.path().join("spool");
    let (due, later, held, failed) = {
        let (spool, _) = Spool::open(&spool_dir).expect("spool");
        let due = put(&spool, "due").await;
        let later = put(&spool, "later").await;
        let held = put(&spool, "held").await;
        let failed = put(&spool, "failed").await;
        // An earlier run attempted `due` twice (its retry time has passed) and deferred `later`.
        let past = DeliveryState {
            attempts: 2,
            next_attempt: Some(SystemTime::now() - Duration::from_secs(5)),
            last_reply: Some("451 4.7.0 Temporary server error".into()),
            ..DeliveryState::default()
        };
        spool.write_state(&due, &past).expect("state");
        let future = DeliveryState {
            attempts: 1,
            next_attempt: Some(SystemTime::now() + Duration::from_secs(3600)),
            ..DeliveryState::default()
        };
        spool.write_state(&later, &future).expect("state");
        spool.hold(&held).expect("hold");
        spool.move_to(&failed, EntryState::Failed).expect("fail");
        (due, later, held, failed)
    };
    let path = spool_dir.clone();
    let r = start_delivering_with(ONE_AT_A_TIME, SimConfig::default(), move |c, _| {
        c.queue.dir = path
    })
    .await;
    let got = r.wait_delivered(1).await;
    assert!(got[0].text().contains("Subject: due"));
    r.wait_for("`due` leaves the spool", |relay| {
        relay
            .spool
            .list()
            .expect("list")
            .iter()
            .all(|e| e.id != due)
    })
    .await;
    // Anything else the deliverer (wrongly) took for due at the restart would go out before a
    // message sent now: once this sentinel is delivered, nothing else can be on its way.
    let sentinel = r.send("sentinel").await;
    r.wait_for("the sentinel leaves the spool", |relay| {
        relay
            .spool
            .list()
            .expect("list")
            .iter()
            .all(|e| e.id != sentinel)
    })
    .await;
    let mut subjects: Vec<String> = r
        .sim
        .messages()
        .expect("mailbox")
        .iter()
        .map(|m| {
            let text = m.text();
            text.lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    subjects.sort();
    assert_eq!(
        subjects,
        ["due", "sentinel"],
        "only `due` (and the sentinel) delivered"
    );
    // `later` was not attempted: its recorded state is the one the earlier run left.
    let state = r
        .relay
        .spool
        .read_state(&later)
        .expect("state")
        .expect("recorded");
    assert_eq!(state.attempts, 1, "{state:?}");
    assert!(
        state.next_attempt.expect("next attempt") > SystemTime::now() + Duration::from_secs(3000),
        "{state:?}"
    );
    let states: Vec<(String, EntryState)> = r
        .relay
        .spool
        .list()
        .expect("list")
        .into_iter()
        .map(|e| (e.id, e.state))
        .collect();
    assert!(
        states.contains(&(later.clone(), EntryState::Queued)),
        "{states:?}"
    );
    assert!(states.contains(&(held, EntryState::Held)), "{states:?}");
    assert!(states.contains(&(failed, EntryState::Failed)), "{states:?}");
    assert_eq!(states.len(), 3);
}
