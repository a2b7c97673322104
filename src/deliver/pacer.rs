//! The pacer: one per mailbox, it decides when the next delivery attempt may start.
//!
//! Microsoft allows a mailbox about 30 messages a minute and 3 concurrent SMTP sessions
//! (`reference/exchange-online-protocol.md`); beyond that it answers 432 4.3.2 and closes
//! connections. A mailbox that Exchange refuses for a configuration reason (535 5.7.139,
//! SendAs denied, ...) is held: nothing is sent but one probe at a time, so that fixing the
//! tenant resumes delivery without flooding Exchange with failures meanwhile.
//!
//! It is a pure state machine: every call takes `now`, nothing here sleeps or spawns. The
//! dispatcher asks [`Pacer::try_start`] before it starts an attempt and reports each attempt's
//! end with [`Pacer::finished`]; the tests drive it on tokio's paused clock.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::classify::HoldCause;

/// A held mailbox is probed at least this often, whatever `queue.retry_max` says: an admin who
/// fixed the tenant should not wait an hour for the relay to notice.
pub const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(300);

/// Exchange asked for fewer submissions (432, 421): no new attempt for this long, at most.
pub const MAX_THROTTLE_PAUSE: Duration = Duration::from_secs(60);
/// The longest mailbox-wide pause a `Retry-After` earns (the message itself waits the whole of it).
pub const MAX_RETRY_AFTER_PAUSE: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacerSettings {
    /// At most this many attempts (upstream sessions) at once (`upstream.connections`).
    pub connections: usize,
    /// Time between two attempt starts (`upstream.rate`, evenly spaced).
    pub spacing: Duration,
    /// One probe this often while held.
    pub probe_every: Duration,
    /// The pause after Exchange throttled the mailbox.
    pub throttle_pause: Duration,
}

impl PacerSettings {
    /// From the configured limits: `messages` per `per`, retry bounds.
    pub fn new(
        connections: usize,
        messages: u32,
        per: Duration,
        retry_min: Duration,
        retry_max: Duration,
    ) -> PacerSettings {
        PacerSettings {
            connections: connections.max(1),
            spacing: per / messages.max(1),
            probe_every: retry_max.min(MAX_PROBE_INTERVAL),
            throttle_pause: retry_min.min(MAX_THROTTLE_PAUSE),
        }
    }
}

impl PacerSettings {
    /// The mailbox-wide pause an attempt that ended in a retry earns: `throttle` (432, 421)
    /// or the upstream's `Retry-After`; `None`: no pause. The one rule for the local pause
    /// and the one shared with other relays.
    pub fn pause_after(&self, throttle: bool, retry_after: Option<Duration>) -> Option<Duration> {
        if !throttle && retry_after.is_none() {
            return None;
        }
        // Retry-After names the wait; never beyond what a throttle may pause.
        let asked = retry_after.unwrap_or_default().min(MAX_RETRY_AFTER_PAUSE);
        Some(self.throttle_pause.max(asked))
    }
}

/// How far an attempt got before it ended: a failure at an earlier step than the one a hold is
/// about proves nothing about the hold (a token endpoint hiccup during a SendAs hold does not
/// mean SendAs was granted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Progress {
    /// No token could be had.
    Token,
    /// A token, but the session ended before authentication succeeded (connect, TLS, AUTH).
    Session,
    /// Authenticated: the transaction (MAIL, RCPT, DATA) was reached.
    Transaction,
}

impl HoldCause {
    /// The progress an attempt must make to show that this cause is gone; `None`: the cause
    /// is refused inside the transaction, so only a delivery proves it fixed.
    pub fn cleared_by(self) -> Option<Progress> {
        match self {
            HoldCause::TokenRefused => Some(Progress::Session),
            HoldCause::SmtpAuthDisabled
            | HoldCause::AuthenticationFailed
            | HoldCause::BasicAuthRefused
            | HoldCause::TlsRefused
            | HoldCause::ProtocolMismatch
            | HoldCause::CertificateInvalid => Some(Progress::Transaction),
            HoldCause::SendAsDenied
            | HoldCause::ContinuousErrorThrottle
            | HoldCause::QuotaExceeded
            | HoldCause::MailboxFull
            | HoldCause::SenderBlocked
            // Graph answers every request with one response: only a delivery proves a fix.
            | HoldCause::GraphAccessDenied
            | HoldCause::GraphMailboxNotEnabled
            | HoldCause::GraphMailboxNotFound
            | HoldCause::GraphTokenRejected
            | HoldCause::GraphNoPermissions
            | HoldCause::GraphReadWriteDenied => None,
        }
    }
}

/// How an attempt ended, as far as the mailbox is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// Upstream accepted the message.
    Delivered,
    /// The message failed for good (a 5xx for it or its recipients): the mailbox itself works.
    Failed,
    /// Try again later; `throttle`: Exchange asked the whole mailbox to slow down; `pause`:
    /// the upstream said for how long (Graph's `Retry-After`, per app and mailbox).
    Retry {
        throttle: bool,
        reached: Progress,
        pause: Option<Duration>,
    },
    /// A configuration problem: the whole mailbox pauses.
    Hold { cause: HoldCause, reply: String },
    /// Nothing was sent (the message was gone, or could not be read).
    Skipped,
}

/// What [`Pacer::try_start`] allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Start one attempt now (it is counted in flight). `probe`: the mailbox is held and this
    /// is its one probe.
    Now { probe: bool },
    /// Nothing may start before this instant.
    At(Instant),
    /// Every session slot is taken (or the held mailbox's probe is out): wait for an attempt
    /// to finish.
    Busy,
}

/// A change of the mailbox's state that the dispatcher logs and publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    None,
    Held {
        cause: HoldCause,
        reply: String,
        since: SystemTime,
    },
    Resumed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub cause: HoldCause,
    pub reply: String,
    pub since: SystemTime,
    next_probe: Instant,
    /// What an attempt must reach to end the hold (`None`: only a delivery ends it).
    cleared_by: Option<Progress>,
}

#[derive(Debug, Clone)]
pub struct Pacer {
    settings: PacerSettings,
    in_flight: usize,
    next_slot: Instant,
    hold: Option<Hold>,
    throttled_until: Option<Instant>,
}

impl Pacer {
    pub fn new(settings: PacerSettings, now: Instant) -> Pacer {
        Pacer {
            settings,
            in_flight: 0,
            next_slot: now,
            hold: None,
            throttled_until: None,
        }
    }

    pub fn settings(&self) -> PacerSettings {
        self.settings
    }

    /// New limits (a reload): they apply to the next start; attempts in flight are not cut.
    pub fn set_settings(&mut self, settings: PacerSettings) {
        self.settings = settings;
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn hold(&self) -> Option<&Hold> {
        self.hold.as_ref()
    }

    /// Until when Exchange's request to slow down applies, if it still does at `now`.
    pub fn throttled_until(&self, now: Instant) -> Option<Instant> {
        self.throttled_until.filter(|t| *t > now)
    }

    /// May an attempt start at `now`? A granted start takes a rate slot and a session slot.
    pub fn try_start(&mut self, now: Instant) -> Start {
        let held = self.hold.is_some();
        let slots = if held { 1 } else { self.settings.connections };
        if self.in_flight >= slots {
            return Start::Busy;
        }
        let mut earliest = self.next_slot;
        if let Some(hold) = &self.hold {
            earliest = earliest.max(hold.next_probe);
        }
        if earliest > now {
            return Start::At(earliest);
        }
        self.in_flight += 1;
        self.next_slot = self.next_slot.max(now) + self.settings.spacing;
        if let Some(hold) = &mut self.hold {
            hold.next_probe = now + self.settings.probe_every;
        }
        Start::Now { probe: held }
    }

    /// An attempt started by [`try_start`](Self::try_start) ended.
    pub fn finished(&mut self, now: Instant, attempt: Attempt) -> Transition {
        self.in_flight = self.in_flight.saturating_sub(1);
        match attempt {
            Attempt::Delivered => self.resume_if(|_| true),
            // A message refused for itself got through the session: the mailbox works as far
            // as the transaction.
            Attempt::Failed => self.resume_if(|h| h.cleared_by.is_some()),
            Attempt::Skipped => Transition::None,
            Attempt::Retry {
                throttle,
                reached,
                pause,
            } => {
                if let Some(pause) = self.settings.pause_after(throttle, pause) {
                    let until = now + pause;
                    self.throttled_until = Some(until);
                    self.next_slot = self.next_slot.max(until);
                }
                self.resume_if(|h| h.cleared_by.is_some_and(|needed| reached >= needed))
            }
            Attempt::Hold { cause, reply } => {
                let next_probe = now + self.settings.probe_every;
                match &self.hold {
                    // Still held (a probe failed again, or attempts that started before the
                    // hold came back): keep the first cause, its time and the probe schedule
                    // (probes start `probe_every` apart, however long each takes).
                    Some(_) => Transition::None,
                    None => {
                        let since = SystemTime::now();
                        self.hold = Some(Hold {
                            cause,
                            reply: reply.clone(),
                            since,
                            next_probe,
                            cleared_by: cause.cleared_by(),
                        });
                        Transition::Held {
                            cause,
                            reply,
                            since,
                        }
                    }
                }
            }
        }
    }

    /// Another relay sharing this mailbox's budget held it: this one stops too (its next probe
    /// comes a probe interval from now, the other relay probes meanwhile). Already held: the
    /// first hold stays.
    pub fn hold_elsewhere(
        &mut self,
        now: Instant,
        cause: HoldCause,
        reply: String,
        since: SystemTime,
    ) -> Transition {
        if self.hold.is_some() {
            return Transition::None;
        }
        self.hold = Some(Hold {
            cause,
            reply: reply.clone(),
            since,
            next_probe: now + self.settings.probe_every,
            cleared_by: cause.cleared_by(),
        });
        Transition::Held {
            cause,
            reply,
            since,
        }
    }

    /// Another relay sharing this mailbox's budget paused it (a 432 or `Retry-After` it got)
    /// until `until`: nothing starts here before, and the status shows it. Bounded by the
    /// longest pause the pacer itself would take.
    pub fn paused_elsewhere(&mut self, now: Instant, until: Instant) {
        let until = until.min(now + MAX_RETRY_AFTER_PAUSE.max(MAX_THROTTLE_PAUSE));
        self.throttled_until = Some(self.throttled_until.map_or(until, |t| t.max(until)));
        self.next_slot = self.next_slot.max(until);
    }

    /// The relay that held this mailbox saw it work again.
    pub fn resume_elsewhere(&mut self) -> Transition {
        self.resume_if(|_| true)
    }

    /// An operator changed the queue (`queue retry`, `release`): a held mailbox probes now.
    pub fn wake(&mut self, now: Instant) {
        if let Some(hold) = &mut self.hold {
            hold.next_probe = now;
        }
    }

    fn resume_if(&mut self, proven: impl Fn(&Hold) -> bool) -> Transition {
        match &self.hold {
            Some(hold) if proven(hold) => {
                self.hold = None;
                Transition::Resumed
            }
            _ => Transition::None,
        }
    }
}
