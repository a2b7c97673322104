//! The PostgreSQL store: one queue shared by several relays (DESIGN.md, "Queue backends").
//!
//! # Tables (embedded, versioned migrations; see [`MIGRATIONS`])
//! - `relay_message`: one row per message: state (`queued`, `held`, `failed`), the envelope
//!   (the spool's versioned envelope header, so both stores read one format), size, delivery
//!   state (JSON with its version), and the claim: `lease_owner`, `lease_token`, `lease_until`.
//! - `relay_body`: the message bytes as `bytea` chunks of [`CHUNK`] bytes (read back piece by
//!   piece while a message is sent: `postgres/body.rs`), apart from the
//!   message rows so that claims and listings stay small.
//! - `relay_status`: the mailbox statuses for `queue list`.
//! - `relay_budget`, `relay_session_slot`, `relay_hold`: the mailbox budget the relays share
//!   (`postgres/budget.rs`).
//!
//! # Commit
//! A message's chunks are inserted as they arrive, in one transaction opened at the first full
//! chunk; its row and a `NOTIFY` follow at the end, then `COMMIT` with `synchronous_commit = on`
//! for that transaction whatever the server's default. Only then is `250` sent. A relay or
//! connection that dies first leaves nothing (the transaction rolls back).
//!
//! # Claims
//! `FOR UPDATE SKIP LOCKED` in a CTE sets a lease of `queue.lease`, renewed every third of it
//! while the attempt runs. A lease that expires (its relay died) is swept back into the queue
//! by any other relay, which logs the possible duplicate and delivers it.
//!
//! # Events
//! Changes are `NOTIFY`ed on [`CHANNEL`]; each relay listens on a dedicated connection (not
//! from the pool), reconnects when it is lost (and then announces `Changed`, since it may have
//! missed something), and every [`POLL_EVERY`] sweeps expired leases as a backup.

mod body;
mod budget;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio::sync::broadcast;
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{
    Claimed, DeliveryState, Depth, EntryState, Envelope, Incoming, Lease, LoadedMessage,
    QueueEntry, RecipientStatus, ShownMessage, StateProblem, Store, StoreError, StoreEvent,
    StoreFuture,
};
use crate::config::{DbUrl, QueueConfig};
use crate::spool::STATE_VERSION;
use crate::spool::format::{decode, encode_header};

/// The notification channel of every change.
pub const CHANNEL: &str = "smtp_oauth_relay";
/// Bytes per `relay_body` row: what an incoming message holds in memory at most.
pub const CHUNK: usize = 256 * 1024;
/// How often the listener sweeps expired leases (and retries a lost connection).
pub const POLL_EVERY: Duration = Duration::from_secs(2);
/// Connections in the pool: deliveries and sessions in DATA each hold one for a moment.
const POOL_SIZE: usize = 32;
/// How long a request waits for a connection (then `451`).
const CONNECT_WITHIN: Duration = Duration::from_secs(5);
/// The database's free disk space is not visible from here; a full one shows as SQLSTATE
/// 53100 (`452`). This stands for "enough".
const FREE_UNKNOWN: u64 = u64::MAX / 2;
/// Events a deliverer may fall behind by before it must re-read the whole queue.
const EVENT_BACKLOG: usize = 8192;
/// At most this much of a message is read for `queue show` (as the file spool).
const MAX_SHOWN_HEADERS: usize = 1 << 20;

/// The schema, one step per version. Append only: a released step is never edited.
pub const MIGRATIONS: &[&str] = &[
    // 1: messages, bodies, statuses.
    "CREATE TABLE relay_message (
        id text PRIMARY KEY,
        state text NOT NULL CHECK (state IN ('queued', 'held', 'failed')),
        received_at timestamptz NOT NULL,
        envelope bytea NOT NULL,
        size bigint NOT NULL,
        delivery jsonb,
        delivery_version integer,
        lease_owner text,
        lease_token bigint,
        lease_until timestamptz,
        claims integer NOT NULL DEFAULT 0
     );
     CREATE INDEX relay_message_queued ON relay_message (received_at) WHERE state = 'queued';
     CREATE TABLE relay_body (
        id text NOT NULL REFERENCES relay_message (id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
        seq integer NOT NULL,
        chunk bytea NOT NULL,
        PRIMARY KEY (id, seq)
     );
     CREATE TABLE relay_status (
        mailbox text PRIMARY KEY,
        status jsonb NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
     );",
    // 2: the shared mailbox budget (see `budget`): a token bucket, session slots and the
    // hold per lane.
    "CREATE TABLE relay_budget (
        lane text PRIMARY KEY,
        tokens float8 NOT NULL,
        refreshed_at timestamptz NOT NULL
     );
     CREATE TABLE relay_session_slot (
        lane text NOT NULL,
        slot integer NOT NULL,
        holder text,
        token bigint,
        lease_until timestamptz,
        PRIMARY KEY (lane, slot)
     );
     CREATE TABLE relay_hold (
        lane text PRIMARY KEY,
        cause text NOT NULL,
        reply text NOT NULL,
        since timestamptz NOT NULL
     );",
    // 3: a mailbox-wide pause (432 4.3.2, Retry-After) that every relay's budget honours; a
    // time of its own rather than a debt of tokens, so that a reloaded rate neither shortens
    // nor lengthens it.
    "ALTER TABLE relay_budget ADD COLUMN paused_until timestamptz;",
];

/// The schema version this relay knows.
pub fn schema_version() -> i32 {
    MIGRATIONS.len() as i32
}

/// What the database answered instead.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("PostgreSQL {what}: {source}{}", sqlstate(.source))]
    Db {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL: no connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(
        "the database's queue schema is version {found}, newer than this relay knows ({known}): \
         upgrade this relay (a newer one migrated the database)"
    )]
    NewerSchema { found: i32, known: i32 },
    #[error("PostgreSQL setup: {0}")]
    Setup(String),
    #[error("message {id}: {problem}")]
    Corrupt { id: String, problem: String },
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| format!(" (SQLSTATE {})", c.code()))
        .unwrap_or_default()
}

fn db(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    move |source| PgError::Db { what, source }
}

impl PgError {
    fn is_full(&self) -> bool {
        let code = match self {
            PgError::Db { source, .. } => source.code(),
            PgError::Pool(deadpool_postgres::PoolError::Backend(e)) => e.code(),
            _ => None,
        };
        matches!(
            code,
            Some(c) if *c == SqlState::DISK_FULL || *c == SqlState::OUT_OF_MEMORY
        )
    }
}

impl From<PgError> for StoreError {
    fn from(e: PgError) -> StoreError {
        if e.is_full() {
            StoreError::Full(Box::new(e))
        } else {
            StoreError::Failed(Box::new(e))
        }
    }
}

struct Inner {
    pool: Pool,
    pg: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    /// What the URL looks like without its password, for logs.
    shown: String,
    /// This relay process, as recorded in `lease_owner` and notification payloads.
    owner: String,
    lease: Duration,
    /// Makes every claim's lease unique, so a late release never ends a newer claim.
    tokens: AtomicI64,
    ids: Mutex<ulid::Generator>,
    migrated: tokio::sync::OnceCell<()>,
    events: broadcast::Sender<StoreEvent>,
    listening: AtomicBool,
    /// A listing failed since the last `Changed` the listener sent.
    list_failed: AtomicBool,
    /// Ids claimed in this process (a second claim here waits for the first to end).
    claims: super::ClaimSet,
    /// Statuses last published by this process (a publish that changes nothing writes nothing).
    statuses: Mutex<HashMap<String, serde_json::Value>>,
}

/// The store. Cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &self.inner.shown)
            .finish()
    }
}

/// The connection settings from `queue.url`: `sslmode=require` unless the URL says otherwise
/// (the configuration refuses `disable`/`prefer` for anything but loopback).
fn pg_config(url: &DbUrl) -> Result<tokio_postgres::Config, PgError> {
    // tokio-postgres' message for a bad URL never quotes it.
    let mut pg: tokio_postgres::Config = url
        .expose()
        .trim()
        .parse()
        .map_err(|e| PgError::Setup(format!("queue.url: {e}")))?;
    let explicit = url::Url::parse(url.expose().trim())
        .map(|u| u.query_pairs().any(|(k, _)| k == "sslmode"))
        .unwrap_or(false);
    if !explicit {
        pg.ssl_mode(tokio_postgres::config::SslMode::Require);
    }
    if pg.get_application_name().is_none() {
        pg.application_name("smtp-oauth-relay");
    }
    pg.connect_timeout(CONNECT_WITHIN);
    Ok(pg)
}

fn tls(ca_file: Option<&std::path::Path>) -> Result<MakeRustlsConnect, PgError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let bad = |e: &dyn std::fmt::Display| {
            PgError::Setup(format!("queue.ca_file {}: {e}", path.display()))
        };
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
            roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| PgError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

fn process_owner() -> String {
    let host = crate::config::Config::default().smtp.hostname;
    format!("{host}/{}/{}", std::process::id(), ulid::Ulid::generate())
}

impl PgStore {
    /// Prepares the store without connecting: the first request connects and migrates, so a
    /// relay started while the database is down waits for it, not ready, instead of exiting.
    pub fn open(queue: &QueueConfig) -> Result<PgStore, PgError> {
        let url = queue
            .url
            .as_ref()
            .ok_or_else(|| PgError::Setup("queue.url is not set".into()))?;
        let pg = pg_config(url)?;
        let tls = tls(queue.ca_file.as_deref())?;
        let manager = Manager::from_config(
            pg.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_WITHIN))
            .create_timeout(Some(CONNECT_WITHIN))
            .recycle_timeout(Some(CONNECT_WITHIN))
            .build()
            .map_err(|e| PgError::Setup(e.to_string()))?;
        Ok(PgStore {
            inner: Arc::new(Inner {
                pool,
                pg,
                tls,
                shown: url.shown(),
                owner: process_owner(),
                lease: queue.lease,
                tokens: AtomicI64::new(0),
                ids: Mutex::new(ulid::Generator::new()),
                migrated: tokio::sync::OnceCell::new(),
                events: broadcast::channel(EVENT_BACKLOG).0,
                listening: AtomicBool::new(false),
                list_failed: AtomicBool::new(false),
                claims: Default::default(),
                statuses: Mutex::default(),
            }),
        })
    }

    /// The URL without its password.
    pub fn shown_url(&self) -> &str {
        &self.inner.shown
    }

    /// A pooled connection to a database whose schema this relay knows.
    async fn client(&self) -> Result<Object, PgError> {
        let client = self.inner.pool.get().await?;
        self.inner
            .migrated
            .get_or_try_init(|| migrate(&client))
            .await?;
        Ok(client)
    }

    fn new_id(&self) -> String {
        let mut g = self.inner.ids.lock().unwrap_or_else(|p| p.into_inner());
        match g.generate() {
            Ok(u) => u.to_string(),
            Err(_) => ulid::Ulid::generate().to_string(),
        }
    }

    /// Announces a change here at once and to the other relays at commit of `client`'s
    /// current statement (a `NOTIFY` in autocommit is sent at once too).
    async fn notify(&self, client: &Object, what: &str) -> Result<(), PgError> {
        let payload = format!("{} {what}", self.inner.owner);
        client
            .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
            .await
            .map_err(db("notify"))?;
        Ok(())
    }

    fn announce(&self, event: StoreEvent) {
        let _ = self.inner.events.send(event);
    }
}

/// Runs the migrations this database lacks, one relay at a time; refuses a newer schema.
async fn migrate(client: &Object) -> Result<(), PgError> {
    client
        .batch_execute(
            "BEGIN;
             SET LOCAL client_min_messages = warning;
             SELECT pg_advisory_xact_lock(hashtext('smtp-oauth-relay schema'));
             CREATE TABLE IF NOT EXISTS relay_schema (
                version integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
             );",
        )
        .await
        .map_err(db("migrate"))?;
    let result = async {
        let row = client
            .query_one("SELECT coalesce(max(version), 0) FROM relay_schema", &[])
            .await
            .map_err(db("read the schema version"))?;
        let found: i32 = col(&row, 0)?;
        let known = schema_version();
        if found > known {
            return Err(PgError::NewerSchema { found, known });
        }
        for (i, step) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let version = i as i32 + 1;
            client.batch_execute(step).await.map_err(db("migrate"))?;
            client
                .execute(
                    "INSERT INTO relay_schema (version) VALUES ($1)",
                    &[&version],
                )
                .await
                .map_err(db("migrate"))?;
            tracing::info!(version, "queue schema migrated");
        }
        client.batch_execute("COMMIT").await.map_err(db("migrate"))
    }
    .await;
    if result.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result?;
    // 250 waits for the commit to be flushed: say so when the server would not have.
    let settings = client
        .query_one(
            "SELECT current_setting('synchronous_commit'), current_setting('fsync')",
            &[],
        )
        .await
        .map_err(db("read settings"))?;
    let (sync, fsync): (String, String) = (col(&settings, 0)?, col(&settings, 1)?);
    if sync != "on" && sync != "remote_apply" && sync != "remote_write" {
        tracing::warn!(
            synchronous_commit = %sync,
            "the database's synchronous_commit is not on: the relay sets it on for every \
             message it acknowledges, other writes follow the server's setting"
        );
    }
    if fsync != "on" {
        tracing::warn!(
            "THE DATABASE RUNS WITH fsync=off: a server crash can lose mail the relay \
             acknowledged with 250 (fine for tests, never for production)"
        );
    }
    Ok(())
}

/// The one place a claimed message is built from what the database holds: its head in memory,
/// the rest read from `relay_body` while it is sent (`postgres/body.rs`).
fn loaded_message(
    id: String,
    envelope: Envelope,
    body: crate::spool::MessageBody,
) -> LoadedMessage {
    LoadedMessage { id, envelope, body }
}

/// A column of a row this relay's own query shaped; a mismatch is an error, never a panic.
fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    i: usize,
) -> Result<T, PgError> {
    row.try_get(i).map_err(db("read a column"))
}

fn decode_envelope(id: &str, bytes: &[u8]) -> Result<(Envelope, u64), PgError> {
    decode(bytes)
        .map(|h| (h.envelope, h.body_length))
        .map_err(|e| PgError::Corrupt {
            id: id.to_string(),
            problem: format!("unreadable envelope: {e}"),
        })
}

fn parse_state(
    delivery: Option<serde_json::Value>,
    version: Option<i32>,
) -> Result<Option<DeliveryState>, StateProblem> {
    let Some(value) = delivery else {
        return Ok(None);
    };
    let version = version.unwrap_or(1).max(0) as u32;
    if version > STATE_VERSION {
        return Err(StateProblem::NewerVersion(version));
    }
    serde_json::from_value(value)
        .map(Some)
        .map_err(|e| StateProblem::Unreadable(e.to_string()))
}

fn state_json(state: &DeliveryState) -> Result<serde_json::Value, PgError> {
    serde_json::to_value(state).map_err(|e| PgError::Setup(e.to_string()))
}

fn entry_state(text: &str) -> EntryState {
    match text {
        "held" => EntryState::Held,
        "failed" => EntryState::Failed,
        _ => EntryState::Queued,
    }
}

fn check_id(id: &str) -> Result<String, StoreError> {
    crate::spool::normalize_id(id).ok_or_else(|| StoreError::InvalidId(id.to_string()))
}

/// A message being received: chunks go to the database as they fill, in one transaction.
struct PgIncoming {
    store: PgStore,
    id: String,
    envelope: Envelope,
    buf: Vec<u8>,
    /// The connection with the message's transaction open, from the first full chunk on.
    conn: Option<Object>,
    seq: i32,
    size: u64,
}

impl PgIncoming {
    async fn begin(&mut self) -> Result<&Object, PgError> {
        if self.conn.is_none() {
            let client = self.store.client().await?;
            // on: the COMMIT returns once the message is flushed (and on synchronous standbys).
            client
                .batch_execute("BEGIN; SET LOCAL synchronous_commit TO on")
                .await
                .map_err(db("begin"))?;
            self.conn = Some(client);
        }
        self.conn
            .as_ref()
            .ok_or_else(|| PgError::Setup("no connection".into()))
    }

    async fn flush(&mut self) -> Result<(), PgError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let (id, seq) = (self.id.clone(), self.seq);
        let chunk = std::mem::take(&mut self.buf);
        let client = self.begin().await?;
        client
            .execute(
                "INSERT INTO relay_body (id, seq, chunk) VALUES ($1, $2, $3)",
                &[&id, &seq, &chunk.as_slice()],
            )
            .await
            .map_err(db("store a message chunk"))?;
        self.seq += 1;
        // The allocation is reused for the next chunk.
        self.buf = chunk;
        self.buf.clear();
        Ok(())
    }

    async fn commit_inner(&mut self) -> Result<String, PgError> {
        self.flush().await?;
        let header = encode_header(&self.id, &self.envelope, self.size)
            .map_err(|e| PgError::Setup(e.to_string()))?;
        let (id, size, received) = (self.id.clone(), self.size as i64, self.envelope.received_at);
        // The other relays place it in its mailbox's lane from the notification alone.
        let routing = serde_json::to_string(&self.envelope.routing())
            .map_err(|e| PgError::Setup(e.to_string()))?;
        let payload = format!("{} c {id} {routing}", self.store.inner.owner);
        let client = self.begin().await?;
        client
            .execute(
                "INSERT INTO relay_message (id, state, received_at, envelope, size)
                 VALUES ($1, 'queued', $2, $3, $4)",
                &[&id, &received, &header, &size],
            )
            .await
            .map_err(db("store a message"))?;
        client
            .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
            .await
            .map_err(db("notify"))?;
        client.batch_execute("COMMIT").await.map_err(db("commit"))?;
        Ok(id)
    }
}

impl Drop for PgIncoming {
    fn drop(&mut self) {
        // Not committed: closing the connection rolls its transaction back (a connection in a
        // transaction must never return to the pool).
        if let Some(conn) = self.conn.take() {
            drop(Object::take(conn));
        }
    }
}

impl Incoming for PgIncoming {
    fn id(&self) -> &str {
        &self.id
    }

    fn write<'a>(&'a mut self, bytes: &'a [u8]) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut rest = bytes;
            while !rest.is_empty() {
                let take = (CHUNK - self.buf.len()).min(rest.len());
                self.buf.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                self.size += take as u64;
                if self.buf.len() >= CHUNK {
                    self.flush().await?;
                }
            }
            Ok(())
        })
    }

    fn commit(mut self: Box<Self>) -> StoreFuture<'static, Result<String, StoreError>> {
        Box::pin(async move {
            let committed = self.commit_inner().await;
            match committed {
                Ok(id) => {
                    // Committed: the connection is clean again and goes back to the pool.
                    drop(self.conn.take());
                    self.store
                        .announce(StoreEvent::Committed(id.clone(), self.envelope.routing()));
                    Ok(id)
                }
                // Dropping self closes the connection: whatever was begun is rolled back.
                Err(e) => Err(StoreError::from(e)),
            }
        })
    }

    fn abort(mut self: Box<Self>) -> StoreFuture<'static, ()> {
        Box::pin(async move {
            if let Some(conn) = self.conn.take()
                && conn.batch_execute("ROLLBACK").await.is_err()
            {
                drop(Object::take(conn));
            }
        })
    }
}

/// A claim's lease: renewed while held, released (best effort; else it expires) when dropped.
struct PgLease {
    store: Weak<Inner>,
    id: String,
    token: i64,
    renew: tokio::task::JoinHandle<()>,
}

impl Drop for PgLease {
    fn drop(&mut self) {
        self.renew.abort();
        let Some(inner) = self.store.upgrade() else {
            return;
        };
        inner.claims.give_back(&self.id);
        let (id, token) = (self.id.clone(), self.token);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Ok(client) = inner.pool.get().await {
                    // Only this claim's lease: a newer claim has another token.
                    let _ = client
                        .execute(
                            "UPDATE relay_message SET lease_owner = NULL, lease_token = NULL,
                                    lease_until = NULL
                              WHERE id = $1 AND lease_owner = $2 AND lease_token = $3",
                            &[&id, &inner.owner, &token],
                        )
                        .await;
                }
            });
        }
    }
}

async fn renew(store: Weak<Inner>, id: String, token: i64, lease: Duration) {
    loop {
        tokio::time::sleep(lease / 3).await;
        let Some(inner) = store.upgrade() else {
            return;
        };
        let renewed = match inner.pool.get().await {
            Ok(client) => client
                .execute(
                    "UPDATE relay_message SET lease_until = now() + make_interval(secs => $4)
                      WHERE id = $1 AND lease_owner = $2 AND lease_token = $3",
                    &[&id, &inner.owner, &token, &lease.as_secs_f64()],
                )
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match renewed {
            Ok(1) => {}
            Ok(_) => {
                tracing::warn!(
                    id,
                    "lease on the message lost (expired, or the message was held or deleted); \
                     another relay may deliver it too"
                );
                return;
            }
            Err(error) => tracing::warn!(id, %error, "cannot renew the lease on the message"),
        }
    }
}

impl PgStore {
    async fn claim_id(&self, id: &str) -> Result<Option<Claimed>, StoreError> {
        let id = check_id(id)?;
        if !self.inner.claims.take(&id) {
            return Ok(None);
        }
        let token = self.inner.tokens.fetch_add(1, Ordering::Relaxed) + 1;
        let lease = PgLease {
            store: Arc::downgrade(&self.inner),
            id: id.clone(),
            token,
            renew: tokio::spawn(renew(
                Arc::downgrade(&self.inner),
                id.clone(),
                token,
                self.inner.lease,
            )),
        };
        let client = self.client().await?;
        // This process's own older lease may be claimed again: the in-process set above says
        // no claim of it is running here (its release may still be on its way).
        let row = client
            .query_opt(
                "WITH c AS (
                    SELECT id, lease_owner FROM relay_message
                     WHERE id = $1 AND state = 'queued'
                       AND (lease_until IS NULL OR lease_until < now() OR lease_owner = $2)
                     FOR UPDATE SKIP LOCKED)
                 UPDATE relay_message m
                    SET lease_owner = $2, lease_token = $3,
                        lease_until = now() + make_interval(secs => $4), claims = m.claims + 1
                   FROM c WHERE m.id = c.id
                 RETURNING m.envelope, m.delivery, m.delivery_version, c.lease_owner",
                &[
                    &id,
                    &self.inner.owner,
                    &token,
                    &self.inner.lease.as_secs_f64(),
                ],
            )
            .await
            .map_err(db("claim"))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let previous: Option<String> = col(&row, 3)?;
        if let Some(previous) = previous.filter(|p| *p != self.inner.owner) {
            tracing::warn!(
                id,
                relay = %previous,
                "possible duplicate: the lease of another relay on this message expired \
                 (it died or lost the database mid-attempt); delivering it again"
            );
        }
        let (envelope, size) = decode_envelope(&id, col::<&[u8]>(&row, 0)?)?;
        let state = match parse_state(col(&row, 1)?, col(&row, 2)?) {
            Ok(state) => state,
            Err(StateProblem::Unreadable(reason)) => {
                tracing::warn!(
                    id,
                    %reason,
                    "delivery state unreadable: reset, the message is delivered as new \
                     (recipients an earlier attempt reached may get it twice)"
                );
                client
                    .execute(
                        "UPDATE relay_message SET delivery = NULL, delivery_version = NULL
                          WHERE id = $1",
                        &[&id],
                    )
                    .await
                    .map_err(db("reset the delivery state"))?;
                None
            }
            Err(problem @ StateProblem::NewerVersion(_)) => {
                client
                    .execute(
                        "UPDATE relay_message SET state = 'held' WHERE id = $1",
                        &[&id],
                    )
                    .await
                    .map_err(db("hold"))?;
                tracing::error!(
                    id,
                    reason = %problem,
                    "message held, not delivered: its delivery state was written by a newer \
                     smtp-oauth-relay; upgrade, or `queue retry ID` resets the state and sends it"
                );
                return Ok(None);
            }
        };
        // The rows' sizes alone (no chunk is read): a message stored short is refused before
        // anything of it is sent.
        let rows = client
            .query_one(
                "SELECT count(*), coalesce(sum(octet_length(chunk)), 0)::bigint,
                        coalesce(max(seq), -1)::bigint
                   FROM relay_body WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(db("read a message"))?;
        let (count, stored, last): (i64, i64, i64) =
            (col(&rows, 0)?, col(&rows, 1)?, col(&rows, 2)?);
        if stored as u64 != size || count != last + 1 {
            return Err(PgError::Corrupt {
                id,
                problem: format!("{stored} bytes in {count} chunks stored, {size} bytes expected"),
            }
            .into());
        }
        drop(client);
        let source = Arc::new(body::PgBody::new(self.clone(), id.clone(), size));
        let body = crate::spool::MessageBody::from_source(source, size)
            .await
            .map_err(|e| StoreError::Failed(Box::new(e)))?;
        Ok(Some(Claimed::new(
            loaded_message(id, envelope, body),
            state,
            Lease::new(lease),
        )))
    }
}

/// The message's bytes in order, at most about `limit` of them.
async fn read_body(
    client: &Object,
    id: &str,
    size: usize,
    limit: usize,
) -> Result<Vec<u8>, PgError> {
    use futures_util::StreamExt;
    use std::pin::pin;
    let rows = client
        .query_raw(
            "SELECT chunk FROM relay_body WHERE id = $1 ORDER BY seq",
            [id],
        )
        .await
        .map_err(db("read a message"))?;
    let mut rows = pin!(rows);
    let mut body = Vec::with_capacity(size.min(limit));
    while let Some(row) = rows.next().await {
        let row = row.map_err(db("read a message"))?;
        body.extend_from_slice(col::<&[u8]>(&row, 0)?);
        if body.len() >= limit {
            break;
        }
    }
    Ok(body)
}

impl PgStore {
    /// Changes a message's state in one transaction (the row locked, so a concurrent command
    /// waits); returns the state it was in. `f` gets the old state and delivery and returns
    /// the new delivery to write, if any.
    async fn transition(
        &self,
        id: &str,
        to: EntryState,
        f: impl FnOnce(EntryState, Option<DeliveryState>) -> Option<Option<DeliveryState>>,
    ) -> Result<EntryState, StoreError> {
        let id = check_id(id)?;
        let client = self.client().await?;
        client.batch_execute("BEGIN").await.map_err(db("begin"))?;
        let result = async {
            let row = client
                .query_opt(
                    "SELECT state, delivery, delivery_version FROM relay_message
                      WHERE id = $1 FOR UPDATE",
                    &[&id],
                )
                .await
                .map_err(db("lock a message"))?;
            let Some(row) = row else {
                return Ok(Err(StoreError::NotFound(id.clone())));
            };
            let was = entry_state(col(&row, 0)?);
            let state = parse_state(col(&row, 1)?, col(&row, 2)?).ok().flatten();
            match f(was, state) {
                Some(delivery) => {
                    let json = delivery.as_ref().map(state_json).transpose()?;
                    let version = json.as_ref().map(|_| STATE_VERSION as i32);
                    client
                        .execute(
                            "UPDATE relay_message SET state = $2, delivery = $3,
                                    delivery_version = $4
                              WHERE id = $1",
                            &[&id, &to.as_str(), &json, &version],
                        )
                        .await
                        .map_err(db("change a message"))?;
                }
                None => {
                    client
                        .execute(
                            "UPDATE relay_message SET state = $2 WHERE id = $1",
                            &[&id, &to.as_str()],
                        )
                        .await
                        .map_err(db("change a message"))?;
                }
            }
            self.notify(&client, "changed").await?;
            client.batch_execute("COMMIT").await.map_err(db("commit"))?;
            Ok::<_, PgError>(Ok(was))
        }
        .await;
        match result {
            Ok(Ok(was)) => {
                self.announce(StoreEvent::Changed);
                Ok(was)
            }
            Ok(Err(e)) => {
                let _ = client.batch_execute("ROLLBACK").await;
                Err(e)
            }
            Err(e) => {
                if client.batch_execute("ROLLBACK").await.is_err() {
                    drop(Object::take(client));
                }
                Err(e.into())
            }
        }
    }

    async fn list_all(&self) -> Result<Vec<QueueEntry>, StoreError> {
        let listed = self.list_rows(None).await;
        if listed.is_err() {
            self.inner.list_failed.store(true, Ordering::Release);
        }
        listed
    }

    /// Every message, or the one with id `only`.
    async fn list_rows(&self, only: Option<&str>) -> Result<Vec<QueueEntry>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, state, envelope, size, delivery, delivery_version
                   FROM relay_message WHERE $1::text IS NULL OR id = $1 ORDER BY id",
                &[&only],
            )
            .await
            .map_err(db("list"))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = col(&row, 0)?;
            let envelope = match decode_envelope(&id, col::<&[u8]>(&row, 2)?) {
                Ok((envelope, _)) => envelope,
                Err(error) => {
                    tracing::warn!(%error, "message skipped in the listing");
                    continue;
                }
            };
            let (delivery, state_problem) = match parse_state(col(&row, 4)?, col(&row, 5)?) {
                Ok(d) => (d, None),
                Err(p) => (None, Some(p)),
            };
            out.push(QueueEntry {
                state: entry_state(col(&row, 1)?),
                received_at: envelope.received_at,
                mail_from: envelope.mail_from.clone(),
                recipients: envelope
                    .recipients
                    .iter()
                    .map(|r| r.address.clone())
                    .collect(),
                route: envelope.route.clone(),
                auth_user: envelope.auth_user.clone(),
                size: col::<i64>(&row, 3)?.max(0) as u64,
                delivery,
                state_problem,
                id,
            });
        }
        Ok(out)
    }

    async fn show_one(&self, id: &str) -> Result<ShownMessage, StoreError> {
        let id = check_id(id)?;
        let entry = self
            .list_one(&id)
            .await?
            .ok_or_else(|| StoreError::NotFound(id.clone()))?;
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT envelope FROM relay_message WHERE id = $1", &[&id])
            .await
            .map_err(db("show"))?
            .ok_or_else(|| StoreError::NotFound(id.clone()))?;
        let (envelope, size) = decode_envelope(&id, col::<&[u8]>(&row, 0)?)?;
        let mut body = read_body(&client, &id, size as usize, MAX_SHOWN_HEADERS).await?;
        body.truncate(MAX_SHOWN_HEADERS);
        let headers = crate::headers::Headers::parse(&body).section().to_vec();
        Ok(ShownMessage {
            entry,
            envelope,
            headers,
        })
    }

    async fn list_one(&self, id: &str) -> Result<Option<QueueEntry>, StoreError> {
        // The listing's decoding is the one place entries are built.
        Ok(self.list_rows(Some(id)).await?.into_iter().next())
    }

    async fn readiness_check(&self, min_free: u64) -> Result<(), String> {
        if min_free > FREE_UNKNOWN {
            return Err(format!(
                "the database's free space is not known here; {min_free} bytes required \
                 (queue.min_free_space)"
            ));
        }
        let check = async {
            let client = self.client().await?;
            let row = client
                .query_one(
                    "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')",
                    &[],
                )
                .await
                .map_err(db("check"))?;
            Ok::<_, PgError>((col::<bool>(&row, 0)?, col::<String>(&row, 1)?))
        };
        match tokio::time::timeout(CONNECT_WITHIN * 2, check).await {
            Err(_) => Err(format!("the database {} does not answer", self.inner.shown)),
            Ok(Err(e)) => Err(format!("database {}: {e}", self.inner.shown)),
            Ok(Ok((recovery, read_only))) => {
                if recovery || read_only == "on" {
                    Err(format!(
                        "the database {} is read-only (a standby?): mail cannot be stored",
                        self.inner.shown
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// The listener: notifications from other relays and operator commands, and the sweep of
/// expired leases, until the store is dropped.
async fn listen(store: Weak<Inner>) {
    use tokio_postgres::AsyncMessage;
    let mut connected_before = false;
    loop {
        let Some(inner) = store.upgrade() else {
            return;
        };
        let (pg, tls, owner, shown) = (
            inner.pg.clone(),
            inner.tls.clone(),
            inner.owner.clone(),
            inner.shown.clone(),
        );
        drop(inner);
        let (client, mut connection) = match pg.connect(tls).await {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(url = %shown, %error, "cannot listen for queue changes; retrying");
                tokio::time::sleep(POLL_EVERY).await;
                continue;
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // Notifications arrive only while the connection is polled (tokio-postgres).
        let driver = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if tx.send(n.payload().to_string()).is_err() {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return,
                }
            }
        });
        if client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .is_ok()
        {
            // Whatever happened while this relay was not listening must be read again.
            if connected_before {
                tracing::info!("listening for queue changes again");
                if let Some(inner) = store.upgrade() {
                    let _ = inner.events.send(StoreEvent::Changed);
                }
            }
            connected_before = true;
            loop {
                tokio::select! {
                    payload = rx.recv() => {
                        let Some(payload) = payload else { break };
                        let Some(inner) = store.upgrade() else { return };
                        let mut words = payload.splitn(4, ' ');
                        let from = words.next().unwrap_or("");
                        if from == owner {
                            continue; // announced in-process already
                        }
                        let routing = |json: Option<&str>| {
                            json.and_then(|j| serde_json::from_str::<super::Routing>(j).ok())
                        };
                        // Without a readable routing (an older relay): read the queue again.
                        let event = match (words.next(), words.next(), words.next()) {
                            (Some("c"), Some(id), json) => match routing(json) {
                                Some(r) => StoreEvent::Committed(id.to_string(), r),
                                None => StoreEvent::Changed,
                            },
                            (Some("h"), _, _) => StoreEvent::HoldsChanged,
                            _ => StoreEvent::Changed,
                        };
                        let _ = inner.events.send(event);
                    }
                    _ = tokio::time::sleep(POLL_EVERY) => {
                        if store.upgrade().is_none() {
                            return;
                        }
                        if !sweep(&client, &owner, &store).await {
                            break;
                        }
                        // A listing failed (the database was away, e.g. when the relay
                        // started): now that it answers, the deliverer must read it again.
                        if let Some(inner) = store.upgrade()
                            && inner.list_failed.swap(false, Ordering::AcqRel)
                        {
                            let _ = inner.events.send(StoreEvent::Changed);
                        }
                    }
                }
            }
        }
        driver.abort();
        tracing::warn!(url = %shown, "lost the connection listening for queue changes; reconnecting");
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Returns expired leases of other relays to the queue; false when the connection failed.
async fn sweep(client: &tokio_postgres::Client, owner: &str, store: &Weak<Inner>) -> bool {
    // The CTE keeps the owner the lease had (RETURNING shows the row after the update).
    let rows = client
        .query(
            "WITH expired AS (
                SELECT id, lease_owner FROM relay_message
                 WHERE lease_until < now() AND lease_owner <> $1
                 FOR UPDATE SKIP LOCKED)
             UPDATE relay_message m
                SET lease_owner = NULL, lease_token = NULL, lease_until = NULL
               FROM expired WHERE m.id = expired.id
             RETURNING m.id, expired.lease_owner",
            &[&owner],
        )
        .await;
    let Ok(rows) = rows else {
        return false;
    };
    for row in &rows {
        let id: String = row.try_get(0).unwrap_or_default();
        let relay: String = row.try_get(1).unwrap_or_default();
        tracing::warn!(
            id,
            %relay,
            "possible duplicate: the lease of another relay on this message expired (it died \
             or lost the database mid-attempt); the message is queued again"
        );
    }
    if !rows.is_empty()
        && let Some(inner) = store.upgrade()
    {
        let _ = inner.events.send(StoreEvent::Changed);
    }
    true
}

impl Store for PgStore {
    fn put<'a>(
        &'a self,
        envelope: &'a Envelope,
    ) -> StoreFuture<'a, Result<Box<dyn Incoming>, StoreError>> {
        Box::pin(async move {
            Ok(Box::new(PgIncoming {
                store: self.clone(),
                id: self.new_id(),
                envelope: envelope.clone(),
                buf: Vec::new(),
                conn: None,
                seq: 0,
                size: 0,
            }) as Box<dyn Incoming>)
        })
    }

    fn list(&self) -> StoreFuture<'_, Result<Vec<QueueEntry>, StoreError>> {
        Box::pin(self.list_all())
    }

    fn show<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<ShownMessage, StoreError>> {
        Box::pin(self.show_one(id))
    }

    fn claim<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<Option<Claimed>, StoreError>> {
        Box::pin(self.claim_id(id))
    }

    fn update<'a>(
        &'a self,
        id: &'a str,
        state: &'a DeliveryState,
    ) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let id = check_id(id)?;
            let json = state_json(state)?;
            let client = self.client().await?;
            let n = client
                .execute(
                    "UPDATE relay_message SET delivery = $2, delivery_version = $3 WHERE id = $1",
                    &[&id, &json, &(STATE_VERSION as i32)],
                )
                .await
                .map_err(db("record an attempt"))?;
            if n == 0 {
                return Err(StoreError::NotFound(id));
            }
            Ok(())
        })
    }

    fn complete<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let id = check_id(id)?;
            let client = self.client().await?;
            let n = client
                .execute(
                    "DELETE FROM relay_message WHERE id = $1 AND state = 'queued'",
                    &[&id],
                )
                .await
                .map_err(db("remove a delivered message"))?;
            Ok(n > 0)
        })
    }

    fn fail<'a>(
        &'a self,
        id: &'a str,
        state: &'a DeliveryState,
    ) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let id = check_id(id)?;
            let json = state_json(state)?;
            let client = self.client().await?;
            let n = client
                .execute(
                    "UPDATE relay_message SET state = 'failed', delivery = $2,
                            delivery_version = $3
                      WHERE id = $1",
                    &[&id, &json, &(STATE_VERSION as i32)],
                )
                .await
                .map_err(db("fail a message"))?;
            if n == 0 {
                return Err(StoreError::NotFound(id));
            }
            Ok(())
        })
    }

    fn hold<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<EntryState, StoreError>> {
        Box::pin(self.transition(id, EntryState::Held, |_, _| None))
    }

    fn release<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<EntryState, StoreError>> {
        Box::pin(self.transition(id, EntryState::Queued, |_, _| None))
    }

    fn delete<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let id = check_id(id)?;
            let client = self.client().await?;
            let n = client
                .execute("DELETE FROM relay_message WHERE id = $1", &[&id])
                .await
                .map_err(db("delete"))?;
            if n == 0 {
                return Err(StoreError::NotFound(id));
            }
            self.notify(&client, "changed").await?;
            self.announce(StoreEvent::Changed);
            Ok(())
        })
    }

    fn retry<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<EntryState, StoreError>> {
        Box::pin(self.transition(id, EntryState::Queued, |_, state| {
            // A state this relay cannot read is reset (None); a readable one is sent again.
            let state = state.map(|mut state| {
                state.next_attempt = None;
                state.hold_reason = None;
                state.fail_reason = None;
                for r in &mut state.recipients {
                    if r.status == RecipientStatus::Failed {
                        r.status = RecipientStatus::Pending;
                    }
                }
                state
            });
            Some(state)
        }))
    }

    fn events(&self) -> broadcast::Receiver<StoreEvent> {
        let receiver = self.inner.events.subscribe();
        if let Ok(runtime) = tokio::runtime::Handle::try_current()
            && !self.inner.listening.swap(true, Ordering::AcqRel)
        {
            runtime.spawn(listen(Arc::downgrade(&self.inner)));
        }
        receiver
    }

    fn readiness(&self, min_free: u64) -> StoreFuture<'_, Result<(), String>> {
        Box::pin(self.readiness_check(min_free))
    }

    fn free_space(&self) -> Result<u64, StoreError> {
        Ok(FREE_UNKNOWN)
    }

    fn depth(&self) -> StoreFuture<'_, Depth> {
        Box::pin(async move {
            let Ok(client) = self.client().await else {
                return Depth::default();
            };
            match client
                .query_one(
                    "SELECT count(*), min(received_at) FROM relay_message WHERE state = 'queued'",
                    &[],
                )
                .await
            {
                Ok(row) => Depth {
                    queued: row.try_get::<_, i64>(0).unwrap_or(0).max(0) as usize,
                    oldest: row.try_get::<_, Option<SystemTime>>(1).ok().flatten(),
                },
                Err(_) => Depth::default(),
            }
        })
    }

    fn publish_status<'a>(
        &'a self,
        mailbox: &'a str,
        status: &'a serde_json::Value,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            {
                let mut all = self
                    .inner
                    .statuses
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if all.get(mailbox) == Some(status) {
                    return;
                }
                all.insert(mailbox.to_string(), status.clone());
            }
            let written = match self.client().await {
                Ok(client) => client
                    .execute(
                        "INSERT INTO relay_status (mailbox, status) VALUES ($1, $2)
                         ON CONFLICT (mailbox) DO UPDATE
                            SET status = EXCLUDED.status, updated_at = now()",
                        &[&mailbox, status],
                    )
                    .await
                    .is_ok(),
                Err(_) => false,
            };
            if !written {
                // Written again at the next publish.
                self.inner
                    .statuses
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(mailbox);
            }
        })
    }

    fn budget(&self) -> Option<Arc<dyn super::budget::SharedBudget>> {
        // Not kept in the store: the budget holds the store, and the store must be able to go.
        Some(Arc::new(budget::PgBudget::new(self.clone())))
    }

    fn statuses(&self) -> StoreFuture<'_, Vec<(String, serde_json::Value)>> {
        Box::pin(async move {
            let Ok(client) = self.client().await else {
                return Vec::new();
            };
            match client
                .query(
                    "SELECT mailbox, status FROM relay_status ORDER BY mailbox",
                    &[],
                )
                .await
            {
                Ok(rows) => rows
                    .iter()
                    .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?)))
                    .collect(),
                Err(_) => Vec::new(),
            }
        })
    }
}
