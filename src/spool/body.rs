//! A stored message as delivery reads it, without ever holding all of it.
//!
//! [`MessageBody`] keeps the header section in memory (bounded by [`HEAD_LIMIT`]; the whole
//! message when it is no longer than that) and reads the rest from where the store keeps it, a
//! [`BodySource`], in pieces of [`CHUNK`] bytes: the committed message file for the spool
//! ([`MessageBody::open`], opened once per attempt, so an operator moving or deleting it
//! meanwhile does not change what this attempt reads), the database's rows for the PostgreSQL
//! store ([`MessageBody::from_source`]).
//!
//! The sender policy rewrites only the header section ([`MessageBody::with_head`]); the
//! extensions a message needs are known without a second copy ([`MessageBody::eight_bit`],
//! [`MessageBody::header_eight_bit`]: the part in the source is scanned once at load, piece by
//! piece); a transport reads the whole message as a stream of pieces ([`MessageBody::reader`]).

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use super::error::SpoolError;
use super::format::Header;
use super::fsutil;
use crate::headers::Headers;

/// The most of a message kept in memory: a message up to this size is held whole, a longer one
/// keeps its header section (and the empty line after it). A header section longer than this
/// is cut at the last field that ends within it: the fields seen so far decide (as inbound's
/// own header scan does, with a quarter of this).
pub const HEAD_LIMIT: usize = 1 << 20;
/// Size of the pieces the rest of a message is read in.
pub const CHUNK: usize = 256 * 1024;

/// A piece being read from a [`BodySource`].
pub type PieceFuture = Pin<Box<dyn Future<Output = Result<Vec<u8>, SpoolError>> + Send>>;

/// Where a store keeps the bytes of a committed message that delivery does not hold in memory.
/// Offsets count from the message's first byte. The bytes never change once committed: a
/// source that finds fewer than asked (cut short, deleted meanwhile) answers an error, never a
/// shorter piece.
pub trait BodySource: Send + Sync + 'static {
    /// Exactly `n` bytes (at most [`CHUNK`]) starting at `at`.
    fn read(self: Arc<Self>, at: u64, n: usize) -> PieceFuture;
    /// Where the bytes are, for logs and `Debug` (a path, a table row).
    fn describe(&self) -> String;
}

/// A message's bytes as stored (unstuffed, CRLF), for delivery. Cheap to clone: clones share
/// the head and the source.
#[derive(Clone)]
pub struct MessageBody {
    head: Bytes,
    tail: Option<Arc<Tail>>,
}

/// The part of the message left in the source.
struct Tail {
    source: Arc<dyn BodySource>,
    /// Where in the source the part starts.
    offset: u64,
    len: u64,
    /// Some byte of the part is 8-bit.
    eight_bit: bool,
    /// Some byte of the part before its first empty line is 8-bit (matters only when the head
    /// is a header section cut at [`HEAD_LIMIT`]: that part continues it).
    eight_bit_header: bool,
}

impl std::fmt::Debug for MessageBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageBody")
            .field("len", &self.len())
            .field("in_memory", &self.head.len())
            .field("source", &self.tail.as_ref().map(|t| t.source.describe()))
            .finish()
    }
}

impl MessageBody {
    /// A message that exists only in memory (a test message, a notice).
    pub fn from_bytes(bytes: impl Into<Bytes>) -> MessageBody {
        MessageBody {
            head: bytes.into(),
            tail: None,
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.head.len() as u64 + self.tail.as_ref().map_or(0, |t| t.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes held in memory: the header section with its empty line, or the whole message
    /// when it is short (see [`HEAD_LIMIT`]). The sender policy and the failure notice read
    /// only this.
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// Whether [`head`](Self::head) is the whole message.
    pub fn is_whole_in_memory(&self) -> bool {
        self.tail.is_none()
    }

    /// The same message with another head (the header section rewritten); the rest is still
    /// read from the source, never copied.
    pub fn with_head(&self, head: Vec<u8>) -> MessageBody {
        MessageBody {
            head: Bytes::from(head),
            tail: self.tail.clone(),
        }
    }

    /// Some byte of the message is 8-bit (8BITMIME is needed).
    pub fn eight_bit(&self) -> bool {
        !self.head.is_ascii() || self.tail.as_ref().is_some_and(|t| t.eight_bit)
    }

    /// Some byte of the header section is 8-bit (with SMTPUTF8 declared: UTF-8 header fields).
    pub fn header_eight_bit(&self) -> bool {
        let headers = Headers::parse(&self.head);
        if !headers.section().is_ascii() {
            return true;
        }
        // A section cut at HEAD_LIMIT continues in the source.
        !headers.complete() && self.tail.as_ref().is_some_and(|t| t.eight_bit_header)
    }

    /// Reads the whole message, head first, as a stream of pieces.
    pub fn reader(&self) -> BodyReader {
        self.range_reader(0, self.len())
    }

    /// Reads bytes `start..end` of the message (clamped to its length) as a stream of pieces,
    /// never more than [`CHUNK`] from the source at a time: what a transport needs to send one
    /// part of a large message without the rest.
    pub fn range_reader(&self, start: u64, end: u64) -> BodyReader {
        let end = end.min(self.len());
        let start = start.min(end);
        let held = self.head.len() as u64;
        BodyReader {
            body: self.clone(),
            head: Some(
                self.head
                    .slice(start.min(held) as usize..end.min(held) as usize),
            ),
            pos: start.saturating_sub(held),
            end: end.saturating_sub(held),
            pending: None,
        }
    }

    /// Opens a committed message file for delivery: validates it (as every reader of the spool
    /// does), keeps its head and scans the rest once for 8-bit bytes. Blocking.
    pub(crate) fn open(path: &Path) -> Result<(Header, MessageBody), SpoolError> {
        let m = fsutil::open_message(path)?;
        let total = m.header.body_length;
        let start = m.header.header_len;
        let mut head = m.body_prefix;
        head.truncate(total.min(head.len() as u64) as usize);
        let file = m.file;
        let want = head_wanted(total);
        if head.len() < want {
            let have = head.len();
            head.resize(want, 0);
            read_exact_at(&file, &mut head[have..], start + have as u64, path)?;
        }
        let (head, cut) = match split_head(head, total) {
            Split::Whole(whole) => return Ok((m.header, MessageBody::from_bytes(whole))),
            Split::Head { head, cut } => (head, cut),
        };
        let offset = start + head.len() as u64;
        let len = total - head.len() as u64;
        let mut scan = EightBitScan::new(cut);
        let mut buf = vec![0u8; CHUNK.min(len as usize)];
        let mut pos = 0u64;
        while pos < len {
            let n = (len - pos).min(buf.len() as u64) as usize;
            let piece = &mut buf[..n];
            read_exact_at(&file, piece, offset + pos, path)?;
            if scan.feed(piece) {
                break;
            }
            pos += n as u64;
        }
        let source = Arc::new(FileSource {
            file,
            path: path.to_path_buf(),
        });
        Ok((
            m.header,
            MessageBody::with_tail(head, source, offset, len, scan),
        ))
    }

    /// A committed message of `total` bytes kept in `source` (offset 0 is its first byte): its
    /// head is read and kept, the rest scanned once for 8-bit bytes and read again, piece by
    /// piece, when sent.
    pub async fn from_source(
        source: Arc<dyn BodySource>,
        total: u64,
    ) -> Result<MessageBody, SpoolError> {
        let want = head_wanted(total);
        let mut head = Vec::with_capacity(want);
        while head.len() < want {
            let n = (want - head.len()).min(CHUNK);
            head.extend_from_slice(&source.clone().read(head.len() as u64, n).await?);
        }
        let (head, cut) = match split_head(head, total) {
            Split::Whole(whole) => return Ok(MessageBody::from_bytes(whole)),
            Split::Head { head, cut } => (head, cut),
        };
        let offset = head.len() as u64;
        let len = total - offset;
        let mut scan = EightBitScan::new(cut);
        let mut pos = 0u64;
        while pos < len {
            let n = (len - pos).min(CHUNK as u64) as usize;
            let piece = source.clone().read(offset + pos, n).await?;
            if scan.feed(&piece) {
                break;
            }
            pos += n as u64;
        }
        Ok(MessageBody::with_tail(head, source, offset, len, scan))
    }

    fn with_tail(
        head: Vec<u8>,
        source: Arc<dyn BodySource>,
        offset: u64,
        len: u64,
        scan: EightBitScan,
    ) -> MessageBody {
        let tail = Tail {
            source,
            offset,
            len,
            eight_bit: scan.eight_bit,
            eight_bit_header: scan.eight_bit_header,
        };
        MessageBody {
            head: Bytes::from(head),
            tail: Some(Arc::new(tail)),
        }
    }
}

/// How many of a message's first bytes decide its head: one byte past the limit tells whether
/// the last line read is continued (folded).
fn head_wanted(total: u64) -> usize {
    total.min(HEAD_LIMIT as u64 + 1) as usize
}

/// A message's first [`head_wanted`] bytes, split.
enum Split {
    /// They are the whole message.
    Whole(Vec<u8>),
    /// The head to keep; `cut`: it is a header section cut at [`HEAD_LIMIT`].
    Head { head: Vec<u8>, cut: bool },
}

fn split_head(mut head: Vec<u8>, total: u64) -> Split {
    if total as usize == head.len() {
        return Split::Whole(head);
    }
    let keep = head_end(&head);
    head.truncate(keep);
    head.shrink_to_fit();
    let cut = !Headers::parse(&head).complete();
    Split::Head { head, cut }
}

/// How much of `start` (the first bytes of a message longer than them) stays in memory: the
/// header section and its empty line; if the section does not end within [`HEAD_LIMIT`], up to
/// the last field that does (a line end not followed by folding white space).
fn head_end(start: &[u8]) -> usize {
    let limit = start.len().min(HEAD_LIMIT);
    let headers = Headers::parse(&start[..limit]);
    if headers.complete() {
        let end = headers.section().len();
        let rest = &start[end..];
        let eol = if rest.starts_with(b"\r\n") {
            2
        } else {
            usize::from(rest.starts_with(b"\n"))
        };
        return end + eol;
    }
    (1..=limit)
        .rev()
        .find(|&i| start[i - 1] == b'\n' && !matches!(start.get(i), Some(b' ' | b'\t')))
        .unwrap_or(limit)
}

/// One pass over the part of a message past its head, piece by piece: any 8-bit byte, and any
/// 8-bit byte before the first empty line (only when the part continues a header section cut
/// at a line end; otherwise that answer is false).
struct EightBitScan {
    in_header: bool,
    /// How much of "\r\n\r\n" the bytes just seen match; the part starts after a line end.
    matched: u8,
    eight_bit: bool,
    eight_bit_header: bool,
}

impl EightBitScan {
    fn new(continues_header: bool) -> EightBitScan {
        EightBitScan {
            in_header: continues_header,
            matched: 2,
            eight_bit: false,
            eight_bit_header: false,
        }
    }

    /// Takes the next piece; true once both answers are known (the rest need not be read).
    fn feed(&mut self, piece: &[u8]) -> bool {
        if self.in_header {
            for &b in piece {
                self.eight_bit_header |= !b.is_ascii();
                self.matched = match (self.matched, b) {
                    (0 | 2, b'\r') => self.matched + 1,
                    (1 | 3, b'\n') => self.matched + 1,
                    (_, b'\r') => 1,
                    _ => 0,
                };
                if self.matched == 4 {
                    self.in_header = false;
                    break;
                }
            }
        }
        self.eight_bit |= !piece.is_ascii();
        self.eight_bit && !self.in_header
    }
}

fn read_exact_at(file: &File, buf: &mut [u8], at: u64, path: &Path) -> Result<(), SpoolError> {
    file.read_exact_at(buf, at)
        .map_err(|e| SpoolError::io("read", path, e))
}

/// A committed spool file, open for this attempt.
struct FileSource {
    file: File,
    path: PathBuf,
}

impl BodySource for FileSource {
    fn read(self: Arc<Self>, at: u64, n: usize) -> PieceFuture {
        Box::pin(async move {
            let path = self.path.clone();
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; n];
                self.file.read_exact_at(&mut buf, at).map(|()| buf)
            })
            .await;
            match read {
                Ok(Ok(buf)) => Ok(buf),
                Ok(Err(e)) => Err(SpoolError::io("read", &path, e)),
                Err(e) => Err(SpoolError::io("read", &path, io::Error::other(e))),
            }
        })
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Reads a [`MessageBody`] (or a range of it) piece by piece: the part held in memory, then
/// the source in [`CHUNK`]s, one piece read ahead (in a task of its own) while the caller sends
/// the last one.
pub struct BodyReader {
    body: MessageBody,
    /// The part of the head still to hand out (`None` once handed out).
    head: Option<Bytes>,
    /// Offset in the tail of the next piece to read.
    pos: u64,
    /// Offset in the tail where the range ends.
    end: u64,
    pending: Option<tokio::task::JoinHandle<Result<Vec<u8>, SpoolError>>>,
}

impl BodyReader {
    /// The next piece, `None` at the end. Pieces are never empty.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, SpoolError> {
        if let Some(head) = self.head.take() {
            self.start_read();
            if !head.is_empty() {
                return Ok(Some(head));
            }
        }
        let Some(pending) = self.pending.take() else {
            return Ok(None);
        };
        let piece = match pending.await {
            Ok(read) => read?,
            Err(e) => {
                let what = self
                    .body
                    .tail
                    .as_ref()
                    .map(|t| t.source.describe())
                    .unwrap_or_default();
                return Err(SpoolError::io(
                    "read",
                    Path::new(&what),
                    io::Error::other(e),
                ));
            }
        };
        self.start_read();
        Ok(Some(Bytes::from(piece)))
    }

    /// Starts reading the next piece of the tail, if any is left in the range.
    fn start_read(&mut self) {
        let Some(tail) = self.body.tail.clone() else {
            return;
        };
        let end = self.end.min(tail.len);
        if self.pos >= end {
            return;
        }
        let at = self.pos;
        let n = (end - at).min(CHUNK as u64) as usize;
        self.pos += n as u64;
        let read = tail.source.clone().read(tail.offset + at, n);
        self.pending = Some(tokio::spawn(read));
    }
}

impl Drop for BodyReader {
    fn drop(&mut self) {
        // A piece read ahead that nobody will take.
        if let Some(pending) = self.pending.take() {
            pending.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{Envelope, Recipient, Spool};

    fn envelope() -> Envelope {
        Envelope {
            mail_from: "app@legacy.test".into(),
            mail_params: Default::default(),
            recipients: vec![Recipient::new("b@example.org")],
            client: "127.0.0.1:1".into(),
            helo: "app".into(),
            auth_user: None,
            received_at: std::time::SystemTime::now(),
            route: "default".into(),
        }
    }

    async fn stored(spool: &Spool, message: &[u8]) -> MessageBody {
        let mut m = spool.create(&envelope()).await.expect("create");
        m.write_all(message).await.expect("write");
        let id = m.commit().await.expect("commit");
        spool.load(&id).expect("load").body
    }

    async fn read_all(body: &MessageBody) -> (Vec<u8>, usize) {
        let mut reader = body.reader();
        let mut out = Vec::new();
        let mut pieces = 0;
        while let Some(piece) = reader.next_chunk().await.expect("read") {
            assert!(!piece.is_empty());
            assert!(piece.len() <= CHUNK.max(body.head().len()));
            out.extend_from_slice(&piece);
            pieces += 1;
        }
        (out, pieces)
    }

    fn big_message(header: &[u8], lines: usize) -> Vec<u8> {
        let mut m = header.to_vec();
        for i in 0..lines {
            m.extend_from_slice(
                format!("{i:08} .line of the body, long enough to count\r\n").as_bytes(),
            );
        }
        m
    }

    #[tokio::test]
    async fn a_large_message_keeps_only_its_header_section_in_memory() {
        let dir = tempfile::tempdir().expect("tmp");
        let (spool, _) = Spool::open(&dir.path().join("s")).expect("spool");
        let header = b"From: app@legacy.test\r\nSubject: big\r\n\r\n";
        let message = big_message(header, 80_000); // ~4 MiB
        let body = stored(&spool, &message).await;
        assert_eq!(body.len(), message.len() as u64);
        assert_eq!(body.head(), header, "only the header section is in memory");
        assert!(!body.is_whole_in_memory());
        let (read, pieces) = read_all(&body).await;
        assert!(read == message, "the stream is the stored bytes");
        assert!(pieces > 2, "read in pieces");
        assert!(!body.eight_bit() && !body.header_eight_bit());
    }

    #[tokio::test]
    async fn a_new_head_shares_the_rest_and_reads_back_exactly() {
        let dir = tempfile::tempdir().expect("tmp");
        let (spool, _) = Spool::open(&dir.path().join("s")).expect("spool");
        let message = big_message(b"From: app@legacy.test\r\n\r\n", 30_000);
        let body = stored(&spool, &message).await;
        let rewritten = body.with_head(b"From: <relay@contoso.com>\r\n\r\n".to_vec());
        let mut expected = b"From: <relay@contoso.com>\r\n\r\n".to_vec();
        expected.extend_from_slice(&message[body.head().len()..]);
        assert_eq!(rewritten.len(), expected.len() as u64);
        assert!(read_all(&rewritten).await.0 == expected);
        // The original is unchanged.
        assert!(read_all(&body).await.0 == message);
    }

    #[tokio::test]
    async fn eight_bit_bytes_in_the_file_part_are_found() {
        let dir = tempfile::tempdir().expect("tmp");
        let (spool, _) = Spool::open(&dir.path().join("s")).expect("spool");
        let mut message = big_message(b"Subject: s\r\n\r\n", 40_000);
        let at = message.len() - 10;
        message[at] = 0xe9;
        let body = stored(&spool, &message).await;
        assert!(body.eight_bit());
        assert!(!body.header_eight_bit(), "the 8-bit byte is in the body");
        let small = stored(&spool, "Subject: Grüße\r\n\r\nx\r\n".as_bytes()).await;
        assert!(small.is_whole_in_memory());
        assert!(small.eight_bit() && small.header_eight_bit());
    }

    #[tokio::test]
    async fn a_header_section_longer_than_the_limit_is_cut_between_fields() {
        let dir = tempfile::tempdir().expect("tmp");
        let (spool, _) = Spool::open(&dir.path().join("s")).expect("spool");
        let mut message = b"From: app@legacy.test\r\n".to_vec();
        let mut i = 0;
        while message.len() < HEAD_LIMIT + 100_000 {
            message.extend_from_slice(
                format!("X-Filler-{i}: a value\r\n\tfolded onto a second line\r\n").as_bytes(),
            );
            i += 1;
        }
        message.extend_from_slice("X-Late: Grüße\r\n\r\nbody\r\n".as_bytes());
        let body = stored(&spool, &message).await;
        let head = body.head();
        assert!(head.len() <= HEAD_LIMIT && head.len() > HEAD_LIMIT - 200);
        assert!(
            head.ends_with(b"second line\r\n"),
            "cut after a whole field"
        );
        assert!(
            body.header_eight_bit(),
            "8-bit header bytes past the cut are found"
        );
        assert!(read_all(&body).await.0 == message);
    }

    #[tokio::test]
    async fn a_file_cut_short_after_load_is_an_error_not_a_short_message() {
        let dir = tempfile::tempdir().expect("tmp");
        let (spool, _) = Spool::open(&dir.path().join("s")).expect("spool");
        let message = big_message(b"Subject: s\r\n\r\n", 40_000);
        let mut m = spool.create(&envelope()).await.expect("create");
        m.write_all(&message).await.expect("write");
        let id = m.commit().await.expect("commit");
        let body = spool.load(&id).expect("load").body;
        // Nothing may change a committed file; if something does, the reader says so.
        let path = dir.path().join("s/queue").join(format!("{id}.msg"));
        let len = std::fs::metadata(&path).expect("stat").len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(len - 1000))
            .expect("truncate");
        let mut reader = body.reader();
        let mut got = 0usize;
        let error = loop {
            match reader.next_chunk().await {
                Ok(Some(piece)) => got += piece.len(),
                Ok(None) => panic!("a short message was read as whole ({got} bytes)"),
                Err(e) => break e,
            }
        };
        assert!(matches!(error, SpoolError::Io { .. }), "{error}");
        assert!(got < message.len());
    }

    #[tokio::test]
    async fn a_range_reads_exactly_its_bytes_across_head_and_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let (spool, _) = Spool::open(&dir.path().join("s")).expect("spool");
        let message = big_message(b"From: app@legacy.test\r\n\r\n", 30_000);
        let body = stored(&spool, &message).await;
        let held = body.head().len() as u64;
        let len = message.len() as u64;
        for (start, end) in [
            (0, 5),
            (3, held + 10),
            (held, held + CHUNK as u64 + 7),
            (len - 100, len + 50),
            (10, 10),
        ] {
            let mut reader = body.range_reader(start, end);
            let mut out = Vec::new();
            while let Some(piece) = reader.next_chunk().await.expect("read") {
                assert!(!piece.is_empty() && piece.len() <= CHUNK);
                out.extend_from_slice(&piece);
            }
            let want = &message[start as usize..end.min(len) as usize];
            assert!(out == want, "range {start}..{end}");
        }
    }

    #[tokio::test]
    async fn an_empty_or_bodiless_message_reads_back() {
        let body = MessageBody::from_bytes(Vec::new());
        assert_eq!(read_all(&body).await, (Vec::new(), 0));
        let dir = tempfile::tempdir().expect("tmp");
        let (spool, _) = Spool::open(&dir.path().join("s")).expect("spool");
        let only_header = b"Subject: x\r\n";
        let body = stored(&spool, only_header).await;
        assert_eq!(read_all(&body).await.0, only_header);
    }
}
