//! Step 1, config: the values from the Microsoft 365 setup, by the rules of `config::identity`.

use super::*;
use crate::config::Config;
use crate::config::identity::{self, ValueProblem};

pub(super) fn check_config(config: &Config) -> Step {
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
