//! Scenario 4 of the fault campaign: hostile input. cargo-fuzz needs nightly, which this machine
//! cannot fetch, so these are bounded, fixed-seed random loops on stable Rust over the same three
//! surfaces a fuzzer would cover, seeded from the committed corpora in `tests/corpus/`:
//!
//! - the SMTP session (`inbound::Session::drive` over an in-memory stream, with the real spool):
//!   no panic, no hang, every output line a well-formed reply, one `250 queued as` per committed
//!   message, nothing left in `tmp/`;
//! - the spool header decoder (`spool::format::decode`) on mutated valid headers: no panic;
//! - the config loader (`Config::from_toml_str`) on mutated TOML: no panic, and an error never
//!   quotes the client secret.
//!
//! Plus handwritten vectors with exact expected replies, and the smuggling vectors delivered end
//! to end through the simulator (one message arrives, the smuggled command stays in its body).
//!
//! `FUZZ_ITERS=<n>` scales the loops (default keeps the file well under 30 s);
//! `FUZZ_SEED=<n>` changes the seed.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use smtp_oauth_relay::config::Config;
use smtp_oauth_relay::inbound::Session;
use smtp_oauth_relay::spool::Spool;
use smtp_oauth_relay::spool::format;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use common::fixtures::{Rng, report};
use common::session::SessionRig;

fn iters(default: usize) -> usize {
    std::env::var("FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_F022)
}

fn corpus(kind: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    let out: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(!out.is_empty(), "empty corpus {kind}");
    out
}

/// Generic byte mutations (as a fuzzer's havoc stage).
fn mutate(rng: &mut Rng, input: &[u8], extras: &[&[u8]]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(6) {
        let at = if v.is_empty() {
            0
        } else {
            rng.below(v.len() + 1)
        };
        match rng.below(8) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next_u64() as u8;
            }
            2 => {
                let extra: &[u8] = extras[rng.below(extras.len())];
                v.splice(at..at, extra.iter().copied());
            }
            3 if !v.is_empty() => {
                let end = (at + rng.below(64)).min(v.len());
                v.drain(at.min(end)..end);
            }
            4 => v.truncate(at),
            5 if !v.is_empty() => {
                // Duplicate a slice.
                let start = rng.below(v.len());
                let end = (start + rng.below(128)).min(v.len());
                let piece: Vec<u8> = v[start..end].to_vec();
                v.splice(at..at, piece);
            }
            6 => {
                let b = *rng.pick(&[0u8, b'\r', b'\n', b'.', 0xff, 0xc3, b'<', b'>', b' ', b'=']);
                v.insert(at, b);
            }
            _ => {
                let n = rng.below(2000);
                let b = *rng.pick(&[b'a', b'.', b'\n', b'\r', 0]);
                v.splice(at..at, std::iter::repeat_n(b, n));
            }
        }
    }
    v
}

// ---------------------------------------------------------------------------------------------
// The session

const SESSION_EXTRAS: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b"\n.\n",
    b"\r.\r",
    b".\n",
    b"\r\n.\r\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\0",
    b"\xff\xfe\xc3\x28",
    b"EHLO x\r\n",
    b"HELO x\r\n",
    b"MAIL FROM:<a@b.c>\r\n",
    b"MAIL FROM:<> BODY=8BITMIME SMTPUTF8\r\n",
    b"RCPT TO:<u@example.org>\r\n",
    b"RCPT TO:<u@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u@example.org\r\n",
    b"DATA\r\n",
    b"BDAT 10\r\n",
    b"BDAT 0 LAST\r\n",
    b"BDAT 5 LAST\r\nhello",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
    b"STARTTLS\r\n",
    b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n",
    b"AUTH LOGIN\r\n",
    b"*\r\n",
    b"VRFY root\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /x HTTP/1.0\r\n",
];

/// The session environment of these campaigns: small limits so that the limits are reached.
fn session_rig(extra_toml: &str) -> SessionRig {
    common::session::session_rig(&format!(
        "[smtp]\nhostname = \"relay.test\"\nmax_message_size = \"64KiB\"\nmax_recipients = 100\n\
         command_timeout = \"2s\"\ndata_timeout = \"2s\"\n{extra_toml}"
    ))
}

/// Runs one session over an in-memory stream: `input` is written in `chunks`, then the client
/// half-closes and reads everything until the server closes. Panics on a hang (10 s).
async fn run_session(rig: &SessionRig, input: &[u8], chunks: &[usize]) -> Vec<u8> {
    let (mut client, mut server) = tokio::io::duplex(64 * 1024);
    let shared = rig.shared.clone();
    let server_task = tokio::spawn(async move {
        let mut session = Session::new(shared, "127.0.0.1:40000".parse::<SocketAddr>().unwrap());
        session.greeting();
        let shutdown = CancellationToken::new();
        let _ = session.drive(&mut server, &shutdown).await;
        let _ = server.shutdown().await;
    });
    let input = input.to_vec();
    let chunks = chunks.to_vec();
    let (mut rd, mut wr) = tokio::io::split(&mut client);
    let write = async move {
        let mut rest: &[u8] = &input;
        let mut i = 0;
        while !rest.is_empty() {
            let n = chunks
                .get(i)
                .copied()
                .unwrap_or(rest.len())
                .clamp(1, rest.len());
            if wr.write_all(&rest[..n]).await.is_err() {
                break;
            }
            rest = &rest[n..];
            i += 1;
        }
        let _ = wr.shutdown().await;
    };
    let read = async move {
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        out
    };
    let (_, out) =
        tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(write, read) })
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "session hung on input {:?}",
                    String::from_utf8_lossy(&input_preview(&[]))
                )
            });
    tokio::time::timeout(Duration::from_secs(10), server_task)
        .await
        .expect("session task ended")
        .expect("session task did not panic");
    out
}

fn input_preview(b: &[u8]) -> Vec<u8> {
    b.iter().take(300).copied().collect()
}

/// Every line is `DDD SP text CRLF` or `DDD - text CRLF`, under 512 octets; returns the codes.
fn reply_codes(out: &[u8], input: &[u8]) -> Vec<(u16, String)> {
    let mut codes = Vec::new();
    assert!(
        out.is_empty() || out.ends_with(b"\r\n"),
        "output does not end with CRLF for input {:?}: {:?}",
        String::from_utf8_lossy(&input_preview(input)),
        String::from_utf8_lossy(out)
    );
    for line in out.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let ok = line.len() >= 5
            && line.len() <= 512
            && line.ends_with(b"\r")
            && line[..3].iter().all(u8::is_ascii_digit)
            && (line[3] == b' ' || line[3] == b'-')
            && line[..line.len() - 1]
                .iter()
                .all(|b| (0x20..0x7f).contains(b));
        assert!(
            ok,
            "malformed reply line {:?} for input {:?}",
            String::from_utf8_lossy(line),
            String::from_utf8_lossy(&input_preview(input))
        );
        if line[3] == b' ' {
            let code: u16 = std::str::from_utf8(&line[..3]).unwrap().parse().unwrap();
            codes.push((code, String::from_utf8_lossy(line).trim_end().to_string()));
        }
    }
    codes
}

fn queued_files(spool: &Spool) -> usize {
    spool.list().expect("list").len()
}

fn tmp_files(spool: &Spool) -> Vec<String> {
    std::fs::read_dir(spool.dir().join("tmp"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".msg"))
                .collect()
        })
        .unwrap_or_default()
}

/// A plausible session: commands and data pieces, mostly well-formed, then mutated.
fn generate_session(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let base: Vec<u8> = if rng.below(3) == 0 {
        let mut v = Vec::new();
        for _ in 0..1 + rng.below(12) {
            let piece: &[u8] = SESSION_EXTRAS[rng.below(SESSION_EXTRAS.len())];
            v.extend_from_slice(piece);
            if rng.below(4) == 0 {
                for _ in 0..rng.below(300) {
                    v.push(rng.next_u64() as u8);
                }
            }
        }
        v
    } else {
        rng.pick(seeds).clone()
    };
    mutate(rng, &base, SESSION_EXTRAS)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_survives_random_and_mutated_input() {
    let rig = session_rig("max_errors = 1000");
    let seeds = corpus("session");
    let mut rng = Rng::new(seed());
    let n = iters(800);
    let mut stats = (0usize, 0usize, 0usize); // (sessions, replies, messages committed)
    let mut refused = 0usize;
    for i in 0..n {
        let input = if i < seeds.len() {
            seeds[i].clone()
        } else {
            generate_session(&mut rng, &seeds)
        };
        let chunks: Vec<usize> = (0..rng.below(8)).map(|_| 1 + rng.below(700)).collect();
        let before = queued_files(&rig.spool);
        let out = run_session(&rig, &input, &chunks).await;
        let codes = reply_codes(&out, &input);
        assert!(
            codes.first().is_some_and(|(c, _)| *c == 220),
            "no greeting: {codes:?}"
        );
        let acked = codes
            .iter()
            .filter(|(c, t)| *c == 250 && t.contains("queued as"))
            .count();
        let after = queued_files(&rig.spool);
        assert_eq!(
            after - before,
            acked,
            "committed messages vs 250 replies for input {:?}",
            String::from_utf8_lossy(&input_preview(&input))
        );
        stats.0 += 1;
        stats.1 += codes.len();
        stats.2 += acked;
        refused += codes.iter().filter(|(c, _)| *c >= 500).count();
    }
    // The input was hostile and not only noise: some sessions committed mail, some commands
    // were refused (the corpus alone does both).
    if n >= seeds.len() {
        assert!(stats.2 > 0, "no session committed a message");
        assert!(refused > 0, "no command was refused");
    }
    // Temporary files of aborted transfers are removed (Drop removes them on the blocking pool).
    for _ in 0..100 {
        if tmp_files(&rig.spool).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        tmp_files(&rig.spool),
        Vec::<String>::new(),
        "leftovers in tmp/"
    );
    // Everything committed decodes and matches its declared length.
    for e in rig.spool.list().expect("list") {
        rig.spool.load(&e.id).expect("committed message loads");
    }
    report(&format!(
        "hostile/session-fuzz sessions={} replies={} committed={} refused={refused} panics=0 hangs=0",
        stats.0, stats.1, stats.2
    ));
}

/// Sends `input` in one piece and returns the final-reply lines (code + text).
async fn dialog(rig: &SessionRig, input: &[u8]) -> Vec<(u16, String)> {
    let out = run_session(rig, input, &[]).await;
    reply_codes(&out, input)
}

fn codes(r: &[(u16, String)]) -> Vec<u16> {
    r.iter().map(|(c, _)| *c).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handwritten_hostile_vectors_get_the_right_replies() {
    let rig = session_rig("max_errors = 1000");
    // Commands out of order before EHLO (MAIL without HELO is accepted, as Postfix does by
    // default; RCPT and DATA without MAIL are not).
    let r = dialog(&rig, b"RCPT TO:<u@x.y>\r\nDATA\r\nBDAT 0 LAST\r\nQUIT\r\n").await;
    assert_eq!(codes(&r), vec![220, 503, 503, 503, 221], "{r:?}");
    // HTTP on the SMTP port: one reply, then closed.
    let r = dialog(&rig, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.len(), 2, "{r:?}");
    assert!(r[1].0 >= 500, "{r:?}");
    // NUL bytes and invalid UTF-8 in commands and addresses.
    let r = dialog(
        &rig,
        b"EHLO x\r\nNO\0OP\r\nMAIL FROM:<a\xff\xfe@b.c>\r\nMAIL FROM:<a\0@b.c>\r\nQUIT\r\n",
    )
    .await;
    assert_eq!(r.first().map(|x| x.0), Some(220));
    assert_eq!(r.last().map(|x| x.0), Some(221), "{r:?}");
    assert!(r[2..r.len() - 1].iter().all(|(c, _)| *c >= 500), "{r:?}");
    // Overlong command line and address.
    let long_line = format!("EHLO x\r\nNOOP {}\r\nNOOP\r\nQUIT\r\n", "a".repeat(10_000));
    let r = dialog(&rig, long_line.as_bytes()).await;
    assert_eq!(codes(&r), vec![220, 250, 500, 250, 221], "{r:?}");
    let long_addr = format!(
        "EHLO x\r\nMAIL FROM:<{}@example.org>\r\nMAIL FROM:<a@{}.org>\r\nQUIT\r\n",
        "l".repeat(300),
        "d".repeat(300)
    );
    let r = dialog(&rig, long_addr.as_bytes()).await;
    assert!(
        r[2].0 >= 500 && r[3].0 >= 500,
        "overlong addresses refused: {r:?}"
    );
    // Pipelining flood: every command answered, in order.
    let mut flood = b"EHLO x\r\n".to_vec();
    for _ in 0..5000 {
        flood.extend_from_slice(b"NOOP\r\n");
    }
    flood.extend_from_slice(b"QUIT\r\n");
    let r = dialog(&rig, &flood).await;
    assert_eq!(r.len(), 5003, "every pipelined command answered");
    assert!(r[2..5002].iter().all(|(c, _)| *c == 250));
    // Error flood with the default error budget: 421 and close.
    let strict = session_rig("");
    let mut junk = b"EHLO x\r\n".to_vec();
    for _ in 0..1000 {
        junk.extend_from_slice(b"XYZZY\r\n");
    }
    let r = dialog(&strict, &junk).await;
    assert_eq!(r.last().map(|x| x.0), Some(421), "error budget: {r:?}");
    assert!(r.len() < 50, "closed early: {} replies", r.len());

    // Smuggling vectors inside DATA: none ends the message; one 250 per real end.
    for (name, vector) in [
        ("bare LF", &b"\n.\n"[..]),
        ("bare CR", b"\r.\r"),
        ("LF dot CRLF", b"\n.\r\n"),
        ("CRLF dot LF", b"\r\n.\n"),
        ("dot LF", b".\n"),
    ] {
        let mut s = b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<u@example.org>\r\nDATA\r\nSubject: s\r\n\r\nbefore"
            .to_vec();
        s.extend_from_slice(vector);
        s.extend_from_slice(
            b"MAIL FROM:<evil@x.y>\r\nRCPT TO:<victim@x.y>\r\nDATA\r\nsmuggled\r\n.\r\nQUIT\r\n",
        );
        let before = queued_files(&rig.spool);
        let r = dialog(&rig, &s).await;
        let acks = r.iter().filter(|(_, t)| t.contains("queued as")).count();
        assert_eq!(acks, 1, "{name}: {r:?}");
        assert_eq!(
            codes(&r),
            vec![220, 250, 250, 250, 354, 250, 221],
            "{name}: the smuggled commands are message text: {r:?}"
        );
        assert_eq!(queued_files(&rig.spool), before + 1);
    }
}

/// The smuggling vectors end to end: the simulator receives exactly one message per vector, with
/// the would-be smuggled commands inside its body and no bare CR/LF left that a later hop could
/// read as an end of data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_vectors_are_delivered_as_one_message() {
    use common::delivery::start_delivering;
    let r = start_delivering(
        "[queue]\nretry_min = \"200ms\"\nretry_max = \"1s\"\n[upstream]\nrate = \"1000/s\"\n",
        smtp_oauth_relay::sim::SimConfig::default(),
    )
    .await;
    let vectors: [&[u8]; 5] = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b".\n"];
    let mut c = r.relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("EHLO x", "250").await;
    for (i, v) in vectors.iter().enumerate() {
        c.cmd_expect("MAIL FROM:<app@legacy.test>", "250").await;
        c.cmd_expect("RCPT TO:<u@example.org>", "250").await;
        c.cmd_expect("DATA", "354").await;
        let mut m = format!("Subject: smuggle-{i}\r\n\r\nbefore").into_bytes();
        m.extend_from_slice(v);
        m.extend_from_slice(
            b"MAIL FROM:<evil@x.y>\r\nRCPT TO:<victim@x.y>\r\nDATA\r\nsmuggled\r\n.\r\n",
        );
        c.send(&m).await;
        c.expect("250 2.0.0 queued as").await;
    }
    let got = r.wait_delivered(vectors.len()).await;
    // The relay accepted exactly one message per vector, and with its spool empty nothing more
    // is on its way to the simulator.
    assert_eq!(
        r.metrics.accepted.load(std::sync::atomic::Ordering::SeqCst),
        vectors.len() as u64,
        "the smuggled commands made no message of their own"
    );
    r.wait_for("an empty spool", |relay| {
        relay.spool.list().expect("list").is_empty()
    })
    .await;
    let got_again = r.sim.messages().expect("mailbox");
    assert_eq!(got.len(), got_again.len(), "no extra message appeared");
    assert_eq!(got.len(), vectors.len());
    for m in &got {
        assert!(
            m.envelope.rcpt_to == vec!["u@example.org".to_string()],
            "smuggled envelope reached the upstream: {:?}",
            m.envelope
        );
        let text = m.text();
        assert!(text.contains("MAIL FROM:<evil@x.y>"), "{text:?}");
        assert!(text.contains("smuggled"), "{text:?}");
        for (i, b) in m.data.iter().enumerate() {
            if *b == b'\n' {
                assert!(
                    i > 0 && m.data[i - 1] == b'\r',
                    "bare LF delivered: {text:?}"
                );
            }
            if *b == b'\r' {
                assert_eq!(
                    m.data.get(i + 1),
                    Some(&b'\n'),
                    "bare CR delivered: {text:?}"
                );
            }
        }
    }
    report(&format!(
        "hostile/smuggling-e2e vectors={} delivered={} extra_messages=0",
        vectors.len(),
        got.len()
    ));
}

// ---------------------------------------------------------------------------------------------
// The spool decoder

const SPOOL_EXTRAS: &[&[u8]] = &[
    b"\n",
    b"\n\n",
    b"Rcpt-To: <x@y.z>\n",
    b"Rcpt-Notify: NEVER\n",
    b"Rcpt-Orcpt: rfc822;x@y.z\n",
    b"Body-Length: 99999999999999999999\n",
    b"Body-Length: 00000000000000000000\n",
    b"Body-Length: -0000000000000000001\n",
    b"Spool-Format: 2\n",
    b"Spool-Format: 1\n",
    b"Id: ../../etc/passwd\n",
    b"Received-At: 9999-12-31T23:59:59.999999999Z\n",
    b"Received-At: 0000-00-00T00:00:00Z\n",
    b"Mail-From: <>\n",
    b"Mail-From: <a\r@b>\n",
    b"Body: BINARYMIME\n",
    b"Smtputf8: maybe\n",
    b"\xff\xfe",
    b"\0",
    b": \n",
    b"<",
];

#[test]
fn spool_decoder_survives_mutated_headers() {
    let seeds = corpus("spool");
    let mut rng = Rng::new(seed() ^ 0x5B001);
    let n = iters(1500) * 20;
    let (mut ok, mut err) = (0usize, 0usize);
    for i in 0..n {
        let input = if i < seeds.len() {
            seeds[i].clone()
        } else {
            let base = seeds[rng.below(seeds.len())].clone();
            mutate(&mut rng, &base, SPOOL_EXTRAS)
        };
        match format::decode(&input) {
            Ok(h) => {
                ok += 1;
                // What decodes is self-consistent: the body starts inside or right after it.
                assert!(
                    h.header_len as usize <= input.len(),
                    "header_len past the input"
                );
                assert!(
                    smtp_oauth_relay::spool::is_valid_id(&h.id),
                    "decoded an invalid id {:?}",
                    h.id
                );
            }
            Err(_) => err += 1,
        }
    }
    assert!(ok >= seeds.len(), "the valid seeds decode");
    report(&format!(
        "hostile/spool-decoder inputs={n} decoded={ok} refused={err} panics=0"
    ));
}

// ---------------------------------------------------------------------------------------------
// The config loader

const SECRET: &str = "fuzz~secret~value~Xy9";

const CONFIG_EXTRAS: &[&[u8]] = &[
    b"\n",
    b"\"",
    b"'",
    b"[",
    b"]",
    b"=",
    b"[[smtp]]\n",
    b"[smtp]\n",
    b"max_message_size = \"99999999999TiB\"\n",
    b"max_message_size = -1\n",
    b"rate = \"0/min\"\n",
    b"rate = \"1/0s\"\n",
    b"retry_min = \"0s\"\n",
    b"listen = [\"0.0.0.0:25\"]\n",
    b"allow_networks = [\"::/0\"]\n",
    b"level = \"trace,[\"\n",
    b"client_secret = 12345\n",
    b"client_secret = \"fuzz~secret~value~Xy9\" x\n",
    b"\xff",
    b"\0",
    b"inf",
    b"nan",
    b"1e309",
    b"{ a = 1 }",
];

#[test]
fn config_loader_survives_mutated_toml_and_never_quotes_the_secret() {
    let seeds = corpus("config");
    let mut rng = Rng::new(seed() ^ 0xC0F16);
    let n = iters(1500);
    let (mut ok, mut err) = (0usize, 0usize);
    for i in 0..n {
        let input = if i < seeds.len() {
            seeds[i].clone()
        } else {
            let base = seeds[rng.below(seeds.len())].clone();
            mutate(&mut rng, &base, CONFIG_EXTRAS)
        };
        let text = String::from_utf8_lossy(&input);
        match Config::from_toml_str(&text) {
            Ok(c) => {
                ok += 1;
                let shown = c.to_redacted_toml();
                assert!(!shown.contains(SECRET), "redacted config shows the secret");
            }
            Err(e) => {
                err += 1;
                let msg = e.to_string();
                assert!(
                    !msg.contains(SECRET) && !msg.contains("fuzz~secret"),
                    "config error quotes the secret:\n{msg}\ninput:\n{text}"
                );
            }
        }
    }
    assert!(ok >= 1 && err >= 1, "ok={ok} err={err}");
    report(&format!(
        "hostile/config-loader inputs={n} valid={ok} refused={err} panics=0 secret_in_errors=0"
    ));
}
