//! Simulated Graph large-message path (reference `graph-transport.md` §2): a draft from MIME
//! (`POST /users/{id}/messages`, `Mail.ReadWrite`), an upload session per attachment
//! (`createUploadSession`, `Mail.ReadWrite`), the bytes `PUT` to the pre-authenticated upload
//! URL in ranges (no `Authorization`, `Content-Range` in order, each piece under 4 MB), then
//! `POST …/send` (`Mail.Send`). On send Exchange builds new MIME: the draft with every uploaded
//! attachment as a base64 part; that MIME lands in the mailbox folder as sendMail's does.
//! Drafts live in memory; `DELETE /users/{id}/messages/{id}` removes one (an orphan).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};

use super::config::{MAIL_READ_WRITE_ROLE, MAIL_SEND_ROLE};
use super::graph::{
    GraphState, InFlight, addresses, authorize, check_send_as, content, error, header_fields,
};
use super::mailbox::Envelope;
use super::util::{guid, unix_now};

/// "Keep each byte range less than 4 MB" (outlook-large-attachments.md).
pub const MAX_UPLOAD_PIECE: usize = 4 * 1024 * 1024;

/// Drafts and upload sessions of all mailboxes.
#[derive(Default)]
pub struct Drafts {
    drafts: Mutex<HashMap<String, Draft>>,
    sessions: Mutex<HashMap<String, Session>>,
}

struct Draft {
    /// The mailbox's address, lower case.
    mailbox: String,
    mime: Vec<u8>,
    attachments: Vec<Attachment>,
    /// Bytes promised to upload sessions not yet complete (counted against the size limit).
    reserved: u64,
}

struct Attachment {
    name: String,
    content_type: String,
    /// `isInline` and `contentId` of the AttachmentItem: an inline part keeps its Content-ID.
    content_id: Option<String>,
    inline: bool,
    bytes: Vec<u8>,
}

struct Session {
    draft: String,
    name: String,
    content_type: String,
    content_id: Option<String>,
    inline: bool,
    size: u64,
    received: Vec<u8>,
    expires_at: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn json_response(status: StatusCode, body: Value) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn not_found() -> Response {
    error(
        404,
        "ErrorItemNotFound",
        "The specified object was not found in the store.",
        None,
    )
}

/// `POST /v1.0/users/{user}/messages` with `text/plain` base64 MIME: a draft (201).
pub async fn create_draft(
    State(st): State<GraphState>,
    Path(user): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let shared = &st.shared;
    let cfg = shared.config();
    let (_leave, mailbox, _) = match admit(shared, &cfg, &user, &headers, MAIL_READ_WRITE_ROLE) {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let (mime, _) = match content(&headers, &body, cfg.graph.max_request_bytes) {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let id = format!("AAMk{}", guid().replace('-', ""));
    let message_id = header_fields(&mime)
        .and_then(|f| {
            f.into_iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("message-id"))
                .map(|(_, v)| v)
        })
        .unwrap_or_else(|| format!("<{}@graph.sim>", guid()));
    lock(&st.shared.graph_drafts.drafts).insert(
        id.clone(),
        Draft {
            mailbox: mailbox.address.to_ascii_lowercase(),
            mime,
            attachments: Vec::new(),
            reserved: 0,
        },
    );
    json_response(
        StatusCode::CREATED,
        json!({ "id": id, "internetMessageId": message_id, "isDraft": true }),
    )
}

/// `POST …/messages/{id}/attachments/createUploadSession` with
/// `{"AttachmentItem":{"attachmentType":"file","name":…,"size":…}}` (201).
pub async fn create_upload_session(
    State(st): State<GraphState>,
    Path((user, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let shared = &st.shared;
    let cfg = shared.config();
    let (_leave, mailbox, _) = match admit(shared, &cfg, &user, &headers, MAIL_READ_WRITE_ROLE) {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let item = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("AttachmentItem").cloned());
    let bad = || {
        error(
            400,
            "ErrorInvalidRequest",
            "The AttachmentItem needs attachmentType \"file\", a name and a size.",
            None,
        )
    };
    let Some(item) = item else {
        return bad();
    };
    let (Some("file"), Some(name), Some(size)) = (
        item.get("attachmentType").and_then(Value::as_str),
        item.get("name").and_then(Value::as_str),
        item.get("size").and_then(Value::as_u64),
    ) else {
        return bad();
    };
    let content_type = item
        .get("contentType")
        .and_then(Value::as_str)
        .unwrap_or("application/octet-stream")
        .to_string();
    let content_id = item
        .get("contentId")
        .and_then(Value::as_str)
        .map(str::to_string);
    let inline = item
        .get("isInline")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut drafts = lock(&st.shared.graph_drafts.drafts);
    let Some(draft) = drafts
        .get_mut(&id)
        .filter(|d| d.mailbox.eq_ignore_ascii_case(&mailbox.address))
    else {
        return not_found();
    };
    let total = draft.mime.len() as u64
        + draft
            .attachments
            .iter()
            .map(|a| a.bytes.len() as u64)
            .sum::<u64>()
        + draft.reserved
        + size;
    if total > cfg.graph.max_message_bytes {
        return error(
            400,
            "ErrorMessageSizeExceeded",
            "The message exceeds the maximum supported size., Cannot save changes made to an item \
             to store.",
            None,
        );
    }
    draft.reserved += size;
    drop(drafts);
    let session = guid();
    let expires_at = unix_now() + cfg.graph.upload_session_secs;
    lock(&st.shared.graph_drafts.sessions).insert(
        session.clone(),
        Session {
            draft: id,
            name: name.to_string(),
            content_type,
            content_id,
            inline,
            size,
            received: Vec::new(),
            expires_at,
        },
    );
    json_response(
        StatusCode::CREATED,
        json!({
            "uploadUrl": format!("{}/upload/{session}", shared.token_base_url),
            "expirationDateTime": iso(expires_at),
            "nextExpectedRanges": ["0-"],
        }),
    )
}

/// `PUT {uploadUrl}`: one range of the attachment's bytes.
pub async fn upload(
    State(st): State<GraphState>,
    Path(session_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let shared = &st.shared;
    shared.graph_uploads.fetch_add(1, Ordering::Relaxed);
    if let Some(super::control::GraphFault::Error {
        status,
        code,
        message,
        retry_after,
    }) = shared.next_upload_fault()
    {
        return error(status, &code, &message, retry_after);
    }
    // The URL is pre-authenticated; a token sent along is refused.
    if headers.contains_key(header::AUTHORIZATION) {
        return error(
            401,
            "InvalidAuthenticationToken",
            "Do not specify an Authorization header for the upload URL.",
            None,
        );
    }
    let octets = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("application/octet-stream"));
    if !octets {
        return error(
            400,
            "ErrorInvalidRequest",
            "Content-Type must be application/octet-stream.",
            None,
        );
    }
    if body.len() >= MAX_UPLOAD_PIECE {
        return error(
            413,
            "RequestEntityTooLarge",
            "Request Entity Too Large",
            None,
        );
    }
    let range = headers
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_content_range);
    let Some((start, end, total)) = range else {
        return error(
            400,
            "ErrorInvalidRequest",
            "The Content-Range header is missing or malformed.",
            None,
        );
    };
    let mut sessions = lock(&st.shared.graph_drafts.sessions);
    let Some(session) = sessions.get_mut(&session_id) else {
        return not_found();
    };
    if session.expires_at <= unix_now() {
        sessions.remove(&session_id);
        return not_found();
    }
    let next = session.received.len() as u64;
    if total != session.size || end < start || end - start + 1 != body.len() as u64 {
        return error(
            400,
            "ErrorInvalidRequest",
            "The Content-Range does not match the body or the attachment size.",
            None,
        );
    }
    if start != next {
        // Bytes go in order; the answer says which range is wanted.
        return json_response(
            StatusCode::RANGE_NOT_SATISFIABLE,
            json!({ "error": { "code": "InvalidRange", "message": format!("Expected bytes {next}-") },
                    "nextExpectedRanges": [format!("{next}-")] }),
        );
    }
    session.received.extend_from_slice(&body);
    if (session.received.len() as u64) < session.size {
        return json_response(
            StatusCode::OK,
            json!({
                "expirationDateTime": iso(session.expires_at),
                "nextExpectedRanges": [format!("{}-", session.received.len())],
            }),
        );
    }
    let Some(done) = sessions.remove(&session_id) else {
        return not_found();
    };
    drop(sessions);
    let mut drafts = lock(&st.shared.graph_drafts.drafts);
    let Some(draft) = drafts.get_mut(&done.draft) else {
        return not_found();
    };
    draft.reserved = draft.reserved.saturating_sub(done.size);
    draft.attachments.push(Attachment {
        name: done.name,
        content_type: done.content_type,
        content_id: done.content_id,
        inline: done.inline,
        bytes: done.received,
    });
    let attachment = guid();
    let mut resp = StatusCode::CREATED.into_response();
    let location = format!(
        "{}/v1.0/users/{}/messages/{}/attachments/{attachment}",
        shared.token_base_url, draft.mailbox, done.draft
    );
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// `POST …/messages/{id}/send`: the draft with its attachments goes out (202).
pub async fn send_draft(
    State(st): State<GraphState>,
    Path((user, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let shared = &st.shared;
    let cfg = shared.config();
    let (_leave, mailbox, appid) = match admit(shared, &cfg, &user, &headers, MAIL_SEND_ROLE) {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let mime = {
        let drafts = lock(&st.shared.graph_drafts.drafts);
        let Some(draft) = drafts
            .get(&id)
            .filter(|d| d.mailbox.eq_ignore_ascii_case(&mailbox.address))
        else {
            return not_found();
        };
        if draft.reserved > 0 {
            return error(
                400,
                "ErrorInvalidRequest",
                "An attachment upload is not complete.",
                None,
            );
        }
        if let Err(resp) = check_send_as(&draft.mime, &mailbox) {
            return resp;
        }
        assemble(&draft.mime, &draft.attachments)
    };
    let recipients: Vec<String> = header_fields(&mime)
        .unwrap_or_default()
        .iter()
        .filter(|(n, _)| matches!(n.to_ascii_lowercase().as_str(), "to" | "cc" | "bcc"))
        .flat_map(|(_, v)| addresses(v))
        .collect();
    let envelope = Envelope {
        id: format!("{}@graph.sim", guid()),
        seq: 0,
        received_at: 0,
        auth_user: mailbox.address.clone(),
        client_id: appid,
        mail_from: mailbox.address.clone(),
        mail_params: String::new(),
        rcpt_to: recipients,
        transfer: "GRAPH".into(),
        size: 0,
    };
    if let Err(e) = st.mailbox.store(envelope, &mime).await {
        tracing::warn!(error = %e, "simulator: cannot store a Graph message");
        return error(
            500,
            "ErrorInternalServerError",
            "An internal server error occurred. The operation failed.",
            None,
        );
    }
    // Sent: the item moves to Sent Items; no draft is left.
    lock(&st.shared.graph_drafts.drafts).remove(&id);
    super::graph::accepted(None)
}

/// `DELETE /v1.0/users/{user}/messages/{id}` (204): an abandoned draft removed.
pub async fn delete_draft(
    State(st): State<GraphState>,
    Path((user, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let shared = &st.shared;
    shared.graph_requests.fetch_add(1, Ordering::Relaxed);
    let cfg = shared.config();
    let (mailbox, _) = match authorize(shared, &cfg, &user, &headers, MAIL_READ_WRITE_ROLE) {
        Ok(m) => m,
        Err(resp) => return resp,
    };
    let mut drafts = lock(&st.shared.graph_drafts.drafts);
    match drafts.get(&id) {
        Some(d) if d.mailbox.eq_ignore_ascii_case(&mailbox.address) => {
            drafts.remove(&id);
            lock(&st.shared.graph_drafts.sessions).retain(|_, s| s.draft != id);
            StatusCode::NO_CONTENT.into_response()
        }
        _ => not_found(),
    }
}

impl Drafts {
    /// Drafts not sent nor deleted (orphans), all mailboxes.
    pub fn count(&self) -> usize {
        lock(&self.drafts).len()
    }
}

/// What every call of this path does first, in Graph's order: count it, take a
/// MailboxConcurrency slot, answer a scripted fault, then check the token for `role`.
/// Returns the slot (held until the response), the mailbox and the caller's app id.
#[allow(clippy::result_large_err)] // The response goes out at once.
fn admit<'a>(
    shared: &'a super::control::Shared,
    cfg: &super::config::SimConfig,
    user: &str,
    headers: &HeaderMap,
    role: &str,
) -> Result<(InFlight<'a>, super::config::MailboxConfig, String), Response> {
    shared.graph_requests.fetch_add(1, Ordering::Relaxed);
    let leave = enter(shared, user, cfg.graph.concurrency_per_mailbox)?;
    if let Some(resp) = scripted(shared) {
        return Err(resp);
    }
    let (mailbox, appid) = authorize(shared, cfg, user, headers, role)?;
    Ok((leave, mailbox, appid))
}

/// Graph's MailboxConcurrency limit, as sendMail counts it.
#[allow(clippy::result_large_err)] // The response goes out at once.
fn enter<'a>(
    shared: &'a super::control::Shared,
    user: &str,
    limit: usize,
) -> Result<InFlight<'a>, Response> {
    let n = shared.graph_enter(user);
    let leave = InFlight {
        shared,
        mailbox: user.to_string(),
    };
    if n > limit {
        return Err(error(
            429,
            "ApplicationThrottled",
            "Application is over its MailboxConcurrency limit.",
            Some(1),
        ));
    }
    Ok(leave)
}

/// A scripted error fault answers any Graph API call of this path too.
fn scripted(shared: &super::control::Shared) -> Option<Response> {
    match shared.next_graph_fault()? {
        super::control::GraphFault::Error {
            status,
            code,
            message,
            retry_after,
        } => Some(error(status, &code, &message, retry_after)),
        _ => None,
    }
}

/// `bytes {start}-{end}/{total}`.
fn parse_content_range(v: &str) -> Option<(u64, u64, u64)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    Some((
        start.trim().parse().ok()?,
        end.trim().parse().ok()?,
        total.trim().parse().ok()?,
    ))
}

fn iso(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix))
        .to_string()
}

/// Exchange's new MIME: the draft with each attachment as a base64 part. A `multipart/mixed`
/// draft gets the parts before its closing delimiter; any other draft becomes the first part
/// of a new `multipart/mixed`.
fn assemble(draft: &[u8], attachments: &[Attachment]) -> Vec<u8> {
    if attachments.is_empty() {
        return draft.to_vec();
    }
    let split = draft
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(draft.len(), |p| p + 2);
    let (head, body) = draft.split_at(split);
    let body = body.strip_prefix(b"\r\n").unwrap_or(body);
    let fields = raw_fields(head);
    let content_type = fields
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        .map(|(_, raw)| String::from_utf8_lossy(raw).to_string())
        .unwrap_or_default();
    let parts = |boundary: &str| {
        let mut out = Vec::new();
        for a in attachments {
            let cid = a
                .content_id
                .as_ref()
                .map(|c| format!("Content-ID: <{c}>\r\n"))
                .unwrap_or_default();
            out.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Type: {}; name=\"{}\"\r\n{cid}Content-Disposition: \
                     {}; filename=\"{}\"\r\nContent-Transfer-Encoding: base64\r\n\r\n",
                    a.content_type,
                    a.name,
                    if a.inline { "inline" } else { "attachment" },
                    a.name
                )
                .as_bytes(),
            );
            let encoded = base64::engine::general_purpose::STANDARD.encode(&a.bytes);
            for line in encoded.as_bytes().chunks(76) {
                out.extend_from_slice(line);
                out.extend_from_slice(b"\r\n");
            }
        }
        out
    };
    let lower = content_type.to_ascii_lowercase();
    if lower.contains("multipart/mixed")
        && let Some(boundary) = boundary_of(&content_type)
    {
        let close = format!("--{boundary}--");
        if let Some(at) = find_last(draft, close.as_bytes()) {
            let mut out = draft[..at].to_vec();
            out.extend_from_slice(&parts(&boundary));
            out.extend_from_slice(&draft[at..]);
            return out;
        }
    }
    let boundary = format!("sim_{}", guid().replace('-', ""));
    let mut out = Vec::new();
    let mut part_head = Vec::new();
    for (name, raw) in &fields {
        let n = name.to_ascii_lowercase();
        if n.starts_with("content-") {
            part_head.extend_from_slice(raw);
        } else if n != "mime-version" {
            out.extend_from_slice(raw);
        }
    }
    out.extend_from_slice(
        format!(
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n\
             --{boundary}\r\n"
        )
        .as_bytes(),
    );
    if part_head.is_empty() {
        part_head.extend_from_slice(b"Content-Type: text/plain\r\n");
    }
    out.extend_from_slice(&part_head);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    if !body.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(&parts(&boundary));
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

/// Header fields as (name, raw bytes with folding and line ends).
fn raw_fields(head: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut fields: Vec<(String, Vec<u8>)> = Vec::new();
    for line in head.split_inclusive(|b| *b == b'\n') {
        if line.starts_with(b" ") || line.starts_with(b"\t") {
            if let Some((_, raw)) = fields.last_mut() {
                raw.extend_from_slice(line);
            }
            continue;
        }
        let name = line
            .iter()
            .position(|b| *b == b':')
            .map(|p| String::from_utf8_lossy(&line[..p]).trim().to_string())
            .unwrap_or_default();
        fields.push((name, line.to_vec()));
    }
    fields
}

fn boundary_of(content_type: &str) -> Option<String> {
    let lower = content_type.to_ascii_lowercase();
    let at = lower.find("boundary=")? + "boundary=".len();
    let rest = content_type[at..].trim_start();
    let value = match rest.strip_prefix('"') {
        Some(q) => q.split('"').next()?,
        None => rest.split([';', '\r', '\n', ' ']).next()?,
    };
    (!value.is_empty()).then(|| value.to_string())
}

fn find_last(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_is_read() {
        assert_eq!(parse_content_range("bytes 0-99/1000"), Some((0, 99, 1000)));
        assert_eq!(parse_content_range("bytes */1000"), None);
    }

    #[test]
    fn attachments_join_a_mixed_draft_or_wrap_a_simple_one() {
        let a = Attachment {
            name: "a.bin".into(),
            content_type: "application/pdf".into(),
            content_id: None,
            inline: false,
            bytes: b"hello".to_vec(),
        };
        let mixed = b"To: b@x.example\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b1--\r\n";
        let out = String::from_utf8(assemble(mixed, std::slice::from_ref(&a))).unwrap();
        assert!(
            out.ends_with("filename=\"a.bin\"\r\nContent-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n--b1--\r\n"),
            "{out}"
        );
        let simple = b"To: b@x.example\r\nSubject: s\r\nContent-Type: text/plain\r\n\r\nhi\r\n";
        let out = String::from_utf8(assemble(simple, &[a])).unwrap();
        assert!(out.starts_with("To: b@x.example\r\nSubject: s\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"sim_"), "{out}");
        assert!(
            out.contains("\r\nContent-Type: text/plain\r\n\r\nhi\r\n--sim_"),
            "{out}"
        );
    }
}
