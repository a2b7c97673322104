//! The file spool as a [`Store`]: the embedded default.
//!
//! Events: a commit announces itself ([`StoreEvent::Committed`]); an operator command (`queue
//! hold`, ..., run in this process or another) announces [`StoreEvent::Changed`] here and
//! writes the `wakeup` file, which the running daemon's spool watches, so a command in another
//! process reaches the deliverer within [`WATCH_EVERY`]. Mailbox statuses go to
//! `mailbox.json` for `queue list` in another process.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;

use super::incoming::blocking;
use super::{
    DeliveryState, EntryState, Envelope, IncomingMessage, Inner, QueueEntry, RecipientStatus,
    ShownMessage, Spool, SpoolError, StateProblem,
};
use crate::store::{Claimed, Depth, Incoming, Lease, Store, StoreError, StoreEvent, StoreFuture};

/// Events a deliverer may fall behind by before it must re-read the whole queue.
pub(crate) const EVENT_BACKLOG: usize = 8192;
/// How often the daemon's spool looks for changes made by operator commands in other processes.
pub const WATCH_EVERY: Duration = Duration::from_millis(250);
/// Written by every command that changes what is deliverable; watched by the daemon.
const WAKEUP_FILE: &str = "wakeup";
/// The mailbox statuses the deliverer published, read by `queue list`.
const STATUS_FILE: &str = "mailbox.json";

impl From<SpoolError> for StoreError {
    fn from(e: SpoolError) -> StoreError {
        match e {
            SpoolError::NotFound(id) => StoreError::NotFound(id),
            SpoolError::InvalidId(id) => StoreError::InvalidId(id),
            e if e.is_no_space() => StoreError::Full(Box::new(e)),
            e => StoreError::Failed(Box::new(e)),
        }
    }
}

impl Incoming for IncomingMessage {
    fn id(&self) -> &str {
        IncomingMessage::id(self)
    }

    fn write<'a>(&'a mut self, bytes: &'a [u8]) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.write_all(bytes).await.map_err(StoreError::from) })
    }

    fn commit(self: Box<Self>) -> StoreFuture<'static, Result<String, StoreError>> {
        Box::pin(async move {
            IncomingMessage::commit(*self)
                .await
                .map_err(StoreError::from)
        })
    }

    fn abort(self: Box<Self>) -> StoreFuture<'static, ()> {
        Box::pin(IncomingMessage::abort(*self))
    }
}

/// Runs a blocking spool call on tokio's blocking pool.
async fn run<T, F>(spool: &Spool, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&Spool) -> Result<T, SpoolError> + Send + 'static,
{
    let spool = spool.clone();
    blocking(move || f(&spool)).await.map_err(StoreError::from)
}

/// Ends an in-process claim when dropped.
struct ClaimGuard {
    inner: Weak<Inner>,
    id: String,
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            inner.claims.give_back(&self.id);
        }
    }
}

impl Spool {
    /// Tells the deliverer (here, and in the daemon's process through the wakeup file) that
    /// what is deliverable changed.
    fn announce_change(&self) -> Result<(), SpoolError> {
        let _ = self.inner.events.send(StoreEvent::Changed);
        let path = self.inner.sub(WAKEUP_FILE);
        // The content changes the modification time even on filesystems with coarse timestamps.
        let stamp = format!("{:?} {}\n", SystemTime::now(), std::process::id());
        std::fs::write(&path, stamp).map_err(|e| SpoolError::io("write", &path, e))
    }

    /// The claim behind [`Store::claim`]: the message and a state this relay can use, or
    /// `None`. A state file that cannot be used neither hides its message nor strands it: an
    /// unreadable one is reset (kept in `corrupt/`; the message is intact), one from a newer
    /// relay is not guessed at: the message is held until the operator upgrades or runs
    /// `queue retry`.
    fn claim_blocking(&self, id: &str) -> Result<Option<Claimed>, SpoolError> {
        let id = Spool::check_id(id)?;
        if !self.inner.claims.take(&id) {
            return Ok(None);
        }
        let lease = Lease::new(ClaimGuard {
            inner: Arc::downgrade(&self.inner),
            id: id.clone(),
        });
        let message = match self.load(&id) {
            Ok(m) => m,
            Err(SpoolError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let state = match self.read_state(&id) {
            Ok(state) => state,
            Err(SpoolError::BadState {
                path,
                problem: StateProblem::Unreadable(reason),
            }) => {
                let kept = self.reset_state(&id)?;
                tracing::warn!(
                    id,
                    state_file = %path.display(),
                    kept_as = %kept.as_deref().unwrap_or(&path).display(),
                    %reason,
                    "delivery state unreadable: reset, the message is delivered as new \
                     (recipients an earlier attempt reached may get it twice)"
                );
                None
            }
            Err(SpoolError::BadState {
                path,
                problem: problem @ StateProblem::NewerVersion(_),
            }) => {
                self.move_to(&id, EntryState::Held)?;
                tracing::error!(
                    id,
                    state_file = %path.display(),
                    reason = %problem,
                    "message held, not delivered: its delivery state was written by a newer \
                     smtp-oauth-relay; upgrade, or `queue retry ID` resets the state and sends it"
                );
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        Ok(Some(Claimed::new(message, state, lease)))
    }

    /// Puts a message back in `queue/`, due now, with its failed recipients pending again. A
    /// state file this relay cannot use is the operator's to reset: it goes to `corrupt/` and
    /// the message is sent as new.
    fn retry_blocking(&self, id: &str) -> Result<EntryState, SpoolError> {
        let state = match self.read_state(id) {
            Err(SpoolError::BadState { .. }) => {
                self.reset_state(id)?;
                None
            }
            other => other?,
        };
        // The state first: once the file is back in queue/, the deliverer may pick it up.
        if let Some(mut state) = state {
            state.next_attempt = None;
            state.hold_reason = None;
            state.fail_reason = None;
            for r in &mut state.recipients {
                if r.status == RecipientStatus::Failed {
                    r.status = RecipientStatus::Pending;
                }
            }
            self.write_state(id, &state)?;
        }
        self.move_to(id, EntryState::Queued)
    }

    /// Queue depth and oldest message from `queue/` file names (ULIDs carry their time), so a
    /// scrape never reads message files.
    fn depth_blocking(&self) -> Depth {
        let Ok(ids) = self.ids_in(EntryState::Queued) else {
            return Depth::default();
        };
        let oldest = ids
            .iter()
            .min()
            .and_then(|id| ulid::Ulid::from_string(id).ok())
            .map(|u| u.datetime());
        Depth {
            queued: ids.len(),
            oldest,
        }
    }

    fn readiness_blocking(&self, min_free: u64) -> Result<(), String> {
        self.check_writable().map_err(|e| e.to_string())?;
        let free = self
            .free_space()
            .map_err(|e| format!("cannot read free space of the spool: {e}"))?;
        if free < min_free {
            return Err(format!(
                "spool disk nearly full: {free} bytes free, {min_free} required (queue.min_free_space)"
            ));
        }
        Ok(())
    }

    /// Records `status` for `mailbox`; the file's new content when that changed anything.
    fn status_changed(&self, mailbox: &str, status: &serde_json::Value) -> Option<String> {
        let mut all = self
            .inner
            .statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if all.get(mailbox) == Some(status) {
            return None;
        }
        all.insert(mailbox.to_string(), status.clone());
        Some(serde_json::json!({ "mailboxes": &*all }).to_string())
    }

    fn write_statuses(&self, mailbox: &str, json: String) {
        let tmp = self
            .inner
            .tmp_dir()
            .join(format!("{STATUS_FILE}.{}", std::process::id()));
        let written = std::fs::write(&tmp, &json)
            .and_then(|()| std::fs::rename(&tmp, self.inner.sub(STATUS_FILE)));
        if written.is_err() {
            // Written again at the next change; forget this one so that it is.
            let _ = std::fs::remove_file(&tmp);
            self.inner
                .statuses
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(mailbox);
        }
    }

    fn statuses_blocking(&self) -> Vec<(String, serde_json::Value)> {
        let Ok(text) = std::fs::read_to_string(self.inner.sub(STATUS_FILE)) else {
            return Vec::new();
        };
        let Ok(serde_json::Value::Object(mut top)) = serde_json::from_str(&text) else {
            return Vec::new();
        };
        match top.remove("mailboxes") {
            Some(serde_json::Value::Object(map)) => map.into_iter().collect(),
            _ => Vec::new(),
        }
    }
}

type WakeupStamp = Option<(Option<SystemTime>, u64)>;

fn wakeup_stamp(path: &Path) -> WakeupStamp {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.modified().ok(), m.len()))
}

/// Turns the wakeup file's changes (operator commands in other processes) into events, while
/// the spool is open.
async fn watch_wakeup(inner: Weak<Inner>, path: std::path::PathBuf, mut seen: WakeupStamp) {
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let now = wakeup_stamp(&path);
        if now != seen {
            seen = now;
            tracing::info!("queue changed by an operator command");
            let _ = inner.events.send(StoreEvent::Changed);
        }
    }
}

impl Store for Spool {
    fn put<'a>(
        &'a self,
        envelope: &'a Envelope,
    ) -> StoreFuture<'a, Result<Box<dyn Incoming>, StoreError>> {
        Box::pin(async move {
            let incoming = self.create(envelope).await?;
            Ok(Box::new(incoming) as Box<dyn Incoming>)
        })
    }

    fn list(&self) -> StoreFuture<'_, Result<Vec<QueueEntry>, StoreError>> {
        Box::pin(run(self, |s| s.list()))
    }

    fn show<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<ShownMessage, StoreError>> {
        let id = id.to_string();
        Box::pin(run(self, move |s| s.show(&id)))
    }

    fn claim<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<Option<Claimed>, StoreError>> {
        let id = id.to_string();
        Box::pin(run(self, move |s| s.claim_blocking(&id)))
    }

    fn update<'a>(
        &'a self,
        id: &'a str,
        state: &'a DeliveryState,
    ) -> StoreFuture<'a, Result<(), StoreError>> {
        let (id, state) = (id.to_string(), state.clone());
        Box::pin(run(self, move |s| s.write_state(&id, &state)))
    }

    fn complete<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<bool, StoreError>> {
        let id = id.to_string();
        Box::pin(run(self, move |s| s.complete(&id)))
    }

    fn fail<'a>(
        &'a self,
        id: &'a str,
        state: &'a DeliveryState,
    ) -> StoreFuture<'a, Result<(), StoreError>> {
        let (id, state) = (id.to_string(), state.clone());
        Box::pin(run(self, move |s| {
            s.write_state(&id, &state)?;
            s.move_to(&id, EntryState::Failed).map(|_| ())
        }))
    }

    fn hold<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<EntryState, StoreError>> {
        let id = id.to_string();
        Box::pin(run(self, move |s| {
            let was = s.move_to(&id, EntryState::Held)?;
            s.announce_change()?;
            Ok(was)
        }))
    }

    fn release<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<EntryState, StoreError>> {
        let id = id.to_string();
        Box::pin(run(self, move |s| {
            let was = s.move_to(&id, EntryState::Queued)?;
            s.announce_change()?;
            Ok(was)
        }))
    }

    fn delete<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<(), StoreError>> {
        let id = id.to_string();
        Box::pin(run(self, move |s| {
            Spool::delete(s, &id)?;
            s.announce_change()
        }))
    }

    fn retry<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<EntryState, StoreError>> {
        let id = id.to_string();
        Box::pin(run(self, move |s| {
            let id = Spool::check_id(&id)?;
            let was = s.retry_blocking(&id)?;
            s.announce_change()?;
            Ok(was)
        }))
    }

    fn events(&self) -> broadcast::Receiver<StoreEvent> {
        let receiver = self.inner.events.subscribe();
        if let Ok(runtime) = tokio::runtime::Handle::try_current()
            && !self.inner.watching.swap(true, Ordering::AcqRel)
        {
            // The file as it is now: what changes from here on is news.
            let path = self.inner.sub(WAKEUP_FILE);
            let seen = wakeup_stamp(&path);
            runtime.spawn(watch_wakeup(Arc::downgrade(&self.inner), path, seen));
        }
        receiver
    }

    fn readiness(&self, min_free: u64) -> StoreFuture<'_, Result<(), String>> {
        let spool = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || spool.readiness_blocking(min_free))
                .await
                .unwrap_or_else(|e| Err(format!("spool check failed: {e}")))
        })
    }

    fn free_space(&self) -> Result<u64, StoreError> {
        Spool::free_space(self).map_err(StoreError::from)
    }

    fn depth(&self) -> StoreFuture<'_, Depth> {
        let spool = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || spool.depth_blocking())
                .await
                .unwrap_or_default()
        })
    }

    fn publish_status<'a>(
        &'a self,
        mailbox: &'a str,
        status: &'a serde_json::Value,
    ) -> StoreFuture<'a, ()> {
        // Called after every delivery: no write (create + rename, the largest cost of the
        // drain path in profiles) when nothing changed.
        let changed = self.status_changed(mailbox, status);
        let (spool, mailbox) = (self.clone(), mailbox.to_string());
        Box::pin(async move {
            if let Some(json) = changed {
                let _ =
                    tokio::task::spawn_blocking(move || spool.write_statuses(&mailbox, json)).await;
            }
        })
    }

    fn statuses(&self) -> StoreFuture<'_, Vec<(String, serde_json::Value)>> {
        let spool = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || spool.statuses_blocking())
                .await
                .unwrap_or_default()
        })
    }
}
