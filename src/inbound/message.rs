//! What the relay does to a message's bytes on the way into the spool, and nothing more: a
//! `Received:` header is prepended, and `Date:` / `Message-ID:` are added when the client left
//! them out (RFC 6409 §8.2, §8.3). The bytes arrive here already decoded by `framing.rs`
//! (dot-unstuffed, bare CR and bare LF turned into CRLF); everything else is stored as sent.
//! The added fields go below any trace fields the message already carries, so the trace block
//! stays one block (RFC 5321 §4.4); which fields exist is [`crate::headers`]' answer.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::headers::{self, HeaderName, Headers};
use crate::store::{Incoming, StoreError};

/// How much of the header section is kept in memory to look for `Date:` and `Message-ID:`.
/// A header section larger than this is streamed on; the headers seen so far decide.
const HEADER_SCAN_LIMIT: usize = 256 * 1024;

/// Streams a message body into the spool, applying the rules above.
pub struct MessageWriter {
    incoming: Box<dyn Incoming>,
    trace: TraceInfo,
    /// `Some` while the header section is still being collected.
    header_scan: Option<Vec<u8>>,
    /// Message bytes received (after unstuffing and line-end normalisation).
    received: u64,
}

/// Facts for the `Received:` header and the added headers.
#[derive(Debug, Clone)]
pub struct TraceInfo {
    pub helo: String,
    pub client_ip: String,
    pub hostname: String,
    /// `ESMTP`, `ESMTPS`, `ESMTPA`, `ESMTPSA` or `SMTP` (RFC 3848).
    pub protocol: &'static str,
    /// Named in the header only for single-recipient messages (RFC 5321 §4.4 privacy note).
    pub single_recipient: Option<String>,
    pub received_at: SystemTime,
}

impl MessageWriter {
    pub fn new(incoming: Box<dyn Incoming>, trace: TraceInfo) -> MessageWriter {
        MessageWriter {
            incoming,
            trace,
            header_scan: Some(Vec::new()),
            received: 0,
        }
    }

    pub fn id(&self) -> &str {
        self.incoming.id()
    }

    /// Bytes received from the client so far, the figure `max_message_size` applies to.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Appends decoded message bytes (CRLF line ends only).
    pub async fn push(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.received += chunk.len() as u64;
        crate::failpoint::hit("mid-data");
        self.write_decoded(chunk).await
    }

    async fn write_decoded(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        match &mut self.header_scan {
            Some(scan) => {
                let seen = scan.len();
                scan.extend_from_slice(bytes);
                if headers::empty_line_since(scan, seen) || scan.len() >= HEADER_SCAN_LIMIT {
                    self.flush_header_section().await?;
                }
                Ok(())
            }
            None => self.incoming.write(bytes).await,
        }
    }

    async fn flush_header_section(&mut self) -> Result<(), StoreError> {
        if let Some(scan) = self.header_scan.take() {
            let id = self.incoming.id().to_string();
            let parsed = Headers::parse(&scan);
            let at = added_fields_offset(&parsed, &scan);
            let received = received_header(&self.trace, &id);
            let added = missing_fields(&self.trace, &id, &parsed);
            self.incoming.write(received.as_bytes()).await?;
            self.incoming.write(&scan[..at]).await?;
            self.incoming.write(added.as_bytes()).await?;
            self.incoming.write(&scan[at..]).await?;
        }
        Ok(())
    }

    /// Writes what is still buffered and commits the message to the store.
    pub async fn commit(mut self) -> Result<String, StoreError> {
        self.flush_header_section().await?;
        self.incoming.commit().await
    }

    pub async fn abort(self) {
        self.incoming.abort().await
    }
}

/// Where `Date:` and `Message-ID:` go: below the message's own trace block. A section cut off
/// by the scan limit inside that block, or a block without a final line end, puts them
/// directly under the relay's `Received:` instead, never into the middle of a field.
fn added_fields_offset(headers: &Headers<'_>, scan: &[u8]) -> usize {
    let at = headers.trace_end();
    let settled = headers.complete() || at < scan.len();
    if at > 0 && settled && scan[at - 1] == b'\n' {
        at
    } else {
        0
    }
}

/// The `Received:` header the relay prepends (RFC 5321 §4.4).
pub fn received_header(trace: &TraceInfo, id: &str) -> String {
    let date = rfc5322_date(trace.received_at);
    let helo = sanitize(&trace.helo);
    let mut out = format!(
        "Received: from {helo} ([{ip}])\r\n\tby {host} (smtp-oauth-relay) with {proto} id {id}",
        ip = trace.client_ip,
        host = sanitize(&trace.hostname),
        proto = trace.protocol,
    );
    if let Some(rcpt) = &trace.single_recipient {
        out.push_str(&format!("\r\n\tfor <{}>", sanitize(rcpt)));
    }
    out.push_str(&format!(";\r\n\t{date}\r\n"));
    out
}

/// `Date:` and `Message-ID:`, each only if the message lacks it.
pub fn missing_fields(trace: &TraceInfo, id: &str, headers: &Headers<'_>) -> String {
    let mut out = String::new();
    if !headers.has(&HeaderName::Date) {
        out.push_str(&format!("Date: {}\r\n", rfc5322_date(trace.received_at)));
    }
    if !headers.has(&HeaderName::MessageId) {
        out.push_str(&format!(
            "Message-ID: <{id}@{}>\r\n",
            sanitize(&trace.hostname)
        ));
    }
    out
}

/// Client-supplied text goes into a header: keep it printable and on one line.
fn sanitize(text: &str) -> String {
    let cleaned: String = text
        .chars()
        .map(|c| {
            if c.is_control() || c == '(' || c == ')' {
                '_'
            } else {
                c
            }
        })
        .take(255)
        .collect();
    if cleaned.is_empty() {
        "unknown".to_string()
    } else {
        cleaned
    }
}

/// RFC 5322 §3.3 date-time in UTC, e.g. `Sun, 29 Nov 2026 18:31:42 +0000`.
pub fn rfc5322_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        WEEKDAYS[days.rem_euclid(7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates_render_like_rfc5322() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_977_102);
        assert_eq!(rfc5322_date(t), "Sun, 29 Nov 2026 18:31:42 +0000");
        assert_eq!(rfc5322_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc5322_date(leap), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    #[test]
    fn trace_headers_add_only_what_is_missing() {
        let trace = TraceInfo {
            helo: "app.local".into(),
            client_ip: "127.0.0.1".into(),
            hostname: "relay.example".into(),
            protocol: "ESMTP",
            single_recipient: Some("b@example.org".into()),
            received_at: UNIX_EPOCH,
        };
        let received = received_header(&trace, "ID1");
        assert!(
            received.starts_with("Received: from app.local ([127.0.0.1])\r\n\tby relay.example")
        );
        assert!(received.contains("for <b@example.org>;"));
        let full = Headers::parse(b"Date: x\r\nMessage-ID: <y@z>\r\n\r\n");
        assert_eq!(missing_fields(&trace, "ID1", &full), "");
        let bare = Headers::parse(b"Subject: s\r\n\r\n");
        assert_eq!(
            missing_fields(&trace, "ID1", &bare),
            "Date: Thu, 01 Jan 1970 00:00:00 +0000\r\nMessage-ID: <ID1@relay.example>\r\n"
        );
    }

    #[test]
    fn added_fields_go_below_the_trace_block_but_never_inside_a_field() {
        let msg = b"Received: from a\r\n\tby b; now\r\nSubject: s\r\n\r\n";
        let at = added_fields_offset(&Headers::parse(msg), msg);
        assert!(msg[at..].starts_with(b"Subject: s"));
        // Cut off inside the trace block (scan limit): directly below the relay's Received.
        let cut = b"Received: from a\r\n\tby b";
        assert_eq!(added_fields_offset(&Headers::parse(cut), cut), 0);
        let plain = b"Subject: s\r\n\r\n";
        assert_eq!(added_fields_offset(&Headers::parse(plain), plain), 0);
    }
}
