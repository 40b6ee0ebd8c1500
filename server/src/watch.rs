//! The watch hub: every applied change, in index order, for subscribers.
//!
//! The state machine publishes the changes of each write while it still holds
//! the state's write lock, so a subscriber that takes a snapshot of the state
//! (under the read lock) and subscribes at the same time sees every later
//! change exactly once. Recent changes are kept so that a subscriber can
//! resume from an index without a full snapshot.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::state::Change;

/// How many writes' changes are kept for resuming subscribers.
const RECENT: usize = 4096;

#[derive(Clone, Debug)]
pub enum HubEvent {
    /// The changes made by the write at `index`.
    Changes(u64, Arc<Vec<Change>>),
    /// The state was replaced at `index` (snapshot installed or restored).
    Reset(u64),
}

impl HubEvent {
    pub fn index(&self) -> u64 {
        match self {
            HubEvent::Changes(i, _) | HubEvent::Reset(i) => *i,
        }
    }
}

struct Recent {
    events: VecDeque<(u64, Arc<Vec<Change>>)>,
    /// Every write after this index is in `events`.
    complete_after: u64,
}

pub struct WatchHub {
    tx: broadcast::Sender<HubEvent>,
    recent: Mutex<Recent>,
}

impl Default for WatchHub {
    fn default() -> Self {
        Self::new()
    }
}

impl WatchHub {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(RECENT);
        Self {
            tx,
            recent: Mutex::new(Recent {
                events: VecDeque::new(),
                complete_after: 0,
            }),
        }
    }

    /// Records and sends the changes of the write at `index`.
    pub fn publish(&self, index: u64, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        if changes.iter().any(|c| matches!(c, Change::Replaced)) {
            return self.reset(index);
        }
        let changes = Arc::new(changes);
        let mut recent = self.recent.lock().expect("watch hub lock");
        recent.events.push_back((index, changes.clone()));
        while recent.events.len() > RECENT {
            if let Some((i, _)) = recent.events.pop_front() {
                recent.complete_after = i;
            }
        }
        let _ = self.tx.send(HubEvent::Changes(index, changes));
    }

    /// The state was replaced at `index`: history before it no longer applies.
    pub fn reset(&self, index: u64) {
        let mut recent = self.recent.lock().expect("watch hub lock");
        recent.events.clear();
        recent.complete_after = index;
        let _ = self.tx.send(HubEvent::Reset(index));
    }

    /// Subscribes. Call it while holding the state's read lock.
    pub fn subscribe(&self) -> broadcast::Receiver<HubEvent> {
        self.tx.subscribe()
    }

    /// The changes after `from` up to `until`, if all of them are still kept.
    /// Call it while holding the state's read lock.
    pub fn since(&self, from: u64, until: u64) -> Option<Vec<(u64, Arc<Vec<Change>>)>> {
        let recent = self.recent.lock().expect("watch hub lock");
        if from < recent.complete_after {
            return None;
        }
        Some(
            recent
                .events
                .iter()
                .filter(|(i, _)| *i > from && *i <= until)
                .cloned()
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str) -> Vec<Change> {
        vec![Change::KvDelete(key.to_string())]
    }

    #[test]
    fn resume_returns_only_later_changes() {
        let hub = WatchHub::new();
        hub.publish(3, kv("a"));
        hub.publish(5, kv("b"));
        hub.publish(9, kv("c"));
        let since: Vec<u64> = hub.since(3, 9).unwrap().iter().map(|(i, _)| *i).collect();
        assert_eq!(since, vec![5, 9]);
        let upto: Vec<u64> = hub.since(0, 5).unwrap().iter().map(|(i, _)| *i).collect();
        assert_eq!(upto, vec![3, 5]);
    }

    #[test]
    fn resume_before_a_reset_needs_a_snapshot() {
        let hub = WatchHub::new();
        hub.publish(3, kv("a"));
        hub.reset(10);
        hub.publish(11, kv("b"));
        assert!(hub.since(3, 11).is_none());
        assert_eq!(hub.since(10, 11).unwrap().len(), 1);
    }

    #[test]
    fn forgotten_history_needs_a_snapshot() {
        let hub = WatchHub::new();
        for i in 1..=(RECENT as u64 + 10) {
            hub.publish(i, kv("k"));
        }
        assert!(hub.since(5, RECENT as u64 + 10).is_none());
        assert!(hub.since(20, RECENT as u64 + 10).is_some());
    }

    #[test]
    fn subscribers_get_events_in_order() {
        let hub = WatchHub::new();
        let mut rx = hub.subscribe();
        hub.publish(1, kv("a"));
        hub.publish(2, kv("b"));
        assert_eq!(rx.try_recv().unwrap().index(), 1);
        assert_eq!(rx.try_recv().unwrap().index(), 2);
    }
}
