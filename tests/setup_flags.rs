//! `smtp-oauth-relay setup` driven by flags, as a script would, against the simulator: from an
//! empty folder one command writes relay.toml and the 0600 secret file, check passes, `serve`
//! delivers; every wrong value of the setup guide's pitfalls is refused with its explanation
//! (exit 2, nothing written); the shipped annotated relay.toml keeps its comments when edited;
//! the secret appears in no output and never in relay.toml.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::setup_cli::{Sim, bin, run_in, scrub_env};
use smtp_oauth_relay::config::Config;
use smtp_oauth_relay::sim::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_MAILBOX, DEFAULT_TENANT_ID,
};

/// The Enterprise application Object ID of the simulator's app (the `oid` of its tokens).
const SIM_OBJECT_ID: &str = "5e2c7a91-0b3d-4f6e-8a1c-2d4b6f8e0a13";

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The flags of a complete non-interactive setup against `sim` (secret on stdin).
fn full_setup(sim: &Sim) -> Vec<String> {
    let mut a = args(&[
        "setup",
        "--non-interactive",
        "--tenant-id",
        DEFAULT_TENANT_ID,
        "--client-id",
        DEFAULT_CLIENT_ID,
        "--client-secret-stdin",
        "--mail-account",
        DEFAULT_MAILBOX,
    ]);
    a.extend(sim.set_args());
    a
}

async fn run(dir: &Path, args: Vec<String>, stdin: Option<Vec<u8>>) -> Output {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || run_in(&dir, &args, stdin.as_deref()))
        .await
        .expect("setup ran")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_an_empty_folder_one_command_gives_a_working_relay() {
    let sim = Sim::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut a = full_setup(&sim);
    a.extend(args(&[
        "--send-to",
        "alice@fabrikam.example",
        "--script-out",
        "m365-setup.ps1",
        "--set",
        &format!("smtp.listen=[\"127.0.0.1:{port}\"]"),
    ]));
    let out = run(
        dir.path(),
        a,
        Some(format!("{DEFAULT_CLIENT_SECRET}\n").into_bytes()),
    )
    .await;
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    assert!(shown.contains("result: passed"), "{shown}");
    assert!(shown.contains("setup: done, check passed"), "{shown}");
    assert!(
        !shown.contains(DEFAULT_CLIENT_SECRET),
        "secret in output:\n{shown}"
    );

    // relay.toml names the secret file; the file holds exactly the Value, mode 0600.
    let config = dir.path().join("relay.toml");
    let secret_file = dir.path().join("client_secret");
    let written = std::fs::read_to_string(&config).expect("relay.toml");
    assert!(!written.contains(DEFAULT_CLIENT_SECRET), "{written}");
    assert!(
        written.contains(&format!(
            "client_secret_file = \"{}\"",
            secret_file.display()
        )),
        "{written}"
    );
    assert_eq!(
        std::fs::read_to_string(&secret_file).expect("secret"),
        DEFAULT_CLIENT_SECRET
    );
    assert_eq!(mode(&secret_file), 0o600);

    // The script: values filled in, the Object ID read from the token, no secret.
    let script = std::fs::read_to_string(dir.path().join("m365-setup.ps1")).expect("script");
    for part in [
        &format!("$AppId    = '{DEFAULT_CLIENT_ID}'"),
        &format!("$ObjectId = '{SIM_OBJECT_ID}'"),
        "New-ServicePrincipal -AppId $AppId -ObjectId $ObjectId",
        "Add-MailboxPermission -Identity $Mailbox -User $Sp.Identity -AccessRights FullAccess",
        "Set-CASMailbox -Identity $Mailbox -SmtpClientAuthenticationDisabled $false",
        "New-ManagementRoleAssignment -App $ObjectId -Role 'Application SMTP.SendAsApp'",
        "Test-ServicePrincipalAuthorization",
        "00000002-0000-0ff1-ce00-000000000000",
    ] {
        assert!(script.contains(part), "script lacks {part:?}:\n{script}");
    }
    assert!(!script.contains(DEFAULT_CLIENT_SECRET));
    assert!(shown.contains(&script), "the script is printed too");
    assert_eq!(
        sim.sim.messages().expect("mailbox").len(),
        1,
        "setup's test message"
    );

    // check --send-to passes with the written config on its own.
    let out = run(
        dir.path(),
        args(&[
            "check",
            "--config",
            "relay.toml",
            "--send-to",
            "bob@fabrikam.example",
        ]),
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(sim.sim.messages().expect("mailbox").len(), 2);

    // And the relay it configured delivers what an application hands it.
    let mut serve = std::process::Command::new(bin());
    serve
        .current_dir(dir.path())
        .args(["serve", "--config", "relay.toml"]);
    scrub_env(&mut serve);
    serve
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = serve.spawn().expect("serve");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => break common::Client::new(s),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("serve never listened on {addr}: {e}"),
        }
    };
    client
        .begin_message("erp@legacy.example", &["carol@fabrikam.example"])
        .await;
    client
        .send(b"Subject: from the configured relay\r\n\r\nhello\r\n.\r\n")
        .await;
    client.expect("250 ").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let delivered = loop {
        let found = sim
            .sim
            .messages()
            .expect("mailbox")
            .into_iter()
            .any(|m| m.text().contains("Subject: from the configured relay"));
        if found || Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(delivered, "serve with the written config did not deliver");
}

/// One refused flag: exit 2, the explanation and fix on stderr, nothing written, no secret shown.
async fn assert_refused(sim: &Sim, replace: (&str, &str), stdin_secret: &str, words: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = full_setup(sim);
    match a.iter().position(|x| x == replace.0) {
        Some(i) if replace.0 != "--client-secret-stdin" => a[i + 1] = replace.1.to_string(),
        Some(_) => {}
        None => a.extend([replace.0.to_string(), replace.1.to_string()]),
    }
    let out = run(dir.path(), a, Some(stdin_secret.as_bytes().to_vec())).await;
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(2), "{replace:?}:\n{shown}");
    for w in words {
        assert!(shown.contains(w), "{replace:?}: no {w:?} in:\n{shown}");
    }
    assert!(shown.contains("fix:"), "{shown}");
    assert!(
        !shown.contains(stdin_secret.trim()) || stdin_secret.trim().is_empty(),
        "{shown}"
    );
    assert!(
        !dir.path().join("relay.toml").exists(),
        "{replace:?} wrote relay.toml"
    );
    assert!(!dir.path().join("client_secret").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_wrong_value_from_the_guide_is_refused_with_its_explanation() {
    let sim = Sim::start().await;
    let good = DEFAULT_CLIENT_SECRET;
    // `common` as tenant: app-only tokens need the tenant itself.
    assert_refused(
        &sim,
        ("--tenant-id", "common"),
        good,
        &["not a tenant", "Directory (tenant) ID"],
    )
    .await;
    assert_refused(
        &sim,
        ("--tenant-id", "Contoso Ltd"),
        good,
        &["neither a GUID nor a domain"],
    )
    .await;
    // An app name (or anything but the Application (client) ID GUID).
    assert_refused(
        &sim,
        ("--client-id", "smtp-relay-app"),
        good,
        &["not a GUID", "Application (client) ID"],
    )
    .await;
    // The Secret ID pasted instead of the Value (the guide's most common mistake).
    assert_refused(
        &sim,
        ("--client-secret-stdin", ""),
        "3f2b1c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d\n",
        &["looks like a Secret ID", "Value, not its Secret ID"],
    )
    .await;
    assert_refused(
        &sim,
        ("--mail-account", "no-reply"),
        good,
        &["is not an e-mail address", "mailbox the relay signs in as"],
    )
    .await;
    assert_refused(
        &sim,
        ("--from", "No Reply <no-reply@contoso.com>"),
        good,
        &["is not an e-mail address"],
    )
    .await;
    // The Application (client) ID given as the Enterprise application's Object ID.
    assert_refused(
        &sim,
        ("--object-id", DEFAULT_CLIENT_ID),
        good,
        &[
            "Enterprise applications",
            "not the Enterprise application's Object ID",
        ],
    )
    .await;
    assert_refused(
        &sim,
        ("--send-to", "alice"),
        good,
        &["is not an e-mail address"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_go_into_relay_toml_and_missing_values_are_named() {
    let sim = Sim::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = full_setup(&sim);
    a.extend(args(&["--set", "oauth.client_secret=s3cr3t-inline"]));
    let out = run(
        dir.path(),
        a,
        Some(DEFAULT_CLIENT_SECRET.as_bytes().to_vec()),
    )
    .await;
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(2), "{shown}");
    assert!(
        shown.contains("secrets are never written into relay.toml"),
        "{shown}"
    );
    assert!(!dir.path().join("relay.toml").exists());

    let out = run(
        dir.path(),
        args(&[
            "setup",
            "--non-interactive",
            "--tenant-id",
            DEFAULT_TENANT_ID,
        ]),
        None,
    )
    .await;
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(2), "{shown}");
    assert!(shown.contains("--client-id is required"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_value_fails_check_with_the_fix_and_what_to_do_next() {
    let sim = Sim::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong = "Wr0ng~secret~value~that~entra~rejects";
    let out = run(
        dir.path(),
        full_setup(&sim),
        Some(wrong.as_bytes().to_vec()),
    )
    .await;
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(shown.contains("AADSTS7000215"), "{shown}");
    assert!(shown.contains("setup: check FAILED at token"), "{shown}");
    assert!(
        shown.contains(
            "Then run setup again, or run check after fixing: smtp-oauth-relay check --config"
        ),
        "{shown}"
    );
    assert!(!shown.contains(wrong), "{shown}");
    // No token, so no Object ID for the script: a placeholder and where to find it.
    assert!(
        shown.contains("$ObjectId = '<ENTERPRISE-APP-OBJECT-ID>'"),
        "{shown}"
    );
    assert!(shown.contains("Enterprise applications > your app > Overview > Object ID"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_registrations_object_id_is_caught_by_the_token() {
    let sim = Sim::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let app_registration_object = "11111111-2222-4333-8444-555555555555";
    let mut a = full_setup(&sim);
    a.extend(args(&["--object-id", app_registration_object]));
    let out = run(
        dir.path(),
        a,
        Some(DEFAULT_CLIENT_SECRET.as_bytes().to_vec()),
    )
    .await;
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    assert!(
        shown.contains(&format!(
            "WARNING: --object-id {app_registration_object} is not the app's service principal"
        )),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("$ObjectId = '{SIM_OBJECT_ID}'")),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_the_shipped_relay_toml_keeps_every_comment() {
    let sim = Sim::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // The shipped annotated file, with a value the admin changed and noted on its line.
    let shipped = include_str!("../relay.toml");
    let user = shipped.replace(
        "max_errors = 10\n",
        "max_errors = 20 # raised for the old scanner\n",
    );
    assert_ne!(user, shipped);
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, &user).expect("write");

    let mut a = full_setup(&sim);
    a.extend(args(&[
        "--config-out",
        "relay.toml",
        "--from",
        "alerts@contoso.example",
        "--no-check",
    ]));
    let out = run(
        dir.path(),
        a,
        Some(DEFAULT_CLIENT_SECRET.as_bytes().to_vec()),
    )
    .await;
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    assert!(
        shown.contains("edited in place; comments and layout kept"),
        "{shown}"
    );
    let edited = std::fs::read_to_string(&config).expect("read");
    for line in user.lines().filter(|l| l.trim_start().starts_with('#')) {
        assert!(edited.contains(line), "comment lost: {line}\n{edited}");
    }
    assert!(edited.contains("max_errors = 20 # raised for the old scanner"));
    // The values sit below their documented examples.
    assert!(
        edited.contains(
            "# mail_account = \"relay@contoso.com\"\nmail_account = \"relay@contoso.example\""
        ),
        "{edited}"
    );
    assert!(edited.contains("# from = \"noreply@contoso.com\"\nfrom = \"alerts@contoso.example\""));
    assert!(edited.contains(&format!("tenant_id = \"{DEFAULT_TENANT_ID}\"")));
    // From differs from the mail account: the script grants SendAs on it.
    assert!(shown.contains("Add-RecipientPermission -Identity 'alerts@contoso.example' -Trustee $Sp.Identity -AccessRights SendAs"));

    // Running setup again with a new secret rotates it in the same file; keys are not doubled.
    let secret_file = dir.path().join("client_secret");
    let mut again = args(&[
        "setup",
        "--non-interactive",
        "--client-secret-stdin",
        "--no-check",
    ]);
    again.extend(sim.set_args());
    let out = run(
        dir.path(),
        again,
        Some(b"N3w~rotated~secret~value".to_vec()),
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let twice = std::fs::read_to_string(&config).expect("read");
    assert_eq!(twice.matches("\ntenant_id = ").count(), 1, "{twice}");
    assert_eq!(
        twice.matches("\nclient_secret_file = ").count(),
        1,
        "{twice}"
    );
    assert_eq!(
        std::fs::read_to_string(&secret_file).unwrap(),
        "N3w~rotated~secret~value"
    );
    assert_eq!(mode(&secret_file), 0o600);
    Config::from_toml_str(&twice).expect("the edited file is a valid configuration");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_secret_is_moved_out_of_relay_toml() {
    let sim = Sim::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "# my relay\n[upstream]\nmail_account = \"{DEFAULT_MAILBOX}\"\n\n[oauth]\n\
             tenant_id = \"{DEFAULT_TENANT_ID}\"\nclient_id = \"{DEFAULT_CLIENT_ID}\"\n\
             client_secret = \"{DEFAULT_CLIENT_SECRET}\"\n"
        ),
    )
    .unwrap();
    let mut a = args(&["setup", "--non-interactive"]);
    a.extend(sim.set_args());
    let out = run(dir.path(), a, None).await;
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    assert!(!shown.contains(DEFAULT_CLIENT_SECRET), "{shown}");
    let edited = std::fs::read_to_string(&config).unwrap();
    assert!(!edited.contains(DEFAULT_CLIENT_SECRET), "{edited}");
    assert!(edited.starts_with("# my relay\n"), "{edited}");
    let secret_file = dir.path().join("client_secret");
    assert_eq!(
        std::fs::read_to_string(&secret_file).unwrap(),
        DEFAULT_CLIENT_SECRET
    );
    assert_eq!(mode(&secret_file), 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_layout_puts_the_secret_where_the_unit_loads_it() {
    let sim = Sim::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let etc: PathBuf = dir.path().join("etc-smtp-oauth-relay");
    std::fs::create_dir(&etc).unwrap();
    let mut a = full_setup(&sim);
    a.extend(args(&[
        "--systemd",
        "--config-out",
        "etc-smtp-oauth-relay/relay.toml",
    ]));
    let out = run(
        dir.path(),
        a,
        Some(DEFAULT_CLIENT_SECRET.as_bytes().to_vec()),
    )
    .await;
    let shown = text(&out);
    // check ran as the service will: the secret from $CREDENTIALS_DIRECTORY/client_secret.
    assert_eq!(out.status.code(), Some(0), "{shown}");
    assert!(shown.contains("LoadCredential=client_secret:"), "{shown}");
    assert!(
        shown.contains("$CREDENTIALS_DIRECTORY/client_secret"),
        "{shown}"
    );
    assert!(
        shown.contains("sudo systemctl restart smtp-oauth-relay"),
        "{shown}"
    );
    let written = std::fs::read_to_string(etc.join("relay.toml")).unwrap();
    assert!(
        !written.contains("\nclient_secret"),
        "relay.toml names no secret:\n{written}"
    );
    assert_eq!(mode(&etc.join("client_secret")), 0o600);
    assert!(!shown.contains(DEFAULT_CLIENT_SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_graph_writes_graph_and_its_check_and_script_pass() {
    let sim = Sim::start_with(smtp_oauth_relay::sim::SimConfig::graph()).await;
    // The mailbox may send as the From (what the script's Add-RecipientPermission grants).
    sim.sim
        .control()
        .set_send_as(DEFAULT_MAILBOX, vec!["alerts@contoso.example".into()]);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = full_setup(&sim);
    a.extend(args(&[
        "--transport",
        "graph",
        "--from",
        "alerts@contoso.example",
        "--send-to",
        "alice@fabrikam.example",
        "--script-out",
        "m365-setup.ps1",
        "--set",
        &format!("upstream.graph_url={}", sim.sim.graph_url()),
    ]));
    let out = run(
        dir.path(),
        a,
        Some(format!("{DEFAULT_CLIENT_SECRET}\n").into_bytes()),
    )
    .await;
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    // check walked Graph, not SMTP.
    assert!(shown.contains("Graph over HTTPS"), "{shown}");
    assert!(!shown.contains("XOAUTH2"), "{shown}");
    assert!(shown.contains("setup: done, check passed"), "{shown}");
    assert!(!shown.contains(DEFAULT_CLIENT_SECRET), "{shown}");
    assert_eq!(sim.sim.messages().expect("mailbox").len(), 1);

    let written = std::fs::read_to_string(dir.path().join("relay.toml")).expect("relay.toml");
    assert!(written.contains("transport = \"graph\""), "{written}");
    let config = smtp_oauth_relay::config::load(Some(&dir.path().join("relay.toml")))
        .expect("the written relay.toml loads");
    assert_eq!(
        config.upstream.transport,
        smtp_oauth_relay::config::TransportKind::Graph
    );
    assert_eq!(
        config.upstream.from.as_deref(),
        Some("alerts@contoso.example")
    );

    let script = std::fs::read_to_string(dir.path().join("m365-setup.ps1")).expect("script");
    for part in [
        "# $Api = '00000003-0000-0000-c000-000000000000'",
        "appRoles[?value=='Mail.Send'].id",
        "New-ManagementRoleAssignment -App $ObjectId -Role 'Application Mail.Send'",
        "New-ManagementScope",
        "Test-ServicePrincipalAuthorization",
        "Add-RecipientPermission -Identity 'alerts@contoso.example' -Trustee $Mailbox",
        &format!("$ObjectId = '{SIM_OBJECT_ID}'"),
    ] {
        assert!(script.contains(part), "script lacks {part:?}:\n{script}");
    }
    for absent in [
        "Set-CASMailbox -Identity",
        "Add-MailboxPermission",
        "SMTP.SendAsApp'",
    ] {
        assert!(!script.contains(absent), "{absent} in:\n{script}");
    }

    // A transport that does not exist is refused before anything is written.
    let other = tempfile::tempdir().expect("tempdir");
    let mut a = full_setup(&sim);
    a.extend(args(&["--transport", "mapi"]));
    let out = run(
        other.path(),
        a,
        Some(format!("{DEFAULT_CLIENT_SECRET}\n").into_bytes()),
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("is not a transport"), "{}", text(&out));
    assert!(!other.path().join("relay.toml").exists());
}
