//! The shared budget seam: one mailbox budget across every relay that shares a store.
//!
//! Each relay paces a mailbox with its own [`crate::deliver::pacer::Pacer`]. With one host that
//! is the whole budget, so the file spool has no shared budget. Relays sharing a PostgreSQL
//! queue would together send N times the rate and open N times the sessions, so that store
//! hands out a [`SharedBudget`]: before an attempt starts (after the local pacer allowed it)
//! the deliverer asks it for a [`Grant`], which is a session slot held until the attempt ends
//! plus one attempt start taken from the mailbox's token bucket. A mailbox one relay holds
//! (535 5.7.139, SendAs denied, ...) is held for all: the hold is recorded here, announced as
//! [`StoreEvent::HoldsChanged`](super::StoreEvent::HoldsChanged), and cleared by the relay
//! whose probe got through.
//!
//! A mailbox Exchange throttles (`432 4.3.2`, `421`) or Graph asks to wait (`Retry-After`) is
//! paused for all: the relay that heard it records the pause with [`SharedBudget::pause`]
//! before it gives its session slot back, and until the pause ends every relay's
//! [`SharedBudget::acquire`] for that mailbox answers [`Grant::Paused`]. The caller bounds the
//! pause (the pacer's `MAX_THROTTLE_PAUSE`, `MAX_RETRY_AFTER_PAUSE`); a later, shorter pause
//! never cuts an earlier, longer one short.

use std::time::{Duration, SystemTime};

use super::{StoreError, StoreFuture};

/// A mailbox's limits as this relay is configured (every replica should agree).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetLimits {
    /// At most this many attempts at once across relays (`upstream.connections`).
    pub connections: usize,
    /// Attempt starts per second across relays (`upstream.rate`).
    pub per_second: f64,
}

/// A session slot held by one attempt, with the attempt start it came with.
///
/// [`release`](BudgetSlot::release) gives it back and returns once the slot is free for the
/// next attempt (so this relay's next start finds it free instead of waiting for a refusal to
/// expire); an attempt that never used its start (its claim found the message gone, taken by
/// another relay) gives the start back too, so a lost race costs no part of the mailbox's rate.
/// Dropping it without `release` (a cancelled task) gives the slot back in the background.
pub struct BudgetSlot(Option<Box<dyn HeldSlot>>);

/// A store's side of a held [`BudgetSlot`]. Its own `Drop` gives the slot back in the
/// background when [`release`](HeldSlot::release) was never called.
pub trait HeldSlot: Send + Sync {
    /// Frees the slot now; with `start_unused`, also returns the start to the mailbox's bucket.
    /// Best effort: a slot that cannot be freed is freed by its lease.
    fn release(self: Box<Self>, start_unused: bool) -> StoreFuture<'static, ()>;
}

impl BudgetSlot {
    pub fn new(held: impl HeldSlot + 'static) -> BudgetSlot {
        BudgetSlot(Some(Box::new(held)))
    }

    /// Gives the slot back (and, with `start_unused`, the start) before the caller goes on.
    pub async fn release(mut self, start_unused: bool) {
        if let Some(held) = self.0.take() {
            held.release(start_unused).await;
        }
    }
}

impl std::fmt::Debug for BudgetSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BudgetSlot")
    }
}

/// The answer to [`SharedBudget::acquire`].
#[derive(Debug)]
pub enum Grant {
    /// Start the attempt now; hold the slot until it ends.
    Start(BudgetSlot),
    /// Every session slot is in use elsewhere, or the bucket is empty: ask again after this
    /// long.
    Wait(Duration),
    /// A relay recorded a pause of the mailbox ([`SharedBudget::pause`]): it ends this long
    /// from now (or later, if the pause outlasts the longest wait a refusal names). Nothing
    /// starts before.
    Paused(Duration),
}

/// A mailbox held by one relay, as every relay sharing the store sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedHold {
    pub lane: String,
    /// The hold cause's name (as the deliverer serialises it).
    pub cause: String,
    /// The reply that caused it.
    pub reply: String,
    pub since: SystemTime,
}

/// Rate, sessions and hold of each mailbox, shared by the relays of one store.
pub trait SharedBudget: Send + Sync + 'static {
    /// Records that `hold.lane` is held (the first hold stays) and tells the other relays.
    fn hold<'a>(&'a self, hold: &'a SharedHold) -> StoreFuture<'a, Result<(), StoreError>>;

    /// Clears `lane`'s hold for every relay.
    fn resume<'a>(&'a self, lane: &'a str) -> StoreFuture<'a, Result<(), StoreError>>;

    /// Every mailbox held now.
    fn holds(&self) -> StoreFuture<'_, Result<Vec<SharedHold>, StoreError>>;

    /// Pauses `lane` for every relay: no attempt starts for `pause` from now (the database
    /// clock). An existing pause that ends later stays.
    fn pause<'a>(
        &'a self,
        lane: &'a str,
        pause: Duration,
    ) -> StoreFuture<'a, Result<(), StoreError>>;

    /// Whether message `id` is free for this relay to claim now: not claimed under another
    /// relay's live lease. A look, not a claim (the claim still decides): the deliverer asks it
    /// before [`acquire`](Self::acquire), so a relay that would lose the claim race holds no
    /// session slot for it. Relays deliver the same queue in the same order; without this the
    /// slower one spends its slots on the messages the other has just claimed.
    fn claimable<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<bool, StoreError>>;

    /// One attempt start for the mailbox lane `lane` (route and mailbox) with a session slot.
    /// Never waits for the budget itself: a refusal says when to ask again.
    fn acquire<'a>(
        &'a self,
        lane: &'a str,
        limits: BudgetLimits,
    ) -> StoreFuture<'a, Result<Grant, StoreError>>;
}
