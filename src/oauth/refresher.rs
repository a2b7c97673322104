//! The background refresher: one task owns the token requests, everyone else reads the current
//! token from a watch channel.
//!
//! Schedule: the first request at start (in the background); then a refresh at half the
//! lifetime, and never later than `oauth.refresh_before` before expiry (when the lifetime is
//! shorter than twice that, half the lifetime). The old token is served until the new one
//! arrives. On failure: exponential backoff with jitter from 1 s to 5 min for transient errors,
//! about 5 min for permanent ones, never sooner than `Retry-After`. One request at a time.
//!
//! Whatever the endpoint answers, requests stay few: a token that expires within
//! [`MIN_USEFUL_LIFETIME`] (`expires_in: 0`) counts as a failure and backs off like one, a
//! `refresh_in` never brings a refresh before a quarter of the lifetime, a lifetime beyond a day
//! is cut to a day (`oauth::error`), and below all rules two limits hold for every request,
//! scheduled, forced or after a reload: [`REQUEST_FLOOR`] between two, and at most
//! [`MAX_REQUESTS_PER_MINUTE`] in any minute.
//!
//! All scheduling uses `tokio::time`, so a test with a paused clock sees the real schedule.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

use super::error::OAuthError;
use super::source::{AccessToken, TokenClient};

/// How long [`TokenProvider::token`] waits for the first token.
pub const FIRST_TOKEN_WAIT: Duration = Duration::from_secs(30);
/// First retry delay after a transient failure (doubling each time).
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay after transient failures.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Retry delay after a permanent failure (configuration errors), so a fixed tenant-side
/// setting is picked up without a restart.
pub const PERMANENT_RETRY: Duration = Duration::from_secs(300);
/// Longest `Retry-After` honoured.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(3600);
/// A forced refresh never follows the previous request sooner than this.
pub const FORCE_MIN_INTERVAL: Duration = Duration::from_secs(5);
/// Shortest refresh delay, whatever lifetime the endpoint announces.
pub const REFRESH_MIN: Duration = Duration::from_secs(1);
/// No request starts sooner than this after the previous one started, whatever the reason.
pub const REQUEST_FLOOR: Duration = Duration::from_secs(1);
/// At most this many requests start in any 60 s. A healthy relay sends one every half hour;
/// an outage's backoff sends 6 in its first minute; this bounds everything else (a flood of
/// forced refreshes or reloads, tokens of a few seconds).
pub const MAX_REQUESTS_PER_MINUTE: usize = 10;
/// A token valid for less than this cannot be refreshed at half its lifetime without breaking
/// [`REQUEST_FLOOR`]: it is treated as a failed request (transient, so it backs off).
pub const MIN_USEFUL_LIFETIME: Duration = Duration::from_secs(2);
const MINUTE: Duration = Duration::from_secs(60);

/// The token's state for `/healthz` and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    /// A valid token is held and no request is running.
    Valid,
    /// A valid token is held and a refresh is running.
    Refreshing,
    /// No valid token, and the last request failed (see `last_error`).
    Failed,
    /// No token yet (the first request is running or about to).
    Pending,
}

/// A snapshot of the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenStatus {
    pub state: TokenState,
    /// Expiry of the token held (even if it has expired).
    pub expires_at: Option<SystemTime>,
    /// The last request's error, if it failed (Display text: AADSTS codes, trace and
    /// correlation ids, never a secret).
    pub last_error: Option<String>,
    /// Whether `last_error` is transient (retry soon) or permanent (a configuration problem).
    pub last_error_transient: Option<bool>,
    /// Consecutive failed requests.
    pub failures: u32,
    /// Token requests attempted since start (one per refresh or retry, never per caller).
    pub requests: u64,
}

#[derive(Clone, Default)]
struct Snapshot {
    token: Option<AccessToken>,
    /// The token before `token`: sessions may still use it, so the scrubber keeps knowing it.
    previous: Option<AccessToken>,
    last_error: Option<OAuthError>,
    failures: u32,
    in_flight: bool,
    /// `force_refresh` was accepted and is not yet served.
    force: bool,
    /// `reload` replaced the client: request now, whatever the backoff.
    reload: bool,
    /// Bumped by every `reload`: a token (or error) obtained with an older client is not
    /// served, since it no longer answers to the configuration in effect.
    generation: u64,
    stopped: bool,
    /// Requests completed (success or failure).
    completed: u64,
}

struct Inner {
    client: RwLock<Arc<TokenClient>>,
    refresh_before: RwLock<Duration>,
    state: watch::Sender<Snapshot>,
    wake: Notify,
    requests: AtomicU64,
}

/// Keeps an access token fresh in the background. Cheap to clone; all clones share one task.
#[derive(Clone)]
pub struct TokenProvider {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenProvider")
            .field("status", &self.status())
            .finish()
    }
}

impl TokenProvider {
    /// Builds the token client from `config` (configuration problems are returned here) and
    /// spawns the refresher, which sends the first request at once. Never waits for a token.
    /// The task ends when `shutdown` is cancelled.
    pub fn start(
        config: &Config,
        shutdown: CancellationToken,
    ) -> Result<(TokenProvider, JoinHandle<()>), OAuthError> {
        let client = TokenClient::from_config(config)?;
        tracing::info!(
            token_url = %client.endpoints().token_url,
            scope = %client.endpoints().scope,
            credential = client.credential_kind(),
            "token provider starting"
        );
        let inner = Arc::new(Inner {
            client: RwLock::new(Arc::new(client)),
            refresh_before: RwLock::new(config.oauth.refresh_before),
            state: watch::Sender::new(Snapshot::default()),
            wake: Notify::new(),
            requests: AtomicU64::new(0),
        });
        let task = tokio::spawn(run(inner.clone(), shutdown));
        Ok((TokenProvider { inner }, task))
    }

    /// The current valid token, at once. Before the first token exists this waits for the
    /// running request (at most [`FIRST_TOKEN_WAIT`]). Without a valid token after a failed
    /// request it returns that request's error at once. It never sends a request itself.
    pub async fn token(&self) -> Result<AccessToken, OAuthError> {
        let mut rx = self.inner.state.subscribe();
        let wait = async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    if let Some(t) = &s.token
                        && !t.is_expired()
                    {
                        return Ok(t.clone());
                    }
                    if let Some(e) = &s.last_error {
                        return Err(e.clone());
                    }
                    if s.stopped {
                        return Err(OAuthError::Stopped);
                    }
                }
                if rx.changed().await.is_err() {
                    return Err(OAuthError::Stopped);
                }
            }
        };
        tokio::time::timeout(FIRST_TOKEN_WAIT, wait)
            .await
            .unwrap_or(Err(OAuthError::NotReady(FIRST_TOKEN_WAIT)))
    }

    /// Asks for one refresh now (the deliverer calls this after a 535 with a token close to
    /// expiry). Coalesced: while a request runs, or one is already pending, this does nothing
    /// more; during a failure backoff the backoff (and `Retry-After`) rules. Never sooner than
    /// [`FORCE_MIN_INTERVAL`] after the previous request.
    pub fn force_refresh(&self) {
        let mut accepted = false;
        self.inner.state.send_if_modified(|s| {
            if !s.in_flight && !s.force && s.last_error.is_none() && !s.stopped {
                s.force = true;
                accepted = true;
            }
            false
        });
        if accepted {
            tracing::debug!("forced token refresh requested");
            self.inner.wake.notify_one();
        }
    }

    /// Forces a refresh (as [`force_refresh`](Self::force_refresh)) and waits for the next
    /// request to complete: its token, or its error. For the deliverer's "535 with a token close
    /// to expiry: one refresh, one retry". During a failure backoff it returns the last error at
    /// once (no extra request). Bounded by [`FIRST_TOKEN_WAIT`] plus [`FORCE_MIN_INTERVAL`].
    pub async fn refresh_now(&self) -> Result<AccessToken, OAuthError> {
        let mut rx = self.inner.state.subscribe();
        let before = rx.borrow_and_update().completed;
        self.force_refresh();
        {
            let s = rx.borrow();
            if !s.in_flight && !s.force && !s.reload {
                // Nothing is about to run: the backoff rules, or the provider stopped.
                return match (&s.last_error, s.stopped) {
                    (Some(e), _) => Err(e.clone()),
                    (None, true) => Err(OAuthError::Stopped),
                    (None, false) => s
                        .token
                        .clone()
                        .filter(|t| !t.is_expired())
                        .ok_or(OAuthError::NotReady(Duration::ZERO)),
                };
            }
        }
        let wait = async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    if s.completed > before {
                        return match (&s.last_error, &s.token) {
                            (Some(e), _) => Err(e.clone()),
                            (None, Some(t)) => Ok(t.clone()),
                            (None, None) => Err(OAuthError::NotReady(Duration::ZERO)),
                        };
                    }
                    if s.stopped {
                        return Err(OAuthError::Stopped);
                    }
                }
                if rx.changed().await.is_err() {
                    return Err(OAuthError::Stopped);
                }
            }
        };
        let bound = FIRST_TOKEN_WAIT + FORCE_MIN_INTERVAL;
        tokio::time::timeout(bound, wait)
            .await
            .unwrap_or(Err(OAuthError::NotReady(bound)))
    }

    /// Replaces the credential and endpoints (SIGHUP) and requests a token with them at once,
    /// bypassing any backoff. The token held so far is dropped: from now on callers get a
    /// token obtained with the new configuration (waiting for it as for the first token), or
    /// that request's error. On error nothing changes and the old configuration stays in use.
    pub fn reload(&self, config: &Config) -> Result<(), OAuthError> {
        let client = TokenClient::from_config(config)?;
        *self.inner.client.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(client);
        *self
            .inner
            .refresh_before
            .write()
            .unwrap_or_else(|e| e.into_inner()) = config.oauth.refresh_before;
        self.inner.state.send_modify(|s| {
            s.generation += 1;
            // Sessions may still use it: keep it where the scrubber looks.
            if let Some(old) = s.token.take() {
                s.previous = Some(old);
            }
            s.last_error = None;
            s.failures = 0;
            s.force = false;
            s.reload = true;
        });
        self.inner.wake.notify_one();
        tracing::info!("token provider reloaded its configuration");
        Ok(())
    }

    pub fn status(&self) -> TokenStatus {
        let s = self.inner.state.borrow();
        let valid = s.token.as_ref().is_some_and(|t| !t.is_expired());
        let state = match (valid, s.in_flight, &s.last_error) {
            (true, false, _) => TokenState::Valid,
            (true, true, _) => TokenState::Refreshing,
            (false, _, Some(_)) => TokenState::Failed,
            (false, _, None) => TokenState::Pending,
        };
        TokenStatus {
            state,
            expires_at: s.token.as_ref().map(|t| t.expires_at),
            last_error: s.last_error.as_ref().map(ToString::to_string),
            last_error_transient: s.last_error.as_ref().map(OAuthError::is_transient),
            failures: s.failures,
            requests: self.inner.requests.load(Ordering::Relaxed),
        }
    }
}

/// When to refresh a token of `lifetime`: at half of it, and no later than `refresh_before`
/// before expiry when the lifetime allows both; `refresh_in` (from ESTS) can only bring it
/// forward.
pub fn refresh_delay(
    lifetime: Duration,
    refresh_in: Option<Duration>,
    refresh_before: Duration,
) -> Duration {
    let mut delay = lifetime / 2;
    if let Some(latest) = lifetime.checked_sub(refresh_before)
        && !latest.is_zero()
    {
        delay = delay.min(latest);
    }
    if let Some(r) = refresh_in {
        // An absurd `refresh_in` (0, 1 s) must not turn into a request a second.
        delay = delay.min(r.max(lifetime / 4));
    }
    delay.max(REFRESH_MIN)
}

/// When the next request may start, given the start times of the recent ones (oldest first):
/// [`REQUEST_FLOOR`] after the last, and no more than [`MAX_REQUESTS_PER_MINUTE`] in a minute.
pub fn earliest_request(recent: &VecDeque<Instant>, now: Instant) -> Instant {
    let mut at = now;
    if let Some(last) = recent.back() {
        at = at.max(*last + REQUEST_FLOOR);
    }
    if recent.len() >= MAX_REQUESTS_PER_MINUTE {
        at = at.max(recent[recent.len() - MAX_REQUESTS_PER_MINUTE] + MINUTE);
    }
    at
}

/// A token that expires before it can be refreshed, as the failure it is.
fn too_short(token: &AccessToken) -> OAuthError {
    OAuthError::Malformed {
        http_status: 200,
        detail: format!(
            "expires_in {}s: a token this short-lived cannot be used (Entra issues them for \
             60-90 minutes)",
            token.lifetime().as_secs()
        ),
    }
}

/// The delay before retrying after the `failures`-th consecutive failure with `error`.
/// `unit` is a random number in [0, 1) for jitter.
pub fn retry_delay(error: &OAuthError, failures: u32, unit: f64) -> Duration {
    let base = if error.is_transient() {
        let exp = failures.saturating_sub(1).min(20);
        let d = BACKOFF_MIN.saturating_mul(1u32 << exp).min(BACKOFF_MAX);
        // Jitter in [50 %, 100 %] of the step.
        d.mul_f64(0.5 + 0.5 * unit)
    } else {
        // Jitter in [90 %, 110 %] so many relays do not retry in step.
        PERMANENT_RETRY.mul_f64(0.9 + 0.2 * unit)
    };
    match error.retry_after() {
        Some(after) => base.max(after.min(RETRY_AFTER_MAX)),
        None => base,
    }
}

/// A random number in [0, 1) (jitter only: no cryptographic use).
fn random_unit() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

async fn run(inner: Arc<Inner>, shutdown: CancellationToken) {
    crate::failpoint::panic_point("task-refresher");
    // Start times of the requests of the last minute, for the floor and the cap.
    let mut recent: VecDeque<Instant> = VecDeque::with_capacity(MAX_REQUESTS_PER_MINUTE + 1);
    loop {
        let earliest = earliest_request(&recent, Instant::now());
        if earliest > Instant::now() {
            tracing::debug!(
                wait_ms = (earliest - Instant::now()).as_millis() as u64,
                "token request deferred: at most {MAX_REQUESTS_PER_MINUTE} a minute, {}s apart",
                REQUEST_FLOOR.as_secs()
            );
            tokio::select! {
                () = tokio::time::sleep_until(earliest) => {}
                () = shutdown.cancelled() => break,
            }
        }
        // The generation before the client: a reload in between makes this request's result
        // stale (discarded below), never an old client's result current.
        let mut generation = 0;
        inner.state.send_modify(|s| {
            s.in_flight = true;
            s.force = false;
            s.reload = false;
            generation = s.generation;
        });
        let client = inner
            .client
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let started = Instant::now();
        recent.push_back(started);
        while recent.front().is_some_and(|t| started - *t >= MINUTE) {
            recent.pop_front();
        }
        inner.requests.fetch_add(1, Ordering::Relaxed);
        let result = tokio::select! {
            r = client.request() => r,
            () = shutdown.cancelled() => break,
        };
        if inner.state.borrow().generation != generation {
            tracing::debug!("configuration reloaded during a token request: asking again");
            continue;
        }
        let result = match result {
            Ok(token) if token.lifetime() < MIN_USEFUL_LIFETIME => Err(too_short(&token)),
            other => other,
        };
        let wake_at = match result {
            Ok(token) => {
                let refresh_before = *inner
                    .refresh_before
                    .read()
                    .unwrap_or_else(|e| e.into_inner());
                let delay = refresh_delay(token.lifetime(), token.refresh_in(), refresh_before);
                tracing::info!(
                    expires_in = token.lifetime().as_secs(),
                    refresh_in = delay.as_secs(),
                    "access token obtained"
                );
                let deadline = token.deadline();
                inner.state.send_modify(|s| {
                    // (After a reload `token` is empty: the pre-reload one stays `previous`.)
                    if let Some(old) = s.token.replace(token) {
                        s.previous = Some(old);
                    }
                    s.last_error = None;
                    s.failures = 0;
                    s.in_flight = false;
                    s.completed += 1;
                });
                // The schedule counts from the request's start, like the token's expiry.
                (started + delay).min(deadline)
            }
            Err(error) => {
                let failures = inner.state.borrow().failures.saturating_add(1);
                let delay = retry_delay(&error, failures, random_unit());
                log_failure(&error, failures, delay);
                inner.state.send_modify(|s| {
                    s.last_error = Some(error);
                    s.failures = failures;
                    s.in_flight = false;
                    s.completed += 1;
                });
                Instant::now() + delay
            }
        };
        // Wait for the schedule, a forced refresh, a reload or shutdown.
        let sleep = tokio::time::sleep_until(wake_at);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => break,
                () = inner.wake.notified() => {
                    let (force, reload) = {
                        let s = inner.state.borrow();
                        (s.force, s.reload)
                    };
                    if reload {
                        break;
                    }
                    if force {
                        let earliest = started + FORCE_MIN_INTERVAL;
                        if Instant::now() >= earliest {
                            break;
                        }
                        if earliest < sleep.deadline() {
                            sleep.as_mut().reset(earliest);
                        }
                    }
                }
                () = shutdown.cancelled() => {
                    inner.state.send_modify(|s| s.stopped = true);
                    return;
                }
            }
        }
    }
    inner.state.send_modify(|s| {
        s.in_flight = false;
        s.stopped = true;
    });
}

fn log_failure(error: &OAuthError, failures: u32, retry_in: Duration) {
    let retry_in = retry_in.as_secs_f64().round() as u64;
    match error {
        OAuthError::Entra {
            http_status,
            error: code,
            error_codes,
            trace_id,
            correlation_id,
            ..
        } => tracing::warn!(
            http_status,
            error = %code,
            aadsts = ?error_codes,
            trace_id = trace_id.as_deref().unwrap_or("-"),
            correlation_id = correlation_id.as_deref().unwrap_or("-"),
            transient = error.is_transient(),
            failures,
            retry_in,
            "token request failed: {error}"
        ),
        _ => tracing::warn!(
            transient = error.is_transient(),
            failures,
            retry_in,
            "token request failed: {error}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn refresh_at_half_and_never_later_than_refresh_before() {
        let rb = 10 * MIN;
        // A typical Entra token: half its lifetime.
        assert_eq!(
            refresh_delay(Duration::from_secs(3599), None, rb),
            Duration::from_millis(1_799_500)
        );
        // 16 minutes: half would leave 8, so refresh 10 minutes before expiry.
        assert_eq!(refresh_delay(16 * MIN, None, rb), 6 * MIN);
        // Short lifetimes cannot leave 10 minutes: half.
        assert_eq!(refresh_delay(MIN, None, rb), Duration::from_secs(30));
        assert_eq!(refresh_delay(10 * MIN, None, rb), 5 * MIN);
        // ESTS refresh_in brings it forward only.
        assert_eq!(refresh_delay(60 * MIN, Some(20 * MIN), rb), 20 * MIN);
        assert_eq!(refresh_delay(60 * MIN, Some(50 * MIN), rb), 30 * MIN);
        // Never a hot loop.
        assert_eq!(refresh_delay(Duration::ZERO, None, rb), REFRESH_MIN);
        // refresh_in brings it forward, but not before a quarter of the lifetime.
        assert_eq!(refresh_delay(60 * MIN, Some(Duration::ZERO), rb), 15 * MIN);
    }

    #[test]
    fn requests_keep_a_floor_and_a_cap_per_minute() {
        let t0 = Instant::now();
        let mut recent = VecDeque::new();
        assert_eq!(earliest_request(&recent, t0), t0);
        recent.push_back(t0);
        assert_eq!(earliest_request(&recent, t0), t0 + REQUEST_FLOOR);
        for i in 1..MAX_REQUESTS_PER_MINUTE as u64 {
            recent.push_back(t0 + Duration::from_secs(i));
        }
        let now = t0 + Duration::from_secs(20);
        assert_eq!(earliest_request(&recent, now), t0 + MINUTE);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_honours_retry_after() {
        let transient = OAuthError::Http {
            http_status: 503,
            retry_after: None,
        };
        assert_eq!(retry_delay(&transient, 1, 0.999_999).as_secs(), 0);
        assert_eq!(retry_delay(&transient, 1, 0.0), Duration::from_millis(500));
        assert_eq!(retry_delay(&transient, 4, 0.0), Duration::from_secs(4));
        assert!(retry_delay(&transient, 4, 0.99) < Duration::from_secs(8));
        assert_eq!(retry_delay(&transient, 40, 0.0), BACKOFF_MAX / 2);
        assert!(retry_delay(&transient, 40, 0.99) <= BACKOFF_MAX);

        let throttled = OAuthError::Http {
            http_status: 429,
            retry_after: Some(Duration::from_secs(120)),
        };
        assert_eq!(retry_delay(&throttled, 1, 0.5), Duration::from_secs(120));
        let absurd = OAuthError::Http {
            http_status: 429,
            retry_after: Some(Duration::from_secs(86_400)),
        };
        assert_eq!(retry_delay(&absurd, 1, 0.5), RETRY_AFTER_MAX);

        let permanent = OAuthError::Config("x".into());
        let d = retry_delay(&permanent, 1, 0.0);
        assert!(d >= Duration::from_secs(270) && d <= Duration::from_secs(330));
    }

    #[test]
    fn random_unit_is_in_range() {
        for _ in 0..100 {
            let u = random_unit();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
