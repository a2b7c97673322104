//! The shared budget on PostgreSQL (reference next-capabilities.md §3.6).
//!
//! - `relay_budget`: a token bucket per lane (`route` and mailbox). One `UPDATE … RETURNING`
//!   refills it from the database clock (replica clocks may disagree) and takes a token only
//!   when one is there, so grants are exact whatever the number of takers. Its burst is one:
//!   attempt starts are spaced evenly, as the local pacer spaces them.
//! - `relay_session_slot`: rows `(lane, 1..=connections)`; an attempt holds one with a lease
//!   renewed every third of `queue.lease`, so a relay that dies gives its slots back when the
//!   lease runs out.
//!
//! - `relay_hold`: the lanes held, with the first cause, reply and time; a change is
//!   `NOTIFY`ed (`h`), so the other relays read the holds again at once.
//! - `relay_budget.paused_until` (schema step 3): a mailbox-wide pause (432 4.3.2, 421,
//!   `Retry-After`) set from the database clock by the relay that heard it; until then no
//!   token is taken and every relay is answered [`Grant::Paused`] with the time left. It is a
//!   time of its own, not a debt of tokens (`tokens = 1 - pause × rate`), because each relay
//!   refills with the rate it is configured with: after a reload, or with replicas that
//!   disagree, a debt would end the pause early or late, and late is past what the pacer
//!   allows. The bucket refills during the pause as usual, so one start may follow at once.
//!
//! A slot is taken first, then a token; without a token the slot is given back at once.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::{Inner, PgError, PgStore, col, db};
use crate::store::budget::{BudgetLimits, BudgetSlot, Grant, HeldSlot, SharedBudget, SharedHold};
use crate::store::{StoreError, StoreFuture};

/// The bucket holds at most one token: starts are evenly spaced.
const BURST: f64 = 1.0;
/// A refusal never asks to wait longer than this (limits may change with a reload).
const MAX_WAIT: Duration = Duration::from_secs(60);

/// The budget of one PostgreSQL store.
pub(in crate::store) struct PgBudget {
    store: PgStore,
    /// Lanes whose rows exist, with the number of slots created.
    ready: Mutex<HashMap<String, usize>>,
}

impl PgBudget {
    pub(in crate::store) fn new(store: PgStore) -> PgBudget {
        PgBudget {
            store,
            ready: Mutex::default(),
        }
    }

    /// Creates the lane's bucket and slot rows the first time (or when `connections` grew).
    async fn ensure(
        &self,
        client: &deadpool_postgres::Object,
        lane: &str,
        connections: usize,
    ) -> Result<(), PgError> {
        let known = self
            .ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(lane)
            .copied();
        if known.is_some_and(|n| n >= connections) {
            return Ok(());
        }
        client
            .execute(
                "INSERT INTO relay_budget (lane, tokens, refreshed_at)
                 VALUES ($1, $2, clock_timestamp()) ON CONFLICT (lane) DO NOTHING",
                &[&lane, &BURST],
            )
            .await
            .map_err(db("create a mailbox budget"))?;
        client
            .execute(
                "INSERT INTO relay_session_slot (lane, slot)
                 SELECT $1, s FROM generate_series(1, $2::integer) s
                 ON CONFLICT (lane, slot) DO NOTHING",
                &[&lane, &(connections as i32)],
            )
            .await
            .map_err(db("create session slots"))?;
        self.ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(lane.to_string(), connections);
        Ok(())
    }

    async fn acquire_inner(&self, lane: &str, limits: BudgetLimits) -> Result<Grant, PgError> {
        let connections = limits.connections.max(1);
        let rate = limits.per_second.max(f64::MIN_POSITIVE);
        let inner = &self.store.inner;
        let client = self.store.client().await?;
        self.ensure(&client, lane, connections).await?;
        let token = inner.tokens.fetch_add(1, Ordering::Relaxed) + 1;
        let lease = inner.lease.as_secs_f64();
        let slot = client
            .query_opt(
                "UPDATE relay_session_slot s
                    SET holder = $2, token = $3, lease_until = now() + make_interval(secs => $4)
                  WHERE (s.lane, s.slot) = (
                        SELECT lane, slot FROM relay_session_slot
                         WHERE lane = $1 AND slot <= $5
                           AND (holder IS NULL OR lease_until < now())
                         ORDER BY slot LIMIT 1 FOR UPDATE SKIP LOCKED)
                 RETURNING s.slot",
                &[&lane, &inner.owner, &token, &lease, &(connections as i32)],
            )
            .await
            .map_err(db("take a session slot"))?;
        let Some(slot) = slot else {
            // A slot frees when an attempt elsewhere ends: look again about one start later.
            let again = Duration::from_secs_f64(1.0 / rate)
                .clamp(Duration::from_millis(20), Duration::from_secs(1));
            return Ok(Grant::Wait(again));
        };
        let slot: i32 = col(&slot, 0)?;
        let held = SlotLease {
            store: Arc::downgrade(inner),
            lane: lane.to_string(),
            slot,
            token,
            renew: tokio::spawn(renew(
                Arc::downgrade(inner),
                lane.to_string(),
                slot,
                token,
                inner.lease,
            )),
        };
        let taken = client
            .query_opt(
                "UPDATE relay_budget
                    SET tokens = least($3, tokens + extract(epoch FROM clock_timestamp() - refreshed_at)::float8 * $2) - 1,
                        refreshed_at = clock_timestamp()
                  WHERE lane = $1
                    AND least($3, tokens + extract(epoch FROM clock_timestamp() - refreshed_at)::float8 * $2) >= 1
                    AND (paused_until IS NULL OR paused_until <= clock_timestamp())
                 RETURNING tokens",
                &[&lane, &rate, &BURST],
            )
            .await
            .map_err(db("take an attempt start"))?;
        if taken.is_some() {
            return Ok(Grant::Start(BudgetSlot::new(held)));
        }
        drop(held);
        let row = client
            .query_opt(
                "SELECT (1 - least($3, tokens + extract(epoch FROM clock_timestamp() - refreshed_at)::float8 * $2)) / $2,
                        extract(epoch FROM paused_until - clock_timestamp())::float8
                   FROM relay_budget WHERE lane = $1",
                &[&lane, &rate, &BURST],
            )
            .await
            .map_err(db("read a mailbox budget"))?;
        let (secs, paused): (f64, Option<f64>) = match row {
            Some(row) => (col(&row, 0)?, col(&row, 1)?),
            None => (1.0 / rate, None),
        };
        if let Some(left) = paused.filter(|s| s.is_finite() && *s > 0.0) {
            // The time left as recorded: pauses are bounded by whoever wrote them.
            return Ok(Grant::Paused(
                Duration::from_secs_f64(left).max(Duration::from_millis(1)),
            ));
        }
        let wait = if secs.is_finite() && secs > 0.0 {
            Duration::from_secs_f64(secs.min(MAX_WAIT.as_secs_f64()))
        } else {
            Duration::from_millis(1)
        };
        Ok(Grant::Wait(wait.max(Duration::from_millis(1))))
    }
}

impl SharedBudget for PgBudget {
    fn claimable<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let client = self.store.client().await?;
            // The claim's own condition (postgres.rs, `claim_id`), without taking anything.
            let row = client
                .query_opt(
                    "SELECT 1 FROM relay_message
                      WHERE id = $1 AND state = 'queued'
                        AND (lease_until IS NULL OR lease_until < now() OR lease_owner = $2)",
                    &[&id, &self.store.inner.owner],
                )
                .await
                .map_err(db("look at a message's claim"))?;
            Ok(row.is_some())
        })
    }

    fn acquire<'a>(
        &'a self,
        lane: &'a str,
        limits: BudgetLimits,
    ) -> StoreFuture<'a, Result<Grant, StoreError>> {
        Box::pin(async move { Ok(self.acquire_inner(lane, limits).await?) })
    }

    fn pause<'a>(
        &'a self,
        lane: &'a str,
        pause: Duration,
    ) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let client = self.store.client().await?;
            // The row may not exist yet (a lane this relay never asked about): created full,
            // as `ensure` creates it. `greatest` ignores a NULL, keeps the later end.
            client
                .execute(
                    "INSERT INTO relay_budget (lane, tokens, refreshed_at, paused_until)
                     VALUES ($1, $2, clock_timestamp(),
                             clock_timestamp() + make_interval(secs => $3))
                     ON CONFLICT (lane) DO UPDATE
                        SET paused_until = greatest(relay_budget.paused_until, excluded.paused_until)",
                    &[&lane, &BURST, &pause.as_secs_f64()],
                )
                .await
                .map_err(db("record a mailbox pause"))?;
            Ok(())
        })
    }

    fn hold<'a>(&'a self, hold: &'a SharedHold) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let client = self.store.client().await?;
            let n = client
                .execute(
                    "INSERT INTO relay_hold (lane, cause, reply, since) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (lane) DO NOTHING",
                    &[&hold.lane, &hold.cause, &hold.reply, &hold.since],
                )
                .await
                .map_err(db("record a mailbox hold"))?;
            if n > 0 {
                self.store.notify(&client, "h").await?;
            }
            Ok(())
        })
    }

    fn resume<'a>(&'a self, lane: &'a str) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let client = self.store.client().await?;
            let n = client
                .execute("DELETE FROM relay_hold WHERE lane = $1", &[&lane])
                .await
                .map_err(db("clear a mailbox hold"))?;
            if n > 0 {
                self.store.notify(&client, "h").await?;
            }
            Ok(())
        })
    }

    fn holds(&self) -> StoreFuture<'_, Result<Vec<SharedHold>, StoreError>> {
        Box::pin(async move {
            let client = self.store.client().await?;
            let rows = client
                .query(
                    "SELECT lane, cause, reply, since FROM relay_hold ORDER BY lane",
                    &[],
                )
                .await
                .map_err(db("read mailbox holds"))?;
            let mut holds = Vec::with_capacity(rows.len());
            for row in &rows {
                holds.push(SharedHold {
                    lane: col(row, 0)?,
                    cause: col(row, 1)?,
                    reply: col(row, 2)?,
                    since: col(row, 3)?,
                });
            }
            Ok(holds)
        })
    }
}

/// A held session slot: renewed while held, given back (best effort; else it expires) when
/// dropped.
struct SlotLease {
    store: Weak<Inner>,
    lane: String,
    slot: i32,
    token: i64,
    renew: tokio::task::JoinHandle<()>,
}

impl SlotLease {
    /// Frees the slot (only this holder's lease: it may have expired and been taken since).
    async fn free(inner: &Inner, lane: &str, slot: i32, token: i64) {
        if let Ok(client) = inner.pool.get().await {
            let _ = client
                .execute(
                    "UPDATE relay_session_slot SET holder = NULL, token = NULL,
                            lease_until = NULL
                      WHERE lane = $1 AND slot = $2 AND holder = $3 AND token = $4",
                    &[&lane, &slot, &inner.owner, &token],
                )
                .await;
        }
    }
}

impl HeldSlot for SlotLease {
    fn release(mut self: Box<Self>, start_unused: bool) -> StoreFuture<'static, ()> {
        self.renew.abort();
        let store = std::mem::take(&mut self.store);
        let (lane, slot, token) = (std::mem::take(&mut self.lane), self.slot, self.token);
        Box::pin(async move {
            let Some(inner) = store.upgrade() else {
                return;
            };
            if start_unused && let Ok(client) = inner.pool.get().await {
                // The start taken for an attempt that never began: the bucket gets it back
                // (never above its burst).
                let _ = client
                    .execute(
                        "UPDATE relay_budget SET tokens = least($2, tokens + 1) WHERE lane = $1",
                        &[&lane, &BURST],
                    )
                    .await;
            }
            SlotLease::free(&inner, &lane, slot, token).await;
        })
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        self.renew.abort();
        // Released already (`store` taken), or the store is gone.
        let Some(inner) = self.store.upgrade() else {
            return;
        };
        let (lane, slot, token) = (self.lane.clone(), self.slot, self.token);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { SlotLease::free(&inner, &lane, slot, token).await });
        }
    }
}

async fn renew(store: Weak<Inner>, lane: String, slot: i32, token: i64, lease: Duration) {
    loop {
        tokio::time::sleep(lease / 3).await;
        let Some(inner) = store.upgrade() else {
            return;
        };
        let renewed = match inner.pool.get().await {
            Ok(client) => client
                .execute(
                    "UPDATE relay_session_slot SET lease_until = now() + make_interval(secs => $5)
                      WHERE lane = $1 AND slot = $2 AND holder = $3 AND token = $4",
                    &[&lane, &slot, &inner.owner, &token, &lease.as_secs_f64()],
                )
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match renewed {
            Ok(1) => {}
            Ok(_) => {
                tracing::warn!(
                    lane,
                    slot,
                    "session slot lease lost (it expired): the mailbox may briefly have one \
                     session more than upstream.connections"
                );
                return;
            }
            Err(error) => tracing::warn!(lane, %error, "cannot renew a session slot lease"),
        }
    }
}
