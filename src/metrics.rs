//! Counters and histograms behind `/metrics` (Prometheus text format 0.0.4).
//!
//! Plain atomics shared by the listener and the deliverer through one `Arc<Metrics>`: no global
//! recorder, so tests and several relays in one process stay independent. Gauges (queue depth,
//! oldest message, token expiry) are read at scrape time by the admin endpoint.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Default)]
pub struct Metrics {
    pub accepted: AtomicU64,
    /// Replies of class 4/5 to clients and refused connections, by enhanced status code.
    refused: Mutex<BTreeMap<&'static str, u64>>,
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub held: AtomicU64,
    pub failed: AtomicU64,
    /// Attempts that sent the final dot and got no 250 (no reply, or a 4xx): the retry may
    /// deliver a second copy.
    pub possible_duplicates: AtomicU64,
    /// Admin endpoint connections served, and closed at once because `admin.max_connections`
    /// were open or because the descriptors left are SMTP's.
    pub admin_accepted: AtomicU64,
    pub admin_refused_limit: AtomicU64,
    pub admin_refused_descriptors: AtomicU64,
    /// Connect + STARTTLS + AUTH to Exchange Online.
    pub session_seconds: Histogram,
    /// MAIL .. final reply of one message.
    pub transaction_seconds: Histogram,
}

impl Metrics {
    pub fn refused(&self, status: &'static str) {
        if let Ok(mut map) = self.refused.lock() {
            *map.entry(status).or_default() += 1;
        }
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The text exposition, with the scrape-time gauges appended by the caller.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {value}");
        };
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        counter(
            &mut out,
            "relay_accepted_total",
            "Messages accepted and spooled.",
            load(&self.accepted),
        );
        let _ = writeln!(
            out,
            "# HELP relay_refused_total Client commands or connections refused, by enhanced status code."
        );
        let _ = writeln!(out, "# TYPE relay_refused_total counter");
        if let Ok(map) = self.refused.lock() {
            for (status, n) in map.iter() {
                let _ = writeln!(out, "relay_refused_total{{reason=\"{status}\"}} {n}");
            }
        }
        counter(
            &mut out,
            "relay_delivered_total",
            "Messages delivered to Exchange Online.",
            load(&self.delivered),
        );
        counter(
            &mut out,
            "relay_retried_total",
            "Delivery attempts deferred for a retry.",
            load(&self.retried),
        );
        counter(
            &mut out,
            "relay_held_total",
            "Delivery attempts that held the mailbox.",
            load(&self.held),
        );
        counter(
            &mut out,
            "relay_failed_total",
            "Messages failed for good (kept in failed/).",
            load(&self.failed),
        );
        counter(
            &mut out,
            "relay_possible_duplicates_total",
            "Delivery attempts that sent the whole message but got no 250 (no reply or a 4xx after the final dot): the retry may deliver it twice.",
            load(&self.possible_duplicates),
        );
        let _ = writeln!(
            out,
            "# HELP relay_admin_connections_total Admin endpoint connections: served, or closed at once (limit: admin.max_connections open; descriptors: the rest are kept for SMTP)."
        );
        let _ = writeln!(out, "# TYPE relay_admin_connections_total counter");
        for (result, c) in [
            ("accepted", &self.admin_accepted),
            ("refused_limit", &self.admin_refused_limit),
            ("refused_descriptors", &self.admin_refused_descriptors),
        ] {
            let _ = writeln!(
                out,
                "relay_admin_connections_total{{result=\"{result}\"}} {}",
                load(c)
            );
        }
        let gauge = |out: &mut String, name: &str, help: &str, value: f64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {value}");
        };
        gauge(
            &mut out,
            "relay_queue_depth",
            "Messages in queue/ (not held, not failed).",
            gauges.queue_depth as f64,
        );
        gauge(
            &mut out,
            "relay_queue_oldest_age_seconds",
            "Age of the oldest queued message.",
            gauges.oldest_age_seconds,
        );
        gauge(
            &mut out,
            "relay_token_expiry_seconds",
            "Seconds until the current access token expires (0 without one).",
            gauges.token_seconds_left,
        );
        gauge(
            &mut out,
            "relay_delivery_held",
            "1 while delivery of any mailbox is held for a configuration problem.",
            if gauges.lanes.iter().any(|l| l.held) {
                1.0
            } else {
                0.0
            },
        );
        render_lanes(&mut out, &gauges.lanes);
        if let Some(open) = gauges.open_fds {
            gauge(
                &mut out,
                "process_open_fds",
                "Open file descriptors.",
                open as f64,
            );
        }
        if let Some(max) = gauges.max_fds {
            gauge(
                &mut out,
                "process_max_fds",
                "Maximum number of open file descriptors (RLIMIT_NOFILE).",
                max as f64,
            );
        }
        self.session_seconds.render(
            &mut out,
            "relay_upstream_session_seconds",
            "Time to connect, secure and authenticate to Exchange Online.",
        );
        self.transaction_seconds.render(
            &mut out,
            "relay_upstream_transaction_seconds",
            "Time from MAIL to the final reply of one message.",
        );
        out
    }
}

/// At most this many (route, mailbox) series; the rest of each route is summed under
/// `mailbox="(other)"`, so that a template route with thousands of senders cannot blow up a
/// Prometheus server.
pub const MAX_MAILBOX_SERIES: usize = 100;

/// One (route, mailbox) lane at scrape time.
#[derive(Debug, Default, Clone)]
pub struct LaneGauge {
    pub route: String,
    pub mailbox: String,
    pub held: bool,
    pub queued: usize,
    pub delivered: u64,
}

/// Prometheus label values escape `\`, `"` and newlines.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Name, type, help and value of a per-mailbox series.
type LaneMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&LaneGauge) -> f64,
);

fn render_lanes(out: &mut String, lanes: &[LaneGauge]) {
    let mut series: Vec<LaneGauge> = Vec::new();
    for lane in lanes {
        if series.len() < MAX_MAILBOX_SERIES {
            series.push(lane.clone());
            continue;
        }
        match series
            .iter_mut()
            .find(|s| s.route == lane.route && s.mailbox == "(other)")
        {
            Some(other) => {
                other.held |= lane.held;
                other.queued += lane.queued;
                other.delivered += lane.delivered;
            }
            None => series.push(LaneGauge {
                mailbox: "(other)".into(),
                ..lane.clone()
            }),
        }
    }
    let metrics: [LaneMetric; 3] = [
        (
            "relay_mailbox_held",
            "gauge",
            "1 while this route's mailbox is held (its reason: /healthz).",
            |l| if l.held { 1.0 } else { 0.0 },
        ),
        (
            "relay_mailbox_queued",
            "gauge",
            "Messages waiting for this route's mailbox (or in flight).",
            |l| l.queued as f64,
        ),
        (
            "relay_mailbox_delivered_total",
            "counter",
            "Messages delivered through this route's mailbox since start.",
            |l| l.delivered as f64,
        ),
    ];
    for (name, kind, help, value) in metrics {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for l in &series {
            let _ = writeln!(
                out,
                "{name}{{route=\"{}\",mailbox=\"{}\"}} {}",
                label(&l.route),
                label(&l.mailbox),
                value(l)
            );
        }
    }
}

/// Values read at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Gauges {
    pub queue_depth: usize,
    pub oldest_age_seconds: f64,
    pub token_seconds_left: f64,
    /// Every (route, mailbox) lane.
    pub lanes: Vec<LaneGauge>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

/// Upper bounds in seconds: loopback sessions take milliseconds, Exchange hundreds of them.
const BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket, plus one for +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let slot = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(300));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.5\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }
}
