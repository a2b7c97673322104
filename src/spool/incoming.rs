//! Writing one message: streaming into `tmp/`, the commit protocol and group commit.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::Notify;

use super::error::{SpoolError, clone_io_error};
use super::fsutil::{self, FaultPoint};
use super::{EntryState, Envelope, Inner, format};

/// At most this many bytes are buffered in memory before they are written to the file.
pub const WRITE_BUFFER: usize = 256 * 1024;

pub(crate) async fn blocking<T, F>(f: F) -> Result<T, SpoolError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, SpoolError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(SpoolError::Io {
            op: "blocking task",
            path: PathBuf::new(),
            source: io::Error::other(e.to_string()),
        }),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// Failed, aborted, or an operation was cancelled mid-way: the tmp file is (being) removed.
    Discarded,
    Committed,
}

/// A message being received into `tmp/<ID>.msg`. Dropping it without [`commit`](Self::commit)
/// removes the temporary file (best effort).
pub struct IncomingMessage {
    inner: Arc<Inner>,
    id: String,
    tmp_path: PathBuf,
    file: Option<File>,
    buf: Vec<u8>,
    length_offset: u64,
    body_len: u64,
    phase: Phase,
    /// Announced with the commit (the deliverer's lane for it).
    routing: crate::store::Routing,
}

impl std::fmt::Debug for IncomingMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingMessage")
            .field("id", &self.id)
            .field("bytes_written", &self.body_len)
            .field("phase", &self.phase)
            .finish()
    }
}

impl IncomingMessage {
    pub(crate) async fn create(
        inner: Arc<Inner>,
        envelope: &Envelope,
    ) -> Result<IncomingMessage, SpoolError> {
        let id = inner.ids.next();
        let routing = envelope.routing();
        let (header, offset) = format::encode_with_offset(&id, envelope, 0)?;
        let tmp_path = inner.tmp_dir().join(format!("{id}.msg"));
        let file = {
            let inner = inner.clone();
            let path = tmp_path.clone();
            blocking(move || {
                inner
                    .faults
                    .check(FaultPoint::Create)
                    .and_then(|()| fsutil::create_exclusive(&path))
                    .map_err(|e| SpoolError::io("create", &path, e))
            })
            .await?
        };
        let mut buf = Vec::with_capacity(WRITE_BUFFER.max(header.len()));
        buf.extend_from_slice(&header);
        Ok(IncomingMessage {
            inner,
            id,
            tmp_path,
            file: Some(file),
            buf,
            length_offset: offset as u64,
            body_len: 0,
            phase: Phase::Open,
            routing,
        })
    }

    /// The message id (also the file name and the id in the `250` reply).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Body bytes received so far.
    pub fn bytes_written(&self) -> u64 {
        self.body_len
    }

    fn ensure_open(&self) -> Result<(), SpoolError> {
        match self.phase {
            Phase::Open if self.file.is_some() => Ok(()),
            _ => Err(SpoolError::Discarded(self.id.clone())),
        }
    }

    /// Append body bytes (exact bytes as they will be delivered). Memory use is bounded by
    /// [`WRITE_BUFFER`] whatever the chunk size. On error the temporary file is removed and the
    /// message can only be dropped.
    pub async fn write_all(&mut self, chunk: &[u8]) -> Result<(), SpoolError> {
        self.ensure_open()?;
        let mut rest = chunk;
        while !rest.is_empty() {
            if self.buf.len() >= WRITE_BUFFER {
                self.flush().await?;
            }
            let n = (WRITE_BUFFER - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..n]);
            self.body_len += n as u64;
            rest = &rest[n..];
        }
        if self.buf.len() >= WRITE_BUFFER {
            self.flush().await?;
        }
        Ok(())
    }

    /// Write the buffer to the file on the blocking pool.
    async fn flush(&mut self) -> Result<(), SpoolError> {
        // Marked discarded while the write is in flight: if this future is cancelled, Drop
        // removes the temporary file.
        self.phase = Phase::Discarded;
        let mut file = self.file.take().expect("open message has a file");
        let buf = std::mem::take(&mut self.buf);
        let inner = self.inner.clone();
        let path = self.tmp_path.clone();
        let (file, mut buf) = blocking(move || {
            let r = inner
                .faults
                .check(FaultPoint::Write)
                .and_then(|()| file.write_all(&buf));
            match r {
                Ok(()) => Ok((file, buf)),
                Err(e) => {
                    drop(file);
                    let _ = fs::remove_file(&path);
                    Err(SpoolError::io("write", &path, e))
                }
            }
        })
        .await
        .inspect_err(|e| self.inner.health.failed(e))?;
        buf.clear();
        self.file = Some(file);
        self.buf = buf;
        self.phase = Phase::Open;
        Ok(())
    }

    /// Make the message durable and return its id. Only after this returns `Ok` may the
    /// listener answer `250`: the file data is fsync'd, it has been renamed into `queue/`, and
    /// `queue/` has been fsync'd (shared with concurrent commits). On any error nothing remains
    /// in `queue/` or `tmp/` (best effort) and the client must be told to retry.
    pub async fn commit(mut self) -> Result<String, SpoolError> {
        self.ensure_open()?;
        self.phase = Phase::Discarded;
        let mut file = self.file.take().expect("open message has a file");
        let buf = std::mem::take(&mut self.buf);
        let inner = self.inner.clone();
        let tmp = self.tmp_path.clone();
        let dst = inner.msg_path(EntryState::Queued, &self.id);
        let digits = format::length_digits(self.body_len);
        let offset = self.length_offset;
        {
            let dst = dst.clone();
            blocking(move || {
                let res = (|| {
                    let w = |r: io::Result<()>| r.map_err(|e| SpoolError::io("write", &tmp, e));
                    if !buf.is_empty() {
                        w(inner.faults.check(FaultPoint::Write))?;
                        w(file.write_all(&buf))?;
                    }
                    w(inner.faults.check(FaultPoint::Write))?;
                    w(file.write_all_at(&digits, offset))?;
                    inner
                        .faults
                        .check(FaultPoint::FileFsync)
                        .and_then(|()| file.sync_all())
                        .map_err(|e| SpoolError::io("fsync", &tmp, e))?;
                    inner.counters.file_fsyncs.fetch_add(1, Ordering::Relaxed);
                    drop(file);
                    crate::failpoint::hit("after-body-fsync");
                    inner
                        .faults
                        .check(FaultPoint::Rename)
                        .and_then(|()| fsutil::rename_noreplace(&tmp, &dst))
                        .map_err(|e| SpoolError::io("rename", &tmp, e))?;
                    crate::failpoint::hit("after-rename");
                    Ok(())
                })();
                if res.is_err() {
                    let _ = fs::remove_file(&tmp);
                }
                res
            })
            .await
            .inspect_err(|e| self.inner.health.failed(e))?;
        }
        // Committed (renamed) but not yet durable.
        if let Err(e) = GroupCommit::sync(&self.inner).await {
            self.inner.health.failed(&e);
            // Durability cannot be promised: withdraw the message so the client's retry does
            // not create a duplicate (see the module docs for the crash case).
            let _ = blocking(move || {
                let _ = fs::remove_file(&dst);
                Ok(())
            })
            .await;
            return Err(e);
        }
        crate::failpoint::hit("after-dir-fsync");
        self.inner.health.ok();
        self.phase = Phase::Committed;
        self.inner.counters.commits.fetch_add(1, Ordering::Relaxed);
        // No receiver (no deliverer yet) is not an error: it reads the queue when it starts.
        let _ = self.inner.events.send(crate::store::StoreEvent::Committed(
            self.id.clone(),
            self.routing.clone(),
        ));
        Ok(self.id.clone())
    }

    /// Discard the message and remove its temporary file.
    pub async fn abort(mut self) {
        self.phase = Phase::Discarded;
        let file = self.file.take();
        let path = self.tmp_path.clone();
        let _ = blocking(move || {
            drop(file);
            remove_quietly(&path);
            Ok(())
        })
        .await;
        // Already removed: keep Drop from doing it again.
        self.phase = Phase::Committed;
    }
}

fn remove_quietly(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove temporary spool file")
        }
    }
}

impl Drop for IncomingMessage {
    fn drop(&mut self) {
        if self.phase == Phase::Committed {
            return;
        }
        // Never touches queue/: only the temporary name, which a committed message no longer has.
        drop(self.file.take());
        let path = std::mem::take(&mut self.tmp_path);
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(move || remove_quietly(&path));
            }
            Err(_) => remove_quietly(&path),
        }
    }
}

type RoundResult = Result<(), (&'static str, PathBuf, io::Error)>;

/// One directory fsync, shared by every commit that joined it before it started.
#[derive(Default)]
struct Round {
    result: OnceLock<RoundResult>,
}

struct GroupState {
    /// The round that has not started yet: a commit that renamed its file joins this one.
    open: Arc<Round>,
    /// An fsync is in progress.
    busy: bool,
}

/// Group commit of `fsync(queue/)`.
///
/// A committer joins the open round after its rename. If no fsync is running, it starts the
/// round (which covers every rename done before this point) and opens a new one; otherwise it
/// waits: the running fsync may have started before its rename, so it needs the next round.
/// The fsync runs entirely on the blocking pool and finishes the round itself, so a cancelled
/// committer can never wedge the others.
pub(crate) struct GroupCommit {
    state: Mutex<GroupState>,
    done: Notify,
}

/// Runs one round's fsync on the blocking pool and finishes the round, also if the task never
/// runs (runtime shutting down). The spool handle is released *before* the round is marked
/// done, so a committer that sees its round finish never races with a lingering reference
/// (which would keep the spool lock).
struct RoundGuard {
    group: Arc<GroupCommit>,
    round: Arc<Round>,
    inner: Option<Arc<Inner>>,
    dir: PathBuf,
    finished: bool,
}

impl RoundGuard {
    fn run(mut self) {
        let inner = self.inner.take().expect("round guard holds the spool");
        let r = inner
            .faults
            .check(FaultPoint::DirFsync)
            .and_then(|()| File::open(&self.dir)?.sync_all());
        inner.counters.dir_fsyncs.fetch_add(1, Ordering::Relaxed);
        drop(inner);
        let dir = self.dir.clone();
        self.finish(r.map_err(|e| ("fsync directory", dir, e)));
    }

    fn finish(&mut self, r: RoundResult) {
        self.finished = true;
        self.inner = None;
        let _ = self.round.result.set(r);
        self.group
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .busy = false;
        self.group.done.notify_waiters();
    }
}

impl Drop for RoundGuard {
    fn drop(&mut self) {
        if !self.finished {
            let dir = self.dir.clone();
            self.finish(Err((
                "fsync directory",
                dir,
                io::Error::other("directory fsync was not run"),
            )));
        }
    }
}

impl GroupCommit {
    pub(crate) fn new() -> GroupCommit {
        GroupCommit {
            state: Mutex::new(GroupState {
                open: Arc::new(Round::default()),
                busy: false,
            }),
            done: Notify::new(),
        }
    }

    /// Wait until a `fsync(queue/)` that started after the caller's rename has completed.
    pub(crate) async fn sync(inner: &Arc<Inner>) -> Result<(), SpoolError> {
        let group = &inner.group;
        let round = group
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .open
            .clone();
        loop {
            let notified = group.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = round.result.get() {
                return match r {
                    Ok(()) => Ok(()),
                    Err((op, path, e)) => Err(SpoolError::io(op, path, clone_io_error(e))),
                };
            }
            let lead = {
                let mut st = group.state.lock().unwrap_or_else(|e| e.into_inner());
                if !st.busy && Arc::ptr_eq(&st.open, &round) {
                    st.busy = true;
                    st.open = Arc::new(Round::default());
                    true
                } else {
                    false
                }
            };
            if lead {
                let guard = RoundGuard {
                    group: group.clone(),
                    round: round.clone(),
                    inner: Some(inner.clone()),
                    dir: inner.state_dir_of(EntryState::Queued),
                    finished: false,
                };
                tokio::task::spawn_blocking(move || guard.run());
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic group commit: while one fsync is in flight, every committer that arrives
    /// joins the next round, and that round is a single fsync for all of them.
    #[test]
    fn waiters_share_one_fsync() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("queue")).unwrap();
        let inner = Arc::new(super::super::new_inner(tmp.path(), None));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            // Pretend an fsync is running.
            inner.group.state.lock().unwrap().busy = true;
            let mut tasks = Vec::new();
            for _ in 0..16 {
                let inner = inner.clone();
                tasks.push(tokio::spawn(async move { GroupCommit::sync(&inner).await }));
            }
            // Let every task register as a waiter (current-thread runtime: they all run now).
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert_eq!(inner.counters.snapshot().dir_fsyncs, 0);
            // The pretend fsync finishes.
            inner.group.state.lock().unwrap().busy = false;
            inner.group.done.notify_waiters();
            for t in tasks {
                t.await.unwrap().unwrap();
            }
        });
        assert_eq!(inner.counters.snapshot().dir_fsyncs, 1);
    }

    /// A failed group fsync fails every committer of that round, and the next round works.
    #[test]
    fn failed_round_fails_all_members() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("queue")).unwrap();
        let inner = Arc::new(super::super::new_inner(tmp.path(), None));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            inner.group.state.lock().unwrap().busy = true;
            inner
                .faults
                .set(Some(fsutil::Fault::eio(FaultPoint::DirFsync)));
            let tasks: Vec<_> = (0..4)
                .map(|_| {
                    let inner = inner.clone();
                    tokio::spawn(async move { GroupCommit::sync(&inner).await })
                })
                .collect();
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            inner.group.state.lock().unwrap().busy = false;
            inner.group.done.notify_waiters();
            for t in tasks {
                let e = t.await.unwrap().unwrap_err();
                assert!(!e.is_no_space(), "{e}");
            }
            GroupCommit::sync(&inner).await.unwrap();
        });
        assert_eq!(inner.counters.snapshot().dir_fsyncs, 2);
    }
}
