//! The admin HTTP endpoint (`[admin] listen`), and the client behind `smtp-oauth-relay health`.
//!
//! Routes (built by [`router`] from one shared [`AdminState`]):
//! - `GET /readyz`: "can accept mail" (DESIGN.md): the SMTP listener is bound and accepting,
//!   the spool is writable (asked of the spool, which knows from its own writes and creates no
//!   file per call: [`Spool::check_writable`]), and its filesystem has at least
//!   `config.min_free_space()` free. `200 ready`, else `503` with the reason. Delivery problems
//!   never make the relay unready: a sidecar shares its pod's fate.
//! - `GET /healthz`: JSON for people and monitors: token state and expiry, the mailbox's state
//!   (running, throttled, held with the reason and the fix), last delivery, queue depth and
//!   the age of the oldest queued message, and the state of each long-running task (`tasks`:
//!   `running`, or `died: ...` while a relay with a dead task stops). Always `200`; read the
//!   fields.
//! - `GET /metrics`: Prometheus text format (see [`crate::metrics`]).
//!
//! The endpoint must never cost SMTP anything: [`serve_with`] runs its own accept loop with a
//! connection cap (`admin.max_connections`, the excess closed at once with a 503), a header
//! timeout (`admin.header_timeout`, also the keep-alive idle limit), a lifetime per connection,
//! and the file-descriptor budget of [`crate::fds`]; accept errors (`EMFILE`) pause it briefly.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::deliver::{DeliveryHandle, MailboxState};
use crate::fds::FdBudget;
use crate::metrics::{Gauges, Metrics};
use crate::oauth::TokenProvider;
use crate::store::{Depth, Store};
use crate::supervise::TaskHealth;

/// What the handlers read. Cheap to clone.
#[derive(Clone)]
pub struct AdminState {
    pub store: Arc<dyn Store>,
    /// The current configuration; follows SIGHUP reloads.
    pub config: watch::Receiver<Arc<Config>>,
    /// True while the SMTP listener is bound and accepting (false before start and once
    /// shutdown begins).
    pub accepting: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    /// `None` when no tenant is configured (mail is only kept).
    pub delivery: Option<DeliveryHandle>,
    pub tokens: Option<TokenProvider>,
    /// The supervised tasks of `serve` (empty when not run by `serve`).
    pub tasks: TaskHealth,
}

impl AdminState {
    pub fn new(store: Arc<dyn Store>, config: watch::Receiver<Arc<Config>>) -> AdminState {
        AdminState {
            store,
            config,
            accepting: Arc::new(AtomicBool::new(false)),
            metrics: Arc::default(),
            delivery: None,
            tokens: None,
            tasks: TaskHealth::default(),
        }
    }

    /// Adds the supervised tasks `/healthz` reports.
    pub fn with_tasks(mut self, tasks: TaskHealth) -> AdminState {
        self.tasks = tasks;
        self
    }

    /// Adds what `/healthz` and `/metrics` report about delivery.
    pub fn with_delivery(
        mut self,
        metrics: Arc<Metrics>,
        delivery: Option<DeliveryHandle>,
        tokens: Option<TokenProvider>,
    ) -> AdminState {
        self.metrics = metrics;
        self.delivery = delivery;
        self.tokens = tokens;
        self
    }

    /// The `/readyz` verdict: `Ok` or the first reason the relay cannot take mail.
    pub async fn readiness(&self) -> Result<(), String> {
        if !self.accepting.load(Ordering::Acquire) {
            return Err("SMTP listener is not accepting (starting or shutting down)".into());
        }
        let min_free = self.config.borrow().min_free_space();
        self.store.readiness(min_free).await
    }
}

/// The admin routes over `state`.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/readyz", get(readyz))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let text = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    match state.readiness().await {
        Ok(()) => (StatusCode::OK, text, "ready\n").into_response(),
        Err(reason) => {
            tracing::debug!(%reason, "/readyz: not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                text,
                format!("not ready: {reason}\n"),
            )
                .into_response()
        }
    }
}

async fn healthz(State(state): State<AdminState>) -> Response {
    let now = SystemTime::now();
    let Depth {
        queued: depth,
        oldest,
    } = state.store.depth().await;
    let age = |t: SystemTime| now.duration_since(t).map(|d| d.as_secs()).unwrap_or(0);
    let rfc3339 = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let token = match &state.tokens {
        None => serde_json::json!({ "state": "not configured" }),
        Some(tokens) => {
            let st = tokens.status();
            serde_json::json!({
                "state": format!("{:?}", st.state).to_lowercase(),
                "expires_at": st.expires_at.map(rfc3339),
                "seconds_left": st.expires_at.and_then(|t| t.duration_since(now).ok()).map(|d| d.as_secs()),
                "last_error": st.last_error,
                "requests": st.requests,
            })
        }
    };
    let (mailbox, last_delivery) = match &state.delivery {
        None => (
            serde_json::json!({
                "state": "not configured",
                "reason": "[oauth] is empty: mail is accepted and kept in the spool",
            }),
            None,
        ),
        Some(delivery) => {
            let st = delivery.status();
            (lane_state(&st, now), st.last_delivery.map(rfc3339))
        }
    };
    // Every (route, mailbox) lane: what `mailbox` says for the default one, for each.
    let mailboxes: Vec<serde_json::Value> = state
        .delivery
        .as_ref()
        .map(|d| d.statuses())
        .unwrap_or_default()
        .into_iter()
        .take(MAX_LISTED_MAILBOXES)
        .map(|st| {
            let mut entry = lane_state(&st, now);
            if let Some(obj) = entry.as_object_mut() {
                obj.insert("route".into(), st.route.clone().into());
                obj.insert("mailbox".into(), st.mailbox.clone().into());
                obj.insert("queued".into(), st.queued.into());
                obj.insert("delivered".into(), st.delivered.into());
                obj.insert("last_delivery".into(), st.last_delivery.map(rfc3339).into());
            }
            entry
        })
        .collect();
    let body = serde_json::json!({
        "accepting": state.accepting.load(Ordering::Acquire),
        "token": token,
        "mailbox": mailbox,
        "mailboxes": mailboxes,
        "last_delivery": last_delivery,
        "queue": {
            "depth": depth,
            "oldest_age_seconds": oldest.map(age),
        },
        "tasks": state.tasks.to_json(),
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body:#}\n"),
    )
        .into_response()
}

/// `/healthz` lists at most this many mailboxes (a template route may have hundreds).
const MAX_LISTED_MAILBOXES: usize = 1000;

/// A lane's state as `/healthz` shows it: throttled is a running mailbox paced down.
fn lane_state(st: &crate::deliver::MailboxStatus, now: SystemTime) -> serde_json::Value {
    let throttled = st.throttled_until.is_some_and(|t| t > now);
    if matches!(st.state, MailboxState::Running) && throttled {
        serde_json::json!({
            "state": "throttled",
            "reason": "Exchange asked to slow down (432/421)",
        })
    } else {
        st.state.to_json()
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let now = SystemTime::now();
    let Depth {
        queued: queue_depth,
        oldest,
    } = state.store.depth().await;
    let gauges = Gauges {
        queue_depth,
        oldest_age_seconds: oldest
            .and_then(|t| now.duration_since(t).ok())
            .map_or(0.0, |d| d.as_secs_f64()),
        token_seconds_left: state
            .tokens
            .as_ref()
            .and_then(|t| t.status().expires_at)
            .and_then(|t| t.duration_since(now).ok())
            .map_or(0.0, |d| d.as_secs_f64()),
        lanes: state
            .delivery
            .as_ref()
            .map(|d| d.statuses())
            .unwrap_or_default()
            .into_iter()
            .map(|st| crate::metrics::LaneGauge {
                held: !matches!(st.state, MailboxState::Running),
                queued: st.queued,
                delivered: st.delivered,
                route: st.route,
                mailbox: st.mailbox,
            })
            .collect(),
        open_fds: crate::fds::open_now().ok(),
        max_fds: crate::fds::soft_limit(),
    };
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(&gauges),
    )
        .into_response()
}

/// Binds `[admin] listen`.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// How the admin endpoint protects the rest of the relay.
#[derive(Debug, Clone)]
pub struct AdminLimits {
    /// `admin.max_connections`.
    pub max_connections: usize,
    /// `admin.header_timeout`.
    pub header_timeout: Duration,
    /// Descriptors kept for SMTP and delivery.
    pub fds: FdBudget,
}

impl Default for AdminLimits {
    fn default() -> Self {
        let config = crate::config::AdminConfig::default();
        AdminLimits {
            max_connections: config.max_connections,
            header_timeout: config.header_timeout,
            fds: FdBudget::with_reserve(0),
        }
    }
}

impl AdminLimits {
    /// The limits `serve` uses: `[admin]` keys and the descriptor reserve for `[smtp]`.
    pub fn from_config(config: &Config) -> AdminLimits {
        AdminLimits {
            max_connections: config.admin.max_connections,
            header_timeout: config.admin.header_timeout,
            fds: FdBudget::for_config(config),
        }
    }
}

/// A connection lives at most this long, so that nothing (a client that reads its response
/// slowly, a request body that never ends) holds a slot forever; probes reconnect.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Descriptors one admin connection may use: its socket and a directory read (`/healthz`).
pub const FDS_PER_CONNECTION: u64 = 2;
/// Refusals are logged at most this often (a flood must not flood the log).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` with the default [`AdminLimits`] until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    serve_with(
        listener,
        router,
        AdminLimits::default(),
        Arc::default(),
        shutdown,
    )
    .await
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Limit,
    Descriptors,
}

/// Serves `router` on `listener` within `limits` until `shutdown` is cancelled, counting
/// connections in `metrics`.
pub async fn serve_with(
    listener: TcpListener,
    router: Router,
    limits: AdminLimits,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    let mut pause = ACCEPT_PAUSE_MIN;
    let mut refusals = RefusalLog::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => {
                pause = ACCEPT_PAUSE_MIN;
                pair
            }
            Err(e) => {
                pause = accept_failed("admin", &e, pause, &shutdown).await;
                continue;
            }
        };
        // The cap first: a flood of connections costs one accept and one close each.
        let refusal = match slots.clone().try_acquire_owned() {
            Err(_) => Err(Refusal::Limit),
            Ok(permit) if limits.fds.allows(FDS_PER_CONNECTION) => Ok(permit),
            Ok(_) => Err(Refusal::Descriptors),
        };
        match refusal {
            Ok(permit) => {
                Metrics::inc(&metrics.admin_accepted);
                let router = router.clone();
                let shutdown = shutdown.clone();
                let header_timeout = limits.header_timeout;
                connections.spawn(async move {
                    serve_connection(stream, router, header_timeout, permit, shutdown).await;
                });
            }
            Err(why) => {
                Metrics::inc(match why {
                    Refusal::Limit => &metrics.admin_refused_limit,
                    Refusal::Descriptors => &metrics.admin_refused_descriptors,
                });
                refuse(stream);
                refusals.note(why, peer, &limits);
            }
        }
    }
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), connections.wait()).await;
}

/// Logs the first refusal at once and then a count at most every [`REFUSAL_LOG_EVERY`].
#[derive(Default)]
struct RefusalLog {
    last: Option<Instant>,
    since: u64,
}

impl RefusalLog {
    fn note(&mut self, why: Refusal, peer: SocketAddr, limits: &AdminLimits) {
        self.since += 1;
        if self.last.is_some_and(|t| t.elapsed() < REFUSAL_LOG_EVERY) {
            return;
        }
        let reason = match why {
            Refusal::Limit => format!(
                "admin.max_connections ({}) connections are open",
                limits.max_connections
            ),
            Refusal::Descriptors => format!(
                "file descriptors are kept for SMTP (limit {}, {} reserved)",
                limits
                    .fds
                    .limit
                    .map_or_else(|| "unlimited".to_string(), |l| l.to_string()),
                limits.fds.reserve
            ),
        };
        tracing::warn!(
            client = %peer,
            refused = self.since,
            "admin connections closed at once: {reason}"
        );
        self.last = Some(Instant::now());
        self.since = 0;
    }
}

/// Closes a connection with a 503, without waiting for anything: a refusal holds no slot and
/// no descriptor beyond this call.
fn refuse(stream: TcpStream) {
    const BODY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
        content-length: 27\r\nconnection: close\r\n\r\ntoo many admin connections\n";
    let _ = stream.try_write(BODY);
}

/// One HTTP/1.1 connection under the header timeout and [`CONNECTION_LIFETIME`]; its slot is
/// `permit`, released when it ends.
async fn serve_connection(
    stream: TcpStream,
    router: Router,
    header_timeout: Duration,
    permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    let _permit = permit;
    let service = hyper_util::service::TowerToHyperService::new(router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "admin connection ended");
            }
            return;
        }
        () = tokio::time::sleep(CONNECTION_LIFETIME) => {}
        () = shutdown.cancelled() => {}
    }
    // Let a request in progress finish, briefly.
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
}

/// First pause after a failed accept; it doubles up to [`ACCEPT_PAUSE_MAX`].
pub const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
pub const ACCEPT_PAUSE_MAX: Duration = Duration::from_millis(500);

/// After a failed accept (`EMFILE`: out of descriptors): log, pause (tokio would otherwise
/// retry at once and spin, since the pending connection stays in the backlog), and return the
/// next pause. Never ends the loop.
pub async fn accept_failed(
    listener: &str,
    e: &std::io::Error,
    pause: Duration,
    shutdown: &CancellationToken,
) -> Duration {
    if crate::fds::is_resource_exhaustion(e) {
        tracing::warn!(listener, error = %e, pause_ms = pause.as_millis() as u64, "accept failed: out of resources; pausing");
    } else {
        tracing::debug!(listener, error = %e, "accept failed");
    }
    tokio::select! {
        () = tokio::time::sleep(pause) => {}
        () = shutdown.cancelled() => {}
    }
    (pause * 2).min(ACCEPT_PAUSE_MAX)
}

/// Timeout of the whole `health` request (connect, send, read).
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

/// `GET /readyz` on the admin endpoint at `listen` with a plain HTTP/1.0 request (no client
/// library). A wildcard `listen` (0.0.0.0, ::) is queried on loopback. Returns the status code
/// and body.
pub async fn query_readyz(listen: SocketAddr, timeout: Duration) -> Result<(u16, String), String> {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            Ipv4Addr::LOCALHOST.into()
        } else {
            Ipv6Addr::LOCALHOST.into()
        });
    }
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let request = format!("GET /readyz HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let mut response = Vec::new();
        (&mut stream)
            .take(64 * 1024)
            .read_to_end(&mut response)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        parse_response(&response).ok_or_else(|| format!("{addr}: not an HTTP response"))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("{addr}: no answer within {timeout:?}")))
}

fn parse_response(bytes: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next()?;
    let mut parts = status_line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    let code = parts.next()?.parse().ok()?;
    Some((code, body.trim_end().to_string()))
}

#[cfg(test)]
mod tests {
    use super::parse_response;

    #[test]
    fn parses_status_and_body() {
        assert_eq!(
            parse_response(b"HTTP/1.0 200 OK\r\ncontent-length: 6\r\n\r\nready\n"),
            Some((200, "ready".into()))
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\nnot ready: x\n"),
            Some((503, "not ready: x".into()))
        );
        assert_eq!(parse_response(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_response(b""), None);
    }
}
