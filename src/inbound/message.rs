//! What the relay does to a message's bytes on the way into the spool, and nothing more: a
//! `Received:` header is prepended, and `Date:` / `Message-ID:` are added when the client left
//! them out (RFC 6409 §8.2, §8.3). The bytes arrive here already decoded by `framing.rs`
//! (dot-unstuffed, bare CR and bare LF turned into CRLF); everything else is stored as sent.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::spool::{IncomingMessage, SpoolError};

/// How much of the header section is kept in memory to look for `Date:` and `Message-ID:`.
/// A header section larger than this is streamed on; the headers seen so far decide.
const HEADER_SCAN_LIMIT: usize = 256 * 1024;

/// Streams a message body into the spool, applying the rules above.
pub struct MessageWriter {
    incoming: IncomingMessage,
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
    pub fn new(incoming: IncomingMessage, trace: TraceInfo) -> MessageWriter {
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
    pub async fn push(&mut self, chunk: &[u8]) -> Result<(), SpoolError> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.received += chunk.len() as u64;
        crate::failpoint::hit("mid-data");
        self.write_decoded(chunk).await
    }

    async fn write_decoded(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        match &mut self.header_scan {
            Some(scan) => {
                scan.extend_from_slice(bytes);
                if header_section_end(scan).is_some() || scan.len() >= HEADER_SCAN_LIMIT {
                    self.flush_header_section().await?;
                }
                Ok(())
            }
            None => self.incoming.write_all(bytes).await,
        }
    }

    async fn flush_header_section(&mut self) -> Result<(), SpoolError> {
        if let Some(scan) = self.header_scan.take() {
            let headers_end = header_section_end(&scan).unwrap_or(scan.len());
            let prefix = trace_headers(&self.trace, self.incoming.id(), &scan[..headers_end]);
            self.incoming.write_all(prefix.as_bytes()).await?;
            self.incoming.write_all(&scan).await?;
        }
        Ok(())
    }

    /// Writes what is still buffered and commits the message to the spool.
    pub async fn commit(mut self) -> Result<String, SpoolError> {
        self.flush_header_section().await?;
        self.incoming.commit().await
    }

    pub async fn abort(self) {
        self.incoming.abort().await
    }
}

/// Offset just past the blank line that ends the header section, if it has been seen. A message
/// that starts with a blank line has an empty header section.
fn header_section_end(bytes: &[u8]) -> Option<usize> {
    if bytes.starts_with(b"\r\n") {
        return Some(0);
    }
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
}

/// True if a header field with this name (case-insensitive) starts a line of `headers`.
fn has_header(headers: &[u8], name: &str) -> bool {
    headers
        .split(|b| *b == b'\n')
        .filter(|line| !line.starts_with(b" ") && !line.starts_with(b"\t"))
        .any(|line| {
            line.len() > name.len()
                && line[..name.len()].eq_ignore_ascii_case(name.as_bytes())
                && line[name.len()] == b':'
        })
}

/// The `Received:` header, then `Date:` and `Message-ID:` if `headers` lacks them.
pub fn trace_headers(trace: &TraceInfo, id: &str, headers: &[u8]) -> String {
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
    if !has_header(headers, "Date") {
        out.push_str(&format!("Date: {date}\r\n"));
    }
    if !has_header(headers, "Message-ID") {
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
    fn header_detection_is_case_insensitive_and_ignores_folded_lines() {
        let h = b"Subject: x\r\n date: folded\r\nmessage-id: <a@b>\r\n";
        assert!(!has_header(h, "Date"));
        assert!(has_header(h, "Message-ID"));
        assert!(!has_header(b"Dated: x\r\n", "Date"));
    }

    #[test]
    fn header_section_end_is_found() {
        assert_eq!(header_section_end(b"\r\nbody"), Some(0));
        assert_eq!(header_section_end(b"A: b\r\n\r\nbody"), Some(6));
        assert_eq!(header_section_end(b"A: b\r\n"), None);
    }

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
        let full = trace_headers(&trace, "ID1", b"Date: x\r\nMessage-ID: <y@z>\r\n");
        assert!(full.starts_with("Received: from app.local ([127.0.0.1])\r\n\tby relay.example"));
        assert!(full.contains("for <b@example.org>;"));
        assert!(!full.contains("\r\nDate:"));
        let bare = trace_headers(&trace, "ID1", b"Subject: s\r\n");
        assert!(bare.contains("\r\nDate: Thu, 01 Jan 1970 00:00:00 +0000\r\n"));
        assert!(bare.ends_with("Message-ID: <ID1@relay.example>\r\n"));
    }
}
