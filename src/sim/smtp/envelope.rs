//! MAIL FROM and RCPT TO, and the checks Exchange makes before DATA.

use tokio::io::{AsyncRead, AsyncWrite};

use super::parse::*;
use super::*;
use crate::sim::config::SimConfig;

impl Session {
    pub(super) async fn mail<S: AsyncRead + AsyncWrite + Unpin>(
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
        {
            let mut usage = self.ctx.shared.usage();
            let times = &mut usage.entry(auth.mailbox.clone()).or_default().mail_times;
            if times.len() >= crate::sim::control::MAIL_TIMES_KEPT {
                times.pop_front();
            }
            times.push_back(std::time::Instant::now());
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
        let mut smtputf8 = false;
        for p in params.split_whitespace() {
            let upper = p.to_ascii_uppercase();
            // Parameters of extensions the EHLO did not offer are syntax errors (RFC 5321 §4.1.1.11).
            let unoffered = (upper.starts_with("BODY=") && !cfg.smtp.eight_bit_mime)
                || (upper == "SMTPUTF8" && !cfg.smtp.smtputf8);
            if unoffered {
                return self.reply(conn, "501 5.5.4 Invalid arguments").await;
            }
            smtputf8 |= upper == "SMTPUTF8";
            if let Some(size) = upper.strip_prefix("SIZE=") {
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
        if !address.is_ascii() && !smtputf8 {
            return self.reply(conn, "501 5.5.4 Invalid arguments").await;
        }
        self.mail_from = Some(address);
        self.mail_params = params;
        self.smtputf8 = smtputf8;
        self.reply(conn, "250 2.1.0 Sender OK").await
    }

    pub(super) async fn rcpt<S: AsyncRead + AsyncWrite + Unpin>(
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
        if !address.is_ascii() && !self.smtputf8 {
            return self.reply(conn, "501 5.5.4 Invalid arguments").await;
        }
        if self.rcpts.len() >= cfg.smtp.max_recipients {
            return self.reply(conn, "452 4.5.3 Too many recipients").await;
        }
        self.rcpts.push(address);
        self.reply(conn, "250 2.1.5 Recipient OK").await
    }

    /// Sequence checks shared by DATA and BDAT; `Some(reply)` refuses the command.
    pub(super) fn transfer_refusal(&self, cfg: &SimConfig) -> Option<String> {
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
}
