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

use crate::config::Config;
use crate::store::Store;

/// How long sessions get to finish after shutdown starts before they are cut off.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("smtp.tls_cert_file / smtp.tls_key_file: {0}")]
    Tls(String),
    #[error("smtp.auth: {0}")]
    Auth(String),
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
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub write_timeout: Duration,
    /// Bytes per second a message transfer must keep up (see `Session::read_limit`).
    pub min_data_rate: u64,
    /// What `RCPT TO:<Postmaster>` (no domain, RFC 5321 §4.5.1) is delivered to.
    pub postmaster: String,
    pub max_errors: u32,
    pub min_free_space: u64,
    pub tls: Option<TlsAcceptor>,
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
    let configured = config.smtp.max_message_size.0;
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
    pub fn from_config(config: &Config) -> Result<InboundSettings, InboundError> {
        let smtp = &config.smtp;
        let tls = match (&smtp.tls_cert_file, &smtp.tls_key_file) {
            (Some(cert), Some(key)) => Some(load_tls(cert, key)?),
            _ => None,
        };
        Ok(InboundSettings {
            hostname: smtp.hostname.clone(),
            max_message_size: accept_limit(config),
            max_recipients: smtp.max_recipients,
            max_connections: smtp.max_connections,
            allow_networks: config.allowed_networks(),
            command_timeout: smtp.command_timeout,
            data_timeout: smtp.data_timeout,
            write_timeout: smtp.write_timeout,
            min_data_rate: smtp.min_data_rate,
            postmaster: postmaster_address(config),
            max_errors: smtp.max_errors,
            min_free_space: config.min_free_space(),
            tls,
            auth: AuthPolicy::from_setting(&smtp.auth).map_err(InboundError::Auth)?,
            plaintext_auth_on_loopback: smtp.allow_plaintext_auth_on_loopback,
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

fn load_tls(cert: &Path, key: &Path) -> Result<TlsAcceptor, InboundError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| InboundError::Tls(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(InboundError::Tls(format!(
            "{}: no certificate",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| InboundError::Tls(format!("{}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| InboundError::Tls(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// State shared by all sessions.
pub struct Shared {
    pub settings: InboundSettings,
    pub store: Arc<dyn Store>,
    /// Messages accepted since start (for logs and, later, metrics).
    pub accepted: AtomicU64,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Failed AUTH per client address (the brute-force limit).
    pub auth_failures: AuthFailures,
}

impl Shared {
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
                auth_failures: AuthFailures::default(),
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

    /// Submits messages through this server's rules in-process (the drop directory).
    pub fn local_submitter(&self) -> local::LocalSubmitter {
        local::LocalSubmitter::new(self.shared.clone())
    }

    /// Binds every `smtp.listen` address.
    pub async fn bind(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, InboundError> {
        let mut listeners = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| InboundError::Bind {
                    addr: *addr,
                    source,
                })?;
            listeners.push(listener);
        }
        Ok(listeners)
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets sessions finish until
    /// the stop deadline ([`Server::with_stop_budget`]; [`DRAIN_TIMEOUT`] unless set), and
    /// returns.
    pub async fn run(self, listeners: Vec<TcpListener>, shutdown: CancellationToken) {
        let sessions = TaskTracker::new();
        let limit = Arc::new(Semaphore::new(self.shared.settings.max_connections));
        let mut accept_loops = Vec::new();
        for listener in listeners {
            let shared = self.shared.clone();
            let shutdown = shutdown.clone();
            let sessions = sessions.clone();
            let limit = limit.clone();
            accept_loops.push(tokio::spawn(async move {
                accept_loop(listener, shared, limit, sessions, shutdown).await
            }));
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

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    sessions: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => return,
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
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let permit = limit.clone().try_acquire_owned().ok();
        sessions.spawn(async move {
            let Some(_permit) = permit else {
                tracing::warn!(client = %peer, "refusing connection: smtp.max_connections reached");
                shared.metrics.refused(reply::TOO_MANY_CONNECTIONS.status);
                return refuse(stream, reply::TOO_MANY_CONNECTIONS).await;
            };
            let ip = peer.ip().to_canonical();
            if !shared
                .settings
                .allow_networks
                .iter()
                .any(|n| n.contains(&ip))
            {
                tracing::warn!(client = %peer, "refusing connection: not in smtp.allow_networks");
                shared.metrics.refused(reply::NOT_ALLOWED.status);
                return refuse(stream, reply::NOT_ALLOWED).await;
            }
            serve_connection(stream, peer, shared, shutdown).await;
        });
    }
}

async fn refuse(mut stream: TcpStream, reply: Reply) {
    let mut out = Vec::new();
    reply.write_to(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(&out).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    tracing::debug!(client = %peer, "connection opened");
    let tls = shared.settings.tls.clone();
    let handshake_timeout = shared.settings.command_timeout;
    let write_timeout = shared.settings.write_timeout;
    let mut session = Session::new(shared, peer);
    session.greeting();
    match session.drive(&mut stream, &shutdown).await {
        Ok(Next::StartTls) => {
            let Some(acceptor) = tls else { return };
            // A client that says STARTTLS and then nothing must not keep its slot.
            match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(mut tls_stream)) => {
                    session.tls_established();
                    let result = session.drive(&mut tls_stream, &shutdown).await;
                    match result {
                        // close_notify is a write too: bounded like every other.
                        Ok(_) => {
                            let _ =
                                tokio::time::timeout(write_timeout, tls_stream.shutdown()).await;
                        }
                        Err(e) => tracing::debug!(client = %peer, error = %e, "connection error"),
                    }
                }
                Ok(Err(e)) => tracing::info!(client = %peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::info!(client = %peer, "TLS handshake timed out"),
            }
        }
        Ok(Next::Close) => {
            let _ = tokio::time::timeout(write_timeout, stream.shutdown()).await;
        }
        Err(e) => tracing::debug!(client = %peer, error = %e, "connection error"),
    }
    tracing::debug!(client = %peer, "connection closed");
}
