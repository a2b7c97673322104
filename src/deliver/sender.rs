//! Sender policy: Exchange refuses a header From the mailbox may not send as (5.7.60 / 5.2.252).
//! Per `upstream.rewrite_from`, such a From becomes the relay's `from` address with the original
//! display name, and the original mailboxes move to Reply-To (when there is none) so replies
//! still reach the application's intended sender. Nothing else in the message changes.
//!
//! Bytes are kept: the display name is copied byte for byte (raw ISO-8859-1 from an ERP system,
//! RFC 2047 words, quoted strings alike), Reply-To is the original From value as sent, and a
//! mailbox without a domain (`root (Cron Daemon)` from cron) is never put in Reply-To, where a
//! reply could not reach it.

use std::borrow::Cow;

use crate::config::RewriteFrom;
use crate::headers::{HeaderName, Headers, Mailbox};
use crate::spool::MessageBody;

/// The sender policy on a stored message: only the head (its header section) is read and, when
/// the From changes, replaced; the rest of the message stays in the file, never copied.
pub fn apply_to_body(body: &MessageBody, from: &str, policy: RewriteFrom) -> MessageBody {
    match apply_sender_policy(body.head(), from, policy) {
        Cow::Borrowed(_) => body.clone(),
        Cow::Owned(head) => body.with_head(head),
    }
}

/// The message as it goes upstream.
pub fn apply_sender_policy<'a>(
    message: &'a [u8],
    from: &str,
    policy: RewriteFrom,
) -> Cow<'a, [u8]> {
    if policy == RewriteFrom::Never {
        return Cow::Borrowed(message);
    }
    let headers = Headers::parse(message);
    let Some(field) = headers.field(&HeaderName::From) else {
        // RFC 5322 §3.6 requires a From; Exchange refuses mail without one. It goes below the
        // trace block, which stays together at the top (RFC 5321 §4.4).
        let at = headers.trace_end();
        let mut added = Vec::new();
        if at > 0 && message[at - 1] != b'\n' {
            added.extend_from_slice(b"\r\n");
        }
        added.extend_from_slice(format!("From: <{from}>\r\n").as_bytes());
        return Cow::Owned(splice(message, at..at, &added));
    };
    let addresses = field.addresses();
    let allowed = !field.is_group()
        && addresses.len() == 1
        && addresses[0].is_some_and(|a| a.eq_ignore_ascii_case(from));
    if allowed {
        return Cow::Borrowed(message);
    }
    let mailboxes = field.mailboxes();
    let name = mailboxes
        .as_ref()
        .and_then(|m| m.first())
        .and_then(|m| m.name)
        .map(|n| n.phrase());
    let mut replacement = b"From: ".to_vec();
    if let Some(name) = &name {
        replacement.extend_from_slice(name);
        replacement.push(b' ');
    }
    replacement.extend_from_slice(format!("<{from}>\r\n").as_bytes());
    if !headers.has(&HeaderName::ReplyTo) {
        match reply_to(field.raw_value(), &addresses, mailboxes.as_deref()) {
            Some(value) => {
                replacement.extend_from_slice(b"Reply-To:");
                replacement.extend_from_slice(&value);
                if !value.ends_with(b"\n") {
                    replacement.extend_from_slice(b"\r\n");
                }
            }
            None if !addresses.is_empty() => {
                tracing::debug!(
                    "header From has no address a reply could reach; no Reply-To added"
                );
            }
            None => {}
        }
    }
    Cow::Owned(splice(message, field.start()..field.end(), &replacement))
}

/// The Reply-To value (after the colon) that keeps the original From reachable: the value as
/// sent when every address in it is qualified, else only its qualified mailboxes, else none.
fn reply_to(
    raw_value: &[u8],
    addresses: &[Option<&str>],
    mailboxes: Option<&[Mailbox<'_>]>,
) -> Option<Vec<u8>> {
    let qualified = |a: &Option<&str>| a.is_some_and(crate::headers::is_qualified);
    if !addresses.is_empty()
        && addresses.iter().all(qualified)
        && mailboxes.is_none_or(|m| m.iter().all(Mailbox::is_qualified))
    {
        return Some(raw_value.to_vec());
    }
    let kept: Vec<&[u8]> = mailboxes?
        .iter()
        .filter(|m| m.is_qualified())
        .map(|m| m.raw)
        .collect();
    if kept.is_empty() {
        return None;
    }
    let mut value = b" ".to_vec();
    value.extend_from_slice(&kept.join(&b", "[..]));
    value.extend_from_slice(b"\r\n");
    Some(value)
}

fn splice(message: &[u8], range: std::ops::Range<usize>, with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + with.len());
    out.extend_from_slice(&message[..range.start]);
    out.extend_from_slice(with);
    out.extend_from_slice(&message[range.end..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FROM: &str = "relay@contoso.com";

    fn apply(message: &str, policy: RewriteFrom) -> String {
        String::from_utf8(apply_sender_policy(message.as_bytes(), FROM, policy).into_owned())
            .expect("utf8")
    }

    #[test]
    fn a_foreign_from_is_rewritten_and_kept_as_reply_to() {
        let out = apply(
            "Subject: x\r\nFrom: \"Billing App\" <app@legacy.local>\r\nTo: b@example.org\r\n\r\nbody\r\n",
            RewriteFrom::WhenDifferent,
        );
        assert_eq!(
            out,
            "Subject: x\r\nFrom: \"Billing App\" <relay@contoso.com>\r\nReply-To: \"Billing App\" <app@legacy.local>\r\nTo: b@example.org\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn an_allowed_from_and_never_leave_the_message_alone() {
        let msg = "From: Relay <RELAY@contoso.com>\r\n\r\nbody\r\n";
        assert_eq!(apply(msg, RewriteFrom::WhenDifferent), msg);
        let foreign = "From: app@legacy.local\r\n\r\nbody\r\n";
        assert_eq!(apply(foreign, RewriteFrom::Never), foreign);
    }

    #[test]
    fn folded_from_and_existing_reply_to() {
        let out = apply(
            "from: Someone\r\n <app@legacy.local>\r\nReply-To: desk@legacy.local\r\n\r\nx\r\n",
            RewriteFrom::Always,
        );
        assert_eq!(
            out,
            "From: Someone <relay@contoso.com>\r\nReply-To: desk@legacy.local\r\n\r\nx\r\n"
        );
    }

    #[test]
    fn a_missing_from_is_added_and_the_body_is_not_searched() {
        let out = apply(
            "Subject: s\r\n\r\nFrom: not a header\r\n",
            RewriteFrom::WhenDifferent,
        );
        assert_eq!(
            out,
            "From: <relay@contoso.com>\r\nSubject: s\r\n\r\nFrom: not a header\r\n"
        );
    }

    fn apply_bytes(message: &[u8]) -> Vec<u8> {
        apply_sender_policy(message, FROM, RewriteFrom::WhenDifferent).into_owned()
    }

    #[test]
    fn raw_8bit_and_encoded_names_keep_their_bytes() {
        assert_eq!(
            apply_bytes(b"From: M\xfcller GmbH <erp@contoso.com>\r\n\r\nx\r\n"),
            b"From: M\xfcller GmbH <relay@contoso.com>\r\nReply-To: M\xfcller GmbH <erp@contoso.com>\r\n\r\nx\r\n"
        );
        assert_eq!(
            apply_bytes(b"From: =?iso-8859-1?q?M=FCller?= <erp@contoso.com>\r\n\r\nx\r\n"),
            b"From: =?iso-8859-1?q?M=FCller?= <relay@contoso.com>\r\nReply-To: =?iso-8859-1?q?M=FCller?= <erp@contoso.com>\r\n\r\nx\r\n"
        );
    }

    #[test]
    fn unqualified_senders_keep_their_name_and_get_no_reply_to() {
        assert_eq!(
            apply_bytes(b"From: root (Cron Daemon)\r\nSubject: s\r\n\r\nx\r\n"),
            b"From: Cron Daemon <relay@contoso.com>\r\nSubject: s\r\n\r\nx\r\n"
        );
        assert_eq!(
            apply_bytes(b"From: \"(Cron Daemon)\" <root>\r\n\r\nx\r\n"),
            b"From: \"(Cron Daemon)\" <relay@contoso.com>\r\n\r\nx\r\n"
        );
        assert_eq!(
            apply_bytes(b"From: root\r\n\r\nx\r\n"),
            b"From: root <relay@contoso.com>\r\n\r\nx\r\n"
        );
        assert_eq!(
            apply_bytes(b"From: Ops <ops@contoso.com>, root\r\n\r\nx\r\n"),
            b"From: Ops <relay@contoso.com>\r\nReply-To: Ops <ops@contoso.com>\r\n\r\nx\r\n"
        );
    }

    #[test]
    fn a_group_moves_to_reply_to_as_sent() {
        assert_eq!(
            apply_bytes(b"From: Accounts: erp@contoso.com, ap@contoso.com;\r\n\r\nx\r\n"),
            b"From: <relay@contoso.com>\r\nReply-To: Accounts: erp@contoso.com, ap@contoso.com;\r\n\r\nx\r\n"
        );
    }

    #[test]
    fn a_missing_from_goes_below_the_trace_block() {
        assert_eq!(
            apply_bytes(b"Received: from a\r\n\tby b; now\r\nReturn-Path: <x@y>\r\nSubject: s\r\n\r\nx\r\n"),
            b"Received: from a\r\n\tby b; now\r\nReturn-Path: <x@y>\r\nFrom: <relay@contoso.com>\r\nSubject: s\r\n\r\nx\r\n"
        );
    }
}
