//! Shared test data: dot-stuffing, the seeded PRNG, message builders, the fate ledger of the
//! fault campaign, and spool inspection (decoding the files the relay leaves behind).

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use smtp_oauth_relay::spool::format::{self, Header};

// ---------------------------------------------------------------------------------------------
// TLS

/// A self-signed certificate for `localhost` (also the root a verifying client trusts) and its
/// key, written to `dir/tls.crt` and `dir/tls.key`.
pub fn self_signed_tls(dir: &Path) -> (PathBuf, PathBuf) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    fs::write(&cert_path, cert.cert.pem()).expect("write cert");
    fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
    (cert_path, key_path)
}

// ---------------------------------------------------------------------------------------------
// Dot-stuffing

/// RFC 5321 §4.5.2 transparency: a line starting with "." gets another "." (a line starts after
/// any LF, so bare-LF input is stuffed as a lenient server would read it). No terminator added.
pub fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 64);
    let mut at_line_start = true;
    for &b in message {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

/// The whole DATA section for `body`: dot-stuffed, a final CRLF if the body lacks one, then the
/// terminating `.` line.
pub fn data_block(body: impl AsRef<[u8]>) -> Vec<u8> {
    let body = body.as_ref();
    let mut out = dot_stuff(body);
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

// ---------------------------------------------------------------------------------------------
// Deterministic pseudo-random numbers (no dependency): SplitMix64

/// Seeded so that a failing run reproduces; every test that draws numbers uses this one.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

// ---------------------------------------------------------------------------------------------
// Message builders

/// CRLF-terminated lines.
pub fn crlf(lines: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A simple message from `from` (the simulator tests' default body).
pub fn sim_message(from: &str, subject: &str) -> String {
    format!("From: <{from}>\r\nTo: <rcpt@example.org>\r\nSubject: {subject}\r\n\r\nHello.\r\n")
}

/// The message for `marker`: `X-Marker` header, then a deterministic body of about `size` bytes
/// that ends with an `END-<marker>` line (so truncation shows).
pub fn message(marker: &str, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: legacy@app.local\r\nTo: user@example.org\r\nSubject: fault {marker}\r\n\
         X-Marker: {marker}\r\n\r\n"
    )
    .into_bytes();
    let mut i = 0u64;
    while m.len() < size {
        let line = if i % 5 == 2 {
            format!(".{marker} dotted {i:07}\r\n")
        } else {
            format!("{marker} line {i:07} the quick brown fox jumps over the lazy dog\r\n")
        };
        m.extend_from_slice(line.as_bytes());
        i += 1;
    }
    m.extend_from_slice(format!("END-{marker}\r\n").as_bytes());
    m
}

/// The body (after the first blank line) of a message.
pub fn body_of(message: &[u8]) -> &[u8] {
    let p = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(0);
    &message[p..]
}

/// The `X-Marker` of a message (stored or delivered).
pub fn marker_of(message: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(message);
    let start = text.find("\r\nX-Marker: ")? + "\r\nX-Marker: ".len();
    let end = start + text[start..].find("\r\n")?;
    Some(text[start..end].to_string())
}

// ---------------------------------------------------------------------------------------------
// How far each message got (the fault campaign's ledger)

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// DATA started; the final dot was never written (cut off).
    CutOff,
    /// The final dot was written, no reply came (in doubt: may or may not be committed).
    InDoubt,
    /// `250 queued as`.
    Acked,
    /// A refusal at any step.
    Refused,
}

/// marker → fate, shared by the client threads of a scenario.
#[derive(Default)]
pub struct Ledger {
    pub fates: Mutex<HashMap<String, (Fate, usize)>>,
}

impl Ledger {
    pub fn set(&self, marker: &str, fate: Fate, size: usize) {
        self.fates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(marker.to_string(), (fate, size));
    }

    pub fn count(&self, fate: Fate) -> usize {
        self.fates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|(f, _)| *f == fate)
            .count()
    }
}

/// What the mailbox holds against what the clients recorded.
#[derive(Debug, Default)]
pub struct Audit {
    pub acked: usize,
    pub in_doubt: usize,
    pub cut_off: usize,
    pub refused: usize,
    /// Distinct markers delivered.
    pub delivered: usize,
    /// Extra copies beyond the first.
    pub duplicates: usize,
    /// Acknowledged but never delivered (must be 0).
    pub lost: Vec<String>,
    /// Delivered although cut off or refused, or with a wrong body (must be empty).
    pub wrong: Vec<String>,
}

/// Compares delivered messages with the ledger. Markers not matching `prefix` are ignored
/// (other scenarios sharing a mailbox).
pub fn audit(ledger: &Ledger, delivered: &[Vec<u8>], prefix: &str) -> Audit {
    let fates = ledger.fates.lock().unwrap_or_else(|p| p.into_inner());
    let mut copies: HashMap<String, usize> = HashMap::new();
    let mut a = Audit::default();
    for m in delivered {
        let Some(marker) = marker_of(m) else { continue };
        if !marker.starts_with(prefix) {
            continue;
        }
        *copies.entry(marker.clone()).or_default() += 1;
        match fates.get(&marker) {
            Some((Fate::Acked | Fate::InDoubt, size)) => {
                let expected = message(&marker, *size);
                if !m.ends_with(body_of(&expected)) {
                    a.wrong.push(format!(
                        "{marker}: delivered body differs from the one sent"
                    ));
                }
            }
            Some((fate, _)) => a
                .wrong
                .push(format!("{marker}: delivered although {fate:?}")),
            None => a.wrong.push(format!("{marker}: delivered but never sent")),
        }
    }
    for (marker, (fate, _)) in fates.iter() {
        match fate {
            Fate::Acked => {
                a.acked += 1;
                if !copies.contains_key(marker) {
                    a.lost.push(marker.clone());
                }
            }
            Fate::InDoubt => a.in_doubt += 1,
            Fate::CutOff => a.cut_off += 1,
            Fate::Refused => a.refused += 1,
        }
    }
    a.delivered = copies.len();
    a.duplicates = copies.values().map(|n| n - 1).sum();
    a.lost.sort();
    a
}

/// Appends one line to `target/fault-figures.txt` (collected into RELIABILITY.md by hand) and
/// prints it.
pub fn report(line: &str) {
    eprintln!("FIGURES {line}");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fault-figures.txt");
    if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

// ---------------------------------------------------------------------------------------------
// Spool inspection

/// A decoded spool file.
#[derive(Debug)]
pub struct Stored {
    pub path: PathBuf,
    pub header: Header,
    /// The message bytes after the envelope header.
    pub body: Vec<u8>,
}

/// Reads and strictly decodes one message file; the file size must be exactly header + body.
pub fn read_stored(path: &Path) -> Result<Stored, String> {
    let bytes = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let header = format::decode(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    if header.file_len() != bytes.len() as u64 {
        return Err(format!(
            "{}: file is {} bytes, header says {}",
            path.display(),
            bytes.len(),
            header.file_len()
        ));
    }
    let body = bytes[header.header_len as usize..].to_vec();
    Ok(Stored {
        path: path.to_path_buf(),
        header,
        body,
    })
}

/// Names of the files in `<spool>/<sub>/`, sorted (empty if the directory does not exist).
pub fn files_in(spool: &Path, sub: &str) -> Vec<String> {
    let mut names: Vec<String> = match fs::read_dir(spool.join(sub)) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// Messages in `<spool>/<sub>/` (`*.msg`).
pub fn spool_count(spool: &Path, sub: &str) -> usize {
    files_in(spool, sub)
        .iter()
        .filter(|n| n.ends_with(".msg"))
        .count()
}

/// The message file of `id` in `queue/`.
pub fn queued_path(spool: &Path, id: &str) -> PathBuf {
    spool.join("queue").join(format!("{id}.msg"))
}

/// What the relay added in front of the client's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Added {
    /// The `Received:` header with its continuation lines.
    pub received: String,
    pub date: Option<String>,
    pub message_id: Option<String>,
}

/// Splits a stored message into the relay's added lines and the rest: the leading `Received:`
/// header (with its folded lines), then a `Date:` and a `Message-ID:` line, each expected only if
/// `client_message` (what the client sent, unstuffed) lacks that field. With `id`, the Received
/// header and the Message-ID must name it. Panics with a readable message if the stored message
/// does not start like that.
pub fn split_added<'a>(
    stored: &'a [u8],
    id: Option<&str>,
    client_message: &[u8],
) -> (Added, &'a [u8]) {
    let mut rest = stored;
    let take_line = |rest: &mut &'a [u8]| -> &'a [u8] {
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| p + 2)
            .unwrap_or_else(|| panic!("no CRLF in {:?}", String::from_utf8_lossy(rest)));
        let (line, tail) = rest.split_at(end);
        *rest = tail;
        line
    };
    let first = take_line(&mut rest);
    assert!(
        first.starts_with(b"Received: from "),
        "stored message does not start with the relay's Received header: {:?}",
        String::from_utf8_lossy(first)
    );
    let mut received = String::from_utf8_lossy(first).into_owned();
    while rest.starts_with(b"\t") || rest.starts_with(b" ") {
        received.push_str(&String::from_utf8_lossy(take_line(&mut rest)));
    }
    assert!(
        received.contains("(smtp-oauth-relay) with ") && id.is_none_or(|id| received.contains(id)),
        "Received header does not name the relay and id {id:?}: {received:?}"
    );
    let client_headers = header_section(client_message);
    let mut date = None;
    if !has_field(client_headers, "Date") {
        let line = take_line(&mut rest);
        assert!(
            line.starts_with(b"Date: "),
            "expected an added Date header, got {:?}",
            String::from_utf8_lossy(line)
        );
        date = Some(String::from_utf8_lossy(line).into_owned());
    }
    let mut message_id = None;
    if !has_field(client_headers, "Message-ID") {
        let line = take_line(&mut rest);
        let expected = match id {
            Some(id) => format!("Message-ID: <{id}@"),
            None => "Message-ID: <".to_string(),
        };
        assert!(
            line.starts_with(expected.as_bytes()),
            "expected an added Message-ID header, got {:?}",
            String::from_utf8_lossy(line)
        );
        message_id = Some(String::from_utf8_lossy(line).into_owned());
    }
    (
        Added {
            received,
            date,
            message_id,
        },
        rest,
    )
}

/// [`split_added`] for the message stored under `id`.
pub fn strip_added<'a>(stored: &'a [u8], id: &str, client_message: &[u8]) -> (Added, &'a [u8]) {
    split_added(stored, Some(id), client_message)
}

/// The stored message without the relay's trace header and the Date/Message-ID it added
/// because `sent` (what the client sent) lacked them.
pub fn strip_added_headers<'a>(stored: &'a [u8], sent: &[u8]) -> &'a [u8] {
    split_added(stored, None, sent).1
}

/// Asserts that the stored message is exactly the relay's added lines followed by
/// `client_message`, byte for byte; returns what was added.
pub fn assert_stored_equals(stored: &[u8], id: &str, client_message: &[u8]) -> Added {
    let (added, rest) = strip_added(stored, id, client_message);
    if rest != client_message {
        let at = rest
            .iter()
            .zip(client_message)
            .position(|(a, b)| a != b)
            .unwrap_or(rest.len().min(client_message.len()));
        let lo = at.saturating_sub(40);
        panic!(
            "message {id}: stored bytes differ from what the client sent at offset {at} \
             (stored {} bytes, sent {} bytes)\n stored: {:?}\n   sent: {:?}",
            rest.len(),
            client_message.len(),
            String::from_utf8_lossy(&rest[lo.min(rest.len())..(at + 40).min(rest.len())]),
            String::from_utf8_lossy(
                &client_message[lo.min(client_message.len())..(at + 40).min(client_message.len())]
            ),
        );
    }
    added
}

/// The header section of a message (up to and including the CRLF of its last header line).
fn header_section(bytes: &[u8]) -> &[u8] {
    if bytes.starts_with(b"\r\n") {
        return &bytes[..0];
    }
    match bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(p) => &bytes[..p + 2],
        None => bytes,
    }
}

/// True if some unfolded line of `headers` is the field `name` (case-insensitive).
fn has_field(headers: &[u8], name: &str) -> bool {
    headers
        .split(|b| *b == b'\n')
        .filter(|l| !l.starts_with(b" ") && !l.starts_with(b"\t"))
        .any(|l| {
            l.len() > name.len()
                && l[..name.len()].eq_ignore_ascii_case(name.as_bytes())
                && l[name.len()] == b':'
        })
}
