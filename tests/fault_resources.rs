//! Scenario 3 of the fault campaign: resource exhaustion against the real binary (memory read
//! from `/proc/<pid>/status`). Disk full is covered by tests/disk_full.rs.
//!
//! - Idle and slowloris connections up to and past `smtp.max_connections`: a well-behaved
//!   client is refused quickly with 421 while the slots are taken, served again once they are
//!   released; RSS stays bounded.
//! - 35 MiB messages on several connections at once: accepted whole; peak RSS reported and
//!   bounded (the spool streams to disk).

mod fault_support;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use fault_support::{RelayProc, Smtp, memory_kib, open_fds, relay_toml, report};

const MAX_CONNECTIONS: usize = 32;

#[test]
fn idle_and_slowloris_connections_past_the_limit_leave_service_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool");
    let mut relay = RelayProc::start(dir.path(), "slow", &[], |port| {
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
        let mut s = Smtp::connect(relay.addr()).expect("slowloris connect");
        s.raw(b"MAIL FROM:<a").expect("write");
        slow.push(s);
    }
    // Past the limit: 3x more connection attempts, each refused at once with 421.
    let mut refused = 0;
    let mut slowest = Duration::ZERO;
    for _ in 0..MAX_CONNECTIONS * 3 {
        let started = Instant::now();
        match Smtp::connect(relay.addr()) {
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
    for _ in 0..20 {
        for s in slow.iter_mut() {
            let _ = s.raw(b"x");
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
        if let Ok(mut c) = Smtp::connect(relay.addr()) {
            let ledger = fault_support::Ledger::default();
            break c
                .send_tracked(&ledger, "after-slowloris", 1000)
                .expect("send");
        }
        assert!(Instant::now() < deadline, "slots never freed");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(ack, fault_support::Fate::Acked);
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
    let relay = RelayProc::start(dir.path(), "big", &[], |port| {
        relay_toml(port, &spool, "", "", "[log]\nlevel = \"warn\"\n")
    });
    let pid = relay.pid();
    let addr = relay.addr();
    let threads: Vec<_> = (0..CONNS)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = Smtp::connect(addr).expect("connect");
                assert_eq!(c.cmd("MAIL FROM:<big@app.local>").unwrap().0, 250);
                assert_eq!(c.cmd("RCPT TO:<u@example.org>").unwrap().0, 250);
                assert_eq!(c.cmd("DATA").unwrap().0, 354);
                let line = format!("{t} {}\r\n", "x".repeat(1000));
                let mut lines = SIZE / line.len();
                c.raw(b"Subject: big\r\n\r\n").expect("write");
                let mut sent = 0;
                while lines > 0 {
                    let n = lines.min(1000);
                    let chunk = line.repeat(n);
                    c.raw(chunk.as_bytes()).expect("write");
                    sent += chunk.len();
                    lines -= n;
                }
                c.raw(b".\r\n").unwrap();
                let (code, text) = c.reply().expect("reply");
                assert_eq!(code, 250, "{text}");
                sent
            })
        })
        .collect();
    let mut sent = 0;
    for t in threads {
        sent += t.join().expect("sender");
    }
    let (hwm, rss) = memory_kib(pid).expect("proc status");
    let queued = fault_support::spool_count(&spool, "queue");
    assert_eq!(queued, CONNS);
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
