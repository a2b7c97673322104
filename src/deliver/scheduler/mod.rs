//! The deliverer: drains the queue to Exchange Online at the pace Microsoft allows.
//!
//! One dispatcher task owns the schedule (which message is due when). It starts a delivery job
//! when a message is due, a connection slot is free (`upstream.connections`), the rate allows
//! (`upstream.rate`, evenly spaced) and the mailbox is not held. Jobs report back; the dispatcher
//! reschedules. The store is the only record: the schedule is rebuilt from it at start and
//! whenever the store says that something changed outside the deliverer (an operator command);
//! each committed message is announced by the store ([`StoreEvent::Committed`]).
//!
//! Here: the settings, the mailbox status and the dispatcher loop; `schedule.rs`: what is due
//! when; `attempt.rs`: one attempt from claim to the recorded outcome.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::classify::HoldCause;
use super::pacer::{Attempt, Pacer, PacerSettings, Progress, Start, Transition};
use crate::config::{Rate, RewriteFrom};
use crate::metrics::Metrics;
use crate::stop::StopBudget;
use crate::store::{EntryState, Store, StoreEvent};
use crate::transport::Transport;

mod attempt;
mod schedule;

pub use attempt::backoff;
use attempt::deliver_one;
use schedule::Schedule;

/// Delivery policy, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// The mailbox this deliverer sends as (for logs and status).
    pub mailbox: String,
    /// Envelope sender and the header From the mailbox may send as.
    pub from: String,
    pub rewrite_from: RewriteFrom,
    pub connections: usize,
    pub rate: Rate,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub max_age: Duration,
    /// `queue.notify`: who gets a delivery status report for a failed message.
    pub notify: Option<String>,
    /// Our name in reports (`smtp.hostname`) and the upstream's.
    pub reporting_host: String,
    pub upstream_host: String,
}

impl DeliverySettings {
    /// The policy `serve` delivers with; `upstream_host` is the TLS name of the upstream (for
    /// failure notices). Validation guarantees `mail_account` once `[oauth]` is configured.
    pub fn from_config(config: &crate::config::Config, upstream_host: &str) -> DeliverySettings {
        let up = &config.upstream;
        let mailbox = up.mail_account.clone().unwrap_or_default();
        DeliverySettings {
            from: up.from.clone().unwrap_or_else(|| mailbox.clone()),
            mailbox,
            rewrite_from: up.rewrite_from,
            connections: up.connections,
            rate: up.rate,
            retry_min: config.queue.retry_min,
            retry_max: config.queue.retry_max,
            max_age: config.queue.max_age,
            notify: config.queue.notify.clone(),
            reporting_host: config.smtp.hostname.clone(),
            upstream_host: upstream_host.to_string(),
        }
    }
}

/// The mailbox as a whole, shown by logs, `queue list` and (later) `/healthz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailboxState {
    Running,
    /// Paused: nothing is sent but one probe every `probe` interval.
    Held {
        cause: HoldCause,
        reply: String,
        since: SystemTime,
    },
}

impl MailboxState {
    /// The state as JSON for `/healthz` and the store's published status (read by `queue list`).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            MailboxState::Running => serde_json::json!({ "state": "running" }),
            MailboxState::Held {
                cause,
                reply,
                since,
            } => serde_json::json!({
                "state": "held",
                "reason": cause.to_string(),
                "reply": reply,
                "fix": cause.fix(),
                "since": humantime::format_rfc3339_seconds(*since).to_string(),
            }),
        }
    }
}

#[derive(Debug, Clone)]
pub struct MailboxStatus {
    pub state: MailboxState,
    /// Exchange asked to slow down (432/421) recently; sending is paced down until then.
    pub throttled_until: Option<SystemTime>,
    pub last_delivery: Option<SystemTime>,
    pub delivered: u64,
    pub queued: usize,
}

/// Lets the daemon and the admin endpoint talk to the deliverer (new mail reaches it through
/// the store's events).
#[derive(Clone)]
pub struct DeliveryHandle {
    events: mpsc::UnboundedSender<Event>,
    status: Arc<Mutex<MailboxStatus>>,
}

impl DeliveryHandle {
    /// New delivery settings (a reload): the next attempts, deferrals and the pacer's limits
    /// use them; a held mailbox probes at once (the change may be its fix).
    pub fn reconfigure(&self, settings: DeliverySettings) {
        let _ = self.events.send(Event::Reconfigure(Box::new(settings)));
    }

    pub fn status(&self) -> MailboxStatus {
        match self.status.lock() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

enum Event {
    Done(JobReport),
    Reconfigure(Box<DeliverySettings>),
}

/// What a job tells the dispatcher.
#[derive(Debug)]
pub(crate) enum JobResult {
    /// Delivered, failed for good, or no longer in `queue/`: nothing more to schedule.
    Finished {
        delivered: bool,
    },
    /// Nothing was attempted: the message was gone or could not be read.
    Skipped,
    Retry {
        at: Instant,
        throttle: bool,
        /// How far the attempt got (a hold ends only on proof that its cause is gone).
        reached: Progress,
        /// The upstream's `Retry-After`: the whole mailbox pauses that long.
        pause: Option<Duration>,
    },
    Hold {
        cause: HoldCause,
        reply: String,
    },
}

#[derive(Debug)]
struct JobReport {
    id: String,
    result: JobResult,
}

pub(crate) struct Context {
    store: Arc<dyn Store>,
    /// Replaced by a reload ([`DeliveryHandle::reconfigure`]); each use takes the current one.
    settings: RwLock<Arc<DeliverySettings>>,
    transport: Arc<dyn Transport>,
    metrics: Arc<Metrics>,
}

impl Context {
    fn settings(&self) -> Arc<DeliverySettings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub struct Deliverer;

impl Deliverer {
    /// Starts the dispatcher. It runs until `shutdown`, then waits for jobs in flight and
    /// closes the transport, all within the deadline of `stop`.
    pub fn start(
        store: Arc<dyn Store>,
        settings: DeliverySettings,
        transport: Arc<dyn Transport>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        stop: StopBudget,
    ) -> (DeliveryHandle, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let status = Arc::new(Mutex::new(MailboxStatus {
            state: MailboxState::Running,
            throttled_until: None,
            last_delivery: None,
            delivered: 0,
            queued: 0,
        }));
        let handle = DeliveryHandle {
            events: tx.clone(),
            status: status.clone(),
        };
        // Subscribed before the first read of the queue: nothing committed in between is missed.
        let changes = store.events();
        let ctx = Arc::new(Context {
            store,
            settings: RwLock::new(Arc::new(settings)),
            transport,
            metrics,
        });
        let task = tokio::spawn(dispatch(ctx, tx, rx, changes, status, shutdown, stop));
        (handle, task)
    }
}

/// Reports a job's end to the dispatcher even if the job panics: without a report its message
/// and its session slot would stay "in flight" for ever, and the relay would accept mail it
/// never delivers.
struct ReportOnDrop {
    tx: mpsc::UnboundedSender<Event>,
    id: String,
    retry_in: Duration,
    sent: bool,
}

impl ReportOnDrop {
    fn send(mut self, result: JobResult) {
        self.sent = true;
        let _ = self.tx.send(Event::Done(JobReport {
            id: std::mem::take(&mut self.id),
            result,
        }));
    }
}

impl Drop for ReportOnDrop {
    fn drop(&mut self) {
        if self.sent {
            return;
        }
        tracing::error!(id = %self.id, "delivery attempt panicked; the message stays queued");
        let _ = self.tx.send(Event::Done(JobReport {
            id: std::mem::take(&mut self.id),
            result: JobResult::Retry {
                at: Instant::now() + self.retry_in,
                throttle: false,
                reached: Progress::Token,
                pause: None,
            },
        }));
    }
}

async fn dispatch(
    ctx: Arc<Context>,
    tx: mpsc::UnboundedSender<Event>,
    mut rx: mpsc::UnboundedReceiver<Event>,
    mut changes: tokio::sync::broadcast::Receiver<StoreEvent>,
    status: Arc<Mutex<MailboxStatus>>,
    shutdown: CancellationToken,
    stop: StopBudget,
) {
    use tokio::sync::broadcast::error::RecvError;
    crate::failpoint::panic_point("task-dispatcher");
    let mut schedule = Schedule::default();
    let mut pacer = Pacer::new(pacer_settings(&ctx.settings()), Instant::now());
    rescan(&ctx, &mut schedule).await;
    publish(&ctx, &status, &schedule).await;
    // False once the store's event channel closed (the store is gone): no busy loop on it.
    let mut listening = true;

    loop {
        // Start every job that is due, as far as the pacer allows.
        let now = Instant::now();
        let mut wake = now + Duration::from_secs(1);
        while let Some((at, id)) = schedule.first() {
            if at > now {
                wake = wake.min(at);
                break;
            }
            match pacer.try_start(now) {
                Start::Now { probe } => {
                    if probe {
                        tracing::info!(id = %id, "mailbox held: probing with one message");
                    }
                }
                Start::At(when) => {
                    wake = wake.min(when.max(now));
                    break;
                }
                Start::Busy => break,
            }
            schedule.start(at, &id);
            let ctx = ctx.clone();
            let report = ReportOnDrop {
                tx: tx.clone(),
                id: id.clone(),
                retry_in: ctx.settings().retry_max,
                sent: false,
            };
            tokio::spawn(async move {
                let result = deliver_one(&ctx, &id).await;
                report.send(result);
            });
        }

        tokio::select! {
            change = changes.recv(), if listening => match change {
                Ok(StoreEvent::Committed(id)) => schedule.add(id, Instant::now()),
                // An operator command (or more changes than the backlog holds): read it all.
                Ok(StoreEvent::Changed) | Err(RecvError::Lagged(_)) => {
                    rescan(&ctx, &mut schedule).await;
                    pacer.wake(Instant::now());
                    publish(&ctx, &status, &schedule).await;
                }
                Err(RecvError::Closed) => listening = false,
            },
            event = rx.recv() => match event {
                Some(Event::Reconfigure(settings)) => {
                    pacer.set_settings(pacer_settings(&settings));
                    pacer.wake(Instant::now());
                    *ctx.settings.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(*settings);
                    tracing::info!("delivery settings reloaded");
                }
                Some(Event::Done(report)) => {
                    let again = schedule.finished(&report.id);
                    let now = Instant::now();
                    let attempt = match &report.result {
                        JobResult::Finished { delivered: true } => Attempt::Delivered,
                        JobResult::Finished { delivered: false } => Attempt::Failed,
                        JobResult::Skipped => Attempt::Skipped,
                        JobResult::Retry { throttle, reached, pause, .. } => Attempt::Retry {
                            throttle: *throttle,
                            reached: *reached,
                            pause: *pause,
                        },
                        JobResult::Hold { cause, reply } => Attempt::Hold {
                            cause: *cause,
                            reply: reply.clone(),
                        },
                    };
                    match pacer.finished(now, attempt) {
                        Transition::None => {}
                        Transition::Held { cause, reply, since } => {
                            enter_hold(&ctx, &status, cause, &reply, since)
                        }
                        Transition::Resumed => resume(&ctx, &status),
                    }
                    if let Ok(mut s) = status.lock() {
                        s.throttled_until = pacer
                            .throttled_until(now)
                            .map(|until| SystemTime::now() + (until - now));
                        if matches!(report.result, JobResult::Finished { delivered: true }) {
                            s.delivered += 1;
                            s.last_delivery = Some(SystemTime::now());
                        }
                    }
                    match report.result {
                        JobResult::Finished { .. } | JobResult::Skipped => {}
                        // An operator held or deleted it during the attempt: it stays out.
                        JobResult::Retry { .. } | JobResult::Hold { .. } if !again => {}
                        JobResult::Retry { at, .. } => schedule.add(report.id, at),
                        // Held: the message waits for the mailbox's next probe.
                        JobResult::Hold { .. } => schedule.add(report.id, now),
                    }
                    publish(&ctx, &status, &schedule).await;
                }
                None => break,
            },
            _ = tokio::time::sleep_until(wake) => {}
            _ = shutdown.cancelled() => break,
        }
    }

    // Shutdown: jobs in flight finish, then QUIT, all by the stop deadline.
    let attempts_deadline = stop.attempts_deadline();
    while !schedule.in_flight.is_empty() {
        match tokio::time::timeout_at(attempts_deadline, rx.recv()).await {
            Ok(Some(Event::Done(report))) => {
                schedule.in_flight.remove(&report.id);
            }
            Ok(Some(Event::Reconfigure(_))) => {}
            Ok(None) | Err(_) => break,
        }
    }
    if !schedule.in_flight.is_empty() {
        tracing::warn!(
            attempts = schedule.in_flight.len(),
            stop_timeout = %humantime::format_duration(stop.budget()),
            "stop deadline: delivery attempts still running are abandoned; their messages stay \
             queued and are sent after the restart (possibly twice, if Exchange already had them)"
        );
    }
    if tokio::time::timeout_at(stop.deadline(), ctx.transport.close())
        .await
        .is_err()
    {
        tracing::warn!("stop deadline: not every upstream session got its QUIT");
    }
    tracing::info!("deliverer stopped");
}

/// The pacer's limits from the delivery settings.
fn pacer_settings(settings: &DeliverySettings) -> PacerSettings {
    PacerSettings::new(
        settings.connections,
        settings.rate.messages,
        settings.rate.per,
        settings.retry_min,
        settings.retry_max,
    )
}

/// Reads the queue and makes the schedule agree with it ([`Schedule::sync`]): each message
/// at its recorded next attempt (or now); held and deleted ones are dropped.
async fn rescan(ctx: &Arc<Context>, schedule: &mut Schedule) {
    let entries = match ctx.store.list().await {
        Ok(entries) => entries,
        Err(e) => {
            tracing::error!(error = %e, "cannot list the queue");
            return;
        }
    };
    let now_sys = SystemTime::now();
    let now = Instant::now();
    let queued = entries
        .into_iter()
        .filter(|e| e.state == EntryState::Queued)
        .map(|entry| {
            let at = entry
                .delivery
                .as_ref()
                .and_then(|d| d.next_attempt)
                .and_then(|t| t.duration_since(now_sys).ok())
                .map_or(now, |wait| now + wait);
            (entry.id, at)
        })
        .collect();
    let (added, dropped) = schedule.sync(queued);
    if added + dropped > 0 {
        tracing::debug!(added, dropped, "schedule follows the queue");
    }
}

fn enter_hold(
    ctx: &Context,
    status: &Mutex<MailboxStatus>,
    cause: HoldCause,
    reply: &str,
    since: SystemTime,
) {
    tracing::error!(
        mailbox = %ctx.settings().mailbox,
        cause = %cause,
        reply = %reply,
        fix = cause.fix(),
        "delivery held: every message stays queued until this is fixed"
    );
    if let Ok(mut s) = status.lock() {
        s.state = MailboxState::Held {
            cause,
            reply: reply.to_string(),
            since,
        };
    }
}

fn resume(ctx: &Context, status: &Mutex<MailboxStatus>) {
    tracing::info!(mailbox = %ctx.settings().mailbox, "delivery resumed");
    if let Ok(mut s) = status.lock() {
        s.state = MailboxState::Running;
    }
}

/// Publishes the mailbox status for `queue list` (best effort; the store is the record).
async fn publish(ctx: &Context, status: &Mutex<MailboxStatus>, schedule: &Schedule) {
    let snapshot = match status.lock() {
        Ok(mut s) => {
            s.queued = schedule.queued();
            s.clone()
        }
        Err(_) => return,
    };
    let mailbox = ctx.settings().mailbox.clone();
    ctx.store
        .publish_status(&mailbox, &snapshot.state.to_json())
        .await;
}
