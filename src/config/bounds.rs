//! The allowed range of every numeric and duration key, with its reason. Validation refuses
//! anything outside (exit 2, key named), so no value can overflow a timer, a semaphore or a
//! size computation later. (`queue.retry_min` and `retry_max` have their own rules.)

use std::time::Duration;

/// A range and why it is what it is.
#[derive(Debug, Clone, Copy)]
pub struct Bound<T> {
    pub min: T,
    pub max: T,
    pub why: &'static str,
}

const MIB: u64 = 1024 * 1024;
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

pub const MAX_MESSAGE_SIZE: Bound<u64> = Bound {
    min: 64 * 1024,
    max: 150 * MIB,
    why: "RFC 5321 §4.5.3.1.7 requires at least 64 KiB; Exchange Online accepts at most \
          150 MiB (its EHLO SIZE 157286400)",
};
pub const MAX_RECIPIENTS: Bound<usize> = Bound {
    min: 100,
    max: 1000,
    why: "RFC 5321 §4.5.3.1.8 requires at least 100; Exchange Online takes at most 1000 \
          recipients per message (500 unless the admin raised it)",
};
pub const MAX_CONNECTIONS: Bound<usize> = Bound {
    min: 1,
    max: 10_000,
    why: "each connection holds a file descriptor and a task, and the systemd unit allows \
          the process 4096 descriptors",
};
pub const COMMAND_TIMEOUT: Bound<Duration> = Bound {
    min: Duration::from_secs(1),
    max: HOUR,
    why: "RFC 5321 §4.5.3.2.7 asks for 5 minutes; beyond an hour a silent client only holds \
          one of smtp.max_connections",
};
pub const DATA_TIMEOUT: Bound<Duration> = Bound {
    min: Duration::from_secs(1),
    max: HOUR,
    why: "RFC 5321 §4.5.3.2.5 asks for 3 minutes per block; beyond an hour a stalled client \
          only holds one of smtp.max_connections",
};
pub const WRITE_TIMEOUT: Bound<Duration> = Bound {
    min: Duration::from_secs(1),
    max: HOUR,
    why: "a client that reads nothing holds a connection slot for this long (Postfix \
          bounds writes with smtpd_timeout, 300s)",
};
pub const MIN_DATA_RATE: Bound<u64> = Bound {
    min: 1,
    max: 1_000_000_000,
    why: "bytes per second a client must keep up during DATA (Postfix smtpd_min_data_rate, \
          500); above 1 GB/s no client could send",
};
pub const MAX_ERRORS: Bound<u32> = Bound {
    min: 1,
    max: 1000,
    why: "a client that provokes more error replies is not going to succeed",
};
pub const STOP_TIMEOUT: Bound<Duration> = Bound {
    min: Duration::from_secs(1),
    max: Duration::from_secs(600),
    why: "the service manager kills the relay at its own stop timeout (systemd \
          TimeoutStopSec, 30 s in our unit; docker stop, 10 s); a stop that waits longer \
          only delays the restart",
};
pub const MAX_AGE: Bound<Duration> = Bound {
    min: Duration::from_secs(1),
    max: Duration::from_secs(30 * 86_400),
    why: "a message must live for one attempt at least; RFC 5321 §4.5.4.1 suggests 4-5 \
          days, and mail a month old is of no use to its recipient",
};
pub const MIN_FREE_SPACE: Bound<u64> = Bound {
    min: 0,
    max: i64::MAX as u64,
    why: "no filesystem is larger than 8 EiB (the most XFS supports), so more would refuse \
          all mail",
};
pub const LEASE: Bound<Duration> = Bound {
    min: Duration::from_secs(5),
    max: HOUR,
    why: "a claim is renewed at a third of its lease, so a shorter one risks a second \
          relay taking a message still being sent; a longer one strands the mail of a \
          relay that died for that long",
};
pub const PORT: Bound<u16> = Bound {
    min: 1,
    max: u16::MAX,
    why: "a TCP port",
};
pub const CONNECTIONS: Bound<usize> = Bound {
    min: 1,
    max: 3,
    why: "Exchange Online allows 3 concurrent SMTP connections per mailbox and answers more \
          with 432 4.3.2",
};
/// `upstream.connections` with `transport = "graph"`: requests in flight per mailbox.
pub const GRAPH_CONNECTIONS: Bound<usize> = Bound {
    min: 1,
    max: 4,
    why: "Microsoft Graph allows 4 concurrent requests per app and mailbox and answers more \
          with 429 ApplicationThrottled",
};
/// `upstream.rate`: at most 1000 messages a second (the pacer's timers count milliseconds).
pub const RATE_MIN_SPACING: Duration = Duration::from_millis(1);
pub const REFRESH_BEFORE: Bound<Duration> = Bound {
    min: MINUTE,
    max: HOUR,
    why: "a session needs the token to outlive its AUTH; Entra tokens live 60-90 minutes and \
          are refreshed at half their lifetime at the latest",
};
