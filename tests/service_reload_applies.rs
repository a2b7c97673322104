//! SIGHUP applies what it says it applies: a rotated client secret (inline, or in a
//! `client_secret_file`) is used for a new token at once, against a token endpoint that accepts
//! only the new secret; new upstream settings are used by a fresh upstream connection; new retry
//! bounds time the next deferral; keys the process cannot change are listed as needing a
//! restart. A rotated secret file needs no signal at all: it is re-read at every token request.
//!
//! The relay is the real binary; Entra ID and Exchange Online are the in-process simulator, so
//! the test can rotate the secret it accepts and count its token requests and connections.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::process::{Relay, relay_toml, with_upstream};
use common::proxy::Proxy;
use common::sim::TestSim;
use common::{Client, queued_id};
use smtp_oauth_relay::sim::{SecretConfig, SmtpFault, SmtpStage};

const NEW_SECRET: &str = "Rot8~ated-secret-value-0123456789abcdefgh";

/// The simulator now accepts only `NEW_SECRET` for its client.
fn sim_accepts_only_the_new_secret(sim: &TestSim) {
    sim.control()
        .update(|c| {
            c.clients[0].secrets = vec![SecretConfig {
                value: NEW_SECRET.into(),
                expired: false,
            }];
        })
        .expect("rotate the simulator's secret");
}

/// The simulator's relay.toml fragment with `client_secret` replaced by `secret_line` and the
/// upstream port by `port`.
fn fragment(sim: &TestSim, secret_line: &str, port: u16) -> String {
    sim.relay_config_fragment()
        .lines()
        .map(|l| {
            if l.starts_with("client_secret") {
                secret_line.to_string()
            } else if l.starts_with("port = ") {
                format!("port = {port}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn config(port: u16, spool: &Path, smtp: &str, queue: &str, fragment: &str) -> String {
    relay_toml(
        port,
        spool,
        smtp,
        queue,
        &format!(
            "[log]\nlevel = \"info\"\n\n{}\n",
            with_upstream(fragment, "rate = \"1000/s\"")
        ),
    )
}

async fn send_one(relay: &Relay, subject: &str) -> String {
    let mut c = Client::connect(relay.smtp()).await;
    c.begin_message("app@legacy.test", &["someone@example.org"])
        .await;
    c.send(format!("Subject: {subject}\r\n\r\nhello\r\n.\r\n").as_bytes())
        .await;
    let reply = c.reply().await;
    assert!(reply.starts_with("250 2.0.0"), "{reply:?}");
    c.cmd_expect("QUIT", "221").await;
    queued_id(&reply)
}

/// Waits (bounded: 30 s) until `check` holds.
async fn wait_until(what: &str, relay: &Relay, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; relay log:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The comma-separated list after `field=` in a log line.
fn list(line: &str, field: &str) -> Vec<String> {
    let Some(at) = line.find(&format!(" {field}=")) else {
        return Vec::new();
    };
    let rest = &line[at + field.len() + 2..];
    // The next field starts with ` name=`; the list itself is `a, b, c`.
    let end = rest
        .match_indices(' ')
        .find(|(i, _)| {
            let word = &rest[i + 1..];
            word.split_once('=')
                .is_some_and(|(name, _)| !name.contains(' ') && !name.contains(','))
        })
        .map_or(rest.len(), |(i, _)| i);
    let mut keys: Vec<String> = rest[..end]
        .split(", ")
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
        .collect();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_an_inline_secret_new_upstream_settings_and_retry_bounds() {
    let sim = common::sim::start().await;
    // The relay first reaches the simulator through a forwarder: after the reload it must
    // connect to the simulator directly, on a connection opened with the new settings.
    let proxy = Proxy::start(sim.smtp_addr()).await;
    let old_secret = sim.config().clients[0].secrets[0].value.clone();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let before = fragment(
        &sim,
        &format!("client_secret = \"{old_secret}\""),
        proxy.addr.port(),
    );
    let queue_before = "retry_min = \"10s\"\nretry_max = \"20s\"";
    let relay = Relay::start_with(dir.path(), "inline", &[], |port| {
        config(port, &spool, "", queue_before, &before)
    });
    send_one(&relay, "before the rotation").await;
    wait_until("the first delivery", &relay, || {
        sim.messages().unwrap().len() == 1
    })
    .await;
    assert_eq!(
        proxy.connections(),
        1,
        "the first session went through the proxy"
    );
    assert_eq!(sim.control().tokens_issued(), 1);

    // Rotate: Entra accepts only the new secret; relay.toml has it inline, the upstream port is
    // the simulator's own, the retry bounds change, and so does one key that needs a restart.
    sim_accepts_only_the_new_secret(&sim);
    let after = fragment(
        &sim,
        &format!("client_secret = \"{NEW_SECRET}\""),
        sim.smtp_addr().port(),
    );
    let port = relay.port;
    std::fs::write(
        &relay.config,
        config(
            port,
            &spool,
            "max_recipients = 200",
            "retry_min = \"2m\"\nretry_max = \"4m\"",
            &after,
        ),
    )
    .unwrap();
    let mark = relay.log_text().len();
    relay.signal(libc::SIGHUP);
    let line = relay.wait_log("SIGHUP: configuration reloaded", mark).await;
    assert_eq!(
        list(&line, "applied"),
        [
            "oauth.client_secret",
            "queue.retry_max",
            "queue.retry_min",
            "upstream.port"
        ],
        "{line}"
    );
    assert_eq!(
        list(&line, "needs_restart"),
        ["smtp.max_recipients"],
        "{line}"
    );

    // oauth.client_secret: a new token, requested with the new secret at once.
    wait_until("a token obtained with the new secret", &relay, || {
        sim.control().tokens_issued() == 2
    })
    .await;
    assert!(
        !relay.log_text()[mark..].contains("token request failed"),
        "{}",
        relay.log_text()
    );

    // upstream.port: the next delivery opens a fresh connection, straight to the simulator.
    send_one(&relay, "after the rotation").await;
    wait_until("the delivery after the rotation", &relay, || {
        sim.messages().unwrap().len() == 2
    })
    .await;
    assert_eq!(
        proxy.connections(),
        1,
        "no new connection through the old port"
    );
    assert_eq!(
        sim.control().smtp_connections(),
        2,
        "a fresh upstream connection after the reload"
    );

    // queue.retry_min: the next deferral waits the new minimum (2m, +20% jitter at most).
    sim.control()
        .script_smtp_fault(SmtpStage::Mail, SmtpFault::Reply451, 1);
    let mark = relay.log_text().len();
    let id = send_one(&relay, "deferred").await;
    let deferred = relay.wait_log("delivery deferred", mark).await;
    assert!(deferred.contains(&id), "{deferred}");
    assert!(deferred.contains("retry_in=2m"), "{deferred}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_after_rotating_the_secret_file_requests_a_token_with_it_at_once() {
    let sim = common::sim::start().await;
    let old_secret = sim.config().clients[0].secrets[0].value.clone();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let secret_file = dir.path().join("client_secret");
    std::fs::write(&secret_file, format!("{old_secret}\n")).unwrap();
    let fragment = fragment(
        &sim,
        &format!("client_secret_file = \"{}\"", secret_file.display()),
        sim.smtp_addr().port(),
    );
    let relay = Relay::start_with(dir.path(), "file", &[], |port| {
        config(port, &spool, "", "", &fragment)
    });
    send_one(&relay, "before the rotation").await;
    wait_until("the first delivery", &relay, || {
        sim.messages().unwrap().len() == 1
    })
    .await;
    assert_eq!(sim.control().tokens_issued(), 1);

    // The secret is rotated in the file (relay.toml itself is unchanged), then SIGHUP.
    sim_accepts_only_the_new_secret(&sim);
    std::fs::write(&secret_file, format!("{NEW_SECRET}\n")).unwrap();
    let mark = relay.log_text().len();
    relay.signal(libc::SIGHUP);
    let line = relay.wait_log("SIGHUP: configuration reloaded", mark).await;
    assert_eq!(list(&line, "applied"), ["oauth.client_secret"], "{line}");
    assert!(list(&line, "needs_restart").is_empty(), "{line}");
    wait_until("a token obtained with the new secret", &relay, || {
        sim.control().tokens_issued() == 2
    })
    .await;
    assert!(
        !relay.log_text()[mark..].contains("token request failed"),
        "{}",
        relay.log_text()
    );
    send_one(&relay, "after the rotation").await;
    wait_until("the delivery after the rotation", &relay, || {
        sim.messages().unwrap().len() == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_file_is_used_at_the_next_refresh_without_a_signal() {
    let sim = common::sim::start().await;
    // Ten-second tokens: the refresher asks again every five seconds.
    sim.control().set_token_lifetime(10);
    let old_secret = sim.config().clients[0].secrets[0].value.clone();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let secret_file = dir.path().join("client_secret");
    std::fs::write(&secret_file, format!("{old_secret}\n")).unwrap();
    let fragment = fragment(
        &sim,
        &format!("client_secret_file = \"{}\"", secret_file.display()),
        sim.smtp_addr().port(),
    );
    let relay = Relay::start_with(dir.path(), "kube", &[], |port| {
        config(port, &spool, "", "", &fragment)
    });
    wait_until("the first token", &relay, || {
        sim.control().tokens_issued() >= 1
    })
    .await;
    // Rotate right after a refresh (the next one is five seconds away), as the kubelet swaps
    // a mounted Secret: the file and the tenant change, the relay is not told.
    let issued = sim.control().tokens_issued();
    wait_until("a scheduled refresh", &relay, || {
        sim.control().tokens_issued() > issued
    })
    .await;
    let issued = sim.control().tokens_issued();
    let mark = relay.log_text().len();
    sim_accepts_only_the_new_secret(&sim);
    std::fs::write(&secret_file, format!("{NEW_SECRET}\n")).unwrap();
    wait_until("a refresh with the rotated file", &relay, || {
        sim.control().tokens_issued() > issued
    })
    .await;
    assert!(
        !relay.log_text()[mark..].contains("token request failed"),
        "{}",
        relay.log_text()
    );
    send_one(&relay, "after the rotation").await;
    wait_until("the delivery after the rotation", &relay, || {
        sim.messages().unwrap().len() == 1
    })
    .await;
}
