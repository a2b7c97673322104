//! Nothing lost while the relay does not run: sendmail stores the message durably in the drop
//! directory and exits 0; the relay takes it in at start (delivered to the simulator
//! afterwards) and while running (a message dropped during its start-up). Dropped messages
//! meet the listener's rules: one the session refuses is kept in `rejected/`, never delivered.
//! An unprivileged caller (nobody) sends through a setgid drop directory and the listener;
//! `-bs` while stopped is stored in the drop directory too.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::process::{Relay, free_port};
use common::sendmail::{
    SENDMAIL_SECTION, as_link, config, drop_files, link, sendmail, wait_delivered, with_stdin,
};
use common::sim_process::SimProc;
use smtp_oauth_relay::spool::maildrop::DropDir;
use smtp_oauth_relay::spool::{BodyType, Envelope, MailParams, Recipient};

/// A config whose listener nobody answers (the relay is down), same spool and drop directory.
fn down_config(work: &Path, spool: &Path, section: &str) -> std::path::PathBuf {
    let path = work.join("down.toml");
    std::fs::write(&path, config(free_port(), spool, None, section)).unwrap();
    path
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn stored_while_stopped_then_delivered_after_start() {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let sim = SimProc::start(work.path(), "");
    let cfg = down_config(work.path(), &spool, SENDMAIL_SECTION);

    // Debian cron while the relay is stopped.
    let r = sendmail(
        &cfg,
        &["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "-v", "root"],
        b"Subject: Cron <root@host> while-stopped\n\nbackup done\n",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("stored as"), "{}", r.stderr);
    let drop_dir = spool.join("maildrop");
    assert_eq!(drop_files(&drop_dir).len(), 1);

    // mailq says it waits (the spool itself does not exist yet: the relay never ran).
    let bin_dir = work.path().join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    let r = with_stdin(as_link(&link(&bin_dir, "mailq"), &cfg, &[], None), b"");
    assert!(
        r.stdout.contains("1 message(s) in the drop directory"),
        "{r:?}"
    );

    let relay = Relay::builder()
        .work(work.path())
        .spool(&spool)
        .config(|s| config(s.smtp, &s.spool, Some(&sim), SENDMAIL_SECTION))
        .start();
    let d = wait_delivered(&sim, "while-stopped");
    assert_eq!(d.rcpt_to, ["admin@example.com"]);
    assert!(
        d.text.contains("CronDaemon <root@example.com>"),
        "{}",
        d.text
    );
    assert!(
        drop_files(&drop_dir).is_empty(),
        "the drop file goes once queued"
    );
    assert!(relay.log_text().contains("dropped message queued"));
}

/// A message dropped while the relay runs (as one sent during its start-up, before its
/// listener answered) is taken in by the periodic scan; `mailq` lists what waits.
#[test]
fn dropped_while_running_is_taken_in() {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    // No upstream: the message stays queued, where mailq shows it.
    let relay = Relay::builder()
        .work(work.path())
        .spool(&spool)
        .config(|s| config(s.smtp, &s.spool, None, SENDMAIL_SECTION))
        .start();
    let cfg = down_config(work.path(), &spool, SENDMAIL_SECTION);
    let r = sendmail(
        &cfg,
        &["-t"],
        b"To: www-data\nSubject: during-start-up\n\nx\n",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    wait_until("the drop file to be taken in", || {
        drop_files(&spool.join("maildrop")).is_empty() && relay.queued_files() == 1
    });
    let bin_dir = work.path().join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    let r = with_stdin(
        as_link(&link(&bin_dir, "mailq"), &relay.config, &[], None),
        b"",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("www-data@example.com"), "{}", r.stdout);
    assert!(r.stdout.contains("queued"), "{}", r.stdout);
}

/// The drop directory is input like SMTP input: what the listener refuses (here BODY=BINARYMIME,
/// 5xx at MAIL), an address carrying SMTP parameters and a file that is no message are kept in
/// rejected/ and never queued.
#[test]
fn refused_drop_files_are_kept_not_queued() {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let drop_dir = DropDir::new(&spool, None);
    std::fs::create_dir_all(drop_dir.path()).unwrap();
    let envelope = Envelope {
        mail_from: "root@example.com".into(),
        mail_params: MailParams {
            body: BodyType::BinaryMime,
            ..MailParams::default()
        },
        recipients: vec![Recipient::new("admin@example.com")],
        client: "test".into(),
        helo: "localhost".into(),
        auth_user: None,
        received_at: SystemTime::now(),
        route: "default".into(),
    };
    let refused = drop_dir
        .deposit(&envelope, b"Subject: binary\r\n\r\nx\r\n")
        .unwrap();
    let good = drop_dir
        .deposit(
            &Envelope {
                mail_params: MailParams::default(),
                ..envelope.clone()
            },
            b"Subject: fine\r\n\r\nx\r\n",
        )
        .unwrap();
    // Any local user writes drop files: an address may not smuggle SMTP parameters in.
    let smuggled = drop_dir
        .deposit(
            &Envelope {
                mail_params: MailParams::default(),
                recipients: vec![Recipient::new("admin@example.com> NOTIFY=NEVER")],
                ..envelope.clone()
            },
            b"Subject: smuggled\r\n\r\nx\r\n",
        )
        .unwrap();
    let garbage = drop_dir.path().join("01M8VW0000000000000000000Z.drop");
    std::fs::write(&garbage, b"\x00\x01 not a drop file\n\nbody").unwrap();

    let relay = Relay::builder()
        .work(work.path())
        .spool(&spool)
        .config(|s| config(s.smtp, &s.spool, None, ""))
        .start();
    wait_until("every drop file to be handled", || {
        drop_files(drop_dir.path()).is_empty()
    });
    let rejected = drop_files(&drop_dir.path().join("rejected"));
    let mut names: Vec<String> = rejected
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want = vec![
        format!("{refused}.drop"),
        format!("{smuggled}.drop"),
        "01M8VW0000000000000000000Z.drop".to_string(),
    ];
    want.sort();
    assert_eq!(names, want);
    assert_eq!(relay.queued_files(), 1, "only {good} is queued");
    let log = relay.log_text();
    assert!(log.contains("dropped message refused"), "{log}");
    assert!(
        log.contains("BINARYMIME") || log.contains("MAIL FROM: 5"),
        "{log}"
    );
}

/// An unprivileged caller (uid nobody, no groups) with the documented layout: a drop directory
/// root:<relay group> 2773, where its file gets the relay's group and mode 0640; and, with the
/// relay running, the listener. Needs root to change users (CI runs as root).
#[test]
fn unprivileged_caller_drops_and_hands_over() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test changes users: run it as root (CI does)");
    }
    const NOBODY: (u32, u32) = (65534, 65534);
    const RELAY_GID: u32 = 4242;
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let spool = work.path().join("spool");
    let drop_dir = work.path().join("maildrop");
    std::fs::create_dir(&drop_dir).unwrap();
    // SAFETY: a valid NUL-terminated path.
    let c = std::ffi::CString::new(drop_dir.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::chown(c.as_ptr(), 0, RELAY_GID) }, 0);
    std::fs::set_permissions(&drop_dir, std::fs::Permissions::from_mode(0o2773)).unwrap();
    let section = format!("{SENDMAIL_SECTION}drop_dir = \"{}\"\n", drop_dir.display());
    let down = down_config(work.path(), &spool, &section);
    std::fs::set_permissions(&down, std::fs::Permissions::from_mode(0o644)).unwrap();
    let bin_dir = work.path().join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    std::fs::set_permissions(&bin_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let link = link(&bin_dir, "sendmail");

    // A user crontab's mail (cronie) while the relay is down.
    let r = with_stdin(
        as_link(
            &link,
            &down,
            &[
                "-FCronDaemon",
                "-i",
                "-odi",
                "-oem",
                "-oi",
                "-t",
                "-f",
                "nobody",
            ],
            Some(NOBODY),
        ),
        b"To: root\nSubject: unprivileged-drop\n\nx\n",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let files = drop_files(&drop_dir);
    assert_eq!(files.len(), 1);
    let meta = std::fs::metadata(&files[0]).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (NOBODY.0, RELAY_GID));
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);

    let relay = Relay::builder()
        .work(work.path())
        .spool(&spool)
        .config(|s| config(s.smtp, &s.spool, None, &section))
        .start();
    wait_until("the unprivileged drop to be queued", || {
        drop_files(&drop_dir).is_empty() && relay.queued_files() == 1
    });
    std::fs::set_permissions(&relay.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    // www-data's PHP while the relay runs: through the listener.
    let r = with_stdin(
        as_link(&link, &relay.config, &["-t", "-i", "-v"], Some(NOBODY)),
        b"To: root\nSubject: unprivileged-listener\n\nx\n",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("queued as"), "{}", r.stderr);
    assert_eq!(relay.queued_files(), 2);
}

/// `-bs` (Symfony) with the relay stopped: sendmail answers, resolves the bare name and stores
/// the message in the drop directory before its `250`; the relay delivers it after its start.
#[test]
fn bs_while_stopped_is_dropped_then_delivered() {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let sim = SimProc::start(work.path(), "");
    let cfg = down_config(work.path(), &spool, SENDMAIL_SECTION);
    let mut bs = common::sendmail::BsSession::start(&cfg);
    bs.command("EHLO app.local", "250");
    bs.command("MAIL FROM:<www-data>", "250");
    bs.command("RCPT TO:<root>", "250");
    bs.command("DATA", "354");
    bs.command(
        "Subject: bs-while-stopped\r\n\r\nx\r\n.",
        "250 2.0.0 queued as ",
    );
    assert_eq!(bs.quit(), Some(0));
    let files = drop_files(&spool.join("maildrop"));
    assert_eq!(files.len(), 1);
    let h = smtp_oauth_relay::spool::format::decode(&std::fs::read(&files[0]).unwrap()).unwrap();
    assert_eq!(h.envelope.mail_from, "www-data@example.com");
    let _relay = Relay::builder()
        .work(work.path())
        .spool(&spool)
        .config(|s| config(s.smtp, &s.spool, Some(&sim), SENDMAIL_SECTION))
        .start();
    let d = wait_delivered(&sim, "bs-while-stopped");
    assert_eq!(d.rcpt_to, ["admin@example.com"]);
}
