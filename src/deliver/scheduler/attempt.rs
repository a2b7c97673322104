//! One delivery attempt: claim the message, apply the sender policy, hand it to the transport,
//! record each recipient's outcome in the store, and tell the dispatcher what comes next
//! (delivered, retry at, hold, failed with a notice).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{Context, JobResult};
use crate::deliver::classify::Outcome;
use crate::deliver::jitter;
use crate::deliver::pacer::Progress;
use crate::deliver::sender::apply_to_body;
use crate::metrics::Metrics;
use crate::store::{
    DeliveryState, LoadedMessage, PossibleDuplicate, RecipientState, RecipientStatus,
    RecordedReply, StoreError,
};
use crate::transport::Submission;

/// One delivery attempt for one message.
pub(super) async fn deliver_one(ctx: &Arc<Context>, id: &str) -> JobResult {
    let claimed = match ctx.store.claim(id).await {
        Ok(Some(claimed)) => claimed,
        // No longer queued, or held by the store (its state was written by a newer relay).
        Ok(None) | Err(StoreError::NotFound(_)) => return JobResult::Skipped,
        Err(e) => {
            tracing::error!(id, error = %e, "cannot read the message; it stays in the queue");
            return JobResult::Retry {
                at: Instant::now() + ctx.settings().retry_max,
                throttle: false,
                reached: Progress::Token,
                pause: None,
            };
        }
    };
    let message = &claimed.message;
    // Never with another route's credentials: a reload may have moved the message meanwhile
    // (the rescan that follows every reload places it again).
    if message.envelope.route != ctx.route {
        tracing::warn!(
            id,
            route = %message.envelope.route,
            lane = %ctx.route,
            "message is not this route's: not sent here"
        );
        return JobResult::Skipped;
    }
    let mut state = claimed.state.clone().unwrap_or_default();
    if state.recipients.is_empty() {
        state.recipients = message
            .envelope
            .recipients
            .iter()
            .map(|r| RecipientState {
                address: r.address.clone(),
                status: RecipientStatus::Pending,
                reply: None,
            })
            .collect();
    }
    let age = SystemTime::now()
        .duration_since(message.envelope.received_at)
        .unwrap_or_default();
    if age > ctx.settings().max_age {
        let reason = format!(
            "expired after {} in the queue ({} attempts); last reply: {}",
            humantime::format_duration(Duration::from_secs(age.as_secs())),
            state.attempts,
            state
                .last_reply
                .as_ref()
                .map_or_else(|| "none".to_string(), |r| r.to_string())
        );
        // Nothing was sent: the mailbox learnt nothing from it.
        finish_failed(ctx, message, state, reason).await;
        return JobResult::Skipped;
    }

    let outcome = attempt(ctx, message, &mut state).await;
    state.attempts += 1;
    record(ctx, message, state, outcome).await
}

/// The per-attempt result before it is written down.
struct AttemptOutcome {
    /// The class that applies to every recipient still pending after this attempt.
    pending_class: Outcome,
    /// The reply that decided it, for logs and the state file.
    reply: RecordedReply,
    /// How far the attempt got.
    reached: Progress,
    /// The upstream's `Retry-After`: a retry never comes sooner.
    retry_after: Option<Duration>,
}

/// Sends the message to its pending recipients through the transport, updating per-recipient
/// status in `state`.
async fn attempt(
    ctx: &Arc<Context>,
    message: &LoadedMessage,
    state: &mut DeliveryState,
) -> AttemptOutcome {
    let id = &message.id;
    let pending: Vec<String> = state
        .recipients
        .iter()
        .filter(|r| r.status == RecipientStatus::Pending)
        .map(|r| r.address.clone())
        .collect();
    if pending.is_empty() {
        return AttemptOutcome {
            pending_class: Outcome::Delivered,
            reply: RecordedReply::local("no recipient left"),
            reached: Progress::Transaction,
            retry_after: None,
        };
    }
    let body = apply_to_body(
        &message.body,
        &ctx.settings().from,
        ctx.settings().rewrite_from,
    );
    let started = std::time::Instant::now();
    let attempted = ctx
        .transport
        .send(Submission {
            id,
            envelope: &message.envelope,
            mail_from: &ctx.settings().from,
            recipients: &pending,
            body: &body,
        })
        .await;
    // The whole message went out and no 250 came back: Exchange may have it anyway.
    if let Some(after) = &attempted.after_dot {
        note_possible_duplicate(
            ctx,
            id,
            state,
            after.dot_at,
            after.what.clone(),
            after.upstream_id.clone(),
        );
    }
    let mut decisive: Option<(Outcome, RecordedReply)> = None;
    for (address, result) in pending.iter().zip(&attempted.recipients) {
        let Some(rcpt) = state.recipients.iter_mut().find(|r| &r.address == address) else {
            continue;
        };
        let reply = result.reply.record();
        rcpt.reply = Some(reply.clone());
        match result.class {
            Outcome::Delivered => rcpt.status = RecipientStatus::Delivered,
            Outcome::Failed => rcpt.status = RecipientStatus::Failed,
            class @ (Outcome::Retry { .. } | Outcome::Hold(_)) => {
                // Hold outranks Retry for the message as a whole.
                let stronger = matches!(
                    (&decisive, class),
                    (None, _) | (Some((Outcome::Retry { .. }, _)), Outcome::Hold(_))
                );
                if stronger {
                    decisive = Some((class, reply));
                }
            }
        }
    }
    let summary = attempted.summary.record();
    let millis = started.elapsed().as_millis() as u64;
    match &decisive {
        Some((class, _)) => tracing::warn!(
            id = %id,
            reply = %summary,
            outcome = ?class,
            reached = ?attempted.reached,
            millis,
            "delivery attempt failed"
        ),
        None => tracing::info!(
            id = %id,
            reply = %summary,
            recipients = pending.len(),
            millis,
            "delivery attempt"
        ),
    }
    match decisive {
        Some((pending_class, reply)) => AttemptOutcome {
            pending_class,
            reply,
            reached: attempted.reached,
            retry_after: attempted.retry_after,
        },
        None => AttemptOutcome {
            pending_class: Outcome::Delivered,
            reply: summary,
            reached: attempted.reached,
            retry_after: attempted.retry_after,
        },
    }
}

/// Records, logs and counts an attempt that may have delivered without the relay knowing.
fn note_possible_duplicate(
    ctx: &Context,
    id: &str,
    state: &mut DeliveryState,
    dot_at: SystemTime,
    after_dot: String,
    upstream_id: Option<String>,
) {
    let dup = state
        .possible_duplicate
        .get_or_insert_with(|| PossibleDuplicate {
            first_dot_at: dot_at,
            attempts: 0,
            after_dot: String::new(),
            upstream_id: None,
        });
    dup.attempts += 1;
    dup.after_dot = after_dot;
    if upstream_id.is_some() {
        dup.upstream_id = upstream_id;
    }
    Metrics::inc(&ctx.metrics.possible_duplicates);
    tracing::warn!(
        id,
        first_dot_at = %humantime::format_rfc3339_millis(dup.first_dot_at),
        attempts_without_250 = dup.attempts,
        after_dot = %dup.after_dot,
        upstream_id = %dup.upstream_id.as_deref().unwrap_or("unknown"),
        "possible duplicate: the whole message was sent but no 250 came back; \
         the retry may give the recipients a second copy"
    );
}

/// Writes the attempt down and tells the dispatcher what comes next.
async fn record(
    ctx: &Arc<Context>,
    message: &LoadedMessage,
    mut state: DeliveryState,
    outcome: AttemptOutcome,
) -> JobResult {
    let id = message.id.as_str();
    state.last_reply = Some(outcome.reply.clone());
    let all_final = state
        .recipients
        .iter()
        .all(|r| r.status != RecipientStatus::Pending);
    if all_final {
        let failed: Vec<String> = state
            .recipients
            .iter()
            .filter(|r| r.status == RecipientStatus::Failed)
            .map(|r| {
                let reply = r.reply.as_ref().map(|r| r.to_string()).unwrap_or_default();
                format!("{}: {reply}", r.address)
            })
            .collect();
        if failed.is_empty() {
            crate::failpoint::hit("after-upstream-250");
            return match ctx.store.complete(id).await {
                Ok(removed) => {
                    Metrics::inc(&ctx.metrics.delivered);
                    match &state.possible_duplicate {
                        None => tracing::info!(id, reply = %outcome.reply, "delivered"),
                        Some(dup) => tracing::warn!(
                            id,
                            reply = %outcome.reply,
                            first_dot_at = %humantime::format_rfc3339_millis(dup.first_dot_at),
                            attempts_without_250 = dup.attempts,
                            "delivered; possible duplicate: an earlier attempt sent the whole \
                             message without getting a 250"
                        ),
                    }
                    if !removed {
                        // `complete` only removes a queued message: an operator moved it meanwhile.
                        tracing::warn!(
                            id,
                            "delivered while an operator held or deleted it; a held copy stays held"
                        );
                    }
                    JobResult::Finished { delivered: true }
                }
                Err(e) => {
                    // Delivered but still stored: it will be sent again (at-least-once).
                    tracing::error!(id, error = %e, "delivered, but removing it from the queue failed");
                    JobResult::Finished { delivered: true }
                }
            };
        }
        return finish_failed(ctx, message, state, failed.join("; ")).await;
    }
    let result = match outcome.pending_class {
        Outcome::Hold(cause) => {
            Metrics::inc(&ctx.metrics.held);
            state.hold_reason = Some(format!("{cause}: {}", outcome.reply));
            state.next_attempt = None;
            JobResult::Hold {
                cause,
                reply: outcome.reply.to_string(),
            }
        }
        Outcome::Retry { throttle } => {
            Metrics::inc(&ctx.metrics.retried);
            let wait = if throttle {
                ctx.settings().retry_min
            } else {
                backoff(
                    state.attempts,
                    ctx.settings().retry_min,
                    ctx.settings().retry_max,
                )
            };
            // The upstream said when to come back (Graph 429/503): never sooner, and never
            // beyond the longest wait the relay allows between two attempts.
            let wait = match outcome.retry_after {
                Some(asked) => wait.max(asked.min(crate::config::RETRY_CEILING)),
                None => wait,
            };
            state.hold_reason = None;
            state.next_attempt = Some(SystemTime::now() + wait);
            tracing::info!(id, attempts = state.attempts, retry_in = %humantime::format_duration(Duration::from_secs(wait.as_secs())), "delivery deferred");
            JobResult::Retry {
                at: Instant::now() + wait,
                throttle,
                reached: outcome.reached,
                pause: outcome.retry_after,
            }
        }
        // Delivered/Failed for pending recipients cannot happen: they would be final.
        Outcome::Delivered | Outcome::Failed => JobResult::Retry {
            at: Instant::now() + ctx.settings().retry_min,
            throttle: false,
            reached: outcome.reached,
            pause: None,
        },
    };
    match ctx.store.update(id, &state).await {
        Ok(()) | Err(StoreError::NotFound(_)) => {}
        Err(e) => tracing::error!(id, error = %e, "cannot record the delivery attempt"),
    }
    result
}

/// Permanent failure: the message is kept as failed with its reason; it is never deleted.
async fn finish_failed(
    ctx: &Arc<Context>,
    message: &LoadedMessage,
    mut state: DeliveryState,
    reason: String,
) -> JobResult {
    let id = message.id.as_str();
    Metrics::inc(&ctx.metrics.failed);
    tracing::error!(id, reason = %reason, "delivery failed; the message is kept as failed");
    state.fail_reason = Some(reason.clone());
    state.next_attempt = None;
    match ctx.store.fail(id, &state).await {
        Ok(()) | Err(StoreError::NotFound(_)) => {}
        Err(e) => tracing::error!(id, error = %e, "cannot record the message as failed"),
    }
    // A notice is sent for mail from an application, never for a notice (null sender).
    if let Some(to) = &ctx.settings().notify
        && !message.envelope.mail_from.is_empty()
    {
        match queue_notice(ctx, message, &state, &reason, to).await {
            // The store announces it like any new message.
            Ok(notice) => tracing::info!(id, notice = %notice, to = %to, "failure notice queued"),
            Err(e) => tracing::error!(id, error = %e, "cannot queue the failure notice"),
        }
    }
    JobResult::Finished { delivered: false }
}

/// Builds the delivery status report and commits it to the store like received mail.
async fn queue_notice(
    ctx: &Arc<Context>,
    message: &LoadedMessage,
    state: &DeliveryState,
    reason: &str,
    to: &str,
) -> Result<String, StoreError> {
    // The header section is in memory (the body's head); nothing else is read.
    let head = message.body.head();
    let parsed = crate::headers::Headers::parse(head);
    let headers_end = if parsed.complete() {
        parsed.section().len()
    } else {
        head.len().min(64 * 1024)
    };
    let bytes = crate::deliver::notice::build(
        &crate::deliver::notice::NoticeInput {
            id: &message.id,
            envelope: &message.envelope,
            state,
            reason,
            headers: &head[..headers_end],
            from: &ctx.settings().from,
            to,
            reporting_host: &ctx.settings().reporting_host,
            upstream_host: &ctx.settings().upstream_host,
        },
        SystemTime::now(),
    );
    let envelope = crate::store::Envelope {
        mail_from: String::new(),
        mail_params: Default::default(),
        recipients: vec![crate::store::Recipient::new(to)],
        client: "smtp-oauth-relay".into(),
        helo: ctx.settings().reporting_host.clone(),
        auth_user: None,
        received_at: SystemTime::now(),
        // The notice is sent as the failed message was: same route, same mailbox.
        route: message.envelope.route.clone(),
    };
    let mut incoming = ctx.store.put(&envelope).await?;
    incoming.write(&bytes).await?;
    incoming.commit().await
}

/// Exponential backoff from `min` doubling per attempt up to `max`, with ±20% jitter so a
/// burst of deferred messages does not come back at the same instant.
pub fn backoff(attempts: u32, min: Duration, max: Duration) -> Duration {
    let exp = attempts.saturating_sub(1).min(20);
    let base = min.saturating_mul(1u32 << exp).min(max);
    let spread = base.as_millis() as u64 / 5;
    let offset = if spread == 0 {
        0
    } else {
        jitter() % (2 * spread + 1)
    };
    let millis = (base.as_millis() as u64 + offset).saturating_sub(spread);
    Duration::from_millis(
        millis
            .max(min.as_millis() as u64)
            .min(max.as_millis() as u64 + spread),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_bounds_with_jitter() {
        let (min, max) = (Duration::from_secs(60), Duration::from_secs(3600));
        for attempts in 1..12 {
            let d = backoff(attempts, min, max);
            let expected = (60u64 << (attempts - 1).min(20)).min(3600);
            let lo = (expected as f64 * 0.8).max(60.0) as u64;
            let hi = (expected as f64 * 1.2) as u64 + 1;
            assert!(
                (lo..=hi).contains(&d.as_secs()),
                "attempt {attempts}: {d:?} not in {lo}..={hi}"
            );
        }
    }
}
