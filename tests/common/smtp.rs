//! The one SMTP test client. Its core is fallible and async (`try_reply`, `try_command`,
//! `try_send`: `io::Result`), so a test can see a refusal, a dropped connection or a timeout as
//! data; the panicking convenience methods (`reply`, `cmd`, `expect`, `cmd_expect`,
//! `begin_message`, ...) are what most tests call. [`blocking::Client`] wraps the same core for
//! the thread-based tests (crash rounds, resource exhaustion).
//!
//! It shares no code with the relay or the simulator: it is the independent party they are
//! tested against. Every read and write is bounded by the client's timeout.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use smtp_oauth_relay::sim::Simulator;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::fixtures::data_block;

/// Replies must arrive within this; a hang fails the test instead of stalling CI.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// A reply longer than this many lines is a broken server, not a reply.
const MAX_LINES: usize = 1000;

/// Any byte stream the client can talk over (TCP, TLS over TCP, an in-memory duplex).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// The stream type of a client that may upgrade to TLS mid-session.
pub type BoxStream = Pin<Box<dyn Stream>>;

// ---------------------------------------------------------------------------------------------
// Replies

/// One SMTP reply. It reads as its raw text (`Deref<Target = str>`: `reply.starts_with("250")`,
/// `reply.contains(..)`), and also as parsed parts.
#[derive(Clone, PartialEq, Eq)]
pub struct Reply {
    /// 0 for the empty reply the panicking methods return once the server has closed.
    pub code: u16,
    /// The text of each line after `NNN-` / `NNN ` (`"4.3.2 Service not available"`).
    pub lines: Vec<String>,
    /// Exactly what arrived, CRLFs included.
    pub raw: String,
}

impl Reply {
    fn closed() -> Reply {
        Reply {
            code: 0,
            lines: Vec::new(),
            raw: String::new(),
        }
    }

    /// True for the empty reply: the server closed the connection instead of replying.
    pub fn is_closed(&self) -> bool {
        self.raw.is_empty()
    }

    /// Every full line (`"250-PIPELINING"`, ...) joined with `\n`, without CRs.
    pub fn text(&self) -> String {
        self.raw
            .split("\r\n")
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("\n")
    }

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

    /// `queued as <ID>` of a 250 after DATA.
    pub fn queued_id(&self) -> Option<String> {
        if self.code != 250 {
            return None;
        }
        let last = self.lines.last()?;
        let pos = last.find("queued as ")?;
        Some(last[pos + "queued as ".len()..].trim().to_string())
    }

    #[track_caller]
    pub fn assert(&self, code: u16, enhanced: &str) {
        assert!(
            !self.is_closed(),
            "the connection closed instead of replying"
        );
        assert_eq!(
            (self.code, self.enhanced().as_str()),
            (code, enhanced),
            "unexpected reply: {self:?}"
        );
    }
}

impl std::ops::Deref for Reply {
    type Target = str;
    fn deref(&self) -> &str {
        &self.raw
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.raw, f)
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.raw)
    }
}

impl PartialEq<str> for Reply {
    fn eq(&self, other: &str) -> bool {
        self.raw == other
    }
}

impl PartialEq<&str> for Reply {
    fn eq(&self, other: &&str) -> bool {
        self.raw == *other
    }
}

/// The id in a `250 2.0.0 queued as <ID>` reply.
pub fn queued_id(reply: &str) -> String {
    reply
        .trim_end()
        .rsplit(' ')
        .next()
        .expect("id in reply")
        .to_string()
}

fn timed_out(what: &str, limit: Duration) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} within {limit:?}"))
}

// ---------------------------------------------------------------------------------------------
// The async client

pub struct Client<S = BoxStream> {
    stream: BufReader<S>,
    timeout: Duration,
}

impl Client {
    /// Connects (no reply read yet: the greeting is the test's first `expect`).
    pub async fn connect(addr: SocketAddr) -> Client {
        Client::try_connect(addr).await.expect("connect")
    }

    pub async fn try_connect(addr: SocketAddr) -> io::Result<Client> {
        let tcp = tokio::time::timeout(REPLY_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| timed_out("connect", REPLY_TIMEOUT))??;
        // No TCP_NODELAY: writes coalesce as they did for every test written against this client.
        Ok(Client::boxed(tcp))
    }

    /// A client over any stream, as the type that can later upgrade to TLS.
    pub fn boxed(stream: impl Stream + 'static) -> Client {
        Client::new(Box::pin(stream) as BoxStream)
    }

    /// Connects to the simulator's SMTP port and returns the client plus the banner.
    pub async fn connect_sim(sim: &Simulator) -> (Client, Reply) {
        let mut c = Client::connect(sim.smtp_addr()).await;
        let banner = c.read_reply().await.expect("banner");
        (c, banner)
    }

    /// Simulator: EHLO, STARTTLS, EHLO: ready for AUTH.
    pub async fn secure(sim: &Simulator) -> Client {
        let (mut c, banner) = Client::connect_sim(sim).await;
        assert_eq!(banner.code, 220);
        c.cmd("EHLO client.example").await.assert(250, "");
        let mut c = c
            .starttls(sim.ca_file(), &sim.config().smtp.host_name)
            .await;
        c.cmd("EHLO client.example").await.assert(250, "");
        c
    }

    /// Simulator: a session authenticated as `user` with `token` (two-step form).
    pub async fn authenticated(sim: &Simulator, user: &str, token: &str) -> Client {
        let mut c = Client::secure(sim).await;
        c.auth_two_step(user, token).await.assert(235, "2.7.0");
        c
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub fn new(stream: S) -> Client<S> {
        Client {
            stream: BufReader::new(stream),
            timeout: REPLY_TIMEOUT,
        }
    }

    /// Changes the bound on every later read and write.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The stream, e.g. for a TLS handshake the test drives itself.
    pub fn into_inner(self) -> S {
        assert!(self.stream.buffer().is_empty(), "unread bytes before TLS");
        self.stream.into_inner()
    }

    // --- the fallible core ---

    /// Reads one complete (possibly multi-line) reply. `UnexpectedEof` if the server closed
    /// first, `TimedOut` after the client's timeout, `InvalidData` for a line that is no reply.
    pub async fn try_reply(&mut self) -> io::Result<Reply> {
        let mut reply = Reply::closed();
        for _ in 0..MAX_LINES {
            let mut line = String::new();
            let n = tokio::time::timeout(self.timeout, self.stream.read_line(&mut line))
                .await
                .map_err(|_| timed_out("reply", self.timeout))??;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed; partial reply {:?}", reply.raw),
                ));
            }
            reply.raw.push_str(&line);
            let bare = line.trim_end_matches(['\r', '\n']);
            let code = bare
                .get(..3)
                .and_then(|c| c.parse::<u16>().ok())
                .filter(|_| bare.as_bytes()[..3].iter().all(u8::is_ascii_digit))
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("bad reply line {line:?}"),
                    )
                })?;
            reply.code = code;
            reply
                .lines
                .push(bare.get(4..).unwrap_or_default().to_string());
            if bare.as_bytes().get(3) != Some(&b'-') {
                return Ok(reply);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("reply with more than {MAX_LINES} lines"),
        ))
    }

    /// Writes bytes as they are (message data, pipelined commands).
    pub async fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        let limit = self.timeout;
        tokio::time::timeout(limit, async {
            let s = self.stream.get_mut();
            s.write_all(bytes).await?;
            s.flush().await
        })
        .await
        .map_err(|_| timed_out("write", limit))?
    }

    pub async fn try_command(&mut self, line: &str) -> io::Result<Reply> {
        self.try_send(format!("{line}\r\n").as_bytes()).await?;
        self.try_reply().await
    }

    /// Everything the server sends until it closes (or `limit` passes).
    pub async fn read_to_close(&mut self, limit: Duration) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(limit, self.stream.read_to_end(&mut out)).await;
        out
    }

    // --- the panicking convenience methods ---

    /// One reply; the empty reply once the server has closed. A timeout or a read error panics.
    pub async fn reply(&mut self) -> Reply {
        match self.try_reply().await {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Reply::closed(),
            Err(e) => panic!("reading a reply: {e}"),
        }
    }

    /// One reply, `None` when the connection closed or was reset instead (or sent no reply);
    /// a timeout panics.
    pub async fn read_reply(&mut self) -> Option<Reply> {
        match self.try_reply().await {
            Ok(r) => Some(r),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => panic!("{e}"),
            Err(_) => None,
        }
    }

    /// Writes `bytes`. A write error (the peer already gone) is not reported here: it shows up
    /// as the end of the connection on the next read.
    pub async fn send(&mut self, bytes: &[u8]) {
        if let Err(e) = self.try_send(bytes).await
            && e.kind() == io::ErrorKind::TimedOut
        {
            panic!("{e}");
        }
    }

    /// The command's reply; panics if the connection closes instead.
    pub async fn cmd(&mut self, line: &str) -> Reply {
        match self.try_cmd(line).await {
            Some(r) => r,
            None => panic!("connection closed after {line:?}"),
        }
    }

    /// The command's reply, `None` if the connection closed instead.
    pub async fn try_cmd(&mut self, line: &str) -> Option<Reply> {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.read_reply().await
    }

    /// Asserts the next reply starts with `prefix` (e.g. "250 2.1.0").
    pub async fn expect(&mut self, prefix: &str) -> Reply {
        let r = self.reply().await;
        assert!(r.starts_with(prefix), "expected {prefix:?}, got {r:?}");
        r
    }

    pub async fn cmd_expect(&mut self, line: &str, prefix: &str) -> Reply {
        let r = self.cmd(line).await;
        assert!(
            r.starts_with(prefix),
            "{line:?}: expected {prefix:?}, got {r:?}"
        );
        r
    }

    /// True once the server has closed the connection.
    pub async fn closed(&mut self) -> bool {
        self.reply().await.is_closed()
    }

    /// Asserts the server closes the connection without saying anything more.
    pub async fn expect_closed(&mut self) {
        assert!(
            self.read_reply().await.is_none(),
            "expected the connection to be closed"
        );
    }

    /// Greeting + EHLO + MAIL + RCPT + DATA, ready for the message bytes.
    pub async fn begin_message(&mut self, from: &str, to: &[&str]) {
        self.expect("220 ").await;
        self.cmd_expect("EHLO client.test", "250").await;
        self.cmd_expect(&format!("MAIL FROM:<{from}>"), "250 2.1.0")
            .await;
        for rcpt in to {
            self.cmd_expect(&format!("RCPT TO:<{rcpt}>"), "250 2.1.5")
                .await;
        }
        self.cmd_expect("DATA", "354").await;
    }

    /// MAIL, RCPT..., DATA, body (dot-stuffed here), final dot; returns the final reply.
    /// Every step before the body must be accepted (`250 2.1.0`, `250 2.1.5`, `354`).
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
        self.send(&data_block(body)).await;
        self.read_reply().await.expect("reply to final dot")
    }

    /// XOAUTH2 in two steps (`AUTH XOAUTH2`, 334, then the initial response).
    pub async fn auth_two_step(&mut self, user: &str, token: &str) -> Reply {
        let challenge = self.cmd("AUTH XOAUTH2").await;
        assert_eq!(challenge.code, 334, "{challenge:?}");
        self.cmd(&super::sim::xoauth2(user, token)).await
    }

    /// XOAUTH2 with the initial response on the AUTH line.
    pub async fn auth_inline(&mut self, user: &str, token: &str) -> Reply {
        self.cmd(&format!(
            "AUTH XOAUTH2 {}",
            super::sim::xoauth2(user, token)
        ))
        .await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Client<S> {
    /// STARTTLS (must get `220 2.0.0`) and the handshake, trusting only `ca_file`, checking
    /// `server_name`.
    pub async fn starttls(mut self, ca_file: &Path, server_name: &str) -> Client {
        self.cmd("STARTTLS").await.assert(220, "2.0.0");
        let timeout = self.timeout;
        let tls = tls_handshake(self.into_inner(), ca_file, server_name, timeout)
            .await
            .expect("tls");
        let mut c = Client::boxed(tls);
        c.timeout = timeout;
        c
    }
}

impl Client {
    /// SMTPS (implicit TLS): the handshake right after connecting, trusting only `ca_file` and
    /// checking `server_name`; the greeting is the test's first `expect`.
    pub async fn connect_smtps(addr: SocketAddr, ca_file: &Path, server_name: &str) -> Client {
        let tcp = tokio::time::timeout(REPLY_TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        let tls = tls_handshake(tcp, ca_file, server_name, REPLY_TIMEOUT)
            .await
            .expect("tls");
        Client::boxed(tls)
    }
}

/// The client side of a TLS handshake over `stream`, bounded by `timeout`.
async fn tls_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    ca_file: &Path,
    server_name: &str,
    timeout: Duration,
) -> io::Result<tokio_rustls::client::TlsStream<S>> {
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
    tokio::time::timeout(timeout, connector.connect(name, stream))
        .await
        .map_err(|_| timed_out("TLS handshake", timeout))?
}

// ---------------------------------------------------------------------------------------------
// The blocking wrapper

pub mod blocking {
    //! The same client for tests that run plain threads (one per simulated application). Each
    //! call runs the async core to completion on a small runtime shared by the test process.

    use std::io;
    use std::net::SocketAddr;
    use std::sync::OnceLock;
    use std::time::Duration;

    use super::super::fixtures::{Fate, Ledger, dot_stuff, message};
    use super::Reply;

    /// Reads and writes of thread-based tests may wait behind a 35 MiB message or a crash.
    pub const TIMEOUT: Duration = Duration::from_secs(60);

    fn runtime() -> &'static tokio::runtime::Runtime {
        static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
        RT.get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("blocking-smtp-client")
                .enable_all()
                .build()
                .expect("client runtime")
        })
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        runtime().block_on(f)
    }

    pub struct Client {
        inner: super::Client,
    }

    impl Client {
        /// Connects, reads the greeting (must be 220) and sends EHLO (must be 250). A refusal is
        /// an error whose text carries the reply (e.g. `421 4.3.2 ...`).
        pub fn connect(addr: SocketAddr) -> io::Result<Client> {
            let mut c = Client::open(addr)?;
            let greeting = c.read_reply()?;
            if greeting.code != 220 {
                return Err(io::Error::other(format!("greeting {}", greeting.text())));
            }
            let ehlo = c.command("EHLO client.test")?;
            if ehlo.code != 250 {
                return Err(io::Error::other(format!("EHLO {}", ehlo.text())));
            }
            Ok(c)
        }

        /// Connects without reading anything.
        pub fn open(addr: SocketAddr) -> io::Result<Client> {
            let mut inner = block_on(async {
                let tcp = tokio::time::timeout(Duration::from_secs(10), async {
                    tokio::net::TcpStream::connect(addr).await
                })
                .await
                .map_err(|_| super::timed_out("connect", Duration::from_secs(10)))??;
                let _ = tcp.set_nodelay(true);
                Ok::<_, io::Error>(super::Client::boxed(tcp))
            })?;
            inner.set_timeout(TIMEOUT);
            Ok(Client { inner })
        }

        pub fn set_timeout(&mut self, timeout: Duration) {
            self.inner.set_timeout(timeout);
        }

        pub fn read_reply(&mut self) -> io::Result<Reply> {
            block_on(self.inner.try_reply())
        }

        /// Writes bytes as they are (message data, pipelined commands).
        pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
            block_on(self.inner.try_send(bytes))
        }

        pub fn command(&mut self, line: &str) -> io::Result<Reply> {
            block_on(self.inner.try_command(line))
        }

        /// MAIL, RCPT, DATA, body (dot-stuffed here; `message` must end in CRLF), end of data.
        /// Returns the first refusal, or the reply to the end of data.
        pub fn send(&mut self, from: &str, to: &str, message: &[u8]) -> io::Result<Reply> {
            let r = self.command(&format!("MAIL FROM:<{from}>"))?;
            if r.code != 250 {
                return Ok(r);
            }
            let r = self.command(&format!("RCPT TO:<{to}>"))?;
            if r.code != 250 {
                let _ = self.command("RSET");
                return Ok(r);
            }
            let r = self.command("DATA")?;
            if r.code != 354 {
                return Ok(r);
            }
            self.send_raw(&dot_stuff(message))?;
            self.send_raw(b".\r\n")?;
            self.read_reply()
        }

        /// Sends the [`message`] for `marker`, recording its fate in `ledger` at each step.
        pub fn send_tracked(
            &mut self,
            ledger: &Ledger,
            marker: &str,
            size: usize,
        ) -> io::Result<Fate> {
            let msg = message(marker, size);
            let r = self.command("MAIL FROM:<legacy@app.local>")?;
            if r.code != 250 {
                ledger.set(marker, Fate::Refused, size);
                return Ok(Fate::Refused);
            }
            let r = self.command("RCPT TO:<user@example.org>")?;
            if r.code != 250 {
                ledger.set(marker, Fate::Refused, size);
                let _ = self.command("RSET");
                return Ok(Fate::Refused);
            }
            let r = self.command("DATA")?;
            if r.code != 354 {
                ledger.set(marker, Fate::Refused, size);
                return Ok(Fate::Refused);
            }
            ledger.set(marker, Fate::CutOff, size);
            self.send_raw(&dot_stuff(&msg))?;
            ledger.set(marker, Fate::InDoubt, size);
            self.send_raw(b".\r\n")?;
            let fate = if self.read_reply()?.code == 250 {
                Fate::Acked
            } else {
                Fate::Refused
            };
            ledger.set(marker, fate, size);
            Ok(fate)
        }

        /// Everything the server sends until it closes (or `limit` passes).
        pub fn read_to_close(&mut self, limit: Duration) -> Vec<u8> {
            block_on(self.inner.read_to_close(limit))
        }

        pub fn quit(mut self) {
            let _ = self.command("QUIT");
        }
    }
}
