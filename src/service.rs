//! Talking to the service manager (systemd `Type=notify`).
//!
//! Every function here is a no-op when `$NOTIFY_SOCKET` is unset (a terminal, a container), so
//! the daemon calls them unconditionally. Messages (sd_notify(3)):
//! - `READY=1` once spool recovery is done and every listener is bound ([`ready`]);
//! - `RELOADING=1` … `READY=1` around a SIGHUP reload ([`reloading`], [`reloaded`]);
//! - `STOPPING=1` when shutdown starts ([`stopping`]);
//! - `WATCHDOG=1` every half `WatchdogSec=` ([`watchdog_interval`], [`watchdog_ping`]), sent by
//!   the task that runs the SMTP server, so a wedged server stops feeding it;
//! - `STATUS=…` a one-line summary shown by `systemctl status` ([`status`]).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config};

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STOPPING=1`: systemd now waits up to `TimeoutStopSec=` for the process to exit.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// `RELOADING=1` (with the monotonic timestamp newer systemd versions want).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// `READY=1` after a reload, whether it was applied or refused (the old config keeps serving).
pub fn reloaded(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STATUS=…` only.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// How often to send `WATCHDOG=1`: half of `WatchdogSec=`, or `None` when the watchdog is off.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

/// `WATCHDOG=1`.
pub fn watchdog_ping() {
    send(&[NotifyState::Watchdog]);
}

/// Feeds the watchdog forever at `interval`. Meant to be raced (`select!`) against the future
/// whose liveness it vouches for: when that future ends or hangs its task, pings stop.
pub async fn feed_watchdog(interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        watchdog_ping();
    }
}

type LogReloader = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static LOG_RELOADER: OnceLock<LogReloader> = OnceLock::new();

/// Registers how to change the log filter at runtime (`main` does this when it sets up
/// tracing with a reload layer). Only the first registration counts.
pub fn set_log_reloader(f: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static) {
    let _ = LOG_RELOADER.set(Box::new(f));
}

/// Applies a new `log.level` filter. `Ok(false)` when no reloader is registered (tests,
/// embedders), so the caller can say the change needs a restart.
pub fn reload_log_level(level: &str) -> Result<bool, String> {
    match LOG_RELOADER.get() {
        Some(f) => f(level).map(|()| true),
        None => Ok(false),
    }
}

// ---------------------------------------------------------------------------------------------
// SIGHUP reload

/// Keys the running process cannot change without a restart: the listeners and their limits
/// (fixed in the inbound server at start), the spool location and queue backend, the admin address, the log
/// format and the stop budget (shared by the running parts since start), and
/// `upstream.graph_large_messages` (it sets the listener's size limit too, which is fixed at
/// start). A reload keeps their running values in the published config and says so.
pub const RESTART_ONLY: &[&str] = &[
    "smtp.*",
    "upstream.graph_large_messages",
    "queue.dir",
    "queue.min_free_space",
    "queue.backend",
    "queue.url",
    "queue.url_file",
    "queue.ca_file",
    "queue.lease",
    "admin.*",
    "log.format",
    "service.*",
];

/// Keys a running deliverer takes at a reload ([`LiveParts::apply_delivery`]): the credential
/// and endpoints (a new token is requested at once), the upstream (new sessions), the retry
/// timing and the queue's age limit and notices (the next attempts and deferrals).
pub const DELIVERY: &[&str] = &[
    "upstream.*",
    "oauth.*",
    "route",
    "queue.retry_min",
    "queue.retry_max",
    "queue.max_age",
    "queue.notify",
];

fn matches_any(patterns: &[&str], key: &str) -> bool {
    patterns
        .iter()
        .any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => key.starts_with(prefix),
            None => key == *pattern,
        })
}

/// `section.key` names whose values differ between `old` and `new`. Secrets compare by value
/// but are only ever named, never printed.
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let (Ok(a), Ok(b)) = (serde_json::to_value(old), serde_json::to_value(new)) else {
        return vec!["(unknown)".into()];
    };
    let mut keys = Vec::new();
    if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
        for (section, av) in a {
            let bv = b.get(section).cloned().unwrap_or_default();
            match (av.as_object(), bv.as_object()) {
                (Some(ao), Some(bo)) => {
                    let mut names: Vec<&String> = ao.keys().chain(bo.keys()).collect();
                    names.sort();
                    names.dedup();
                    for name in names {
                        if ao.get(name) != bo.get(name) {
                            keys.push(format!("{section}.{name}"));
                        }
                    }
                }
                _ if *av != bv => keys.push(section.clone()),
                _ => {}
            }
        }
        // A section only the new one has (`route` is left out while empty).
        for section in b.keys().filter(|k| !a.contains_key(*k)) {
            keys.push(section.clone());
        }
    }
    // Route secrets print redacted: compare the values themselves.
    let route_secrets = |c: &Config| -> Vec<Option<String>> {
        c.routes
            .iter()
            .map(|r| {
                r.config
                    .oauth
                    .client_secret
                    .as_ref()
                    .map(|s| s.expose().to_owned())
            })
            .collect()
    };
    if route_secrets(old) != route_secrets(new) && !keys.iter().any(|k| k == "route") {
        keys.push("route".into());
    }
    let secret = |c: &Config| {
        c.oauth
            .client_secret
            .as_ref()
            .map(|s| s.expose().to_owned())
    };
    if secret(old) != secret(new) && !keys.iter().any(|k| k == "oauth.client_secret") {
        keys.push("oauth.client_secret".into());
    }
    keys
}

/// What a reload did, for the log and `STATUS=`. Every changed key is in exactly one list.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// Changed keys now in effect for new work.
    pub applied: Vec<String>,
    /// Changed keys that keep their running value until the next restart.
    pub needs_restart: Vec<String>,
    /// Changed keys that could have been applied but were not (see `error`); their running
    /// values stay.
    pub not_applied: Vec<String>,
    /// Why `not_applied` keys were not applied.
    pub error: Option<String>,
}

/// The parts of a running relay a reload changes. `serve` implements it over its deliverer,
/// transport and token refresher.
pub trait LiveParts: Send + Sync + 'static {
    /// Makes a freshly loaded config comparable with the running one (`serve --simulate`
    /// points it at its simulator again).
    fn prepare(&self, _config: &mut Config) {}

    /// True when a deliverer runs, so that the [`DELIVERY`] keys can be applied to it.
    fn delivering(&self) -> bool;

    /// Applies the [`DELIVERY`] keys of `new` (`changed` names those that changed): new
    /// tokens with the new credential at once, new upstream sessions with the new settings,
    /// the new retry timing for the next deferrals. On error nothing was changed.
    fn apply_delivery(&self, new: &Config, changed: &[String]) -> Result<(), String>;

    /// Applies `log.level`: `Ok(false)` when the process cannot change it (see
    /// [`reload_log_level`]).
    fn reload_log_level(&self, level: &str) -> Result<bool, String> {
        reload_log_level(level)
    }
}

/// Nothing to apply beyond the log level: no deliverer runs.
pub struct NoLiveParts;

impl LiveParts for NoLiveParts {
    fn delivering(&self) -> bool {
        false
    }

    fn apply_delivery(&self, _new: &Config, _changed: &[String]) -> Result<(), String> {
        Err("no deliverer is running".into())
    }
}

/// Merges a freshly loaded, valid `new` config into the running one and applies it to `live`.
/// A changed key is applied only if something running takes it now; restart-only keys, keys
/// nothing running reads, and keys whose application failed keep their running values in the
/// returned config (the one to publish), so that the next reload compares against what is in
/// effect.
pub fn merge_reload(
    running: &Config,
    mut new: Config,
    live: &dyn LiveParts,
) -> (Config, ReloadOutcome) {
    let mut outcome = ReloadOutcome::default();
    let mut delivery = Vec::new();
    let mut log_level_kept = false;
    for key in changed_keys(running, &new) {
        if key == "log.level" {
            match live.reload_log_level(&new.log.level) {
                Ok(true) => outcome.applied.push(key),
                Ok(false) => {
                    log_level_kept = true;
                    outcome.needs_restart.push(key);
                }
                Err(e) => {
                    log_level_kept = true;
                    outcome.error = Some(format!("log.level: {e}"));
                    outcome.not_applied.push(key);
                }
            }
        } else if key.starts_with("sendmail.") && key != "sendmail.drop_dir" {
            // Read by every sendmail run, never by the relay: in effect for the next one.
            outcome.applied.push(key);
        } else if matches_any(RESTART_ONLY, &key) {
            outcome.needs_restart.push(key);
        } else if matches_any(DELIVERY, &key) {
            delivery.push(key);
        } else {
            // Nothing running reads it after start.
            outcome.needs_restart.push(key);
        }
    }
    // The listener's limit follows it; the transport must not change alone.
    new.upstream.graph_large_messages = running.upstream.graph_large_messages;
    let mut keep_delivery = false;
    if !delivery.is_empty() {
        let configured = new
            .route_table()
            .iter()
            .any(|r| r.config.oauth.is_configured());
        if !live.delivering() || !configured {
            // Delivery starts (or stops) only at start.
            keep_delivery = true;
            outcome.needs_restart.append(&mut delivery);
        } else {
            match live.apply_delivery(&new, &delivery) {
                Ok(()) => outcome.applied.append(&mut delivery),
                Err(e) => {
                    keep_delivery = true;
                    outcome.error = Some(e);
                    outcome.not_applied.append(&mut delivery);
                }
            }
        }
    }
    if keep_delivery {
        new.upstream = running.upstream.clone();
        new.oauth = running.oauth.clone();
        new.route = running.route.clone();
        new.routes = running.routes.clone();
        new.queue.retry_min = running.queue.retry_min;
        new.queue.retry_max = running.queue.retry_max;
        new.queue.max_age = running.queue.max_age;
        new.queue.notify = running.queue.notify.clone();
    }
    if log_level_kept {
        new.log.level = running.log.level.clone();
    }
    new.smtp = running.smtp.clone();
    new.queue.dir = running.queue.dir.clone();
    new.queue.backend = running.queue.backend;
    new.queue.url = running.queue.url.clone();
    new.queue.url_file = running.queue.url_file.clone();
    new.queue.ca_file = running.queue.ca_file.clone();
    new.queue.lease = running.queue.lease;
    new.queue.min_free_space = running.queue.min_free_space;
    new.admin = running.admin.clone();
    new.log.format = running.log.format;
    new.service = running.service.clone();
    new.sendmail.drop_dir = running.sendmail.drop_dir.clone();
    for list in [
        &mut outcome.applied,
        &mut outcome.needs_restart,
        &mut outcome.not_applied,
    ] {
        list.sort();
    }
    (new, outcome)
}

/// Installs the SIGHUP handler (do this before `READY=1`: SIGHUP's default action kills the
/// process) and returns the task body that reloads on each signal until `shutdown`.
///
/// Each SIGHUP re-runs [`config::load`] with `config_path` (the `--config` given at start, or
/// the usual lookup), which re-reads secret files and `$CREDENTIALS_DIRECTORY`. An invalid
/// config is refused with an error log line and the running one stays; a valid one is applied
/// to `live` and merged by [`merge_reload`], published on `config`, and logged with what was
/// applied, what needs a restart and what could not be applied.
pub fn reload_on_sighup(
    config_path: Option<PathBuf>,
    config: watch::Sender<Arc<Config>>,
    live: Arc<dyn LiveParts>,
    shutdown: CancellationToken,
) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    Ok(async move {
        loop {
            tokio::select! {
                received = hup.recv() => if received.is_none() { return },
                _ = shutdown.cancelled() => return,
            }
            reloading();
            let path = config_path.clone();
            let loaded = tokio::task::spawn_blocking(move || config::load(path.as_deref()))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| one_line(&e.to_string())));
            match loaded {
                Ok(mut new) => {
                    live.prepare(&mut new);
                    let running = config.borrow().clone();
                    let (merged, outcome) = merge_reload(&running, new, &*live);
                    config.send_replace(Arc::new(merged));
                    log_outcome(&outcome);
                    reloaded(if outcome.not_applied.is_empty() {
                        "configuration reloaded"
                    } else {
                        "configuration reloaded in part (see the log)"
                    });
                }
                Err(e) => {
                    tracing::error!(
                        error = %e,
                        "SIGHUP: new configuration refused; the running configuration stays in effect"
                    );
                    reloaded("reload refused: invalid configuration (see the log)");
                }
            }
        }
    })
}

fn log_outcome(outcome: &ReloadOutcome) {
    let ReloadOutcome {
        applied,
        needs_restart,
        not_applied,
        error,
    } = outcome;
    if applied.is_empty() && needs_restart.is_empty() && not_applied.is_empty() {
        tracing::info!("SIGHUP: configuration reloaded, nothing changed");
        return;
    }
    tracing::info!(
        applied = %applied.join(", "),
        needs_restart = %needs_restart.join(", "),
        not_applied = %not_applied.join(", "),
        "SIGHUP: configuration reloaded"
    );
    if !not_applied.is_empty() {
        tracing::error!(
            keys = %not_applied.join(", "),
            error = %error.as_deref().unwrap_or("unknown"),
            "SIGHUP: these changes could not be applied; their running values stay in effect"
        );
    }
    if !needs_restart.is_empty() {
        tracing::warn!(
            keys = %needs_restart.join(", "),
            "these changes take effect at the next restart"
        );
    }
}

/// A multi-line error (one config issue per line) as one log line.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        Config::from_toml_str(text).expect("valid")
    }

    #[test]
    fn diff_names_changed_keys_and_hides_secrets() {
        let a = cfg(
            "[oauth]\ntenant_id = \"t.example\"\nclient_id = \"0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10\"\nclient_secret = \"one\"\n[upstream]\nmail_account = \"a@b.example\"\n",
        );
        let b = cfg(
            "[oauth]\ntenant_id = \"t.example\"\nclient_id = \"0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10\"\nclient_secret = \"two\"\n[upstream]\nmail_account = \"a@b.example\"\n[log]\nlevel = \"debug\"\n",
        );
        let keys = changed_keys(&a, &b);
        assert_eq!(keys, vec!["log.level", "oauth.client_secret"]);
        assert!(changed_keys(&a, &a.clone()).is_empty());
    }

    /// A deliverer that records what it was asked to apply, and fails when told to.
    struct FakeLive {
        delivering: bool,
        fail: bool,
        applied: std::sync::Mutex<Vec<String>>,
    }

    impl LiveParts for FakeLive {
        fn delivering(&self) -> bool {
            self.delivering
        }
        fn apply_delivery(&self, _new: &Config, changed: &[String]) -> Result<(), String> {
            if self.fail {
                return Err("cannot build the token client".into());
            }
            self.applied.lock().unwrap().extend(changed.iter().cloned());
            Ok(())
        }
        fn reload_log_level(&self, _level: &str) -> Result<bool, String> {
            Ok(true)
        }
    }

    fn live(delivering: bool, fail: bool) -> FakeLive {
        FakeLive {
            delivering,
            fail,
            applied: Default::default(),
        }
    }

    const OAUTH: &str = "[oauth]\ntenant_id = \"t.example\"\nclient_id = \"0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10\"\nclient_secret = \"one\"\n[upstream]\nmail_account = \"a@b.example\"\n";

    #[test]
    fn restart_only_keys_keep_running_values() {
        let running = cfg(&format!(
            "[smtp]\nmax_recipients = 200\n[admin]\nlisten = \"127.0.0.1:9925\"\n{OAUTH}"
        ));
        let new = cfg(&format!(
            "[smtp]\nmax_recipients = 300\n[log]\nlevel = \"warn\"\n[queue]\nretry_min = \"2m\"\n{}",
            OAUTH.replace("\"one\"", "\"two\"")
        ));
        let deliverer = live(true, false);
        let (merged, outcome) = merge_reload(&running, new, &deliverer);
        assert_eq!(
            outcome.applied,
            vec!["log.level", "oauth.client_secret", "queue.retry_min"]
        );
        assert_eq!(
            outcome.needs_restart,
            vec!["admin.listen", "smtp.max_recipients"]
        );
        assert!(outcome.not_applied.is_empty());
        let mut asked = deliverer.applied.lock().unwrap().clone();
        asked.sort();
        assert_eq!(asked, vec!["oauth.client_secret", "queue.retry_min"]);
        assert_eq!(merged.smtp.max_recipients, 200);
        assert_eq!(merged.admin.listen, running.admin.listen);
        assert_eq!(merged.log.level, "warn");
        assert_eq!(merged.queue.retry_min, std::time::Duration::from_secs(120));
    }

    #[test]
    fn graph_large_messages_waits_for_a_restart_with_the_listener_limit() {
        let graph = OAUTH.replace("[upstream]\n", "[upstream]\ntransport = \"graph\"\n");
        let running = cfg(&graph);
        let new = cfg(&graph.replace(
            "[upstream]\n",
            "[upstream]\ngraph_large_messages = true\nrate = \"10/min\"\n",
        ));
        let deliverer = live(true, false);
        let (merged, outcome) = merge_reload(&running, new, &deliverer);
        assert_eq!(outcome.needs_restart, vec!["upstream.graph_large_messages"]);
        assert_eq!(outcome.applied, vec!["upstream.rate"]);
        assert!(!merged.upstream.graph_large_messages);
        assert_eq!(merged.upstream.rate.messages, 10);
    }

    #[test]
    fn sendmail_names_apply_at_once_the_drop_directory_at_restart() {
        let running = cfg("");
        let new =
            cfg("[sendmail]\ndefault_domain = \"example.com\"\ndrop_dir = \"/var/spool/x\"\n");
        let (merged, outcome) = merge_reload(&running, new, &NoLiveParts);
        assert_eq!(outcome.applied, vec!["sendmail.default_domain"]);
        assert_eq!(outcome.needs_restart, vec!["sendmail.drop_dir"]);
        assert_eq!(merged.sendmail.drop_dir, None);
    }

    #[test]
    fn delivery_keys_are_applied_only_to_a_running_deliverer_that_takes_them() {
        let running = cfg(OAUTH);
        let new = || cfg(&format!("[queue]\nretry_max = \"2h\"\n{OAUTH}"));
        // No deliverer (none was started): the change waits for a restart.
        let (merged, outcome) = merge_reload(&running, new(), &NoLiveParts);
        assert_eq!(outcome.needs_restart, vec!["queue.retry_max"]);
        assert!(outcome.applied.is_empty());
        assert_eq!(merged.queue.retry_max, running.queue.retry_max);
        // The deliverer refuses it: not applied, the running value stays, the reason is kept.
        let (merged, outcome) = merge_reload(&running, new(), &live(true, true));
        assert_eq!(outcome.not_applied, vec!["queue.retry_max"]);
        assert!(outcome.error.as_deref().unwrap().contains("token client"));
        assert_eq!(merged.queue.retry_max, running.queue.retry_max);
        // Taking [oauth] away cannot stop a running deliverer: restart.
        let (_, outcome) = merge_reload(&running, cfg(""), &live(true, false));
        assert!(outcome.applied.is_empty(), "{outcome:?}");
        assert!(
            outcome
                .needs_restart
                .contains(&"oauth.client_id".to_string())
        );
    }
}
