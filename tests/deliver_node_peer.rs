//! Delivery through an independent upstream nobody here wrote (issue 4): the real relay binary
//! delivers to nodemailer's `smtp-server`, which accepts only STARTTLS + SASL XOAUTH2 and verifies
//! the bearer token with `jose` against the JWKS of `oauth2-mock-server`, the relay's token
//! endpoint (client credentials). See `tests/peers/node/peer.mjs`.
//!
//! Node (>= 20) and the peer's npm packages are required: when they are missing the tests fail
//! and say to run `npm ci --prefix tests/peers/node` (.ci/run does this).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::fixtures::{assert_stored_equals, crlf, dot_stuff, queued_path};
use common::process::{Extra, Relay, run_cli};
use common::smtp::blocking::Client;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde_json::Value;

const MAILBOX: &str = "relay@contoso.example";
const TENANT: &str = "contoso.onmicrosoft.com";
const CLIENT_ID: &str = "6a1f0c2e-8b9d-4e57-a3c1-2f4d5e6b7a80";
const CLIENT_SECRET: &str = "node-peer-secret~value";
const SCOPE: &str = "https://outlook.office365.com/.default";
const NPM_HINT: &str =
    "run `npm ci --prefix tests/peers/node` (needs node >= 20 and npm; .ci/run does this)";

fn peer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/node")
}

/// Fails (never skips) when node or the peer's packages are missing.
fn require_node_peer() {
    match Command::new("node")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!("`node --version` failed ({}); {NPM_HINT}", out.status),
        Err(e) => panic!("`node` is required by this test but cannot be run ({e}); {NPM_HINT}"),
    }
    for pkg in ["smtp-server", "oauth2-mock-server", "jose"] {
        let manifest = peer_dir()
            .join("node_modules")
            .join(pkg)
            .join("package.json");
        assert!(
            manifest.is_file(),
            "the node peer's package `{pkg}` is not installed ({} is missing); {NPM_HINT}",
            manifest.display()
        );
    }
}

/// A test CA and a leaf for `localhost` only (the relay must use `tls_server_name`).
struct PeerTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_tls(dir: &Path) -> PeerTls {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "node peer test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().expect("leaf key");
    let mut leaf_params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).expect("leaf");
    let tls = PeerTls {
        ca: dir.join("ca.pem"),
        cert: dir.join("peer-chain.pem"),
        key: dir.join("peer-key.pem"),
    };
    fs::write(&tls.ca, ca_cert.pem()).expect("write CA");
    fs::write(&tls.cert, format!("{}{}", leaf.pem(), ca_cert.pem())).expect("write chain");
    fs::write(&tls.key, leaf_key.serialize_pem()).expect("write key");
    tls
}

/// The node process: oauth2-mock-server + smtp-server. Killed and reaped when dropped; its stdin
/// is a pipe, so it also exits by itself if this test process dies.
struct NodePeer {
    child: Option<Child>,
    _stdin: Option<ChildStdin>,
    smtp_port: u16,
    token_port: u16,
    token_path: String,
    store: PathBuf,
    log: PathBuf,
}

impl NodePeer {
    /// Starts the peer; `audience` overrides the token audience its SMTP side accepts.
    fn start(dir: &Path, tls: &PeerTls, audience: Option<&str>) -> NodePeer {
        require_node_peer();
        let store = dir.join("peer-store");
        fs::create_dir_all(&store).expect("peer store");
        let log = dir.join("peer.log");
        let mut cmd = Command::new("node");
        cmd.arg(peer_dir().join("peer.mjs"))
            .arg("--store")
            .arg(&store)
            .arg("--cert")
            .arg(&tls.cert)
            .arg("--key")
            .arg(&tls.key)
            .args(["--tenant", TENANT, "--client-id", CLIENT_ID])
            .args(["--client-secret", CLIENT_SECRET, "--mail-account", MAILBOX]);
        if let Some(aud) = audience {
            cmd.args(["--audience", aud]);
        }
        let mut child = cmd
            .env("NODE_NO_WARNINGS", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log).expect("peer log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start node: {e}; {NPM_HINT}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("peer stdout");
        let mut peer = NodePeer {
            child: Some(child),
            _stdin: stdin,
            smtp_port: 0,
            token_port: 0,
            token_path: String::new(),
            store,
            log,
        };
        // The ready line, read on a thread so the wait is bounded.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if !line.trim().is_empty() => line,
            other => {
                peer.kill();
                panic!(
                    "the node peer did not report ready ({other:?}); if a module is missing, \
                     {NPM_HINT}\n--- peer log ---\n{}",
                    peer.log_text()
                );
            }
        };
        let ready: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad ready line {line:?}: {e}"));
        peer.smtp_port = ready["smtp_port"].as_u64().expect("smtp_port") as u16;
        peer.token_port = ready["token_port"].as_u64().expect("token_port") as u16;
        peer.token_path = ready["token_path"].as_str().expect("token_path").into();
        peer
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Messages the peer accepted, in arrival order: (raw bytes, envelope metadata).
    fn stored(&self) -> Vec<(Vec<u8>, Value)> {
        let mut out = Vec::new();
        for n in 1.. {
            let meta = self.store.join(format!("{n}.json"));
            let Ok(text) = fs::read_to_string(&meta) else {
                break;
            };
            let data = fs::read(self.store.join(format!("{n}.eml"))).expect("eml");
            out.push((data, serde_json::from_str(&text).expect("meta json")));
        }
        out
    }

    fn jsonl(&self, name: &str) -> Vec<Value> {
        fs::read_to_string(self.store.join(name))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("jsonl line"))
            .collect()
    }
}

impl Drop for NodePeer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Relay settings pointing at the peer. `Extra::queue` is the last section `write_config` writes
/// before `[log]`, so the `[upstream]` and `[oauth]` tables follow the queue keys there.
fn relay_extra(peer: &NodePeer, tls: &PeerTls) -> Extra {
    Extra {
        smtp: String::new(),
        queue: format!(
            "retry_min = \"200ms\"\nretry_max = \"1s\"\n\
             [upstream]\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"starttls\"\n\
             ca_file = \"{ca}\"\ntls_server_name = \"localhost\"\nmail_account = \"{MAILBOX}\"\n\
             rate = \"1000/s\"\n\
             [oauth]\ntenant_id = \"{TENANT}\"\nclient_id = \"{CLIENT_ID}\"\n\
             client_secret = \"{CLIENT_SECRET}\"\n\
             token_url = \"http://127.0.0.1:{token_port}{token_path}\"\nscope = \"{SCOPE}\"\n",
            port = peer.smtp_port,
            ca = tls.ca.display(),
            token_port = peer.token_port,
            token_path = peer.token_path,
        ),
    }
}

fn queue_list(relay: &Relay) -> String {
    let out = run_cli(&relay.config, &["queue", "list"], &[]);
    assert!(
        out.status.success(),
        "queue list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 queue list")
}

fn diagnostics(relay: &Relay, peer: &NodePeer) -> String {
    format!(
        "--- queue list ---\n{}--- relay log ---\n{}--- peer log ---\n{}",
        queue_list(relay),
        relay.log_text(),
        peer.log_text()
    )
}

/// Polls (bounded) until `done` holds; panics with both logs otherwise.
fn wait_until(what: &str, relay: &Relay, peer: &NodePeer, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}\n{}", diagnostics(relay, peer));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// MAIL (with `params`), every RCPT, DATA, body; returns the queue id from the final 250.
fn submit(c: &mut Client, params: &str, rcpts: &[&str], message: &[u8]) -> String {
    let r = c
        .command(&format!("MAIL FROM:<app@legacy.local>{params}"))
        .expect("MAIL");
    assert_eq!(r.code, 250, "{r:?}");
    for rcpt in rcpts {
        let r = c.command(&format!("RCPT TO:<{rcpt}>")).expect("RCPT");
        assert_eq!(r.code, 250, "{r:?}");
    }
    let r = c.command("DATA").expect("DATA");
    assert_eq!(r.code, 354, "{r:?}");
    c.send_raw(&dot_stuff(message)).expect("data");
    c.send_raw(b".\r\n").expect("end of data");
    let r = c.read_reply().expect("reply to end of data");
    r.queued_id().unwrap_or_else(|| panic!("not queued: {r:?}"))
}

struct Sent {
    id: String,
    rcpts: Vec<&'static str>,
    message: Vec<u8>,
    /// Submitted with BODY=8BITMIME, which the relay must pass on (the peer offers 8BITMIME).
    eight_bit: bool,
}

#[test]
fn delivery_through_nodemailer_smtp_server_with_tokens_from_oauth2_mock_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = make_tls(dir.path());
    let peer = NodePeer::start(dir.path(), &tls, None);
    let relay = Relay::start(
        dir.path(),
        &dir.path().join("spool"),
        &relay_extra(&peer, &tls),
    );

    // 1: complete headers, lines that need dot-stuffing both ways, a 998-octet line.
    let long_line = "x".repeat(998);
    let dots = crlf(&[
        &format!("From: Relay Mailbox <{MAILBOX}>"),
        "To: User <user@example.org>",
        "Subject: dots",
        "Date: Mon, 01 Jan 2024 10:00:00 +0000",
        "Message-ID: <dots-1@legacy.local>",
        "",
        ".hidden line starting with a dot",
        "..two dots",
        ".",
        " . space dot",
        &long_line,
        ".last",
    ]);
    // 2: no Date and no Message-ID (the relay adds both); folded header; two recipients.
    let bare = crlf(&[
        &format!("From: {MAILBOX}"),
        "Subject: a folded",
        "\tsubject line",
        "",
        "short body",
    ]);
    // 3: 8-bit UTF-8, BODY=8BITMIME, ~300 KB so the DATA crosses many reads and TLS records.
    let mut big = crlf(&[
        &format!("From: {MAILBOX}"),
        "Subject: =?UTF-8?B?R3LDvMOfZQ==?=",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
    ]);
    for i in 0..4000 {
        big.extend_from_slice(format!("{i:05} Grüße aus Köln — ünïcödé line ☃\r\n").as_bytes());
        if i % 500 == 0 {
            big.extend_from_slice(b".dot at line start\r\n");
        }
    }

    let mut c = Client::connect(relay.addr()).expect("connect to relay");
    let mut sent = vec![
        Sent {
            id: submit(&mut c, "", &["user@example.org"], &dots),
            rcpts: vec!["user@example.org"],
            message: dots,
            eight_bit: false,
        },
        Sent {
            id: submit(&mut c, "", &["a@example.org", "b@example.net"], &bare),
            rcpts: vec!["a@example.org", "b@example.net"],
            message: bare,
            eight_bit: false,
        },
    ];
    sent.push(Sent {
        id: submit(&mut c, " BODY=8BITMIME", &["big@example.org"], &big),
        rcpts: vec!["big@example.org"],
        message: big,
        eight_bit: true,
    });
    c.quit();

    wait_until("3 messages at the node peer", &relay, &peer, || {
        peer.stored().len() >= 3
    });
    wait_until("an empty spool", &relay, &peer, || {
        queue_list(&relay) == "queue is empty\n"
    });

    let stored = peer.stored();
    assert_eq!(stored.len(), 3, "{}", diagnostics(&relay, &peer));
    let mut seen = BTreeMap::new();
    for (data, meta) in &stored {
        // Which message is this? The relay's Received header names the queue id.
        let head = &data[..data.len().min(400)];
        let head = String::from_utf8_lossy(head);
        let s = sent
            .iter()
            .find(|s| head.contains(&s.id))
            .unwrap_or_else(|| panic!("stored message names no queue id we got: {head}"));
        assert!(seen.insert(s.id.clone(), ()).is_none(), "{} twice", s.id);
        assert_stored_equals(data, &s.id, &s.message);
        assert_eq!(meta["mail_from"], MAILBOX, "envelope sender: {meta}");
        assert_eq!(meta["auth_user"], MAILBOX, "XOAUTH2 user: {meta}");
        assert_eq!(meta["transmission_type"], "ESMTPSA", "{meta}");
        assert_eq!(meta["secure"], true, "{meta}");
        let proto = meta["tls_protocol"].as_str().unwrap_or("");
        assert!(proto == "TLSv1.3" || proto == "TLSv1.2", "{meta}");
        assert_eq!(meta["token_aud"], "https://outlook.office365.com", "{meta}");
        assert_eq!(meta["token_appid"], CLIENT_ID, "{meta}");
        let rcpts: Vec<&str> = meta["rcpt_to"]
            .as_array()
            .expect("rcpt_to")
            .iter()
            .map(|v| v.as_str().expect("address"))
            .collect();
        assert_eq!(rcpts, s.rcpts, "{meta}");
        assert_eq!(meta["size"].as_u64(), Some(data.len() as u64));
        let body = meta["mail_args"]["BODY"].as_str();
        assert_eq!(
            body,
            s.eight_bit.then_some("8BITMIME"),
            "MAIL FROM params: {meta}"
        );
        assert_eq!(meta["client_hostname"], "relay.test", "EHLO name: {meta}");
    }

    // One client-credentials request served all three messages, with the configured client.
    let requests = peer.jsonl("token-requests.jsonl");
    assert_eq!(requests.len(), 1, "token requests: {requests:?}");
    let req = &requests[0];
    assert_eq!(req["grant_type"], "client_credentials");
    assert_eq!(req["client_id"], CLIENT_ID);
    assert_eq!(req["client_secret_ok"], true);
    assert_eq!(req["scope"], SCOPE);
    assert_eq!(req["content_type"], "application/x-www-form-urlencoded");
    assert!(peer.jsonl("auth-failures.jsonl").is_empty());
}

#[test]
fn a_token_the_node_peer_refuses_holds_delivery_and_keeps_the_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = make_tls(dir.path());
    // The peer's SMTP side expects tokens for another resource: the relay's token is genuine
    // (signature, issuer, expiry are fine) but not for this audience.
    let peer = NodePeer::start(dir.path(), &tls, Some("api://another-resource"));
    let spool = dir.path().join("spool");
    let relay = Relay::start(dir.path(), &spool, &relay_extra(&peer, &tls));

    let mut c = Client::connect(relay.addr()).expect("connect to relay");
    let message = crlf(&[&format!("From: {MAILBOX}"), "Subject: held", "", "body"]);
    let id = submit(&mut c, "", &["user@example.org"], &message);
    c.quit();

    wait_until("DELIVERY HELD in queue list", &relay, &peer, || {
        queue_list(&relay).starts_with("DELIVERY HELD")
    });
    let list = queue_list(&relay);
    assert!(
        list.contains("535 5.7.3 Authentication unsuccessful"),
        "queue list does not show the peer's reply:\n{list}"
    );
    assert!(
        list.lines().any(|l| l.starts_with(&id)),
        "{id} not listed:\n{list}"
    );
    assert!(queued_path(&spool, &id).is_file(), "{id} left queue/");
    assert!(peer.stored().is_empty(), "the peer stored a message");
    let failures = peer.jsonl("auth-failures.jsonl");
    assert!(!failures.is_empty(), "{}", diagnostics(&relay, &peer));
    for f in &failures {
        assert_eq!(f["user"], MAILBOX, "{f}");
        let reason = f["reason"].as_str().unwrap_or("");
        assert!(
            reason.contains("\"aud\""),
            "refused for another reason than the audience: {f}"
        );
    }
}
