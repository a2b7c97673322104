//! Simulated Exchange Online client submission (reference §2, §3, checklist §7): banner and EHLO lists as
//! recorded, STARTTLS, AUTH XOAUTH2 (two-step and inline), the permission model, per-mailbox limits, the
//! end-of-DATA checks and scripted faults. Commands are parsed here (not with the relay's code); message bodies
//! go through smtp-proto's `DataReceiver`, primed with CRLF so a first-line dot is seen.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine;
use smtp_proto::request::receiver::{DataReceiver, DummyDataReceiver};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::config::{RateMode, SEND_AS_APP_ROLE, SendAsReply, SimConfig};
use super::control::{Shared, SmtpFault, SmtpStage};
use super::mailbox::{Envelope, Mailbox};
use super::token::verify_access_token;
use super::util::{iso_millis, rfc2822_now, upper_hex};

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

    async fn ehlo<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        cfg: &SimConfig,
        host: &str,
        extended: bool,
    ) -> Step {
        if host.is_empty() {
            return self.reply(conn, "501 5.5.4 Invalid domain name").await;
        }
        self.reset_transaction();
        self.helo = true;
        let hello = format!("{} Hello [{}]", cfg.smtp.server_name, self.peer.ip());
        if !extended {
            return self.reply(conn, &format!("250 {hello}")).await;
        }
        // Exactly the recorded lists: STARTTLS before TLS, `AUTH LOGIN XOAUTH2` after it.
        let mut caps = vec![
            hello,
            format!("SIZE {}", cfg.smtp.advertised_size),
            "PIPELINING".into(),
            "DSN".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        caps.push(if self.tls {
            "AUTH LOGIN XOAUTH2".into()
        } else {
            "STARTTLS".into()
        });
        caps.extend(["8BITMIME", "BINARYMIME", "CHUNKING", "SMTPUTF8"].map(String::from));
        let last = caps.len() - 1;
        let text = caps
            .iter()
            .enumerate()
            .map(|(i, c)| format!("250{}{c}", if i == last { ' ' } else { '-' }))
            .collect::<Vec<_>>()
            .join("\r\n");
        self.reply(conn, &text).await
    }

    /// Reads one SASL continuation line; `None` when the connection is gone.
    async fn sasl_line<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut Conn<S>,
        cfg: &SimConfig,
        challenge: &str,
    ) -> Option<String> {
        if !conn.write(challenge).await {
            return None;
        }
        match conn.line(cfg.smtp.idle_timeout).await {
            Ok(l) => Some(l),
            Err(ReadEnd::Idle) => {
                let _ = conn
                    .write(&format!(
                        "451 4.7.0 Timeout waiting for client input {}",
                        self.suffix(cfg)
                    ))
                    .await;
                None
            }
            Err(_) => None,
        }
    }

    async fn auth<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        cfg: &SimConfig,
        args: &str,
    ) -> Step {
        let mut parts = args.split_whitespace();
        let mechanism = parts.next().unwrap_or_default().to_ascii_uppercase();
        let initial = parts.next().map(str::to_string);
        if !self.tls || !(mechanism == "XOAUTH2" || mechanism == "LOGIN") {
            // Before TLS no AUTH is advertised at all; PLAIN and others are never offered.
            return self
                .reply(
                    conn,
                    &format!(
                        "504 5.7.4 Unrecognized authentication type {}",
                        self.suffix(cfg)
                    ),
                )
                .await;
        }
        if !self.helo {
            return self.reply(conn, "503 5.5.1 Bad sequence of commands").await;
        }
        if self.auth.is_some() {
            return self.reply(conn, "503 5.5.1 Bad sequence of commands").await;
        }
        if mechanism == "LOGIN" {
            // Basic authentication: read both prompts' answers, then refuse.
            for prompt in ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6"] {
                match self.sasl_line(conn, cfg, prompt).await {
                    None => return Step::Close,
                    Some(l) if l.trim() == "*" => {
                        return self.reply(conn, "501 5.0.0 Authentication cancelled").await;
                    }
                    Some(_) => {}
                }
            }
            // Since the Basic retirement Exchange refuses Basic outright (reference §2.5, [DOC]).
            let text = if cfg.smtp.smtp_auth_disabled {
                tenant_disabled_text()
            } else {
                "550 5.7.30 Basic authentication is not supported for Client Submission."
                    .to_string()
            };
            return self
                .reply(conn, &format!("{text} {}", self.suffix(cfg)))
                .await;
        }
        let blob = match initial {
            Some(ir) if ir != "=" => ir,
            _ => match self.sasl_line(conn, cfg, "334 ").await {
                None => return Step::Close,
                Some(l) => l.trim().to_string(),
            },
        };
        if blob == "*" {
            return self.reply(conn, "501 5.0.0 Authentication cancelled").await;
        }
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(blob.as_bytes()) else {
            return self.reply(conn, "501 5.5.4 Invalid arguments").await;
        };
        match self.check_xoauth2(cfg, &raw) {
            Ok(auth) => {
                self.auth = Some(auth);
                self.reply(conn, "235 2.7.0 Authentication successful")
                    .await
            }
            Err(text) => {
                self.reply(conn, &format!("{text} {}", self.suffix(cfg)))
                    .await
            }
        }
    }

    /// The permission model of §1.7 and §2.4. Err carries the reply without its suffix.
    fn check_xoauth2(&self, cfg: &SimConfig, raw: &[u8]) -> Result<Authenticated, String> {
        let generic = || "535 5.7.3 Authentication unsuccessful".to_string();
        let text = String::from_utf8_lossy(raw);
        let mut user = None;
        let mut bearer = None;
        for field in text.split('\x01') {
            if let Some(u) = field.strip_prefix("user=") {
                user = Some(u.trim().to_string());
            } else if let Some(a) = field.strip_prefix("auth=")
                // `get` rather than slicing: the blob is client data and may split a UTF-8 character.
                && a.get(..7).is_some_and(|p| p.eq_ignore_ascii_case("bearer "))
                && let Some(t) = a.get(7..)
            {
                bearer = Some(t.trim().to_string());
            }
        }
        let (Some(user), Some(token)) = (user, bearer) else {
            return Err(generic());
        };
        let identity = verify_access_token(&self.ctx.shared, cfg, &token).ok_or_else(generic)?;
        let client = cfg.client(&identity.appid).ok_or_else(generic)?;
        if !client.exchange_service_principal {
            return Err(generic());
        }
        let has_role = identity
            .roles
            .as_ref()
            .is_some_and(|r| r.iter().any(|x| x == SEND_AS_APP_ROLE));
        if !cfg.smtp.rbac_mode && !has_role {
            return Err(generic());
        }
        let mailbox = cfg
            .mailbox(&user)
            .filter(|m| m.full_access)
            .ok_or_else(generic)?;
        if cfg.smtp.smtp_auth_disabled {
            return Err(tenant_disabled_text());
        }
        if mailbox.smtp_auth_disabled {
            return Err("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the \
                        Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information."
                .to_string());
        }
        let key = mailbox.address.to_ascii_lowercase();
        self.ctx
            .shared
            .usage()
            .entry(key.clone())
            .or_default()
            .active_sessions += 1;
        Ok(Authenticated {
            mailbox: key.clone(),
            appid: identity.appid,
            _guard: ActiveGuard {
                shared: self.ctx.shared.clone(),
                mailbox: key,
            },
        })
    }

    async fn mail<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        cfg: &SimConfig,
        args: &str,
    ) -> Step {
        if !self.helo {
            return self.reply(conn, "503 5.5.1 Bad sequence of commands").await;
        }
        let Some(auth) = &self.auth else {
            return self
                .reply(
                    conn,
                    &format!(
                        "530 5.7.57 Client not authenticated to send mail {}",
                        self.suffix(cfg)
                    ),
                )
                .await;
        };
        if self.mail_from.is_some() {
            return self.reply(conn, "503 5.5.2 Sender already specified").await;
        }
        let threshold = cfg.smtp.continuous_error_threshold;
        let throttled = threshold > 0
            && self
                .ctx
                .shared
                .usage()
                .get(&auth.mailbox)
                .is_some_and(|u| u.send_as_denials >= threshold);
        if throttled {
            let text = format!(
                "550 5.2.252 Sender throttled due to continuous send as denied errors. {}",
                self.suffix(cfg)
            );
            return self.reply(conn, &text).await;
        }
        let Some((address, params)) = parse_path(args, "FROM:") else {
            return self.reply(conn, "501 5.5.4 Invalid arguments").await;
        };
        for p in params.split_whitespace() {
            if let Some(size) = p.to_ascii_uppercase().strip_prefix("SIZE=") {
                match size.parse::<u64>() {
                    Ok(n) if n > cfg.smtp.advertised_size => {
                        return self
                            .reply(
                                conn,
                                "552 5.3.4 Message size exceeds fixed maximum message size",
                            )
                            .await;
                    }
                    Ok(_) => {}
                    Err(_) => return self.reply(conn, "501 5.5.4 Invalid arguments").await,
                }
            }
        }
        self.mail_from = Some(address);
        self.reply(conn, "250 2.1.0 Sender OK").await
    }

    async fn rcpt<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        cfg: &SimConfig,
        args: &str,
    ) -> Step {
        if self.mail_from.is_none() {
            return self.reply(conn, "503 5.5.2 Need mail command").await;
        }
        let Some((address, _)) = parse_path(args, "TO:").filter(|(a, _)| !a.is_empty()) else {
            return self.reply(conn, "501 5.5.4 Invalid arguments").await;
        };
        if self.rcpts.len() >= cfg.smtp.max_recipients {
            return self.reply(conn, "452 4.5.3 Too many recipients").await;
        }
        self.rcpts.push(address);
        self.reply(conn, "250 2.1.5 Recipient OK").await
    }

    /// Sequence checks shared by DATA and BDAT; `Some(reply)` refuses the command.
    fn transfer_refusal(&self, cfg: &SimConfig) -> Option<String> {
        if self.auth.is_none() {
            Some(format!(
                "530 5.7.57 Client not authenticated to send mail {}",
                self.suffix(cfg)
            ))
        } else if self.mail_from.is_none() {
            Some("503 5.5.2 Need mail command".into())
        } else if self.rcpts.is_empty() {
            Some("503 5.5.2 Need rcpt command".into())
        } else {
            None
        }
    }

    async fn data<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        cfg: &SimConfig,
        args: &str,
    ) -> Step {
        if !args.is_empty() {
            return self.reply(conn, "501 5.5.4 Invalid arguments").await;
        }
        if self.bdat.is_some() {
            return self.reply(conn, "503 5.5.1 Bad sequence of commands").await;
        }
        if let Some(refusal) = self.transfer_refusal(cfg) {
            return self.reply(conn, &refusal).await;
        }
        if !conn
            .write("354 Start mail input; end with <CRLF>.<CRLF>")
            .await
        {
            return Step::Close;
        }
        if let Some(fault) = self.fault(SmtpStage::DataBody) {
            match fault {
                SmtpFault::Drop | SmtpFault::DropAfterAccept => {
                    // Wait for the body to start, then vanish before the final dot is answered.
                    if conn.buf.is_empty() {
                        let _ = conn.fill(cfg.smtp.idle_timeout).await;
                    }
                    return Step::Close;
                }
                SmtpFault::Stall => {
                    tokio::time::sleep(cfg.smtp.stall_duration).await;
                    return Step::Close;
                }
                other => {
                    // A reply fault here answers the final dot.
                    if self.read_data(conn, cfg).await.is_err() {
                        return Step::Close;
                    }
                    self.reset_transaction();
                    return self.apply_fault(conn, other).await;
                }
            }
        }
        let (message, too_big) = match self.read_data(conn, cfg).await {
            Ok(m) => m,
            Err(ReadEnd::Idle) => {
                let _ = conn
                    .write(&format!(
                        "451 4.7.0 Timeout waiting for client input {}",
                        self.suffix(cfg)
                    ))
                    .await;
                return Step::Close;
            }
            Err(_) => return Step::Close,
        };
        self.end_of_data(conn, cfg, message, "DATA", too_big).await
    }

    /// Reads a dot-terminated body; bodies beyond the advertised SIZE are drained and flagged.
    async fn read_data<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut Conn<S>,
        cfg: &SimConfig,
    ) -> Result<(Vec<u8>, bool), ReadEnd> {
        let mut rx = DataReceiver::new();
        let mut scratch = Vec::new();
        // smtp-proto pitfall: without a CRLF primer a dot on the first line is not recognised.
        rx.ingest(&mut b"\r\n".iter(), &mut scratch);
        let mut message = Vec::new();
        let mut dummy: Option<DummyDataReceiver> = None;
        loop {
            if !conn.buf.is_empty() {
                let mut it = conn.buf.iter();
                let done = match dummy.as_mut() {
                    Some(d) => d.ingest(&mut it),
                    None => rx.ingest(&mut it, &mut message),
                };
                let consumed = conn.buf.len() - it.len();
                conn.buf.drain(..consumed);
                if done {
                    return Ok((message, dummy.is_some()));
                }
                if dummy.is_none() && message.len() as u64 > cfg.smtp.advertised_size {
                    dummy = Some(DummyDataReceiver::new_data(&rx));
                    message = Vec::new();
                }
            }
            conn.fill(cfg.smtp.idle_timeout).await?;
        }
    }

    /// Consumes exactly `n` bytes (a BDAT chunk), keeping them unless `keep` is None.
    async fn take_bytes<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut Conn<S>,
        mut n: usize,
        cfg: &SimConfig,
        mut keep: Option<&mut Vec<u8>>,
    ) -> Result<(), ReadEnd> {
        loop {
            let take = n.min(conn.buf.len());
            if let Some(k) = keep.as_deref_mut() {
                k.extend_from_slice(&conn.buf[..take]);
            }
            conn.buf.drain(..take);
            n -= take;
            if n == 0 {
                return Ok(());
            }
            conn.fill(cfg.smtp.idle_timeout).await?;
        }
    }

    async fn skip_bytes<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut Conn<S>,
        n: usize,
        cfg: &SimConfig,
    ) -> Result<(), ReadEnd> {
        self.take_bytes(conn, n, cfg, None).await
    }

    async fn bdat<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        cfg: &SimConfig,
        args: &str,
    ) -> Step {
        let Some((size, last)) = parse_bdat(args) else {
            return self.reply(conn, "501 5.5.4 Invalid arguments").await;
        };
        if let Some(refusal) = self.transfer_refusal(cfg) {
            // The chunk follows the command regardless; skip it so the next command parses.
            if self.skip_bytes(conn, size, cfg).await.is_err() {
                return Step::Close;
            }
            return self.reply(conn, &refusal).await;
        }
        let mut chunks = self.bdat.take().unwrap_or_default();
        let too_big = self.bdat_too_big || (chunks.len() + size) as u64 > cfg.smtp.advertised_size;
        let keep = if too_big { None } else { Some(&mut chunks) };
        match self.take_bytes(conn, size, cfg, keep).await {
            Ok(()) => {}
            Err(ReadEnd::Idle) => {
                let _ = conn
                    .write(&format!(
                        "451 4.7.0 Timeout waiting for client input {}",
                        self.suffix(cfg)
                    ))
                    .await;
                return Step::Close;
            }
            Err(_) => return Step::Close,
        }
        if too_big {
            chunks.clear();
        }
        self.bdat_too_big = too_big;
        if !last {
            self.bdat = Some(chunks);
            return self
                .reply(conn, &format!("250 2.0.0 {size} bytes received"))
                .await;
        }
        self.end_of_data(conn, cfg, chunks, "BDAT", too_big).await
    }

    /// The checks Exchange makes once the whole message is in, then store and 250 with a queue id.
    /// `too_big`: the body went past the advertised SIZE (it was drained, not kept).
    async fn end_of_data<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        cfg: &SimConfig,
        message: Vec<u8>,
        transfer: &str,
        too_big: bool,
    ) -> Step {
        if too_big {
            self.reset_transaction();
            return self
                .reply(
                    conn,
                    "552 5.3.4 Message size exceeds fixed maximum message size",
                )
                .await;
        }
        let mail_from = self.mail_from.take().unwrap_or_default();
        let rcpts = std::mem::take(&mut self.rcpts);
        self.reset_transaction();
        let Some(auth) = &self.auth else {
            return self.reply(conn, "503 5.5.1 Bad sequence of commands").await;
        };
        let (mailbox, appid) = (auth.mailbox.clone(), auth.appid.clone());
        let id = format!("{}{}", cfg.smtp.mailbox_server, upper_hex(25));
        let envelope = Envelope {
            id: id.clone(),
            seq: 0,
            received_at: 0,
            auth_user: mailbox.clone(),
            client_id: appid,
            mail_from: mail_from.clone(),
            rcpt_to: rcpts.clone(),
            transfer: transfer.to_string(),
            size: 0,
        };

        let mut keep_then_drop = false;
        if let Some(fault) = self.fault(SmtpStage::DataEnd) {
            match fault {
                SmtpFault::DropAfterAccept => keep_then_drop = true,
                other => return self.apply_fault(conn, other).await,
            }
        }

        if !keep_then_drop {
            if let Some(reply) = self.content_checks(cfg, &message, &mail_from, &mailbox, transfer)
            {
                return self.reply(conn, &reply).await;
            }
            match self.limit_checks(cfg, &mailbox, rcpts.len()).await {
                Ok(()) => {}
                Err(reply) => return self.reply(conn, &reply).await,
            }
        }
        if let Err(e) = self.ctx.mailbox.store(envelope, &message).await {
            tracing::warn!(error = %e, "simulator could not store a message");
            let reply = format!(
                "451 4.7.0 Temporary server error. Please try again later. PRX4 {}",
                self.suffix(cfg)
            );
            return self.reply(conn, &reply).await;
        }
        {
            let mut usage = self.ctx.shared.usage();
            let u = usage.entry(mailbox).or_default();
            let now = Instant::now();
            u.accepted.push_back(now);
            u.recipients.push_back((now, rcpts.len()));
        }
        if keep_then_drop {
            return Step::Close;
        }
        let host = Self::mailbox_host(cfg);
        self.reply(
            conn,
            &format!("250 2.0.0 OK <{id}@{host}> [Hostname={host}]"),
        )
        .await
    }

    /// Bare LF, size, header length and SendAs; `Some(reply)` refuses the message.
    fn content_checks(
        &self,
        cfg: &SimConfig,
        message: &[u8],
        mail_from: &str,
        mailbox: &str,
        transfer: &str,
    ) -> Option<String> {
        let host = Self::mailbox_host(cfg);
        if transfer == "DATA" && has_bare_lf(message) {
            return Some(format!(
                "550 5.6.11 SMTPSEND.BareLinefeedsAreIllegal; message contains bare linefeeds, which cannot be sent \
                 via DATA {}",
                self.suffix(cfg)
            ));
        }
        if message.len() as u64 > cfg.smtp.max_send_size {
            return Some(format!(
                "554 5.2.0 MapiExceptionMaxSubmissionExceeded; Message size exceeds maximum size limit.; \
                 STOREDRV.Submission.Exception:MessageSubmissionExceededException.MapiExceptionMaxSubmissionExceeded; \
                 Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot save \
                 changes made to an item to store. {} [Hostname={host}]",
                diagnostic_blob(128)
            ));
        }
        let headers = parse_headers(message);
        if let Some((name, value)) = headers.iter().find(|(_, v)| v.len() > MAX_HEADER_VALUE) {
            return Some(format!(
                "554 5.6.211 Invalid MIME Content: Single text value size ({}) exceeded allowed maximum ({MAX_HEADER_VALUE}) \
                 for the '{name}' header. [Hostname={host}]",
                value.len()
            ));
        }
        let header_from = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("from"))
            .and_then(|(_, v)| extract_address(v));
        let allowed = |addr: &str| {
            addr.eq_ignore_ascii_case(mailbox)
                || cfg
                    .mailbox(mailbox)
                    .is_some_and(|m| m.send_as.iter().any(|a| a.eq_ignore_ascii_case(addr)))
        };
        let denied = header_from.as_deref().filter(|a| !allowed(a)).or_else(|| {
            // Envelope sender too: `<>` is fine (Exchange submits from the mailbox anyway).
            Some(mail_from).filter(|a| !a.is_empty() && !allowed(a))
        });
        let mut usage = self.ctx.shared.usage();
        let u = usage.entry(mailbox.to_string()).or_default();
        let Some(denied) = denied else {
            u.send_as_denials = 0;
            return None;
        };
        u.send_as_denials += 1;
        Some(match cfg.smtp.send_as_reply {
            SendAsReply::Code5760 => {
                format!(
                    "550 5.7.60 SMTP; Client does not have permissions to send as this sender {}",
                    self.suffix(cfg)
                )
            }
            SendAsReply::Code52252 => format!(
                "554 5.2.252 SendAsDenied; {mailbox} not allowed to send as {denied}; \
                 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process \
                 message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message. {} \
                 [Hostname={host}]",
                diagnostic_blob(4096)
            ),
        })
    }

    /// Concurrency, message rate and the 24 h recipient quota (§3).
    async fn limit_checks(
        &self,
        cfg: &SimConfig,
        mailbox: &str,
        rcpt_count: usize,
    ) -> Result<(), String> {
        let host = Self::mailbox_host(cfg);
        let day = Duration::from_secs(24 * 3600);
        // Delay mode waits at most a few windows; each pass re-reads the usage.
        for _ in 0..8 {
            let wait = {
                let mut usage = self.ctx.shared.usage();
                let u = usage.entry(mailbox.to_string()).or_default();
                if u.active_sessions > cfg.smtp.connections_per_mailbox {
                    return Err(format!(
                        "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [Hostname={host}]"
                    ));
                }
                let now = Instant::now();
                while u
                    .recipients
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) >= day)
                {
                    u.recipients.pop_front();
                }
                let used: usize = u.recipients.iter().map(|(_, n)| n).sum();
                if used + rcpt_count > cfg.smtp.recipients_per_day {
                    return Err(format!(
                        "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException.\
                         MapiExceptionQuotaExceeded; Failed to process message due to a permanent exception with \
                         message Cannot submit message. [Hostname={host}]"
                    ));
                }
                let window = cfg.smtp.rate_window;
                while u
                    .accepted
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= window)
                {
                    u.accepted.pop_front();
                }
                if u.accepted.len() < cfg.smtp.messages_per_window {
                    return Ok(());
                }
                match cfg.smtp.rate_mode {
                    RateMode::Reject => {
                        return Err(format!(
                            "432 4.3.2 STOREDRV.ClientSubmit; sender submission rate exceeded [Hostname={host}]"
                        ));
                    }
                    RateMode::Delay => {
                        let oldest = u.accepted.front().copied().unwrap_or(now);
                        window.saturating_sub(now.duration_since(oldest)) + Duration::from_millis(1)
                    }
                }
            };
            tokio::time::sleep(wait).await;
        }
        Err(format!(
            "432 4.3.2 STOREDRV.ClientSubmit; sender submission rate exceeded [Hostname={host}]"
        ))
    }
}

fn tenant_disabled_text() -> String {
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit \
     https://aka.ms/smtp_auth_disabled for more information."
        .to_string()
}

/// `FROM:<addr> params` / `TO:<addr> params` → (addr, params). Tolerates a space after the colon.
fn parse_path(args: &str, keyword: &str) -> Option<(String, String)> {
    // `get` rather than slicing: a non-ASCII argument must not split a character.
    if !args.get(..keyword.len())?.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = args.get(keyword.len()..)?.trim_start();
    let rest = rest.strip_prefix('<')?;
    let end = rest.find('>')?;
    let address = rest[..end].trim().to_string();
    // A source route (`@a,@b:user@x`) is legal but obsolete; keep only the mailbox.
    let address = match address.rsplit_once(':') {
        Some((route, addr)) if route.starts_with('@') => addr.to_string(),
        _ => address,
    };
    Some((address, rest[end + 1..].trim().to_string()))
}

/// `BDAT <size> [LAST]`.
fn parse_bdat(args: &str) -> Option<(usize, bool)> {
    let mut parts = args.split_whitespace();
    let size = parts.next()?.parse().ok()?;
    let last = match parts.next() {
        None => false,
        Some(l) if l.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some((size, last))
}

fn has_bare_lf(data: &[u8]) -> bool {
    data.iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || data[i - 1] != b'\r'))
}

/// Unfolded header fields (name, value) up to the first empty line.
fn parse_headers(message: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(message);
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = out.last_mut() {
                v.push_str(line);
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            out.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    out
}

/// The address in a From value: inside `<...>`, else the bare addr-spec.
fn extract_address(value: &str) -> Option<String> {
    if let (Some(start), Some(end)) = (value.rfind('<'), value.rfind('>'))
        && start < end
    {
        return Some(value[start + 1..end].trim().to_string());
    }
    let bare = value.split(',').next()?.trim();
    bare.contains('@').then(|| bare.to_string())
}

/// The hex diagnostic blob Exchange appends to storage-driver errors (kilobytes in real life).
fn diagnostic_blob(len: usize) -> String {
    let mut s = String::with_capacity(len + 32);
    while s.len() < len {
        s.push_str(&upper_hex(32));
    }
    s.truncate(len);
    format!("{s}[EndDiagnosticData]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            parse_path("FROM:<a@b.c> SIZE=10", "FROM:"),
            Some(("a@b.c".into(), "SIZE=10".into()))
        );
        assert_eq!(
            parse_path("from: <>", "FROM:"),
            Some((String::new(), String::new()))
        );
        assert_eq!(
            parse_path("TO:<@r:x@y>", "TO:"),
            Some(("x@y".into(), String::new()))
        );
        assert_eq!(parse_path("FROM:a@b", "FROM:"), None);
        assert_eq!(parse_path("FRÖM:<a@b>", "FROM:"), None);
        assert_eq!(parse_path("TO", "TO:"), None);
    }

    #[test]
    fn headers_and_from() {
        let m = b"From: \"A, B\" <a@b.c>\r\nSubject: x\r\n  y\r\n\r\nFrom: body@x\r\n";
        let h = parse_headers(m);
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].1, "x  y");
        assert_eq!(extract_address(&h[0].1).as_deref(), Some("a@b.c"));
        assert_eq!(extract_address("plain@x.y").as_deref(), Some("plain@x.y"));
    }

    #[test]
    fn bare_lf() {
        assert!(!has_bare_lf(b"a\r\nb\r\n"));
        assert!(has_bare_lf(b"a\nb\r\n"));
        assert!(has_bare_lf(b"\n"));
    }

    #[test]
    fn bdat_args() {
        assert_eq!(parse_bdat("10 LAST"), Some((10, true)));
        assert_eq!(parse_bdat("10"), Some((10, false)));
        assert_eq!(parse_bdat("x"), None);
        assert_eq!(parse_bdat("1 LAST x"), None);
    }
}
