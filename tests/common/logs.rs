//! The in-process relay's log, captured: a test awaits the line an event writes (a delivery
//! attempt that timed out, a refused connection) instead of sleeping and hoping.
//!
//! One subscriber serves the whole test binary, so a test must look for lines that only it can
//! cause (its own message ids, its own ports).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<String>>);

impl std::io::Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_str(&String::from_utf8_lossy(buf));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

static CAPTURED: OnceLock<Buffer> = OnceLock::new();

/// Starts capturing (once per test binary) everything at info and above.
pub fn capture() -> Logs {
    CAPTURED.get_or_init(|| {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let installed = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        assert!(installed.is_ok(), "another tracing subscriber is installed");
        buffer
    });
    Logs
}

/// A handle on the captured log (the same buffer for every caller).
pub struct Logs;

impl Logs {
    /// Everything captured so far.
    pub fn text(&self) -> String {
        lines_with(&[]).join("\n")
    }

    /// Lines that contain every one of `needles`.
    pub fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        lines_with(needles)
    }
}

/// Every captured line containing all of `needles`.
pub fn lines_with(needles: &[&str]) -> Vec<String> {
    let Some(buffer) = CAPTURED.get() else {
        panic!("logs::capture() was not called");
    };
    let text = buffer.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
    text.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

/// Waits (bounded: 30 s) until a line contains all of `needles`, and returns it.
pub async fn wait_line(needles: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(line) = lines_with(needles).into_iter().next() {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needles:?} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
