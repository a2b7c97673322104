//! Messages larger than `sendMail` takes (`upstream.graph_large_messages`, graph-transport.md
//! §2): a draft from the MIME without its large attachments (`POST …/messages`, needs
//! `Mail.ReadWrite`), one upload session per attachment (`createUploadSession`), the decoded
//! bytes `PUT` to the pre-authenticated upload URL in pieces of [`UPLOAD_PIECE`], then
//! `POST …/messages/{id}/send`. Any failure once the draft exists deletes it (best effort) and
//! is classified as for sendMail; a draft refused with 403 is a hold naming `Mail.ReadWrite`.
//! Exchange builds new MIME on send, so the message is not byte for byte what the client sent.

use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;

use super::split::{self, DecodeError, Part, SplitError};
use super::{
    Attempted, Current, GraphReply, GraphTransport, MAX_ERROR_BODY, Reply, SENDMAIL_MAX_RAW,
    Submission, parse_error, read_limited, request_failed, retry_after,
};
use crate::deliver::classify::{HoldCause, Outcome, classify_graph};
use crate::deliver::pacer::Progress;
use crate::deliver::reply::{Enhanced, UpstreamReply};
use crate::spool::MessageBody;

/// Bytes per upload request: 10 × 320 KiB. Outlook wants each range under 4 MB
/// (outlook-large-attachments.md); Graph's upload sessions recommend multiples of 320 KiB.
pub const UPLOAD_PIECE: usize = 10 * 320 * 1024;
/// Graph answers a new draft with the whole message resource (its body text included).
const MAX_DRAFT_RESPONSE: usize = 8 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Draft,
    Session,
    Upload,
    Send,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Draft => "creating the draft",
            Step::Session => "creating an upload session",
            Step::Upload => "uploading an attachment",
            Step::Send => "sending the draft",
        })
    }
}

/// An answer to one request, whatever its status.
struct Answer {
    status: u16,
    retry_after: Option<Duration>,
    request_id: Option<String>,
    body: Vec<u8>,
}

impl Answer {
    fn reply(&self) -> GraphReply {
        let mut reply = parse_error(self.status, &self.body);
        reply.request_id = reply.request_id.clone().or(self.request_id.clone());
        reply
    }
}

async fn answer(response: reqwest::Response, max: usize) -> Answer {
    let status = response.status().as_u16();
    let retry_after = retry_after(response.headers());
    let request_id = response
        .headers()
        .get("request-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            crate::redact::scrub(v)
                .chars()
                .take(128)
                .collect::<String>()
        });
    let body = read_limited(response, max).await;
    Answer {
        status,
        retry_after,
        request_id,
        body,
    }
}

impl GraphTransport {
    /// The whole large-message attempt; the caller holds a request permit (the requests of one
    /// attempt go one after the other).
    pub(super) async fn send_large(
        &self,
        submission: &Submission<'_>,
        current: &Current,
        body: &MessageBody,
        count: usize,
    ) -> Attempted {
        let started = Instant::now();
        let plan = match split::plan(body, SENDMAIL_MAX_RAW).await {
            Ok(plan) => plan,
            Err(SplitError::Unsplittable(text)) => {
                let refusal = UpstreamReply {
                    code: 552,
                    enhanced: Some(Enhanced::new(5, 3, 4)),
                    text,
                };
                tracing::warn!(id = %submission.id, reply = %refusal, "message refused before sending to Graph");
                return Attempted::all(
                    count,
                    Outcome::Failed,
                    Reply::Refused(refusal),
                    Progress::Transaction,
                );
            }
            Err(SplitError::Read(e)) => return unreadable(submission, count, &e),
        };
        let draft = match plan.draft(body).await {
            Ok(d) => d,
            Err(e) => return unreadable(submission, count, &e),
        };
        tracing::info!(
            id = %submission.id,
            bytes = body.len(),
            draft_bytes = draft.len(),
            attachments = plan.parts.len(),
            "larger than sendMail takes: sending as a Graph draft with its attachments in \
             upload sessions (Exchange rebuilds the MIME)"
        );
        let mut refreshed = false;
        let draft_id = {
            // Shared, not copied, by a second request after a token refresh.
            let encoded = bytes::Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .encode(&draft)
                    .into_bytes(),
            );
            drop(draft);
            match self
                .create_draft(current, encoded, &mut refreshed, count)
                .await
            {
                Ok(id) => id,
                Err(failed) => {
                    self.metrics.transaction_seconds.observe(started.elapsed());
                    return failed;
                }
            }
        };
        let attempted = self
            .fill_and_send(
                submission,
                current,
                body,
                &plan.parts,
                &draft_id,
                &mut refreshed,
                count,
            )
            .await;
        if attempted
            .recipients
            .iter()
            .any(|r| r.class != Outcome::Delivered)
        {
            self.delete_draft(submission, current, &draft_id).await;
        }
        self.metrics.transaction_seconds.observe(started.elapsed());
        attempted
    }

    async fn create_draft(
        &self,
        current: &Current,
        encoded: bytes::Bytes,
        refreshed: &mut bool,
        count: usize,
    ) -> Result<String, Attempted> {
        let url = current
            .settings
            .user_url(&["messages"])
            .map_err(|e| local_retry(count, e))?;
        let answer = self
            .call(refreshed, count, Step::Draft, MAX_DRAFT_RESPONSE, |token| {
                current
                    .http
                    .post(url.clone())
                    .bearer_auth(token)
                    .header(reqwest::header::CONTENT_TYPE, "text/plain")
                    .body(encoded.clone())
            })
            .await?;
        if answer.status != 201 && answer.status != 200 {
            return Err(step_failed(Step::Draft, count, &answer));
        }
        serde_json::from_slice::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_string))
            .filter(|id| !id.is_empty())
            .ok_or_else(|| {
                local_retry(
                    count,
                    format!(
                        "Graph answered the draft with HTTP {} but no message id",
                        answer.status
                    ),
                )
            })
    }

    #[allow(clippy::too_many_arguments)]
    async fn fill_and_send(
        &self,
        submission: &Submission<'_>,
        current: &Current,
        body: &MessageBody,
        parts: &[Part],
        draft_id: &str,
        refreshed: &mut bool,
        count: usize,
    ) -> Attempted {
        for (i, part) in parts.iter().enumerate() {
            if let Err(failed) = self
                .upload_part(current, body, part, i, draft_id, refreshed, count)
                .await
            {
                return failed;
            }
        }
        let url = match current.settings.user_url(&["messages", draft_id, "send"]) {
            Ok(u) => u,
            Err(e) => return local_retry(count, e),
        };
        let answer = match self
            .call(refreshed, count, Step::Send, MAX_ERROR_BODY, |token| {
                current
                    .http
                    .post(url.clone())
                    .bearer_auth(token)
                    .header(reqwest::header::CONTENT_LENGTH, "0")
                    .body(Vec::new())
            })
            .await
        {
            Ok(a) => a,
            Err(failed) => return failed,
        };
        let mut reply = answer.reply();
        if reply.status != 202 {
            reply.message = Some(format!(
                "{}: {}",
                Step::Send,
                reply.message.as_deref().unwrap_or("")
            ));
        }
        self.answered(submission, count, reply, answer.retry_after)
    }

    #[allow(clippy::too_many_arguments)]
    async fn upload_part(
        &self,
        current: &Current,
        body: &MessageBody,
        part: &Part,
        index: usize,
        draft_id: &str,
        refreshed: &mut bool,
        count: usize,
    ) -> Result<(), Attempted> {
        let url = current
            .settings
            .user_url(&["messages", draft_id, "attachments", "createUploadSession"])
            .map_err(|e| local_retry(count, e))?;
        let mut item = json!({
            "attachmentType": "file",
            "name": part.file_name(index),
            "size": part.decoded_size,
            "contentType": part.content_type,
        });
        if part.inline() {
            item["isInline"] = json!(true);
        }
        if let Some(cid) = &part.content_id {
            item["contentId"] = json!(cid);
        }
        let request = json!({ "AttachmentItem": item });
        let answer = self
            .call(refreshed, count, Step::Session, MAX_ERROR_BODY, |token| {
                current
                    .http
                    .post(url.clone())
                    .bearer_auth(token)
                    .json(&request)
            })
            .await?;
        if answer.status != 201 && answer.status != 200 {
            return Err(step_failed(Step::Session, count, &answer));
        }
        let upload_url = serde_json::from_slice::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|v| {
                v.get("uploadUrl")
                    .and_then(|u| u.as_str())
                    .map(str::to_string)
            })
            .and_then(|u| url::Url::parse(&u).ok())
            .ok_or_else(|| {
                local_retry(
                    count,
                    "Graph created an upload session without an uploadUrl",
                )
            })?;
        let total = part.decoded_size;
        let http = current.http.clone();
        let sent = split::decoded(body, part, UPLOAD_PIECE, |at, bytes| {
            let http = http.clone();
            let url = upload_url.clone();
            async move { put_piece(&http, url, at, total, bytes).await }
        })
        .await;
        match sent {
            Ok(()) => Ok(()),
            Err(DecodeError::Read(e)) => Err(local_retry(
                count,
                format!("cannot read the message from the spool: {e}"),
            )),
            Err(DecodeError::Sink(PutFailed::Answer(answer))) => {
                Err(step_failed(Step::Upload, count, &answer))
            }
            Err(DecodeError::Sink(PutFailed::Request(e))) => {
                let mut failed = request_failed(count, &e);
                // Only a send can deliver; an upload that got no answer sent nothing.
                failed.after_dot = None;
                Err(failed)
            }
            Err(DecodeError::Size { announced, decoded }) => {
                let refusal = UpstreamReply {
                    code: 554,
                    enhanced: Some(Enhanced::new(5, 6, 0)),
                    text: format!(
                        "attachment {} decoded to {decoded} bytes, not the {announced} counted \
                         (a relay bug: please report it)",
                        part.file_name(index)
                    ),
                };
                Err(Attempted::all(
                    count,
                    Outcome::Failed,
                    Reply::Refused(refusal),
                    Progress::Transaction,
                ))
            }
        }
    }

    /// Best effort: an orphan draft is only clutter in the mailbox, never mail sent.
    async fn delete_draft(&self, submission: &Submission<'_>, current: &Current, draft_id: &str) {
        let Ok(url) = current.settings.user_url(&["messages", draft_id]) else {
            return;
        };
        let mut refreshed = true;
        let deleted = self
            .call(&mut refreshed, 0, Step::Draft, MAX_ERROR_BODY, |token| {
                current.http.delete(url.clone()).bearer_auth(token)
            })
            .await;
        match deleted {
            Ok(a) if (200..300).contains(&a.status) => {
                tracing::info!(id = %submission.id, "the unsent Graph draft was deleted");
            }
            Ok(a) => {
                tracing::warn!(id = %submission.id, reply = %a.reply(), "cannot delete the unsent Graph draft: it stays in the mailbox's Drafts folder");
            }
            Err(a) => {
                tracing::warn!(id = %submission.id, reply = %a.summary, "cannot delete the unsent Graph draft: it stays in the mailbox's Drafts folder");
            }
        }
    }

    /// One Graph API request with the current token; on `401 InvalidAuthenticationToken` one
    /// fresh token and the request once more (per attempt). A failure without an answer is
    /// the attempt's result (`Err`); any answer is `Ok`.
    async fn call(
        &self,
        refreshed: &mut bool,
        count: usize,
        step: Step,
        max_body: usize,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<Answer, Attempted> {
        loop {
            let token = match self.tokens.token().await {
                Ok(t) => t,
                Err(f) => {
                    let class = if f.permanent {
                        Outcome::Hold(HoldCause::TokenRefused)
                    } else {
                        Outcome::Retry { throttle: false }
                    };
                    return Err(Attempted::all(
                        count,
                        class,
                        Reply::Local(format!("token: {}", f.message)),
                        Progress::Token,
                    ));
                }
            };
            let response = match build(&token.value).send().await {
                Ok(r) => r,
                Err(e) => {
                    let mut failed = request_failed(count, &e);
                    if step != Step::Send {
                        // Only the send can deliver.
                        failed.after_dot = None;
                    }
                    return Err(failed);
                }
            };
            let answer = answer(response, max_body).await;
            if answer.status == 401
                && answer.reply().code.as_deref() == Some("InvalidAuthenticationToken")
                && !*refreshed
            {
                tracing::info!(reply = %answer.reply(), "Graph refused the token: refreshing it and trying once more");
                *refreshed = true;
                if let Err(f) = self.tokens.refresh().await {
                    tracing::warn!(error = %f.message, "token refresh after 401 failed");
                }
                continue;
            }
            return Ok(answer);
        }
    }
}

enum PutFailed {
    Answer(Answer),
    Request(reqwest::Error),
}

/// One range to the upload URL: no `Authorization` (the URL is pre-authenticated and the token
/// must not go to another host), `Content-Range`, in order.
async fn put_piece(
    http: &reqwest::Client,
    url: url::Url,
    at: u64,
    total: u64,
    bytes: Vec<u8>,
) -> Result<(), PutFailed> {
    let end = at + bytes.len() as u64 - 1;
    let response = http
        .put(url)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .header(
            reqwest::header::CONTENT_RANGE,
            format!("bytes {at}-{end}/{total}"),
        )
        .body(bytes)
        .send()
        .await
        // The upload URL carries its own credential: never in an error text.
        .map_err(|e| PutFailed::Request(e.without_url()))?;
    let answer = answer(response, MAX_ERROR_BODY).await;
    if (200..300).contains(&answer.status) {
        Ok(())
    } else {
        Err(PutFailed::Answer(answer))
    }
}

/// A refused step before the send: nothing was sent. An expired or lost upload session or
/// draft is worth a new attempt (a new draft); a 403 on a draft or session is the missing
/// `Mail.ReadWrite`; the rest is classified as sendMail's answers are.
fn step_failed(step: Step, count: usize, answer: &Answer) -> Attempted {
    let mut reply = answer.reply();
    let class = match (step, reply.status, reply.code.as_deref()) {
        (_, _, Some("ErrorItemNotFound")) => Outcome::Retry { throttle: false },
        (Step::Upload, 401 | 404 | 410 | 416, _) => Outcome::Retry { throttle: false },
        (Step::Draft | Step::Session, 403, None | Some("ErrorAccessDenied")) => {
            Outcome::Hold(HoldCause::GraphReadWriteDenied)
        }
        (_, status, code) => classify_graph(status, code),
    };
    reply.message = Some(format!(
        "{step}: {}",
        reply.message.as_deref().unwrap_or("no message")
    ));
    let mut attempted = Attempted::all(count, class, Reply::Graph(reply), Progress::Transaction);
    attempted.retry_after = answer
        .retry_after
        .filter(|_| matches!(class, Outcome::Retry { .. }));
    attempted
}

fn local_retry(count: usize, text: impl Into<String>) -> Attempted {
    Attempted::all(
        count,
        Outcome::Retry { throttle: false },
        Reply::Local(text.into()),
        Progress::Transaction,
    )
}

fn unreadable(
    submission: &Submission<'_>,
    count: usize,
    e: &crate::spool::SpoolError,
) -> Attempted {
    tracing::error!(id = %submission.id, error = %e, "cannot read the message to send it");
    Attempted::all(
        count,
        Outcome::Retry { throttle: false },
        Reply::Local(format!("cannot read the message from the spool: {e}")),
        Progress::Token,
    )
}
