//! The dispatcher's schedule: which queued message is due when, and which are in flight.

use std::collections::{BTreeSet, HashMap, HashSet};

use tokio::time::Instant;

/// The dispatcher's view of the queue: every queued message is either waiting for its
/// due time or in flight, never both.
#[derive(Default)]
pub(super) struct Schedule {
    /// (due, id), earliest first.
    due: BTreeSet<(Instant, String)>,
    /// The ids in `due`, with their due time.
    waiting: HashMap<String, Instant>,
    /// Ids with an attempt running.
    pub(super) in_flight: HashSet<String>,
    /// In flight when an operator held or deleted them: not scheduled again afterwards.
    dropped: HashSet<String>,
}

impl Schedule {
    /// Schedules `id` at `at`, unless it is already waiting or in flight.
    pub(super) fn add(&mut self, id: String, at: Instant) {
        if self.in_flight.contains(&id) || self.waiting.contains_key(&id) {
            return;
        }
        self.waiting.insert(id.clone(), at);
        self.due.insert((at, id));
    }

    /// The earliest waiting message.
    pub(super) fn first(&self) -> Option<(Instant, String)> {
        self.due.first().cloned()
    }

    /// `id`, due at `at`, starts its attempt.
    pub(super) fn start(&mut self, at: Instant, id: &str) {
        self.due.remove(&(at, id.to_string()));
        self.waiting.remove(id);
        self.in_flight.insert(id.to_string());
    }

    /// `id`'s attempt ended; false if an operator took it away meanwhile (do not reschedule).
    pub(super) fn finished(&mut self, id: &str) -> bool {
        self.in_flight.remove(id);
        !self.dropped.remove(id)
    }

    /// Makes the schedule agree with `queued` (every id in `queue/` with its next attempt):
    /// new ids are added, ids retried by an operator move to their earlier time, ids no longer
    /// there (held, deleted) are dropped. Returns how many were added and dropped.
    pub(super) fn sync(&mut self, queued: Vec<(String, Instant)>) -> (usize, usize) {
        let present: HashSet<&str> = queued.iter().map(|(id, _)| id.as_str()).collect();
        let gone: Vec<String> = self
            .waiting
            .keys()
            .filter(|id| !present.contains(id.as_str()))
            .cloned()
            .collect();
        let mut dropped = gone.len();
        for id in gone {
            if let Some(at) = self.waiting.remove(&id) {
                self.due.remove(&(at, id));
            }
        }
        for id in &self.in_flight {
            if !present.contains(id.as_str()) && self.dropped.insert(id.clone()) {
                dropped += 1;
            }
        }
        let mut added = 0;
        for (id, at) in queued {
            if self.in_flight.contains(&id) {
                // Back in queue/ (released again) before its attempt ended.
                self.dropped.remove(&id);
                continue;
            }
            match self.waiting.get(&id).copied() {
                Some(was) if at < was => {
                    self.due.remove(&(was, id.clone()));
                    self.waiting.insert(id.clone(), at);
                    self.due.insert((at, id));
                }
                Some(_) => {}
                None => {
                    self.add(id, at);
                    added += 1;
                }
            }
        }
        (added, dropped)
    }

    /// `id` is waiting or in flight here.
    pub(super) fn holds(&self, id: &str) -> bool {
        self.waiting.contains_key(id) || self.in_flight.contains(id)
    }

    /// Messages the deliverer is responsible for (waiting or in flight), each counted once.
    pub(super) fn queued(&self) -> usize {
        self.waiting.len() + self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_message_in_flight_counts_once() {
        let now = Instant::now();
        let mut s = Schedule::default();
        s.add("A".into(), now);
        s.add("B".into(), now + Duration::from_secs(60));
        assert_eq!(s.queued(), 2);
        s.start(now, "A");
        assert_eq!(s.queued(), 2, "A in flight, B waiting");
        // Adding what is in flight or waiting changes nothing.
        s.add("A".into(), now);
        s.add("B".into(), now);
        assert_eq!(s.queued(), 2);
        assert!(s.finished("A"));
        assert_eq!(s.queued(), 1);
    }

    #[test]
    fn sync_follows_operator_commands() {
        let now = Instant::now();
        let later = now + Duration::from_secs(3600);
        let mut s = Schedule::default();
        s.add("HELD".into(), later);
        s.add("RETRIED".into(), later);
        s.add("FLYING".into(), now);
        s.start(now, "FLYING");
        // HELD was held, FLYING deleted during its attempt, RETRIED is due now, NEW released.
        let (added, dropped) = s.sync(vec![("RETRIED".into(), now), ("NEW".into(), now)]);
        assert_eq!((added, dropped), (1, 2));
        assert_eq!(s.first(), Some((now, "NEW".to_string())));
        assert!(s.waiting.get("RETRIED") == Some(&now));
        assert!(!s.waiting.contains_key("HELD"));
        assert!(!s.finished("FLYING"), "not scheduled again");
        assert_eq!(s.queued(), 2);
    }
}
