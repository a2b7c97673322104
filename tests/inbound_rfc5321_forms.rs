//! RFC 5321 forms that old devices send (issue 11, item 13):
//! - `RCPT TO:<Postmaster>` without a domain (§4.5.1: must be accepted, case-insensitive) is
//!   delivered to `postmaster@` the domain of `upstream.from` (default `upstream.mail_account`),
//!   the domain Exchange takes mail for; with neither set, `postmaster@smtp.hostname`;
//! - `MAIL FROM:addr` and `RCPT TO:addr` without angle brackets are accepted, as Postfix does by
//!   default (`strict_rfc821_envelopes = no`).

mod common;

use common::start_relay;

async fn recipients_for(toml: &str, rcpt_lines: &[&str]) -> Vec<String> {
    let relay = start_relay(toml).await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("EHLO device.test", "250").await;
    c.cmd_expect("MAIL FROM:<scanner@legacy.test>", "250 2.1.0")
        .await;
    for line in rcpt_lines {
        c.cmd_expect(line, "250 2.1.5").await;
    }
    c.cmd_expect("DATA", "354").await;
    c.send(b"Subject: to the postmaster\r\n\r\nhello\r\n.\r\n")
        .await;
    c.expect("250 2.0.0 queued as").await;
    let entries = relay.spool.list().expect("list");
    assert_eq!(entries.len(), 1);
    entries[0].recipients.clone()
}

#[tokio::test]
async fn rcpt_to_postmaster_without_a_domain_is_accepted() {
    let mailbox = "[upstream]\nmail_account = \"relay@contoso.example\"\n";
    for line in [
        "RCPT TO:<Postmaster>",
        "RCPT TO:<postmaster>",
        "RCPT TO:<POSTMASTER>",
        "RCPT TO: <PostMaster>",
        "RCPT TO:Postmaster",
        "RCPT TO:<Postmaster> NOTIFY=NEVER",
    ] {
        assert_eq!(
            recipients_for(mailbox, &[line]).await,
            vec!["postmaster@contoso.example".to_string()],
            "{line}"
        );
    }
    // upstream.from names the domain the relay sends as.
    let from = "[upstream]\nmail_account = \"relay@contoso.example\"\nfrom = \"noreply@billing.example\"\n";
    assert_eq!(
        recipients_for(from, &["RCPT TO:<Postmaster>"]).await,
        vec!["postmaster@billing.example".to_string()]
    );
    // Spool only (no upstream yet): the relay's own host name.
    let bare = "[smtp]\nhostname = \"relay.example\"\n";
    assert_eq!(
        recipients_for(
            bare,
            &["RCPT TO:<postmaster>", "RCPT TO:<postmaster@other.example>"]
        )
        .await,
        vec![
            "postmaster@relay.example".to_string(),
            "postmaster@other.example".to_string()
        ]
    );
}

#[tokio::test]
async fn the_null_path_and_other_local_names_are_still_refused() {
    let relay = start_relay("").await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("EHLO device.test", "250").await;
    c.cmd_expect("MAIL FROM:<scanner@legacy.test>", "250").await;
    c.cmd_expect("RCPT TO:<>", "501 5.1.3").await;
    c.cmd_expect("RCPT TO:<root>", "501").await;
    c.cmd_expect("RCPT TO:<postmasters>", "501").await;
    c.cmd_expect("RCPT TO:", "501").await;
}

#[tokio::test]
async fn paths_without_angle_brackets_are_accepted() {
    let relay = start_relay("").await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("HELO printer", "250").await;
    c.cmd_expect("MAIL FROM:scanner@legacy.test SIZE=100", "250 2.1.0")
        .await;
    c.cmd_expect("RCPT TO:b@example.org", "250 2.1.5").await;
    c.cmd_expect("RCPT TO: c@example.org", "250 2.1.5").await;
    c.cmd_expect("DATA", "354").await;
    c.send(b"Subject: old device\r\n\r\nscan\r\n.\r\n").await;
    c.expect("250 2.0.0 queued as").await;
    // A declared SIZE is still read in the bare form.
    c.cmd_expect("MAIL from:a@legacy.test SIZE=999999999999", "552 5.3.4")
        .await;
    c.cmd_expect("MAIL FROM:", "501").await;
    let entries = relay.spool.list().expect("list");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].mail_from, "scanner@legacy.test");
    assert_eq!(
        entries[0].recipients,
        vec!["b@example.org".to_string(), "c@example.org".to_string()]
    );
}
