//! The long-running tasks of `serve`, watched by name.
//!
//! A relay whose dispatcher (or refresher, admin server, listener, reloader) died may still
//! answer `250` and never deliver: that must not persist. A task that panics, or ends before
//! shutdown was asked for, is logged at error with its name, shown in `/healthz` (`tasks`),
//! and makes `serve` stop with [`TaskDeath`] (exit 1), so that the service manager restarts the
//! relay.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::task::{JoinError, JoinHandle, JoinSet};

/// Each watched task's state for `/healthz`: `running`, `stopped`, or `died: <reason>`.
#[derive(Debug, Clone, Default)]
pub struct TaskHealth(Arc<Mutex<BTreeMap<&'static str, String>>>);

impl TaskHealth {
    fn set(&self, task: &'static str, state: impl Into<String>) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(task, state.into());
    }

    /// `{"dispatcher": "running", ...}`.
    pub fn to_json(&self) -> serde_json::Value {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::Value::Object(
            map.iter()
                .map(|(k, v)| ((*k).to_string(), serde_json::Value::String(v.clone())))
                .collect(),
        )
    }

    /// True while no watched task has died.
    pub fn all_alive(&self) -> bool {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        !map.values().any(|v| v.starts_with("died"))
    }
}

/// A watched task that panicked, or ended while the relay was not stopping.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task {task} died: {reason}")]
pub struct TaskDeath {
    pub task: &'static str,
    pub reason: String,
}

/// Watches tasks spawned elsewhere (their `JoinHandle`s) and reports the first to end.
#[derive(Default)]
pub struct Supervisor {
    watchers: JoinSet<(&'static str, Result<(), JoinError>)>,
    alive: Vec<&'static str>,
    health: TaskHealth,
}

impl Supervisor {
    pub fn new() -> Supervisor {
        Supervisor::default()
    }

    /// The states `/healthz` shows.
    pub fn health(&self) -> TaskHealth {
        self.health.clone()
    }

    /// Watches `handle` under `task`.
    pub fn watch(&mut self, task: &'static str, handle: JoinHandle<()>) {
        self.health.set(task, "running");
        self.alive.push(task);
        self.watchers.spawn(async move { (task, handle.await) });
    }

    /// The tasks that have not ended yet.
    pub fn alive(&self) -> &[&'static str] {
        &self.alive
    }

    /// Waits for the next task to end. `stopping` says whether shutdown has been asked for:
    /// then a task that returns is done, not dead (a panic is a death either way). `None` once
    /// every task has ended.
    pub async fn next(
        &mut self,
        stopping: impl Fn() -> bool,
    ) -> Option<Result<&'static str, TaskDeath>> {
        let (task, result) = match self.watchers.join_next().await? {
            Ok(ended) => ended,
            // The watcher itself only awaits a handle; it is never aborted while we hold it.
            Err(e) => return Some(Err(death("watcher", &e))),
        };
        self.alive.retain(|t| *t != task);
        let outcome = match result {
            Ok(()) if stopping() => Ok(task),
            Ok(()) => Err(TaskDeath {
                task,
                reason: "ended although the relay was not stopping".into(),
            }),
            Err(e) => Err(death(task, &e)),
        };
        match &outcome {
            Ok(task) => self.health.set(task, "stopped"),
            Err(d) => self.health.set(d.task, format!("died: {}", d.reason)),
        }
        Some(outcome)
    }
}

fn death(task: &'static str, e: &JoinError) -> TaskDeath {
    TaskDeath {
        task,
        reason: describe(e),
    }
}

fn describe(e: &JoinError) -> String {
    if e.is_cancelled() {
        return "cancelled".into();
    }
    // The panic hook has printed the full message and location; keep the gist for the log.
    let text = e.to_string();
    text.strip_prefix("task ")
        .and_then(|rest| rest.split_once(' ').map(|(_, r)| r.to_string()))
        .unwrap_or(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_or_an_early_end_is_a_death_and_a_stop_is_not() {
        let mut s = Supervisor::new();
        s.watch("panics", tokio::spawn(async { panic!("boom") }));
        let d = s.next(|| false).await.unwrap().unwrap_err();
        assert_eq!(d.task, "panics");
        assert!(d.reason.contains("panicked"), "{d:?}");
        assert!(!s.health().all_alive());

        s.watch("returns", tokio::spawn(async {}));
        let d = s.next(|| false).await.unwrap().unwrap_err();
        assert_eq!(d.task, "returns");

        s.watch("stops", tokio::spawn(async {}));
        assert_eq!(s.next(|| true).await.unwrap(), Ok("stops"));
        assert_eq!(s.health().to_json()["stops"], "stopped");
        assert!(s.next(|| true).await.is_none());
        assert!(s.alive().is_empty());
    }
}
