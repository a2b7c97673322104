//! What admins read in a transcript (issue 11, item 14): the banner and the EHLO/HELO replies
//! name the configured host and greet the client by its address, in plain words.

mod common;

use common::start_relay;

#[tokio::test]
async fn banner_and_ehlo_use_the_hostname_and_a_plain_greeting() {
    let relay = start_relay("[smtp]\nhostname = \"relay.example\"\n").await;
    let mut c = relay.connect().await;
    assert_eq!(
        c.reply().await,
        "220 relay.example ESMTP smtp-oauth-relay ready\r\n"
    );
    let ehlo = c.cmd("EHLO client.test").await;
    let first = ehlo.lines().next().unwrap_or_default();
    assert_eq!(first, "250-relay.example Hello [127.0.0.1]", "{ehlo:?}");
    assert!(!ehlo.to_ascii_lowercase().contains("had me"), "{ehlo:?}");
    let last = ehlo.lines().last().unwrap_or_default();
    assert!(last.starts_with("250 "), "{ehlo:?}");
    assert!(ehlo.lines().skip(1).all(|l| l.starts_with("250")));
    c.cmd_expect("HELO client.test", "250 relay.example Hello [127.0.0.1]")
        .await;
    c.cmd_expect("QUIT", "221").await;
}
