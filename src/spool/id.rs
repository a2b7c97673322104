//! Message ids: ULIDs (26 Crockford base32 characters, time-sortable).

use std::sync::Mutex;

/// Length of a message id.
pub const ID_LEN: usize = 26;

/// True if `s` is a canonical (upper-case) ULID string. Only such strings are ever used to build
/// a path, so an operator-supplied id can never escape the spool directory.
pub fn is_valid_id(s: &str) -> bool {
    s.len() == ID_LEN
        && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'H' | b'J' | b'K' | b'M' | b'N' | b'P'..=b'T' | b'V'..=b'Z'))
        // The first character carries only 3 bits (a 128-bit value).
        && s.as_bytes()[0] <= b'7'
}

/// Normalise an operator-supplied id (accepting lower case) or refuse it.
pub fn normalize_id(s: &str) -> Option<String> {
    let up = s.to_ascii_uppercase();
    is_valid_id(&up).then_some(up)
}

/// Monotonic ULID source: ids from one process sort in arrival order even within a millisecond.
pub(crate) struct IdGenerator(Mutex<ulid::Generator>);

impl IdGenerator {
    pub(crate) fn new() -> IdGenerator {
        IdGenerator(Mutex::new(ulid::Generator::new()))
    }

    pub(crate) fn next(&self) -> String {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match g.generate() {
            Ok(u) => u.to_string(),
            // 2^80 ids in one millisecond cannot happen; fall back to a random one anyway.
            Err(_) => ulid::Ulid::generate().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let g = IdGenerator::new();
        let a = g.next();
        let b = g.next();
        assert!(is_valid_id(&a) && is_valid_id(&b));
        assert!(a < b);
        assert_eq!(normalize_id(&a.to_ascii_lowercase()), Some(a.clone()));
        for bad in [
            "",
            "../x",
            "../../../../../../../etc/passwd",
            "01JDQ6Z8X1V3K5M7N9P0R2S4T",   // 25
            "01JDQ6Z8X1V3K5M7N9P0R2S4T66", // 27
            "01JDQ6Z8X1V3K5M7N9P0R2S4TI",  // I
            "01JDQ6Z8X1V3K5M7N9P0R2S4TU",  // U
            "81JDQ6Z8X1V3K5M7N9P0R2S4T6",  // overflow
            "01JDQ6Z8X1V3K5M7N9P0R2S4/6",
        ] {
            assert!(normalize_id(bad).is_none(), "{bad}");
        }
    }
}
