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
//!   the age of the oldest queued message. Always `200`; read the fields.
//! - `GET /metrics`: Prometheus text format (see [`crate::metrics`]).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::deliver::{DeliveryHandle, MailboxState};
use crate::metrics::{Gauges, Metrics};
use crate::oauth::TokenProvider;
use crate::spool::Spool;

/// What the handlers read. Cheap to clone.
#[derive(Clone)]
pub struct AdminState {
    pub spool: Spool,
    /// The current configuration; follows SIGHUP reloads.
    pub config: watch::Receiver<Arc<Config>>,
    /// True while the SMTP listener is bound and accepting (false before start and once
    /// shutdown begins).
    pub accepting: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    /// `None` when no tenant is configured (mail is only kept).
    pub delivery: Option<DeliveryHandle>,
    pub tokens: Option<TokenProvider>,
}

impl AdminState {
    pub fn new(spool: Spool, config: watch::Receiver<Arc<Config>>) -> AdminState {
        AdminState {
            spool,
            config,
            accepting: Arc::new(AtomicBool::new(false)),
            metrics: Arc::default(),
            delivery: None,
            tokens: None,
        }
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

    /// Queue depth and oldest message, from `queue/` file names (ULIDs carry their time), so a
    /// scrape never reads message files.
    async fn queue_gauges(&self) -> (usize, Option<SystemTime>) {
        let dir = self.spool.dir().join("queue");
        tokio::task::spawn_blocking(move || {
            let mut depth = 0;
            let mut oldest: Option<String> = None;
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let Some(id) = name.strip_suffix(".msg") else {
                        continue;
                    };
                    depth += 1;
                    if oldest.as_deref().is_none_or(|o| id < o) {
                        oldest = Some(id.to_string());
                    }
                }
            }
            let oldest = oldest
                .and_then(|id| ulid::Ulid::from_string(&id).ok())
                .map(|u| u.datetime());
            (depth, oldest)
        })
        .await
        .unwrap_or((0, None))
    }

    /// The `/readyz` verdict: `Ok` or the first reason the relay cannot take mail.
    pub async fn readiness(&self) -> Result<(), String> {
        if !self.accepting.load(Ordering::Acquire) {
            return Err("SMTP listener is not accepting (starting or shutting down)".into());
        }
        let spool = self.spool.clone();
        let min_free = self.config.borrow().min_free_space();
        tokio::task::spawn_blocking(move || check_spool(&spool, min_free))
            .await
            .unwrap_or_else(|e| Err(format!("spool check failed: {e}")))
    }
}

fn check_spool(spool: &Spool, min_free: u64) -> Result<(), String> {
    spool.check_writable().map_err(|e| e.to_string())?;
    let free = spool
        .free_space()
        .map_err(|e| format!("cannot read free space of the spool: {e}"))?;
    if free < min_free {
        return Err(format!(
            "spool disk nearly full: {free} bytes free, {min_free} required (queue.min_free_space)"
        ));
    }
    Ok(())
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
    let (depth, oldest) = state.queue_gauges().await;
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
            let throttled = st.throttled_until.is_some_and(|t| t > now);
            let mailbox = if matches!(st.state, MailboxState::Running) && throttled {
                serde_json::json!({
                    "state": "throttled",
                    "reason": "Exchange asked to slow down (432/421)",
                })
            } else {
                st.state.to_json()
            };
            (mailbox, st.last_delivery.map(rfc3339))
        }
    };
    let body = serde_json::json!({
        "accepting": state.accepting.load(Ordering::Acquire),
        "token": token,
        "mailbox": mailbox,
        "last_delivery": last_delivery,
        "queue": {
            "depth": depth,
            "oldest_age_seconds": oldest.map(age),
        },
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body:#}\n"),
    )
        .into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let now = SystemTime::now();
    let (queue_depth, oldest) = state.queue_gauges().await;
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
        held: state
            .delivery
            .as_ref()
            .is_some_and(|d| matches!(d.status().state, MailboxState::Held { .. })),
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

/// Serves `router` on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "admin endpoint failed");
    }
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
