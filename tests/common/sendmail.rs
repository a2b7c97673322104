//! `smtp-oauth-relay sendmail` as cron, PHP and the system tools run it: the subcommand or a
//! link named `sendmail`, a message on stdin, optionally as another user; plus the relay.toml
//! with a `[sendmail]` section and bounded waits on the simulator's mailbox.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::process::{bin, command, output_bounded, relay_toml, with_upstream};
use super::sim_process::SimProc;

/// The `[sendmail]` section the tests use: `root` is an alias, other bare names get example.com.
pub const SENDMAIL_SECTION: &str = "[sendmail]\ndefault_domain = \"example.com\"\n\
     aliases = { root = \"admin@example.com\", ops = [\"ops1@example.com\", \"ops2@example.com\"] }\n";

/// What one sendmail run did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Feeds `input` to `cmd` on stdin (from a thread: a large message must not deadlock with a
/// full stdout pipe) and returns its output (bounded: 60 s).
pub fn with_stdin(mut cmd: Command, input: &[u8]) -> Run {
    let input = input.to_vec();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("stdin");
    std::fs::write(&path, &input).expect("write stdin file");
    cmd.stdin(std::fs::File::open(&path).expect("open stdin file"));
    output_bounded(cmd, Duration::from_secs(60)).into()
}

/// `smtp-oauth-relay --config CONFIG sendmail ARGS < input`.
pub fn sendmail(config: &Path, args: &[&str], input: &[u8]) -> Run {
    let mut cmd = command(&["--config", &config.display().to_string(), "sendmail"]);
    cmd.args(args);
    with_stdin(cmd, input)
}

/// A link named `name` (`sendmail`, `mailq`, `newaliases`) to the binary in `dir`.
pub fn link(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    if !path.exists() {
        std::os::unix::fs::symlink(bin(), &path).expect("symlink to the binary");
    }
    path
}

/// The binary run through `link` with `RELAY_CONFIG=config`, as `uid`/`gid` when given.
pub fn as_link(link: &Path, config: &Path, args: &[&str], uid: Option<(u32, u32)>) -> Command {
    let mut cmd = Command::new(link);
    super::process::scrub_env(&mut cmd);
    cmd.args(args).env("RELAY_CONFIG", config);
    if let Some((uid, gid)) = uid {
        // std drops the supplementary groups too (setgroups before setuid).
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// A relay config on `port` with its spool, `[sendmail]` and, when given, the simulator.
pub fn config(port: u16, spool: &Path, sim: Option<&SimProc>, sendmail: &str) -> String {
    let upstream = sim
        .map(|s| with_upstream(&s.fragment, "rate = \"1000/s\"\nconnections = 3"))
        .unwrap_or_default();
    relay_toml(
        port,
        spool,
        "",
        "min_free_space = 1\nretry_min = \"1s\"\nretry_max = \"2s\"",
        &format!("{upstream}\n{sendmail}\n[log]\nlevel = \"info\"\n"),
    )
}

/// A delivered message: the simulator's envelope and the bytes.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub rcpt_to: Vec<String>,
    /// The mailbox that signed in (XOAUTH2 user) to deliver it.
    pub auth_user: String,
    pub text: String,
}

/// Every message in the simulator's mailbox.
pub fn delivered(sim: &SimProc) -> Vec<Delivered> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(&sim.mailbox) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json")
            && let (Ok(json), Ok(eml)) = (
                std::fs::read_to_string(&p),
                std::fs::read(p.with_extension("eml")),
            )
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&json)
        {
            let rcpt_to = v["rcpt_to"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            out.push(Delivered {
                rcpt_to,
                auth_user: v["auth_user"].as_str().unwrap_or_default().to_string(),
                text: String::from_utf8_lossy(&eml).into_owned(),
            });
        }
    }
    out
}

/// Waits (bounded: 60 s) for the delivered message whose text contains `marker`.
pub fn wait_delivered(sim: &SimProc, marker: &str) -> Delivered {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(d) = delivered(sim).into_iter().find(|d| d.text.contains(marker)) {
            return d;
        }
        if Instant::now() > deadline {
            panic!(
                "no message with {marker:?} reached the simulator; simulator log:\n{}",
                sim.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `.drop` files in a drop directory.
pub fn drop_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "drop"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `sendmail -bs` run as a child: SMTP on its stdin/stdout, one command and one reply at a time.
pub struct BsSession {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl BsSession {
    /// `smtp-oauth-relay --config CONFIG sendmail -bs`, its greeting read.
    pub fn start(config: &Path) -> BsSession {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = command(&["--config", &config.display().to_string(), "sendmail", "-bs"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sendmail -bs");
        let stdin = child.stdin.take();
        let lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut s = BsSession {
            child,
            stdin,
            lines,
        };
        s.reply("220 ");
        s
    }

    /// One reply (multi-line included, bounded), which must start with `want`.
    pub fn reply(&mut self, want: &str) -> String {
        let mut all = String::new();
        for _ in 0..50 {
            let line = self.lines.next().expect("a reply line").expect("read");
            all.push_str(&line);
            all.push('\n');
            if line.as_bytes().get(3) == Some(&b' ') {
                break;
            }
        }
        assert!(all.starts_with(want), "expected {want}: {all}");
        all
    }

    /// Sends `line` + CRLF.
    pub fn say(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(line.as_bytes()).expect("write");
        stdin.write_all(b"\r\n").expect("write");
        stdin.flush().expect("flush");
    }

    /// `line`, then its reply, which must start with `want`.
    pub fn command(&mut self, line: &str, want: &str) -> String {
        self.say(line);
        self.reply(want)
    }

    /// QUIT, then the exit code (bounded: 10 s).
    pub fn quit(mut self) -> Option<i32> {
        self.command("QUIT", "221");
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        panic!("sendmail -bs did not exit after QUIT");
    }
}
