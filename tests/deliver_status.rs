//! `MailboxStatus`: what the deliverer reports about its queue. A message being delivered is
//! counted once, not once as queued and once more as in flight.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use smtp_oauth_relay::config::{Rate, RewriteFrom};
use smtp_oauth_relay::deliver::classify::{Outcome, Stage};
use smtp_oauth_relay::deliver::pacer::Progress;
use smtp_oauth_relay::deliver::reply::UpstreamReply;
use smtp_oauth_relay::deliver::{Deliverer, DeliveryHandle, DeliverySettings};
use smtp_oauth_relay::spool::{Envelope, MailParams, Recipient, Spool};
use smtp_oauth_relay::transport::{
    Attempted, RecipientResult, Reply, Submission, Transport, TransportFuture,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Delivers at once, except to `slow@...`: that attempt waits until the test lets it go.
struct GatedTransport {
    gate: Notify,
}

impl Transport for GatedTransport {
    fn send<'a>(&'a self, s: Submission<'a>) -> TransportFuture<'a, Attempted> {
        Box::pin(async move {
            if s.recipients.iter().any(|r| r.starts_with("slow@")) {
                self.gate.notified().await;
            }
            let ok = Reply::Upstream {
                stage: Stage::DataEnd,
                reply: UpstreamReply::parse(&["250 2.0.0 OK <id@upstream>".to_string()])
                    .expect("reply"),
            };
            Attempted {
                recipients: vec![
                    RecipientResult {
                        class: Outcome::Delivered,
                        reply: ok.clone(),
                    };
                    s.recipients.len()
                ],
                reached: Progress::Transaction,
                summary: ok,
                after_dot: None,
                retry_after: None,
            }
        })
    }

    fn close(&self) -> TransportFuture<'_, ()> {
        Box::pin(async {})
    }
}

async fn store(spool: &Spool, rcpt: &str) -> String {
    let envelope = Envelope {
        mail_from: "app@legacy.test".into(),
        mail_params: MailParams::default(),
        recipients: vec![Recipient::new(rcpt)],
        client: "127.0.0.1:1".into(),
        helo: "client.test".into(),
        auth_user: None,
        received_at: SystemTime::now(),
        route: "default".into(),
    };
    let mut m = spool.create(&envelope).await.unwrap();
    m.write_all(b"Subject: status\r\n\r\nbody\r\n")
        .await
        .unwrap();
    m.commit().await.unwrap()
}

/// Waits (bounded: 20 s) until the status shows `delivered` deliveries and `queued` messages.
async fn wait_status(handle: &DeliveryHandle, delivered: u64, queued: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = handle.status();
        if st.delivered == delivered && st.queued == queued {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected delivered={delivered} queued={queued}, status is {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_message_in_flight_is_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(&dir.path().join("spool")).unwrap();
    store(&spool, "slow@example.org").await;
    store(&spool, "fast@example.org").await;
    let transport = Arc::new(GatedTransport {
        gate: Notify::new(),
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
        retry_min: Duration::from_secs(60),
        retry_max: Duration::from_secs(600),
        max_age: Duration::from_secs(3600),
        notify: None,
        reporting_host: "relay.test".into(),
        upstream_host: "upstream.test".into(),
    };
    let (handle, task) = Deliverer::start_fixed(
        std::sync::Arc::new(spool.clone()),
        settings,
        transport.clone(),
        Default::default(),
        stop.clone(),
        Default::default(),
    );
    // Both started; the fast one is delivered, the slow one is still in flight: one message.
    wait_status(&handle, 1, 1).await;
    transport.gate.notify_one();
    wait_status(&handle, 2, 0).await;
    stop.cancel();
    task.await.unwrap();
}
