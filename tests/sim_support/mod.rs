//! Shared helpers for the simulator tests: start a simulator, fetch tokens over HTTP, and a tiny raw SMTP client
//! (tokio + tokio-rustls), written here on purpose instead of reusing any relay code.
#![allow(dead_code)]

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use smtp_oauth_relay::sim::{EXCHANGE_SCOPE, SimConfig, Simulator};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound for any single wait in these tests (a hang fails instead of blocking CI).
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

/// Posts a form to the token URL of `sim` (tenant from `path_tenant`, or the configured one).
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

pub fn xoauth2(user: &str, token: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One SMTP reply: code and the text of each line (after `NNN-` / `NNN `).
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// The enhanced status code of the last line (`5.7.3`), or "" if none.
    pub fn enhanced(&self) -> String {
        let first = self
            .lines
            .last()
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_default();
        let parts: Vec<&str> = first.split('.').collect();
        if parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        {
            first.to_string()
        } else {
            String::new()
        }
    }

    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    #[track_caller]
    pub fn assert(&self, code: u16, enhanced: &str) {
        assert_eq!(
            (self.code, self.enhanced().as_str()),
            (code, enhanced),
            "unexpected reply: {self:?}"
        );
    }
}

pub struct Client {
    io: Pin<Box<dyn Io>>,
    buf: Vec<u8>,
}

impl Client {
    /// Connects and returns the client plus the banner.
    pub async fn connect(sim: &Simulator) -> (Client, Reply) {
        let tcp = tokio::time::timeout(STEP, TcpStream::connect(sim.smtp_addr()))
            .await
            .expect("connect in time");
        let mut c = Client {
            io: Box::pin(tcp.expect("connect")),
            buf: Vec::new(),
        };
        let banner = c.read_reply().await.expect("banner");
        (c, banner)
    }

    async fn read_line(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let s = String::from_utf8_lossy(&line);
                return Some(s.trim_end_matches(['\r', '\n']).to_string());
            }
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout(STEP, self.io.read(&mut chunk))
                .await
                .expect("reply in time")
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads one (possibly multi-line) reply; `None` on EOF or reset.
    pub async fn read_reply(&mut self) -> Option<Reply> {
        let mut lines = Vec::new();
        for _ in 0..100 {
            let line = self.read_line().await?;
            let code: u16 = line.get(..3)?.parse().ok()?;
            let more = line.as_bytes().get(3) == Some(&b'-');
            lines.push(line.get(4..).unwrap_or_default().to_string());
            if !more {
                return Some(Reply { code, lines });
            }
        }
        panic!("reply with more than 100 lines");
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        // A write error here (peer already gone) shows up as EOF on the next read.
        let _ = self.io.write_all(bytes).await;
        let _ = self.io.flush().await;
    }

    pub async fn try_cmd(&mut self, line: &str) -> Option<Reply> {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.read_reply().await
    }

    pub async fn cmd(&mut self, line: &str) -> Reply {
        match self.try_cmd(line).await {
            Some(r) => r,
            None => panic!("connection closed after {line:?}"),
        }
    }

    /// STARTTLS and the handshake, trusting only `ca_file`, checking `server_name`.
    pub async fn starttls(self, ca_file: &Path, server_name: &str) -> Client {
        let mut me = self;
        me.cmd("STARTTLS").await.assert(220, "2.0.0");
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_file).expect("ca file") {
            roots.add(cert.expect("ca pem")).expect("add root");
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = ServerName::try_from(server_name.to_string()).expect("server name");
        // Bytes pipelined before the 220 are not expected here; the TLS layer wraps the boxed stream.
        let io = me.io;
        let tls = tokio::time::timeout(STEP, connector.connect(name, io))
            .await
            .expect("tls in time")
            .expect("tls");
        Client {
            io: Box::pin(tls),
            buf: Vec::new(),
        }
    }

    /// EHLO, STARTTLS, EHLO: ready for AUTH.
    pub async fn secure(sim: &Simulator) -> Client {
        let (mut c, banner) = Client::connect(sim).await;
        assert_eq!(banner.code, 220);
        c.cmd("EHLO client.example").await.assert(250, "");
        let mut c = c
            .starttls(sim.ca_file(), &sim.config().smtp.host_name)
            .await;
        c.cmd("EHLO client.example").await.assert(250, "");
        c
    }

    /// A session authenticated as `user` with `token` (two-step form).
    pub async fn authenticated(sim: &Simulator, user: &str, token: &str) -> Client {
        let mut c = Client::secure(sim).await;
        c.auth_two_step(user, token).await.assert(235, "2.7.0");
        c
    }

    pub async fn auth_two_step(&mut self, user: &str, token: &str) -> Reply {
        let challenge = self.cmd("AUTH XOAUTH2").await;
        assert_eq!(challenge.code, 334, "{challenge:?}");
        self.cmd(&xoauth2(user, token)).await
    }

    pub async fn auth_inline(&mut self, user: &str, token: &str) -> Reply {
        self.cmd(&format!("AUTH XOAUTH2 {}", xoauth2(user, token)))
            .await
    }

    /// MAIL, RCPT..., DATA, body (dot-stuffed here), final dot; returns the final reply.
    pub async fn send_message(&mut self, from: &str, rcpts: &[&str], body: &str) -> Reply {
        self.cmd(&format!("MAIL FROM:<{from}>"))
            .await
            .assert(250, "2.1.0");
        for r in rcpts {
            self.cmd(&format!("RCPT TO:<{r}>"))
                .await
                .assert(250, "2.1.5");
        }
        self.cmd("DATA").await.assert(354, "");
        self.send(&dot_stuff(body)).await;
        self.read_reply().await.expect("reply to final dot")
    }

    /// Asserts the server closes the connection without saying anything more.
    pub async fn expect_closed(&mut self) {
        assert!(
            self.read_reply().await.is_none(),
            "expected the connection to be closed"
        );
    }
}

/// Dot-stuffs a CRLF body and appends the terminator.
pub fn dot_stuff(body: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in body.split_inclusive("\r\n") {
        if line.starts_with('.') {
            out.push(b'.');
        }
        out.extend_from_slice(line.as_bytes());
    }
    if !body.is_empty() && !body.ends_with("\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// A simple message from `from`.
pub fn message(from: &str, subject: &str) -> String {
    format!("From: <{from}>\r\nTo: <rcpt@example.org>\r\nSubject: {subject}\r\n\r\nHello.\r\n")
}
