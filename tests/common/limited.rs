//! The real `smtp-oauth-relay serve` binary (SMTP and admin) on free loopback ports, optionally under a lower
//! `RLIMIT_NOFILE` (set in the child before exec, as systemd's `LimitNOFILE=` would), with its
//! log captured and its descriptors countable from `/proc`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::process::{bin, free_addr, scrub_env};

pub struct Binary {
    child: Child,
    pub smtp: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    log: Arc<Mutex<String>>,
}

impl Binary {
    /// Starts `serve` with SMTP and the admin endpoint on free ports, its spool in a temporary
    /// directory, `extra` appended to the config (tables other than `[smtp]`, `[queue]` and
    /// `[admin]`), `smtp` and `admin` lines added to those tables, and `nofile` as the soft and
    /// hard `RLIMIT_NOFILE`. Returns once both ports accept connections.
    pub fn start(smtp_lines: &str, admin_lines: &str, extra: &str, nofile: Option<u64>) -> Binary {
        let dir = tempfile::tempdir().expect("tempdir");
        let smtp = free_addr();
        let admin = free_addr();
        let config = dir.path().join("relay.toml");
        std::fs::write(
            &config,
            format!(
                "[smtp]\nlisten = [\"{smtp}\"]\nhostname = \"relay.test\"\n{smtp_lines}\n\
                 [queue]\ndir = \"{}\"\nmin_free_space = 1\n\n\
                 [admin]\nlisten = \"{admin}\"\n{admin_lines}\n\n[log]\nlevel = \"info\"\n{extra}",
                dir.path().join("spool").display()
            ),
        )
        .expect("write config");
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        scrub_env(&mut cmd);
        if let Some(n) = nofile {
            // SAFETY: setrlimit(2) is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let rl = libc::rlimit {
                        rlim_cur: n as libc::rlim_t,
                        rlim_max: n as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn smtp-oauth-relay serve");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut all = sink.lock().unwrap_or_else(|p| p.into_inner());
                all.push_str(&line);
                all.push('\n');
            }
        });
        let mut binary = Binary {
            child,
            smtp,
            admin,
            dir,
            log,
        };
        binary.wait_listening();
        binary
    }

    /// Waits (bounded) until the log says both listeners are up: probing the ports with
    /// connections would itself use the admin endpoint's slots.
    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            if log.contains("accepting SMTP") && log.contains("admin endpoint") {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("relay exited with {status}:\n{log}");
            }
            assert!(Instant::now() < deadline, "relay did not start:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Descriptors the relay has open now.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("/proc/PID/fd")
            .count()
    }

    pub fn spool(&self) -> std::path::PathBuf {
        self.dir.path().join("spool")
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
