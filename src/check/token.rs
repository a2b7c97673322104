//! Steps 2 and 3: a token from Entra ID (with the AADSTS code, trace and correlation ids on
//! failure), and what the token says (audience, roles, tenant, app).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;

use super::*;
use crate::config::Config;
use crate::config::identity::is_guid;
use crate::oauth::{AccessToken, OAuthError, TokenClient};

pub(super) async fn fetch_token(config: &Config) -> Result<(AccessToken, Step), Step> {
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
pub(super) fn oauth_detail(e: &OAuthError) -> String {
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

pub(super) fn oauth_fix(e: &OAuthError, config: &Config) -> String {
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
pub(super) fn sentence(text: &str) -> String {
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

pub(super) struct Contents {
    pub(super) step: Step,
    /// The token carries no SMTP.SendAsApp role (explains a later 535 5.7.3).
    pub(super) lacks_role: bool,
    /// The `oid` claim when it is a GUID: for an app-only token, the app's service principal
    /// (Entra access token claims reference: "the verified identity of the user or service
    /// principal").
    pub(super) oid: Option<String>,
}

/// The claims of a JWT, decoded without verifying its signature (diagnostics only).
pub(super) fn decode_claims(token: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.is_object().then_some(value)
}

pub(super) fn inspect_token(config: &Config, token: &str) -> Contents {
    let Some(claims) = decode_claims(token) else {
        return Contents {
            step: Step {
                step: "token_contents",
                status: Status::Warning,
                detail: "the access token is not a JWT; its claims cannot be shown".into(),
                fix: None,
            },
            lacks_role: false,
            oid: None,
        };
    };
    let text = |k: &str| claims.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let aud = text("aud").unwrap_or_default();
    let appid = text("appid").or_else(|| text("azp")).unwrap_or_default();
    let tid = text("tid").unwrap_or_default();
    let oid = text("oid").filter(|o| is_guid(o));
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
    if let Some(oid) = &oid {
        details.push(format!("oid {oid} (Enterprise applications Object ID)"));
    }
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

    let graph = config.upstream.transport == crate::config::TransportKind::Graph;
    let role = if graph { MAIL_SEND } else { SEND_AS_APP };
    let has_role = roles.as_ref().is_some_and(|r| r.iter().any(|x| x == role));
    if !has_role && graph {
        warnings.push(format!("the token has no {MAIL_SEND} role"));
        fixes.push(format!(
            "In App registrations > your app > API permissions add Microsoft Graph > Application \
             permissions > {MAIL_SEND} and Grant admin consent; the role appears in new tokens a few \
             minutes later. Exception: with RBAC for Applications in Exchange (New-ManagementRoleAssignment \
             -Role \"Application {MAIL_SEND}\") the token carries no role and this is expected; \
             Test-ServicePrincipalAuthorization -Identity <client_id> -Resource <mail_account> shows \
             whether the assignment covers the mailbox."
        ));
    } else if !has_role {
        warnings.push(format!("the token has no {SEND_AS_APP} role"));
        fixes.push(format!(
            "In App registrations > your app > API permissions add Office 365 Exchange Online > Application \
             permissions > {SEND_AS_APP} and Grant admin consent; the role appears in new tokens a few minutes \
             later. Exception: with RBAC for Applications in Exchange the token carries no role and this is \
             expected; to tell, run Get-ManagementRoleAssignment -Role \"Application {SEND_AS_APP}\" in \
             Exchange Online PowerShell: RBAC is in use if it lists the app's service principal."
        ));
    }
    let large = graph && config.upstream.graph_large_messages;
    let has_read_write = roles
        .as_ref()
        .is_some_and(|r| r.iter().any(|x| x == MAIL_READ_WRITE));
    // No roles at all is RBAC for Applications (or nothing granted): the Mail.Send warning
    // above already says so; the permission step probes the draft either way.
    if large && roles.as_ref().is_some_and(|r| !r.is_empty()) && !has_read_write {
        warnings.push(format!(
            "the token has no {MAIL_READ_WRITE} role, which upstream.graph_large_messages needs"
        ));
        fixes.push(
            crate::deliver::classify::HoldCause::GraphReadWriteDenied
                .fix()
                .to_string(),
        );
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
    const GRAPH_AUDIENCES: [&str; 4] = [
        "https://graph.microsoft.com",
        "https://graph.microsoft.us",
        "https://dod-graph.microsoft.us",
        "https://microsoftgraph.chinacloudapi.cn",
    ];
    let aud_trim = aud.trim_end_matches('/');
    if graph {
        if !GRAPH_AUDIENCES
            .iter()
            .any(|a| a.eq_ignore_ascii_case(aud_trim))
        {
            warnings.push(format!("aud `{aud}` is not Microsoft Graph"));
            fixes.push(
                "Remove oauth.scope (or set it to https://graph.microsoft.com/.default, or your cloud's \
                 Graph): Graph refuses tokens for another resource (InvalidAuthenticationToken, Invalid \
                 audience)."
                    .into(),
            );
        }
    } else if !aud_trim.eq_ignore_ascii_case(&expected_aud)
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
        oid,
    }
}

pub(super) fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}
