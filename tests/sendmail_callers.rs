//! sendmail as its real callers run it (reference/next-capabilities.md §1.1), against the real
//! relay process delivering to the simulator: the exact command lines of Debian cron, cronie,
//! PHP `mail()`, unattended-upgrades, mdadm, Symfony's `-bs`, s-nail through the `sendmail`
//! name; Bcc removed, aliases and default_domain applied, a missing From/Date/Message-ID added.

mod common;

use std::path::Path;

use common::process::{Relay, require_tool};
use common::sendmail::{
    BsSession, SENDMAIL_SECTION, as_link, config, link, sendmail, wait_delivered, with_stdin,
};
use common::sim_process::SimProc;

fn start(work: &Path) -> (SimProc, Relay) {
    let sim = SimProc::start(work, "");
    let spool = work.join("spool");
    let relay = Relay::builder()
        .work(work)
        .spool(&spool)
        .config(|s| config(s.smtp, &s.spool, Some(&sim), SENDMAIL_SECTION))
        .start();
    (sim, relay)
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn every_caller_reaches_the_mailbox() {
    let work = tempfile::tempdir().unwrap();
    let (sim, relay) = start(work.path());
    let cfg = &relay.config;

    // Debian cron 3.0pl1: "%s -FCronDaemon -i -B8BITMIME -oem %s" with MAILTO=root. With -i a
    // lone dot in the job's output is data.
    let r = sendmail(
        cfg,
        &["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
        b"To: root\nSubject: Cron <root@host> debian-cron-job\nAuto-Submitted: auto-generated\n\n\
          line one\n.\nafter the dot \xc3\xa9\n",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let d = wait_delivered(&sim, "debian-cron-job");
    assert_eq!(d.rcpt_to, ["admin@example.com"], "the alias of root");
    assert!(
        d.text.contains("\r\nline one\r\n.\r\nafter the dot é\r\n"),
        "{}",
        d.text
    );
    assert!(
        d.text.contains("\r\nDate: ") && d.text.contains("\r\nMessage-ID: <"),
        "{}",
        d.text
    );
    // The From sendmail added (CronDaemon <root@example.com>) is kept in Reply-To by the
    // relay's sender policy (the mailbox sends as itself).
    assert!(
        d.text.contains("CronDaemon <root@example.com>"),
        "{}",
        d.text
    );

    // cronie: "%s -FCronDaemon -i -odi -oem -oi -t -f %s" (the user's own crontab; no alias
    // for alice: default_domain qualifies her).
    let r = sendmail(
        cfg,
        &["-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t", "-f", "alice"],
        b"From: \"(Cron Daemon)\" <alice>\nTo: alice\nSubject: Cron <alice@host> cronie-job\n\nout\n",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let d = wait_delivered(&sim, "cronie-job");
    assert_eq!(d.rcpt_to, ["alice@example.com"]);

    // PHP mail(): sendmail_path "/usr/sbin/sendmail -t -i"; Bcc stays a recipient and leaves
    // the header.
    let r = sendmail(
        cfg,
        &["-t", "-i"],
        b"To: Customer <customer@example.org>\nCc: sales@example.org\nBcc: audit@example.org,\n \
          archive@example.org\nSubject: php-mail-order\nFrom: shop@example.com\n\n.leading dot\n",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let d = wait_delivered(&sim, "php-mail-order");
    assert_eq!(
        sorted(d.rcpt_to.clone()),
        [
            "archive@example.org",
            "audit@example.org",
            "customer@example.org",
            "sales@example.org"
        ]
    );
    let header = d
        .text
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(
        !header.contains("Bcc") && !d.text.contains("audit@"),
        "{}",
        d.text
    );
    assert!(d.text.contains("\r\n.leading dot\r\n"), "{}", d.text);

    // unattended-upgrades 2.9: [SENDMAIL_BINARY, "-oi", "-t"], From: root.
    let r = sendmail(
        cfg,
        &["-oi", "-t"],
        b"From: root\nTo: root\nSubject: unattended-upgrades result for host: SUCCESS\n\
          Auto-Submitted: auto-generated\n\nPackages upgraded: x\n",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let d = wait_delivered(&sim, "unattended-upgrades result");
    assert_eq!(d.rcpt_to, ["admin@example.com"]);

    // mdadm 4.2: "/usr/sbin/sendmail -t", To root@<this host> (relay.test is smtp.hostname).
    let r = sendmail(
        cfg,
        &["-t"],
        b"From: mdadm monitoring <root@relay.test>\nTo: root@relay.test\n\
          Subject: Fail event on /dev/md0:relay.test\n\nA Fail event had been detected\n",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let d = wait_delivered(&sim, "Fail event on /dev/md0");
    assert_eq!(d.rcpt_to, ["admin@example.com"]);

    // An alias with two addresses, and recipients on the command line added to -t's.
    let r = sendmail(
        cfg,
        &["-t", "--", "extra@example.org"],
        b"To: ops\nSubject: list-alias\n\nx\n",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let d = wait_delivered(&sim, "list-alias");
    assert_eq!(
        sorted(d.rcpt_to),
        ["extra@example.org", "ops1@example.com", "ops2@example.com"]
    );
}

/// The binary run as `sendmail` (argv[0]), as mailx/s-nail and scripts run /usr/sbin/sendmail;
/// `newaliases` exits 0 (mailq: tests/sendmail_relay_down.rs, where mail waits).
#[test]
fn the_sendmail_name_mailx_and_newaliases() {
    require_tool("s-nail", &["-V"]);
    let work = tempfile::tempdir().unwrap();
    let (sim, relay) = start(work.path());
    let bin_dir = work.path().join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    let sendmail_link = link(&bin_dir, "sendmail");

    // `echo test | mail -s x root` with s-nail: its mta is the binary; s-nail runs it with
    // argv[0] "sendmail".
    let mut mailx = std::process::Command::new("s-nail");
    common::process::scrub_env(&mut mailx);
    mailx
        .args(["-:/", "-Snosave"])
        .arg(format!("-Smta={}", common::process::bin()))
        .args(["-s", "mailx-subject-x", "root"])
        .env("RELAY_CONFIG", &relay.config)
        .env("HOME", work.path());
    let r = with_stdin(mailx, b"test\n");
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    let d = wait_delivered(&sim, "mailx-subject-x");
    assert_eq!(d.rcpt_to, ["admin@example.com"]);
    assert!(d.text.contains("\r\n\r\ntest\r\n"), "{}", d.text);

    // A link named sendmail, without -i: a lone dot ends the message (Postfix's default).
    let r = with_stdin(
        as_link(&sendmail_link, &relay.config, &["root"], None),
        b"Subject: via-link\n\nkept\n.\nnot sent\n",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let d = wait_delivered(&sim, "via-link");
    assert!(
        d.text.contains("kept") && !d.text.contains("not sent"),
        "{}",
        d.text
    );

    let newaliases = link(&bin_dir, "newaliases");
    let r = with_stdin(as_link(&newaliases, &relay.config, &[], None), b"");
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// Symfony Mailer's default transport: `/usr/sbin/sendmail -bs`, SMTP on stdin/stdout,
/// answered by sendmail itself; each message handed to the relay before its `250`.
#[test]
fn symfony_bs_speaks_smtp_on_stdin() {
    let work = tempfile::tempdir().unwrap();
    let (sim, relay) = start(work.path());
    let mut bs = BsSession::start(&relay.config);
    bs.command("EHLO app.local", "250");
    bs.command("MAIL FROM:<app@example.com>", "250");
    bs.command("RCPT TO:<customer@example.org>", "250");
    bs.command("DATA", "354");
    let queued = bs.command(
        "Subject: symfony-bs\r\nFrom: app@example.com\r\n\r\n..stuffed by the client\r\n.",
        "250",
    );
    assert!(queued.contains("queued as"), "{queued}");
    assert_eq!(bs.quit(), Some(0));
    let d = wait_delivered(&sim, "symfony-bs");
    assert_eq!(d.rcpt_to, ["customer@example.org"]);
    assert!(
        d.text.contains("\r\n.stuffed by the client\r\n"),
        "{}",
        d.text
    );
}

/// `-bs` resolves names as the command line does, the relay running: a bare `RCPT TO:<root>`
/// reaches the alias of root, other bare names get default_domain, an alias with two addresses
/// gives both, and a bare sender is qualified.
#[test]
fn bs_resolves_bare_names_as_the_command_line() {
    let work = tempfile::tempdir().unwrap();
    let (sim, relay) = start(work.path());
    let mut bs = BsSession::start(&relay.config);
    bs.command("EHLO app.local", "250");
    bs.command("MAIL FROM:<www-data>", "250");
    for rcpt in ["<root>", "<www-data>", "<ops>", "<root@localhost>"] {
        bs.command(&format!("RCPT TO:{rcpt}"), "250");
    }
    bs.command("DATA", "354");
    bs.command(
        "Subject: bs-bare-names\r\n\r\nx\r\n.",
        "250 2.0.0 queued as",
    );
    // A second transaction in the same session.
    bs.command("MAIL FROM:<app>", "250");
    bs.command("RCPT TO:<root>", "250");
    bs.command("DATA", "354");
    bs.command("Subject: bs-second\r\n\r\ny\r\n.", "250 2.0.0 queued as");
    assert_eq!(bs.quit(), Some(0));
    let d = wait_delivered(&sim, "bs-bare-names");
    assert_eq!(
        sorted(d.rcpt_to),
        [
            "admin@example.com",
            "ops1@example.com",
            "ops2@example.com",
            "www-data@example.com"
        ]
    );
    let d = wait_delivered(&sim, "bs-second");
    assert_eq!(d.rcpt_to, ["admin@example.com"]);
}
