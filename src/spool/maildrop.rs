//! The drop directory: where `smtp-oauth-relay sendmail` stores a message while the relay does
//! not run (Postfix's `maildrop/`), and the relay's side that takes those messages in.
//!
//! # Files
//! One file per message, `<ID>.drop`, in the spool's message format ([`super::format`]: the
//! envelope header, a blank line, the message as the caller gave it). sendmail writes it as
//! `.tmp-<ID>` (O_EXCL, mode 0640 whatever the caller's umask), fsyncs it, renames it to
//! `<ID>.drop` (the commit point) and fsyncs the directory (`syncfs` for a caller who may not
//! open it): only then does it exit 0. Only
//! `*.drop` names are taken in; a `.tmp-*` left by a sendmail that died is removed after a day.
//!
//! # Taking messages in
//! The relay scans the directory at start and every [`SCAN_EVERY`] while it runs (a message
//! dropped during start-up, before the listener was bound, is not stranded). Each message is
//! handed to a `submit` function: the relay passes one that runs it through an SMTP session
//! of its own listener code, so a dropped message meets exactly the rules of SMTP input. Once
//! the message is in the spool its drop file is removed. A permanent refusal moves the file to
//! `rejected/` (kept for the operator, logged with the reply); a temporary one leaves it for
//! the next scan.
//!
//! # Permissions (README "Cron jobs and sendmail")
//! Without `sendmail.drop_dir` the directory is [`SHARED_DIR`] when it exists, else
//! `maildrop/` inside `queue.dir`, created 0700 by the relay: only the relay's user (and root)
//! can drop there. For unprivileged callers an operator makes [`SHARED_DIR`] (or another
//! directory) `root:<group> 2773`, where the relay runs with `<group>` as a supplementary group:
//! anyone may create a file, nobody but the group may list or read the directory, and the
//! setgid bit gives each file that group, so the relay can read a 0640 file it does not own.
//! sendmail never needs a secret and never reads the spool.

use std::fs::{self, OpenOptions};
use std::future::Future;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::error::SpoolError;
use super::format::{self, Envelope, MAX_HEADER_LEN};
use super::fsutil;
use super::incoming::blocking;

/// How often a running relay looks for dropped messages.
pub const SCAN_EVERY: Duration = Duration::from_secs(2);
/// A `.tmp-*` file older than this belongs to a sendmail that died before its commit.
const STALE_TMP: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_NAME: &str = "maildrop";
/// The drop directory for every local user (README "Cron jobs and sendmail"), used without
/// `sendmail.drop_dir` when it exists: sendmail run by cron knows neither the service's
/// `$STATE_DIRECTORY` nor its private spool, but both sides find this one.
pub const SHARED_DIR: &str = "/var/spool/smtp-oauth-relay";
const REJECTED: &str = "rejected";
const SUFFIX: &str = ".drop";
const TMP_PREFIX: &str = ".tmp-";

/// Why `submit` did not take a dropped message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A 5xx (or a file that is not a message): it will never be accepted.
    Permanent(String),
    /// A 4xx or a local problem: try again at the next scan.
    Temporary(String),
}

/// What one scan did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IngestReport {
    /// Spool ids of the messages taken in.
    pub accepted: Vec<String>,
    pub rejected: usize,
    pub deferred: usize,
}

/// The drop directory of a relay.
#[derive(Debug, Clone)]
pub struct DropDir {
    dir: PathBuf,
    /// Files already reported as deferred: a file stuck for hours is logged once, not every
    /// scan.
    deferred: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl DropDir {
    /// `explicit` (`sendmail.drop_dir`), else [`SHARED_DIR`] when it exists, else `maildrop/`
    /// inside the spool directory.
    pub fn new(queue_dir: &Path, explicit: Option<&Path>) -> DropDir {
        let dir = match explicit {
            Some(d) => d.to_path_buf(),
            None if Path::new(SHARED_DIR).is_dir() => PathBuf::from(SHARED_DIR),
            None => queue_dir.join(DEFAULT_NAME),
        };
        DropDir {
            dir,
            deferred: Default::default(),
        }
    }

    pub fn from_config(config: &crate::config::Config) -> DropDir {
        DropDir::new(&config.queue.dir, config.sendmail.drop_dir.as_deref())
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// sendmail's side: stores `message` with `envelope` durably and returns its id. Only
    /// after `Ok` may sendmail exit 0.
    pub fn deposit(&self, envelope: &Envelope, message: &[u8]) -> Result<String, SpoolError> {
        let id = ulid::Ulid::generate().to_string();
        let header = format::encode_header(&id, envelope, message.len() as u64)?;
        let tmp = self.dir.join(format!("{TMP_PREFIX}{id}"));
        let dst = self.dir.join(format!("{id}{SUFFIX}"));
        let res = (|| {
            // Before the relay's first start: the directory itself (never its parents, which
            // are the spool's and belong to the relay's user), private to the caller.
            if !self.dir.is_dir() && self.dir.parent().is_some_and(Path::is_dir) {
                use std::os::unix::fs::DirBuilderExt;
                match fs::DirBuilder::new().mode(0o700).create(&self.dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(SpoolError::io("create directory", &self.dir, e)),
                }
            }
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o640)
                .open(&tmp)
                .map_err(|e| SpoolError::io("create", &tmp, e))?;
            // The caller's umask (0077 under some PHP pools) must not hide the file from the
            // relay's group.
            f.set_permissions(fs::Permissions::from_mode(0o640))
                .map_err(|e| SpoolError::io("chmod", &tmp, e))?;
            f.write_all(&header)
                .and_then(|()| f.write_all(message))
                .map_err(|e| SpoolError::io("write", &tmp, e))?;
            f.sync_all().map_err(|e| SpoolError::io("fsync", &tmp, e))?;
            fsutil::rename_noreplace(&tmp, &dst).map_err(|e| SpoolError::io("rename", &tmp, e))?;
            match fsutil::fsync_dir(&self.dir) {
                Ok(()) => Ok(()),
                // A caller who may write but not list the directory (mode 2773) cannot open it
                // to fsync it: syncfs makes the rename durable with the whole filesystem.
                Err(SpoolError::Io { source, .. })
                    if source.kind() == io::ErrorKind::PermissionDenied =>
                {
                    use std::os::fd::AsRawFd;
                    // SAFETY: f is an open file descriptor for the duration of the call.
                    if unsafe { libc::syncfs(f.as_raw_fd()) } == 0 {
                        Ok(())
                    } else {
                        Err(SpoolError::io("syncfs", &dst, io::Error::last_os_error()))
                    }
                }
                Err(e) => Err(e),
            }
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res.map(|()| id)
    }

    /// The relay's side, at start: creates the directory (0700: private to the relay's user)
    /// if it is missing, and `rejected/`. An existing directory keeps the mode its operator
    /// gave it.
    pub fn prepare(&self) -> Result<(), SpoolError> {
        use std::os::unix::fs::DirBuilderExt;
        for dir in [self.dir.clone(), self.dir.join(REJECTED)] {
            match fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
            {
                Ok(()) => {}
                Err(e) => return Err(SpoolError::io("create directory", &dir, e)),
            }
        }
        Ok(())
    }

    /// Names of the committed drop files, oldest first; removes stale temporary files.
    fn pending(&self) -> Result<Vec<String>, SpoolError> {
        let rd =
            fs::read_dir(&self.dir).map_err(|e| SpoolError::io("read directory", &self.dir, e))?;
        let mut names = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| SpoolError::io("read directory", &self.dir, e))?;
            let Some(name) = ent.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if let Some(id) = name.strip_suffix(SUFFIX)
                && super::is_valid_id(id)
            {
                names.push(name);
            } else if name.starts_with(TMP_PREFIX) {
                let old = ent
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .is_some_and(|age| age > STALE_TMP);
                if old {
                    tracing::warn!(file = %name, "removing a drop file sendmail never finished");
                    let _ = fs::remove_file(ent.path());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// How many committed messages wait (for `mailq`; an error when the caller may not list
    /// the directory).
    pub fn waiting(&self) -> Result<usize, SpoolError> {
        let rd =
            fs::read_dir(&self.dir).map_err(|e| SpoolError::io("read directory", &self.dir, e))?;
        Ok(rd
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(SUFFIX)))
            .count())
    }

    /// Reads one drop file: its envelope and message, and the uid that wrote it.
    fn read(&self, name: &str, max_size: u64) -> Result<(Envelope, Vec<u8>, u32), Refusal> {
        let path = self.dir.join(name);
        let mut f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::PermissionDenied {
                    Refusal::Temporary(format!(
                        "cannot read {}: {e} (the drop directory must be setgid to the relay's \
                         group, see README \"Cron jobs and sendmail\")",
                        path.display()
                    ))
                } else {
                    Refusal::Temporary(format!("cannot open {}: {e}", path.display()))
                }
            })?;
        let meta = f
            .metadata()
            .map_err(|e| Refusal::Temporary(format!("stat {}: {e}", path.display())))?;
        if !meta.is_file() {
            return Err(Refusal::Permanent("not a regular file".into()));
        }
        // The session would refuse it with 552; there is no point reading it into memory.
        if meta.len() > max_size.saturating_add(MAX_HEADER_LEN as u64) {
            return Err(Refusal::Permanent(format!(
                "552 5.3.4 {} bytes is more than smtp.max_message_size ({max_size})",
                meta.len()
            )));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        f.read_to_end(&mut bytes)
            .map_err(|e| Refusal::Temporary(format!("read {}: {e}", path.display())))?;
        let header = format::decode(&bytes)
            .map_err(|e| Refusal::Permanent(format!("not a drop file: {e}")))?;
        if header.file_len() != bytes.len() as u64 {
            return Err(Refusal::Permanent(
                "length does not match Body-Length".into(),
            ));
        }
        if header.body_length > max_size {
            return Err(Refusal::Permanent(format!(
                "552 5.3.4 {} bytes is more than smtp.max_message_size ({max_size})",
                header.body_length
            )));
        }
        let body = bytes.split_off(header.header_len as usize);
        Ok((header.envelope, body, meta.uid()))
    }

    /// Moves a refused file to `rejected/` (never deleted: the caller was told it was queued).
    fn reject(&self, name: &str) -> Result<PathBuf, SpoolError> {
        let src = self.dir.join(name);
        let dst = self.dir.join(REJECTED).join(name);
        fsutil::rename_noreplace(&src, &dst).map_err(|e| SpoolError::io("rename", &src, e))?;
        fsutil::fsync_dir(&self.dir.join(REJECTED))?;
        fsutil::fsync_dir(&self.dir)?;
        Ok(dst)
    }

    fn remove(&self, name: &str) -> Result<(), SpoolError> {
        let path = self.dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => fsutil::fsync_dir(&self.dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SpoolError::io("unlink", &path, e)),
        }
    }

    /// One scan: every committed drop file goes to `submit` (the spool id, or why not).
    /// A message is in the spool before its drop file goes: a crash in between gives a
    /// duplicate at the next scan, never a loss.
    pub async fn ingest_once<F, Fut>(&self, max_size: u64, submit: &F) -> IngestReport
    where
        F: Fn(Envelope, Vec<u8>) -> Fut,
        Fut: Future<Output = Result<String, Refusal>>,
    {
        let mut report = IngestReport::default();
        let names = match blocking({
            let me = self.clone();
            move || me.pending()
        })
        .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot scan the drop directory");
                return report;
            }
        };
        for name in names {
            let read = {
                let (me, name) = (self.clone(), name.clone());
                tokio::task::spawn_blocking(move || me.read(&name, max_size))
                    .await
                    .unwrap_or_else(|e| Err(Refusal::Temporary(e.to_string())))
            };
            let outcome = match read {
                Ok((envelope, body, uid)) => {
                    let sender = envelope.mail_from.clone();
                    let r = submit(envelope, body).await;
                    if let Ok(id) = &r {
                        tracing::info!(file = %name, %uid, id = %id, from = %sender, "dropped message queued");
                    }
                    r
                }
                Err(r) => Err(r),
            };
            if !matches!(outcome, Err(Refusal::Temporary(_))) {
                self.deferred
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&name);
            }
            let me = self.clone();
            let n = name.clone();
            match outcome {
                Ok(id) => {
                    if let Err(e) = blocking(move || me.remove(&n)).await {
                        // Queued already: the file coming back would be a duplicate.
                        tracing::error!(file = %name, error = %e, "cannot remove a queued drop file");
                    }
                    report.accepted.push(id);
                }
                Err(Refusal::Permanent(reason)) => {
                    match blocking(move || me.reject(&n)).await {
                        Ok(kept) => tracing::error!(
                            file = %name, kept = %kept.display(), %reason,
                            "dropped message refused: kept in rejected/, not delivered"
                        ),
                        Err(e) => tracing::error!(file = %name, %reason, error = %e,
                            "dropped message refused and cannot be moved to rejected/"),
                    }
                    report.rejected += 1;
                }
                Err(Refusal::Temporary(reason)) => {
                    let first = self
                        .deferred
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(name.clone());
                    if first {
                        tracing::warn!(file = %name, %reason, "dropped message not taken in yet: will retry");
                    } else {
                        tracing::debug!(file = %name, %reason, "dropped message still not taken in");
                    }
                    report.deferred += 1;
                }
            }
        }
        report
    }

    /// Scans at once and then every [`SCAN_EVERY`] until `shutdown`.
    pub async fn run<F, Fut>(self, max_size: u64, submit: F, shutdown: CancellationToken)
    where
        F: Fn(Envelope, Vec<u8>) -> Fut,
        Fut: Future<Output = Result<String, Refusal>>,
    {
        loop {
            // Cut short by shutdown: a message half taken in stays in its drop file (a spool
            // commit already made before its file went gives a duplicate, never a loss).
            tokio::select! {
                _ = self.ingest_once(max_size, &submit) => {}
                () = shutdown.cancelled() => return,
            }
            tokio::select! {
                () = tokio::time::sleep(SCAN_EVERY) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Recipient;

    fn envelope() -> Envelope {
        Envelope {
            mail_from: "root@example.com".into(),
            mail_params: Default::default(),
            recipients: vec![Recipient::new("admin@example.com")],
            client: "sendmail".into(),
            helo: "localhost".into(),
            auth_user: None,
            received_at: SystemTime::now(),
            route: "default".into(),
        }
    }

    #[test]
    fn deposit_then_read_back() {
        let tmp = tempfile::tempdir().unwrap();
        let d = DropDir::new(tmp.path(), Some(&tmp.path().join("maildrop")));
        d.prepare().unwrap();
        let id = d.deposit(&envelope(), b"Subject: x\n\nhello\n").unwrap();
        let names = d.pending().unwrap();
        assert_eq!(names, vec![format!("{id}.drop")]);
        let mode = fs::metadata(d.path().join(&names[0]))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        let (env, body, _) = d.read(&names[0], 1 << 20).unwrap();
        assert_eq!(env.recipients[0].address, "admin@example.com");
        assert_eq!(body, b"Subject: x\n\nhello\n");
        // Too large for the limit: refused for good without reading it.
        assert!(matches!(d.read(&names[0], 1), Err(Refusal::Permanent(_))));
    }

    #[test]
    fn foreign_files_are_refused_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let d = DropDir::new(tmp.path(), Some(&tmp.path().join("maildrop")));
        d.prepare().unwrap();
        let name = format!("{}.drop", ulid::Ulid::generate());
        fs::write(d.path().join(&name), b"garbage\n\nbody").unwrap();
        fs::write(d.path().join("notes.txt"), b"ignored").unwrap();
        assert_eq!(d.pending().unwrap(), vec![name.clone()]);
        assert!(matches!(d.read(&name, 1 << 20), Err(Refusal::Permanent(_))));
        let kept = d.reject(&name).unwrap();
        assert!(kept.is_file());
        assert!(d.pending().unwrap().is_empty());
    }
}
