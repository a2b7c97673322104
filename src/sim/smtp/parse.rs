//! Argument and header parsers of the simulated server (its own, not the relay's).

use super::*;

/// `FROM:<addr> params` / `TO:<addr> params` → (addr, params). Tolerates a space after the colon.
pub(super) fn parse_path(args: &str, keyword: &str) -> Option<(String, String)> {
    // `get` rather than slicing: a non-ASCII argument must not split a character.
    if !args.get(..keyword.len())?.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = args.get(keyword.len()..)?.trim_start();
    let rest = rest.strip_prefix('<')?;
    let end = rest.find('>')?;
    let address = rest[..end].trim().to_string();
    // A source route (`@a,@b:user@x`) is legal but obsolete; keep only the mailbox.
    let address = match address.rsplit_once(':') {
        Some((route, addr)) if route.starts_with('@') => addr.to_string(),
        _ => address,
    };
    Some((address, rest[end + 1..].trim().to_string()))
}

/// `BDAT <size> [LAST]`.
pub(super) fn parse_bdat(args: &str) -> Option<(usize, bool)> {
    let mut parts = args.split_whitespace();
    let size = parts.next()?.parse().ok()?;
    let last = match parts.next() {
        None => false,
        Some(l) if l.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some((size, last))
}

pub(super) fn has_bare_lf(data: &[u8]) -> bool {
    data.iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || data[i - 1] != b'\r'))
}

/// Unfolded header fields (name, value) up to the first empty line.
pub(super) fn parse_headers(message: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(message);
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = out.last_mut() {
                v.push_str(line);
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            out.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    out
}

/// The address in a From value: inside `<...>`, else the bare addr-spec.
pub(super) fn extract_address(value: &str) -> Option<String> {
    if let (Some(start), Some(end)) = (value.rfind('<'), value.rfind('>'))
        && start < end
    {
        return Some(value[start + 1..end].trim().to_string());
    }
    let bare = value.split(',').next()?.trim();
    bare.contains('@').then(|| bare.to_string())
}

/// The hex diagnostic blob Exchange appends to storage-driver errors (kilobytes in real life).
pub(super) fn diagnostic_blob(len: usize) -> String {
    let mut s = String::with_capacity(len + 32);
    while s.len() < len {
        s.push_str(&upper_hex(32));
    }
    s.truncate(len);
    format!("{s}[EndDiagnosticData]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            parse_path("FROM:<a@b.c> SIZE=10", "FROM:"),
            Some(("a@b.c".into(), "SIZE=10".into()))
        );
        assert_eq!(
            parse_path("from: <>", "FROM:"),
            Some((String::new(), String::new()))
        );
        assert_eq!(
            parse_path("TO:<@r:x@y>", "TO:"),
            Some(("x@y".into(), String::new()))
        );
        assert_eq!(parse_path("FROM:a@b", "FROM:"), None);
        assert_eq!(parse_path("FRÖM:<a@b>", "FROM:"), None);
        assert_eq!(parse_path("TO", "TO:"), None);
    }

    #[test]
    fn headers_and_from() {
        let m = b"From: \"A, B\" <a@b.c>\r\nSubject: x\r\n  y\r\n\r\nFrom: body@x\r\n";
        let h = parse_headers(m);
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].1, "x  y");
        assert_eq!(extract_address(&h[0].1).as_deref(), Some("a@b.c"));
        assert_eq!(extract_address("plain@x.y").as_deref(), Some("plain@x.y"));
    }

    #[test]
    fn bare_lf() {
        assert!(!has_bare_lf(b"a\r\nb\r\n"));
        assert!(has_bare_lf(b"a\nb\r\n"));
        assert!(has_bare_lf(b"\n"));
    }

    #[test]
    fn bdat_args() {
        assert_eq!(parse_bdat("10 LAST"), Some((10, true)));
        assert_eq!(parse_bdat("10"), Some((10, false)));
        assert_eq!(parse_bdat("x"), None);
        assert_eq!(parse_bdat("1 LAST x"), None);
    }
}
