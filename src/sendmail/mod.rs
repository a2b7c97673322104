//! `smtp-oauth-relay sendmail` (also run as `sendmail`, `mailq`, `newaliases`): the entry
//! point for software that never opens a socket (cron, PHP `mail()`, mailx, mdadm, smartd,
//! unattended-upgrades).
//!
//! A message goes to the running relay over its loopback listener (`smtp.listen`), so the
//! relay's own rules judge it and sendmail's exit code says what they said. When the relay
//! does not answer, or answers with a temporary error, the message is stored durably in the
//! drop directory ([`crate::spool::maildrop`]), which the relay takes in at start and while it
//! runs. Exit 0 only once one of the two holds the message; 75 only when neither could.
//! More recipients than `smtp.max_recipients` go in several transactions ([`handover`]).
//!
//! sendmail reads `smtp.*`, `queue.*` and `[sendmail]` from relay.toml and nothing else: no
//! secret is read, so a relay.toml without inline secrets (the packaged layout keeps the
//! secret in its own file) can be world-readable and every local user can send.

pub mod args;
mod bs;
mod handover;
pub mod message;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::config::{self, Config};
use crate::spool::maildrop::DropDir;
use crate::spool::{BodyType, Envelope, MailParams, Recipient};
use args::{Mode, Options};
use handover::MAX_RECIPIENTS;
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
        Mode::Smtp => match local_facts(&config) {
            Ok(local) => block_on(bs::serve(&config, &local)),
            Err(code) => code,
        },
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
    // More than smtp.max_recipients go in several transactions (handover::store).
    if recipients.len() > MAX_RECIPIENTS {
        return fail(
            EX_USAGE,
            format!(
                "{} recipients: sendmail takes at most {MAX_RECIPIENTS} in one run",
                recipients.len()
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
    block_on(async {
        match handover::store(config, &envelope, &prepared.message, o.verbose).await {
            Ok(_) => EX_OK,
            Err(f) => fail(f.code, f.text),
        }
    })
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
