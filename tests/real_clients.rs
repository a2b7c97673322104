//! Real SMTP clients nobody here wrote (python3 `smtplib`, `swaks --pipeline`) against the real
//! binary: the stored message must be exactly what the client sent, apart from the relay's
//! added `Received:` (and `Date:` / `Message-ID:` when the client left them out).
//!
//! The tools are required: when one is missing the test fails and says so (CI installs them).

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::process::Command;
use std::time::Duration;

use common::fixtures::{assert_stored_equals, crlf, files_in, queued_path, read_stored};
use common::process::{Extra, Relay, output_bounded, require_tool};
use smtp_oauth_relay::spool::BodyType;

/// Sends every message file given as `7bit=PATH` / `8bit=PATH` on ONE connection with
/// smtplib's own MAIL/RCPT/DATA (dot-stuffing and the final CRLF.CRLF are smtplib's), printing
/// the DATA reply of each; the last `sendmail=PATH` goes through `SMTP.sendmail`.
const SMTPLIB_SCRIPT: &str = r#"
import smtplib, sys
port = int(sys.argv[1])
s = smtplib.SMTP("127.0.0.1", port, local_hostname="py.client.test", timeout=60)
code, _ = s.ehlo()
assert code == 250, code
for arg in sys.argv[2:]:
    kind, path = arg.split("=", 1)
    msg = open(path, "rb").read()
    if kind == "sendmail":
        refused = s.sendmail("app@legacy.local", ["user@example.org"], msg,
                             mail_options=["BODY=8BITMIME"])
        print("SENDMAIL", repr(refused), flush=True)
        continue
    opts = ["BODY=8BITMIME"] if kind == "8bit" else []
    code, resp = s.mail("app@legacy.local", opts)
    assert code == 250, (code, resp)
    code, resp = s.rcpt("user@example.org")
    assert code == 250, (code, resp)
    code, resp = s.data(msg)
    print("DATA", code, resp.decode(), flush=True)
s.quit()
"#;

#[test]
fn python_smtplib_several_messages_on_one_connection_are_stored_byte_for_byte() {
    require_tool("python3", &["-c", "pass"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool");
    let relay = Relay::start(dir.path(), &spool, &Extra::default());

    // 1: complete headers; lines that need dot-stuffing, including a lone ".".
    let dots = crlf(&[
        "From: App <app@legacy.local>",
        "To: User <user@example.org>",
        "Subject: dots",
        "Date: Mon, 01 Jan 2024 10:00:00 +0000",
        "Message-ID: <dots-1@legacy.local>",
        "",
        ".hidden line starting with a dot",
        "..two dots",
        ".",
        "middle",
        " . space dot",
        "...",
        ".last",
    ]);
    // 2: 8-bit UTF-8 body sent with BODY=8BITMIME.
    let utf8 = crlf(&[
        "From: app@legacy.local",
        "To: user@example.org",
        "Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=",
        "Date: Mon, 01 Jan 2024 10:00:01 +0000",
        "Message-ID: <utf8-2@legacy.local>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        "Grüße aus Köln — 日本語のテキスト ✓",
        "ÆØÅ æøå €",
    ]);
    // 3: no Date, no Message-ID: the relay adds both.
    let bare = crlf(&[
        "From: app@legacy.local",
        "To: user@example.org",
        "Subject: no date, no id",
        "",
        "The relay adds Date and Message-ID.",
    ]);
    // 4 (via SMTP.sendmail): a lower-case message-id and no Date: only Date is added.
    let sendmail = crlf(&[
        "from: app@legacy.local",
        "to: user@example.org",
        "subject: sendmail",
        "message-id: <sm-4@legacy.local>",
        "",
        "sent with smtplib.SMTP.sendmail",
        ".",
    ]);
    let messages: [(&str, &[u8]); 4] = [
        ("7bit", &dots),
        ("8bit", &utf8),
        ("7bit", &bare),
        ("sendmail", &sendmail),
    ];
    let mut args = vec![
        "-c".to_string(),
        SMTPLIB_SCRIPT.to_string(),
        relay.port.to_string(),
    ];
    for (i, (kind, bytes)) in messages.iter().enumerate() {
        let path = dir.path().join(format!("msg{i}.eml"));
        fs::write(&path, bytes).expect("write message");
        args.push(format!("{kind}={}", path.display()));
    }
    let mut cmd = Command::new("python3");
    cmd.args(&args);
    let out = output_bounded(cmd, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "smtplib script failed: {}\nstdout:\n{stdout}\nstderr:\n{}\nrelay log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        relay.log_text()
    );

    let ids: Vec<String> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("DATA "))
        .map(|l| {
            let id = l
                .strip_prefix("250 2.0.0 queued as ")
                .unwrap_or_else(|| panic!("unexpected DATA reply {l:?}"));
            id.trim().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 3, "three DATA replies expected:\n{stdout}");
    assert!(
        stdout.contains("SENDMAIL {}"),
        "sendmail refused recipients:\n{stdout}"
    );

    let queued: BTreeSet<String> = files_in(&spool, "queue")
        .into_iter()
        .filter_map(|n| n.strip_suffix(".msg").map(str::to_string))
        .collect();
    assert_eq!(
        queued.len(),
        4,
        "four messages expected in queue/: {queued:?}"
    );
    let sendmail_id = queued
        .iter()
        .find(|id| !ids.contains(id))
        .expect("the sendmail message")
        .clone();

    for (i, id) in ids.iter().chain(std::iter::once(&sendmail_id)).enumerate() {
        let (kind, sent) = messages[i];
        let stored = read_stored(&queued_path(&spool, id)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(stored.header.id, *id);
        assert_eq!(stored.header.envelope.mail_from, "app@legacy.local");
        let rcpts: Vec<&str> = stored
            .header
            .envelope
            .recipients
            .iter()
            .map(|r| r.address.as_str())
            .collect();
        assert_eq!(rcpts, ["user@example.org"]);
        let body_type = stored.header.envelope.mail_params.body;
        if kind == "7bit" {
            assert_eq!(body_type, BodyType::SevenBit, "message {i}");
        } else {
            assert_eq!(body_type, BodyType::EightBitMime, "message {i}");
        }
        assert_eq!(stored.header.envelope.helo, "py.client.test");
        let added = assert_stored_equals(&stored.body, id, sent);
        match i {
            0 | 1 => assert!(added.date.is_none() && added.message_id.is_none()),
            2 => assert!(added.date.is_some() && added.message_id.is_some()),
            _ => assert!(added.date.is_some() && added.message_id.is_none()),
        }
    }
    assert!(files_in(&spool, "tmp").is_empty(), "tmp/ not empty");
}

/// The DATA section swaks actually put on the wire, read from its transcript (` -> ` lines
/// between the 354 and the lone "."), with the transparency dots removed.
fn swaks_sent_message(transcript: &[u8]) -> Vec<u8> {
    let mut lines = transcript.split(|b| *b == b'\n');
    lines
        .by_ref()
        .find(|l| l.starts_with(b"<-  354"))
        .expect("swaks transcript has no 354 reply");
    let mut message = Vec::new();
    for line in lines {
        let Some(sent) = line.strip_prefix(b" -> ") else {
            // With PIPELINING nothing else is printed until the end of data.
            panic!(
                "unexpected transcript line inside DATA: {:?}",
                String::from_utf8_lossy(line)
            );
        };
        if sent == b"." || sent == b".\r" {
            return message;
        }
        let sent = sent.strip_prefix(b".").unwrap_or(sent);
        message.extend_from_slice(sent);
        message.push(b'\n');
    }
    panic!("swaks transcript has no end of data");
}

#[test]
fn swaks_pipeline_with_custom_headers_and_body_is_stored_byte_for_byte() {
    require_tool("swaks", &["--version"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool");
    let relay = Relay::start(dir.path(), &spool, &Extra::default());

    let body = "line one\n.starts with a dot\n..two dots\n.\nÜmlaut and 日本語\nlast";
    let mut cmd = Command::new("swaks");
    cmd.args(["--server", "127.0.0.1", "--port"])
        .arg(relay.port.to_string())
        .args(["--pipeline", "--helo", "swaks.client.test"])
        .args(["--from", "scanner@legacy.local", "--to", "user@example.org"])
        .args(["--header", "Subject: swaks custom subject"])
        .args(["--header", "X-Custom: héllo wörld"])
        .args(["--header", "X-Second: two"])
        .args(["--body", body])
        .args(["--timeout", "60"]);
    let out = output_bounded(cmd, Duration::from_secs(120));
    let transcript = out.stdout.clone();
    let shown = String::from_utf8_lossy(&transcript).into_owned();
    assert!(
        out.status.success(),
        "swaks failed ({}):\n{shown}\n{}\nrelay log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        relay.log_text()
    );
    assert!(
        shown.contains(
            " -> MAIL FROM:<scanner@legacy.local>\n -> RCPT TO:<user@example.org>\n -> DATA"
        ),
        "swaks did not pipeline MAIL/RCPT/DATA:\n{shown}"
    );
    let id = shown
        .lines()
        .find_map(|l| l.strip_prefix("<-  250 2.0.0 queued as "))
        .unwrap_or_else(|| panic!("no `queued as` reply:\n{shown}"))
        .trim()
        .to_string();

    let sent = swaks_sent_message(&transcript);
    // The transcript reading is not vacuous: our headers and body are in it, unstuffed.
    let sent_text = String::from_utf8_lossy(&sent).into_owned();
    for needle in [
        "Subject: swaks custom subject\r\n",
        "X-Custom: héllo wörld\r\n",
        "X-Second: two\r\n",
        "\r\n\r\nline one\r\n.starts with a dot\r\n..two dots\r\n.\r\nÜmlaut and 日本語\r\nlast\r\n",
    ] {
        assert!(
            sent_text.contains(needle),
            "{needle:?} not in {sent_text:?}"
        );
    }

    let stored = read_stored(&queued_path(&spool, &id)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stored.header.envelope.mail_from, "scanner@legacy.local");
    assert_eq!(stored.header.envelope.helo, "swaks.client.test");
    let added = assert_stored_equals(&stored.body, &id, &sent);
    // swaks writes its own Date and Message-Id.
    assert!(added.date.is_none() && added.message_id.is_none());
    assert!(added.received.contains("for <user@example.org>"));
}
