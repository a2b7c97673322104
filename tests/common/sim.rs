//! The simulator in-process (for tests that talk to it directly): start it on ephemeral ports
//! with a temporary state directory, and fetch tokens over HTTP as a client would.

use std::time::Duration;

use base64::Engine;
use smtp_oauth_relay::sim::{EXCHANGE_SCOPE, SimConfig, Simulator};

/// Upper bound for any single HTTP wait in these tests (a hang fails instead of blocking CI).
pub const STEP: Duration = Duration::from_secs(20);

pub struct TestSim {
    pub sim: Simulator,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for TestSim {
    type Target = Simulator;
    fn deref(&self) -> &Simulator {
        &self.sim
    }
}

pub async fn start() -> TestSim {
    start_with(SimConfig::default()).await
}

pub async fn start_with(config: SimConfig) -> TestSim {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = Simulator::start(config, dir.path())
        .await
        .expect("simulator starts");
    TestSim { sim, _dir: dir }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(STEP)
        .build()
        .expect("reqwest client")
}

/// Posts a form to the token URL of `sim`.
pub async fn post_token(sim: &Simulator, form: &[(&str, &str)]) -> reqwest::Response {
    http()
        .post(sim.token_url())
        .form(form)
        .send()
        .await
        .expect("token request")
}

/// A token for the default client and mailbox (client secret in the form body).
pub async fn token(sim: &Simulator) -> String {
    token_for_scope(sim, EXCHANGE_SCOPE).await
}

pub async fn token_for_scope(sim: &Simulator, scope: &str) -> String {
    let cfg = sim.config();
    let client = &cfg.clients[0];
    let resp = post_token(
        sim,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &client.client_id),
            ("client_secret", &client.secrets[0].value),
            ("scope", scope),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200, "token request failed");
    let body: serde_json::Value = resp.json().await.expect("json");
    body["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}

/// The SASL XOAUTH2 initial response.
pub fn xoauth2(user: &str, token: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}
