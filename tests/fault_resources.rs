//! Scenario 3 of the fault campaign: resource exhaustion against the real binary (memory read
//! from `/proc/<pid>/status`). Disk full is covered by tests/disk_full.rs.
//!
//! - Idle and slowloris connections up to and past `smtp.max_connections`: a well-behaved
//!   client is refused quickly with 421 while the slots are taken, served again once they are
//!   released; RSS stays bounded.
//! - 35 MiB messages on several connections at once: accepted whole; peak RSS reported and
//!   bounded (the spool streams to disk).

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::fixtures::{Fate, Ledger, report, spool_count};
use common::process::{Relay, memory_kib, open_fds, relay_toml};
use common::smtp::blocking::Client;

const MAX_CONNECTIONS: usize = 32;

#[test]
fn idle_and_slowloris_connections_past_the_limit_leave_service_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool");
    let mut relay = Relay::start_with(dir.path(), "slow", &[], |port| {
        relay_toml(
            port,
            &spool,
            &format!("max_connections = {MAX_CONNECTIONS}"),
            "",
            "[log]\nlevel = \"warn\"\n",
        )
    });
    let pid = relay.pid();
    let (_, rss_start) = memory_kib(pid).expect("proc status");
    // Half the slots idle after the greeting, half slowloris: a byte of a command now and then
    // (each byte resets the command timeout, so only the connection limit protects the relay).
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS / 2 {
        idle.push(TcpStream::connect(relay.addr()).expect("connect"));
    }
    let mut slow = Vec::new();
    for _ in 0..MAX_CONNECTIONS / 2 {
        let mut s = Client::connect(relay.addr()).expect("slowloris connect");
        s.send_raw(b"MAIL FROM:<a").expect("write");
        slow.push(s);
    }
    // Past the limit: 3x more connection attempts, each refused at once with 421.
    let mut refused = 0;
    let mut slowest = Duration::ZERO;
    for _ in 0..MAX_CONNECTIONS * 3 {
        let started = Instant::now();
        match Client::connect(relay.addr()) {
            Ok(_) => {}
            Err(e) => {
                assert!(
                    e.to_string().contains("421"),
                    "refused with something other than 421: {e}"
                );
                refused += 1;
            }
        }
        slowest = slowest.max(started.elapsed());
    }
    assert_eq!(
        refused,
        MAX_CONNECTIONS * 3,
        "every excess connection refused"
    );
    assert!(
        slowest < Duration::from_secs(5),
        "a refusal took {slowest:?}"
    );
    // The limit is what refused them: the relay logs one refusal per excess connection.
    relay.wait_log_blocking("smtp.max_connections reached", 0, Duration::from_secs(10));
    let logged = relay
        .log_text()
        .lines()
        .filter(|l| l.contains("refusing connection: smtp.max_connections reached"))
        .count();
    assert_eq!(logged, refused, "refusals in the log");
    for _ in 0..20 {
        for s in slow.iter_mut() {
            let _ = s.send_raw(b"x");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, rss_loaded) = memory_kib(pid).expect("proc status");
    let fds_loaded = open_fds(pid);
    // Slots freed: a well-behaved client is served again.
    drop(idle);
    drop(slow);
    let deadline = Instant::now() + Duration::from_secs(10);
    let ack = loop {
        if let Ok(mut c) = Client::connect(relay.addr()) {
            let ledger = Ledger::default();
            break c
                .send_tracked(&ledger, "after-slowloris", 1000)
                .expect("send");
        }
        assert!(Instant::now() < deadline, "slots never freed");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(ack, Fate::Acked);
    let (hwm, _) = memory_kib(pid).expect("proc status");
    report(&format!(
        "resources/slowloris max_connections={MAX_CONNECTIONS} held={} excess_refused={refused} \
         slowest_refusal_ms={} rss_start_kib={rss_start} rss_loaded_kib={rss_loaded} \
         peak_rss_kib={hwm} fds_loaded={fds_loaded}",
        MAX_CONNECTIONS,
        slowest.as_millis()
    ));
    assert!(hwm < 200 * 1024, "peak RSS {hwm} KiB");
    assert!(relay.stop());
}

#[test]
fn many_35_mib_messages_at_once_keep_memory_bounded() {
    const CONNS: usize = 4;
    const SIZE: usize = 35 * 1024 * 1024 - 64 * 1024;
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool");
    let relay = Relay::start_with(dir.path(), "big", &[], |port| {
        relay_toml(port, &spool, "", "", "[log]\nlevel = \"warn\"\n")
    });
    let pid = relay.pid();
    let addr = relay.addr();
    let threads: Vec<_> = (0..CONNS)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr).expect("connect");
                assert_eq!(c.command("MAIL FROM:<big@app.local>").unwrap().code, 250);
                assert_eq!(c.command("RCPT TO:<u@example.org>").unwrap().code, 250);
                assert_eq!(c.command("DATA").unwrap().code, 354);
                let line = format!("{t} {}\r\n", "x".repeat(1000));
                let mut lines = SIZE / line.len();
                c.send_raw(b"Subject: big\r\n\r\n").expect("write");
                let mut sent = 0;
                while lines > 0 {
                    let n = lines.min(1000);
                    let chunk = line.repeat(n);
                    c.send_raw(chunk.as_bytes()).expect("write");
                    sent += chunk.len();
                    lines -= n;
                }
                c.send_raw(b".\r\n").unwrap();
                let reply = c.read_reply().expect("reply");
                assert_eq!(reply.code, 250, "{reply}");
                sent
            })
        })
        .collect();
    let mut sent = 0;
    let mut smallest = usize::MAX;
    for t in threads {
        let n = t.join().expect("sender");
        sent += n;
        smallest = smallest.min(n);
    }
    let (hwm, rss) = memory_kib(pid).expect("proc status");
    let queued = spool_count(&spool, "queue");
    assert_eq!(queued, CONNS);
    // Each one is whole on disk: the premise is 35 MiB messages, not truncated ones.
    for name in common::fixtures::files_in(&spool, "queue") {
        let len = std::fs::metadata(spool.join("queue").join(&name))
            .expect("queued file")
            .len();
        assert!(
            len >= smallest as u64,
            "{name}: {len} bytes, sent {smallest}"
        );
    }
    report(&format!(
        "resources/35MiB-messages connections={CONNS} bytes={sent} acked={CONNS} \
         peak_rss_kib={hwm} rss_after_kib={rss}"
    ));
    // Streaming: far less than one message per connection in memory.
    assert!(hwm < 120 * 1024, "peak RSS {hwm} KiB for {CONNS} x 35 MiB");
    std::io::stderr().flush().ok();
    drop(relay);
    let _ = std::fs::remove_dir_all(&spool);
}
