//! The file-descriptor budget: SMTP must never find the process out of descriptors because of
//! something else (4,200 idle admin connections once used all 4,096 of `LimitNOFILE` and SMTP
//! greeted no one).
//!
//! At start the relay reads `RLIMIT_NOFILE` and sizes a reserve for what SMTP and delivery can
//! need at most ([`smtp_reserve`]). The admin endpoint takes a new connection only while the
//! descriptors open now plus that reserve stay under the limit ([`FdBudget::allows`]); the rest
//! is closed at once. Counting is exact (`/proc/self/fd`); without `/proc` only the admin
//! connection cap applies.

use std::io;

use crate::config::Config;

/// Per SMTP session: its socket and the spool file of the message it is receiving.
pub const FDS_PER_SMTP_SESSION: u64 = 2;
/// Per upstream connection: its socket and the message or state file being read or written.
pub const FDS_PER_UPSTREAM_CONNECTION: u64 = 2;
/// Shared by everything else that opens descriptors now and then: the group-commit directory
/// fsync, token requests and DNS, the status file, a config reload, the failure notices.
pub const FDS_SHARED: u64 = 16;

/// Descriptors kept free for SMTP and delivery: every SMTP session the listeners allow (see
/// [`crate::config::SmtpConfig::max_sessions`]) and
/// `upstream.connections` upstream connections at their worst, plus [`FDS_SHARED`].
pub fn smtp_reserve(config: &Config) -> u64 {
    config
        .smtp
        .max_sessions()
        .saturating_mul(FDS_PER_SMTP_SESSION)
        .saturating_add(
            (config.upstream.connections as u64).saturating_mul(FDS_PER_UPSTREAM_CONNECTION),
        )
        .saturating_add(FDS_SHARED)
}

/// The soft `RLIMIT_NOFILE` (the one `open` and `accept` fail at); `None` when unlimited.
pub fn soft_limit() -> Option<u64> {
    // SAFETY: zeroed rlimit is a valid out-parameter for getrlimit(2).
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    #[allow(clippy::unnecessary_cast)]
    let cur = rl.rlim_cur as u64;
    (rc == 0 && rl.rlim_cur != libc::RLIM_INFINITY).then_some(cur)
}

/// Descriptors this process has open now. Fails with `EMFILE` when not even the count can be
/// taken (the directory needs one), and with `NotFound` without `/proc`.
pub fn open_now() -> io::Result<u64> {
    let dir = std::fs::read_dir("/proc/self/fd")?;
    // The directory's own descriptor is listed too.
    Ok((dir.count() as u64).saturating_sub(1))
}

/// Whether descriptors may be spent on something that can wait (an admin connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// `None`: unlimited.
    pub limit: Option<u64>,
    /// Kept free for SMTP and delivery.
    pub reserve: u64,
}

impl FdBudget {
    /// The process's limit with `reserve` kept free.
    pub fn with_reserve(reserve: u64) -> FdBudget {
        FdBudget {
            limit: soft_limit(),
            reserve,
        }
    }

    /// The budget `serve` uses for `config`.
    pub fn for_config(config: &Config) -> FdBudget {
        FdBudget::with_reserve(smtp_reserve(config))
    }

    /// Descriptors that may be open at most before [`allows`](Self::allows) says no.
    pub fn ceiling(&self) -> Option<u64> {
        self.limit.map(|l| l.saturating_sub(self.reserve))
    }

    /// True if `extra` more descriptors leave the reserve untouched. When they cannot even be
    /// counted because the process is out of descriptors, no.
    pub fn allows(&self, extra: u64) -> bool {
        let Some(ceiling) = self.ceiling() else {
            return true;
        };
        match open_now() {
            Ok(open) => open.saturating_add(extra) <= ceiling,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => false,
            // No /proc (some sandboxes): the admin connection cap still bounds the admin side.
            Err(_) => true,
        }
    }
}

/// True for the accept errors that mean "out of descriptors or memory" (retry after a pause)
/// rather than a problem of one connection.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_follows_the_limits() {
        let mut config = Config::default();
        config.smtp.max_connections = 100;
        config.upstream.connections = 3;
        assert_eq!(smtp_reserve(&config), 200 + 6 + FDS_SHARED);
        config.smtp.max_connections = usize::MAX;
        assert_eq!(smtp_reserve(&config), u64::MAX);
    }

    #[test]
    fn budget_counts_open_descriptors() {
        let open = open_now().expect("/proc/self/fd");
        assert!(open >= 3, "stdio at least: {open}");
        // Far from the bounds: other tests open and close descriptors meanwhile.
        let roomy = FdBudget {
            limit: Some(open + 10_000),
            reserve: 10,
        };
        assert!(roomy.allows(1));
        let tight = FdBudget {
            limit: Some(open + 100),
            reserve: open + 100,
        };
        assert!(!tight.allows(1));
        let unlimited = FdBudget {
            limit: None,
            reserve: u64::MAX,
        };
        assert!(unlimited.allows(1_000_000));
    }
}
