//! Graph delivery of messages larger than `sendMail` takes (`upstream.graph_large_messages`),
//! end to end: a real SMTP client in, the relay's Graph transport out to the simulator's draft
//! and upload-session endpoints. The attachments arrive with their exact bytes in the MIME the
//! simulator builds on send; a missing Mail.ReadWrite holds with its fix; an expired upload URL
//! or a 5xx on a PUT is retried and leaves no draft behind; a message that cannot be split
//! fails with 5.3.4; with the key off, such messages are refused at accept.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::delivery::{DeliveringRelay, start_delivering};
use smtp_oauth_relay::deliver::classify::HoldCause;
use smtp_oauth_relay::metrics::Gauges;
use smtp_oauth_relay::sim::{GraphFault, MAIL_READ_WRITE_ROLE, MAIL_SEND_ROLE, SimConfig};
use smtp_oauth_relay::spool::EntryState;
use smtp_oauth_relay::transport::graph::UPLOAD_PIECE;

const MIB: usize = 1024 * 1024;
/// Fast retries, the pacer out of the way, the draft path on.
const LARGE: &str = "[queue]\nretry_min = \"200ms\"\nretry_max = \"400ms\"\n\
                     [upstream]\ntransport = \"graph\"\nconnections = 4\nrate = \"1000/s\"\n\
                     graph_large_messages = true\n";

/// The simulated app with both roles the draft path needs.
fn large_tenant() -> SimConfig {
    let mut c = SimConfig::graph();
    for client in &mut c.clients {
        client.roles = Some(vec![MAIL_SEND_ROLE.into(), MAIL_READ_WRITE_ROLE.into()]);
    }
    c
}

/// Deterministic bytes that are not all alike.
fn payload(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

fn b64_lines(bytes: &[u8]) -> String {
    let text = base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut out = String::with_capacity(text.len() + text.len() / 38 + 2);
    for line in text.as_bytes().chunks(76) {
        out.push_str(std::str::from_utf8(line).expect("ascii"));
        out.push_str("\r\n");
    }
    out
}

/// A multipart/mixed message: a text part, then each (name, content type, bytes) as a base64
/// attachment.
fn with_attachments(marker: &str, attachments: &[(&str, &str, &[u8])]) -> Vec<u8> {
    let mut m = format!(
        "From: App <app@legacy.test>\r\nTo: b@example.org\r\nSubject: {marker}\r\n\
         Date: Wed, 02 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{marker}@legacy.test>\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"outer-{marker}\"\r\n\r\n\
         --outer-{marker}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\
         See the attachments, {marker}.\r\n"
    );
    for (name, ctype, bytes) in attachments {
        m.push_str(&format!(
            "--outer-{marker}\r\nContent-Type: {ctype}; name=\"{name}\"\r\n\
             Content-Disposition: attachment; filename=\"{name}\"\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n"
        ));
        m.push_str(&b64_lines(bytes));
    }
    m.push_str(&format!("--outer-{marker}--\r\n"));
    m.into_bytes()
}

/// The decoded content of the part named `name` in the delivered MIME.
fn attachment_of(mime: &str, name: &str) -> Vec<u8> {
    let at = mime
        .find(&format!("filename=\"{name}\""))
        .unwrap_or_else(|| panic!("no part {name}"));
    let body_at = at + mime[at..].find("\r\n\r\n").expect("part body") + 4;
    let end = body_at + mime[body_at..].find("--").expect("next delimiter");
    let text: String = mime[body_at..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("base64 attachment")
}

fn counter(r: &DeliveringRelay, name: &str) -> u64 {
    let text = r.metrics.render(&Gauges::default());
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Waits (bounded: 3 minutes, a 30 MiB message in a debug build) for `n` delivered messages.
async fn wait_delivered(
    r: &DeliveringRelay,
    n: usize,
) -> Vec<smtp_oauth_relay::sim::StoredMessage> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let got = r.sim.messages().expect("mailbox");
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} delivered; spool {:?}",
            got.len(),
            r.relay.spool.list().expect("list")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pieces(len: usize) -> u64 {
    len.div_ceil(UPLOAD_PIECE) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_mib_message_with_two_attachments_arrives_with_their_exact_bytes() {
    let r = start_delivering(LARGE, large_tenant()).await;
    // The draft path on: the relay takes what smtp.max_message_size allows.
    assert_eq!(
        smtp_oauth_relay::inbound::accept_limit(&r.config),
        r.config.smtp.max_message_size.0
    );
    let a1 = payload(11 * MIB, 1);
    let a2 = payload(11 * MIB + 12_345, 2);
    let msg = with_attachments(
        "thirty",
        &[
            ("scan.pdf", "application/pdf", &a1),
            ("photo.jpg", "image/jpeg", &a2),
        ],
    );
    assert!(msg.len() > 30 * MIB, "{} bytes", msg.len());
    // c@example.org is in the envelope only: the draft carries it as Bcc.
    r.submit(
        "<app@legacy.test>",
        &["b@example.org", "c@example.org"],
        &msg,
    )
    .await;
    let got = wait_delivered(&r, 1).await;
    assert_eq!(got.len(), 1);
    let delivered = &got[0];
    assert_eq!(delivered.envelope.transfer, "GRAPH");
    let mut rcpts = delivered.envelope.rcpt_to.clone();
    rcpts.sort();
    assert_eq!(rcpts, ["b@example.org", "c@example.org"]);
    let text = delivered.text();
    assert!(text.contains("Message-ID: <thirty@legacy.test>"));
    assert!(text.contains("\r\n\r\nSee the attachments, thirty.\r\n"));
    assert!(attachment_of(&text, "scan.pdf") == a1, "scan.pdf bytes");
    assert!(attachment_of(&text, "photo.jpg") == a2, "photo.jpg bytes");
    assert_eq!(
        r.sim.control().graph_uploads(),
        pieces(a1.len()) + pieces(a2.len())
    );
    assert_eq!(r.sim.control().graph_drafts(), 0, "no draft is left");
    r.wait_for("the spool to empty", |relay| {
        relay.spool.list().expect("list").is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_just_over_3_mib_goes_as_a_draft_and_its_small_parts_stay_in_it() {
    let r = start_delivering(LARGE, large_tenant()).await;
    let big = payload(2 * MIB + 512 * 1024, 3);
    let small = payload(2_000, 4);
    // big.bin is an inline part with a Content-ID (an image the HTML body shows).
    let msg = String::from_utf8(with_attachments(
        "three",
        &[
            ("big.bin", "application/octet-stream", &big),
            ("small.txt", "text/plain", &small),
        ],
    ))
    .expect("ascii")
    .replacen(
        "Content-Disposition: attachment; filename=\"big.bin\"",
        "Content-ID: <big@legacy.test>\r\nContent-Disposition: inline; filename=\"big.bin\"",
        1,
    )
    .into_bytes();
    assert!(
        msg.len() > 3 * MIB && msg.len() < 4 * MIB,
        "{} bytes",
        msg.len()
    );
    r.submit("<app@legacy.test>", &["b@example.org"], &msg)
        .await;
    let got = wait_delivered(&r, 1).await;
    let text = got[0].text();
    assert!(attachment_of(&text, "big.bin") == big);
    // Its part headers reached Graph: the upload session said inline, with the Content-ID.
    assert!(
        text.contains(
            "Content-ID: <big@legacy.test>\r\nContent-Disposition: inline; filename=\"big.bin\""
        ),
        "{}",
        &text[..text.len().min(2000)]
    );
    // The small attachment was never pulled out: it is in the draft as the client wrote it.
    assert!(text.contains(&b64_lines(&small)));
    assert_eq!(r.sim.control().graph_uploads(), pieces(big.len()));
    assert_eq!(r.sim.control().graph_drafts(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_mail_read_write_the_mailbox_is_held_with_the_fix() {
    // Mail.Send only: sendMail would work, drafts do not.
    let r = start_delivering(LARGE, SimConfig::graph()).await;
    let a = payload(4 * MIB, 5);
    let msg = with_attachments("no-rw", &[("a.bin", "application/octet-stream", &a)]);
    r.submit("<app@legacy.test>", &["b@example.org"], &msg)
        .await;
    let (cause, reply) = r.wait_held().await;
    assert_eq!(cause, HoldCause::GraphReadWriteDenied, "{reply}");
    assert!(
        reply.contains("ErrorAccessDenied") && reply.contains("draft"),
        "{reply}"
    );
    for part in [
        "Mail.ReadWrite",
        "Grant admin consent",
        "\"Application Mail.ReadWrite\"",
    ] {
        assert!(cause.fix().contains(part), "{part}: {}", cause.fix());
    }
    assert_eq!(r.spool_in(EntryState::Failed), 0);
    assert_eq!(r.sim.control().graph_drafts(), 0);
    assert!(r.sim.messages().expect("mailbox").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_upload_url_is_retried_with_a_new_draft_and_the_orphan_deleted() {
    let mut tenant = large_tenant();
    tenant.graph.upload_session_secs = 0;
    let r = start_delivering(LARGE, tenant).await;
    let a = payload(4 * MIB, 6);
    let msg = with_attachments("expired", &[("a.bin", "application/octet-stream", &a)]);
    let id = r
        .submit("<app@legacy.test>", &["b@example.org"], &msg)
        .await;
    r.wait_for(
        "a failed attempt recorded",
        |relay| matches!(relay.spool.read_state(&id), Ok(Some(s)) if s.attempts >= 1),
    )
    .await;
    let state = r.delivery_state(&id).expect("state");
    let reply = state.last_reply.map(|l| l.to_string()).unwrap_or_default();
    assert!(reply.contains("ErrorItemNotFound"), "{reply}");
    // The attempt's draft was deleted before the attempt was recorded.
    assert_eq!(r.sim.control().graph_drafts(), 0);
    assert!(r.sim.messages().expect("mailbox").is_empty());
    r.sim
        .control()
        .update(|c| c.graph.upload_session_secs = 900)
        .expect("update");
    let got = wait_delivered(&r, 1).await;
    assert!(attachment_of(&got[0].text(), "a.bin") == a);
    assert_eq!(r.sim.control().graph_drafts(), 0);
    assert_eq!(r.spool_in(EntryState::Failed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_on_a_put_is_retried_once_delivered_and_no_draft_is_left() {
    let r = start_delivering(LARGE, large_tenant()).await;
    r.sim.control().script_upload_fault(
        GraphFault::Error {
            status: 503,
            code: "ServiceUnavailable".into(),
            message: "The service is temporarily unavailable.".into(),
            retry_after: None,
        },
        1,
    );
    let a = payload(7 * MIB, 7);
    let msg = with_attachments("put-5xx", &[("a.bin", "application/octet-stream", &a)]);
    r.submit("<app@legacy.test>", &["b@example.org"], &msg)
        .await;
    let got = wait_delivered(&r, 1).await;
    assert!(attachment_of(&got[0].text(), "a.bin") == a);
    assert_eq!(r.sim.control().graph_faults_fired(), 1);
    // The first attempt's upload failed at its first piece; the second uploaded every piece.
    assert_eq!(r.sim.control().graph_uploads(), 1 + pieces(a.len()));
    assert_eq!(r.sim.control().graph_drafts(), 0);
    // Nothing was sent by the failed attempt: not a possible duplicate.
    assert_eq!(counter(&r, "relay_possible_duplicates_total"), 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(r.sim.messages().expect("mailbox").len(), 1, "one copy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_cannot_be_split_fails_with_5_3_4_and_a_reason() {
    let r = start_delivering(LARGE, large_tenant()).await;
    let text = common::fixtures::message("one-big-text", 4 * MIB);
    let id = r
        .submit("<app@legacy.test>", &["user@example.org"], &text)
        .await;
    r.wait_for("the message to fail", |relay| {
        relay
            .spool
            .list()
            .expect("list")
            .iter()
            .any(|e| e.state == EntryState::Failed)
    })
    .await;
    let reason = r
        .delivery_state(&id)
        .and_then(|s| s.fail_reason)
        .unwrap_or_default();
    assert!(
        reason.contains("552 5.3.4") && reason.contains("not multipart"),
        "{reason}"
    );
    assert_eq!(r.sim.control().graph_requests(), 0, "nothing was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_key_off_larger_messages_are_refused_at_accept() {
    let off = LARGE.replace("graph_large_messages = true\n", "");
    let r = start_delivering(&off, large_tenant()).await;
    let limit = smtp_oauth_relay::inbound::accept_limit(&r.config);
    assert!(limit < smtp_oauth_relay::transport::graph::SENDMAIL_MAX_RAW);
    let mut c = r.relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("EHLO client.test", "250").await;
    c.cmd_expect(
        &format!("MAIL FROM:<app@legacy.test> SIZE={}", 30 * MIB),
        "552 5.3.4",
    )
    .await;
    c.cmd_expect("QUIT", "221").await;

    let on = start_delivering(LARGE, large_tenant()).await;
    let mut c = on.relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("EHLO client.test", "250").await;
    c.cmd_expect(
        &format!("MAIL FROM:<app@legacy.test> SIZE={}", 30 * MIB),
        "250",
    )
    .await;
    c.cmd_expect("QUIT", "221").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refused_on_the_draft_is_refreshed_once_and_the_message_goes() {
    let r = start_delivering(LARGE, large_tenant()).await;
    let issued = r.sim.control().tokens_issued();
    r.sim
        .control()
        .script_graph_fault(GraphFault::code("InvalidAuthenticationToken"), 1);
    let a = payload(4 * MIB, 8);
    let msg = with_attachments("refresh", &[("a.bin", "application/octet-stream", &a)]);
    r.submit("<app@legacy.test>", &["b@example.org"], &msg)
        .await;
    let got = wait_delivered(&r, 1).await;
    assert!(attachment_of(&got[0].text(), "a.bin") == a);
    assert!(r.sim.control().tokens_issued() > issued, "no fresh token");
    assert_eq!(r.sim.control().graph_faults_fired(), 1);
    assert_eq!(r.sim.control().graph_drafts(), 0);
    assert_eq!(r.spool_in(EntryState::Failed), 0);
}
