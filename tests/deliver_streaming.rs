//! Delivery streams large messages from the spool (issue 12, item 6): a message larger than the
//! part kept in memory reaches Exchange byte for byte, with its From rewritten, its leading dots
//! stuffed across read pieces, and 8-bit bytes found deep in the body deciding `BODY=8BITMIME`
//! (or the local 5.6.3 refusal) exactly as for a short message. Memory itself is measured by
//! `bench/run.sh` (delivery memory), not here.

mod common;

use common::delivery::{MAILBOX, after_relay_received, start_delivering};
use common::fixtures::dot_stuff;
use smtp_oauth_relay::sim::SimConfig;
use smtp_oauth_relay::spool::EntryState;
use smtp_oauth_relay::spool::body::{CHUNK, HEAD_LIMIT};

const FAST: &str = "[queue]\nretry_min = \"200ms\"\nretry_max = \"1s\"\nnotify = \"postmaster@contoso.example\"\n[upstream]\nrate = \"1000/s\"\n";

const REST: &[u8] = b"To: b@example.org\r\nSubject: large\r\nDate: Sun, 29 Nov 2026 18:31:42 +0100\r\nMessage-ID: <big@erp.contoso.com>\r\n\r\n";

/// A body of `size` bytes or a little more: numbered lines, every seventh starting with a dot,
/// so that dot-stuffing happens at many offsets, also at the edges of the pieces read.
fn body(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 100);
    let mut i = 0u64;
    while out.len() < size {
        if i.is_multiple_of(7) {
            out.push(b'.');
        }
        out.extend_from_slice(
            format!("{i:010} the quick brown fox jumps over the lazy dog\r\n").as_bytes(),
        );
        i += 1;
    }
    out
}

/// The bytes as the client sends them inside DATA (stuffed; the caller adds the terminator).
fn stuffed(message: &[u8]) -> Vec<u8> {
    dot_stuff(message)
}

#[tokio::test]
async fn a_large_message_is_delivered_exactly_with_its_from_rewritten() {
    let r = start_delivering(FAST, SimConfig::default()).await;
    let size = 3 * HEAD_LIMIT + CHUNK / 3;
    let mut sent = b"From: Billing App <app@legacy.test>\r\n".to_vec();
    sent.extend_from_slice(REST);
    sent.extend_from_slice(&body(size));
    let mut expected =
        format!("From: Billing App <{MAILBOX}>\r\nReply-To: Billing App <app@legacy.test>\r\n")
            .into_bytes();
    expected.extend_from_slice(&sent[b"From: Billing App <app@legacy.test>\r\n".len()..]);
    r.submit("<app@legacy.test>", &["b@example.org"], &stuffed(&sent))
        .await;
    let got = r.wait_delivered(1).await;
    let delivered = after_relay_received(&got[0].data);
    assert_eq!(delivered.len(), expected.len(), "delivered length");
    assert!(
        delivered == expected,
        "delivered bytes differ from the sent ones"
    );
    assert!(
        !got[0].envelope.mail_params.contains("8BITMIME"),
        "a 7-bit message is not declared 8-bit: {:?}",
        got[0].envelope.mail_params
    );
}

#[tokio::test]
async fn an_8bit_byte_deep_in_a_large_body_is_declared_or_refused_with_5_6_3() {
    let mut sent = format!("From: <{MAILBOX}>\r\n").into_bytes();
    sent.extend_from_slice(REST);
    let mut b = body(2 * HEAD_LIMIT + 12345);
    let at = b.len() - 50;
    b[at] = 0xe9;
    sent.extend_from_slice(&b);

    let r = start_delivering(FAST, SimConfig::default()).await;
    r.submit("<app@legacy.test>", &["b@example.org"], &stuffed(&sent))
        .await;
    let got = r.wait_delivered(1).await;
    assert!(
        after_relay_received(&got[0].data) == sent,
        "8-bit body unchanged"
    );
    assert!(
        got[0]
            .envelope
            .mail_params
            .split_whitespace()
            .any(|p| p == "BODY=8BITMIME"),
        "undeclared 8-bit content is declared: {:?}",
        got[0].envelope.mail_params
    );

    let r = start_delivering(FAST, SimConfig::default()).await;
    r.sim.control().set_extensions(false, true);
    let id = r
        .submit("<app@legacy.test>", &["b@example.org"], &stuffed(&sent))
        .await;
    r.wait_for("the message in failed/", |relay| {
        relay.spool.state_of(&id).ok() == Some(EntryState::Failed)
    })
    .await;
    let state = r
        .relay
        .spool
        .read_state(&id)
        .expect("state")
        .expect("state recorded");
    let reason = state.fail_reason.unwrap_or_default();
    assert!(reason.contains("554 5.6.3"), "{reason}");
    // The notice carries the header section only, read from memory.
    let notices = r.wait_delivered(1).await;
    let text = notices[0].text();
    assert!(text.contains("Message-ID: <big@erp.contoso.com>"), "{text}");
    assert!(
        !text.contains("the quick brown fox"),
        "no body in the notice"
    );
}
