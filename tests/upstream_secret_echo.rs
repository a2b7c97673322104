//! Upstreams that echo secrets (issue 11, item 2), against the real binary.
//!
//! - A token endpoint that refuses the client secret and echoes it back in its error
//!   description, in every encoding (raw, form-encoded with `+` and `%20`, lowercase hex,
//!   JSON-escaped, base64, base64url).
//! - An SMTP upstream that answers the XOAUTH2 credential with a 535 quoting the AUTH line and
//!   the token in it, in the same encodings.
//!
//! Neither the client secret nor the token (nor the XOAUTH2 string) may then appear, in any
//! encoding, in `/healthz`, `check`, `check --json`, `queue list`, `queue show`, the trace-level
//! log or any file in the spool; each of those must still show the echo, scrubbed (every label
//! followed by `<redacted>`), so the assertion cannot pass because the text never got there.
//!
//! In process: a federated assertion echoed by the token endpoint, the private key while a
//! client holds it, and the current and previous access tokens are known to the scrubber too.

mod common;
mod oauth_fake;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use common::echo::{EchoSmtp, EchoTokenEndpoint, encodings, scrubbed_echo_markers};
use common::process::{bin, free_port, run_cli, scrub_env};
use smtp_oauth_relay::config::Config;
use smtp_oauth_relay::oauth::{TokenClient, TokenProvider};
use smtp_oauth_relay::redact::{REDACTED, scrub};

const TENANT: &str = "9188040d-6c67-4c5b-b112-36a304b66dad";
const CLIENT_ID: &str = "0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10";
const MAILBOX: &str = "relay@contoso.example";
/// A client secret with characters every encoding changes (`~`, a space, `.`, `_`, `-`).
const SECRET: &str = "Ab3~Cd9 Ef5.Gh7_Ij1-Kl";
/// An access token with `~`, `/` and `+`.
const TOKEN: &str = "tok~Ab3/Cd9+Ef5.Gh7_Ij1-Kl";

/// `serve` running in the background, killed when dropped.
struct Serve {
    child: Child,
    log: PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Rig {
    dir: tempfile::TempDir,
    config: PathBuf,
    spool: PathBuf,
    smtp: SocketAddr,
    admin: SocketAddr,
    _rt: tokio::runtime::Runtime,
    token_endpoint: EchoTokenEndpoint,
    upstream: EchoSmtp,
}

impl Rig {
    /// The fakes, and a relay.toml pointing at them (`token`: what the endpoint issues; `None`
    /// refuses and echoes).
    fn new(token: Option<&str>) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let (token_endpoint, upstream) = rt.block_on(async {
            (
                EchoTokenEndpoint::start(token.map(str::to_string)).await,
                EchoSmtp::start(dir.path()).await,
            )
        });
        let smtp = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let spool = dir.path().join("spool");
        let config = dir.path().join("relay.toml");
        let text = format!(
            "[smtp]\nlisten = [\"{smtp}\"]\nhostname = \"relay.test\"\n\
             [queue]\ndir = \"{spool}\"\nmin_free_space = 1\n\
             [upstream]\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"starttls\"\n\
             ca_file = \"{ca}\"\ntls_server_name = \"localhost\"\nmail_account = \"{MAILBOX}\"\n\
             rate = \"1000/s\"\n\
             [oauth]\ntenant_id = \"{TENANT}\"\nclient_id = \"{CLIENT_ID}\"\n\
             client_secret = \"{SECRET}\"\ntoken_url = \"{url}\"\n\
             [admin]\nlisten = \"{admin}\"\n[log]\nlevel = \"trace\"\n",
            spool = spool.display(),
            port = upstream.addr.port(),
            ca = upstream.ca_file.display(),
            url = token_endpoint.url(TENANT),
        );
        std::fs::write(&config, text).expect("write relay.toml");
        Rig {
            dir,
            config,
            spool,
            smtp,
            admin,
            _rt: rt,
            token_endpoint,
            upstream,
        }
    }

    fn serve(&self) -> Serve {
        let log = self.dir.path().join("serve.log");
        let mut cmd = Command::new(bin());
        cmd.arg("--config").arg(&self.config).arg("serve");
        scrub_env(&mut cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn serve");
        let mut serve = Serve { child, log };
        for _ in 0..400 {
            if TcpStream::connect_timeout(&self.smtp, Duration::from_millis(200)).is_ok() {
                return serve;
            }
            if serve.child.try_wait().expect("try_wait").is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = serve.child.kill();
        panic!(
            "serve did not start:\n{}",
            std::fs::read_to_string(&serve.log).unwrap_or_default()
        );
    }

    /// Queues one message and returns its id.
    fn send(&self) -> String {
        let mut c = common::smtp::blocking::Client::connect(self.smtp).expect("connect");
        let r = c
            .send(
                "app@legacy.test",
                "someone@example.org",
                b"Subject: echo\r\n\r\nbody\r\n",
            )
            .expect("send");
        c.quit();
        r.queued_id().expect("queued")
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = run_cli(&self.config, args, &[]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn healthz(&self) -> String {
        let mut s = TcpStream::connect_timeout(&self.admin, Duration::from_secs(5)).expect("admin");
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        s.write_all(b"GET /healthz HTTP/1.0\r\nHost: relay\r\n\r\n")
            .expect("request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("response");
        out
    }

    /// Waits (bounded) until the message's state file names the last reply and `/healthz`
    /// shows the mailbox held: the echo has been processed and stored.
    fn wait_held(&self, id: &str) {
        let state = self.spool.join("state").join(format!("{id}.json"));
        for _ in 0..400 {
            let stored = std::fs::read_to_string(&state).unwrap_or_default();
            if stored.contains("last_reply") && self.healthz().contains("\"held\"") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("never held; /healthz:\n{}", self.healthz());
    }

    /// Every file under the spool directory, as text.
    fn spool_files(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut dirs = vec![self.spool.clone()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).expect("read spool dir").flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else {
                    let bytes = std::fs::read(&p).unwrap_or_default();
                    out.push((
                        p.display().to_string(),
                        String::from_utf8_lossy(&bytes).into_owned(),
                    ));
                }
            }
        }
        out
    }
}

/// Every form of `secret` that must not appear.
fn forbidden(secret: &str) -> Vec<(String, String)> {
    encodings(secret)
        .into_iter()
        .map(|(label, v)| (format!("{label} of {secret:?}"), v))
        .collect()
}

fn assert_clean(what: &str, text: &str, forbidden: &[(String, String)]) {
    for (name, value) in forbidden {
        assert!(
            !text.contains(value.as_str()),
            "{what} shows the {name}:\n{}",
            text.lines()
                .filter(|l| l.contains(value.as_str()))
                .take(3)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

fn assert_echo_scrubbed(what: &str, text: &str, secret: &str) {
    for marker in scrubbed_echo_markers(secret) {
        assert!(
            text.contains(&marker),
            "{what} does not show the scrubbed echo ({marker} missing):\n{text}"
        );
    }
}

/// The outputs an admin sees, by name.
fn outputs(rig: &Rig, serve: &Serve, id: &str) -> Vec<(String, String)> {
    let mut v = vec![
        ("/healthz".to_string(), rig.healthz()),
        ("check".to_string(), rig.cli(&["check"])),
        ("check --json".to_string(), rig.cli(&["check", "--json"])),
        ("queue list".to_string(), rig.cli(&["queue", "list"])),
        ("queue show".to_string(), rig.cli(&["queue", "show", id])),
    ];
    v.push((
        "the log".to_string(),
        std::fs::read_to_string(&serve.log).unwrap_or_default(),
    ));
    v
}

#[test]
fn a_token_endpoint_echoing_the_client_secret_leaves_no_encoding_of_it() {
    let rig = Rig::new(None);
    let serve = rig.serve();
    let id = rig.send();
    rig.wait_held(&id);
    assert!(rig.token_endpoint.requests() >= 1);
    let forbidden = forbidden(SECRET);
    for (what, text) in outputs(&rig, &serve, &id) {
        assert_clean(&what, &text, &forbidden);
        assert_echo_scrubbed(&what, &text, SECRET);
    }
    let files = rig.spool_files();
    for (path, text) in &files {
        assert_clean(path, text, &forbidden);
    }
    let state = format!("{id}.json");
    let (_, stored) = files
        .iter()
        .find(|(p, _)| p.ends_with(&state))
        .expect("state file");
    assert_echo_scrubbed("the state file", stored, SECRET);
}

#[test]
fn an_smtp_upstream_echoing_the_auth_line_leaves_no_encoding_of_the_token() {
    let rig = Rig::new(Some(TOKEN));
    let serve = rig.serve();
    let id = rig.send();
    rig.wait_held(&id);
    assert!(rig.upstream.auth_lines() >= 1, "AUTH reached the upstream");
    let xoauth2 = format!("user={MAILBOX}\x01auth=Bearer {TOKEN}\x01\x01");
    let mut forbidden = forbidden(TOKEN);
    forbidden.push((
        "XOAUTH2 string".into(),
        base64::engine::general_purpose::STANDARD.encode(&xoauth2),
    ));
    forbidden.extend(self::forbidden(SECRET));
    for (what, text) in outputs(&rig, &serve, &id) {
        assert_clean(&what, &text, &forbidden);
        assert_echo_scrubbed(&what, &text, TOKEN);
        assert!(
            text.contains("line=<redacted>"),
            "{what} lost the echoed AUTH line:\n{text}"
        );
    }
    let files = rig.spool_files();
    for (path, text) in &files {
        assert_clean(path, text, &forbidden);
    }
    let state = format!("{id}.json");
    let (_, stored) = files
        .iter()
        .find(|(p, _)| p.ends_with(&state))
        .expect("state file");
    assert_echo_scrubbed("the state file", stored, TOKEN);
}

// ---------------------------------------------------------------------------------------------
// In process: the other secrets the scrubber must know.

#[tokio::test]
async fn a_federated_assertion_echoed_by_the_token_endpoint_is_scrubbed() {
    let endpoint = EchoTokenEndpoint::start(None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let assertion = "fed.assert~ion-01";
    let file = dir.path().join("federated-token");
    std::fs::write(&file, format!("{assertion}\n")).expect("write assertion");
    let mut config = Config::default();
    config.oauth.tenant_id = Some(TENANT.into());
    config.oauth.client_id = Some(CLIENT_ID.into());
    config.oauth.token_url = Some(endpoint.url(TENANT));
    config.oauth.assertion_file = Some(file);
    config.upstream.mail_account = Some(MAILBOX.into());
    let client = TokenClient::from_config(&config).expect("client");
    let e = client.request().await.expect_err("refused");
    let shown = format!("{e}\n{e:?}");
    assert_clean("the token error", &shown, &forbidden(assertion));
    assert_echo_scrubbed("the token error", &shown, assertion);
    // The assertion stays known after its request: an echo may come later.
    assert_eq!(scrub(assertion), REDACTED);
}

#[tokio::test]
async fn the_private_key_is_known_while_a_client_holds_it() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("rsa key");
    let cert = rcgen::CertificateParams::new(vec!["relay.test".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_file, key_file) = (dir.path().join("app.crt"), dir.path().join("app.key"));
    std::fs::write(&cert_file, cert.pem()).expect("cert");
    let pem = key.serialize_pem();
    std::fs::write(&key_file, &pem).expect("key");
    let der_b64 = base64::engine::general_purpose::STANDARD.encode(key.serialize_der());
    let mut config = Config::default();
    config.oauth.tenant_id = Some(TENANT.into());
    config.oauth.client_id = Some(CLIENT_ID.into());
    config.oauth.token_url = Some("http://127.0.0.1:9/t".into());
    config.oauth.certificate_file = Some(cert_file);
    config.oauth.private_key_file = Some(key_file);
    let echoed = |text: &str| format!("echo: {text} :end");
    let client = TokenClient::from_config(&config).expect("client");
    assert_eq!(scrub(&echoed(pem.trim())), echoed(REDACTED));
    assert_eq!(
        scrub(&echoed(&serde_json::to_string(pem.trim()).unwrap())),
        echoed(&format!("\"{REDACTED}\""))
    );
    assert_eq!(scrub(&echoed(&der_b64)), echoed(REDACTED));
    drop(client);
    assert_eq!(
        scrub(&der_b64),
        der_b64,
        "forgotten once no client holds it"
    );
}

#[tokio::test(start_paused = true)]
async fn the_current_and_the_previous_access_token_are_known() {
    let fake = oauth_fake::Fake::start(oauth_fake::Expect::Anything, 60).await;
    let mut config = fake.config();
    config.oauth.client_secret = Some(smtp_oauth_relay::config::Secret::new("s3cret-value"));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (p, task) = TokenProvider::start(&config, shutdown.clone()).expect("provider");
    let t0 = tokio::time::Instant::now();
    assert_eq!(p.token().await.unwrap().secret(), "fake-access-token-1");
    // Refreshed at half the lifetime: 30 s, then 60 s.
    tokio::time::sleep_until(t0 + Duration::from_secs(31)).await;
    assert_eq!(p.token().await.unwrap().secret(), "fake-access-token-2");
    assert_eq!(scrub("fake-access-token-2"), REDACTED, "current");
    assert_eq!(scrub("fake-access-token-1"), REDACTED, "previous");
    tokio::time::sleep_until(t0 + Duration::from_secs(61)).await;
    assert_eq!(p.token().await.unwrap().secret(), "fake-access-token-3");
    assert_eq!(scrub("fake-access-token-2"), REDACTED, "previous");
    assert_eq!(
        scrub("fake-access-token-1"),
        "fake-access-token-1",
        "older tokens are forgotten: the scrubber does not grow"
    );
    shutdown.cancel();
    task.await.unwrap();
}
