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
/// (fixed in the inbound server at start), the spool location, the admin address and the log
/// format. A reload keeps their running values in the published config and says so.
pub const RESTART_ONLY: &[&str] = &[
    "smtp.*",
    "queue.dir",
    "queue.min_free_space",
    "admin.*",
    "log.format",
];

fn restart_only(key: &str) -> bool {
    RESTART_ONLY
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

/// What a reload did, for the log and `STATUS=`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// Changed keys now in effect (published to subscribers; `log.level` applied).
    pub applied: Vec<String>,
    /// Changed keys that keep their running value until the next restart.
    pub needs_restart: Vec<String>,
}

/// Merges a freshly loaded, valid `new` config into the running one: restart-only keys keep
/// their running values, everything else is taken from `new`. Returns the config to publish.
pub fn merge_reload(running: &Config, mut new: Config) -> (Config, ReloadOutcome) {
    let mut outcome = ReloadOutcome::default();
    for key in changed_keys(running, &new) {
        if restart_only(&key) {
            outcome.needs_restart.push(key);
        } else {
            outcome.applied.push(key);
        }
    }
    new.smtp = running.smtp.clone();
    new.queue.dir = running.queue.dir.clone();
    new.queue.min_free_space = running.queue.min_free_space;
    new.admin = running.admin.clone();
    new.log.format = running.log.format;
    (new, outcome)
}

/// Installs the SIGHUP handler (do this before `READY=1`: SIGHUP's default action kills the
/// process) and returns the task body that reloads on each signal until `shutdown`.
///
/// Each SIGHUP re-runs [`config::load`] with `config_path` (the `--config` given at start, or
/// the usual lookup), which re-reads secret files and `$CREDENTIALS_DIRECTORY`. An invalid
/// config is refused with an error log line and the running one stays; a valid one is merged
/// by [`merge_reload`] and published on `config`.
pub fn reload_on_sighup(
    config_path: Option<PathBuf>,
    config: watch::Sender<Arc<Config>>,
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
                Ok(new) => {
                    let running = config.borrow().clone();
                    let (merged, outcome) = merge_reload(&running, new);
                    let mut applied = outcome.applied.clone();
                    if applied.iter().any(|k| k == "log.level") {
                        match reload_log_level(&merged.log.level) {
                            Ok(true) => {}
                            Ok(false) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "log.level not applied");
                                applied.retain(|k| k != "log.level");
                            }
                        }
                    }
                    config.send_replace(Arc::new(merged));
                    if applied.is_empty() && outcome.needs_restart.is_empty() {
                        tracing::info!("SIGHUP: configuration reloaded, nothing changed");
                    } else {
                        tracing::info!(
                            applied = %applied.join(", "),
                            needs_restart = %outcome.needs_restart.join(", "),
                            "SIGHUP: configuration reloaded"
                        );
                    }
                    if !outcome.needs_restart.is_empty() {
                        tracing::warn!(
                            keys = %outcome.needs_restart.join(", "),
                            "these changes take effect at the next restart"
                        );
                    }
                    reloaded("configuration reloaded");
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

    #[test]
    fn restart_only_keys_keep_running_values() {
        let running = cfg("[smtp]\nmax_recipients = 200\n[admin]\nlisten = \"127.0.0.1:9925\"\n");
        let new = cfg(
            "[smtp]\nmax_recipients = 300\n[log]\nlevel = \"warn\"\n[queue]\nretry_min = \"2m\"\n",
        );
        let (merged, outcome) = merge_reload(&running, new);
        assert_eq!(outcome.applied, vec!["log.level", "queue.retry_min"]);
        assert_eq!(
            outcome.needs_restart,
            vec!["admin.listen", "smtp.max_recipients"]
        );
        assert_eq!(merged.smtp.max_recipients, 200);
        assert_eq!(merged.admin.listen, running.admin.listen);
        assert_eq!(merged.log.level, "warn");
        assert_eq!(merged.queue.retry_min, std::time::Duration::from_secs(120));
    }
}
