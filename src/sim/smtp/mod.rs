//! Simulated Exchange Online client submission (reference §2, §3, checklist §7): banner and EHLO lists as
//! recorded, STARTTLS, AUTH XOAUTH2 (two-step and inline), the permission model, per-mailbox limits, the
//! end-of-DATA checks and scripted faults. Commands are parsed here (not with the relay's code); message bodies
//! go through smtp-proto's `DataReceiver`, primed with CRLF so a first-line dot is seen.
//!
//! One file per group of verbs: `hello` (EHLO/HELO), `auth` (AUTH XOAUTH2 and the permission
//! model), `envelope` (MAIL, RCPT), `data` (DATA, BDAT, end of data), `limits` (the content and
//! rate checks Exchange applies at the final dot), `parse` (argument parsers). This file holds
//! the connection, the session state and the command dispatcher.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use smtp_proto::request::receiver::{DataReceiver, DummyDataReceiver};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::config::SimConfig;
use super::control::{Shared, SmtpFault, SmtpStage};
use super::mailbox::Mailbox;
use super::util::{iso_millis, rfc2822_now, upper_hex};
use parse::{diagnostic_blob, parse_bdat};

mod auth;
mod data;
mod envelope;
mod hello;
mod limits;
mod parse;

/// A command line longer than this closes the session (RFC 4954 allows 12,288 octets for AUTH).
const MAX_LINE: usize = 65_536;
/// Longest single header value Exchange takes (554 5.6.211 above it).
const MAX_HEADER_VALUE: usize = 32_768;

pub(crate) struct SmtpCtx {
    pub shared: Arc<Shared>,
    pub tls: TlsAcceptor,
    pub mailbox: Arc<Mailbox>,
}

/// Accepts connections until `shutdown`; dropping the JoinSet then aborts the open sessions.
pub(crate) async fn serve(listener: TcpListener, ctx: Arc<SmtpCtx>, shutdown: CancellationToken) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    ctx.shared.smtp_connections.fetch_add(1, Ordering::Relaxed);
                    let _ = tcp.set_nodelay(true);
                    sessions.spawn(run_session(ctx.clone(), tcp, peer));
                }
                Err(e) => {
                    // Out of file descriptors and similar: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "simulator SMTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
}

/// Buffered connection: `buf` holds bytes read but not yet consumed (pipelined input).
struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
}

/// Why reading stopped.
enum ReadEnd {
    Eof,
    Idle,
    TooLong,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    async fn write(&mut self, text: &str) -> bool {
        let mut out = Vec::with_capacity(text.len() + 2);
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
        self.stream.write_all(&out).await.is_ok() && self.stream.flush().await.is_ok()
    }

    /// Reads more bytes into `buf`.
    async fn fill(&mut self, idle: Duration) -> Result<(), ReadEnd> {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(idle, self.stream.read(&mut chunk)).await {
            Err(_) => Err(ReadEnd::Idle),
            Ok(Ok(0)) | Ok(Err(_)) => Err(ReadEnd::Eof),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
        }
    }

    /// One line without its line end (CRLF, or a bare LF from a sloppy client).
    async fn line(&mut self, idle: Duration) -> Result<String, ReadEnd> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            if self.buf.len() > MAX_LINE {
                return Err(ReadEnd::TooLong);
            }
            self.fill(idle).await?;
        }
    }
}

/// What the command loop wants next.
enum Next {
    StartTls,
    Close,
}

/// Result of handling one step.
enum Step {
    Continue,
    Close,
}

/// Keeps the per-mailbox session count right however the session ends.
struct ActiveGuard {
    shared: Arc<Shared>,
    mailbox: String,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Some(u) = self.shared.usage().get_mut(&self.mailbox) {
            u.active_sessions = u.active_sessions.saturating_sub(1);
        }
    }
}

struct Authenticated {
    mailbox: String,
    appid: String,
    _guard: ActiveGuard,
}

struct Session {
    ctx: Arc<SmtpCtx>,
    peer: SocketAddr,
    id: String,
    tls: bool,
    helo: bool,
    auth: Option<Authenticated>,
    mail_from: Option<String>,
    /// The MAIL FROM parameters, as sent.
    mail_params: String,
    /// MAIL FROM carried SMTPUTF8: non-ASCII addresses are allowed in this transaction.
    smtputf8: bool,
    rcpts: Vec<String>,
    /// BDAT chunks so far (Some while a BDAT transfer is open).
    bdat: Option<Vec<u8>>,
    bdat_too_big: bool,
}

async fn run_session(ctx: Arc<SmtpCtx>, tcp: TcpStream, peer: SocketAddr) {
    let mut s = Session {
        ctx: ctx.clone(),
        peer,
        id: upper_hex(16),
        tls: false,
        helo: false,
        auth: None,
        mail_from: None,
        mail_params: String::new(),
        smtputf8: false,
        rcpts: Vec::new(),
        bdat: None,
        bdat_too_big: false,
    };
    let mut conn = Conn {
        stream: tcp,
        buf: Vec::new(),
    };
    if let Some(fault) = s.fault(SmtpStage::Greeting) {
        // Whatever the fault, a session without its banner cannot go on.
        let _ = s.apply_fault(&mut conn, fault).await;
        return;
    }
    let cfg = s.cfg();
    let banner = format!(
        "220 {} Microsoft ESMTP MAIL Service ready at {} [{}]",
        cfg.smtp.server_name,
        rfc2822_now(),
        s.id
    );
    if !conn.write(&banner).await {
        return;
    }
    if let Next::Close = s.command_loop(&mut conn).await {
        return;
    }
    // RFC 3207 §5: anything pipelined after STARTTLS is discarded (command injection).
    let idle = s.cfg().smtp.idle_timeout;
    let tls = match tokio::time::timeout(idle, ctx.tls.accept(conn.stream)).await {
        Ok(Ok(tls)) => tls,
        _ => return,
    };
    s.tls = true;
    s.helo = false;
    s.reset_transaction();
    let mut conn = Conn {
        stream: tls,
        buf: Vec::new(),
    };
    let _ = s.command_loop(&mut conn).await;
}

impl Session {
    fn cfg(&self) -> SimConfig {
        self.ctx.shared.config()
    }

    fn fault(&self, stage: SmtpStage) -> Option<SmtpFault> {
        self.ctx.shared.next_smtp_fault(stage)
    }

    /// Current-form diagnostic suffix: `[HOST 2023-09-12T20:59:57.214Z 08DBB276B7E699C4]`.
    fn suffix(&self, cfg: &SimConfig) -> String {
        format!("[{} {} {}]", cfg.smtp.server_name, iso_millis(), self.id)
    }

    fn mailbox_host(cfg: &SimConfig) -> String {
        format!("{}.namprd14.prod.outlook.com", cfg.smtp.mailbox_server)
    }

    fn reset_transaction(&mut self) {
        self.mail_from = None;
        self.mail_params.clear();
        self.smtputf8 = false;
        self.rcpts.clear();
        self.bdat = None;
        self.bdat_too_big = false;
    }

    /// Plays a scripted fault. `Continue` means a reply was sent and the session goes on.
    async fn apply_fault<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        fault: SmtpFault,
    ) -> Step {
        let cfg = self.cfg();
        let reply = match fault {
            SmtpFault::Reply421 => {
                let _ = conn
                    .write("421 4.3.2 Service not available, closing transmission channel")
                    .await;
                return Step::Close;
            }
            SmtpFault::Reply451 => {
                format!(
                    "451 4.7.0 Temporary server error. Please try again later. PRX4 {}",
                    self.suffix(&cfg)
                )
            }
            SmtpFault::Reply430 => format!(
                "430 4.2.0 STOREDRV; mailbox logon failure; STOREDRV.Submission.Exception:\
                 ConnectionFailedTransientException.MapiExceptionLogonFailed; Failed to process message due to a \
                 transient exception with message [BeginDiagnosticData]Cannot open mailbox. {} \
                 [Hostname={}]",
                diagnostic_blob(256),
                Self::mailbox_host(&cfg)
            ),
            SmtpFault::Reply { code, text } => {
                let line = format!("{code} {text}");
                if code == 421 {
                    let _ = conn.write(&line).await;
                    return Step::Close;
                }
                line
            }
            SmtpFault::Drop | SmtpFault::DropAfterAccept => return Step::Close,
            SmtpFault::Stall => {
                tokio::time::sleep(cfg.smtp.stall_duration).await;
                return Step::Close;
            }
        };
        if conn.write(&reply).await {
            Step::Continue
        } else {
            Step::Close
        }
    }

    async fn command_loop<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
    ) -> Next {
        loop {
            let cfg = self.cfg();
            let line = match conn.line(cfg.smtp.idle_timeout).await {
                Ok(line) => line,
                Err(ReadEnd::Idle) => {
                    let _ = conn
                        .write(&format!(
                            "451 4.7.0 Timeout waiting for client input {}",
                            self.suffix(&cfg)
                        ))
                        .await;
                    return Next::Close;
                }
                Err(ReadEnd::TooLong) => {
                    let _ = conn.write("500 5.5.6 Line too long").await;
                    return Next::Close;
                }
                Err(ReadEnd::Eof) => return Next::Close,
            };
            let (verb, args) = match line.split_once(' ') {
                Some((v, a)) => (v.to_ascii_uppercase(), a.trim().to_string()),
                None => (line.trim().to_ascii_uppercase(), String::new()),
            };
            let stage = match verb.as_str() {
                "EHLO" | "HELO" => Some(SmtpStage::Ehlo),
                "STARTTLS" => Some(SmtpStage::StartTls),
                "AUTH" => Some(SmtpStage::Auth),
                "MAIL" => Some(SmtpStage::Mail),
                "RCPT" => Some(SmtpStage::Rcpt),
                "DATA" => Some(SmtpStage::Data),
                "BDAT" if self.bdat.is_none() => Some(SmtpStage::Data),
                "RSET" => Some(SmtpStage::Rset),
                "QUIT" => Some(SmtpStage::Quit),
                _ => None,
            };
            if let Some(fault) = stage.and_then(|st| self.fault(st)) {
                if let Step::Close = self.apply_fault(conn, fault).await {
                    return Next::Close;
                }
                if stage == Some(SmtpStage::Data) {
                    // A refused DATA/BDAT ends the transaction; a refused BDAT's chunk still has to be skipped.
                    if verb == "BDAT"
                        && let Some(n) = parse_bdat(&args).map(|(n, _)| n)
                        && self.skip_bytes(conn, n, &cfg).await.is_err()
                    {
                        return Next::Close;
                    }
                    self.reset_transaction();
                }
                continue;
            }
            let step = match verb.as_str() {
                "EHLO" => self.ehlo(conn, &cfg, &args, true).await,
                "HELO" => self.ehlo(conn, &cfg, &args, false).await,
                "STARTTLS" => {
                    if self.tls {
                        self.reply(conn, "503 5.5.1 Bad sequence of commands").await
                    } else if !args.is_empty() {
                        self.reply(conn, "501 5.5.4 Invalid arguments").await
                    } else {
                        if !conn.write("220 2.0.0 SMTP server ready").await {
                            return Next::Close;
                        }
                        return Next::StartTls;
                    }
                }
                "AUTH" => self.auth(conn, &cfg, &args).await,
                "MAIL" => self.mail(conn, &cfg, &args).await,
                "RCPT" => self.rcpt(conn, &cfg, &args).await,
                "DATA" => self.data(conn, &cfg, &args).await,
                "BDAT" => self.bdat(conn, &cfg, &args).await,
                "RSET" => {
                    self.reset_transaction();
                    self.reply(conn, "250 2.0.0 Resetting").await
                }
                "NOOP" => self.reply(conn, "250 2.0.0 OK").await,
                "QUIT" => {
                    let _ = conn
                        .write("221 2.0.0 Service closing transmission channel")
                        .await;
                    return Next::Close;
                }
                _ => {
                    let shown = if verb.is_empty() {
                        line.clone()
                    } else {
                        verb.clone()
                    };
                    let text = format!(
                        "500 5.3.3 Unrecognized command '{shown}' {}",
                        self.suffix(&cfg)
                    );
                    self.reply(conn, &text).await
                }
            };
            if let Step::Close = step {
                return Next::Close;
            }
        }
    }

    async fn reply<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut Conn<S>,
        text: &str,
    ) -> Step {
        if conn.write(text).await {
            Step::Continue
        } else {
            Step::Close
        }
    }
}

pub(super) fn tenant_disabled_text() -> String {
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit \
     https://aka.ms/smtp_auth_disabled for more information."
        .to_string()
}
