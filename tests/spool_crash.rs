//! Crash safety of the real binary: four clients send messages while the relay is killed with
//! SIGKILL at a pseudo-random moment (seeded; after a delay or after some acknowledgements),
//! then the relay is restarted on the same spool. Every message that got `250 ... queued as ID`
//! must be there, whole and byte-exact; nothing may be half-there (`tmp/` cleared, nothing
//! undecodable in `queue/`, nothing in `corrupt/`); a message that was sent but not
//! acknowledged may be present, but then whole.
//!
//! Seeds are fixed so a failure reproduces; `CRASH_SEED=<n>` runs one extra round with seed n.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fixtures::{Rng, assert_stored_equals, files_in, marker_of, queued_path, read_stored};
use common::process::{Extra, Relay, run_cli};
use common::smtp::blocking::Client;

const CLIENTS: usize = 4;
/// Bound on messages per client per round (the kill normally comes much earlier).
const MAX_PER_CLIENT: usize = 300;

/// The message a client sends for `marker`, `size` bytes or a little more: deterministic, so
/// the checker can rebuild it. Some lines start with "." (dot-stuffing on the wire); every
/// other message lacks a Date header (the relay adds one).
fn message(marker: &str, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: crash@legacy.local\r\nTo: user@example.org\r\nSubject: crash test {marker}\r\n\
         Message-ID: <{marker}@legacy.local>\r\nX-Marker: {marker}\r\n"
    )
    .into_bytes();
    if marker.len().is_multiple_of(2) {
        m.extend_from_slice(b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n");
    }
    m.extend_from_slice(b"\r\n");
    let mut i = 0u64;
    while m.len() < size {
        let line = if i % 7 == 3 {
            format!(".{marker} dotted line {i:06} ..........................\r\n")
        } else {
            format!("{marker} line {i:06} the quick brown fox jumps over the lazy dog\r\n")
        };
        m.extend_from_slice(line.as_bytes());
        i += 1;
    }
    m
}

#[derive(Default)]
struct Record {
    /// marker → id of every message acknowledged with 250.
    acked: Mutex<HashMap<String, String>>,
    /// marker → size of every message whose DATA was started (acknowledged or not).
    attempted: Mutex<HashMap<String, usize>>,
    /// Replies other than 250 to a message (none are expected).
    unexpected: Mutex<Vec<String>>,
    acks: AtomicUsize,
}

fn client(
    addr: SocketAddr,
    round: usize,
    t: usize,
    seed: u64,
    rec: Arc<Record>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = Rng::new(seed ^ ((t as u64 + 1) << 32));
    let mut conn: Option<Client> = None;
    for n in 0..MAX_PER_CLIENT {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Client::connect(addr) {
                Ok(c) => conn.insert(c),
                Err(_) => return, // the relay is gone
            },
        };
        let marker = format!("r{round}-s{seed}-t{t}-n{n}");
        // Mostly small messages, some large enough that a kill lands in the middle of DATA.
        let size = if rng.range(0, 3) == 0 {
            rng.range(60_000, 300_000)
        } else {
            rng.range(300, 4_000)
        } as usize;
        rec.attempted.lock().unwrap().insert(marker.clone(), size);
        match c.send(
            "crash@legacy.local",
            "user@example.org",
            &message(&marker, size),
        ) {
            Ok(reply) => match reply.queued_id() {
                Some(id) => {
                    rec.acked.lock().unwrap().insert(marker, id);
                    rec.acks.fetch_add(1, Ordering::SeqCst);
                }
                None => {
                    rec.unexpected
                        .lock()
                        .unwrap()
                        .push(format!("{marker}: {}", reply.text()));
                    return;
                }
            },
            Err(_) => return, // killed mid-transaction
        }
        // Now and then a new connection.
        if rng.range(0, 5) == 0
            && let Some(c) = conn.take()
        {
            c.quit();
        }
    }
}

/// One round: start the relay on `spool`, send from four clients, SIGKILL it at a moment chosen
/// by `seed`. Returns how the kill was timed (for failure messages).
fn crash_round(work: &Path, spool: &Path, round: usize, seed: u64, rec: &Arc<Record>) -> String {
    let mut relay = Relay::start(work, spool, &Extra::default());
    let addr = relay.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let acks_before = rec.acks.load(Ordering::SeqCst);
    let threads: Vec<_> = (0..CLIENTS)
        .map(|t| {
            let rec = rec.clone();
            let stop = stop.clone();
            std::thread::spawn(move || client(addr, round, t, seed, rec, stop))
        })
        .collect();
    let mut rng = Rng::new(seed);
    let how = if rng.range(0, 1) == 0 {
        let ms = rng.range(50, 300);
        std::thread::sleep(Duration::from_millis(ms));
        format!("after {ms} ms")
    } else {
        let n = rng.range(1, 40) as usize;
        let deadline = Instant::now() + Duration::from_secs(20);
        while rec.acks.load(Ordering::SeqCst) < acks_before + n && Instant::now() < deadline {
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
    for th in threads {
        th.join().expect("client thread panicked");
    }
    let acked_now = rec.acks.load(Ordering::SeqCst) - acks_before;
    // Messages the kill caught mid-transfer (recovery must clear them).
    let partial = files_in(spool, "tmp").len();
    format!(
        "round {round} seed {seed}: SIGKILL {how} ({acked_now} acknowledged this round, \
         {partial} in tmp/ at the kill)"
    )
}

/// Checks the spool of a freshly restarted relay against what the clients recorded.
fn check_spool(spool: &Path, rec: &Record, context: &str) -> usize {
    let tmp = files_in(spool, "tmp");
    assert!(
        tmp.is_empty(),
        "{context}: tmp/ not cleared after restart: {tmp:?}"
    );
    let corrupt = files_in(spool, "corrupt");
    assert!(
        corrupt.is_empty(),
        "{context}: recovery found damaged messages: {corrupt:?}"
    );
    for sub in ["held", "failed"] {
        let f = files_in(spool, sub);
        assert!(f.is_empty(), "{context}: unexpected files in {sub}/: {f:?}");
    }
    let acked = rec.acked.lock().unwrap();
    let attempted = rec.attempted.lock().unwrap();
    let mut seen: HashMap<String, String> = HashMap::new();
    for name in files_in(spool, "queue") {
        let id = name
            .strip_suffix(".msg")
            .unwrap_or_else(|| panic!("{context}: stray file queue/{name}"));
        let stored = read_stored(&spool.join("queue").join(&name))
            .unwrap_or_else(|e| panic!("{context}: undecodable message in queue/: {e}"));
        assert_eq!(stored.header.id, id, "{context}: Id header vs file name");
        let marker = marker_of(&stored.body)
            .unwrap_or_else(|| panic!("{context}: queue/{name} has no X-Marker"));
        let size = *attempted
            .get(&marker)
            .unwrap_or_else(|| panic!("{context}: queue/{name} has unknown marker {marker}"));
        assert_stored_equals(&stored.body, id, &message(&marker, size));
        if let Some(other) = seen.insert(marker.clone(), id.to_string()) {
            panic!("{context}: message {marker} stored twice ({other} and {id})");
        }
    }
    for (marker, id) in acked.iter() {
        assert!(
            queued_path(spool, id).is_file(),
            "{context}: acknowledged message {marker} ({id}) is missing after the crash"
        );
        assert_eq!(
            seen.get(marker),
            Some(id),
            "{context}: acknowledged {marker} stored under another id"
        );
    }
    let unexpected = rec.unexpected.lock().unwrap();
    assert!(unexpected.is_empty(), "{context}: refusals: {unexpected:?}");
    seen.len() - acked.len()
}

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool");
    let rec = Arc::new(Record::default());
    let mut seeds: Vec<u64> = vec![
        0x5eed_0001,
        0x5eed_0002,
        0x5eed_0003,
        0x5eed_0004,
        0x5eed_0005,
    ];
    if let Some(s) = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        seeds.push(s);
    }
    let mut history = Vec::new();
    for (round, seed) in seeds.iter().copied().enumerate() {
        history.push(crash_round(dir.path(), &spool, round, seed, &rec));
        // Restart on the same spool: recovery runs at start.
        let relay = Relay::start(dir.path(), &spool, &Extra::default());
        let context = history.join("; ");
        check_spool(&spool, &rec, &context);

        // `queue list` (safe while serve runs) shows every acknowledged id.
        let out = run_cli(&relay.config, &["queue", "list"], &[]);
        assert!(
            out.status.success(),
            "queue list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8_lossy(&out.stdout);
        for (marker, id) in rec.acked.lock().unwrap().iter() {
            assert!(
                listing
                    .lines()
                    .any(|l| l.starts_with(id.as_str()) && l.contains("queued")),
                "{context}: queue list lacks acknowledged {marker} ({id}):\n{listing}"
            );
        }
        drop(relay);
    }
    let acked = rec.acked.lock().unwrap().len();
    assert!(acked > 0, "no message was ever acknowledged: {history:?}");

    // After all that, the relay still stops cleanly and the spool is still whole.
    let mut relay = Relay::start(dir.path(), &spool, &Extra::default());
    let extras = check_spool(&spool, &rec, "final");
    assert!(
        relay.stop(),
        "relay did not exit 0 on SIGTERM:\n{}",
        relay.log_text()
    );
    eprintln!(
        "crash rounds: {}; {acked} acknowledged, {extras} unacknowledged but whole",
        history.join("; ")
    );
}
