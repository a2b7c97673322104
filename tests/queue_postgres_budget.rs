//! The mailbox budget the PostgreSQL store shares between relays, at the store level: two
//! stores on one database stand for two replicas. The token bucket grants exactly its rate to
//! concurrent takers, at most `connections` session slots are held at once, a dead relay's
//! slot comes back when its lease expires, and the file spool has no shared budget.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::postgres::{execute, fresh_database};
use smtp_oauth_relay::config::{Backend, DbUrl, QueueConfig};
use smtp_oauth_relay::store::Store;
use smtp_oauth_relay::store::budget::{BudgetLimits, Grant, SharedBudget};

fn replica(url: &str, lease: Duration) -> Arc<dyn Store> {
    let work = std::env::temp_dir();
    smtp_oauth_relay::store::open_for_operator(&QueueConfig {
        dir: work.join("unused-spool"),
        backend: Backend::Postgres,
        url: Some(DbUrl::new(url.to_string())),
        lease,
        ..Default::default()
    })
    .expect("store")
}

fn budget(store: &Arc<dyn Store>) -> Arc<dyn SharedBudget> {
    store
        .budget()
        .expect("the PostgreSQL store shares a budget")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bucket_grants_its_rate_exactly_to_concurrent_takers() {
    let url = fresh_database();
    let limits = BudgetLimits {
        connections: 64,
        per_second: 20.0,
    };
    let budgets = [
        budget(&replica(&url, Duration::from_secs(30))),
        budget(&replica(&url, Duration::from_secs(30))),
    ];
    // The rows exist before the clock starts: the first grant is the bucket's one token.
    match budgets[0].acquire("default mbx@x", limits).await {
        Ok(Grant::Start(slot)) => drop(slot),
        other => panic!("first acquire: {other:?}"),
    }
    let grants = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let run_for = Duration::from_secs(3);
    let mut takers = tokio::task::JoinSet::new();
    for i in 0..8 {
        let budget = budgets[i % 2].clone();
        let grants = grants.clone();
        takers.spawn(async move {
            // Bounded: at most one grant or refusal per iteration, for `run_for`.
            for _ in 0..100_000 {
                if started.elapsed() >= run_for {
                    break;
                }
                match budget.acquire("default mbx@x", limits).await {
                    Ok(Grant::Start(slot)) => {
                        grants.fetch_add(1, Ordering::Relaxed);
                        drop(slot);
                    }
                    Ok(Grant::Wait(wait)) => {
                        assert!(wait <= Duration::from_millis(60), "asked to wait {wait:?}");
                        // Ask again early (a busy taker), not at the time named.
                        tokio::time::sleep(wait / 4).await;
                    }
                    other => panic!("acquire: {other:?}"),
                }
            }
        });
    }
    while let Some(done) = takers.join_next().await {
        done.expect("taker");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let granted = grants.load(Ordering::Relaxed) as f64;
    // The bucket was empty at the start (its token was taken above): 20 a second at most,
    // one more for the token that may have refilled as the clock started.
    let most = 20.0 * elapsed + 1.0;
    // A figure for the report, not an assertion.
    println!("{granted} grants in {elapsed:.3} s to 8 takers on 2 stores (at most {most:.1})");
    assert!(
        granted <= most,
        "{granted} grants in {elapsed:.2} s: more than {most:.1}"
    );
    // Eight takers asking every few milliseconds leave few tokens unused.
    assert!(
        granted >= 20.0 * run_for.as_secs_f64() * 0.6,
        "{granted} grants in {elapsed:.2} s: the bucket hardly granted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_connections_session_slots_are_held_across_replicas() {
    let url = fresh_database();
    let limits = BudgetLimits {
        connections: 2,
        per_second: 1000.0,
    };
    let budgets = [
        budget(&replica(&url, Duration::from_secs(30))),
        budget(&replica(&url, Duration::from_secs(30))),
    ];
    let holding = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let sessions = Arc::new(AtomicUsize::new(0));
    let mut takers = tokio::task::JoinSet::new();
    for i in 0..6 {
        let (budget, holding, most, sessions) = (
            budgets[i % 2].clone(),
            holding.clone(),
            most.clone(),
            sessions.clone(),
        );
        takers.spawn(async move {
            for _ in 0..400 {
                if sessions.load(Ordering::Relaxed) >= 40 {
                    break;
                }
                match budget.acquire("billing mbx@x", limits).await {
                    Ok(Grant::Start(slot)) => {
                        let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        holding.fetch_sub(1, Ordering::SeqCst);
                        sessions.fetch_add(1, Ordering::Relaxed);
                        drop(slot);
                        // The release is on its way; a new acquire may not see it yet.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Ok(Grant::Wait(wait)) => tokio::time::sleep(wait).await,
                    other => panic!("acquire: {other:?}"),
                }
            }
        });
    }
    while let Some(done) = takers.join_next().await {
        done.expect("taker");
    }
    assert!(
        sessions.load(Ordering::Relaxed) >= 40,
        "only {} sessions granted",
        sessions.load(Ordering::Relaxed)
    );
    assert_eq!(
        most.load(Ordering::SeqCst),
        2,
        "session slots held at once across the two replicas"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_session_slot_comes_back_when_its_lease_expires() {
    let url = fresh_database();
    let limits = BudgetLimits {
        connections: 1,
        per_second: 1000.0,
    };
    let store = replica(&url, Duration::from_secs(30));
    let budget = budget(&store);
    match budget.acquire("default dead@x", limits).await {
        Ok(Grant::Start(slot)) => drop(slot),
        other => panic!("first acquire: {other:?}"),
    }
    // Another relay took the only slot and died: nobody renews its lease.
    tokio::time::sleep(Duration::from_millis(200)).await;
    execute(
        &url,
        "UPDATE relay_session_slot SET holder = 'dead-relay', token = 1,
                lease_until = now() + interval '1 second'",
    );
    match budget.acquire("default dead@x", limits).await {
        Ok(Grant::Wait(_)) => {}
        other => panic!("the slot is held elsewhere, yet: {other:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match budget.acquire("default dead@x", limits).await {
            Ok(Grant::Start(_)) => break,
            Ok(Grant::Wait(wait)) => {
                assert!(
                    Instant::now() < deadline,
                    "the dead relay's slot never came back"
                );
                tokio::time::sleep(wait).await;
            }
            other => panic!("acquire: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_one_replica_records_stops_every_replica_until_it_ends() {
    let url = fresh_database();
    let limits = BudgetLimits {
        connections: 4,
        per_second: 1000.0,
    };
    let lane = "default paused@x";
    let budgets = [
        budget(&replica(&url, Duration::from_secs(30))),
        budget(&replica(&url, Duration::from_secs(30))),
    ];
    // An unpaused lane grants at once, on both.
    for b in &budgets {
        match b.acquire(lane, limits).await {
            Ok(Grant::Start(slot)) => drop(slot),
            other => panic!("before the pause: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pause = Duration::from_secs(2);
    let paused_at = Instant::now();
    budgets[0].pause(lane, pause).await.expect("pause");
    // A shorter pause recorded later does not cut the first one short.
    budgets[1]
        .pause(lane, Duration::from_millis(100))
        .await
        .expect("shorter pause");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The replica that did not record the pause is refused too, with the time left.
    for (i, b) in budgets.iter().enumerate() {
        match b.acquire(lane, limits).await {
            Ok(Grant::Paused(left)) => {
                assert!(
                    left <= pause,
                    "replica {i}: {left:?} left of a {pause:?} pause"
                );
                assert!(
                    left + paused_at.elapsed() >= pause - Duration::from_millis(100),
                    "replica {i}: only {left:?} left: the shorter pause cut it"
                );
            }
            other => panic!("replica {i} during the pause: {other:?}"),
        }
    }
    // It ends: both grant again, neither before the pause was over.
    for (i, b) in budgets.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match b.acquire(lane, limits).await {
                Ok(Grant::Start(slot)) => {
                    assert!(
                        paused_at.elapsed() >= pause,
                        "replica {i} granted {:?} into a {pause:?} pause",
                        paused_at.elapsed()
                    );
                    drop(slot);
                    break;
                }
                Ok(Grant::Paused(wait)) | Ok(Grant::Wait(wait)) => {
                    assert!(
                        Instant::now() < deadline,
                        "replica {i}: the pause never ended"
                    );
                    tokio::time::sleep(wait).await;
                }
                Err(e) => panic!("acquire: {e}"),
            }
        }
    }
}

#[test]
fn the_file_spool_has_no_shared_budget() {
    let work = tempfile::tempdir().expect("tempdir");
    let (spool, _) =
        smtp_oauth_relay::spool::Spool::open(&work.path().join("spool")).expect("spool");
    assert!(spool.budget().is_none());
}

/// A slot released before the attempt's end is reported is free for the next start at once
/// (no waiting for a refusal to run out), and a start its attempt never used (the claim found
/// the message taken by another relay) goes back to the bucket: a lost race costs no rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_slot_is_free_at_once_and_an_unused_start_goes_back() {
    let url = fresh_database();
    let (a, b) = (
        budget(&replica(&url, Duration::from_secs(30))),
        budget(&replica(&url, Duration::from_secs(30))),
    );
    let lane = "default mbx@x";
    // One session, one start a minute: without the start given back the next asks wait.
    let slow = BudgetLimits {
        connections: 1,
        per_second: 1.0 / 60.0,
    };
    let Ok(Grant::Start(slot)) = a.acquire(lane, slow).await else {
        panic!("first start");
    };
    assert!(
        matches!(b.acquire(lane, slow).await, Ok(Grant::Wait(_))),
        "the one slot is held"
    );
    slot.release(true).await;
    let Ok(Grant::Start(slot)) = b.acquire(lane, slow).await else {
        panic!("the unused start and its slot were not given back");
    };
    // This one was used: the bucket stays empty for a minute.
    slot.release(false).await;
    match a.acquire(lane, slow).await {
        Ok(Grant::Wait(wait)) => assert!(wait > Duration::from_secs(30), "{wait:?}"),
        other => panic!("a used start came back: {other:?}"),
    }
    // Rate to spare, one session: each released slot is taken by the next start at once.
    let fast = BudgetLimits {
        connections: 1,
        per_second: 1_000_000.0,
    };
    for i in 0..20 {
        let taker = if i % 2 == 0 { &a } else { &b };
        match taker.acquire("default fast@x", fast).await {
            Ok(Grant::Start(slot)) => slot.release(false).await,
            other => panic!("start {i} after a released slot: {other:?}"),
        }
    }
}

/// A message another relay has claimed is not claimable here (so this relay asks no slot for
/// it); it is again once that claim ends; a held one is not; this relay's own claim does not
/// count against it (its in-process claims are kept apart by the claim itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_another_relay_claimed_is_not_claimable() {
    let url = fresh_database();
    let (a, b) = (
        replica(&url, Duration::from_secs(30)),
        replica(&url, Duration::from_secs(30)),
    );
    let id = common::store_suite::put(&*a, &["x@example.org"], b"Subject: c\r\n\r\nc\r\n").await;
    assert!(budget(&b).claimable(&id).await.expect("look"), "queued");
    let claim = a.claim(&id).await.expect("claim").expect("queued");
    assert!(
        !budget(&b).claimable(&id).await.expect("look"),
        "claimed by a"
    );
    assert!(
        budget(&a).claimable(&id).await.expect("look"),
        "a's own lease"
    );
    drop(claim);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !budget(&b).claimable(&id).await.expect("look") {
        assert!(Instant::now() < deadline, "the ended claim still counts");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.hold(&id).await.expect("hold");
    assert!(!budget(&b).claimable(&id).await.expect("look"), "held");
}
