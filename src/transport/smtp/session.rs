//! One SMTP session to Exchange Online: connect, STARTTLS (or implicit TLS), EHLO, two-step
//! `AUTH XOAUTH2`, then transactions with a result per recipient. Never falls back to plaintext.
//!
//! mail-send does the TCP connect and the TLS upgrade; replies are read here, line by line, so
//! the enhanced status code keeps all its digits and the multi-kilobyte diagnostic tails
//! Exchange appends are bounded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use mail_send::SmtpClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::UpstreamTls;
use crate::deliver::classify::{HoldCause, Outcome, Stage, classify};
use crate::deliver::reply::{UpstreamReply, is_last_line};
use crate::spool::{MessageBody, SpoolError};

/// Per-step limits. RFC 5321 §4.5.3.2 gives client minimums of 5 minutes for most replies and
/// 10 minutes for the final dot; a relay that keeps its queue can afford to give up sooner on
/// steps other than the final reply.
#[derive(Debug, Clone)]
pub struct Timeouts {
    pub connect: Duration,
    pub command: Duration,
    pub data_end: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(30),
            command: Duration::from_secs(120),
            data_end: Duration::from_secs(600),
        }
    }
}

/// Where and how to connect.
#[derive(Clone)]
pub struct UpstreamTarget {
    /// `host:port` to dial.
    pub address: String,
    /// The name the certificate must carry (SNI).
    pub server_name: String,
    pub tls: UpstreamTls,
    pub connector: TlsConnector,
    /// Our name in EHLO.
    pub helo: String,
    pub timeouts: Timeouts,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{stage:?}: upstream replied {reply}")]
    Reply { stage: Stage, reply: UpstreamReply },
    #[error("{stage:?}: {message}")]
    Network { stage: Stage, message: String },
    #[error("{stage:?}: no reply within {0:?}", .limit)]
    Timeout { stage: Stage, limit: Duration },
    #[error("TLS: {0}")]
    Certificate(String),
    #[error("{stage:?}: {what}")]
    Protocol { stage: Stage, what: String },
    /// The message could not be read from the spool while it was being sent (the connection
    /// is then closed without the final dot, so nothing partial is delivered).
    #[error("DataEnd: reading the message from the spool: {0}")]
    Spool(SpoolError),
}

impl SessionError {
    /// The outcome class for the message being delivered when this error happened.
    pub fn outcome(&self) -> Outcome {
        match self {
            SessionError::Reply { stage, reply } => classify(*stage, reply),
            SessionError::Network { .. } | SessionError::Timeout { .. } => {
                Outcome::Retry { throttle: false }
            }
            SessionError::Certificate(_) => Outcome::Hold(HoldCause::CertificateInvalid),
            SessionError::Protocol { .. } => Outcome::Hold(HoldCause::ProtocolMismatch),
            SessionError::Spool(_) => Outcome::Retry { throttle: false },
        }
    }

    /// The upstream reply, if the error is one.
    pub fn reply(&self) -> Option<&UpstreamReply> {
        match self {
            SessionError::Reply { reply, .. } => Some(reply),
            _ => None,
        }
    }
}

/// The connection, before and after the TLS upgrade.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Conn {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf).await,
            Conn::Tls(s) => s.read(buf).await,
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
            Conn::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            Conn::Plain(s) => s.shutdown().await,
            Conn::Tls(s) => s.shutdown().await,
        };
    }
}

/// What the server's EHLO offered.
#[derive(Debug, Default, Clone)]
pub struct Capabilities {
    pub starttls: bool,
    pub xoauth2: bool,
    pub size: Option<u64>,
    pub eight_bit: bool,
    pub smtputf8: bool,
}

impl Capabilities {
    fn parse(lines: &[String]) -> Capabilities {
        let mut caps = Capabilities::default();
        for line in lines.iter().skip(1) {
            let words: Vec<String> = line
                .get(4..)
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_ascii_uppercase)
                .collect();
            match words.first().map(String::as_str) {
                Some("STARTTLS") => caps.starttls = true,
                Some("AUTH") => caps.xoauth2 |= words.iter().any(|w| w == "XOAUTH2"),
                Some("SIZE") => caps.size = words.get(1).and_then(|n| n.parse().ok()),
                Some("8BITMIME") => caps.eight_bit = true,
                Some("SMTPUTF8") => caps.smtputf8 = true,
                _ => {}
            }
        }
        caps
    }
}

/// The result of one transaction.
#[derive(Debug)]
pub struct TransactionResult {
    /// For each recipient, in order: `None` if accepted, else the refusal.
    pub recipients: Vec<Option<UpstreamReply>>,
    /// The reply to the final dot; `None` when no recipient was accepted (nothing was sent).
    pub data_reply: Option<UpstreamReply>,
}

pub struct UpstreamSession {
    stream: Conn,
    buf: Vec<u8>,
    pub caps: Capabilities,
    target_timeouts: Timeouts,
    opened: Instant,
    last_used: Instant,
    /// Transactions completed on this connection.
    pub transactions: u32,
    /// A failed transaction leaves state on the server: RSET before the next one.
    needs_rset: bool,
    /// Between `354` and the final dot: any command now would be message text, so a session
    /// given up here is closed without QUIT.
    in_data: bool,
    /// When the last `send` wrote its final dot (`None` if it did not get that far): after
    /// that instant the server may have the message, whatever happens to its reply.
    dot_sent_at: Option<std::time::SystemTime>,
    peer: Option<std::net::SocketAddr>,
}

/// Longest reply line we keep reading (Exchange's diagnostics run to a few kilobytes).
const MAX_REPLY_LINE: usize = 16 * 1024;
/// Most lines in one reply.
const MAX_REPLY_LINES: usize = 64;

impl UpstreamSession {
    /// Connects, secures and authenticates. `mailbox` is the XOAUTH2 `user=`.
    pub async fn open(
        target: &UpstreamTarget,
        mailbox: &str,
        token: &str,
    ) -> Result<UpstreamSession, SessionError> {
        let mut session = UpstreamSession::connect(target).await?;
        session.login(mailbox, token).await?;
        Ok(session)
    }

    /// Connects and secures the session (TLS, then EHLO), without authenticating: `open` is
    /// `connect` + `login`; `check` runs the two as separate steps.
    pub async fn connect(target: &UpstreamTarget) -> Result<UpstreamSession, SessionError> {
        let addr = tokio::time::timeout(
            target.timeouts.connect,
            tokio::net::lookup_host(target.address.as_str()),
        )
        .await
        .map_err(|_| SessionError::Timeout {
            stage: Stage::Connect,
            limit: target.timeouts.connect,
        })?
        .map_err(|e| network(Stage::Connect, format!("resolving {}: {e}", target.address)))?
        .next()
        .ok_or_else(|| network(Stage::Connect, format!("{} has no address", target.address)))?;
        let client = SmtpClient::connect(addr, target.timeouts.connect)
            .await
            .map_err(|e| mail_send_error(Stage::Connect, e))?;
        // Without NODELAY, Nagle plus delayed ACKs cost ~40 ms per command on loopback.
        let _ = client.stream.set_nodelay(true);

        let mut session = match target.tls {
            UpstreamTls::Implicit => {
                let tls = client
                    .into_tls(&target.connector, &target.server_name)
                    .await
                    .map_err(|e| mail_send_error(Stage::StartTls, e))?;
                let mut s = UpstreamSession::new(Conn::Tls(Box::new(tls.stream)), target);
                s.expect(Stage::Connect, 220, target.timeouts.command)
                    .await?;
                s.ehlo(&target.helo).await?;
                s
            }
            UpstreamTls::Starttls => {
                let mut plain = UpstreamSession::new(Conn::Plain(client.stream), target);
                plain
                    .expect(Stage::Connect, 220, target.timeouts.command)
                    .await?;
                plain.ehlo(&target.helo).await?;
                if !plain.caps.starttls {
                    return Err(SessionError::Protocol {
                        stage: Stage::Ehlo,
                        what: "the server does not offer STARTTLS; refusing to send in plaintext"
                            .into(),
                    });
                }
                plain.command(Stage::StartTls, b"STARTTLS\r\n", 220).await?;
                let tcp = plain.into_tcp()?;
                let client = SmtpClient {
                    stream: tcp,
                    timeout: target.timeouts.connect,
                };
                let tls = client
                    .into_tls(&target.connector, &target.server_name)
                    .await
                    .map_err(|e| mail_send_error(Stage::StartTls, e))?;
                let mut s = UpstreamSession::new(Conn::Tls(Box::new(tls.stream)), target);
                // RFC 3207 §4.2: forget everything learnt before TLS and ask again.
                s.ehlo(&target.helo).await?;
                s
            }
        };
        session.peer = Some(addr);
        Ok(session)
    }

    /// `AUTH XOAUTH2` as `mailbox` with `token`.
    pub async fn login(&mut self, mailbox: &str, token: &str) -> Result<(), SessionError> {
        if !self.caps.xoauth2 {
            return Err(SessionError::Protocol {
                stage: Stage::Auth,
                what: "the server does not offer AUTH XOAUTH2".into(),
            });
        }
        self.authenticate(mailbox, token).await
    }

    /// The address connected to.
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        self.peer
    }

    /// The negotiated TLS version and cipher suite (e.g. `("TLSv1_3", "TLS13_AES_256_GCM_SHA384")`).
    pub fn tls_info(&self) -> Option<(String, String)> {
        let Conn::Tls(tls) = &self.stream else {
            return None;
        };
        let (_, conn) = tls.get_ref();
        Some((
            conn.protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default(),
            conn.negotiated_cipher_suite()
                .map(|c| format!("{:?}", c.suite()))
                .unwrap_or_default(),
        ))
    }

    fn new(stream: Conn, target: &UpstreamTarget) -> UpstreamSession {
        let now = Instant::now();
        UpstreamSession {
            stream,
            buf: Vec::with_capacity(4096),
            caps: Capabilities::default(),
            target_timeouts: target.timeouts.clone(),
            opened: now,
            last_used: now,
            transactions: 0,
            needs_rset: false,
            in_data: false,
            dot_sent_at: None,
            peer: None,
        }
    }

    /// Recovers the TCP stream for the TLS upgrade. Bytes pipelined after the 220 would be a
    /// STARTTLS injection (RFC 3207 §5): refuse them.
    fn into_tcp(self) -> Result<TcpStream, SessionError> {
        if !self.buf.is_empty() {
            return Err(SessionError::Protocol {
                stage: Stage::StartTls,
                what: "data received after the STARTTLS reply".into(),
            });
        }
        match self.stream {
            Conn::Plain(tcp) => Ok(tcp),
            Conn::Tls(_) => Err(SessionError::Protocol {
                stage: Stage::StartTls,
                what: "STARTTLS on a connection that already uses TLS".into(),
            }),
        }
    }

    async fn ehlo(&mut self, helo: &str) -> Result<(), SessionError> {
        self.write(Stage::Ehlo, format!("EHLO {helo}\r\n").as_bytes())
            .await?;
        let (lines, reply) = self
            .read_reply(Stage::Ehlo, self.target_timeouts.command)
            .await?;
        if reply.code != 250 {
            return Err(SessionError::Reply {
                stage: Stage::Ehlo,
                reply,
            });
        }
        self.caps = Capabilities::parse(&lines);
        Ok(())
    }

    /// Two-step XOAUTH2 as Microsoft documents it: `AUTH XOAUTH2`, `334`, then the credential.
    async fn authenticate(&mut self, mailbox: &str, token: &str) -> Result<(), SessionError> {
        self.command(Stage::Auth, b"AUTH XOAUTH2\r\n", 334).await?;
        let credential = STANDARD.encode(format!("user={mailbox}\x01auth=Bearer {token}\x01\x01"));
        let mut line = credential.into_bytes();
        line.extend_from_slice(b"\r\n");
        self.write(Stage::Auth, &line).await?;
        let (_, mut reply) = self
            .read_reply(Stage::Auth, self.target_timeouts.command)
            .await?;
        if reply.code == 334 {
            // An error challenge (Google/Dovecot style): an empty line ends the exchange.
            self.write(Stage::Auth, b"\r\n").await?;
            reply = self
                .read_reply(Stage::Auth, self.target_timeouts.command)
                .await?
                .1;
        }
        if reply.code != 235 {
            return Err(SessionError::Reply {
                stage: Stage::Auth,
                reply,
            });
        }
        Ok(())
    }

    /// One transaction. `body` is the message as it is to be sent (headers final), read from the
    /// spool a piece at a time; dot-stuffing is applied here.
    pub async fn send(
        &mut self,
        mail_from: &str,
        mail_params: &str,
        recipients: &[String],
        body: &MessageBody,
    ) -> Result<TransactionResult, SessionError> {
        self.dot_sent_at = None;
        if self.needs_rset {
            self.command(Stage::MailFrom, b"RSET\r\n", 250).await?;
            self.needs_rset = false;
        }
        self.needs_rset = true;
        let mut mail = format!("MAIL FROM:<{mail_from}>");
        if self.caps.size.is_some() {
            mail.push_str(&format!(" SIZE={}", body.len()));
        }
        mail.push_str(mail_params);
        mail.push_str("\r\n");
        self.command(Stage::MailFrom, mail.as_bytes(), 250).await?;
        let mut results = Vec::with_capacity(recipients.len());
        for rcpt in recipients {
            self.write(Stage::RcptTo, format!("RCPT TO:<{rcpt}>\r\n").as_bytes())
                .await?;
            let (_, reply) = self
                .read_reply(Stage::RcptTo, self.target_timeouts.command)
                .await?;
            results.push((!reply.is_positive()).then_some(reply));
        }
        if results.iter().all(Option::is_some) {
            return Ok(TransactionResult {
                recipients: results,
                data_reply: None,
            });
        }
        self.command(Stage::Data, b"DATA\r\n", 354).await?;
        crate::failpoint::hit("upstream-mid-data");
        // Read, stuffed and written a piece at a time: a 35 MiB message is never in memory.
        self.in_data = true;
        let mut reader = body.reader();
        let mut stuffer = DotStuffer::default();
        let mut out = Vec::with_capacity(STUFF_CHUNK + STUFF_CHUNK / 32);
        while let Some(chunk) = reader.next_chunk().await.map_err(SessionError::Spool)? {
            for piece in chunk.chunks(STUFF_CHUNK) {
                out.clear();
                stuffer.push(piece, &mut out);
                self.write(Stage::DataEnd, &out).await?;
            }
        }
        out.clear();
        stuffer.finish(&mut out);
        self.write(Stage::DataEnd, &out).await?;
        self.in_data = false;
        self.dot_sent_at = Some(std::time::SystemTime::now());
        let (_, reply) = self
            .read_reply(Stage::DataEnd, self.target_timeouts.data_end)
            .await?;
        // After a final reply, positive or not, the transaction is over (RFC 5321 §4.1.1.4).
        self.needs_rset = false;
        self.transactions += 1;
        Ok(TransactionResult {
            recipients: results,
            data_reply: Some(reply),
        })
    }

    /// When the last [`send`](Self::send) finished writing the final dot, if it did.
    pub fn dot_sent_at(&self) -> Option<std::time::SystemTime> {
        self.dot_sent_at
    }

    /// Whether the connection may carry another message.
    pub fn reusable(&self, max_age: Duration, max_idle: Duration) -> bool {
        self.opened.elapsed() < max_age && self.last_used.elapsed() < max_idle
    }

    pub async fn quit(mut self) {
        if !self.in_data && self.write(Stage::Connect, b"QUIT\r\n").await.is_ok() {
            let _ = self
                .read_reply(Stage::Connect, Duration::from_secs(5))
                .await;
        }
        self.stream.shutdown().await;
    }

    async fn command(
        &mut self,
        stage: Stage,
        line: &[u8],
        expected: u16,
    ) -> Result<UpstreamReply, SessionError> {
        self.write(stage, line).await?;
        self.expect(stage, expected, self.target_timeouts.command)
            .await
    }

    async fn expect(
        &mut self,
        stage: Stage,
        expected: u16,
        limit: Duration,
    ) -> Result<UpstreamReply, SessionError> {
        let (_, reply) = self.read_reply(stage, limit).await?;
        if reply.code == expected {
            Ok(reply)
        } else {
            Err(SessionError::Reply { stage, reply })
        }
    }

    async fn write(&mut self, stage: Stage, bytes: &[u8]) -> Result<(), SessionError> {
        self.last_used = Instant::now();
        let limit = self.target_timeouts.command.max(Duration::from_secs(60));
        tokio::time::timeout(limit, self.stream.write_all(bytes))
            .await
            .map_err(|_| SessionError::Timeout { stage, limit })?
            .map_err(|e| network(stage, e.to_string()))
    }

    async fn read_reply(
        &mut self,
        stage: Stage,
        limit: Duration,
    ) -> Result<(Vec<String>, UpstreamReply), SessionError> {
        let result = tokio::time::timeout(limit, self.read_lines(stage)).await;
        self.last_used = Instant::now();
        let lines = result.map_err(|_| SessionError::Timeout { stage, limit })??;
        let reply = UpstreamReply::parse(&lines).ok_or_else(|| SessionError::Protocol {
            stage,
            what: format!(
                "unparseable reply {:?}",
                lines
                    .first()
                    .map(|l| truncate(&crate::redact::scrub(l), 80))
            ),
        })?;
        Ok((lines, reply))
    }

    async fn read_lines(&mut self, stage: Stage) -> Result<Vec<String>, SessionError> {
        let mut lines = Vec::new();
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let raw: Vec<u8> = self.buf.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&raw)
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
                let last = is_last_line(&line);
                lines.push(line);
                if last {
                    return Ok(lines);
                }
                if lines.len() > MAX_REPLY_LINES {
                    return Err(SessionError::Protocol {
                        stage,
                        what: "reply with too many lines".into(),
                    });
                }
                continue;
            }
            if self.buf.len() > MAX_REPLY_LINE {
                return Err(SessionError::Protocol {
                    stage,
                    what: "reply line too long".into(),
                });
            }
            let mut chunk = [0u8; 4096];
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|e| network(stage, e.to_string()))?;
            if n == 0 {
                return Err(network(stage, "connection closed by the server".into()));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Size of the pieces the message is stuffed and written in.
const STUFF_CHUNK: usize = 64 * 1024;

/// RFC 5321 §4.5.2 transparency, streaming: a line starting with "." gets another, across
/// piece boundaries; the data ends with CRLF.CRLF (a CRLF is added if the message does not end
/// with one, never an extra blank line).
struct DotStuffer {
    line_start: bool,
    /// The last two bytes pushed (the end of the message decides the terminator).
    last: [u8; 2],
    pushed: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer {
            line_start: true,
            last: [0; 2],
            pushed: false,
        }
    }
}

impl DotStuffer {
    fn push(&mut self, piece: &[u8], out: &mut Vec<u8>) {
        let mut from = 0;
        for (i, &b) in piece.iter().enumerate() {
            if self.line_start && b == b'.' {
                out.extend_from_slice(&piece[from..i]);
                out.push(b'.');
                from = i;
            }
            self.line_start = b == b'\n';
        }
        out.extend_from_slice(&piece[from..]);
        match piece {
            [] => {}
            [b] => self.last = [self.last[1], *b],
            [.., a, b] => self.last = [*a, *b],
        }
        self.pushed |= !piece.is_empty();
    }

    /// The terminator for the message pushed.
    fn finish(self, out: &mut Vec<u8>) {
        if self.pushed && self.last != *b"\r\n" {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

/// The whole stuffed form of `body` (what `send` writes piece by piece).
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 5);
    let mut stuffer = DotStuffer::default();
    stuffer.push(body, &mut out);
    stuffer.finish(&mut out);
    out
}

fn network(stage: Stage, message: String) -> SessionError {
    SessionError::Network { stage, message }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

fn mail_send_error(stage: Stage, error: mail_send::Error) -> SessionError {
    match error {
        mail_send::Error::Tls(e) => SessionError::Certificate(e.to_string()),
        mail_send::Error::InvalidTLSName => {
            SessionError::Certificate("the TLS server name is not a valid DNS name".into())
        }
        mail_send::Error::Timeout => SessionError::Timeout {
            stage,
            limit: Duration::from_secs(30),
        },
        mail_send::Error::Io(e) => network(stage, e.to_string()),
        other => network(stage, other.to_string()),
    }
}

/// The upstream target `serve` and `check` connect to: `upstream.host` (or the cloud's SMTP
/// host), `upstream.port`, `upstream.tls`, the TLS name and `upstream.ca_file`, with default
/// timeouts.
pub fn upstream_target(config: &crate::config::Config) -> Result<UpstreamTarget, String> {
    let up = &config.upstream;
    let host = crate::oauth::endpoints(config)
        .map_err(|e| e.to_string())?
        .smtp_host;
    let address = if host.contains(':') {
        format!("[{host}]:{}", up.port)
    } else {
        format!("{host}:{}", up.port)
    };
    Ok(UpstreamTarget {
        address,
        server_name: up.tls_server_name.clone().unwrap_or(host),
        tls: up.tls,
        connector: tls_connector(up.ca_file.as_deref())?,
        helo: config.smtp.hostname.clone(),
        timeouts: Timeouts::default(),
    })
}

/// Builds the TLS client configuration: TLS 1.2+, Mozilla's roots (so a scratch container needs
/// no CA bundle) plus the PEM certificates in `ca_file`.
pub fn tls_connector(ca_file: Option<&std::path::Path>) -> Result<TlsConnector, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("upstream.ca_file {}: {e}", path.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("upstream.ca_file {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("upstream.ca_file {}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stuffing_in_pieces_equals_stuffing_at_once() {
        for body in [
            &b"a\r\n.b\r\n..\r\n.\r\nend"[..],
            b".a\r\n.\r\n",
            b"x\r",
            b"\n",
        ] {
            for split in 0..=body.len() {
                let mut stuffer = DotStuffer::default();
                let mut out = Vec::new();
                stuffer.push(&body[..split], &mut out);
                stuffer.push(&body[split..], &mut out);
                stuffer.finish(&mut out);
                assert_eq!(out, dot_stuff(body), "split at {split}");
            }
        }
        // The end of a message split one byte at a time still decides the terminator.
        let mut stuffer = DotStuffer::default();
        let mut out = Vec::new();
        for b in b"a\r\n" {
            stuffer.push(&[*b], &mut out);
        }
        stuffer.finish(&mut out);
        assert_eq!(out, b"a\r\n.\r\n");
    }

    #[test]
    fn stuffing_doubles_leading_dots_and_terminates_once() {
        assert_eq!(dot_stuff(b"a\r\n.b\r\n..\r\n"), b"a\r\n..b\r\n...\r\n.\r\n");
        assert_eq!(dot_stuff(b".first\r\n"), b"..first\r\n.\r\n");
        assert_eq!(dot_stuff(b"no newline"), b"no newline\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
    }

    #[test]
    fn ehlo_capabilities_are_read() {
        let lines: Vec<String> = [
            "250-SY5P282CA0097.outlook.office365.com Hello [172.105.184.101]",
            "250-SIZE 157286400",
            "250-PIPELINING",
            "250-AUTH LOGIN XOAUTH2",
            "250-8BITMIME",
            "250 SMTPUTF8",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let caps = Capabilities::parse(&lines);
        assert!(caps.xoauth2 && caps.eight_bit && caps.smtputf8 && !caps.starttls);
        assert_eq!(caps.size, Some(157_286_400));
    }
}
