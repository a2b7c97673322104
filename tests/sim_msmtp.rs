//! A real XOAUTH2 client nobody here wrote (Debian's msmtp, GnuTLS) sends through the simulator with a token the
//! test fetched over HTTP. msmtp must be installed (`.ci/run` installs it); a missing msmtp fails the test.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::sim::{TestSim, start, token};
use smtp_oauth_relay::sim::DEFAULT_MAILBOX;

fn msmtp_present() {
    let found = Command::new("msmtp")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        matches!(found, Ok(s) if s.success()),
        "msmtp is not installed: this test needs Debian's msmtp as a real XOAUTH2 client (apt-get install msmtp)"
    );
}

/// Runs msmtp off the async workers (it blocks) and returns its output.
async fn run_msmtp(sim: &TestSim, dir: &Path, token: &str, user: &str, body: &str) -> Output {
    let token_file = dir.join("token");
    std::fs::write(&token_file, token).expect("write token");
    // An empty config file keeps any system msmtprc out of the picture.
    let config = dir.join("msmtprc");
    std::fs::write(&config, "").expect("write config");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let args = vec![
        format!("--file={}", config.display()),
        "--host=127.0.0.1".to_string(),
        format!("--port={}", sim.smtp_addr().port()),
        "--tls=on".to_string(),
        "--tls-starttls=on".to_string(),
        format!("--tls-trust-file={}", sim.ca_file().display()),
        "--tls-host-override=smtp.office365.com".to_string(),
        "--auth=xoauth2".to_string(),
        format!("--user={user}"),
        format!("--passwordeval=cat {}", token_file.display()),
        format!("--from={DEFAULT_MAILBOX}"),
        "--timeout=20".to_string(),
        "rcpt@example.org".to_string(),
    ];
    let body = body.to_string();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new("msmtp")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn msmtp");
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(body.as_bytes())
                .expect("write message to msmtp");
        }
        child.wait_with_output().expect("msmtp output")
    })
    .await
    .expect("msmtp task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msmtp_sends_with_xoauth2() {
    msmtp_present();
    let sim = start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let tok = token(&sim).await;
    let body = format!(
        "Date: Sun, 29 Nov 2026 12:00:00 +0000\nMessage-ID: <t1@relay.test>\nFrom: Relay <{DEFAULT_MAILBOX}>\n\
         To: rcpt@example.org\nSubject: via msmtp\n\n.starts with a dot\nbye\n"
    );
    let out = run_msmtp(&sim, dir.path(), &tok, DEFAULT_MAILBOX, &body).await;
    assert!(
        out.status.success(),
        "msmtp failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let msgs = sim.messages().expect("list");
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.envelope.mail_from, DEFAULT_MAILBOX);
    assert_eq!(m.envelope.rcpt_to, ["rcpt@example.org"]);
    assert_eq!(m.envelope.auth_user, DEFAULT_MAILBOX);
    // msmtp converts LF to CRLF and dot-stuffs (Date/Message-ID are given so it adds none); the stored bytes are the unstuffed CRLF message.
    assert_eq!(m.text(), body.replace('\n', "\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msmtp_sees_535_for_a_bad_token() {
    msmtp_present();
    let sim = start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_msmtp(
        &sim,
        dir.path(),
        "not-a-token",
        DEFAULT_MAILBOX,
        "Subject: x\n\nx\n",
    )
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("535 5.7.3 Authentication unsuccessful"),
        "{stderr}"
    );
    assert!(sim.messages().expect("list").is_empty());
}
