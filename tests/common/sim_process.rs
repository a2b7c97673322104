//! The standalone simulator (`smtp-oauth-relay simulate`) as its own process, so that it
//! survives the relay being killed: its relay.toml fragment, its mailbox, its log.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::process::command;

pub struct SimProc {
    child: Option<Child>,
    /// `[upstream]` and `[oauth]` sections pointing at the simulator.
    pub fragment: String,
    pub mailbox: PathBuf,
    /// The Graph root (`upstream.graph_url` for `transport = "graph"`).
    pub graph_url: String,
    pub log: PathBuf,
}

impl SimProc {
    /// `simulate` with `extra_smtp` lines added to its `[smtp]` section (the fault campaign
    /// raises the rate limits so that figures are about faults, not throttling).
    pub fn start(work: &Path, extra_smtp: &str) -> SimProc {
        Self::start_toml(work, extra_smtp, "")
    }

    /// As [`start`](Self::start), with the top-level TOML in `extra_file` (e.g. `[[clients]]`).
    pub fn start_with(work: &Path, extra_smtp: &str, extra_file: &Path) -> SimProc {
        let extra = fs::read_to_string(extra_file).expect("read extra sim config");
        Self::start_toml(work, extra_smtp, &extra)
    }

    fn start_toml(work: &Path, extra_smtp: &str, extra: &str) -> SimProc {
        let state = work.join("simulator");
        let config = work.join("sim.toml");
        fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\n{extra}\n[smtp]\n{extra_smtp}\n",
                state.display()
            ),
        )
        .expect("write sim.toml");
        let log = work.join("simulator.log");
        let mut child = command(&["simulate", "--config", &config.display().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log).expect("sim log"))
            .spawn()
            .expect("spawn simulate");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut fragment = String::new();
            let mut mailbox = String::new();
            let mut graph = String::new();
            let mut inside = false;
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if let Some(m) = line.strip_prefix("Mailbox directory:") {
                    mailbox = m.trim().to_string();
                }
                if let Some(g) = line.strip_prefix("Graph sendMail root:") {
                    graph = g.split_whitespace().next().unwrap_or_default().to_string();
                }
                if line.starts_with("# --- relay.toml fragment") {
                    inside = true;
                    continue;
                }
                if line.starts_with("# --- end") {
                    let _ = tx.send((fragment.clone(), mailbox.clone(), graph.clone()));
                    break;
                }
                if inside {
                    fragment.push_str(&line);
                    fragment.push('\n');
                }
            }
            // Keep draining so the simulator never blocks on a full pipe.
            for _ in lines {}
        });
        let (fragment, mailbox, graph_url) = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "simulator did not print its config: {}",
                    fs::read_to_string(&log).unwrap_or_default()
                )
            });
        SimProc {
            child: Some(child),
            fragment,
            mailbox: PathBuf::from(mailbox),
            graph_url,
            log,
        }
    }

    /// Every delivered message (`*.eml`), exact bytes.
    pub fn messages(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        if let Ok(rd) = fs::read_dir(&self.mailbox) {
            for e in rd.flatten() {
                let p = e.path();
                // The .json beside it is written last: only complete messages count.
                if p.extension().is_some_and(|x| x == "eml")
                    && p.with_extension("json").exists()
                    && let Ok(b) = fs::read(&p)
                {
                    out.push(b);
                }
            }
        }
        out
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for SimProc {
    fn drop(&mut self) {
        self.stop();
    }
}
