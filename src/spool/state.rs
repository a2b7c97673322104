//! Mutable delivery state: `state/<ID>.json`, rewritten (tmp + fsync + rename) only when it
//! changes. Absent means "fresh, never attempted".
//!
//! A state file that cannot be read is a [`StateProblem`], never a reason to hide its message:
//! an unreadable one (empty, truncated, not JSON) is reset by the deliverer (the message itself
//! is intact); one of a newer version is left alone and its message held, since guessing what a
//! newer relay recorded could send it twice or never.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// Version of the state file format. 2: replies are recorded as data (code, enhanced code,
/// text); version 1 files (replies as one string) are still read.
pub const STATE_VERSION: u32 = 2;
/// The oldest version this relay reads.
const OLDEST_VERSION: u32 = 1;

/// A reply as recorded: the upstream's code, enhanced status code and text, kept apart from
/// the wire to the state file, `queue list`, the logs and the failure notice's `Status:`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordedReply {
    /// The basic code; `None` when nobody answered (the text then says what happened).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    /// `5.1.10` (RFC 3463), when the reply had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enhanced: Option<String>,
    pub text: String,
    /// Where in the session it came, when that is not the recipient's own answer (RCPT TO or
    /// the final dot): `MailFrom`, `Auth`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
}

impl RecordedReply {
    /// What the relay itself says when the upstream never answered.
    pub fn local(text: impl Into<String>) -> RecordedReply {
        RecordedReply {
            code: None,
            enhanced: None,
            text: text.into(),
            stage: None,
        }
    }

    /// A reply written as one line (`451 4.7.500 Server busy`), as version 1 files recorded
    /// them; anything else is kept as the relay's own text.
    pub fn from_line(line: &str) -> RecordedReply {
        let mut words = line.splitn(2, ' ');
        let first = words.next().unwrap_or("");
        let rest = words.next().unwrap_or("");
        let code = (first.len() == 3 && first.bytes().all(|b| b.is_ascii_digit()))
            .then(|| first.parse::<u16>().ok())
            .flatten();
        let Some(code) = code else {
            return RecordedReply::local(line);
        };
        let (enhanced, text) = match rest.split_once(' ').unwrap_or((rest, "")) {
            (word, text) if is_enhanced(word, code) => (Some(word.to_string()), text),
            _ => (None, rest),
        };
        RecordedReply {
            code: Some(code),
            enhanced,
            text: text.to_string(),
            stage: None,
        }
    }

    /// A 5xx reply.
    pub fn is_permanent(&self) -> bool {
        self.code.is_some_and(|c| c >= 500)
    }
}

fn is_enhanced(word: &str, code: u16) -> bool {
    let parts: Vec<&str> = word.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && parts[0] == (code / 100).to_string()
}

impl std::fmt::Display for RecordedReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(code) = self.code else {
            return f.write_str(&self.text);
        };
        if let Some(stage) = &self.stage {
            write!(f, "{stage}: upstream replied ")?;
        }
        match &self.enhanced {
            Some(e) => write!(f, "{code} {e} {}", self.text),
            None => write!(f, "{code} {}", self.text),
        }
    }
}

/// Test literals and version 1 files: a reply written as one line.
impl From<&str> for RecordedReply {
    fn from(line: &str) -> RecordedReply {
        RecordedReply::from_line(line)
    }
}

impl<'de> Deserialize<'de> for RecordedReply {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RecordedReply, D::Error> {
        #[derive(Deserialize)]
        struct Fields {
            #[serde(default)]
            code: Option<u16>,
            #[serde(default)]
            enhanced: Option<String>,
            text: String,
            #[serde(default)]
            stage: Option<String>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Line(String),
            Fields(Fields),
        }
        Ok(match Either::deserialize(d)? {
            Either::Line(line) => RecordedReply::from_line(&line),
            Either::Fields(f) => RecordedReply {
                code: f.code,
                enhanced: f.enhanced,
                text: f.text,
                stage: f.stage,
            },
        })
    }
}

/// Per-recipient delivery status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientStatus {
    #[default]
    Pending,
    Delivered,
    Failed,
}

/// Delivery status of one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RecipientState {
    pub address: String,
    pub status: RecipientStatus,
    /// Last upstream reply for this recipient (e.g. `550 5.1.10 ...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<RecordedReply>,
}

/// An attempt sent the whole message, final dot included, and then got no reply (dropped
/// connection, timeout) or a 4xx: Exchange may have accepted it anyway, so the retry may give the
/// recipients a second copy (delivery is at-least-once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PossibleDuplicate {
    /// When the final dot of the first such attempt was sent.
    #[serde(with = "humantime_serde")]
    pub first_dot_at: SystemTime,
    /// Attempts that ended this way.
    pub attempts: u32,
    /// What followed the final dot the last time (the 4xx, or why there was no reply).
    pub after_dot: String,
    /// The upstream's queue id, when its reply named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_id: Option<String>,
}

/// The mutable delivery state of one message.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DeliveryState {
    pub attempts: u32,
    #[serde(default, with = "humantime_serde")]
    pub next_attempt: Option<SystemTime>,
    #[serde(default)]
    pub last_reply: Option<RecordedReply>,
    #[serde(default)]
    pub hold_reason: Option<String>,
    #[serde(default)]
    pub fail_reason: Option<String>,
    #[serde(default)]
    pub recipients: Vec<RecipientState>,
    /// Set once an attempt may have delivered without the relay knowing (see the type).
    /// Optional and ignored by older readers: the format version stays 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub possible_duplicate: Option<PossibleDuplicate>,
}

/// Why a state file could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateProblem {
    /// Empty, truncated or not the expected JSON: what was recorded is lost.
    #[error("unreadable delivery state: {0}")]
    Unreadable(String),
    /// Written by a newer relay: this one does not know what it says.
    #[error("delivery state version {0} is newer than this relay reads ({STATE_VERSION})")]
    NewerVersion(u32),
}

/// On-disk wrapper carrying the version.
#[derive(Serialize, Deserialize)]
pub(crate) struct StateFile {
    pub(crate) version: u32,
    #[serde(flatten)]
    pub(crate) state: DeliveryState,
}

pub(crate) fn encode(st: &DeliveryState) -> Vec<u8> {
    let mut v = serde_json::to_vec_pretty(&StateFile {
        version: STATE_VERSION,
        state: st.clone(),
    })
    .expect("DeliveryState serialises");
    v.push(b'\n');
    v
}

pub(crate) fn decode(bytes: &[u8]) -> Result<DeliveryState, StateProblem> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(StateProblem::Unreadable("empty file".into()));
    }
    // The version first: a newer file whose fields this code cannot parse is still "newer",
    // not "unreadable" (which would reset it).
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let unreadable = |e: serde_json::Error| StateProblem::Unreadable(e.to_string());
    let v: Version = serde_json::from_slice(bytes).map_err(unreadable)?;
    if v.version > STATE_VERSION {
        return Err(StateProblem::NewerVersion(v.version));
    }
    if v.version < OLDEST_VERSION {
        return Err(StateProblem::Unreadable(format!(
            "version {} was never written by any relay",
            v.version
        )));
    }
    let f: StateFile = serde_json::from_slice(bytes).map_err(unreadable)?;
    Ok(f.state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn round_trip_and_version() {
        let st = DeliveryState {
            attempts: 3,
            next_attempt: Some(UNIX_EPOCH + Duration::from_secs(1_764_441_240)),
            last_reply: Some("451 4.7.500 Server busy".into()),
            hold_reason: None,
            fail_reason: None,
            recipients: vec![
                RecipientState {
                    address: "a@example.com".into(),
                    status: RecipientStatus::Delivered,
                    reply: Some("250 2.0.0 OK".into()),
                },
                RecipientState {
                    address: "b@example.com".into(),
                    status: RecipientStatus::Pending,
                    reply: None,
                },
            ],
            possible_duplicate: None,
        };
        let bytes = encode(&st);
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.contains("\"version\": 2"), "{text}");
        assert!(
            text.contains("\"code\": 451") && text.contains("\"enhanced\": \"4.7.500\""),
            "replies are data: {text}"
        );
        assert!(
            text.contains("\"next_attempt\": \"2025-11-29T18:34:00Z\""),
            "{text}"
        );
        assert!(text.contains("\"status\": \"delivered\""), "{text}");
        assert_eq!(decode(&bytes).unwrap(), st);
        let v3 = text.replace("\"version\": 2", "\"version\": 3");
        assert_eq!(decode(v3.as_bytes()), Err(StateProblem::NewerVersion(3)));
        // A newer version stays "newer" even when its fields changed shape.
        assert_eq!(
            decode(b"{\"version\": 7, \"attempts\": \"many\"}"),
            Err(StateProblem::NewerVersion(7))
        );
        assert!(
            matches!(
                decode(b"{\"attempts\": 1}"),
                Err(StateProblem::Unreadable(_))
            ),
            "version is required"
        );
        for bad in [
            &b""[..],
            b"\n",
            &bytes[..bytes.len() / 2],
            b"{\"version\": 0}",
        ] {
            assert!(
                matches!(decode(bad), Err(StateProblem::Unreadable(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            decode(b"{\"version\": 1, \"attempts\": 0}").unwrap(),
            DeliveryState::default()
        );
    }

    #[test]
    fn version_1_replies_written_as_lines_are_read_as_data() {
        let v1 = br#"{"version": 1, "attempts": 2, "last_reply": "451 4.7.500 Server busy",
            "recipients": [{"address": "a@example.com", "status": "failed",
                            "reply": "550 5.1.10 RESOLVER.ADR.RecipientNotFound; not found"},
                           {"address": "b@example.com", "status": "pending",
                            "reply": "connection dropped before the reply"}]}"#;
        let st = decode(v1).unwrap();
        let last = st.last_reply.clone().unwrap();
        assert_eq!(last.code, Some(451));
        assert_eq!(last.enhanced.as_deref(), Some("4.7.500"));
        assert_eq!(last.text, "Server busy");
        let failed = st.recipients[0].reply.clone().unwrap();
        assert_eq!(failed.enhanced.as_deref(), Some("5.1.10"));
        assert!(failed.is_permanent());
        assert_eq!(
            failed.to_string(),
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; not found"
        );
        let local = st.recipients[1].reply.clone().unwrap();
        assert_eq!((local.code, local.enhanced.as_deref()), (None, None));
        assert_eq!(local.to_string(), "connection dropped before the reply");
        // Written back as version 2, read back the same.
        assert_eq!(decode(&encode(&st)).unwrap(), st);
    }
}
