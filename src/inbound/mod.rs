//! The local SMTP server that legacy applications talk to.
//!
//! Following mini-redis, [`Server::run`] takes bound listeners and a shutdown token, so tests
//! drive it on ephemeral ports. Each connection is checked against `allow_networks`, counted
//! against `max_connections`, and handed to a [`session::Session`].
//!
//! Limits and their reasons:
//! - command line: 4096 octets (smtp-proto's buffer; RFC 5321 §4.5.3.1.4 requires 512, RFC 4954
//!   raises it for AUTH) → `500 5.5.2`;
//! - message size: `smtp.max_message_size`, refused early on `SIZE=` (RFC 1870) and while
//!   receiving → `552 5.3.4`;
//! - recipients: `smtp.max_recipients` (RFC 5321 §4.5.3.1.8: at least 100) → `452 4.5.3`;
//! - connections: `smtp.max_connections` → `421 4.3.2` at connect;
//! - timeouts: `smtp.command_timeout` (RFC 5321 §4.5.3.2.7: at least 5 minutes) and
//!   `smtp.data_timeout` per read during DATA (§4.5.3.2.5: 3 minutes) → `421 4.4.2`;
//! - DATA/BDAT rate: `smtp.min_data_rate` (Postfix `smtpd_min_data_rate`) → `421 4.4.2`;
//! - writes: `smtp.write_timeout` per reply batch (Postfix bounds writes with `smtpd_timeout`):
//!   a client that does not read is dropped; the TLS handshake gets `command_timeout`;
//! - errors: `smtp.max_errors` replies of class 4/5 → `421 4.7.0` and disconnect.
//!
//! Each `[[smtp.listener]]` has its own [`InboundSettings`] (resolved once at start, unset keys
//! from `[smtp]`) and its own `max_connections`; the `smtp.listen` addresses share `[smtp]`'s.
//! With `tls = "implicit"` (SMTPS) the TLS handshake comes before the greeting.

mod auth;
mod commands;
mod data;
// Public for fuzz/ (which compiles the file on its own) and the tests.
pub mod framing;
pub mod local;
pub mod message;
pub mod reply;
mod session;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use auth::{AuthFailures, AuthPolicy, HashError, hash_password};
use reply::Reply;
// Public for the fuzz loop in tests/fault_hostile_input.rs (a session over any stream).
pub use session::{Next, Session};

use crate::config::{Config, ListenTls, ListenerConfig, ListenerSettings};
use crate::store::Store;

/// How long sessions get to finish after shutdown starts before they are cut off.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    /// `key`: `smtp.tls_cert_file / smtp.tls_key_file`, or a listener's.
    #[error("{key}: {reason}")]
    Tls { key: String, reason: String },
    #[error("{key}: {reason}")]
    Auth { key: String, reason: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The listener's settings, resolved from [`Config`] once at start.
pub struct InboundSettings {
    pub hostname: String,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_connections: usize,
    pub allow_networks: Vec<IpNet>,
    /// Where these settings come from in relay.toml (`smtp.` or `smtp.listener.N.`), so that
    /// a refusal in the log names the key to change.
    pub key_prefix: String,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub write_timeout: Duration,
    /// Bytes per second a message transfer must keep up (see `Session::read_limit`).
    pub min_data_rate: u64,
    /// What `RCPT TO:<Postmaster>` (no domain, RFC 5321 §4.5.1) is delivered to.
    pub postmaster: String,
    pub max_errors: u32,
    pub min_free_space: u64,
    /// STARTTLS, or with `implicit_tls` the handshake at connect; `None`: plain only.
    pub tls: Option<TlsAcceptor>,
    /// `tls = "implicit"` (SMTPS): TLS before the greeting, no STARTTLS.
    pub implicit_tls: bool,
    pub auth: AuthPolicy,
    /// `smtp.allow_plaintext_auth_on_loopback`: AUTH without TLS from 127.0.0.0/8 and ::1.
    pub plaintext_auth_on_loopback: bool,
}

/// The largest message accepted: `smtp.max_message_size`, and with `transport = "graph"` no more
/// than `sendMail` takes once the relay's own header fields (Received, an added Bcc) are in:
/// refused at once (552 5.3.4, early on `SIZE=`) rather than accepted and failed later. With
/// `upstream.graph_large_messages` the Graph transport takes larger ones through a draft and
/// upload sessions, so `smtp.max_message_size` alone applies.
pub fn accept_limit(config: &Config) -> u64 {
    graph_cap(config, config.smtp.max_message_size.0)
}

/// `configured` lowered to what `transport = "graph"` can send (see [`accept_limit`]).
fn graph_cap(config: &Config, configured: u64) -> u64 {
    match config.upstream.transport {
        crate::config::TransportKind::Smtp => configured,
        crate::config::TransportKind::Graph if config.upstream.graph_large_messages => configured,
        crate::config::TransportKind::Graph => {
            configured.min(crate::transport::graph::SENDMAIL_MAX_RAW - GRAPH_HEADER_RESERVE)
        }
    }
}

/// Room kept for the fields the relay adds before Graph sees the message (a Bcc of hundreds of
/// envelope recipients included).
const GRAPH_HEADER_RESERVE: u64 = 64 * 1024;

impl InboundSettings {
    /// The `smtp.listen` addresses' settings: `[smtp]` (and the drop directory's).
    pub fn from_config(config: &Config) -> Result<InboundSettings, InboundError> {
        Self::resolve(config, &config.smtp.listen_settings(), "smtp.")
    }

    /// `table`, the `[[smtp.listener]]` number `n` (from 0, for errors), unset keys from
    /// `[smtp]`.
    pub fn for_listener(
        config: &Config,
        n: usize,
        table: &ListenerConfig,
    ) -> Result<InboundSettings, InboundError> {
        let resolved = config.smtp.listener_settings(table);
        Self::resolve(config, &resolved, &format!("smtp.listener.{n}."))
    }

    /// `prefix` names the table in errors (`smtp.` or `smtp.listener.N.`).
    fn resolve(
        config: &Config,
        l: &ListenerSettings,
        prefix: &str,
    ) -> Result<InboundSettings, InboundError> {
        let tls = match &l.tls_files {
            Some((cert, key)) => Some(load_tls(cert, key).map_err(|reason| InboundError::Tls {
                key: format!("{prefix}tls_cert_file / {prefix}tls_key_file"),
                reason,
            })?),
            // Validation refuses this; never serve plaintext where TLS was asked for.
            None if l.tls != ListenTls::None => {
                return Err(InboundError::Tls {
                    key: format!("{prefix}tls"),
                    reason: "needs tls_cert_file and tls_key_file".into(),
                });
            }
            None => None,
        };
        let auth = AuthPolicy::from_setting(&l.auth).map_err(|reason| InboundError::Auth {
            key: format!("{prefix}auth"),
            reason,
        })?;
        let max_message_size = graph_cap(config, l.max_message_size.0);
        let min_free_space = match config.queue.min_free_space.0 {
            // Automatic: room for two of the largest message this listener takes.
            0 => l.max_message_size.0.saturating_mul(2),
            n => n,
        };
        Ok(InboundSettings {
            hostname: config.smtp.hostname.clone(),
            // EHLO's SIZE: the most any route takes here (MAIL FROM applies the chosen route's).
            max_message_size: config
                .route_table()
                .iter()
                .map(|r| graph_cap(&r.config, max_message_size))
                .max()
                .unwrap_or(max_message_size),
            max_recipients: l.max_recipients,
            max_connections: l.max_connections,
            allow_networks: l.allowed_networks(),
            key_prefix: prefix.to_string(),
            command_timeout: l.command_timeout,
            data_timeout: l.data_timeout,
            write_timeout: l.write_timeout,
            min_data_rate: l.min_data_rate,
            postmaster: postmaster_address(config),
            max_errors: l.max_errors,
            min_free_space,
            implicit_tls: tls.is_some() && l.tls == ListenTls::Implicit,
            tls,
            auth,
            plaintext_auth_on_loopback: l.allow_plaintext_auth_on_loopback,
        })
    }
}

/// `postmaster@` the domain the relay sends as (`upstream.from`, which defaults to
/// `upstream.mail_account`): the mailbox Exchange will accept mail for. Without either (spool
/// only), `postmaster@smtp.hostname`.
fn postmaster_address(config: &Config) -> String {
    let up = &config.upstream;
    let domain = up
        .from
        .as_deref()
        .or(up.mail_account.as_deref())
        .and_then(|a| a.rsplit_once('@'))
        .map(|(_, d)| d)
        .filter(|d| !d.is_empty())
        .unwrap_or(config.smtp.hostname.as_str());
    format!("postmaster@{domain}")
}

fn load_tls(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| e.to_string())?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// State shared by all sessions.
pub struct Shared {
    pub settings: InboundSettings,
    pub store: Arc<dyn Store>,
    /// Messages accepted since start (for logs and, later, metrics).
    pub accepted: AtomicU64,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Failed AUTH per client address (the brute-force limit), one table for all listeners.
    pub auth_failures: Arc<AuthFailures>,
    /// The routes MAIL FROM chooses from, one table for all listeners; replaced by a reload.
    pub routes: Arc<std::sync::RwLock<Arc<crate::routes::Routes>>>,
}

impl Shared {
    /// The same store, metrics, failure table and routes with another listener's settings.
    fn with_settings(&self, settings: InboundSettings) -> Shared {
        Shared {
            settings,
            store: self.store.clone(),
            accepted: AtomicU64::new(0),
            metrics: self.metrics.clone(),
            auth_failures: self.auth_failures.clone(),
            routes: self.routes.clone(),
        }
    }

    /// The route for a transaction and the size limit of its transport on this listener, or
    /// why none takes it.
    pub fn choose_route(
        &self,
        sender: &str,
        auth_user: Option<&str>,
        listener: Option<SocketAddr>,
    ) -> Result<(String, u64), crate::routes::NoRoute> {
        let routes = self
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (route, _mailbox) = routes.choose(sender, auth_user, listener)?;
        let limit = graph_cap(&route.config, self.settings.max_message_size);
        Ok((route.name.clone(), limit))
    }

    /// RFC 5321 §4.5.3.1.10 / Postfix `smtpd_check_queue`: refuse with a temporary 452 before
    /// taking data the disk cannot hold.
    pub fn check_free_space(&self, declared_size: u64) -> Result<(), Reply> {
        match self.store.free_space() {
            Ok(free) if free >= self.settings.min_free_space.saturating_add(declared_size) => {
                Ok(())
            }
            Ok(free) => {
                tracing::warn!(
                    free,
                    needed = self.settings.min_free_space,
                    "spool disk nearly full: refusing mail"
                );
                Err(reply::NO_SPACE)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read free space of the spool");
                Err(reply::LOCAL_ERROR)
            }
        }
    }
}

/// Replaces the routes of a running [`Server`].
#[derive(Clone)]
pub struct RoutesHandle(Arc<Shared>);

impl RoutesHandle {
    /// The routes for the transactions that start from now on (a reload).
    pub fn set(&self, routes: crate::routes::Routes) {
        *self.0.routes.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(routes);
    }
}

pub struct Server {
    shared: Arc<Shared>,
    stop: crate::stop::StopBudget,
}

impl Server {
    pub fn new(
        settings: InboundSettings,
        store: Arc<dyn Store>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Server {
        Server {
            shared: Arc::new(Shared {
                settings,
                store,
                accepted: AtomicU64::new(0),
                metrics,
                auth_failures: Default::default(),
                routes: Default::default(),
            }),
            stop: crate::stop::StopBudget::new(DRAIN_TIMEOUT),
        }
    }

    /// Sessions still open at a stop get until the deadline of `stop` (shared with the
    /// deliverer) instead of [`DRAIN_TIMEOUT`].
    pub fn with_stop_budget(mut self, stop: crate::stop::StopBudget) -> Server {
        self.stop = stop;
        self
    }

    /// The routes MAIL FROM chooses from (without them: every message takes the default route).
    pub fn with_routes(self, routes: crate::routes::Routes) -> Server {
        self.routes_handle().set(routes);
        self
    }

    /// A handle that replaces the routes of the running server (SIGHUP).
    pub fn routes_handle(&self) -> RoutesHandle {
        RoutesHandle(self.shared.clone())
    }

    /// Submits messages through this server's rules in-process (the drop directory).
    pub fn local_submitter(&self) -> local::LocalSubmitter {
        local::LocalSubmitter::new(self.shared.clone())
    }

    /// Binds every `smtp.listen` address.
    pub async fn bind(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, InboundError> {
        let mut listeners = Vec::with_capacity(addrs.len());
        for addr in addrs {
            listeners.push(bind_one(*addr).await?);
        }
        Ok(listeners)
    }

    /// Binds `smtp.listen` and every `[[smtp.listener]]` of `config`, each table with its
    /// settings resolved now (a bad certificate or users file stops the start).
    pub async fn bind_config(config: &Config) -> Result<Vec<Bound>, InboundError> {
        // Settings first: the sockets are then bound together, so that one accepting means
        // all are (and a bad certificate leaves none bound).
        let mut planned = Vec::new();
        for addr in &config.smtp.listen {
            planned.push((*addr, None));
        }
        for (n, table) in config.smtp.listener.iter().enumerate() {
            let settings = InboundSettings::for_listener(config, n, table)?;
            planned.push((table.address, Some(settings)));
        }
        let mut bound = Vec::with_capacity(planned.len());
        for (address, settings) in planned {
            bound.push(Bound {
                socket: bind_one(address).await?,
                address,
                settings,
            });
        }
        Ok(bound)
    }

    /// [`Server::serve`] with `listeners` on the server's own settings.
    pub async fn run(self, listeners: Vec<TcpListener>, shutdown: CancellationToken) {
        let bound = listeners
            .into_iter()
            .filter_map(|socket| {
                let address = socket.local_addr().ok()?;
                Some(Bound {
                    socket,
                    address,
                    settings: None,
                })
            })
            .collect();
        self.serve(bound, shutdown).await
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets sessions finish until
    /// the stop deadline ([`Server::with_stop_budget`]; [`DRAIN_TIMEOUT`] unless set), and
    /// returns. Listeners on the server's own settings share its `max_connections`; each
    /// other one has its own.
    pub async fn serve(self, listeners: Vec<Bound>, shutdown: CancellationToken) {
        let sessions = TaskTracker::new();
        let shared_limit = Arc::new(Semaphore::new(self.shared.settings.max_connections));
        let mut accept_loops = Vec::new();
        for bound in listeners {
            let (shared, limit) = match bound.settings {
                None => (self.shared.clone(), shared_limit.clone()),
                Some(settings) => {
                    let limit = Arc::new(Semaphore::new(settings.max_connections));
                    (Arc::new(self.shared.with_settings(settings)), limit)
                }
            };
            if let Ok(addr) = bound.socket.local_addr() {
                tracing::info!(
                    %addr,
                    tls = if shared.settings.implicit_tls {
                        "implicit"
                    } else if shared.settings.tls.is_some() {
                        "starttls"
                    } else {
                        "none"
                    },
                    max_connections = shared.settings.max_connections,
                    "accepting SMTP"
                );
            }
            let accept = AcceptLoop {
                socket: bound.socket,
                address: bound.address,
                shared,
                limit,
                sessions: sessions.clone(),
                shutdown: shutdown.clone(),
            };
            accept_loops.push(tokio::spawn(accept.run()));
        }
        for handle in accept_loops {
            let _ = handle.await;
        }
        sessions.close();
        if tokio::time::timeout_at(self.stop.deadline(), sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = sessions.len(),
                stop_timeout = %humantime::format_duration(self.stop.budget()),
                "sessions still open at the stop deadline; closing them (their clients were \
                 not told 250 and send again)"
            );
        }
    }
}

/// A bound listener: its socket, the address it was configured with (routes match on it),
/// and for a `[[smtp.listener]]` its own settings (`None`: the server's, `[smtp]`).
pub struct Bound {
    pub socket: TcpListener,
    pub address: SocketAddr,
    pub settings: Option<InboundSettings>,
}

async fn bind_one(addr: SocketAddr) -> Result<TcpListener, InboundError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| InboundError::Bind { addr, source })
}

struct AcceptLoop {
    socket: TcpListener,
    address: SocketAddr,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    sessions: TaskTracker,
    shutdown: CancellationToken,
}

impl AcceptLoop {
    async fn run(self) {
        let mut backoff = Duration::from_millis(10);
        loop {
            let accepted = tokio::select! {
                a = self.socket.accept() => a,
                _ = self.shutdown.cancelled() => return,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => {
                    backoff = Duration::from_millis(10);
                    pair
                }
                Err(e) => {
                    // EMFILE and friends: wait rather than spin (mini-redis does the same).
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let shared = self.shared.clone();
            let shutdown = self.shutdown.clone();
            let listener = self.address;
            let permit = self.limit.clone().try_acquire_owned().ok();
            self.sessions.spawn(async move {
                // A plaintext reply means nothing to an SMTPS client: it only sees the close.
                let plain = !shared.settings.implicit_tls;
                let Some(_permit) = permit else {
                    tracing::warn!(
                        client = %peer,
                        %listener,
                        "refusing connection: {}max_connections reached",
                        shared.settings.key_prefix
                    );
                    shared.metrics.refused(reply::TOO_MANY_CONNECTIONS.status);
                    return refuse(stream, plain.then_some(reply::TOO_MANY_CONNECTIONS)).await;
                };
                let ip = peer.ip().to_canonical();
                if !shared
                    .settings
                    .allow_networks
                    .iter()
                    .any(|n| n.contains(&ip))
                {
                    tracing::warn!(
                        client = %peer,
                        %listener,
                        "refusing connection: not in {}allow_networks",
                        shared.settings.key_prefix
                    );
                    shared.metrics.refused(reply::NOT_ALLOWED.status);
                    return refuse(stream, plain.then_some(reply::NOT_ALLOWED)).await;
                }
                serve_connection(stream, peer, listener, shared, shutdown).await;
            });
        }
    }
}

async fn refuse(mut stream: TcpStream, reply: Option<Reply>) {
    let mut out = Vec::new();
    if let Some(reply) = reply {
        reply.write_to(&mut out);
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(&out).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    listener: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    tracing::debug!(client = %peer, %listener, "connection opened");
    let tls = shared.settings.tls.clone();
    let implicit = shared.settings.implicit_tls;
    let handshake_timeout = shared.settings.command_timeout;
    let write_timeout = shared.settings.write_timeout;
    let mut session = Session::new(shared, peer);
    session.on_listener(listener);
    if implicit {
        let Some(acceptor) = tls else { return };
        if let Some(mut tls_stream) = handshake(&acceptor, stream, handshake_timeout, peer).await {
            // SMTPS: the greeting is the first thing inside TLS, and STARTTLS is not offered.
            session.tls_established();
            session.greeting();
            drive_tls(
                &mut session,
                &mut tls_stream,
                &shutdown,
                write_timeout,
                peer,
            )
            .await;
        }
        tracing::debug!(client = %peer, "connection closed");
        return;
    }
    session.greeting();
    match session.drive(&mut stream, &shutdown).await {
        Ok(Next::StartTls) => {
            let Some(acceptor) = tls else { return };
            if let Some(mut tls_stream) =
                handshake(&acceptor, stream, handshake_timeout, peer).await
            {
                session.tls_established();
                drive_tls(
                    &mut session,
                    &mut tls_stream,
                    &shutdown,
                    write_timeout,
                    peer,
                )
                .await;
            }
        }
        Ok(Next::Close) => {
            let _ = tokio::time::timeout(write_timeout, stream.shutdown()).await;
        }
        Err(e) => tracing::debug!(client = %peer, error = %e, "connection error"),
    }
    tracing::debug!(client = %peer, "connection closed");
}

type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// The server side of a TLS handshake, bounded: a client that connects (or says STARTTLS) and
/// then sends nothing must not keep its slot.
async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    limit: Duration,
    peer: SocketAddr,
) -> Option<TlsStream> {
    match tokio::time::timeout(limit, acceptor.accept(stream)).await {
        Ok(Ok(tls_stream)) => Some(tls_stream),
        Ok(Err(e)) => {
            tracing::info!(client = %peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::info!(client = %peer, "TLS handshake timed out");
            None
        }
    }
}

async fn drive_tls(
    session: &mut Session,
    tls_stream: &mut TlsStream,
    shutdown: &CancellationToken,
    write_timeout: Duration,
    peer: SocketAddr,
) {
    match session.drive(tls_stream, shutdown).await {
        // close_notify is a write too: bounded like every other.
        Ok(_) => {
            let _ = tokio::time::timeout(write_timeout, tls_stream.shutdown()).await;
        }
        Err(e) => tracing::debug!(client = %peer, error = %e, "connection error"),
    }
}
