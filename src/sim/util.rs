//! Small helpers: clock formatting in the shapes Microsoft uses, random ids, base64url.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;

/// Seconds since the Unix epoch (0 if the clock is before 1970, which only a broken host has).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn unix_now_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Broken-down UTC time: (year, month 1-12, day, hour, minute, second, weekday 0=Sunday).
fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days_from_civil inverse; avoids a date crate for three format strings.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = if m <= 2 { y + 1 } else { y };
    let weekday = ((days + 4).rem_euclid(7)) as u32; // 1970-01-01 was a Thursday
    (
        year,
        m,
        d,
        (rem / 3600) as u32,
        ((rem % 3600) / 60) as u32,
        (rem % 60) as u32,
        weekday,
    )
}

/// `2016-01-09 02:02:12Z`, the Entra `timestamp` shape (space, not `T`).
pub fn entra_timestamp() -> String {
    let (y, mo, d, h, mi, s, _) = civil(unix_now());
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}Z")
}

/// `2023-09-12T20:59:57.214Z`, the shape in Exchange's diagnostic suffixes.
pub fn iso_millis() -> String {
    let ms = unix_now_millis();
    let (y, mo, d, h, mi, s, _) = civil((ms / 1000) as u64);
    format!(
        "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z",
        ms % 1000
    )
}

/// `Sun, 23 Nov 2025 11:12:20 +0000`, the banner date.
pub fn rfc2822_now() -> String {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (y, mo, d, h, mi, s, wd) = civil(unix_now());
    format!(
        "{}, {d:02} {} {y:04} {h:02}:{mi:02}:{s:02} +0000",
        DAYS[wd as usize % 7],
        MONTHS[(mo as usize + 11) % 12]
    )
}

/// 128 random bits (two ULIDs' random parts; the crate is already a dependency).
fn random_u128() -> u128 {
    let a = ulid::Ulid::generate().random();
    let b = ulid::Ulid::generate().random();
    (a << 48) ^ b
}

/// A random lowercase GUID string.
pub fn guid() -> String {
    let v = random_u128();
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// `n` random uppercase hex digits (n <= 32).
pub fn upper_hex(n: usize) -> String {
    let h = format!("{:032X}", random_u128());
    h[..n.min(32)].to_string()
}

pub fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Whether `s` looks like a GUID (8-4-4-4-12 hex).
pub fn is_guid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_known_dates() {
        // 2025-11-23 11:12:20 UTC, a Sunday (the recorded banner).
        assert_eq!(civil(1_763_896_340), (2025, 11, 23, 11, 12, 20, 0));
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0, 4));
        assert_eq!(civil(951_782_400), (2000, 2, 29, 0, 0, 0, 2));
    }

    #[test]
    fn guid_shape() {
        assert!(is_guid(&guid()));
        assert!(!is_guid("contoso.onmicrosoft.com"));
    }
}
