//! "Can the spool take mail?" (`/readyz`) without writing a file per question.
//!
//! The proof is the spool's own writes: every commit and state write records its outcome here.
//! While the last one succeeded, a question costs a `stat`, an `access` and a `statvfs` per
//! directory (a read-only remount, a permission change or a directory replaced by a file show
//! at once). Only after a write failed does the spool probe (create, fsync, remove one file in
//! `tmp/`), at most once per [`PROBE_EVERY`], so that readiness comes back once the disk does,
//! even when no mail arrives to prove it.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::Inner;
use super::error::SpoolError;
use super::fsutil;

/// At most one probe file per this interval, and only while a write failure is unexplained.
pub const PROBE_EVERY: Duration = Duration::from_secs(10);

/// The directories a commit and a state write need.
const WRITTEN_DIRS: [&str; 3] = ["tmp", "queue", "state"];

#[derive(Default)]
pub(crate) struct WriteHealth {
    state: Mutex<HealthState>,
    probe_seq: AtomicU64,
}

#[derive(Default)]
struct HealthState {
    /// The last write failure not disproved by a later success.
    failure: Option<String>,
    probed_at: Option<Instant>,
}

impl WriteHealth {
    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the outcome of a write the spool made (commit, state write, probe).
    pub(crate) fn record<T>(&self, result: &Result<T, SpoolError>) {
        match result {
            Ok(_) => self.ok(),
            Err(e) => self.failed(e),
        }
    }

    pub(crate) fn ok(&self) {
        self.lock().failure = None;
    }

    /// Errors that are not about the disk (a bad id or envelope) say nothing about it.
    pub(crate) fn failed(&self, e: &SpoolError) {
        if e.is_write_failure() {
            self.lock().failure = Some(e.to_string());
        }
    }
}

/// The readiness verdict for the spool's writability (free space is checked by the caller).
pub(crate) fn check(inner: &Inner) -> Result<(), SpoolError> {
    let not_writable = |path: &Path, reason: String| SpoolError::NotWritable {
        path: path.to_path_buf(),
        reason,
    };
    for sub in WRITTEN_DIRS {
        let dir = inner.sub(sub);
        fsutil::check_writable_dir(&dir).map_err(|e| not_writable(&dir, e.to_string()))?;
    }
    match fsutil::is_read_only(&inner.dir) {
        Ok(false) => {}
        Ok(true) => return Err(not_writable(&inner.dir, "read-only file system".into())),
        Err(e) => return Err(not_writable(&inner.dir, e.to_string())),
    }
    let health = &inner.health;
    {
        let st = health.lock();
        let Some(failure) = &st.failure else {
            return Ok(());
        };
        if st.probed_at.is_some_and(|at| at.elapsed() < PROBE_EVERY) {
            return Err(not_writable(
                &inner.dir,
                format!("the last write failed: {failure}"),
            ));
        }
    }
    health.lock().probed_at = Some(Instant::now());
    let result = probe(inner);
    health.record(&result);
    result.map_err(|e| not_writable(&inner.tmp_dir(), e.to_string()))
}

/// Creates, fsyncs and removes one file in `tmp/` (recovery clears any left behind by a crash).
pub(crate) fn probe(inner: &Inner) -> Result<(), SpoolError> {
    use std::io::Write;
    let seq = inner.health.probe_seq.fetch_add(1, Ordering::Relaxed);
    let path = inner
        .tmp_dir()
        .join(format!("probe-{}-{seq}", std::process::id()));
    let written = (|| {
        let mut f =
            fsutil::create_exclusive(&path).map_err(|e| SpoolError::io("create", &path, e))?;
        f.write_all(b"probe\n")
            .map_err(|e| SpoolError::io("write", &path, e))?;
        f.sync_all().map_err(|e| SpoolError::io("fsync", &path, e))
    })();
    let removed = std::fs::remove_file(&path).map_err(|e| SpoolError::io("unlink", &path, e));
    written.and(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Spool;

    fn eio(path: &Path) -> SpoolError {
        SpoolError::io("write", path, std::io::Error::from_raw_os_error(libc::EIO))
    }

    #[test]
    fn a_failed_write_is_probed_at_most_once_per_interval() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spool, _) = Spool::open(dir.path()).expect("spool");
        assert!(spool.check_writable().is_ok());
        // A failure disproved by a probe: ready again, nothing left behind.
        spool.inner.health.failed(&eio(dir.path()));
        assert!(spool.check_writable().is_ok());
        assert!(spool.inner.health.lock().failure.is_none());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp"))
                .expect("tmp")
                .count(),
            0
        );
        // A failure probed a moment ago is reported as it is, without another probe.
        spool.inner.health.failed(&eio(dir.path()));
        spool.inner.health.lock().probed_at = Some(Instant::now());
        let e = spool.check_writable().expect_err("not writable");
        assert!(e.to_string().contains("the last write failed"), "{e}");
        // Errors that are not about the disk change nothing; a success clears it.
        spool
            .inner
            .health
            .failed(&SpoolError::InvalidId("x".into()));
        assert!(spool.check_writable().is_err());
        spool.inner.health.ok();
        assert!(spool.check_writable().is_ok());
    }

    #[test]
    fn a_directory_replaced_by_a_file_is_not_writable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spool, _) = Spool::open(dir.path()).expect("spool");
        std::fs::remove_dir(dir.path().join("state")).expect("rmdir");
        std::fs::write(dir.path().join("state"), b"x").expect("file");
        let e = spool.check_writable().expect_err("not writable");
        assert!(e.to_string().starts_with("spool not writable: "), "{e}");
        assert!(e.to_string().contains("not a directory"), "{e}");
    }
}
