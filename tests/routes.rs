//! Routes: several mailboxes and tenants in one relay (DESIGN.md "Routes"). Each simulator
//! process is one tenant with its own app and mailboxes; the relay process chooses a route at
//! MAIL FROM, stores it with the message and delivers each route with its own credentials.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::process::{Relay, run_cli};
use common::sendmail::{Delivered, delivered, wait_delivered};
use common::sim_process::SimProc;
use common::smtp::blocking::Client;

/// A second tenant: its own directory id, app, secret and mailbox.
const FABRIKAM: &str = r#"
tenant_id = "72f988bf-86f1-41af-91ab-2d7cd011db47"
tenant_domains = ["fabrikam.onmicrosoft.com"]

[[clients]]
client_id = "3c9e1f20-5b7d-4a86-9e21-6f0d4b8a2c57"
display_name = "relay-fabrikam"
object_id = "8d1b3e5f-7a9c-4e2d-b6f8-0a2c4e6a8b91"
roles = ["SMTP.SendAsApp"]
exchange_service_principal = true
secrets = [{ value = "fabrikam~sim~secret~value~9876543210", expired = false }]

[[mailboxes]]
address = "relay@fabrikam.example"
full_access = true
"#;

/// The first tenant with one mailbox per device (a template route sends as each).
const CONTOSO_DEVICES: &str = r#"
[[mailboxes]]
address = "relay@contoso.example"
full_access = true

[[mailboxes]]
address = "scanner1@contoso.example"
full_access = true

[[mailboxes]]
address = "scanner2@contoso.example"
full_access = true
"#;

fn sim(work: &Path, name: &str, smtp: &str, tenant: &str) -> SimProc {
    let dir = work.join(name);
    std::fs::create_dir_all(&dir).expect("sim dir");
    std::fs::write(dir.join("extra.toml"), tenant).expect("extra");
    SimProc::start_with(&dir, smtp, &dir.join("extra.toml"))
}

/// A simulator's `[upstream]`/`[oauth]` fragment as a route's tables.
fn as_route(fragment: &str) -> String {
    fragment
        .replace("[upstream]", "[route.upstream]")
        .replace("[oauth]", "[route.oauth]")
}

/// The top level pointed at `default` (its mailbox the default route unless `default_mailbox`
/// is false), then `routes`.
fn relay_config(
    s: &common::process::Setup,
    default: &SimProc,
    default_mailbox: bool,
    routes: &str,
) -> String {
    let (smtp, admin, spool) = (s.smtp, s.admin, &s.spool);
    let mut top = common::process::with_upstream(&default.fragment, "rate = \"1000/s\"");
    if !default_mailbox {
        top = top
            .lines()
            .filter(|l| !l.starts_with("mail_account") && !l.starts_with("from "))
            .collect::<Vec<_>>()
            .join("\n");
    }
    format!(
        "[smtp]\nlisten = [\"127.0.0.1:{smtp}\"]\nhostname = \"relay.test\"\n\n\
         [queue]\ndir = \"{}\"\nretry_min = \"200ms\"\nretry_max = \"1s\"\nmin_free_space = 1\n\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[log]\nlevel = \"info\"\n\n{top}\n\n{routes}\n",
        spool.display()
    )
}

/// A relay process in `work` with [`relay_config`].
fn start(work: &Path, default: &SimProc, default_mailbox: bool, routes: &str) -> Relay {
    Relay::builder()
        .work(work)
        .config(|s| relay_config(s, default, default_mailbox, routes))
        .start()
}

fn fabrikam_route(sim: &SimProc) -> String {
    format!(
        "[[route]]\nname = \"fabrikam\"\nmatch_sender = [\"*@fabrikam.example\"]\n{}",
        as_route(&sim.fragment)
    )
}

fn send(relay: &Relay, from: &str, subject: &str) -> String {
    let mut c = Client::connect(relay.addr()).expect("connect");
    let r = c
        .send(
            from,
            "someone@example.org",
            format!(
                "From: {from}\r\nTo: someone@example.org\r\nSubject: {subject}\r\n\r\nbody\r\n"
            )
            .as_bytes(),
        )
        .expect("send");
    r.text()
}

/// The mailbox that delivered the message with `marker` (waits for it, bounded).
fn sent_as(sim: &SimProc, marker: &str) -> String {
    wait_delivered(sim, marker).auth_user
}

fn queue_list(relay: &Relay) -> String {
    let out = run_cli(&relay.config, &["queue", "list"], &[]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits (bounded) until `queue list` shows `needle`.
fn wait_listed(relay: &Relay, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = queue_list(relay);
        if list.contains(needle) {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in:\n{list}\n{}",
            relay.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `GET path` on the admin endpoint: the body.
fn admin_get(relay: &Relay, path: &str) -> String {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", relay.admin_port)).expect("admin");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("get");
    let mut text = String::new();
    tcp.read_to_string(&mut text).expect("read");
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(text)
}

fn subjects(d: &[Delivered]) -> Vec<String> {
    d.iter()
        .filter_map(|m| {
            m.text
                .lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
        })
        .collect()
}

#[test]
fn two_tenants_each_get_their_own_mail_with_their_own_app() {
    let work = tempfile::tempdir().unwrap();
    let contoso = sim(work.path(), "contoso", "", "");
    let fabrikam = sim(work.path(), "fabrikam", "", FABRIKAM);
    let relay = start(work.path(), &contoso, true, &fabrikam_route(&fabrikam));

    assert!(send(&relay, "app@contoso.example", "to-contoso").starts_with("250"));
    assert!(send(&relay, "Billing@Fabrikam.example", "to-fabrikam").starts_with("250"));

    let c = wait_delivered(&contoso, "to-contoso");
    assert_eq!(c.auth_user, "relay@contoso.example");
    let f = wait_delivered(&fabrikam, "to-fabrikam");
    assert_eq!(f.auth_user, "relay@fabrikam.example");
    // Neither tenant saw the other's mail.
    assert_eq!(subjects(&delivered(&contoso)), ["to-contoso"]);
    assert_eq!(subjects(&delivered(&fabrikam)), ["to-fabrikam"]);
    assert!(
        relay.log_text().contains("route=fabrikam"),
        "{}",
        relay.log_text()
    );
}

#[test]
fn a_held_route_does_not_stop_the_other() {
    let work = tempfile::tempdir().unwrap();
    let contoso = sim(work.path(), "contoso", "", "");
    // Fabrikam's tenant has SMTP AUTH off: 535 5.7.139 holds that route only.
    let fabrikam = sim(
        work.path(),
        "fabrikam",
        "smtp_auth_disabled = true",
        FABRIKAM,
    );
    let relay = start(work.path(), &contoso, true, &fabrikam_route(&fabrikam));

    assert!(send(&relay, "billing@fabrikam.example", "stuck").starts_with("250"));
    let list = wait_listed(&relay, "DELIVERY HELD");
    assert!(list.contains("(route fabrikam)"), "{list}");
    assert!(list.contains("535 5.7.139"), "{list}");
    assert!(list.contains("\tqueued\tfabrikam\t"), "{list}");
    // The default route keeps delivering while fabrikam is held.
    for i in 0..3 {
        assert!(send(&relay, "app@contoso.example", &format!("free-{i}")).starts_with("250"));
    }
    for i in 0..3 {
        wait_delivered(&contoso, &format!("free-{i}"));
    }
    assert!(delivered(&fabrikam).is_empty());
    assert!(!subjects(&delivered(&contoso)).contains(&"stuck".to_string()));

    // /healthz lists each mailbox with its route and state; /metrics labels them.
    let health: serde_json::Value =
        serde_json::from_str(&admin_get(&relay, "/healthz")).expect("healthz json");
    let lanes = health["mailboxes"].as_array().expect("mailboxes");
    let lane = |route: &str| {
        lanes
            .iter()
            .find(|l| l["route"] == route)
            .unwrap_or_else(|| panic!("no {route} in {health:#}"))
    };
    assert_eq!(lane("fabrikam")["state"], "held", "{health:#}");
    assert_eq!(lane("fabrikam")["mailbox"], "relay@fabrikam.example");
    assert!(
        lane("fabrikam")["fix"]
            .as_str()
            .is_some_and(|f| f.contains("SMTP")),
        "{health:#}"
    );
    assert_eq!(lane("default")["state"], "running", "{health:#}");
    assert_eq!(lane("default")["delivered"], 3, "{health:#}");
    let metrics = admin_get(&relay, "/metrics");
    assert!(
        metrics.contains(
            "relay_mailbox_held{route=\"fabrikam\",mailbox=\"relay@fabrikam.example\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "relay_mailbox_delivered_total{route=\"default\",mailbox=\"relay@contoso.example\"} 3"
        ),
        "{metrics}"
    );
}

#[test]
fn a_template_route_sends_each_device_as_its_own_mailbox() {
    let work = tempfile::tempdir().unwrap();
    let contoso = sim(work.path(), "contoso", "", CONTOSO_DEVICES);
    let routes = "[[route]]\nname = \"scanners\"\nmatch_sender = [\"scanner1@contoso.example\", \
                  \"scanner2@contoso.example\"]\n[route.upstream]\nmail_account = \"{sender}\"\n";
    let relay = start(work.path(), &contoso, true, routes);

    assert!(send(&relay, "Scanner1@contoso.example", "scan-1").starts_with("250"));
    assert!(send(&relay, "scanner2@contoso.example", "scan-2").starts_with("250"));
    assert!(send(&relay, "app@contoso.example", "app").starts_with("250"));
    assert_eq!(sent_as(&contoso, "scan-1"), "scanner1@contoso.example");
    assert_eq!(sent_as(&contoso, "scan-2"), "scanner2@contoso.example");
    // A sender the template does not allow takes the default route's mailbox.
    assert_eq!(sent_as(&contoso, "app"), "relay@contoso.example");
}

#[test]
fn no_matching_route_and_no_default_is_refused_at_mail_from() {
    let work = tempfile::tempdir().unwrap();
    let contoso = sim(work.path(), "contoso", "", "");
    let routes = "[[route]]\nname = \"alerts\"\nmatch_sender = [\"alerts@contoso.example\"]\n\
                  [route.upstream]\nmail_account = \"relay@contoso.example\"\n";
    let relay = start(work.path(), &contoso, false, routes);

    let refused = send(&relay, "other@elsewhere.example", "nope");
    assert!(refused.starts_with("550 5.7.1"), "{refused}");
    assert!(
        refused.contains("no route") && refused.contains("other@elsewhere.example"),
        "{refused}"
    );
    assert!(send(&relay, "alerts@contoso.example", "alert").starts_with("250"));
    assert_eq!(sent_as(&contoso, "alert"), "relay@contoso.example");
    assert!(queue_list(&relay).contains("queue is empty"));
}

#[test]
fn reload_removing_a_route_holds_its_mail_and_adding_it_back_delivers() {
    let work = tempfile::tempdir().unwrap();
    let contoso = sim(work.path(), "contoso", "", "");
    let broken = sim(
        work.path(),
        "fabrikam-off",
        "smtp_auth_disabled = true",
        FABRIKAM,
    );
    let fixed = sim(work.path(), "fabrikam-on", "", FABRIKAM);
    let relay = start(work.path(), &contoso, true, &fabrikam_route(&broken));
    let config_at = |routes: &str| {
        let text = std::fs::read_to_string(&relay.config).expect("config");
        let top = text
            .split("[[route]]")
            .next()
            .unwrap_or_default()
            .to_string();
        std::fs::write(&relay.config, format!("{top}{routes}")).expect("write config");
    };

    assert!(send(&relay, "billing@fabrikam.example", "queued-across-reloads").starts_with("250"));
    wait_listed(&relay, "535 5.7.139");

    // The route goes away: its message is held, never sent with the default route's app.
    config_at("");
    relay.signal(libc::SIGHUP);
    let list = wait_listed(&relay, "not in relay.toml");
    assert!(list.contains("\tqueued\tfabrikam\t"), "{list}");
    assert!(send(&relay, "app@contoso.example", "after-removal").starts_with("250"));
    wait_delivered(&contoso, "after-removal");
    // Several probe intervals of the default route pass; the held message stays put.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(subjects(&delivered(&contoso)), ["after-removal"]);
    // A sender of the removed route now takes the default route (no route matches it).
    // Back, pointing at a tenant that works: the queued message is delivered there.
    config_at(&fabrikam_route(&fixed));
    relay.signal(libc::SIGHUP);
    let d = wait_delivered(&fixed, "queued-across-reloads");
    assert_eq!(d.auth_user, "relay@fabrikam.example");
    assert!(delivered(&broken).is_empty());
}

#[test]
fn invalid_routes_are_refused_by_the_binary_naming_the_key() {
    let work = tempfile::tempdir().unwrap();
    let base = "[oauth]\ntenant_id = \"contoso.onmicrosoft.com\"\nclient_id = \
                \"11111111-2222-3333-4444-555555555555\"\nclient_secret = \
                \"abc~defghijklmnopqrstuvwxyz0123456789ABC\"\n";
    let cases = [
        (
            "[[route]]\nname = \"a\"\n[route.upstream]\nmail_account = \"a@b.example\"\n\
             [[route]]\nname = \"a\"\n[route.upstream]\nmail_account = \"c@b.example\"\n",
            "route.a.name",
        ),
        (
            "[[route]]\nname = \"a\"\ncolour = \"red\"\n[route.upstream]\nmail_account = \"a@b.example\"\n",
            "route",
        ),
        (
            "[[route]]\nname = \"a\"\n[route.upstream]\nmail_account = \"a@b.example\"\nportt = 25\n",
            "route.a.upstream",
        ),
        (
            "[[route]]\nname = \"t\"\n[route.upstream]\nmail_account = \"{sender}\"\n",
            "route.t.upstream.mail_account",
        ),
    ];
    for (routes, key) in cases {
        let path = work.path().join("relay.toml");
        std::fs::write(&path, format!("{base}{routes}")).unwrap();
        let out = run_cli(&path, &["config"], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{routes}: {stderr}");
        assert!(stderr.contains(key), "{key} not named: {stderr}");
        assert!(!stderr.contains("abc~defghijklmnop"), "secret in: {stderr}");
    }
}

#[test]
fn check_walks_every_route_or_the_one_named() {
    let work = tempfile::tempdir().unwrap();
    let contoso = sim(work.path(), "contoso", "", "");
    let fabrikam = sim(
        work.path(),
        "fabrikam",
        "smtp_auth_disabled = true",
        FABRIKAM,
    );
    let path = work.path().join("relay.toml");
    let setup = common::process::Setup {
        smtp: common::process::free_port(),
        admin: common::process::free_port(),
        work: work.path().to_path_buf(),
        spool: work.path().join("spool"),
    };
    std::fs::write(
        &path,
        relay_config(&setup, &contoso, true, &fabrikam_route(&fabrikam)),
    )
    .unwrap();

    let out = run_cli(&path, &["check"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("== route fabrikam (mailbox relay@fabrikam.example)"),
        "{text}"
    );
    assert!(
        text.contains("== route default (mailbox relay@contoso.example)"),
        "{text}"
    );
    assert!(text.contains("535 5.7.139"), "{text}");
    assert!(
        text.contains("result: passed"),
        "the default route passes: {text}"
    );

    let out = run_cli(&path, &["check", "--route", "default"], &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = run_cli(&path, &["check", "--route", "fabrikam", "--json"], &[]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        json["fabrikam"].as_array().is_some_and(|s| !s.is_empty()),
        "{json:#}"
    );
    let out = run_cli(&path, &["check", "--route", "nope"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("routes: fabrikam, default"));
}

#[test]
fn a_device_that_logs_in_over_smtps_sends_as_its_own_mailbox() {
    use base64::Engine as _;
    let work = tempfile::tempdir().unwrap();
    let contoso = sim(work.path(), "contoso", "", CONTOSO_DEVICES);
    let (cert, key) = common::fixtures::self_signed_tls(work.path());
    let users = work.path().join("users");
    let hash = common::process::hash_password_cli("scanner-password");
    std::fs::write(&users, format!("scanner1@contoso.example:{hash}\n")).unwrap();
    let smtps = common::process::free_port();
    let listener = format!(
        "[[smtp.listener]]\naddress = \"127.0.0.1:{smtps}\"\ntls = \"implicit\"\n\
         tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\nauth = \"{}\"\n\n",
        cert.display(),
        key.display(),
        users.display()
    );
    // Only what logs in on the SMTPS listener as a listed user becomes a mailbox.
    let routes = format!(
        "{listener}[[route]]\nname = \"devices\"\nmatch_listener = [\"127.0.0.1:{smtps}\"]\n\
         match_auth_user = [\"scanner1@contoso.example\"]\n\
         [route.upstream]\nmail_account = \"{{auth_user}}\"\n"
    );
    let relay = start(work.path(), &contoso, true, &routes);

    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], smtps));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut c = common::smtp::Client::connect_smtps(addr, &cert, "localhost").await;
        c.expect("220 ").await;
        c.cmd_expect("EHLO printer.test", "250").await;
        let login = base64::engine::general_purpose::STANDARD
            .encode("\0scanner1@contoso.example\0scanner-password");
        c.cmd_expect(&format!("AUTH PLAIN {login}"), "235").await;
        // The sender on the device stays what it was: the mailbox is the login.
        c.cmd_expect("MAIL FROM:<printer@contoso.example>", "250 2.1.0")
            .await;
        c.cmd_expect("RCPT TO:<someone@example.org>", "250 2.1.5")
            .await;
        c.cmd_expect("DATA", "354").await;
        c.send(b"Subject: scanned-page\r\n\r\npage\r\n.\r\n").await;
        c.expect("250 2.0.0 queued as").await;
    });
    let d = wait_delivered(&contoso, "scanned-page");
    assert_eq!(d.auth_user, "scanner1@contoso.example");
    // The same sender on the plain listener takes the default route.
    let plain = send(&relay, "printer@contoso.example", "plain-listener");
    assert!(plain.starts_with("250"), "{plain}");
    assert_eq!(sent_as(&contoso, "plain-listener"), "relay@contoso.example");
    drop(relay);
}

#[test]
fn a_route_can_deliver_through_graph_beside_an_smtp_route() {
    let work = tempfile::tempdir().unwrap();
    let contoso = sim(work.path(), "contoso", "", "");
    // Fabrikam's app has Graph's Mail.Send (no SMTP AUTH needed).
    let fabrikam = sim(
        work.path(),
        "fabrikam",
        "",
        &FABRIKAM.replace("roles = [\"SMTP.SendAsApp\"]", "roles = [\"Mail.Send\"]"),
    );
    let graph_route = format!(
        "[[route]]\nname = \"fabrikam\"\nmatch_sender = [\"*@fabrikam.example\"]\n{}",
        as_route(&fabrikam.fragment)
            .replace(
                "[route.upstream]\n",
                &format!(
                    "[route.upstream]\ntransport = \"graph\"\ngraph_url = \"{}\"\n",
                    fabrikam.graph_url
                ),
            )
            .replace(
                "https://outlook.office365.com/.default",
                "https://graph.microsoft.com/.default"
            )
    );
    let relay = start(work.path(), &contoso, true, &graph_route);
    assert!(send(&relay, "billing@fabrikam.example", "by-graph").starts_with("250"));
    assert!(send(&relay, "app@contoso.example", "by-smtp").starts_with("250"));
    assert_eq!(sent_as(&fabrikam, "by-graph"), "relay@fabrikam.example");
    assert_eq!(sent_as(&contoso, "by-smtp"), "relay@contoso.example");
    assert!(
        relay
            .log_text()
            .contains("delivering through Microsoft Graph sendMail"),
        "{}",
        relay.log_text()
    );
}

#[test]
fn routes_with_their_own_app_deliver_when_the_top_level_has_none() {
    let work = tempfile::tempdir().unwrap();
    let unused = sim(work.path(), "unused", "", "");
    let fabrikam = sim(work.path(), "fabrikam", "", FABRIKAM);
    // The top level names a mailbox but no app: the default route waits, the route delivers.
    let routes = fabrikam_route(&fabrikam);
    let relay = Relay::builder()
        .work(work.path())
        .config(|s| {
            let text = relay_config(s, &unused, true, &routes);
            let (head, rest) = text.split_once("\n[oauth]\n").expect("top-level [oauth]");
            let rest = rest.split_once("\n\n").map_or("", |(_, tail)| tail);
            format!("{head}\n{rest}")
        })
        .start();
    assert!(send(&relay, "billing@fabrikam.example", "own-app").starts_with("250"));
    assert_eq!(sent_as(&fabrikam, "own-app"), "relay@fabrikam.example");
    assert!(send(&relay, "app@contoso.example", "no-app").starts_with("250"));
    let list = wait_listed(&relay, "no app configured");
    assert!(list.contains("\tqueued\tdefault\t"), "{list}");
    assert!(delivered(&unused).is_empty());
}
