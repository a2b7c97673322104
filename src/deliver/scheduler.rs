//! The deliverer: drains the queue to Exchange Online at the pace Microsoft allows.
//!
//! One dispatcher task owns the schedule (which message is due when). It starts a delivery job
//! when a message is due, a connection slot is free (`upstream.connections`), the rate allows
//! (`upstream.rate`, evenly spaced) and the mailbox is not held. Jobs report back; the dispatcher
//! reschedules. The store is the only record: the schedule is rebuilt from it at start and
//! whenever the store says that something changed outside the deliverer (an operator command);
//! each committed message is announced by the store ([`StoreEvent::Committed`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::classify::{HoldCause, Outcome};
use super::jitter;
use super::pacer::{Attempt, Pacer, PacerSettings, Progress, Start, Transition};
use super::sender::apply_to_body;
use crate::config::{Rate, RewriteFrom};
use crate::metrics::Metrics;
use crate::stop::StopBudget;
use crate::store::{
    DeliveryState, EntryState, LoadedMessage, PossibleDuplicate, RecipientState, RecipientStatus,
    RecordedReply, Store, StoreError, StoreEvent,
};
use crate::transport::{Submission, Transport};

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
enum JobResult {
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

struct Context {
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

/// The dispatcher's view of the queue: every queued message is either waiting for its
/// due time or in flight, never both.
#[derive(Default)]
struct Schedule {
    /// (due, id), earliest first.
    due: BTreeSet<(Instant, String)>,
    /// The ids in `due`, with their due time.
    waiting: HashMap<String, Instant>,
    /// Ids with an attempt running.
    in_flight: HashSet<String>,
    /// In flight when an operator held or deleted them: not scheduled again afterwards.
    dropped: HashSet<String>,
}

impl Schedule {
    /// Schedules `id` at `at`, unless it is already waiting or in flight.
    fn add(&mut self, id: String, at: Instant) {
        if self.in_flight.contains(&id) || self.waiting.contains_key(&id) {
            return;
        }
        self.waiting.insert(id.clone(), at);
        self.due.insert((at, id));
    }

    /// The earliest waiting message.
    fn first(&self) -> Option<(Instant, String)> {
        self.due.first().cloned()
    }

    /// `id`, due at `at`, starts its attempt.
    fn start(&mut self, at: Instant, id: &str) {
        self.due.remove(&(at, id.to_string()));
        self.waiting.remove(id);
        self.in_flight.insert(id.to_string());
    }

    /// `id`'s attempt ended; false if an operator took it away meanwhile (do not reschedule).
    fn finished(&mut self, id: &str) -> bool {
        self.in_flight.remove(id);
        !self.dropped.remove(id)
    }

    /// Makes the schedule agree with `queued` (every id in `queue/` with its next attempt):
    /// new ids are added, ids retried by an operator move to their earlier time, ids no longer
    /// there (held, deleted) are dropped. Returns how many were added and dropped.
    fn sync(&mut self, queued: Vec<(String, Instant)>) -> (usize, usize) {
        let present: HashSet<&str> = queued.iter().map(|(id, _)| id.as_str()).collect();
        let gone: Vec<String> = self
            .waiting
            .keys()
            .filter(|id| !present.contains(id.as_str()))
            .cloned()
            .collect();
        let mut dropped = gone.len();
        for id in gone {
            if let Some(at) = self.waiting.remove(&id) {
                self.due.remove(&(at, id));
            }
        }
        for id in &self.in_flight {
            if !present.contains(id.as_str()) && self.dropped.insert(id.clone()) {
                dropped += 1;
            }
        }
        let mut added = 0;
        for (id, at) in queued {
            if self.in_flight.contains(&id) {
                // Back in queue/ (released again) before its attempt ended.
                self.dropped.remove(&id);
                continue;
            }
            match self.waiting.get(&id).copied() {
                Some(was) if at < was => {
                    self.due.remove(&(was, id.clone()));
                    self.waiting.insert(id.clone(), at);
                    self.due.insert((at, id));
                }
                Some(_) => {}
                None => {
                    self.add(id, at);
                    added += 1;
                }
            }
        }
        (added, dropped)
    }

    /// Messages the deliverer is responsible for (waiting or in flight), each counted once.
    fn queued(&self) -> usize {
        self.waiting.len() + self.in_flight.len()
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

/// One delivery attempt for one message.
async fn deliver_one(ctx: &Arc<Context>, id: &str) -> JobResult {
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
    let bytes = super::notice::build(
        &super::notice::NoticeInput {
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
    fn a_message_in_flight_counts_once() {
        let now = Instant::now();
        let mut s = Schedule::default();
        s.add("A".into(), now);
        s.add("B".into(), now + Duration::from_secs(60));
        assert_eq!(s.queued(), 2);
        s.start(now, "A");
        assert_eq!(s.queued(), 2, "A in flight, B waiting");
        // Adding what is in flight or waiting changes nothing.
        s.add("A".into(), now);
        s.add("B".into(), now);
        assert_eq!(s.queued(), 2);
        assert!(s.finished("A"));
        assert_eq!(s.queued(), 1);
    }

    #[test]
    fn sync_follows_operator_commands() {
        let now = Instant::now();
        let later = now + Duration::from_secs(3600);
        let mut s = Schedule::default();
        s.add("HELD".into(), later);
        s.add("RETRIED".into(), later);
        s.add("FLYING".into(), now);
        s.start(now, "FLYING");
        // HELD was held, FLYING deleted during its attempt, RETRIED is due now, NEW released.
        let (added, dropped) = s.sync(vec![("RETRIED".into(), now), ("NEW".into(), now)]);
        assert_eq!((added, dropped), (1, 2));
        assert_eq!(s.first(), Some((now, "NEW".to_string())));
        assert!(s.waiting.get("RETRIED") == Some(&now));
        assert!(!s.waiting.contains_key("HELD"));
        assert!(!s.finished("FLYING"), "not scheduled again");
        assert_eq!(s.queued(), 2);
    }

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
