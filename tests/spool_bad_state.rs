//! A queued message whose `state/<ID>.json` cannot be used is never invisible and never stuck:
//! `queue list` shows it with the problem; the daemon resets an empty, truncated or garbled
//! state (the old file kept in `corrupt/`, the reason logged) and delivers the message; a state
//! written by a newer relay is not guessed at: the message is held with the reason until the
//! operator runs `queue retry`, which resets it and delivers.

mod common;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use common::delivery::start_delivering_with;
use smtp_oauth_relay::queue_command::QueueCommand;
use smtp_oauth_relay::sim::SimConfig;
use smtp_oauth_relay::spool::{DeliveryState, EntryState, Envelope, Recipient, Spool};

const FAST: &str =
    "[queue]\nretry_min = \"200ms\"\nretry_max = \"1s\"\n[upstream]\nrate = \"1000/s\"\n";

/// A spool in a fresh directory with one queued message whose state file holds `state`.
async fn spool_with_bad_state(state: &[u8], subject: &str) -> (tempfile::TempDir, PathBuf, String) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("spool");
    let (spool, _) = Spool::open(&dir).expect("spool");
    let envelope = Envelope {
        mail_from: "app@legacy.test".into(),
        mail_params: Default::default(),
        recipients: vec![Recipient::new("b@example.org")],
        client: "127.0.0.1:40000".into(),
        helo: "app.test".into(),
        auth_user: None,
        received_at: SystemTime::now(),
        route: "default".into(),
    };
    let mut m = spool.create(&envelope).await.expect("create");
    m.write_all(format!("Subject: {subject}\r\n\r\nbody\r\n").as_bytes())
        .await
        .expect("write");
    let id = m.commit().await.expect("commit");
    // What an earlier attempt recorded, then the file as a crash or a newer relay left it.
    spool
        .write_state(
            &id,
            &DeliveryState {
                attempts: 3,
                ..Default::default()
            },
        )
        .expect("state");
    std::fs::write(dir.join("state").join(format!("{id}.json")), state).expect("bad state");
    drop(spool);
    (tmp, dir, id)
}

async fn queue(dir: &Path, cmd: QueueCommand) -> String {
    common::queue_command(dir, &cmd)
        .await
        .expect("queue command")
}

fn files_in(dir: &Path, sub: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join(sub))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

async fn unreadable_state_is_reset_and_delivered(state: &[u8], case: &str) {
    let logs = common::logs::capture();
    let (_tmp, dir, id) = spool_with_bad_state(state, case).await;

    // Visible before any daemon runs, with what will happen to it.
    let list = queue(&dir, QueueCommand::List).await;
    let line = list
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{case}: {id} not listed:\n{list}"));
    assert!(line.contains("\tqueued\t"), "{case}: {line}");
    assert!(
        line.contains("state-problem=\"unreadable delivery state"),
        "{case}: {line}"
    );
    let show = queue(&dir, QueueCommand::Show(id.clone())).await;
    assert!(
        show.contains("delivery-state: \"unreadable"),
        "{case}: {show}"
    );

    let spool_dir = dir.clone();
    let r = start_delivering_with(FAST, SimConfig::default(), move |config, _| {
        config.queue.dir = spool_dir;
    })
    .await;
    let got = r.wait_delivered(1).await;
    assert!(got[0].text().contains(case), "{case}: {}", got[0].text());
    r.wait_for("the message to leave queue/", |relay| {
        relay.spool.state_of(&id).is_err()
    })
    .await;
    // The broken state file is kept for the operator, not deleted.
    assert_eq!(
        files_in(&dir, "corrupt"),
        vec![format!("{id}.json")],
        "{case}"
    );
    assert_eq!(
        std::fs::read(dir.join("corrupt").join(format!("{id}.json"))).expect("kept"),
        state,
        "{case}"
    );
    let logged = logs.lines_with(&[&id, "delivery state unreadable: reset"]);
    assert_eq!(logged.len(), 1, "{case}: {}", logs.text());
    assert!(logged[0].contains("reason="), "{case}: {}", logged[0]);
    assert_eq!(r.sim.messages().expect("mailbox").len(), 1, "{case}");
}

#[tokio::test]
async fn an_empty_state_file_is_reset_and_the_message_delivered() {
    unreadable_state_is_reset_and_delivered(b"", "empty-state").await;
}

#[tokio::test]
async fn a_truncated_state_file_is_reset_and_the_message_delivered() {
    let whole = b"{\n  \"version\": 1,\n  \"attempts\": 3,\n  \"next_attempt\": null,\n  \"recipients\": []\n}\n";
    unreadable_state_is_reset_and_delivered(&whole[..30], "truncated-state").await;
}

#[tokio::test]
async fn a_garbled_state_file_is_reset_and_the_message_delivered() {
    unreadable_state_is_reset_and_delivered(b"\0\0\0\0 not json", "garbled-state").await;
}

#[tokio::test]
async fn a_state_of_a_newer_version_holds_the_message_until_the_operator_retries_it() {
    let logs = common::logs::capture();
    let newer = b"{\"version\": 3, \"attempts\": 1, \"delivered_to\": [\"b@example.org\"]}\n";
    let (_tmp, dir, id) = spool_with_bad_state(newer, "newer-state").await;
    let list = queue(&dir, QueueCommand::List).await;
    assert!(
        list.lines().any(|l| l.starts_with(&id)
            && l.contains("state-problem=\"delivery state version 3 is newer")),
        "{list}"
    );

    let spool_dir = dir.clone();
    let r = start_delivering_with(FAST, SimConfig::default(), move |config, _| {
        config.queue.dir = spool_dir;
    })
    .await;
    r.wait_for("the message to be held", |relay| {
        relay.spool.state_of(&id).ok() == Some(EntryState::Held)
    })
    .await;
    // Held instead of delivered, and the newer relay's file left exactly as it was.
    assert!(r.sim.messages().expect("mailbox").is_empty());
    assert_eq!(
        std::fs::read(dir.join("state").join(format!("{id}.json"))).expect("state kept"),
        newer
    );
    let list = queue(&dir, QueueCommand::List).await;
    let line = list
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(line.contains("\theld\t"), "{line}");
    assert!(line.contains("newer than this relay reads (2)"), "{line}");
    assert!(line.contains("queue retry ID"), "{line}");
    let logged = logs.lines_with(&[&id, "message held, not delivered"]);
    assert_eq!(logged.len(), 1, "{}", logs.text());
    assert!(logged[0].contains("version 3"), "{}", logged[0]);

    // The operator decides: retry resets the state (kept in corrupt/) and delivers.
    let out = queue(&dir, QueueCommand::Retry(Some(id.clone()))).await;
    assert!(out.contains(&format!("retry {id} (was held)")), "{out}");
    let got = r.wait_delivered(1).await;
    assert!(got[0].text().contains("newer-state"));
    assert_eq!(files_in(&dir, "corrupt"), vec![format!("{id}.json")]);
    r.wait_for("the message to leave the spool", |relay| {
        relay.spool.state_of(&id).is_err()
    })
    .await;
}
