//! Disk full, for real: the spool lives on a small tmpfs mounted for the test.
//! (a) Below `queue.min_free_space` the relay refuses `MAIL FROM` with `452 4.3.1`.
//! (b) With the guard set to 1 byte, messages are sent until the filesystem is full: the one that
//!     does not fit gets `452 4.3.1` (or `451 4.3.0`) at the end of data, never 250, and leaves
//!     nothing behind; once an operator deletes messages (`queue delete`), mail is accepted again.
//!
//! Mounting needs root (CI runs as root): without it the test fails and says why.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixtures::{assert_stored_equals, dot_stuff, files_in, queued_path, read_stored};
use common::process::{Extra, Relay, run_cli};
use common::smtp::Reply;
use common::smtp::blocking::Client;

/// A tmpfs mounted on a temporary directory; unmounted on drop, also when the test fails.
struct Tmpfs {
    mount_point: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "this test mounts a tmpfs and must run as root (CI does); euid is {euid}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let mount_point = dir.path().to_path_buf();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&mount_point)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount: {e}"));
        assert!(
            out.status.success(),
            "mount -t tmpfs -o size={size} failed (root and mount permission needed): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            mount_point,
            _dir: dir,
        }
    }

    fn path(&self) -> &Path {
        &self.mount_point
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.mount_point)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a process we could not reap?): detach it so the tempdir can go.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mount_point)
                .status();
        }
    }
}

fn message(n: usize, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: app@legacy.local\r\nTo: user@example.org\r\nSubject: fill {n}\r\n\
         Message-ID: <fill-{n}@legacy.local>\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n\r\n"
    )
    .into_bytes();
    let mut i = 0;
    while m.len() < size {
        m.extend_from_slice(
            format!("message {n} line {i:06} 0123456789abcdefghijklmnopqrstuvwxyz\r\n").as_bytes(),
        );
        i += 1;
    }
    m
}

/// MAIL, RCPT, DATA and the message, step by step: which step refused, and the reply.
fn send_steps(c: &mut Client, msg: &[u8]) -> (&'static str, Reply) {
    let r = c.command("MAIL FROM:<app@legacy.local>").expect("MAIL");
    if r.code != 250 {
        return ("MAIL", r);
    }
    let r = c.command("RCPT TO:<user@example.org>").expect("RCPT");
    if r.code != 250 {
        return ("RCPT", r);
    }
    let r = c.command("DATA").expect("DATA");
    if r.code != 354 {
        return ("DATA", r);
    }
    let mut data = dot_stuff(msg);
    data.extend_from_slice(b".\r\n");
    c.send_raw(&data).expect("send message");
    ("end of data", c.read_reply().expect("reply to end of data"))
}

fn assert_no_partial_files(spool: &Path) {
    let tmp = files_in(spool, "tmp");
    assert!(tmp.is_empty(), "partial files left in tmp/: {tmp:?}");
    for name in files_in(spool, "queue") {
        read_stored(&spool.join("queue").join(&name))
            .unwrap_or_else(|e| panic!("partial or damaged message in queue/: {e}"));
    }
}

#[test]
fn free_space_guard_refuses_mail_from_with_452() {
    let work = tempfile::tempdir().expect("tempdir");
    let fs = Tmpfs::mount("2m");
    let spool = fs.path().join("spool");
    // Default min_free_space: twice max_message_size (70 MiB) > 2 MiB.
    let relay = Relay::start(work.path(), &spool, &Extra::default());
    let mut c = Client::connect(relay.addr()).expect("connect");
    let r = c.command("MAIL FROM:<app@legacy.local>").expect("MAIL");
    assert_eq!(r.code, 452, "{r:?}");
    assert!(r.text().starts_with("452 4.3.1"), "{r:?}");
    // The session goes on; nothing was written.
    let r = c.command("NOOP").expect("NOOP");
    assert_eq!(r.code, 250, "{r:?}");
    c.quit();
    assert!(files_in(&spool, "queue").is_empty());
    assert!(files_in(&spool, "tmp").is_empty());
    assert!(
        relay.log_text().contains("refusing mail"),
        "the refusal is logged:\n{}",
        relay.log_text()
    );
    drop(relay);
}

#[test]
fn enospc_mid_message_gives_452_or_451_and_service_resumes_when_space_returns() {
    let work = tempfile::tempdir().expect("tempdir");
    let fs = Tmpfs::mount("1m");
    let spool = fs.path().join("spool");
    let extra = Extra {
        smtp: "max_message_size = \"10MiB\"\n".into(),
        queue: "min_free_space = 1\n".into(),
    };
    let relay = Relay::start(work.path(), &spool, &extra);
    let mut c = Client::connect(relay.addr()).expect("connect");

    let size = 300 * 1024;
    let mut accepted: Vec<(String, Vec<u8>)> = Vec::new();
    let mut refusal = None;
    for n in 0..10 {
        let msg = message(n, size);
        let (step, reply) = send_steps(&mut c, &msg);
        match reply.queued_id() {
            Some(id) => accepted.push((id, msg)),
            None => {
                refusal = Some((n, step, reply));
                break;
            }
        }
    }
    let (n, step, reply) = refusal.unwrap_or_else(|| {
        panic!(
            "10 messages of 300 KiB were all accepted on a 1 MiB tmpfs:\n{}",
            relay.log_text()
        )
    });
    assert!(!accepted.is_empty(), "not even one message fitted on 1 MiB");
    assert_eq!(
        step, "end of data",
        "message {n} was refused at {step}, not when the disk filled: {reply:?}"
    );
    let text = reply.text();
    assert!(
        text.starts_with("452 4.3.1") || text.starts_with("451 4.3.0"),
        "message {n}: expected 452 4.3.1 or 451 4.3.0, got {text}"
    );
    eprintln!(
        "{} messages of 300 KiB fitted; message {n} got {text:?} at the end of data",
        accepted.len()
    );
    // Nothing partial: tmp/ is clean, queue/ holds exactly the accepted messages, intact.
    assert_no_partial_files(&spool);
    let mut queued = files_in(&spool, "queue");
    queued.sort();
    let mut expected: Vec<String> = accepted.iter().map(|(id, _)| format!("{id}.msg")).collect();
    expected.sort();
    assert_eq!(
        queued, expected,
        "queue/ holds exactly the acknowledged messages"
    );
    for (id, msg) in &accepted {
        let stored = read_stored(&queued_path(&spool, id)).unwrap_or_else(|e| panic!("{e}"));
        assert_stored_equals(&stored.body, id, msg);
    }
    // The session survives the refusal.
    let r = c.command("NOOP").expect("NOOP");
    assert_eq!(r.code, 250, "{r:?}");
    c.quit();

    // The operator makes room; mail flows again.
    for (id, _) in accepted.iter().take(2) {
        let out = run_cli(&relay.config, &["queue", "delete", id], &[]);
        assert!(
            out.status.success(),
            "queue delete {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut c = Client::connect(relay.addr()).expect("reconnect");
    let msg = message(100, size);
    let (step, reply) = send_steps(&mut c, &msg);
    let id = reply
        .queued_id()
        .unwrap_or_else(|| panic!("after freeing space, {step} got {reply:?}"));
    c.quit();
    let stored = read_stored(&queued_path(&spool, &id)).unwrap_or_else(|e| panic!("{e}"));
    assert_stored_equals(&stored.body, &id, &msg);
    assert_no_partial_files(&spool);
    drop(relay);
}
