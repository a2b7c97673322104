//! `smtp-oauth-relay check` as an admin runs it: the real binary against the in-process
//! simulator, one misconfiguration switch at a time. Each must fail at the right step with the
//! fix from the setup guide and exit 1; a correct setup passes (exit 0) and `--send-to` delivers.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use smtp_oauth_relay::sim::{
    DEFAULT_CLIENT_SECRET, DEFAULT_MAILBOX, SendAsReply, SimConfig, Simulator,
};

/// A simulator plus a directory for relay.toml files.
struct Setup {
    sim: Simulator,
    dir: tempfile::TempDir,
    _sim_dir: tempfile::TempDir,
}

impl Setup {
    async fn start() -> Setup {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let sim_dir = tempfile::tempdir().expect("tempdir");
        let sim = Simulator::start(SimConfig::default(), sim_dir.path())
            .await
            .expect("simulator");
        Setup {
            sim,
            dir: tempfile::tempdir().expect("tempdir"),
            _sim_dir: sim_dir,
        }
    }

    /// The simulator's relay.toml fragment with `overrides` applied: `("oauth.client_id",
    /// Some("..."))` sets a key, `None` removes it.
    fn config(&self, name: &str, overrides: &[(&str, Option<&str>)]) -> PathBuf {
        let mut table: toml::Table = self
            .sim
            .relay_config_fragment()
            .parse()
            .expect("fragment parses");
        for (key, value) in overrides {
            let (section, key) = key.split_once('.').expect("section.key");
            let section = table
                .entry(section)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .expect("section is a table");
            match value {
                Some(v) => {
                    section.insert(key.to_string(), toml::Value::String(v.to_string()));
                }
                None => {
                    section.remove(key);
                }
            }
        }
        let path = self.dir.path().join(name);
        std::fs::write(&path, toml::to_string(&table).expect("toml")).expect("write config");
        path
    }

    fn token_url_for(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/token", self.sim.token_base_url())
    }
}

/// What one `check` run printed.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The line of step `title` (e.g. "token") and the fix line under it, if any.
    fn step(&self, title: &str) -> (String, Option<String>) {
        let lines: Vec<&str> = self.stdout.lines().collect();
        let i = lines
            .iter()
            .position(|l| {
                l.split_once(". ")
                    .is_some_and(|(n, rest)| n.parse::<u32>().is_ok() && rest.starts_with(title))
            })
            .unwrap_or_else(|| panic!("no step {title:?} in:\n{}", self.stdout));
        let fix = lines
            .get(i + 1)
            .and_then(|l| l.trim_start().strip_prefix("fix:"))
            .map(|f| f.trim().to_string());
        (lines[i].to_string(), fix)
    }

    fn status(&self, title: &str) -> String {
        let (line, _) = self.step(title);
        let rest = line[line.find(title).expect("title") + title.len()..].trim_start();
        rest.split_whitespace().next().unwrap_or("").to_string()
    }

    /// Asserts that `title` is the step that failed, every later step is skipped, the exit code
    /// is 1, and the fix names every one of `fix_parts`. Returns the step line.
    fn assert_failed_at(&self, title: &str, fix_parts: &[&str]) -> String {
        self.assert_failed_with(1, title, fix_parts)
    }

    /// A configuration that `config` and `serve` refuse as well: the same report, exit 2.
    fn assert_refused_config(&self, fix_parts: &[&str]) -> String {
        self.assert_failed_with(2, "config", fix_parts)
    }

    fn assert_failed_with(&self, code: i32, title: &str, fix_parts: &[&str]) -> String {
        assert_eq!(self.code, code, "exit code\n{}{}", self.stdout, self.stderr);
        assert_eq!(self.status(title), "FAILED", "{}", self.stdout);
        let (line, fix) = self.step(title);
        let fix = fix.unwrap_or_else(|| panic!("no fix under {title}:\n{}", self.stdout));
        for part in fix_parts {
            assert!(
                fix.contains(part),
                "fix for {title} lacks {part:?}:\n{}",
                self.stdout
            );
        }
        let order = [
            "config",
            "token",
            "token contents",
            "network and TLS",
            "AUTH XOAUTH2",
            "test message",
        ];
        let at = order.iter().position(|t| *t == title).expect("known step");
        for earlier in &order[..at] {
            let s = self.status(earlier);
            assert!(
                s == "ok" || s == "WARNING",
                "{earlier} is {s}:\n{}",
                self.stdout
            );
        }
        for later in &order[at + 1..] {
            assert_eq!(self.status(later), "skipped", "{later}:\n{}", self.stdout);
        }
        assert!(self.stdout.contains("result: FAILED"), "{}", self.stdout);
        line
    }
}

async fn check(config: &Path, args: &[&str]) -> Run {
    let config = config.to_path_buf();
    let mut all = vec!["check".to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    let out: Output = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        common::process::run_cli(&config, &args, &[])
    })
    .await
    .expect("check ran");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correct_setup_passes_and_send_to_delivers() {
    let s = Setup::start().await;
    let config = s.config("relay.toml", &[]);
    let run = check(&config, &["--send-to", "alice@fabrikam.example"]).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    for step in [
        "config",
        "token",
        "token contents",
        "network and TLS",
        "AUTH XOAUTH2",
        "test message",
    ] {
        assert_eq!(run.status(step), "ok", "{step}:\n{}", run.stdout);
    }
    let (tls, _) = run.step("network and TLS");
    assert!(tls.contains("STARTTLS") && tls.contains("TLS 1."), "{tls}");
    let (contents, _) = run.step("token contents");
    assert!(
        contents.contains("aud https://outlook.office365.com")
            && contents.contains("SMTP.SendAsApp"),
        "{contents}"
    );
    assert!(run.stdout.contains("result: passed"), "{}", run.stdout);

    let messages = s.sim.messages().expect("mailbox");
    assert_eq!(messages.len(), 1, "one test message delivered");
    let m = &messages[0];
    assert_eq!(
        m.envelope.rcpt_to,
        vec!["alice@fabrikam.example".to_string()]
    );
    assert_eq!(m.envelope.auth_user, DEFAULT_MAILBOX);
    let text = m.text();
    assert!(text.contains(&format!("From: {DEFAULT_MAILBOX}")), "{text}");
    assert!(
        text.contains("Subject: Test message from smtp-oauth-relay check"),
        "{text}"
    );

    // Without --send-to nothing is sent and the last step says how to ask for it.
    let run = check(&config, &[]).await;
    assert_eq!(run.code, 0, "{}", run.stdout);
    let (line, _) = run.step("test message");
    assert!(line.contains("--send-to"), "{line}");
    assert_eq!(s.sim.messages().expect("mailbox").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_fails_at_token_with_the_value_not_id_fix() {
    let s = Setup::start().await;
    let config = s.config(
        "relay.toml",
        &[("oauth.client_secret", Some("Xy8Q~not-the-right-secret"))],
    );
    let run = check(&config, &[]).await;
    let line = run.assert_failed_at(
        "token",
        &["Value, not its Secret ID", "Certificates & secrets"],
    );
    assert!(line.contains("AADSTS7000215"), "{line}");
    assert!(
        line.contains("Trace ID: ") && line.contains("Correlation ID: "),
        "{line}"
    );
    assert!(!line.contains("Trace ID: -"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_id_is_caught_before_asking_entra() {
    let s = Setup::start().await;
    let config = s.config(
        "relay.toml",
        &[(
            "oauth.client_secret",
            Some("3f2b8c1e-55aa-4d0e-9b7c-0d1e2f3a4b5c"),
        )],
    );
    let before = s.sim.control().token_requests();
    let run = check(&config, &[]).await;
    run.assert_refused_config(&["Copy the secret's Value, not its Secret ID"]);
    assert_eq!(s.sim.control().token_requests(), before, "no token request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_secret_fails_at_token() {
    let s = Setup::start().await;
    s.sim.control().set_secrets_expired(true);
    let config = s.config("relay.toml", &[]);
    let run = check(&config, &[]).await;
    let line = run.assert_failed_at("token", &["expired", "New client secret"]);
    assert!(line.contains("AADSTS7000222"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_app_fails_at_token() {
    let s = Setup::start().await;
    let config = s.config(
        "relay.toml",
        &[(
            "oauth.client_id",
            Some("6e1d2c3b-4a59-4f60-8172-93a4b5c6d7e8"),
        )],
    );
    let run = check(&config, &[]).await;
    let line = run.assert_failed_at(
        "token",
        &[
            "Application (client) ID",
            "Directory (tenant) ID",
            "upstream.cloud",
        ],
    );
    assert!(line.contains("AADSTS700016"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tenant_fails_at_token() {
    let s = Setup::start().await;
    let tenant = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee";
    let url = s.token_url_for(tenant);
    let config = s.config(
        "relay.toml",
        &[
            ("oauth.tenant_id", Some(tenant)),
            ("oauth.token_url", Some(&url)),
        ],
    );
    let run = check(&config, &[]).await;
    let line = run.assert_failed_at("token", &["Directory (tenant) ID", "upstream.cloud"]);
    assert!(line.contains("AADSTS90002"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_role_warns_on_contents_and_fails_at_auth() {
    let s = Setup::start().await;
    s.sim.control().set_roles(None);
    let config = s.config("relay.toml", &[]);
    let run = check(&config, &[]).await;
    let line = run.assert_failed_at(
        "AUTH XOAUTH2",
        &[
            "no SMTP.SendAsApp role",
            "API permissions",
            "Grant admin consent",
        ],
    );
    assert!(line.contains("535 5.7.3"), "{line}");
    assert_eq!(run.status("token contents"), "WARNING", "{}", run.stdout);
    let (contents, fix) = run.step("token contents");
    assert!(contents.contains("no SMTP.SendAsApp role"), "{contents}");
    let fix = fix.expect("fix");
    assert!(
        fix.contains("RBAC for Applications") && fix.contains("Get-ManagementRoleAssignment"),
        "{fix}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_full_access_fails_at_auth() {
    let s = Setup::start().await;
    s.sim.control().set_full_access(DEFAULT_MAILBOX, false);
    let config = s.config("relay.toml", &[]);
    let run = check(&config, &[]).await;
    let line = run.assert_failed_at(
        "AUTH XOAUTH2",
        &[
            &format!("Add-MailboxPermission -Identity {DEFAULT_MAILBOX}"),
            "FullAccess",
            "Enterprise application's object id",
            "New-ServicePrincipal -AppId 0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10",
        ],
    );
    assert!(line.contains("535 5.7.3"), "{line}");
    assert_eq!(run.status("token contents"), "ok", "{}", run.stdout);

    // The service principal missing from Exchange reads the same: the fix covers both.
    s.sim.control().set_full_access(DEFAULT_MAILBOX, true);
    s.sim.control().set_exchange_service_principal(false);
    let run = check(&config, &[]).await;
    run.assert_failed_at("AUTH XOAUTH2", &["New-ServicePrincipal"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_auth_disabled_fails_at_auth() {
    let s = Setup::start().await;
    let config = s.config("relay.toml", &[]);
    s.sim.control().set_smtp_auth_disabled(true);
    let run = check(&config, &[]).await;
    let parts = [
        "Set-CASMailbox -Identity relay@contoso.example -SmtpClientAuthenticationDisabled $false",
        "Set-TransportConfig -SmtpClientAuthenticationDisabled $false",
        "Security defaults",
    ];
    let line = run.assert_failed_at("AUTH XOAUTH2", &parts);
    assert!(
        line.contains("535 5.7.139") && line.contains("Tenant"),
        "{line}"
    );

    s.sim.control().set_smtp_auth_disabled(false);
    s.sim
        .control()
        .set_mailbox_smtp_auth_disabled(DEFAULT_MAILBOX, true);
    let run = check(&config, &[]).await;
    let line = run.assert_failed_at("AUTH XOAUTH2", &parts);
    assert!(
        line.contains("535 5.7.139") && line.contains("Mailbox"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_as_missing_fails_at_the_test_message() {
    let s = Setup::start().await;
    let from = "alerts@contoso.example";
    let config = s.config("relay.toml", &[("upstream.from", Some(from))]);
    let run = check(&config, &["--send-to", "alice@fabrikam.example"]).await;
    let line = run.assert_failed_at(
        "test message",
        &[
            &format!("Add-RecipientPermission -Identity {from}"),
            "SendAs",
        ],
    );
    assert!(line.contains("550 5.7.60"), "{line}");
    assert_eq!(run.status("AUTH XOAUTH2"), "ok");

    s.sim.control().set_send_as_reply(SendAsReply::Code52252);
    let run = check(&config, &["--send-to", "alice@fabrikam.example"]).await;
    let line = run.assert_failed_at(
        "test message",
        &[&format!("Add-RecipientPermission -Identity {from}")],
    );
    assert!(line.contains("5.2.252 SendAsDenied"), "{line}");
    assert!(s.sim.messages().expect("mailbox").is_empty());

    // Once SendAs is granted the same configuration passes.
    s.sim
        .control()
        .set_send_as(DEFAULT_MAILBOX, vec![from.to_string()]);
    let run = check(&config, &["--send-to", "alice@fabrikam.example"]).await;
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert_eq!(s.sim.messages().expect("mailbox").len(), 1);
}

/// A self-signed RSA certificate and its key, written as PEM files.
fn write_cert(dir: &Path) -> (PathBuf, PathBuf, String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("rsa key");
    let cert = rcgen::CertificateParams::new(vec!["relay.test".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let cert_path = dir.join("relay-cert.pem");
    let key_path = dir.join("relay-key.pem");
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    (cert_path, key_path, cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregistered_certificate_fails_at_token() {
    let s = Setup::start().await;
    let (cert, key, cert_pem, key_pem) = write_cert(s.dir.path());
    let config = s.config(
        "relay.toml",
        &[
            ("oauth.client_secret", None),
            (
                "oauth.certificate_file",
                Some(cert.to_str().expect("utf-8")),
            ),
            ("oauth.private_key_file", Some(key.to_str().expect("utf-8"))),
        ],
    );
    let run = check(&config, &[]).await;
    let line = run.assert_failed_at(
        "token",
        &[
            "certificate is not registered",
            "Certificates & secrets > Certificates",
        ],
    );
    assert!(line.contains("AADSTS700027"), "{line}");
    assert_no_credentials(&run, &[&key_pem]);

    // Registered, the same certificate gets a token and the walk passes.
    let client_id = s.sim.config().clients[0].client_id.clone();
    s.sim
        .control()
        .add_client_certificate(&client_id, &cert_pem)
        .expect("register");
    let run = check(&config, &[]).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let (token, _) = run.step("token");
    assert!(token.contains("(certificate)"), "{token}");
    assert_no_credentials(&run, &[&key_pem]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lists_the_same_steps() {
    let s = Setup::start().await;
    let config = s.config("relay.toml", &[]);
    let run = check(&config, &["--json", "--send-to", "bob@fabrikam.example"]).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let steps: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON on stdout");
    let steps = steps.as_array().expect("array");
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["config", "token", "token_contents", "tls", "auth", "send"]
    );
    for step in steps {
        assert_eq!(step["status"], "ok", "{step}");
        assert!(step["detail"].as_str().is_some_and(|d| !d.is_empty()));
        assert!(step["fix"].is_null());
    }

    s.sim.control().set_smtp_auth_disabled(true);
    let run = check(&config, &["--json"]).await;
    assert_eq!(run.code, 1);
    let steps: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON on stdout");
    let auth = &steps[4];
    assert_eq!(auth["step"], "auth");
    assert_eq!(auth["status"], "failed");
    assert!(auth["detail"].as_str().unwrap().contains("5.7.139"));
    assert!(auth["fix"].as_str().unwrap().contains("Set-CASMailbox"));
    assert_eq!(steps[5]["status"], "skipped");
}

/// Neither the secret, nor a token or assertion (JWTs start with `eyJ`), nor a private key.
fn assert_no_credentials(run: &Run, extra: &[&str]) {
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(
        !all.contains(DEFAULT_CLIENT_SECRET),
        "secret in output:\n{all}"
    );
    assert!(!all.contains("eyJ"), "a JWT in output:\n{all}");
    assert!(!all.contains("PRIVATE KEY"), "a key in output:\n{all}");
    for value in extra {
        // Any line of a PEM body would do; the longest one is unambiguous.
        let needle = value.lines().max_by_key(|l| l.len()).expect("non-empty");
        assert!(!all.contains(needle), "credential in output:\n{all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_token_in_any_output() {
    let s = Setup::start().await;
    let good = s.config("good.toml", &[]);
    for args in [
        &["--send-to", "carol@fabrikam.example"][..],
        &["--json", "--send-to", "carol@fabrikam.example"][..],
    ] {
        let run = check(&good, args).await;
        assert_eq!(run.code, 0, "{}", run.stdout);
        assert_no_credentials(&run, &[]);
    }
    // Failures quote Entra's and Exchange's answers: still nothing secret.
    s.sim.control().set_roles(None);
    let run = check(&good, &[]).await;
    assert_eq!(run.code, 1);
    assert_no_credentials(&run, &[]);
    s.sim.control().set_secrets_expired(true);
    let run = check(&good, &["--json"]).await;
    assert_eq!(run.code, 1);
    assert_no_credentials(&run, &[]);
    let wrong = "Wq8Q~a-wrong-but-secret-value";
    let bad = s.config("bad.toml", &[("oauth.client_secret", Some(wrong))]);
    let run = check(&bad, &[]).await;
    assert_eq!(run.code, 1);
    assert_no_credentials(&run, &[wrong]);
    // `config` and the loader never print it either.
    let invalid = s.config(
        "invalid.toml",
        &[("upstream.mail_account", Some("not-an-address"))],
    );
    let run = check(&invalid, &[]).await;
    assert_eq!(run.code, 2);
    assert_no_credentials(&run, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_problems_exit_1_or_2() {
    let s = Setup::start().await;
    // [oauth] missing entirely: the relay runs but cannot deliver; check says what to fill in.
    let path = s.dir.path().join("empty.toml");
    std::fs::write(&path, "[smtp]\nhostname = \"relay.test\"\n").expect("write");
    let run = check(&path, &[]).await;
    run.assert_failed_at(
        "config",
        &["tenant_id", "client_id", "client_secret", "mail_account"],
    );

    // A client id that is not a GUID (the app's name, say).
    let config = s.config("name.toml", &[("oauth.client_id", Some("relay-app"))]);
    run_and_expect_config_failure(&config, "Application (client) ID").await;

    // A configuration that cannot be loaded: exit 2.
    let invalid = s.config(
        "invalid.toml",
        &[("upstream.mail_account", Some("not-an-address"))],
    );
    let run = check(&invalid, &[]).await;
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("upstream.mail_account"),
        "{}",
        run.stderr
    );
    let run = check(&s.dir.path().join("missing.toml"), &[]).await;
    assert_eq!(run.code, 2);

    // Nothing listening on the SMTP port: network and TLS fails with the firewall hint.
    let port = common::process::free_port();
    let config = s.config("closed.toml", &[]);
    let text = std::fs::read_to_string(&config).expect("read").replace(
        &format!("port = {}", s.sim.smtp_addr().port()),
        &format!("port = {port}"),
    );
    std::fs::write(&config, text).expect("write");
    let run = check(&config, &[]).await;
    run.assert_failed_at("network and TLS", &["reach 127.0.0.1:", "upstream.port"]);
}

async fn run_and_expect_config_failure(config: &Path, fix: &str) {
    let run = check(config, &[]).await;
    run.assert_refused_config(&[fix]);
}
