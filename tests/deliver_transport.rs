//! The Transport seam: the deliverer drives any transport, knows no SMTP, and records the
//! per-recipient outcomes a transport reports, with their typed replies.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use smtp_oauth_relay::config::{Rate, RewriteFrom};
use smtp_oauth_relay::deliver::classify::{Outcome, Stage};
use smtp_oauth_relay::deliver::pacer::Progress;
use smtp_oauth_relay::deliver::reply::UpstreamReply;
use smtp_oauth_relay::deliver::{Deliverer, DeliverySettings};
use smtp_oauth_relay::spool::{
    EntryState, Envelope, MailParams, Recipient, RecipientStatus, Spool,
};
use smtp_oauth_relay::transport::{
    Attempted, RecipientResult, Reply, Submission, Transport, TransportFuture,
};
use tokio_util::sync::CancellationToken;

/// What one attempt was handed: envelope sender, recipients, body.
type Seen = (String, Vec<String>, Vec<u8>);

/// Answers every attempt from a script keyed by recipient, and records what it was given.
struct ScriptedTransport {
    seen: Mutex<Vec<Seen>>,
    closed: Mutex<bool>,
}

fn reply(line: &str, stage: Stage) -> Reply {
    Reply::Upstream {
        stage,
        reply: UpstreamReply::parse(&[line.to_string()]).expect("reply"),
    }
}

impl Transport for ScriptedTransport {
    fn send<'a>(&'a self, s: Submission<'a>) -> TransportFuture<'a, Attempted> {
        Box::pin(async move {
            let mut body = Vec::new();
            let mut reader = s.body.reader();
            while let Some(piece) = reader.next_chunk().await.expect("body") {
                body.extend_from_slice(&piece);
            }
            self.seen
                .lock()
                .unwrap()
                .push((s.mail_from.to_string(), s.recipients.to_vec(), body));
            let recipients = s
                .recipients
                .iter()
                .map(|r| match r.split('@').next().unwrap_or("") {
                    "gone" => RecipientResult {
                        class: Outcome::Failed,
                        reply: reply(
                            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found",
                            Stage::RcptTo,
                        ),
                    },
                    _ => RecipientResult {
                        class: Outcome::Delivered,
                        reply: reply("250 2.0.0 OK <id@upstream>", Stage::DataEnd),
                    },
                })
                .collect();
            Attempted {
                recipients,
                reached: Progress::Transaction,
                summary: reply("250 2.0.0 OK <id@upstream>", Stage::DataEnd),
                after_dot: None,
                retry_after: None,
            }
        })
    }

    fn close(&self) -> TransportFuture<'_, ()> {
        Box::pin(async move {
            *self.closed.lock().unwrap() = true;
        })
    }
}

#[tokio::test]
async fn the_deliverer_records_per_recipient_outcomes_from_any_transport() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(&dir.path().join("spool")).unwrap();
    let envelope = Envelope {
        mail_from: "app@legacy.test".into(),
        mail_params: MailParams::default(),
        recipients: vec![
            Recipient::new("ok@example.org"),
            Recipient::new("gone@example.org"),
        ],
        client: "127.0.0.1:1".into(),
        helo: "client.test".into(),
        auth_user: None,
        received_at: SystemTime::now(),
        route: "default".into(),
    };
    let mut incoming = spool.create(&envelope).await.unwrap();
    incoming
        .write_all(b"From: app@legacy.test\r\nSubject: seam\r\n\r\nbody\r\n")
        .await
        .unwrap();
    let id = incoming.commit().await.unwrap();

    let transport = Arc::new(ScriptedTransport {
        seen: Mutex::new(Vec::new()),
        closed: Mutex::new(false),
    });
    let stop = CancellationToken::new();
    let settings = DeliverySettings {
        mailbox: "relay@contoso.example".into(),
        from: "relay@contoso.example".into(),
        rewrite_from: RewriteFrom::WhenDifferent,
        connections: 3,
        rate: Rate {
            messages: 1000,
            per: Duration::from_secs(1),
        },
        retry_min: Duration::from_millis(200),
        retry_max: Duration::from_secs(1),
        max_age: Duration::from_secs(3600),
        notify: None,
        reporting_host: "relay.test".into(),
        upstream_host: "upstream.test".into(),
    };
    let (_handle, task) = Deliverer::start_fixed(
        std::sync::Arc::new(spool.clone()),
        settings,
        transport.clone(),
        Default::default(),
        stop.clone(),
        Default::default(),
    );
    // The message fails as a whole (one recipient refused for good): it moves to failed/.
    let mut state = None;
    for _ in 0..200 {
        if spool.state_of(&id).ok() == Some(EntryState::Failed) {
            state = spool.read_state(&id).unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let state = state.expect("the message reached failed/ with its state");
    let by_address = |a: &str| state.recipients.iter().find(|r| r.address == a).unwrap();
    assert_eq!(
        by_address("ok@example.org").status,
        RecipientStatus::Delivered
    );
    assert_eq!(
        by_address("gone@example.org").status,
        RecipientStatus::Failed
    );
    let refused = by_address("gone@example.org").reply.clone().unwrap();
    assert_eq!(
        (refused.code, refused.enhanced.as_deref()),
        (Some(550), Some("5.1.10")),
        "{state:?}"
    );
    // One attempt, with the envelope sender the deliverer chose and both recipients.
    let seen = transport.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, "relay@contoso.example");
    assert_eq!(seen[0].1, ["ok@example.org", "gone@example.org"]);
    assert!(seen[0].2.ends_with(b"body\r\n"));
    stop.cancel();
    task.await.unwrap();
    assert!(*transport.closed.lock().unwrap(), "close() on stop");
}
