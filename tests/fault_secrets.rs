//! Scenario 5 of the fault campaign: access control and secrets, against the real binary.
//!
//! - A client from 127.0.0.2 is refused before any command when `allow_networks` excludes it.
//! - AUTH-required mode (`smtp.auth = <users file>`) refuses wrong credentials, after a delay,
//!   and MAIL without AUTH.
//! - A relay at `log.level = "trace"` delivering with a certificate credential (private key) to
//!   the standalone simulator, then with a client secret, leaves neither the secret, the private
//!   key, the client assertion, the issued tokens (any JWT), the XOAUTH2 string nor the inbound
//!   password in its logs, in `config`, `check`, `queue list` / `queue show` output.

mod common;

use std::time::{Duration, Instant};

use common::fixtures::{Ledger, report, spool_count};
use common::process::{Relay, free_port, relay_toml, run_text as run, with_upstream};
use common::sim_process::SimProc;
use common::smtp::blocking::Client;

#[test]
fn clients_outside_allow_networks_are_refused_before_any_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool");
    let relay = Relay::start_with(dir.path(), "acl", &[], |port| {
        relay_toml(
            port,
            &spool,
            "allow_networks = [\"127.0.0.1/32\"]",
            "",
            "[log]\nlevel = \"info\"\n",
        )
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let got = rt.block_on(async {
        use tokio::io::AsyncReadExt;
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap())
            .expect("bind 127.0.0.2");
        let mut s = sock.connect(relay.addr()).await.expect("connect");
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("closed in time")
            .ok();
        String::from_utf8_lossy(&out).into_owned()
    });
    assert!(
        got.starts_with("554 ") && got.lines().count() == 1,
        "{got:?}"
    );
    // Refused by the allowlist, not by something else.
    let refusal = relay.wait_log_blocking(
        "refusing connection: not in smtp.allow_networks",
        0,
        Duration::from_secs(10),
    );
    assert!(refusal.contains("127.0.0.2"), "{refusal}");
    // From 127.0.0.1 the service is there.
    Client::connect(relay.addr()).expect("allowed client served");
    report("secrets/allow-networks from=127.0.0.2 reply=554-then-close commands_accepted=0");
}

#[test]
fn auth_required_mode_refuses_wrong_credentials_after_a_delay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool");
    let users = dir.path().join("users");
    let hash = common::process::hash_password_cli("Corr3ct-Horse");
    std::fs::write(&users, format!("scanner:{hash}\n")).unwrap();
    let users_s = users.display().to_string();
    let relay = Relay::start_with(dir.path(), "auth", &[], |port| {
        relay_toml(
            port,
            &spool,
            &format!("auth = \"{users_s}\""),
            "",
            "[log]\nlevel = \"trace\"\n",
        )
    });
    let mut c = Client::connect(relay.addr()).unwrap();
    let code = c.command("MAIL FROM:<a@b.c>").unwrap().code;
    assert_eq!(code, 530, "MAIL without AUTH");
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let started = Instant::now();
    let code = c
        .command(&format!("AUTH PLAIN {}", b64("\0scanner\0wrong-password")))
        .unwrap()
        .code;
    let delay = started.elapsed();
    assert_eq!(code, 535);
    assert!(delay >= Duration::from_millis(900), "no delay: {delay:?}");
    // The 535 is the credentials check failing for this user.
    let failed =
        relay.wait_log_blocking("client authentication failed", 0, Duration::from_secs(10));
    assert!(failed.contains("scanner"), "{failed}");
    let code = c
        .command(&format!("AUTH PLAIN {}", b64("\0scanner\0Corr3ct-Horse")))
        .unwrap()
        .code;
    assert_eq!(code, 235);
    let log = relay.log_text();
    assert!(
        !log.contains("Corr3ct-Horse") && !log.contains(&b64("\0scanner\0Corr3ct-Horse")),
        "inbound password in the trace log"
    );
    report(&format!(
        "secrets/auth-required wrong_password=535 delay_ms={} mail_without_auth=530 password_in_trace_log=no",
        delay.as_millis()
    ));
}

/// Every string that must never be shown, with a name for the failure message.
fn forbidden(secret: &str, key_pem: &str) -> Vec<(String, String)> {
    let mut v = vec![("client secret".to_string(), secret.to_string())];
    for (i, line) in key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .enumerate()
    {
        if line.len() >= 16 {
            v.push((format!("private key line {i}"), line.to_string()));
        }
    }
    // Any JWT (tokens, client assertions) starts with a base64url JSON header.
    v.push(("a JWT".into(), "eyJ".into()));
    // The XOAUTH2 initial response: base64 of "user=".
    v.push(("the XOAUTH2 string".into(), "dXNlcj1".into()));
    v
}

fn assert_clean(what: &str, text: &str, forbidden: &[(String, String)]) {
    for (name, value) in forbidden {
        assert!(
            !text.contains(value.as_str()),
            "{what} contains {name}:\n{}",
            text.lines()
                .filter(|l| l.contains(value.as_str()))
                .take(3)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[test]
fn trace_logs_and_commands_never_show_secrets_keys_or_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path();
    // A certificate credential registered with the simulator's client.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("key");
    let cert = rcgen::CertificateParams::new(vec!["relay.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let key_pem = key.serialize_pem();
    std::fs::write(work.join("app.crt"), cert.pem()).unwrap();
    std::fs::write(work.join("app.key"), &key_pem).unwrap();
    let secret = "sim~client~secret~value~0123456789";
    let sim_dir = work.join("simwork");
    std::fs::create_dir_all(&sim_dir).unwrap();
    // The simulator's config: its default client, plus the certificate.
    std::fs::write(
        sim_dir.join("extra.toml"),
        format!(
            "[[clients]]\nclient_id = \"0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10\"\n\
             secrets = [{{ value = \"{secret}\" }}]\ncertificate_files = [\"{}\"]\n",
            work.join("app.crt").display()
        ),
    )
    .unwrap();
    let sim = SimProc::start_with(&sim_dir, "", &sim_dir.join("extra.toml"));
    let forbidden = forbidden(secret, &key_pem);

    // Phase 1: certificate credential, trace logs, three messages delivered.
    let spool = work.join("spool");
    let cert_oauth = sim.fragment.replace(
        &format!("client_secret = \"{secret}\""),
        &format!(
            "certificate_file = \"{}\"\nprivate_key_file = \"{}\"",
            work.join("app.crt").display(),
            work.join("app.key").display()
        ),
    );
    assert!(!cert_oauth.contains(secret));
    let rest = with_upstream(&cert_oauth, "rate = \"1000/s\"");
    let mut relay = Relay::start_with(work, "trace-cert", &[], |port| {
        relay_toml(
            port,
            &spool,
            "",
            "retry_min = \"1s\"\nretry_max = \"2s\"",
            &format!("{rest}\n[log]\nlevel = \"trace\"\n"),
        )
    });
    let ledger = Ledger::default();
    let mut c = Client::connect(relay.addr()).unwrap();
    for i in 0..3 {
        c.send_tracked(&ledger, &format!("trace-{i}"), 800).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while sim.messages().len() < 3 {
        assert!(
            Instant::now() < deadline,
            "not delivered:\n{}",
            relay.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let config_out = run(&["--config", relay.config.to_str().unwrap(), "config"]);
    let check_out = run(&["--config", relay.config.to_str().unwrap(), "check"]);
    assert!(relay.stop());
    let log = relay.log_text();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace level is on"
    );
    assert_clean("trace log (certificate)", &log, &forbidden);
    assert_clean("config output (certificate)", &config_out, &forbidden);
    assert_clean("check output (certificate)", &check_out, &forbidden);

    // Phase 2: client secret, the upstream SMTP port closed: mail stays queued with its reply.
    let spool2 = work.join("spool2");
    let closed = free_port();
    let secret_oauth = sim.fragment.replace(
        &format!("port = {}", port_of(&sim.fragment)),
        &format!("port = {closed}"),
    );
    let rest = with_upstream(&secret_oauth, "rate = \"1000/s\"");
    let mut relay = Relay::start_with(work, "trace-secret", &[], |port| {
        relay_toml(
            port,
            &spool2,
            "",
            "retry_min = \"1s\"\nretry_max = \"2s\"",
            &format!("{rest}\n[log]\nlevel = \"trace\"\n"),
        )
    });
    let mut c = Client::connect(relay.addr()).unwrap();
    c.send_tracked(&ledger, "trace-queued", 800).unwrap();
    // The relay tried and met the closed port; the message stays queued with that reply.
    let attempt = relay.wait_log_blocking("delivery attempt failed", 0, Duration::from_secs(30));
    assert!(
        attempt.contains("Connect: ") && attempt.to_lowercase().contains("refused"),
        "{attempt}"
    );
    assert_eq!(spool_count(&spool2, "queue"), 1);
    let cfg = relay.config.to_str().unwrap().to_string();
    let list = run(&["--config", &cfg, "queue", "list"]);
    let id = list
        .lines()
        .find_map(|l| l.split_whitespace().next().filter(|w| w.len() == 26))
        .unwrap_or_else(|| panic!("no id in {list}"))
        .to_string();
    let show = run(&["--config", &cfg, "queue", "show", &id]);
    let config_out = run(&["--config", &cfg, "config"]);
    let check_out = run(&["--config", &cfg, "check"]);
    assert!(relay.stop());
    let log = relay.log_text();
    for (what, text) in [
        ("trace log (secret)", &log),
        ("queue list", &list),
        ("queue show", &show),
        ("config output (secret)", &config_out),
        ("check output (secret)", &check_out),
    ] {
        assert_clean(what, text, &forbidden);
    }
    // A panic prints Debug of whatever it holds: the config's Debug is redacted too.
    let cfg_text = std::fs::read_to_string(&cfg).unwrap();
    let parsed = smtp_oauth_relay::config::Config::from_toml_str(&cfg_text).unwrap();
    assert_clean("Config Debug", &format!("{parsed:?}"), &forbidden);
    report(&format!(
        "secrets/trace-run credentials=certificate+secret log_bytes={} leaks=0 \
         (checked: logs, config, check, queue list, queue show, Config Debug)",
        log.len()
    ));
}

fn port_of(fragment: &str) -> u16 {
    fragment
        .lines()
        .find_map(|l| l.strip_prefix("port = "))
        .and_then(|p| p.trim().parse().ok())
        .expect("port in fragment")
}
