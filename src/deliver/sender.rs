//! Sender policy: Exchange refuses a header From the mailbox may not send as (5.7.60 / 5.2.252).
//! Per `upstream.rewrite_from`, such a From becomes the relay's `from` address with the original
//! display name, and the original address moves to Reply-To (when there is none) so replies still
//! reach the application's intended sender. Nothing else in the message changes.

use std::borrow::Cow;

use crate::config::RewriteFrom;

/// The message as it goes upstream.
pub fn apply_sender_policy<'a>(
    message: &'a [u8],
    from: &str,
    policy: RewriteFrom,
) -> Cow<'a, [u8]> {
    if policy == RewriteFrom::Never {
        return Cow::Borrowed(message);
    }
    let header_end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
        .unwrap_or(if message.starts_with(b"\r\n") {
            0
        } else {
            message.len()
        });
    let headers = &message[..header_end];
    let Some(field) = find_field(headers, b"from") else {
        // RFC 5322 §3.6 requires a From; Exchange refuses mail without one.
        let mut out = format!("From: <{from}>\r\n").into_bytes();
        out.extend_from_slice(message);
        return Cow::Owned(out);
    };
    let value = unfold(&headers[field.value_start..field.end]);
    let (display, address) = split_mailbox(&value);
    if address.eq_ignore_ascii_case(from) {
        return Cow::Borrowed(message);
    }
    let mut replacement = match display {
        Some(name) => format!("From: {name} <{from}>\r\n"),
        None => format!("From: <{from}>\r\n"),
    };
    if find_field(headers, b"reply-to").is_none() && !value.trim().is_empty() {
        replacement.push_str(&format!("Reply-To: {}\r\n", value.trim()));
    }
    let mut out = Vec::with_capacity(message.len() + replacement.len());
    out.extend_from_slice(&message[..field.start]);
    out.extend_from_slice(replacement.as_bytes());
    out.extend_from_slice(&message[field.end..]);
    Cow::Owned(out)
}

/// The envelope address and display name of a From field value.
fn split_mailbox(value: &str) -> (Option<String>, String) {
    let value = value.trim();
    match (value.rfind('<'), value.rfind('>')) {
        (Some(open), Some(close)) if open < close => {
            let name = value[..open].trim();
            let address = value[open + 1..close].trim().to_string();
            ((!name.is_empty()).then(|| name.to_string()), address)
        }
        _ => (None, value.to_string()),
    }
}

struct Field {
    /// Start of the field line.
    start: usize,
    /// Just after the colon.
    value_start: usize,
    /// After the CRLF of the last continuation line.
    end: usize,
}

/// Finds a header field by lower-case name among `headers` (complete lines).
fn find_field(headers: &[u8], name: &[u8]) -> Option<Field> {
    let mut pos = 0;
    while pos < headers.len() {
        let line_end = headers[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(headers.len(), |p| pos + p + 2);
        let line = &headers[pos..line_end];
        let is_match = line.len() > name.len()
            && line[..name.len()].eq_ignore_ascii_case(name)
            && line[name.len()] == b':';
        if is_match {
            let mut end = line_end;
            // Folded continuation lines start with whitespace (RFC 5322 §2.2.3).
            while end < headers.len() && matches!(headers[end], b' ' | b'\t') {
                end = headers[end..]
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .map_or(headers.len(), |p| end + p + 2);
            }
            return Some(Field {
                start: pos,
                value_start: pos + name.len() + 1,
                end,
            });
        }
        pos = line_end;
    }
    None
}

fn unfold(value: &[u8]) -> String {
    String::from_utf8_lossy(value)
        .replace("\r\n", "")
        .trim()
        .to_string()
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
}
