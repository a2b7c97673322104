//! DATA and BDAT: receiving the message into the spool and answering only once it is durable.

use std::slice::Iter;
use std::time::SystemTime;

use smtp_proto::request::receiver::BdatReceiver;
use smtp_proto::{MAIL_BODY_8BITMIME, MAIL_RET_FULL, MAIL_RET_HDRS, MAIL_SMTPUTF8};

use super::framing::{DataDecoder, LineEnds};
use super::message::{MessageWriter, TraceInfo};
use super::reply::{self, Reply};
use super::session::{BdatTransfer, Session, Skip, State};
use crate::store::{BodyType, Envelope, MailParams, StoreError};

/// Decoded bytes are handed to the spool writer in pieces of about this size, so memory per
/// session stays bounded however large the message is.
const WRITE_CHUNK: usize = 64 * 1024;

impl Session {
    pub(super) async fn handle_data(&mut self) {
        let Some(tx) = self.tx.as_ref() else {
            return self.reply(reply::NEED_MAIL);
        };
        if tx.bdat.is_some() {
            return self.reply(reply::MIXED_DATA_BDAT);
        }
        if tx.recipients.is_empty() {
            // RFC 2920 §3.1: DATA after every RCPT failed gets 503/554, never 354.
            return self.reply(reply::NO_VALID_RECIPIENTS);
        }
        let writer = match self.open_message().await {
            Ok(writer) => writer,
            Err(reply) => return self.reply(reply),
        };
        self.state = State::Data {
            decoder: DataDecoder::new(),
            writer: Box::new(writer),
        };
        self.reply(reply::START_DATA);
    }

    /// Creates the spool entry for the current transaction (free space is checked again here:
    /// time has passed since MAIL).
    async fn open_message(&mut self) -> Result<MessageWriter, Reply> {
        self.shared.check_free_space(0)?;
        let tx = self.tx.as_ref().ok_or(reply::NEED_MAIL)?;
        let received_at = SystemTime::now();
        let envelope = Envelope {
            mail_from: tx.mail_from.clone(),
            mail_params: MailParams {
                body: if tx.mail_flags & MAIL_BODY_8BITMIME != 0 {
                    BodyType::EightBitMime
                } else {
                    BodyType::SevenBit
                },
                smtputf8: tx.mail_flags & MAIL_SMTPUTF8 != 0,
                envid: tx.env_id.clone(),
                ret: if tx.mail_flags & MAIL_RET_FULL != 0 {
                    Some("FULL".into())
                } else if tx.mail_flags & MAIL_RET_HDRS != 0 {
                    Some("HDRS".into())
                } else {
                    None
                },
            },
            recipients: tx.recipients.clone(),
            client: self.peer.to_string(),
            helo: self.helo.clone().unwrap_or_default(),
            auth_user: self.auth_user.clone(),
            received_at,
            route: tx.route.clone(),
        };
        let incoming = self.shared.store.put(&envelope).await.map_err(|e| {
            tracing::error!(client = %self.peer, error = %e, "cannot create spool entry");
            spool_error_reply(&e)
        })?;
        let protocol = match (self.esmtp, self.tls, self.auth_user.is_some()) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        };
        let trace = TraceInfo {
            helo: self.helo.clone().unwrap_or_else(|| "unknown".into()),
            client_ip: self.peer.ip().to_canonical().to_string(),
            hostname: self.shared.settings.hostname.clone(),
            protocol,
            single_recipient: (tx.recipients.len() == 1).then(|| tx.recipients[0].address.clone()),
            received_at,
        };
        Ok(MessageWriter::new(incoming, trace))
    }

    /// The transaction's route's limit (the listener's when there is no transaction).
    fn size_limit(&self) -> u64 {
        self.tx
            .as_ref()
            .map_or(self.shared.settings.max_message_size, |tx| tx.size_limit)
    }

    /// Consumes DATA bytes; returns false when `it` is exhausted before the end of data.
    pub(super) async fn ingest_data(&mut self, it: &mut Iter<'_, u8>) -> bool {
        let max = self.size_limit();
        match &mut self.state {
            State::Data { decoder, writer } => {
                let mut chunk = Vec::with_capacity(it.len().min(WRITE_CHUNK) + 8);
                loop {
                    // Decode at most WRITE_CHUNK input bytes at a time.
                    let rest = it.as_slice();
                    let take = rest.len().min(WRITE_CHUNK);
                    chunk.clear();
                    let used = decoder.decode(&rest[..take], &mut chunk);
                    *it = rest[used..].iter();
                    let done = decoder.is_done();
                    let too_big = writer.received() + chunk.len() as u64 > max;
                    let result = if too_big {
                        Err(reply::MESSAGE_TOO_BIG)
                    } else {
                        writer.push(&chunk).await.map_err(|e| {
                            tracing::error!(client = %self.peer, error = %e, "spool write failed");
                            spool_error_reply(&e)
                        })
                    };
                    if let Err(reply) = result {
                        if done {
                            // The end marker came with the refused bytes.
                            let state = std::mem::replace(&mut self.state, State::command());
                            if let State::Data { writer, .. } = state {
                                writer.abort().await;
                            }
                            self.tx = None;
                            self.reply(reply);
                            return true;
                        }
                        // Read on to the end of the data, then refuse; the partial file goes.
                        let skip = Skip::Data(decoder.clone());
                        let state =
                            std::mem::replace(&mut self.state, State::SkipData { skip, reply });
                        if let State::Data { writer, .. } = state {
                            writer.abort().await;
                        }
                        return true;
                    }
                    if done {
                        let state = std::mem::replace(&mut self.state, State::command());
                        if let State::Data { writer, .. } = state {
                            self.commit_message(*writer).await;
                        }
                        return true;
                    }
                    if it.len() == 0 {
                        return false;
                    }
                }
            }
            State::SkipData { skip, reply } => {
                let done = match skip {
                    Skip::Data(decoder) => {
                        let mut discard = Vec::new();
                        loop {
                            let rest = it.as_slice();
                            let take = rest.len().min(WRITE_CHUNK);
                            discard.clear();
                            let used = decoder.decode(&rest[..take], &mut discard);
                            *it = rest[used..].iter();
                            if decoder.is_done() || it.len() == 0 {
                                break decoder.is_done();
                            }
                        }
                    }
                    Skip::Bdat(left) => {
                        let rest = it.as_slice();
                        let n = rest.len().min(*left);
                        *left -= n;
                        *it = rest[n..].iter();
                        *left == 0
                    }
                };
                if done {
                    let reply = reply.clone();
                    self.state = State::command();
                    self.tx = None;
                    self.reply(reply);
                }
                done
            }
            _ => true,
        }
    }

    /// RFC 3030: `BDAT <size> [LAST]`, exactly `size` octets follow, one reply per chunk.
    pub(super) async fn handle_bdat(&mut self, chunk_size: usize, is_last: bool) {
        let Some(tx) = self.tx.as_ref() else {
            return self.refuse_bdat(chunk_size, reply::NEED_MAIL);
        };
        if tx.recipients.is_empty() {
            return self.refuse_bdat(chunk_size, reply::NO_VALID_RECIPIENTS);
        }
        if tx.bdat.is_none() {
            let transfer = match self.open_message().await {
                Ok(writer) => BdatTransfer {
                    writer: Some(writer),
                    failure: None,
                    line_ends: LineEnds::new(),
                },
                Err(reply) => BdatTransfer {
                    writer: None,
                    failure: Some(reply),
                    line_ends: LineEnds::new(),
                },
            };
            if let Some(tx) = self.tx.as_mut() {
                tx.bdat = Some(transfer);
            }
        }
        self.state = State::Bdat {
            receiver: BdatReceiver::new(chunk_size, is_last),
        };
        if chunk_size == 0 {
            self.finish_bdat_chunk(is_last).await;
        }
    }

    fn refuse_bdat(&mut self, chunk_size: usize, reply: Reply) {
        if chunk_size == 0 {
            return self.reply(reply);
        }
        // Still consume the chunk so the session stays in step with the client.
        self.state = State::SkipData {
            skip: Skip::Bdat(chunk_size),
            reply,
        };
    }

    pub(super) async fn ingest_bdat(&mut self, it: &mut Iter<'_, u8>) -> bool {
        let max = self.size_limit();
        let State::Bdat { receiver } = &mut self.state else {
            return true;
        };
        let mut raw = Vec::with_capacity(it.len().min(WRITE_CHUNK));
        let done = receiver.ingest(it, &mut raw);
        let is_last = receiver.is_last;
        if let Some(transfer) = self.tx.as_mut().and_then(|tx| tx.bdat.as_mut())
            && let Some(writer) = transfer.writer.as_mut()
        {
            // BDAT content has no end marker to protect, but the same bare CR/LF rule applies,
            // so a later hop that speaks DATA never sees a line end the client did not send.
            let mut chunk = Vec::with_capacity(raw.len() + 8);
            transfer.line_ends.normalise(&raw, &mut chunk);
            let failure = if writer.received() + chunk.len() as u64 > max {
                Some(reply::MESSAGE_TOO_BIG)
            } else {
                writer.push(&chunk).await.err().map(|e| {
                    tracing::error!(client = %self.peer, error = %e, "spool write failed");
                    spool_error_reply(&e)
                })
            };
            if let Some(reply) = failure {
                transfer.failure = Some(reply);
                if let Some(writer) = transfer.writer.take() {
                    writer.abort().await;
                }
            }
        }
        if done {
            self.finish_bdat_chunk(is_last).await;
        }
        done
    }

    async fn finish_bdat_chunk(&mut self, is_last: bool) {
        self.state = State::command();
        let failure = self
            .tx
            .as_ref()
            .and_then(|tx| tx.bdat.as_ref())
            .and_then(|b| b.failure.clone());
        if let Some(reply) = failure {
            // RFC 3030 §4.2: after a failed chunk the client sends no more chunks of this
            // transaction; any it pipelined meet "need MAIL" and are skipped.
            self.abort_bdat().await;
            return self.reply(reply);
        }
        if !is_last {
            return self.reply(reply::OK);
        }
        let Some(mut transfer) = self.tx.as_mut().and_then(|tx| tx.bdat.take()) else {
            return self.reply(reply::NEED_MAIL);
        };
        let Some(mut writer) = transfer.writer.take() else {
            return self.reply(reply::NEED_MAIL);
        };
        // A CR that ended the last chunk was a bare CR.
        let mut tail = Vec::new();
        transfer.line_ends.finish(&mut tail);
        if let Err(e) = writer.push(&tail).await {
            tracing::error!(client = %self.peer, error = %e, "spool write failed");
            writer.abort().await;
            self.tx = None;
            return self.reply(spool_error_reply(&e));
        }
        self.commit_message(writer).await
    }

    /// Ends the transaction and drops a BDAT message in progress.
    pub(super) async fn abort_bdat(&mut self) {
        if let Some(mut tx) = self.tx.take()
            && let Some(bdat) = tx.bdat.take()
            && let Some(writer) = bdat.writer
        {
            writer.abort().await;
        }
    }

    /// The commit point: 250 only after the spool says the message is on stable storage.
    async fn commit_message(&mut self, writer: MessageWriter) {
        let size = writer.received();
        let tx = self.tx.take();
        match writer.commit().await {
            Ok(id) => {
                let (from, rcpts) = tx
                    .map(|tx| (tx.mail_from, tx.recipients.len()))
                    .unwrap_or_default();
                tracing::info!(
                    id = %id,
                    client = %self.peer,
                    from = %from,
                    recipients = rcpts,
                    size,
                    "accepted"
                );
                self.shared
                    .accepted
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                crate::metrics::Metrics::inc(&self.shared.metrics.accepted);
                self.reply(Reply::with_text(250, "2.0.0", format!("queued as {id}")));
                self.acked = true;
            }
            Err(e) => {
                tracing::error!(client = %self.peer, error = %e, "spool commit failed; message refused");
                self.reply(spool_error_reply(&e));
            }
        }
    }
}

fn spool_error_reply(error: &StoreError) -> Reply {
    if error.is_full() {
        reply::NO_SPACE
    } else {
        reply::LOCAL_ERROR
    }
}
