//! The traffic reports agents send this server, kept for an hour in
//! 10-second slots per (source, destination, side) pair, at bounded memory: at
//! most [`MAX_PAIRS`] pairs (reports of more are counted and dropped) and
//! 360 slots each. Not replicated: `Telemetry.Top` merges every server's.
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

#[derive(Default)]
struct Inner {
    /// Per pair: its slots, oldest first.
    pairs: BTreeMap<Pair, VecDeque<Slot>>,
    /// Pair reports dropped because the store was full.
    dropped: u64,
}

#[derive(Default)]
pub struct TrafficStore {
    inner: Mutex<Inner>,
}

impl TrafficStore {
    /// Adds a report's pairs at `now` (unix seconds).
    pub fn record(&self, now: u64, pairs: &[PairTraffic]) {
        let slot = now / SLOT_SECS;
        let oldest = slot.saturating_sub(KEEP_SECS / SLOT_SECS);
        let mut inner = self.inner.lock().expect("traffic lock");
        for p in pairs {
            let key = (p.source.clone(), p.destination.clone(), p.side.clone());
            if !inner.pairs.contains_key(&key) && inner.pairs.len() >= MAX_PAIRS {
                inner.dropped += 1;
                continue;
            }
            let slots = inner.pairs.entry(key).or_default();
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
        // Pairs silent for an hour go.
        inner
            .pairs
            .retain(|_, slots| slots.back().is_some_and(|s| s.slot >= oldest));
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
            .filter_map(|((source, destination, side), slots)| {
                let mut sum = traffic::pair(source, destination);
                sum.side = side.clone();
                let mut any = false;
                for s in slots.iter().filter(|s| s.slot >= from && s.slot <= slot) {
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
        let slots = inner.pairs.values().map(VecDeque::len).sum();
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
        store.record(t0, &[report("web", 5)]);
        store.record(t0 + 3, &[report("web", 5)]); // same slot
        store.record(t0 + 30, &[report("web", 1)]);
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
        store.record(t0 + 30 + KEEP_SECS + SLOT_SECS, &[report("db", 1)]);
        let (pairs, slots, _) = store.size();
        assert_eq!((pairs, slots), (1, 1));
        assert!(store.window(t0 + 30 + KEEP_SECS + SLOT_SECS, KEEP_SECS).0[0].source == "db");
    }

    #[test]
    fn the_number_of_pairs_is_bounded() {
        let store = TrafficStore::default();
        let many: Vec<_> = (0..MAX_PAIRS + 10)
            .map(|i| report(&format!("s{i}"), 1))
            .collect();
        store.record(1_000_000, &many);
        let (pairs, _, dropped) = store.size();
        assert_eq!((pairs, dropped), (MAX_PAIRS, 10));
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
        store.record(1_000_000, &[report("web", 3), inbound]);
        assert_eq!(store.window(1_000_000, 10).0.len(), 2);
    }
}
