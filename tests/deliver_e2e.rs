//! Relay → simulator: accepted mail reaches the Exchange stand-in over STARTTLS + XOAUTH2, and
//! every outcome class behaves as DESIGN.md says.

mod common;

use common::delivery::{MAILBOX, start_delivering};
use common::strip_added_headers;
use smtp_oauth_relay::deliver::MailboxState;
use smtp_oauth_relay::deliver::classify::HoldCause;
use smtp_oauth_relay::queue_command::QueueCommand;
use smtp_oauth_relay::sim::SimConfig;
use smtp_oauth_relay::spool::EntryState;

const FAST: &str =
    "[queue]\nretry_min = \"200ms\"\nretry_max = \"1s\"\n[upstream]\nrate = \"1000/s\"\n";

#[tokio::test]
async fn accepted_mail_is_delivered_exactly_and_leaves_the_spool() {
    let r = start_delivering(FAST, SimConfig::default()).await;
    let mut c = r.relay.connect().await;
    c.begin_message("app@legacy.test", &["b@example.org", "c@example.org"])
        .await;
    let body = format!("From: {MAILBOX}\r\nSubject: hello\r\n\r\n.dot line\r\nbody\r\n");
    // On the wire the client dot-stuffs the line starting with ".".
    c.send(body.replace("\r\n.dot", "\r\n..dot").as_bytes())
        .await;
    c.send(b".\r\n").await;
    c.expect("250 2.0.0 queued as").await;
    let got = r.wait_delivered(1).await;
    let msg = &got[0];
    assert_eq!(msg.envelope.auth_user, MAILBOX);
    assert_eq!(msg.envelope.mail_from, MAILBOX);
    assert_eq!(msg.envelope.rcpt_to, vec!["b@example.org", "c@example.org"]);
    assert_eq!(
        strip_added_headers(&msg.data, body.as_bytes()),
        body.as_bytes()
    );
    r.wait_for("empty spool", |relay| {
        relay.spool.list().expect("list").is_empty()
    })
    .await;
}

#[tokio::test]
async fn smtp_auth_disabled_holds_everything_until_fixed() {
    let r = start_delivering(FAST, SimConfig::default()).await;
    r.sim.control().set_smtp_auth_disabled(true);
    let mut c = r.relay.connect().await;
    for i in 0..3 {
        if i == 0 {
            c.begin_message("app@legacy.test", &["b@example.org"]).await;
        } else {
            c.cmd_expect("MAIL FROM:<app@legacy.test>", "250").await;
            c.cmd_expect("RCPT TO:<b@example.org>", "250").await;
            c.cmd_expect("DATA", "354").await;
        }
        c.send(format!("Subject: {i}\r\n\r\nx\r\n.\r\n").as_bytes())
            .await;
        c.expect("250 2.0.0 queued as").await;
    }
    let (cause, reply) = r.wait_held().await;
    assert_eq!(cause, HoldCause::SmtpAuthDisabled);
    assert!(reply.contains("535 5.7.139"), "{reply}");
    assert_eq!(r.relay.spool.list().expect("list").len(), 3);
    assert!(r.sim.messages().expect("mailbox").is_empty());
    // The admin fixes it; the next probe resumes delivery of all three.
    r.sim.control().set_smtp_auth_disabled(false);
    r.wait_delivered(3).await;
    assert_eq!(r.delivery.status().state, MailboxState::Running);
}

#[tokio::test]
async fn a_refused_recipient_fails_alone_and_the_message_goes_to_failed() {
    let r = start_delivering(FAST, SimConfig::default()).await;
    r.sim.control().script_smtp_fault(
        smtp_oauth_relay::sim::SmtpStage::Rcpt,
        smtp_oauth_relay::sim::SmtpFault::Reply {
            code: 550,
            text:
                "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
                    .into(),
        },
        1,
    );
    let mut c = r.relay.connect().await;
    c.begin_message("app@legacy.test", &["gone@example.org", "ok@example.org"])
        .await;
    c.send(b"Subject: partial\r\n\r\nx\r\n.\r\n").await;
    c.expect("250 2.0.0 queued as").await;
    let got = r.wait_delivered(1).await;
    assert_eq!(got[0].envelope.rcpt_to, vec!["ok@example.org"]);
    r.wait_for("message in failed/", |relay| {
        relay
            .spool
            .list()
            .expect("list")
            .iter()
            .any(|e| e.state == EntryState::Failed)
    })
    .await;
    let entry = &r.relay.spool.list().expect("list")[0];
    let state = entry.delivery.as_ref().expect("state");
    assert!(
        state
            .fail_reason
            .as_deref()
            .unwrap_or("")
            .contains("550 5.1.10")
    );
}

#[tokio::test]
async fn transient_failures_are_retried_until_delivered() {
    let r = start_delivering(FAST, SimConfig::default()).await;
    r.sim.control().script_smtp_fault(
        smtp_oauth_relay::sim::SmtpStage::DataEnd,
        smtp_oauth_relay::sim::SmtpFault::Reply451,
        2,
    );
    let mut c = r.relay.connect().await;
    c.begin_message("app@legacy.test", &["b@example.org"]).await;
    c.send(b"Subject: retry\r\n\r\nx\r\n.\r\n").await;
    c.expect("250 2.0.0 queued as").await;
    r.wait_delivered(1).await;
    r.wait_for("empty spool", |relay| {
        relay.spool.list().expect("list").is_empty()
    })
    .await;
}

#[tokio::test]
async fn send_as_denied_holds_then_queue_retry_resumes_after_the_fix() {
    let toml = "[queue]\nretry_min = \"200ms\"\nretry_max = \"30s\"\n[upstream]\nrewrite_from = \"never\"\nrate = \"1000/s\"\n";
    let r = start_delivering(toml, SimConfig::default()).await;
    let mut c = r.relay.connect().await;
    c.begin_message("app@legacy.test", &["b@example.org"]).await;
    c.send(b"From: billing@contoso.example\r\nSubject: invoice\r\n\r\nx\r\n.\r\n")
        .await;
    c.expect("250 2.0.0 queued as").await;
    let (cause, reply) = r.wait_held().await;
    assert_eq!(cause, HoldCause::SendAsDenied);
    assert!(reply.contains("550 5.7.60"), "{reply}");
    // queue list tells the operator what Exchange said and what to do.
    let listing = common::queue_command(r.relay.spool_dir(), &QueueCommand::List)
        .await
        .expect("list");
    assert!(listing.starts_with("DELIVERY HELD since"), "{listing}");
    assert!(listing.contains("Add-RecipientPermission"), "{listing}");
    // Fix it in "Exchange", then ask for a retry: delivered long before the 30 s probe.
    r.sim
        .control()
        .set_send_as(MAILBOX, vec!["billing@contoso.example".into()]);
    common::queue_command(r.relay.spool_dir(), &QueueCommand::Retry(None))
        .await
        .expect("retry");
    let got = r.wait_delivered(1).await;
    assert!(got[0].text().contains("From: billing@contoso.example"));
    r.wait_for("empty spool", |relay| {
        relay.spool.list().expect("list").is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_foreign_from_is_rewritten_by_default_and_delivered() {
    let r = start_delivering(FAST, SimConfig::default()).await;
    let mut c = r.relay.connect().await;
    c.begin_message("app@legacy.test", &["b@example.org"]).await;
    c.send(b"From: \"Billing\" <billing@legacy.test>\r\nSubject: s\r\n\r\nx\r\n.\r\n")
        .await;
    c.expect("250 2.0.0 queued as").await;
    let got = r.wait_delivered(1).await;
    let text = got[0].text();
    assert!(
        text.contains(&format!("From: \"Billing\" <{MAILBOX}>\r\n")),
        "{text}"
    );
    assert!(
        text.contains("Reply-To: \"Billing\" <billing@legacy.test>\r\n"),
        "{text}"
    );
}

#[tokio::test]
async fn throttling_and_dropped_connections_are_retried_without_loss() {
    use smtp_oauth_relay::sim::{SmtpFault, SmtpStage};
    let r = start_delivering(FAST, SimConfig::default()).await;
    let control = r.sim.control();
    control.script_smtp_fault(
        SmtpStage::DataEnd,
        SmtpFault::Reply {
            code: 432,
            text: "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded".into(),
        },
        1,
    );
    control.script_smtp_fault(SmtpStage::Mail, SmtpFault::Reply421, 1);
    control.script_smtp_fault(SmtpStage::DataBody, SmtpFault::Drop, 1);
    let mut c = r.relay.connect().await;
    c.begin_message("app@legacy.test", &["b@example.org"]).await;
    for i in 0..4 {
        if i > 0 {
            c.cmd_expect("MAIL FROM:<app@legacy.test>", "250").await;
            c.cmd_expect("RCPT TO:<b@example.org>", "250").await;
            c.cmd_expect("DATA", "354").await;
        }
        c.send(format!("Subject: m{i}\r\n\r\nx\r\n.\r\n").as_bytes())
            .await;
        c.expect("250 2.0.0 queued as").await;
    }
    let got = r.wait_delivered(4).await;
    let mut subjects: Vec<String> = got
        .iter()
        .map(|m| {
            m.text()
                .lines()
                .find(|l| l.starts_with("Subject: "))
                .unwrap_or("")
                .to_string()
        })
        .collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), 4, "every message delivered: {subjects:?}");
    r.wait_for("empty spool", |relay| {
        relay.spool.list().expect("list").is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_failed_message_sends_one_delivery_status_report_to_queue_notify() {
    // One upstream session at a time, so the sentinel below goes out after anything queued
    // before it.
    let toml = "[queue]\nretry_min = \"200ms\"\nretry_max = \"1s\"\nnotify = \"postmaster@contoso.example\"\n[upstream]\nrate = \"1000/s\"\nconnections = 1\n";
    let r = start_delivering(toml, SimConfig::default()).await;
    r.sim.control().script_smtp_fault(
        smtp_oauth_relay::sim::SmtpStage::Rcpt,
        smtp_oauth_relay::sim::SmtpFault::Reply {
            code: 550,
            text:
                "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
                    .into(),
        },
        1,
    );
    let mut c = r.relay.connect().await;
    c.begin_message("app@legacy.test", &["gone@example.org"])
        .await;
    c.send(b"Subject: Invoice 42\r\n\r\nx\r\n.\r\n").await;
    let id = common::queued_id(&c.expect("250 2.0.0 queued as").await);
    // The failed message itself never reaches Exchange; the report does.
    let got = r.wait_delivered(1).await;
    let report = got[0].text();
    assert_eq!(got[0].envelope.rcpt_to, vec!["postmaster@contoso.example"]);
    assert!(
        report.contains("Subject: Undelivered mail: Invoice 42"),
        "{report}"
    );
    assert!(report.contains("report-type=delivery-status"), "{report}");
    assert!(
        report.contains("Final-Recipient: rfc822; gone@example.org"),
        "{report}"
    );
    assert!(report.contains("Status: 5.1.10"), "{report}");
    assert!(report.contains(&id), "{report}");
    r.wait_for("only the failed message remains", |relay| {
        let list = relay.spool.list().expect("list");
        list.len() == 1 && list[0].state == EntryState::Failed
    })
    .await;
    // A second report would have been queued with the first one: a message sent now is
    // delivered after it.
    r.send("sentinel").await;
    let got = r.wait_delivered(2).await;
    let reports = got
        .iter()
        .filter(|m| m.envelope.rcpt_to == vec!["postmaster@contoso.example"])
        .count();
    assert_eq!(reports, 1, "exactly one report");
    assert_eq!(got.len(), 2, "the report and the sentinel");
}
