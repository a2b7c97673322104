//! Clients that do not read, and DATA that trickles (issue 11, item 4). Every write to a client
//! is bounded by `smtp.write_timeout`, and a message transfer must keep up `smtp.min_data_rate`
//! beyond `smtp.data_timeout` of slack (Postfix `smtpd_min_data_rate`).
//!
//! Real loopback TCP with short configured limits. The tests assert outcomes (dropped or not,
//! cut or not, while the client is still sending), never how long anything took; every wait is
//! bounded so that the relay without these limits fails instead of hanging. (tokio's paused
//! clock is no help here: it advances while loopback bytes are still in flight.)

mod common;

use std::time::Duration;

use common::{Client, start_relay};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

/// Open descriptors of this test process (figures for the report).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// A client with small socket buffers, so that not reading fills them quickly.
async fn small_buffer_client(addr: std::net::SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    socket.set_send_buffer_size(4096).expect("sndbuf");
    socket.connect(addr).await.expect("connect")
}

/// Pipelines NOOPs and never reads, until the relay drops the connection (the write fails).
/// Returns the bytes it managed to send.
async fn pipeline_without_reading(mut stream: TcpStream) -> usize {
    let batch = b"NOOP\r\n".repeat(2048);
    let mut sent = 0;
    // Bounded: 4,000 batches are ~48 MiB, far more than any socket buffers hold.
    for _ in 0..4000 {
        match stream.write_all(&batch).await {
            Ok(()) => sent += batch.len(),
            Err(_) => return sent,
        }
    }
    panic!("the relay never dropped a client that does not read ({sent} bytes sent)");
}

#[tokio::test]
async fn clients_that_do_not_read_are_dropped_and_free_their_slots() {
    let relay = start_relay("[smtp]\nmax_connections = 3\nwrite_timeout = \"1s\"\n").await;
    let fds_before = open_fds();
    let mut pipeliners = Vec::new();
    for _ in 0..3 {
        pipeliners.push(small_buffer_client(relay.addr).await);
    }
    // Every slot is taken: a fourth client is refused.
    let mut probe = relay.connect().await;
    probe.expect("421 4.3.2").await;
    assert!(probe.closed().await);
    drop(probe);
    let fds_held = open_fds();

    // Without a write timeout these never finish: the relay waits forever to write replies.
    let sent = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(
            pipeline_without_reading(pipeliners.pop().expect("client")),
            pipeline_without_reading(pipeliners.pop().expect("client")),
            pipeline_without_reading(pipeliners.pop().expect("client")),
        )
    })
    .await
    .expect("clients that do not read are dropped (smtp.write_timeout)");

    // The slots are free again: a new client gets a greeting. (The relay runs on this test's
    // single-threaded runtime, so a session has released its slot by the time its close is
    // seen here.)
    let mut next = relay.connect().await;
    next.expect("220 ").await;
    next.cmd_expect("NOOP", "250 2.0.0").await;
    let fds_after = open_fds();
    println!(
        "slow-clients/non-reading max_connections=3 held=3 (4th refused 421) after_write_timeout=0 \
         (new client greeted 220); bytes pipelined before drop={},{},{}; test-process fds \
         (client+server sides): before={fds_before} held={fds_held} after={fds_after} \
         (the last includes the new client's 2)",
        sent.0, sent.1, sent.2
    );
}

/// A transfer that trickles a byte every 100 ms is cut with 421 while the client is still
/// sending; on the relay without a data rate it goes on for as long as the client likes (each
/// byte comes well within data_timeout).
#[tokio::test]
async fn a_trickling_data_transfer_is_cut_off() {
    // Allowance: data_timeout (1s) plus 1 ms per byte, never more than 1s ahead.
    let relay = start_relay("[smtp]\ndata_timeout = \"1s\"\nmin_data_rate = 1000\n").await;
    let mut c = Client::connect(relay.addr).await;
    c.begin_message("a@legacy.test", &["b@example.org"]).await;
    let stream = c.into_inner();
    let (rd, mut wr) = tokio::io::split(stream);
    // Sends a byte every 100 ms, at most `BYTES` of them; returns how many it sent.
    const BYTES: usize = 300;
    let trickle = tokio::spawn(async move {
        for i in 0..BYTES {
            if wr.write_all(b"x").await.is_err() {
                return i;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        BYTES
    });
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    rd.read_line(&mut line).await.expect("read");
    assert!(
        !trickle.is_finished(),
        "the relay waited until the client stopped sending: {line:?}"
    );
    assert!(
        line.starts_with("421 4.4.2") && line.contains("too slowly"),
        "{line:?}"
    );
    let mut rest = String::new();
    assert_eq!(rd.read_line(&mut rest).await.expect("read"), 0, "closed");
    let sent = trickle.await.expect("trickle task");
    assert!(sent < BYTES);
    assert!(relay.spool.list().expect("list").is_empty());
    println!(
        "slow-clients/trickle data_timeout=1s min_data_rate=1000 cut after {sent} of {BYTES} \
         bytes at 10 bytes/s"
    );
}

/// A client above the minimum rate is not cut, even when the whole transfer takes longer than
/// data_timeout.
#[tokio::test]
async fn data_above_the_minimum_rate_goes_through() {
    let relay = start_relay("[smtp]\ndata_timeout = \"5s\"\nmin_data_rate = 1000\n").await;
    let mut c = Client::connect(relay.addr).await;
    c.begin_message("a@legacy.test", &["b@example.org"]).await;
    c.send(b"Subject: slow but steady\r\n\r\n").await;
    // 500 bytes every 100 ms (5 times the minimum) for 6 s: longer than data_timeout in all.
    let line = [b'y'; 498];
    for _ in 0..60 {
        c.send(&line).await;
        c.send(b"\r\n").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.send(b".\r\n").await;
    c.expect("250 2.0.0 queued as").await;
}

/// Both limits must stay limits: a zero would switch the protection off.
#[test]
fn the_limits_are_validated() {
    let err = smtp_oauth_relay::config::Config::from_toml_str(
        "[smtp]\nwrite_timeout = \"0s\"\nmin_data_rate = 0\n",
    )
    .expect_err("refused");
    let mut keys: Vec<String> = err.issues().iter().map(|i| i.key.clone()).collect();
    keys.sort();
    assert_eq!(keys, vec!["smtp.min_data_rate", "smtp.write_timeout"]);
}

/// A client that says STARTTLS and then sends no handshake is dropped after command_timeout
/// instead of holding its slot (the handshake is reads and writes too).
#[tokio::test]
async fn a_client_that_never_starts_the_tls_handshake_is_dropped() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
    let relay = start_relay(&format!(
        "[smtp]\ncommand_timeout = \"1s\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        cert_path.display(),
        key_path.display()
    ))
    .await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("EHLO c", "250").await;
    c.cmd_expect("STARTTLS", "220 2.0.0").await;
    // No ClientHello follows. The relay closes (EOF); without a bound it would wait forever.
    assert!(c.closed().await, "connection closed after command_timeout");
}
