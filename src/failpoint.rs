//! Deterministic crash points for the fault-injection tests (`tests/fault_crash_points.rs`).
//!
//! Compiled in only with the cargo feature `failpoints` (the test build enables it through a
//! dev-dependency on this package; release builds never contain it). `RELAY_FAILPOINT=NAME` or
//! `RELAY_FAILPOINT=NAME:N` makes the process `abort()` the N-th time (default: first) execution
//! reaches the point `NAME`: the same effect as a `kill -9` at exactly that instant. The variable
//! is read once, by [`init`] at start; afterwards a point costs one atomic load.
//!
//! Points (in the order a message meets them):
//! - `mid-data`: a chunk of DATA/BDAT bytes has been received (before it is written).
//! - `after-body-fsync`: the message file is fsync'd, not yet renamed into `queue/`.
//! - `after-rename`: renamed into `queue/`, the directory not yet fsync'd.
//! - `after-dir-fsync`: durable, the `250` not yet sent.
//! - `after-250`: the `250 queued as` reply has been written to the client.
//! - `upstream-mid-data`: the upstream DATA has been accepted (354), body not yet sent.
//! - `after-upstream-250`: the upstream accepted the message, the spool not yet updated.
//!
//! Task points panic instead of aborting (a task that dies inside a process that goes on, the
//! case the supervisor in `daemon` exists for): `task-inbound`, `task-dispatcher`,
//! `task-refresher`, `task-admin`, `task-reload` and `task-maildrop` are hit once when that task starts
//! ([`panic_point`]).

#[cfg(feature = "failpoints")]
mod imp {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Armed {
        name: String,
        at: u64,
        hits: AtomicU64,
    }

    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();

    pub fn init() {
        ARMED.get_or_init(|| {
            let spec = std::env::var("RELAY_FAILPOINT").ok()?;
            let (name, at) = match spec.split_once(':') {
                Some((n, c)) => (n.to_string(), c.trim().parse().unwrap_or(1)),
                None => (spec, 1),
            };
            eprintln!("smtp-oauth-relay: failpoint {name}:{at} armed");
            Some(Armed {
                name: name.trim().to_string(),
                at: at.max(1),
                hits: AtomicU64::new(0),
            })
        });
    }

    #[inline]
    pub fn hit(name: &str) {
        if let Some(Some(armed)) = ARMED.get()
            && armed.name == name
            && armed.hits.fetch_add(1, Ordering::SeqCst) + 1 == armed.at
        {
            eprintln!("smtp-oauth-relay: failpoint {name} reached: abort()");
            std::process::abort();
        }
    }

    pub fn panic_point(name: &str) {
        if let Some(Some(armed)) = ARMED.get()
            && armed.name == name
            && armed.hits.fetch_add(1, Ordering::SeqCst) + 1 == armed.at
        {
            panic!("failpoint {name} reached");
        }
    }
}

#[cfg(not(feature = "failpoints"))]
mod imp {
    #[inline(always)]
    pub fn init() {}

    #[inline(always)]
    pub fn hit(_name: &str) {}

    #[inline(always)]
    pub fn panic_point(_name: &str) {}
}

/// Reads `RELAY_FAILPOINT` (once; later calls do nothing). Without the `failpoints` feature this
/// does nothing.
pub fn init() {
    imp::init()
}

/// Aborts the process if the armed failpoint is `name` and this is its N-th hit.
#[inline]
pub fn hit(name: &str) {
    imp::hit(name)
}

/// Panics (the calling task dies, the process goes on) if the armed failpoint is `name` and
/// this is its N-th hit.
#[inline]
pub fn panic_point(name: &str) {
    imp::panic_point(name)
}
