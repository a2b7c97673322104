//! The deliverer: drains the queue to Exchange Online at the pace Microsoft allows.
//!
//! One dispatcher task owns a lane per (route, mailbox) ([`lanes`]): each lane's schedule
//! (which message is due when) and pacer. It starts a delivery job when a message is due, a
//! connection slot of its mailbox is free (`upstream.connections`), the rate allows
//! (`upstream.rate`, evenly spaced) and the mailbox is not held. Jobs report back; the
//! dispatcher reschedules. The store is the only record: the lanes are rebuilt from it at start
//! and whenever the store says that something changed outside the deliverer (an operator
//! command); each committed message is announced by the store ([`StoreEvent::Committed`]) with
//! its routing.
//!
//! # Several relays, one budget
//! A store shared by several relays hands out a [`SharedBudget`] (the file spool does not: its
//! relay is alone). Then a start the local pacer allows is not yet an attempt: the dispatcher
//! asks the shared budget for it in a task of its own (never waiting in the loop), at most one
//! question per lane at a time. A grant (a session slot and a start from the mailbox's
//! bucket) starts the job, which holds the slot until the attempt ends; a refusal gives the
//! start back to the pacer ([`Attempt::Skipped`]) and the lane asks again at the time the
//! budget named. The budget cannot be asked (the database is away): the lane waits, it never
//! sends past a budget it cannot see.
//!
//! Holds are shared the same way: a lane's own hold or resume is written to the budget after
//! the attempt that caused it, and every announcement of a change by another relay
//! ([`StoreEvent::HoldsChanged`], or any re-read of the queue) makes each lane follow the
//! recorded holds: held there means held here ([`Pacer::hold_elsewhere`], probing no sooner
//! than a probe interval), a hold this lane follows that is gone means resumed.
//!
//! A throttle (432, 421) or `Retry-After` that pauses the lane's pacer pauses the mailbox in
//! the budget too ([`SharedBudget::pause`], the length from [`PacerSettings::pause_after`]):
//! the attempt writes it before it gives its session slot back. A lane refused with
//! [`Grant::Paused`] pauses its pacer until then ([`Pacer::paused_elsewhere`]) and shows it as
//! `throttled_until`.
//!
//! Here: the settings, the mailbox status and the dispatcher loop; `lanes.rs`: which lane a
//! message is in; `schedule.rs`: what is due when; `attempt.rs`: one attempt from claim to the
//! recorded outcome.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::classify::HoldCause;
use super::pacer::{Attempt, Pacer, PacerSettings, Progress, Start, Transition};
use crate::config::{Rate, RewriteFrom};
use crate::metrics::Metrics;
use crate::stop::StopBudget;
use crate::store::budget::{BudgetLimits, BudgetSlot, Grant, SharedBudget, SharedHold};
use crate::store::{EntryState, Routing, Store, StoreEvent};
use crate::transport::Transport;

mod attempt;
pub mod lanes;
mod schedule;

pub use attempt::backoff;
use attempt::deliver_one;
pub use lanes::{FixedUpstream, LaneKey, LaneParts, Unroutable, Upstreams};
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

/// The mailbox as a whole, shown by logs, `queue list` and `/healthz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailboxState {
    Running,
    /// Paused: nothing is sent but one probe every `probe` interval.
    Held {
        cause: HoldCause,
        reply: String,
        since: SystemTime,
    },
    /// Its route cannot send (removed by a reload, or a template that gives no mailbox): the
    /// messages wait, never sent with another route's credentials.
    Unroutable {
        reason: String,
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
            MailboxState::Unroutable { reason, since } => serde_json::json!({
                "state": "held",
                "reason": reason,
                "fix": "Restore the route in relay.toml (then SIGHUP or restart), or remove the \
                        messages with smtp-oauth-relay queue delete ID: they are never sent \
                        with another route's credentials.",
                "since": humantime::format_rfc3339_seconds(*since).to_string(),
            }),
        }
    }
}

#[derive(Debug, Clone)]
pub struct MailboxStatus {
    pub route: String,
    pub mailbox: String,
    pub state: MailboxState,
    /// Exchange asked to slow down (432/421) recently; sending is paced down until then.
    pub throttled_until: Option<SystemTime>,
    pub last_delivery: Option<SystemTime>,
    pub delivered: u64,
    pub queued: usize,
}

impl MailboxStatus {
    fn new(key: &LaneKey, state: MailboxState) -> MailboxStatus {
        MailboxStatus {
            route: key.route.clone(),
            mailbox: key.mailbox.clone(),
            state,
            throttled_until: None,
            last_delivery: None,
            delivered: 0,
            queued: 0,
        }
    }
}

/// Lets the daemon and the admin endpoint talk to the deliverer (new mail reaches it through
/// the store's events).
#[derive(Clone)]
pub struct DeliveryHandle {
    events: mpsc::UnboundedSender<Event>,
    statuses: Arc<Mutex<BTreeMap<LaneKey, MailboxStatus>>>,
}

impl DeliveryHandle {
    /// New routes (a reload): every lane takes its settings and transport again for its next
    /// attempts, messages of a route that is gone are held, a held mailbox probes at once (the
    /// change may be its fix).
    pub fn reconfigure(&self, upstreams: Arc<dyn Upstreams>) {
        let _ = self.events.send(Event::Reconfigure(upstreams));
    }

    /// Every mailbox lane, by route then mailbox.
    pub fn statuses(&self) -> Vec<MailboxStatus> {
        let map = match self.statuses.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.values().cloned().collect()
    }

    /// The mailbox of the default route (or the first lane): the relay's status with one
    /// mailbox.
    pub fn status(&self) -> MailboxStatus {
        let all = self.statuses();
        all.iter()
            .find(|s| s.route == crate::routes::DEFAULT_ROUTE)
            .or(all.first())
            .cloned()
            .unwrap_or_else(|| {
                MailboxStatus::new(
                    &LaneKey {
                        route: crate::routes::DEFAULT_ROUTE.into(),
                        mailbox: String::new(),
                    },
                    MailboxState::Running,
                )
            })
    }
}

enum Event {
    Done(JobReport),
    /// The shared budget answered a lane's question.
    Granted(GrantReport),
    Reconfigure(Arc<dyn Upstreams>),
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

/// The shared budget's answer for a message the lane's pacer let start.
#[derive(Debug)]
struct GrantReport {
    lane: LaneKey,
    id: String,
    /// When the message was due (it goes back there when refused).
    due: Instant,
    /// The start was a held mailbox's probe.
    probe: bool,
    /// `None`: not asked, another relay has the message claimed (it is that relay's now).
    grant: Option<Result<Grant, String>>,
}

#[derive(Debug)]
struct JobReport {
    lane: LaneKey,
    id: String,
    result: JobResult,
}

/// What one lane's attempts work with. Replaced as a whole by a reload; an attempt in flight
/// keeps the one it started with.
pub(crate) struct Context {
    store: Arc<dyn Store>,
    settings: Arc<DeliverySettings>,
    transport: Arc<dyn Transport>,
    metrics: Arc<Metrics>,
    /// The route this lane sends for: a claimed message of another route is not sent here.
    route: String,
}

impl Context {
    fn settings(&self) -> Arc<DeliverySettings> {
        self.settings.clone()
    }
}

/// One (route, mailbox): its schedule, its pacer, its status.
struct Lane {
    /// `None`: the route cannot send; its messages wait (see [`MailboxState::Unroutable`]).
    ctx: Option<Arc<Context>>,
    schedule: Schedule,
    pacer: Pacer,
    status: MailboxStatus,
    /// The shared budget's part (only with a shared store).
    gate: Gate,
}

/// Where a lane stands with the shared budget.
#[derive(Debug, Default)]
struct Gate {
    /// A question is out: nothing else starts in this lane until it is answered.
    asking: bool,
    /// The lane's hold is recorded in the shared budget (by this relay or another): it ends
    /// when the record goes.
    hold_shared: bool,
    /// The budget refused: ask again no sooner than this.
    not_before: Option<Instant>,
}

pub struct Deliverer;

impl Deliverer {
    /// Starts the dispatcher. It runs until `shutdown`, then waits for jobs in flight and
    /// closes the transports, all within the deadline of `stop`.
    pub fn start(
        store: Arc<dyn Store>,
        upstreams: Arc<dyn Upstreams>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        stop: StopBudget,
    ) -> (DeliveryHandle, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let statuses = Arc::new(Mutex::new(BTreeMap::new()));
        let handle = DeliveryHandle {
            events: tx.clone(),
            statuses: statuses.clone(),
        };
        // Subscribed before the first read of the queue: nothing committed in between is missed.
        let changes = store.events();
        let dispatcher = Dispatcher {
            budget: store.budget(),
            to_share: Vec::new(),
            store,
            upstreams,
            metrics,
            lanes: BTreeMap::new(),
            lane_of_id: HashMap::new(),
            tx,
            statuses,
            rescan_needed: false,
        };
        let task = tokio::spawn(dispatch(dispatcher, rx, changes, shutdown, stop));
        (handle, task)
    }

    /// One mailbox, one transport (see [`FixedUpstream`]).
    pub fn start_fixed(
        store: Arc<dyn Store>,
        settings: DeliverySettings,
        transport: Arc<dyn Transport>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        stop: StopBudget,
    ) -> (DeliveryHandle, tokio::task::JoinHandle<()>) {
        let upstreams = Arc::new(FixedUpstream::new(settings, transport));
        Deliverer::start(store, upstreams, metrics, shutdown, stop)
    }
}

/// Reports a job's end to the dispatcher even if the job panics: without a report its message
/// and its session slot would stay "in flight" for ever, and the relay would accept mail it
/// never delivers.
struct ReportOnDrop {
    tx: mpsc::UnboundedSender<Event>,
    lane: LaneKey,
    id: String,
    retry_in: Duration,
    sent: bool,
}

impl ReportOnDrop {
    fn send(mut self, result: JobResult) {
        self.sent = true;
        let _ = self.tx.send(Event::Done(JobReport {
            lane: self.lane.clone(),
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
            lane: self.lane.clone(),
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

/// The dispatcher's state: the lanes and where each message is.
struct Dispatcher {
    store: Arc<dyn Store>,
    /// `None`: this relay is the only one delivering from its store.
    budget: Option<Arc<dyn SharedBudget>>,
    /// Holds and resumes of this relay's lanes not yet written to the shared budget.
    to_share: Vec<(LaneKey, Transition)>,
    upstreams: Arc<dyn Upstreams>,
    metrics: Arc<Metrics>,
    lanes: BTreeMap<LaneKey, Lane>,
    /// The lane of every message waiting or in flight.
    lane_of_id: HashMap<String, LaneKey>,
    tx: mpsc::UnboundedSender<Event>,
    statuses: Arc<Mutex<BTreeMap<LaneKey, MailboxStatus>>>,
    /// A finished attempt left its message in no lane's schedule although it may still be
    /// queued (a reload moved it, or an operator command): read the queue again.
    rescan_needed: bool,
}

/// Retry settings for a lane that cannot send (no settings of its own).
fn unroutable_pacer() -> PacerSettings {
    PacerSettings::new(
        1,
        1,
        Duration::from_secs(60),
        Duration::from_secs(60),
        Duration::from_secs(300),
    )
}

impl Dispatcher {
    /// The lane of `routing`, opened if it is new.
    fn lane_for(&mut self, routing: &Routing) -> LaneKey {
        let key = match self.upstreams.lane_of(routing) {
            Ok(key) => key,
            Err(u) => LaneKey {
                route: u.route,
                mailbox: String::new(),
            },
        };
        if !self.lanes.contains_key(&key) {
            let lane = self.open_lane(&key, routing);
            self.lanes.insert(key.clone(), lane);
        }
        key
    }

    fn open_lane(&self, key: &LaneKey, routing: &Routing) -> Lane {
        let now = Instant::now();
        match self.context(key, routing) {
            Ok(ctx) => {
                tracing::debug!(route = %key.route, mailbox = %key.mailbox, "mailbox lane opened");
                Lane {
                    pacer: Pacer::new(pacer_settings(&ctx.settings), now),
                    ctx: Some(ctx),
                    schedule: Schedule::default(),
                    status: MailboxStatus::new(key, MailboxState::Running),
                    gate: Gate::default(),
                }
            }
            Err(reason) => {
                tracing::error!(
                    route = %key.route,
                    reason = %reason,
                    "messages of this route are held: they are never sent with another \
                     route's credentials"
                );
                Lane {
                    pacer: Pacer::new(unroutable_pacer(), now),
                    ctx: None,
                    schedule: Schedule::default(),
                    status: MailboxStatus::new(
                        key,
                        MailboxState::Unroutable {
                            reason,
                            since: SystemTime::now(),
                        },
                    ),
                    gate: Gate::default(),
                }
            }
        }
    }

    /// A lane's context, or why the lane cannot send.
    fn context(&self, key: &LaneKey, routing: &Routing) -> Result<Arc<Context>, String> {
        if key.mailbox.is_empty() {
            return Err(self
                .upstreams
                .lane_of(routing)
                .err()
                .map_or_else(|| format!("route {} cannot send", key.route), |u| u.reason));
        }
        let parts = self.upstreams.open(key)?;
        Ok(self.lane_context(key, parts))
    }

    /// What one lane's attempts work with, from its route's settings and transport.
    fn lane_context(&self, key: &LaneKey, parts: LaneParts) -> Arc<Context> {
        Arc::new(Context {
            store: self.store.clone(),
            settings: Arc::new(parts.settings),
            transport: parts.transport,
            metrics: self.metrics.clone(),
            route: key.route.clone(),
        })
    }

    /// Reads the queue and makes every lane's schedule agree with it ([`Schedule::sync`]):
    /// each message at its recorded next attempt (or now), in the lane its routing names now;
    /// held and deleted ones are dropped.
    async fn rescan(&mut self) {
        let entries = match self.store.list().await {
            Ok(entries) => entries,
            Err(e) => {
                tracing::error!(error = %e, "cannot list the queue");
                return;
            }
        };
        let now_sys = SystemTime::now();
        let now = Instant::now();
        let mut by_lane: BTreeMap<LaneKey, Vec<(String, Instant)>> = BTreeMap::new();
        for entry in entries
            .into_iter()
            .filter(|e| e.state == EntryState::Queued)
        {
            let at = entry
                .delivery
                .as_ref()
                .and_then(|d| d.next_attempt)
                .and_then(|t| t.duration_since(now_sys).ok())
                .map_or(now, |wait| now + wait);
            let key = self.lane_for(&entry.routing());
            by_lane.entry(key).or_default().push((entry.id, at));
        }
        let keys: Vec<LaneKey> = self.lanes.keys().cloned().collect();
        let (mut added, mut dropped) = (0, 0);
        for key in keys {
            let queued = by_lane.remove(&key).unwrap_or_default();
            for (id, _) in &queued {
                self.lane_of_id.insert(id.clone(), key.clone());
            }
            if let Some(lane) = self.lanes.get_mut(&key) {
                let (a, d) = lane.schedule.sync(queued);
                added += a;
                dropped += d;
            }
        }
        // A message that moved lanes (its route went away or came back) is dropped from the
        // lane it was in: forget the stale entries, keep the ones still waiting or in flight.
        let lanes = &self.lanes;
        self.lane_of_id
            .retain(|id, key| lanes.get(key).is_some_and(|l| l.schedule.holds(id)));
        // A stuck lane with nothing left has nothing to say.
        self.lanes
            .retain(|_, l| l.ctx.is_some() || l.schedule.queued() > 0);
        if added + dropped > 0 {
            tracing::debug!(added, dropped, "schedule follows the queue");
        }
    }

    /// New routes: every lane takes its settings and transport again (or, when its route can
    /// no longer send, none: the rescan that follows moves its messages where their routing
    /// puts them now, a removed route's into its held lane).
    fn reconfigure(&mut self, upstreams: Arc<dyn Upstreams>) {
        self.upstreams = upstreams;
        let now = Instant::now();
        let keys: Vec<LaneKey> = self.lanes.keys().cloned().collect();
        for key in keys {
            // A route's held lane: the rescan decides again where its messages go.
            if key.mailbox.is_empty() {
                continue;
            }
            let opened = self
                .upstreams
                .open(&key)
                .map(|p| self.lane_context(&key, p));
            let Some(lane) = self.lanes.get_mut(&key) else {
                continue;
            };
            match opened {
                Ok(ctx) => {
                    lane.pacer.set_settings(pacer_settings(&ctx.settings));
                    lane.ctx = Some(ctx);
                    if matches!(lane.status.state, MailboxState::Unroutable { .. }) {
                        lane.status.state = MailboxState::Running;
                    }
                }
                Err(reason) => {
                    lane.ctx = None;
                    lane.status.state = MailboxState::Unroutable {
                        reason,
                        since: SystemTime::now(),
                    };
                }
            }
            lane.pacer.wake(now);
        }
        tracing::info!(lanes = self.lanes.len(), "delivery settings reloaded");
    }

    /// Starts every job that is due, as far as each lane's pacer allows; returns when to look
    /// again.
    fn start_due(&mut self) -> Instant {
        let now = Instant::now();
        let mut wake = now + Duration::from_secs(1);
        for (key, lane) in self.lanes.iter_mut() {
            let Some(ctx) = lane.ctx.clone() else {
                continue;
            };
            if self.budget.is_some() {
                if lane.gate.asking {
                    continue;
                }
                match lane.gate.not_before {
                    Some(t) if t > now => {
                        wake = wake.min(t);
                        continue;
                    }
                    _ => lane.gate.not_before = None,
                }
            }
            while let Some((at, id)) = lane.schedule.first() {
                if at > now {
                    wake = wake.min(at);
                    break;
                }
                let probe = match lane.pacer.try_start(now) {
                    Start::Now { probe } => {
                        if probe {
                            tracing::info!(id = %id, mailbox = %key.mailbox, "mailbox held: probing with one message");
                        }
                        probe
                    }
                    Start::At(when) => {
                        wake = wake.min(when.max(now));
                        break;
                    }
                    Start::Busy => break,
                };
                lane.schedule.start(at, &id);
                if let Some(budget) = &self.budget {
                    lane.gate.asking = true;
                    tokio::spawn(ask(
                        budget.clone(),
                        self.tx.clone(),
                        key.clone(),
                        (id, at, probe),
                        budget_limits(&ctx.settings),
                    ));
                    break;
                }
                spawn_job(&self.tx, key, ctx.clone(), id, None, None);
            }
        }
        wake
    }

    /// The shared budget answered: start the job with its slot, or give the start back.
    fn granted(&mut self, report: GrantReport) {
        let now = Instant::now();
        let Some(lane) = self.lanes.get_mut(&report.lane) else {
            return;
        };
        lane.gate.asking = false;
        let Some(grant) = report.grant else {
            // Nothing asked, nothing started. The relay holding the claim delivers it or puts
            // it back; if that relay dies, the lease sweep announces the change and the rescan
            // brings the message back here.
            lane.pacer.finished(now, Attempt::Skipped);
            if report.probe {
                lane.pacer.wake(now);
            }
            lane.schedule.finished(&report.id);
            self.lane_of_id.remove(&report.id);
            return;
        };
        let refused = match grant {
            Ok(Grant::Start(slot)) => match lane.ctx.clone() {
                Some(ctx) => {
                    let budget = self.budget.clone();
                    spawn_job(&self.tx, &report.lane, ctx, report.id, Some(slot), budget);
                    return;
                }
                // A reload took the lane's route away meanwhile: not sent here.
                None => None,
            },
            Ok(Grant::Wait(wait)) => Some(wait),
            // Another relay (or this one) heard the mailbox throttled: pause here too, and show
            // it in the lane's status.
            Ok(Grant::Paused(left)) => {
                // Its own pause this relay knows already (it wrote it): news only from another.
                let known = lane.pacer.throttled_until(now);
                if known.is_none_or(|t| t + Duration::from_millis(50) < now + left) {
                    tracing::info!(
                        route = %report.lane.route,
                        mailbox = %report.lane.mailbox,
                        pause_left = %humantime::format_duration(Duration::from_millis(left.as_millis() as u64)),
                        "mailbox paused by another relay (throttled upstream)"
                    );
                }
                lane.pacer.paused_elsewhere(now, now + left);
                lane.status.throttled_until = lane
                    .pacer
                    .throttled_until(now)
                    .map(|until| SystemTime::now() + (until - now));
                Some(left.min(BUDGET_MAX_PAUSED_WAIT))
            }
            Err(error) => {
                tracing::warn!(
                    route = %report.lane.route,
                    mailbox = %report.lane.mailbox,
                    %error,
                    "cannot ask the shared mailbox budget; waiting (nothing is sent past it)"
                );
                Some(BUDGET_UNAVAILABLE_WAIT)
            }
        };
        // Nothing started: the pacer gets its session slot back, the message its place.
        lane.pacer.finished(now, Attempt::Skipped);
        if report.probe {
            // A held mailbox's probe is owed, not spent: it goes at the next question.
            lane.pacer.wake(now);
        }
        lane.gate.not_before = refused.map(|wait| now + wait);
        if lane.schedule.finished(&report.id) && lane.ctx.is_some() {
            lane.schedule.add(report.id, report.due);
        } else {
            self.lane_of_id.remove(&report.id);
        }
    }

    /// Schedules a committed message in its lane; returns the lane.
    fn committed(&mut self, id: String, routing: &Routing) -> LaneKey {
        let key = self.lane_for(routing);
        self.lane_of_id.insert(id.clone(), key.clone());
        if let Some(lane) = self.lanes.get_mut(&key) {
            lane.schedule.add(id, Instant::now());
        }
        key
    }

    fn done(&mut self, report: JobReport) {
        let now = Instant::now();
        let Some(lane) = self.lanes.get_mut(&report.lane) else {
            return;
        };
        let again = lane.schedule.finished(&report.id);
        let attempt = match &report.result {
            JobResult::Finished { delivered: true } => Attempt::Delivered,
            JobResult::Finished { delivered: false } => Attempt::Failed,
            JobResult::Skipped => Attempt::Skipped,
            JobResult::Retry {
                throttle,
                reached,
                pause,
                ..
            } => Attempt::Retry {
                throttle: *throttle,
                reached: *reached,
                pause: *pause,
            },
            JobResult::Hold { cause, reply } => Attempt::Hold {
                cause: *cause,
                reply: reply.clone(),
            },
        };
        let transition = lane.pacer.finished(now, attempt);
        if self.budget.is_some() && transition != Transition::None {
            self.to_share
                .push((report.lane.clone(), transition.clone()));
        }
        note_transition(&report.lane, &mut lane.status, transition, false);
        lane.status.throttled_until = lane
            .pacer
            .throttled_until(now)
            .map(|until| SystemTime::now() + (until - now));
        if matches!(report.result, JobResult::Finished { delivered: true }) {
            lane.status.delivered += 1;
            lane.status.last_delivery = Some(SystemTime::now());
        }
        match report.result {
            JobResult::Finished { .. } | JobResult::Skipped => {
                self.lane_of_id.remove(&report.id);
            }
            // An operator held or deleted it during the attempt (it stays out), or a reload
            // moved it to another lane or to its route's held lane: the queue says which.
            JobResult::Retry { .. } | JobResult::Hold { .. } if !again || lane.ctx.is_none() => {
                self.lane_of_id.remove(&report.id);
                self.rescan_needed = true;
            }
            JobResult::Retry { at, .. } => lane.schedule.add(report.id, at),
            // Held: the message waits for the mailbox's next probe.
            JobResult::Hold { .. } => lane.schedule.add(report.id, now),
        }
    }

    /// Writes this relay's holds and resumes to the shared budget (the other relays follow).
    async fn share_holds(&mut self) {
        let Some(budget) = self.budget.clone() else {
            return;
        };
        for (key, transition) in std::mem::take(&mut self.to_share) {
            let name = key.budget_name();
            let shared = match transition {
                Transition::Held {
                    cause,
                    reply,
                    since,
                } => {
                    let cause = match serde_json::to_value(cause) {
                        Ok(serde_json::Value::String(c)) => c,
                        _ => continue,
                    };
                    let hold = SharedHold {
                        lane: name,
                        cause,
                        reply,
                        since,
                    };
                    budget.hold(&hold).await.map(|()| true)
                }
                Transition::Resumed => budget.resume(&name).await.map(|()| false),
                Transition::None => continue,
            };
            match shared {
                Ok(held) => {
                    if let Some(lane) = self.lanes.get_mut(&key) {
                        lane.gate.hold_shared = held;
                    }
                }
                Err(error) => tracing::warn!(
                    route = %key.route,
                    mailbox = %key.mailbox,
                    %error,
                    "cannot share the mailbox's hold state with the other relays"
                ),
            }
        }
    }

    /// Follows the holds of the shared budget: a mailbox another relay held is held here
    /// too, and resumes when that hold is cleared.
    async fn follow_holds(&mut self) {
        let Some(budget) = self.budget.clone() else {
            return;
        };
        let holds = match budget.holds().await {
            Ok(holds) => holds,
            Err(error) => {
                tracing::warn!(%error, "cannot read the mailbox holds of the other relays");
                return;
            }
        };
        let now = Instant::now();
        for (key, lane) in self.lanes.iter_mut() {
            if lane.ctx.is_none() {
                continue;
            }
            let name = key.budget_name();
            let transition = match holds.iter().find(|h| h.lane == name) {
                Some(hold) if lane.pacer.hold().is_none() => {
                    let cause = serde_json::Value::String(hold.cause.clone());
                    let Ok(cause) = serde_json::from_value::<HoldCause>(cause) else {
                        tracing::warn!(cause = %hold.cause, "a hold cause this relay does not know");
                        continue;
                    };
                    lane.gate.hold_shared = true;
                    lane.pacer
                        .hold_elsewhere(now, cause, hold.reply.clone(), hold.since)
                }
                Some(_) => {
                    lane.gate.hold_shared = true;
                    Transition::None
                }
                None if lane.gate.hold_shared && lane.pacer.hold().is_some() => {
                    lane.gate.hold_shared = false;
                    lane.pacer.resume_elsewhere()
                }
                None => Transition::None,
            };
            note_transition(key, &mut lane.status, transition, true);
        }
    }

    fn in_flight(&self) -> usize {
        self.lanes
            .values()
            .map(|l| l.schedule.in_flight.len())
            .sum()
    }

    /// Publishes every lane's status for `/healthz` and `queue list` (best effort; the store
    /// is the record).
    async fn publish(&mut self) {
        let keys: Vec<LaneKey> = self.lanes.keys().cloned().collect();
        self.statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| self.lanes.contains_key(k));
        self.publish_lanes(&keys).await;
    }

    /// Publishes the status of `keys` only: after one message came or went, the others did
    /// not change (this runs once per message; a template route may have hundreds of lanes).
    async fn publish_lanes(&mut self, keys: &[LaneKey]) {
        let mut changed = Vec::new();
        {
            let mut shared = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
            for key in keys {
                let Some(lane) = self.lanes.get_mut(key) else {
                    continue;
                };
                lane.status.queued = lane.schedule.queued();
                if shared.get(key).map(|s| &s.state) != Some(&lane.status.state) {
                    changed.push((key.status_name(), lane.status.state.to_json()));
                }
                shared.insert(key.clone(), lane.status.clone());
            }
        }
        for (name, json) in changed {
            self.store.publish_status(&name, &json).await;
        }
    }
}

/// Logs a lane's hold or resume and shows it in its status; `elsewhere`: another relay
/// sharing the mailbox's budget saw it.
fn note_transition(
    key: &LaneKey,
    status: &mut MailboxStatus,
    transition: Transition,
    elsewhere: bool,
) {
    match transition {
        Transition::None => {}
        Transition::Held {
            cause,
            reply,
            since,
        } => {
            tracing::error!(
                route = %key.route,
                mailbox = %key.mailbox,
                cause = %cause,
                reply = %reply,
                fix = cause.fix(),
                by_another_relay = elsewhere,
                "delivery held: every message stays queued until this is fixed"
            );
            status.state = MailboxState::Held {
                cause,
                reply,
                since,
            };
        }
        Transition::Resumed => {
            tracing::info!(
                route = %key.route,
                mailbox = %key.mailbox,
                by_another_relay = elsewhere,
                "delivery resumed"
            );
            status.state = MailboxState::Running;
        }
    }
}

/// How long a lane waits when the shared budget cannot be asked at all.
const BUDGET_UNAVAILABLE_WAIT: Duration = Duration::from_secs(1);
/// A lane paused by another relay asks again at least this often (its pacer's pause may be
/// shorter after a reload; the budget answers the time left again).
const BUDGET_MAX_PAUSED_WAIT: Duration = Duration::from_secs(60);
/// Recording a mailbox pause in the shared budget waits no longer than this: the attempt's
/// session slot is held meanwhile.
const PAUSE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Giving a session slot back waits no longer than this before the lane hears the attempt
/// ended (the database away: the slot's lease frees it).
const SLOT_RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the shared budget for one start in `lane` and reports the answer.
async fn ask(
    budget: Arc<dyn SharedBudget>,
    tx: mpsc::UnboundedSender<Event>,
    lane: LaneKey,
    (id, due, probe): (String, Instant, bool),
    limits: BudgetLimits,
) {
    // A message another relay is sending costs no slot here. Unknown (the database is away):
    // ask anyway, the budget's own answer says what to do.
    let grant = match budget.claimable(&id).await {
        Ok(false) => None,
        Ok(true) | Err(_) => Some(
            budget
                .acquire(&lane.budget_name(), limits)
                .await
                .map_err(|e| e.to_string()),
        ),
    };
    // The dispatcher is gone (stopping): the slot, if any, is dropped with the report.
    let _ = tx.send(Event::Granted(GrantReport {
        lane,
        id,
        due,
        probe,
        grant,
    }));
}

/// Records a mailbox-wide pause for the other relays; best effort: this relay's pacer pauses
/// anyway, the others follow the bucket until the database answers again.
async fn share_pause(budget: &dyn SharedBudget, lane: &LaneKey, pause: Duration) {
    let written = tokio::time::timeout(
        PAUSE_WRITE_TIMEOUT,
        budget.pause(&lane.budget_name(), pause),
    )
    .await;
    let error = match written {
        Ok(Ok(())) => {
            tracing::info!(
                route = %lane.route,
                mailbox = %lane.mailbox,
                pause = %humantime::format_duration(pause),
                "mailbox throttled upstream: paused for every relay"
            );
            return;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer in time".to_string(),
    };
    tracing::warn!(
        route = %lane.route,
        mailbox = %lane.mailbox,
        %error,
        "cannot share the mailbox's throttle pause with the other relays; it pauses here only"
    );
}

/// The shared budget's limits from the delivery settings.
fn budget_limits(settings: &DeliverySettings) -> BudgetLimits {
    BudgetLimits {
        connections: settings.connections,
        per_second: f64::from(settings.rate.messages.max(1))
            / settings.rate.per.as_secs_f64().max(1e-3),
    }
}

/// Starts one attempt; `slot` (the shared budget's) is held until it ends. An attempt that
/// earns a mailbox-wide pause (432, 421, `Retry-After`) records it in `budget` before it gives
/// the slot back, so that no other relay starts in between.
fn spawn_job(
    tx: &mpsc::UnboundedSender<Event>,
    lane: &LaneKey,
    ctx: Arc<Context>,
    id: String,
    slot: Option<BudgetSlot>,
    budget: Option<Arc<dyn SharedBudget>>,
) {
    let report = ReportOnDrop {
        tx: tx.clone(),
        lane: lane.clone(),
        id: id.clone(),
        retry_in: ctx.settings.retry_max,
        sent: false,
    };
    let lane = lane.clone();
    tokio::spawn(async move {
        let result = deliver_one(&ctx, &id).await;
        if let (
            Some(budget),
            JobResult::Retry {
                throttle, pause, ..
            },
        ) = (&budget, &result)
            && let Some(pause) = pacer_settings(&ctx.settings).pause_after(*throttle, *pause)
        {
            share_pause(budget.as_ref(), &lane, pause).await;
        }
        if let Some(slot) = slot {
            // Free before the lane hears the attempt ended, so its next start finds the slot
            // free; a claim that found nothing to send gives its start back too. Bounded: a
            // slot the database does not take back in time is freed by its lease.
            let release = slot.release(matches!(result, JobResult::Skipped));
            let _ = tokio::time::timeout(SLOT_RELEASE_TIMEOUT, release).await;
        }
        report.send(result);
    });
}

async fn dispatch(
    mut d: Dispatcher,
    mut rx: mpsc::UnboundedReceiver<Event>,
    mut changes: tokio::sync::broadcast::Receiver<StoreEvent>,
    shutdown: CancellationToken,
    stop: StopBudget,
) {
    use tokio::sync::broadcast::error::RecvError;
    crate::failpoint::panic_point("task-dispatcher");
    d.rescan().await;
    d.follow_holds().await;
    d.publish().await;
    // False once the store's event channel closed (the store is gone): no busy loop on it.
    let mut listening = true;

    loop {
        let wake = d.start_due();
        tokio::select! {
            change = changes.recv(), if listening => match change {
                Ok(StoreEvent::Committed(id, routing)) => {
                    let lane = d.committed(id, &routing);
                    d.publish_lanes(&[lane]).await;
                }
                // An operator command (or more changes than the backlog holds): read it all.
                Ok(StoreEvent::Changed) | Err(RecvError::Lagged(_)) => {
                    d.rescan().await;
                    let now = Instant::now();
                    for lane in d.lanes.values_mut() {
                        lane.pacer.wake(now);
                    }
                    d.follow_holds().await;
                    d.publish().await;
                }
                Ok(StoreEvent::HoldsChanged) => {
                    d.follow_holds().await;
                    d.publish().await;
                }
                Err(RecvError::Closed) => listening = false,
            },
            event = rx.recv() => match event {
                Some(Event::Reconfigure(upstreams)) => {
                    d.reconfigure(upstreams);
                    d.rescan().await;
                    d.publish().await;
                }
                Some(Event::Done(report)) => {
                    let lane = report.lane.clone();
                    d.done(report);
                    let rescanned = std::mem::take(&mut d.rescan_needed);
                    if rescanned {
                        d.rescan().await;
                    }
                    d.share_holds().await;
                    if rescanned {
                        d.publish().await;
                    } else {
                        d.publish_lanes(&[lane]).await;
                    }
                }
                Some(Event::Granted(report)) => d.granted(report),
                None => break,
            },
            _ = tokio::time::sleep_until(wake) => {}
            _ = shutdown.cancelled() => break,
        }
    }

    // Shutdown: jobs in flight finish, then QUIT, all by the stop deadline.
    let attempts_deadline = stop.attempts_deadline();
    while d.in_flight() > 0 {
        match tokio::time::timeout_at(attempts_deadline, rx.recv()).await {
            Ok(Some(Event::Done(report))) => {
                if let Some(lane) = d.lanes.get_mut(&report.lane) {
                    lane.schedule.in_flight.remove(&report.id);
                }
            }
            // Not started: its slot (if granted) is given back as the report is dropped.
            Ok(Some(Event::Granted(report))) => {
                if let Some(lane) = d.lanes.get_mut(&report.lane) {
                    lane.schedule.in_flight.remove(&report.id);
                }
            }
            Ok(Some(Event::Reconfigure(_))) => {}
            Ok(None) | Err(_) => break,
        }
    }
    if d.in_flight() > 0 {
        tracing::warn!(
            attempts = d.in_flight(),
            stop_timeout = %humantime::format_duration(stop.budget()),
            "stop deadline: delivery attempts still running are abandoned; their messages stay \
             queued and are sent after the restart (possibly twice, if Exchange already had them)"
        );
    }
    let close = async {
        let mut seen = HashSet::new();
        for transport in d.upstreams.transports() {
            // Several lanes may share a transport: each gets one QUIT round.
            if seen.insert(Arc::as_ptr(&transport) as *const () as usize) {
                transport.close().await;
            }
        }
    };
    if tokio::time::timeout_at(stop.deadline(), close)
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
