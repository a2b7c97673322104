//! Simulated Microsoft Graph `sendMail` with MIME (reference `graph-transport.md` §1, §3):
//! `POST /v1.0/users/{id|UPN}/sendMail`, `Content-Type: text/plain`, a base64 body. Checks the
//! token as Graph does (our signature, a Graph audience, not expired, our tenant), the
//! `Mail.Send` role (or, in RBAC mode, the mailbox grant), the mailbox, the From it may send
//! as, the recipients (Graph has no envelope: To/Cc/Bcc are the recipients) and the size.
//! Accepted MIME lands in the mailbox folder like an SMTP delivery, as `transfer = "GRAPH"`.
//! Shares no code with the relay's transport: its header reading is its own.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Value, json};

use super::config::{MAIL_SEND_ROLE, SimConfig};
use super::control::{GraphFault, Shared};
use super::mailbox::{Envelope, Mailbox};
use super::util::{guid, iso_millis, unix_now};

/// Audiences Graph accepts: each cloud's Graph root, and Graph's application id.
const GRAPH_AUDIENCES: [&str; 5] = [
    "https://graph.microsoft.com",
    "https://graph.microsoft.us",
    "https://dod-graph.microsoft.us",
    "https://microsoftgraph.chinacloudapi.cn",
    "00000003-0000-0000-c000-000000000000",
];

#[derive(Clone)]
pub(super) struct GraphState {
    pub(super) shared: Arc<Shared>,
    pub(super) mailbox: Arc<Mailbox>,
}

pub(crate) fn router(shared: Arc<Shared>, mailbox: Arc<Mailbox>) -> Router {
    Router::new()
        .route("/v1.0/users/{user}/sendMail", post(send_mail))
        .route(
            "/v1.0/users/{user}/messages",
            post(super::graph_large::create_draft),
        )
        .route(
            "/v1.0/users/{user}/messages/{id}",
            axum::routing::delete(super::graph_large::delete_draft),
        )
        .route(
            "/v1.0/users/{user}/messages/{id}/attachments/createUploadSession",
            post(super::graph_large::create_upload_session),
        )
        .route(
            "/v1.0/users/{user}/messages/{id}/send",
            post(super::graph_large::send_draft),
        )
        .route(
            "/upload/{session}",
            axum::routing::put(super::graph_large::upload),
        )
        // The size check is Graph's own (413), not the framework's 2 MB default.
        .layer(DefaultBodyLimit::max(256 * 1024 * 1024))
        .with_state(GraphState { shared, mailbox })
}

/// Graph's error shape: `{"error":{"code","message","innerError":{"request-id","date"}}}`.
pub(super) fn error(status: u16, code: &str, message: &str, retry_after: Option<u64>) -> Response {
    let request_id = guid();
    let body = json!({
        "error": {
            "code": code,
            "message": message,
            "innerError": { "request-id": request_id, "date": iso_millis(), "client-request-id": request_id },
        }
    });
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, body.to_string()).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        h.insert("request-id", v);
    }
    if let Some(secs) = retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

pub(super) fn accepted(retry_after: Option<u64>) -> Response {
    let mut resp = StatusCode::ACCEPTED.into_response();
    if let Ok(v) = HeaderValue::from_str(&guid()) {
        resp.headers_mut().insert("request-id", v);
    }
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// Leaves the in-flight count when the request ends, however it ends.
pub(super) struct InFlight<'a> {
    pub(super) shared: &'a Shared,
    pub(super) mailbox: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.shared.graph_leave(&self.mailbox);
    }
}

async fn send_mail(
    State(st): State<GraphState>,
    Path(user): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let shared = &st.shared;
    shared.graph_requests.fetch_add(1, Ordering::Relaxed);
    let cfg = shared.config();
    let in_flight = shared.graph_enter(&user);
    let _leave = InFlight {
        shared,
        mailbox: user.clone(),
    };
    if in_flight > cfg.graph.concurrency_per_mailbox {
        return error(
            429,
            "ApplicationThrottled",
            "Application is over its MailboxConcurrency limit.",
            Some(1),
        );
    }
    let fault = shared.next_graph_fault();
    if let Some(GraphFault::Error {
        status,
        code,
        message,
        retry_after,
    }) = &fault
    {
        return error(*status, code, message, *retry_after);
    }
    let checked = match check(shared, &cfg, &user, &headers, &body) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let envelope = Envelope {
        id: format!("{}@graph.sim", guid()),
        seq: 0,
        received_at: 0,
        auth_user: checked.mailbox.clone(),
        client_id: checked.appid,
        mail_from: checked.mailbox,
        mail_params: String::new(),
        rcpt_to: checked.recipients,
        transfer: "GRAPH".into(),
        size: 0,
    };
    if let Err(e) = st.mailbox.store(envelope, &checked.mime).await {
        tracing::warn!(error = %e, "simulator: cannot store a Graph message");
        return error(
            500,
            "ErrorInternalServerError",
            "An internal server error occurred. The operation failed.",
            None,
        );
    }
    match fault {
        Some(GraphFault::KeepThenError { status }) => error(
            status,
            if status == 504 {
                "UnknownError"
            } else {
                "ErrorInternalServerError"
            },
            "",
            None,
        ),
        Some(GraphFault::AcceptedWithRetryAfter { secs }) => accepted(Some(secs)),
        Some(GraphFault::KeepThenStall(d)) => {
            tokio::time::sleep(d).await;
            accepted(None)
        }
        _ => accepted(None),
    }
}

struct Checked {
    mailbox: String,
    appid: String,
    recipients: Vec<String>,
    mime: Vec<u8>,
}

/// Everything Graph checks before it saves the draft, in its order.
fn check(
    shared: &Shared,
    cfg: &SimConfig,
    user: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Checked, Box<Response>> {
    check_inner(shared, cfg, user, headers, body).map_err(Box::new)
}

#[allow(clippy::result_large_err)] // Boxed once, by `check`.
fn check_inner(
    shared: &Shared,
    cfg: &SimConfig,
    user: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Checked, Response> {
    let (mailbox, appid) = authorize(shared, cfg, user, headers, MAIL_SEND_ROLE)?;
    let (mime, recipients) = content(headers, body, cfg.graph.max_request_bytes)?;
    check_send_as(&mime, &mailbox)?;
    Ok(Checked {
        mailbox: mailbox.address.clone(),
        appid,
        recipients,
        mime,
    })
}

/// The token (signature, audience, lifetime, tenant), the mailbox in the URL and the
/// application permission `role` (in RBAC mode: the mailbox grant), as Graph checks them
/// first. Returns the mailbox and the caller's app id.
#[allow(clippy::result_large_err)] // Every caller answers with the response at once.
pub(super) fn authorize(
    shared: &Shared,
    cfg: &SimConfig,
    user: &str,
    headers: &HeaderMap,
    role: &str,
) -> Result<(super::config::MailboxConfig, String), Response> {
    let bad_token = |msg: &str| error(401, "InvalidAuthenticationToken", msg, None);
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad_token("Access token is empty."))?;
    let claims = {
        let mut validation = Validation::new(Algorithm::RS256);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        jsonwebtoken::decode::<Value>(bearer, &shared.signing_key.decoding, &validation)
            .map_err(|_| bad_token("CompactToken parsing failed with error code: 80049217"))?
            .claims
    };
    let exp = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
    if exp <= unix_now() {
        return Err(bad_token(
            "Lifetime validation failed, the token is expired.",
        ));
    }
    let aud = claims.get("aud").and_then(Value::as_str).unwrap_or("");
    if !GRAPH_AUDIENCES
        .iter()
        .any(|a| a.eq_ignore_ascii_case(aud.trim_end_matches('/')))
    {
        return Err(bad_token(
            "Access token validation failure. Invalid audience.",
        ));
    }
    let tid = claims.get("tid").and_then(Value::as_str).unwrap_or("");
    if !tid.eq_ignore_ascii_case(&cfg.tenant_id) {
        return Err(bad_token("Access token validation failure."));
    }
    let appid = claims
        .get("appid")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let roles: Option<Vec<&str>> = claims
        .get("roles")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect());

    let Some(mailbox) = cfg.mailbox(user) else {
        return Err(error(
            404,
            "ErrorInvalidUser",
            &format!("The requested user '{user}' is invalid."),
            None,
        ));
    };
    let has_role = roles.as_ref().is_some_and(|r| r.contains(&role));
    if cfg.graph.rbac_mode {
        // An RBAC assignment scoped to the mailbox: the grant decides, not the token.
        if !mailbox.full_access {
            return Err(error(
                403,
                "ErrorAccessDenied",
                "Access is denied. Check credentials and try again.",
                None,
            ));
        }
    } else {
        match &roles {
            None => {
                return Err(error(
                    401,
                    "NoPermissionsInAccessToken",
                    "The token contains no permissions, or permissions can not be understood.",
                    None,
                ));
            }
            Some(_) if !has_role => {
                return Err(error(
                    403,
                    "ErrorAccessDenied",
                    "Access is denied. Check credentials and try again.",
                    None,
                ));
            }
            Some(_) => {}
        }
    }
    Ok((mailbox.clone(), appid))
}

/// The MIME of a `text/plain` base64 body (sendMail, a draft): decoded, with its recipients
/// (Graph has no envelope: To/Cc/Bcc).
#[allow(clippy::result_large_err)] // Every caller answers with the response at once.
pub(super) fn content(
    headers: &HeaderMap,
    body: &[u8],
    max_request_bytes: u64,
) -> Result<(Vec<u8>, Vec<String>), Response> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.to_ascii_lowercase().starts_with("text/plain") {
        return Err(error(
            400,
            "ErrorInvalidRequest",
            "Use application/json for a JSON object and text/plain for MIME content.",
            None,
        ));
    }
    if body.len() as u64 > max_request_bytes {
        return Err(error(
            413,
            "RequestEntityTooLarge",
            "Request Entity Too Large",
            None,
        ));
    }
    // The documentation's example wraps the base64 at 76 columns: white space is allowed.
    let compact: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let mime = base64::engine::general_purpose::STANDARD
        .decode(&compact)
        .map_err(|_| {
            error(
                400,
                "ErrorMimeContentInvalidBase64String",
                "Invalid base64 string for MIME content.",
                None,
            )
        })?;
    let fields = header_fields(&mime).ok_or_else(|| {
        error(
            400,
            "ErrorMimeContentInvalid",
            "MIME content does not contain all required information, malformed formatting, or empty.",
            None,
        )
    })?;
    let mut recipients = Vec::new();
    for (name, value) in &fields {
        if matches!(name.to_ascii_lowercase().as_str(), "to" | "cc" | "bcc") {
            recipients.extend(addresses(value));
        }
    }
    if recipients.is_empty() {
        return Err(error(
            400,
            "ErrorInvalidRecipients",
            "At least one recipient is not valid., Recipient '' is not resolved. All recipients must \
             be resolved before a message can be submitted.",
            None,
        ));
    }
    Ok((mime, recipients))
}

/// No From: Exchange sends as the mailbox. Otherwise the mailbox or a SendAs grant.
#[allow(clippy::result_large_err)] // Every caller answers with the response at once.
pub(super) fn check_send_as(
    mime: &[u8],
    mailbox: &super::config::MailboxConfig,
) -> Result<(), Response> {
    let from = header_fields(mime).and_then(|fields| {
        fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("from"))
            .and_then(|(_, v)| addresses(v).into_iter().next())
    });
    if let Some(from) = &from {
        let allowed = from.eq_ignore_ascii_case(&mailbox.address)
            || mailbox.send_as.iter().any(|a| a.eq_ignore_ascii_case(from));
        if !allowed {
            return Err(error(
                403,
                "ErrorSendAsDenied",
                "The user account which was used to submit this request does not have the right to \
                 send mail on behalf of the specified sending account., Cannot submit message.",
                None,
            ));
        }
    }
    Ok(())
}

/// The header fields (name, unfolded value) of a MIME message; `None` when there is no header
/// section (empty, or no field before the first empty line).
pub(super) fn header_fields(mime: &[u8]) -> Option<Vec<(String, String)>> {
    let text = String::from_utf8_lossy(mime);
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
            continue;
        }
        let (name, value) = line.split_once(':')?;
        fields.push((name.trim().to_string(), value.trim().to_string()));
    }
    (!fields.is_empty()).then_some(fields)
}

/// The addresses of an address-list value: `<a@b>` forms, else bare words with an `@`; quoted
/// display names and comments are skipped, groups flattened.
pub(super) fn addresses(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut quoted = false;
    let mut depth = 0u32;
    let mut cleaned = String::new();
    for c in value.chars() {
        match c {
            '"' if depth == 0 => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => depth -= 1,
            _ if quoted || depth > 0 => {}
            c => cleaned.push(c),
        }
    }
    for part in cleaned.split([',', ';']) {
        let part = part.rsplit(':').next().unwrap_or(part);
        let addr = match (part.find('<'), part.find('>')) {
            (Some(a), Some(b)) if a < b => part[a + 1..b].trim(),
            _ => part.trim(),
        };
        if addr.contains('@') && !addr.contains(char::is_whitespace) {
            out.push(addr.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_of_header_values() {
        assert_eq!(
            addresses(
                "\"Doe, J\" <j@x.example>, k@y.example (Kay), Team: a@z.example, b@z.example;"
            ),
            ["j@x.example", "k@y.example", "a@z.example", "b@z.example"]
        );
        assert!(addresses("undisclosed-recipients:;").is_empty());
    }

    #[test]
    fn header_fields_unfold_and_stop_at_the_body() {
        let f = header_fields(
            b"To: a@x.example,\r\n b@x.example\r\nSubject: s\r\n\r\nTo: c@x.example\r\n",
        )
        .unwrap();
        assert_eq!(f[0], ("To".into(), "a@x.example, b@x.example".into()));
        assert_eq!(f.len(), 2);
        assert!(header_fields(b"").is_none());
        assert!(header_fields(b"just text\r\n").is_none());
    }
}
