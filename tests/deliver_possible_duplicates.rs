//! At-least-once, said out loud: when an attempt sent the whole message (final dot included) and
//! got no 250 back (the connection dropped, or a 4xx), the retry may give the recipients a
//! second copy. The relay logs it as a possible duplicate (time of the final dot, what came
//! after it, the upstream id if any), keeps it in the delivery state, shows it in `queue show`
//! and `queue list`, and counts it in `relay_possible_duplicates_total`. A 4xx before the dot
//! (at RCPT) sent nothing and is not one.

mod common;

use std::path::Path;
use std::time::SystemTime;

use common::delivery::{DeliveringRelay, start_delivering};
use smtp_oauth_relay::metrics::Gauges;
use smtp_oauth_relay::queue_command::QueueCommand;
use smtp_oauth_relay::sim::{SimConfig, SmtpFault, SmtpStage};
use smtp_oauth_relay::spool::DeliveryState;

/// Retries far away: each retry here is the operator's `queue retry`, so the state between the
/// two attempts can be read without racing the deliverer.
const SLOW_RETRY: &str =
    "[queue]\nretry_min = \"1h\"\nretry_max = \"2h\"\n[upstream]\nrate = \"1000/s\"\n";

async fn queue(dir: &Path, cmd: QueueCommand) -> String {
    common::queue_command(dir, &cmd)
        .await
        .expect("queue command")
}

fn duplicates_counted(r: &DeliveringRelay) -> u64 {
    let text = r.metrics.render(&Gauges::default());
    text.lines()
        .find_map(|l| l.strip_prefix("relay_possible_duplicates_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no relay_possible_duplicates_total in\n{text}"))
}

/// Waits (bounded) until the first attempt on `id` is recorded, and returns that state.
async fn after_first_attempt(r: &DeliveringRelay, id: &str) -> DeliveryState {
    r.wait_for(
        "the first attempt to be recorded",
        |relay| matches!(relay.spool.read_state(id), Ok(Some(st)) if st.attempts >= 1),
    )
    .await;
    r.relay
        .spool
        .read_state(id)
        .expect("state")
        .expect("recorded")
}

#[tokio::test]
async fn a_connection_dropped_after_the_final_dot_is_a_possible_duplicate() {
    let logs = common::logs::capture();
    let r = start_delivering(SLOW_RETRY, SimConfig::default()).await;
    // Exchange keeps the message, then the connection drops before its 250 arrives.
    r.sim
        .control()
        .script_smtp_fault(SmtpStage::DataEnd, SmtpFault::DropAfterAccept, 1);
    let before = SystemTime::now();
    let id = r.send("dropped after the dot").await;
    let state = after_first_attempt(&r, &id).await;
    let dup = state
        .possible_duplicate
        .clone()
        .unwrap_or_else(|| panic!("state does not say possible duplicate: {state:?}"));
    assert_eq!(dup.attempts, 1, "{dup:?}");
    assert!(
        dup.first_dot_at >= before && dup.first_dot_at <= SystemTime::now(),
        "{dup:?}"
    );
    // What the TLS layer said about the vanished connection.
    assert!(dup.after_dot.starts_with("DataEnd: "), "{dup:?}");
    assert_eq!(dup.upstream_id, None, "a dropped connection names no id");
    assert_eq!(duplicates_counted(&r), 1);
    let warned = logs.lines_with(&[&id, "possible duplicate"]);
    assert_eq!(warned.len(), 1, "{}", logs.text());
    assert!(warned[0].contains("first_dot_at="), "{}", warned[0]);
    assert!(warned[0].contains("upstream_id=unknown"), "{}", warned[0]);

    let dir = r.relay.spool_dir().to_path_buf();
    let show = queue(&dir, QueueCommand::Show(id.clone())).await;
    assert!(
        show.lines()
            .any(|l| l.starts_with("possible-duplicate: \"final dot sent ")),
        "{show}"
    );
    let list = queue(&dir, QueueCommand::List).await;
    assert!(
        list.lines()
            .any(|l| l.starts_with(&id) && l.contains("possible-duplicate=")),
        "{list}"
    );

    // The retry delivers: the mailbox now really has it twice, and the log says so.
    queue(&dir, QueueCommand::Retry(Some(id.clone()))).await;
    let got = r.wait_delivered(2).await;
    assert_eq!(got.len(), 2);
    assert!(
        got.iter()
            .all(|m| m.text().contains("dropped after the dot"))
    );
    r.wait_for("the message to leave the spool", |relay| {
        relay.spool.state_of(&id).is_err()
    })
    .await;
    // The line is written once `complete` has returned, a moment after the file is gone.
    common::logs::wait_line(&[&id, "delivered; possible duplicate"]).await;
    let delivered = logs.lines_with(&[&id, "delivered; possible duplicate"]);
    assert_eq!(delivered.len(), 1, "{}", logs.text());
    assert_eq!(
        duplicates_counted(&r),
        1,
        "the successful retry is not another one"
    );
}

#[tokio::test]
async fn a_4xx_after_the_final_dot_is_a_possible_duplicate() {
    let logs = common::logs::capture();
    let r = start_delivering(SLOW_RETRY, SimConfig::default()).await;
    r.sim
        .control()
        .script_smtp_fault(SmtpStage::DataEnd, SmtpFault::Reply451, 1);
    let id = r.send("451 after the dot").await;
    let state = after_first_attempt(&r, &id).await;
    let dup = state.possible_duplicate.expect("possible duplicate");
    assert!(dup.after_dot.starts_with("451 4.7.0"), "{dup:?}");
    assert_eq!(duplicates_counted(&r), 1);
    assert_eq!(logs.lines_with(&[&id, "possible duplicate"]).len(), 1);
}

#[tokio::test]
async fn a_4xx_before_the_final_dot_is_not_a_possible_duplicate() {
    let logs = common::logs::capture();
    let r = start_delivering(SLOW_RETRY, SimConfig::default()).await;
    r.sim
        .control()
        .script_smtp_fault(SmtpStage::Rcpt, SmtpFault::Reply451, 1);
    let id = r.send("451 at RCPT").await;
    let state = after_first_attempt(&r, &id).await;
    assert!(
        state.last_reply.as_ref().and_then(|r| r.code) == Some(451),
        "{state:?}"
    );
    assert_eq!(state.possible_duplicate, None, "{state:?}");
    assert_eq!(duplicates_counted(&r), 0);
    let dir = r.relay.spool_dir().to_path_buf();
    assert!(
        !queue(&dir, QueueCommand::Show(id.clone()))
            .await
            .contains("possible-duplicate")
    );

    queue(&dir, QueueCommand::Retry(Some(id.clone()))).await;
    let got = r.wait_delivered(1).await;
    assert_eq!(got.len(), 1);
    r.wait_for("the message to leave the spool", |relay| {
        relay.spool.state_of(&id).is_err()
    })
    .await;
    assert_eq!(duplicates_counted(&r), 0);
    assert!(
        logs.lines_with(&[&id, "possible duplicate"]).is_empty(),
        "{}",
        logs.text()
    );
}
