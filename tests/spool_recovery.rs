//! Start-up recovery against hand-written spool states.

use std::fs;
use std::path::Path;

use smtp_oauth_relay::spool::{EntryState, Spool, SpoolError};

const VALID_Q: &str = "01JDQ6Z8X1V3K5M7N9P0R2S4T6";
const VALID_H: &str = "01JDQ6Z8X1V3K5M7N9P0R2S4T7";
const VALID_F: &str = "01JDQ6Z8X1V3K5M7N9P0R2S4T8";
const TRUNCATED: &str = "01JDQ6Z8X1V3K5M7N9P0R2S4T9";
const GARBAGE: &str = "01JDQ6Z8X1V3K5M7N9P0R2S4TA";
const EMPTY: &str = "01JDQ6Z8X1V3K5M7N9P0R2S4TB";
const MISMATCH: &str = "01JDQ6Z8X1V3K5M7N9P0R2S4TC";
const EXTENDED: &str = "01JDQ6Z8X1V3K5M7N9P0R2S4TD";
const NO_BLANK: &str = "01JDQ6Z8X1V3K5M7N9P0R2S4TE";
const ORPHAN: &str = "01JDQ6Z8X1V3K5M7N9P0R2S4TF";

const BODY: &str = "Subject: fixture\r\nFrom: app@example.com\r\n\r\nHello.\r\n";

/// A message file written by hand, the way an operator would read it.
fn message(id: &str, body: &str, declared_len: usize) -> String {
    format!(
        "Spool-Format: 1\n\
         Id: {id}\n\
         Received-At: 2025-11-29T18:34:00Z\n\
         Client: 127.0.0.1:40000\n\
         Helo: app.example\n\
         Mail-From: <app@example.com>\n\
         Body: 7BIT\n\
         Smtputf8: no\n\
         Rcpt-To: <alice@example.com>\n\
         Body-Length: {declared_len:020}\n\
         \n\
         {body}"
    )
}

fn put(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, content).unwrap();
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

const STATE: &str = r#"{ "version": 1, "attempts": 2, "next_attempt": "2025-11-29T19:00:00Z",
  "last_reply": "451 4.7.500 Server busy", "recipients": [] }"#;

fn fixture(root: &Path) {
    for d in ["tmp", "queue", "held", "failed", "state"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    put(
        root,
        &format!("queue/{VALID_Q}.msg"),
        &message(VALID_Q, BODY, BODY.len()),
    );
    put(
        root,
        &format!("held/{VALID_H}.msg"),
        &message(VALID_H, BODY, BODY.len()),
    );
    put(
        root,
        &format!("failed/{VALID_F}.msg"),
        &message(VALID_F, "", 0),
    );
    // Declares the whole body but only half of it is there.
    put(
        root,
        &format!("queue/{TRUNCATED}.msg"),
        &message(TRUNCATED, &BODY[..BODY.len() / 2], BODY.len()),
    );
    put(
        root,
        &format!("queue/{GARBAGE}.msg"),
        "\u{0}\u{1}garbage\n\nrest",
    );
    put(root, &format!("held/{EMPTY}.msg"), "");
    put(
        root,
        &format!("queue/{MISMATCH}.msg"),
        &message(VALID_Q, BODY, BODY.len()),
    );
    put(
        root,
        &format!("failed/{EXTENDED}.msg"),
        &format!("{}junk", message(EXTENDED, BODY, BODY.len())),
    );
    put(
        root,
        &format!("queue/{NO_BLANK}.msg"),
        "Spool-Format: 1\nId: 01JDQ6Z8X1V3K5M7N9P0R2S4TE\n",
    );
    put(
        root,
        "queue/not-an-id.msg",
        &message(VALID_Q, BODY, BODY.len()),
    );
    // Operator notes are left alone.
    put(root, "queue/README", "notes\n");
    // Uncommitted leftovers.
    put(
        root,
        "tmp/01JDQ6Z8X1V3K5M7N9P0R2S4TG.msg",
        "Spool-Format: 1\nId: partial",
    );
    put(root, "tmp/01JDQ6Z8X1V3K5M7N9P0R2S4T6.123.0.json", "{");
    fs::create_dir_all(root.join("tmp/stray-dir")).unwrap();
    // State: for a live message, for a corrupt one, and an orphan.
    put(root, &format!("state/{VALID_Q}.json"), STATE);
    put(root, &format!("state/{TRUNCATED}.json"), STATE);
    put(root, &format!("state/{ORPHAN}.json"), STATE);
    // A name already taken in corrupt/ (from an earlier recovery).
    put(root, &format!("corrupt/{GARBAGE}.msg"), "older garbage");
}

#[test]
fn recovery_sorts_out_a_messy_spool() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    fixture(root);
    let (spool, report) = Spool::open(root).unwrap();
    assert_eq!(report.queued, 1, "{report:?}");
    assert_eq!(report.held, 1, "{report:?}");
    assert_eq!(report.failed, 1, "{report:?}");
    assert_eq!(report.tmp_removed, 3, "{report:?}");
    assert_eq!(report.corrupt, 7, "{report:?}");
    assert_eq!(report.orphan_states_removed, 1, "{report:?}");
    let line = report.to_string();
    assert!(line.contains("1 queued, 1 held, 1 failed"), "{line}");
    assert!(line.contains("3 temporary files removed"), "{line}");
    assert!(line.contains("7 corrupt files moved to corrupt/"), "{line}");

    assert!(names(&root.join("tmp")).is_empty());
    assert_eq!(
        names(&root.join("queue")),
        vec![format!("{VALID_Q}.msg"), "README".into()]
    );
    assert_eq!(names(&root.join("held")), vec![format!("{VALID_H}.msg")]);
    assert_eq!(names(&root.join("failed")), vec![format!("{VALID_F}.msg")]);
    assert_eq!(names(&root.join("state")), vec![format!("{VALID_Q}.json")]);
    let mut expected_corrupt = vec![
        format!("{GARBAGE}.msg"),
        format!("{GARBAGE}.msg.1"),
        format!("{TRUNCATED}.msg"),
        format!("{TRUNCATED}.json"),
        format!("{EMPTY}.msg"),
        format!("{MISMATCH}.msg"),
        format!("{EXTENDED}.msg"),
        format!("{NO_BLANK}.msg"),
        "not-an-id.msg".to_string(),
    ];
    expected_corrupt.sort();
    assert_eq!(names(&root.join("corrupt")), expected_corrupt);
    // Nothing committed was deleted: the quarantined bytes are intact.
    assert_eq!(
        fs::read_to_string(root.join("corrupt").join(format!("{TRUNCATED}.msg"))).unwrap(),
        message(TRUNCATED, &BODY[..BODY.len() / 2], BODY.len())
    );
    let reasons: Vec<&str> = report
        .corrupt_files
        .iter()
        .map(|(_, r)| r.as_str())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("truncated")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("does not match the file name")),
        "{reasons:?}"
    );

    let list = spool.list().unwrap();
    let got: Vec<(&str, EntryState)> = list.iter().map(|e| (e.id.as_str(), e.state)).collect();
    assert_eq!(
        got,
        vec![
            (VALID_Q, EntryState::Queued),
            (VALID_H, EntryState::Held),
            (VALID_F, EntryState::Failed),
        ]
    );
    assert_eq!(list[0].size, BODY.len() as u64);
    assert_eq!(list[0].delivery.as_ref().unwrap().attempts, 2);
    assert_eq!(
        spool.show(VALID_Q).unwrap().headers,
        b"Subject: fixture\r\nFrom: app@example.com\r\n"
    );

    // A second start finds a clean spool.
    drop(spool);
    let (_spool, again) = Spool::open(root).unwrap();
    assert_eq!(
        (
            again.queued,
            again.held,
            again.failed,
            again.tmp_removed,
            again.corrupt,
            again.orphan_states_removed
        ),
        (1, 1, 1, 0, 0, 0)
    );
}

#[test]
fn open_creates_a_fresh_spool() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("deep/spool");
    assert!(matches!(
        Spool::open_for_admin(&root),
        Err(SpoolError::NotASpool(_))
    ));
    let (spool, report) = Spool::open(&root).unwrap();
    assert_eq!(report, Default::default());
    for d in ["tmp", "queue", "held", "failed", "corrupt", "state"] {
        assert!(root.join(d).is_dir(), "{d}");
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(root.join("queue"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    assert!(spool.list().unwrap().is_empty());
    drop(spool);
    Spool::open_for_admin(&root).unwrap();
}

#[tokio::test]
async fn committed_files_are_private_and_survive_restart() {
    use smtp_oauth_relay::spool::{Envelope, MailParams, Recipient};
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(tmp.path()).unwrap();
    let env = Envelope {
        mail_from: String::new(),
        mail_params: MailParams::default(),
        recipients: vec![Recipient::new("a@example.com")],
        client: "[::1]:1".into(),
        helo: "h".into(),
        auth_user: None,
        received_at: std::time::SystemTime::now(),
        route: "default".into(),
    };
    let mut m = spool.create(&env).await.unwrap();
    m.write_all(b"Subject: x\r\n\r\ny\r\n").await.unwrap();
    // An uncommitted message at "crash" time.
    let mut half = spool.create(&env).await.unwrap();
    half.write_all(&vec![b'z'; 400 * 1024]).await.unwrap();
    let id = m.commit().await.unwrap();
    let p = tmp.path().join("queue").join(format!("{id}.msg"));
    assert_eq!(
        fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Simulate a crash: keep the partial file (a hard link survives Drop's cleanup).
    let tdir = tmp.path().join("tmp");
    fs::hard_link(
        tdir.join(format!("{}.msg", half.id())),
        tdir.join("01JDQ6Z8X1V3K5M7N9P0R2S4TZ.msg"),
    )
    .unwrap();
    half.abort().await;
    drop(spool);
    let (spool, report) = Spool::open(tmp.path()).unwrap();
    assert_eq!(
        (report.queued, report.tmp_removed, report.corrupt),
        (1, 1, 0),
        "{report}"
    );
    assert_eq!(spool.show(&id).unwrap().envelope, env);
}
