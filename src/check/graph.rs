//! Steps 4 to 6 for the Graph transport: the Graph host over HTTPS, the `sendMail` permission
//! for the mail account, and (with `--send-to`) a real test message through the transport the
//! deliverer uses. Fixes name the Graph permission and the RBAC for Applications cmdlets.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::*;
use crate::config::looks_like_address;
use crate::deliver::classify::{HoldCause, Outcome, classify_graph};
use crate::deliver::{Token, TokenFuture, TokenSource};
use crate::oauth::AccessToken;
use crate::transport::graph::{GraphSettings, GraphTransport, http_client};
use crate::transport::{Reply, Submission, Transport};

/// The token `check` obtained, as the transport's token source (no refresher in `check`).
struct Fixed(Token);

impl TokenSource for Fixed {
    fn token(&self) -> TokenFuture<'_> {
        let t = self.0.clone();
        Box::pin(async move { Ok(t) })
    }
    fn refresh(&self) -> TokenFuture<'_> {
        self.token()
    }
}

pub(super) async fn steps(
    config: &Config,
    options: &CheckOptions,
    names: &Names,
    token: &AccessToken,
    lacks_role: bool,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let later = ["permission", "send"];
    let mut settings = match GraphSettings::from_config(config) {
        Ok(s) => s,
        Err(e) => {
            steps.push(Step::failed(
                "https",
                e,
                "Fix upstream.graph_url (or remove it to derive it from upstream.cloud).",
            ));
            steps.extend(later.iter().map(|s| Step::skipped(s, SKIPPED)));
            return steps;
        }
    };
    // An admin is waiting at the terminal.
    let limit = options
        .timeouts
        .as_ref()
        .map_or(Duration::from_secs(30), |t| t.data_end);
    settings.connect_timeout = options
        .timeouts
        .as_ref()
        .map_or(Duration::from_secs(15), |t| t.connect);
    settings.request_timeout = limit;

    match reach(&settings).await {
        Ok(step) => steps.push(step),
        Err(step) => {
            steps.push(step);
            steps.extend(later.iter().map(|s| Step::skipped(s, SKIPPED)));
            return steps;
        }
    }
    match permission(&settings, token, names, lacks_role).await {
        Ok(step) => steps.push(step),
        Err(step) => {
            steps.push(step);
            steps.push(Step::skipped("send", SKIPPED));
            return steps;
        }
    }
    match &options.send_to {
        None => steps.push(Step::skipped(
            "send",
            "not requested: add --send-to ADDRESS to send a real test message",
        )),
        Some(to) => steps.push(send_test(settings, token, names, to).await),
    }
    steps
}

/// Step 4: the Graph host answers over HTTPS with a certificate that verifies (any HTTP
/// status will do: the request carries no token).
async fn reach(settings: &GraphSettings) -> Result<Step, Step> {
    let host = url::Url::parse(&settings.graph_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_else(|| settings.graph_url.clone());
    let fix = format!(
        "Check that this host can reach {host} over HTTPS (port 443: DNS, firewall, proxy), and \
         upstream.graph_url and upstream.ca_file if you set them."
    );
    let http = http_client(settings).map_err(|e| Step::failed("https", e, fix.clone()))?;
    let url = format!("{}/v1.0/", settings.graph_url);
    match http.get(&url).send().await {
        Ok(resp) => Ok(Step::ok(
            "https",
            format!(
                "{} answered HTTP {} to a request without a token{}",
                settings.graph_url,
                resp.status().as_u16(),
                if settings.graph_url.starts_with("https://") {
                    " (certificate verified)"
                } else {
                    ""
                }
            ),
        )),
        Err(e) => Err(Step::failed(
            "https",
            format!("cannot reach {}: {e}", settings.graph_url),
            fix,
        )),
    }
}

/// Step 5: `sendMail` for the mail account with the token, and no message in it. Graph checks
/// the token, the mailbox and the permission before the content [INF: graph-transport.md does
/// not document the order; the simulator follows it], so an answer about the content means
/// everything before it passed, and nothing was sent.
async fn permission(
    settings: &GraphSettings,
    token: &AccessToken,
    names: &Names,
    lacks_role: bool,
) -> Result<Step, Step> {
    let fix_of = |e: String| Step::failed("permission", e, "Fix upstream.graph_url.");
    let http = http_client(settings).map_err(fix_of)?;
    let url = settings.send_mail_url().map_err(fix_of)?;
    let (status, code, shown) = probe(&http, url, token, "sendMail").await?;
    let content_refused = status == 400
        && matches!(
            code.as_deref(),
            Some(
                "ErrorMimeContentInvalidBase64String"
                    | "ErrorMimeContentInvalid"
                    | "ErrorInvalidRecipients"
            )
        );
    if content_refused {
        let mut detail = format!(
            "Graph accepted the token for {} and refused only the empty test request ({shown}): \
             the app may send as this mailbox; nothing was sent",
            names.mailbox
        );
        if settings.large_messages {
            detail.push_str("; ");
            detail.push_str(&draft_permission(settings, &http, token, names).await?);
        }
        return Ok(Step::ok("permission", detail));
    }
    let fix = match classify_graph(status, code.as_deref()) {
        Outcome::Hold(cause) => names.fill(cause.fix()),
        Outcome::Retry { .. } => {
            "Graph answered with a temporary error; run check again in a few minutes.".into()
        }
        _ if lacks_role => {
            names.fill(crate::deliver::classify::HoldCause::GraphNoPermissions.fix())
        }
        _ => "Graph refused the request; the answer above names the reason.".into(),
    };
    Err(Step::failed(
        "permission",
        format!("Graph answered sendMail for {} with {shown}", names.mailbox),
        fix,
    ))
}

/// With `upstream.graph_large_messages`: a draft (`POST …/messages`) with no message in it, the
/// way the sendMail probe works. A 403 means no `Mail.ReadWrite` (or no RBAC role covering the
/// mailbox); an answer about the content means the draft would be made. Nothing is created.
async fn draft_permission(
    settings: &GraphSettings,
    http: &reqwest::Client,
    token: &AccessToken,
    names: &Names,
) -> Result<String, Step> {
    let url = settings
        .user_url(&["messages"])
        .map_err(|e| Step::failed("permission", e, "Fix upstream.graph_url."))?;
    let (status, code, shown) = probe(http, url, token, "draft").await?;
    if status == 400 {
        return Ok(format!(
            "large messages: Graph would create drafts for {} (Mail.ReadWrite; {shown} to the empty \
             test draft, nothing created)",
            names.mailbox
        ));
    }
    let fix = match classify_graph(status, code.as_deref()) {
        Outcome::Hold(HoldCause::GraphAccessDenied)
        | Outcome::Hold(HoldCause::GraphNoPermissions) => {
            names.fill(HoldCause::GraphReadWriteDenied.fix())
        }
        Outcome::Hold(cause) => names.fill(cause.fix()),
        Outcome::Retry { .. } => {
            "Graph answered with a temporary error; run check again in a few minutes.".into()
        }
        _ => "Graph refused the request; the answer above names the reason.".into(),
    };
    Err(Step::failed(
        "permission",
        format!(
            "upstream.graph_large_messages is on, and Graph answered a draft for {} with {shown}: \
             messages larger than sendMail takes would be held",
            names.mailbox
        ),
        fix,
    ))
}

/// Step 6: a real message through the deliverer's Graph transport.
async fn send_test(settings: GraphSettings, token: &AccessToken, names: &Names, to: &str) -> Step {
    if !looks_like_address(to) {
        return Step::failed(
            "send",
            format!("--send-to `{to}` is not an e-mail address"),
            "Pass an address that can receive mail, e.g. --send-to you@contoso.com.",
        );
    }
    let tokens = Arc::new(Fixed(Token {
        value: token.secret().to_string(),
        expires_at: token.expires_at,
    }));
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let transport = match GraphTransport::new(settings, tokens, metrics) {
        Ok(t) => t,
        Err(e) => return Step::failed("send", e, "Fix upstream.graph_url or upstream.ca_file."),
    };
    let body = crate::spool::MessageBody::from_bytes(super::smtp::test_message(
        &names.from,
        to,
        &names.mailbox,
        "through Microsoft Graph sendMail",
        " A copy is in Sent Items.",
    ));
    let envelope = crate::spool::Envelope {
        mail_from: names.from.clone(),
        mail_params: Default::default(),
        recipients: vec![crate::spool::Recipient::new(to)],
        client: "smtp-oauth-relay check".into(),
        helo: "check".into(),
        auth_user: None,
        received_at: SystemTime::now(),
        route: crate::routes::DEFAULT_ROUTE.into(),
    };
    let recipients = [to.to_string()];
    let attempted = transport
        .send(Submission {
            id: "check",
            envelope: &envelope,
            mail_from: &names.from,
            recipients: &recipients,
            body: &body,
        })
        .await;
    let class = attempted
        .recipients
        .first()
        .map_or(Outcome::Failed, |r| r.class);
    let summary = attempted.summary.to_string();
    match class {
        Outcome::Delivered => Step::ok(
            "send",
            format!(
                "test message from {} to {to}: {summary}. Exchange sends it now; a non-delivery \
                 report, if any, arrives in the Inbox of {}",
                names.from, names.mailbox
            ),
        ),
        Outcome::Hold(cause) => Step::failed("send", summary, names.fill(cause.fix())),
        Outcome::Retry { .. } => Step::failed(
            "send",
            summary,
            "Graph answered with a temporary error; run check again in a few minutes.",
        ),
        Outcome::Failed => Step::failed(
            "send",
            summary,
            match attempted.summary {
                Reply::Refused(_) => "The relay refused the test message itself; see above.",
                _ => "Graph refused the test message; the answer above names the reason.",
            },
        ),
    }
}

/// A POST of one invalid byte (nothing is sent or created) that shows what Graph lets this token
/// do: the status, Graph's error code and both as text.
async fn probe(
    http: &reqwest::Client,
    url: url::Url,
    token: &AccessToken,
    what: &str,
) -> Result<(u16, Option<String>, String), Step> {
    let resp = http
        .post(url)
        .bearer_auth(token.secret())
        .header(reqwest::header::CONTENT_TYPE, "text/plain")
        .body("!")
        .send()
        .await
        .map_err(|e| {
            Step::failed(
                "permission",
                format!("{what} request failed: {e}"),
                "Run check again; if it keeps failing, check proxies between this host and Graph.",
            )
        })?;
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap_or_default();
    let code = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|j| j["error"]["code"].as_str().map(str::to_string));
    let shown = format!(
        "HTTP {status}{}",
        code.as_deref().map(|c| format!(" {c}")).unwrap_or_default()
    );
    Ok((status, code, shown))
}
