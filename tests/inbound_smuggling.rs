//! SMTP smuggling (issue 11, item 1): only CRLF "." CRLF ends DATA. Every published vector
//! (SEC Consult 2023 and the CR runs smtp-proto 0.2.5 took for an end), inside DATA, inside a
//! refused DATA, and inside BDAT, with the smuggled transaction and more commands pipelined
//! after it in the same transmission: one transmission is one message, and the smuggled
//! recipient never reaches the spool. Over TCP, and over an in-memory stream read one byte
//! (and three bytes) at a time so that every vector is also split across reads.

mod common;

use common::session::{final_replies, reply_codes, run_session, session_rig};
use common::start_relay;

/// (name, bytes between "before" and the smuggled commands). None of them is CRLF.CRLF.
const VECTORS: &[(&str, &[u8])] = &[
    ("LF.LF", b"\n.\n"),
    ("LF.CRLF", b"\n.\r\n"),
    ("LF.CR", b"\n.\r"),
    ("CR.LF", b"\r.\n"),
    ("CR.CR", b"\r.\r"),
    ("CR.CRLF", b"\r.\r\n"),
    ("CRLF.LF", b"\r\n.\n"),
    ("CRLF.CR", b"\r\n.\r"),
    ("CRLF.CRCRLF", b"\r\n.\r\r\n"),
    ("CRLF.CRCRCRLF", b"\r\n.\r\r\r\n"),
    ("CRLF.CR run", b"\r\n.\r\r\r\r\r\r\r\r\r\r\r\r\n"),
    ("LFCR.CRLF", b"\n\r.\r\n"),
    ("CRLF NUL.CRLF", b"\r\n\x00.\r\n"),
    ("CRLF.NUL CRLF", b"\r\n.\x00\r\n"),
    ("CRLF SP.CRLF", b"\r\n .\r\n"),
    ("CRLF.SP CRLF", b"\r\n. \r\n"),
    ("CRLF..CRLF", b"\r\n..\r\n"),
    ("CRLF.CR.CRLF", b"\r\n.\r.\r\n"),
];

const SMUGGLED: &[u8] = b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\n\
Subject: smuggled\r\n\r\nsmuggled\r\n";

/// DATA content for one vector; the client ends it with the real CRLF.CRLF.
fn content(vector: &[u8]) -> Vec<u8> {
    let mut m = b"Subject: s\r\n\r\nbefore".to_vec();
    m.extend_from_slice(vector);
    m.extend_from_slice(SMUGGLED);
    m
}

fn assert_only_crlf(name: &str, stored: &[u8]) {
    for (i, b) in stored.iter().enumerate() {
        if *b == b'\n' {
            assert!(i > 0 && stored[i - 1] == b'\r', "{name}: bare LF stored");
        }
        if *b == b'\r' {
            assert_eq!(stored.get(i + 1), Some(&b'\n'), "{name}: bare CR stored");
        }
    }
}

#[tokio::test]
async fn no_vector_ends_data_over_tcp() {
    for (name, vector) in VECTORS {
        let relay = start_relay("").await;
        let mut c = relay.connect().await;
        c.begin_message("a@legacy.test", &["b@example.org"]).await;
        // One transmission: content, the real end, and a pipelined QUIT.
        let mut wire = content(vector);
        wire.extend_from_slice(b".\r\nQUIT\r\n");
        c.send(&wire).await;
        let ack = c.reply().await;
        assert!(ack.starts_with("250 2.0.0 queued as"), "{name}: {ack:?}");
        // A smuggled transaction would answer 250/250/354/250 here instead.
        let bye = c.reply().await;
        assert!(bye.starts_with("221"), "{name}: smuggled replies: {bye:?}");
        assert!(c.closed().await, "{name}");
        let entries = relay.spool.list().expect("list");
        assert_eq!(entries.len(), 1, "{name}: one transmission, one message");
        assert_eq!(entries[0].recipients, vec!["b@example.org".to_string()]);
        assert_eq!(entries[0].mail_from, "a@legacy.test");
        let stored = relay.stored_message(&entries[0].id);
        let text = String::from_utf8_lossy(&stored).to_string();
        assert!(
            text.contains("MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\n"),
            "{name}: the smuggled commands are message text: {text:?}"
        );
        assert_only_crlf(name, &stored);
    }
}

/// The same vectors split at every byte: one session per vector and read size, all in one
/// spool; exactly one 250 per session and no smuggled recipient anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_vector_ends_data_when_split_across_reads() {
    let rig = session_rig("[smtp]\nhostname = \"relay.test\"\n");
    let mut sessions = 0;
    for read_size in [1, 3] {
        for (name, vector) in VECTORS {
            let mut wire =
                b"EHLO x\r\nMAIL FROM:<a@legacy.test>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
                    .to_vec();
            wire.extend_from_slice(&content(vector));
            wire.extend_from_slice(b".\r\nQUIT\r\n");
            let out = run_session(&rig, &wire, read_size).await;
            assert_eq!(
                reply_codes(&out),
                vec![220, 250, 250, 250, 354, 250, 221],
                "{name} in reads of {read_size}: {:?}",
                final_replies(&out)
            );
            sessions += 1;
        }
    }
    let entries = rig.spool.list().expect("list");
    assert_eq!(entries.len(), sessions, "one message per transmission");
    for e in &entries {
        assert_eq!(e.recipients, vec!["b@example.org".to_string()]);
    }
}

/// The exact bytes stored for the vector smtp-proto 0.2.5 took for an end.
#[tokio::test]
async fn a_cr_run_after_crlf_dot_is_stored_as_text() {
    let relay = start_relay("").await;
    let mut c = relay.connect().await;
    c.begin_message("a@legacy.test", &["b@example.org"]).await;
    c.send(b"Subject: s\r\n\r\nbefore\r\n.\r\r\nafter\r\n..x\r\n.\r\n")
        .await;
    let ack = c.expect("250 2.0.0 queued as").await;
    let stored = relay.stored_message(&common::queued_id(&ack));
    let body = common::strip_added_headers(&stored, b"Subject: s\r\n\r\n");
    // The stuffed dot goes, its CR is a bare CR (→ CRLF), the next CRLF stays.
    assert_eq!(
        String::from_utf8_lossy(body),
        "Subject: s\r\n\r\nbefore\r\n\r\n\r\nafter\r\n.x\r\n"
    );
}

/// Pipelined commands right after the real end marker are commands: a second, legitimate
/// transaction in the same write is answered in order.
#[tokio::test]
async fn commands_pipelined_after_the_end_marker_are_commands() {
    let relay = start_relay("").await;
    let mut c = relay.connect().await;
    c.begin_message("a@legacy.test", &["b@example.org"]).await;
    c.send(
        b"Subject: one\r\n\r\n1\r\n.\r\nMAIL FROM:<a@legacy.test>\r\nRCPT TO:<c@example.org>\r\n\
DATA\r\nSubject: two\r\n\r\n2\r\n.\r\nNOOP\r\nQUIT\r\n",
    )
    .await;
    c.expect("250 2.0.0 queued as").await;
    c.expect("250 2.1.0").await;
    c.expect("250 2.1.5").await;
    c.expect("354").await;
    c.expect("250 2.0.0 queued as").await;
    c.expect("250 2.0.0 OK").await;
    c.expect("221").await;
    let rcpts: Vec<Vec<String>> = relay
        .spool
        .list()
        .expect("list")
        .into_iter()
        .map(|e| e.recipients)
        .collect();
    assert_eq!(
        rcpts,
        vec![
            vec!["b@example.org".to_string()],
            vec!["c@example.org".to_string()]
        ]
    );
}

/// A refused (oversized) DATA is still read to its real end: a vector inside it must not end
/// the skipping early and turn the rest of the message into commands.
#[tokio::test]
async fn a_refused_message_is_skipped_to_the_real_end() {
    for (name, vector) in VECTORS {
        let relay = start_relay("[smtp]\nmax_message_size = \"64KiB\"\n").await;
        let mut c = relay.connect().await;
        c.begin_message("a@legacy.test", &["b@example.org"]).await;
        let mut wire = b"Subject: big\r\n\r\n".to_vec();
        wire.extend(std::iter::repeat_n(b'x', 70 * 1024));
        wire.extend_from_slice(vector);
        wire.extend_from_slice(SMUGGLED);
        wire.extend_from_slice(b".\r\nQUIT\r\n");
        c.send(&wire).await;
        c.expect("552 5.3.4").await;
        let bye = c.reply().await;
        assert!(bye.starts_with("221"), "{name}: smuggled replies: {bye:?}");
        assert!(
            relay.spool.list().expect("list").is_empty(),
            "{name}: nothing reaches the spool"
        );
    }
}

/// BDAT has no end marker: a chunk's content is text whatever it contains, the commands after
/// the chunk are commands, and bare CR/LF inside it (also split across chunks) become CRLF.
#[tokio::test]
async fn bdat_content_is_never_a_second_message() {
    for (name, vector) in VECTORS {
        let relay = start_relay("").await;
        let mut c = relay.connect().await;
        c.expect("220").await;
        c.cmd_expect("EHLO client.test", "250").await;
        let mut body = content(vector);
        body.extend_from_slice(b".\r\n");
        // The vector straddles the two chunks.
        let cut = b"Subject: s\r\n\r\nbefore".len() + vector.len() / 2 + 1;
        let (first, second) = body.split_at(cut);
        let mut wire = b"MAIL FROM:<a@legacy.test>\r\nRCPT TO:<b@example.org>\r\n".to_vec();
        wire.extend_from_slice(format!("BDAT {}\r\n", first.len()).as_bytes());
        wire.extend_from_slice(first);
        wire.extend_from_slice(format!("BDAT {} LAST\r\n", second.len()).as_bytes());
        wire.extend_from_slice(second);
        wire.extend_from_slice(b"QUIT\r\n");
        c.send(&wire).await;
        c.expect("250 2.1.0").await;
        c.expect("250 2.1.5").await;
        c.expect("250 2.0.0 OK").await;
        c.expect("250 2.0.0 queued as").await;
        let bye = c.reply().await;
        assert!(bye.starts_with("221"), "{name}: {bye:?}");
        let entries = relay.spool.list().expect("list");
        assert_eq!(entries.len(), 1, "{name}");
        assert_eq!(entries[0].recipients, vec!["b@example.org".to_string()]);
        let stored = relay.stored_message(&entries[0].id);
        assert!(
            String::from_utf8_lossy(&stored).contains("RCPT TO:<victim@y.test>\r\n"),
            "{name}"
        );
        assert_only_crlf(name, &stored);
    }
}

/// A CR ending one BDAT chunk and an LF starting the next are one CRLF; a CR ending the last
/// chunk is a bare CR.
#[tokio::test]
async fn bdat_line_ends_across_chunks() {
    let relay = start_relay("").await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("EHLO client.test", "250").await;
    c.cmd_expect("MAIL FROM:<a@legacy.test>", "250").await;
    c.cmd_expect("RCPT TO:<b@example.org>", "250").await;
    let first = b"Subject: s\r\n\r\na\r";
    c.send(format!("BDAT {}\r\n", first.len()).as_bytes()).await;
    c.send(first).await;
    c.expect("250 2.0.0 OK").await;
    c.send(b"BDAT 3\r\n\nb\r").await;
    c.expect("250 2.0.0 OK").await;
    c.send(b"BDAT 0 LAST\r\n").await;
    let ack = c.expect("250 2.0.0 queued as").await;
    let stored = relay.stored_message(&common::queued_id(&ack));
    let body = common::strip_added_headers(&stored, b"Subject: s\r\n\r\n");
    assert_eq!(
        String::from_utf8_lossy(body),
        "Subject: s\r\n\r\na\r\nb\r\n"
    );
}
