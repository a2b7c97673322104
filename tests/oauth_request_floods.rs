//! Token request floods (issue 11, item 6), on tokio's paused clock against an endpoint that
//! counts requests.
//!
//! A token with `expires_in: 0` made the refresher ask 300+ times in 8 s. Whatever the endpoint
//! answers (0, negative, huge, garbage, missing, an absurd `refresh_in`) and whatever callers do
//! (forced refreshes, reloads in a loop), requests keep a floor between them, back off, and
//! never exceed the cap per minute; a normal `expires_in` still refreshes `refresh_before` ahead.
//! A flood is detected by the request count itself (it never lets the paused clock advance).

mod common;

use std::time::Duration;

use common::counting_token::CountingTokenEndpoint;
use serde_json::json;
use smtp_oauth_relay::config::{Config, Secret};
use smtp_oauth_relay::oauth::TokenProvider;
use smtp_oauth_relay::oauth::refresher::{MAX_REQUESTS_PER_MINUTE, REQUEST_FLOOR};
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

const TENANT: &str = "contoso.onmicrosoft.com";
const MINUTE: Duration = Duration::from_secs(60);
/// More requests than this in the observed ten minutes is a flood.
const FLOOD: usize = 10 * MAX_REQUESTS_PER_MINUTE + 1;

fn config(endpoint: &CountingTokenEndpoint) -> Config {
    let mut c = Config::default();
    c.oauth.tenant_id = Some(TENANT.into());
    c.oauth.client_id = Some("00000000-0000-4000-8000-00000000c11d".into());
    c.oauth.client_secret = Some(Secret::new("s3cret-value"));
    c.oauth.token_url = Some(endpoint.url(TENANT));
    c.upstream.mail_account = Some("relay@contoso.example".into());
    c
}

fn token_body(expires_in: serde_json::Value) -> serde_json::Value {
    json!({"token_type": "Bearer", "expires_in": expires_in, "access_token": "flood-test-token"})
}

/// Runs a provider against `endpoint` for `span` of paused time (or until a flood), and
/// returns the request times relative to the start.
async fn observe(endpoint: &CountingTokenEndpoint, config: &Config, span: Duration) -> Vec<f64> {
    let shutdown = CancellationToken::new();
    let t0 = Instant::now();
    let (provider, task) = TokenProvider::start(config, shutdown.clone()).expect("provider");
    tokio::select! {
        () = sleep_until(t0 + span) => {}
        () = endpoint.reached(FLOOD) => {
            panic!(
                "flood: {FLOOD} token requests within {:?} of paused time",
                Instant::now() - t0
            );
        }
    }
    shutdown.cancel();
    task.await.expect("refresher task");
    drop(provider);
    endpoint
        .seen()
        .iter()
        .map(|t| (*t - t0).as_secs_f64())
        .collect()
}

/// The floor between any two requests and the cap in every 60 s window.
fn assert_paced(what: &str, at: &[f64]) {
    for w in at.windows(2) {
        assert!(
            w[1] - w[0] >= REQUEST_FLOOR.as_secs_f64() - 1e-6,
            "{what}: two requests {:.3}s apart: {at:?}",
            w[1] - w[0]
        );
    }
    for (i, start) in at.iter().enumerate() {
        let in_window = at[i..].iter().take_while(|t| **t < start + 60.0).count();
        assert!(
            in_window <= MAX_REQUESTS_PER_MINUTE,
            "{what}: {in_window} requests in the minute from {start:.1}s: {at:?}"
        );
    }
}

/// Later gaps are longer: the requests back off.
fn assert_backs_off(what: &str, at: &[f64]) {
    assert!(at.len() >= 4, "{what}: {at:?}");
    let last_gap = at[at.len() - 1] - at[at.len() - 2];
    assert!(
        last_gap >= 60.0,
        "{what}: still asking every {last_gap:.1}s after 10 minutes: {at:?}"
    );
    assert!(
        at.len() <= 20,
        "{what}: {} requests in 10 minutes: {at:?}",
        at.len()
    );
}

#[tokio::test(start_paused = true)]
async fn useless_or_garbled_lifetimes_back_off() {
    let answers = [
        ("expires_in 0", token_body(json!(0))),
        ("expires_in \"0\"", token_body(json!("0"))),
        ("expires_in 1", token_body(json!(1))),
        ("expires_in -1", token_body(json!(-1))),
        ("expires_in -3600", token_body(json!(-3600))),
        ("expires_in 1e12", token_body(json!(1e12))),
        ("expires_in soon", token_body(json!("soon"))),
        ("expires_in null", token_body(json!(null))),
        (
            "expires_in missing",
            json!({"token_type": "Bearer", "access_token": "flood-test-token"}),
        ),
    ];
    for (what, body) in answers {
        let endpoint = CountingTokenEndpoint::start(body).await;
        let at = observe(&endpoint, &config(&endpoint), 10 * MINUTE).await;
        assert_paced(what, &at);
        assert_backs_off(what, &at);
    }
}

#[tokio::test(start_paused = true)]
async fn short_huge_and_odd_lifetimes_stay_under_the_cap() {
    // Two-second tokens: refreshed every second at most, never more than the cap a minute.
    let endpoint = CountingTokenEndpoint::start(token_body(json!(2))).await;
    let at = observe(&endpoint, &config(&endpoint), 10 * MINUTE).await;
    assert_paced("expires_in 2", &at);
    assert!(
        at.len() >= 10,
        "two-second tokens are still renewed: {at:?}"
    );

    // A normal token with refresh_in 0: not a request a second.
    let endpoint = CountingTokenEndpoint::start(json!({
        "token_type": "Bearer", "expires_in": 3599, "refresh_in": 0, "access_token": "t-refresh-in-0",
    }))
    .await;
    let at = observe(&endpoint, &config(&endpoint), 10 * MINUTE).await;
    assert_eq!(at.len(), 1, "refresh_in 0: {at:?}");

    // A lifetime of years is believed for a day at most: refreshed within 12 h, not never.
    let endpoint = CountingTokenEndpoint::start(token_body(json!(100_000_000u64))).await;
    let at = observe(
        &endpoint,
        &config(&endpoint),
        Duration::from_secs(12 * 3600 + 60),
    )
    .await;
    assert_paced("expires_in 1e8", &at);
    assert_eq!(at.len(), 2, "refreshed once after at most 12 h: {at:?}");
    assert!((at[1] - 43_200.0).abs() < 0.01, "{at:?}");
}

#[tokio::test(start_paused = true)]
async fn forced_refreshes_and_reloads_in_a_loop_stay_under_the_cap() {
    let endpoint = CountingTokenEndpoint::start(token_body(json!(3599))).await;
    let config = config(&endpoint);
    let shutdown = CancellationToken::new();
    let t0 = Instant::now();
    let (provider, task) = TokenProvider::start(&config, shutdown.clone()).expect("provider");
    provider.token().await.expect("first token");
    // Two minutes of a caller forcing a refresh every 100 ms, and a reload every second.
    for i in 0..1200u32 {
        provider.force_refresh();
        if i % 10 == 0 {
            provider.reload(&config).expect("reload");
        }
        tokio::select! {
            () = sleep(Duration::from_millis(100)) => {}
            () = endpoint.reached(FLOOD) => panic!("flood: {FLOOD} requests"),
        }
    }
    shutdown.cancel();
    task.await.expect("refresher task");
    let at: Vec<f64> = endpoint
        .seen()
        .iter()
        .map(|t| (*t - t0).as_secs_f64())
        .collect();
    assert_paced("forced and reloaded", &at);
    assert!(at.len() >= 10, "forced refreshes still happen: {at:?}");
}

#[tokio::test(start_paused = true)]
async fn a_normal_lifetime_still_refreshes_refresh_before_ahead() {
    // 16-minute tokens with refresh_before = 10 min: each refresh 6 minutes after the last,
    // i.e. 10 minutes before expiry (half the lifetime would be too late).
    let endpoint = CountingTokenEndpoint::start(token_body(json!(960))).await;
    let mut c = config(&endpoint);
    c.oauth.refresh_before = Duration::from_secs(600);
    let at = observe(&endpoint, &c, 20 * MINUTE).await;
    assert_eq!(at.len(), 4, "{at:?}");
    for (i, t) in at.iter().enumerate() {
        assert!(
            (t - 360.0 * i as f64).abs() < 0.01,
            "request {i} at {t}: {at:?}"
        );
    }
    // Entra's usual 3599 s: at half the lifetime (well over 10 minutes ahead).
    let endpoint = CountingTokenEndpoint::start(token_body(json!(3599))).await;
    let at = observe(&endpoint, &config(&endpoint), 31 * MINUTE).await;
    assert_eq!(at.len(), 2, "{at:?}");
    assert!((at[1] - 1799.5).abs() < 0.01, "{at:?}");
}
