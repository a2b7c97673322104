//! Bad input to sendmail gets a clear error and its sysexits code, and nothing is stored:
//! no recipients (64), a bare name nothing maps (67), a 40 MiB message (65, relay up or
//! down), a bad flag (64), an unreadable configuration (78), nowhere to store it (75). A
//! header-only message and binary garbage are mail all the same (0), stored as given.

mod common;

use std::path::Path;

use common::process::{Relay, free_port};
use common::sendmail::{SENDMAIL_SECTION, config, drop_files, sendmail};

/// A relay without upstream (messages stay queued, for inspection) with `[sendmail]`.
fn relay(work: &Path, section: &str) -> Relay {
    let section = section.to_string();
    Relay::builder()
        .work(work)
        .config(move |s| config(s.smtp, &s.spool, None, &section))
        .start()
}

fn queued_bodies(relay: &Relay) -> Vec<Vec<u8>> {
    let dir = relay.spool_dir().join("queue");
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let bytes = std::fs::read(e.path()).unwrap();
        let at = bytes.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
        out.push(bytes[at..].to_vec());
    }
    out
}

#[test]
fn refused_input_exits_with_its_code_and_stores_nothing() {
    let work = tempfile::tempdir().unwrap();
    let relay = relay(work.path(), SENDMAIL_SECTION);
    let cfg = &relay.config;

    let r = sendmail(cfg, &["-t", "-i"], b"Subject: nobody to send to\n\nx\n");
    assert_eq!(r.code, 64, "{}", r.stderr);
    assert!(r.stderr.contains("no recipients"), "{}", r.stderr);
    let r = sendmail(cfg, &["-i"], b"Subject: s\n\nx\n");
    assert_eq!(r.code, 64, "{}", r.stderr);

    let r = sendmail(cfg, &["-B9BITMIME", "root"], b"x\n");
    assert_eq!(r.code, 64, "{}", r.stderr);
    assert!(r.stderr.contains("7BIT or 8BITMIME"), "{}", r.stderr);

    // 40 MiB against the default 35 MiB smtp.max_message_size.
    let mut big = b"Subject: big\n\n".to_vec();
    big.resize(40 << 20, b'a');
    let r = sendmail(cfg, &["-i", "root"], &big);
    assert_eq!(r.code, 65, "{}", r.stderr);
    assert!(r.stderr.contains("message too big"), "{}", r.stderr);

    assert_eq!(relay.queued_files(), 0);
    assert!(drop_files(&relay.spool_dir().join("maildrop")).is_empty());
}

#[test]
fn a_bare_name_without_default_domain_or_alias_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let relay = relay(work.path(), "");
    let r = sendmail(&relay.config, &["-i", "root"], b"Subject: s\n\nx\n");
    assert_eq!(r.code, 67, "{}", r.stderr);
    assert!(r.stderr.contains("default_domain"), "{}", r.stderr);
    assert_eq!(relay.queued_files(), 0);
    // A qualified recipient needs neither.
    let r = sendmail(
        &relay.config,
        &["-i", "ops@example.org"],
        b"Subject: s\n\nx\n",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(relay.queued_files(), 1);
}

#[test]
fn header_only_and_binary_garbage_are_stored_as_given() {
    let work = tempfile::tempdir().unwrap();
    let relay = relay(work.path(), SENDMAIL_SECTION);
    let cfg = &relay.config;

    // A header section with no body and no final newline: the empty line is added.
    let r = sendmail(cfg, &["-t"], b"To: root\nSubject: header-only");
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Bytes that are no header at all: the whole input is the body, headers are added.
    let garbage: Vec<u8> = (0..=255u8)
        .cycle()
        .take(4096)
        .filter(|b| *b != b'\n')
        .collect();
    let mut input = garbage.clone();
    input.push(b'\n');
    let r = sendmail(cfg, &["-i", "root"], &input);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // With -t there is nobody to send garbage to.
    let r = sendmail(cfg, &["-t", "-i"], &input);
    assert_eq!(r.code, 64, "{}", r.stderr);

    let bodies = queued_bodies(&relay);
    assert_eq!(bodies.len(), 2);
    let header_only = bodies
        .iter()
        .find(|b| b.windows(11).any(|w| w == b"header-only"))
        .expect("header-only message queued");
    let text = String::from_utf8_lossy(header_only);
    assert!(
        text.contains("\r\nSubject: header-only\r\nFrom: root@example.com\r\nDate: "),
        "{text}"
    );
    assert!(
        text.ends_with(">\r\n\r\n"),
        "ends with the empty line: {text:?}"
    );
    let binary = bodies
        .iter()
        .find(|b| !b.windows(11).any(|w| w == b"header-only"))
        .unwrap();
    let at = binary.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    // The relay turns bare CR into CRLF (framing.rs); every other byte arrives as sent.
    let mut want: Vec<u8> = Vec::new();
    for &b in &garbage {
        if b == b'\r' {
            want.extend_from_slice(b"\r\n");
        } else {
            want.push(b);
        }
    }
    want.extend_from_slice(b"\r\n");
    assert_eq!(&binary[at..], &want[..]);
}

#[test]
fn relay_down_big_message_and_nowhere_to_store() {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let down = work.path().join("down.toml");
    std::fs::write(&down, config(free_port(), &spool, None, SENDMAIL_SECTION)).unwrap();
    let mut big = b"Subject: big\n\n".to_vec();
    big.resize(40 << 20, b'a');
    let r = sendmail(&down, &["-i", "root"], &big);
    assert_eq!(r.code, 65, "{}", r.stderr);
    assert!(drop_files(&spool.join("maildrop")).is_empty());

    // The relay is down and the drop directory cannot be created: 75, the caller may retry.
    let nowhere = work.path().join("nowhere.toml");
    let section = format!("{SENDMAIL_SECTION}drop_dir = \"/nonexistent/smtp-oauth-relay/drop\"\n");
    std::fs::write(&nowhere, config(free_port(), &spool, None, &section)).unwrap();
    let r = sendmail(&nowhere, &["-i", "root"], b"Subject: s\n\nx\n");
    assert_eq!(r.code, 75, "{}", r.stderr);
    assert!(r.stderr.contains("message not sent"), "{}", r.stderr);

    // A configuration sendmail cannot use: 78, naming the key.
    let bad = work.path().join("bad.toml");
    std::fs::write(&bad, "[sendmail]\ndefault_domain = \"not a domain\"\n").unwrap();
    let r = sendmail(&bad, &["-i", "root"], b"x\n");
    assert_eq!(r.code, 78, "{}", r.stderr);
    assert!(r.stderr.contains("sendmail.default_domain"), "{}", r.stderr);
}
