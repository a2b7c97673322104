//! `-bs`: SMTP on stdin/stdout (Symfony Mailer's and SwiftMailer's default transport).
//!
//! sendmail answers the conversation itself, whether or not the relay runs: addresses go
//! through [`Names`](super::message::Names) exactly as on the command line (`RCPT TO:<root>`
//! reaches the alias of root), and each message is stored by [`handover::store`] before its
//! `250` (the listener, else the drop directory; split in batches of `smtp.max_recipients`),
//! so the listener's rules still judge it. A refusal there is the reply to the end of data.

use std::time::SystemTime;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use super::handover::{self, MAX_RECIPIENTS};
use super::{EX_DATAERR, EX_IOERR, EX_NOUSER, EX_OK, Local, current_uid, fail};
use crate::config::Config;
use crate::spool::{BodyType, Envelope, MailParams, Recipient};

/// The longest command line read (RFC 5321 §4.5.3.1.4 says 512; generous for long addresses).
const MAX_COMMAND: u64 = 4096;
/// DATA is read in pieces of at most this much, so one endless line cannot grow memory.
const DATA_PIECE: u64 = 64 * 1024;

/// Serves SMTP on stdin/stdout until QUIT or the end of input; the exit code.
pub async fn serve(config: &Config, local: &Local) -> u8 {
    let mut input = tokio::io::BufReader::new(tokio::io::stdin());
    let mut out = tokio::io::stdout();
    let host = &local.helo;
    let max = config.smtp.max_message_size.0;
    let mut reply = format!("220 {host} ESMTP smtp-oauth-relay sendmail");
    let mut sender: Option<(String, u64)> = None;
    let mut rcpts: Vec<String> = Vec::new();
    // Bounded: one command per iteration, and the input ends.
    loop {
        if out.write_all(reply.as_bytes()).await.is_err()
            || out.write_all(b"\r\n").await.is_err()
            || out.flush().await.is_err()
        {
            return EX_IOERR;
        }
        let mut line = Vec::new();
        match (&mut input)
            .take(MAX_COMMAND)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) => return EX_OK,
            Ok(_) => {}
            Err(e) => return fail(EX_IOERR, e),
        }
        if !line.ends_with(b"\n") {
            line.extend_from_slice(b"\r\n");
        }
        let parsed = match envelope_command(&line) {
            Some(r) => Ok(r),
            None => {
                smtp_proto::Request::parse(&mut line.iter()).map(smtp_proto::Request::into_owned)
            }
        };
        use smtp_proto::Request;
        reply = match parsed {
            Ok(Request::Ehlo { .. }) => {
                sender = None;
                rcpts.clear();
                format!("250-{host}\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE {max}")
            }
            Ok(Request::Helo { .. }) => format!("250 {host}"),
            Ok(Request::Mail { .. }) if sender.is_some() => "503 5.5.1 Sender already given".into(),
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
                    let new: Vec<String> = list
                        .into_iter()
                        .filter(|a| !rcpts.iter().any(|x| x.eq_ignore_ascii_case(a)))
                        .collect();
                    if rcpts.len() + new.len() > MAX_RECIPIENTS {
                        format!("452 4.5.3 Too many recipients (at most {MAX_RECIPIENTS})")
                    } else {
                        rcpts.extend(new);
                        "250 2.1.5 Recipient OK".into()
                    }
                }
                Err(e) => format!("550 5.1.3 {e}"),
            },
            Ok(Request::Data) if rcpts.is_empty() => "554 5.5.1 No valid recipients".into(),
            Ok(Request::Data) => {
                if out
                    .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await
                    .is_err()
                    || out.flush().await.is_err()
                {
                    return EX_IOERR;
                }
                let (message, too_big) = match read_data(&mut input, max).await {
                    Ok(m) => m,
                    Err(e) => return fail(EX_IOERR, e),
                };
                let (from, flags) = sender.take().unwrap_or_default();
                let rcpt = std::mem::take(&mut rcpts);
                if too_big {
                    "552 5.3.4 Message size exceeds fixed limit".into()
                } else {
                    let envelope = envelope(local, from, flags, rcpt, &message);
                    match handover::store(config, &envelope, &message, false).await {
                        Ok(ids) => format!("250 2.0.0 queued as {}", ids.join(" ")),
                        Err(f) => {
                            eprintln!("sendmail: {}", f.text);
                            let text = one_line(&f.text);
                            match f.code {
                                EX_NOUSER => format!("550 5.1.1 {text}"),
                                EX_DATAERR => format!("554 5.6.0 {text}"),
                                _ => format!("451 4.3.0 {text}"),
                            }
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
    }
}

fn envelope(
    local: &Local,
    from: String,
    flags: u64,
    rcpt: Vec<String>,
    message: &[u8],
) -> Envelope {
    // 8-bit bytes without BODY=8BITMIME are announced anyway, as on the command line.
    let eight_bit =
        flags & smtp_proto::MAIL_BODY_8BITMIME != 0 || message.iter().any(|&b| b >= 0x80);
    Envelope {
        mail_params: MailParams {
            body: if eight_bit {
                BodyType::EightBitMime
            } else {
                BodyType::SevenBit
            },
            smtputf8: flags & smtp_proto::MAIL_SMTPUTF8 != 0
                || !from.is_ascii()
                || rcpt.iter().any(|r| !r.is_ascii()),
            envid: None,
            ret: None,
        },
        mail_from: from,
        recipients: rcpt.into_iter().map(Recipient::new).collect(),
        client: format!("sendmail -bs uid {}", current_uid()),
        helo: local.helo.clone(),
        auth_user: None,
        received_at: SystemTime::now(),
        // The listener (or the drop directory's session) chooses the route again.
        route: crate::routes::DEFAULT_ROUTE.into(),
    }
}

/// A reply text on one line (the relay's reply and file paths could hold anything).
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(400)
        .collect()
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

/// DATA lines up to the lone `.`, unstuffed; (message, larger than `max`). Read in pieces of
/// at most [`DATA_PIECE`]: a piece that does not end a line is continued by the next, which
/// is then not the start of a line (no dot to unstuff, no end of data).
async fn read_data<R: AsyncBufRead + Unpin>(
    input: &mut R,
    max: u64,
) -> std::io::Result<(Vec<u8>, bool)> {
    let mut message = Vec::new();
    let mut too_big = false;
    let mut line_start = true;
    // Bounded: every iteration consumes input, which ends.
    loop {
        let mut piece = Vec::new();
        if (&mut *input)
            .take(DATA_PIECE)
            .read_until(b'\n', &mut piece)
            .await?
            == 0
        {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line_start && (piece == b".\r\n" || piece == b".\n") {
            return Ok((message, too_big));
        }
        let body = if line_start {
            piece.strip_prefix(b".").unwrap_or(&piece)
        } else {
            &piece[..]
        };
        line_start = piece.ends_with(b"\n");
        if message.len() as u64 + body.len() as u64 > max {
            too_big = true;
            message.clear();
        } else if !too_big {
            message.extend_from_slice(body);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn data_ends_at_the_lone_dot_and_is_unstuffed() {
        let mut input: &[u8] = b"a\r\n..b\r\n.\r\nafter";
        let (m, big) = read_data(&mut input, 100).await.unwrap();
        assert_eq!(m, b"a\r\n.b\r\n");
        assert!(!big);
        assert_eq!(input, b"after");
        let mut input: &[u8] = b"0123456789\r\n.\r\n";
        assert!(read_data(&mut input, 5).await.unwrap().1);
        let mut input: &[u8] = b"no end";
        assert!(read_data(&mut input, 100).await.is_err());
    }

    #[test]
    fn bare_names_in_the_envelope_commands() {
        match envelope_command(b"RCPT TO:<root>\r\n") {
            Some(smtp_proto::Request::Rcpt { to }) => assert_eq!(to.address, "root"),
            other => panic!("{other:?}"),
        }
        match envelope_command(b"MAIL FROM:<www-data> BODY=8BITMIME\r\n") {
            Some(smtp_proto::Request::Mail { from }) => {
                assert_eq!(from.address, "www-data");
                assert_ne!(from.flags & smtp_proto::MAIL_BODY_8BITMIME, 0);
            }
            other => panic!("{other:?}"),
        }
    }
}
