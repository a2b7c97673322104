//! SMTPUTF8 and 8BITMIME towards the upstream (issue 11, item 12): mail that needs an extension
//! the upstream server does not offer is failed by the relay before MAIL FROM, with the code
//! RFC 6531 / RFC 6152 name and a notice; a server that offers both gets 8-bit and UTF-8 mail
//! declared and byte for byte unchanged. The simulator stands in for a server without them.

mod common;

use common::delivery::{DeliveringRelay, MAILBOX, after_relay_received, start_delivering};
use smtp_oauth_relay::sim::SimConfig;
use smtp_oauth_relay::spool::EntryState;

const NOTIFY: &str = "postmaster@contoso.example";

fn settings() -> String {
    format!(
        "[queue]\nretry_min = \"200ms\"\nretry_max = \"1s\"\nnotify = \"{NOTIFY}\"\n[upstream]\nrate = \"1000/s\"\n"
    )
}

/// A relay whose upstream offers 8BITMIME and SMTPUTF8 as given.
async fn relay(eight_bit_mime: bool, smtputf8: bool) -> DeliveringRelay {
    let r = start_delivering(&settings(), SimConfig::default()).await;
    r.sim.control().set_extensions(eight_bit_mime, smtputf8);
    r
}

/// Waits for the failure notice (the only message Exchange gets) and the failed message; returns
/// the notice's text and the message's recorded failure reason.
async fn failed_with_notice(r: &DeliveringRelay, id: &str) -> (String, String) {
    let got = r.wait_delivered(1).await;
    assert_eq!(got.len(), 1, "only the notice reaches the upstream");
    assert_eq!(got[0].envelope.rcpt_to, vec![NOTIFY]);
    r.wait_for("the message in failed/", |relay| {
        relay.spool.state_of(id).ok() == Some(EntryState::Failed)
    })
    .await;
    let state = r
        .relay
        .spool
        .read_state(id)
        .expect("state")
        .expect("state recorded");
    (got[0].text(), state.fail_reason.unwrap_or_default())
}

#[tokio::test]
async fn a_utf8_recipient_to_a_server_without_smtputf8_fails_here_with_5_6_7() {
    let r = relay(true, false).await;
    let id = r
        .submit(
            "<app@legacy.test> SMTPUTF8",
            &["jürgen@bücher.example"],
            format!("From: {MAILBOX}\r\nSubject: Lieferschein\r\n\r\nx\r\n").as_bytes(),
        )
        .await;
    let (notice, reason) = failed_with_notice(&r, &id).await;
    assert!(reason.contains("553 5.6.7 "), "{reason}");
    assert!(reason.contains("SMTPUTF8"), "{reason}");
    assert!(notice.contains("Status: 5.6.7"), "{notice}");
    // The upstream never saw the message: one attempt, decided locally.
    let state = r.relay.spool.read_state(&id).expect("state").expect("some");
    assert_eq!(state.attempts, 1);
}

#[tokio::test]
async fn utf8_header_fields_to_a_server_without_smtputf8_fail_here_with_5_6_9() {
    let r = relay(true, false).await;
    let id = r
        .submit(
            "<app@legacy.test> SMTPUTF8",
            &["b@example.org"],
            format!("From: {MAILBOX}\r\nSubject: Grüße aus Köln\r\n\r\nx\r\n").as_bytes(),
        )
        .await;
    let (notice, reason) = failed_with_notice(&r, &id).await;
    assert!(reason.contains("554 5.6.9 "), "{reason}");
    assert!(notice.contains("Status: 5.6.9"), "{notice}");
}

#[tokio::test]
async fn an_8bit_body_to_a_server_without_8bitmime_fails_here_with_5_6_3() {
    let r = relay(false, true).await;
    let mut sent = format!("From: {MAILBOX}\r\nSubject: Rechnung\r\n\r\n").into_bytes();
    sent.extend_from_slice(b"Betrag: 42 \x80, Stra\xdfe\r\n");
    let id = r
        .submit("<app@legacy.test> BODY=8BITMIME", &["b@example.org"], &sent)
        .await;
    let (notice, reason) = failed_with_notice(&r, &id).await;
    assert!(reason.contains("554 5.6.3 "), "{reason}");
    assert!(reason.contains("8BITMIME"), "{reason}");
    assert!(notice.contains("Status: 5.6.3"), "{notice}");
}

#[tokio::test]
async fn a_server_offering_both_gets_8bit_and_utf8_mail_declared_and_unchanged() {
    let r = relay(true, true).await;
    let international = format!(
        "From: {MAILBOX}\r\nTo: jürgen@bücher.example\r\nSubject: Grüße\r\nDate: Sun, 29 Nov 2026 18:31:42 +0100\r\nMessage-ID: <1@erp.contoso.com>\r\n\r\nGrüße, Jürgen\r\n"
    );
    r.submit(
        "<app@legacy.test> SMTPUTF8 BODY=8BITMIME",
        &["jürgen@bücher.example"],
        international.as_bytes(),
    )
    .await;
    let got = r.wait_delivered(1).await;
    assert_eq!(after_relay_received(&got[0].data), international.as_bytes());
    assert_eq!(got[0].envelope.rcpt_to, vec!["jürgen@bücher.example"]);
    let params: Vec<&str> = got[0].envelope.mail_params.split_whitespace().collect();
    assert!(params.contains(&"BODY=8BITMIME"), "{params:?}");
    assert!(params.contains(&"SMTPUTF8"), "{params:?}");

    // A legacy device sends ISO-8859-1 text without declaring BODY=8BITMIME: the relay declares it.
    let mut legacy = format!(
        "From: {MAILBOX}\r\nSubject: Scan\r\nDate: Sun, 29 Nov 2026 18:31:42 +0100\r\nMessage-ID: <2@mfp.contoso.com>\r\n\r\n"
    )
    .into_bytes();
    legacy.extend_from_slice(b"Gr\xfc\xdfe\r\n");
    r.submit("<mfp@legacy.test>", &["b@example.org"], &legacy)
        .await;
    let got = r.wait_delivered(2).await;
    assert_eq!(after_relay_received(&got[1].data), &legacy[..]);
    let params: Vec<&str> = got[1].envelope.mail_params.split_whitespace().collect();
    assert!(params.contains(&"BODY=8BITMIME"), "{params:?}");
    assert!(!params.contains(&"SMTPUTF8"), "{params:?}");
}

#[tokio::test]
async fn the_simulator_can_be_told_not_to_offer_8bitmime_and_smtputf8() {
    let r = start_delivering(&settings(), SimConfig::default()).await;
    let ehlo = || async {
        let mut c = common::Client::connect(r.sim.smtp_addr()).await;
        c.expect("220 ").await;
        c.cmd_expect("EHLO client.test", "250").await
    };
    let both = ehlo().await;
    assert!(
        both.contains("8BITMIME") && both.contains("SMTPUTF8"),
        "{both}"
    );
    r.sim.control().set_extensions(false, false);
    let neither = ehlo().await;
    assert!(
        !neither.contains("8BITMIME") && !neither.contains("SMTPUTF8"),
        "{neither}"
    );
    assert!(neither.contains("STARTTLS"), "{neither}");
}
