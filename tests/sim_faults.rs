//! Scripted SMTP faults over real sockets: 421 at every step, 451, 430, drops before/after the final dot,
//! stall, idle timeout.

mod common;

use std::time::Duration;

use common::fixtures::{data_block, sim_message};
use common::sim::{TestSim, start, token};
use common::smtp::{Client, Reply};
use smtp_oauth_relay::sim::{DEFAULT_MAILBOX, SmtpFault, SmtpStage};

const MBX: &str = DEFAULT_MAILBOX;

/// Drives a fresh session to `stage` and returns the client plus the reply to that step (None: closed silently).
async fn reach(sim: &TestSim, tok: &str, stage: SmtpStage) -> (Client, Option<Reply>) {
    let (mut c, banner) = Client::connect_sim(sim).await;
    if stage == SmtpStage::Greeting {
        return (c, Some(banner));
    }
    if stage == SmtpStage::Ehlo {
        let r = c.try_cmd("EHLO client.example").await;
        return (c, r);
    }
    c.cmd("EHLO client.example").await.assert(250, "");
    if stage == SmtpStage::StartTls {
        let r = c.try_cmd("STARTTLS").await;
        return (c, r);
    }
    let mut c = c.starttls(sim.ca_file(), "smtp.office365.com").await;
    c.cmd("EHLO client.example").await.assert(250, "");
    if stage == SmtpStage::Auth {
        let r = c
            .try_cmd(&format!("AUTH XOAUTH2 {}", common::sim::xoauth2(MBX, tok)))
            .await;
        return (c, r);
    }
    c.auth_inline(MBX, tok).await.assert(235, "2.7.0");
    for (st, line) in [
        (SmtpStage::Rset, "RSET"),
        (SmtpStage::Mail, "MAIL FROM:<relay@contoso.example>"),
        (SmtpStage::Rcpt, "RCPT TO:<a@example.org>"),
        (SmtpStage::Data, "DATA"),
    ] {
        let r = c.try_cmd(line).await;
        if st == stage {
            return (c, r);
        }
    }
    // DataBody / DataEnd: send the body.
    c.send(&data_block(sim_message(MBX, "fault"))).await;
    let r = c.read_reply().await;
    (c, r)
}

#[tokio::test]
async fn reply_421_at_every_step_then_close() {
    let sim = start().await;
    let tok = token(&sim).await;
    for stage in [
        SmtpStage::Greeting,
        SmtpStage::Ehlo,
        SmtpStage::StartTls,
        SmtpStage::Auth,
        SmtpStage::Rset,
        SmtpStage::Mail,
        SmtpStage::Rcpt,
        SmtpStage::Data,
        SmtpStage::DataEnd,
    ] {
        sim.control()
            .script_smtp_fault(stage, SmtpFault::Reply421, 1);
        let (mut c, r) = reach(&sim, &tok, stage).await;
        assert_eq!(sim.control().smtp_faults_fired(stage), 1, "{stage:?}");
        let r = r.unwrap_or_else(|| panic!("no reply at {stage:?}"));
        r.assert(421, "4.3.2");
        assert_eq!(
            r.lines[0], "4.3.2 Service not available, closing transmission channel",
            "{stage:?}"
        );
        c.expect_closed().await;
    }
    assert!(sim.messages().expect("list").is_empty());
}

#[tokio::test]
async fn reply_421_at_quit() {
    let sim = start().await;
    let tok = token(&sim).await;
    let mut c = Client::authenticated(&sim, MBX, &tok).await;
    sim.control()
        .script_smtp_fault(SmtpStage::Quit, SmtpFault::Reply421, 1);
    c.cmd("QUIT").await.assert(421, "4.3.2");
    c.expect_closed().await;
    assert_eq!(sim.control().smtp_faults_fired(SmtpStage::Quit), 1);
}

#[tokio::test]
async fn transient_replies_keep_the_session() {
    let sim = start().await;
    let tok = token(&sim).await;
    let mut c = Client::authenticated(&sim, MBX, &tok).await;

    sim.control()
        .script_smtp_fault(SmtpStage::Mail, SmtpFault::Reply451, 1);
    let r = c.cmd(&format!("MAIL FROM:<{MBX}>")).await;
    r.assert(451, "4.7.0");
    assert!(
        r.lines[0].starts_with(
            "4.7.0 Temporary server error. Please try again later. PRX4 [SY5P282CA0097"
        )
    );

    sim.control()
        .script_smtp_fault(SmtpStage::DataEnd, SmtpFault::Reply451, 1);
    c.send_message(MBX, &["a@example.org"], &sim_message(MBX, "x"))
        .await
        .assert(451, "4.7.0");

    sim.control()
        .script_smtp_fault(SmtpStage::DataEnd, SmtpFault::Reply430, 1);
    let r = c
        .send_message(MBX, &["a@example.org"], &sim_message(MBX, "x"))
        .await;
    r.assert(430, "4.2.0");
    assert!(r.lines[0].starts_with("4.2.0 STOREDRV; mailbox logon failure;"));

    sim.control().script_smtp_fault(
        SmtpStage::Rcpt,
        SmtpFault::Reply {
            code: 451,
            text: "4.7.500 Server busy. Please try again later from [127.0.0.1]. (S77719)".into(),
        },
        1,
    );
    c.cmd(&format!("MAIL FROM:<{MBX}>"))
        .await
        .assert(250, "2.1.0");
    c.cmd("RCPT TO:<a@example.org>")
        .await
        .assert(451, "4.7.500");
    c.cmd("RSET").await.assert(250, "2.0.0");

    // Each scripted reply came from its fault, and none is left over.
    assert_eq!(sim.control().smtp_faults_fired(SmtpStage::Mail), 1);
    assert_eq!(sim.control().smtp_faults_fired(SmtpStage::DataEnd), 2);
    assert_eq!(sim.control().smtp_faults_fired(SmtpStage::Rcpt), 1);
    assert_eq!(sim.control().smtp_faults_pending(), 0);
    // Nothing was accepted; the session still delivers afterwards.
    assert!(sim.messages().expect("list").is_empty());
    c.send_message(MBX, &["a@example.org"], &sim_message(MBX, "x"))
        .await
        .assert(250, "2.0.0");
    assert_eq!(sim.messages().expect("list").len(), 1);
}

#[tokio::test]
async fn drop_before_the_final_dot() {
    let sim = start().await;
    let tok = token(&sim).await;
    sim.control()
        .script_smtp_fault(SmtpStage::DataBody, SmtpFault::Drop, 1);
    let (mut c, r) = reach(&sim, &tok, SmtpStage::DataBody).await;
    assert!(r.is_none(), "no reply expected, got {r:?}");
    c.expect_closed().await;
    assert_eq!(sim.control().smtp_faults_fired(SmtpStage::DataBody), 1);
    assert!(sim.messages().expect("list").is_empty());
}

#[tokio::test]
async fn drop_after_the_final_dot_with_and_without_keeping() {
    let sim = start().await;
    let tok = token(&sim).await;
    sim.control()
        .script_smtp_fault(SmtpStage::DataEnd, SmtpFault::Drop, 1);
    let (_c, r) = reach(&sim, &tok, SmtpStage::DataEnd).await;
    assert!(r.is_none(), "no reply expected, got {r:?}");
    assert_eq!(sim.control().smtp_faults_fired(SmtpStage::DataEnd), 1);
    assert!(sim.messages().expect("list").is_empty());

    // The lost-reply case: Exchange kept the message but the 250 never arrived.
    sim.control()
        .script_smtp_fault(SmtpStage::DataEnd, SmtpFault::DropAfterAccept, 1);
    let (_c, r) = reach(&sim, &tok, SmtpStage::DataEnd).await;
    assert!(r.is_none(), "no reply expected, got {r:?}");
    assert_eq!(sim.control().smtp_faults_fired(SmtpStage::DataEnd), 2);
    assert_eq!(sim.messages().expect("list").len(), 1);
}

#[tokio::test]
async fn stall_then_close() {
    let sim = start().await;
    let tok = token(&sim).await;
    sim.control().set_stall_duration(Duration::from_millis(200));
    sim.control()
        .script_smtp_fault(SmtpStage::DataEnd, SmtpFault::Stall, 1);
    let (_c, r) = reach(&sim, &tok, SmtpStage::DataEnd).await;
    assert!(r.is_none(), "a stall answers nothing, got {r:?}");
    assert_eq!(sim.control().smtp_faults_fired(SmtpStage::DataEnd), 1);
    assert!(sim.messages().expect("list").is_empty());

    sim.control()
        .script_smtp_fault(SmtpStage::Greeting, SmtpFault::Stall, 1);
    let tcp = tokio::net::TcpStream::connect(sim.smtp_addr())
        .await
        .expect("connect");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(
        common::sim::STEP,
        tokio::io::AsyncReadExt::read(&mut { tcp }, &mut buf),
    )
    .await
    .expect("closed in time")
    .unwrap_or(0);
    assert_eq!(n, 0, "no banner during a stall");
    assert_eq!(sim.control().smtp_faults_fired(SmtpStage::Greeting), 1);
}

#[tokio::test]
async fn idle_timeout_closes_with_451() {
    let sim = start().await;
    sim.control().set_idle_timeout(Duration::from_millis(200));
    let (mut c, banner) = Client::connect_sim(&sim).await;
    assert_eq!(banner.code, 220);
    let r = c.read_reply().await.expect("timeout reply");
    r.assert(451, "4.7.0");
    assert!(r.lines[0].starts_with("4.7.0 Timeout waiting for client input"));
    c.expect_closed().await;
}
