//! Operator commands (`smtp-oauth-relay queue ...`), safe while the daemon runs.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::{DeliveryState, EntryState, QueueEntry, Spool, SpoolError};

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

/// Touched by every command that changes what is deliverable (`hold`, `release`, `delete`,
/// `retry`) so that a running daemon re-reads the spool (the deliverer watches it).
pub const WAKEUP_FILE: &str = "wakeup";
/// Written by the deliverer: the mailbox's state, shown above the `queue list` table.
pub const STATUS_FILE: &str = "mailbox.json";

/// Run one operator command against the spool at `spool_dir`, printing to `out`.
///
/// `list` prints `queue is empty` for an empty spool; otherwise a header line and one
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
pub fn run_queue_command(
    spool_dir: &Path,
    cmd: &QueueCommand,
    out: &mut dyn Write,
) -> Result<(), SpoolError> {
    let spool = Spool::open_for_admin(spool_dir)?;
    let w = |r: std::io::Result<()>| {
        r.map_err(|e| SpoolError::Io {
            op: "write output",
            path: "-".into(),
            source: e,
        })
    };
    match cmd {
        QueueCommand::List => {
            let entries = spool.list()?;
            let now = SystemTime::now();
            w(write_mailbox_status(spool_dir, out))?;
            w(write_list(&entries, now, out))?;
        }
        QueueCommand::Retry(target) => {
            let ids: Vec<String> = match target {
                Some(id) => vec![id.to_ascii_uppercase()],
                None => spool
                    .list()?
                    .into_iter()
                    .filter(|e| e.state != EntryState::Failed)
                    .map(|e| e.id)
                    .collect(),
            };
            for id in &ids {
                let was = retry_one(&spool, id)?;
                w(writeln!(out, "retry {id} (was {was})"))?;
            }
            if ids.is_empty() {
                w(writeln!(out, "nothing to retry"))?;
            }
        }
        QueueCommand::Show(id) => {
            let m = spool.show(id)?;
            w(write_show(&m, SystemTime::now(), out))?;
        }
        QueueCommand::Hold(id) => {
            let was = spool.move_to(id, EntryState::Held)?;
            let id = id.to_ascii_uppercase();
            w(if was == EntryState::Held {
                writeln!(out, "{id} is already held")
            } else {
                writeln!(out, "held {id} (was {was})")
            })?;
        }
        QueueCommand::Release(id) => {
            let was = spool.move_to(id, EntryState::Queued)?;
            let id = id.to_ascii_uppercase();
            w(if was == EntryState::Queued {
                writeln!(out, "{id} is already queued")
            } else {
                writeln!(out, "released {id} (was {was})")
            })?;
        }
        QueueCommand::Delete(id) => {
            spool.delete(id)?;
            w(writeln!(out, "deleted {}", id.to_ascii_uppercase()))?;
        }
    }
    if cmd.changes_deliverable() {
        wake_daemon(spool_dir)?;
    }
    w(out.flush())
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

/// Puts a message back in `queue/`, due now, with its failed recipients pending again. A state
/// file this relay cannot use (unreadable, or from a newer relay) is the operator's to reset:
/// it goes to `corrupt/` and the message is sent as new.
fn retry_one(spool: &Spool, id: &str) -> Result<EntryState, SpoolError> {
    use super::RecipientStatus;
    let state = match spool.read_state(id) {
        Err(SpoolError::BadState { .. }) => {
            spool.reset_state(id)?;
            None
        }
        other => other?,
    };
    // The state first: once the file is back in queue/, the deliverer may pick it up.
    if let Some(mut state) = state {
        state.next_attempt = None;
        state.hold_reason = None;
        state.fail_reason = None;
        for r in &mut state.recipients {
            if r.status == RecipientStatus::Failed {
                r.status = RecipientStatus::Pending;
            }
        }
        spool.write_state(id, &state)?;
    }
    spool.move_to(id, EntryState::Queued)
}

/// Tells a running deliverer that the spool changed: the one notification path of every
/// operator command (the deliverer notices within a second and re-reads `queue/`).
fn wake_daemon(spool_dir: &Path) -> Result<(), SpoolError> {
    let path = spool_dir.join(WAKEUP_FILE);
    // The content changes the modification time even on filesystems with coarse timestamps.
    let stamp = format!("{:?}\n", SystemTime::now());
    std::fs::write(&path, stamp).map_err(|e| SpoolError::io("write", &path, e))
}

/// `delivery held since ...: cause` with the reply and the fix, when the deliverer says so.
fn write_mailbox_status(spool_dir: &Path, out: &mut dyn Write) -> std::io::Result<()> {
    let Ok(text) = std::fs::read_to_string(spool_dir.join(STATUS_FILE)) else {
        return Ok(());
    };
    let Ok(status) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(());
    };
    if status["state"] == "held" {
        let field = |k: &str| status[k].as_str().unwrap_or("").to_string();
        writeln!(
            out,
            "DELIVERY HELD since {}: {}",
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
fn quoted(s: &str) -> String {
    format!("\"{}\"", s.escape_debug())
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
            quoted(&duplicate_summary(dup))
        ));
    }
    s
}

/// `first dot 2025-11-29T18:34:00Z, 1 attempt, after it: ...[, upstream id ...]`.
fn duplicate_summary(d: &super::PossibleDuplicate) -> String {
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
fn state_problem_summary(p: &super::StateProblem) -> String {
    match p {
        super::StateProblem::Unreadable(_) => {
            format!("{p}; the deliverer moves it to corrupt/ and sends the message as new")
        }
        super::StateProblem::NewerVersion(_) => {
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
    writeln!(out, "ID\tAGE\tFROM\tRECIPIENTS\tSIZE\tSTATE\tDELIVERY")?;
    for e in entries {
        writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}",
            e.id,
            age_of(e.received_at, now),
            cell(sender(&e.mail_from)),
            cell(&recipients_summary(&e.recipients)),
            e.size,
            e.state,
            match (&e.delivery, &e.state_problem) {
                (_, Some(p)) => format!("state-problem={}", quoted(&state_problem_summary(p))),
                (Some(d), None) => delivery_summary(d),
                (None, None) => String::new(),
            }
        )?;
    }
    Ok(())
}

fn write_show(
    m: &super::ShownMessage,
    now: SystemTime,
    out: &mut dyn Write,
) -> std::io::Result<()> {
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
        writeln!(out, "delivery-state: {}", quoted(&state_problem_summary(p)))?;
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
                    quoted(&duplicate_summary(dup))
                )?;
            }
            for r in &d.recipients {
                let status = match r.status {
                    super::RecipientStatus::Pending => "pending",
                    super::RecipientStatus::Delivered => "delivered",
                    super::RecipientStatus::Failed => "failed",
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
