//! Helpers for the `setup` tests: the simulator with the `--set` flags that point a relay at it,
//! the real binary run in a folder with bytes on stdin, and the binary driven through a
//! pseudo-terminal (libc::openpty) as an admin at a keyboard would.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use smtp_oauth_relay::sim::{SimConfig, Simulator};

pub use super::process::{bin, scrub_env};

/// A running simulator and its state directory.
pub struct Sim {
    pub sim: Simulator,
    _dir: tempfile::TempDir,
}

impl Sim {
    pub async fn start() -> Sim {
        Sim::start_with(SimConfig::default()).await
    }

    pub async fn start_with(config: SimConfig) -> Sim {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let sim = Simulator::start(config, dir.path())
            .await
            .expect("simulator");
        Sim { sim, _dir: dir }
    }

    /// `--set` flags that point the relay at this simulator (what a real tenant derives from
    /// `upstream.cloud` and `oauth.tenant_id`).
    pub fn set_args(&self) -> Vec<String> {
        let sets = [
            "upstream.host=127.0.0.1".to_string(),
            format!("upstream.port={}", self.sim.smtp_addr().port()),
            format!("upstream.ca_file={}", self.sim.ca_file().display()),
            "upstream.tls_server_name=smtp.office365.com".to_string(),
            format!("oauth.token_url={}", self.sim.token_url()),
        ];
        sets.iter()
            .flat_map(|s| ["--set".to_string(), s.clone()])
            .collect()
    }
}

/// Runs the binary in `dir` with `args`, `stdin` piped in (or none), and returns its output.
/// Blocking: call it from `spawn_blocking` while an in-process simulator runs.
pub fn run_in(dir: &Path, args: &[String], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(bin());
    cmd.current_dir(dir).args(args);
    scrub_env(&mut cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn the relay binary");
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        // A setup that refuses its flags exits before reading stdin; the broken pipe is its
        // answer, and the exit status and output say the rest.
        if let Err(e) = pipe.write_all(bytes) {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
        }
    }
    wait_output(child, Duration::from_secs(120))
}

fn wait_output(mut child: Child, limit: Duration) -> Output {
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let status = wait_bounded(&mut child, limit);
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn wait_bounded(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the relay binary did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What the terminal showed so far, and whether the program closed it.
#[derive(Default)]
struct Screen {
    bytes: Vec<u8>,
    closed: bool,
}

/// The binary on a pseudo-terminal: its stdin, stdout and stderr are the pty's slave side;
/// the test types on the master side and reads what the terminal shows (including the echo of
/// what it typed, which the pty's line discipline produces while echo is on).
pub struct Pty {
    child: Child,
    master: File,
    screen: Arc<(Mutex<Screen>, Condvar)>,
}

impl Pty {
    pub fn spawn(dir: &Path, args: &[String]) -> Pty {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two fds into the integers we pass; no name, default settings.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both fds were just returned by openpty and are owned by nobody else.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let mut cmd = Command::new(bin());
        cmd.current_dir(dir).args(args);
        scrub_env(&mut cmd);
        let io = || Stdio::from(slave.try_clone().expect("dup pty slave"));
        cmd.stdin(io()).stdout(io()).stderr(io());
        let child = cmd.spawn().expect("spawn the relay binary on a pty");
        // Only the child may hold the slave now, so that its exit closes the terminal.
        drop(cmd);
        drop(slave);
        let master = File::from(master);
        let mut reader = master.try_clone().expect("dup pty master");
        let screen: Arc<(Mutex<Screen>, Condvar)> = Arc::default();
        let shared = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                // EIO once the child closed the slave: the end of the transcript.
                let n = reader.read(&mut buf).unwrap_or(0);
                let (lock, cond) = &*shared;
                let mut s = lock.lock().expect("screen");
                if n == 0 {
                    s.closed = true;
                    cond.notify_all();
                    return;
                }
                s.bytes.extend_from_slice(&buf[..n]);
                cond.notify_all();
            }
        });
        Pty {
            child,
            master,
            screen,
        }
    }

    /// Waits until `text` has appeared `times` times on the terminal (bounded).
    pub fn wait_for(&self, text: &str, times: usize) {
        let (lock, cond) = &*self.screen;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut s = lock.lock().expect("screen");
        loop {
            let shown = String::from_utf8_lossy(&s.bytes);
            if shown.matches(text).count() >= times {
                return;
            }
            let now = Instant::now();
            if s.closed || now >= deadline {
                panic!("{text:?} (x{times}) never appeared; the terminal showed:\n{shown}");
            }
            s = cond.wait_timeout(s, deadline - now).expect("screen").0;
        }
    }

    /// Types a line and Enter.
    pub fn type_line(&mut self, line: &str) {
        self.master
            .write_all(format!("{line}\n").as_bytes())
            .expect("type on the pty");
    }

    /// Ctrl-D: end of input for a program reading a line.
    pub fn send_eof(&mut self) {
        self.master.write_all(&[0x04]).expect("type on the pty");
    }

    /// Waits for the program to exit and the terminal to close; returns the exit status and
    /// everything the terminal showed.
    pub fn finish(mut self) -> (ExitStatus, String) {
        let status = wait_bounded(&mut self.child, Duration::from_secs(120));
        let (lock, cond) = &*self.screen;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = lock.lock().expect("screen");
        while !s.closed && Instant::now() < deadline {
            s = cond
                .wait_timeout(s, deadline - Instant::now())
                .expect("screen")
                .0;
        }
        (status, String::from_utf8_lossy(&s.bytes).into_owned())
    }
}
