//! The Store conformance suite: what every [`Store`] implementation must do (DESIGN.md, "The
//! seams"). `tests/store_conformance.rs` runs it against each implementation through a
//! [`StoreFixture`]; a new store is usable once it passes all of it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use smtp_oauth_relay::store::{
    DeliveryState, EntryState, Envelope, MailParams, Recipient, RecipientState, RecipientStatus,
    Store, StoreError, StoreEvent,
};
use tokio::sync::broadcast;

/// How to get at one implementation under test.
pub trait StoreFixture {
    /// The store as the daemon opens it (recovery done).
    fn daemon(&self) -> Arc<dyn Store>;
    /// The store as an operator command opens it while the daemon runs.
    fn operator(&self) -> Arc<dyn Store>;
    /// Drops the daemon's store as a crash would and opens it again (recovery runs).
    fn restart(&mut self) -> Arc<dyn Store>;
    /// Runs `smtp-oauth-relay queue ARGS` as its own process against this store; its stdout.
    fn queue_cli(&self, args: &[&str]) -> String;
}

pub fn envelope(recipients: &[&str]) -> Envelope {
    Envelope {
        mail_from: "app@legacy.test".into(),
        mail_params: MailParams::default(),
        recipients: recipients.iter().map(|r| Recipient::new(*r)).collect(),
        client: "127.0.0.1:40000".into(),
        helo: "app.legacy.test".into(),
        auth_user: None,
        received_at: SystemTime::now(),
        route: "default".into(),
    }
}

/// A message body of `len` bytes, CRLF lines.
pub fn body(len: usize) -> Vec<u8> {
    let mut b = b"Subject: conformance\r\n\r\n".to_vec();
    while b.len() + 2 < len {
        b.push(b'a' + (b.len() % 26) as u8);
        if b.len().is_multiple_of(78) {
            b.extend_from_slice(b"\r\n");
        }
    }
    b.extend_from_slice(b"\r\n");
    b
}

/// Puts and commits one message, written in pieces as inbound does.
pub async fn put(store: &dyn Store, recipients: &[&str], bytes: &[u8]) -> String {
    let mut incoming = store.put(&envelope(recipients)).await.expect("put");
    for chunk in bytes.chunks(7919) {
        incoming.write(chunk).await.expect("write");
    }
    incoming.commit().await.expect("commit")
}

/// A claimed message's bytes, read as a transport reads them.
pub async fn read_all(body: &smtp_oauth_relay::spool::MessageBody) -> Vec<u8> {
    let mut out = Vec::new();
    let mut reader = body.reader();
    while let Some(chunk) = reader.next_chunk().await.expect("read the body") {
        out.extend_from_slice(&chunk);
    }
    out
}

/// The next event, waiting at most `limit`.
pub async fn next_event(
    events: &mut broadcast::Receiver<StoreEvent>,
    limit: Duration,
) -> Option<StoreEvent> {
    tokio::time::timeout(limit, events.recv()).await.ok()?.ok()
}

fn state_of(store_list: &[smtp_oauth_relay::store::QueueEntry], id: &str) -> Option<EntryState> {
    store_list.iter().find(|e| e.id == id).map(|e| e.state)
}

/// A commit is announced, listed with its envelope, survives a crash, and is claimed with the
/// exact bytes; a message never committed (aborted, dropped, or cut off by a crash) is never
/// seen.
pub async fn commits_are_durable_and_announced(f: &mut impl StoreFixture) {
    let store = f.daemon();
    let mut events = store.events();
    // Larger than a body kept whole in memory: the rest is read from the store.
    let bytes = body(3 * 1024 * 1024 + 17);
    let id = put(&*store, &["a@example.org", "b@example.org"], &bytes).await;
    assert_eq!(
        next_event(&mut events, Duration::from_secs(5)).await,
        Some(StoreEvent::Committed(
            id.clone(),
            envelope(&["a@example.org"]).routing()
        ))
    );
    let aborted = store.put(&envelope(&["c@example.org"])).await.expect("put");
    aborted.abort().await;
    // The client went away mid-message (what a crash leaves is the recovery tests' part).
    let mut dropped = store.put(&envelope(&["d@example.org"])).await.expect("put");
    dropped.write(&bytes).await.expect("write");
    drop(dropped);

    drop(store);
    let store = f.restart();
    let listed = store.list().await.expect("list");
    assert_eq!(listed.len(), 1, "only the committed message: {listed:?}");
    let entry = &listed[0];
    assert_eq!(entry.id, id);
    assert_eq!(entry.state, EntryState::Queued);
    assert_eq!(entry.mail_from, "app@legacy.test");
    assert_eq!(entry.recipients, ["a@example.org", "b@example.org"]);
    assert_eq!(entry.size, bytes.len() as u64);
    assert!(entry.delivery.is_none());
    let claimed = store.claim(&id).await.expect("claim").expect("queued");
    assert_eq!(
        read_all(&claimed.message.body).await,
        bytes,
        "the exact bytes"
    );
    assert_eq!(claimed.message.envelope.recipients.len(), 2);
    assert!(claimed.state.is_none());
}

/// One attempt at a time: a claimed message cannot be claimed again until the claim ends; a
/// message that is not queued cannot be claimed.
pub async fn claims_are_exclusive(f: &mut impl StoreFixture) {
    let store = f.daemon();
    let id = put(&*store, &["a@example.org"], &body(100)).await;
    let first = store.claim(&id).await.expect("claim").expect("queued");
    assert!(
        store.claim(&id).await.expect("claim").is_none(),
        "claimed twice"
    );
    drop(first);
    let again = store.claim(&id).await.expect("claim");
    assert!(again.is_some(), "the claim ended with its drop");
    drop(again);
    store.hold(&id).await.expect("hold");
    assert!(store.claim(&id).await.expect("claim").is_none(), "held");
    let unknown = "01JDQ6Z8X1V3K5M7N9P0R2S4T6";
    assert!(store.claim(unknown).await.expect("claim").is_none());
}

/// Attempts are recorded; a delivered message is gone; a failed one is kept with its reason;
/// retry puts it back with its failed recipients pending again.
pub async fn attempts_are_recorded_until_delivered_or_failed(f: &mut impl StoreFixture) {
    let store = f.daemon();
    let delivered = put(&*store, &["a@example.org"], &body(100)).await;
    let failed = put(&*store, &["a@example.org", "gone@example.org"], &body(100)).await;
    let next = SystemTime::now() + Duration::from_secs(600);
    let state = DeliveryState {
        attempts: 1,
        next_attempt: Some(next),
        last_reply: Some("451 4.7.500 Server busy".into()),
        ..Default::default()
    };
    store.update(&delivered, &state).await.expect("update");
    drop(store);
    let store = f.restart();
    let listed = store.list().await.expect("list");
    let recorded = listed
        .iter()
        .find(|e| e.id == delivered)
        .and_then(|e| e.delivery.clone())
        .expect("state recorded");
    assert_eq!(recorded.attempts, 1);
    let last = recorded.last_reply.expect("last reply");
    assert_eq!(
        (last.code, last.enhanced.as_deref(), last.text.as_str()),
        (Some(451), Some("4.7.500"), "Server busy"),
        "the reply is kept as data"
    );
    let claimed = store
        .claim(&delivered)
        .await
        .expect("claim")
        .expect("queued");
    assert_eq!(claimed.state.as_ref().map(|s| s.attempts), Some(1));
    assert!(store.complete(&delivered).await.expect("complete"));
    drop(claimed);
    assert!(!store.complete(&delivered).await.expect("complete twice"));

    let failure = DeliveryState {
        attempts: 1,
        fail_reason: Some("gone@example.org: 550 5.1.10 RESOLVER.ADR.RecipientNotFound".into()),
        recipients: vec![
            RecipientState {
                address: "a@example.org".into(),
                status: RecipientStatus::Delivered,
                reply: Some("250 2.1.5 Recipient OK".into()),
            },
            RecipientState {
                address: "gone@example.org".into(),
                status: RecipientStatus::Failed,
                reply: Some("550 5.1.10 RESOLVER.ADR.RecipientNotFound".into()),
            },
        ],
        ..Default::default()
    };
    store.fail(&failed, &failure).await.expect("fail");
    let listed = store.list().await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].state, EntryState::Failed);
    assert_eq!(
        listed[0]
            .delivery
            .as_ref()
            .and_then(|d| d.fail_reason.clone()),
        failure.fail_reason
    );
    assert!(
        store.claim(&failed).await.expect("claim").is_none(),
        "failed is not queued"
    );

    assert_eq!(
        store.retry(&failed).await.expect("retry"),
        EntryState::Failed
    );
    let claimed = store
        .claim(&failed)
        .await
        .expect("claim")
        .expect("queued again");
    let state = claimed.state.clone().expect("state kept");
    assert_eq!(state.fail_reason, None);
    let statuses: Vec<_> = state.recipients.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [RecipientStatus::Delivered, RecipientStatus::Pending],
        "only the failed recipient is tried again"
    );
}

/// Operator commands while a message is being delivered: a hold or delete during the attempt
/// wins (the delivered message is not removed from where the operator put it), and each change
/// is announced.
pub async fn operator_commands_while_delivering(f: &mut impl StoreFixture) {
    let store = f.daemon();
    let mut events = store.events();
    let operator = f.operator();
    let held = put(&*store, &["a@example.org"], &body(100)).await;
    let deleted = put(&*store, &["a@example.org"], &body(100)).await;
    while next_event(&mut events, Duration::from_millis(200))
        .await
        .is_some()
    {}

    let claim = store.claim(&held).await.expect("claim").expect("queued");
    assert_eq!(
        operator.hold(&held).await.expect("hold"),
        EntryState::Queued
    );
    assert_eq!(
        operator.hold(&held).await.expect("hold again"),
        EntryState::Held,
        "holding a held message changes nothing"
    );
    assert!(
        !store.complete(&held).await.expect("complete"),
        "the operator's hold wins over the attempt"
    );
    drop(claim);
    let listed = store.list().await.expect("list");
    assert_eq!(state_of(&listed, &held), Some(EntryState::Held));
    assert_eq!(store.depth().await.queued, 1);

    let claim = store.claim(&deleted).await.expect("claim").expect("queued");
    operator.delete(&deleted).await.expect("delete");
    let recorded = store.update(&deleted, &DeliveryState::default()).await;
    assert!(
        matches!(recorded, Ok(()) | Err(StoreError::NotFound(_))),
        "{recorded:?}"
    );
    assert!(!store.complete(&deleted).await.expect("complete"));
    drop(claim);
    assert!(matches!(
        operator.delete(&deleted).await,
        Err(StoreError::NotFound(_))
    ));

    assert_eq!(
        operator.release(&held).await.expect("release"),
        EntryState::Held
    );
    let listed = store.list().await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(state_of(&listed, &held), Some(EntryState::Queued));
    assert!(store.claim(&held).await.expect("claim").is_some());

    // The daemon's store heard of them (changes close together may come as one event).
    let mut changed = false;
    for _ in 0..20 {
        if next_event(&mut events, Duration::from_millis(500)).await == Some(StoreEvent::Changed) {
            changed = true;
            break;
        }
    }
    assert!(changed, "the operator's changes were announced");
}

/// An operator command run in another process reaches the daemon's store as an event.
pub async fn events_cross_processes(f: &mut impl StoreFixture) {
    let store = f.daemon();
    let id = put(&*store, &["a@example.org"], &body(100)).await;
    let mut events = store.events();
    // Commands other processes ran before this one subscribed are not announced again.
    while next_event(&mut events, Duration::from_millis(600))
        .await
        .is_some()
    {}
    let out = f.queue_cli(&["hold", &id]);
    assert!(out.contains(&format!("held {id}")), "{out}");
    let mut seen = None;
    for _ in 0..20 {
        match next_event(&mut events, Duration::from_millis(500)).await {
            Some(StoreEvent::Changed) => {
                seen = Some(StoreEvent::Changed);
                break;
            }
            _ => continue,
        }
    }
    assert_eq!(
        seen,
        Some(StoreEvent::Changed),
        "the daemon heard of the hold"
    );
    let listed = store.list().await.expect("list");
    assert_eq!(state_of(&listed, &id), Some(EntryState::Held));
}

/// Ids are validated before anything is touched; unknown ids are NotFound.
pub async fn ids_are_validated(f: &mut impl StoreFixture) {
    let store = f.operator();
    for bad in [
        "../x",
        "",
        "..",
        "01JDQ6Z8X1V3K5M7N9P0R2S4T6/..",
        "01JDQ6Z8X1V3K5M7N9P0R2S4TI",
    ] {
        assert!(
            matches!(store.hold(bad).await, Err(StoreError::InvalidId(_))),
            "{bad:?}"
        );
        assert!(matches!(
            store.delete(bad).await,
            Err(StoreError::InvalidId(_))
        ));
        assert!(matches!(
            store.show(bad).await,
            Err(StoreError::InvalidId(_))
        ));
    }
    let unknown = "01JDQ6Z8X1V3K5M7N9P0R2S4T6";
    assert!(
        matches!(store.release(unknown).await, Err(StoreError::NotFound(ref id)) if id == unknown)
    );
    assert!(matches!(
        store.retry(unknown).await,
        Err(StoreError::NotFound(_))
    ));
}

/// Readiness, gauges and the published mailbox status come from the store, and the status is
/// visible to operator commands.
pub async fn gauges_and_status(f: &mut impl StoreFixture) {
    let store = f.daemon();
    assert_eq!(store.readiness(1).await, Ok(()));
    assert!(
        store.readiness(u64::MAX).await.is_err(),
        "no store has that much room"
    );
    assert!(store.free_space().expect("free space") > 0);
    assert_eq!(store.depth().await.queued, 0);
    let before = SystemTime::now() - Duration::from_secs(1);
    let first = put(&*store, &["a@example.org"], &body(100)).await;
    put(&*store, &["a@example.org"], &body(100)).await;
    let held = put(&*store, &["a@example.org"], &body(100)).await;
    store.hold(&held).await.expect("hold");
    let depth = store.depth().await;
    assert_eq!(depth.queued, 2, "held messages are not waiting");
    let oldest = depth.oldest.expect("oldest");
    assert!(oldest >= before, "{oldest:?}");
    let listed = store.list().await.expect("list");
    assert_eq!(listed[0].id, first, "oldest first");

    let status = serde_json::json!({ "state": "held", "reason": "SMTP AUTH disabled" });
    store.publish_status("relay@contoso.example", &status).await;
    let seen = f.operator().statuses().await;
    assert_eq!(seen, vec![("relay@contoso.example".to_string(), status)]);
}

/// A message far larger than what delivery keeps in memory (35 MiB, the largest Exchange
/// Online takes): a claim keeps only its header section; the rest is read from the store piece
/// by piece, exactly, whole or by range; the 8-bit scan sees the store's part.
pub async fn large_messages_are_read_in_pieces(f: &mut impl StoreFixture) {
    use smtp_oauth_relay::spool::body::{CHUNK, HEAD_LIMIT};
    let store = f.daemon();
    let header = b"From: app@legacy.test\r\nSubject: large\r\n\r\n";
    let mut bytes = header.to_vec();
    bytes.extend_from_slice(&body(35 * 1024 * 1024)[header.len()..]);
    let late = bytes.len() - 3;
    bytes[late] = 0xe9;
    let id = put(&*store, &["a@example.org"], &bytes).await;
    let claimed = store.claim(&id).await.expect("claim").expect("queued");
    let message = &claimed.message.body;
    assert_eq!(message.len(), bytes.len() as u64);
    assert!(!message.is_whole_in_memory(), "not held whole");
    assert_eq!(message.head(), header, "only the header section in memory");
    assert!(message.eight_bit(), "the 8-bit byte near the end is seen");
    assert!(!message.header_eight_bit());
    let mut pieces = 0usize;
    let mut out = Vec::with_capacity(bytes.len());
    let mut reader = message.reader();
    while let Some(piece) = reader.next_chunk().await.expect("read") {
        assert!(!piece.is_empty() && piece.len() <= CHUNK.max(HEAD_LIMIT));
        out.extend_from_slice(&piece);
        pieces += 1;
    }
    assert!(out == bytes, "the exact bytes, {} read", out.len());
    assert!(pieces > 100, "read in pieces ({pieces})");
    let len = bytes.len() as u64;
    let held = header.len() as u64;
    let row = 256 * 1024u64;
    for (start, end) in [
        (0, 7),
        (held - 3, held + 5),
        (row - 1, row + 1),
        (3 * row + 11, 5 * row + 13),
        (len - 5, len + 100),
    ] {
        let mut reader = message.range_reader(start, end);
        let mut out = Vec::new();
        while let Some(piece) = reader.next_chunk().await.expect("read a range") {
            out.extend_from_slice(&piece);
        }
        assert!(
            out == bytes[start as usize..end.min(len) as usize],
            "range {start}..{end}"
        );
    }
}
