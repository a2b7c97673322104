//! `smtp-oauth-relay sendmail` (also run as `sendmail`, `mailq`, `newaliases`): the entry
//! point for software that never opens a socket (cron, PHP `mail()`, mailx, mdadm, smartd,
//! unattended-upgrades).
//!
//! A message goes to the running relay over its loopback listener (`smtp.listen`), so the
//! relay's own rules judge it and sendmail's exit code says what they said. When the relay
//! does not answer, or answers with a temporary error, the message is stored durably in the
//! drop directory ([`crate::spool::maildrop`]), which the relay takes in at start and while it
//! runs. Exit 0 only once one of the two holds the message; 75 only when neither could.
//!
//! sendmail reads `smtp.*`, `queue.*` and `[sendmail]` from relay.toml and nothing else: no
//! secret is read, so a relay.toml without inline secrets (the packaged layout keeps the
//! secret in its own file) can be world-readable and every local user can send.

pub mod args;
pub mod message;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::config::{self, Config};
use crate::inbound::local;
use crate::spool::maildrop::DropDir;
use crate::spool::{BodyType, Envelope, MailParams, Recipient};
use args::{Mode, Options};
use message::{Additions, Names};

// sysexits.h
pub const EX_OK: u8 = 0;
pub const EX_USAGE: u8 = 64;
pub const EX_DATAERR: u8 = 65;
pub const EX_NOUSER: u8 = 67;
pub const EX_SOFTWARE: u8 = 70;
pub const EX_OSERR: u8 = 71;
pub const EX_IOERR: u8 = 74;
pub const EX_TEMPFAIL: u8 = 75;
pub const EX_CONFIG: u8 = 78;

/// How long a connection to the listener may take before sendmail stores the message itself.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The name the program was run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Personality {
    Sendmail,
    Mailq,
    Newaliases,
}

impl Personality {
    /// From argv\[0\]: `sendmail`, `mailq` and `newaliases` (any directory).
    pub fn from_argv0(argv0: &std::ffi::OsStr) -> Option<Personality> {
        let name = Path::new(argv0).file_name()?.to_str()?;
        match name {
            "sendmail" => Some(Personality::Sendmail),
            "mailq" => Some(Personality::Mailq),
            "newaliases" => Some(Personality::Newaliases),
            _ => None,
        }
    }
}

fn fail(code: u8, text: impl std::fmt::Display) -> u8 {
    eprintln!("sendmail: {text}");
    code
}

/// Runs sendmail with `args` (without the program name); returns the exit code.
pub fn run(personality: Personality, args: &[OsString], config_path: Option<PathBuf>) -> u8 {
    let mut options = match personality {
        Personality::Newaliases => return EX_OK,
        Personality::Mailq => Options {
            mode: Mode::ListQueue,
            ..Options::default()
        },
        Personality::Sendmail => match args::parse(args) {
            Ok(o) => o,
            Err(e) => {
                return fail(
                    EX_USAGE,
                    format!("{e} (usage: sendmail [flags] [recipient...])"),
                );
            }
        },
    };
    match options.mode {
        Mode::NewAliases => return EX_OK,
        // The relay's deliverer runs the queue all the time.
        Mode::RunQueue => return EX_OK,
        _ => {}
    }
    let path = options.config.take().or(config_path);
    let config = match config::load_for_sendmail(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            return fail(
                EX_CONFIG,
                format!(
                    "{e} (sendmail reads smtp.*, queue.* and [sendmail] of relay.toml; keep \
                     secrets in client_secret_file so that relay.toml can be readable)"
                ),
            );
        }
    };
    match options.mode {
        Mode::ListQueue => list_queue(&config),
        Mode::Smtp => block_on(smtp_mode(&config)),
        _ => deliver(&config, &options),
    }
}

fn block_on<F: std::future::Future<Output = u8>>(f: F) -> u8 {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f),
        Err(e) => fail(EX_OSERR, format!("cannot start the runtime: {e}")),
    }
}

/// `mailq` / `-bp`: `queue list`, plus how many messages wait in the drop directory.
fn list_queue(config: &Config) -> u8 {
    use crate::queue_command::{self, QueueCommand};
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let code = match crate::store::open_for_operator(&config.queue) {
        Ok(store) => block_on(async {
            match queue_command::run(&*store, &QueueCommand::List, &mut out).await {
                Ok(()) => EX_OK,
                Err(e) => fail(EX_SOFTWARE, e),
            }
        }),
        Err(e) => fail(EX_SOFTWARE, e),
    };
    if let Ok(n) = DropDir::from_config(config).waiting()
        && n > 0
    {
        let _ = writeln!(
            out,
            "{n} message(s) in the drop directory, taken in when the relay runs"
        );
    }
    let _ = out.flush();
    code
}

/// What sendmail knows about this machine and its caller.
struct Local {
    names: Names,
    /// The login name of the caller.
    user: String,
    helo: String,
}

fn local_facts(config: &Config) -> Result<Local, u8> {
    let host = hostname();
    let mut local_domains = vec![host.clone(), config.smtp.hostname.clone()];
    if let Ok(m) = std::fs::read_to_string("/etc/mailname") {
        local_domains.push(m.trim().to_string());
    }
    let names = Names::new(
        config.sendmail.default_domain.clone(),
        &config.sendmail.aliases,
        host.clone(),
        local_domains,
    );
    let Some(user) = login_name() else {
        return Err(fail(EX_OSERR, "cannot tell the caller's login name"));
    };
    Ok(Local {
        names,
        user,
        helo: if host.is_empty() {
            "localhost".into()
        } else {
            host
        },
    })
}

fn deliver(config: &Config, o: &Options) -> u8 {
    let local = match local_facts(config) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let max = config.smtp.max_message_size.0;
    let mut input = Vec::new();
    // One byte more than allowed tells "too big" from "exactly the limit".
    if let Err(e) = std::io::stdin()
        .lock()
        .take(max + 1)
        .read_to_end(&mut input)
    {
        return fail(EX_IOERR, format!("cannot read the message from stdin: {e}"));
    }
    if !o.ignore_dots {
        message::cut_at_dot(&mut input);
    }
    if smtp_size(&input) > max {
        return fail(
            EX_DATAERR,
            format!("message too big: more than smtp.max_message_size ({max} bytes)"),
        );
    }
    let sender = local
        .names
        .sender(o.sender.as_deref().unwrap_or(&local.user));
    let from = from_value(&sender, o.full_name.as_deref(), &local.names);
    let date = crate::inbound::message::rfc5322_date(SystemTime::now());
    let domain = local
        .names
        .default_domain
        .clone()
        .unwrap_or_else(|| local.names.hostname.clone());
    let message_id = format!("<{}.sendmail@{domain}>", ulid::Ulid::generate());
    let add = Additions {
        from: &from,
        date: &date,
        message_id: &message_id,
    };
    let prepared = message::prepare(input, o.extract_recipients, &add);
    let mut wanted: Vec<String> = o.recipients.clone();
    wanted.extend(prepared.header_recipients.iter().cloned());
    let mut recipients: Vec<String> = Vec::new();
    for r in wanted.iter().flat_map(|r| r.split(',')).map(str::trim) {
        if r.is_empty() {
            continue;
        }
        match local
            .names
            .recipient(r.trim_start_matches('<').trim_end_matches('>'))
        {
            Ok(list) => {
                for a in list {
                    if !recipients.iter().any(|x| x.eq_ignore_ascii_case(&a)) {
                        recipients.push(a);
                    }
                }
            }
            Err(e) => return fail(EX_NOUSER, e),
        }
    }
    if recipients.is_empty() {
        return fail(
            EX_USAGE,
            if o.extract_recipients {
                "no recipients: none on the command line and no To, Cc or Bcc in the message"
            } else {
                "no recipients (name them on the command line, or use -t to read To/Cc/Bcc)"
            },
        );
    }
    if recipients.len() > config.smtp.max_recipients {
        return fail(
            EX_USAGE,
            format!(
                "{} recipients: more than smtp.max_recipients ({})",
                recipients.len(),
                config.smtp.max_recipients
            ),
        );
    }
    let eight_bit = o.eight_bit || prepared.message.iter().any(|&b| b >= 0x80);
    let envelope = Envelope {
        mail_params: MailParams {
            body: if eight_bit {
                BodyType::EightBitMime
            } else {
                BodyType::SevenBit
            },
            smtputf8: !sender.is_ascii() || recipients.iter().any(|r| !r.is_ascii()),
            envid: None,
            ret: None,
        },
        mail_from: sender,
        recipients: recipients.into_iter().map(Recipient::new).collect(),
        client: format!("sendmail uid {}", current_uid()),
        helo: local.helo.clone(),
        auth_user: None,
        received_at: SystemTime::now(),
        // The listener chooses the route again; this one is only the drop file's.
        route: crate::routes::DEFAULT_ROUTE.into(),
    };
    block_on(hand_over(config, envelope, prepared.message, o.verbose))
}

/// The listener first; the drop directory when it cannot take the message now.
async fn hand_over(config: &Config, envelope: Envelope, message: Vec<u8>, verbose: bool) -> u8 {
    let why = match connect(config).await {
        Ok(stream) => match local::submit(stream, &envelope.helo, &envelope, &message).await {
            Ok(id) => {
                if verbose {
                    eprintln!("sendmail: queued as {id}");
                }
                return EX_OK;
            }
            // With smtp.auth = "required" the listener wants a password sendmail does not
            // have: the drop directory is its way in.
            Err(e @ local::SubmitError::BadAddress(_)) => return fail(EX_DATAERR, e),
            Err(e) if e.code() == Some(530) => e.to_string(),
            Err(e) if e.is_permanent() => {
                let code = if e.stage() == "RCPT TO" {
                    EX_NOUSER
                } else {
                    EX_DATAERR
                };
                return fail(code, format!("the relay refused the message: {e}"));
            }
            Err(e) => e.to_string(),
        },
        Err(e) => e,
    };
    deposit(config, &envelope, &message, verbose, &why)
}

fn deposit(config: &Config, envelope: &Envelope, message: &[u8], verbose: bool, why: &str) -> u8 {
    let dir = DropDir::from_config(config);
    match dir.deposit(envelope, message) {
        Ok(id) => {
            if verbose {
                eprintln!(
                    "sendmail: relay not available ({why}): stored as {id} in {}, the relay \
                     takes it in when it runs",
                    dir.path().display()
                );
            }
            EX_OK
        }
        Err(e) => fail(
            EX_TEMPFAIL,
            format!(
                "message not sent: the relay is not available ({why}) and the drop directory \
                 {} cannot take it: {e}",
                dir.path().display()
            ),
        ),
    }
}

/// The first `smtp.listen` address that answers (a wildcard address through loopback).
async fn connect(config: &Config) -> Result<tokio::net::TcpStream, String> {
    let mut last = String::from("smtp.listen is empty");
    for addr in &config.smtp.listen {
        let addr = loopback_for(*addr);
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => {
                last = format!(
                    "{addr}: no connection within {}s",
                    CONNECT_TIMEOUT.as_secs()
                )
            }
        }
    }
    Err(last)
}

fn loopback_for(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// The size the listener will count: bare LF becomes CRLF on the way in.
fn smtp_size(message: &[u8]) -> u64 {
    let bare_lf = message
        .iter()
        .enumerate()
        .filter(|(i, b)| **b == b'\n' && (*i == 0 || message[i - 1] != b'\r'))
        .count();
    (message.len() + bare_lf) as u64
}

/// The From a message without one gets: `Full Name <sender>` (`-F`, else `$NAME`).
fn from_value(sender: &str, full_name: Option<&str>, names: &Names) -> String {
    let address = if sender.is_empty() {
        format!(
            "MAILER-DAEMON@{}",
            names.default_domain.as_deref().unwrap_or(&names.hostname)
        )
    } else {
        sender.to_string()
    };
    let name = full_name
        .map(str::to_string)
        .or_else(|| std::env::var("NAME").ok())
        .map(|n| n.chars().filter(|c| !c.is_control()).collect::<String>())
        .filter(|n| !n.trim().is_empty());
    match name {
        Some(n) => {
            let plain = n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || " !#$%&'*+-/=?^_`{|}~".contains(c));
            if plain {
                format!("{n} <{address}>")
            } else {
                let quoted = n.replace('\\', "\\\\").replace('"', "\\\"");
                format!("\"{quoted}\" <{address}>")
            }
        }
        None => address,
    }
}

fn current_uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// The caller's login name: the `/etc/passwd` entry of the real uid, else `$LOGNAME` /
/// `$USER` (read as a file, not through NSS: the static build has no NSS modules to load).
fn login_name() -> Option<String> {
    let uid = current_uid().to_string();
    let from_passwd = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                let _password = fields.next()?;
                (fields.next()? == uid && !name.is_empty()).then(|| name.to_string())
            })
        });
    from_passwd.or_else(|| {
        ["LOGNAME", "USER"]
            .iter()
            .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    })
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// `-bs`: SMTP on stdin/stdout. With the relay running, the conversation is the relay's own
/// (sendmail only carries bytes); without it, a small SMTP server stores each message in the
/// drop directory before its `250`.
async fn smtp_mode(config: &Config) -> u8 {
    match connect(config).await {
        Ok(stream) => proxy(stream).await,
        Err(why) => match local_facts(config) {
            Ok(local) => offline_smtp(config, &local, &why).await,
            Err(code) => code,
        },
    }
}

async fn proxy(stream: tokio::net::TcpStream) -> u8 {
    let (mut from_relay, mut to_relay) = stream.into_split();
    let mut stdin = tokio::io::stdin();
    let mut stdout = tokio::io::stdout();
    let up = async {
        let _ = tokio::io::copy(&mut stdin, &mut to_relay).await;
        let _ = to_relay.shutdown().await;
    };
    let down = async {
        let r = tokio::io::copy(&mut from_relay, &mut stdout).await;
        let _ = stdout.flush().await;
        r
    };
    // The session ends when the relay closes (after QUIT); stdin may stay open.
    tokio::select! {
        r = down => match r {
            Ok(_) => EX_OK,
            Err(e) => fail(EX_IOERR, e),
        },
        () = async { up.await; std::future::pending::<()>().await } => EX_OK,
    }
}

/// The `-bs` server used while the relay is down: one transaction at a time, each message
/// stored in the drop directory (where the relay's session checks it at ingest).
async fn offline_smtp(config: &Config, local: &Local, why: &str) -> u8 {
    use smtp_proto::Request;
    let mut input = tokio::io::BufReader::new(tokio::io::stdin());
    let mut out = tokio::io::stdout();
    let host = &local.helo;
    let max = config.smtp.max_message_size.0;
    let reply = |text: String| text + "\r\n";
    let mut pending = vec![reply(format!(
        "220 {host} ESMTP smtp-oauth-relay sendmail (relay not running: {why})"
    ))];
    let mut sender: Option<(String, u64)> = None;
    let mut rcpts: Vec<String> = Vec::new();
    // Bounded: one command per iteration, and the input ends.
    loop {
        for r in pending.drain(..) {
            if out.write_all(r.as_bytes()).await.is_err() {
                return EX_IOERR;
            }
        }
        if out.flush().await.is_err() {
            return EX_IOERR;
        }
        let mut line = Vec::new();
        match (&mut input).take(4096).read_until(b'\n', &mut line).await {
            Ok(0) => return EX_OK,
            Ok(_) => {}
            Err(e) => return fail(EX_IOERR, e),
        }
        if !line.ends_with(b"\n") {
            line.extend_from_slice(b"\r\n");
        }
        let parsed = match envelope_command(&line) {
            Some(r) => Ok(r),
            None => Request::parse(&mut line.iter()).map(Request::into_owned),
        };
        let r = match parsed {
            Ok(Request::Ehlo { .. }) => {
                sender = None;
                rcpts.clear();
                format!("250-{host}\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE {max}")
            }
            Ok(Request::Helo { .. }) => format!("250 {host}"),
            Ok(Request::Mail { from }) => {
                sender = Some((local.names.sender(&from.address), from.flags));
                rcpts.clear();
                "250 2.1.0 Sender OK".into()
            }
            Ok(Request::Rcpt { .. }) if sender.is_none() => {
                "503 5.5.1 Need MAIL command first".into()
            }
            Ok(Request::Rcpt { to }) => match local.names.recipient(&to.address) {
                Ok(list) => {
                    rcpts.extend(list);
                    "250 2.1.5 Recipient OK".into()
                }
                Err(e) => format!("550 5.1.3 {e}"),
            },
            Ok(Request::Data) if rcpts.is_empty() => "554 5.5.1 No valid recipients".into(),
            Ok(Request::Data) => {
                pending.push(reply("354 End data with <CR><LF>.<CR><LF>".into()));
                for r in pending.drain(..) {
                    if out.write_all(r.as_bytes()).await.is_err() {
                        return EX_IOERR;
                    }
                }
                let _ = out.flush().await;
                let (message, too_big) = match read_data(&mut input, max).await {
                    Ok(m) => m,
                    Err(e) => return fail(EX_IOERR, e),
                };
                let (from, flags) = sender.take().unwrap_or_default();
                let rcpt: Vec<String> = std::mem::take(&mut rcpts);
                if too_big {
                    "552 5.3.4 Message size exceeds fixed limit".into()
                } else {
                    let envelope = Envelope {
                        mail_from: from,
                        mail_params: MailParams {
                            body: if flags & smtp_proto::MAIL_BODY_8BITMIME != 0 {
                                BodyType::EightBitMime
                            } else {
                                BodyType::SevenBit
                            },
                            smtputf8: flags & smtp_proto::MAIL_SMTPUTF8 != 0,
                            envid: None,
                            ret: None,
                        },
                        recipients: rcpt.into_iter().map(Recipient::new).collect(),
                        client: format!("sendmail -bs uid {}", current_uid()),
                        helo: local.helo.clone(),
                        auth_user: None,
                        received_at: SystemTime::now(),
                        route: crate::routes::DEFAULT_ROUTE.into(),
                    };
                    match DropDir::from_config(config).deposit(&envelope, &message) {
                        Ok(id) => format!("250 2.0.0 queued as {id}"),
                        Err(e) => {
                            eprintln!("sendmail: drop directory: {e}");
                            "451 4.3.0 Cannot store the message now".into()
                        }
                    }
                }
            }
            Ok(Request::Rset) => {
                sender = None;
                rcpts.clear();
                "250 2.0.0 Reset state".into()
            }
            Ok(Request::Noop { .. }) => "250 2.0.0 OK".into(),
            Ok(Request::Quit) => {
                let _ = out.write_all(b"221 2.0.0 Bye\r\n").await;
                let _ = out.flush().await;
                return EX_OK;
            }
            Ok(_) => "502 5.5.1 Command not implemented".into(),
            Err(_) => "500 5.5.1 Command unrecognized".into(),
        };
        pending.push(reply(r));
    }
}

/// `MAIL FROM:` / `RCPT TO:` read leniently (a bare name such as `<root>` is what sendmail
/// resolves; smtp-proto wants a domain): the path, `BODY=8BITMIME` and `SMTPUTF8`.
fn envelope_command(line: &[u8]) -> Option<smtp_proto::Request<String>> {
    let text = std::str::from_utf8(line).ok()?.trim_end();
    let upper = text.to_ascii_uppercase();
    let (is_mail, rest) = if upper.starts_with("MAIL FROM:") {
        (true, &text["MAIL FROM:".len()..])
    } else if upper.starts_with("RCPT TO:") {
        (false, &text["RCPT TO:".len()..])
    } else {
        return None;
    };
    let rest = rest.trim_start();
    let (path, params) = match rest.strip_prefix('<') {
        Some(r) => {
            let close = r.find('>')?;
            (&r[..close], &r[close + 1..])
        }
        None => rest.split_once(' ').unwrap_or((rest, "")),
    };
    let params = params.to_ascii_uppercase();
    let mut flags = 0;
    if params.contains("BODY=8BITMIME") {
        flags |= smtp_proto::MAIL_BODY_8BITMIME;
    }
    if params.split_whitespace().any(|p| p == "SMTPUTF8") {
        flags |= smtp_proto::MAIL_SMTPUTF8;
    }
    Some(if is_mail {
        smtp_proto::Request::Mail {
            from: smtp_proto::MailFrom {
                address: path.to_string(),
                flags,
                ..Default::default()
            },
        }
    } else {
        smtp_proto::Request::Rcpt {
            to: smtp_proto::RcptTo {
                address: path.to_string(),
                ..Default::default()
            },
        }
    })
}

/// DATA lines up to the lone `.`, unstuffed; (message, larger than `max`).
async fn read_data<R: tokio::io::AsyncBufRead + Unpin>(
    input: &mut R,
    max: u64,
) -> std::io::Result<(Vec<u8>, bool)> {
    let mut message = Vec::new();
    let mut too_big = false;
    loop {
        let mut line = Vec::new();
        if input.read_until(b'\n', &mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == b".\r\n" || line == b".\n" {
            return Ok((message, too_big));
        }
        let body = line.strip_prefix(b".").unwrap_or(&line);
        if message.len() as u64 + body.len() as u64 > max {
            too_big = true;
        } else {
            message.extend_from_slice(body);
        }
    }
}
