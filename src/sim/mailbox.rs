//! The simulated Sent Items: every accepted message as `<queue-id>.eml` (exact bytes, unstuffed) next to
//! `<queue-id>.json` (envelope). The JSON is written last, so a listed message is always complete.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::SimError;
use super::util::unix_now;

/// Envelope of an accepted message (the `.json` file).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Envelope {
    /// The id in the `250 2.0.0 OK <id@...>` reply.
    pub id: String,
    /// Order of acceptance within this simulator run.
    pub seq: u64,
    pub received_at: u64,
    /// The XOAUTH2 `user=` mailbox.
    pub auth_user: String,
    /// `appid` of the token used.
    pub client_id: String,
    pub mail_from: String,
    /// The MAIL FROM parameters as sent (`SIZE=... BODY=8BITMIME SMTPUTF8`).
    #[serde(default)]
    pub mail_params: String,
    pub rcpt_to: Vec<String>,
    /// DATA or BDAT.
    pub transfer: String,
    pub size: usize,
}

/// A stored message: envelope plus the exact bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub envelope: Envelope,
    pub data: Vec<u8>,
    pub eml_path: PathBuf,
}

impl StoredMessage {
    /// The message as text (lossy for 8-bit bodies), for assertions.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

pub(crate) struct Mailbox {
    dir: PathBuf,
    seq: AtomicU64,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> SimError {
    move |e| SimError::Io(what, e)
}

impl Mailbox {
    pub fn open(dir: &Path) -> Result<Mailbox, SimError> {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        let seq = list_dir(dir)?
            .last()
            .map(|m| m.envelope.seq + 1)
            .unwrap_or(0);
        Ok(Mailbox {
            dir: dir.to_path_buf(),
            seq: AtomicU64::new(seq),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores a message; only a file system error makes this fail (the caller then answers 451).
    pub async fn store(&self, mut envelope: Envelope, data: &[u8]) -> Result<(), SimError> {
        envelope.seq = self.seq.fetch_add(1, Ordering::Relaxed);
        envelope.received_at = unix_now();
        envelope.size = data.len();
        let eml = self.dir.join(format!("{}.eml", envelope.id));
        let json = self.dir.join(format!("{}.json", envelope.id));
        let tmp = self.dir.join(format!(".{}.tmp", envelope.id));
        let text =
            serde_json::to_vec_pretty(&envelope).map_err(|e| SimError::Config(e.to_string()))?;
        tokio::fs::write(&eml, data)
            .await
            .map_err(io(format!("write {}", eml.display())))?;
        tokio::fs::write(&tmp, text)
            .await
            .map_err(io(format!("write {}", tmp.display())))?;
        tokio::fs::rename(&tmp, &json)
            .await
            .map_err(io(format!("rename to {}", json.display())))?;
        Ok(())
    }

    pub fn list(&self) -> Result<Vec<StoredMessage>, SimError> {
        list_dir(&self.dir)
    }
}

/// Every complete message in `dir`, in order of acceptance.
pub fn list_dir(dir: &Path) -> Result<Vec<StoredMessage>, SimError> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(io(format!("read {}", dir.display())))?;
    for entry in entries {
        let path = entry.map_err(io(format!("read {}", dir.display())))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let text = std::fs::read(&path).map_err(io(format!("read {}", path.display())))?;
        let envelope: Envelope = serde_json::from_slice(&text)
            .map_err(|e| SimError::Config(format!("bad envelope {}: {e}", path.display())))?;
        let eml_path = path.with_extension("eml");
        let data = std::fs::read(&eml_path).map_err(io(format!("read {}", eml_path.display())))?;
        out.push(StoredMessage {
            envelope,
            data,
            eml_path,
        });
    }
    out.sort_by_key(|m| m.envelope.seq);
    Ok(out)
}
