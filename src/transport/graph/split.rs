//! Splitting a message too large for `sendMail` into a draft and its large attachments
//! (graph-transport.md §2), without holding the message in memory.
//!
//! One streaming pass over the body of the top-level `multipart/*` finds its parts (offsets,
//! part headers, decoded size); [`plan`] pulls out the largest attachment parts until what is
//! left fits a draft; [`Plan::draft`] copies the rest (bounded by the draft limit);
//! [`decoded`] streams one pulled part's content, base64 decoded. Only the top level is split:
//! a nested multipart (the text and HTML bodies) stays in the draft whole.

use base64::Engine;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

use crate::headers::{HeaderName, Headers};
use crate::spool::{MessageBody, SpoolError};

/// Longest part header section kept for parsing; a longer one is cut (its first fields decide).
const MAX_PART_HEADER: usize = 64 * 1024;
/// Bytes of a line kept to recognise a delimiter (RFC 5322 lines are at most 998).
const LINE_CAP: usize = 1024;
/// What stands in for the parts when every part was pulled out (a multipart needs one).
const PLACEHOLDER: &[u8] = b"Content-Type: text/plain; charset=us-ascii\r\n\r\n\r\n";

/// How a part's content is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Base64,
    /// 7bit, 8bit, binary (or none): the bytes are the content.
    Identity,
    /// quoted-printable or unknown: not pulled out (the draft keeps it).
    Other,
}

/// One part of the top-level multipart, by offsets into the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The delimiter line that opens the part; the part with its delimiter is `start..end`.
    pub start: u64,
    /// Just past the delimiter line.
    pub delimiter_end: u64,
    pub body_start: u64,
    /// Where the content ends (the line break before the next delimiter belongs to it).
    pub body_end: u64,
    /// The next delimiter line (or the end of the message).
    pub end: u64,
    /// `type/subtype`, lower case (`text/plain` when absent).
    pub content_type: String,
    pub encoding: Encoding,
    /// `filename` of Content-Disposition, else `name` of Content-Type.
    pub name: Option<String>,
    /// `attachment` or `inline` (lower case), when given.
    pub disposition: Option<String>,
    /// Content-ID without its angle brackets.
    pub content_id: Option<String>,
    /// Bytes once decoded (what Graph's upload session is told).
    pub decoded_size: u64,
}

impl Part {
    /// Whether Graph may carry it as a file attachment: not a nested multipart or message, not
    /// the text body (a text part without a file name or an attachment disposition), and in an
    /// encoding the relay decodes.
    pub fn is_attachment(&self) -> bool {
        let structural = self.content_type.starts_with("multipart/")
            || self.content_type.starts_with("message/");
        let named = self.name.is_some()
            || self.content_id.is_some()
            || self.disposition.as_deref() == Some("attachment");
        let body_text = self.content_type.starts_with("text/") && !named;
        !structural && !body_text && self.encoding != Encoding::Other && self.decoded_size > 0
    }

    /// Attachment name for Graph: the part's own, else `attachment-N`.
    pub fn file_name(&self, index: usize) -> String {
        self.name
            .clone()
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| format!("attachment-{}", index + 1))
    }

    pub fn inline(&self) -> bool {
        self.disposition.as_deref() == Some("inline") && self.content_id.is_some()
    }
}

/// Why a message cannot go through the draft path.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    /// The message itself is the reason (the text is the 5.3.4 reply's).
    #[error("{0}")]
    Unsplittable(String),
    #[error(transparent)]
    Read(#[from] SpoolError),
}

/// The draft and the parts that go as upload sessions.
#[derive(Debug)]
pub struct Plan {
    /// Pulled-out parts, in message order.
    pub parts: Vec<Part>,
    /// Length of the draft [`Plan::draft`] builds.
    pub draft_len: u64,
    placeholder_at: Option<u64>,
}

/// Scans `body` and chooses the parts to pull out so that the draft is at most `limit` bytes.
pub async fn plan(body: &MessageBody, limit: u64) -> Result<Plan, SplitError> {
    let head = Headers::parse(body.head());
    let content_type = head.mime(&HeaderName::ContentType);
    let boundary = content_type
        .as_ref()
        .filter(|ct| ct.value.starts_with("multipart/"))
        .and_then(|ct| ct.param("boundary"))
        .filter(|b| !b.is_empty() && b.len() <= 70)
        .map(str::to_string);
    let Some(boundary) = boundary else {
        return Err(SplitError::Unsplittable(format!(
            "message of {} bytes is larger than Graph sendMail takes and is not multipart, so \
             it cannot be sent as a draft with attachments; send it with upstream.transport = \
             \"smtp\"",
            body.len()
        )));
    };
    let start = body_offset(body.head());
    let mut scanner = Scanner::new(&boundary, start);
    let mut reader = body.range_reader(start, body.len());
    while let Some(chunk) = reader.next_chunk().await? {
        scanner.feed(&chunk);
    }
    let parts = scanner.finish();
    choose(body.len(), parts, limit)
}

/// The largest attachment parts first, until the rest fits.
fn choose(total: u64, parts: Vec<Part>, limit: u64) -> Result<Plan, SplitError> {
    let mut candidates: Vec<&Part> = parts.iter().filter(|p| p.is_attachment()).collect();
    candidates.sort_by_key(|p| std::cmp::Reverse(p.end - p.start));
    let mut left = total;
    let mut pulled: Vec<Part> = Vec::new();
    for part in candidates {
        if left <= limit {
            break;
        }
        left -= part.end - part.start;
        pulled.push(part.clone());
    }
    let placeholder_at = (pulled.len() == parts.len())
        .then(|| pulled.iter().map(|p| p.start).min())
        .flatten();
    if let Some(first) = pulled.iter().min_by_key(|p| p.start)
        && placeholder_at.is_some()
    {
        // The first delimiter line stays, with an empty text part.
        left += first.delimiter_end - first.start + PLACEHOLDER.len() as u64;
    }
    if left > limit {
        return Err(SplitError::Unsplittable(format!(
            "message of {total} bytes is larger than Graph sendMail takes, and without its \
             attachments it is still {left} bytes, more than a Graph draft takes ({limit}): its \
             text or inline parts are too large; send it with upstream.transport = \"smtp\""
        )));
    }
    pulled.sort_by_key(|p| p.start);
    Ok(Plan {
        parts: pulled,
        draft_len: left,
        placeholder_at,
    })
}

impl Plan {
    /// The message without the pulled parts (at most the draft limit, so bounded).
    pub async fn draft(&self, body: &MessageBody) -> Result<Vec<u8>, SpoolError> {
        let mut out = Vec::with_capacity(self.draft_len as usize + 128);
        let mut at = 0u64;
        for part in &self.parts {
            copy(body, at, part.start, &mut out).await?;
            if self.placeholder_at == Some(part.start) {
                // Keep the delimiter line of the first part, then the empty text part.
                copy(body, part.start, part.delimiter_end, &mut out).await?;
                out.extend_from_slice(PLACEHOLDER);
            }
            at = part.end;
        }
        copy(body, at, body.len(), &mut out).await?;
        Ok(out)
    }
}

async fn copy(body: &MessageBody, from: u64, to: u64, out: &mut Vec<u8>) -> Result<(), SpoolError> {
    let mut reader = body.range_reader(from, to);
    while let Some(chunk) = reader.next_chunk().await? {
        out.extend_from_slice(&chunk);
    }
    Ok(())
}

/// Where the body starts: just past the empty line after the header section.
fn body_offset(head: &[u8]) -> u64 {
    if head.starts_with(b"\r\n") {
        return 2;
    }
    if head.starts_with(b"\n") {
        return 1;
    }
    let crlf = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4);
    let lf = head.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    let end = match (crlf, lf) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).unwrap_or(head.len()),
    };
    end as u64
}

/// The streaming decoder of one part's content: base64 (alphabet characters only, the same
/// filter [`Scanner`] counts with, so the decoded length is the announced size) or as is.
pub struct Decoder {
    encoding: Encoding,
    /// Base64 characters not yet decoded (fewer than 4 between calls).
    carry: Vec<u8>,
}

/// Decodes base64 without padding and accepts trailing bits (a short last group).
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(true),
);

fn is_b64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'+' || b == b'/'
}

impl Decoder {
    pub fn new(encoding: Encoding) -> Decoder {
        Decoder {
            encoding,
            carry: Vec::new(),
        }
    }

    /// Appends the content of `input` (the next bytes of the part's body) to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        if self.encoding != Encoding::Base64 {
            out.extend_from_slice(input);
            return;
        }
        self.carry
            .extend(input.iter().copied().filter(|b| is_b64(*b)));
        let whole = self.carry.len() / 4 * 4;
        if whole > 0 {
            decode_into(&self.carry[..whole], out);
            self.carry.drain(..whole);
        }
    }

    /// The last bytes (a short base64 group).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.carry.is_empty() {
            decode_into(&self.carry, out);
            self.carry.clear();
        }
    }
}

fn decode_into(chars: &[u8], out: &mut Vec<u8>) {
    // Only alphabet characters reach here; a lone last character (not a whole byte) is dropped
    // as the size count drops it.
    let usable = if chars.len() % 4 == 1 {
        &chars[..chars.len() - 1]
    } else {
        chars
    };
    if let Err(e) = LENIENT.decode_vec(usable, out) {
        // Cannot happen for filtered input; the size check of the upload would catch it.
        tracing::debug!(error = %e, "base64 decoding of an attachment");
    }
}

/// Finds the top-level parts, fed the message body piece by piece.
struct Scanner {
    /// `--boundary`.
    delimiter: Vec<u8>,
    pos: u64,
    line: Vec<u8>,
    line_start: u64,
    line_len: u64,
    line_b64: u64,
    /// Line break length of the last line seen (1 or 2), for where a part's content ends.
    last_break: u64,
    state: State,
    parts: Vec<Part>,
    current: Option<Open>,
}

#[derive(PartialEq, Eq)]
enum State {
    Preamble,
    PartHeader,
    PartBody,
    Epilogue,
}

struct Open {
    start: u64,
    delimiter_end: u64,
    header: Vec<u8>,
    body_start: u64,
    b64: u64,
    info: Option<PartInfo>,
}

struct PartInfo {
    content_type: String,
    encoding: Encoding,
    name: Option<String>,
    disposition: Option<String>,
    content_id: Option<String>,
}

impl Scanner {
    fn new(boundary: &str, start: u64) -> Scanner {
        let mut delimiter = b"--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        Scanner {
            delimiter,
            pos: start,
            line: Vec::new(),
            line_start: start,
            line_len: 0,
            line_b64: 0,
            last_break: 2,
            state: State::Preamble,
            parts: Vec::new(),
            current: None,
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let (segment, complete) = match data.iter().position(|b| *b == b'\n') {
                Some(p) => (&data[..=p], true),
                None => (data, false),
            };
            let room = LINE_CAP.saturating_sub(self.line.len());
            self.line
                .extend_from_slice(&segment[..segment.len().min(room)]);
            self.line_len += segment.len() as u64;
            if self.state == State::PartBody {
                self.line_b64 += segment.iter().filter(|b| is_b64(**b)).count() as u64;
            }
            self.pos += segment.len() as u64;
            data = &data[segment.len()..];
            if complete {
                self.end_line();
            }
        }
    }

    fn end_line(&mut self) {
        let full = self.line_len <= LINE_CAP as u64;
        let text = trim_break(&self.line);
        let brk = (self.line.len() - text.len()) as u64;
        let delimiter = if full && self.state != State::Epilogue {
            self.is_delimiter(text)
        } else {
            None
        };
        match delimiter {
            Some(close) => {
                self.close_part(self.line_start);
                if close {
                    self.state = State::Epilogue;
                } else {
                    self.current = Some(Open {
                        start: self.line_start,
                        delimiter_end: self.pos,
                        header: Vec::new(),
                        body_start: self.pos,
                        b64: 0,
                        info: None,
                    });
                    self.state = State::PartHeader;
                }
            }
            None => match self.state {
                State::PartHeader => {
                    if let Some(open) = self.current.as_mut() {
                        if text.is_empty() {
                            open.body_start = self.pos;
                            open.info = Some(part_info(&open.header));
                            open.header = Vec::new();
                            self.state = State::PartBody;
                        } else if open.header.len() + self.line.len() <= MAX_PART_HEADER {
                            open.header.extend_from_slice(&self.line);
                        }
                    }
                }
                State::PartBody => {
                    if let Some(open) = self.current.as_mut() {
                        open.b64 += self.line_b64;
                    }
                }
                State::Preamble | State::Epilogue => {}
            },
        }
        if brk > 0 {
            self.last_break = brk;
        }
        self.line.clear();
        self.line_len = 0;
        self.line_b64 = 0;
        self.line_start = self.pos;
    }

    /// `Some(false)` for a delimiter line, `Some(true)` for the close delimiter.
    fn is_delimiter(&self, text: &[u8]) -> Option<bool> {
        let rest = text.strip_prefix(self.delimiter.as_slice())?;
        let (close, rest) = match rest.strip_prefix(b"--") {
            Some(r) => (true, r),
            None => (false, rest),
        };
        rest.iter()
            .all(|b| *b == b' ' || *b == b'\t')
            .then_some(close)
    }

    /// Ends the open part at the delimiter line starting at `at` (or at the end).
    fn close_part(&mut self, at: u64) {
        let Some(open) = self.current.take() else {
            return;
        };
        let info = open.info.unwrap_or_else(|| part_info(&open.header));
        // The line break before a delimiter belongs to the delimiter (RFC 2046 §5.1.1).
        let body_start = open.body_start.min(at);
        let body_end = if self.state == State::PartBody {
            at.saturating_sub(self.last_break).max(body_start)
        } else {
            body_start
        };
        let decoded_size = match info.encoding {
            Encoding::Base64 => {
                // A lone character left over is no byte.
                open.b64 / 4 * 3 + (open.b64 % 4).saturating_sub(1)
            }
            _ => body_end - body_start,
        };
        self.parts.push(Part {
            start: open.start,
            delimiter_end: open.delimiter_end,
            body_start,
            body_end,
            end: at,
            content_type: info.content_type,
            encoding: info.encoding,
            name: info.name,
            disposition: info.disposition,
            content_id: info.content_id,
            decoded_size,
        });
    }

    fn finish(mut self) -> Vec<Part> {
        if !self.line.is_empty() {
            // A last line without a line break: a close delimiter, or content.
            let text = trim_break(&self.line).to_vec();
            if self.line_len <= LINE_CAP as u64
                && self.state != State::Epilogue
                && let Some(close) = self.is_delimiter(&text)
            {
                self.close_part(self.line_start);
                if !close {
                    // An empty last part: nothing to send, nothing lost.
                    self.state = State::Epilogue;
                }
                return self.parts;
            }
            if let Some(open) = self.current.as_mut()
                && self.state == State::PartBody
            {
                open.b64 += self.line_b64;
            }
            self.last_break = 0;
        } else {
            self.last_break = 0;
        }
        // No close delimiter: the last part runs to the end.
        let end = self.pos;
        self.close_part(end);
        self.parts
    }
}

fn trim_break(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn part_info(header: &[u8]) -> PartInfo {
    let mut section = header.to_vec();
    section.extend_from_slice(b"\r\n");
    let headers = Headers::parse(&section);
    let content_type = headers.mime(&HeaderName::ContentType);
    let disposition = headers.mime(&HeaderName::ContentDisposition);
    let encoding = match headers
        .text(&HeaderName::ContentTransferEncoding)
        .map(|t| t.trim().to_ascii_lowercase())
        .as_deref()
    {
        Some("base64") => Encoding::Base64,
        None | Some("" | "7bit" | "8bit" | "binary") => Encoding::Identity,
        Some(_) => Encoding::Other,
    };
    let name = disposition
        .as_ref()
        .and_then(|d| d.param("filename"))
        .or_else(|| content_type.as_ref().and_then(|c| c.param("name")))
        .map(str::to_string);
    let content_id = headers
        .text(&HeaderName::ContentId)
        .map(|id| {
            id.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
        .filter(|id| !id.is_empty());
    PartInfo {
        content_type: content_type.map_or_else(|| "text/plain".to_string(), |c| c.value),
        encoding,
        name,
        disposition: disposition.map(|d| d.value),
        content_id,
    }
}

/// Streams the content of `part` (decoded) into pieces of `piece` bytes for `each`.
pub async fn decoded<F, Fut, E>(
    body: &MessageBody,
    part: &Part,
    piece: usize,
    mut each: F,
) -> Result<(), DecodeError<E>>
where
    F: FnMut(u64, Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    let mut decoder = Decoder::new(part.encoding);
    let mut reader = body.range_reader(part.body_start, part.body_end);
    let mut out: Vec<u8> = Vec::with_capacity(piece + crate::spool::body::CHUNK);
    let mut sent = 0u64;
    let mut done = false;
    while !done {
        match reader.next_chunk().await.map_err(DecodeError::Read)? {
            Some(chunk) => decoder.feed(&chunk, &mut out),
            None => {
                decoder.finish(&mut out);
                done = true;
            }
        }
        while out.len() >= piece || (done && !out.is_empty()) {
            let n = out.len().min(piece);
            // A piece of exactly its size; `out` keeps its buffer for the next one.
            let mut this = Vec::with_capacity(n);
            this.extend_from_slice(&out[..n]);
            out.drain(..n);
            let len = this.len() as u64;
            each(sent, this).await.map_err(DecodeError::Sink)?;
            sent += len;
        }
    }
    if sent != part.decoded_size {
        return Err(DecodeError::Size {
            announced: part.decoded_size,
            decoded: sent,
        });
    }
    Ok(())
}

#[derive(Debug)]
pub enum DecodeError<E> {
    Read(SpoolError),
    Sink(E),
    /// The content decoded to another length than the scan counted (a relay bug).
    Size {
        announced: u64,
        decoded: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64_lines(bytes: &[u8]) -> String {
        let text = base64::engine::general_purpose::STANDARD.encode(bytes);
        text.as_bytes()
            .chunks(76)
            .map(|l| format!("{}\r\n", std::str::from_utf8(l).unwrap()))
            .collect()
    }

    fn message(att1: &[u8], att2: &[u8]) -> Vec<u8> {
        format!(
            "From: a@contoso.example\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\n\
             Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\npreamble\r\n--b1\r\n\
             Content-Type: multipart/alternative; boundary=\"b2\"\r\n\r\n--b2\r\n\
             Content-Type: text/plain\r\n\r\nhello\r\n--b2--\r\n\r\n--b1\r\n\
             Content-Type: application/pdf; name=\"scan.pdf\"\r\n\
             Content-Disposition: attachment; filename=\"scan.pdf\"\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n{}--b1\r\n\
             Content-Type: image/png\r\nContent-ID: <img1@x>\r\n\
             Content-Disposition: inline\r\nContent-Transfer-Encoding: base64\r\n\r\n{}--b1--\r\n",
            b64_lines(att1),
            b64_lines(att2)
        )
        .into_bytes()
    }

    fn pseudo(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8
            })
            .collect()
    }

    async fn collect(body: &MessageBody, part: &Part, piece: usize) -> (Vec<u8>, Vec<usize>) {
        let mut all = Vec::new();
        let mut sizes = Vec::new();
        let sink = std::sync::Mutex::new((&mut all, &mut sizes));
        decoded::<_, _, ()>(body, part, piece, |at, bytes| {
            let mut g = sink.lock().unwrap();
            assert_eq!(at as usize, g.0.len());
            g.1.push(bytes.len());
            g.0.extend_from_slice(&bytes);
            async { Ok(()) }
        })
        .await
        .unwrap();
        (all, sizes)
    }

    #[tokio::test]
    async fn attachments_are_found_pulled_and_decoded_exactly() {
        let (a1, a2) = (pseudo(10_001, 1), pseudo(5_002, 2));
        let msg = message(&a1, &a2);
        let body = MessageBody::from_bytes(msg.clone());
        let plan = plan(&body, 3_000).await.unwrap();
        assert_eq!(plan.parts.len(), 2);
        let (p1, p2) = (&plan.parts[0], &plan.parts[1]);
        assert_eq!(p1.name.as_deref(), Some("scan.pdf"));
        assert_eq!(p1.content_type, "application/pdf");
        assert_eq!(p1.decoded_size, a1.len() as u64);
        assert_eq!(p2.content_id.as_deref(), Some("img1@x"));
        assert!(p2.inline());
        assert_eq!(p2.decoded_size, a2.len() as u64);
        assert_eq!(collect(&body, p1, 4096).await.0, a1);
        let (bytes, sizes) = collect(&body, p2, 1000).await;
        assert_eq!(bytes, a2);
        assert_eq!(sizes, [1000, 1000, 1000, 1000, 1000, 2]);
        let draft = String::from_utf8(plan.draft(&body).await.unwrap()).unwrap();
        assert_eq!(draft.len() as u64, plan.draft_len);
        assert!(
            draft.ends_with("hello\r\n--b2--\r\n\r\n--b1--\r\n"),
            "{draft}"
        );
        assert!(draft.starts_with("From: a@contoso.example\r\n"));
    }

    #[tokio::test]
    async fn only_what_is_needed_is_pulled_and_the_body_text_never() {
        let (a1, a2) = (pseudo(10_000, 3), pseudo(500, 4));
        let body = MessageBody::from_bytes(message(&a1, &a2));
        let chosen = plan(&body, 3_000).await.unwrap();
        assert_eq!(chosen.parts.len(), 1, "the small image stays in the draft");
        assert!(
            chosen
                .draft(&body)
                .await
                .unwrap()
                .windows(9)
                .any(|w| w == b"image/png")
        );

        // One huge text body: nothing to pull, a clear reason.
        let text = format!(
            "Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\n{}\r\n--x--\r\n",
            "y".repeat(10_000)
        );
        let e = plan(&MessageBody::from_bytes(text.into_bytes()), 3_000)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("still"), "{e}");
        let simple = MessageBody::from_bytes(format!("Subject: s\r\n\r\n{}", "z".repeat(9000)));
        let e = plan(&simple, 3_000).await.unwrap_err();
        assert!(e.to_string().contains("not multipart"), "{e}");
    }

    #[tokio::test]
    async fn a_message_of_one_attachment_keeps_a_placeholder_part() {
        let a = pseudo(9_001, 5);
        let msg = format!(
            "Content-Type: multipart/mixed; boundary=\"q\"\r\n\r\n--q\r\nContent-Type: application/octet-stream\r\n\
             Content-Disposition: attachment; filename=\"x.bin\"\r\n\r\n{}\r\n--q--\r\n",
            b64_lines(&a).trim_end()
        );
        // Identity encoding here: the base64 text is the content.
        let body = MessageBody::from_bytes(msg.into_bytes());
        let plan = plan(&body, 3_000).await.unwrap();
        assert_eq!(plan.parts.len(), 1);
        assert_eq!(plan.parts[0].encoding, Encoding::Identity);
        let draft = String::from_utf8(plan.draft(&body).await.unwrap()).unwrap();
        assert_eq!(
            draft,
            "Content-Type: multipart/mixed; boundary=\"q\"\r\n\r\n--q\r\n\
             Content-Type: text/plain; charset=us-ascii\r\n\r\n\r\n--q--\r\n"
        );
        assert_eq!(draft.len() as u64, plan.draft_len);
        let got = collect(&body, &plan.parts[0], 4096).await.0;
        assert_eq!(got.len() as u64, plan.parts[0].decoded_size);
        assert!(
            got.ends_with(b"="),
            "content ends before the delimiter's line break"
        );
    }
}
