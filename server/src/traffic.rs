//! The traffic reports agents send this server, kept for an hour in
//! 10-second slots per (source, destination, side) pair, at bounded memory: at
//! most [`MAX_PAIRS`] pairs (reports of more are counted and dropped), of
//! which one node's reports may start at most [`MAX_PAIRS_PER_NODE`] (so no
//! node can fill the store for the others), and 360 slots each. Not replicated: `Telemetry.Top` merges every server's.
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use weft_api::proto::{PairTraffic, SeriesPoint, SlotTraffic};
use weft_api::traffic;

/// Seconds per slot.
pub const SLOT_SECS: u64 = 10;
/// How long reports are kept.
pub const KEEP_SECS: u64 = 3600;
/// Pairs kept at most.
pub const MAX_PAIRS: usize = 4096;
/// Slots one pair holds at most: the current one and an hour before it.
const KEPT_SLOTS: usize = (KEEP_SECS / SLOT_SECS) as usize + 1;
/// Pairs one node's reports may start (as many as one report may carry).
pub const MAX_PAIRS_PER_NODE: usize = 1024;

/// (source, destination, side).
type Pair = (String, String, String);

/// One pair's traffic in one slot, compact: the names live once, in the
/// key (112 bytes a slot, so at most 4,096 × 361 × 112 B ≈ 166 MB).
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
                    // Grow by doubling, but never past the slots an hour
                    // keeps: a full deque is exactly KEPT_SLOTS long (the
                    // default doubling would make it 512).
                    if slots.len() == slots.capacity() {
                        let room = KEPT_SLOTS.saturating_sub(slots.len()).max(1);
                        slots.reserve_exact(slots.len().max(4).min(room));
                    }
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

    /// The slots from the one holding `now - window_secs` to the current
    /// one of every pair into `service` (both sides), oldest first.
    pub fn slots_into(&self, now: u64, window_secs: u64, service: &str) -> Vec<SlotTraffic> {
        let (from, to) = (now.saturating_sub(window_secs) / SLOT_SECS, now / SLOT_SECS);
        let inner = self.inner.lock().expect("traffic lock");
        let mut by_slot: BTreeMap<u64, Vec<PairTraffic>> = BTreeMap::new();
        let into = inner
            .pairs
            .iter()
            .filter(|((_, destination, _), _)| destination == service);
        for ((source, destination, side), kept) in into {
            for s in kept.slots.iter().filter(|s| s.slot >= from && s.slot <= to) {
                let mut p = traffic::pair(source, destination);
                p.side = side.clone();
                s.add_to(&mut p);
                by_slot.entry(s.slot).or_default().push(p);
            }
        }
        by_slot
            .into_iter()
            .map(|(slot, pairs)| SlotTraffic {
                start_secs: slot * SLOT_SECS,
                pairs,
            })
            .collect()
    }

    /// (pairs kept, slots kept, pair reports dropped), for the closing
    /// figures and tests.
    pub fn size(&self) -> (usize, usize, u64) {
        let inner = self.inner.lock().expect("traffic lock");
        let slots = inner.pairs.values().map(|k| k.slots.len()).sum();
        (inner.pairs.len(), slots, inner.dropped)
    }
}

/// A service's incoming traffic as `count` points of `step_secs` from
/// `from_secs` on, out of the slots every server holds (a slot may come from
/// several servers, and a pair from both its sides: within a slot the sides
/// are combined as `weft top` does, then the slots of a step are summed).
pub fn series(
    slots: impl IntoIterator<Item = SlotTraffic>,
    from_secs: u64,
    step_secs: u64,
    count: usize,
) -> Vec<SeriesPoint> {
    let step_secs = step_secs.max(1);
    let mut per_slot: BTreeMap<u64, Vec<PairTraffic>> = BTreeMap::new();
    for s in slots {
        per_slot.entry(s.start_secs).or_default().extend(s.pairs);
    }
    let mut points: Vec<(SeriesPoint, Vec<u64>)> = (0..count)
        .map(|i| {
            let point = SeriesPoint {
                start_secs: from_secs + i as u64 * step_secs,
                ..SeriesPoint::default()
            };
            (point, vec![0; traffic::BUCKETS])
        })
        .collect();
    for (start, pairs) in per_slot {
        let Some(i) = start
            .checked_sub(from_secs)
            .map(|d| (d / step_secs) as usize)
        else {
            continue;
        };
        let Some((point, latency)) = points.get_mut(i) else {
            continue;
        };
        for p in traffic::combine_sides(pairs) {
            point.requests = point.requests.saturating_add(p.requests);
            point.errors = point.errors.saturating_add(p.errors);
            point.denied = point.denied.saturating_add(p.denied);
            point.connections = point.connections.saturating_add(p.connections);
            for (b, n) in latency.iter_mut().zip(&p.latency_buckets) {
                *b = b.saturating_add(*n);
            }
        }
    }
    points
        .into_iter()
        .map(|(mut point, latency)| {
            point.p99_ms = traffic::quantile_ms(&latency, 0.99);
            point
        })
        .collect()
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
    fn a_pair_reported_for_hours_holds_at_most_an_hours_slots() {
        let store = TrafficStore::default();
        let t0 = 1_000_000;
        for i in 0..3 * KEEP_SECS / SLOT_SECS {
            store.record(t0 + i * SLOT_SECS, "node-a", &[report("web", 1)]);
        }
        let inner = store.inner.lock().unwrap();
        let kept = inner.pairs.values().next().unwrap();
        assert_eq!(kept.slots.len(), KEPT_SLOTS);
        assert_eq!(kept.slots.capacity(), KEPT_SLOTS, "allocated past an hour");
    }

    #[test]
    fn a_series_combines_sides_per_slot_and_sums_slots_per_step() {
        let store = TrafficStore::default();
        let t0 = 1_000_000; // a slot's start
        let mut outbound = report("web", 4);
        outbound.side = "outbound".into();
        let mut inbound = report("web", 3);
        inbound.side = "inbound".into();
        let mut to_db = traffic::pair("web", "db");
        traffic::add_request(&mut to_db, 1.0, false);
        to_db.side = "outbound".into();
        // Both sides of web -> api in the first slot, one side later.
        store.record(t0 + 1, "node-a", &[outbound.clone(), to_db]);
        store.record(t0 + 2, "node-b", &[inbound]);
        store.record(t0 + 15, "node-a", &[outbound.clone()]);
        store.record(t0 + 65, "node-a", &[outbound]);
        let slots = store.slots_into(t0 + 70, 70, "api");
        assert_eq!(slots.len(), 3, "three slots hold pairs into api");
        // A second server held the same first slot's report of another pair.
        let mut other = SlotTraffic {
            start_secs: t0,
            pairs: vec![report("cli", 2)],
        };
        other.pairs[0].side = "inbound".into();
        let points = series(slots.into_iter().chain([other]), t0, 60, 2);
        assert_eq!(points.len(), 2);
        // Step 1: slot t0 is max(4, 3) from web plus 2 from cli, slot
        // t0 + 10 is 4 more.
        assert_eq!(points[0].requests, 4 + 2 + 4);
        assert_eq!(points[0].start_secs, t0);
        assert_eq!(points[1].requests, 4);
        assert_eq!(points[1].start_secs, t0 + 60);
        assert!(points[0].p99_ms > 0.0);
        // Slots before the first step or past the last are left out.
        assert_eq!(
            series(store.slots_into(t0 + 70, 70, "api"), t0 + 60, 60, 1)[0].requests,
            4
        );
        assert_eq!(
            series(Vec::new(), t0, 10, 3).len(),
            3,
            "empty steps are zeros"
        );
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
