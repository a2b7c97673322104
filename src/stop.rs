//! One stop budget (`service.stop_timeout`): from the moment a stop begins, sessions in DATA,
//! delivery attempts in flight and the upstream QUITs all finish by the same deadline, so the
//! relay exits before the service manager's own limit kills it (systemd `TimeoutStopSec`).
//! What is not done by then stays queued (delivery is at-least-once); nothing acknowledged is
//! lost, as the spool has it.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

/// Kept for the upstream QUITs at the end of the budget: the deliverer stops waiting for its
/// attempts this long before the deadline (at most a quarter of the budget).
pub const QUIT_RESERVE: Duration = Duration::from_secs(2);

/// The shared deadline of a stop. Cheap to clone; every clone sees the same deadline.
#[derive(Debug, Clone)]
pub struct StopBudget {
    budget: Duration,
    began: Arc<OnceLock<Instant>>,
}

impl StopBudget {
    pub fn new(budget: Duration) -> StopBudget {
        StopBudget {
            budget,
            began: Arc::new(OnceLock::new()),
        }
    }

    /// The budget of `serve`'s configuration.
    pub fn from_config(config: &crate::config::Config) -> StopBudget {
        StopBudget::new(config.service.stop_timeout)
    }

    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// The deadline; the first call (whoever sees the stop first) starts the clock.
    pub fn deadline(&self) -> Instant {
        *self.began.get_or_init(Instant::now) + self.budget
    }

    /// When the deliverer stops waiting for attempts in flight, leaving time for the QUITs.
    pub fn attempts_deadline(&self) -> Instant {
        self.deadline() - QUIT_RESERVE.min(self.budget / 4)
    }
}

impl Default for StopBudget {
    fn default() -> StopBudget {
        StopBudget::new(crate::config::ServiceConfig::default().stop_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn every_clone_shares_the_deadline_started_by_the_first_look() {
        let budget = StopBudget::new(Duration::from_secs(10));
        let other = budget.clone();
        tokio::time::advance(Duration::from_secs(3)).await;
        let first = other.deadline();
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(budget.deadline(), first, "the clock started once");
        assert_eq!(budget.attempts_deadline(), first - QUIT_RESERVE);
        let short = StopBudget::new(Duration::from_secs(2));
        assert_eq!(
            short.deadline() - short.attempts_deadline(),
            Duration::from_millis(500),
            "a short budget keeps a quarter for the QUITs"
        );
    }
}
