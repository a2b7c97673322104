//! Scenario 1 of the fault campaign: crash at every step with delivery on.
//!
//! The real binary delivers to the simulator, which runs as its own process (`simulate`) so it
//! survives the relay's death. Six clients send tracked messages (each one's fate recorded:
//! cut off before the final dot, in doubt after it, acknowledged, refused) while the relay is
//! killed, either with SIGKILL at seeded random moments or by `abort()` at a deterministic
//! failpoint (`RELAY_FAILPOINT`, src/failpoint.rs) in the spool commit or the delivery path. It is
//! restarted on the same spool each time; at the end a last relay drains the queue.
//!
//! Asserted: every acknowledged message reaches the mailbox at least once, with its exact body;
//! nothing cut off or refused is ever delivered; `corrupt/`, `failed/`, `tmp/` stay empty.
//! Duplicates (allowed: at-least-once) are counted and reported.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::fixtures::{Audit, Fate, Ledger, Rng, audit, dot_stuff, message, report, spool_count};
use common::process::{Relay, relay_toml, with_upstream};
use common::sim_process::SimProc;
use common::smtp::blocking::Client;

const CLIENTS: usize = 6;

/// The simulator without its Exchange-like rate limits (the scenario is about crashes).
const SIM_SMTP: &str =
    "messages_per_window = 1000000\nrate_window = \"1s\"\nconnections_per_mailbox = 50\n";

fn config(sim: &SimProc, spool: &Path) -> impl Fn(u16) -> String {
    let rest = with_upstream(&sim.fragment, "rate = \"1000/s\"\nconnections = 3");
    let spool = spool.to_path_buf();
    move |port| {
        relay_toml(
            port,
            &spool,
            "",
            "retry_min = \"1s\"\nretry_max = \"2s\"",
            &format!("{rest}\n[log]\nlevel = \"info\"\n"),
        )
    }
}

/// Clients sending tracked messages to `addr` until `stop` or the relay goes away.
fn clients(
    addr: std::net::SocketAddr,
    prefix: &str,
    seed: u64,
    ledger: &Arc<Ledger>,
    stop: &Arc<AtomicBool>,
    acks: &Arc<AtomicUsize>,
) -> Vec<std::thread::JoinHandle<()>> {
    // One more thread opens transactions and stops halfway through the body: these are cut
    // off by the crash and must never be delivered.
    let cut = {
        let ledger = ledger.clone();
        let stop = stop.clone();
        let prefix = prefix.to_string();
        std::thread::spawn(move || {
            let mut open = Vec::new();
            for n in 0..10 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut c) = Client::connect(addr) else {
                    break;
                };
                let marker = format!("{prefix}-cut-n{n}");
                let msg = message(&marker, 5_000);
                let ok = c
                    .command("MAIL FROM:<legacy@app.local>")
                    .is_ok_and(|r| r.code == 250)
                    && c.command("RCPT TO:<user@example.org>")
                        .is_ok_and(|r| r.code == 250)
                    && c.command("DATA").is_ok_and(|r| r.code == 354);
                if !ok {
                    break;
                }
                ledger.set(&marker, Fate::CutOff, 5_000);
                let half = dot_stuff(&msg[..msg.len() / 2]);
                if c.send_raw(&half).is_err() {
                    break;
                }
                open.push(c);
                std::thread::sleep(Duration::from_millis(20));
            }
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
            }
            drop(open);
        })
    };
    let mut threads: Vec<_> = (0..CLIENTS)
        .map(|t| {
            let ledger = ledger.clone();
            let stop = stop.clone();
            let acks = acks.clone();
            let prefix = prefix.to_string();
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed ^ ((t as u64 + 1) << 40));
                let mut conn: Option<Client> = None;
                for n in 0..150 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => match Client::connect(addr) {
                            Ok(c) => conn.insert(c),
                            Err(_) => return,
                        },
                    };
                    let size = if rng.range(0, 4) == 0 {
                        rng.range(40_000, 200_000)
                    } else {
                        rng.range(300, 3_000)
                    } as usize;
                    let marker = format!("{prefix}-t{t}-n{n}");
                    match c.send_tracked(&ledger, &marker, size) {
                        Ok(Fate::Acked) => {
                            acks.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(_) | Err(_) => return,
                    }
                    if rng.range(0, 4) == 0
                        && let Some(c) = conn.take()
                    {
                        c.quit();
                    }
                }
            })
        })
        .collect();
    threads.push(cut);
    threads
}

/// After a restart: recovery left nothing half-written and quarantined nothing.
fn assert_clean(spool: &Path, context: &str) {
    for sub in ["corrupt", "failed"] {
        assert_eq!(
            spool_count(spool, sub),
            0,
            "{context}: messages in {sub}/ after recovery"
        );
    }
}

/// Starts a relay without failpoints and waits until `queue/` is empty (bounded).
fn drain(work: &Path, sim: &SimProc, spool: &Path, tag: &str) -> Duration {
    let mut relay = Relay::start_with(work, tag, &[], config(sim, spool));
    assert_clean(spool, tag);
    let started = Instant::now();
    while spool_count(spool, "queue") > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "{tag}: queue did not drain: {} left\n{}",
            spool_count(spool, "queue"),
            relay.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = started.elapsed();
    assert!(relay.stop(), "{tag}: relay did not stop cleanly");
    assert_eq!(spool_count(spool, "held"), 0, "{tag}: held messages");
    assert_clean(spool, tag);
    took
}

fn check(sim: &SimProc, ledger: &Ledger, prefix: &str, context: &str) -> Audit {
    let a = audit(ledger, &sim.messages(), prefix);
    assert!(a.acked > 0, "{context}: nothing was acknowledged");
    assert!(
        a.lost.is_empty(),
        "{context}: acknowledged but never delivered: {:?}",
        a.lost
    );
    assert!(a.wrong.is_empty(), "{context}: {:?}", a.wrong);
    a
}

#[test]
fn sigkill_at_random_moments_with_delivery_on_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path();
    let spool = work.join("spool");
    let sim = SimProc::start(work, SIM_SMTP);
    let ledger = Arc::new(Ledger::default());
    let seeds: Vec<u64> = match std::env::var("FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(s) => vec![s],
        None => vec![0xC0FFEE01, 0xC0FFEE02, 0xC0FFEE03, 0xC0FFEE04],
    };
    let mut history = Vec::new();
    for (round, &seed) in seeds.iter().enumerate() {
        let mut relay = Relay::start_with(work, &format!("rand{round}"), &[], config(&sim, &spool));
        assert_clean(&spool, "restart");
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(AtomicUsize::new(0));
        let threads = clients(
            relay.addr(),
            &format!("rand-r{round}"),
            seed,
            &ledger,
            &stop,
            &acks,
        );
        let mut rng = Rng::new(seed);
        let how = if rng.range(0, 1) == 0 {
            let ms = rng.range(150, 900);
            std::thread::sleep(Duration::from_millis(ms));
            format!("after {ms} ms")
        } else {
            let n = rng.range(5, 60) as usize;
            let deadline = Instant::now() + Duration::from_secs(20);
            while acks.load(Ordering::SeqCst) < n && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            format!("after {n} acks")
        };
        // The kill is the fault: it must land on a running relay, not on one that already died.
        assert!(
            relay.running(),
            "round {round}: the relay exited before the kill:\n{}",
            relay.log_text()
        );
        relay.kill();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().expect("client thread");
        }
        history.push(format!(
            "round {round} seed {seed:#x}: SIGKILL {how}, {} queued, {} in tmp/",
            spool_count(&spool, "queue"),
            spool_count(&spool, "tmp")
        ));
    }
    let took = drain(work, &sim, &spool, "rand-drain");
    let context = history.join("; ");
    let a = check(&sim, &ledger, "rand-", &context);
    report(&format!(
        "crash/random-sigkill rounds={} acked={} in_doubt={} cut_off={} refused={} delivered={} \
         lost={} duplicates={} drain_ms={}",
        seeds.len(),
        a.acked,
        a.in_doubt,
        a.cut_off,
        a.refused,
        a.delivered,
        a.lost.len(),
        a.duplicates,
        took.as_millis()
    ));
    eprintln!("{context}");
}

/// Every failpoint in turn (N-th hit, so several sessions/deliveries are in flight), on one
/// spool and one mailbox; each round's messages carry the point's name.
#[test]
fn abort_at_each_failpoint_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path();
    let spool = work.join("spool");
    let sim = SimProc::start(work, SIM_SMTP);
    let points: &[(&str, u32)] = &[
        ("mid-data", 60),
        ("after-body-fsync", 9),
        ("after-rename", 9),
        ("after-dir-fsync", 9),
        ("after-250", 9),
        ("upstream-mid-data", 6),
        ("after-upstream-250", 6),
    ];
    let mut lines = Vec::new();
    for (i, &(point, nth)) in points.iter().enumerate() {
        let ledger = Arc::new(Ledger::default());
        let spec = format!("{point}:{nth}");
        let mut relay = Relay::start_with(
            work,
            &format!("fp-{point}"),
            &[("RELAY_FAILPOINT", spec.as_str())],
            config(&sim, &spool),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(AtomicUsize::new(0));
        let prefix = format!("fp{i}-{point}");
        let threads = clients(
            relay.addr(),
            &prefix,
            0xFA17 + i as u64,
            &ledger,
            &stop,
            &acks,
        );
        let died = relay.wait_exit(Duration::from_secs(30));
        let log = relay.log_text();
        relay.kill();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().expect("client thread");
        }
        assert!(died, "failpoint {spec} was never reached:\n{log}");
        assert!(
            log.contains(&format!("failpoint {point} reached")),
            "{spec}: the relay died for another reason:\n{log}"
        );
        let at_crash = (
            spool_count(&spool, "queue"),
            std::fs::read_dir(spool.join("tmp"))
                .map(|d| d.count())
                .unwrap_or(0),
        );
        let took = drain(work, &sim, &spool, &format!("fp-{point}-drain"));
        let a = check(&sim, &ledger, &prefix, &spec);
        lines.push(format!(
            "crash/failpoint {spec} acked={} in_doubt={} cut_off={} refused={} delivered={} \
             lost={} duplicates={} queued_at_crash={} tmp_at_crash={} drain_ms={}",
            a.acked,
            a.in_doubt,
            a.cut_off,
            a.refused,
            a.delivered,
            a.lost.len(),
            a.duplicates,
            at_crash.0,
            at_crash.1,
            took.as_millis()
        ));
        if point == "after-upstream-250" {
            // The message the upstream had accepted was sent again after the restart.
            assert!(
                a.duplicates >= 1,
                "{spec}: expected the in-flight message to be delivered twice"
            );
        }
    }
    for l in &lines {
        report(l);
    }
}
