//! Operator commands: list, show, hold, release, delete; id validation; safety while running.

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

mod common;

use smtp_oauth_relay::queue_command::{QueueCommand, QueueCommandError};
use smtp_oauth_relay::spool::{
    BodyType, DeliveryState, EntryState, Envelope, MailParams, Recipient, Spool, SpoolError,
};
use smtp_oauth_relay::store::StoreError;

fn envelope(from: &str, rcpts: &[&str], age: Duration) -> Envelope {
    Envelope {
        mail_from: from.into(),
        mail_params: MailParams {
            body: BodyType::EightBitMime,
            ..Default::default()
        },
        recipients: rcpts.iter().map(|r| Recipient::new(*r)).collect(),
        client: "127.0.0.1:40000".into(),
        helo: "app.example".into(),
        auth_user: None,
        received_at: SystemTime::now() - age,
        route: "default".into(),
    }
}

async fn store(spool: &Spool, env: &Envelope, body: &[u8]) -> String {
    let mut m = spool.create(env).await.unwrap();
    m.write_all(body).await.unwrap();
    m.commit().await.unwrap()
}

async fn run(dir: &Path, cmd: QueueCommand) -> Result<String, QueueCommandError> {
    common::queue_command(dir, &cmd).await
}

const BODY: &[u8] =
    b"Subject: Invoice 42\r\nFrom: App <app@example.com>\r\nTo: a@example.com\r\n\r\nHello\r\n";

#[tokio::test]
async fn list_show_hold_release_delete() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (spool, _) = Spool::open(dir).unwrap();
    assert_eq!(
        run(dir, QueueCommand::List).await.unwrap(),
        "queue is empty\n"
    );

    let a = store(
        &spool,
        &envelope(
            "app@example.com",
            &["a@example.com"],
            Duration::from_secs(42),
        ),
        BODY,
    )
    .await;
    let b = store(
        &spool,
        &envelope(
            "",
            &[
                "r1@x.example",
                "r2@x.example",
                "r3@x.example",
                "r4@x.example",
                "r5@x.example",
            ],
            Duration::from_secs(5 * 60 + 3),
        ),
        b"Subject: bounce\r\n\r\n",
    )
    .await;
    let c = store(
        &spool,
        &envelope(
            "old@example.com",
            &["c@example.com"],
            Duration::from_secs(2 * 86_400 + 60),
        ),
        BODY,
    )
    .await;
    spool
        .write_state(
            &c,
            &DeliveryState {
                attempts: 4,
                next_attempt: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_444_000)),
                last_reply: Some("451 4.7.500 Server busy. \"Try\" later".into()),
                ..Default::default()
            },
        )
        .unwrap();

    let list = run(dir, QueueCommand::List).await.unwrap();
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 4, "{list}");
    assert_eq!(
        lines[0],
        "ID\tAGE\tFROM\tRECIPIENTS\tSIZE\tSTATE\tROUTE\tDELIVERY"
    );
    // The age column may tick over on a slow machine; everything else is exact.
    let cols: Vec<&str> = lines[1].split('\t').collect();
    assert!(["42s", "43s", "44s"].contains(&cols[1]), "{list}");
    assert_eq!(
        lines[1].replacen(cols[1], "42s", 1),
        format!(
            "{a}\t42s\tapp@example.com\ta@example.com\t{}\tqueued\tdefault\t",
            BODY.len()
        )
    );
    assert_eq!(
        lines[2],
        format!("{b}\t5m\t<>\tr1@x.example,r2@x.example,r3@x.example,+2\t19\tqueued\tdefault\t")
    );
    assert_eq!(
        lines[3],
        format!(
            "{c}\t2d\told@example.com\tc@example.com\t{}\tqueued\tdefault\tattempts=4 next=2025-11-29T19:20:00Z last=\"451 4.7.500 Server busy. \\\"Try\\\" later\"",
            BODY.len()
        )
    );

    let show = run(dir, QueueCommand::Show(c.clone())).await.unwrap();
    let expected_tail =
        "\n\nSubject: Invoice 42\r\nFrom: App <app@example.com>\r\nTo: a@example.com\r\n";
    assert!(show.ends_with(expected_tail), "{show}");
    for needle in [
        format!("id: {c}\n"),
        "state: queued\n".into(),
        "client: 127.0.0.1:40000\n".into(),
        "helo: app.example\n".into(),
        "mail-from: <old@example.com>\n".into(),
        "body: 8BITMIME\n".into(),
        "rcpt-to: <c@example.com>\n".into(),
        format!("size: {}\n", BODY.len()),
        "attempts: 4\n".into(),
        "next-attempt: 2025-11-29T19:20:00Z\n".into(),
        " ago)\n".into(),
    ] {
        assert!(show.contains(&needle), "missing {needle:?} in\n{show}");
    }
    assert!(!show.contains("Hello"), "show prints headers only");

    // hold / release, including the no-op cases and lower-case ids.
    assert_eq!(
        run(dir, QueueCommand::Hold(a.clone())).await.unwrap(),
        format!("held {a} (was queued)\n")
    );
    assert_eq!(spool.state_of(&a).unwrap(), EntryState::Held);
    assert!(dir.join("held").join(format!("{a}.msg")).exists());
    assert!(!dir.join("queue").join(format!("{a}.msg")).exists());
    assert_eq!(
        run(dir, QueueCommand::Hold(a.to_lowercase()))
            .await
            .unwrap(),
        format!("{a} is already held\n")
    );
    assert!(
        run(dir, QueueCommand::List)
            .await
            .unwrap()
            .contains(&format!(
                "\tapp@example.com\ta@example.com\t{}\theld\t",
                BODY.len()
            ))
    );
    assert!(
        run(dir, QueueCommand::Show(a.clone()))
            .await
            .unwrap()
            .contains("state: held\n")
    );
    assert_eq!(
        run(dir, QueueCommand::Release(a.clone())).await.unwrap(),
        format!("released {a} (was held)\n")
    );
    assert_eq!(
        run(dir, QueueCommand::Release(a.clone())).await.unwrap(),
        format!("{a} is already queued\n")
    );
    assert_eq!(spool.state_of(&a).unwrap(), EntryState::Queued);

    // A failed message can be held or released too.
    spool.move_to(&b, EntryState::Failed).unwrap();
    assert!(
        run(dir, QueueCommand::List)
            .await
            .unwrap()
            .contains("\tfailed\t")
    );
    assert_eq!(
        run(dir, QueueCommand::Release(b.clone())).await.unwrap(),
        format!("released {b} (was failed)\n")
    );

    // delete removes the message and its state.
    assert_eq!(
        run(dir, QueueCommand::Delete(c.clone())).await.unwrap(),
        format!("deleted {c}\n")
    );
    assert!(!dir.join("queue").join(format!("{c}.msg")).exists());
    assert!(!dir.join("state").join(format!("{c}.json")).exists());
    assert!(matches!(
        run(dir, QueueCommand::Delete(c.clone())).await,
        Err(QueueCommandError::Store(StoreError::NotFound(_)))
    ));
    assert_eq!(
        run(dir, QueueCommand::List).await.unwrap().lines().count(),
        3
    );

    // The daemon's handle sees the operator's changes.
    let ids: Vec<String> = spool.list().unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, vec![a, b]);
}

#[tokio::test]
async fn invalid_and_unknown_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_spool, _) = Spool::open(dir).unwrap();
    // A file an attacker would like to reach.
    fs::write(dir.join("secret.msg"), "x").unwrap();
    for bad in [
        "../x",
        "../secret",
        "..",
        "",
        "01JDQ6Z8X1V3K5M7N9P0R2S4T6/..",
        "01JDQ6Z8X1V3K5M7N9P0R2S4TI",
    ] {
        for cmd in [
            QueueCommand::Show(bad.into()),
            QueueCommand::Hold(bad.into()),
            QueueCommand::Release(bad.into()),
            QueueCommand::Delete(bad.into()),
        ] {
            let e = run(dir, cmd.clone()).await.unwrap_err();
            assert!(
                matches!(e, QueueCommandError::Store(StoreError::InvalidId(_))),
                "{cmd:?}: {e}"
            );
        }
    }
    assert!(dir.join("secret.msg").exists());
    let unknown = "01JDQ6Z8X1V3K5M7N9P0R2S4T6";
    for cmd in [
        QueueCommand::Show(unknown.into()),
        QueueCommand::Hold(unknown.into()),
        QueueCommand::Release(unknown.into()),
        QueueCommand::Delete(unknown.into()),
    ] {
        let e = run(dir, cmd.clone()).await.unwrap_err();
        assert!(
            matches!(e, QueueCommandError::Store(StoreError::NotFound(ref id)) if id == unknown),
            "{cmd:?}: {e}"
        );
        assert!(e.to_string().contains(unknown));
    }
}

#[tokio::test]
async fn admin_never_touches_tmp_or_runs_recovery() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (spool, _) = Spool::open(dir).unwrap();
    let env = envelope("app@example.com", &["a@example.com"], Duration::ZERO);
    // A message being received right now.
    let mut inflight = spool.create(&env).await.unwrap();
    inflight.write_all(&vec![b'x'; 300 * 1024]).await.unwrap();
    // And a corrupt file that recovery would move.
    fs::write(dir.join("queue/01JDQ6Z8X1V3K5M7N9P0R2S4T6.msg"), "garbage").unwrap();
    let admin = Spool::open_for_admin(dir).unwrap();
    assert_eq!(
        run(dir, QueueCommand::List).await.unwrap(),
        "queue is empty\n"
    );
    assert!(admin.list().unwrap().is_empty());
    assert!(
        dir.join("tmp")
            .join(format!("{}.msg", inflight.id()))
            .exists()
    );
    assert!(dir.join("queue/01JDQ6Z8X1V3K5M7N9P0R2S4T6.msg").exists());
    // The in-flight message still commits and is then visible to the admin.
    let id = inflight.commit().await.unwrap();
    assert!(run(dir, QueueCommand::List).await.unwrap().contains(&id));
    // Not a spool.
    let other = tempfile::tempdir().unwrap();
    assert!(matches!(
        run(other.path(), QueueCommand::List).await,
        Err(QueueCommandError::Open(ref e)) if e.to_string().contains("is not a spool directory")
    ));
}

/// Operator moves racing with each other and with deletes: every call either succeeds or
/// reports NotFound, and the message ends in exactly one place (or nowhere after a delete).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_operator_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let (spool, _) = Spool::open(&dir).unwrap();
    let env = envelope("app@example.com", &["a@example.com"], Duration::ZERO);
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(store(&spool, &env, BODY).await);
    }
    let mut handles = Vec::new();
    for t in 0..4 {
        let dir = dir.clone();
        let ids = ids.clone();
        handles.push(tokio::task::spawn_blocking(move || {
            let admin = Spool::open_for_admin(&dir).unwrap();
            for (i, id) in ids.iter().enumerate() {
                for _ in 0..5 {
                    let r = match (i + t) % 4 {
                        0 => admin.hold(id),
                        1 => admin.release(id),
                        2 => admin.show(id).map(|_| ()),
                        _ => admin.list().map(|_| ()),
                    };
                    match r {
                        Ok(()) | Err(SpoolError::NotFound(_)) => {}
                        Err(e) => panic!("{id}: {e}"),
                    }
                }
                if t == 3 && i % 5 == 0 {
                    match admin.delete(id) {
                        Ok(()) | Err(SpoolError::NotFound(_)) => {}
                        Err(e) => panic!("{id}: {e}"),
                    }
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let mut found = 0;
    for (i, id) in ids.iter().enumerate() {
        let places = ["queue", "held", "failed"]
            .iter()
            .filter(|d| dir.join(d).join(format!("{id}.msg")).exists())
            .count();
        if i % 5 == 0 {
            assert_eq!(places, 0, "{id} deleted");
        } else {
            assert_eq!(places, 1, "{id}");
            found += 1;
        }
    }
    assert_eq!(spool.list().unwrap().len(), found);
}
