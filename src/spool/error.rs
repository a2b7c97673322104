//! The spool's error type.

use std::io;
use std::path::{Path, PathBuf};

/// Everything that can go wrong in the spool.
///
/// The listener maps [`SpoolError::is_no_space`] to `452 4.3.1` and every other error to
/// `451 4.3.0`: in no case has a message been acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The filesystem is full (`ENOSPC`) or the quota is exhausted (`EDQUOT`).
    #[error("spool out of space: {op} {}: {source}", path.display())]
    NoSpace {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// Any other I/O failure.
    #[error("spool I/O error: {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// No message with this id exists in `queue/`, `held/` or `failed/` (it may have been
    /// delivered or deleted concurrently).
    #[error("no message {0} in the spool")]
    NotFound(String),
    /// An id that is not 26 Crockford base32 characters (never used to build a path).
    #[error("invalid message id {0:?}: expected 26 Crockford base32 characters")]
    InvalidId(String),
    /// A spool file that cannot be decoded or is truncated.
    #[error("corrupt spool file {}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// A message whose delivery state file cannot be used; the message itself is intact.
    #[error("{}: {problem}", path.display())]
    BadState {
        path: PathBuf,
        problem: super::state::StateProblem,
    },
    /// `/readyz`: a spool directory cannot take new files, or the last write failed and a
    /// probe confirmed it.
    #[error("spool not writable: {}: {reason}", path.display())]
    NotWritable { path: PathBuf, reason: String },
    /// `open_for_admin` on a directory that lacks the spool subdirectories.
    #[error("{} is not a spool directory (expected tmp/, queue/, held/, failed/ and state/ inside)", .0.display())]
    NotASpool(PathBuf),
    /// Another daemon holds the spool lock.
    #[error("spool {} is locked by another running daemon", .0.display())]
    Locked(PathBuf),
    /// An envelope value that cannot be stored (e.g. a CR or LF in an address).
    #[error("invalid envelope: {0}")]
    InvalidEnvelope(String),
    /// The message already failed (its temporary file is gone); it cannot be written to.
    #[error("message {0} already failed and was discarded")]
    Discarded(String),
    /// A store other than the spool (the database) could not give back the bytes of a
    /// message being read for delivery: the attempt ends as a temporary failure.
    #[error("reading message {id} from {store}: {source}")]
    Unreadable {
        id: String,
        store: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl SpoolError {
    /// True for `ENOSPC`/`EDQUOT`: the listener answers `452 4.3.1` rather than `451 4.3.0`.
    pub fn is_no_space(&self) -> bool {
        matches!(self, SpoolError::NoSpace { .. })
    }

    /// Build an I/O error, classifying `ENOSPC`/`EDQUOT` as [`SpoolError::NoSpace`].
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> SpoolError {
        let path = path.to_path_buf();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => SpoolError::NoSpace { op, path, source },
            _ => SpoolError::Io { op, path, source },
        }
    }

    /// A failure of the disk or the filesystem (as opposed to a bad id, envelope or file):
    /// what makes the spool unable to take mail.
    pub(crate) fn is_write_failure(&self) -> bool {
        matches!(self, SpoolError::Io { .. } | SpoolError::NoSpace { .. })
    }

    /// True when the underlying I/O error is "not found".
    pub(crate) fn is_io_not_found(&self) -> bool {
        matches!(self, SpoolError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// Copy an `io::Error` (which is not `Clone`) keeping its errno.
pub(crate) fn clone_io_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}
