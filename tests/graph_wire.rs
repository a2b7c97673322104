//! The Graph request on the wire, checked byte for byte against a minimal HTTP endpoint written
//! here (not the simulator): request line, headers, the base64 body and the token it carries.
//! And a request that got no answer after its body was sent: a possible duplicate, retried
//! with the same bytes.

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use common::delivery::{MAILBOX, Tuning, after_relay_received, start_delivering_with, start_tuned};
use smtp_oauth_relay::metrics::Gauges;
use smtp_oauth_relay::sim::SimConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const GRAPH: &str = "[queue]\nretry_min = \"200ms\"\nretry_max = \"400ms\"\n\
                     [upstream]\ntransport = \"graph\"\nrate = \"1000/s\"\n";

/// One request as it arrived.
#[derive(Debug, Clone)]
struct Captured {
    head: String,
    body: Vec<u8>,
}

impl Captured {
    fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }

    /// The values of header `name` (case-insensitive), in order.
    fn header(&self, name: &str) -> Vec<String> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }
}

#[derive(Debug, Clone, Copy)]
enum Answer {
    Accepted,
    /// A 400 whose error message quotes the request's Authorization header.
    EchoToken,
    /// Read the whole request, then say nothing for this long.
    Silent(Duration),
}

/// The endpoint: answers requests in the order of `answers` (then 202), reporting each.
async fn endpoint(answers: Vec<Answer>) -> (String, mpsc::UnboundedReceiver<Captured>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = mpsc::unbounded_channel();
    let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
    tokio::spawn(async move {
        // Bounded: a test sends a handful of requests.
        for _ in 0..64 {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve(stream, tx.clone(), answers.clone()));
        }
    });
    (url, rx)
}

async fn serve(
    mut stream: TcpStream,
    tx: mpsc::UnboundedSender<Captured>,
    answers: Arc<Mutex<VecDeque<Answer>>>,
) {
    let mut buf = Vec::new();
    // Keep-alive: several requests per connection, each read whole.
    for _ in 0..16 {
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.len() > 64 * 1024 {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let length: usize = head
            .split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 65536];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf[head_end..head_end + length].to_vec();
        buf.drain(..head_end + length);
        let _ = tx.send(Captured {
            head: head.trim_end().to_string(),
            body,
        });
        let answer = answers
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Answer::Accepted);
        match answer {
            Answer::Accepted => {
                let reply =
                    "HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nrequest-id: wire-1\r\n\r\n";
                if stream.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
            }
            Answer::EchoToken => {
                let auth = head
                    .split("\r\n")
                    .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
                    .unwrap_or("")
                    .to_string();
                let body = serde_json::json!({
                    "error": {"code": "ErrorInvalidRecipients", "message": format!("bad request: {auth}")}
                })
                .to_string();
                let reply = format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if stream.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
            }
            Answer::Silent(d) => {
                tokio::time::sleep(d).await;
                return;
            }
        }
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Captured>) -> Captured {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("a request within 20 s")
        .expect("endpoint running")
}

fn message() -> Vec<u8> {
    format!(
        "From: {MAILBOX}\r\nTo: b@example.org\r\nSubject: wire\r\n\
         Date: Wed, 02 Dec 2026 10:00:00 +0000\r\nMessage-ID: <wire@legacy.test>\r\n\r\n\
         a line\r\né 8-bit line\r\n"
    )
    .into_bytes()
}

#[tokio::test]
async fn the_request_is_post_sendmail_with_text_plain_base64_and_a_graph_token() {
    let (url, mut rx) = endpoint(vec![]).await;
    let endpoint_url = url.clone();
    let r = start_delivering_with(GRAPH, SimConfig::graph(), move |config, _| {
        config.upstream.graph_url = Some(endpoint_url);
    })
    .await;
    let msg = message();
    r.submit("<app@legacy.test>", &["b@example.org"], &msg)
        .await;
    let req = next(&mut rx).await;

    assert_eq!(
        req.request_line(),
        format!("POST /v1.0/users/{MAILBOX}/sendMail HTTP/1.1")
    );
    assert_eq!(req.header("content-type"), ["text/plain"]);
    assert_eq!(
        req.header("content-length"),
        [req.body.len().to_string()],
        "the body has a length (no chunked upload: Graph's SDKs retry only such bodies)"
    );
    assert!(req.header("transfer-encoding").is_empty());
    assert_eq!(req.header("host"), [url.trim_start_matches("http://")]);

    // The body: one line of standard base64 (no wrapping, no newline), of the whole message.
    assert!(
        req.body
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')),
        "not bare base64: {:?}",
        String::from_utf8_lossy(&req.body[..req.body.len().min(200)])
    );
    let mime = base64::engine::general_purpose::STANDARD
        .decode(&req.body)
        .expect("base64");
    assert_eq!(after_relay_received(&mime), msg.as_slice());

    // The bearer token is Graph's: its audience and role, as the simulator issued it.
    let auth = req.header("authorization");
    let token = auth[0].strip_prefix("Bearer ").expect("bearer");
    let payload = token.split('.').nth(1).expect("a JWT");
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64url"),
    )
    .expect("json");
    assert_eq!(claims["aud"], "https://graph.microsoft.com");
    assert_eq!(claims["roles"], serde_json::json!(["Mail.Send"]));

    r.wait_for("the spool to empty", |relay| {
        relay.spool.list().expect("list").is_empty()
    })
    .await;
    assert!(
        r.sim.messages().expect("mailbox").is_empty(),
        "went to the test's endpoint"
    );
}

#[tokio::test]
async fn no_answer_after_the_body_was_sent_is_a_possible_duplicate_retried_with_the_same_bytes() {
    let _logs = common::logs::capture();
    let (url, mut rx) = endpoint(vec![Answer::Silent(Duration::from_secs(5))]).await;
    let tuning = Tuning {
        graph_request_timeout: Some(Duration::from_secs(1)),
        graph_url: Some(url),
        ..Default::default()
    };
    let r = start_tuned(GRAPH, SimConfig::graph(), |_| {}, tuning, |_| {}).await;
    let id = r
        .submit("<app@legacy.test>", &["b@example.org"], &message())
        .await;
    let first = next(&mut rx).await;
    let second = next(&mut rx).await;
    assert_eq!(first.body, second.body, "the retry sends the same message");
    common::logs::wait_line(&["possible duplicate", &id]).await;
    r.wait_for("the spool to empty", |relay| {
        relay.spool.list().expect("list").is_empty()
    })
    .await;
    let text = r.metrics.render(&Gauges::default());
    assert!(
        text.lines()
            .any(|l| l == "relay_possible_duplicates_total 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_token_echoed_by_the_endpoint_never_reaches_the_spool_or_the_log() {
    let _logs = common::logs::capture();
    let (url, mut rx) = endpoint(vec![Answer::EchoToken]).await;
    let endpoint_url = url.clone();
    let r = start_delivering_with(GRAPH, SimConfig::graph(), move |config, _| {
        config.upstream.graph_url = Some(endpoint_url);
    })
    .await;
    let id = r
        .submit("<app@legacy.test>", &["b@example.org"], &message())
        .await;
    let req = next(&mut rx).await;
    let token = req.header("authorization")[0]
        .strip_prefix("Bearer ")
        .expect("bearer")
        .to_string();
    r.wait_for(
        "the message to fail",
        |relay| matches!(relay.spool.read_state(&id), Ok(Some(s)) if s.fail_reason.is_some()),
    )
    .await;
    let reason = r
        .delivery_state(&id)
        .and_then(|s| s.fail_reason)
        .expect("fail reason");
    assert!(reason.contains("ErrorInvalidRecipients"), "{reason}");
    assert!(reason.contains("<redacted>"), "{reason}");
    assert!(
        !reason.contains(&token),
        "the token reached the spool: {reason}"
    );
    common::logs::wait_line(&["delivery failed", &id]).await;
    assert!(
        !common::logs::capture().text().contains(&token),
        "the token reached the log"
    );
}
