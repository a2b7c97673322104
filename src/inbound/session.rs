//! One SMTP session: reads the client's bytes, feeds them to the receiver of the current state
//! (command line, DATA, BDAT chunk, SASL line), and writes the replies. Verb handlers live in
//! `commands.rs`, `data.rs` and `auth.rs`; they only append replies and change state.
//!
//! Replies are batched per read and flushed before the next read, which is what PIPELINING
//! (RFC 2920) needs: commands are handled in order, none is discarded, replies go out together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use smtp_proto::request::receiver::{BdatReceiver, DummyLineReceiver, LineReceiver};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::auth::SaslStep;
use super::framing::{DataDecoder, LineEnds};
use super::message::MessageWriter;
use super::reply::{self, Reply};

/// Longest command line accepted, CRLF included. RFC 5321 §4.5.3.1.4 sets 512 octets as the
/// minimum and lets extensions raise it; AUTH initial responses (RFC 4954 §4) need more.
pub const MAX_COMMAND_LINE: usize = smtp_proto::request::receiver::MAX_LINE_LENGTH;

/// What the connection loop does after a call to [`Session::drive`].
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Close,
    /// Upgrade the stream to TLS, then drive the session again (RFC 3207).
    StartTls,
}

/// The envelope being collected between MAIL and the end of DATA/BDAT.
#[derive(Debug, Default)]
pub struct Transaction {
    pub mail_from: String,
    pub mail_flags: u64,
    pub env_id: Option<String>,
    pub recipients: Vec<crate::spool::Recipient>,
    /// The route chosen at MAIL FROM ([`crate::routes`]), stored with the message.
    pub route: String,
    /// The largest message this transaction's route takes (Graph's is smaller than SMTP's).
    pub size_limit: u64,
    /// Set once BDAT started: the message being received chunk by chunk.
    pub bdat: Option<BdatTransfer>,
}

#[derive(Default)]
pub struct BdatTransfer {
    /// `None` once the transfer failed; the reply to give at `LAST`.
    pub writer: Option<MessageWriter>,
    pub failure: Option<Reply>,
    /// Bare CR/LF normalisation across chunks (a CR ending one chunk waits for the next).
    pub line_ends: LineEnds,
}

impl std::fmt::Debug for BdatTransfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BdatTransfer")
            .field("failure", &self.failure)
            .finish()
    }
}

pub enum State {
    /// Collecting a command line: the bytes of it received so far.
    Command(Vec<u8>),
    /// Skipping the rest of a command line longer than [`MAX_COMMAND_LINE`].
    LineTooLong(DummyLineReceiver),
    Data {
        decoder: DataDecoder,
        writer: Box<MessageWriter>,
    },
    /// Reading to the end of DATA (or of a BDAT chunk) whose content is refused with `reply`.
    SkipData {
        skip: Skip,
        reply: Reply,
    },
    Bdat {
        receiver: BdatReceiver,
    },
    Sasl(LineReceiver<SaslStep>),
}

/// What a refused transfer still has to read to stay in step with the client.
pub enum Skip {
    /// DATA: up to the end marker, found by the same decoder as accepted data.
    Data(DataDecoder),
    /// BDAT: the rest of the announced chunk.
    Bdat(usize),
}

impl State {
    pub fn command() -> State {
        State::Command(Vec::new())
    }
}

pub struct Session {
    pub(super) shared: Arc<Shared>,
    pub(super) peer: SocketAddr,
    pub(super) helo: Option<String>,
    pub(super) esmtp: bool,
    pub(super) tls: bool,
    pub(super) auth_user: Option<String>,
    pub(super) tx: Option<Transaction>,
    pub(super) state: State,
    errors: u32,
    out: Vec<u8>,
    next: Option<Next>,
    /// A `250 queued as` is in `out` (for the `after-250` failpoint).
    pub(super) acked: bool,
    /// While a message transfer is read: when it is cut off (see [`Session::drive`]).
    transfer_deadline: Option<Instant>,
    /// An in-process session for the drop directory: its files were written by local users,
    /// whom `smtp.auth` does not ask for a password (sendmail has none to give).
    pub(super) local: bool,
    /// The configured address of the listener the client connected to (routes match on it);
    /// `None` for the drop directory and in-memory sessions.
    pub(super) listener: Option<SocketAddr>,
}

impl Session {
    pub fn new(shared: Arc<Shared>, peer: SocketAddr) -> Session {
        Session {
            shared,
            peer,
            helo: None,
            esmtp: false,
            tls: false,
            auth_user: None,
            tx: None,
            state: State::command(),
            errors: 0,
            out: Vec::with_capacity(1024),
            next: None,
            acked: false,
            transfer_deadline: None,
            local: false,
            listener: None,
        }
    }

    /// The session came in on the listener configured as `address`.
    pub fn on_listener(&mut self, address: SocketAddr) {
        self.listener = Some(address);
    }

    /// Marks the session as the drop directory's (see [`super::local::LocalSubmitter`]).
    pub fn local_submission(&mut self) {
        self.local = true;
    }

    pub fn greeting(&mut self) {
        let text = format!(
            "{} ESMTP smtp-oauth-relay ready",
            self.shared.settings.hostname
        );
        self.out
            .extend_from_slice(format!("220 {text}\r\n").as_bytes());
    }

    /// After the TLS handshake: forget everything learnt before it (RFC 3207 §4.2).
    pub fn tls_established(&mut self) {
        self.tls = true;
        self.helo = None;
        self.esmtp = false;
        self.auth_user = None;
        self.tx = None;
        self.state = State::command();
        self.next = None;
    }

    pub fn reply(&mut self, reply: Reply) {
        reply.write_to(&mut self.out);
        if reply.is_error() {
            tracing::info!(
                client = %self.peer,
                reply = %format_args!("{} {} {}", reply.code, reply.status, reply.text),
                "refused"
            );
            self.shared.metrics.refused(reply.status);
            self.errors += 1;
            if self.errors >= self.shared.settings.max_errors && self.next.is_none() {
                tracing::info!(client = %self.peer, errors = self.errors, "disconnecting client after too many errors");
                reply::TOO_MANY_ERRORS.write_to(&mut self.out);
                self.next = Some(Next::Close);
            }
        }
    }

    pub(super) fn reply_raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    pub(super) fn close_after_reply(&mut self) {
        self.next = Some(Next::Close);
    }

    pub(super) fn closing(&self) -> bool {
        self.next == Some(Next::Close)
    }

    pub(super) fn start_tls_after_reply(&mut self) {
        self.next = Some(Next::StartTls);
    }

    /// Between commands with no message transfer under way: safe to close on shutdown.
    fn at_command_boundary(&self) -> bool {
        matches!(self.state, State::Command(_) | State::LineTooLong(_))
            && self.tx.as_ref().is_none_or(|tx| tx.bdat.is_none())
    }

    fn in_message_transfer(&self) -> bool {
        matches!(
            self.state,
            State::Data { .. } | State::SkipData { .. } | State::Bdat { .. }
        )
    }

    /// Runs the session on `stream` until it ends or asks for STARTTLS.
    pub async fn drive<S>(
        &mut self,
        stream: &mut S,
        shutdown: &CancellationToken,
    ) -> std::io::Result<Next>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let write_timeout = self.shared.settings.write_timeout;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if !self.out.is_empty() {
                // Every write is bounded: a client that pipelines and never reads its replies
                // would otherwise hold its connection slot for as long as it likes.
                let out = &self.out;
                let written = tokio::time::timeout(write_timeout, async {
                    stream.write_all(out).await?;
                    stream.flush().await
                })
                .await;
                let result = written.unwrap_or_else(|_| {
                    tracing::info!(
                        client = %self.peer,
                        "dropping a client that does not read its replies (smtp.write_timeout)"
                    );
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "client does not read its replies",
                    ))
                });
                if let Err(e) = result {
                    self.abort_transfer().await;
                    return Err(e);
                }
                self.out.clear();
                if std::mem::take(&mut self.acked) {
                    crate::failpoint::hit("after-250");
                }
            }
            if let Some(next) = self.next.take() {
                return Ok(next);
            }
            let (limit, rate_bound) = self.read_limit();
            let in_transfer = self.transfer_deadline.is_some();
            let idle = self.at_command_boundary();
            let n = tokio::select! {
                read = tokio::time::timeout(limit, stream.read(&mut buf)) => match read {
                    Err(_) => {
                        self.abort_transfer().await;
                        if rate_bound {
                            tracing::info!(
                                client = %self.peer,
                                "closing connection: message data below smtp.min_data_rate"
                            );
                            self.reply(reply::TOO_SLOW);
                        } else {
                            tracing::info!(client = %self.peer, "closing idle connection: timeout");
                            self.reply(reply::TIMEOUT);
                        }
                        self.next = Some(Next::Close);
                        continue;
                    }
                    Ok(Ok(0)) => {
                        self.abort_transfer().await;
                        return Ok(Next::Close);
                    }
                    Ok(Ok(n)) => {
                        if in_transfer {
                            self.credit(n);
                        }
                        n
                    }
                    Ok(Err(e)) => {
                        self.abort_transfer().await;
                        return Err(e);
                    }
                },
                _ = shutdown.cancelled(), if idle => {
                    self.abort_transfer().await;
                    self.reply(reply::SHUTTING_DOWN);
                    self.next = Some(Next::Close);
                    continue;
                }
            };
            self.ingest(&buf[..n]).await;
        }
    }

    /// How long the next read may wait, and whether the DATA rate (rather than a timeout)
    /// sets that limit. During a message transfer (DATA, or one BDAT chunk) the client starts
    /// with `data_timeout`; waiting spends it and every byte received adds
    /// 1/`min_data_rate` seconds, never more than `data_timeout` ahead (Postfix
    /// `smtpd_min_data_rate` with `smtpd_per_request_deadline`): a trickle is cut off after
    /// about `data_timeout`, however steadily it drips.
    fn read_limit(&mut self) -> (Duration, bool) {
        let settings = &self.shared.settings;
        if !self.in_message_transfer() {
            self.transfer_deadline = None;
            return (settings.command_timeout, false);
        }
        let now = Instant::now();
        let deadline = *self
            .transfer_deadline
            .get_or_insert_with(|| later(now, settings.data_timeout));
        let left = deadline.saturating_duration_since(now);
        (
            left.min(settings.data_timeout),
            left < settings.data_timeout,
        )
    }

    /// `n` bytes of message data arrived: move the transfer deadline (see [`Self::read_limit`]).
    fn credit(&mut self, n: usize) {
        let settings = &self.shared.settings;
        if let Some(deadline) = self.transfer_deadline.as_mut() {
            let earned = Duration::from_secs_f64(n as f64 / settings.min_data_rate.max(1) as f64);
            let cap = later(Instant::now(), settings.data_timeout);
            *deadline = later(*deadline, earned).min(cap);
        }
    }

    /// Drops a partly received message: its temporary file goes, nothing reaches the queue.
    async fn abort_transfer(&mut self) {
        let state = std::mem::replace(&mut self.state, State::command());
        if let State::Data { writer, .. } = state {
            writer.abort().await;
        }
        self.abort_bdat().await;
    }

    /// Feeds one read's worth of bytes through the state machine.
    pub async fn ingest(&mut self, bytes: &[u8]) {
        let mut it = bytes.iter();
        while self.next.is_none() {
            match &mut self.state {
                State::Command(line) => {
                    let rest = it.as_slice();
                    if rest.is_empty() {
                        break;
                    }
                    if line.is_empty() && looks_like_http(rest) {
                        self.reply(reply::NOT_HTTP);
                        self.close_after_reply();
                        break;
                    }
                    let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
                        if line.len() + rest.len() > MAX_COMMAND_LINE {
                            line.clear();
                            self.reply(reply::LINE_TOO_LONG);
                            self.state = State::LineTooLong(DummyLineReceiver::default());
                        } else {
                            line.extend_from_slice(rest);
                        }
                        break;
                    };
                    it = rest[lf + 1..].iter();
                    if line.len() + lf + 1 > MAX_COMMAND_LINE {
                        line.clear();
                        self.reply(reply::LINE_TOO_LONG);
                        continue;
                    }
                    line.extend_from_slice(&rest[..=lf]);
                    let line = std::mem::take(line);
                    match self.parse_command(&line) {
                        Ok(request) => {
                            self.handle_command(request).await;
                            if self.next == Some(Next::StartTls) {
                                // RFC 3207 §5: nothing pipelined after STARTTLS may be acted on.
                                return;
                            }
                        }
                        Err(e) => {
                            let reply = command_error_reply(&e);
                            self.reply(reply);
                        }
                    }
                }
                State::LineTooLong(receiver) => {
                    if receiver.ingest(&mut it) {
                        self.state = State::command();
                    } else {
                        break;
                    }
                }
                State::Data { .. } | State::SkipData { .. } => {
                    if !self.ingest_data(&mut it).await {
                        break;
                    }
                }
                State::Bdat { .. } => {
                    if !self.ingest_bdat(&mut it).await {
                        break;
                    }
                }
                State::Sasl(receiver) => {
                    if receiver.ingest(&mut it) {
                        let line = std::mem::take(&mut receiver.buf);
                        let step = std::mem::replace(&mut receiver.state, SaslStep::Done);
                        self.state = State::command();
                        self.handle_sasl_line(step, line).await;
                    } else {
                        break;
                    }
                }
            }
        }
    }
}

/// `now + d`, for any configured `d` (a far-future deadline instead of an overflow).
fn later(now: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(10 * 365 * 86_400);
    now.checked_add(d.min(FAR)).unwrap_or(now)
}

/// Browsers and HTTP clients pointed at the SMTP port get one reply and a closed connection,
/// instead of a reply per header line (cross-protocol attacks; chasquid does the same).
fn looks_like_http(bytes: &[u8]) -> bool {
    const VERBS: [&[u8]; 6] = [
        b"GET ",
        b"POST ",
        b"HEAD ",
        b"PUT ",
        b"CONNECT ",
        b"OPTIONS ",
    ];
    VERBS
        .iter()
        .any(|v| bytes.len() >= v.len() && bytes[..v.len()].eq_ignore_ascii_case(v))
}

fn command_error_reply(error: &smtp_proto::Error) -> Reply {
    use smtp_proto::Error as E;
    match error {
        E::UnknownCommand => reply::UNKNOWN_COMMAND,
        E::InvalidSenderAddress => Reply::new(501, "5.1.7", "Invalid sender address"),
        E::InvalidRecipientAddress => Reply::new(501, "5.1.3", "Invalid recipient address"),
        E::SyntaxError { syntax } => {
            Reply::with_text(501, "5.5.2", format!("Syntax error, expected: {syntax}"))
        }
        E::InvalidParameter { param } => {
            Reply::with_text(501, "5.5.4", format!("Invalid value for parameter {param}"))
        }
        E::UnsupportedParameter { param } => {
            // Echo only printable ASCII: a reply line is ASCII (RFC 5321 §4.2), and raw client
            // bytes (invalid UTF-8, NULs) must not be reflected.
            let param: String = param
                .chars()
                .filter(|c| c.is_ascii_graphic() || *c == ' ')
                .take(64)
                .collect();
            Reply::with_text(555, "5.5.4", format!("Unsupported parameter {param}"))
        }
        E::ResponseTooLong => reply::LINE_TOO_LONG,
        E::NeedsMoreData { .. } | E::InvalidResponse { .. } => reply::UNKNOWN_COMMAND,
    }
}
