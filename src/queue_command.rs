//! `smtp-oauth-relay queue ...`: the operator commands, run against the [`Store`] while the
//! daemon may be running, and how they print. The store announces every change to the running
//! deliverer (see [`Store::events`]).

use std::io::Write;
use std::time::{Duration, SystemTime};

use crate::store::{
    DeliveryState, EntryState, OpenError, QueueEntry, RecipientStatus, ShownMessage, StateProblem,
    Store, StoreError,
};

/// A `queue` subcommand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueCommand {
    List,
    Show(String),
    Hold(String),
    Release(String),
    Delete(String),
    /// Deliver now: one message (queued, held or failed), or with `None` every queued and
    /// held message. Failed recipients of a failed message are tried again.
    Retry(Option<String>),
}

/// Why an operator command did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum QueueCommandError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

/// Runs one operator command against `store`, printing to `out`.
///
/// `list` prints `queue is empty` for an empty queue; otherwise a header line and one
/// tab-separated line per message, oldest first:
///
/// ```text
/// ID<TAB>AGE<TAB>FROM<TAB>RECIPIENTS<TAB>SIZE<TAB>STATE<TAB>DELIVERY
/// 01JDQ6Z8X1V3K5M7N9P0R2S4T6  5m  app@example.com  a@x,b@x,c@x,+2  1234  queued  attempts=2 next=2025-11-29T18:40:00Z last="451 4.7.500 Server busy"
/// ```
/// The sender is `<>` for the null sender; recipients beyond three are counted as `+N`; the
/// delivery column is empty until a delivery was attempted. A message whose state file cannot
/// be used is listed with `state-problem="..."` there (what the deliverer does about it), and
/// one that may already have reached its recipients with `possible-duplicate=...`.
pub async fn run(
    store: &dyn Store,
    cmd: &QueueCommand,
    out: &mut dyn Write,
) -> Result<(), QueueCommandError> {
    match cmd {
        QueueCommand::List => {
            let entries = store.list().await?;
            let now = SystemTime::now();
            for (mailbox, status) in store.statuses().await {
                write_mailbox_status(&mailbox, &status, out)?;
            }
            write_list(&entries, now, out)?;
        }
        QueueCommand::Retry(target) => {
            let ids: Vec<String> = match target {
                Some(id) => vec![id.to_ascii_uppercase()],
                None => store
                    .list()
                    .await?
                    .into_iter()
                    .filter(|e| e.state != EntryState::Failed)
                    .map(|e| e.id)
                    .collect(),
            };
            for id in &ids {
                let was = store.retry(id).await?;
                writeln!(out, "retry {id} (was {was})")?;
            }
            if ids.is_empty() {
                writeln!(out, "nothing to retry")?;
            }
        }
        QueueCommand::Show(id) => {
            let m = store.show(id).await?;
            write_show(&m, SystemTime::now(), out)?;
        }
        QueueCommand::Hold(id) => {
            let was = store.hold(id).await?;
            let id = id.to_ascii_uppercase();
            if was == EntryState::Held {
                writeln!(out, "{id} is already held")?;
            } else {
                writeln!(out, "held {id} (was {was})")?;
            }
        }
        QueueCommand::Release(id) => {
            let was = store.release(id).await?;
            let id = id.to_ascii_uppercase();
            if was == EntryState::Queued {
                writeln!(out, "{id} is already queued")?;
            } else {
                writeln!(out, "released {id} (was {was})")?;
            }
        }
        QueueCommand::Delete(id) => {
            store.delete(id).await?;
            writeln!(out, "deleted {}", id.to_ascii_uppercase())?;
        }
    }
    Ok(out.flush()?)
}

impl QueueCommand {
    /// Whether the command may change what the deliverer should send: the one condition for
    /// waking a running daemon.
    pub fn changes_deliverable(&self) -> bool {
        match self {
            QueueCommand::List | QueueCommand::Show(_) => false,
            QueueCommand::Hold(_)
            | QueueCommand::Release(_)
            | QueueCommand::Delete(_)
            | QueueCommand::Retry(_) => true,
        }
    }
}

/// `DELIVERY HELD since ...: cause` with the reply and the fix, when the deliverer says so.
fn write_mailbox_status(
    mailbox: &str,
    status: &serde_json::Value,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    if status["state"] == "held" {
        let field = |k: &str| status[k].as_str().unwrap_or("").to_string();
        writeln!(
            out,
            "DELIVERY HELD since {} for {mailbox}: {}",
            field("since"),
            field("reason")
        )?;
        writeln!(out, "  upstream said: {}", field("reply"))?;
        writeln!(out, "  fix: {}", field("fix"))?;
        writeln!(out)?;
    }
    Ok(())
}

/// Humanised age: `42s`, `5m`, `3h`, `2d` (truncated; a future time shows `0s`).
pub fn format_age(age: Duration) -> String {
    let s = age.as_secs();
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m", s / 60)
    } else if s < 86_400 {
        format!("{}h", s / 3600)
    } else {
        format!("{}d", s / 86_400)
    }
}

fn age_of(t: SystemTime, now: SystemTime) -> String {
    format_age(now.duration_since(t).unwrap_or_default())
}

fn sender(s: &str) -> &str {
    if s.is_empty() { "<>" } else { s }
}

fn recipients_summary(r: &[String]) -> String {
    if r.len() <= 3 {
        r.join(",")
    } else {
        format!("{},+{}", r[..3].join(","), r.len() - 3)
    }
}

/// Quote a reply for one line: `"..."` with control characters and quotes escaped.
fn quoted(s: impl std::fmt::Display) -> String {
    format!("\"{}\"", s.to_string().escape_debug())
}

fn delivery_summary(d: &DeliveryState) -> String {
    let mut s = format!("attempts={}", d.attempts);
    if let Some(t) = d.next_attempt {
        s.push_str(&format!(" next={}", humantime::format_rfc3339_seconds(t)));
    }
    if let Some(r) = &d.last_reply {
        s.push_str(&format!(" last={}", quoted(r)));
    }
    if let Some(r) = &d.hold_reason {
        s.push_str(&format!(" hold={}", quoted(r)));
    }
    if let Some(r) = &d.fail_reason {
        s.push_str(&format!(" fail={}", quoted(r)));
    }
    if let Some(dup) = &d.possible_duplicate {
        s.push_str(&format!(
            " possible-duplicate={}",
            quoted(duplicate_summary(dup))
        ));
    }
    s
}

/// `first dot 2025-11-29T18:34:00Z, 1 attempt, after it: ...[, upstream id ...]`.
fn duplicate_summary(d: &crate::store::PossibleDuplicate) -> String {
    let mut s = format!(
        "final dot sent {}, {} attempt{} without a 250, then: {}",
        humantime::format_rfc3339_seconds(d.first_dot_at),
        d.attempts,
        if d.attempts == 1 { "" } else { "s" },
        d.after_dot
    );
    if let Some(id) = &d.upstream_id {
        s.push_str(&format!(", upstream id {id}"));
    }
    s
}

/// What the deliverer does with a message whose state file cannot be used.
fn state_problem_summary(p: &StateProblem) -> String {
    match p {
        StateProblem::Unreadable(_) => {
            format!("{p}; the deliverer moves it to corrupt/ and sends the message as new")
        }
        StateProblem::NewerVersion(_) => {
            format!("{p}; the deliverer holds it: upgrade the relay, or `queue retry ID` resets it")
        }
    }
}

/// Remove characters that would break a tab-separated line.
fn cell(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn write_list(entries: &[QueueEntry], now: SystemTime, out: &mut dyn Write) -> std::io::Result<()> {
    if entries.is_empty() {
        return writeln!(out, "queue is empty");
    }
    writeln!(
        out,
        "ID\tAGE\tFROM\tRECIPIENTS\tSIZE\tSTATE\tROUTE\tDELIVERY"
    )?;
    for e in entries {
        writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            e.id,
            age_of(e.received_at, now),
            cell(sender(&e.mail_from)),
            cell(&recipients_summary(&e.recipients)),
            e.size,
            e.state,
            e.route,
            match (&e.delivery, &e.state_problem) {
                (_, Some(p)) => format!("state-problem={}", quoted(state_problem_summary(p))),
                (Some(d), None) => delivery_summary(d),
                (None, None) => String::new(),
            }
        )?;
    }
    Ok(())
}

fn write_show(m: &ShownMessage, now: SystemTime, out: &mut dyn Write) -> std::io::Result<()> {
    let e = &m.entry;
    let env = &m.envelope;
    writeln!(out, "id: {}", e.id)?;
    writeln!(out, "state: {}", e.state)?;
    writeln!(
        out,
        "received-at: {} ({} ago)",
        humantime::format_rfc3339_seconds(env.received_at),
        age_of(env.received_at, now)
    )?;
    writeln!(out, "route: {}", env.route)?;
    writeln!(out, "client: {}", env.client)?;
    writeln!(out, "helo: {}", env.helo)?;
    if let Some(u) = &env.auth_user {
        writeln!(out, "auth-user: {u}")?;
    }
    writeln!(out, "mail-from: <{}>", env.mail_from)?;
    writeln!(out, "body: {}", env.mail_params.body)?;
    writeln!(
        out,
        "smtputf8: {}",
        if env.mail_params.smtputf8 {
            "yes"
        } else {
            "no"
        }
    )?;
    if let Some(v) = &env.mail_params.envid {
        writeln!(out, "envid: {v}")?;
    }
    if let Some(v) = &env.mail_params.ret {
        writeln!(out, "ret: {v}")?;
    }
    for r in &env.recipients {
        let mut line = format!("rcpt-to: <{}>", r.address);
        if let Some(n) = &r.notify {
            line.push_str(&format!(" NOTIFY={n}"));
        }
        if let Some(o) = &r.orcpt {
            line.push_str(&format!(" ORCPT={o}"));
        }
        writeln!(out, "{line}")?;
    }
    writeln!(out, "size: {}", e.size)?;
    if let Some(p) = &e.state_problem {
        writeln!(out, "delivery-state: {}", quoted(state_problem_summary(p)))?;
    }
    match &e.delivery {
        None if e.state_problem.is_some() => {}
        None => writeln!(out, "delivery: never attempted")?,
        Some(d) => {
            writeln!(out, "attempts: {}", d.attempts)?;
            if let Some(t) = d.next_attempt {
                writeln!(
                    out,
                    "next-attempt: {}",
                    humantime::format_rfc3339_seconds(t)
                )?;
            }
            if let Some(r) = &d.last_reply {
                writeln!(out, "last-reply: {}", quoted(r))?;
            }
            if let Some(r) = &d.hold_reason {
                writeln!(out, "hold-reason: {}", quoted(r))?;
            }
            if let Some(r) = &d.fail_reason {
                writeln!(out, "fail-reason: {}", quoted(r))?;
            }
            if let Some(dup) = &d.possible_duplicate {
                writeln!(
                    out,
                    "possible-duplicate: {}",
                    quoted(duplicate_summary(dup))
                )?;
            }
            for r in &d.recipients {
                let status = match r.status {
                    RecipientStatus::Pending => "pending",
                    RecipientStatus::Delivered => "delivered",
                    RecipientStatus::Failed => "failed",
                };
                match &r.reply {
                    Some(reply) => {
                        writeln!(out, "recipient: <{}> {status} {}", r.address, quoted(reply))?
                    }
                    None => writeln!(out, "recipient: <{}> {status}", r.address)?,
                }
            }
        }
    }
    writeln!(out)?;
    out.write_all(&m.headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(format_age(Duration::from_secs(0)), "0s");
        assert_eq!(format_age(Duration::from_secs(42)), "42s");
        assert_eq!(format_age(Duration::from_secs(5 * 60 + 59)), "5m");
        assert_eq!(format_age(Duration::from_secs(3 * 3600 + 1)), "3h");
        assert_eq!(format_age(Duration::from_secs(2 * 86_400 + 7)), "2d");
    }

    #[test]
    fn recipients() {
        let r = |n: usize| (0..n).map(|i| format!("r{i}@x")).collect::<Vec<_>>();
        assert_eq!(recipients_summary(&r(1)), "r0@x");
        assert_eq!(recipients_summary(&r(3)), "r0@x,r1@x,r2@x");
        assert_eq!(recipients_summary(&r(5)), "r0@x,r1@x,r2@x,+2");
        assert_eq!(sender(""), "<>");
        assert_eq!(quoted("451 \"busy\"\r\n"), "\"451 \\\"busy\\\"\\r\\n\"");
    }
}
