//! More recipients than `smtp.max_recipients` (500 here, the default): sendmail splits them
//! into transactions of at most 500, one queued copy each, and exits 0 only once every batch
//! is stored: `-t` with a To of 600 addresses (relay running, every recipient delivered), 600
//! on the command line (relay down: two drop files), 600 `RCPT TO` over `-bs`. More than
//! sendmail's own bound (10,000) is a usage error and stores nothing.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::process::{Relay, free_port};
use common::sendmail::{BsSession, SENDMAIL_SECTION, config, delivered, drop_files, sendmail};
use common::sim_process::SimProc;

const MAX: usize = 500;

fn addresses(n: usize, tag: &str) -> Vec<String> {
    (0..n).map(|i| format!("{tag}{i}@example.org")).collect()
}

/// Waits (bounded: 60 s) until the messages containing `marker` were delivered to `want`
/// recipients in all; returns each message's recipients.
fn wait_recipients(sim: &SimProc, marker: &str, want: usize) -> Vec<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got: Vec<Vec<String>> = delivered(sim)
            .into_iter()
            .filter(|d| d.text.contains(marker))
            .map(|d| d.rcpt_to)
            .collect();
        if got.iter().map(Vec::len).sum::<usize>() >= want {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{marker}: {} of {want} recipients delivered",
            got.iter().map(Vec::len).sum::<usize>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start(work: &Path) -> (SimProc, Relay) {
    let sim = SimProc::start(work, "");
    let relay = Relay::builder()
        .work(work)
        .spool(&work.join("spool"))
        .config(|s| config(s.smtp, &s.spool, Some(&sim), SENDMAIL_SECTION))
        .start();
    (sim, relay)
}

fn assert_every_recipient_once(got: &[Vec<String>], want: &[String]) {
    let all: Vec<&String> = got.iter().flatten().collect();
    let set: BTreeSet<&String> = all.iter().copied().collect();
    assert_eq!(all.len(), want.len(), "a recipient delivered twice");
    assert_eq!(set, want.iter().collect::<BTreeSet<_>>());
}

#[test]
fn t_with_600_header_recipients_goes_in_two_transactions() {
    let work = tempfile::tempdir().unwrap();
    let (sim, relay) = start(work.path());
    let to = addresses(600, "t");
    let mut message = format!("To: {}\n", to.join(",\n "));
    message.push_str("Subject: six-hundred-by-t\n\nhello all\n");
    let r = sendmail(&relay.config, &["-t", "-i", "-v"], message.as_bytes());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("600 recipients in 2 transactions of at most 500"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.matches("queued as ").count(), 2, "{}", r.stderr);
    let got = wait_recipients(&sim, "six-hundred-by-t", 600);
    assert_every_recipient_once(&got, &to);
    assert!(
        got.iter().all(|r| r.len() <= MAX),
        "{:?}",
        got.iter().map(Vec::len).collect::<Vec<_>>()
    );
}

#[test]
fn bs_with_600_rcpt_is_stored_in_two_batches() {
    let work = tempfile::tempdir().unwrap();
    let (sim, relay) = start(work.path());
    let to = addresses(600, "bs");
    let mut bs = BsSession::start(&relay.config);
    bs.command("EHLO app.local", "250");
    bs.command("MAIL FROM:<app@example.com>", "250");
    for a in &to {
        bs.command(&format!("RCPT TO:<{a}>"), "250");
    }
    bs.command("DATA", "354");
    let queued = bs.command(
        "Subject: six-hundred-by-bs\r\n\r\nx\r\n.",
        "250 2.0.0 queued as ",
    );
    assert_eq!(
        queued
            .trim()
            .rsplit("queued as ")
            .next()
            .unwrap_or("")
            .split(' ')
            .count(),
        2,
        "{queued}"
    );
    assert_eq!(bs.quit(), Some(0));
    let got = wait_recipients(&sim, "six-hundred-by-bs", 600);
    assert_every_recipient_once(&got, &to);
}

#[test]
fn command_line_600_while_relay_down_gives_two_drop_files() {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let cfg = work.path().join("down.toml");
    std::fs::write(&cfg, config(free_port(), &spool, None, SENDMAIL_SECTION)).unwrap();
    let to = addresses(600, "cl");
    let mut args: Vec<&str> = vec!["-i", "--"];
    args.extend(to.iter().map(String::as_str));
    let r = sendmail(&cfg, &args, b"Subject: six-hundred-on-the-line\n\nx\n");
    assert_eq!(r.code, 0, "{}", r.stderr);
    let files = drop_files(&spool.join("maildrop"));
    assert_eq!(files.len(), 2, "{files:?}");
    let mut sizes = Vec::new();
    let mut all = Vec::new();
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        let h = smtp_oauth_relay::spool::format::decode(&bytes).unwrap();
        sizes.push(h.envelope.recipients.len());
        all.push(
            h.envelope
                .recipients
                .into_iter()
                .map(|r| r.address)
                .collect(),
        );
        assert!(
            String::from_utf8_lossy(&bytes).contains("six-hundred-on-the-line"),
            "one copy of the message in each"
        );
    }
    sizes.sort();
    assert_eq!(sizes, [100, MAX]);
    assert_every_recipient_once(&all, &to);

    // Beyond sendmail's own bound: a usage error, nothing more stored.
    let many = addresses(10_001, "x");
    let mut args: Vec<&str> = vec!["--"];
    args.extend(many.iter().map(String::as_str));
    let r = sendmail(&cfg, &args, b"Subject: too many\n\nx\n");
    assert_eq!(r.code, 64, "{}", r.stderr);
    assert!(r.stderr.contains("at most 10000"), "{}", r.stderr);
    assert_eq!(drop_files(&spool.join("maildrop")).len(), 2);
}
