//! Lanes: one per (route, mailbox). Each has its own schedule, pacer (≤ N sessions, rate, hold)
//! and status, so that a held or throttled mailbox never slows another. Which lane a message is
//! in, and what a lane delivers with, the deliverer asks its [`Upstreams`].

use std::sync::Arc;

use super::DeliverySettings;
use crate::store::Routing;
use crate::transport::Transport;

/// A mailbox of a route.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LaneKey {
    pub route: String,
    /// Empty for the lane that keeps the messages of a route that cannot send (see
    /// [`Unroutable`]).
    pub mailbox: String,
}

impl LaneKey {
    /// The lane's key in a shared budget: the same on every relay with the same routes (a
    /// route name has no `:`; mailboxes compare without case).
    pub fn budget_name(&self) -> String {
        format!("{}:{}", self.route, self.mailbox.to_ascii_lowercase())
    }

    /// How the lane is named in the store's published statuses (`queue list`): the mailbox
    /// alone for the default route, as before routes existed.
    pub fn status_name(&self) -> String {
        match (self.route.as_str(), self.mailbox.as_str()) {
            (crate::routes::DEFAULT_ROUTE, m) if !m.is_empty() => m.to_string(),
            (r, "") => format!("route {r}"),
            (r, m) => format!("{m} (route {r})"),
        }
    }
}

/// Why the messages of a route cannot be sent: they wait, held, in the route's stuck lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unroutable {
    pub route: String,
    pub reason: String,
}

/// What one lane delivers with.
pub struct LaneParts {
    pub settings: DeliverySettings,
    pub transport: Arc<dyn Transport>,
}

/// The routes as the deliverer needs them (the daemon builds them from the configuration; a
/// reload hands the deliverer new ones).
pub trait Upstreams: Send + Sync + 'static {
    /// The lane a message belongs to.
    fn lane_of(&self, routing: &Routing) -> Result<LaneKey, Unroutable>;
    /// The settings and transport of a lane; asked when the lane is first needed and again
    /// after a reload. An error keeps the lane's messages held with that reason.
    fn open(&self, lane: &LaneKey) -> Result<LaneParts, String>;
    /// Every transport opened, each once (closed at stop).
    fn transports(&self) -> Vec<Arc<dyn Transport>>;
}

/// One mailbox, one transport: the relay before routes (and the tests that drive the deliverer
/// with a scripted transport). Messages of any other route are kept, never sent with it.
pub struct FixedUpstream {
    settings: DeliverySettings,
    transport: Arc<dyn Transport>,
}

impl FixedUpstream {
    pub fn new(settings: DeliverySettings, transport: Arc<dyn Transport>) -> FixedUpstream {
        FixedUpstream {
            settings,
            transport,
        }
    }
}

impl Upstreams for FixedUpstream {
    fn lane_of(&self, routing: &Routing) -> Result<LaneKey, Unroutable> {
        if routing.route == crate::routes::DEFAULT_ROUTE {
            Ok(LaneKey {
                route: routing.route.clone(),
                mailbox: self.settings.mailbox.clone(),
            })
        } else {
            Err(Unroutable {
                route: routing.route.clone(),
                reason: format!("route {} is not configured", routing.route),
            })
        }
    }

    fn open(&self, _lane: &LaneKey) -> Result<LaneParts, String> {
        Ok(LaneParts {
            settings: self.settings.clone(),
            transport: self.transport.clone(),
        })
    }

    fn transports(&self) -> Vec<Arc<dyn Transport>> {
        vec![self.transport.clone()]
    }
}
