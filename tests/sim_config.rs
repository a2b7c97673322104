//! Simulator configuration: the example `sim.toml`, TOML errors, and the relay.toml fragment it prints
//! (whose values must actually work against the running simulator).

mod common;

use std::path::Path;

use common::sim::{start_with, xoauth2};
use common::smtp::Client;
use figment::providers::Format as _;
use serde_json::Value;
use smtp_oauth_relay::sim::{RateMode, SendAsReply, SimConfig};

#[test]
fn example_file_equals_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("sim.toml");
    let cfg = SimConfig::from_toml_file(&path).expect("sim.toml parses");
    assert_eq!(cfg, SimConfig::default(), "sim.toml documents the defaults");
}

#[test]
fn toml_overrides_and_errors() {
    let cfg = SimConfig::from_toml_str(
        r#"
        token_lifetime_secs = 60
        [smtp]
        rate_mode = "delay"
        send_as_reply = "5.2.252"
        idle_timeout = "2s"
        [[clients]]
        client_id = "11111111-1111-1111-1111-111111111111"
        secrets = [{ value = "s3cret" }]
        "#,
    )
    .expect("parses");
    assert_eq!(cfg.token_lifetime_secs, 60);
    assert_eq!(cfg.smtp.rate_mode, RateMode::Delay);
    assert_eq!(cfg.smtp.send_as_reply, SendAsReply::Code52252);
    assert_eq!(cfg.smtp.idle_timeout, std::time::Duration::from_secs(2));
    assert_eq!(cfg.clients[0].secrets[0].value, "s3cret");
    assert!(!cfg.clients[0].secrets[0].expired);
    assert_eq!(
        cfg.clients[0].roles.as_deref(),
        Some(&["SMTP.SendAsApp".to_string()][..])
    );

    let err = SimConfig::from_toml_str("tenant = \"x\"").expect_err("unknown key");
    assert!(err.to_string().contains("tenant"), "{err}");
    let err =
        SimConfig::from_toml_file(Path::new("/nonexistent/sim.toml")).expect_err("missing file");
    assert!(err.to_string().contains("/nonexistent/sim.toml"), "{err}");
}

#[tokio::test]
async fn relay_fragment_points_at_the_simulator() {
    let sim = start_with(SimConfig::default()).await;
    let fragment = sim.relay_config_fragment();
    let v: Value = figment::Figment::new()
        .merge(figment::providers::Toml::string(&fragment))
        .extract()
        .expect("fragment is TOML");
    let up = &v["upstream"];
    assert_eq!(up["host"], "127.0.0.1");
    assert_eq!(up["port"], sim.smtp_addr().port());
    assert_eq!(up["tls"], "starttls");
    assert_eq!(up["tls_server_name"], "smtp.office365.com");
    assert_eq!(up["mail_account"], "relay@contoso.example");
    assert_eq!(up["from"], "relay@contoso.example");
    let oauth = &v["oauth"];
    assert_eq!(oauth["scope"], "https://outlook.office365.com/.default");
    assert_eq!(oauth["token_url"], sim.token_url());

    // Use the printed values, exactly, to get a token and authenticate.
    let s = |x: &Value| x.as_str().unwrap_or_default().to_string();
    let resp = common::sim::http()
        .post(s(&oauth["token_url"]))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &s(&oauth["client_id"])),
            ("client_secret", &s(&oauth["client_secret"])),
            ("scope", &s(&oauth["scope"])),
        ])
        .send()
        .await
        .expect("token request");
    assert_eq!(resp.status(), 200);
    let token = resp.json::<Value>().await.expect("json")["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(Path::new(&s(&up["ca_file"])), sim.ca_file());
    let mut c = Client::secure(&sim).await;
    c.cmd(&format!(
        "AUTH XOAUTH2 {}",
        xoauth2(&s(&up["mail_account"]), &token)
    ))
    .await
    .assert(235, "2.7.0");
}
