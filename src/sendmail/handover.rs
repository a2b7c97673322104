//! Handing a prepared message to the relay: one transaction per batch of at most
//! `smtp.max_recipients` recipients (the listener refuses more in one, RFC 5321 §4.5.3.1.8:
//! 452), each to the loopback listener, else durably to the drop directory. Used by the
//! command line and by `-bs`, so both resolve, split and store alike.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::Config;
use crate::inbound::local;
use crate::spool::Envelope;
use crate::spool::maildrop::DropDir;

use super::{EX_DATAERR, EX_NOUSER, EX_TEMPFAIL};

/// How long a connection to the listener may take before sendmail stores the message itself.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The most recipients one sendmail run takes (so the most copies it queues is this over
/// `smtp.max_recipients`): far above any cron job or web form, and a bound on what a message
/// of `-t` addresses can make sendmail store.
pub const MAX_RECIPIENTS: usize = 10_000;

/// Why a message was not (wholly) stored: the exit code and what to tell the caller.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub text: String,
}

/// Stores `message` for every recipient of `envelope`, in batches of at most
/// `smtp.max_recipients`: the queue ids, one per batch (one queued copy each). `Err` names
/// the batches stored before the failure, since a retry would send those again.
pub async fn store(
    config: &Config,
    envelope: &Envelope,
    message: &[u8],
    verbose: bool,
) -> Result<Vec<String>, Failure> {
    let per_batch = config.smtp.max_recipients.max(1);
    let total = envelope.recipients.len();
    let mut ids = Vec::new();
    let mut done = 0;
    // Bounded: MAX_RECIPIENTS recipients at most (checked by the callers), one batch at a time.
    for batch in envelope.recipients.chunks(per_batch) {
        let one = Envelope {
            recipients: batch.to_vec(),
            ..envelope.clone()
        };
        match store_one(config, &one, message, verbose).await {
            Ok(id) => {
                ids.push(id);
                done += batch.len();
            }
            Err(mut f) => {
                if !ids.is_empty() {
                    f.text = format!(
                        "{} (already queued for the first {done} of {total} recipients as {}; \
                         not for the other {})",
                        f.text,
                        ids.join(" "),
                        total - done
                    );
                }
                return Err(f);
            }
        }
    }
    if verbose && ids.len() > 1 {
        eprintln!(
            "sendmail: {total} recipients in {} transactions of at most {per_batch} \
             (smtp.max_recipients)",
            ids.len()
        );
    }
    Ok(ids)
}

/// One transaction: the listener first; the drop directory when it cannot take it now.
async fn store_one(
    config: &Config,
    envelope: &Envelope,
    message: &[u8],
    verbose: bool,
) -> Result<String, Failure> {
    let fail = |code, text: String| Failure { code, text };
    let why = match connect(config).await {
        Ok(stream) => match local::submit(stream, &envelope.helo, envelope, message).await {
            Ok(id) => {
                if verbose {
                    eprintln!("sendmail: queued as {id}");
                }
                return Ok(id);
            }
            Err(e @ local::SubmitError::BadAddress(_)) => {
                return Err(fail(EX_DATAERR, e.to_string()));
            }
            // With smtp.auth = "required" the listener wants a password sendmail does not
            // have: the drop directory is its way in.
            Err(e) if e.code() == Some(530) => e.to_string(),
            Err(e) if e.is_permanent() => {
                let code = if e.stage() == "RCPT TO" {
                    EX_NOUSER
                } else {
                    EX_DATAERR
                };
                return Err(fail(code, format!("the relay refused the message: {e}")));
            }
            Err(e) => e.to_string(),
        },
        Err(e) => e,
    };
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
            Ok(id)
        }
        Err(e) => Err(fail(
            EX_TEMPFAIL,
            format!(
                "message not sent: the relay is not available ({why}) and the drop directory \
                 {} cannot take it: {e}",
                dir.path().display()
            ),
        )),
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
