//! Process-level harness for the service tests: runs the real `smtp-oauth-relay serve` binary
//! on ephemeral ports with a config file in a temporary directory, captures its log, and
//! optionally plays systemd's notify socket.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UnixDatagram;

pub const BIN: &str = env!("CARGO_BIN_EXE_smtp-oauth-relay");

/// A free port on 127.0.0.1 (bound then released; the race is harmless in practice).
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

pub struct Daemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub smtp: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    log: Arc<Mutex<String>>,
    pub notify: Option<UnixDatagram>,
}

/// The config the tests start from; `extra` is appended (later tables must not repeat these).
pub fn base_config(smtp: SocketAddr, admin: SocketAddr, spool: &Path) -> String {
    format!(
        "[smtp]\nlisten = [\"{smtp}\"]\n\n[queue]\ndir = \"{}\"\nmin_free_space = 1\n\n\
         [admin]\nlisten = \"{admin}\"\n\n[log]\nlevel = \"info\"\n",
        spool.display()
    )
}

impl Daemon {
    /// Starts `serve` with [`base_config`] (+ `replace` applied to it) and waits until it
    /// accepts SMTP. With `watchdog`, plays systemd: NOTIFY_SOCKET and WATCHDOG_USEC are set.
    pub async fn start(edit: impl FnOnce(String) -> String, watchdog: Option<Duration>) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let smtp = free_addr();
        let admin = free_addr();
        let config_path = dir.path().join("relay.toml");
        let text = edit(base_config(smtp, admin, &dir.path().join("spool")));
        std::fs::write(&config_path, text).expect("write config");
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .current_dir(dir.path())
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("STATE_DIRECTORY")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("RELAY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars() {
            if k.starts_with("RELAY_") {
                cmd.env_remove(k);
            }
        }
        let notify = watchdog.map(|every| {
            let path = dir.path().join("notify.sock");
            let sock = UnixDatagram::bind(&path).expect("bind notify socket");
            cmd.env("NOTIFY_SOCKET", &path)
                .env("WATCHDOG_USEC", every.as_micros().to_string());
            sock
        });
        let mut child = cmd.spawn().expect("spawn relay");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut all = sink.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        });
        let daemon = Daemon {
            child,
            dir,
            smtp,
            admin,
            config_path,
            log,
            notify,
        };
        if daemon.notify.is_none() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while tokio::net::TcpStream::connect(smtp).await.is_err() {
                assert!(
                    Instant::now() < deadline,
                    "relay did not start:\n{}",
                    daemon.log()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        daemon
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle` (after `skip` bytes of it); panics after 15 s.
    pub async fn wait_log(&self, needle: &str, skip: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let log = self.log();
            if let Some(at) = log.get(skip..).and_then(|l| l.find(needle)) {
                let start = skip + at;
                let end = log[start..].find('\n').map_or(log.len(), |e| start + e);
                return log[start..end].to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill");
    }

    /// Waits for the process to exit (polling, so async tasks keep running).
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "relay still running after {timeout:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
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

    /// Waits for a notify datagram containing `line`, returning every datagram seen.
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
                    self.log()
                ),
            }
        }
    }

    /// Runs `smtp-oauth-relay health --config <this config>`: (exit code, stdout).
    pub fn health(&self) -> (i32, String) {
        health_with(&self.config_path)
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    pub fn queued_files(&self) -> usize {
        std::fs::read_dir(self.spool_dir().join("queue"))
            .map(|rd| rd.count())
            .unwrap_or(0)
    }
}

pub fn health_with(config: &Path) -> (i32, String) {
    let out = Command::new(BIN)
        .arg("health")
        .arg("--config")
        .arg(config)
        .env_remove("RELAY_CONFIG")
        .output()
        .expect("run health");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
