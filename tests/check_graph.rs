//! `smtp-oauth-relay check` for `upstream.transport = "graph"`: the real binary against the
//! simulator's Graph endpoint. A correct setup passes and `--send-to` delivers through Graph; a
//! token without `Mail.Send`, a token for Exchange instead of Graph and an unreachable Graph
//! host each fail at their step with the fix (the Graph permission, the RBAC for Applications
//! cmdlets, `oauth.scope`, the network).

mod common;

use std::path::PathBuf;

use smtp_oauth_relay::sim::{DEFAULT_MAILBOX, SimConfig, Simulator};

struct Setup {
    sim: Simulator,
    dir: tempfile::TempDir,
    _sim_dir: tempfile::TempDir,
}

impl Setup {
    async fn start() -> Setup {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let sim_dir = tempfile::tempdir().expect("tempdir");
        let sim = Simulator::start(SimConfig::graph(), sim_dir.path())
            .await
            .expect("simulator");
        Setup {
            sim,
            dir: tempfile::tempdir().expect("tempdir"),
            _sim_dir: sim_dir,
        }
    }

    /// The simulator's fragment switched to Graph, with `extra` appended to [upstream] and
    /// `scope` as oauth.scope.
    fn config(&self, graph_url: &str, scope: &str) -> PathBuf {
        let fragment = self.sim.relay_config_fragment();
        let mut text = String::new();
        for line in fragment.lines() {
            if line.starts_with("scope = ") {
                text.push_str(&format!("scope = \"{scope}\"\n"));
                continue;
            }
            text.push_str(line);
            text.push('\n');
            if line == "[upstream]" {
                text.push_str(&format!(
                    "transport = \"graph\"\ngraph_url = \"{graph_url}\"\n"
                ));
            }
        }
        let path = self.dir.path().join("relay.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }
}

struct Run {
    code: i32,
    stdout: String,
}

impl Run {
    /// (status word, step line, fix line) of step `title`.
    fn step(&self, title: &str) -> (String, String, String) {
        let lines: Vec<&str> = self.stdout.lines().collect();
        let i = lines
            .iter()
            .position(|l| {
                l.split_once(". ")
                    .is_some_and(|(n, rest)| n.parse::<u32>().is_ok() && rest.starts_with(title))
            })
            .unwrap_or_else(|| panic!("no step {title:?} in:\n{}", self.stdout));
        let line = lines[i];
        let status = line[line.find(title).expect("title") + title.len()..]
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
        let fix = lines
            .get(i + 1)
            .and_then(|l| l.trim_start().strip_prefix("fix:"))
            .unwrap_or("")
            .trim()
            .to_string();
        (status, line.to_string(), fix)
    }
}

async fn check(config: PathBuf, args: &[&str]) -> Run {
    let mut all = vec!["check".to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        common::process::run_cli(&config, &args, &[])
    })
    .await
    .expect("check ran");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correct_graph_setup_passes_and_send_to_delivers_through_graph() {
    let s = Setup::start().await;
    let run = check(
        s.config(&s.sim.graph_url(), GRAPH_SCOPE),
        &["--send-to", "alice@fabrikam.example"],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stdout);
    for step in [
        "config",
        "token",
        "token contents",
        "Graph over HTTPS",
        "sendMail permission",
        "test message",
    ] {
        assert_eq!(run.step(step).0, "ok", "{step}:\n{}", run.stdout);
    }
    let (_, contents, _) = run.step("token contents");
    assert!(
        contents.contains("aud https://graph.microsoft.com") && contents.contains("Mail.Send"),
        "{contents}"
    );
    assert!(
        run.step("sendMail permission")
            .1
            .contains("nothing was sent")
    );
    assert!(run.step("test message").1.contains("202"), "{}", run.stdout);
    // The permission probe sent nothing; the test message arrived, through Graph.
    let messages = s.sim.messages().expect("mailbox");
    assert_eq!(messages.len(), 1, "{}", run.stdout);
    assert_eq!(messages[0].envelope.transfer, "GRAPH");
    assert_eq!(messages[0].envelope.rcpt_to, ["alice@fabrikam.example"]);
    assert_eq!(messages[0].envelope.auth_user, DEFAULT_MAILBOX);
    assert!(!run.stdout.contains("AUTH XOAUTH2"), "{}", run.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_mail_send_fails_with_the_graph_permission_and_rbac_cmdlets() {
    let s = Setup::start().await;
    s.sim
        .control()
        .set_roles(Some(vec!["SMTP.SendAsApp".to_string()]));
    let run = check(s.config(&s.sim.graph_url(), GRAPH_SCOPE), &[]).await;
    assert_eq!(run.code, 1, "{}", run.stdout);
    let (status, line, _) = run.step("token contents");
    assert_eq!(status, "WARNING", "{line}");
    assert!(line.contains("no Mail.Send role"), "{line}");
    let (status, line, fix) = run.step("sendMail permission");
    assert_eq!(status, "FAILED", "{}", run.stdout);
    assert!(line.contains("403 ErrorAccessDenied"), "{line}");
    for part in [
        "Microsoft Graph, Application permissions, Mail.Send",
        "Grant admin consent",
        "New-ManagementScope",
        "New-ManagementRoleAssignment -App",
        "\"Application Mail.Send\"",
        "Test-ServicePrincipalAuthorization",
        DEFAULT_MAILBOX,
    ] {
        assert!(fix.contains(part), "fix lacks {part:?}: {fix}");
    }
    assert_eq!(run.step("test message").0, "skipped");
    assert!(s.sim.messages().expect("mailbox").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_exchange_is_named_and_refused_by_graph() {
    let s = Setup::start().await;
    let run = check(
        s.config(&s.sim.graph_url(), "https://outlook.office365.com/.default"),
        &[],
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.stdout);
    let (status, line, fix) = run.step("token contents");
    assert_eq!(status, "WARNING", "{line}");
    assert!(line.contains("is not Microsoft Graph"), "{line}");
    assert!(fix.contains("oauth.scope"), "{fix}");
    let (status, line, fix) = run.step("sendMail permission");
    assert_eq!(status, "FAILED", "{line}");
    assert!(line.contains("401 InvalidAuthenticationToken"), "{line}");
    assert!(fix.contains("Remove oauth.scope"), "{fix}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_graph_host_fails_at_https() {
    let s = Setup::start().await;
    let closed = common::process::free_addr();
    let run = check(s.config(&format!("http://{closed}"), GRAPH_SCOPE), &[]).await;
    assert_eq!(run.code, 1, "{}", run.stdout);
    let (status, line, fix) = run.step("Graph over HTTPS");
    assert_eq!(status, "FAILED", "{line}");
    assert!(fix.contains("over HTTPS"), "{fix}");
    assert_eq!(run.step("sendMail permission").0, "skipped");
    assert_eq!(run.step("test message").0, "skipped");
}

/// `upstream.graph_large_messages = true`: the permission step also probes a draft, which needs
/// `Mail.ReadWrite`; without it the step fails with that grant (Entra or RBAC) as the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_need_mail_read_write_and_check_says_how_to_grant_it() {
    let s = Setup::start().await;
    let large = |path: PathBuf| {
        let text = std::fs::read_to_string(&path).expect("config");
        let text = text.replacen(
            "transport = \"graph\"\n",
            "transport = \"graph\"\ngraph_large_messages = true\n",
            1,
        );
        std::fs::write(&path, text).expect("write config");
        path
    };
    // Mail.Send only (SimConfig::graph()): sendMail would work, drafts would not.
    let run = check(large(s.config(&s.sim.graph_url(), GRAPH_SCOPE)), &[]).await;
    assert_eq!(run.code, 1, "{}", run.stdout);
    let (status, line, fix) = run.step("token contents");
    assert_eq!(status, "WARNING", "{line}");
    assert!(line.contains("no Mail.ReadWrite role"), "{line}");
    assert!(fix.contains("Application Mail.ReadWrite"), "{fix}");
    let (status, line, fix) = run.step("sendMail permission");
    assert_eq!(status, "FAILED", "{}", run.stdout);
    assert!(
        line.contains("graph_large_messages") && line.contains("403 ErrorAccessDenied"),
        "{line}"
    );
    for part in [
        "Application permissions, Mail.ReadWrite",
        "Grant admin consent",
        "-Role \"Application Mail.ReadWrite\"",
        "upstream.graph_large_messages = false",
    ] {
        assert!(fix.contains(part), "fix lacks {part:?}: {fix}");
    }

    // With the role granted, the step passes and creates nothing.
    s.sim.control().set_roles(Some(vec![
        "Mail.Send".to_string(),
        "Mail.ReadWrite".to_string(),
    ]));
    let run = check(large(s.config(&s.sim.graph_url(), GRAPH_SCOPE)), &[]).await;
    assert_eq!(run.code, 0, "{}", run.stdout);
    let (status, line, _) = run.step("sendMail permission");
    assert_eq!(status, "ok", "{line}");
    assert!(line.contains("would create drafts"), "{line}");
    assert_eq!(s.sim.control().graph_drafts(), 0);
}
