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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::Serialize;

use crate::config::identity::{self, ValueProblem, is_guid};
use crate::config::{Config, ConfigError, looks_like_address};
use crate::deliver::classify::{HoldCause, Outcome, Stage, classify};
use crate::deliver::reply::{Enhanced, UpstreamReply};
use crate::deliver::upstream::{SessionError, Timeouts, UpstreamSession, upstream_target};
use crate::oauth::{AccessToken, OAuthError, TokenClient};

/// The role Exchange wants in an app-only token (unless RBAC for Applications is used).
const SEND_AS_APP: &str = "SMTP.SendAsApp";

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
        Report { steps, config_file }
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
    let report = |steps| Report {
        steps,
        config_file: options.config_file.clone(),
    };
    let names = Names::of(config);
    const LATER: [&str; 5] = ["token", "token_contents", "tls", "auth", "send"];

    let config_step = check_config(config);
    let failed = config_step.status == Status::Failed;
    steps.push(config_step);
    if failed {
        steps.extend(LATER.iter().map(|s| Step::skipped(s, SKIPPED)));
        return report(steps);
    }

    let token = match fetch_token(config).await {
        Ok((token, step)) => {
            steps.push(step);
            token
        }
        Err(step) => {
            steps.push(step);
            steps.extend(LATER[1..].iter().map(|s| Step::skipped(s, SKIPPED)));
            return report(steps);
        }
    };

    let contents = inspect_token(config, token.secret());
    let lacks_role = contents.lacks_role;
    steps.push(contents.step);

    let mut target = match upstream_target(config) {
        Ok(t) => t,
        Err(e) => {
            steps.push(Step::failed(
                "tls",
                e,
                "Fix upstream.host, upstream.ca_file or upstream.cloud.",
            ));
            steps.extend(LATER[3..].iter().map(|s| Step::skipped(s, SKIPPED)));
            return report(steps);
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
            return report(steps);
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
            return report(steps);
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
    report(steps)
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

// ---------------------------------------------------------------------------------------------
// 1. config

fn check_config(config: &Config) -> Step {
    let oauth = &config.oauth;
    let up = &config.upstream;
    if !oauth.is_configured() {
        return Step::failed(
            "config",
            "[oauth] is empty: the relay accepts mail but cannot deliver it",
            "Fill in relay.toml from the app registration's Overview and the mailbox you send from: \
             [oauth] tenant_id = the Directory (tenant) ID, client_id = the Application (client) ID, \
             client_secret = the client secret's Value from Certificates & secrets (or client_secret_file, \
             or certificate_file + private_key_file); [upstream] mail_account = the mailbox address used as \
             the XOAUTH2 user, from = the sender address shown in outgoing mail.",
        );
    }
    let mut causes: Vec<String> = Vec::new();
    let mut fixes: Vec<String> = Vec::new();
    let mut problem = |cause: String, fix: &str| {
        causes.push(cause);
        fixes.push(fix.to_string());
    };

    if oauth.tenant_id.is_none() {
        problem(
            "oauth.tenant_id is missing".into(),
            "Set oauth.tenant_id to the Directory (tenant) ID from the app registration's Overview.",
        );
    }
    if oauth.client_id.is_none() {
        problem(
            "oauth.client_id is missing".into(),
            "Set oauth.client_id to the Application (client) ID from the app registration's Overview.",
        );
    }
    if up.mail_account.is_none() {
        problem(
            "upstream.mail_account is missing".into(),
            "Set upstream.mail_account to the mailbox the relay signs in as (the XOAUTH2 user).",
        );
    }
    // The same rules `config` and `serve` refuse with (config::identity), with their fixes.
    let rules: [Option<Result<(), ValueProblem>>; 5] = [
        oauth.tenant_id.as_deref().map(identity::tenant_id),
        oauth.client_id.as_deref().map(identity::client_id),
        up.mail_account.as_deref().map(identity::mail_account),
        up.from.as_deref().map(identity::from),
        oauth
            .client_secret
            .as_ref()
            .map(|s| identity::client_secret(s.expose())),
    ];
    for p in rules.into_iter().flatten().filter_map(Result::err) {
        problem(p.to_string(), p.fix);
    }
    let endpoints = match crate::oauth::endpoints(config) {
        Ok(e) => Some(e),
        Err(e) => {
            problem(
                e.to_string(),
                "Fix oauth.token_url (or remove it to derive it from upstream.cloud and oauth.tenant_id).",
            );
            None
        }
    };
    if !causes.is_empty() {
        return Step::failed("config", causes.join("; "), fixes.join(" "));
    }

    let credential = if oauth.client_secret.is_some() {
        "client secret".to_string()
    } else if let Some(cert) = &oauth.certificate_file {
        format!("certificate {}", cert.display())
    } else if let Some(file) = &oauth.assertion_file {
        format!("federated assertion {}", file.display())
    } else {
        "none".to_string()
    };
    let mailbox = up.mail_account.clone().unwrap_or_default();
    let from = match &up.from {
        Some(f) if !f.eq_ignore_ascii_case(&mailbox) => format!("{f} (needs SendAs)"),
        _ => mailbox.clone(),
    };
    let endpoints = endpoints.expect("no problem means endpoints");
    Step::ok(
        "config",
        format!(
            "tenant {}, client {}, mail account {mailbox}, from {from}, credential: {credential}, \
             token URL {}, SMTP {}:{}",
            oauth.tenant_id.as_deref().unwrap_or_default().trim(),
            oauth.client_id.as_deref().unwrap_or_default().trim(),
            endpoints.token_url,
            endpoints.smtp_host,
            up.port,
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// 2. token

async fn fetch_token(config: &Config) -> Result<(AccessToken, Step), Step> {
    let client = TokenClient::from_config(config)
        .map_err(|e| Step::failed("token", oauth_detail(&e), oauth_fix(&e, config)))?;
    let warnings = client.warnings();
    match client.request().await {
        Ok(token) => {
            let mut detail = format!(
                "access token for {} from {} ({}), valid for {}",
                client.endpoints().scope,
                client.endpoints().token_url,
                client.credential_kind(),
                humantime::format_duration(Duration::from_secs(token.lifetime().as_secs())),
            );
            for w in &warnings {
                detail.push_str("; warning: ");
                detail.push_str(w);
            }
            Ok((token, Step::ok("token", detail)))
        }
        Err(e) => {
            let mut detail = oauth_detail(&e);
            for w in &warnings {
                detail.push_str("; ");
                detail.push_str(w);
            }
            Err(Step::failed("token", detail, oauth_fix(&e, config)))
        }
    }
}

/// The cause, with the AADSTS code, trace id and correlation id Microsoft support asks for.
fn oauth_detail(e: &OAuthError) -> String {
    match e {
        OAuthError::Entra {
            http_status,
            error,
            error_codes,
            description,
            trace_id,
            correlation_id,
            ..
        } => {
            let codes: Vec<String> = error_codes.iter().map(|c| format!("AADSTS{c}")).collect();
            let mut out = if description.starts_with("AADSTS") || codes.is_empty() {
                description.clone()
            } else {
                format!("{}: {description}", codes.join(", "))
            };
            let _ = write!(
                out,
                " (HTTP {http_status} {error}; Trace ID: {}; Correlation ID: {})",
                trace_id.as_deref().unwrap_or("-"),
                correlation_id.as_deref().unwrap_or("-"),
            );
            out
        }
        other => other.to_string(),
    }
}

fn oauth_fix(e: &OAuthError, config: &Config) -> String {
    if let Some(hint) = e.hint() {
        return sentence(hint);
    }
    let token_host = crate::oauth::endpoints(config)
        .ok()
        .and_then(|e| {
            e.token_url
                .split("://")
                .nth(1)
                .and_then(|r| r.split('/').next())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "the token endpoint".into());
    match e {
        OAuthError::Config(_) | OAuthError::Credential(_) => {
            "Fix the [oauth] setting named above and run check again.".into()
        }
        OAuthError::Network(_) | OAuthError::Timeout(_) => format!(
            "Check that this host can reach {token_host} over HTTPS (DNS, firewall, proxy), and \
             oauth.token_url if you set it."
        ),
        _ if e.is_transient() => {
            "Entra ID is having trouble right now; run check again in a few minutes.".into()
        }
        OAuthError::Entra { error_codes, .. } if !error_codes.is_empty() => format!(
            "Look the code up at https://login.microsoftonline.com/error?code={}.",
            error_codes[0]
        ),
        _ => "Check oauth.token_url (or remove it to derive it from upstream.cloud and \
              oauth.tenant_id)."
            .into(),
    }
}

/// Capitalised (unless it starts with a key such as `oauth.scope`), with a final full stop.
fn sentence(text: &str) -> String {
    let first_word = text.split(' ').next().unwrap_or("");
    let mut out = if first_word.contains(['.', '_']) {
        text.to_string()
    } else {
        let mut chars = text.chars();
        match chars.next() {
            Some(c) => c.to_uppercase().chain(chars).collect(),
            None => String::new(),
        }
    };
    if !out.ends_with('.') {
        out.push('.');
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 3. token contents

struct Contents {
    step: Step,
    /// The token carries no SMTP.SendAsApp role (explains a later 535 5.7.3).
    lacks_role: bool,
}

/// The claims of a JWT, decoded without verifying its signature (diagnostics only).
fn decode_claims(token: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.is_object().then_some(value)
}

fn inspect_token(config: &Config, token: &str) -> Contents {
    let Some(claims) = decode_claims(token) else {
        return Contents {
            step: Step {
                step: "token_contents",
                status: Status::Warning,
                detail: "the access token is not a JWT; its claims cannot be shown".into(),
                fix: None,
            },
            lacks_role: false,
        };
    };
    let text = |k: &str| claims.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let aud = text("aud").unwrap_or_default();
    let appid = text("appid").or_else(|| text("azp")).unwrap_or_default();
    let tid = text("tid").unwrap_or_default();
    let roles: Option<Vec<String>> = claims.get("roles").and_then(|r| r.as_array()).map(|r| {
        r.iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    });
    let exp = claims.get("exp").and_then(|v| v.as_u64());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);

    let mut details = vec![
        format!("aud {}", or_dash(&aud)),
        format!(
            "roles [{}]",
            roles.as_ref().map(|r| r.join(", ")).unwrap_or_default()
        ),
        format!("appid {}", or_dash(&appid)),
        format!("tid {}", or_dash(&tid)),
    ];
    let mut warnings: Vec<String> = Vec::new();
    let mut fixes: Vec<String> = Vec::new();
    match exp {
        Some(exp) => {
            let at = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(exp));
            if exp <= now {
                details.push(format!("expired at {at}"));
                warnings.push("the token is already expired".into());
                fixes.push("Check this host's clock (the token was just issued).".into());
            } else {
                let left = Duration::from_secs((exp - now) / 60 * 60);
                details.push(format!(
                    "expires {at} (in {})",
                    humantime::format_duration(left)
                ));
            }
        }
        None => details.push("no exp".into()),
    }

    let has_role = roles
        .as_ref()
        .is_some_and(|r| r.iter().any(|x| x == SEND_AS_APP));
    if !has_role {
        warnings.push(format!("the token has no {SEND_AS_APP} role"));
        fixes.push(format!(
            "In App registrations > your app > API permissions add Office 365 Exchange Online > Application \
             permissions > {SEND_AS_APP} and Grant admin consent; the role appears in new tokens a few minutes \
             later. Exception: with RBAC for Applications in Exchange the token carries no role and this is \
             expected; to tell, run Get-ManagementRoleAssignment -Role \"Application {SEND_AS_APP}\" in \
             Exchange Online PowerShell: RBAC is in use if it lists the app's service principal."
        ));
    }
    let expected_aud = crate::oauth::endpoints(config)
        .map(|e| e.scope.trim_end_matches("/.default").to_string())
        .unwrap_or_default();
    const EXCHANGE_AUDIENCES: [&str; 5] = [
        "https://outlook.office365.com",
        "https://outlook.office.com",
        "https://outlook.office365.us",
        "https://outlook-dod.office365.us",
        "https://partner.outlook.cn",
    ];
    let aud_trim = aud.trim_end_matches('/');
    if !aud_trim.eq_ignore_ascii_case(&expected_aud)
        && !EXCHANGE_AUDIENCES
            .iter()
            .any(|a| a.eq_ignore_ascii_case(aud_trim))
    {
        warnings.push(format!("aud `{aud}` is not Exchange Online"));
        fixes.push(
            "Remove oauth.scope (or set it to https://outlook.office365.com/.default, or your cloud's).".into(),
        );
    }
    if let Some(client_id) = config.oauth.client_id.as_deref()
        && !appid.is_empty()
        && !appid.eq_ignore_ascii_case(client_id.trim())
    {
        warnings.push(format!("appid {appid} is not oauth.client_id"));
    }
    if let Some(tenant) = config.oauth.tenant_id.as_deref()
        && is_guid(tenant.trim())
        && !tid.is_empty()
        && !tid.eq_ignore_ascii_case(tenant.trim())
    {
        warnings.push(format!("tid {tid} is not oauth.tenant_id"));
    }
    if claims.get("scp").is_some() || text("idtyp").as_deref() == Some("user") {
        warnings.push("this is a delegated (user) token, not an app-only token".into());
    }

    let mut detail = details.join(", ");
    if !warnings.is_empty() {
        detail.push_str("; warning: ");
        detail.push_str(&warnings.join("; "));
    }
    Contents {
        step: Step {
            step: "token_contents",
            status: if warnings.is_empty() {
                Status::Ok
            } else {
                Status::Warning
            },
            detail,
            fix: (!fixes.is_empty()).then(|| fixes.join(" ")),
        },
        lacks_role: !has_role,
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

// ---------------------------------------------------------------------------------------------
// 4. network and TLS

async fn connect(
    target: &crate::deliver::upstream::UpstreamTarget,
) -> Result<(UpstreamSession, Step), Step> {
    let host = target
        .address
        .rsplit_once(':')
        .map_or(target.address.as_str(), |(h, _)| h)
        .to_string();
    let resolved = tokio::time::timeout(
        target.timeouts.connect,
        tokio::net::lookup_host(target.address.as_str()),
    )
    .await;
    let why = match resolved {
        Ok(Ok(addrs)) => (addrs.count() == 0).then(|| "no address".to_string()),
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("no answer in time".into()),
    };
    if let Some(why) = why {
        return Err(Step::failed(
            "tls",
            format!("cannot resolve {host}: {why}"),
            "Check upstream.host (it defaults to smtp.office365.com, or the SMTP host of \
             upstream.cloud) and this host's DNS.",
        ));
    }
    let session = UpstreamSession::connect(target).await.map_err(|e| {
        let names = Names {
            mailbox: String::new(),
            from: String::new(),
            client_id: String::new(),
        };
        Step::failed("tls", session_detail(&e), connect_fix(&e, target, &names))
    })?;
    let peer = session
        .peer()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "?".into());
    let tls = match session.tls_info() {
        Some((version, suite)) => {
            let version = match version.as_str() {
                "TLSv1_3" => "TLS 1.3".to_string(),
                "TLSv1_2" => "TLS 1.2".to_string(),
                other => other.to_string(),
            };
            format!("{version} ({suite})")
        }
        None => "TLS".to_string(),
    };
    let mode = match target.tls {
        crate::config::UpstreamTls::Starttls => "STARTTLS",
        crate::config::UpstreamTls::Implicit => "implicit TLS",
    };
    if !session.caps.xoauth2 {
        return Err(Step::failed(
            "tls",
            format!(
                "{} ({peer}): {mode}, {tls}, certificate verified, but AUTH XOAUTH2 is not offered",
                target.address
            ),
            HoldCause::ProtocolMismatch.fix(),
        ));
    }
    let detail = format!(
        "{} ({peer}): {mode}, {tls}, certificate verified for {}, AUTH XOAUTH2 offered",
        target.address, target.server_name
    );
    Ok((session, Step::ok("tls", detail)))
}

fn connect_fix(
    e: &SessionError,
    target: &crate::deliver::upstream::UpstreamTarget,
    names: &Names,
) -> String {
    match e {
        SessionError::Network { .. } | SessionError::Timeout { .. } => format!(
            "Check that this host can reach {} (outbound port {} is often blocked by firewalls or \
             hosting providers), and upstream.host, upstream.port and upstream.tls.",
            target.address,
            target.address.rsplit(':').next().unwrap_or("587"),
        ),
        _ => session_fix(e, names),
    }
}

/// The cause of a session failure: the exact reply when there is one.
fn session_detail(e: &SessionError) -> String {
    match e {
        SessionError::Reply { stage, reply } => {
            format!("Exchange answered {}: {reply}", stage_words(*stage))
        }
        SessionError::Network { stage, message } => {
            format!("{}: {message}", stage_words(*stage))
        }
        SessionError::Timeout { stage, limit } => format!(
            "no answer {} within {}",
            stage_words(*stage),
            humantime::format_duration(*limit)
        ),
        SessionError::Certificate(m) => format!("the server certificate did not verify: {m}"),
        SessionError::Protocol { stage, what } => format!("{}: {what}", stage_words(*stage)),
    }
}

fn stage_words(stage: Stage) -> &'static str {
    match stage {
        Stage::Connect => "on connect",
        Stage::Ehlo => "to EHLO",
        Stage::StartTls => "to STARTTLS",
        Stage::Auth => "to AUTH XOAUTH2",
        Stage::MailFrom => "to MAIL FROM",
        Stage::RcptTo => "to RCPT TO",
        Stage::Data => "to DATA",
        Stage::DataEnd => "at the end of the message",
    }
}

fn session_fix(e: &SessionError, names: &Names) -> String {
    match e {
        SessionError::Reply { stage, reply } => reply_fix(*stage, reply, names),
        SessionError::Network { .. } | SessionError::Timeout { .. } => {
            "The connection broke; run check again. If it keeps happening, check firewalls and \
             proxies between this host and upstream.host."
                .into()
        }
        SessionError::Certificate(_) => HoldCause::CertificateInvalid.fix().into(),
        SessionError::Protocol { .. } => HoldCause::ProtocolMismatch.fix().into(),
    }
}

fn is_535_573(e: &SessionError) -> bool {
    e.reply()
        .is_some_and(|r| r.code == 535 && r.enhanced != Some(Enhanced::new(5, 7, 139)))
}

/// The fix for an Exchange reply: the deliverer's [`HoldCause::fix`] where the reply holds the
/// mailbox, with the configured names filled in.
fn reply_fix(stage: Stage, reply: &UpstreamReply, names: &Names) -> String {
    if reply.code == 430 || reply.enhanced == Some(Enhanced::new(4, 2, 0)) {
        return names.fill(
            "Exchange could not open the mail account's mailbox (mailbox logon failure). Check that \
             <mail_account> exists in Exchange Online (Get-EXOMailbox -Identity <mail_account>), that the \
             service principal has FullAccess on it (Add-MailboxPermission -Identity <mail_account> -User \
             <service principal> -AccessRights FullAccess), and that the service principal was created \
             with the Enterprise application's object id (New-ServicePrincipal -AppId <client_id> -ObjectId \
             <enterprise app object id>; Get-ServicePrincipal shows its Identity).",
        );
    }
    let text = match classify(stage, reply) {
        Outcome::Hold(cause) => cause.fix().to_string(),
        Outcome::Retry { .. } => {
            "Exchange answered with a temporary error; run check again in a few minutes.".into()
        }
        Outcome::Failed => "Exchange refused the message; the reply above names the reason.".into(),
        Outcome::Delivered => String::new(),
    };
    names.fill(&text)
}

// ---------------------------------------------------------------------------------------------
// 6. test message

async fn send_test(session: &mut UpstreamSession, names: &Names, to: &str) -> Step {
    if !looks_like_address(to) {
        return Step::failed(
            "send",
            format!("--send-to `{to}` is not an e-mail address"),
            "Pass an address that can receive mail, e.g. --send-to you@contoso.com.",
        );
    }
    let body = test_message(&names.from, to, &names.mailbox);
    let result = match session
        .send(&names.from, "", &[to.to_string()], &body)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            return Step::failed("send", session_detail(&e), session_fix(&e, names));
        }
    };
    if let Some(Some(refused)) = result.recipients.first() {
        return Step::failed(
            "send",
            format!("Exchange refused the recipient {to}: {refused}"),
            reply_fix(Stage::RcptTo, refused, names),
        );
    }
    match result.data_reply {
        Some(r) if r.is_positive() => Step::ok(
            "send",
            format!("test message from {} to {to} accepted: {r}", names.from),
        ),
        Some(r) => Step::failed(
            "send",
            format!("Exchange answered at the end of the message: {r}"),
            reply_fix(Stage::DataEnd, &r, names),
        ),
        None => Step::failed(
            "send",
            "no recipient was accepted",
            "Check the --send-to address.",
        ),
    }
}

fn test_message(from: &str, to: &str, mailbox: &str) -> Vec<u8> {
    let now = SystemTime::now();
    let domain = mailbox.rsplit_once('@').map_or("localhost", |(_, d)| d);
    format!(
        "From: {from}\r\n\
         To: {to}\r\n\
         Subject: Test message from smtp-oauth-relay check\r\n\
         Date: {date}\r\n\
         Message-ID: <{id}.check@{domain}>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 7bit\r\n\
         \r\n\
         This is a test message from `smtp-oauth-relay check`.\r\n\
         \r\n\
         It was sent through Exchange Online as {mailbox} with an app-only OAuth2 token\r\n\
         (SASL XOAUTH2). If you can read it, the relay can deliver mail.\r\n",
        date = crate::inbound::message::rfc5322_date(now),
        id = ulid::Ulid::generate(),
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

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
