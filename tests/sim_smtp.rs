//! Simulated Exchange Online SMTP over real sockets: transcript, AUTH, permissions, limits, end-of-DATA checks.

mod common;

use common::fixtures::{data_block, sim_message};
use common::sim::{start, token, token_for_scope};
use common::smtp::Client;
use smtp_oauth_relay::sim::{DEFAULT_MAILBOX, RateMode, SendAsReply};
use std::time::Duration;

const MBX: &str = DEFAULT_MAILBOX;

#[tokio::test]
async fn recorded_transcript_and_stored_message() {
    let sim = start().await;
    let tok = token(&sim).await;
    let (mut c, banner) = Client::connect_sim(&sim).await;
    assert_eq!(banner.code, 220);
    let b = &banner.lines[0];
    assert!(
        b.starts_with("SY5P282CA0097.outlook.office365.com Microsoft ESMTP MAIL Service ready at "),
        "{b}"
    );
    assert!(b.ends_with(']') && b.contains(" +0000 ["), "{b}");

    let ehlo = c.cmd("EHLO client.example").await;
    assert_eq!(ehlo.code, 250);
    assert_eq!(
        ehlo.lines[0],
        "SY5P282CA0097.outlook.office365.com Hello [127.0.0.1]"
    );
    assert_eq!(
        ehlo.lines[1..],
        [
            "SIZE 157286400",
            "PIPELINING",
            "DSN",
            "ENHANCEDSTATUSCODES",
            "STARTTLS",
            "8BITMIME",
            "BINARYMIME",
            "CHUNKING",
            "SMTPUTF8"
        ]
    );
    let mut c = c.starttls(sim.ca_file(), "smtp.office365.com").await;
    let ehlo = c.cmd("EHLO client.example").await;
    assert_eq!(
        ehlo.lines[1..],
        [
            "SIZE 157286400",
            "PIPELINING",
            "DSN",
            "ENHANCEDSTATUSCODES",
            "AUTH LOGIN XOAUTH2",
            "8BITMIME",
            "BINARYMIME",
            "CHUNKING",
            "SMTPUTF8"
        ]
    );
    let challenge = c.cmd("AUTH XOAUTH2").await;
    assert_eq!(challenge.code, 334);
    assert_eq!(challenge.lines, [""]);
    let ok = c.cmd(&common::sim::xoauth2(MBX, &tok)).await;
    ok.assert(235, "2.7.0");
    assert_eq!(ok.lines[0], "2.7.0 Authentication successful");

    let mail = c.cmd(&format!("MAIL FROM:<{MBX}>")).await;
    assert_eq!(mail.lines[0], "2.1.0 Sender OK");
    let rcpt = c.cmd("RCPT TO:<rcpt@example.org>").await;
    assert_eq!(rcpt.lines[0], "2.1.5 Recipient OK");
    let data = c.cmd("DATA").await;
    assert_eq!(
        (data.code, data.lines[0].as_str()),
        (354, "Start mail input; end with <CRLF>.<CRLF>")
    );
    let body = format!("From: <{MBX}>\r\nSubject: t\r\n\r\n.leading dot\r\nend\r\n");
    c.send(&data_block(&body)).await;
    let done = c.read_reply().await.expect("final reply");
    done.assert(250, "2.0.0");
    let text = &done.lines[0];
    assert!(text.starts_with("2.0.0 OK <CH2PR14MB4005"), "{text}");
    assert!(
        text.ends_with(
            "@CH2PR14MB4005.namprd14.prod.outlook.com> [Hostname=CH2PR14MB4005.namprd14.prod.outlook.com]"
        ),
        "{text}"
    );
    let id = text["2.0.0 OK <".len()..]
        .split('@')
        .next()
        .unwrap_or_default()
        .to_string();

    let quit = c.cmd("QUIT").await;
    quit.assert(221, "2.0.0");
    assert_eq!(quit.lines[0], "2.0.0 Service closing transmission channel");

    let msgs = sim.messages().expect("list");
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.envelope.id, id);
    assert_eq!(m.envelope.mail_from, MBX);
    assert_eq!(m.envelope.rcpt_to, ["rcpt@example.org"]);
    assert_eq!(m.envelope.auth_user, MBX);
    assert_eq!(m.data, body.as_bytes(), "exact bytes, dot-unstuffed");
    assert!(sim.mailbox_dir().join(format!("{id}.eml")).is_file());
    assert!(sim.mailbox_dir().join(format!("{id}.json")).is_file());
}

#[tokio::test]
async fn inline_auth_empty_message_and_rset() {
    let sim = start().await;
    let tok = token(&sim).await;
    let mut c = Client::secure(&sim).await;
    c.auth_inline(MBX, &tok).await.assert(235, "2.7.0");
    c.cmd("AUTH XOAUTH2").await.assert(503, "5.5.1");
    c.cmd(&format!("MAIL FROM:<{MBX}>"))
        .await
        .assert(250, "2.1.0");
    let rset = c.cmd("RSET").await;
    rset.assert(250, "2.0.0");
    assert_eq!(rset.lines[0], "2.0.0 Resetting");
    c.cmd("RCPT TO:<a@example.org>").await.assert(503, "5.5.2");
    c.cmd("DATA").await.assert(503, "5.5.2");
    // An empty message (DATA then the dot at once) must not hang (smtp-proto primer).
    c.cmd(&format!("MAIL FROM:<{MBX}>"))
        .await
        .assert(250, "2.1.0");
    c.cmd("RCPT TO:<a@example.org>").await.assert(250, "2.1.5");
    c.cmd("DATA").await.assert(354, "");
    c.cmd(".").await.assert(250, "2.0.0");
    c.cmd("NOOP").await.assert(250, "2.0.0");
    c.cmd("VRFY x").await.assert(500, "5.3.3");
    assert!(
        c.cmd("FOO").await.lines[0].starts_with("5.3.3 Unrecognized command 'FOO' [SY5P282CA0097")
    );
}

#[tokio::test]
async fn before_tls_and_before_auth() {
    let sim = start().await;
    let tok = token(&sim).await;
    let (mut c, _) = Client::connect_sim(&sim).await;
    c.cmd("EHLO x").await.assert(250, "");
    let r = c
        .cmd(&format!("AUTH XOAUTH2 {}", common::sim::xoauth2(MBX, &tok)))
        .await;
    r.assert(504, "5.7.4");
    assert!(r.lines[0].starts_with("5.7.4 Unrecognized authentication type"));
    let r = c.cmd(&format!("MAIL FROM:<{MBX}>")).await;
    r.assert(530, "5.7.57");
    assert!(r.lines[0].starts_with("5.7.57 Client not authenticated to send mail"));

    let mut c = Client::secure(&sim).await;
    c.cmd(&format!("MAIL FROM:<{MBX}>"))
        .await
        .assert(530, "5.7.57");
    c.send(b"BDAT 3 LAST\r\nabc").await;
    c.read_reply().await.expect("reply").assert(530, "5.7.57");
    c.cmd("AUTH PLAIN AGZvbwBiYXI=").await.assert(504, "5.7.4");
    c.cmd("AUTH XOAUTH2 !!!notbase64")
        .await
        .assert(501, "5.5.4");
    // Basic auth via LOGIN is refused as Exchange does since the Basic retirement.
    c.cmd("AUTH LOGIN").await;
    c.cmd("dXNlcg==").await;
    let r = c.cmd("cGFzcw==").await;
    r.assert(550, "5.7.30");
    assert!(
        r.lines[0]
            .starts_with("5.7.30 Basic authentication is not supported for Client Submission.")
    );
}

async fn auth_reply(sim: &common::sim::TestSim, user: &str, token: &str) -> common::smtp::Reply {
    let mut c = Client::secure(sim).await;
    c.auth_two_step(user, token).await
}

#[tokio::test]
async fn every_auth_failure_is_generic_535_5_7_3() {
    let sim = start().await;
    let good = token(&sim).await;

    let generic = |r: common::smtp::Reply| {
        r.assert(535, "5.7.3");
        assert!(
            r.lines[0].starts_with("5.7.3 Authentication unsuccessful [SY5P282CA0097."),
            "{r:?}"
        );
    };
    // Tampered signature.
    let mut bad = good.clone();
    bad.pop();
    bad.push(if good.ends_with('A') { 'B' } else { 'A' });
    generic(auth_reply(&sim, MBX, &bad).await);
    // Not a JWT at all.
    generic(auth_reply(&sim, MBX, "opaque").await);
    // Wrong audience (a Graph token).
    let graph = token_for_scope(&sim, "https://graph.microsoft.com/.default").await;
    generic(auth_reply(&sim, MBX, &graph).await);
    // Mailbox unknown, then FullAccess missing.
    generic(auth_reply(&sim, "other@contoso.example", &good).await);
    sim.control().set_full_access(MBX, false);
    generic(auth_reply(&sim, MBX, &good).await);
    sim.control().set_full_access(MBX, true);
    // Service principal not registered in Exchange.
    sim.control().set_exchange_service_principal(false);
    generic(auth_reply(&sim, MBX, &good).await);
    sim.control().set_exchange_service_principal(true);
    // Expired token (lifetime 0 makes exp == iat).
    sim.control().set_token_lifetime(0);
    let expired = token(&sim).await;
    generic(auth_reply(&sim, MBX, &expired).await);
    sim.control().set_token_lifetime(3599);
    // Roles missing, then empty.
    sim.control().set_roles(None);
    let no_roles = token(&sim).await;
    generic(auth_reply(&sim, MBX, &no_roles).await);
    sim.control().set_roles(Some(vec![]));
    let empty_roles = token(&sim).await;
    generic(auth_reply(&sim, MBX, &empty_roles).await);
    // A token minted with our key but for another tenant.
    let foreign = sim
        .control()
        .mint_token(&serde_json::json!({
            "aud": "https://outlook.office365.com", "tid": "00000000-0000-0000-0000-000000000000",
            "appid": sim.config().clients[0].client_id, "roles": ["SMTP.SendAsApp"], "exp": 4_000_000_000u64
        }))
        .expect("mint");
    generic(auth_reply(&sim, MBX, &foreign).await);

    // RBAC for Applications: no role needed.
    sim.control().set_rbac_mode(true);
    auth_reply(&sim, MBX, &no_roles).await.assert(235, "2.7.0");
    // The good token still works, the two-step and lowercase mechanism too.
    sim.control().set_rbac_mode(false);
    let mut c = Client::secure(&sim).await;
    assert_eq!(c.cmd("auth xoauth2").await.code, 334);
    c.cmd(&common::sim::xoauth2(MBX, &good))
        .await
        .assert(235, "2.7.0");
}

#[tokio::test]
async fn smtp_auth_disabled_tenant_and_mailbox() {
    let sim = start().await;
    let tok = token(&sim).await;
    sim.control().set_smtp_auth_disabled(true);
    let r = auth_reply(&sim, MBX, &tok).await;
    r.assert(535, "5.7.139");
    assert!(
        r.lines[0].starts_with(
            "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit \
             https://aka.ms/smtp_auth_disabled for more information."
        ),
        "{r:?}"
    );
    sim.control().set_smtp_auth_disabled(false);
    sim.control().set_mailbox_smtp_auth_disabled(MBX, true);
    let r = auth_reply(&sim, MBX, &tok).await;
    r.assert(535, "5.7.139");
    assert!(r.lines[0].starts_with(
        "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. Visit \
         https://aka.ms/smtp_auth_disabled for more information."
    ));
    sim.control().set_mailbox_smtp_auth_disabled(MBX, false);
    auth_reply(&sim, MBX, &tok).await.assert(235, "2.7.0");
}

#[tokio::test]
async fn send_as_checked_after_data() {
    let sim = start().await;
    let tok = token(&sim).await;
    let mut c = Client::authenticated(&sim, MBX, &tok).await;
    let r = c
        .send_message(
            MBX,
            &["a@example.org"],
            &sim_message("boss@contoso.example", "x"),
        )
        .await;
    r.assert(550, "5.7.60");
    assert!(
        r.lines[0]
            .starts_with("5.7.60 SMTP; Client does not have permissions to send as this sender")
    );
    // Envelope sender is checked too.
    c.send_message(
        "boss@contoso.example",
        &["a@example.org"],
        &sim_message(MBX, "x"),
    )
    .await
    .assert(550, "5.7.60");

    sim.control().set_send_as_reply(SendAsReply::Code52252);
    let r = c
        .send_message(
            MBX,
            &["a@example.org"],
            &sim_message("boss@contoso.example", "x"),
        )
        .await;
    r.assert(554, "5.2.252");
    let text = &r.lines[0];
    assert!(text.starts_with(&format!(
        "5.2.252 SendAsDenied; {MBX} not allowed to send as boss@contoso.example; \
         STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process message due \
         to a permanent exception with message [BeginDiagnosticData]Cannot submit message."
    )));
    assert!(text.len() > 4096, "long diagnostic tail");

    sim.control()
        .set_send_as(MBX, vec!["boss@contoso.example".into()]);
    c.send_message(
        MBX,
        &["a@example.org"],
        &sim_message("boss@contoso.example", "x"),
    )
    .await
    .assert(250, "2.0.0");
    assert_eq!(sim.messages().expect("list").len(), 1);
}

#[tokio::test]
async fn continuous_send_as_errors_throttle_the_sender() {
    let sim = start().await;
    sim.control().set_continuous_error_threshold(2);
    let tok = token(&sim).await;
    let mut c = Client::authenticated(&sim, MBX, &tok).await;
    for _ in 0..2 {
        c.send_message(
            MBX,
            &["a@example.org"],
            &sim_message("x@contoso.example", "x"),
        )
        .await
        .assert(550, "5.7.60");
    }
    let r = c.cmd(&format!("MAIL FROM:<{MBX}>")).await;
    r.assert(550, "5.2.252");
    assert!(
        r.lines[0].starts_with("5.2.252 Sender throttled due to continuous send as denied errors.")
    );
    sim.control().reset_usage();
    c.send_message(MBX, &["a@example.org"], &sim_message(MBX, "x"))
        .await
        .assert(250, "2.0.0");
}

#[tokio::test]
async fn more_than_three_connections_per_mailbox_get_432() {
    let sim = start().await;
    let tok = token(&sim).await;
    let mut sessions = Vec::new();
    for _ in 0..4 {
        sessions.push(Client::authenticated(&sim, MBX, &tok).await);
    }
    assert_eq!(sim.control().active_sessions(MBX), 4);
    let r = sessions[0]
        .send_message(MBX, &["a@example.org"], &sim_message(MBX, "x"))
        .await;
    r.assert(432, "4.3.2");
    assert!(
        r.lines[0]
            .starts_with("4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [Hostname=")
    );
    let mut last = sessions.pop().expect("fourth");
    last.cmd("QUIT").await.assert(221, "2.0.0");
    drop(last);
    // The count drops once the server has seen the QUIT; bounded wait without timing assertions.
    for _ in 0..200 {
        if sim.control().active_sessions(MBX) == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sim.control().active_sessions(MBX), 3);
    sessions[0]
        .send_message(MBX, &["a@example.org"], &sim_message(MBX, "x"))
        .await
        .assert(250, "2.0.0");
}

#[tokio::test]
async fn message_rate_reject_and_delay() {
    let sim = start().await;
    sim.control()
        .set_rate_limit(2, Duration::from_secs(3600), RateMode::Reject);
    let tok = token(&sim).await;
    let mut c = Client::authenticated(&sim, MBX, &tok).await;
    for _ in 0..2 {
        c.send_message(MBX, &["a@example.org"], &sim_message(MBX, "x"))
            .await
            .assert(250, "2.0.0");
    }
    let r = c
        .send_message(MBX, &["a@example.org"], &sim_message(MBX, "x"))
        .await;
    r.assert(432, "4.3.2");
    assert_eq!(sim.messages().expect("list").len(), 2);

    // Delay mode: the reply waits for the window instead of refusing.
    sim.control().reset_usage();
    sim.control()
        .set_rate_limit(1, Duration::from_millis(150), RateMode::Delay);
    for _ in 0..2 {
        c.send_message(MBX, &["a@example.org"], &sim_message(MBX, "x"))
            .await
            .assert(250, "2.0.0");
    }
    assert_eq!(sim.messages().expect("list").len(), 4);
}

#[tokio::test]
async fn recipient_limits() {
    let sim = start().await;
    let tok = token(&sim).await;
    sim.control().set_max_recipients(2);
    let mut c = Client::authenticated(&sim, MBX, &tok).await;
    c.cmd(&format!("MAIL FROM:<{MBX}>"))
        .await
        .assert(250, "2.1.0");
    c.cmd("RCPT TO:<a@example.org>").await.assert(250, "2.1.5");
    c.cmd("RCPT TO:<b@example.org>").await.assert(250, "2.1.5");
    let r = c.cmd("RCPT TO:<c@example.org>").await;
    r.assert(452, "4.5.3");
    assert_eq!(r.lines[0], "4.5.3 Too many recipients");
    c.cmd("RSET").await.assert(250, "2.0.0");

    sim.control().set_recipients_per_day(3);
    c.send_message(
        MBX,
        &["a@example.org", "b@example.org"],
        &sim_message(MBX, "x"),
    )
    .await
    .assert(250, "2.0.0");
    let r = c
        .send_message(
            MBX,
            &["a@example.org", "b@example.org"],
            &sim_message(MBX, "x"),
        )
        .await;
    r.assert(554, "5.2.0");
    assert!(
        r.lines[0]
            .starts_with("5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException")
    );
    c.send_message(MBX, &["a@example.org"], &sim_message(MBX, "x"))
        .await
        .assert(250, "2.0.0");
}

#[tokio::test]
async fn size_header_and_bare_lf_checks() {
    let sim = start().await;
    let tok = token(&sim).await;
    let mut c = Client::authenticated(&sim, MBX, &tok).await;
    let r = c.cmd(&format!("MAIL FROM:<{MBX}> SIZE=157286401")).await;
    r.assert(552, "5.3.4");
    assert_eq!(
        r.lines[0],
        "5.3.4 Message size exceeds fixed maximum message size"
    );
    c.cmd(&format!("MAIL FROM:<{MBX}> SIZE=100 BODY=8BITMIME"))
        .await
        .assert(250, "2.1.0");
    c.cmd("RSET").await;

    sim.control().set_max_send_size(100);
    let big = format!("{}{}\r\n", sim_message(MBX, "big"), "x".repeat(200));
    let r = c.send_message(MBX, &["a@example.org"], &big).await;
    r.assert(554, "5.2.0");
    assert!(
        r.lines[0].contains(
            "MapiExceptionMaxSubmissionExceeded; Message size exceeds maximum size limit."
        )
    );
    sim.control().set_max_send_size(36_700_160);

    let long_header = format!(
        "From: <{MBX}>\r\nAutocrypt: {}\r\n\r\nbody\r\n",
        "a".repeat(33_000)
    );
    let r = c.send_message(MBX, &["a@example.org"], &long_header).await;
    r.assert(554, "5.6.211");
    assert!(r.lines[0].starts_with(
        "5.6.211 Invalid MIME Content: Single text value size (33000) exceeded allowed maximum (32768) for the \
         'Autocrypt' header."
    ));

    // Bare LF inside the body (sent raw, not through data_block's CRLF handling).
    c.cmd(&format!("MAIL FROM:<{MBX}>"))
        .await
        .assert(250, "2.1.0");
    c.cmd("RCPT TO:<a@example.org>").await.assert(250, "2.1.5");
    c.cmd("DATA").await.assert(354, "");
    c.send(format!("From: <{MBX}>\r\n\r\nline one\nline two\r\n.\r\n").as_bytes())
        .await;
    c.read_reply().await.expect("reply").assert(550, "5.6.11");
    assert!(sim.messages().expect("list").is_empty());
}

#[tokio::test]
async fn bdat_chunking() {
    let sim = start().await;
    let tok = token(&sim).await;
    let mut c = Client::authenticated(&sim, MBX, &tok).await;
    c.cmd(&format!("MAIL FROM:<{MBX}> BODY=BINARYMIME"))
        .await
        .assert(250, "2.1.0");
    c.cmd("RCPT TO:<a@example.org>").await.assert(250, "2.1.5");
    let part1 = format!("From: <{MBX}>\r\nSubject: bdat\r\n\r\n");
    let part2 = ".no stuffing\r\nbinary \x01 ok\r\n";
    c.send(format!("BDAT {}\r\n{part1}", part1.len()).as_bytes())
        .await;
    c.read_reply()
        .await
        .expect("chunk reply")
        .assert(250, "2.0.0");
    c.cmd("DATA").await.assert(503, "5.5.1");
    c.send(format!("BDAT {} LAST\r\n{part2}", part2.len()).as_bytes())
        .await;
    let r = c.read_reply().await.expect("last reply");
    r.assert(250, "2.0.0");
    assert!(r.lines[0].starts_with("2.0.0 OK <CH2PR14MB4005"));
    let msgs = sim.messages().expect("list");
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].data, format!("{part1}{part2}").as_bytes());
    assert_eq!(msgs[0].envelope.transfer, "BDAT");

    // BDAT without a transaction: refused, and its chunk is skipped so the session stays in sync.
    c.send(b"BDAT 5 LAST\r\nhello").await;
    c.read_reply().await.expect("reply").assert(503, "5.5.2");
    c.cmd("NOOP").await.assert(250, "2.0.0");
}
