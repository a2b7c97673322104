//! The scrubber: every secret the relay holds, removed from any text that comes from outside.
//!
//! A token endpoint (or a proxy in front of it) may echo the request body in its error
//! description, and an SMTP server may echo the AUTH line in its reply. Such text is kept in
//! errors, `/healthz`, `check`, the logs and the spool's state files, so it is scrubbed where it
//! enters the relay: [`scrub`] is applied to the token endpoint's error texts
//! (`oauth::error`, `oauth::source`) and to every upstream SMTP reply (`deliver::reply`).
//!
//! Secrets are registered while the relay holds them: the client secret and the private key
//! while a token client uses them, each access token while any copy of it is alive (the token
//! provider keeps the previous one too), and the last two client assertions. A [`Registration`]
//! removes its secret when dropped.
//!
//! Every encoding of a secret is recognised, in any mix: raw, percent-encoded (`%7E` or `%7e`,
//! `%20` or `+` for a space, `%25` for a re-encoded `%`), JSON-escaped (`\u007e`, `\/`, `\n`),
//! and base64 or base64url at any alignment, which covers the XOAUTH2 string (`user=...\x01auth=
//! Bearer <token>\x01\x01`) whatever its mailbox. A base64 run that contains a secret is removed
//! whole: the rest of it is part of the same credential.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};

/// What a secret is replaced with.
pub const REDACTED: &str = "<redacted>";

/// Shorter values are not scrubbed: they would match ordinary words (and no credential is this
/// short).
pub const MIN_SECRET_LEN: usize = 8;

/// Shortest base64 fragment searched for: below this a match may be chance.
const MIN_BASE64_CORE: usize = 8;

static REGISTRY: RwLock<Vec<(u64, Arc<Pattern>)>> = RwLock::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A secret known to the scrubber; dropping it forgets the secret.
#[derive(Debug)]
pub struct Registration {
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut all = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
        all.retain(|(id, _)| *id != self.id);
    }
}

/// Makes `value` known to [`scrub`] until the registration is dropped. Values shorter than
/// [`MIN_SECRET_LEN`] are not registered.
pub fn register(value: &str) -> Option<Registration> {
    let pattern = Pattern::text(value)?;
    Some(insert(pattern))
}

/// As [`register`] for binary secrets (a private key's DER): only their base64 forms can appear
/// in text.
pub fn register_bytes(value: &[u8]) -> Option<Registration> {
    if value.len() < MIN_SECRET_LEN {
        return None;
    }
    Some(insert(Pattern {
        chars: Vec::new(),
        cores: base64_cores(value),
    }))
}

fn insert(pattern: Pattern) -> Registration {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    REGISTRY
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .push((id, Arc::new(pattern)));
    Registration { id }
}

/// `text` with every encoding of every registered secret replaced by [`REDACTED`].
pub fn scrub(text: &str) -> String {
    scrub_with(text, &[])
}

/// As [`scrub`], also removing `extra` values (secrets of one request that are not registered).
pub fn scrub_with(text: &str, extra: &[&str]) -> String {
    let patterns: Vec<Arc<Pattern>> = REGISTRY
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(_, p)| p.clone())
        .collect();
    let extra: Vec<Pattern> = extra.iter().filter_map(|v| Pattern::text(v)).collect();
    let mut out = text.to_string();
    for p in patterns.iter().map(Arc::as_ref).chain(extra.iter()) {
        out = p.remove_from(&out);
    }
    out
}

/// One secret: its characters (for the raw, percent and JSON forms) and the fragments every
/// base64 or base64url encoding of it contains.
struct Pattern {
    chars: Vec<char>,
    cores: Vec<String>,
}

impl Pattern {
    fn text(value: &str) -> Option<Pattern> {
        if value.chars().count() < MIN_SECRET_LEN {
            return None;
        }
        let mut cores = base64_cores(value.as_bytes());
        // A body echoed after base64: the secret as the form carried it.
        let form: String = url::form_urlencoded::byte_serialize(value.as_bytes()).collect();
        if form != value {
            cores.extend(base64_cores(form.as_bytes()));
        }
        Some(Pattern {
            chars: value.chars().collect(),
            cores,
        })
    }

    fn remove_from(&self, text: &str) -> String {
        let mut out = self.remove_encoded(text);
        for core in &self.cores {
            if out.contains(core.as_str()) {
                out = remove_base64_runs(&out, core);
            }
        }
        out
    }

    /// Replaces every raw, percent-encoded or JSON-escaped occurrence.
    fn remove_encoded(&self, text: &str) -> String {
        let Some(first) = self.chars.first() else {
            return text.to_string();
        };
        let bytes = text.as_bytes();
        let mut first_utf8 = [0u8; 4];
        let lead = first.encode_utf8(&mut first_utf8).as_bytes()[0];
        let mut out = String::with_capacity(text.len());
        let mut copied = 0;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            let may_start = b == lead || b == b'%' || b == b'\\' || (b == b'+' && *first == ' ');
            if may_start
                && text.is_char_boundary(i)
                && let Some(end) = self.match_at(bytes, i)
                && text.is_char_boundary(end)
            {
                out.push_str(&text[copied..i]);
                out.push_str(REDACTED);
                copied = end;
                i = end;
                continue;
            }
            i += 1;
        }
        out.push_str(&text[copied..]);
        out
    }

    /// The end of the longest encoded occurrence starting at `start`. Every character may be
    /// written in any of its forms, so the set of positions reached is tracked (it stays tiny).
    fn match_at(&self, text: &[u8], start: usize) -> Option<usize> {
        let mut reached = vec![start];
        let mut next = Vec::new();
        for c in &self.chars {
            next.clear();
            for &pos in &reached {
                char_forms(text, pos, *c, &mut next);
            }
            next.sort_unstable();
            next.dedup();
            if next.is_empty() {
                return None;
            }
            std::mem::swap(&mut reached, &mut next);
        }
        reached.last().copied()
    }
}

/// Pushes the end of every form of `c` that starts at `pos`.
fn char_forms(text: &[u8], pos: usize, c: char, ends: &mut Vec<usize>) {
    let mut buf = [0u8; 4];
    let utf8 = c.encode_utf8(&mut buf).as_bytes();
    // Raw, or percent-encoded byte by byte (in any mix, `%25` for a re-encoded `%`).
    let mut reached = vec![pos];
    for &b in utf8 {
        let mut next = Vec::new();
        for &p in &reached {
            byte_forms(text, p, b, &mut next);
        }
        if next.is_empty() {
            reached.clear();
            break;
        }
        reached = next;
    }
    ends.extend(reached);
    // JSON: the short escapes, and \uXXXX (a surrogate pair beyond the BMP).
    let short = match c {
        '"' => Some(b'"'),
        '\\' => Some(b'\\'),
        '/' => Some(b'/'),
        '\n' => Some(b'n'),
        '\r' => Some(b'r'),
        '\t' => Some(b't'),
        '\u{8}' => Some(b'b'),
        '\u{c}' => Some(b'f'),
        _ => None,
    };
    if let Some(s) = short
        && text.get(pos..pos + 2) == Some(&[b'\\', s][..])
    {
        ends.push(pos + 2);
    }
    let mut units = [0u16; 2];
    let mut p = pos;
    for unit in c.encode_utf16(&mut units).iter() {
        match json_unit_at(text, p) {
            Some(u) if u == *unit => p += 6,
            _ => return,
        }
    }
    ends.push(p);
}

/// Pushes the end of every form of byte `b` at `pos`: itself, `%hh`, `%25hh`, `+` for a space.
fn byte_forms(text: &[u8], pos: usize, b: u8, ends: &mut Vec<usize>) {
    if text.get(pos) == Some(&b) {
        ends.push(pos + 1);
    }
    if b == b' ' && text.get(pos) == Some(&b'+') {
        ends.push(pos + 1);
    }
    // A form body encoded once more: the `+` that stood for a space became `%2B`.
    if b == b' ' && text.get(pos) == Some(&b'%') && hex_byte_at(text, pos + 1) == Some(b'+') {
        ends.push(pos + 3);
    }
    if text.get(pos) == Some(&b'%') {
        if hex_byte_at(text, pos + 1) == Some(b) {
            ends.push(pos + 3);
        }
        if hex_byte_at(text, pos + 1) == Some(b'%') && hex_byte_at(text, pos + 3) == Some(b) {
            ends.push(pos + 5);
        }
    }
}

/// Two hex digits (either case) at `pos`.
fn hex_byte_at(text: &[u8], pos: usize) -> Option<u8> {
    let digits = text.get(pos..pos + 2)?;
    let s = std::str::from_utf8(digits).ok()?;
    u8::from_str_radix(s, 16).ok()
}

/// A JSON `\uXXXX` escape (either case) at `pos`.
fn json_unit_at(text: &[u8], pos: usize) -> Option<u16> {
    if text.get(pos..pos + 2)? != b"\\u" {
        return None;
    }
    let s = std::str::from_utf8(text.get(pos + 2..pos + 6)?).ok()?;
    u16::from_str_radix(s, 16).ok()
}

/// The fragments that every base64 (and base64url) encoding of a text containing `value`
/// contains: for each of the three alignments, the characters made of `value`'s bits alone.
fn base64_cores(value: &[u8]) -> Vec<String> {
    let mut cores = Vec::new();
    for offset in 0..3usize {
        let mut padded = vec![0u8; offset];
        padded.extend_from_slice(value);
        let bits = padded.len() * 8;
        // Characters before this one carry bits of the (unknown) preceding bytes, characters
        // from `end` on carry bits of the (unknown) following ones.
        let begin = (offset * 8).div_ceil(6);
        let end = bits / 6;
        if end <= begin || end - begin < MIN_BASE64_CORE {
            continue;
        }
        for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            let encoded = engine.encode(&padded);
            let core = encoded[begin..end].to_string();
            if !cores.contains(&core) {
                cores.push(core);
            }
        }
    }
    cores
}

/// The characters of both alphabets; `=` only pads at the end.
fn is_base64_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_')
}

/// Replaces every run of base64 characters that contains `core` with [`REDACTED`].
fn remove_base64_runs(text: &str, core: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut from = 0;
    while let Some(found) = text[from..].find(core) {
        let at = from + found;
        let mut start = at;
        while start > copied && is_base64_char(bytes[start - 1]) {
            start -= 1;
        }
        let mut end = at + core.len();
        while end < bytes.len() && is_base64_char(bytes[end]) {
            end += 1;
        }
        while end < bytes.len() && bytes[end] == b'=' {
            end += 1;
        }
        out.push_str(&text[copied..start]);
        out.push_str(REDACTED);
        copied = end;
        from = end;
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};

    const SECRET: &str = "Q7r~ab cd.ef_gh-ij/kl+mn=\"op\"";

    fn encodings(secret: &str) -> Vec<(String, String)> {
        let form: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
        let pct20 = form.replace('+', "%20");
        let lower = {
            let mut s = String::new();
            let mut chars = pct20.chars().peekable();
            while let Some(c) = chars.next() {
                s.push(c);
                if c == '%' {
                    for _ in 0..2 {
                        if let Some(d) = chars.next() {
                            s.push(d.to_ascii_lowercase());
                        }
                    }
                }
            }
            s
        };
        let json = serde_json::to_string(secret).unwrap();
        let json = json[1..json.len() - 1].to_string();
        let json_u: String = secret
            .encode_utf16()
            .map(|u| format!("\\u{u:04x}"))
            .collect();
        let json_slash = json.replace('/', "\\/");
        let twice: String = url::form_urlencoded::byte_serialize(form.as_bytes()).collect();
        let mut v = vec![
            ("raw".into(), secret.to_string()),
            ("form".into(), form.clone()),
            ("form %20".into(), pct20),
            ("form lowercase".into(), lower),
            ("form twice".into(), twice),
            ("json".into(), json),
            ("json \\u".into(), json_u),
            ("json \\/".into(), json_slash),
            ("base64".into(), STANDARD.encode(secret)),
            ("base64url".into(), URL_SAFE.encode(secret)),
            ("base64 of form".into(), STANDARD.encode(&form)),
        ];
        for prefix in [
            "a",
            "ab",
            "abc",
            "user=relay@contoso.example\x01auth=Bearer ",
        ] {
            let framed = format!("{prefix}{secret}\x01\x01");
            v.push((format!("base64 after {prefix:?}"), STANDARD.encode(&framed)));
            v.push((
                format!("base64url after {prefix:?}"),
                URL_SAFE_NO_PAD.encode(&framed),
            ));
        }
        v
    }

    #[test]
    fn every_encoding_is_removed_and_the_rest_kept() {
        let _r = register(SECRET).unwrap();
        for (name, encoded) in encodings(SECRET) {
            let text = format!("before {encoded} after");
            let out = scrub(&text);
            assert_eq!(out, format!("before {REDACTED} after"), "{name}: {text}");
        }
    }

    #[test]
    fn a_base64_run_goes_whole_and_its_label_stays() {
        let value = "label-keeping-secret";
        let _r = register(value).unwrap();
        let text = format!(
            "line={} next=1",
            STANDARD.encode(format!("user=x\x01{value}"))
        );
        assert_eq!(scrub(&text), format!("line={REDACTED} next=1"));
    }

    #[test]
    fn unregistered_and_short_values_are_left_alone() {
        let text = "AADSTS7000215: Invalid client secret provided. Trace ID: 0b4f";
        assert_eq!(scrub(text), text);
        assert!(register("short").is_none());
        assert_eq!(
            scrub_with("x another-secret-value y", &["another-secret-value"]),
            format!("x {REDACTED} y")
        );
    }

    #[test]
    fn dropping_the_registration_forgets_the_secret() {
        let value = "forget-me-later-0123";
        let r = register(value).unwrap();
        assert_eq!(scrub(value), REDACTED);
        drop(r);
        assert_eq!(scrub(value), value);
    }

    #[test]
    fn binary_secrets_are_found_in_base64() {
        let der: Vec<u8> = (0u8..=255).collect();
        let _r = register_bytes(&der).unwrap();
        let b64 = STANDARD.encode(&der);
        assert_eq!(scrub(&format!("key {b64}.")), format!("key {REDACTED}."));
    }

    #[test]
    fn multibyte_secrets_and_text() {
        let secret = "Grüße-𝄞-geheim-0042";
        let _r = register(secret).unwrap();
        for (name, encoded) in encodings(secret) {
            let text = format!("ä {encoded} ö");
            assert_eq!(scrub(&text), format!("ä {REDACTED} ö"), "{name}");
        }
    }
}
