//! `smtp-oauth-relay setup --route NAME` against the simulator: a route added to a relay.toml
//! that setup wrote keeps its comments and the routes already there, loads with both, and its
//! own check passes (with the inherited app, and with a second secret that goes into its own
//! 0600 file); a duplicate name, a bad name and a missing file are refused with exit 2, nothing
//! written; the secret is never in relay.toml or the output. On a terminal the route asks its
//! senders and Enter keeps the top level's app.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use common::setup_cli::{Pty, Sim, run_in};
use smtp_oauth_relay::config;
use smtp_oauth_relay::sim::{
    ClientConfig, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_MAILBOX, DEFAULT_TENANT_ID,
    MailboxConfig, SecretConfig, SimConfig,
};

const BILLING: &str = "billing@contoso.example";
const SCANNERS: &str = "scanners@contoso.example";
/// A second secret Value of the simulator's app.
const SECOND_SECRET: &str = "sim~second~secret~value~987654321";

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

async fn run(dir: &Path, args: Vec<String>, stdin: Option<&str>) -> Output {
    let dir = dir.to_path_buf();
    let stdin = stdin.map(|s| format!("{s}\n").into_bytes());
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

/// A simulator with the default mailbox, two more, and a second secret for the app.
async fn sim() -> Sim {
    let mut c = SimConfig::default();
    for address in [BILLING, SCANNERS] {
        c.mailboxes.push(MailboxConfig {
            address: address.into(),
            ..MailboxConfig::default()
        });
    }
    c.clients[0].secrets.push(SecretConfig {
        value: SECOND_SECRET.into(),
        expired: false,
    });
    Sim::start_with(c).await
}

/// The first setup (the top level), as in tests/setup_flags.rs, with a comment of the user's.
async fn first_setup(sim: &Sim, dir: &Path) {
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
        "--no-check",
    ]);
    a.extend(sim.set_args());
    let out = run(dir, a, Some(DEFAULT_CLIENT_SECRET)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let path = dir.join("relay.toml");
    let written = std::fs::read_to_string(&path).expect("relay.toml");
    std::fs::write(&path, format!("# the user's own note\n{written}")).expect("write");
}

fn route_args(name: &str, mailbox: &str, senders: &str) -> Vec<String> {
    args(&[
        "setup",
        "--non-interactive",
        "--route",
        name,
        "--match-sender",
        senders,
        "--mail-account",
        mailbox,
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_is_added_to_the_file_setup_wrote_and_its_check_passes() {
    let sim = sim().await;
    let dir = tempfile::tempdir().expect("tempdir");
    first_setup(&sim, dir.path()).await;
    let path = dir.path().join("relay.toml");
    let before = std::fs::read_to_string(&path).expect("relay.toml");

    // The same app: the route inherits its credential; only its mailbox and matches are new.
    let mut a = route_args("billing", BILLING, "*@billing.example,erp@legacy.example");
    a.extend(args(&["--send-to", "alice@fabrikam.example"]));
    let out = run(dir.path(), a, None).await;
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    assert!(
        shown.contains(&format!("== route billing (mailbox {BILLING})")),
        "{shown}"
    );
    assert!(shown.contains("result: passed"), "{shown}");
    assert!(shown.contains("setup: done, check passed"), "{shown}");
    assert!(
        shown.contains(&format!("$Mailbox  = '{BILLING}'")),
        "the script is for the route's mailbox:\n{shown}"
    );
    assert!(shown.contains("Add-MailboxPermission -Identity $Mailbox"));
    assert!(!shown.contains(DEFAULT_CLIENT_SECRET), "{shown}");
    let delivered = sim.sim.messages().expect("mailbox");
    assert_eq!(delivered.len(), 1, "the route's test message");
    assert_eq!(
        delivered[0].envelope.mail_from.to_ascii_lowercase(),
        BILLING,
        "sent through the route's mailbox"
    );

    let after = std::fs::read_to_string(&path).expect("relay.toml");
    // Every line of the file before is still there (comments included), the route after it.
    for line in before.lines() {
        assert!(after.contains(line), "lost: {line}");
    }
    assert!(after.starts_with("# the user's own note\n"), "{after}");
    assert!(
        after.contains(
            "[[route]]\nname = \"billing\"\nmatch_sender = [\"*@billing.example\", \"erp@legacy.example\"]\n\n[route.upstream]\nmail_account = \"billing@contoso.example\"\n"
        ),
        "{after}"
    );
    let added = &after[after.find("[[route]]\nname = \"billing\"").expect("route")..];
    assert!(
        !added.contains("[route.oauth]"),
        "nothing differs:\n{added}"
    );

    // A second route with another secret of the app: its own 0600 file, named after it.
    let mut a = route_args("scanners", SCANNERS, "scanner1@contoso.example");
    a.push("--client-secret-stdin".into());
    let out = run(dir.path(), a, Some(SECOND_SECRET)).await;
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    assert!(shown.contains("== route scanners"), "{shown}");
    assert!(!shown.contains(SECOND_SECRET), "{shown}");
    let secret_file = dir.path().join("client_secret_scanners");
    assert_eq!(
        std::fs::read_to_string(&secret_file).expect("route secret"),
        SECOND_SECRET
    );
    assert_eq!(
        std::fs::metadata(&secret_file)
            .expect("stat")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let last = std::fs::read_to_string(&path).expect("relay.toml");
    assert!(!last.contains(SECOND_SECRET) && !last.contains(DEFAULT_CLIENT_SECRET));
    assert!(
        last.contains(&format!(
            "[route.oauth]\nclient_secret_file = \"{}\"",
            secret_file.display()
        )),
        "{last}"
    );
    // The first route is untouched.
    assert!(last.contains(added.trim_end()), "{last}");

    // The file loads with both routes and the default, each with its own mailbox and secret.
    let config = config::load(Some(&path)).expect("relay.toml loads");
    let routes = config.route_table();
    assert_eq!(routes.names(), ["billing", "scanners", "default"]);
    let scanners = routes.get("scanners").expect("scanners");
    assert_eq!(
        scanners
            .config
            .oauth
            .client_secret
            .as_ref()
            .map(|s| s.expose().to_string()),
        Some(SECOND_SECRET.to_string())
    );
    assert_eq!(
        scanners.config.oauth.client_id.as_deref(),
        Some(DEFAULT_CLIENT_ID),
        "the app is inherited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_bad_route_names_and_a_missing_file_are_refused() {
    let sim = sim().await;
    let dir = tempfile::tempdir().expect("tempdir");

    // No relay.toml yet: --route has nothing to add to.
    let out = run(
        dir.path(),
        route_args("billing", BILLING, "*@b.example"),
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("does not exist"), "{}", text(&out));
    assert!(!dir.path().join("relay.toml").exists());

    first_setup(&sim, dir.path()).await;
    let path = dir.path().join("relay.toml");
    let mut a = route_args("billing", BILLING, "*@b.example");
    a.push("--no-check".into());
    let out = run(dir.path(), a.clone(), None).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let written = std::fs::read_to_string(&path).expect("relay.toml");

    // The same name again: refused, the file unchanged.
    let mut again = route_args("billing", SCANNERS, "*@s.example");
    again.push("--no-check".into());
    let out = run(dir.path(), again.clone(), None).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--replace"), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&path).expect("relay.toml"), written);

    // --replace replaces it in place: one billing route, the new mailbox.
    again.push("--replace".into());
    let out = run(dir.path(), again, None).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let replaced = std::fs::read_to_string(&path).expect("relay.toml");
    assert_eq!(
        replaced.matches("[[route]]\nname = \"billing\"").count(),
        1,
        "{replaced}"
    );
    assert!(replaced.contains(SCANNERS) && !replaced.contains(BILLING));

    // Names the config refuses are refused by the same rule, before anything is asked.
    for (name, words) in [
        ("Billing Dept", "is not a route name"),
        ("default", "top-level [upstream] + [oauth]"),
        (
            "a-name-that-is-far-too-long-for-a-label",
            "is not a route name",
        ),
    ] {
        let out = run(dir.path(), route_args(name, BILLING, "*@b.example"), None).await;
        assert_eq!(out.status.code(), Some(2), "{name}: {}", text(&out));
        assert!(text(&out).contains(words), "{name}: {}", text(&out));
    }
    // A sender pattern that is neither an address nor *@domain.
    let out = run(dir.path(), route_args("other", BILLING, "nobody"), None).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("neither an address nor *@domain"));
    // Another app without its secret.
    let mut a = route_args("other", BILLING, "*@o.example");
    a.extend(args(&[
        "--client-id",
        "11111111-2222-3333-4444-555555555555",
    ]));
    let out = run(dir.path(), a, None).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("needs that app's own secret"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read_to_string(&path).expect("relay.toml"),
        replaced
    );

    // The systemd layout: the service reads secrets only through LoadCredential=, so a route
    // secret setup cannot hand it is refused, not written where the service cannot read it.
    let systemd = tempfile::tempdir().expect("tempdir");
    let mut a = args(&[
        "setup",
        "--non-interactive",
        "--systemd",
        "--tenant-id",
        DEFAULT_TENANT_ID,
        "--client-id",
        DEFAULT_CLIENT_ID,
        "--client-secret-stdin",
        "--mail-account",
        DEFAULT_MAILBOX,
        "--no-check",
    ]);
    a.extend(sim.set_args());
    let out = run(systemd.path(), a, Some(DEFAULT_CLIENT_SECRET)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let mut a = route_args("scanners", SCANNERS, "*@s.example");
    a.extend(args(&["--systemd", "--client-secret-stdin"]));
    let out = run(systemd.path(), a, Some(SECOND_SECRET)).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("LoadCredential="), "{}", text(&out));
    assert!(!systemd.path().join("client_secret_scanners").exists());
    // Without a new secret it inherits the top level's credential and is added.
    let mut a = route_args("scanners", SCANNERS, "*@s.example");
    a.push("--systemd".into());
    let out = run(systemd.path(), a, None).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("== route scanners"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_with_another_app_gets_its_own_client_id_and_secret_file() {
    const OTHER_CLIENT: &str = "7c1e2d3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f";
    const OTHER_SECRET: &str = "other~app~secret~value~0123456789";
    let mut c = SimConfig::default();
    c.mailboxes.push(MailboxConfig {
        address: BILLING.into(),
        ..MailboxConfig::default()
    });
    c.clients.push(ClientConfig {
        client_id: OTHER_CLIENT.into(),
        object_id: "2b3c4d5e-6f70-4812-9a3b-4c5d6e7f8091".into(),
        secrets: vec![SecretConfig {
            value: OTHER_SECRET.into(),
            expired: false,
        }],
        ..ClientConfig::default()
    });
    let sim = Sim::start_with(c).await;
    let dir = tempfile::tempdir().expect("tempdir");
    first_setup(&sim, dir.path()).await;

    let mut a = route_args("other-app", BILLING, "*@billing.example");
    a.extend(args(&[
        "--client-id",
        OTHER_CLIENT,
        "--client-secret-stdin",
        "--script-out",
        "other-app.ps1",
    ]));
    let out = run(dir.path(), a, Some(OTHER_SECRET)).await;
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    assert!(shown.contains("result: passed"), "{shown}");
    assert!(!shown.contains(OTHER_SECRET), "{shown}");

    let path = dir.path().join("relay.toml");
    let written = std::fs::read_to_string(&path).expect("relay.toml");
    assert!(!written.contains(OTHER_SECRET), "{written}");
    let secret_file = dir.path().join("client_secret_other-app");
    let route = &written[written.find("name = \"other-app\"").expect("route")..];
    assert!(
        route.contains(&format!(
            "[route.oauth]\nclient_id = \"{OTHER_CLIENT}\"\nclient_secret_file = \"{}\"\n",
            secret_file.display()
        )),
        "only the app and its secret differ:\n{route}"
    );
    assert!(
        !route.contains("tenant_id"),
        "the tenant is inherited:\n{route}"
    );
    let script = std::fs::read_to_string(dir.path().join("other-app.ps1")).expect("script");
    assert!(
        script.contains(&format!("$AppId    = '{OTHER_CLIENT}'")),
        "{script}"
    );
    assert!(script.contains("$ObjectId = '2b3c4d5e-6f70-4812-9a3b-4c5d6e7f8091'"));

    let config = config::load(Some(&path)).expect("relay.toml loads");
    let spec = config
        .route_table()
        .get("other-app")
        .cloned()
        .expect("route");
    assert_eq!(spec.config.oauth.client_id.as_deref(), Some(OTHER_CLIENT));
    assert_eq!(
        config
            .route_table()
            .get("default")
            .expect("default")
            .config
            .oauth
            .client_id
            .as_deref(),
        Some(DEFAULT_CLIENT_ID)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_terminal_a_route_asks_its_senders_and_keeps_the_top_level_app_on_enter() {
    let sim = sim().await;
    let dir = tempfile::tempdir().expect("tempdir");
    first_setup(&sim, dir.path()).await;
    let path = dir.path().to_path_buf();
    let (status, screen) = tokio::task::spawn_blocking(move || {
        let mut t = Pty::spawn(&path, &args(&["setup", "--route", "billing"]));
        t.wait_for("Senders for this route:", 1);
        t.type_line("nobody");
        t.wait_for("neither an address nor *@domain", 1);
        t.wait_for("Senders for this route:", 2);
        t.type_line("*@billing.example, erp@legacy.example");
        t.wait_for(&format!("Directory (tenant) ID [{DEFAULT_TENANT_ID}]:"), 1);
        t.type_line("");
        t.wait_for(
            &format!("Application (client) ID [{DEFAULT_CLIENT_ID}]:"),
            1,
        );
        t.type_line("");
        t.wait_for("of the top level (inherited))", 1);
        t.type_line("");
        t.wait_for("Mail Account:", 1);
        t.type_line(BILLING);
        t.wait_for(&format!("From [{BILLING}]:"), 1);
        t.type_line("");
        t.wait_for("Transport (smtp or graph) [smtp]:", 1);
        t.type_line("");
        t.wait_for("Send a test message to:", 1);
        t.type_line("");
        t.finish()
    })
    .await
    .expect("terminal session");
    assert_eq!(status.code(), Some(0), "{screen}");
    assert!(screen.contains("== route billing"), "{screen}");
    assert!(screen.contains("setup: done, check passed"), "{screen}");
    assert!(!screen.contains(DEFAULT_CLIENT_SECRET), "{screen}");
    let written = std::fs::read_to_string(dir.path().join("relay.toml")).expect("relay.toml");
    let route = &written[written
        .find("[[route]]\nname = \"billing\"")
        .expect("route")..];
    assert!(
        route.contains("match_sender = [\"*@billing.example\", \"erp@legacy.example\"]"),
        "{route}"
    );
    assert!(!route.contains("[route.oauth]"), "{route}");
}
