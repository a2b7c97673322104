//! Shared helpers for the process-level tests: run the real `smtp-oauth-relay` binary on a free
//! loopback port with a temporary spool, talk SMTP to it with a minimal blocking client, and
//! inspect the spool files it leaves behind.
//!
//! Every wait here is bounded; nothing asserts on timing.
#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use smtp_oauth_relay::spool::format::{self, Header};

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_smtp-oauth-relay")
}

/// A port that was free a moment ago (the relay may still lose a race for it: see [`Relay::start`]).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Extra lines for the generated `relay.toml`.
#[derive(Debug, Clone, Default)]
pub struct Extra {
    /// Lines appended to `[smtp]`.
    pub smtp: String,
    /// Lines appended to `[queue]`.
    pub queue: String,
}

/// Writes a config for a relay on `127.0.0.1:port` with its spool at `spool`.
pub fn write_config(path: &Path, port: u16, spool: &Path, extra: &Extra) {
    let text = format!(
        "[smtp]\nlisten = [\"127.0.0.1:{port}\"]\nhostname = \"relay.test\"\n{smtp}\n\
         [queue]\ndir = \"{dir}\"\n{queue}\n[log]\nlevel = \"info\"\n",
        smtp = extra.smtp,
        dir = spool.display(),
        queue = extra.queue,
    );
    fs::write(path, text).expect("write relay.toml");
}

/// Runs the relay binary with `--config FILE` and the given arguments, environment cleared of
/// `RELAY_*` overrides (plus `env`), and returns its output.
pub fn run_cli(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.arg("--config").arg(config).args(args);
    scrub_env(&mut cmd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null());
    output_bounded(cmd, Duration::from_secs(30))
}

/// Removes inherited variables that would change how the relay reads its configuration.
pub fn scrub_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str()
            && (k.starts_with("RELAY_") || k == "CREDENTIALS_DIRECTORY" || k == "STATE_DIRECTORY")
        {
            cmd.env_remove(k);
        }
    }
}

/// Runs a command to completion, killing it if it takes longer than `limit`.
pub fn output_bounded(mut cmd: Command, limit: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out_thread.join().expect("stdout reader"),
        stderr: err_thread.join().expect("stderr reader"),
    }
}

/// A running relay process. Killed (SIGKILL) when dropped.
pub struct Relay {
    child: Option<Child>,
    pub port: u16,
    pub config: PathBuf,
    pub spool: PathBuf,
    pub log: PathBuf,
}

impl Relay {
    /// Starts `serve` in `workdir` (config and log live there) with its spool at `spool`, on a
    /// free port, and waits until it accepts connections. Retries with another port if the
    /// chosen one was taken in the meantime.
    pub fn start(workdir: &Path, spool: &Path, extra: &Extra) -> Relay {
        let mut last_log = String::new();
        for attempt in 0..5 {
            let port = free_port();
            let config = workdir.join("relay.toml");
            write_config(&config, port, spool, extra);
            let log = workdir.join(format!("relay-{port}-{attempt}.log"));
            let log_file = fs::File::create(&log).expect("create log");
            let mut cmd = Command::new(bin());
            cmd.arg("--config").arg(&config).arg("serve");
            scrub_env(&mut cmd);
            let child = cmd
                .current_dir(workdir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .expect("spawn smtp-oauth-relay serve");
            let mut relay = Relay {
                child: Some(child),
                port,
                config,
                spool: spool.to_path_buf(),
                log,
            };
            match relay.wait_ready(Duration::from_secs(20)) {
                Ok(()) => return relay,
                Err(exited) => {
                    last_log = relay.log_text();
                    relay.kill();
                    if !(exited && last_log.contains("cannot listen")) {
                        panic!("relay did not become ready:\n{last_log}");
                    }
                }
            }
        }
        panic!("relay could not bind a free port in 5 attempts:\n{last_log}");
    }

    /// `Err(true)` if the process exited, `Err(false)` on timeout.
    fn wait_ready(&mut self, limit: Duration) -> Result<(), bool> {
        let deadline = Instant::now() + limit;
        let addr = self.addr();
        loop {
            if let Some(child) = self.child.as_mut()
                && child.try_wait().expect("try_wait").is_some()
            {
                return Err(true);
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
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
        self.child.as_ref().expect("running").id()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait (bounded) for a clean exit; returns whether it exited with status 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
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

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal blocking SMTP client

/// One SMTP reply: code and the full text of every line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
    /// `queued as <ID>` of a 250 after DATA.
    pub fn queued_id(&self) -> Option<String> {
        if self.code != 250 {
            return None;
        }
        let last = self.lines.last()?;
        let pos = last.find("queued as ")?;
        Some(last[pos + "queued as ".len()..].trim().to_string())
    }
}

pub struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    /// Connects, reads the greeting (must be 220) and sends EHLO.
    pub fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        stream.set_write_timeout(Some(Duration::from_secs(60)))?;
        let _ = stream.set_nodelay(true);
        let mut c = Client {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = c.read_reply()?;
        if greeting.code != 220 {
            return Err(std::io::Error::other(format!("greeting {greeting:?}")));
        }
        let ehlo = c.command("EHLO client.test")?;
        if ehlo.code != 250 {
            return Err(std::io::Error::other(format!("EHLO {ehlo:?}")));
        }
        Ok(c)
    }

    pub fn read_reply(&mut self) -> std::io::Result<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let line = line.trim_end_matches(['\r', '\n']).to_string();
            if line.len() < 3 {
                return Err(std::io::Error::other(format!("bad reply line {line:?}")));
            }
            let code: u16 = line[..3]
                .parse()
                .map_err(|_| std::io::Error::other(format!("bad reply line {line:?}")))?;
            let more = line.as_bytes().get(3) == Some(&b'-');
            lines.push(line);
            if !more {
                return Ok(Reply { code, lines });
            }
        }
    }

    /// Writes bytes as they are (message data, pipelined commands).
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes)
    }

    pub fn command(&mut self, line: &str) -> std::io::Result<Reply> {
        self.writer.write_all(format!("{line}\r\n").as_bytes())?;
        self.read_reply()
    }

    /// MAIL, RCPT, DATA, body (dot-stuffed here; `message` must end in CRLF), end of data.
    /// Returns the first refusal, or the reply to the end of data.
    pub fn send(&mut self, from: &str, to: &str, message: &[u8]) -> std::io::Result<Reply> {
        let r = self.command(&format!("MAIL FROM:<{from}>"))?;
        if r.code != 250 {
            return Ok(r);
        }
        let r = self.command(&format!("RCPT TO:<{to}>"))?;
        if r.code != 250 {
            let _ = self.command("RSET");
            return Ok(r);
        }
        let r = self.command("DATA")?;
        if r.code != 354 {
            return Ok(r);
        }
        self.writer.write_all(&dot_stuff(message))?;
        self.writer.write_all(b".\r\n")?;
        self.read_reply()
    }

    pub fn quit(mut self) {
        let _ = self.command("QUIT");
    }
}

/// RFC 5321 §4.5.2 transparency: a line starting with "." gets another ".".
pub fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 16);
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

// ---------------------------------------------------------------------------------------------
// Spool inspection

/// A decoded spool file.
#[derive(Debug)]
pub struct Stored {
    pub path: PathBuf,
    pub header: Header,
    /// The message bytes after the envelope header.
    pub body: Vec<u8>,
}

/// Reads and strictly decodes one message file; the file size must be exactly header + body.
pub fn read_stored(path: &Path) -> Result<Stored, String> {
    let bytes = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let header = format::decode(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    if header.file_len() != bytes.len() as u64 {
        return Err(format!(
            "{}: file is {} bytes, header says {}",
            path.display(),
            bytes.len(),
            header.file_len()
        ));
    }
    let body = bytes[header.header_len as usize..].to_vec();
    Ok(Stored {
        path: path.to_path_buf(),
        header,
        body,
    })
}

/// Names of the files in `<spool>/<sub>/` (empty if the directory does not exist).
pub fn files_in(spool: &Path, sub: &str) -> Vec<String> {
    let mut names: Vec<String> = match fs::read_dir(spool.join(sub)) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// The message file of `id` in `queue/`.
pub fn queued_path(spool: &Path, id: &str) -> PathBuf {
    spool.join("queue").join(format!("{id}.msg"))
}

/// What the relay added in front of the client's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Added {
    /// The `Received:` header with its continuation lines.
    pub received: String,
    pub date: Option<String>,
    pub message_id: Option<String>,
}

/// Splits a stored message into the relay's added lines and the rest: the leading `Received:`
/// header (with its folded lines), then a `Date:` and a `Message-ID:` line, each expected only if
/// `client_message` (what the client sent, unstuffed) lacks that field. Panics with a readable
/// message if the stored message does not start like that.
pub fn strip_added<'a>(stored: &'a [u8], id: &str, client_message: &[u8]) -> (Added, &'a [u8]) {
    let mut rest = stored;
    let take_line = |rest: &mut &'a [u8]| -> &'a [u8] {
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| p + 2)
            .unwrap_or_else(|| panic!("no CRLF in {:?}", String::from_utf8_lossy(rest)));
        let (line, tail) = rest.split_at(end);
        *rest = tail;
        line
    };
    let first = take_line(&mut rest);
    assert!(
        first.starts_with(b"Received: from "),
        "stored message does not start with the relay's Received header: {:?}",
        String::from_utf8_lossy(first)
    );
    let mut received = String::from_utf8_lossy(first).into_owned();
    while rest.starts_with(b"\t") || rest.starts_with(b" ") {
        received.push_str(&String::from_utf8_lossy(take_line(&mut rest)));
    }
    assert!(
        received.contains("(smtp-oauth-relay) with ") && received.contains(id),
        "Received header does not name the relay and id {id}: {received:?}"
    );
    let client_headers = header_section(client_message);
    let mut date = None;
    if !has_field(client_headers, "Date") {
        let line = take_line(&mut rest);
        assert!(
            line.starts_with(b"Date: "),
            "expected an added Date header, got {:?}",
            String::from_utf8_lossy(line)
        );
        date = Some(String::from_utf8_lossy(line).into_owned());
    }
    let mut message_id = None;
    if !has_field(client_headers, "Message-ID") {
        let line = take_line(&mut rest);
        let expected = format!("Message-ID: <{id}@");
        assert!(
            line.starts_with(expected.as_bytes()),
            "expected an added Message-ID header, got {:?}",
            String::from_utf8_lossy(line)
        );
        message_id = Some(String::from_utf8_lossy(line).into_owned());
    }
    (
        Added {
            received,
            date,
            message_id,
        },
        rest,
    )
}

/// Asserts that the stored message is exactly the relay's added lines followed by
/// `client_message`, byte for byte; returns what was added.
pub fn assert_stored_equals(stored: &[u8], id: &str, client_message: &[u8]) -> Added {
    let (added, rest) = strip_added(stored, id, client_message);
    if rest != client_message {
        let at = rest
            .iter()
            .zip(client_message)
            .position(|(a, b)| a != b)
            .unwrap_or(rest.len().min(client_message.len()));
        let lo = at.saturating_sub(40);
        panic!(
            "message {id}: stored bytes differ from what the client sent at offset {at} \
             (stored {} bytes, sent {} bytes)\n stored: {:?}\n   sent: {:?}",
            rest.len(),
            client_message.len(),
            String::from_utf8_lossy(&rest[lo.min(rest.len())..(at + 40).min(rest.len())]),
            String::from_utf8_lossy(
                &client_message[lo.min(client_message.len())..(at + 40).min(client_message.len())]
            ),
        );
    }
    added
}

/// The header section of a message (up to and including the CRLF of its last header line).
fn header_section(bytes: &[u8]) -> &[u8] {
    if bytes.starts_with(b"\r\n") {
        return &bytes[..0];
    }
    match bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(p) => &bytes[..p + 2],
        None => bytes,
    }
}

/// True if some unfolded line of `headers` is the field `name` (case-insensitive).
fn has_field(headers: &[u8], name: &str) -> bool {
    headers
        .split(|b| *b == b'\n')
        .filter(|l| !l.starts_with(b" ") && !l.starts_with(b"\t"))
        .any(|l| {
            l.len() > name.len()
                && l[..name.len()].eq_ignore_ascii_case(name.as_bytes())
                && l[name.len()] == b':'
        })
}

// ---------------------------------------------------------------------------------------------
// Deterministic pseudo-random numbers (no dependency): SplitMix64.

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// Fails the test with a clear message when a required external tool is missing (CI installs
/// them; a silent skip would hide a gap).
pub fn require_tool(name: &str, probe_args: &[&str]) {
    match Command::new(name)
        .args(probe_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => {}
        Err(e) => panic!(
            "`{name}` is required by this test but cannot be run ({e}); install it \
             (e.g. `apt-get install -y {name}`; .ci/run does this)"
        ),
    }
}
