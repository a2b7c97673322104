//! `smtp-oauth-relay check`: walks the chain the relay depends on and says which link is broken
//! and how to mend it, in the words of the Microsoft 365 setup guide.
//!
//! Steps, in order: config → token → token contents → network and TLS → AUTH XOAUTH2 → (test
//! message with `--send-to`). Each step is `ok`, `warning` (allowed), `failed` (with the cause and
//! the fix) or `skipped` (an earlier step failed). The fixes are the same texts the deliverer
//! logs: [`HoldCause::fix`] for Exchange replies and [`OAuthError::hint`] for AADSTS codes.
//!
//! Nothing here prints a secret, an assertion or a token: the token is decoded only to report its
//! claims, and every error text comes from types that scrub credentials.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::config::{Config, ConfigError};
use crate::transport::smtp::session::{Timeouts, upstream_target};

mod config_step;
mod graph;
mod smtp;
mod token;

use config_step::check_config;
use smtp::*;
use token::*;

/// The role Exchange wants in an app-only token (unless RBAC for Applications is used).
const SEND_AS_APP: &str = "SMTP.SendAsApp";
/// The role Graph `sendMail` wants (unless RBAC for Applications is used).
const MAIL_SEND: &str = "Mail.Send";
/// The Graph role drafts and upload sessions need (`upstream.graph_large_messages`).
const MAIL_READ_WRITE: &str = "Mail.ReadWrite";

/// What `check` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    /// Send a real test message to this address (step 6).
    pub send_to: Option<String>,
    /// The configuration file in use, for the header line.
    pub config_file: Option<PathBuf>,
    /// Per-step network limits; `None` uses [`check_timeouts`].
    pub timeouts: Option<Timeouts>,
}

/// Shorter than the deliverer's: an admin is waiting at the terminal.
pub fn check_timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(15),
        command: Duration::from_secs(30),
        data_end: Duration::from_secs(120),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Passed, but something looks wrong (does not change the exit code).
    Warning,
    Failed,
    /// Not run because an earlier step failed (or, for the test message, not requested).
    Skipped,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warning => "WARNING",
            Status::Failed => "FAILED",
            Status::Skipped => "skipped",
        }
    }
}

/// One line of the report (and one object of the `--json` array).
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// `config`, `token`, `token_contents`, `tls`, `auth` or `send`.
    pub step: &'static str,
    pub status: Status,
    pub detail: String,
    pub fix: Option<String>,
}

impl Step {
    fn ok(step: &'static str, detail: impl Into<String>) -> Step {
        Step {
            step,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn failed(step: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Step {
        Step {
            step,
            status: Status::Failed,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn skipped(step: &'static str, why: &str) -> Step {
        Step {
            step,
            status: Status::Skipped,
            detail: why.to_string(),
            fix: None,
        }
    }

    /// The human name of the step.
    pub fn title(&self) -> &'static str {
        match self.step {
            "config" => "config",
            "token" => "token",
            "token_contents" => "token contents",
            "tls" => "network and TLS",
            "auth" => "AUTH XOAUTH2",
            "https" => "Graph over HTTPS",
            "permission" => "sendMail permission",
            "send" => "test message",
            other => other,
        }
    }
}

/// The outcome of a `check` run.
#[derive(Debug, Clone)]
pub struct Report {
    pub steps: Vec<Step>,
    config_file: Option<PathBuf>,
    /// The `oid` of the app-only token: the object ID of the app's service principal, i.e. the
    /// Object ID on the app's *Enterprise applications* page (what `New-ServicePrincipal
    /// -ObjectId` wants; not the App registrations one). `None` when no token was obtained.
    pub service_principal_id: Option<String>,
}

impl Report {
    /// True when no step failed (warnings and skipped steps allowed).
    pub fn passed(&self) -> bool {
        !self.steps.iter().any(|s| s.status == Status::Failed)
    }

    /// 0 when every step passed, 1 when one failed.
    pub fn exit_code(&self) -> u8 {
        if self.passed() { 0 } else { 1 }
    }

    /// One line per step; causes and fixes on indented lines below a failure or a warning.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        match &self.config_file {
            Some(p) => {
                let _ = writeln!(out, "smtp-oauth-relay check ({})", p.display());
            }
            None => out.push_str("smtp-oauth-relay check (defaults and environment)\n"),
        }
        let width = self
            .steps
            .iter()
            .map(|s| s.title().len())
            .max()
            .unwrap_or(0);
        for (i, s) in self.steps.iter().enumerate() {
            let _ = writeln!(
                out,
                "{}. {:width$}  {:7}  {}",
                i + 1,
                s.title(),
                s.status.label(),
                s.detail
            );
            if let Some(fix) = &s.fix {
                let _ = writeln!(out, "   {:width$}  fix:     {fix}", "");
            }
        }
        let failed: Vec<&str> = self
            .steps
            .iter()
            .filter(|s| s.status == Status::Failed)
            .map(Step::title)
            .collect();
        if failed.is_empty() {
            if self.steps.iter().any(|s| s.status == Status::Warning) {
                out.push_str("result: passed, with warnings\n");
            } else {
                out.push_str("result: passed\n");
            }
        } else {
            let _ = writeln!(
                out,
                "result: FAILED at {}; apply the fix and run check again",
                failed.join(", ")
            );
        }
        out
    }

    /// The report of a configuration that did not load: step 1 failed with every problem
    /// (each names its key and, for the Microsoft 365 values, the fix), the others skipped.
    /// `check` exits 2 with it, as every command does for an invalid configuration.
    pub fn invalid_config(error: &ConfigError, config_file: Option<PathBuf>) -> Report {
        let issues = error.issues();
        let detail = match issues {
            [] => error.to_string(),
            _ => issues
                .iter()
                .map(|i| format!("{}: {}", i.key, i.message))
                .collect::<Vec<_>>()
                .join("; "),
        };
        let fixes: Vec<&str> = issues.iter().filter_map(|i| i.fix).collect();
        let fix = if fixes.is_empty() {
            "Correct the keys named above in relay.toml (or their RELAY_* variables), then run \
             check again; `smtp-oauth-relay config` shows the effective values."
                .to_string()
        } else {
            fixes.join(" ")
        };
        let mut steps = vec![Step::failed("config", detail, fix)];
        for step in ["token", "token_contents", "tls", "auth", "send"] {
            steps.push(Step::skipped(step, "the configuration is invalid"));
        }
        Report {
            steps,
            config_file,
            service_principal_id: None,
        }
    }

    /// The steps as a JSON array of `{step, status, detail, fix}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.steps).unwrap_or_else(|_| "[]".into()) + "\n"
    }
}

/// Runs every step against `config`. Never panics on bad input; network steps are bounded by
/// the timeouts in `options`.
pub async fn run(config: &Config, options: &CheckOptions) -> Report {
    let mut steps = Vec::new();
    let mut service_principal_id = None;
    let report = |steps, service_principal_id| Report {
        steps,
        config_file: options.config_file.clone(),
        service_principal_id,
    };
    let names = Names::of(config);
    const LATER: [&str; 5] = ["token", "token_contents", "tls", "auth", "send"];

    let config_step = check_config(config);
    let failed = config_step.status == Status::Failed;
    steps.push(config_step);
    if failed {
        steps.extend(LATER.iter().map(|s| Step::skipped(s, SKIPPED)));
        return report(steps, service_principal_id);
    }

    let token = match fetch_token(config).await {
        Ok((token, step)) => {
            steps.push(step);
            token
        }
        Err(step) => {
            steps.push(step);
            steps.extend(LATER[1..].iter().map(|s| Step::skipped(s, SKIPPED)));
            return report(steps, service_principal_id);
        }
    };

    let contents = inspect_token(config, token.secret());
    let lacks_role = contents.lacks_role;
    service_principal_id = contents.oid;
    steps.push(contents.step);

    if config.upstream.transport == crate::config::TransportKind::Graph {
        steps.extend(graph::steps(config, options, &names, &token, lacks_role).await);
        return report(steps, service_principal_id);
    }

    let mut target = match upstream_target(config) {
        Ok(t) => t,
        Err(e) => {
            steps.push(Step::failed(
                "tls",
                e,
                "Fix upstream.host, upstream.ca_file or upstream.cloud.",
            ));
            steps.extend(LATER[3..].iter().map(|s| Step::skipped(s, SKIPPED)));
            return report(steps, service_principal_id);
        }
    };
    target.timeouts = options.timeouts.clone().unwrap_or_else(check_timeouts);
    let mut session = match connect(&target).await {
        Ok((session, step)) => {
            steps.push(step);
            session
        }
        Err(step) => {
            steps.push(step);
            steps.extend(LATER[3..].iter().map(|s| Step::skipped(s, SKIPPED)));
            return report(steps, service_principal_id);
        }
    };

    match session.login(&names.mailbox, token.secret()).await {
        Ok(()) => steps.push(Step::ok(
            "auth",
            format!("235 Authentication successful as {}", names.mailbox),
        )),
        Err(e) => {
            let mut fix = session_fix(&e, &names);
            if lacks_role && is_535_573(&e) {
                fix = format!(
                    "The token has no {SEND_AS_APP} role (see token contents): in App registrations > your \
                     app > API permissions add Office 365 Exchange Online > Application permissions > \
                     {SEND_AS_APP} and Grant admin consent. If that is in place: {fix}"
                );
            }
            steps.push(Step::failed("auth", session_detail(&e), fix));
            steps.push(Step::skipped("send", SKIPPED));
            session.quit().await;
            return report(steps, service_principal_id);
        }
    }

    match &options.send_to {
        None => steps.push(Step::skipped(
            "send",
            "not requested: add --send-to ADDRESS to send a real test message",
        )),
        Some(to) => steps.push(send_test(&mut session, &names, to).await),
    }
    session.quit().await;
    report(steps, service_principal_id)
}

const SKIPPED: &str = "an earlier step failed";

/// The values the fixes name, so that the commands can be pasted as printed.
struct Names {
    mailbox: String,
    from: String,
    client_id: String,
}

impl Names {
    fn of(config: &Config) -> Names {
        let mailbox = config.upstream.mail_account.clone().unwrap_or_default();
        Names {
            from: config
                .upstream
                .from
                .clone()
                .unwrap_or_else(|| mailbox.clone()),
            mailbox,
            client_id: config.oauth.client_id.clone().unwrap_or_default(),
        }
    }

    /// Fills `<mail_account>`, `<from>` and `<client_id>` in a fix text.
    fn fill(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (placeholder, value) in [
            ("<mail_account>", &self.mailbox),
            ("<from>", &self.from),
            ("<client_id>", &self.client_id),
        ] {
            if !value.is_empty() {
                out = out.replace(placeholder, value);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use base64::Engine as _;

    use super::*;
    use crate::deliver::classify::Stage;
    use crate::deliver::reply::UpstreamReply;

    fn config(toml: &str) -> Config {
        Config::from_toml_str(toml).expect("valid")
    }

    const BASE: &str = "[upstream]\nmail_account = \"no-reply@contoso.com\"\n[oauth]\n\
                        tenant_id = \"9188040d-6c67-4c5b-b112-36a304b66dad\"\n\
                        client_id = \"0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10\"\n";

    #[test]
    fn config_step_catches_the_guide_mistakes() {
        let ok = check_config(&config(&format!("{BASE}client_secret = \"abc8Q~value\"\n")));
        assert_eq!(ok.status, Status::Ok, "{ok:?}");
        assert!(!ok.detail.contains("abc8Q~value"));

        // Configurations that loading refuses (exit 2) can still reach check_config when built
        // in code: it applies the same rules (config::identity).
        let mut secret_id = config(&format!("{BASE}client_secret = \"abc8Q~value\"\n"));
        secret_id.oauth.client_secret = Some(crate::config::Secret::new(
            "11111111-2222-3333-4444-555555555555",
        ));
        let secret_id = check_config(&secret_id);
        assert_eq!(secret_id.status, Status::Failed);
        assert!(secret_id.fix.unwrap().contains("Value, not its Secret ID"));
        assert!(!secret_id.detail.contains("11111111-2222"));

        let mut bad_client = config(&format!("{BASE}client_secret = \"x~y\"\n"));
        bad_client.oauth.client_id = Some("my-app".into());
        let bad_client = check_config(&bad_client);
        assert_eq!(bad_client.status, Status::Failed);
        assert!(bad_client.detail.contains("oauth.client_id"));
        assert!(bad_client.fix.unwrap().contains("Application (client) ID"));

        let mut bad_tenant = config(&format!("{BASE}client_secret = \"x~y\"\n"));
        bad_tenant.oauth.tenant_id = Some("common".into());
        let bad_tenant = check_config(&bad_tenant);
        assert_eq!(bad_tenant.status, Status::Failed);
        assert!(bad_tenant.fix.unwrap().contains("Directory (tenant) ID"));

        let empty = check_config(&config(""));
        assert_eq!(empty.status, Status::Failed);
        assert!(empty.fix.unwrap().contains("tenant_id"));
    }

    #[test]
    fn loading_refuses_the_same_mistakes_with_the_key_named() {
        for (bad, key, words) in [
            (
                "client_secret = \"11111111-2222-3333-4444-555555555555\"",
                "oauth.client_secret",
                "Secret ID",
            ),
            (
                "client_secret = \"x~y\"\ntenant_id = \"common\"",
                "oauth.tenant_id",
                "not a tenant",
            ),
            (
                "client_secret = \"x~y\"\nclient_id = \"my-app\"",
                "oauth.client_id",
                "not a GUID",
            ),
        ] {
            // Later keys win in TOML only if not repeated: build the table without BASE's.
            let base = BASE
                .lines()
                .filter(|l| {
                    !bad.lines()
                        .any(|b| b.split('=').next() == l.split('=').next())
                })
                .collect::<Vec<_>>()
                .join("\n");
            let e = Config::from_toml_str(&format!("{base}\n{bad}\n")).unwrap_err();
            let issue = e
                .issues()
                .iter()
                .find(|i| i.key == key)
                .unwrap_or_else(|| panic!("{e}"));
            assert!(issue.message.contains(words), "{issue}");
            assert!(
                !e.to_string().contains("11111111-2222"),
                "a secret is never quoted"
            );
            let report = Report::invalid_config(&e, None);
            assert_eq!(report.steps[0].status, Status::Failed);
            assert!(report.steps[0].detail.contains(key));
            assert!(
                report.steps[1..]
                    .iter()
                    .all(|s| s.status == Status::Skipped)
            );
        }
    }

    fn jwt(claims: serde_json::Value) -> String {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        format!(
            "{}.{}.sig",
            b64(br#"{"alg":"RS256","typ":"JWT"}"#),
            b64(claims.to_string().as_bytes())
        )
    }

    #[test]
    fn token_contents_warn_without_the_role() {
        let c = config(&format!("{BASE}client_secret = \"abc8Q~value\"\n"));
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        let good = inspect_token(
            &c,
            &jwt(serde_json::json!({
                "aud": "https://outlook.office365.com", "roles": ["SMTP.SendAsApp"],
                "appid": "0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10",
                "tid": "9188040d-6c67-4c5b-b112-36a304b66dad", "exp": exp,
            })),
        );
        assert_eq!(good.step.status, Status::Ok, "{:?}", good.step);
        assert!(!good.lacks_role);
        assert!(good.step.detail.contains("SMTP.SendAsApp"));

        let no_role = inspect_token(
            &c,
            &jwt(serde_json::json!({
                "aud": "https://outlook.office365.com",
                "appid": "0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10",
                "tid": "9188040d-6c67-4c5b-b112-36a304b66dad", "exp": exp,
            })),
        );
        assert_eq!(no_role.step.status, Status::Warning);
        assert!(no_role.lacks_role);
        let fix = no_role.step.fix.unwrap();
        assert!(fix.contains("Grant admin consent") && fix.contains("RBAC for Applications"));

        let opaque = inspect_token(&c, "not-a-jwt");
        assert_eq!(opaque.step.status, Status::Warning);
    }

    #[test]
    fn every_reply_of_interest_has_a_fix() {
        let names = Names {
            mailbox: "no-reply@contoso.com".into(),
            from: "alerts@contoso.com".into(),
            client_id: "0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10".into(),
        };
        let fix = |stage, line: &str| {
            reply_fix(
                stage,
                &UpstreamReply::parse(&[line.to_string()]).unwrap(),
                &names,
            )
        };
        let f = fix(
            Stage::Auth,
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
        );
        assert!(f.contains("Set-CASMailbox -Identity no-reply@contoso.com"));
        assert!(f.contains("Set-TransportConfig") && f.contains("Security defaults"));
        let f = fix(Stage::Auth, "535 5.7.3 Authentication unsuccessful");
        assert!(f.contains("New-ServicePrincipal -AppId 0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10"));
        assert!(f.contains("Enterprise application") && f.contains("FullAccess"));
        assert!(f.contains("admin consent"));
        let f = fix(
            Stage::DataEnd,
            "430 4.2.0 STOREDRV; mailbox logon failure; Cannot open mailbox.",
        );
        assert!(f.contains("FullAccess") && f.contains("Get-EXOMailbox"));
        let f = fix(
            Stage::Auth,
            "550 5.7.30 Basic authentication is not supported for Client Submission.",
        );
        assert!(f.contains("upstream.host"));
        let f = fix(
            Stage::DataEnd,
            "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
        );
        assert!(f.contains("Add-RecipientPermission -Identity alerts@contoso.com"));
        let f = fix(
            Stage::DataEnd,
            "554 5.2.252 SendAsDenied; no-reply@contoso.com not allowed to send as alerts@contoso.com",
        );
        assert!(f.contains("SendAs"));
    }

    #[test]
    fn report_renders_and_counts() {
        let report = Report {
            service_principal_id: None,
            steps: vec![
                Step::ok("config", "fine"),
                Step::failed("token", "AADSTS7000215: bad", "Copy the Value."),
                Step::skipped("token_contents", SKIPPED),
            ],
            config_file: None,
        };
        assert_eq!(report.exit_code(), 1);
        let text = report.to_text();
        assert!(text.contains("FAILED") && text.contains("fix:     Copy the Value."));
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json[1]["status"], "failed");
        assert_eq!(json[1]["step"], "token");
        assert!(json[0]["fix"].is_null());
    }
}
