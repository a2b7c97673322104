//! Microsoft Graph `sendMail` with the MIME message: the second [`Transport`] (reference
//! `graph-transport.md`).
//!
//! `POST {graph_url}/v1.0/users/{mail_account}/sendMail`, `Content-Type: text/plain`, the body
//! the base64 of the message, a bearer token from the same [`TokenSource`] as SMTP (its scope is
//! Graph's, see `oauth::cloud`). What only Graph has lives here:
//!
//! - **No envelope.** Graph delivers to To/Cc/Bcc. Envelope recipients missing there are added
//!   as `Bcc:`; header recipients outside the envelope follow `upstream.graph_extra_recipients`
//!   (refuse: the message fails before anything is sent; send: a warning names them).
//! - **202 means queued**, not delivered: Exchange saved the message and will send it; bad
//!   recipients come back later as non-delivery reports in the mailbox's Inbox, never here. A
//!   202 is final, even with a `Retry-After` (retrying it duplicates).
//! - **At most 4 requests in flight** per mailbox (Graph's MailboxConcurrency limit), whatever
//!   the pacer allows; `429`/`503` with `Retry-After` reach the scheduler as the earliest retry.
//! - **Possible duplicates.** A timeout, a dropped connection or a 5xx other than 503 after the
//!   request was sent may still deliver (there is no idempotency key): reported as `after_dot`.
//! - **401 `InvalidAuthenticationToken`**: one forced token refresh and one more request, then a
//!   hold with the fix.
//! - **Size**: `sendMail` takes about 4 MB of base64, so at most [`SENDMAIL_MAX_RAW`] bytes of
//!   message. Larger ones go through a draft and upload sessions ([`large`]) when
//!   `upstream.graph_large_messages` is on; otherwise they are refused at accept (`inbound`)
//!   and, should one be in the spool already, failed here before sending.

mod large;
pub mod split;

pub use large::UPLOAD_PIECE;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use tokio::sync::Semaphore;

use super::{AfterDot, Attempted, GraphReply, Reply, Submission, Transport, TransportFuture};
use crate::config::{Config, ExtraRecipients};
use crate::deliver::TokenSource;
use crate::deliver::classify::{HoldCause, Outcome, classify_graph};
use crate::deliver::pacer::Progress;
use crate::deliver::reply::{Enhanced, UpstreamReply};
use crate::headers::{HeaderName, Headers};
use crate::metrics::Metrics;

/// The largest message sent with `sendMail`: its base64 (4/3 of it) stays within the 4 MiB
/// request Graph takes (graph-transport.md §1.5: "plan on ≤ ~3 MB raw").
pub const SENDMAIL_MAX_RAW: u64 = 3 * 1024 * 1024;
/// Graph's concurrency limit per app and mailbox (§3.1).
pub const MAX_CONCURRENT_REQUESTS: usize = 4;
/// The body of an error response kept for its `error.code` (Graph's are a few hundred bytes).
const MAX_ERROR_BODY: usize = 64 * 1024;

/// What the Graph transport needs, built from the configuration in one place.
#[derive(Debug, Clone)]
pub struct GraphSettings {
    /// `https://graph.microsoft.com` (no trailing slash).
    pub graph_url: String,
    /// The mailbox in the URL: the sender (`upstream.mail_account`).
    pub mailbox: String,
    pub extra_recipients: ExtraRecipients,
    /// `upstream.graph_large_messages`: messages above [`SENDMAIL_MAX_RAW`] go through a draft
    /// and upload sessions ([`large`]).
    pub large_messages: bool,
    pub connect_timeout: Duration,
    /// The whole request, upload and answer; a timeout after sending is a possible duplicate.
    pub request_timeout: Duration,
    /// Extra PEM roots (`upstream.ca_file`).
    pub ca_file: Option<std::path::PathBuf>,
}

impl GraphSettings {
    /// The settings `serve` uses: the derived or configured Graph root, 10 s to connect and
    /// 2 minutes per request (SMTP2Graph's figures; JustinIven's relay hung without one).
    pub fn from_config(config: &Config) -> Result<GraphSettings, String> {
        let endpoints = crate::oauth::endpoints(config).map_err(|e| e.to_string())?;
        Ok(GraphSettings {
            graph_url: endpoints.graph_url,
            mailbox: config.upstream.mail_account.clone().unwrap_or_default(),
            extra_recipients: config.upstream.graph_extra_recipients,
            large_messages: config.upstream.graph_large_messages,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            ca_file: config.upstream.ca_file.clone(),
        })
    }

    /// `{graph_url}/v1.0/users/{mailbox}/sendMail`, the mailbox percent-encoded as one segment.
    pub fn send_mail_url(&self) -> Result<url::Url, String> {
        self.user_url(&["sendMail"])
    }

    /// `{graph_url}/v1.0/users/{mailbox}/{rest...}`, each piece percent-encoded as one segment.
    pub fn user_url(&self, rest: &[&str]) -> Result<url::Url, String> {
        let mut url = url::Url::parse(&self.graph_url)
            .map_err(|e| format!("upstream.graph_url is not a URL ({e})"))?;
        url.path_segments_mut()
            .map_err(|()| "upstream.graph_url cannot have a path".to_string())?
            .pop_if_empty()
            .extend(["v1.0", "users", &self.mailbox])
            .extend(rest);
        Ok(url)
    }
}

pub struct GraphTransport {
    current: RwLock<Arc<Current>>,
    tokens: Arc<dyn TokenSource>,
    metrics: Arc<Metrics>,
    /// Graph's MailboxConcurrency limit, kept here whatever the pacer allows.
    permits: Semaphore,
    /// The meaning of 202 is logged once at info, then at debug.
    explained: AtomicBool,
}

struct Current {
    settings: GraphSettings,
    http: reqwest::Client,
    url: url::Url,
}

/// The HTTP client for Graph: the settings' timeouts and CA roots, no redirects (a redirect
/// would carry the token elsewhere). `check` uses it too.
pub fn http_client(settings: &GraphSettings) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(settings.connect_timeout)
        .timeout(settings.request_timeout)
        // A redirect would carry the token elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("smtp-oauth-relay/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = &settings.ca_file {
        let pem =
            std::fs::read(ca).map_err(|e| format!("upstream.ca_file {}: {e}", ca.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("upstream.ca_file {}: {e}", ca.display()))?;
        builder = builder.tls_certs_merge(certs);
    }
    builder
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

impl Current {
    fn new(settings: GraphSettings) -> Result<Current, String> {
        let http = http_client(&settings)?;
        let url = settings.send_mail_url()?;
        Ok(Current {
            settings,
            http,
            url,
        })
    }
}

impl GraphTransport {
    pub fn new(
        settings: GraphSettings,
        tokens: Arc<dyn TokenSource>,
        metrics: Arc<Metrics>,
    ) -> Result<GraphTransport, String> {
        Ok(GraphTransport {
            current: RwLock::new(Arc::new(Current::new(settings)?)),
            tokens,
            metrics,
            permits: Semaphore::new(MAX_CONCURRENT_REQUESTS),
            explained: AtomicBool::new(false),
        })
    }

    /// New settings (a reload): the next requests use them.
    pub fn reconfigure(&self, settings: GraphSettings) -> Result<(), String> {
        let next = Arc::new(Current::new(settings)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        tracing::info!("Graph settings reloaded: new requests use them");
        Ok(())
    }

    fn current(&self) -> Arc<Current> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn attempt(&self, submission: Submission<'_>) -> Attempted {
        let count = submission.recipients.len();
        let current = self.current();
        // The recipients live in the header section, which is in memory: the rest of a large
        // message is never read for this.
        let prepared = match prepare_head(
            submission.body.head(),
            submission.envelope,
            submission.recipients,
            current.settings.extra_recipients,
        ) {
            Ok(p) => p,
            Err(refusal) => {
                tracing::warn!(id = %submission.id, reply = %refusal, "message refused before sending to Graph");
                return Attempted::all(
                    count,
                    Outcome::Failed,
                    Reply::Refused(refusal),
                    Progress::Transaction,
                );
            }
        };
        if !prepared.added_bcc.is_empty() {
            tracing::debug!(id = %submission.id, added = prepared.added_bcc.len(), "envelope recipients missing from To/Cc/Bcc added as Bcc");
        }
        if !prepared.extra.is_empty() {
            tracing::warn!(
                id = %submission.id,
                header_only = %prepared.extra.join(", "),
                "Graph delivers to To/Cc/Bcc: these header recipients are not in the envelope \
                 and get the message too (upstream.graph_extra_recipients = \"send\")"
            );
        }
        let body = submission.body.with_head(prepared.mime);
        let large = body.len() > SENDMAIL_MAX_RAW;
        if large && !current.settings.large_messages {
            let refusal = too_large(body.len());
            tracing::warn!(id = %submission.id, reply = %refusal, "message refused before sending to Graph");
            return Attempted::all(
                count,
                Outcome::Failed,
                Reply::Refused(refusal),
                Progress::Transaction,
            );
        }
        if large {
            let Ok(_permit) = self.permits.acquire().await else {
                return Attempted::all(
                    count,
                    Outcome::Retry { throttle: false },
                    Reply::Local("the Graph transport is closing".into()),
                    Progress::Token,
                );
            };
            return self.send_large(&submission, &current, &body, count).await;
        }
        let bytes = match message_bytes(&body).await {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(id = %submission.id, error = %e, "cannot read the message to send it");
                return Attempted::all(
                    count,
                    Outcome::Retry { throttle: false },
                    Reply::Local(format!("cannot read the message from the spool: {e}")),
                    Progress::Token,
                );
            }
        };
        // The permit is held for the whole request, so at most 4 are ever in flight.
        let Ok(_permit) = self.permits.acquire().await else {
            return Attempted::all(
                count,
                Outcome::Retry { throttle: false },
                Reply::Local("the Graph transport is closing".into()),
                Progress::Token,
            );
        };
        let body = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let mut refreshed = false;
        loop {
            let token = match self.tokens.token().await {
                Ok(t) => t,
                Err(f) => {
                    let class = if f.permanent {
                        Outcome::Hold(HoldCause::TokenRefused)
                    } else {
                        Outcome::Retry { throttle: false }
                    };
                    return Attempted::all(
                        count,
                        class,
                        Reply::Local(format!("token: {}", f.message)),
                        Progress::Token,
                    );
                }
            };
            let started = std::time::Instant::now();
            let sent = current
                .http
                .post(current.url.clone())
                .bearer_auth(&token.value)
                .header(reqwest::header::CONTENT_TYPE, "text/plain")
                .body(body.clone())
                .send()
                .await;
            let response = match sent {
                Ok(r) => r,
                Err(e) => {
                    self.metrics.transaction_seconds.observe(started.elapsed());
                    return request_failed(count, &e);
                }
            };
            let status = response.status().as_u16();
            let retry_after = retry_after(response.headers());
            let header_request_id = response
                .headers()
                .get("request-id")
                .and_then(|v| v.to_str().ok())
                .map(|v| {
                    crate::redact::scrub(v)
                        .chars()
                        .take(128)
                        .collect::<String>()
                });
            let body = read_bounded(response).await;
            self.metrics.transaction_seconds.observe(started.elapsed());
            let mut reply = parse_error(status, &body);
            reply.request_id = reply.request_id.or(header_request_id);
            if status == 401
                && reply.code.as_deref() == Some("InvalidAuthenticationToken")
                && !refreshed
            {
                // Expired or revoked: one fresh token, one more request (nothing was sent).
                tracing::info!(reply = %reply, "Graph refused the token: refreshing it and trying once more");
                refreshed = true;
                if let Err(f) = self.tokens.refresh().await {
                    tracing::warn!(error = %f.message, "token refresh after 401 failed");
                }
                continue;
            }
            return self.answered(&submission, count, reply, retry_after);
        }
    }

    /// The attempt as Graph answered it.
    fn answered(
        &self,
        submission: &Submission<'_>,
        count: usize,
        reply: GraphReply,
        retry_after: Option<Duration>,
    ) -> Attempted {
        let status = reply.status;
        let class = classify_graph(status, reply.code.as_deref());
        if class == Outcome::Delivered {
            if retry_after.is_some() {
                tracing::info!(id = %submission.id, "202 with Retry-After: final all the same (a retry would send the message twice)");
            }
            if !self.explained.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    "Graph answers 202 Accepted: Exchange saved the message (a copy stays in Sent \
                     Items) and will send it. It does not mean delivered: recipients are checked \
                     later, and bad ones come back as non-delivery reports in the Inbox of the \
                     mail account, not to the relay"
                );
            }
            tracing::debug!(id = %submission.id, "202 Accepted: queued by Exchange, not yet delivered");
        }
        // Graph may have taken the message although it answered with an error (MS Q&A 5629476,
        // 2286986): 503 and 429 are refusals before the message was taken, 4xx are decisions.
        let maybe_sent = status >= 500 && status != 503;
        let reply = Reply::Graph(reply);
        let mut attempted = Attempted::all(count, class, reply.clone(), Progress::Transaction);
        attempted.retry_after = retry_after.filter(|_| matches!(class, Outcome::Retry { .. }));
        if maybe_sent {
            attempted.after_dot = Some(AfterDot {
                dot_at: SystemTime::now(),
                what: reply.to_string(),
                upstream_id: None,
            });
        }
        attempted
    }
}

/// The whole message for sendMail, which takes the MIME whole (base64 in one request): called
/// only for messages within [`SENDMAIL_MAX_RAW`], so bounded by it.
async fn message_bytes(
    body: &crate::spool::MessageBody,
) -> Result<Vec<u8>, crate::spool::SpoolError> {
    let mut bytes = Vec::with_capacity(body.len() as usize);
    let mut reader = body.reader();
    while let Some(chunk) = reader.next_chunk().await? {
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// A request that got no answer. A failed connection sent nothing; anything later (a timeout,
/// a reset while sending or waiting) may have delivered.
fn request_failed(count: usize, error: &reqwest::Error) -> Attempted {
    let what = crate::redact::scrub(&if error.is_timeout() {
        format!("Graph request timed out: {error}")
    } else {
        format!("Graph request failed: {error}")
    });
    let reached = if error.is_connect() {
        Progress::Session
    } else {
        Progress::Transaction
    };
    let mut attempted = Attempted::all(
        count,
        Outcome::Retry { throttle: false },
        Reply::Local(what.clone()),
        reached,
    );
    if !error.is_connect() {
        attempted.after_dot = Some(AfterDot {
            dot_at: SystemTime::now(),
            what,
            upstream_id: None,
        });
    }
    attempted
}

/// `Retry-After` as seconds or an HTTP date (RFC 9110 §10.2.3).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

/// At most [`MAX_ERROR_BODY`] bytes of the response (a 202's is empty).
async fn read_bounded(response: reqwest::Response) -> Vec<u8> {
    read_limited(response, MAX_ERROR_BODY).await
}

/// At most `max` bytes of the response.
async fn read_limited(mut response: reqwest::Response, max: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = max.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= max {
            break;
        }
    }
    body
}

/// `{"error":{"code":"…","message":"…","innerError":{"request-id":"…"}}}`, whatever of it is there.
fn parse_error(status: u16, body: &[u8]) -> GraphReply {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let error = json.as_ref().and_then(|j| j.get("error"));
    // Upstream text: whatever secret it may echo (the token) is scrubbed before it is kept.
    let text = |v: Option<&serde_json::Value>| {
        v.and_then(serde_json::Value::as_str)
            // Scrubbed whole, then cut: a cut token would no longer be recognised.
            .map(|s| {
                crate::redact::scrub(s)
                    .chars()
                    .take(512)
                    .collect::<String>()
            })
            .filter(|s| !s.is_empty())
    };
    let inner = error.and_then(|e| e.get("innerError").or_else(|| e.get("innererror")));
    GraphReply {
        status,
        code: text(error.and_then(|e| e.get("code"))),
        message: text(error.and_then(|e| e.get("message"))),
        request_id: text(inner.and_then(|i| i.get("request-id"))),
    }
}

/// The MIME that goes to Graph and what was done to make it say what the envelope says.
#[derive(Debug)]
pub struct Prepared {
    pub mime: Vec<u8>,
    /// Envelope recipients that were missing from To/Cc/Bcc, now in `Bcc:`.
    pub added_bcc: Vec<String>,
    /// Header recipients outside the envelope (sent anyway: policy `send`).
    pub extra: Vec<String>,
}

/// Makes the header recipients match the envelope (Graph has no envelope, §1.6), as
/// [`prepare_head`] does, for a whole message; one over [`SENDMAIL_MAX_RAW`] is refused:
/// sendMail would refuse it.
pub fn prepare(
    body: &[u8],
    envelope: &crate::spool::Envelope,
    recipients: &[String],
    policy: ExtraRecipients,
) -> Result<Prepared, UpstreamReply> {
    let prepared = prepare_head(body, envelope, recipients, policy)?;
    if prepared.mime.len() as u64 > SENDMAIL_MAX_RAW {
        return Err(too_large(prepared.mime.len() as u64));
    }
    Ok(prepared)
}

/// The refusal of a message sendMail cannot take while the draft path is off.
fn too_large(len: u64) -> UpstreamReply {
    refusal(
        552,
        Enhanced::new(5, 3, 4),
        format!(
            "message of {len} bytes is larger than Graph sendMail takes ({SENDMAIL_MAX_RAW} \
             bytes); set upstream.graph_large_messages = true (needs Mail.ReadWrite) or send it \
             with upstream.transport = \"smtp\""
        ),
    )
}

/// Makes the header recipients match the envelope (Graph has no envelope, §1.6), given the
/// header section (`head`: the message's start, the whole message or just its header section):
/// `recipients` (still pending) missing from To/Cc/Bcc are added to `Bcc:` (the existing field
/// when there is one, else a new field below the trace block); header recipients that are not
/// envelope recipients at all are refused or kept, by `policy`. `mime` is `head` rewritten.
pub fn prepare_head(
    body: &[u8],
    envelope: &crate::spool::Envelope,
    recipients: &[String],
    policy: ExtraRecipients,
) -> Result<Prepared, UpstreamReply> {
    let headers = Headers::parse(body);
    let mut in_headers: Vec<String> = Vec::new();
    for name in [HeaderName::To, HeaderName::Cc, HeaderName::Bcc] {
        for field in headers.fields_named(&name) {
            in_headers.extend(
                field
                    .addresses()
                    .into_iter()
                    .flatten()
                    .map(str::to_ascii_lowercase),
            );
        }
    }
    let known = |a: &str| in_headers.iter().any(|h| h.eq_ignore_ascii_case(a));
    let added_bcc: Vec<String> =
        recipients
            .iter()
            .filter(|r| !known(r))
            .fold(Vec::new(), |mut v, r| {
                if !v.iter().any(|x: &String| x.eq_ignore_ascii_case(r)) {
                    v.push(r.clone());
                }
                v
            });
    let mut extra: Vec<String> = Vec::new();
    for h in &in_headers {
        let in_envelope = envelope
            .recipients
            .iter()
            .any(|r| r.address.eq_ignore_ascii_case(h));
        if !in_envelope && !extra.contains(h) {
            extra.push(h.clone());
        }
    }
    if !extra.is_empty() && policy == ExtraRecipients::Refuse {
        return Err(refusal(
            550,
            Enhanced::new(5, 7, 1),
            format!(
                "Graph has no envelope and would also deliver to {}, named in To/Cc/Bcc but not \
                 a recipient of this message; not sent (upstream.graph_extra_recipients = \
                 \"send\" sends such messages anyway)",
                extra.join(", ")
            ),
        ));
    }
    let mime = with_bcc(body, &headers, &added_bcc);
    Ok(Prepared {
        mime,
        added_bcc,
        extra,
    })
}

fn refusal(code: u16, enhanced: Enhanced, text: String) -> UpstreamReply {
    UpstreamReply {
        code,
        enhanced: Some(enhanced),
        text,
    }
}

/// `body` with `add` in its Bcc: appended to the first Bcc field, else a new field after the
/// trace block. One address per line (folded), so no line grows past the limit of RFC 5322.
fn with_bcc(body: &[u8], headers: &Headers<'_>, add: &[String]) -> Vec<u8> {
    if add.is_empty() {
        return body.to_vec();
    }
    let folded = add.join(",\r\n ");
    let mut out = Vec::with_capacity(body.len() + folded.len() + 16);
    match headers.field(&HeaderName::Bcc) {
        Some(field) => {
            let end = field.end();
            let value_end = if body[..end].ends_with(b"\r\n") {
                end - 2
            } else if body[..end].ends_with(b"\n") {
                end - 1
            } else {
                end
            };
            let empty = body[field.start()..value_end]
                .splitn(2, |b| *b == b':')
                .nth(1)
                .is_none_or(|v| v.iter().all(u8::is_ascii_whitespace));
            out.extend_from_slice(&body[..value_end]);
            out.extend_from_slice(if empty { b" " } else { b",\r\n " });
            out.extend_from_slice(folded.as_bytes());
            out.extend_from_slice(&body[value_end..]);
        }
        None => {
            let at = headers.trace_end();
            out.extend_from_slice(&body[..at]);
            out.extend_from_slice(b"Bcc: ");
            out.extend_from_slice(folded.as_bytes());
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&body[at..]);
        }
    }
    out
}

impl Transport for GraphTransport {
    fn send<'a>(&'a self, submission: Submission<'a>) -> TransportFuture<'a, Attempted> {
        Box::pin(self.attempt(submission))
    }

    fn close(&self) -> TransportFuture<'_, ()> {
        // HTTP connections need no goodbye.
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{Envelope, Recipient};

    fn envelope(rcpts: &[&str]) -> Envelope {
        Envelope {
            mail_from: "app@legacy.test".into(),
            mail_params: Default::default(),
            recipients: rcpts.iter().map(|r| Recipient::new(*r)).collect(),
            client: "test".into(),
            helo: "test".into(),
            auth_user: None,
            received_at: SystemTime::now(),
            route: "default".into(),
        }
    }

    fn pending(rcpts: &[&str]) -> Vec<String> {
        rcpts.iter().map(|r| r.to_string()).collect()
    }

    const MSG: &[u8] = b"Received: from x\r\n\tby y\r\nFrom: a@contoso.example\r\nTo: B <b@example.org>\r\nSubject: s\r\n\r\nbody\r\n";

    #[test]
    fn envelope_only_recipients_become_bcc_below_the_trace_block() {
        let rc = ["b@example.org", "c@example.org", "D@example.org"];
        let p = prepare(MSG, &envelope(&rc), &pending(&rc), ExtraRecipients::Refuse).unwrap();
        assert_eq!(p.added_bcc, ["c@example.org", "D@example.org"]);
        assert_eq!(
            String::from_utf8(p.mime).unwrap(),
            "Received: from x\r\n\tby y\r\nBcc: c@example.org,\r\n D@example.org\r\nFrom: a@contoso.example\r\nTo: B <b@example.org>\r\nSubject: s\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn an_existing_bcc_field_is_extended() {
        let msg =
            b"From: a@contoso.example\r\nTo: b@example.org\r\nBcc: e@example.org\r\n\r\nx\r\n";
        let rc = ["b@example.org", "e@example.org", "f@example.org"];
        let p = prepare(msg, &envelope(&rc), &pending(&rc), ExtraRecipients::Refuse).unwrap();
        assert_eq!(
            String::from_utf8(p.mime).unwrap(),
            "From: a@contoso.example\r\nTo: b@example.org\r\nBcc: e@example.org,\r\n f@example.org\r\n\r\nx\r\n"
        );
        let msg = b"From: a@contoso.example\r\nBcc:\r\n\r\nx\r\n";
        let rc = ["f@example.org"];
        let p = prepare(msg, &envelope(&rc), &pending(&rc), ExtraRecipients::Refuse).unwrap();
        assert_eq!(
            String::from_utf8(p.mime).unwrap(),
            "From: a@contoso.example\r\nBcc: f@example.org\r\n\r\nx\r\n"
        );
    }

    #[test]
    fn matching_headers_leave_the_bytes_alone() {
        let rc = ["B@EXAMPLE.ORG"];
        let p = prepare(MSG, &envelope(&rc), &pending(&rc), ExtraRecipients::Refuse).unwrap();
        assert_eq!(p.mime, MSG);
        assert!(p.added_bcc.is_empty() && p.extra.is_empty());
    }

    #[test]
    fn header_recipients_beyond_the_envelope_follow_the_policy() {
        let rc = ["c@example.org"];
        let e = prepare(MSG, &envelope(&rc), &pending(&rc), ExtraRecipients::Refuse).unwrap_err();
        assert_eq!((e.code, e.enhanced), (550, Some(Enhanced::new(5, 7, 1))));
        assert!(e.text.contains("b@example.org"), "{}", e.text);
        let p = prepare(MSG, &envelope(&rc), &pending(&rc), ExtraRecipients::Send).unwrap();
        assert_eq!(p.extra, ["b@example.org"]);
        assert_eq!(p.added_bcc, ["c@example.org"]);
    }

    #[test]
    fn too_large_for_sendmail_is_refused_with_552() {
        let mut msg = b"From: a@contoso.example\r\nTo: b@example.org\r\n\r\n".to_vec();
        msg.resize(SENDMAIL_MAX_RAW as usize + 1, b'x');
        let rc = ["b@example.org"];
        let e = prepare(&msg, &envelope(&rc), &pending(&rc), ExtraRecipients::Refuse).unwrap_err();
        assert_eq!((e.code, e.enhanced), (552, Some(Enhanced::new(5, 3, 4))));
    }

    #[test]
    fn the_url_names_the_mailbox_as_one_segment() {
        let mut s = GraphSettings {
            graph_url: "https://graph.microsoft.com".into(),
            mailbox: "relay@contoso.com".into(),
            extra_recipients: ExtraRecipients::Refuse,
            large_messages: false,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            ca_file: None,
        };
        assert_eq!(
            s.send_mail_url().unwrap().as_str(),
            "https://graph.microsoft.com/v1.0/users/relay@contoso.com/sendMail"
        );
        s.mailbox = "a/b?c#d@contoso.com".into();
        s.graph_url = "http://127.0.0.1:1234/".into();
        assert_eq!(
            s.send_mail_url().unwrap().as_str(),
            "http://127.0.0.1:1234/v1.0/users/a%2Fb%3Fc%23d@contoso.com/sendMail"
        );
    }

    #[test]
    fn error_bodies_and_retry_after_are_read() {
        let r = parse_error(
            429,
            br#"{"error":{"code":"ApplicationThrottled","message":"Application is over its MailboxConcurrency limit.","innerError":{"request-id":"r-1","date":"x"}}}"#,
        );
        assert_eq!(r.code.as_deref(), Some("ApplicationThrottled"));
        assert_eq!(r.request_id.as_deref(), Some("r-1"));
        assert_eq!(parse_error(500, b"<html>").code, None);
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        h.insert(reqwest::header::RETRY_AFTER, later.parse().unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
    }
}
