//! Local submission: the one SMTP client with which a message reaches the listener's rules
//! from this machine without a network client of its own. `sendmail` uses it on the relay's
//! loopback listener; the drop-directory ingest uses it on an in-process [`Session`] (so a
//! dropped message is checked exactly as SMTP input is: size, recipients, addresses, framing).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufStream};
use tokio_util::sync::CancellationToken;

use super::{Session, Shared};
use crate::spool::maildrop::Refusal;
use crate::spool::{BodyType, Envelope};

/// How long one reply may take. Generous: the final one waits for the spool's fsyncs.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a local submission did not end in `250 queued as`.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The server answered with an error reply.
    #[error("{stage}: {code} {text}")]
    Refused {
        stage: &'static str,
        code: u16,
        text: String,
    },
    #[error("{stage}: {source}")]
    Io {
        stage: &'static str,
        source: std::io::Error,
    },
    #[error("{stage}: no reply within {}s", REPLY_TIMEOUT.as_secs())]
    Timeout { stage: &'static str },
    #[error("{stage}: not an SMTP reply: {line:?}")]
    Protocol { stage: &'static str, line: String },
    /// An address that would change the command it is sent in (`>`, spaces, controls).
    #[error("invalid address {0:?}")]
    BadAddress(String),
}

impl SubmitError {
    /// A 5xx: sending the same message again cannot succeed.
    pub fn is_permanent(&self) -> bool {
        match self {
            SubmitError::Refused { code, .. } => *code >= 500,
            SubmitError::BadAddress(_) => true,
            _ => false,
        }
    }

    /// The reply code, when the server gave one.
    pub fn code(&self) -> Option<u16> {
        match self {
            SubmitError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The stage (`MAIL FROM`, `RCPT TO <addr>`...) the error happened at.
    pub fn stage(&self) -> &'static str {
        match self {
            SubmitError::Refused { stage, .. }
            | SubmitError::Io { stage, .. }
            | SubmitError::Timeout { stage }
            | SubmitError::Protocol { stage, .. } => stage,
            SubmitError::BadAddress(_) => "envelope",
        }
    }
}

struct Client<S> {
    stream: BufStream<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// One reply: (code, text of the last line).
    async fn reply(&mut self, stage: &'static str) -> Result<(u16, String), SubmitError> {
        let read = async {
            // A reply has at most a few lines; the bound keeps a hostile server from feeding
            // lines for ever.
            for _ in 0..1000 {
                let mut line = String::new();
                let n = self
                    .stream
                    .read_line(&mut line)
                    .await
                    .map_err(|source| SubmitError::Io { stage, source })?;
                if n == 0 {
                    return Err(SubmitError::Io {
                        stage,
                        source: std::io::ErrorKind::UnexpectedEof.into(),
                    });
                }
                let text = line.trim_end();
                let code = text
                    .get(..3)
                    .and_then(|c| c.parse::<u16>().ok())
                    .filter(|c| (200..600).contains(c));
                let Some(code) = code else {
                    return Err(SubmitError::Protocol {
                        stage,
                        line: text.chars().take(200).collect(),
                    });
                };
                if text.as_bytes().get(3) != Some(&b'-') {
                    return Ok((code, text.get(4..).unwrap_or("").to_string()));
                }
            }
            Err(SubmitError::Protocol {
                stage,
                line: "more than 1000 reply lines".into(),
            })
        };
        tokio::time::timeout(REPLY_TIMEOUT, read)
            .await
            .map_err(|_| SubmitError::Timeout { stage })?
    }

    async fn expect(&mut self, stage: &'static str, ok: u16) -> Result<String, SubmitError> {
        let (code, text) = self.reply(stage).await?;
        if code == ok || (ok == 250 && code == 251) {
            Ok(text)
        } else {
            Err(SubmitError::Refused { stage, code, text })
        }
    }

    async fn send(&mut self, stage: &'static str, bytes: &[u8]) -> Result<(), SubmitError> {
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(REPLY_TIMEOUT, write)
            .await
            .map_err(|_| SubmitError::Timeout { stage })?
            .map_err(|source| SubmitError::Io { stage, source })
    }
}

/// Submits one message over `stream` (greeting, EHLO, MAIL, RCPT..., DATA, QUIT) and returns
/// the spool id of `250 queued as ID` (or the whole reply text from another server). The
/// message is sent with CRLF line ends and dot-stuffed; the server adds what it adds.
pub async fn submit<S>(
    stream: S,
    helo: &str,
    envelope: &Envelope,
    message: &[u8],
) -> Result<String, SubmitError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // A drop file is written by any local user: its addresses must not smuggle parameters
    // or commands into the lines they are sent in.
    let bad =
        |a: &str| a.contains(|c: char| c.is_whitespace() || c.is_control() || c == '<' || c == '>');
    if let Some(a) = std::iter::once(envelope.mail_from.as_str())
        .chain(envelope.recipients.iter().map(|r| r.address.as_str()))
        .find(|a| bad(a))
    {
        return Err(SubmitError::BadAddress(a.to_string()));
    }
    let mut c = Client {
        stream: BufStream::with_capacity(64 * 1024, 64 * 1024, stream),
    };
    c.expect("greeting", 220).await?;
    c.send("EHLO", format!("EHLO {helo}\r\n").as_bytes())
        .await?;
    c.expect("EHLO", 250).await?;
    let mut mail = format!("MAIL FROM:<{}>", envelope.mail_from);
    match envelope.mail_params.body {
        BodyType::EightBitMime => mail.push_str(" BODY=8BITMIME"),
        BodyType::BinaryMime => mail.push_str(" BODY=BINARYMIME"),
        BodyType::SevenBit => {}
    }
    if envelope.mail_params.smtputf8 {
        mail.push_str(" SMTPUTF8");
    }
    mail.push_str("\r\n");
    c.send("MAIL FROM", mail.as_bytes()).await?;
    c.expect("MAIL FROM", 250).await?;
    for r in &envelope.recipients {
        c.send("RCPT TO", format!("RCPT TO:<{}>\r\n", r.address).as_bytes())
            .await?;
        c.expect("RCPT TO", 250)
            .await
            .map_err(|e| name_recipient(e, &r.address))?;
    }
    c.send("DATA", b"DATA\r\n").await?;
    c.expect("DATA", 354).await?;
    let mut out = Vec::with_capacity(64 * 1024 + 4);
    for chunk in dot_stuffed(message) {
        out.extend_from_slice(chunk.0);
        out.extend_from_slice(&chunk.1);
        if out.len() >= 64 * 1024 {
            c.send("message", &out).await?;
            out.clear();
        }
    }
    out.extend_from_slice(b".\r\n");
    c.send("message", &out).await?;
    let text = c.expect("end of data", 250).await?;
    // Best effort: the message is queued whatever happens to QUIT.
    if c.send("QUIT", b"QUIT\r\n").await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(5), c.reply("QUIT")).await;
    }
    Ok(text
        .split_whitespace()
        .last()
        .filter(|_| text.contains("queued as "))
        .map(str::to_string)
        .unwrap_or(text))
}

/// Says which recipient a refusal was about (the stage text is static).
fn name_recipient(e: SubmitError, address: &str) -> SubmitError {
    match e {
        SubmitError::Refused { stage, code, text } => SubmitError::Refused {
            stage,
            code,
            text: format!("<{address}>: {text}"),
        },
        other => other,
    }
}

/// The message as DATA lines: each line (LF or CRLF ended, or the unterminated last one) as
/// (prefix, line + CRLF), a `.` doubled at the start of a line (RFC 5321 §4.5.2).
fn dot_stuffed(message: &[u8]) -> impl Iterator<Item = (&'static [u8], Vec<u8>)> + '_ {
    let mut rest = message;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (line, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(p) => (&rest[..p], &rest[p + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        rest = next;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let prefix: &'static [u8] = if line.starts_with(b".") { b"." } else { b"" };
        let mut l = Vec::with_capacity(line.len() + 2);
        l.extend_from_slice(line);
        l.extend_from_slice(b"\r\n");
        Some((prefix, l))
    })
}

/// Runs messages through an in-process session of the listener (for the drop directory).
#[derive(Clone)]
pub struct LocalSubmitter {
    shared: Arc<Shared>,
}

impl LocalSubmitter {
    pub(super) fn new(shared: Arc<Shared>) -> LocalSubmitter {
        LocalSubmitter { shared }
    }

    /// One message through a [`Session`] over an in-memory pipe: the spool id, or why not.
    pub async fn submit(&self, envelope: Envelope, message: Vec<u8>) -> Result<String, Refusal> {
        let (client, mut server) = tokio::io::duplex(256 * 1024);
        let peer = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut session = Session::new(self.shared.clone(), peer);
        session.local_submission();
        session.greeting();
        let stop = CancellationToken::new();
        let server_task = tokio::spawn(async move {
            let _ = session.drive(&mut server, &stop).await;
        });
        let result = submit(client, &envelope.helo, &envelope, &message).await;
        let _ = server_task.await;
        result.map_err(|e| {
            if e.is_permanent() {
                Refusal::Permanent(e.to_string())
            } else {
                Refusal::Temporary(e.to_string())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stuffed(m: &[u8]) -> Vec<u8> {
        dot_stuffed(m)
            .flat_map(|(p, l)| [p.to_vec(), l].concat())
            .collect()
    }

    #[test]
    fn lines_get_crlf_and_leading_dots_doubled() {
        assert_eq!(
            stuffed(b"a\n.b\r\n..c\nlast"),
            b"a\r\n..b\r\n...c\r\nlast\r\n"
        );
        assert_eq!(stuffed(b".\n"), b"..\r\n");
        assert_eq!(stuffed(b""), b"");
    }
}
