//! DATA and BDAT: receiving the body, and the reply to the end of data.

use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};

use super::parse::*;
use super::*;
use crate::sim::config::SimConfig;
use crate::sim::control::SmtpStage;
use crate::sim::mailbox::Envelope;

impl Session {
    pub(super) async fn data<S: AsyncRead + AsyncWrite + Unpin>(
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
    pub(super) async fn read_data<S: AsyncRead + AsyncWrite + Unpin>(
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
    pub(super) async fn take_bytes<S: AsyncRead + AsyncWrite + Unpin>(
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

    pub(super) async fn skip_bytes<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut Conn<S>,
        n: usize,
        cfg: &SimConfig,
    ) -> Result<(), ReadEnd> {
        self.take_bytes(conn, n, cfg, None).await
    }

    pub(super) async fn bdat<S: AsyncRead + AsyncWrite + Unpin>(
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
    pub(super) async fn end_of_data<S: AsyncRead + AsyncWrite + Unpin>(
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
        let mail_params = std::mem::take(&mut self.mail_params);
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
            mail_params,
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

        if !cfg.smtp.data_end_delay.is_zero() {
            tokio::time::sleep(cfg.smtp.data_end_delay).await;
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
}
