//! Delivery through Microsoft Graph `sendMail` (`upstream.transport = "graph"`), end to end:
//! a real SMTP client in, the relay's Graph transport out to the simulator's Graph endpoint.
//! Bytes compared, envelope-only recipients as Bcc, the header/envelope mismatch policy, every
//! error of the reference's catalogue in its class, Retry-After honoured, possible duplicates,
//! at most 4 requests in flight, and a restart with Graph messages waiting in each state.

mod common;

use std::time::{Duration, SystemTime};

use common::delivery::{DeliveringRelay, MAILBOX, after_relay_received, start_delivering};
use smtp_oauth_relay::deliver::classify::HoldCause;
use smtp_oauth_relay::metrics::Gauges;
use smtp_oauth_relay::sim::{GraphFault, SimConfig};
use smtp_oauth_relay::spool::EntryState;

/// Fast retries, the pacer out of the way, Graph's 4 requests in flight.
const GRAPH: &str = "[queue]\nretry_min = \"200ms\"\nretry_max = \"400ms\"\n\
                     [upstream]\ntransport = \"graph\"\nconnections = 4\nrate = \"1000/s\"\n";

fn message(to: &str, extra: &str, marker: &str) -> Vec<u8> {
    format!(
        "From: App <app@legacy.test>\r\nTo: {to}\r\n{extra}Subject: {marker}\r\n\
         Date: Wed, 02 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{marker}@legacy.test>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\
         Grüße, {marker}\r\n.leading dot\r\n"
    )
    .into_bytes()
}

/// The message as the relay hands it on: its header From rewritten to the mailbox (the sender
/// policy, `when-different`), the original kept in Reply-To.
fn as_rewritten(msg: &[u8]) -> Vec<u8> {
    let text = String::from_utf8(msg.to_vec()).unwrap();
    text.replacen(
        "From: App <app@legacy.test>\r\n",
        &format!("From: App <{MAILBOX}>\r\nReply-To: App <app@legacy.test>\r\n"),
        1,
    )
    .into_bytes()
}

fn counter(r: &DeliveringRelay, name: &str) -> u64 {
    let text = r.metrics.render(&Gauges::default());
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

async fn wait_failed(r: &DeliveringRelay, n: usize) {
    r.wait_for("a failed message", |relay| {
        relay
            .spool
            .list()
            .expect("list")
            .iter()
            .filter(|e| e.state == EntryState::Failed)
            .count()
            >= n
    })
    .await;
}

#[tokio::test]
async fn bytes_arrive_as_sent_and_envelope_only_recipients_become_bcc() {
    let r = start_delivering(GRAPH, SimConfig::graph()).await;
    let msg = message("Bee <b@example.org>", "", "bytes");
    let id = r
        .submit(
            "<app@legacy.test>",
            &["b@example.org", "c@example.org", "d@example.org"],
            &common::fixtures::dot_stuff(&msg),
        )
        .await;
    let got = r.wait_delivered(1).await;
    let delivered = &got[0];
    assert_eq!(delivered.envelope.transfer, "GRAPH");
    assert_eq!(delivered.envelope.auth_user, MAILBOX);
    let mut rcpts = delivered.envelope.rcpt_to.clone();
    rcpts.sort();
    assert_eq!(rcpts, ["b@example.org", "c@example.org", "d@example.org"]);
    // Below the relay's Received: the added Bcc, then the message exactly as sent.
    let mut expected = b"Bcc: c@example.org,\r\n d@example.org\r\n".to_vec();
    expected.extend_from_slice(&as_rewritten(&msg));
    assert_eq!(
        String::from_utf8_lossy(after_relay_received(&delivered.data)),
        String::from_utf8_lossy(&expected)
    );
    r.wait_for("the spool to empty", |relay| {
        relay.spool.list().expect("list").is_empty()
    })
    .await;
    assert!(r.delivery_state(&id).is_none());
}

#[tokio::test]
async fn a_message_with_only_bcc_recipients_is_delivered_to_them() {
    let r = start_delivering(GRAPH, SimConfig::graph()).await;
    // No To or Cc at all: without the added Bcc, Graph would answer ErrorInvalidRecipients.
    let msg =
        b"From: app@legacy.test\r\nSubject: bcc only\r\nDate: Wed, 02 Dec 2026 10:00:00 +0000\r\n\
                Message-ID: <bcc-only@legacy.test>\r\n\r\nhidden\r\n";
    r.submit(
        "<app@legacy.test>",
        &["x@example.org", "y@example.org"],
        msg,
    )
    .await;
    let got = r.wait_delivered(1).await;
    assert_eq!(got[0].envelope.rcpt_to, ["x@example.org", "y@example.org"]);
    assert!(
        got[0]
            .text()
            .contains("\r\nBcc: x@example.org,\r\n y@example.org\r\n"),
        "{}",
        got[0].text()
    );
}

#[tokio::test]
async fn header_recipients_beyond_the_envelope_are_refused_by_default() {
    let r = start_delivering(GRAPH, SimConfig::graph()).await;
    // To names two, the envelope one: Graph would deliver to both.
    let msg = message("b@example.org, other@example.org", "", "mismatch");
    let id = r
        .submit("<app@legacy.test>", &["b@example.org"], &msg)
        .await;
    wait_failed(&r, 1).await;
    assert_eq!(r.sim.control().graph_requests(), 0, "nothing was sent");
    assert!(r.sim.messages().expect("mailbox").is_empty());
    let state = r.delivery_state(&id).expect("state of the failed message");
    let reason = state.fail_reason.expect("fail reason");
    assert!(
        reason.contains("550 5.7.1") && reason.contains("other@example.org"),
        "{reason}"
    );
    assert!(reason.contains("graph_extra_recipients"), "{reason}");
}

#[tokio::test]
async fn header_recipients_beyond_the_envelope_are_sent_with_policy_send() {
    let _logs = common::logs::capture();
    let toml = format!("{GRAPH}graph_extra_recipients = \"send\"\n");
    let r = start_delivering(&toml, SimConfig::graph()).await;
    let msg = message("b@example.org, other@example.org", "", "mismatch-send");
    r.submit("<app@legacy.test>", &["b@example.org"], &msg)
        .await;
    let got = r.wait_delivered(1).await;
    let mut rcpts = got[0].envelope.rcpt_to.clone();
    rcpts.sort();
    assert_eq!(rcpts, ["b@example.org", "other@example.org"]);
    let line = common::logs::wait_line(&["not in the envelope", "other@example.org"]).await;
    assert!(line.contains("graph_extra_recipients"), "{line}");
}

/// The catalogue's errors that are about the message or passing: (code, final class).
#[tokio::test]
async fn transient_and_permanent_errors_of_the_catalogue() {
    let r = start_delivering(GRAPH, SimConfig::graph()).await;
    let retry = [
        "ApplicationThrottled",
        "ErrorServerBusy",
        "ErrorInternalServerError",
        "UnknownError",
        "CommandConcurrencyLimitReached",
        "ErrorMailboxStoreUnavailable",
        "MailboxInfoStale",
        "ErrorNonExistentMailBox",
    ];
    let mut delivered = 0;
    for code in retry {
        r.sim
            .control()
            .script_graph_fault(GraphFault::code(code), 1);
        let before = r.sim.control().graph_faults_fired();
        let marker = format!("retry-{code}");
        r.submit(
            "<app@legacy.test>",
            &["b@example.org"],
            &message("b@example.org", "", &marker),
        )
        .await;
        delivered += 1;
        let got = r.wait_delivered(delivered).await;
        assert!(got.iter().any(|m| m.text().contains(&marker)), "{code}");
        assert_eq!(r.sim.control().graph_faults_fired(), before + 1, "{code}");
        assert_eq!(
            r.spool_in(EntryState::Failed),
            0,
            "{code} failed the message"
        );
    }
    // 500s may have delivered (Graph is fire-and-forget): counted as possible duplicates;
    // 429 and 503 were refusals and are not.
    assert_eq!(counter(&r, "relay_possible_duplicates_total"), 2);

    let permanent = [
        "ErrorInvalidRecipients",
        "ErrorMessageSizeExceeded",
        "ErrorMimeContentInvalidBase64String",
        "RequestEntityTooLarge",
    ];
    for (i, code) in permanent.iter().enumerate() {
        r.sim
            .control()
            .script_graph_fault(GraphFault::code(code), 1);
        let id = r
            .submit(
                "<app@legacy.test>",
                &["b@example.org"],
                &message("b@example.org", "", &format!("fail-{code}")),
            )
            .await;
        wait_failed(&r, i + 1).await;
        let reason = r
            .delivery_state(&id)
            .and_then(|s| s.fail_reason)
            .unwrap_or_default();
        assert!(reason.contains("Graph HTTP"), "{code}: {reason}");
        if *code != "RequestEntityTooLarge" {
            assert!(reason.contains(code), "{code}: {reason}");
        }
    }
    assert_eq!(r.sim.messages().expect("mailbox").len(), retry.len());
}

/// The catalogue's configuration errors hold the mailbox, each with its own cause and fix;
/// nothing fails and nothing is lost.
#[tokio::test]
async fn configuration_errors_of_the_catalogue_hold_the_mailbox() {
    let cases = [
        ("ErrorAccessDenied", 1, HoldCause::GraphAccessDenied),
        (
            "Authorization_RequestDenied",
            1,
            HoldCause::GraphAccessDenied,
        ),
        ("ErrorSendAsDenied", 1, HoldCause::SendAsDenied),
        (
            "MailboxNotEnabledForRESTAPI",
            1,
            HoldCause::GraphMailboxNotEnabled,
        ),
        ("ErrorInvalidUser", 1, HoldCause::GraphMailboxNotFound),
        ("ResourceNotFound", 1, HoldCause::GraphMailboxNotFound),
        ("ErrorQuotaExceeded", 1, HoldCause::MailboxFull),
        (
            "NoPermissionsInAccessToken",
            1,
            HoldCause::GraphNoPermissions,
        ),
        // Refused twice: once before and once after the forced token refresh.
        (
            "InvalidAuthenticationToken",
            2,
            HoldCause::GraphTokenRejected,
        ),
    ];
    for (code, times, cause) in cases {
        let r = start_delivering(GRAPH, SimConfig::graph()).await;
        r.sim
            .control()
            .script_graph_fault(GraphFault::code(code), times);
        r.submit(
            "<app@legacy.test>",
            &["b@example.org"],
            &message("b@example.org", "", "held"),
        )
        .await;
        let (held, reply) = r.wait_held().await;
        assert_eq!(held, cause, "{code}: {reply}");
        assert!(reply.contains(code), "{code}: {reply}");
        assert!(cause.fix().len() > 40);
        assert_eq!(r.spool_in(EntryState::Failed), 0, "{code}");
    }
}

#[tokio::test]
async fn a_token_graph_refuses_is_refreshed_once_then_the_request_succeeds() {
    let r = start_delivering(GRAPH, SimConfig::graph()).await;
    let issued = r.sim.control().tokens_issued();
    r.sim
        .control()
        .script_graph_fault(GraphFault::code("InvalidAuthenticationToken"), 1);
    r.submit(
        "<app@legacy.test>",
        &["b@example.org"],
        &message("b@example.org", "", "refresh"),
    )
    .await;
    r.wait_delivered(1).await;
    assert_eq!(r.sim.control().graph_requests(), 2);
    assert!(r.sim.control().tokens_issued() > issued, "no fresh token");
}

/// Real conditions rather than scripted answers: what the simulated tenant is missing decides.
#[tokio::test]
async fn the_tenant_missing_a_permission_holds_with_its_fix() {
    // The app has only the SMTP permission: no Mail.Send in the token.
    let r = start_delivering(GRAPH, SimConfig::default()).await;
    r.submit(
        "<app@legacy.test>",
        &["b@example.org"],
        &message("b@example.org", "", "no-mail-send"),
    )
    .await;
    let (cause, reply) = r.wait_held().await;
    assert_eq!(cause, HoldCause::GraphAccessDenied, "{reply}");
    assert!(cause.fix().contains("Application Mail.Send"));

    // A token for Exchange Online, not Graph: refused before and after a refresh.
    let r = common::delivery::start_delivering_with(GRAPH, SimConfig::graph(), |config, _| {
        config.oauth.scope = Some("https://outlook.office365.com/.default".into());
    })
    .await;
    r.submit(
        "<app@legacy.test>",
        &["b@example.org"],
        &message("b@example.org", "", "wrong-audience"),
    )
    .await;
    let (cause, reply) = r.wait_held().await;
    assert_eq!(cause, HoldCause::GraphTokenRejected, "{reply}");
    assert!(reply.contains("Invalid audience"), "{reply}");

    // RBAC for Applications without an assignment covering the mailbox.
    let r = start_delivering(GRAPH, SimConfig::graph()).await;
    r.sim.control().set_graph_rbac_mode(true);
    r.sim.control().set_full_access(MAILBOX, false);
    r.submit(
        "<app@legacy.test>",
        &["b@example.org"],
        &message("b@example.org", "", "rbac"),
    )
    .await;
    let (cause, _) = r.wait_held().await;
    assert_eq!(cause, HoldCause::GraphAccessDenied);
}

#[tokio::test]
async fn retry_after_sets_the_earliest_next_attempt() {
    let r = start_delivering(GRAPH, SimConfig::graph()).await;
    r.sim.control().script_graph_fault(
        GraphFault::Error {
            status: 429,
            code: "ApplicationThrottled".into(),
            message: "Application is over its MailboxConcurrency limit.".into(),
            retry_after: Some(3),
        },
        1,
    );
    let before = SystemTime::now();
    let id = r
        .submit(
            "<app@legacy.test>",
            &["b@example.org"],
            &message("b@example.org", "", "retry-after"),
        )
        .await;
    r.wait_for(
        "the deferral to be recorded",
        |relay| matches!(relay.spool.read_state(&id), Ok(Some(s)) if s.attempts >= 1),
    )
    .await;
    let state = r.delivery_state(&id).expect("state");
    let next = state.next_attempt.expect("next attempt");
    // retry_min is 200ms; Graph asked for 3 s.
    let wait = next.duration_since(before).expect("after the submission");
    assert!(
        wait >= Duration::from_secs(3),
        "next attempt after {wait:?}"
    );
    assert!(state.possible_duplicate.is_none(), "a 429 sent nothing");
    r.wait_delivered(1).await;
}

#[tokio::test]
async fn a_504_after_graph_kept_the_message_is_a_possible_duplicate_and_a_202_is_final() {
    let r = start_delivering(GRAPH, SimConfig::graph()).await;
    r.sim
        .control()
        .script_graph_fault(GraphFault::KeepThenError { status: 504 }, 1);
    r.submit(
        "<app@legacy.test>",
        &["b@example.org"],
        &message("b@example.org", "", "dup"),
    )
    .await;
    // Kept on the 504, sent again on the retry: at-least-once, said out loud.
    r.wait_delivered(2).await;
    assert_eq!(counter(&r, "relay_possible_duplicates_total"), 1);

    // A 202 with Retry-After is final: retrying it would send a second copy.
    r.sim
        .control()
        .script_graph_fault(GraphFault::AcceptedWithRetryAfter { secs: 1 }, 1);
    r.submit(
        "<app@legacy.test>",
        &["b@example.org"],
        &message("b@example.org", "", "final"),
    )
    .await;
    r.wait_delivered(3).await;
    r.wait_for("the spool to empty", |relay| {
        relay.spool.list().expect("list").is_empty()
    })
    .await;
    assert_eq!(r.sim.control().graph_requests(), 3);
    assert_eq!(counter(&r, "relay_possible_duplicates_total"), 1);
}

#[tokio::test]
async fn never_more_than_four_requests_in_flight() {
    let r = start_delivering(GRAPH, SimConfig::graph()).await;
    // Slow answers keep requests in flight long enough to overlap.
    r.sim
        .control()
        .script_graph_fault(GraphFault::KeepThenStall(Duration::from_millis(150)), 40);
    let sent = r.send_tracked("burst", 24).await;
    let markers: Vec<String> = sent.into_iter().map(|(m, _)| m).collect();
    let duplicates = r.drain(&markers, "burst").await;
    assert_eq!(duplicates, 0);
    let most = r.sim.control().graph_max_in_flight();
    assert!(most <= 4, "{most} requests in flight");
    assert!(most >= 2, "the burst never overlapped ({most})");
}

#[tokio::test]
async fn graph_messages_waiting_in_each_state_are_delivered_after_a_restart() {
    let mut r = start_delivering_tuned().await;
    // Deferred: a 503 that pauses only its message (no Retry-After, not a throttle), for
    // retry_min (5 s here): longer than the restart takes.
    r.sim.control().script_graph_fault(
        GraphFault::Error {
            status: 503,
            code: "MailboxInfoStale".into(),
            message: "Target resource is currently on backend 'Unknown'.".into(),
            retry_after: None,
        },
        2,
    );
    let deferred = r.send_tracked("deferred", 2).await;
    r.wait_for("both deferrals recorded", |relay| {
        deferred
            .iter()
            .all(|(_, id)| matches!(relay.spool.read_state(id), Ok(Some(s)) if s.attempts >= 1))
    })
    .await;
    assert_eq!(r.sim.control().graph_faults_fired(), 2);
    assert!(r.sim.messages().expect("mailbox").is_empty());
    r.stop_deliverer().await;
    // Queued while no deliverer runs: never attempted.
    let queued = r.send_tracked("queued", 3).await;
    // Held by the operator: stays put across the restart.
    let held = r.send_tracked("held", 1).await;
    r.relay
        .spool
        .move_to(&held[0].1, EntryState::Held)
        .expect("hold");
    r.start_deliverer(|_| {});
    let markers: Vec<String> = deferred
        .iter()
        .chain(&queued)
        .map(|(m, _)| m.clone())
        .collect();
    r.wait_for("every waiting message delivered", |relay| {
        relay.spool.list().expect("list").len() == 1
    })
    .await;
    let got = r.delivered_markers();
    for m in &markers {
        assert_eq!(got.get(m), Some(&1), "{m}: {got:?}");
    }
    assert!(!got.contains_key("held-0"));
    assert_eq!(r.spool_in(EntryState::Held), 1);
    assert_eq!(r.spool_in(EntryState::Failed), 0);
}

/// A Graph relay whose deliverer can be stopped and started again, retrying after 5 s.
async fn start_delivering_tuned() -> DeliveringRelay {
    common::delivery::start_tuned(
        "[queue]\nretry_min = \"5s\"\nretry_max = \"10s\"\n\
         [upstream]\ntransport = \"graph\"\nconnections = 4\nrate = \"1000/s\"\n",
        SimConfig::graph(),
        |_| {},
        Default::default(),
        |_| {},
    )
    .await
}

/// With `upstream.graph_large_messages` off (the default), a Graph relay refuses at accept what
/// sendMail would not take (552 5.3.4, already on `SIZE=`), instead of accepting it and failing
/// it later; what fits is delivered whole.
#[tokio::test]
async fn messages_too_large_for_sendmail_are_refused_at_accept() {
    let r = start_delivering(GRAPH, SimConfig::graph()).await;
    let limit = smtp_oauth_relay::inbound::accept_limit(&r.config);
    assert!(limit < smtp_oauth_relay::transport::graph::SENDMAIL_MAX_RAW);
    let mut c = r.relay.connect().await;
    c.expect("220").await;
    let ehlo = c.cmd_expect("EHLO client.test", "250").await;
    assert!(
        ehlo.text().contains(&format!("SIZE {limit}")),
        "{}",
        ehlo.text()
    );
    c.cmd_expect(
        &format!("MAIL FROM:<app@legacy.test> SIZE={}", limit + 1),
        "552 5.3.4",
    )
    .await;
    // Without SIZE=: refused at the end of DATA, nothing queued.
    c.cmd_expect("MAIL FROM:<app@legacy.test>", "250").await;
    c.cmd_expect("RCPT TO:<b@example.org>", "250").await;
    c.cmd_expect("DATA", "354").await;
    let big = common::fixtures::message("too-big", limit as usize + 1000);
    c.send(&common::fixtures::data_block(&big)).await;
    c.expect("552 5.3.4").await;
    c.cmd_expect("QUIT", "221").await;
    assert!(r.relay.spool.list().expect("list").is_empty());

    // Just under the limit: 4 MiB of base64 at most, delivered byte for byte.
    let fits = common::fixtures::message("fits", limit as usize - 4096);
    let mut c = r.relay.connect().await;
    c.begin_message("app@legacy.test", &["user@example.org"])
        .await;
    c.send(&common::fixtures::data_block(&fits)).await;
    c.expect("250 2.0.0 queued as").await;
    let got = r.wait_delivered(1).await;
    assert!(got[0].data.ends_with(&fits[fits.len() - 4000..]));
    assert_eq!(r.spool_in(EntryState::Failed), 0);
}

/// `serve --simulate` with `transport = "graph"`: the real binary delivers through the
/// simulator's Graph endpoint (the simulated app has Mail.Send), into its mailbox folder.
#[test]
fn serve_simulate_runs_with_the_graph_transport() {
    use common::process::{Relay, relay_toml};
    let mut relay = Relay::builder()
        .config(|s| {
            relay_toml(
                s.smtp,
                &s.spool,
                "",
                "retry_min = \"200ms\"",
                "[upstream]\ntransport = \"graph\"\nmail_account = \"relay@contoso.example\"\n\
                 [oauth]\ntenant_id = \"contoso.onmicrosoft.com\"\n\
                 client_id = \"0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10\"\nclient_secret = \"x~y\"\n\
                 [log]\nlevel = \"info\"\n",
            )
        })
        .arg("--simulate")
        .start();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], relay.port));
    let mut c = common::smtp::blocking::Client::connect(addr).expect("connect");
    let reply = c
        .send(
            "app@legacy.test",
            "b@example.org",
            b"From: app@legacy.test\r\nTo: b@example.org\r\nSubject: simulate\r\n\r\nvia Graph\r\n",
        )
        .expect("send");
    assert_eq!(reply.code, 250, "{reply:?}");
    c.quit();
    let mailbox = relay.dir.join("simulator").join("mailbox");
    let mut found = None;
    for _ in 0..300 {
        found = std::fs::read_dir(&mailbox).ok().and_then(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "json"))
        });
        if found.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let json = found.unwrap_or_else(|| panic!("nothing delivered:\n{}", relay.log_text()));
    let envelope: serde_json::Value =
        serde_json::from_slice(&std::fs::read(json).expect("read")).expect("json");
    assert_eq!(envelope["transfer"], "GRAPH");
    assert_eq!(envelope["rcpt_to"], serde_json::json!(["b@example.org"]));
    assert!(
        relay
            .log_text()
            .contains("delivering through Microsoft Graph sendMail")
    );
    assert!(relay.stop());
}
