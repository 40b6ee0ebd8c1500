//! Per-pair traffic summaries: what an agent counts between two services
//! over a few seconds, how reports merge, and what `weft top` shows (rates,
//! error rate, latency quantiles). Pure: agents accumulate with it, servers
//! keep and merge with it.
use crate::proto::{PairSummary, PairTraffic};

/// Upper bounds (ms) of the latency buckets; one more bucket holds the
/// rest. A quantile reads as the upper bound of the bucket it falls in.
pub const LATENCY_BOUNDS_MS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];
/// Latency buckets a pair carries.
pub const BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// An empty pair.
pub fn pair(source: &str, destination: &str) -> PairTraffic {
    PairTraffic {
        source: source.to_string(),
        destination: destination.to_string(),
        latency_buckets: vec![0; BUCKETS],
        ..Default::default()
    }
}

/// Counts one answered request that took `ms`.
pub fn add_request(p: &mut PairTraffic, ms: f64, server_error: bool) {
    p.requests = p.requests.saturating_add(1);
    p.errors = p.errors.saturating_add(u64::from(server_error));
    let bucket = LATENCY_BOUNDS_MS
        .iter()
        .position(|bound| ms <= *bound)
        .unwrap_or(BUCKETS - 1);
    if p.latency_buckets.len() != BUCKETS {
        p.latency_buckets.resize(BUCKETS, 0);
    }
    p.latency_buckets[bucket] = p.latency_buckets[bucket].saturating_add(1);
}

/// Adds `other`'s counts into `into` (same pair).
/// Sums saturate: a report's figures come from an agent, not from us.
pub fn merge(into: &mut PairTraffic, other: &PairTraffic) {
    into.requests = into.requests.saturating_add(other.requests);
    into.errors = into.errors.saturating_add(other.errors);
    into.denied = into.denied.saturating_add(other.denied);
    into.connections = into.connections.saturating_add(other.connections);
    into.bytes_sent = into.bytes_sent.saturating_add(other.bytes_sent);
    into.bytes_received = into.bytes_received.saturating_add(other.bytes_received);
    if into.latency_buckets.len() != BUCKETS {
        into.latency_buckets.resize(BUCKETS, 0);
    }
    // A report with more buckets than this version knows adds its extra
    // ones to the last (the rest).
    for (i, n) in other.latency_buckets.iter().enumerate() {
        let b = &mut into.latency_buckets[i.min(BUCKETS - 1)];
        *b = b.saturating_add(*n);
    }
}

/// The latency (ms) under which a `q` share of requests fell, read as the
/// upper bound of its bucket (the largest bound for the last bucket); 0
/// with no requests.
pub fn quantile_ms(buckets: &[u64], q: f64) -> f64 {
    let total = buckets.iter().fold(0u64, |t, n| t.saturating_add(*n));
    if total == 0 {
        return 0.0;
    }
    let want = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0u64;
    for (i, n) in buckets.iter().enumerate() {
        seen = seen.saturating_add(*n);
        if seen >= want {
            return LATENCY_BOUNDS_MS[i.min(LATENCY_BOUNDS_MS.len() - 1)];
        }
    }
    LATENCY_BOUNDS_MS[LATENCY_BOUNDS_MS.len() - 1]
}

/// One count per pair from reports of both sides: each side's reports
/// summed, then for every figure the larger side's (the source's and the
/// destination's agent both count a connection between nodes; a refusal or
/// an L7 request is counted where it happens), latencies from the side
/// that timed more requests.
pub fn combine_sides(reports: impl IntoIterator<Item = PairTraffic>) -> Vec<PairTraffic> {
    use std::collections::BTreeMap;
    let mut by_side: BTreeMap<(String, String, String), PairTraffic> = BTreeMap::new();
    for p in reports {
        let key = (p.source.clone(), p.destination.clone(), p.side.clone());
        let sum = by_side
            .entry(key)
            .or_insert_with(|| pair(&p.source, &p.destination));
        merge(sum, &p);
    }
    let mut by_pair: BTreeMap<(String, String), PairTraffic> = BTreeMap::new();
    for ((source, destination, _), p) in by_side {
        let Some(both) = by_pair.get_mut(&(source.clone(), destination.clone())) else {
            by_pair.insert((source, destination), p);
            continue;
        };
        if p.requests > both.requests {
            both.latency_buckets = p.latency_buckets.clone();
            both.errors = p.errors;
        }
        both.requests = both.requests.max(p.requests);
        both.denied = both.denied.max(p.denied);
        both.connections = both.connections.max(p.connections);
        both.bytes_sent = both.bytes_sent.max(p.bytes_sent);
        both.bytes_received = both.bytes_received.max(p.bytes_received);
    }
    by_pair.into_values().collect()
}

/// What `weft top` shows of `p` summed over `window_secs`.
pub fn summarize(p: &PairTraffic, window_secs: u32) -> PairSummary {
    let secs = f64::from(window_secs.max(1));
    PairSummary {
        source: p.source.clone(),
        destination: p.destination.clone(),
        requests_per_sec: p.requests as f64 / secs,
        connections_per_sec: p.connections as f64 / secs,
        error_rate: if p.requests == 0 {
            0.0
        } else {
            p.errors as f64 / p.requests as f64
        },
        p50_ms: quantile_ms(&p.latency_buckets, 0.5),
        p99_ms: quantile_ms(&p.latency_buckets, 0.99),
        bytes_sent: p.bytes_sent,
        bytes_received: p.bytes_received,
        denied: p.denied,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_land_in_their_buckets_and_quantiles_read_bounds() {
        let mut p = pair("web", "api");
        for _ in 0..98 {
            add_request(&mut p, 3.0, false); // the 5 ms bucket
        }
        add_request(&mut p, 150.0, true); // 200 ms
        add_request(&mut p, 60_000.0, true); // the rest
        assert_eq!(p.requests, 100);
        assert_eq!(p.errors, 2);
        assert_eq!(quantile_ms(&p.latency_buckets, 0.5), 5.0);
        assert_eq!(quantile_ms(&p.latency_buckets, 0.99), 200.0);
        assert_eq!(quantile_ms(&p.latency_buckets, 1.0), 5000.0);
        assert_eq!(quantile_ms(&[], 0.5), 0.0);
        let s = summarize(&p, 10);
        assert_eq!((s.requests_per_sec, s.error_rate), (10.0, 0.02));
    }

    #[test]
    fn both_sides_of_a_connection_count_once() {
        let side = |s: &str, connections, requests| {
            let mut p = pair("web", "api");
            p.side = s.to_string();
            p.connections = connections;
            p.bytes_sent = 100 * connections;
            for _ in 0..requests {
                add_request(&mut p, 3.0, false);
            }
            p
        };
        // Two outbound reports (two source agents) and the destination's.
        let combined = combine_sides([
            side("outbound", 2, 0),
            side("outbound", 1, 0),
            side("inbound", 3, 5),
        ]);
        assert_eq!(combined.len(), 1);
        let p = &combined[0];
        assert_eq!((p.connections, p.bytes_sent, p.requests), (3, 300, 5));
        assert_eq!(quantile_ms(&p.latency_buckets, 0.5), 5.0);
        // A pair seen on one side only keeps its figures.
        let only = combine_sides([side("outbound", 4, 0)]);
        assert_eq!(only[0].connections, 4);
    }

    #[test]
    fn sums_saturate_rather_than_overflow() {
        let mut a = pair("web", "api");
        a.requests = u64::MAX;
        a.latency_buckets[0] = u64::MAX;
        let b = a.clone();
        merge(&mut a, &b);
        assert_eq!(a.requests, u64::MAX);
        assert_eq!(quantile_ms(&a.latency_buckets, 0.99), 1.0);
    }

    #[test]
    fn merging_adds_everything_and_tolerates_other_bucket_counts() {
        let mut a = pair("web", "api");
        add_request(&mut a, 1.0, false);
        a.connections = 2;
        a.bytes_sent = 10;
        let mut b = pair("web", "api");
        add_request(&mut b, 1.0, false);
        b.denied = 1;
        b.latency_buckets.push(7); // from a version with more buckets
        merge(&mut a, &b);
        assert_eq!(
            (a.requests, a.connections, a.bytes_sent, a.denied),
            (2, 2, 10, 1)
        );
        assert_eq!(a.latency_buckets[0], 2);
        assert_eq!(a.latency_buckets[BUCKETS - 1], 7);
        let mut empty = PairTraffic::default();
        merge(&mut empty, &a);
        assert_eq!(empty.latency_buckets.len(), BUCKETS);
    }
}
