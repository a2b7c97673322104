//! The Store seam: the one owner of where messages live (DESIGN.md, "The seams").
//!
//! Inbound [`put`](Store::put)s a message and answers `250` once it is committed; the deliverer
//! [`claim`](Store::claim)s what is due, records each attempt ([`update`](Store::update)) and
//! ends it ([`complete`](Store::complete), [`fail`](Store::fail)); operator commands
//! [`hold`](Store::hold), [`release`](Store::release), [`delete`](Store::delete) and
//! [`retry`](Store::retry); readiness, the queue gauges and the mailbox status ask the store.
//! Nobody outside an implementation knows how it keeps messages. Every change reaches the
//! running deliverer as a [`StoreEvent`], from this process and from operator commands run in
//! another one.
//!
//! Implementations: the file spool ([`crate::spool::Spool`], the embedded default) and
//! PostgreSQL ([`postgres::PgStore`], one queue shared by several relays), chosen by
//! `queue.backend`. Both pass the same conformance suite (`tests/store_conformance.rs`).

pub mod budget;
pub mod postgres;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::broadcast;

pub use crate::spool::{
    BodyType, DeliveryState, EntryState, Envelope, LoadedMessage, MailParams, PossibleDuplicate,
    QueueEntry, Recipient, RecipientState, RecipientStatus, RecordedReply, ShownMessage,
    StateProblem,
};

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a store can answer instead of doing what was asked.
///
/// Inbound maps [`StoreError::Full`] to `452 4.3.1` and every other error to `451 4.3.0`: in no
/// case has a message been acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No message with this id (delivered, deleted, or never there).
    #[error("no message {0} in the queue")]
    NotFound(String),
    /// Not a message id (26 Crockford base32 characters).
    #[error("invalid message id {0:?}: expected 26 Crockford base32 characters")]
    InvalidId(String),
    /// The store cannot take more mail now (disk full, quota exhausted).
    #[error(transparent)]
    Full(BoxError),
    /// Anything else: the store could not do what was asked.
    #[error(transparent)]
    Failed(BoxError),
}

impl StoreError {
    /// True when more room would fix it: the listener answers `452` rather than `451`.
    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::Full(_))
    }
}

/// What the deliverer needs to put a message in its mailbox's lane without reading it: the
/// route chosen at accept and what a template route derives the mailbox from.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Routing {
    pub route: String,
    pub mail_from: String,
    pub auth_user: Option<String>,
}

impl Envelope {
    pub fn routing(&self) -> Routing {
        Routing {
            route: self.route.clone(),
            mail_from: self.mail_from.clone(),
            auth_user: self.auth_user.clone(),
        }
    }
}

impl QueueEntry {
    pub fn routing(&self) -> Routing {
        Routing {
            route: self.route.clone(),
            mail_from: self.mail_from.clone(),
            auth_user: self.auth_user.clone(),
        }
    }
}

/// A change the deliverer must know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// A new message was committed (received mail or a failure notice): due now.
    Committed(String, Routing),
    /// Messages changed state outside the deliverer (an operator command, here or in another
    /// process): what is queued must be read again.
    Changed,
    /// Another relay held or resumed a mailbox of the shared budget ([`budget::SharedHold`]).
    HoldsChanged,
}

/// Queue gauges, without reading any message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Depth {
    /// Messages waiting for delivery (queued, not held or failed).
    pub queued: usize,
    /// When the oldest of them was received.
    pub oldest: Option<SystemTime>,
}

/// A queued message taken for one delivery attempt. Until it is dropped no other claim of the
/// same message succeeds, so two attempts never run at once (in one process or, for a shared
/// store, in several).
pub struct Claimed {
    pub message: LoadedMessage,
    /// `None` when the message was never attempted.
    pub state: Option<DeliveryState>,
    _lease: Lease,
}

impl Claimed {
    /// A claim held by `lease` (whatever the implementation needs to end it when dropped).
    pub fn new(message: LoadedMessage, state: Option<DeliveryState>, lease: Lease) -> Claimed {
        Claimed {
            message,
            state,
            _lease: lease,
        }
    }
}

impl std::fmt::Debug for Claimed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claimed")
            .field("id", &self.message.id)
            .field("state", &self.state)
            .finish()
    }
}

/// The messages claimed in this process: what every store checks first, so that one process
/// never runs two attempts of one message (a shared store adds its own lease on top).
#[derive(Debug, Default)]
pub struct ClaimSet(std::sync::Mutex<std::collections::HashSet<String>>);

impl ClaimSet {
    /// Takes `id`; false when it is already claimed here.
    pub fn take(&self, id: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string())
    }

    /// Gives `id` back (the claim's lease ended).
    pub fn give_back(&self, id: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }
}

/// Ends a claim when dropped.
pub struct Lease(#[allow(dead_code)] Box<dyn Send + Sync>);

impl Lease {
    pub fn new(guard: impl Send + Sync + 'static) -> Lease {
        Lease(Box::new(guard))
    }
}

/// A message being received. Dropping it without [`commit`](Incoming::commit) discards it.
pub trait Incoming: Send + Sync {
    /// The message id (also the id in the `250` reply).
    fn id(&self) -> &str;
    /// Appends message bytes, exactly as they are to be delivered.
    fn write<'a>(&'a mut self, bytes: &'a [u8]) -> StoreFuture<'a, Result<(), StoreError>>;
    /// Makes the message durable; only then may the client be told `250`. Announces it as
    /// [`StoreEvent::Committed`].
    fn commit(self: Box<Self>) -> StoreFuture<'static, Result<String, StoreError>>;
    /// Discards the message.
    fn abort(self: Box<Self>) -> StoreFuture<'static, ()>;
}

/// Where messages live. See the module documentation for who calls what.
pub trait Store: Send + Sync + 'static {
    /// Starts a message with its envelope; its bytes follow through the returned writer.
    fn put<'a>(
        &'a self,
        envelope: &'a Envelope,
    ) -> StoreFuture<'a, Result<Box<dyn Incoming>, StoreError>>;

    /// Every message (queued, held, failed), oldest first, with its delivery state.
    fn list(&self) -> StoreFuture<'_, Result<Vec<QueueEntry>, StoreError>>;

    /// One message: envelope, state and header section.
    fn show<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<ShownMessage, StoreError>>;

    /// Takes a queued message for an attempt. `None` when it is no longer queued, already
    /// claimed, or its recorded state cannot be used (the store then deals with it: see the
    /// implementation).
    fn claim<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<Option<Claimed>, StoreError>>;

    /// Records an attempt's delivery state durably.
    fn update<'a>(
        &'a self,
        id: &'a str,
        state: &'a DeliveryState,
    ) -> StoreFuture<'a, Result<(), StoreError>>;

    /// Delivered: removes a queued message. False when it was no longer queued (an operator
    /// held or deleted it meanwhile): then it stays where it is.
    fn complete<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<bool, StoreError>>;

    /// Failed for good: the message is kept as failed with `state` (its reason).
    fn fail<'a>(
        &'a self,
        id: &'a str,
        state: &'a DeliveryState,
    ) -> StoreFuture<'a, Result<(), StoreError>>;

    /// Holds a message; returns the state it was in (`Held`: nothing changed).
    fn hold<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<EntryState, StoreError>>;

    /// Returns a held or failed message to the queue; returns the state it was in.
    fn release<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<EntryState, StoreError>>;

    /// Removes a message and its state for good.
    fn delete<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<(), StoreError>>;

    /// Deliver now: back in the queue, due now, failed recipients pending again, a state this
    /// relay cannot use reset. Returns the state it was in.
    fn retry<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<EntryState, StoreError>>;

    /// Every change from now on. A receiver that lags behind gets `Lagged`: it must then read
    /// the whole queue again, as for [`StoreEvent::Changed`].
    fn events(&self) -> broadcast::Receiver<StoreEvent>;

    /// `/readyz`: `Ok` while new mail can be stored with at least `min_free` bytes to spare,
    /// or why not.
    fn readiness(&self, min_free: u64) -> StoreFuture<'_, Result<(), String>>;

    /// Room for new mail in bytes (inbound refuses with `452` below `smtp.min_free_space`).
    /// Cheap enough to ask at every `MAIL FROM`.
    fn free_space(&self) -> Result<u64, StoreError>;

    /// Queue depth and the oldest queued message, for `/healthz` and `/metrics`.
    fn depth(&self) -> StoreFuture<'_, Depth>;

    /// Publishes a mailbox's delivery status (JSON, as `/healthz` shows it) for operator
    /// commands in other processes (`queue list`). Best effort: the messages are the record.
    fn publish_status<'a>(
        &'a self,
        mailbox: &'a str,
        status: &'a serde_json::Value,
    ) -> StoreFuture<'a, ()>;

    /// The statuses last published, by mailbox.
    fn statuses(&self) -> StoreFuture<'_, Vec<(String, serde_json::Value)>>;

    /// The mailbox budget shared with the other relays of this store ([`budget`]); `None`
    /// when this process is the only one delivering from it (the file spool): then each
    /// mailbox's local pacer is its whole budget.
    fn budget(&self) -> Option<Arc<dyn budget::SharedBudget>> {
        None
    }
}

/// Opens the store `serve` delivers from, recovering what a crash left behind. Returns the
/// store and what recovery found (for the log).
pub fn open(queue: &crate::config::QueueConfig) -> Result<(Arc<dyn Store>, String), OpenError> {
    if queue.backend == crate::config::Backend::Postgres {
        let store = open_postgres(queue)?;
        let report = format!("PostgreSQL queue at {}", store.shown_url());
        return Ok((Arc::new(store), report));
    }
    let (spool, report) = crate::spool::Spool::open(&queue.dir).map_err(|source| OpenError {
        what: queue.dir.display().to_string(),
        source: Box::new(source),
    })?;
    Ok((Arc::new(spool), report.to_string()))
}

/// Opens the store for an operator command while the daemon may be running (no recovery).
pub fn open_for_operator(queue: &crate::config::QueueConfig) -> Result<Arc<dyn Store>, OpenError> {
    match queue.backend {
        crate::config::Backend::Files => open_files_for_operator(&queue.dir),
        crate::config::Backend::Postgres => Ok(Arc::new(open_postgres(queue)?)),
    }
}

fn open_postgres(queue: &crate::config::QueueConfig) -> Result<postgres::PgStore, OpenError> {
    postgres::PgStore::open(queue).map_err(|source| OpenError {
        what: queue
            .url
            .as_ref()
            .map(|u| u.shown())
            .unwrap_or_else(|| "(no queue.url)".into()),
        source: Box::new(source),
    })
}

fn open_files_for_operator(dir: &Path) -> Result<Arc<dyn Store>, OpenError> {
    let spool = crate::spool::Spool::open_for_admin(dir).map_err(|source| OpenError {
        what: dir.display().to_string(),
        source: Box::new(source),
    })?;
    Ok(Arc::new(spool))
}

/// A store that cannot be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the queue {what}: {source}")]
pub struct OpenError {
    pub what: String,
    #[source]
    pub source: BoxError,
}
