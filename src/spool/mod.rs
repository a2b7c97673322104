//! Durable on-disk queue (see DESIGN.md, "Spool on disk").
//!
//! # Layout
//! One directory with `tmp/`, `queue/`, `held/`, `failed/`, `corrupt/` and `state/` (all on one
//! filesystem) and a `lock` file held by the running daemon.
//! - A message is one immutable file `<ID>.msg`: a versioned envelope header, a blank line, the
//!   exact message bytes (see [`mod@format`]). Its directory is its state: `queue/` (queued),
//!   `held/`, `failed/`.
//! - Mutable delivery state lives in `state/<ID>.json` ([`DeliveryState`]), absent = fresh.
//!   A state file that cannot be used never hides its message: [`Spool::list`] shows the
//!   message with the [`StateProblem`], and the deliverer resets an unreadable state
//!   ([`Spool::reset_state`], the old file kept in `corrupt/`) or holds a message whose state a
//!   newer relay wrote.
//!
//! # Commit protocol (see [`IncomingMessage::commit`])
//! `tmp/<ID>.msg` (O_EXCL, 0600) → header → body (≤ 256 KiB buffered) → patch Body-Length →
//! `fsync(file)` → `rename` to `queue/<ID>.msg` (the commit point) → `fsync(queue/)`, shared by
//! concurrent commits (group commit). Two fsyncs per message at most; the directory fsync is
//! amortised over every commit that renamed before it started.
//!
//! If the directory fsync fails, durability cannot be promised: the renamed file is unlinked
//! (best effort) and the caller gets an error (451). Should the unlink itself not survive a
//! crash, the message reappears and is delivered although the client was told to retry: a
//! duplicate, which at-least-once delivery allows; a lost acknowledged message cannot happen.
//!
//! # As a store
//! [`Spool`] implements [`crate::store::Store`] (see `store.rs`): commits announce themselves,
//! operator commands write `wakeup`, which the daemon's spool watches, and the deliverer's
//! status goes to `mailbox.json`. Nothing outside this module knows these names.
//!
//! # Concurrency
//! The async methods run blocking filesystem calls on tokio's blocking pool. The synchronous
//! methods (`list`, `show`, `hold`, ..., `read_state`, `write_state`) block: async callers should
//! wrap them in `spawn_blocking`. Operator commands (`queue ...`) are safe while the daemon
//! runs: they never touch `tmp/`, they move files with atomic no-replace renames, and a file
//! that vanishes concurrently is reported as [`SpoolError::NotFound`].

pub mod body;
mod error;
pub mod format;
mod fsutil;
mod id;
mod incoming;
pub mod maildrop;
mod recovery;
mod state;
mod store;
mod writable;

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

pub use body::{BodyReader, BodySource, MessageBody, PieceFuture};
pub use error::SpoolError;
pub use format::{BodyType, Envelope, MailParams, Recipient};
pub use fsutil::{Fault, FaultPoint, SpoolStats};
pub use id::{is_valid_id, normalize_id};
pub use incoming::{IncomingMessage, WRITE_BUFFER};
pub use recovery::RecoveryReport;
pub use state::{
    DeliveryState, PossibleDuplicate, RecipientState, RecipientStatus, RecordedReply,
    STATE_VERSION, StateProblem,
};
pub use writable::PROBE_EVERY;

use fsutil::{Counters, Faults};
use incoming::GroupCommit;

/// Where a message is: the name of its directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntryState {
    Queued,
    Held,
    Failed,
}

impl EntryState {
    pub const ALL: [EntryState; 3] = [EntryState::Queued, EntryState::Held, EntryState::Failed];

    /// The state word shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryState::Queued => "queued",
            EntryState::Held => "held",
            EntryState::Failed => "failed",
        }
    }

    fn dir_name(self) -> &'static str {
        match self {
            EntryState::Queued => "queue",
            EntryState::Held => "held",
            EntryState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for EntryState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One message as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    pub id: String,
    pub state: EntryState,
    pub received_at: SystemTime,
    /// Envelope sender; empty for the null sender.
    pub mail_from: String,
    pub recipients: Vec<String>,
    /// The route chosen at accept, and the inbound AUTH user (a template route's mailbox).
    pub route: String,
    pub auth_user: Option<String>,
    /// Message size in bytes (the body after the envelope header).
    pub size: u64,
    /// Delivery state, if the message was ever attempted (and its state file is usable).
    pub delivery: Option<DeliveryState>,
    /// Why its state file could not be used; the message is listed all the same.
    pub state_problem: Option<StateProblem>,
}

/// One message with its envelope and its header section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShownMessage {
    pub entry: QueueEntry,
    pub envelope: Envelope,
    /// The message's header section (up to, not including, the blank line; at most 1 MiB).
    pub headers: Vec<u8>,
}

const SUBDIRS: [&str; 6] = ["tmp", "queue", "held", "failed", "corrupt", "state"];
/// Subdirectories `open_for_admin` requires (`corrupt/` is created on demand by recovery).
const REQUIRED_SUBDIRS: [&str; 5] = ["tmp", "queue", "held", "failed", "state"];
const MAX_SHOWN_HEADERS: u64 = 1 << 20;

pub(crate) struct Inner {
    dir: PathBuf,
    ids: id::IdGenerator,
    faults: Faults,
    counters: Counters,
    group: Arc<GroupCommit>,
    state_tmp_seq: AtomicU64,
    /// Outcome of the last write, for `/readyz` ([`writable`]).
    health: writable::WriteHealth,
    /// Every change, for the deliverer ([`crate::store::Store::events`]; see [`store`]).
    pub(crate) events: tokio::sync::broadcast::Sender<crate::store::StoreEvent>,
    /// Whether the task that turns other processes' changes into events runs.
    pub(crate) watching: std::sync::atomic::AtomicBool,
    /// Messages claimed for an attempt in this process.
    pub(crate) claims: crate::store::ClaimSet,
    /// The mailbox statuses this process published (the status file holds all of them).
    pub(crate) statuses: std::sync::Mutex<std::collections::BTreeMap<String, serde_json::Value>>,
    _lock: Option<File>,
}

impl Inner {
    pub(crate) fn sub(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.sub("tmp")
    }

    pub(crate) fn state_dir_of(&self, s: EntryState) -> PathBuf {
        self.sub(s.dir_name())
    }

    pub(crate) fn msg_path(&self, s: EntryState, id: &str) -> PathBuf {
        self.state_dir_of(s).join(format!("{id}.msg"))
    }

    pub(crate) fn state_path(&self, id: &str) -> PathBuf {
        self.sub("state").join(format!("{id}.json"))
    }
}

/// A queued message read back for delivery.
#[derive(Debug)]
pub struct LoadedMessage {
    pub id: String,
    pub envelope: Envelope,
    /// The message bytes as stored (unstuffed, CRLF): the header section in memory, the rest
    /// read from the file while it is sent ([`body`]).
    pub body: MessageBody,
}

/// The durable spool. Cheap to clone; all clones share one group-commit state.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

pub(crate) fn new_inner(dir: &Path, lock: Option<File>) -> Inner {
    Inner {
        dir: dir.to_path_buf(),
        ids: id::IdGenerator::new(),
        faults: Faults::default(),
        counters: Counters::default(),
        group: Arc::new(GroupCommit::new()),
        state_tmp_seq: AtomicU64::new(0),
        health: writable::WriteHealth::default(),
        events: tokio::sync::broadcast::channel(store::EVENT_BACKLOG).0,
        watching: std::sync::atomic::AtomicBool::new(false),
        claims: Default::default(),
        statuses: Default::default(),
        _lock: lock,
    }
}

impl Spool {
    /// Open the spool for the daemon: create missing directories, take the spool lock (one
    /// daemon per spool), then recover: clear `tmp/`, quarantine unreadable or truncated
    /// messages in `corrupt/`, drop state files without a message.
    pub fn open(dir: &Path) -> Result<(Spool, RecoveryReport), SpoolError> {
        use std::os::unix::fs::DirBuilderExt;
        let mut created = false;
        if !dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| SpoolError::io("create directory", dir, e))?;
            created = true;
        }
        for s in SUBDIRS {
            let p = dir.join(s);
            match fs::DirBuilder::new().mode(0o700).create(&p) {
                Ok(()) => created = true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && p.is_dir() => {}
                Err(e) => return Err(SpoolError::io("create directory", &p, e)),
            }
        }
        if created {
            fsutil::fsync_dir(dir)?;
        }
        let lock_path = dir.join("lock");
        let lock = fsutil::lock_file(&lock_path)?.ok_or_else(|| SpoolError::Locked(dir.into()))?;
        let inner = Arc::new(new_inner(dir, Some(lock)));
        let report = recovery::recover(&inner)?;
        // One real write at start; from then on the spool's own writes are the proof.
        let probed = writable::probe(&inner);
        if let Err(e) = &probed {
            tracing::error!(error = %e, "the spool is not writable: mail will be refused with 451");
        }
        inner.health.record(&probed);
        Ok((Spool { inner }, report))
    }

    /// Open an existing spool for operator commands: no recovery, no lock, `tmp/` untouched.
    pub fn open_for_admin(dir: &Path) -> Result<Spool, SpoolError> {
        if !REQUIRED_SUBDIRS.iter().all(|s| dir.join(s).is_dir()) {
            return Err(SpoolError::NotASpool(dir.to_path_buf()));
        }
        Ok(Spool {
            inner: Arc::new(new_inner(dir, None)),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Whether new mail can be written, for `/readyz`; see [`writable`] for how it is known
    /// without creating a file per call. Blocks briefly (a few `stat`s).
    pub fn check_writable(&self) -> Result<(), SpoolError> {
        writable::check(&self.inner)
    }

    /// Bytes available on the spool's filesystem (`f_bavail * f_frsize`).
    pub fn free_space(&self) -> Result<u64, SpoolError> {
        fsutil::free_space(&self.inner.dir)
    }

    /// Start a new message: creates `tmp/<ID>.msg`. Write the body with
    /// [`IncomingMessage::write_all`], then [`IncomingMessage::commit`].
    pub async fn create(&self, envelope: &Envelope) -> Result<IncomingMessage, SpoolError> {
        let created = IncomingMessage::create(self.inner.clone(), envelope).await;
        // Only a whole commit or state write proves the disk; a failure to create disproves it.
        if let Err(e) = &created {
            self.inner.health.failed(e);
        }
        created
    }

    /// Every message in `queue/`, `held/` and `failed/`, sorted by id (= arrival order).
    /// Files that vanish while listing are skipped; undecodable ones are skipped with a warning
    /// (recovery moves them to `corrupt/` at the next start).
    pub fn list(&self) -> Result<Vec<QueueEntry>, SpoolError> {
        let mut out = Vec::new();
        for st in EntryState::ALL {
            for id in self.ids_in(st)? {
                let path = self.inner.msg_path(st, &id);
                match self.read_entry(&id, st, &path) {
                    Ok((entry, _)) => out.push(entry),
                    Err(e) if e.is_io_not_found() => {}
                    Err(e @ SpoolError::Corrupt { .. }) => {
                        tracing::warn!(error = %e, "skipping unreadable spool file")
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id).then(a.state.cmp(&b.state)));
        Ok(out)
    }

    /// Message ids (file names `<ID>.msg`) in one state directory.
    pub(crate) fn ids_in(&self, st: EntryState) -> Result<Vec<String>, SpoolError> {
        let dir = self.inner.state_dir_of(st);
        let rd = fs::read_dir(&dir).map_err(|e| SpoolError::io("read directory", &dir, e))?;
        let mut ids = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| SpoolError::io("read directory", &dir, e))?;
            let name = ent.file_name();
            if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".msg"))
                && is_valid_id(id)
            {
                ids.push(id.to_string());
            }
        }
        Ok(ids)
    }

    fn read_entry(
        &self,
        id: &str,
        st: EntryState,
        path: &Path,
    ) -> Result<(QueueEntry, fsutil::OpenedMessage), SpoolError> {
        let m = fsutil::open_message(path)?;
        if m.header.id != id {
            return Err(SpoolError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("header Id {} does not match the file name", m.header.id),
            });
        }
        // A bad state file must not hide the message (it would never be delivered, and
        // `queue list` would say the queue is empty).
        let (delivery, state_problem) = match self.read_state(id) {
            Ok(d) => (d, None),
            Err(SpoolError::BadState { problem, .. }) => (None, Some(problem)),
            Err(e) => return Err(e),
        };
        let env = &m.header.envelope;
        let entry = QueueEntry {
            id: id.to_string(),
            state: st,
            received_at: env.received_at,
            mail_from: env.mail_from.clone(),
            recipients: env.recipients.iter().map(|r| r.address.clone()).collect(),
            route: env.route.clone(),
            auth_user: env.auth_user.clone(),
            size: m.header.body_length,
            delivery,
            state_problem,
        };
        Ok((entry, m))
    }

    /// Find a message: its state and path.
    fn locate(&self, id: &str) -> Result<Option<(EntryState, PathBuf)>, SpoolError> {
        for st in EntryState::ALL {
            let p = self.inner.msg_path(st, id);
            match fs::symlink_metadata(&p) {
                Ok(_) => return Ok(Some((st, p))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(SpoolError::io("stat", &p, e)),
            }
        }
        Ok(None)
    }

    fn check_id(id: &str) -> Result<String, SpoolError> {
        normalize_id(id).ok_or_else(|| SpoolError::InvalidId(id.to_string()))
    }

    /// The message's state (`queued`, `held`, `failed`), or NotFound.
    pub fn state_of(&self, id: &str) -> Result<EntryState, SpoolError> {
        let id = Self::check_id(id)?;
        self.locate(&id)?
            .map(|(s, _)| s)
            .ok_or(SpoolError::NotFound(id))
    }

    /// Envelope, state and the message's header section.
    pub fn show(&self, id: &str) -> Result<ShownMessage, SpoolError> {
        let id = Self::check_id(id)?;
        // A concurrent hold/release may move the file between locate and open: retry.
        for _ in 0..5 {
            let Some((st, path)) = self.locate(&id)? else {
                break;
            };
            let (entry, mut m) = match self.read_entry(&id, st, &path) {
                Ok(x) => x,
                Err(e) if e.is_io_not_found() => continue,
                Err(e) => return Err(e),
            };
            let limit = m.header.body_length.min(MAX_SHOWN_HEADERS) as usize;
            let mut body = std::mem::take(&mut m.body_prefix);
            if body.len() < limit {
                let mut rest = Vec::new();
                (&mut m.file)
                    .take((limit - body.len()) as u64)
                    .read_to_end(&mut rest)
                    .map_err(|e| SpoolError::io("read", &path, e))?;
                body.extend_from_slice(&rest);
            }
            body.truncate(limit);
            let headers = crate::headers::Headers::parse(&body).section().to_vec();
            return Ok(ShownMessage {
                entry,
                envelope: m.header.envelope,
                headers,
            });
        }
        Err(SpoolError::NotFound(id))
    }

    /// Move a message to `to` (atomic no-replace rename, then both directories fsync'd).
    /// Returns the state it was in; equal to `to` means it was already there.
    pub fn move_to(&self, id: &str, to: EntryState) -> Result<EntryState, SpoolError> {
        let id = Self::check_id(id)?;
        for _ in 0..5 {
            let Some((from, src)) = self.locate(&id)? else {
                break;
            };
            if from == to {
                return Ok(from);
            }
            let dst = self.inner.msg_path(to, &id);
            match fsutil::rename_noreplace(&src, &dst) {
                Ok(()) => {
                    fsutil::fsync_dir(&self.inner.state_dir_of(to))?;
                    fsutil::fsync_dir(&self.inner.state_dir_of(from))?;
                    tracing::info!(id = %id, from = %from, to = %to, "spool message moved");
                    return Ok(from);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(SpoolError::io("rename", &src, e)),
            }
        }
        Err(SpoolError::NotFound(id))
    }

    /// Hold a message (from `queue/` or `failed/`); holding a held message is a no-op.
    pub fn hold(&self, id: &str) -> Result<(), SpoolError> {
        self.move_to(id, EntryState::Held).map(|_| ())
    }

    /// Release a message back to `queue/` (from `held/` or `failed/`); a no-op if queued.
    pub fn release(&self, id: &str) -> Result<(), SpoolError> {
        self.move_to(id, EntryState::Queued).map(|_| ())
    }

    /// Remove a message and its state. The message file goes first, so a crash in between
    /// leaves an orphan state file (removed by recovery), never a message with reset state.
    pub fn delete(&self, id: &str) -> Result<(), SpoolError> {
        let id = Self::check_id(id)?;
        let mut deleted = false;
        for _ in 0..5 {
            let Some((st, path)) = self.locate(&id)? else {
                break;
            };
            match fs::remove_file(&path) {
                Ok(()) => {
                    fsutil::fsync_dir(&self.inner.state_dir_of(st))?;
                    deleted = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(SpoolError::io("unlink", &path, e)),
            }
        }
        if !deleted {
            return Err(SpoolError::NotFound(id));
        }
        let sp = self.inner.state_path(&id);
        match fs::remove_file(&sp) {
            Ok(()) => fsutil::fsync_dir(&self.inner.sub("state"))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(SpoolError::io("unlink", &sp, e)),
        }
        tracing::info!(id = %id, "spool message deleted");
        Ok(())
    }

    /// A queued message for delivery: its envelope and its bytes, opened for this attempt (the
    /// header section in memory, the rest read from the file as it is sent; see [`body`]).
    /// `NotFound` if it is no longer queued (an operator held or deleted it).
    pub fn load(&self, id: &str) -> Result<LoadedMessage, SpoolError> {
        let id = Self::check_id(id)?;
        let path = self.inner.msg_path(EntryState::Queued, &id);
        let (header, body) = match MessageBody::open(&path) {
            Ok(opened) => opened,
            Err(e) if e.is_io_not_found() => return Err(SpoolError::NotFound(id)),
            Err(e) => return Err(e),
        };
        Ok(LoadedMessage {
            id,
            envelope: header.envelope,
            body,
        })
    }

    /// Delivery finished: remove a message from `queue/` (only there: a message an operator
    /// moved meanwhile stays where it is) and its state. Returns whether it was removed.
    pub fn complete(&self, id: &str) -> Result<bool, SpoolError> {
        let id = Self::check_id(id)?;
        let path = self.inner.msg_path(EntryState::Queued, &id);
        match fs::remove_file(&path) {
            Ok(()) => fsutil::fsync_dir(&self.inner.state_dir_of(EntryState::Queued))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(SpoolError::io("unlink", &path, e)),
        }
        let sp = self.inner.state_path(&id);
        match fs::remove_file(&sp) {
            Ok(()) => fsutil::fsync_dir(&self.inner.sub("state"))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(SpoolError::io("unlink", &sp, e)),
        }
        Ok(true)
    }

    /// The delivery state of a message; `None` if it was never attempted;
    /// [`SpoolError::BadState`] if its file cannot be used.
    pub fn read_state(&self, id: &str) -> Result<Option<DeliveryState>, SpoolError> {
        let id = Self::check_id(id)?;
        let p = self.inner.state_path(&id);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(SpoolError::io("read", &p, e)),
        };
        state::decode(&bytes)
            .map(Some)
            .map_err(|problem| SpoolError::BadState { path: p, problem })
    }

    /// Forget the delivery state of a message: its state file goes to `corrupt/` (kept for
    /// the operator, never deleted) and the message counts as never attempted. Returns where
    /// the file went, or `None` if there was none.
    pub fn reset_state(&self, id: &str) -> Result<Option<PathBuf>, SpoolError> {
        let id = Self::check_id(id)?;
        let p = self.inner.state_path(&id);
        match fs::symlink_metadata(&p) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(SpoolError::io("stat", &p, e)),
        }
        let dst = recovery::quarantine(&self.inner, &p, &format!("{id}.json"))?;
        fsutil::fsync_dir(&self.inner.sub("corrupt"))?;
        fsutil::fsync_dir(&self.inner.sub("state"))?;
        Ok(Some(dst))
    }

    /// Durably replace the delivery state of a message (tmp + fsync + rename + fsync `state/`).
    pub fn write_state(&self, id: &str, st: &DeliveryState) -> Result<(), SpoolError> {
        let id = Self::check_id(id)?;
        let seq = self.inner.state_tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .inner
            .tmp_dir()
            .join(format!("{id}.{}.{seq}.json", std::process::id()));
        let dst = self.inner.state_path(&id);
        let bytes = state::encode(st);
        let res = (|| {
            use std::io::Write;
            let mut f =
                fsutil::create_exclusive(&tmp).map_err(|e| SpoolError::io("create", &tmp, e))?;
            f.write_all(&bytes)
                .map_err(|e| SpoolError::io("write", &tmp, e))?;
            f.sync_all().map_err(|e| SpoolError::io("fsync", &tmp, e))?;
            drop(f);
            fs::rename(&tmp, &dst).map_err(|e| SpoolError::io("rename", &tmp, e))?;
            fsutil::fsync_dir(&self.inner.sub("state"))
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        self.inner.health.record(&res);
        res
    }

    /// Arm (or clear) a one-shot fault for tests.
    #[doc(hidden)]
    pub fn inject_fault(&self, fault: Option<Fault>) {
        self.inner.faults.set(fault);
    }

    /// Counters (commits, file fsyncs, directory fsyncs) for tests and metrics.
    #[doc(hidden)]
    pub fn stats(&self) -> SpoolStats {
        self.inner.counters.snapshot()
    }
}
