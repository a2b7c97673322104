//! Commit protocol: round trips, large messages, concurrency (group commit), cleanup.

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use smtp_oauth_relay::spool::{
    BodyType, DeliveryState, EntryState, Envelope, MailParams, Recipient, RecipientState,
    RecipientStatus, Spool, SpoolError, format,
};

fn envelope(n: usize) -> Envelope {
    Envelope {
        mail_from: format!("sender{n}@example.com"),
        mail_params: MailParams {
            body: BodyType::EightBitMime,
            smtputf8: n.is_multiple_of(2),
            envid: Some(format!("ENV{n}")),
            ret: Some("HDRS".into()),
        },
        recipients: vec![
            Recipient::new("alice@example.com"),
            Recipient {
                address: "bob@example.com".into(),
                notify: Some("SUCCESS,FAILURE".into()),
                orcpt: Some("rfc822;bob@example.com".into()),
            },
        ],
        client: "127.0.0.1:40000".into(),
        helo: "app.example".into(),
        auth_user: Some("svc".into()),
        received_at: UNIX_EPOCH + Duration::new(1_764_441_240, 987_654_321),
        route: "default".into(),
    }
}

/// Deterministic pseudo-random body with CRLF lines, 8-bit bytes, a lone "." line and bare LFs.
fn body(len: usize, seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(b"Subject: test\r\nFrom: a@example.com\r\n\r\n.\r\n");
    let mut x = seed | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(match x % 67 {
            0 => b'\n',
            1 => b'\r',
            _ => (x >> 8) as u8,
        });
    }
    v.truncate(len);
    v
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

async fn store(spool: &Spool, env: &Envelope, data: &[u8], chunk: usize) -> String {
    let mut m = spool.create(env).await.unwrap();
    for c in data.chunks(chunk.max(1)) {
        m.write_all(c).await.unwrap();
    }
    assert_eq!(m.bytes_written(), data.len() as u64);
    m.commit().await.unwrap()
}

#[tokio::test]
async fn round_trip_odd_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, report) = Spool::open(tmp.path()).unwrap();
    assert_eq!(report.queued + report.tmp_removed + report.corrupt, 0);
    let env = envelope(1);
    let mut ids = Vec::new();
    for (i, chunk) in [1usize, 3, 7, 1000, 4093, 65_537, 300_000]
        .iter()
        .enumerate()
    {
        let data = body(700_001 + i, i as u64);
        let id = store(&spool, &env, &data, *chunk).await;
        assert_eq!(id.len(), 26);
        // The file: a decodable header followed by exactly the body bytes.
        let file = fs::read(tmp.path().join("queue").join(format!("{id}.msg"))).unwrap();
        let h = format::decode(&file).unwrap();
        assert_eq!(h.id, id);
        assert_eq!(h.envelope, env);
        assert_eq!(h.body_length, data.len() as u64);
        assert_eq!(file.len() as u64, h.header_len + h.body_length);
        assert!(
            file[h.header_len as usize..] == data[..],
            "body differs for chunk {chunk}"
        );
        ids.push(id);
    }
    // Ids sort in arrival order; list is sorted by id.
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    let list = spool.list().unwrap();
    assert_eq!(list.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), ids);
    for e in &list {
        assert_eq!(e.state, EntryState::Queued);
        assert_eq!(e.mail_from, env.mail_from);
        assert_eq!(e.recipients, vec!["alice@example.com", "bob@example.com"]);
        assert_eq!(e.received_at, env.received_at);
        assert!(e.delivery.is_none());
    }
    let shown = spool.show(&ids[0]).unwrap();
    assert_eq!(shown.envelope, env);
    assert_eq!(shown.entry, list[0]);
    assert_eq!(shown.headers, b"Subject: test\r\nFrom: a@example.com\r\n");
    assert!(names(&tmp.path().join("tmp")).is_empty());
    let st = spool.stats();
    assert_eq!(st.commits, ids.len() as u64);
    assert_eq!(st.file_fsyncs, ids.len() as u64);
    assert_eq!(
        st.dir_fsyncs,
        ids.len() as u64,
        "sequential commits: one dir fsync each"
    );
}

#[tokio::test]
async fn header_is_readable_text() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(tmp.path()).unwrap();
    let mut env = envelope(2);
    env.mail_from.clear();
    let id = store(&spool, &env, b"Subject: hi\r\n\r\nhello\r\n", 5).await;
    let file = fs::read_to_string(tmp.path().join("queue").join(format!("{id}.msg"))).unwrap();
    let expected = format!(
        "Spool-Format: 2\nId: {id}\nRoute: default\nReceived-At: 2025-11-29T18:34:00.987654321Z\n\
         Client: 127.0.0.1:40000\nHelo: app.example\nAuth-User: svc\nMail-From: <>\n\
         Body: 8BITMIME\nSmtputf8: yes\nEnvid: ENV2\nRet: HDRS\n\
         Rcpt-To: <alice@example.com>\nRcpt-To: <bob@example.com>\n\
         Rcpt-Notify: SUCCESS,FAILURE\nRcpt-Orcpt: rfc822;bob@example.com\n\
         Body-Length: 00000000000000000022\n\nSubject: hi\r\n\r\nhello\r\n"
    );
    assert_eq!(file, expected);
    assert_eq!(spool.list().unwrap()[0].mail_from, "");
}

#[tokio::test]
async fn empty_body_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(tmp.path()).unwrap();
    let m = spool.create(&envelope(3)).await.unwrap();
    let id = m.commit().await.unwrap();
    let e = &spool.list().unwrap()[0];
    assert_eq!((e.id.as_str(), e.size), (id.as_str(), 0));
    assert_eq!(spool.show(&id).unwrap().headers, b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_message_35_mib() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(tmp.path()).unwrap();
    let data = body(35 * 1024 * 1024, 35);
    let id = store(&spool, &envelope(4), &data, 64 * 1024).await;
    let file = fs::read(tmp.path().join("queue").join(format!("{id}.msg"))).unwrap();
    let h = format::decode(&file).unwrap();
    assert_eq!(h.body_length, data.len() as u64);
    assert!(file[h.header_len as usize..] == data[..]);
    // One huge chunk is also written through the bounded buffer.
    let id2 = store(&spool, &envelope(5), &data, data.len()).await;
    let file2 = fs::read(tmp.path().join("queue").join(format!("{id2}.msg"))).unwrap();
    let h2 = format::decode(&file2).unwrap();
    assert!(file2[h2.header_len as usize..] == data[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commits_share_dir_fsyncs() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(tmp.path()).unwrap();
    let mut tasks = Vec::new();
    for i in 0..64usize {
        let spool = spool.clone();
        tasks.push(tokio::spawn(async move {
            let data = body(1000 + i * 997, i as u64);
            let id = store(&spool, &envelope(i), &data, 333).await;
            (id, data)
        }));
    }
    let mut expected = Vec::new();
    for t in tasks {
        expected.push(t.await.unwrap());
    }
    expected.sort();
    let list = spool.list().unwrap();
    assert_eq!(list.len(), 64);
    for (entry, (id, data)) in list.iter().zip(&expected) {
        assert_eq!(&entry.id, id);
        assert_eq!(entry.size, data.len() as u64);
        let file = fs::read(tmp.path().join("queue").join(format!("{id}.msg"))).unwrap();
        let h = format::decode(&file).unwrap();
        assert!(file[h.header_len as usize..] == data[..]);
    }
    let st = spool.stats();
    assert_eq!(st.commits, 64);
    assert_eq!(st.file_fsyncs, 64);
    // Group commit: never more directory fsyncs than commits, at least one. Fewer is typical
    // under concurrency but timing-dependent, so it is only reported.
    assert!((1..=64).contains(&st.dir_fsyncs), "{st:?}");
    eprintln!(
        "64 concurrent commits used {} directory fsyncs",
        st.dir_fsyncs
    );
    assert!(names(&tmp.path().join("tmp")).is_empty());
}

/// Deterministic group commit: many commits that renamed while one fsync was in flight share
/// the next one. Uses a current-thread runtime so all commits rename before any fsync returns.
#[test]
fn group_commit_batches_waiters() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(tmp.path()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(64)
        .build()
        .unwrap();
    rt.block_on(async {
        let mut msgs = Vec::new();
        for i in 0..32 {
            let mut m = spool.create(&envelope(i)).await.unwrap();
            m.write_all(b"Subject: x\r\n\r\nbody\r\n").await.unwrap();
            msgs.push(m);
        }
        let results = futures_join_all(msgs.into_iter().map(|m| m.commit())).await;
        assert!(results.iter().all(|r| r.is_ok()));
    });
    let st = spool.stats();
    assert_eq!(st.commits, 32);
    assert!(st.dir_fsyncs <= 32, "{st:?}");
    eprintln!("32 joined commits used {} directory fsyncs", st.dir_fsyncs);
    assert_eq!(spool.list().unwrap().len(), 32);
}

/// Minimal join_all without the futures crate.
async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let set: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in set {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn drop_and_abort_remove_tmp() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(tmp.path()).unwrap();
    let tdir = tmp.path().join("tmp");
    let mut m = spool.create(&envelope(6)).await.unwrap();
    m.write_all(&body(600_000, 6)).await.unwrap();
    assert_eq!(names(&tdir), vec![format!("{}.msg", m.id())]);
    m.abort().await;
    assert!(names(&tdir).is_empty());

    let mut m = spool.create(&envelope(7)).await.unwrap();
    m.write_all(b"partial").await.unwrap();
    drop(m);
    // Drop removes the file on the blocking pool; wait for it.
    for _ in 0..200 {
        if names(&tdir).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(names(&tdir).is_empty());
    assert!(names(&tmp.path().join("queue")).is_empty());
    assert!(spool.list().unwrap().is_empty());
}

#[tokio::test]
async fn invalid_envelopes_are_refused_before_touching_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(tmp.path()).unwrap();
    let mut bad = envelope(8);
    bad.recipients[1].address = "x@example.com>\nRcpt-To: <evil@example.com".into();
    assert!(matches!(
        spool.create(&bad).await,
        Err(SpoolError::InvalidEnvelope(_))
    ));
    let mut bad = envelope(8);
    bad.helo = "evil\r\nBody-Length: 1".into();
    assert!(matches!(
        spool.create(&bad).await,
        Err(SpoolError::InvalidEnvelope(_))
    ));
    let mut bad = envelope(8);
    bad.recipients.clear();
    assert!(matches!(
        spool.create(&bad).await,
        Err(SpoolError::InvalidEnvelope(_))
    ));
    let mut bad = envelope(8);
    bad.received_at = UNIX_EPOCH - Duration::from_secs(1);
    assert!(matches!(
        spool.create(&bad).await,
        Err(SpoolError::InvalidEnvelope(_))
    ));
    assert!(names(&tmp.path().join("tmp")).is_empty());
}

#[tokio::test]
async fn delivery_state_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(tmp.path()).unwrap();
    let id = store(&spool, &envelope(9), b"Subject: s\r\n\r\nb\r\n", 4).await;
    assert_eq!(spool.read_state(&id).unwrap(), None);
    let st = DeliveryState {
        attempts: 2,
        next_attempt: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_441_600)),
        last_reply: Some("451 4.7.500 Server busy. Please try again later".into()),
        hold_reason: None,
        fail_reason: None,
        recipients: vec![RecipientState {
            address: "alice@example.com".into(),
            status: RecipientStatus::Delivered,
            reply: Some("250 2.1.5 Recipient OK".into()),
        }],
        possible_duplicate: None,
    };
    spool.write_state(&id, &st).unwrap();
    assert_eq!(spool.read_state(&id).unwrap(), Some(st.clone()));
    assert_eq!(spool.list().unwrap()[0].delivery, Some(st));
    // Rewriting replaces it; no temporaries linger.
    let st2 = DeliveryState {
        attempts: 3,
        ..Default::default()
    };
    spool.write_state(&id, &st2).unwrap();
    assert_eq!(spool.read_state(&id).unwrap(), Some(st2));
    assert!(names(&tmp.path().join("tmp")).is_empty());
    assert_eq!(names(&tmp.path().join("state")), vec![format!("{id}.json")]);
    assert!(matches!(
        spool.read_state("../queue/x"),
        Err(SpoolError::InvalidId(_))
    ));
    assert!(matches!(
        spool.write_state("../../etc/passwd", &DeliveryState::default()),
        Err(SpoolError::InvalidId(_))
    ));
}

#[tokio::test]
async fn second_daemon_is_locked_out() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(tmp.path()).unwrap();
    assert!(matches!(
        Spool::open(tmp.path()),
        Err(SpoolError::Locked(_))
    ));
    // Admin access does not need the lock.
    Spool::open_for_admin(tmp.path()).unwrap();
    drop(spool);
    Spool::open(tmp.path()).unwrap();
    assert!(Spool::open(tmp.path()).unwrap().0.free_space().unwrap() > 0);
}

#[tokio::test]
async fn many_recipients_large_header() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(tmp.path()).unwrap();
    let mut env = envelope(10);
    env.recipients = (0..500)
        .map(|i| Recipient {
            address: format!("recipient-number-{i:04}@a-rather-long-domain-name.example"),
            notify: Some("SUCCESS,FAILURE,DELAY".into()),
            orcpt: Some(format!(
                "rfc822;recipient-number-{i:04}@a-rather-long-domain-name.example"
            )),
        })
        .collect();
    let id = store(&spool, &env, b"Subject: many\r\n\r\nx\r\n", 7).await;
    let file = fs::read(tmp.path().join("queue").join(format!("{id}.msg"))).unwrap();
    assert!(format::decode(&file).unwrap().header_len > 256 * 1024 / 4);
    assert_eq!(spool.show(&id).unwrap().envelope, env);
    assert_eq!(spool.list().unwrap()[0].recipients.len(), 500);
    drop(spool);
    let (_s, report) = Spool::open(tmp.path()).unwrap();
    assert_eq!((report.queued, report.corrupt), (1, 0));
}
