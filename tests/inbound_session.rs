//! SMTP dialogs against the in-process listener: every verb, pipelining, limits, refused
//! networks, smuggling vectors, the empty message, dot-stuffing, BDAT, AUTH and STARTTLS.

mod common;

use std::time::Duration;

use common::{Client, queued_id, start_relay, strip_added_headers};
use smtp_oauth_relay::spool::{Fault, FaultPoint};

const MIB: usize = 1024 * 1024;

#[tokio::test]
async fn greeting_and_ehlo_advertise_the_extensions() {
    let relay = start_relay("[smtp]\nhostname = \"relay.test\"\n").await;
    let mut c = relay.connect().await;
    let greeting = c.expect("220 relay.test ESMTP").await;
    assert!(greeting.ends_with("\r\n"));
    let ehlo = c.cmd("EHLO client.test").await;
    for ext in [
        "PIPELINING",
        "SIZE 36700160",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
    ] {
        assert!(ehlo.contains(ext), "{ext} missing in {ehlo}");
    }
    assert!(ehlo.starts_with("250-relay.test"), "{ehlo}");
    assert!(
        !ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo}"
    );
    c.cmd_expect("QUIT", "221 2.0.0").await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn every_other_verb_has_its_reply() {
    let relay = start_relay("").await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("HELO old.client", "250 ").await;
    c.cmd_expect("NOOP", "250 2.0.0").await;
    c.cmd_expect("VRFY someone", "252 2.5.0").await;
    c.cmd_expect("HELP", "214 2.0.0").await;
    c.cmd_expect("RSET", "250 2.0.0").await;
    c.cmd_expect("EXPN list", "502 5.5.1").await;
    c.cmd_expect("FROB", "500 5.5.1").await;
    c.cmd_expect("STARTTLS", "502 5.5.1").await;
    c.cmd_expect("AUTH PLAIN", "502 5.5.1").await;
    c.cmd_expect("QUIT", "221").await;
}

#[tokio::test]
async fn commands_out_of_sequence_get_503_or_554() {
    let relay = start_relay("").await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("EHLO c", "250").await;
    c.cmd_expect("RCPT TO:<b@example.org>", "503 5.5.1").await;
    c.cmd_expect("DATA", "503 5.5.1").await;
    c.cmd_expect("MAIL FROM:<a@legacy.test>", "250 2.1.0").await;
    c.cmd_expect("MAIL FROM:<a@legacy.test>", "503 5.5.1").await;
    c.cmd_expect("DATA", "554 5.5.1").await;
    c.cmd_expect("MAIL FROM:<a@legacy.test", "501").await;
}

#[tokio::test]
async fn helo_only_clients_and_the_null_sender_work() {
    let relay = start_relay("").await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("HELO printer", "250").await;
    c.cmd_expect("MAIL FROM:<>", "250 2.1.0").await;
    c.cmd_expect("RCPT TO:<b@example.org>", "250 2.1.5").await;
    c.cmd_expect("DATA", "354").await;
    c.send(b"Subject: scan\r\n\r\nhello\r\n.\r\n").await;
    c.expect("250 2.0.0 queued as ").await;
    let stored = &relay.stored_messages()[0];
    assert!(stored.starts_with(b"Received: from printer ([127.0.0.1])\r\n\tby "));
    assert!(String::from_utf8_lossy(stored).contains(" with SMTP id "));
    let list = relay.spool.list().expect("list");
    assert_eq!(list[0].mail_from, "");
}

#[tokio::test]
async fn message_is_stored_with_trace_headers_and_exact_bytes() {
    let relay = start_relay("[smtp]\nhostname = \"relay.test\"\n").await;
    let mut c = relay.connect().await;
    c.begin_message("a@legacy.test", &["b@example.org", "c@example.org"])
        .await;
    let body = b"From: a@legacy.test\r\nSubject: hi\r\n\r\nline 1\r\n\xc3\xa9t\xc3\xa9 8-bit\r\n";
    c.send(body).await;
    c.send(b".\r\n").await;
    let reply = c.expect("250 2.0.0 queued as ").await;
    let id = queued_id(&reply);
    assert_eq!(id.len(), 26);
    let stored = relay.stored_message(&id);
    let text = String::from_utf8_lossy(&stored).to_string();
    assert!(
        text.contains("by relay.test (smtp-oauth-relay) with ESMTP id "),
        "{text}"
    );
    assert!(
        !text.contains("\tfor <"),
        "two recipients: no `for` clause: {text}"
    );
    assert!(
        text.contains(&format!("\r\nMessage-ID: <{id}@relay.test>\r\n")),
        "{text}"
    );
    assert!(text.contains("\r\nDate: "), "{text}");
    assert_eq!(strip_added_headers(&stored, body), body);
    let entry = &relay.spool.list().expect("list")[0];
    assert_eq!(entry.recipients, vec!["b@example.org", "c@example.org"]);
}

#[tokio::test]
async fn existing_date_and_message_id_are_kept() {
    let relay = start_relay("").await;
    let mut c = relay.connect().await;
    c.begin_message("a@legacy.test", &["b@example.org"]).await;
    let body = b"date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-Id: <x@y>\r\n\r\nbody\r\n";
    c.send(body).await;
    c.send(b".\r\n").await;
    c.expect("250 2.0.0").await;
    let stored = &relay.stored_messages()[0];
    assert_eq!(strip_added_headers(stored, body), body);
    assert!(String::from_utf8_lossy(stored).contains("\tfor <b@example.org>;"));
}

#[tokio::test]
async fn pipelined_commands_are_answered_in_order() {
    let relay = start_relay("").await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("EHLO c", "250").await;
    c.send(b"MAIL FROM:<a@legacy.test>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<bad\r\nRCPT TO:<c@example.org>\r\nDATA\r\n")
        .await;
    c.expect("250 2.1.0").await;
    c.expect("250 2.1.5").await;
    c.expect("501").await;
    c.expect("250 2.1.5").await;
    c.expect("354").await;
    // End of data, a second whole transaction and QUIT in one write.
    c.send(b"one\r\n.\r\nMAIL FROM:<a@legacy.test>\r\nRCPT TO:<d@example.org>\r\nDATA\r\n")
        .await;
    c.expect("250 2.0.0 queued as").await;
    c.expect("250 2.1.0").await;
    c.expect("250 2.1.5").await;
    c.expect("354").await;
    c.send(b"two\r\n.\r\nQUIT\r\n").await;
    c.expect("250 2.0.0 queued as").await;
    c.expect("221").await;
    assert_eq!(relay.stored_messages().len(), 2);
}

#[tokio::test]
async fn an_overlong_command_line_is_refused_and_the_session_goes_on() {
    let relay = start_relay("").await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    let long = format!("NOOP {}\r\n", "A".repeat(10_000));
    c.send(long.as_bytes()).await;
    c.expect("500 5.5.2").await;
    c.cmd_expect("NOOP", "250").await;
}

#[tokio::test]
async fn declared_size_over_the_limit_is_refused_at_mail() {
    let relay = start_relay("[smtp]\nmax_message_size = \"64KiB\"\n").await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("EHLO c", "250").await;
    c.cmd_expect("MAIL FROM:<a@legacy.test> SIZE=65537", "552 5.3.4")
        .await;
    c.cmd_expect("MAIL FROM:<a@legacy.test> SIZE=65536", "250")
        .await;
}

#[tokio::test]
async fn data_over_the_limit_is_refused_and_nothing_is_kept() {
    let relay = start_relay("[smtp]\nmax_message_size = \"64KiB\"\n").await;
    let mut c = relay.connect().await;
    c.begin_message("a@legacy.test", &["b@example.org"]).await;
    let line = format!("{}\r\n", "x".repeat(998));
    for _ in 0..70 {
        c.send(line.as_bytes()).await;
    }
    c.send(b".\r\n").await;
    c.expect("552 5.3.4").await;
    c.cmd_expect("NOOP", "250").await;
    assert!(relay.files_in("queue").is_empty());
    assert!(relay.files_in("tmp").is_empty());
    // The transaction is over; a new one works.
    c.cmd_expect("MAIL FROM:<a@legacy.test>", "250").await;
}

#[tokio::test]
async fn recipients_beyond_the_limit_get_452() {
    let relay = start_relay("[smtp]\nmax_recipients = 100\nmax_errors = 50\n").await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("EHLO c", "250").await;
    c.cmd_expect("MAIL FROM:<a@legacy.test>", "250").await;
    for i in 0..100 {
        c.cmd_expect(&format!("RCPT TO:<r{i}@example.org>"), "250")
            .await;
    }
    c.cmd_expect("RCPT TO:<r100@example.org>", "452 4.5.3")
        .await;
    c.cmd_expect("DATA", "354").await;
    c.send(b"x\r\n.\r\n").await;
    c.expect("250").await;
    assert_eq!(relay.spool.list().expect("list")[0].recipients.len(), 100);
}

#[tokio::test]
async fn connections_beyond_the_limit_get_421() {
    let relay = start_relay("[smtp]\nmax_connections = 1\n").await;
    let mut first = relay.connect().await;
    first.expect("220").await;
    let mut second = relay.connect().await;
    second.expect("421 4.3.2").await;
    assert!(second.closed().await);
    first.cmd_expect("QUIT", "221").await;
    drop(first);
    // The slot is released when the first session ends.
    let mut third = None;
    for _ in 0..50 {
        let mut c = relay.connect().await;
        if c.reply().await.starts_with("220") {
            third = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(third.is_some(), "slot never released");
}

#[tokio::test]
async fn an_idle_client_is_disconnected_after_the_command_timeout() {
    let relay = start_relay("[smtp]\ncommand_timeout = \"1s\"\n").await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.expect("421 4.4.2").await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn a_stalled_data_transfer_times_out_and_leaves_nothing() {
    let relay = start_relay("[smtp]\ndata_timeout = \"1s\"\n").await;
    let mut c = relay.connect().await;
    c.begin_message("a@legacy.test", &["b@example.org"]).await;
    c.send(b"Subject: half\r\n\r\nhalf a mess").await;
    c.expect("421 4.4.2").await;
    assert!(c.closed().await);
    assert!(relay.files_in("queue").is_empty());
    assert!(relay.files_in("tmp").is_empty());
}

#[tokio::test]
async fn repeated_errors_end_the_session() {
    let relay = start_relay("[smtp]\nmax_errors = 3\n").await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("BOGUS1", "500").await;
    c.cmd_expect("BOGUS2", "500").await;
    c.cmd_expect("BOGUS3", "500").await;
    c.expect("421 4.7.0").await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn clients_outside_allow_networks_are_refused_at_connect() {
    let relay = start_relay("[smtp]\nallow_networks = [\"127.0.0.1/32\"]\n").await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.2:0".parse().expect("addr"))
        .expect("bind 127.0.0.2 (loopback /8)");
    let stream = socket.connect(relay.addr).await.expect("connect");
    let mut c = Client::new(stream);
    c.expect("554 5.7.1").await;
    assert!(c.closed().await);
    // 127.0.0.1 itself is allowed.
    let mut ok = relay.connect().await;
    ok.expect("220").await;
}

#[tokio::test]
async fn http_requests_get_one_reply_and_a_closed_connection() {
    let relay = start_relay("").await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    c.expect("502 5.5.1").await;
    assert!(c.closed().await);
}

/// SMTP smuggling: only CRLF.CRLF ends the data; other dot lines stay content, normalised.
#[tokio::test]
async fn smuggling_vectors_do_not_end_the_message() {
    for (name, vector) in [
        ("LF.LF", &b"\n.\n"[..]),
        ("CR.CR", b"\r.\r"),
        ("CRLF.LF", b"\r\n.\n"),
        ("LF.CRLF", b"\n.\r\n"),
    ] {
        let relay = start_relay("").await;
        let mut c = relay.connect().await;
        c.begin_message("a@legacy.test", &["b@example.org"]).await;
        let mut body = b"Subject: s\r\n\r\nbefore".to_vec();
        body.extend_from_slice(vector);
        body.extend_from_slice(
            b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nsmuggled\r\n",
        );
        c.send(&body).await;
        c.send(b".\r\n").await;
        c.expect("250 2.0.0 queued as").await;
        c.cmd_expect("NOOP", "250 2.0.0 OK").await;
        let stored = relay.stored_messages();
        assert_eq!(stored.len(), 1, "{name}: exactly one message");
        let text = String::from_utf8_lossy(&stored[0]).to_string();
        assert!(
            text.contains("MAIL FROM:<evil@x.test>\r\n"),
            "{name}: {text:?}"
        );
        assert!(
            !text.replace("\r\n", "").contains('\n'),
            "{name}: bare LF kept: {text:?}"
        );
    }
}

#[tokio::test]
async fn an_empty_message_and_a_leading_dot_line_work() {
    let relay = start_relay("").await;
    let mut c = relay.connect().await;
    c.begin_message("a@legacy.test", &["b@example.org"]).await;
    c.send(b".\r\n").await;
    let id = queued_id(&c.expect("250 2.0.0 queued as").await);
    assert_eq!(strip_added_headers(&relay.stored_message(&id), b""), b"");

    c.cmd_expect("MAIL FROM:<a@legacy.test>", "250").await;
    c.cmd_expect("RCPT TO:<b@example.org>", "250").await;
    c.cmd_expect("DATA", "354").await;
    c.send(b"..hidden\r\n.\r\n").await;
    let id = queued_id(&c.expect("250 2.0.0 queued as").await);
    assert!(relay.stored_message(&id).ends_with(b"\r\n.hidden\r\n"));
}

#[tokio::test]
async fn dot_stuffing_round_trips() {
    let relay = start_relay("").await;
    let mut c = relay.connect().await;
    c.begin_message("a@legacy.test", &["b@example.org"]).await;
    // What the client means, then what it sends (RFC 5321 §4.5.2 transparency).
    let meant = b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\nmiddle.\r\n";
    c.send(b"Subject: dots\r\n\r\n..\r\n...\r\n..leading\r\nmiddle.\r\n.\r\n")
        .await;
    let id = queued_id(&c.expect("250 2.0.0 queued as").await);
    assert_eq!(
        strip_added_headers(&relay.stored_message(&id), meant),
        meant
    );
}

#[tokio::test]
async fn bdat_chunks_are_stored_exactly() {
    let relay = start_relay("").await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("EHLO c", "250").await;
    c.cmd_expect("MAIL FROM:<a@legacy.test>", "250").await;
    c.cmd_expect("RCPT TO:<b@example.org>", "250").await;
    let part1 = b"Subject: chunks\r\n\r\n.not stuffed\r\n";
    let part2 = b"second part\r\n";
    c.send(format!("BDAT {}\r\n", part1.len()).as_bytes()).await;
    c.send(part1).await;
    c.expect("250 2.0.0").await;
    // The last chunk pipelined with the following command.
    let mut last = format!("BDAT {} LAST\r\n", part2.len()).into_bytes();
    last.extend_from_slice(part2);
    last.extend_from_slice(b"NOOP\r\n");
    c.send(&last).await;
    let id = queued_id(&c.expect("250 2.0.0 queued as").await);
    c.expect("250 2.0.0 OK").await;
    let mut sent = part1.to_vec();
    sent.extend_from_slice(part2);
    assert_eq!(
        strip_added_headers(&relay.stored_message(&id), &sent),
        &sent[..]
    );
}

#[tokio::test]
async fn bdat_out_of_sequence_or_too_big_is_refused_in_step() {
    let relay = start_relay("[smtp]\nmax_message_size = \"64KiB\"\n").await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("EHLO c", "250").await;
    // No MAIL: the chunk is still consumed, so "NOOP" inside it is not a command.
    c.send(b"BDAT 6 LAST\r\nNOOP\r\n").await;
    c.expect("503 5.5.1").await;
    c.cmd_expect("MAIL FROM:<a@legacy.test>", "250").await;
    c.cmd_expect("RCPT TO:<b@example.org>", "250").await;
    let big = vec![b'x'; 70 * 1024];
    c.send(format!("BDAT {} LAST\r\n", big.len()).as_bytes())
        .await;
    c.send(&big).await;
    c.expect("552 5.3.4").await;
    c.cmd_expect("NOOP", "250").await;
    assert!(relay.files_in("queue").is_empty());
    assert!(relay.files_in("tmp").is_empty());
}

#[tokio::test]
async fn auth_accept_any_offers_plain_and_login() {
    let relay = start_relay("[smtp]\nauth = \"accept-any\"\n").await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    let ehlo = c.cmd("EHLO c").await;
    assert!(
        ehlo.contains("AUTH PLAIN LOGIN") || ehlo.contains("AUTH LOGIN PLAIN"),
        "{ehlo}"
    );
    // base64("\0user\0pass")
    c.cmd_expect("AUTH PLAIN AHVzZXIAcGFzcw==", "235 2.7.0")
        .await;
    c.cmd_expect("AUTH PLAIN AHVzZXIAcGFzcw==", "503").await;

    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("EHLO c", "250").await;
    c.cmd_expect("AUTH LOGIN", "334 VXNlcm5hbWU6").await;
    c.cmd_expect("dXNlcg==", "334 UGFzc3dvcmQ6").await;
    c.cmd_expect("cGFzcw==", "235 2.7.0").await;
    c.begin_message_after_auth().await;
    c.send(b"Subject: x\r\n\r\ny\r\n.\r\n").await;
    c.expect("250 2.0.0 queued as").await;
    assert!(
        String::from_utf8_lossy(&relay.stored_messages()[0]).contains("with ESMTPA id"),
        "protocol names authentication"
    );
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("EHLO c", "250").await;
    c.cmd_expect("AUTH PLAIN", "334").await;
    c.cmd_expect("*", "501 5.0.0").await;
    c.cmd_expect("AUTH PLAIN", "334").await;
    c.cmd_expect("not base64!", "501 5.5.2").await;
    c.cmd_expect("AUTH CRAM-MD5", "504 5.5.4").await;
}

#[tokio::test]
async fn auth_with_a_users_file_is_required_and_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users");
    let hash = common::process::hash_password_cli("right-password");
    std::fs::write(&users, format!("# devices\nscanner:{hash}\n")).expect("write");
    let relay = start_relay(&format!("[smtp]\nauth = \"{}\"\n", users.display())).await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("EHLO c", "250").await;
    c.cmd_expect("MAIL FROM:<a@legacy.test>", "530 5.7.0").await;
    // base64("\0scanner\0wrong")
    c.cmd_expect("AUTH PLAIN AHNjYW5uZXIAd3Jvbmc=", "535 5.7.8")
        .await;
    // base64("\0scanner\0right-password")
    c.cmd_expect("AUTH PLAIN AHNjYW5uZXIAcmlnaHQtcGFzc3dvcmQ=", "235")
        .await;
    c.cmd_expect("MAIL FROM:<a@legacy.test>", "250").await;
}

#[tokio::test]
async fn a_spool_write_error_is_a_451_and_leaves_nothing() {
    let relay = start_relay("").await;
    for (point, errno_is_space, expected) in [
        (FaultPoint::FileFsync, false, "451 4.3.0"),
        (FaultPoint::Write, true, "452 4.3.1"),
        (FaultPoint::Rename, false, "451 4.3.0"),
        (FaultPoint::DirFsync, false, "451 4.3.0"),
    ] {
        let mut c = relay.connect().await;
        c.begin_message("a@legacy.test", &["b@example.org"]).await;
        relay.spool.inject_fault(Some(if errno_is_space {
            Fault::enospc(point)
        } else {
            Fault::eio(point)
        }));
        c.send(b"Subject: doomed\r\n\r\nbody\r\n.\r\n").await;
        c.expect(expected).await;
        c.cmd_expect("NOOP", "250").await;
        assert!(relay.files_in("queue").is_empty(), "{point:?}");
        assert!(relay.files_in("tmp").is_empty(), "{point:?}");
    }
    let mut c = relay.connect().await;
    c.begin_message("a@legacy.test", &["b@example.org"]).await;
    c.send(b"Subject: fine\r\n\r\nbody\r\n.\r\n").await;
    c.expect("250 2.0.0 queued as").await;
}

#[tokio::test]
async fn a_large_message_streams_through() {
    let relay = start_relay("").await;
    let mut c = relay.connect().await;
    c.begin_message("a@legacy.test", &["b@example.org"]).await;
    let mut sent = b"Subject: big\r\n\r\n".to_vec();
    let line = format!("{}\r\n", "0123456789".repeat(7));
    while sent.len() < 8 * MIB {
        sent.extend_from_slice(line.as_bytes());
    }
    c.send(&sent).await;
    c.send(b".\r\n").await;
    let id = queued_id(&c.expect("250 2.0.0 queued as").await);
    assert_eq!(
        strip_added_headers(&relay.stored_message(&id), &sent),
        &sent[..]
    );
}

#[tokio::test]
async fn shutdown_closes_idle_sessions_with_421() {
    let relay = start_relay("").await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("EHLO c", "250").await;
    relay.shutdown.cancel();
    c.expect("421 4.3.2").await;
    assert!(c.closed().await);
    tokio::time::timeout(Duration::from_secs(10), relay.handle)
        .await
        .expect("server returns")
        .expect("task");
}

#[tokio::test]
async fn shutdown_lets_a_message_in_flight_finish() {
    let relay = start_relay("").await;
    let mut c = relay.connect().await;
    c.begin_message("a@legacy.test", &["b@example.org"]).await;
    c.send(b"Subject: in flight\r\n\r\nfirst half\r\n").await;
    relay.shutdown.cancel();
    // The server has seen the shutdown (it stopped accepting) while the message is in flight.
    relay.wait_not_accepting().await;
    c.send(b"second half\r\n.\r\n").await;
    c.expect("250 2.0.0 queued as").await;
    c.expect("421 4.3.2").await;
    assert_eq!(relay.files_in("queue").len(), 1);
}

trait BeginAfterAuth {
    async fn begin_message_after_auth(&mut self);
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> BeginAfterAuth for Client<S> {
    async fn begin_message_after_auth(&mut self) {
        self.cmd_expect("MAIL FROM:<a@legacy.test>", "250").await;
        self.cmd_expect("RCPT TO:<b@example.org>", "250").await;
        self.cmd_expect("DATA", "354").await;
    }
}

#[tokio::test]
async fn starttls_upgrades_and_discards_pipelined_commands() {
    use std::sync::Arc;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
    let relay = start_relay(&format!(
        "[smtp]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        cert_path.display(),
        key_path.display()
    ))
    .await;

    let mut c = relay.connect().await;
    c.expect("220").await;
    let ehlo = c.cmd("EHLO c").await;
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    // RFC 3207 §5: the NOOP pipelined after STARTTLS must not be answered.
    c.send(b"STARTTLS\r\nNOOP\r\n").await;
    c.expect("220 2.0.0").await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).expect("root");
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let tls = connector
        .connect(name, c.into_inner())
        .await
        .expect("handshake");
    let mut c = Client::new(tls);
    let ehlo = c.cmd("EHLO c").await;
    assert!(
        ehlo.starts_with("250-"),
        "first reply after TLS is EHLO's: {ehlo}"
    );
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    c.cmd_expect("STARTTLS", "503 5.5.1").await;
    c.cmd_expect("MAIL FROM:<a@legacy.test>", "250").await;
    c.cmd_expect("RCPT TO:<b@example.org>", "250").await;
    c.cmd_expect("DATA", "354").await;
    c.send(b"Subject: tls\r\n\r\nsecret\r\n.\r\n").await;
    c.expect("250 2.0.0 queued as").await;
    let stored = String::from_utf8_lossy(&relay.stored_messages()[0]).to_string();
    assert!(stored.contains("with ESMTPS id"), "{stored}");
}
