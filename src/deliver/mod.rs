//! Delivery policy, independent of how messages travel: the scheduler that drains the store at
//! the pace Microsoft allows, the per-mailbox pacer, the outcome classes (and the SMTP reply
//! type they are decided from), the sender policy and failure notices. How a message reaches
//! Microsoft 365 is a [`crate::transport::Transport`].

pub mod classify;
pub mod notice;
pub mod pacer;
pub mod reply;
pub mod scheduler;
pub mod sender;

use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

pub use scheduler::{
    Deliverer, DeliveryHandle, DeliverySettings, FixedUpstream, LaneKey, LaneParts, MailboxState,
    MailboxStatus, Unroutable, Upstreams,
};

/// An access token as the deliverer needs it.
#[derive(Clone)]
pub struct Token {
    pub value: String,
    pub expires_at: SystemTime,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("value", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Why no token is available.
#[derive(Debug, Clone)]
pub struct TokenFailure {
    /// Entra ID refused (AADSTS 400/401): the configuration must change. Otherwise transient.
    pub permanent: bool,
    pub message: String,
}

/// Where tokens come from: the background refresher in production, fakes in tests. It must
/// never make a token request per call.
pub trait TokenSource: Send + Sync + 'static {
    fn token(&self) -> TokenFuture<'_>;
    /// One refresh now, waiting for its result (after a 535 with a token close to expiry).
    fn refresh(&self) -> TokenFuture<'_>;
}

pub type TokenFuture<'a> = Pin<Box<dyn Future<Output = Result<Token, TokenFailure>> + Send + 'a>>;

/// The background refresher is the production token source.
impl TokenSource for crate::oauth::TokenProvider {
    fn token(&self) -> TokenFuture<'_> {
        Box::pin(async move { self.token().await.map(from_access).map_err(from_oauth) })
    }

    fn refresh(&self) -> TokenFuture<'_> {
        Box::pin(async move {
            self.refresh_now()
                .await
                .map(from_access)
                .map_err(from_oauth)
        })
    }
}

fn from_access(token: crate::oauth::AccessToken) -> Token {
    Token {
        value: token.secret().to_string(),
        expires_at: token.expires_at,
    }
}

fn from_oauth(error: crate::oauth::OAuthError) -> TokenFailure {
    // The error's text already carries the AADSTS code, the ids and the admin's fix.
    TokenFailure {
        permanent: !error.is_transient(),
        message: error.to_string(),
    }
}

/// A cheap pseudo-random number for retry jitter (xorshift over the clock and a counter); not
/// for anything secret.
pub(crate) fn jitter() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed) ^ nanos;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}
