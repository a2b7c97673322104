//! Failure notices: a short RFC 3464 delivery status report sent to `queue.notify` when a
//! message fails for good or expires. The failed message itself always stays in `failed/`.
//!
//! Notices go out with the null envelope sender (RFC 3464 §2, RFC 5321 §4.5.5) in the spool,
//! which is also how the deliverer recognises them: a notice that fails never causes another.

use std::time::SystemTime;

use crate::inbound::message::rfc5322_date;
use crate::spool::{DeliveryState, Envelope, RecipientStatus};

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
    let subject = header_value(input.headers, "subject").unwrap_or_default();
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
            "(no subject)"
        } else {
            &subject
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
        let reply = r.reply.as_deref().unwrap_or(input.reason);
        push("");
        push(&format!("Final-Recipient: rfc822; {}", r.address));
        push("Action: failed");
        push(&format!("Status: {}", status_of(reply)));
        push(&format!("Remote-MTA: dns; {}", input.upstream_host));
        push(&format!("Diagnostic-Code: smtp; {}", one_line(reply)));
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

/// The enhanced status code in a reply such as `550 5.1.10 ...`, else a generic one.
fn status_of(reply: &str) -> String {
    reply
        .split_whitespace()
        .nth(1)
        .filter(|w| w.starts_with("5.") || w.starts_with("4."))
        .map(|w| w.trim_end_matches(':').to_string())
        .unwrap_or_else(|| "5.0.0".into())
}

fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(900)
        .collect()
}

/// The unfolded value of a header field in `headers`.
fn header_value(headers: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(headers);
    let mut lines = text.split("\r\n").peekable();
    while let Some(line) = lines.next() {
        let Some((field, value)) = line.split_once(':') else {
            continue;
        };
        if field.eq_ignore_ascii_case(name) {
            let mut value = value.trim().to_string();
            while let Some(next) = lines.peek() {
                if !next.starts_with([' ', '\t']) {
                    break;
                }
                value.push(' ');
                value.push_str(next.trim());
                lines.next();
            }
            return Some(one_line(&value).chars().take(200).collect());
        }
    }
    None
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
}
