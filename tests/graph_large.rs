//! Graph's large-message path in the simulator (graph-transport.md §2): a draft from MIME, an
//! upload session per attachment, the bytes PUT in ranges under 4 MB to the pre-authenticated
//! URL, then send; the MIME Exchange builds lands in the mailbox folder as sendMail's does.
//! These tests speak HTTP to the simulator directly; the relay's side of this path is tested in
//! `graph_large_delivery.rs`.

mod common;

use base64::Engine;
use common::sim::{http, start_with};
use serde_json::{Value, json};
use smtp_oauth_relay::sim::{MAIL_READ_WRITE_ROLE, MAIL_SEND_ROLE, SimConfig, Simulator};

const MAILBOX: &str = "relay@contoso.example";
const PIECE: usize = 3 * 1024 * 1024 + 512 * 1024;

fn large_tenant() -> SimConfig {
    let mut c = SimConfig::graph();
    for client in &mut c.clients {
        client.roles = Some(vec![MAIL_SEND_ROLE.into(), MAIL_READ_WRITE_ROLE.into()]);
    }
    c
}

async fn graph_token(sim: &Simulator) -> String {
    common::sim::token_for_scope(sim, "https://graph.microsoft.com/.default").await
}

/// Deterministic bytes that are not all alike (a pseudo-random sequence).
fn payload(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

const DRAFT: &str = "From: <relay@contoso.example>\r\nTo: b@example.org\r\nBcc: c@example.org\r\n\
    Subject: large\r\nMessage-ID: <large-1@legacy.test>\r\nMIME-Version: 1.0\r\n\
    Content-Type: multipart/mixed; boundary=\"outer\"\r\n\r\n--outer\r\n\
    Content-Type: text/plain; charset=utf-8\r\n\r\nSee the attachment.\r\n--outer--\r\n";

async fn create_draft(sim: &Simulator, token: &str, mime: &str) -> reqwest::Response {
    http()
        .post(format!("{}/v1.0/users/{MAILBOX}/messages", sim.graph_url()))
        .bearer_auth(token)
        .header("content-type", "text/plain")
        .body(base64::engine::general_purpose::STANDARD.encode(mime))
        .send()
        .await
        .expect("draft request")
}

async fn draft_id(sim: &Simulator, token: &str) -> String {
    let resp = create_draft(sim, token, DRAFT).await;
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["internetMessageId"], "<large-1@legacy.test>");
    assert_eq!(body["isDraft"], true);
    body["id"].as_str().expect("id").to_string()
}

async fn upload_session(sim: &Simulator, token: &str, id: &str, size: usize) -> reqwest::Response {
    http()
        .post(format!(
            "{}/v1.0/users/{MAILBOX}/messages/{id}/attachments/createUploadSession",
            sim.graph_url()
        ))
        .bearer_auth(token)
        .json(
            &json!({"AttachmentItem": {"attachmentType": "file", "name": "scan.pdf",
                       "size": size, "contentType": "application/pdf"}}),
        )
        .send()
        .await
        .expect("session request")
}

async fn upload_url(sim: &Simulator, token: &str, id: &str, size: usize) -> String {
    let resp = upload_session(sim, token, id, size).await;
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["nextExpectedRanges"], json!(["0-"]));
    assert!(body["expirationDateTime"].is_string());
    body["uploadUrl"].as_str().expect("uploadUrl").to_string()
}

async fn put(url: &str, bytes: &[u8], start: usize, total: usize) -> reqwest::Response {
    http()
        .put(url)
        .header("content-type", "application/octet-stream")
        .header(
            "content-range",
            format!("bytes {start}-{}/{total}", start + bytes.len() - 1),
        )
        .body(bytes.to_vec())
        .send()
        .await
        .expect("upload request")
}

async fn send(sim: &Simulator, token: &str, id: &str) -> reqwest::Response {
    http()
        .post(format!(
            "{}/v1.0/users/{MAILBOX}/messages/{id}/send",
            sim.graph_url()
        ))
        .bearer_auth(token)
        .header("content-length", "0")
        .send()
        .await
        .expect("send request")
}

/// The base64 content of the part named `scan.pdf` in `mime`, decoded.
fn attachment_of(mime: &str) -> Vec<u8> {
    let at = mime
        .find("filename=\"scan.pdf\"")
        .expect("the attachment part");
    let body_at = at + mime[at..].find("\r\n\r\n").expect("part body") + 4;
    let end = body_at + mime[body_at..].find("--").expect("next delimiter");
    let text: String = mime[body_at..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("base64 attachment")
}

#[tokio::test]
async fn a_30_mib_attachment_uploaded_in_ranges_arrives_with_the_draft() {
    let sim = start_with(large_tenant()).await;
    let token = graph_token(&sim).await;
    let id = draft_id(&sim, &token).await;
    let bytes = payload(30 * 1024 * 1024);
    let url = upload_url(&sim, &token, &id, bytes.len()).await;
    let mut start = 0;
    let mut pieces = 0;
    while start < bytes.len() {
        let end = (start + PIECE).min(bytes.len());
        let resp = put(&url, &bytes[start..end], start, bytes.len()).await;
        pieces += 1;
        if end < bytes.len() {
            assert_eq!(resp.status(), 200);
            let body: Value = resp.json().await.expect("json");
            assert_eq!(body["nextExpectedRanges"], json!([format!("{end}-")]));
        } else {
            assert_eq!(resp.status(), 201);
            assert!(resp.headers().contains_key("location"));
        }
        start = end;
    }
    assert_eq!(pieces, 9);
    assert_eq!(send(&sim, &token, &id).await.status(), 202);
    let got = sim.messages().expect("mailbox");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].envelope.transfer, "GRAPH");
    assert_eq!(got[0].envelope.rcpt_to, ["b@example.org", "c@example.org"]);
    let text = got[0].text();
    assert!(
        text.starts_with("From: <relay@contoso.example>\r\nTo: b@example.org\r\n"),
        "{}",
        &text[..300]
    );
    assert!(text.contains("\r\n\r\nSee the attachment.\r\n--outer\r\n"));
    assert!(text.ends_with("--outer--\r\n"));
    assert!(attachment_of(&text) == bytes, "the attachment's bytes");
    assert_eq!(sim.control().graph_drafts(), 0, "no draft is left");
    assert_eq!(sim.control().graph_uploads(), 9);
}

#[tokio::test]
async fn a_simple_draft_becomes_multipart_with_its_attachment() {
    let sim = start_with(large_tenant()).await;
    let token = graph_token(&sim).await;
    let mime = "From: <relay@contoso.example>\r\nTo: b@example.org\r\nSubject: s\r\n\
                Content-Type: text/plain\r\n\r\nbody text\r\n";
    let resp = create_draft(&sim, &token, mime).await;
    assert_eq!(resp.status(), 201);
    let id = resp.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let bytes = payload(3 * 1024 * 1024);
    let url = upload_url(&sim, &token, &id, bytes.len()).await;
    assert_eq!(put(&url, &bytes, 0, bytes.len()).await.status(), 201);
    assert_eq!(send(&sim, &token, &id).await.status(), 202);
    let text = sim.messages().expect("mailbox")[0].text();
    assert!(text.contains("Content-Type: multipart/mixed; boundary=\""));
    assert!(text.contains("Content-Type: text/plain\r\n\r\nbody text\r\n--sim_"));
    assert!(attachment_of(&text) == bytes);
}

#[tokio::test]
async fn the_upload_url_checks_ranges_order_piece_size_and_no_token() {
    let sim = start_with(large_tenant()).await;
    let token = graph_token(&sim).await;
    let id = draft_id(&sim, &token).await;
    let bytes = payload(5 * 1024 * 1024);
    let url = upload_url(&sim, &token, &id, bytes.len()).await;
    // The URL is pre-authenticated: a bearer token is refused.
    let resp = http()
        .put(&url)
        .bearer_auth(&token)
        .header("content-type", "application/octet-stream")
        .header("content-range", format!("bytes 0-9/{}", bytes.len()))
        .body(bytes[..10].to_vec())
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 401);
    // Out of order: the answer names the range it wants.
    let resp = put(&url, &bytes[100..200], 100, bytes.len()).await;
    assert_eq!(resp.status(), 416);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["nextExpectedRanges"], json!(["0-"]));
    // A piece of 4 MiB or more.
    let resp = put(&url, &bytes[..4 * 1024 * 1024], 0, bytes.len()).await;
    assert_eq!(resp.status(), 413);
    // A range that does not match the body.
    let resp = http()
        .put(&url)
        .header("content-type", "application/octet-stream")
        .header("content-range", format!("bytes 0-99/{}", bytes.len()))
        .body(bytes[..50].to_vec())
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 400);
    // Half uploaded: send is refused, nothing is delivered.
    assert_eq!(
        put(&url, &bytes[..PIECE], 0, bytes.len()).await.status(),
        200
    );
    assert_eq!(send(&sim, &token, &id).await.status(), 400);
    assert!(sim.messages().expect("mailbox").is_empty());
}

#[tokio::test]
async fn drafts_need_mail_read_write_and_fit_the_mailbox_size() {
    // Mail.Send only: the draft is refused (403 ErrorAccessDenied), sendMail would work.
    let sim = start_with(SimConfig::graph()).await;
    let token = graph_token(&sim).await;
    let resp = create_draft(&sim, &token, DRAFT).await;
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "ErrorAccessDenied");

    let sim = start_with(large_tenant()).await;
    let token = graph_token(&sim).await;
    let id = draft_id(&sim, &token).await;
    let resp = upload_session(&sim, &token, &id, 36 * 1024 * 1024).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "ErrorMessageSizeExceeded");
    // An abandoned draft is deleted (the relay's cleanup of an orphan).
    assert_eq!(sim.control().graph_drafts(), 1);
    let resp = http()
        .delete(format!(
            "{}/v1.0/users/{MAILBOX}/messages/{id}",
            sim.graph_url()
        ))
        .bearer_auth(&token)
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status(), 204);
    assert_eq!(sim.control().graph_drafts(), 0);
    assert_eq!(send(&sim, &token, &id).await.status(), 404);
}

#[tokio::test]
async fn an_expired_upload_url_is_gone() {
    let mut config = large_tenant();
    config.graph.upload_session_secs = 0;
    let sim = start_with(config).await;
    let token = graph_token(&sim).await;
    let id = draft_id(&sim, &token).await;
    let bytes = payload(1024);
    let url = upload_url(&sim, &token, &id, bytes.len()).await;
    let resp = put(&url, &bytes, 0, bytes.len()).await;
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "ErrorItemNotFound");
    // The draft is still there, waiting for a new session or its deletion.
    assert_eq!(sim.control().graph_drafts(), 1);
}
