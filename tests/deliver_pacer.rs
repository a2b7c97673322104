//! The per-mailbox pacer on tokio's paused clock: attempts are virtual tasks that take a set
//! time, driven the way the dispatcher drives them. Nothing here waits in real time.

use std::time::Duration;

use smtp_oauth_relay::deliver::classify::HoldCause;
use smtp_oauth_relay::deliver::pacer::{
    Attempt, Pacer, PacerSettings, Progress, Start, Transition,
};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// 30/min, 3 sessions, retries 1 min to 10 min (the relay's defaults).
fn defaults() -> PacerSettings {
    PacerSettings::new(
        3,
        30,
        Duration::from_secs(60),
        Duration::from_secs(60),
        Duration::from_secs(600),
    )
}

#[derive(Debug, Clone, Copy)]
struct Run {
    index: usize,
    start: Instant,
    end: Instant,
    probe: bool,
}

/// Runs `n` attempts through `pacer`; attempt `i` takes `took(i)` and ends as `outcome(i)`.
/// Returns every attempt with its start and end, and each transition the pacer reported.
async fn drive(
    pacer: &mut Pacer,
    n: usize,
    took: impl Fn(usize) -> Duration,
    outcome: impl Fn(usize) -> Attempt,
) -> (Vec<Run>, Vec<(usize, Transition)>) {
    let mut running = JoinSet::new();
    let mut runs = Vec::new();
    let mut transitions = Vec::new();
    let mut next = 0;
    let mut max_in_flight = 0;
    // Bounded: every iteration starts or finishes an attempt, or sleeps until one can start.
    for _ in 0..(4 * n + 16) {
        if next == n && running.is_empty() {
            break;
        }
        let now = Instant::now();
        let decision = if next < n {
            pacer.try_start(now)
        } else {
            Start::Busy
        };
        match decision {
            Start::Now { probe } => {
                let index = next;
                next += 1;
                let took = took(index);
                running.spawn(async move {
                    tokio::time::sleep(took).await;
                    (index, now, probe)
                });
                max_in_flight = max_in_flight.max(pacer.in_flight());
                assert!(
                    running.len() <= pacer.settings().connections,
                    "more attempts than session slots"
                );
            }
            Start::At(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    done = running.join_next(), if !running.is_empty() => {
                        let (index, start, probe) = done.expect("task").expect("join");
                        let end = Instant::now();
                        runs.push(Run { index, start, end, probe });
                        let t = pacer.finished(end, outcome(index));
                        if t != Transition::None {
                            transitions.push((index, t));
                        }
                    }
                }
            }
            Start::Busy => {
                let (index, start, probe) = running
                    .join_next()
                    .await
                    .expect("an attempt in flight")
                    .expect("join");
                let end = Instant::now();
                runs.push(Run {
                    index,
                    start,
                    end,
                    probe,
                });
                let t = pacer.finished(end, outcome(index));
                if t != Transition::None {
                    transitions.push((index, t));
                }
            }
        }
    }
    assert_eq!(runs.len(), n, "the drive loop ran out of iterations");
    runs.sort_by_key(|r| r.start);
    (runs, transitions)
}

fn max_concurrent(runs: &[Run]) -> usize {
    runs.iter()
        .map(|r| {
            runs.iter()
                .filter(|o| o.start <= r.start && o.end > r.start)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(start_paused = true)]
async fn thirty_a_minute_evenly_spaced_never_a_fourth_session() {
    let t0 = Instant::now();
    let mut pacer = Pacer::new(defaults(), t0);
    // Attempts of 1.5 s: the rate, not the sessions, is the limit.
    let (runs, transitions) = drive(
        &mut pacer,
        90,
        |_| Duration::from_millis(1500),
        |_| Attempt::Delivered,
    )
    .await;
    assert!(transitions.is_empty());
    for pair in runs.windows(2) {
        assert_eq!(
            pair[1].start - pair[0].start,
            Duration::from_secs(2),
            "starts are 2 s apart at 30/min"
        );
    }
    // 90 messages at 30/min: the last one starts 178 s after the first.
    assert_eq!(runs[89].start - t0, Duration::from_secs(178));
    let in_any_minute = runs
        .iter()
        .map(|r| {
            runs.iter()
                .filter(|o| o.start >= r.start && o.start < r.start + Duration::from_secs(60))
                .count()
        })
        .max()
        .unwrap();
    assert_eq!(in_any_minute, 30);
    assert!(max_concurrent(&runs) <= 3);

    // Slow attempts (20 s each): the three sessions are the limit, and a fourth never opens.
    let mut pacer = Pacer::new(defaults(), Instant::now());
    let (runs, _) = drive(
        &mut pacer,
        12,
        |_| Duration::from_secs(20),
        |_| Attempt::Delivered,
    )
    .await;
    assert_eq!(max_concurrent(&runs), 3);
}

#[tokio::test(start_paused = true)]
async fn a_held_mailbox_sends_one_probe_per_interval_and_resumes_on_delivery() {
    let mut pacer = Pacer::new(defaults(), Instant::now());
    // Attempt 0 comes back with 535 5.7.139; the probes 1 and 2 fail the same way; probe 3 is
    // delivered (the admin fixed the tenant); 4.. run at the normal pace again.
    let hold = || Attempt::Hold {
        cause: HoldCause::SmtpAuthDisabled,
        reply: "535 5.7.139 Authentication unsuccessful".into(),
    };
    let (runs, transitions) = drive(
        &mut pacer,
        12,
        |_| Duration::from_secs(1),
        |i| if i <= 2 { hold() } else { Attempt::Delivered },
    )
    .await;
    // One Held (the first 535), one Resumed (the delivered probe).
    assert!(
        matches!(
            transitions.as_slice(),
            [
                (
                    0,
                    Transition::Held {
                        cause: HoldCause::SmtpAuthDisabled,
                        ..
                    }
                ),
                (3, Transition::Resumed)
            ]
        ),
        "{transitions:?}"
    );
    let probes: Vec<&Run> = runs.iter().filter(|r| r.probe).collect();
    assert_eq!(
        probes.iter().map(|r| r.index).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    // Probes are alone and `probe_every` (retry_max, at most 5 min) apart.
    for pair in probes.windows(2) {
        assert_eq!(pair[1].start - pair[0].start, Duration::from_secs(300));
    }
    for probe in &probes {
        assert_eq!(
            runs.iter()
                .filter(|o| o.start < probe.end && o.end > probe.start)
                .count(),
            1,
            "a probe runs alone"
        );
    }
    // After the resume, the normal pace again: 2 s apart.
    let after: Vec<&Run> = runs.iter().filter(|r| r.index >= 4).collect();
    for pair in after.windows(2) {
        assert_eq!(pair[1].start - pair[0].start, Duration::from_secs(2));
    }
}

#[tokio::test(start_paused = true)]
async fn a_token_hiccup_during_a_sendas_hold_does_not_resume_it() {
    let now = Instant::now();
    let mut pacer = Pacer::new(defaults(), now);
    assert_eq!(pacer.try_start(now), Start::Now { probe: false });
    let held = pacer.finished(
        now,
        Attempt::Hold {
            cause: HoldCause::SendAsDenied,
            reply: "550 5.7.60 SMTP; Client does not have permissions to send as this sender"
                .into(),
        },
    );
    assert!(matches!(held, Transition::Held { .. }));
    // The probe cannot even get a token (Entra 503): that says nothing about SendAs.
    let later = now + Duration::from_secs(300);
    assert_eq!(pacer.try_start(later), Start::Now { probe: true });
    let t = pacer.finished(
        later,
        Attempt::Retry {
            throttle: false,
            reached: Progress::Token,
            pause: None,
        },
    );
    assert_eq!(t, Transition::None);
    assert!(pacer.hold().is_some(), "still held");
    // Nor does a session that got as far as the transaction and then dropped.
    let later = later + Duration::from_secs(300);
    assert_eq!(pacer.try_start(later), Start::Now { probe: true });
    let t = pacer.finished(
        later,
        Attempt::Retry {
            throttle: false,
            reached: Progress::Transaction,
            pause: None,
        },
    );
    assert_eq!(t, Transition::None);
    // A delivery does.
    let later = later + Duration::from_secs(300);
    assert_eq!(pacer.try_start(later), Start::Now { probe: true });
    assert_eq!(
        pacer.finished(later, Attempt::Delivered),
        Transition::Resumed
    );

    // An AUTH hold (535 5.7.139) is proven fixed by reaching the transaction, not by a token.
    let mut pacer = Pacer::new(defaults(), later);
    assert!(matches!(pacer.try_start(later), Start::Now { .. }));
    pacer.finished(
        later,
        Attempt::Hold {
            cause: HoldCause::SmtpAuthDisabled,
            reply: "535 5.7.139".into(),
        },
    );
    let probe = later + Duration::from_secs(300);
    assert_eq!(pacer.try_start(probe), Start::Now { probe: true });
    let t = pacer.finished(
        probe,
        Attempt::Retry {
            throttle: false,
            reached: Progress::Session,
            pause: None,
        },
    );
    assert_eq!(t, Transition::None, "AUTH not passed yet");
    let probe = probe + Duration::from_secs(300);
    assert_eq!(pacer.try_start(probe), Start::Now { probe: true });
    let t = pacer.finished(
        probe,
        Attempt::Retry {
            throttle: false,
            reached: Progress::Transaction,
            pause: None,
        },
    );
    assert_eq!(t, Transition::Resumed, "AUTH passed: the hold is over");
}

#[tokio::test(start_paused = true)]
async fn throttling_pauses_the_whole_mailbox_then_the_pace_resumes() {
    let t0 = Instant::now();
    let mut pacer = Pacer::new(defaults(), t0);
    // Attempt 4 gets 432 4.3.2 (throttled): nothing starts for retry_min (60 s) after it.
    let (runs, _) = drive(
        &mut pacer,
        10,
        |_| Duration::from_millis(500),
        |i| {
            if i == 4 {
                Attempt::Retry {
                    throttle: true,
                    reached: Progress::Transaction,
                    pause: None,
                }
            } else {
                Attempt::Delivered
            }
        },
    )
    .await;
    let throttled = runs.iter().find(|r| r.index == 4).unwrap();
    let next = runs.iter().find(|r| r.index == 5).unwrap();
    assert_eq!(next.start - throttled.end, Duration::from_secs(60));
    let after: Vec<&Run> = runs.iter().filter(|r| r.index >= 5).collect();
    for pair in after.windows(2) {
        assert_eq!(pair[1].start - pair[0].start, Duration::from_secs(2));
    }
    // The pause is over: no longer reported as throttled.
    assert_eq!(pacer.throttled_until(Instant::now()), None);
}

#[tokio::test(start_paused = true)]
async fn an_operator_wake_probes_a_held_mailbox_at_once() {
    let now = Instant::now();
    let mut pacer = Pacer::new(defaults(), now);
    assert!(matches!(pacer.try_start(now), Start::Now { .. }));
    pacer.finished(
        now,
        Attempt::Hold {
            cause: HoldCause::AuthenticationFailed,
            reply: "535 5.7.3 Authentication unsuccessful".into(),
        },
    );
    let soon = now + Duration::from_secs(5);
    assert_eq!(
        pacer.try_start(soon),
        Start::At(now + Duration::from_secs(300))
    );
    pacer.wake(soon);
    assert_eq!(pacer.try_start(soon), Start::Now { probe: true });
    // While the probe is out, nothing else starts.
    assert_eq!(pacer.try_start(soon), Start::Busy);
}

#[test]
fn retry_bounds_above_five_minutes_cannot_panic() {
    // queue.retry_min = 30m (RFC 5321 §4.5.4.1): the probe interval stays 5 minutes, the
    // throttle pause at most a minute (this was an Ord::clamp panic before).
    let s = PacerSettings::new(
        3,
        30,
        Duration::from_secs(60),
        Duration::from_secs(1800),
        Duration::from_secs(3600),
    );
    assert_eq!(s.probe_every, Duration::from_secs(300));
    assert_eq!(s.throttle_pause, Duration::from_secs(60));
    let s = PacerSettings::new(
        0,
        0,
        Duration::from_secs(60),
        Duration::ZERO,
        Duration::ZERO,
    );
    assert_eq!(s.connections, 1);
    assert_eq!(s.spacing, Duration::from_secs(60));
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_pauses_the_whole_mailbox_that_long_within_a_cap() {
    // Graph's 429/503 Retry-After is per app and mailbox: 90 s asked, 90 s paused (more than
    // the 60 s of a plain throttle); an absurd one pauses the mailbox 10 minutes at most.
    for (asked, paused) in [
        (Duration::from_secs(90), Duration::from_secs(90)),
        (Duration::from_secs(7200), Duration::from_secs(600)),
    ] {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(defaults(), t0);
        let (runs, _) = drive(
            &mut pacer,
            6,
            |_| Duration::from_millis(500),
            |i| {
                if i == 2 {
                    Attempt::Retry {
                        throttle: true,
                        reached: Progress::Transaction,
                        pause: Some(asked),
                    }
                } else {
                    Attempt::Delivered
                }
            },
        )
        .await;
        let throttled = runs.iter().find(|r| r.index == 2).unwrap();
        let next = runs.iter().find(|r| r.index == 3).unwrap();
        assert_eq!(next.start - throttled.end, paused, "asked {asked:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_hold_from_another_relay_stops_starts_until_it_is_cleared() {
    let mut pacer = Pacer::new(defaults(), Instant::now());
    let now = Instant::now();
    let since = std::time::SystemTime::now();
    let held = pacer.hold_elsewhere(
        now,
        HoldCause::SmtpAuthDisabled,
        "535 5.7.139".into(),
        since,
    );
    assert_eq!(
        held,
        Transition::Held {
            cause: HoldCause::SmtpAuthDisabled,
            reply: "535 5.7.139".into(),
            since,
        }
    );
    // The other relay probes: this one waits a whole probe interval (retry_max, 10 min).
    assert_eq!(
        pacer.try_start(now),
        Start::At(now + Duration::from_secs(300))
    );
    // Held already: a second report changes nothing.
    assert_eq!(
        pacer.hold_elsewhere(now, HoldCause::SendAsDenied, "550 5.7.60".into(), since),
        Transition::None
    );
    assert_eq!(pacer.resume_elsewhere(), Transition::Resumed);
    assert_eq!(pacer.try_start(now), Start::Now { probe: false });
    assert_eq!(pacer.resume_elsewhere(), Transition::None);
}

#[tokio::test(start_paused = true)]
async fn a_pause_another_relay_recorded_stops_starts_here_within_the_pacers_bounds() {
    let settings = defaults();
    // The one rule for a pause: a throttle earns retry_min, Retry-After its wait up to 10 min.
    assert_eq!(settings.pause_after(false, None), None);
    assert_eq!(
        settings.pause_after(true, None),
        Some(Duration::from_secs(60))
    );
    assert_eq!(
        settings.pause_after(false, Some(Duration::from_secs(3600))),
        Some(smtp_oauth_relay::deliver::pacer::MAX_RETRY_AFTER_PAUSE)
    );
    let mut pacer = Pacer::new(settings, Instant::now());
    let now = Instant::now();
    pacer.paused_elsewhere(now, now + Duration::from_secs(30));
    assert_eq!(
        pacer.throttled_until(now),
        Some(now + Duration::from_secs(30))
    );
    assert_eq!(
        pacer.try_start(now),
        Start::At(now + Duration::from_secs(30))
    );
    // A pause named past what the pacer itself would take is cut to that.
    pacer.paused_elsewhere(now, now + Duration::from_secs(86_400));
    assert_eq!(
        pacer.throttled_until(now),
        Some(now + smtp_oauth_relay::deliver::pacer::MAX_RETRY_AFTER_PAUSE)
    );
    tokio::time::advance(smtp_oauth_relay::deliver::pacer::MAX_RETRY_AFTER_PAUSE).await;
    assert!(matches!(
        pacer.try_start(Instant::now()),
        Start::Now { probe: false }
    ));
    assert_eq!(pacer.throttled_until(Instant::now()), None);
}
