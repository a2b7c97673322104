//! `/readyz`, `/healthz` and `/metrics` while mail flows and while delivery is held.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::delivery::{DeliveringRelay, start_delivering};
use smtp_oauth_relay::admin::{AdminState, router};
use smtp_oauth_relay::sim::SimConfig;
use tokio_util::sync::CancellationToken;

const FAST: &str =
    "[queue]\nretry_min = \"200ms\"\nretry_max = \"1s\"\n[upstream]\nrate = \"1000/s\"\n";

/// Serves the admin routes for `r` on an ephemeral port; returns its base URL.
async fn serve_admin(r: &DeliveringRelay) -> String {
    let config = smtp_oauth_relay::config::Config::from_toml_str("").expect("config");
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(config));
    let state = AdminState::new(std::sync::Arc::new(r.relay.spool.clone()), rx).with_delivery(
        r.metrics.clone(),
        Some(r.delivery.clone()),
        Some(r.tokens.clone()),
    );
    state
        .accepting
        .store(true, std::sync::atomic::Ordering::Release);
    let listener = smtp_oauth_relay::admin::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(smtp_oauth_relay::admin::serve(
        listener,
        router(state),
        CancellationToken::new(),
    ));
    format!("http://{addr}")
}

async fn get(url: &str) -> (u16, String) {
    let resp = reqwest::get(url).await.expect("GET");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body"))
}

fn samples(text: &str) -> Vec<prometheus_parse::Sample> {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines)
        .expect("valid Prometheus text")
        .samples
}

fn value(samples: &[prometheus_parse::Sample], name: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test]
async fn metrics_move_as_mail_flows() {
    let r = start_delivering(FAST, SimConfig::default()).await;
    let base = serve_admin(&r).await;
    let before = samples(&get(&format!("{base}/metrics")).await.1);
    assert_eq!(value(&before, "relay_accepted_total"), 0.0);
    r.send("one").await;
    r.send("two").await;
    // A refused command is counted by its enhanced code.
    let mut c = r.relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("RCPT TO:<x@example.org>", "503 5.5.1").await;
    r.wait_delivered(2).await;
    r.wait_for("empty spool", |relay| {
        relay.spool.list().expect("list").is_empty()
    })
    .await;
    let (status, text) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    let after = samples(&text);
    assert_eq!(value(&after, "relay_accepted_total"), 2.0, "{text}");
    assert_eq!(value(&after, "relay_delivered_total"), 2.0, "{text}");
    assert!(value(&after, "relay_refused_total") >= 1.0, "{text}");
    assert!(
        text.contains("relay_refused_total{reason=\"5.5.1\"}"),
        "{text}"
    );
    assert_eq!(value(&after, "relay_queue_depth"), 0.0);
    assert!(
        value(&after, "relay_token_expiry_seconds") > 3000.0,
        "{text}"
    );
    assert!(
        value(&after, "relay_upstream_session_seconds_count") >= 1.0,
        "{text}"
    );
    assert_eq!(
        value(&after, "relay_upstream_transaction_seconds_count"),
        2.0,
        "{text}"
    );
    let (_, health) = get(&format!("{base}/healthz")).await;
    let health: serde_json::Value = serde_json::from_str(&health).expect("json");
    assert_eq!(health["mailbox"]["state"], "running", "{health}");
    assert_eq!(health["token"]["state"], "valid", "{health}");
    assert!(health["last_delivery"].is_string(), "{health}");
}

#[tokio::test]
async fn a_held_mailbox_shows_in_healthz_but_readyz_stays_ready() {
    let r = start_delivering(FAST, SimConfig::default()).await;
    let base = serve_admin(&r).await;
    r.sim.control().set_smtp_auth_disabled(true);
    r.send("held").await;
    let mut health = serde_json::Value::Null;
    for _ in 0..200 {
        let (_, text) = get(&format!("{base}/healthz")).await;
        health = serde_json::from_str(&text).expect("json");
        if health["mailbox"]["state"] == "held" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(health["mailbox"]["state"], "held", "{health}");
    assert_eq!(
        health["mailbox"]["reason"], "SMTP AUTH disabled",
        "{health}"
    );
    assert!(
        health["mailbox"]["fix"]
            .as_str()
            .unwrap_or("")
            .contains("SmtpClientAuthenticationDisabled"),
        "{health}"
    );
    assert!(
        health["mailbox"]["reply"]
            .as_str()
            .unwrap_or("")
            .contains("535 5.7.139"),
        "{health}"
    );
    assert_eq!(health["queue"]["depth"], 1, "{health}");
    // Delivery trouble never makes the relay unready: a sidecar must not take its pod down.
    let (status, body) = get(&format!("{base}/readyz")).await;
    assert_eq!(status, 200, "{body}");
    let m = samples(&get(&format!("{base}/metrics")).await.1);
    assert_eq!(value(&m, "relay_delivery_held"), 1.0);
    assert!(value(&m, "relay_held_total") >= 1.0);
    assert_eq!(value(&m, "relay_queue_depth"), 1.0);
}
