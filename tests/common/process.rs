//! The real `smtp-oauth-relay` binary as a process: one builder for `serve` (config text from
//! the chosen ports, extra environment such as `RELAY_FAILPOINT`, systemd's notify socket, log
//! capture to a file, core dumps off, readiness and exit waits, SIGTERM/SIGKILL), plus the
//! one-shot commands (`config`, `check`, `queue ...`, `health`) and `/proc` figures.
//!
//! Every wait here is bounded; nothing asserts on timing.

use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_smtp-oauth-relay")
}

/// A port that was free a moment ago (the relay may still lose a race for it: the builder
/// retries with another one).
pub fn free_port() -> u16 {
    free_addr().port()
}

/// A free address on 127.0.0.1 (bound then released).
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr")
}

/// Removes inherited variables that would change how the relay reads its configuration or
/// where it reports (an outer systemd's notify socket, `RUST_LOG`).
pub fn scrub_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str()
            && (k.starts_with("RELAY_")
                || matches!(
                    k,
                    "CREDENTIALS_DIRECTORY"
                        | "STATE_DIRECTORY"
                        | "RUST_LOG"
                        | "NOTIFY_SOCKET"
                        | "WATCHDOG_USEC"
                        | "WATCHDOG_PID"
                ))
        {
            cmd.env_remove(k);
        }
    }
}

/// The binary with `args`, a scrubbed environment and core dumps off (failpoints `abort()`).
pub fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    scrub_env(&mut cmd);
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

/// Runs the binary with `--config FILE` and the given arguments (plus `env`), and returns its
/// output (bounded: 30 s).
pub fn run_cli(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = command(&["--config", &config.display().to_string()]);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null());
    output_bounded(cmd, Duration::from_secs(30))
}

/// `smtp-oauth-relay queue ARGS` as its own process (an operator's shell) against the spool
/// at `spool`, with a config written in `work`; its stdout. Panics unless it exits 0.
pub fn queue_cli(work: &Path, spool: &Path, args: &[&str]) -> String {
    queue_cli_with(
        work,
        &format!("[queue]\ndir = \"{}\"\n", spool.display()),
        args,
    )
}

/// [`queue_cli`] with the operator's relay.toml given whole (another queue backend).
pub fn queue_cli_with(work: &Path, relay_toml: &str, args: &[&str]) -> String {
    let config = work.join("operator.toml");
    fs::write(&config, relay_toml).expect("write operator.toml");
    let mut full = vec!["queue"];
    full.extend_from_slice(args);
    let out = run_cli(&config, &full, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "queue {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs the binary with `args`; stdout then stderr as one text (bounded: 60 s).
pub fn run_text(args: &[&str]) -> String {
    let mut cmd = command(args);
    cmd.stdin(Stdio::null());
    let out = output_bounded(cmd, Duration::from_secs(60));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    text
}

/// `smtp-oauth-relay hash-password` with `password` on stdin: the PHC string it prints, for a
/// users file line `user:HASH`.
pub fn hash_password_cli(password: &str) -> String {
    use std::io::Write;
    let mut cmd = command(&["hash-password"]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn hash-password");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write password");
    let out = child.wait_with_output().expect("hash-password output");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && stdout.starts_with("$argon2id$"),
        "hash-password: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `smtp-oauth-relay health --config FILE`: (exit code, stdout).
pub fn health_with(config: &Path) -> (i32, String) {
    let out = run_cli(config, &["health"], &[]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
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
             (e.g. `apt-get install -y {name}`; ./run-tests does this)"
        ),
    }
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
// Config text

/// Extra lines for the config [`write_config`] generates.
#[derive(Debug, Clone, Default)]
pub struct Extra {
    /// Lines appended to `[smtp]`.
    pub smtp: String,
    /// Lines appended to `[queue]` (the last section before `[log]`, so further tables such as
    /// `[upstream]` may follow here).
    pub queue: String,
}

/// The config text of a relay on `127.0.0.1:port` with its spool at `spool`, log level info.
pub fn config_text(port: u16, spool: &Path, extra: &Extra) -> String {
    format!(
        "[smtp]\nlisten = [\"127.0.0.1:{port}\"]\nhostname = \"relay.test\"\n{smtp}\n\
         [queue]\ndir = \"{dir}\"\n{queue}\n[log]\nlevel = \"info\"\n",
        smtp = extra.smtp,
        dir = spool.display(),
        queue = extra.queue,
    )
}

/// Writes [`config_text`] to `path`.
pub fn write_config(path: &Path, port: u16, spool: &Path, extra: &Extra) {
    fs::write(path, config_text(port, spool, extra)).expect("write relay.toml");
}

/// A relay config: `[smtp]` on `port`, `[queue]` at `spool`, then `rest` (sections such as the
/// simulator fragment and `[log]`). `smtp`/`queue` are extra lines for those sections.
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

/// The service tests' config: SMTP and admin listeners, the spool (no free-space guard), info
/// logs. Later tables must not repeat these.
pub fn base_config(smtp: SocketAddr, admin: SocketAddr, spool: &Path) -> String {
    format!(
        "[smtp]\nlisten = [\"{smtp}\"]\n\n[queue]\ndir = \"{}\"\nmin_free_space = 1\n\n\
         [admin]\nlisten = \"{admin}\"\n\n[log]\nlevel = \"info\"\n",
        spool.display()
    )
}

// ---------------------------------------------------------------------------------------------
// The process builder

/// What a start attempt chose; the config text is built from it.
#[derive(Debug, Clone)]
pub struct Setup {
    /// A free port for `[smtp] listen`.
    pub smtp: u16,
    /// A free port for `[admin] listen`, if the config wants one.
    pub admin: u16,
    /// The work directory.
    pub work: PathBuf,
    /// The spool directory ([`RelayBuilder::spool`], default `<work>/spool`).
    pub spool: PathBuf,
}

type MakeConfig<'a> = Box<dyn Fn(&Setup) -> String + 'a>;

/// How to start `serve`. [`Relay::start`], [`Relay::start_with`] and [`Relay::daemon`] are the
/// usual shapes; the builder is for anything else.
pub struct RelayBuilder<'a> {
    work: Option<PathBuf>,
    spool: Option<PathBuf>,
    tag: String,
    make: MakeConfig<'a>,
    env: Vec<(String, String)>,
    /// Arguments after `serve` (e.g. `--simulate`).
    args: Vec<String>,
    watchdog: Option<Duration>,
    notify: bool,
}

impl<'a> RelayBuilder<'a> {
    /// The directory for the config, the logs and (by default) the spool; without one the relay
    /// gets its own temporary directory.
    pub fn work(mut self, dir: &Path) -> Self {
        self.work = Some(dir.to_path_buf());
        self
    }

    /// Where the config puts the spool (for [`Relay::spool`]; default `<work>/spool`).
    pub fn spool(mut self, dir: &Path) -> Self {
        self.spool = Some(dir.to_path_buf());
        self
    }

    /// Names the config (`<tag>.toml`) and log files, so several relays can share a directory.
    pub fn tag(mut self, tag: &str) -> Self {
        self.tag = tag.to_string();
        self
    }

    /// The config text from the chosen ports (called again for each start attempt).
    pub fn config(mut self, make: impl Fn(&Setup) -> String + 'a) -> Self {
        self.make = Box::new(make);
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn envs(mut self, vars: &[(&str, &str)]) -> Self {
        for (k, v) in vars {
            self = self.env(k, v);
        }
        self
    }

    /// An argument after `serve`, such as `--simulate`.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    /// Plays systemd: `NOTIFY_SOCKET` is a datagram socket the test reads
    /// ([`Relay::wait_notify`]); with `watchdog`, `WATCHDOG_USEC` is set too. `start` then does
    /// not wait for the listener (the test waits for `READY=1`). Needs a tokio runtime.
    pub fn notify_socket(mut self, watchdog: Option<Duration>) -> Self {
        self.notify = true;
        self.watchdog = watchdog;
        self
    }

    /// Starts `serve` and (without a notify socket) waits until it accepts connections. Retries
    /// on other ports if the chosen one was taken in the meantime.
    pub fn start(self) -> Relay {
        let tmp = match &self.work {
            Some(_) => None,
            None => Some(tempfile::tempdir().expect("tempdir")),
        };
        let work = match (&self.work, &tmp) {
            (Some(w), _) => w.clone(),
            (None, Some(t)) => t.path().to_path_buf(),
            (None, None) => unreachable!("a work directory or a tempdir"),
        };
        let spool = self.spool.clone().unwrap_or_else(|| work.join("spool"));
        let config = work.join(format!("{}.toml", self.tag));
        let mut last_log = String::new();
        let mut tmp = tmp;
        for attempt in 0..5 {
            let ports = Setup {
                smtp: free_port(),
                admin: free_port(),
                work: work.clone(),
                spool: spool.clone(),
            };
            fs::write(&config, (self.make)(&ports)).expect("write relay config");
            let log = work.join(format!("{}-{}-{attempt}.log", self.tag, ports.smtp));
            let mut cmd = command(&["--config", &config.display().to_string(), "serve"]);
            cmd.args(&self.args);
            for (k, v) in &self.env {
                cmd.env(k, v);
            }
            let notify = self.notify.then(|| {
                let path = work.join(format!("{}-notify-{attempt}.sock", self.tag));
                let sock =
                    std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
                sock.set_nonblocking(true)
                    .expect("nonblocking notify socket");
                cmd.env("NOTIFY_SOCKET", &path);
                if let Some(every) = self.watchdog {
                    cmd.env("WATCHDOG_USEC", every.as_micros().to_string());
                }
                tokio::net::UnixDatagram::from_std(sock).expect("notify socket in tokio")
            });
            let child = cmd
                .current_dir(&work)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(&log).expect("create log"))
                .spawn()
                .expect("spawn smtp-oauth-relay serve");
            let mut relay = Relay {
                child: Some(child),
                port: ports.smtp,
                admin_port: ports.admin,
                config: config.clone(),
                spool: spool.clone(),
                log,
                dir: work.clone(),
                notify,
                _tmp: None,
            };
            if relay.notify.is_some() {
                relay._tmp = tmp.take();
                return relay;
            }
            match relay.wait_ready(Duration::from_secs(20)) {
                Ok(()) => {
                    relay._tmp = tmp.take();
                    return relay;
                }
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
}

/// A running relay process. Killed (SIGKILL) and reaped when dropped.
pub struct Relay {
    child: Option<Child>,
    /// The SMTP port (`127.0.0.1`).
    pub port: u16,
    /// The port offered for `[admin]` (used if the config listens there).
    pub admin_port: u16,
    pub config: PathBuf,
    pub spool: PathBuf,
    /// The relay's stderr (its log).
    pub log: PathBuf,
    /// The work directory (config, logs).
    pub dir: PathBuf,
    notify: Option<tokio::net::UnixDatagram>,
    _tmp: Option<tempfile::TempDir>,
}

impl Relay {
    /// A builder with the [`config_text`] defaults (`[smtp]` on the chosen port, spool at
    /// `<work>/spool`, info logs).
    pub fn builder<'a>() -> RelayBuilder<'a> {
        RelayBuilder {
            work: None,
            spool: None,
            tag: "relay".into(),
            make: Box::new(|s: &Setup| config_text(s.smtp, &s.spool, &Extra::default())),
            env: Vec::new(),
            args: Vec::new(),
            watchdog: None,
            notify: false,
        }
    }

    /// `serve` in `workdir` with its spool at `spool` and [`config_text`] (+ `extra`).
    pub fn start(workdir: &Path, spool: &Path, extra: &Extra) -> Relay {
        let extra = extra.clone();
        Relay::builder()
            .work(workdir)
            .spool(spool)
            .config(move |s| config_text(s.smtp, &s.spool, &extra))
            .start()
    }

    /// `serve` in `work` with the config `make(port)` (config `relay-<tag>.toml`) and extra
    /// environment (e.g. `RELAY_FAILPOINT`). The spool is taken to be `<work>/spool`.
    pub fn start_with(
        work: &Path,
        tag: &str,
        env: &[(&str, &str)],
        make: impl Fn(u16) -> String,
    ) -> Relay {
        Relay::builder()
            .work(work)
            .tag(&format!("relay-{tag}"))
            .envs(env)
            .config(move |p| make(p.smtp))
            .start()
    }

    /// The service tests' relay: its own temporary directory, [`base_config`] with SMTP and
    /// admin listeners (changed by `edit`), and with `watchdog` systemd's notify socket
    /// (`Some`: the test waits for READY=1 itself). Async, as the service tests call it from
    /// their runtime (the notify socket needs one).
    pub async fn daemon(edit: impl Fn(String) -> String, watchdog: Option<Duration>) -> Relay {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = Relay::builder().work(dir.path()).config(move |s| {
            edit(base_config(
                SocketAddr::from(([127, 0, 0, 1], s.smtp)),
                SocketAddr::from(([127, 0, 0, 1], s.admin)),
                &s.spool,
            ))
        });
        let b = match watchdog {
            Some(w) => b.notify_socket(Some(w)),
            None => b,
        };
        let mut relay = b.start();
        relay._tmp = Some(dir);
        relay
    }

    /// `Err(true)` if the process exited, `Err(false)` on timeout.
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

    /// The SMTP listener.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The SMTP listener (the service tests' name for it).
    pub fn smtp(&self) -> SocketAddr {
        self.addr()
    }

    pub fn admin(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin_port))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("relay running").id()
    }

    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /readyz`'s status (0 when the admin endpoint does not answer).
    pub async fn readyz(&self) -> u16 {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("http client");
        match client
            .get(format!("http://127.0.0.1:{}/readyz", self.admin_port))
            .send()
            .await
        {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// Waits (bounded: 60 s) until `/readyz` answers `status`.
    pub async fn wait_readyz(&self, status: u16) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.readyz().await != status {
            assert!(
                Instant::now() < deadline,
                "/readyz never answered {status}; relay log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The first log line (after `skip` bytes of the log) containing `needle`, or `None`.
    pub fn log_line(&self, needle: &str, skip: usize) -> Option<String> {
        let log = self.log_text();
        let at = log.get(skip..).and_then(|l| l.find(needle))?;
        let start = log[..skip + at].rfind('\n').map_or(0, |p| p + 1);
        let end = log[skip + at..]
            .find('\n')
            .map_or(log.len(), |e| skip + at + e);
        Some(log[start..end].to_string())
    }

    /// Waits until the log contains `needle` (after `skip` bytes of it) and returns that line;
    /// panics after 15 s (async tests: the wait does not block the runtime).
    pub async fn wait_log(&self, needle: &str, skip: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(line) = self.log_line(needle, skip) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// [`wait_log`](Self::wait_log) for thread-based tests, bounded by `limit`.
    pub fn wait_log_blocking(&self, needle: &str, skip: usize, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self.log_line(needle, skip) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log within {limit:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill");
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

    /// Waits for the process to exit and returns its status; panics (with the log) after
    /// `limit`. Polls with the runtime's timer, so async tasks keep running meanwhile.
    pub async fn wait_exit_status(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            let child = self.child.as_mut().expect("relay started");
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "relay still running after {limit:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait (bounded: 40 s) for a clean exit; true if it exited with status 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        // SAFETY: kill(2) on our own child's pid.
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

    /// The next notify datagram, or `None` after `timeout`.
    pub async fn next_notify(&self, timeout: Duration) -> Option<String> {
        let sock = self.notify.as_ref().expect("started with a notify socket");
        let mut buf = vec![0u8; 4096];
        match tokio::time::timeout(timeout, sock.recv(&mut buf)).await {
            Ok(Ok(n)) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            _ => None,
        }
    }

    /// Waits for a notify datagram with the line `line`, returning every datagram seen.
    pub async fn wait_notify(&self, line: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_notify(left).await {
                Some(msg) => {
                    let hit = msg.lines().any(|l| l == line);
                    seen.push(msg);
                    if hit {
                        return seen;
                    }
                }
                None => panic!(
                    "no {line:?} within {timeout:?}; got {seen:?}\n{}",
                    self.log_text()
                ),
            }
        }
    }

    /// `smtp-oauth-relay health` with this relay's config: (exit code, stdout).
    pub fn health(&self) -> (i32, String) {
        health_with(&self.config)
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.spool.clone()
    }

    /// Files in `queue/`.
    pub fn queued_files(&self) -> usize {
        fs::read_dir(self.spool.join("queue"))
            .map(|rd| rd.count())
            .unwrap_or(0)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}
