//! Upstream SMTP replies, parsed from the raw lines so the enhanced status code keeps all of
//! its digits (mail-send stores the detail in a `u8`, which turns `4.7.500` into `4.7.255`).

use std::fmt;

/// Enhanced status code (RFC 3463): class.subject.detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enhanced {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl Enhanced {
    pub const fn new(class: u8, subject: u16, detail: u16) -> Enhanced {
        Enhanced {
            class,
            subject,
            detail,
        }
    }

    fn parse(word: &str) -> Option<Enhanced> {
        let mut parts = word.split('.');
        let class: u8 = parts.next()?.parse().ok()?;
        let subject: u16 = parts.next()?.parse().ok()?;
        let detail: u16 = parts.next()?.parse().ok()?;
        if parts.next().is_some() || !matches!(class, 2 | 4 | 5) {
            return None;
        }
        Some(Enhanced::new(class, subject, detail))
    }
}

impl fmt::Display for Enhanced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// One complete (possibly multi-line) reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamReply {
    pub code: u16,
    pub enhanced: Option<Enhanced>,
    /// The text of all lines joined with a space, enhanced code removed from the first.
    pub text: String,
}

/// Exchange appends diagnostic blobs of several kilobytes to some replies; logs and the spool
/// keep this much.
const MAX_TEXT: usize = 512;

impl UpstreamReply {
    /// Parses reply lines (without CRLF). Returns `None` for anything that is not an SMTP reply.
    pub fn parse(lines: &[String]) -> Option<UpstreamReply> {
        let first = lines.first()?;
        let code = parse_code(first)?;
        let mut text = String::new();
        let mut enhanced = None;
        for (i, line) in lines.iter().enumerate() {
            if parse_code(line)? != code {
                return None;
            }
            let rest = line.get(4..).unwrap_or("").trim();
            let rest = if i == 0 {
                match rest.split_once(' ').map_or((rest, ""), |(w, r)| (w, r)) {
                    (word, r) if Enhanced::parse(word).is_some() => {
                        enhanced = Enhanced::parse(word);
                        r
                    }
                    _ => rest,
                }
            } else {
                rest
            };
            if !text.is_empty() && !rest.is_empty() {
                text.push(' ');
            }
            text.push_str(rest);
        }
        // An upstream may echo what it was sent (the AUTH line): no secret is kept, and it is
        // removed before the text is cut so that no piece of one remains.
        let mut text = crate::redact::scrub(&text);
        // A class digit that disagrees with the basic code is ignored (RFC 3463 §2).
        if enhanced.is_some_and(|e| u16::from(e.class) != code / 100) {
            enhanced = None;
        }
        if text.len() > MAX_TEXT {
            let mut cut = MAX_TEXT;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        Some(UpstreamReply {
            code,
            enhanced,
            text,
        })
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    pub fn has(&self, code: u16, enhanced: Enhanced) -> bool {
        self.code == code && self.enhanced == Some(enhanced)
    }

    /// The id the server gave the message, when its reply names one: Postfix-style
    /// `queued as X`, else the first `<...>` (Exchange: `250 2.0.0 OK <id@host> [Hostname=...]`).
    pub fn queue_id(&self) -> Option<String> {
        let clean = |s: &str| {
            s.trim_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        };
        if let Some(pos) = self.text.find("queued as ") {
            let word = self.text[pos + "queued as ".len()..]
                .split_whitespace()
                .next()?;
            return Some(clean(word)).filter(|w| !w.is_empty());
        }
        let start = self.text.find('<')?;
        let end = start + self.text[start..].find('>')?;
        Some(self.text[start + 1..end].to_string()).filter(|w| !w.is_empty())
    }
}

impl fmt::Display for UpstreamReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.enhanced {
            Some(e) => write!(f, "{} {} {}", self.code, e, self.text),
            None => write!(f, "{} {}", self.code, self.text),
        }
    }
}

fn parse_code(line: &str) -> Option<u16> {
    let bytes = line.as_bytes();
    if bytes.len() < 3 || !bytes[..3].iter().all(u8::is_ascii_digit) {
        return None;
    }
    if bytes.len() > 3 && bytes[3] != b' ' && bytes[3] != b'-' {
        return None;
    }
    let code: u16 = line[..3].parse().ok()?;
    (200..600).contains(&code).then_some(code)
}

/// True if `line` is the last line of a reply (`250 ...` rather than `250-...`).
pub fn is_last_line(line: &str) -> bool {
    line.as_bytes().get(3) != Some(&b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(lines: &[&str]) -> UpstreamReply {
        let lines: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
        UpstreamReply::parse(&lines).expect("parses")
    }

    #[test]
    fn keeps_three_digit_details() {
        let r =
            parse(&["451 4.7.500 Server busy. Please try again later from [1.2.3.4]. (S77719)"]);
        assert_eq!(r.code, 451);
        assert_eq!(r.enhanced, Some(Enhanced::new(4, 7, 500)));
        assert!(r.text.starts_with("Server busy."));
    }

    #[test]
    fn multiline_and_missing_enhanced_codes() {
        let r = parse(&["250-host Hello", "250-SIZE 157286400", "250 SMTPUTF8"]);
        assert_eq!(r.enhanced, None);
        assert_eq!(r.text, "host Hello SIZE 157286400 SMTPUTF8");
        let r = parse(&["354 Start mail input; end with <CRLF>.<CRLF>"]);
        assert_eq!((r.code, r.enhanced), (354, None));
        assert!(UpstreamReply::parse(&["hello".to_string()]).is_none());
        assert!(UpstreamReply::parse(&["250 ok".into(), "251 other".into()]).is_none());
    }

    #[test]
    fn queue_ids() {
        let r = parse(&["250 2.0.0 OK <AB12@SA1PR.prod.outlook.com> [Hostname=SA1PR]"]);
        assert_eq!(r.queue_id().as_deref(), Some("AB12@SA1PR.prod.outlook.com"));
        let r = parse(&["250 2.0.0 Ok: queued as 4F3A21C0B9."]);
        assert_eq!(r.queue_id().as_deref(), Some("4F3A21C0B9"));
        let r = parse(&["451 4.7.0 Temporary server error. Please try again later. PRX4 [x]"]);
        assert_eq!(r.queue_id(), None);
    }

    #[test]
    fn mismatched_class_is_dropped_and_long_text_cut() {
        let r = parse(&["550 4.7.1 odd"]);
        assert_eq!(r.enhanced, None);
        let long = format!("554 5.2.252 SendAsDenied; {}", "AB".repeat(3000));
        let r = parse(&[&long]);
        assert!(r.text.len() <= MAX_TEXT + 3);
    }
}
