//! The background refresher on tokio's paused clock against the fake Entra endpoint: the
//! request count follows the schedule, callers never wait while a token is valid, outages back
//! off (honouring Retry-After) and recover, permanent errors surface and recover after a fix,
//! force_refresh coalesces, and concurrent first callers share one request.

mod oauth_fake;

use std::time::Duration;

use oauth_fake::{Expect, Fake, Reply};
use smtp_oauth_relay::config::{Config, Secret};
use smtp_oauth_relay::oauth::{OAuthError, TokenProvider, TokenState};
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

const S: Duration = Duration::from_secs(1);

fn secret_config(fake: &Fake) -> Config {
    let mut c = fake.config();
    c.oauth.client_secret = Some(Secret::new("s3cret-value"));
    c
}

async fn start(
    fake: &Fake,
) -> (
    TokenProvider,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let shutdown = CancellationToken::new();
    let (p, task) = TokenProvider::start(&secret_config(fake), shutdown.clone()).unwrap();
    (p, shutdown, task)
}

/// Seconds since `t0` of each request the fake saw.
fn times(fake: &Fake, t0: Instant) -> Vec<f64> {
    fake.seen()
        .iter()
        .map(|s| (s.at - t0).as_secs_f64())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn sixty_second_tokens_refresh_every_thirty_seconds_and_never_make_callers_wait() {
    let fake = Fake::start(Expect::Anything, 60).await;
    let t0 = Instant::now();
    let (p, shutdown, task) = start(&fake).await;
    assert_eq!(p.token().await.unwrap().secret(), "fake-access-token-1");

    // Ten simulated minutes, a caller every 5 s (bounded loop).
    for _ in 0..120 {
        sleep(5 * S).await;
        let before = Instant::now();
        let t = p.token().await.expect("a token at every moment");
        assert_eq!(Instant::now(), before, "token() must not wait");
        assert!(
            t.remaining() >= 25 * S,
            "refreshed at half the lifetime: {t:?}"
        );
    }
    // t = 600 s; the refresh due at 600 may or may not have run.
    sleep_until(t0 + Duration::from_millis(600_500)).await;
    let at = times(&fake, t0);
    assert_eq!(at.len(), 21, "t=0 and every 30 s up to 600 s: {at:?}");
    for (i, t) in at.iter().enumerate() {
        assert!((t - 30.0 * i as f64).abs() < 0.01, "request {i} at {t}");
    }
    let st = p.status();
    assert_eq!(st.requests, 21);
    assert_eq!(st.state, TokenState::Valid);
    assert!(st.last_error.is_none() && st.expires_at.is_some());

    shutdown.cancel();
    task.await.unwrap();
    assert!(p.token().await.is_ok(), "a valid token is still served");
}

#[tokio::test(start_paused = true)]
async fn the_old_token_is_served_while_a_slow_refresh_runs() {
    let fake = Fake::start(Expect::Anything, 60).await;
    fake.push([Reply::Ok, Reply::Slow(20 * S)]);
    let t0 = Instant::now();
    let (p, _shutdown, _task) = start(&fake).await;
    let first = p.token().await.unwrap();

    sleep_until(t0 + 31 * S).await; // the refresh started at 30 s and takes 20 s
    assert_eq!(p.status().state, TokenState::Refreshing);
    let before = Instant::now();
    let t = p.token().await.unwrap();
    assert_eq!(
        Instant::now(),
        before,
        "no waiting while a valid token exists"
    );
    assert_eq!(t.secret(), first.secret());

    sleep_until(t0 + 51 * S).await;
    assert_eq!(p.status().state, TokenState::Valid);
    let t = p.token().await.unwrap();
    assert_eq!(t.secret(), "fake-access-token-2");
    assert!(t.remaining() > 35 * S);
    assert_eq!(fake.requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_outage_backs_off_honours_retry_after_and_recovers() {
    let fake = Fake::start(Expect::Anything, 60).await;
    fake.push([Reply::Ok]);
    fake.set_default(Reply::ServerError);
    let t0 = Instant::now();
    let (p, _shutdown, _task) = start(&fake).await;
    let old = p.token().await.unwrap();

    // Refresh due at 30 s fails; retries back off from ~1 s, doubling (with jitter).
    sleep_until(t0 + 44 * S).await;
    let at = times(&fake, t0);
    assert!(
        (5..=6).contains(&at.len()),
        "1 + 4 or 5 attempts in 14 s of outage, not one per second: {at:?}"
    );
    for w in at[1..].windows(3) {
        assert!(w[2] - w[1] >= w[1] - w[0] - 0.01, "gaps grow: {at:?}");
    }
    // Callers still get the old, valid token, at once.
    let t = p.token().await.unwrap();
    assert_eq!(t.secret(), old.secret());
    let st = p.status();
    assert_eq!(st.state, TokenState::Valid);
    assert!(st.last_error.as_deref().unwrap().contains("HTTP 500"));
    assert_eq!(st.last_error_transient, Some(true));

    // Now the endpoint throttles with Retry-After: 120.
    fake.set_default(Reply::TooMany(120));
    let n = fake.requests();
    sleep_until(t0 + 61 * S).await;
    let throttled_at = *times(&fake, t0).last().unwrap();
    assert_eq!(fake.requests(), n + 1, "one attempt got the 429");
    // The old token has expired: callers get the error at once, without a request each.
    for _ in 0..20 {
        let e = p.token().await.unwrap_err();
        assert!(e.is_transient() && e.http_status() == Some(429), "{e}");
    }
    assert_eq!(p.status().state, TokenState::Failed);
    assert_eq!(fake.requests(), n + 1);

    fake.set_default(Reply::Ok);
    sleep_until(t0 + Duration::from_secs_f64(throttled_at) + 119 * S).await;
    assert_eq!(fake.requests(), n + 1, "nothing before Retry-After");
    sleep(2 * S).await;
    assert_eq!(fake.requests(), n + 2, "retried when Retry-After ended");
    let gap = times(&fake, t0)[n + 1] - throttled_at;
    assert!((119.999..121.0).contains(&gap), "gap {gap}");
    let st = p.status();
    assert_eq!(st.state, TokenState::Valid);
    assert_eq!(st.failures, 0);
    assert!(st.last_error.is_none());
    assert_ne!(p.token().await.unwrap().secret(), old.secret());
}

#[tokio::test(start_paused = true)]
async fn a_permanent_error_surfaces_and_a_fix_recovers_without_restart() {
    let fake = Fake::start(Expect::Secret("the-right-one".into()), 3599).await;
    let t0 = Instant::now();
    let (p, _shutdown, _task) = start(&fake).await;
    let e = p.token().await.unwrap_err();
    assert_eq!(e.error_codes(), &[7000215]);
    assert!(!e.is_transient());
    let st = p.status();
    assert_eq!(st.state, TokenState::Failed);
    assert!(st.last_error.as_deref().unwrap().contains("AADSTS7000215"));
    assert!(st.last_error.as_deref().unwrap().contains("trace-7000215"));
    assert!(!st.last_error.as_deref().unwrap().contains("s3cret-value"));
    assert_eq!(st.last_error_transient, Some(false));

    // Callers never cause requests; permanent errors are retried slowly.
    for _ in 0..50 {
        let before = Instant::now();
        assert!(p.token().await.is_err());
        assert_eq!(Instant::now(), before);
    }
    p.force_refresh(); // ignored during a failure: backoff rules
    sleep_until(t0 + 260 * S).await;
    assert_eq!(fake.requests(), 1, "{:?}", times(&fake, t0));

    // The admin fixes the secret on the tenant side (here: the fake accepts ours).
    fake.set_expect(Expect::Secret("s3cret-value".into()));
    sleep_until(t0 + 340 * S).await;
    assert_eq!(fake.requests(), 2, "{:?}", times(&fake, t0));
    assert_eq!(p.status().state, TokenState::Valid);
    assert!(p.token().await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn reload_applies_a_new_credential_at_once() {
    let fake = Fake::start(Expect::Secret("new-secret".into()), 3599).await;
    let t0 = Instant::now();
    let (p, _shutdown, _task) = start(&fake).await;
    assert!(p.token().await.is_err());
    sleep_until(t0 + 10 * S).await;
    let mut fixed = fake.config();
    fixed.oauth.client_secret = Some(Secret::new("new-secret"));
    p.reload(&fixed).unwrap();
    sleep(S).await;
    assert_eq!(fake.requests(), 2);
    assert!(p.token().await.is_ok());
    // A broken configuration is refused and the working one stays.
    let mut broken = fake.config();
    broken.oauth.client_id = None;
    broken.oauth.client_secret = Some(Secret::new("x"));
    assert!(matches!(p.reload(&broken), Err(OAuthError::Config(_))));
    sleep(S).await;
    assert_eq!(fake.requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn force_refresh_coalesces() {
    let fake = Fake::start(Expect::Anything, 3600).await;
    let t0 = Instant::now();
    let (p, _shutdown, _task) = start(&fake).await;
    let first = p.token().await.unwrap();

    sleep_until(t0 + 10 * S).await;
    for _ in 0..10 {
        p.force_refresh();
    }
    sleep(S).await;
    assert_eq!(fake.requests(), 2, "10 calls, 1 request");
    assert!((times(&fake, t0)[1] - 10.0).abs() < 0.01);
    assert_ne!(p.token().await.unwrap().secret(), first.secret());

    // While a request runs, more calls add nothing.
    fake.push([Reply::Slow(3 * S)]);
    sleep(10 * S).await;
    p.force_refresh();
    sleep(S).await;
    assert_eq!(p.status().state, TokenState::Refreshing);
    for _ in 0..10 {
        p.force_refresh();
    }
    sleep(100 * S).await;
    assert_eq!(fake.requests(), 3);

    // Never sooner than 5 s after the previous request.
    p.force_refresh();
    sleep(S).await;
    assert_eq!(fake.requests(), 4);
    let at = times(&fake, t0);
    p.force_refresh();
    sleep(10 * S).await;
    let at2 = times(&fake, t0);
    assert_eq!(at2.len(), 5);
    assert!((at2[4] - at[3] - 5.0).abs() < 0.01, "{at2:?}");
}

#[tokio::test(start_paused = true)]
async fn refresh_now_waits_for_the_forced_request() {
    let fake = Fake::start(Expect::Anything, 3600).await;
    let t0 = Instant::now();
    let (p, _shutdown, _task) = start(&fake).await;
    let first = p.token().await.unwrap();
    sleep_until(t0 + 60 * S).await;
    // Ten deliverers see a 535 at once: one request, all get its token.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let p = p.clone();
        set.spawn(async move { p.refresh_now().await.map(|t| t.secret().to_string()) });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap().unwrap(), "fake-access-token-2");
    }
    assert_eq!(fake.requests(), 2);
    assert_ne!(first.secret(), "fake-access-token-2");

    // A failing refresh gives its error; during the backoff the error comes back at once.
    fake.set_default(Reply::Entra(401, "invalid_client", 7000222));
    sleep(10 * S).await;
    let e = p.refresh_now().await.unwrap_err();
    assert_eq!(e.error_codes(), &[7000222]);
    let before = Instant::now();
    let e = p.refresh_now().await.unwrap_err();
    assert_eq!(e.error_codes(), &[7000222]);
    assert_eq!(Instant::now(), before);
    assert_eq!(fake.requests(), 3);
    // The previous token is still valid and still served.
    assert_eq!(p.token().await.unwrap().secret(), "fake-access-token-2");
}

#[tokio::test(start_paused = true)]
async fn a_hundred_concurrent_first_callers_share_one_request() {
    let fake = Fake::start(Expect::Anything, 3600).await;
    fake.push([Reply::Slow(2 * S)]);
    let (p, _shutdown, _task) = start(&fake).await;
    assert_eq!(p.status().state, TokenState::Pending);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let p = p.clone();
        set.spawn(async move { p.token().await.map(|t| t.secret().to_string()) });
    }
    let mut n = 0;
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap().unwrap(), "fake-access-token-1");
        n += 1;
    }
    assert_eq!(n, 100);
    assert_eq!(fake.requests(), 1);
    assert_eq!(p.status().requests, 1);
}

#[tokio::test(start_paused = true)]
async fn the_first_wait_is_bounded_and_start_refuses_bad_config() {
    let fake = Fake::start(Expect::Anything, 3600).await;
    fake.push([Reply::Slow(29 * S)]);
    let (p, _shutdown, _task) = start(&fake).await;
    let before = Instant::now();
    assert!(p.token().await.is_ok(), "waited for the first request");
    assert_eq!(before.elapsed().as_secs(), 29);

    // An endpoint that never answers: the request times out at 30 s, callers get that error.
    let silent = Fake::start(Expect::Anything, 3600).await;
    silent.set_default(Reply::Slow(3600 * S));
    let (p, _shutdown, _task) = start(&silent).await;
    let e = p.token().await.unwrap_err();
    assert!(
        matches!(e, OAuthError::Timeout(_) | OAuthError::NotReady(_)),
        "{e}"
    );
    assert!(e.is_transient());

    let mut bad = fake.config();
    bad.oauth.private_key_file = Some("/nonexistent/key.pem".into());
    bad.oauth.certificate_file = Some("/nonexistent/cert.pem".into());
    let e = TokenProvider::start(&bad, CancellationToken::new()).unwrap_err();
    assert!(matches!(e, OAuthError::Config(_)), "{e}");
}
