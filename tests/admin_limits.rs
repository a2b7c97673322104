//! The admin endpoint can never stop SMTP: thousands of idle admin connections against the real
//! binary under a low `RLIMIT_NOFILE` (systemd's `LimitNOFILE=`) leave SMTP greeting and taking
//! mail; the excess is closed at once (connection cap, descriptor reserve); idle and slow
//! connections are closed by the header timeout.
//!
//! The figures (admin connections attempted, accepted, descriptors at peak, SMTP result) are
//! printed with `FDS:` for the closing note.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Client;
use common::limited::Binary;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Hang guard for one read; nothing here asserts on how long anything takes.
const GUARD: Duration = Duration::from_secs(30);

/// Opens `n` admin connections that send nothing.
async fn idle_connections(admin: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let c = tokio::time::timeout(GUARD, TcpStream::connect(admin))
            .await
            .unwrap_or_else(|_| panic!("connect {i} hung"))
            .unwrap_or_else(|e| panic!("connect {i}: {e}"));
        conns.push(c);
    }
    conns
}

/// Everything the server sends until it closes (EOF or reset).
async fn until_closed(c: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(GUARD, c.read(&mut buf)).await {
            Err(_) => panic!(
                "connection not closed; got {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return String::from_utf8_lossy(&got).into_owned(),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Half-closes every connection and sorts them by what the relay did: closed at once with a
/// 503 (refused), or held until now (accepted).
async fn classify(conns: Vec<TcpStream>) -> (usize, usize) {
    let (mut accepted, mut refused) = (0, 0);
    for mut c in conns {
        let _ = c.shutdown().await;
        let got = until_closed(&mut c).await;
        if got.starts_with("HTTP/1.1 503") {
            assert!(got.contains("too many admin connections"), "{got:?}");
            refused += 1;
        } else {
            assert!(got.is_empty(), "an idle connection got {got:?}");
            accepted += 1;
        }
    }
    (accepted, refused)
}

/// Greeting, EHLO and one message through the relay's SMTP port.
async fn smtp_sends_one(addr: std::net::SocketAddr) -> String {
    let mut c = Client::connect(addr).await;
    c.begin_message("app@legacy.test", &["someone@example.org"])
        .await;
    c.send(b"Subject: while the admin port is flooded\r\n\r\nhello\r\n.\r\n")
        .await;
    let reply = c.expect("250 2.0.0 queued as").await;
    c.cmd_expect("QUIT", "221").await;
    reply.raw
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let text = until_closed(&mut c).await;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

fn counter(metrics: &str, line_start: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in\n{metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_admin_connections_leave_smtp_working_under_256_descriptors() {
    const ATTEMPTS: usize = 1000;
    const NOFILE: u64 = 256;
    // The header timeout is long so that no idle connection is let go while the test runs:
    // what frees the descriptors has to be the cap.
    let relay = Binary::start(
        "max_connections = 20",
        "header_timeout = \"5m\"",
        "",
        Some(NOFILE),
    );
    let base_fds = relay.open_fds();
    let mut conns = idle_connections(relay.admin, ATTEMPTS).await;
    // Accepts are handled in order: once the last one is answered, every earlier one was
    // accepted or refused. With 64 held, the last is refused.
    let mut last = conns.pop().expect("connections");
    let answer = until_closed(&mut last).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    let peak_fds = relay.open_fds();
    assert!(
        peak_fds < NOFILE as usize,
        "{peak_fds} descriptors open under a limit of {NOFILE}"
    );

    let smtp = smtp_sends_one(relay.smtp).await;

    let (accepted, refused) = classify(conns).await;
    let refused = refused + 1;
    assert_eq!(accepted + refused, ATTEMPTS);
    assert!(
        accepted <= 64,
        "admin.max_connections is 64: {accepted} accepted"
    );
    assert!(accepted >= 1, "nothing was accepted");

    // The endpoint serves again once the idle connections are gone, and counted all of it.
    let mut metrics = None;
    for _ in 0..200 {
        let (code, text) = get(relay.admin, "/metrics").await;
        if code == 200 {
            metrics = Some(text);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let metrics = metrics.unwrap_or_else(|| panic!("/metrics never answered\n{}", relay.log()));
    let refused_counted = counter(
        &metrics,
        "relay_admin_connections_total{result=\"refused_limit\"}",
    ) + counter(
        &metrics,
        "relay_admin_connections_total{result=\"refused_descriptors\"}",
    );
    assert!(refused_counted >= refused as u64, "{metrics}");
    assert!(
        counter(
            &metrics,
            "relay_admin_connections_total{result=\"accepted\"}"
        ) > accepted as u64,
        "{metrics}"
    );
    assert_eq!(counter(&metrics, "process_max_fds"), NOFILE, "{metrics}");
    assert!(
        relay.log().contains("admin connections closed at once"),
        "{}",
        relay.log()
    );
    eprintln!(
        "FDS: LimitNOFILE={NOFILE} smtp.max_connections=20 admin.max_connections=64: \
         {ATTEMPTS} idle admin connections attempted, {accepted} accepted, {refused} closed at \
         once; descriptors {base_fds} at start, {peak_fds} at peak; SMTP: {}",
        smtp.trim_end()
    );
}

/// Here the limit, not the cap, is what binds: 40 SMTP sessions (all of smtp.max_connections)
/// are open while 500 admin connections arrive, and every session can still store a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_descriptor_reserve_keeps_every_smtp_session_whole() {
    const SESSIONS: usize = 40;
    const ATTEMPTS: usize = 500;
    const NOFILE: u64 = 128;
    let relay = Binary::start(
        &format!("max_connections = {SESSIONS}"),
        "header_timeout = \"5m\"",
        "",
        Some(NOFILE),
    );
    let base_fds = relay.open_fds();
    let mut sessions = Vec::new();
    for _ in 0..SESSIONS {
        let mut c = Client::connect(relay.smtp).await;
        c.expect("220 ").await;
        c.cmd_expect("EHLO client.test", "250").await;
        sessions.push(c);
    }
    let mut conns = idle_connections(relay.admin, ATTEMPTS).await;
    let mut last = conns.pop().expect("connections");
    let answer = until_closed(&mut last).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    let peak_fds = relay.open_fds();

    // Every session stores a message: each needs a spool file besides its socket.
    let mut stored = 0;
    for c in &mut sessions {
        c.cmd_expect("MAIL FROM:<app@legacy.test>", "250").await;
        c.cmd_expect("RCPT TO:<someone@example.org>", "250").await;
        c.cmd_expect("DATA", "354").await;
        c.send(b"Subject: reserve\r\n\r\nx\r\n.\r\n").await;
        c.expect("250 2.0.0 queued as").await;
        stored += 1;
    }
    let (accepted, refused) = classify(conns).await;
    let refused = refused + 1;
    assert_eq!(accepted + refused, ATTEMPTS);
    // 40 sessions x 2 + 3 upstream x 2 + 16 shared = 102 of 128 are SMTP's.
    assert!(
        accepted < 64,
        "the descriptor reserve, not the cap, should bind: {accepted} accepted"
    );
    let files = std::fs::read_dir(relay.spool().join("queue"))
        .expect("queue/")
        .count();
    assert_eq!(files, SESSIONS);
    eprintln!(
        "FDS: LimitNOFILE={NOFILE} smtp.max_connections={SESSIONS} (all open): {ATTEMPTS} \
         idle admin connections attempted, {accepted} accepted, {refused} closed at once; \
         descriptors {base_fds} at start, {peak_fds} at peak; SMTP: {stored}/{SESSIONS} \
         sessions stored a message"
    );
}

/// An idle connection, and one that trickles its request head, are closed by
/// `admin.header_timeout`; meanwhile the endpoint still answers.
#[tokio::test]
async fn idle_and_slow_admin_connections_are_closed_by_the_header_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) =
        smtp_oauth_relay::spool::Spool::open(&dir.path().join("spool")).expect("spool");
    let config = smtp_oauth_relay::config::Config::from_toml_str("").expect("config");
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(config));
    let state = smtp_oauth_relay::admin::AdminState::new(std::sync::Arc::new(spool), rx);
    let listener = smtp_oauth_relay::admin::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let limits = smtp_oauth_relay::admin::AdminLimits {
        header_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    tokio::spawn(smtp_oauth_relay::admin::serve_with(
        listener,
        smtp_oauth_relay::admin::router(state),
        limits,
        Arc::default(),
        tokio_util::sync::CancellationToken::new(),
    ));

    let mut idle = TcpStream::connect(addr).await.expect("connect");
    let got = until_closed(&mut idle).await;
    assert!(!got.starts_with("HTTP/1.1 2"), "{got:?}");

    // One header line every 50 ms never completes the head: the connection must end while
    // the client is still writing (the bound only keeps a broken build from hanging).
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"GET /metrics HTTP/1.1\r\n")
        .await
        .expect("write");
    let mut closed = false;
    for i in 0..600 {
        if slow
            .write_all(format!("X-{i}: y\r\n").as_bytes())
            .await
            .is_err()
        {
            closed = true;
            break;
        }
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(50), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    assert!(closed, "a trickled request head kept its connection");

    let (code, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200, "{body}");
}

/// The admin limits have bounds: none can be switched off.
#[test]
fn admin_limits_out_of_bounds_are_configuration_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("relay.toml");
    std::fs::write(
        &path,
        "[admin]\nlisten = \"127.0.0.1:9925\"\nmax_connections = 0\nheader_timeout = \"1h\"\n",
    )
    .expect("write");
    let out = std::process::Command::new(common::process::bin())
        .arg("config")
        .arg("--config")
        .arg(&path)
        .env_remove("RELAY_CONFIG")
        .output()
        .expect("run config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("admin.max_connections"), "{stderr}");
    assert!(stderr.contains("admin.header_timeout"), "{stderr}");
}
