//! The message file format (version 2): a small human-readable envelope header, a blank line,
//! then the exact message bytes.
//!
//! ```text
//! Spool-Format: 2
//! Id: 01JDQ6Z8X1V3K5M7N9P0R2S4T6
//! Route: billing
//! Received-At: 2025-11-29T18:34:00.123456789Z
//! Client: 127.0.0.1:54321
//! Helo: printer.example
//! Auth-User: scanner
//! Mail-From: <app@example.com>
//! Body: 8BITMIME
//! Smtputf8: no
//! Envid: QQ314159
//! Ret: HDRS
//! Rcpt-To: <alice@example.com>
//! Rcpt-To: <bob@example.com>
//! Rcpt-Notify: SUCCESS,FAILURE
//! Rcpt-Orcpt: rfc822;bob@example.com
//! Body-Length: 00000000000000001234
//!
//! Received: from ...<CRLF>
//! ...
//! ```
//!
//! Rules (enforced by [`decode`], produced by [`encode_header`]):
//! - Lines end in LF and have the form `Key: value`; the header ends at the first empty line.
//! - The first line is `Spool-Format: 2` (or 1: files written before routes existed, read as
//!   route `default`); `Route` is required in version 2 and refused in 1. `Body-Length` is the last line and has exactly 20 digits
//!   (it is written as zeros and patched in place once the body is complete).
//! - `Auth-User`, `Envid`, `Ret` are optional; `Rcpt-Notify` and `Rcpt-Orcpt` belong to the
//!   `Rcpt-To` line just above them. At least one `Rcpt-To`. Unknown keys are refused.
//! - Values are UTF-8 and contain no control characters (no CR/LF injection); addresses are
//!   written inside `<>`, the null sender as `<>`.
//! - A file is whole only if its size is exactly header length + `Body-Length`.

use std::time::{SystemTime, UNIX_EPOCH};

use super::error::SpoolError;
use super::id::is_valid_id;
use crate::routes::is_route_name;

/// The format version this code writes; it also reads version 1 (before routes).
pub const FORMAT_VERSION: u32 = 2;
/// A header longer than this is refused (500 recipients with long ORCPTs fit easily).
pub const MAX_HEADER_LEN: usize = 4 << 20;
const LENGTH_WIDTH: usize = 20;
const LENGTH_KEY: &str = "Body-Length: ";

/// `BODY=` of MAIL FROM (RFC 6152, RFC 3030).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyType {
    #[default]
    SevenBit,
    EightBitMime,
    BinaryMime,
}

impl BodyType {
    pub fn as_str(self) -> &'static str {
        match self {
            BodyType::SevenBit => "7BIT",
            BodyType::EightBitMime => "8BITMIME",
            BodyType::BinaryMime => "BINARYMIME",
        }
    }

    fn parse(s: &str) -> Option<BodyType> {
        match s {
            "7BIT" => Some(BodyType::SevenBit),
            "8BITMIME" => Some(BodyType::EightBitMime),
            "BINARYMIME" => Some(BodyType::BinaryMime),
            _ => None,
        }
    }
}

impl std::fmt::Display for BodyType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// ESMTP parameters of MAIL FROM that must survive until delivery.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MailParams {
    pub body: BodyType,
    pub smtputf8: bool,
    /// `ENVID=` (DSN, RFC 3461), xtext as received.
    pub envid: Option<String>,
    /// `RET=` (`FULL` or `HDRS`).
    pub ret: Option<String>,
}

/// One RCPT TO.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recipient {
    /// The address without angle brackets.
    pub address: String,
    /// `NOTIFY=` as received, e.g. `SUCCESS,FAILURE`.
    pub notify: Option<String>,
    /// `ORCPT=` as received, e.g. `rfc822;bob@example.com`.
    pub orcpt: Option<String>,
}

impl Recipient {
    pub fn new(address: impl Into<String>) -> Recipient {
        Recipient {
            address: address.into(),
            notify: None,
            orcpt: None,
        }
    }
}

/// The SMTP envelope of one accepted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// MAIL FROM address without angle brackets; empty for the null sender `<>`.
    pub mail_from: String,
    pub mail_params: MailParams,
    pub recipients: Vec<Recipient>,
    /// Client address, e.g. `127.0.0.1:54321`.
    pub client: String,
    /// HELO/EHLO name as given.
    pub helo: String,
    pub auth_user: Option<String>,
    pub received_at: SystemTime,
    /// The route chosen at `MAIL FROM` ([`crate::routes`]); `default` for version 1 files.
    pub route: String,
}

/// A decoded message file header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub id: String,
    pub envelope: Envelope,
    /// Length of the message bytes after the header.
    pub body_length: u64,
    /// Length of the header including the terminating blank line: the body starts here.
    pub header_len: u64,
}

impl Header {
    /// The size a whole file must have.
    pub fn file_len(&self) -> u64 {
        self.header_len + self.body_length
    }
}

/// Why [`decode`] refused its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// No blank line yet: the caller may supply more bytes (unless the file has none).
    #[error("header is incomplete (no blank line)")]
    Incomplete,
    #[error("{0}")]
    Invalid(String),
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError::Invalid(msg.into()))
}

/// Latest time the RFC 3339 formatter can represent (9999-12-31T23:59:59Z).
const MAX_SECS: u64 = 253_402_300_799;

fn check_value(field: &str, value: &str) -> Result<(), SpoolError> {
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(SpoolError::InvalidEnvelope(format!(
            "{field} contains control character {c:?}"
        )));
    }
    Ok(())
}

/// Validate an envelope without encoding it.
pub fn validate_envelope(env: &Envelope) -> Result<(), SpoolError> {
    check_value("MAIL FROM address", &env.mail_from)?;
    if env.recipients.is_empty() {
        return Err(SpoolError::InvalidEnvelope("no recipients".into()));
    }
    for r in &env.recipients {
        if r.address.is_empty() {
            return Err(SpoolError::InvalidEnvelope(
                "empty recipient address".into(),
            ));
        }
        check_value("RCPT TO address", &r.address)?;
        if let Some(n) = &r.notify {
            check_value("NOTIFY", n)?;
        }
        if let Some(o) = &r.orcpt {
            check_value("ORCPT", o)?;
        }
    }
    if !is_route_name(&env.route) {
        return Err(SpoolError::InvalidEnvelope(format!(
            "route {:?} is not a route name",
            env.route
        )));
    }
    check_value("client", &env.client)?;
    check_value("HELO name", &env.helo)?;
    if let Some(u) = &env.auth_user {
        check_value("auth user", u)?;
    }
    if let Some(e) = &env.mail_params.envid {
        check_value("ENVID", e)?;
    }
    if let Some(r) = &env.mail_params.ret {
        check_value("RET", r)?;
    }
    match env.received_at.duration_since(UNIX_EPOCH) {
        Ok(d) if d.as_secs() <= MAX_SECS => Ok(()),
        _ => Err(SpoolError::InvalidEnvelope(
            "received-at outside 1970..9999".into(),
        )),
    }
}

/// Encode the header for message `id`. Returns the bytes and the offset of the 20 length digits.
pub(crate) fn encode_with_offset(
    id: &str,
    env: &Envelope,
    body_length: u64,
) -> Result<(Vec<u8>, usize), SpoolError> {
    if !is_valid_id(id) {
        return Err(SpoolError::InvalidId(id.to_string()));
    }
    validate_envelope(env)?;
    let mut s = String::with_capacity(256 + env.recipients.len() * 64);
    use std::fmt::Write as _;
    let _ = writeln!(s, "Spool-Format: {FORMAT_VERSION}");
    let _ = writeln!(s, "Id: {id}");
    let _ = writeln!(s, "Route: {}", env.route);
    let _ = writeln!(
        s,
        "Received-At: {}",
        humantime::format_rfc3339_nanos(env.received_at)
    );
    let _ = writeln!(s, "Client: {}", env.client);
    let _ = writeln!(s, "Helo: {}", env.helo);
    if let Some(u) = &env.auth_user {
        let _ = writeln!(s, "Auth-User: {u}");
    }
    let _ = writeln!(s, "Mail-From: <{}>", env.mail_from);
    let _ = writeln!(s, "Body: {}", env.mail_params.body);
    let _ = writeln!(
        s,
        "Smtputf8: {}",
        if env.mail_params.smtputf8 {
            "yes"
        } else {
            "no"
        }
    );
    if let Some(e) = &env.mail_params.envid {
        let _ = writeln!(s, "Envid: {e}");
    }
    if let Some(r) = &env.mail_params.ret {
        let _ = writeln!(s, "Ret: {r}");
    }
    for r in &env.recipients {
        let _ = writeln!(s, "Rcpt-To: <{}>", r.address);
        if let Some(n) = &r.notify {
            let _ = writeln!(s, "Rcpt-Notify: {n}");
        }
        if let Some(o) = &r.orcpt {
            let _ = writeln!(s, "Rcpt-Orcpt: {o}");
        }
    }
    s.push_str(LENGTH_KEY);
    let offset = s.len();
    let _ = write!(s, "{body_length:0width$}\n\n", width = LENGTH_WIDTH);
    if s.len() > MAX_HEADER_LEN {
        return Err(SpoolError::InvalidEnvelope("envelope too large".into()));
    }
    Ok((s.into_bytes(), offset))
}

/// Encode the header for message `id` with the given body length.
pub fn encode_header(id: &str, env: &Envelope, body_length: u64) -> Result<Vec<u8>, SpoolError> {
    encode_with_offset(id, env, body_length).map(|(b, _)| b)
}

/// The 20 zero-padded digits written over the placeholder once the body is complete.
pub(crate) fn length_digits(body_length: u64) -> [u8; LENGTH_WIDTH] {
    let mut out = [b'0'; LENGTH_WIDTH];
    let s = body_length.to_string();
    out[LENGTH_WIDTH - s.len()..].copy_from_slice(s.as_bytes());
    out
}

/// Position of the first `\n\n` (end of the envelope header).
pub(crate) fn find_header_end(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|w| w == b"\n\n")
}

fn strip_angle<'a>(key: &str, v: &'a str) -> Result<&'a str, DecodeError> {
    match v.strip_prefix('<').and_then(|v| v.strip_suffix('>')) {
        Some(inner) => Ok(inner),
        None => invalid(format!("{key} value must be inside <>")),
    }
}

/// Strictly decode a header from the start of a message file. `bytes` may extend into the body.
pub fn decode(bytes: &[u8]) -> Result<Header, DecodeError> {
    let end = match find_header_end(bytes) {
        Some(p) => p,
        None if bytes.len() >= MAX_HEADER_LEN => return invalid("header too long"),
        None => return Err(DecodeError::Incomplete),
    };
    if end >= MAX_HEADER_LEN {
        return invalid("header too long");
    }
    let text = match std::str::from_utf8(&bytes[..end]) {
        Ok(t) => t,
        Err(_) => return invalid("header is not UTF-8"),
    };
    let mut lines = text.split('\n');
    let version = match lines.next() {
        Some("Spool-Format: 1") => 1,
        Some("Spool-Format: 2") => 2,
        Some(l) => match l.strip_prefix("Spool-Format: ") {
            Some(v) => return invalid(format!("unsupported spool format version {v:?}")),
            None => return invalid("first line is not Spool-Format"),
        },
        None => return invalid("empty header"),
    };

    let mut id = None;
    let mut received_at = None;
    let mut client = None;
    let mut helo = None;
    let mut auth_user = None;
    let mut route = None;
    let mut mail_from = None;
    let mut body = None;
    let mut smtputf8 = None;
    let mut envid = None;
    let mut ret = None;
    let mut recipients: Vec<Recipient> = Vec::new();
    let mut body_length = None;

    fn once<T>(slot: &mut Option<T>, key: &str, v: T) -> Result<(), DecodeError> {
        if slot.is_some() {
            return invalid(format!("duplicate {key}"));
        }
        *slot = Some(v);
        Ok(())
    }

    for (n, line) in lines.enumerate() {
        let lineno = n + 2;
        if body_length.is_some() {
            return invalid(format!("line {lineno}: Body-Length must be the last line"));
        }
        if line.chars().any(|c| c.is_control()) {
            return invalid(format!("line {lineno}: control character"));
        }
        let Some((key, value)) = line.split_once(": ") else {
            return invalid(format!("line {lineno}: expected \"Key: value\""));
        };
        match key {
            "Id" => {
                if !is_valid_id(value) {
                    return invalid(format!("line {lineno}: invalid Id {value:?}"));
                }
                once(&mut id, key, value.to_string())?
            }
            "Received-At" => {
                let t = humantime::parse_rfc3339(value)
                    .or_else(|_| invalid(format!("line {lineno}: bad Received-At {value:?}")))?;
                once(&mut received_at, key, t)?
            }
            "Route" if version >= 2 => {
                if !is_route_name(value) {
                    return invalid(format!("line {lineno}: invalid Route {value:?}"));
                }
                once(&mut route, key, value.to_string())?
            }
            "Client" => once(&mut client, key, value.to_string())?,
            "Helo" => once(&mut helo, key, value.to_string())?,
            "Auth-User" => once(&mut auth_user, key, value.to_string())?,
            "Mail-From" => once(&mut mail_from, key, strip_angle(key, value)?.to_string())?,
            "Body" => {
                let b = BodyType::parse(value)
                    .map_or_else(|| invalid(format!("line {lineno}: bad Body {value:?}")), Ok)?;
                once(&mut body, key, b)?
            }
            "Smtputf8" => {
                let b = match value {
                    "yes" => true,
                    "no" => false,
                    _ => return invalid(format!("line {lineno}: Smtputf8 must be yes or no")),
                };
                once(&mut smtputf8, key, b)?
            }
            "Envid" => once(&mut envid, key, value.to_string())?,
            "Ret" => once(&mut ret, key, value.to_string())?,
            "Rcpt-To" => {
                let a = strip_angle(key, value)?;
                if a.is_empty() {
                    return invalid(format!("line {lineno}: empty Rcpt-To"));
                }
                recipients.push(Recipient::new(a));
            }
            "Rcpt-Notify" | "Rcpt-Orcpt" => {
                let Some(r) = recipients.last_mut() else {
                    return invalid(format!("line {lineno}: {key} before any Rcpt-To"));
                };
                let slot = if key == "Rcpt-Notify" {
                    &mut r.notify
                } else {
                    &mut r.orcpt
                };
                once(slot, key, value.to_string())?
            }
            "Body-Length" => {
                if value.len() != LENGTH_WIDTH || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return invalid(format!(
                        "line {lineno}: Body-Length must be {LENGTH_WIDTH} digits"
                    ));
                }
                let v: u64 = value
                    .parse()
                    .or_else(|_| invalid(format!("line {lineno}: Body-Length out of range")))?;
                body_length = Some(v);
            }
            other => return invalid(format!("line {lineno}: unknown key {other:?}")),
        }
    }

    fn need<T>(v: Option<T>, key: &str) -> Result<T, DecodeError> {
        v.map_or_else(|| invalid(format!("missing {key}")), Ok)
    }
    let body_length = need(body_length, "Body-Length")?;
    if recipients.is_empty() {
        return invalid("missing Rcpt-To");
    }
    let envelope = Envelope {
        mail_from: need(mail_from, "Mail-From")?,
        mail_params: MailParams {
            body: need(body, "Body")?,
            smtputf8: need(smtputf8, "Smtputf8")?,
            envid,
            ret,
        },
        recipients,
        client: need(client, "Client")?,
        helo: need(helo, "Helo")?,
        auth_user,
        received_at: need(received_at, "Received-At")?,
        route: match version {
            1 => crate::routes::DEFAULT_ROUTE.to_string(),
            _ => need(route, "Route")?,
        },
    };
    Ok(Header {
        version,
        id: need(id, "Id")?,
        envelope,
        body_length,
        header_len: (end + 2) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const ID: &str = "01JDQ6Z8X1V3K5M7N9P0R2S4T6";

    fn env() -> Envelope {
        Envelope {
            mail_from: "app@example.com".into(),
            mail_params: MailParams {
                body: BodyType::EightBitMime,
                smtputf8: true,
                envid: Some("QQ314159".into()),
                ret: Some("HDRS".into()),
            },
            recipients: vec![
                Recipient::new("alice@example.com"),
                Recipient {
                    address: "\"odd> name\"@example.com".into(),
                    notify: Some("SUCCESS,FAILURE".into()),
                    orcpt: Some("rfc822;bob@example.com".into()),
                },
                Recipient {
                    address: "jörg@bücher.example".into(),
                    notify: None,
                    orcpt: Some("utf-8;jörg@bücher.example".into()),
                },
            ],
            client: "127.0.0.1:54321".into(),
            helo: "printer.example".into(),
            auth_user: Some("scanner".into()),
            received_at: UNIX_EPOCH + Duration::new(1_764_441_240, 123_456_789),
            route: "default".into(),
        }
    }

    #[test]
    fn round_trip() {
        let e = env();
        let mut bytes = encode_header(ID, &e, 1234).unwrap();
        let hlen = bytes.len() as u64;
        bytes.extend_from_slice(b"Subject: x\r\n\r\nbody\n\nmore\r\n");
        let h = decode(&bytes).unwrap();
        assert_eq!(h.id, ID);
        assert_eq!(h.envelope, e);
        assert_eq!(h.body_length, 1234);
        assert_eq!(h.header_len, hlen);
    }

    #[test]
    fn null_sender_and_minimal() {
        let mut e = env();
        e.mail_from.clear();
        e.auth_user = None;
        e.mail_params = MailParams::default();
        e.recipients = vec![Recipient::new("a@b")];
        let bytes = encode_header(ID, &e, 0).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains("\nMail-From: <>\n"), "{text}");
        assert!(text.ends_with("Body-Length: 00000000000000000000\n\n"));
        assert_eq!(decode(&bytes).unwrap().envelope, e);
    }

    #[test]
    fn example_is_stable() {
        let bytes = encode_header(ID, &env(), 1234).unwrap();
        let expected = "Spool-Format: 2\n\
Id: 01JDQ6Z8X1V3K5M7N9P0R2S4T6\n\
Route: default\n\
Received-At: 2025-11-29T18:34:00.123456789Z\n\
Client: 127.0.0.1:54321\n\
Helo: printer.example\n\
Auth-User: scanner\n\
Mail-From: <app@example.com>\n\
Body: 8BITMIME\n\
Smtputf8: yes\n\
Envid: QQ314159\n\
Ret: HDRS\n\
Rcpt-To: <alice@example.com>\n\
Rcpt-To: <\"odd> name\"@example.com>\n\
Rcpt-Notify: SUCCESS,FAILURE\n\
Rcpt-Orcpt: rfc822;bob@example.com\n\
Rcpt-To: <jörg@bücher.example>\n\
Rcpt-Orcpt: utf-8;jörg@bücher.example\n\
Body-Length: 00000000000000001234\n\n";
        assert_eq!(String::from_utf8(bytes).unwrap(), expected);
    }

    #[test]
    fn version_1_files_are_read_as_the_default_route() {
        let mut e = env();
        e.route = "billing".into();
        let v2 = String::from_utf8(encode_header(ID, &e, 5).unwrap()).unwrap();
        assert_eq!(decode(v2.as_bytes()).unwrap().envelope.route, "billing");
        let v1 = v2
            .replace("Spool-Format: 2", "Spool-Format: 1")
            .replace("Route: billing\n", "");
        let h = decode(v1.as_bytes()).unwrap();
        assert_eq!((h.version, h.envelope.route.as_str()), (1, "default"));
        assert_eq!(h.envelope.mail_from, e.mail_from);
    }

    #[test]
    fn refuses_injection() {
        for bad in ["a@b\r\nRcpt-To: <evil@x>", "a@b\n", "a\tb", "a\u{7f}"] {
            let mut e = env();
            e.recipients[0].address = bad.into();
            assert!(matches!(
                encode_header(ID, &e, 0),
                Err(SpoolError::InvalidEnvelope(_))
            ));
            let mut e = env();
            e.mail_from = bad.into();
            assert!(encode_header(ID, &e, 0).is_err());
            let mut e = env();
            e.helo = bad.into();
            assert!(encode_header(ID, &e, 0).is_err());
        }
        let mut e = env();
        e.recipients.clear();
        assert!(encode_header(ID, &e, 0).is_err());
        assert!(matches!(
            encode_header("../../etc/passwd", &env(), 0),
            Err(SpoolError::InvalidId(_))
        ));
    }

    #[test]
    fn length_digits_patch() {
        let (mut bytes, off) = encode_with_offset(ID, &env(), 0).unwrap();
        bytes[off..off + LENGTH_WIDTH].copy_from_slice(&length_digits(36_700_160));
        assert_eq!(decode(&bytes).unwrap().body_length, 36_700_160);
        assert_eq!(&length_digits(u64::MAX), b"18446744073709551615");
    }

    fn good() -> String {
        String::from_utf8(encode_header(ID, &env(), 5).unwrap()).unwrap()
    }

    #[test]
    fn strict_decoder() {
        let g = good();
        let cases: Vec<(String, &str)> = vec![
            (g.replace("Spool-Format: 2", "Spool-Format: 3"), "version"),
            (g.replace("Spool-Format: 2\n", ""), "first line"),
            (g.replace("Route: default\n", ""), "missing Route"),
            (g.replace("Route: default", "Route: Bad Name"), "Route"),
            (
                g.replace("Spool-Format: 2", "Spool-Format: 1"),
                "unknown key",
            ),
            (g.replace("Helo: ", "Helo:"), "Key: value"),
            (g.replace("Body: 8BITMIME", "Body: 9BIT"), "Body"),
            (g.replace("Smtputf8: yes", "Smtputf8: true"), "Smtputf8"),
            (g.replace("Client: ", "Klient: "), "unknown key"),
            (g.replace("Id: 01J", "Id: 01I"), "Id"),
            (
                g.replace("Received-At: 2025", "Received-At: 20x5"),
                "Received-At",
            ),
            (
                g.replace("Mail-From: <app@example.com>", "Mail-From: app@example.com"),
                "<>",
            ),
            (g.replace("00000000000000000005", "5"), "20 digits"),
            (
                g.replace("00000000000000000005", "99999999999999999999"),
                "range",
            ),
            (
                g.replace("Helo: printer.example\n", "Helo: a\nHelo: b\n"),
                "duplicate",
            ),
            (g.replace("Client: 127.0.0.1:54321\n", ""), "missing Client"),
            (
                g.replace("Body-Length: 00000000000000000005\n", ""),
                "missing Body-Length",
            ),
            (
                g.replace(
                    "Body-Length: 00000000000000000005\n",
                    "Body-Length: 00000000000000000005\nHelo: x\n",
                ),
                "last line",
            ),
            (g.replace("Helo: printer", "Helo: pr\rinter"), "control"),
            (
                g.replace(
                    "Rcpt-To: <alice@example.com>\n",
                    "Rcpt-Notify: NEVER\nRcpt-To: <alice@example.com>\n",
                ),
                "before any Rcpt-To",
            ),
        ];
        for (text, why) in cases {
            match decode(text.as_bytes()) {
                Err(DecodeError::Invalid(msg)) => {
                    assert!(msg.contains(why), "{why}: got {msg}")
                }
                other => panic!("{why}: expected Invalid, got {other:?}"),
            }
        }
        // No recipients at all.
        let mut no_rcpt = String::new();
        for l in g.lines() {
            if !l.starts_with("Rcpt-") {
                no_rcpt.push_str(l);
                no_rcpt.push('\n');
            }
        }
        no_rcpt.push('\n');
        let no_rcpt = no_rcpt.replace("\n\n\n", "\n\n");
        assert_eq!(
            decode(no_rcpt.as_bytes()),
            Err(DecodeError::Invalid("missing Rcpt-To".into()))
        );
        // Truncated before the blank line.
        assert_eq!(
            decode(&g.as_bytes()[..g.len() - 1]),
            Err(DecodeError::Incomplete)
        );
        assert_eq!(decode(b""), Err(DecodeError::Incomplete));
        assert!(matches!(
            decode(&[0xff, b'\n', b'\n']),
            Err(DecodeError::Invalid(_))
        ));
    }
}
