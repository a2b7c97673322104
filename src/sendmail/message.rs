//! From what a caller pipes into sendmail to an envelope and a message: the end of input
//! (`.` unless `-i`), recipients from the header (`-t`), Bcc removed, From, Date and
//! Message-ID added when missing, local names resolved ([`Names`]).

use std::collections::BTreeMap;

use crate::config::AliasTarget;
use crate::headers::{HeaderName, Headers};

/// How local names become addresses: `[sendmail] aliases` and `default_domain`.
#[derive(Debug, Clone, Default)]
pub struct Names {
    pub default_domain: Option<String>,
    /// Keys in lower case.
    pub aliases: BTreeMap<String, Vec<String>>,
    /// Domains that mean "this machine" (`root@localhost`, `root@<hostname>` as mdadm writes):
    /// their local part goes through the aliases like a bare name.
    pub local_domains: Vec<String>,
    /// Qualifies a bare sender when there is no default_domain (Postfix's `$myhostname`).
    pub hostname: String,
}

impl Names {
    pub fn new(
        default_domain: Option<String>,
        aliases: &BTreeMap<String, AliasTarget>,
        hostname: String,
        mut local_domains: Vec<String>,
    ) -> Names {
        local_domains.extend(["localhost".to_string(), "localhost.localdomain".to_string()]);
        local_domains.retain(|d| !d.is_empty());
        for d in &mut local_domains {
            d.make_ascii_lowercase();
        }
        Names {
            default_domain,
            aliases: aliases
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.addresses().to_vec()))
                .collect(),
            local_domains,
            hostname,
        }
    }

    /// The local name of a bare or machine-local address (`root`, `root@localhost`).
    fn local_part<'a>(&self, address: &'a str) -> Option<&'a str> {
        match address.rsplit_once('@') {
            None => Some(address),
            Some((local, domain))
                if self
                    .local_domains
                    .iter()
                    .any(|d| d.eq_ignore_ascii_case(domain)) =>
            {
                Some(local)
            }
            Some(_) => None,
        }
    }

    /// The addresses a recipient stands for: an alias (or `"*"`), else the name qualified
    /// with default_domain, else the address as given. `Err` for a bare name nothing maps.
    pub fn recipient(&self, address: &str) -> Result<Vec<String>, String> {
        let Some(local) = self.local_part(address) else {
            return Ok(vec![address.to_string()]);
        };
        let key = local.to_ascii_lowercase();
        if let Some(targets) = self.aliases.get(&key).or_else(|| self.aliases.get("*")) {
            return Ok(targets.clone());
        }
        match (&self.default_domain, address.contains('@')) {
            (Some(d), _) => Ok(vec![format!("{local}@{d}")]),
            // root@localhost without an alias or default_domain: left as it is.
            (None, true) => Ok(vec![address.to_string()]),
            (None, false) => Err(format!(
                "recipient `{address}` has no domain: set [sendmail] default_domain or an alias \
                 for it in relay.toml"
            )),
        }
    }

    /// The envelope sender: a bare name qualified with default_domain (else the hostname).
    pub fn sender(&self, address: &str) -> String {
        if address.is_empty() || address.contains('@') {
            return address.to_string();
        }
        let domain = self.default_domain.as_deref().unwrap_or(&self.hostname);
        format!("{address}@{domain}")
    }
}

/// The input up to a line holding a lone `.` (Postfix's default without `-i`), exclusive.
pub fn cut_at_dot(input: &mut Vec<u8>) {
    let mut start = 0;
    while start < input.len() {
        let end = input[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(input.len(), |p| start + p);
        let line = &input[start..end];
        if line == b"." || line == b".\r" {
            input.truncate(start);
            return;
        }
        start = end + 1;
    }
}

/// Whether the input starts with a header field (`Name: ...`); if not, all of it is body.
fn starts_with_header(input: &[u8]) -> bool {
    let line_end = input
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(input.len());
    let line = &input[..line_end];
    match line.iter().position(|&b| b == b':') {
        Some(colon) if colon > 0 => line[..colon].iter().all(|&b| (33..=126).contains(&b)),
        _ => false,
    }
}

/// The message as sendmail prepared it.
#[derive(Debug)]
pub struct Prepared {
    pub message: Vec<u8>,
    /// Header recipients (`-t`), as written (names not yet resolved).
    pub header_recipients: Vec<String>,
    /// Whether the caller's message carried a From.
    pub had_from: bool,
}

/// What sendmail adds to a message that lacks it.
pub struct Additions<'a> {
    /// `From:` value when missing, e.g. `CronDaemon <root@example.com>`.
    pub from: &'a str,
    pub date: &'a str,
    pub message_id: &'a str,
}

/// Removes Bcc and Resent-Bcc (their addresses stay recipients: `-t` read them first), adds
/// From, Date and Message-ID when missing, and with `extract` lists the header recipients.
pub fn prepare(mut input: Vec<u8>, extract: bool, add: &Additions<'_>) -> Prepared {
    // An mbox "From " line before the header is the old Unix envelope, not a field.
    if input.starts_with(b"From ") {
        let end = input
            .iter()
            .position(|&b| b == b'\n')
            .map_or(input.len(), |p| p + 1);
        input.drain(..end);
    }
    if !starts_with_header(&input) {
        // No header at all (binary garbage, a bare text): everything is body.
        let mut message = Vec::with_capacity(input.len() + 256);
        message.extend_from_slice(added_fields(&Headers::parse(b"\n"), add, "\n").as_bytes());
        message.extend_from_slice(b"\n");
        message.extend_from_slice(&input);
        return Prepared {
            message,
            header_recipients: Vec::new(),
            had_from: false,
        };
    }
    let headers = Headers::parse(&input);
    let section_len = headers.section().len();
    let eol = if headers.section().windows(2).any(|w| w == b"\r\n") {
        "\r\n"
    } else {
        "\n"
    };
    let mut header_recipients = Vec::new();
    if extract {
        let resent = headers.has(&HeaderName::ResentTo)
            || headers.has(&HeaderName::ResentCc)
            || headers.has(&HeaderName::ResentBcc);
        let names = if resent {
            [
                HeaderName::ResentTo,
                HeaderName::ResentCc,
                HeaderName::ResentBcc,
            ]
        } else {
            [HeaderName::To, HeaderName::Cc, HeaderName::Bcc]
        };
        for name in &names {
            for field in headers.fields_named(name) {
                header_recipients.extend(field_addresses(&field));
            }
        }
    }
    let mut cut: Vec<(usize, usize)> = [HeaderName::Bcc, HeaderName::ResentBcc]
        .iter()
        .flat_map(|n| headers.fields_named(n))
        .map(|f| (f.start(), f.end()))
        .collect();
    cut.sort();
    let had_from = headers.has(&HeaderName::From);
    let added = added_fields(&headers, add, eol);
    let mut message = Vec::with_capacity(input.len() + added.len());
    let mut at = 0;
    for (start, end) in cut {
        if start >= at {
            message.extend_from_slice(&input[at..start]);
            at = end;
        }
    }
    message.extend_from_slice(&input[at..section_len]);
    // A section that does not end its last line (header-only input without a newline).
    if !message.is_empty() && !message.ends_with(b"\n") {
        message.extend_from_slice(eol.as_bytes());
    }
    message.extend_from_slice(added.as_bytes());
    if headers.complete() {
        message.extend_from_slice(&input[section_len..]);
    } else {
        // Header only: the empty line that ends the section.
        message.extend_from_slice(eol.as_bytes());
    }
    Prepared {
        message,
        header_recipients,
        had_from,
    }
}

fn added_fields(headers: &Headers<'_>, add: &Additions<'_>, eol: &str) -> String {
    let mut out = String::new();
    if !headers.has(&HeaderName::From) {
        out.push_str(&format!("From: {}{eol}", add.from));
    }
    if !headers.has(&HeaderName::Date) {
        out.push_str(&format!("Date: {}{eol}", add.date));
    }
    if !headers.has(&HeaderName::MessageId) {
        out.push_str(&format!("Message-ID: {}{eol}", add.message_id));
    }
    out
}

/// Every address of a To/Cc/Bcc field, a lone word (`root`) included as a bare name.
fn field_addresses(field: &crate::headers::Field<'_, '_>) -> Vec<String> {
    if let Some(list) = field.mailboxes() {
        return list
            .iter()
            .filter_map(|m| match (&m.address, &m.name) {
                (Some(a), _) => Some(a.to_string()),
                (None, Some(crate::headers::DisplayName::Phrase(p)))
                    if !p.is_empty()
                        && p.iter()
                            .all(|&b| b.is_ascii_graphic() && !b"<>,\"".contains(&b)) =>
                {
                    Some(String::from_utf8_lossy(p).into_owned())
                }
                _ => None,
            })
            .collect();
    }
    field
        .addresses()
        .into_iter()
        .flatten()
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADD: Additions<'static> = Additions {
        from: "root@example.com",
        date: "Thu, 01 Jan 1970 00:00:00 +0000",
        message_id: "<x@example.com>",
    };

    #[test]
    fn dots_end_input_unless_told() {
        let mut v = b"a\n.\nb\n".to_vec();
        cut_at_dot(&mut v);
        assert_eq!(v, b"a\n");
        let mut v = b"a\n..\n.x\n".to_vec();
        cut_at_dot(&mut v);
        assert_eq!(v, b"a\n..\n.x\n");
    }

    #[test]
    fn recipients_from_every_field_and_bcc_removed() {
        let input = b"To: root, Alice <alice@example.com>\nCc: bob@example.com\nBcc: secret@example.com,\n hidden@example.com\nSubject: s\n\nbody\n";
        let p = prepare(input.to_vec(), true, &ADD);
        assert_eq!(
            p.header_recipients,
            [
                "root",
                "alice@example.com",
                "bob@example.com",
                "secret@example.com",
                "hidden@example.com"
            ]
        );
        let text = String::from_utf8(p.message).unwrap();
        assert!(
            !text.contains("Bcc") && !text.contains("secret") && !text.contains("hidden"),
            "{text}"
        );
        assert!(
            text.contains("Subject: s\nFrom: root@example.com\nDate: "),
            "{text}"
        );
        assert!(text.ends_with("\n\nbody\n"), "{text}");
    }

    #[test]
    fn resent_fields_win_with_t() {
        let input = b"To: a@example.com\nResent-To: b@example.com\n\nx\n";
        assert_eq!(
            prepare(input.to_vec(), true, &ADD).header_recipients,
            ["b@example.com"]
        );
    }

    #[test]
    fn garbage_and_header_only() {
        let p = prepare(b"\x00\x01\xff binary\n".to_vec(), true, &ADD);
        assert!(p.header_recipients.is_empty());
        assert!(p.message.starts_with(b"From: root@example.com\nDate:"));
        assert!(p.message.ends_with(b"\n\n\x00\x01\xff binary\n"));
        let p = prepare(b"Subject: only".to_vec(), false, &ADD);
        let text = String::from_utf8(p.message).unwrap();
        assert!(text.starts_with("Subject: only\nFrom: "), "{text}");
        assert!(text.ends_with(">\n\n"), "{text}");
    }

    #[test]
    fn names_resolve_through_aliases_then_the_default_domain() {
        let mut aliases = BTreeMap::new();
        aliases.insert(
            "root".to_string(),
            AliasTarget::One("admin@example.com".into()),
        );
        let n = Names::new(
            Some("example.com".into()),
            &aliases,
            "host".into(),
            vec!["host.lan".into()],
        );
        assert_eq!(n.recipient("ROOT").unwrap(), ["admin@example.com"]);
        assert_eq!(n.recipient("root@host.lan").unwrap(), ["admin@example.com"]);
        assert_eq!(n.recipient("www-data").unwrap(), ["www-data@example.com"]);
        assert_eq!(n.recipient("x@other.org").unwrap(), ["x@other.org"]);
        assert_eq!(n.sender("root"), "root@example.com");
        aliases.insert(
            "*".to_string(),
            AliasTarget::Many(vec!["ops@example.com".into()]),
        );
        let n = Names::new(None, &aliases, "host".into(), vec![]);
        assert_eq!(n.recipient("www-data").unwrap(), ["ops@example.com"]);
        let bare = Names::new(None, &BTreeMap::new(), "host".into(), vec![]);
        assert!(
            bare.recipient("root")
                .unwrap_err()
                .contains("default_domain")
        );
        assert_eq!(bare.sender("root"), "root@host");
    }
}
