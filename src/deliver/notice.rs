//! Failure notices: a short RFC 3464 delivery status report sent to `queue.notify` when a
//! message fails for good or expires. The failed message itself always stays in `failed/`.
//!
//! Notices go out with the null envelope sender (RFC 3464 §2, RFC 5321 §4.5.5) in the spool,
//! which is also how the deliverer recognises them: a notice that fails never causes another.

use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::headers::{HeaderName, Headers};
use crate::inbound::message::rfc5322_date;
use crate::spool::{DeliveryState, Envelope, RecipientStatus, RecordedReply};

/// What goes into one report.
pub struct NoticeInput<'a> {
    pub id: &'a str,
    pub envelope: &'a Envelope,
    pub state: &'a DeliveryState,
    /// Why the message failed (expiry, or the permanent replies).
    pub reason: &'a str,
    /// The failed message's header section, attached as `text/rfc822-headers`.
    pub headers: &'a [u8],
    /// Header From of the notice: an address the mailbox may send as.
    pub from: &'a str,
    pub to: &'a str,
    pub reporting_host: &'a str,
    pub upstream_host: &'a str,
}

/// The notice as message bytes (CRLF line ends).
pub fn build(input: &NoticeInput<'_>, now: SystemTime) -> Vec<u8> {
    let boundary = format!("=_smtp-oauth-relay-{}", input.id);
    let subject: String = Headers::parse(input.headers)
        .text(&HeaderName::Subject)
        .map(|s| one_line(&s).trim().chars().take(200).collect())
        .unwrap_or_default();
    let mut text = String::new();
    let mut push = |line: &str| {
        text.push_str(line);
        text.push_str("\r\n");
    };
    push(&format!("From: smtp-oauth-relay <{}>", input.from));
    push(&format!("To: <{}>", input.to));
    push(&format!(
        "Subject: Undelivered mail: {}",
        if subject.is_empty() {
            "(no subject)".to_string()
        } else {
            encoded_words(&subject)
        }
    ));
    push(&format!("Date: {}", rfc5322_date(now)));
    push("Auto-Submitted: auto-replied");
    push("MIME-Version: 1.0");
    push(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\""
    ));
    push("");
    push(&format!("--{boundary}"));
    push("Content-Type: text/plain; charset=utf-8");
    push("");
    push(&format!(
        "smtp-oauth-relay on {} could not deliver message {} from <{}>.",
        input.reporting_host, input.id, input.envelope.mail_from
    ));
    push(&format!("Reason: {}", one_line(input.reason)));
    push("The message is kept in the relay's failed/ directory; after fixing the cause,");
    push(&format!(
        "`smtp-oauth-relay queue retry {}` sends it again.",
        input.id
    ));
    push("");
    push(&format!("--{boundary}"));
    push("Content-Type: message/delivery-status");
    push("");
    push(&format!("Reporting-MTA: dns; {}", input.reporting_host));
    push(&format!(
        "Arrival-Date: {}",
        rfc5322_date(input.envelope.received_at)
    ));
    for r in &input.state.recipients {
        if r.status == RecipientStatus::Delivered {
            continue;
        }
        let diagnostic = r
            .reply
            .as_ref()
            .map_or_else(|| input.reason.to_string(), |r| r.to_string());
        push("");
        push(&format!("Final-Recipient: rfc822; {}", r.address));
        push("Action: failed");
        push(&format!("Status: {}", status_of(r.reply.as_ref())));
        push(&format!("Remote-MTA: dns; {}", input.upstream_host));
        push(&format!("Diagnostic-Code: smtp; {}", one_line(&diagnostic)));
    }
    push("");
    push(&format!("--{boundary}"));
    push("Content-Type: text/rfc822-headers");
    push("");
    let mut out = text.into_bytes();
    out.extend_from_slice(input.headers);
    if !input.headers.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// The recorded enhanced status code (`550 5.1.10 ...` → `5.1.10`), else a generic one.
fn status_of(reply: Option<&RecordedReply>) -> String {
    reply
        .and_then(|r| r.enhanced.clone())
        .unwrap_or_else(|| "5.0.0".into())
}

fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(900)
        .collect()
}

/// Text for an unstructured header the relay writes: as is when ASCII, else RFC 2047
/// encoded words in UTF-8 (the charset the decoded text is known to be in), folded so that no
/// word exceeds 75 characters (RFC 2047 §2). The notice header stays 7-bit.
fn encoded_words(text: &str) -> String {
    if text.is_ascii() {
        return text.to_string();
    }
    // 45 bytes of UTF-8 are 60 base64 characters: with "=?utf-8?b?" and "?=", 72.
    const MAX_BYTES: usize = 45;
    let mut words = Vec::new();
    let mut chunk = String::new();
    for c in text.chars() {
        if chunk.len() + c.len_utf8() > MAX_BYTES {
            words.push(format!("=?utf-8?b?{}?=", STANDARD.encode(&chunk)));
            chunk.clear();
        }
        chunk.push(c);
    }
    if !chunk.is_empty() {
        words.push(format!("=?utf-8?b?{}?=", STANDARD.encode(&chunk)));
    }
    words.join("\r\n ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{Recipient, RecipientState};

    #[test]
    fn the_report_names_each_failed_recipient_with_its_status() {
        let envelope = Envelope {
            mail_from: "app@legacy.test".into(),
            mail_params: Default::default(),
            recipients: vec![
                Recipient::new("gone@example.org"),
                Recipient::new("ok@example.org"),
            ],
            client: "127.0.0.1:1".into(),
            helo: "app".into(),
            auth_user: None,
            received_at: SystemTime::UNIX_EPOCH,
            route: "default".into(),
        };
        let state = DeliveryState {
            recipients: vec![
                RecipientState {
                    address: "gone@example.org".into(),
                    status: RecipientStatus::Failed,
                    reply: Some("550 5.1.10 RESOLVER.ADR.RecipientNotFound".into()),
                },
                RecipientState {
                    address: "ok@example.org".into(),
                    status: RecipientStatus::Delivered,
                    reply: None,
                },
            ],
            ..DeliveryState::default()
        };
        let report = build(
            &NoticeInput {
                id: "01TESTID",
                envelope: &envelope,
                state: &state,
                reason: "gone@example.org: 550 5.1.10 RESOLVER.ADR.RecipientNotFound",
                headers: b"Subject: Invoice\r\n\tMarch\r\nFrom: app@legacy.test\r\n",
                from: "relay@contoso.com",
                to: "admin@contoso.com",
                reporting_host: "relay.test",
                upstream_host: "smtp.office365.com",
            },
            SystemTime::UNIX_EPOCH,
        );
        let text = String::from_utf8(report).expect("utf8");
        assert!(
            text.contains("Subject: Undelivered mail: Invoice March\r\n"),
            "{text}"
        );
        assert!(text.contains("report-type=delivery-status"));
        assert!(
            text.contains(
                "Final-Recipient: rfc822; gone@example.org\r\nAction: failed\r\nStatus: 5.1.10\r\n"
            ),
            "{text}"
        );
        assert!(!text.contains("Final-Recipient: rfc822; ok@example.org"));
        assert!(text.contains("Content-Type: text/rfc822-headers\r\n\r\nSubject: Invoice"));
        assert!(text.ends_with("--=_smtp-oauth-relay-01TESTID--\r\n"));
    }

    #[test]
    fn a_non_ascii_subject_is_encoded_not_sent_raw() {
        assert_eq!(encoded_words("Invoice 42"), "Invoice 42");
        assert_eq!(encoded_words("Grüße"), "=?utf-8?b?R3LDvMOfZQ==?=");
        let long = encoded_words(&"ü".repeat(40));
        assert!(long.is_ascii());
        assert!(long.split("\r\n ").all(|w| w.len() <= 75), "{long}");
        assert_eq!(long.split("\r\n ").count(), 2);
    }
}
