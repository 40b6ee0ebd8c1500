//! The traffic reports agents send this server, kept for an hour in
//! 10-second slots per (source, destination, side) pair, at bounded memory: at
//! most [`MAX_PAIRS`] pairs (reports of more are counted and dropped), of
//! which one node's reports may start at most [`MAX_PAIRS_PER_NODE`] (so no
//! node can fill the store for the others), and 360 slots each. Not replicated: `Telemetry.Top` merges every server's.
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use weft_api::proto::PairTraffic;
use weft_api::traffic;

/// Seconds per slot.
pub const SLOT_SECS: u64 = 10;
/// How long reports are kept.
pub const KEEP_SECS: u64 = 3600;
/// Pairs kept at most.
pub const MAX_PAIRS: usize = 4096;
/// Pairs one node's reports may start (as many as one report may carry).
pub const MAX_PAIRS_PER_NODE: usize = 1024;

/// (source, destination, side).
type Pair = (String, String, String);

/// One pair's traffic in one slot, compact: the names live once, in the
/// key (112 bytes a slot, so at most 4,096 × 360 × 112 B ≈ 165 MB).
#[derive(Clone, Copy, Default)]
struct Slot {
    slot: u64,
    requests: u64,
    errors: u64,
    denied: u64,
    connections: u64,
    bytes_sent: u64,
    bytes_received: u64,
    latency: [u32; traffic::BUCKETS],
}

impl Slot {
    fn add(&mut self, p: &PairTraffic) {
        self.requests = self.requests.saturating_add(p.requests);
        self.errors = self.errors.saturating_add(p.errors);
        self.denied = self.denied.saturating_add(p.denied);
        self.connections = self.connections.saturating_add(p.connections);
        self.bytes_sent = self.bytes_sent.saturating_add(p.bytes_sent);
        self.bytes_received = self.bytes_received.saturating_add(p.bytes_received);
        for (i, n) in p.latency_buckets.iter().enumerate() {
            let b = &mut self.latency[i.min(traffic::BUCKETS - 1)];
            *b = b.saturating_add(u32::try_from(*n).unwrap_or(u32::MAX));
        }
    }

    fn add_to(&self, p: &mut PairTraffic) {
        let mut counts = traffic::pair(&p.source, &p.destination);
        counts.requests = self.requests;
        counts.errors = self.errors;
        counts.denied = self.denied;
        counts.connections = self.connections;
        counts.bytes_sent = self.bytes_sent;
        counts.bytes_received = self.bytes_received;
        counts.latency_buckets = self.latency.iter().map(|n| u64::from(*n)).collect();
        traffic::merge(p, &counts);
    }
}

/// A pair's slots, oldest first, and the node whose report started it.
struct Kept {
    started_by: String,
    slots: VecDeque<Slot>,
}

#[derive(Default)]
struct Inner {
    pairs: BTreeMap<Pair, Kept>,
    /// Pairs each node started, of those kept.
    started: BTreeMap<String, usize>,
    /// The slot of the last walk for silent pairs.
    pruned: u64,
    /// Pair reports dropped because the store was full.
    dropped: u64,
}

/// Drops pairs with no slot since `oldest`, and their places in `started`.
fn prune(inner: &mut Inner, oldest: u64) {
    let started = &mut inner.started;
    inner.pairs.retain(|_, kept| {
        let live = kept.slots.back().is_some_and(|s| s.slot >= oldest);
        if !live {
            if let Some(n) = started.get_mut(&kept.started_by) {
                *n = n.saturating_sub(1);
            }
        }
        live
    });
    started.retain(|_, n| *n > 0);
}

#[derive(Default)]
pub struct TrafficStore {
    inner: Mutex<Inner>,
}

impl TrafficStore {
    /// Adds `node`'s report of `pairs` at `now` (unix seconds).
    pub fn record(&self, now: u64, node: &str, pairs: &[PairTraffic]) {
        let slot = now / SLOT_SECS;
        let oldest = slot.saturating_sub(KEEP_SECS / SLOT_SECS);
        let mut guard = self.inner.lock().expect("traffic lock");
        let inner = &mut *guard;
        // Pairs silent for an hour go first, freeing their places (once a
        // slot: the walk is over every pair).
        if inner.pruned != slot {
            inner.pruned = slot;
            prune(inner, oldest);
        }
        for p in pairs {
            let key = (p.source.clone(), p.destination.clone(), p.side.clone());
            if !inner.pairs.contains_key(&key) {
                let by_node = inner.started.get(node).copied().unwrap_or(0);
                if inner.pairs.len() >= MAX_PAIRS || by_node >= MAX_PAIRS_PER_NODE {
                    inner.dropped += 1;
                    continue;
                }
                *inner.started.entry(node.to_string()).or_default() += 1;
            }
            let kept = inner.pairs.entry(key).or_insert_with(|| Kept {
                started_by: node.to_string(),
                slots: VecDeque::new(),
            });
            let slots = &mut kept.slots;
            while slots.front().is_some_and(|s| s.slot < oldest) {
                slots.pop_front();
            }
            match slots.back_mut() {
                Some(last) if last.slot == slot => last.add(p),
                _ => {
                    let mut new = Slot {
                        slot,
                        ..Slot::default()
                    };
                    new.add(p);
                    slots.push_back(new);
                }
            }
        }
    }

    /// Every pair's traffic in the slots from the one holding
    /// `now - window_secs` to the current one, and the seconds those cover
    /// (from the first slot's start to `now`: at least the window, so a rate
    /// is never read off a slot that has only begun).
    pub fn window(&self, now: u64, window_secs: u64) -> (Vec<PairTraffic>, u64) {
        let slot = now / SLOT_SECS;
        let from = now.saturating_sub(window_secs) / SLOT_SECS;
        let covered = (now - from * SLOT_SECS).max(1);
        let inner = self.inner.lock().expect("traffic lock");
        let pairs = inner
            .pairs
            .iter()
            .filter_map(|((source, destination, side), kept)| {
                let mut sum = traffic::pair(source, destination);
                sum.side = side.clone();
                let mut any = false;
                for s in kept
                    .slots
                    .iter()
                    .filter(|s| s.slot >= from && s.slot <= slot)
                {
                    s.add_to(&mut sum);
                    any = true;
                }
                any.then_some(sum)
            })
            .collect();
        (pairs, covered)
    }

    /// (pairs kept, slots kept, pair reports dropped), for the closing
    /// figures and tests.
    pub fn size(&self) -> (usize, usize, u64) {
        let inner = self.inner.lock().expect("traffic lock");
        let slots = inner.pairs.values().map(|k| k.slots.len()).sum();
        (inner.pairs.len(), slots, inner.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(source: &str, requests: u64) -> PairTraffic {
        let mut p = traffic::pair(source, "api");
        for _ in 0..requests {
            traffic::add_request(&mut p, 2.0, false);
        }
        p
    }

    #[test]
    fn windows_sum_whole_slots_and_an_hour_is_kept() {
        let store = TrafficStore::default();
        let t0 = 1_000_000;
        store.record(t0, "node-a", &[report("web", 5)]);
        store.record(t0 + 3, "node-a", &[report("web", 5)]); // same slot
        store.record(t0 + 30, "node-a", &[report("web", 1)]);
        // t0 + 30 is the start of a slot: the last 10 s are the slot
        // before it (empty) and the current one, 10 s covered.
        let (last_10s, covered) = store.window(t0 + 30, 10);
        assert_eq!((last_10s[0].requests, covered), (1, 10));
        let (last_min, covered) = store.window(t0 + 30, 60);
        assert_eq!((last_min[0].requests, covered), (11, 60));
        // Five seconds into a slot, a 10 s window covers 15 s.
        assert_eq!(store.window(t0 + 35, 10).1, 15);
        assert_eq!(store.size().1, 2, "two slots");
        // An hour later the old slots are gone, and so is a silent pair.
        store.record(
            t0 + 30 + KEEP_SECS + SLOT_SECS,
            "node-a",
            &[report("db", 1)],
        );
        let (pairs, slots, _) = store.size();
        assert_eq!((pairs, slots), (1, 1));
        assert!(store.window(t0 + 30 + KEEP_SECS + SLOT_SECS, KEEP_SECS).0[0].source == "db");
    }

    #[test]
    fn the_number_of_pairs_is_bounded_in_all_and_per_node() {
        let store = TrafficStore::default();
        let many: Vec<_> = (0..MAX_PAIRS + 10)
            .map(|i| report(&format!("s{i}"), 1))
            .collect();
        // One node starts at most its share; the others still get theirs.
        store.record(1_000_000, "greedy", &many);
        assert_eq!(store.size().0, MAX_PAIRS_PER_NODE);
        for (n, chunk) in many.chunks(MAX_PAIRS_PER_NODE).enumerate() {
            store.record(1_000_000, &format!("node-{n}"), chunk);
        }
        let (pairs, _, dropped) = store.size();
        assert_eq!(pairs, MAX_PAIRS);
        assert!(
            dropped >= (MAX_PAIRS + 10 - MAX_PAIRS_PER_NODE) as u64,
            "{dropped}"
        );
        // Reports to pairs kept go on counting whoever sends them: greedy's
        // share, node-0's report of the same pairs, the others', and one more.
        store.record(1_000_001, "greedy", &many[..1]);
        let counted: u64 = store
            .window(1_000_001, 10)
            .0
            .iter()
            .map(|p| p.requests)
            .sum();
        assert_eq!(counted, (MAX_PAIRS + MAX_PAIRS_PER_NODE + 1) as u64);
        // A node's pairs that fall silent for an hour free its share.
        let later = 1_000_000 + KEEP_SECS + 2 * SLOT_SECS;
        store.record(later, "greedy", &many[MAX_PAIRS..]);
        assert_eq!(store.size().0, 10);
    }

    #[test]
    fn a_slot_is_small() {
        assert!(
            std::mem::size_of::<Slot>() <= 112,
            "{}",
            std::mem::size_of::<Slot>()
        );
    }

    #[test]
    fn sides_are_kept_apart() {
        let store = TrafficStore::default();
        let mut inbound = report("web", 2);
        inbound.side = "inbound".into();
        store.record(1_000_000, "node-a", &[report("web", 3), inbound]);
        assert_eq!(store.window(1_000_000, 10).0.len(), 2);
    }
}
