//! The checks Exchange Online applies to a whole message at the final dot: content (size,
//! headers, From) and the per-mailbox rate and recipient limits.

use std::time::{Duration, Instant};

use super::parse::*;
use super::*;
use crate::sim::config::{RateMode, SendAsReply, SimConfig};

impl Session {
    /// Bare LF, size, header length and SendAs; `Some(reply)` refuses the message.
    pub(super) fn content_checks(
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
    pub(super) async fn limit_checks(
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
                    u.throttled += 1;
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
                        u.throttled += 1;
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
        if let Some(u) = self.ctx.shared.usage().get_mut(mailbox) {
            u.throttled += 1;
        }
        Err(format!(
            "432 4.3.2 STOREDRV.ClientSubmit; sender submission rate exceeded [Hostname={host}]"
        ))
    }
}
