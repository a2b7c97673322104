//! `smtp-oauth-relay setup` at a terminal (a pseudo-terminal from libc::openpty): each wrong
//! answer from the setup guide's pitfalls is explained and asked again, the client secret is
//! typed without echo (neither the Secret ID tried first nor the Value ever appears on the
//! screen), and the finished setup passes check against the simulator.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::setup_cli::{Pty, Sim};
use smtp_oauth_relay::sim::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_MAILBOX, DEFAULT_TENANT_ID,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_session_explains_wrong_answers_and_never_echoes_the_secret() {
    let sim = Sim::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args: Vec<String> = vec!["setup".into()];
    // The endpoints are flags (what a real tenant derives from its cloud); the five values
    // and the test address are typed.
    args.extend(sim.set_args());
    let path = dir.path().to_path_buf();
    let secret_id = "3f2b1c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d";

    let (status, screen) = tokio::task::spawn_blocking(move || {
        let mut t = Pty::spawn(&path, &args);
        t.wait_for("Directory (tenant) ID:", 1);
        t.type_line("common");
        t.wait_for("not a tenant: app-only tokens need the tenant itself", 1);
        t.wait_for("Directory (tenant) ID:", 2);
        t.type_line(DEFAULT_TENANT_ID);

        t.wait_for("Application (client) ID:", 1);
        t.type_line("my-smtp-app");
        t.wait_for("is not a GUID", 1);
        t.wait_for("Application (client) ID:", 2);
        t.type_line(DEFAULT_CLIENT_ID);

        // The prompt appears only once echo is off.
        t.wait_for("Client secret Value (", 1);
        t.type_line(secret_id);
        t.wait_for("Value, not its Secret ID", 1);
        t.wait_for("Client secret Value (", 2);
        t.type_line(DEFAULT_CLIENT_SECRET);

        t.wait_for("Mail Account:", 1);
        t.type_line("relay");
        t.wait_for("is not an e-mail address", 1);
        t.wait_for("Mail Account:", 2);
        t.type_line(DEFAULT_MAILBOX);

        // From: Enter takes the mail account, shown as the default.
        t.wait_for(&format!("From [{DEFAULT_MAILBOX}]:"), 1);
        t.type_line("");
        // Transport: a wrong one is explained, Enter keeps smtp.
        t.wait_for("Transport (smtp or graph) [smtp]:", 1);
        t.type_line("mapi");
        t.wait_for("is not a transport", 1);
        t.wait_for("Transport (smtp or graph) [smtp]:", 2);
        t.type_line("");
        t.wait_for("Send a test message to:", 1);
        t.type_line("alice@fabrikam.example");
        t.finish()
    })
    .await
    .expect("terminal session");

    assert_eq!(status.code(), Some(0), "{screen}");
    // Typed answers are echoed (the terminal works as usual) ...
    assert!(screen.contains(DEFAULT_TENANT_ID), "{screen}");
    assert!(screen.contains("my-smtp-app"), "{screen}");
    // ... the secret attempts never are.
    assert!(
        !screen.contains(DEFAULT_CLIENT_SECRET),
        "secret echoed:\n{screen}"
    );
    assert!(!screen.contains(secret_id), "Secret ID echoed:\n{screen}");
    assert!(screen.contains("result: passed"), "{screen}");
    assert!(screen.contains("setup: done, check passed"), "{screen}");
    assert_eq!(
        sim.sim.messages().expect("mailbox").len(),
        1,
        "test message"
    );

    let written = std::fs::read_to_string(dir.path().join("relay.toml")).expect("relay.toml");
    assert!(!written.contains(DEFAULT_CLIENT_SECRET));
    assert!(written.contains(&format!("client_id = \"{DEFAULT_CLIENT_ID}\"")));
    let secret = dir.path().join("client_secret");
    assert_eq!(
        std::fs::read_to_string(&secret).unwrap(),
        DEFAULT_CLIENT_SECRET
    );
    assert_eq!(
        std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_d_stops_without_writing_anything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_path_buf();
    let (status, screen) = tokio::task::spawn_blocking(move || {
        let mut t = Pty::spawn(&path, &["setup".to_string()]);
        t.wait_for("Directory (tenant) ID:", 1);
        t.type_line(DEFAULT_TENANT_ID);
        t.wait_for("Application (client) ID:", 1);
        // Ctrl-D on an empty line: end of input.
        t.send_eof();
        t.finish()
    })
    .await
    .expect("terminal session");
    assert_eq!(status.code(), Some(2), "{screen}");
    assert!(screen.contains("nothing was written"), "{screen}");
    assert!(!dir.path().join("relay.toml").exists());
}
