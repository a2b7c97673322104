//! Test harness: the relay's listener in-process on 127.0.0.1:0 with a temporary spool
//! (mini-redis style), and a minimal SMTP client that reads whole replies.
#![allow(dead_code)]

pub mod counting_token;
pub mod delivery;
pub mod echo;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use smtp_oauth_relay::config::Config;
use smtp_oauth_relay::inbound::{InboundSettings, Server};
use smtp_oauth_relay::spool::Spool;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Replies must arrive within this; a hang fails the test instead of stalling CI.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Relay {
    pub addr: SocketAddr,
    pub spool: Spool,
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Relay {
    pub fn spool_dir(&self) -> &Path {
        self.spool.dir()
    }

    /// Stored messages (the bytes after the spool's envelope header), in arrival order.
    pub fn stored_messages(&self) -> Vec<Vec<u8>> {
        self.spool
            .list()
            .expect("list")
            .iter()
            .map(|e| self.stored_message(&e.id))
            .collect()
    }

    pub fn stored_message(&self, id: &str) -> Vec<u8> {
        let path = self.spool_dir().join("queue").join(format!("{id}.msg"));
        let bytes = std::fs::read(&path).expect("read spool file");
        let header = smtp_oauth_relay::spool::format::decode(&bytes).expect("decodes");
        bytes[header.header_len as usize..].to_vec()
    }

    pub fn files_in(&self, sub: &str) -> Vec<PathBuf> {
        std::fs::read_dir(self.spool_dir().join(sub))
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    }

    pub async fn connect(&self) -> Client<TcpStream> {
        Client::connect(self.addr).await
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("server stops")
            .expect("server task");
    }
}

/// Starts the listener with `toml` (a relay.toml fragment) on an ephemeral port.
pub async fn start_relay(toml: &str) -> Relay {
    let mut config = Config::from_toml_str(toml).expect("test config valid");
    let dir = tempfile::tempdir().expect("tempdir");
    config.queue.dir = dir.path().join("spool");
    // Tests run on filesystems of any size: only the explicit tests exercise the disk guard.
    if config.queue.min_free_space.0 == 0 {
        config.queue.min_free_space = smtp_oauth_relay::config::ByteSize(1);
    }
    let settings = InboundSettings::from_config(&config).expect("settings");
    let (spool, _) = Spool::open(&config.queue.dir).expect("spool");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let server = Server::new(settings, spool.clone(), None, Default::default());
    let handle = tokio::spawn(server.run(vec![listener], shutdown.clone()));
    Relay {
        addr,
        spool,
        shutdown,
        handle,
        _dir: dir,
    }
}

pub struct Client<S> {
    stream: BufReader<S>,
}

impl Client<TcpStream> {
    pub async fn connect(addr: SocketAddr) -> Client<TcpStream> {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Client::new(stream)
    }

    pub fn into_inner(self) -> TcpStream {
        assert!(self.stream.buffer().is_empty(), "unread bytes before TLS");
        self.stream.into_inner()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub fn new(stream: S) -> Client<S> {
        Client {
            stream: BufReader::new(stream),
        }
    }

    /// Reads one complete (possibly multi-line) reply. Empty string on EOF.
    pub async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(REPLY_TIMEOUT, self.stream.read_line(&mut line))
                .await
                .expect("reply within timeout")
                .expect("read");
            if n == 0 {
                return all;
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] == b' ' {
                return all;
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.get_mut().write_all(bytes).await.expect("write");
    }

    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// Asserts the next reply starts with `prefix` (e.g. "250 2.1.0").
    pub async fn expect(&mut self, prefix: &str) -> String {
        let r = self.reply().await;
        assert!(r.starts_with(prefix), "expected {prefix:?}, got {r:?}");
        r
    }

    pub async fn cmd_expect(&mut self, line: &str, prefix: &str) -> String {
        let r = self.cmd(line).await;
        assert!(
            r.starts_with(prefix),
            "{line:?}: expected {prefix:?}, got {r:?}"
        );
        r
    }

    /// True once the server has closed the connection.
    pub async fn closed(&mut self) -> bool {
        self.reply().await.is_empty()
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

/// The stored message without the relay's trace header and the Date/Message-ID it added
/// because `sent` (what the client sent) lacked them.
pub fn strip_added_headers<'a>(stored: &'a [u8], sent: &[u8]) -> &'a [u8] {
    let headers_end = sent
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(sent.len());
    let sent_headers = String::from_utf8_lossy(&sent[..headers_end]).to_ascii_lowercase();
    let has =
        |name: &str| sent_headers.starts_with(name) || sent_headers.contains(&format!("\n{name}"));
    let mut rest = stored;
    assert!(rest.starts_with(b"Received: "), "no Received header first");
    rest = skip_field(rest);
    if !has("date:") {
        assert!(rest.starts_with(b"Date: "), "Date not added");
        rest = skip_field(rest);
    }
    if !has("message-id:") {
        assert!(rest.starts_with(b"Message-ID: <"), "Message-ID not added");
        rest = skip_field(rest);
    }
    rest
}

fn skip_field(mut bytes: &[u8]) -> &[u8] {
    loop {
        let end = bytes.windows(2).position(|w| w == b"\r\n").expect("CRLF") + 2;
        bytes = &bytes[end..];
        if !bytes.starts_with(b"\t") && !bytes.starts_with(b" ") {
            return bytes;
        }
    }
}
