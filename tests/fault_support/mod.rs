//! Shared helpers for the fault campaign (`tests/fault_*.rs`): the standalone simulator as its
//! own process (so it survives the relay being killed), the relay binary started with an
//! arbitrary config and environment (failpoints), the SMTP client that records how far each
//! message got, and the memory figures of a process (`/proc/<pid>/status`).
//!
//! Every wait is bounded; nothing asserts on timing.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_smtp-oauth-relay")
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// A command with `RELAY_*` overrides removed and core dumps off (failpoints `abort()`).
pub fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str()
            && (k.starts_with("RELAY_") || k == "CREDENTIALS_DIRECTORY" || k == "STATE_DIRECTORY")
        {
            cmd.env_remove(k);
        }
    }
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            let zero = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &zero);
            Ok(())
        });
    }
    cmd
}

/// Peak and current resident set size of a process, in KiB (`VmHWM`, `VmRSS`).
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

/// Open file descriptors of a process.
pub fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The simulator as a separate process

pub struct SimProc {
    child: Option<Child>,
    /// `[upstream]` and `[oauth]` sections pointing at the simulator.
    pub fragment: String,
    pub mailbox: PathBuf,
    pub log: PathBuf,
}

impl SimProc {
    /// `smtp-oauth-relay simulate` with `extra_smtp` lines added to its `[smtp]` section (the
    /// campaign raises the rate limits so that figures are about faults, not throttling).
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
        let mut child = command(&["simulate", "--config", config.to_str().unwrap()])
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
            let mut inside = false;
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if let Some(m) = line.strip_prefix("Mailbox directory:") {
                    mailbox = m.trim().to_string();
                }
                if line.starts_with("# --- relay.toml fragment") {
                    inside = true;
                    continue;
                }
                if line.starts_with("# --- end") {
                    let _ = tx.send((fragment.clone(), mailbox.clone()));
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
        let (fragment, mailbox) = rx
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

// ---------------------------------------------------------------------------------------------
// The relay binary

pub struct RelayProc {
    child: Option<Child>,
    pub port: u16,
    pub config: PathBuf,
    pub log: PathBuf,
}

/// A relay config: `[smtp]` on `port`, `[queue]` at `spool`, `[log]`, then `rest` (sections
/// such as the simulator fragment). `smtp`/`queue` are extra lines for those sections.
pub fn relay_toml(port: u16, spool: &Path, smtp: &str, queue: &str, rest: &str) -> String {
    format!(
        "[smtp]\nlisten = [\"127.0.0.1:{port}\"]\nhostname = \"relay.test\"\n{smtp}\n\
         [queue]\ndir = \"{}\"\n{queue}\n\n{rest}\n",
        spool.display()
    )
}

/// Adds lines to the `[upstream]` section of a simulator fragment.
pub fn with_upstream(fragment: &str, lines: &str) -> String {
    fragment.replacen("[upstream]\n", &format!("[upstream]\n{lines}\n"), 1)
}

impl RelayProc {
    /// Starts `serve` with the config built by `make(port)`, extra environment, and waits until
    /// it accepts connections.
    pub fn start(
        work: &Path,
        tag: &str,
        env: &[(&str, &str)],
        make: impl Fn(u16) -> String,
    ) -> RelayProc {
        let mut last = String::new();
        for attempt in 0..5 {
            let port = free_port();
            let config = work.join(format!("relay-{tag}.toml"));
            fs::write(&config, make(port)).expect("write relay config");
            let log = work.join(format!("relay-{tag}-{attempt}.log"));
            let mut cmd = command(&["--config", config.to_str().unwrap(), "serve"]);
            for (k, v) in env {
                cmd.env(k, v);
            }
            let child = cmd
                .current_dir(work)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(&log).expect("log"))
                .spawn()
                .expect("spawn serve");
            let mut relay = RelayProc {
                child: Some(child),
                port,
                config,
                log,
            };
            match relay.wait_ready(Duration::from_secs(20)) {
                Ok(()) => return relay,
                Err(exited) => {
                    last = relay.log_text();
                    relay.kill();
                    if !(exited && last.contains("cannot listen")) {
                        panic!("relay did not become ready:\n{last}");
                    }
                }
            }
        }
        panic!("relay could not bind a port:\n{last}");
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), bool> {
        let deadline = Instant::now() + limit;
        loop {
            if !self.running() {
                return Err(true);
            }
            if TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// Waits (bounded) for the process to exit by itself (a failpoint); true if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if !self.running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and a bounded wait; true on exit status 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Messages in `<spool>/<sub>/` (`*.msg`).
pub fn spool_count(spool: &Path, sub: &str) -> usize {
    fs::read_dir(spool.join(sub))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "msg"))
                .count()
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// A blocking SMTP client that records how far each message got

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// DATA started; the final dot was never written (cut off).
    CutOff,
    /// The final dot was written, no reply came (in doubt: may or may not be committed).
    InDoubt,
    /// `250 queued as`.
    Acked,
    /// A refusal at any step.
    Refused,
}

/// marker → fate, shared by the client threads of a scenario.
#[derive(Default)]
pub struct Ledger {
    pub fates: Mutex<HashMap<String, (Fate, usize)>>,
}

impl Ledger {
    pub fn set(&self, marker: &str, fate: Fate, size: usize) {
        self.fates
            .lock()
            .unwrap()
            .insert(marker.to_string(), (fate, size));
    }
    pub fn count(&self, fate: Fate) -> usize {
        self.fates
            .lock()
            .unwrap()
            .values()
            .filter(|(f, _)| *f == fate)
            .count()
    }
}

/// The message for `marker`: `X-Marker` header, then a deterministic body of about `size` bytes
/// that ends with an `END-<marker>` line (so truncation shows).
pub fn message(marker: &str, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: legacy@app.local\r\nTo: user@example.org\r\nSubject: fault {marker}\r\n\
         X-Marker: {marker}\r\n\r\n"
    )
    .into_bytes();
    let mut i = 0u64;
    while m.len() < size {
        let line = if i % 5 == 2 {
            format!(".{marker} dotted {i:07}\r\n")
        } else {
            format!("{marker} line {i:07} the quick brown fox jumps over the lazy dog\r\n")
        };
        m.extend_from_slice(line.as_bytes());
        i += 1;
    }
    m.extend_from_slice(format!("END-{marker}\r\n").as_bytes());
    m
}

/// The body (after the first blank line) of [`message`].
pub fn body_of(message: &[u8]) -> &[u8] {
    let p = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(0);
    &message[p..]
}

/// The `X-Marker` of a delivered message.
pub fn marker_of(delivered: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(delivered);
    let start = text.find("\r\nX-Marker: ")? + "\r\nX-Marker: ".len();
    let end = start + text[start..].find("\r\n")?;
    Some(text[start..end].to_string())
}

pub struct Smtp {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Smtp {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Smtp> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        stream.set_write_timeout(Some(Duration::from_secs(60)))?;
        let _ = stream.set_nodelay(true);
        let mut c = Smtp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let (code, text) = c.reply()?;
        if code != 220 {
            return Err(std::io::Error::other(format!("greeting {code} {text}")));
        }
        let (code, text) = c.cmd("EHLO client.test")?;
        if code != 250 {
            return Err(std::io::Error::other(format!("EHLO {code} {text}")));
        }
        Ok(c)
    }

    pub fn reply(&mut self) -> std::io::Result<(u16, String)> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                let code = line
                    .get(..3)
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| std::io::Error::other(format!("bad reply {line:?}")))?;
                return Ok((code, all));
            }
        }
    }

    pub fn cmd(&mut self, line: &str) -> std::io::Result<(u16, String)> {
        self.writer.write_all(format!("{line}\r\n").as_bytes())?;
        self.reply()
    }

    pub fn raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes)
    }

    /// Sends one message, recording its fate in `ledger` at each step.
    pub fn send_tracked(
        &mut self,
        ledger: &Ledger,
        marker: &str,
        size: usize,
    ) -> std::io::Result<Fate> {
        let msg = message(marker, size);
        let (code, _) = self.cmd("MAIL FROM:<legacy@app.local>")?;
        if code != 250 {
            ledger.set(marker, Fate::Refused, size);
            return Ok(Fate::Refused);
        }
        let (code, _) = self.cmd("RCPT TO:<user@example.org>")?;
        if code != 250 {
            ledger.set(marker, Fate::Refused, size);
            let _ = self.cmd("RSET");
            return Ok(Fate::Refused);
        }
        let (code, _) = self.cmd("DATA")?;
        if code != 354 {
            ledger.set(marker, Fate::Refused, size);
            return Ok(Fate::Refused);
        }
        ledger.set(marker, Fate::CutOff, size);
        self.writer.write_all(&dot_stuff(&msg))?;
        ledger.set(marker, Fate::InDoubt, size);
        self.writer.write_all(b".\r\n")?;
        let (code, _) = self.reply()?;
        let fate = if code == 250 {
            Fate::Acked
        } else {
            Fate::Refused
        };
        ledger.set(marker, fate, size);
        Ok(fate)
    }

    pub fn quit(mut self) {
        let _ = self.cmd("QUIT");
    }

    /// Everything the server sends until it closes (or `limit` passes).
    pub fn read_to_close(&mut self, limit: Duration) -> Vec<u8> {
        let _ = self.reader.get_ref().set_read_timeout(Some(limit));
        let mut out = Vec::new();
        let _ = self.reader.read_to_end(&mut out);
        out
    }
}

pub fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 64);
    let mut at_line_start = true;
    for &b in message {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

/// What the mailbox holds against what the clients recorded.
#[derive(Debug, Default)]
pub struct Audit {
    pub acked: usize,
    pub in_doubt: usize,
    pub cut_off: usize,
    pub refused: usize,
    /// Distinct markers delivered.
    pub delivered: usize,
    /// Extra copies beyond the first.
    pub duplicates: usize,
    /// Acknowledged but never delivered (must be 0).
    pub lost: Vec<String>,
    /// Delivered although cut off or refused, or with a wrong body (must be empty).
    pub wrong: Vec<String>,
}

/// Compares delivered messages with the ledger. Markers not in the ledger are ignored when
/// `prefix` does not match (other scenarios sharing a mailbox).
pub fn audit(ledger: &Ledger, delivered: &[Vec<u8>], prefix: &str) -> Audit {
    let fates = ledger.fates.lock().unwrap();
    let mut copies: HashMap<String, usize> = HashMap::new();
    let mut a = Audit::default();
    for m in delivered {
        let Some(marker) = marker_of(m) else { continue };
        if !marker.starts_with(prefix) {
            continue;
        }
        *copies.entry(marker.clone()).or_default() += 1;
        match fates.get(&marker) {
            Some((Fate::Acked | Fate::InDoubt, size)) => {
                let expected = message(&marker, *size);
                if !m.ends_with(body_of(&expected)) {
                    a.wrong.push(format!(
                        "{marker}: delivered body differs from the one sent"
                    ));
                }
            }
            Some((fate, _)) => a
                .wrong
                .push(format!("{marker}: delivered although {fate:?}")),
            None => a.wrong.push(format!("{marker}: delivered but never sent")),
        }
    }
    for (marker, (fate, _)) in fates.iter() {
        match fate {
            Fate::Acked => {
                a.acked += 1;
                if !copies.contains_key(marker) {
                    a.lost.push(marker.clone());
                }
            }
            Fate::InDoubt => a.in_doubt += 1,
            Fate::CutOff => a.cut_off += 1,
            Fate::Refused => a.refused += 1,
        }
    }
    a.delivered = copies.len();
    a.duplicates = copies.values().map(|n| n - 1).sum();
    a.lost.sort();
    a
}

/// Appends one line to `target/fault-figures.txt` (collected into RELIABILITY.md by hand) and
/// prints it.
pub fn report(line: &str) {
    eprintln!("FIGURES {line}");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fault-figures.txt");
    if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}
