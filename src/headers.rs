//! The relay's one reader of a message's header section (RFC 5322 §2.2, §3.6), on mail-parser.
//!
//! Inbound (which fields to add), the sender policy (the From rewrite), failure notices and
//! `queue show` all ask this module; nobody else splits header lines. Fields are located by
//! byte offset so that callers insert or replace whole fields and leave every other byte as
//! the client sent it: a value is never decoded and re-encoded on its way through the relay.
//! Decoded text ([`Headers::text`]) is for display in new messages only.

use std::borrow::Cow;

use mail_parser::parsers::MessageStream;
use mail_parser::{Addr, Address, HeaderValue, MessageParser};

pub use mail_parser::HeaderName;

/// A MIME field with parameters: its value in lower case (`multipart/mixed`, `attachment`) and
/// its parameters (names in lower case, RFC 2231 and RFC 2047 encodings decoded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MimeField {
    pub value: String,
    pub params: Vec<(String, String)>,
}

impl MimeField {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The parsed header section of a message.
pub struct Headers<'a> {
    raw: &'a [u8],
    fields: Vec<mail_parser::Header<'a>>,
    /// Offset of the empty line that ends the section, or the end of the input.
    section_end: usize,
    complete: bool,
}

impl<'a> Headers<'a> {
    /// Parses the header section at the start of `message` (the whole message or a prefix).
    pub fn parse(message: &'a [u8]) -> Headers<'a> {
        let parser = MessageParser::new();
        let mut stream = MessageStream::new(message);
        let mut fields = Vec::new();
        let complete = stream.parse_headers(&parser, &mut fields);
        let section_end = if complete {
            // The stream stops just past the empty line; the section ends where that line starts.
            let body = stream.offset().min(message.len());
            message[..body.saturating_sub(1)]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1)
        } else {
            message.len()
        };
        Headers {
            raw: message,
            fields,
            section_end,
            complete,
        }
    }

    /// Whether the empty line that ends the section was seen (else the input was all header).
    pub fn complete(&self) -> bool {
        self.complete
    }

    /// The header section's bytes: every line before the empty line (or all of the input).
    pub fn section(&self) -> &'a [u8] {
        &self.raw[..self.section_end]
    }

    pub fn has(&self, name: &HeaderName<'_>) -> bool {
        self.fields.iter().any(|f| &f.name == name)
    }

    /// The first field with this name.
    pub fn field(&self, name: &HeaderName<'_>) -> Option<Field<'a, '_>> {
        self.fields
            .iter()
            .find(|f| &f.name == name)
            .map(|header| Field {
                header,
                raw: self.raw,
            })
    }

    /// Every field with this name, in order (a message may carry several `To:` fields).
    pub fn fields_named<'h>(
        &'h self,
        name: &'h HeaderName<'_>,
    ) -> impl Iterator<Item = Field<'a, 'h>> + 'h {
        self.fields
            .iter()
            .filter(move |f| &f.name == name)
            .map(|header| Field {
                header,
                raw: self.raw,
            })
    }

    /// The decoded text of an unstructured field (RFC 2047 words decoded, folding removed),
    /// for showing it in a message the relay writes itself.
    pub fn text(&self, name: &HeaderName<'_>) -> Option<String> {
        let field = self.fields.iter().find(|f| &f.name == name)?;
        match &field.value {
            HeaderValue::Text(t) => Some(t.to_string()),
            HeaderValue::TextList(l) => Some(l.join(", ")),
            _ => Some(String::new()),
        }
    }

    /// A MIME field with parameters (`Content-Type`, `Content-Disposition`) as mail-parser
    /// reads it; `None` when absent.
    pub fn mime(&self, name: &HeaderName<'_>) -> Option<MimeField> {
        let field = self.fields.iter().find(|f| &f.name == name)?;
        let HeaderValue::ContentType(ct) = &field.value else {
            return None;
        };
        let value = match &ct.c_subtype {
            Some(sub) => format!("{}/{sub}", ct.c_type),
            None => ct.c_type.to_string(),
        };
        Some(MimeField {
            value: value.to_ascii_lowercase(),
            params: ct
                .attributes
                .iter()
                .flatten()
                .map(|a| (a.name.to_ascii_lowercase(), a.value.to_string()))
                .collect(),
        })
    }

    /// Offset just past the trace block at the top of the message: the leading run of
    /// `Return-Path`, `Received` and `Resent-*` fields (RFC 5322 §3.6.6, §3.6.7). Fields the
    /// relay adds go here, so the trace block stays one block (RFC 5321 §4.4).
    pub fn trace_end(&self) -> usize {
        let mut end = 0;
        for f in &self.fields {
            if !is_trace(&f.name) {
                break;
            }
            end = f.offset_end as usize;
        }
        end.min(self.raw.len())
    }
}

/// Whether an empty line can have ended the header section within `bytes[since..]` (one that
/// straddles `since` included). The cheap trigger for a writer that collects a CRLF-normalised
/// section chunk by chunk: it parses once, when this says the section may be complete, instead
/// of on every chunk.
pub fn empty_line_since(bytes: &[u8], since: usize) -> bool {
    if bytes.starts_with(b"\r\n") {
        return true;
    }
    let from = since.saturating_sub(3).min(bytes.len());
    bytes[from..].windows(4).any(|w| w == b"\r\n\r\n")
}

fn is_trace(name: &HeaderName<'_>) -> bool {
    matches!(
        name,
        HeaderName::ReturnPath
            | HeaderName::Received
            | HeaderName::ResentDate
            | HeaderName::ResentFrom
            | HeaderName::ResentSender
            | HeaderName::ResentTo
            | HeaderName::ResentCc
            | HeaderName::ResentBcc
            | HeaderName::ResentMessageId
    )
}

/// One header field, with where its bytes are.
pub struct Field<'a, 'h> {
    header: &'h mail_parser::Header<'a>,
    raw: &'a [u8],
}

impl<'a> Field<'a, '_> {
    /// Offset of the field name.
    pub fn start(&self) -> usize {
        self.header.offset_field as usize
    }

    /// Offset just past the field's last line (its CRLF included).
    pub fn end(&self) -> usize {
        (self.header.offset_end as usize).min(self.raw.len())
    }

    /// The value's bytes exactly as sent: after the colon, folding and the final CRLF included.
    pub fn raw_value(&self) -> &'a [u8] {
        let start = (self.header.offset_start as usize).min(self.end());
        &self.raw[start..self.end()]
    }

    /// Every address of an address field (groups flattened), as mail-parser read them; `None`
    /// for a mailbox without an addr-spec (`From: root`).
    pub fn addresses(&self) -> Vec<Option<&str>> {
        match &self.header.value {
            HeaderValue::Address(Address::List(list)) => list.iter().map(addr).collect(),
            HeaderValue::Address(Address::Group(groups)) => groups
                .iter()
                .flat_map(|g| g.addresses.iter().map(addr))
                .collect(),
            _ => Vec::new(),
        }
    }

    pub fn is_group(&self) -> bool {
        matches!(&self.header.value, HeaderValue::Address(Address::Group(_)))
    }

    /// The mailboxes of an address list with the bytes of each, or `None` when they cannot be
    /// placed in the raw value (groups, forms mail-parser reads differently from the bytes).
    pub fn mailboxes(&self) -> Option<Vec<Mailbox<'a>>> {
        let list = match &self.header.value {
            HeaderValue::Address(Address::List(list)) => list.as_slice(),
            HeaderValue::Empty => &[],
            _ => return None,
        };
        locate(self.raw_value(), list)
    }
}

fn addr<'x>(a: &'x Addr<'_>) -> Option<&'x str> {
    a.address.as_deref().filter(|s| !s.is_empty())
}

/// A mailbox of an address field: mail-parser's reading plus the original bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox<'a> {
    pub address: Option<Cow<'a, str>>,
    pub name: Option<DisplayName<'a>>,
    /// The mailbox's bytes in the field (for copying it into another field unchanged).
    pub raw: &'a [u8],
}

impl Mailbox<'_> {
    /// `local@domain` with both parts present: an address a reply can go to.
    pub fn is_qualified(&self) -> bool {
        self.address.as_deref().is_some_and(is_qualified)
    }
}

pub fn is_qualified(address: &str) -> bool {
    address
        .rsplit_once('@')
        .is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty())
}

/// A display name's bytes as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisplayName<'a> {
    /// The phrase before `<addr>` (quoted strings, encoded words and 8-bit bytes as they were).
    Phrase(&'a [u8]),
    /// The inside of the comment after a bare address, the obsolete `root (Cron Daemon)` form.
    Comment(&'a [u8]),
}

impl<'a> DisplayName<'a> {
    /// The name as an RFC 5322 phrase for a new `Name <addr>` mailbox, with its bytes unchanged
    /// where the syntax allows (a comment's text is quoted only if it is not a run of atoms).
    pub fn phrase(&self) -> Cow<'a, [u8]> {
        match *self {
            DisplayName::Phrase(p) => Cow::Borrowed(p),
            DisplayName::Comment(c) => {
                let c = trim(c);
                let plain = c
                    .iter()
                    .all(|&b| is_atext(b) || b == b' ' || b == b'\t' || b >= 0x80);
                if plain {
                    return Cow::Borrowed(c);
                }
                let mut out = Vec::with_capacity(c.len() + 2);
                out.push(b'"');
                let mut i = 0;
                while i < c.len() {
                    match c[i] {
                        // A quoted-pair is a quoted-pair in a quoted string too.
                        b'\\' if i + 1 < c.len() => {
                            out.extend_from_slice(&c[i..i + 2]);
                            i += 1;
                        }
                        b'"' | b'\\' => {
                            out.push(b'\\');
                            out.push(c[i]);
                        }
                        b => out.push(b),
                    }
                    i += 1;
                }
                out.push(b'"');
                Cow::Owned(out)
            }
        }
    }
}

/// RFC 5322 §3.2.3 atext.
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b)
}

fn is_wsp(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|&b| !is_wsp(b))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|&b| !is_wsp(b))
        .map_or(start, |p| p + 1);
    &bytes[start..end.max(start)]
}

fn skip_wsp(v: &[u8], mut i: usize) -> usize {
    while i < v.len() && is_wsp(v[i]) {
        i += 1;
    }
    i
}

/// The end of the comment opening at `v[open]` (just past its `)`), nested comments and
/// quoted-pairs included (RFC 5322 §3.2.2).
fn comment_end(v: &[u8], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = open;
    while i < v.len() {
        match v[i] {
            b'\\' => i += 1,
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Places each of mail-parser's mailboxes in the raw value `v`: its addr-spec is searched for
/// from where the previous mailbox ended, and the bytes around it say which form it has.
fn locate<'a>(v: &'a [u8], list: &[Addr<'a>]) -> Option<Vec<Mailbox<'a>>> {
    let mut out = Vec::with_capacity(list.len());
    let mut cursor = 0;
    for a in list {
        let start = {
            let mut i = cursor;
            while i < v.len() && (is_wsp(v[i]) || v[i] == b',') {
                i += 1;
            }
            i
        };
        let Some(address) = addr(a) else {
            // A lone word such as `root`: mail-parser reads it as a name without an address.
            let end = v[start..]
                .iter()
                .position(|&b| b == b',')
                .map_or(v.len(), |p| start + p);
            let raw = trim(&v[start..end]);
            out.push(Mailbox {
                address: None,
                name: (!raw.is_empty()).then_some(DisplayName::Phrase(raw)),
                raw,
            });
            cursor = end;
            continue;
        };
        let needle = address.as_bytes();
        let at = v[start..]
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| start + p)?;
        let before = trim(&v[start..at]);
        let (name, mut end) = if before.last() == Some(&b'<') {
            // `Name <addr>`: the phrase is everything before the bracket.
            let close = skip_wsp(v, at + needle.len());
            if v.get(close) != Some(&b'>') {
                return None;
            }
            let phrase = trim(&before[..before.len() - 1]);
            let name = (!phrase.is_empty()).then_some(DisplayName::Phrase(phrase));
            (name, close + 1)
        } else if before.is_empty() {
            // A bare addr-spec, perhaps with the obsolete trailing comment as its name.
            let after = skip_wsp(v, at + needle.len());
            if v.get(after) == Some(&b'(') {
                let close = comment_end(v, after)?;
                let inner = trim(&v[after + 1..close - 1]);
                let name = (!inner.is_empty()).then_some(DisplayName::Comment(inner));
                (name, close)
            } else {
                (None, at + needle.len())
            }
        } else {
            // Something mail-parser read differently from the bytes (a quoted local part...).
            return None;
        };
        // A comment after `<addr>` belongs to this mailbox too.
        let after = skip_wsp(v, end);
        if v.get(after) == Some(&b'(') {
            end = comment_end(v, after)?;
        }
        out.push(Mailbox {
            address: a.address.clone(),
            name,
            raw: trim(&v[start..end]),
        });
        cursor = end;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (address, name, the mailbox's bytes as text) of each mailbox found.
    type Found = (Option<String>, Option<DisplayName<'static>>, String);

    fn mailboxes(value: &[u8]) -> Option<Vec<Found>> {
        let mut message = b"From:".to_vec();
        message.extend_from_slice(value);
        message.extend_from_slice(b"\r\n\r\n");
        let message: &'static [u8] = Box::leak(message.into_boxed_slice());
        let headers = Headers::parse(message);
        let field = headers.field(&HeaderName::From)?;
        let found = field.mailboxes()?;
        Some(
            found
                .into_iter()
                .map(|m| {
                    (
                        m.address.map(|a| a.to_string()),
                        m.name,
                        String::from_utf8_lossy(m.raw).into_owned(),
                    )
                })
                .collect(),
        )
    }

    #[test]
    fn sections_end_at_the_first_empty_line() {
        let h = Headers::parse(b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nC: 3\r\n");
        assert!(h.complete());
        assert_eq!(h.section(), b"A: 1\r\nB: 2\r\n");
        assert_eq!(Headers::parse(b"A: 1\n\nbody").section(), b"A: 1\n");
        assert_eq!(Headers::parse(b"\r\nbody").section(), b"");
        let open = Headers::parse(b"A: 1\r\nB: 2");
        assert!(!open.complete());
        assert_eq!(open.section(), b"A: 1\r\nB: 2");
        assert_eq!(Headers::parse(b"").section(), b"");
        // A line that is not a field does not end the section.
        let h = Headers::parse(b"A: 1\r\njunk\r\nB: 2\r\n\r\nx");
        assert_eq!(h.section(), b"A: 1\r\njunk\r\nB: 2\r\n");
    }

    #[test]
    fn fields_are_found_by_name_not_by_prefix_and_never_in_the_body() {
        let h = Headers::parse(
            b"Subject: x\r\n date: folded\r\nmessage-id: <a@b>\r\nDated: no\r\n\r\nDate: body\r\n",
        );
        assert!(!h.has(&HeaderName::Date));
        assert!(h.has(&HeaderName::MessageId));
        assert_eq!(
            h.text(&HeaderName::Subject).as_deref(),
            Some("x date: folded")
        );
    }

    #[test]
    fn field_offsets_cover_the_folded_value() {
        let msg = b"To: a@b\r\nfrom: Someone\r\n <app@legacy.local>\r\nX: y\r\n\r\n";
        let h = Headers::parse(msg);
        let f = h.field(&HeaderName::From).expect("from");
        assert_eq!(
            &msg[f.start()..f.end()],
            b"from: Someone\r\n <app@legacy.local>\r\n"
        );
        assert_eq!(f.raw_value(), b" Someone\r\n <app@legacy.local>\r\n");
    }

    #[test]
    fn the_trace_block_is_the_leading_run_of_trace_fields() {
        let msg = b"Return-Path: <a@b>\r\nReceived: from x\r\n\tby y; date\r\nReceived: z\r\nSubject: s\r\nReceived: late\r\n\r\n";
        let h = Headers::parse(msg);
        assert!(msg[..h.trace_end()].ends_with(b"Received: z\r\n"));
        assert!(msg[h.trace_end()..].starts_with(b"Subject: s"));
        assert_eq!(Headers::parse(b"Subject: s\r\n\r\n").trace_end(), 0);
    }

    #[test]
    fn mailboxes_keep_their_bytes() {
        let latin1 = b" M\xfcller GmbH <erp@contoso.com>";
        let got = mailboxes(latin1).expect("located");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.as_deref(), Some("erp@contoso.com"));
        assert_eq!(got[0].1, Some(DisplayName::Phrase(b"M\xfcller GmbH")));

        let cron = mailboxes(b" root (Cron Daemon)").expect("located");
        assert_eq!(cron[0].0.as_deref(), Some("root"));
        assert_eq!(cron[0].1, Some(DisplayName::Comment(b"Cron Daemon")));
        assert_eq!(cron[0].2, "root (Cron Daemon)");

        let two = mailboxes(b" \"Doe, J.\" <j@x.de> (desk), k@x.de, root").expect("located");
        assert_eq!(two.len(), 3);
        assert_eq!(two[0].1, Some(DisplayName::Phrase(b"\"Doe, J.\"")));
        assert_eq!(two[0].2, "\"Doe, J.\" <j@x.de> (desk)");
        assert_eq!(two[1].2, "k@x.de");
        assert_eq!(two[2].0, None);
        assert_eq!(two[2].2, "root");

        assert_eq!(mailboxes(b" <>").expect("empty"), vec![]);
        // Groups are not split into mailboxes.
        assert!(mailboxes(b" Team: a@b.c, d@e.f;").is_none());
    }

    #[test]
    fn a_comment_name_becomes_a_phrase_with_its_bytes() {
        assert_eq!(
            DisplayName::Comment(b"Cron Daemon").phrase().as_ref(),
            b"Cron Daemon"
        );
        assert_eq!(
            DisplayName::Comment(b"M\xfcller").phrase().as_ref(),
            b"M\xfcller"
        );
        assert_eq!(
            DisplayName::Comment(b"Doe, J. \\) \"x\"").phrase().as_ref(),
            b"\"Doe, J. \\) \\\"x\\\"\""
        );
    }

    #[test]
    fn an_empty_line_is_noticed_across_chunks() {
        assert!(empty_line_since(b"\r\nbody", 2));
        assert!(empty_line_since(b"A: b\r\n\r\n", 7));
        assert!(!empty_line_since(b"A: b\r\n\r\n", 9));
        assert!(!empty_line_since(b"A: b\r\nC: d\r\n", 0));
    }

    #[test]
    fn qualified_means_local_and_domain() {
        assert!(is_qualified("a@b"));
        assert!(!is_qualified("root"));
        assert!(!is_qualified("@example.com"));
        assert!(!is_qualified("root@"));
    }
}
