//! Message fidelity under `upstream.rewrite_from` (issue 11, item 11): what ERP systems,
//! scanners and cron send reaches Exchange with every byte the relay does not have to change
//! exactly as sent. Each message goes client → relay → simulator, and the delivered bytes are
//! compared in full (after the relay's own `Received:` field).

mod common;

use common::delivery::{DeliveringRelay, MAILBOX, after_relay_received, start_delivering};
use smtp_oauth_relay::sim::SimConfig;

const FAST: &str =
    "[queue]\nretry_min = \"200ms\"\nretry_max = \"1s\"\n[upstream]\nrate = \"1000/s\"\n";

/// The fields after From in every test message: Date and Message-ID are present, so the relay
/// adds nothing but its Received field.
const REST: &[u8] = b"To: b@example.org\r\nSubject: Rechnung 42\r\nDate: Sun, 29 Nov 2026 18:31:42 +0100\r\nMessage-ID: <42@erp.contoso.com>\r\n\r\nSee attachment.\r\n";

fn message(head: &[u8]) -> Vec<u8> {
    [head, REST].concat()
}

/// Sends `sent` and returns what the simulator received, after the relay's Received field.
async fn delivered(r: &DeliveringRelay, sent: &[u8]) -> Vec<u8> {
    r.submit("<app@legacy.test>", &["b@example.org"], sent)
        .await;
    let got = r.wait_delivered(1).await;
    after_relay_received(&got[0].data).to_vec()
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).escape_debug().to_string()
}

async fn assert_delivered_as(sent: &[u8], expected: &[u8]) {
    let r = start_delivering(FAST, SimConfig::default()).await;
    let got = delivered(&r, sent).await;
    assert!(
        got == expected,
        "delivered bytes differ\n got: {}\nwant: {}",
        show(&got),
        show(expected)
    );
}

#[tokio::test]
async fn an_iso_8859_1_display_name_keeps_its_bytes_in_from_and_reply_to() {
    let sent = message(b"From: M\xfcller GmbH <erp@contoso.com>\r\n");
    let expected = message(
        &[
            b"From: M\xfcller GmbH <",
            MAILBOX.as_bytes(),
            b">\r\nReply-To: M\xfcller GmbH <erp@contoso.com>\r\n",
        ]
        .concat(),
    );
    assert_delivered_as(&sent, &expected).await;
}

#[tokio::test]
async fn a_windows_1252_display_name_keeps_its_bytes() {
    // 0x96 is an en dash only in Windows-1252 (a C1 control in ISO-8859-1).
    let name: &[u8] = b"\"Scanner \x96 2. OG\"";
    let sent = message(&[b"From: ", name, b" <scan@contoso.com>\r\n"].concat());
    let expected = message(
        &[
            b"From: ",
            name,
            format!(" <{MAILBOX}>\r\nReply-To: ").as_bytes(),
            name,
            b" <scan@contoso.com>\r\n",
        ]
        .concat(),
    );
    assert_delivered_as(&sent, &expected).await;
}

#[tokio::test]
async fn an_rfc_2047_display_name_is_not_decoded() {
    let sent = message(b"From: =?ISO-8859-1?Q?M=FCller_GmbH?= <erp@contoso.com>\r\n");
    let expected = message(
        format!(
            "From: =?ISO-8859-1?Q?M=FCller_GmbH?= <{MAILBOX}>\r\nReply-To: =?ISO-8859-1?Q?M=FCller_GmbH?= <erp@contoso.com>\r\n"
        )
        .as_bytes(),
    );
    assert_delivered_as(&sent, &expected).await;
}

#[tokio::test]
async fn cron_mail_keeps_its_name_and_gets_no_unqualified_reply_to() {
    // What cron writes for every job: an address without a domain and the name as a comment.
    let sent = message(b"From: root (Cron Daemon)\r\n");
    let expected = message(format!("From: Cron Daemon <{MAILBOX}>\r\n").as_bytes());
    assert_delivered_as(&sent, &expected).await;
    // cronie's form: the name quoted, the address bracketed, still no domain.
    let sent = message(b"From: \"(Cron Daemon)\" <root>\r\n");
    let expected = message(format!("From: \"(Cron Daemon)\" <{MAILBOX}>\r\n").as_bytes());
    assert_delivered_as(&sent, &expected).await;
}

#[tokio::test]
async fn only_qualified_mailboxes_of_a_list_go_to_reply_to() {
    let sent = message(b"From: Buchhaltung <ap@contoso.com>, root\r\n");
    let expected = message(
        format!("From: Buchhaltung <{MAILBOX}>\r\nReply-To: Buchhaltung <ap@contoso.com>\r\n")
            .as_bytes(),
    );
    assert_delivered_as(&sent, &expected).await;
}

#[tokio::test]
async fn a_group_from_moves_to_reply_to_as_sent() {
    let sent = message(b"From: Accounts: erp@contoso.com, ap@contoso.com;\r\n");
    let expected = message(
        format!("From: <{MAILBOX}>\r\nReply-To: Accounts: erp@contoso.com, ap@contoso.com;\r\n")
            .as_bytes(),
    );
    assert_delivered_as(&sent, &expected).await;
}

#[tokio::test]
async fn an_existing_reply_to_is_left_as_sent() {
    let sent =
        message(b"From: M\xfcller <erp@contoso.com>\r\nReply-To: B\xfcro <ap@contoso.com>\r\n");
    let expected = message(
        &[
            b"From: M\xfcller <",
            MAILBOX.as_bytes(),
            b">\r\nReply-To: B\xfcro <ap@contoso.com>\r\n",
        ]
        .concat(),
    );
    assert_delivered_as(&sent, &expected).await;
}

#[tokio::test]
async fn a_missing_from_is_added_below_the_trace_block() {
    // Mail relayed by a device's own MTA arrives with its trace fields on top.
    let trace: &[u8] = b"Received: from mfp.local (mfp.local [10.0.0.7])\r\n\tby gw.local; Sun, 29 Nov 2026 18:31:40 +0100\r\nReturn-Path: <scan@contoso.com>\r\n";
    let sent = [trace, REST].concat();
    let expected = [trace, format!("From: <{MAILBOX}>\r\n").as_bytes(), REST].concat();
    assert_delivered_as(&sent, &expected).await;
}

#[tokio::test]
async fn added_date_and_message_id_go_below_the_trace_block() {
    let r = start_delivering(FAST, SimConfig::default()).await;
    let trace: &[u8] =
        b"Received: from mfp.local ([10.0.0.7])\r\n\tby gw.local; Sun, 29 Nov 2026 18:31:40 +0100\r\n";
    let rest = format!("From: {MAILBOX}\r\nSubject: Scan\r\n\r\nscan\r\n");
    let sent = [trace, rest.as_bytes()].concat();
    let id = r
        .submit("<app@legacy.test>", &["b@example.org"], &sent)
        .await;
    let got = r.wait_delivered(1).await;
    let got = after_relay_received(&got[0].data);
    assert!(got.starts_with(trace), "{}", show(got));
    let added = &got[trace.len()..];
    assert!(added.starts_with(b"Date: "), "{}", show(got));
    let after_date = &added[added.windows(2).position(|w| w == b"\r\n").expect("CRLF") + 2..];
    let message_id = format!("Message-ID: <{id}@");
    assert!(
        after_date.starts_with(message_id.as_bytes()),
        "{}",
        show(got)
    );
    assert!(after_date.ends_with(rest.as_bytes()), "{}", show(got));
    let after_id = &after_date[after_date
        .windows(2)
        .position(|w| w == b"\r\n")
        .expect("CRLF")
        + 2..];
    assert_eq!(after_id, rest.as_bytes(), "{}", show(got));
}
