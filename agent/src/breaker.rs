//! Circuit breaking by limits: Consul's `Limits` of a caller's
//! `UpstreamConfig` (Envoy's circuit-breaker thresholds), counted per
//! (calling service, upstream service) on this agent, over all of the
//! upstream's instances:
//!
//! - connections open to the upstream's instances (`MaxConnections`): a TCP
//!   connection, or an HTTP connection the agent keeps to an instance;
//! - HTTP requests waiting for a connection to an instance to be opened or
//!   to be free (`MaxPendingRequests`);
//! - HTTP requests in flight (`MaxConcurrentRequests`).
//!
//! Taking a slot past a limit fails at once, as Envoy's overflow does: the
//! caller answers 503 (with `x-envoy-overloaded`) or resets the connection.
//! Every slot is counted, limited or not, so a limit set later counts what
//! is already open. A slot is given back when its [`Slot`] is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What a slot counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gauge {
    Connections,
    PendingRequests,
    Requests,
}

impl Gauge {
    fn index(self) -> usize {
        self as usize
    }

    /// Consul's name of the limit.
    pub fn limit_name(self) -> &'static str {
        match self {
            Gauge::Connections => "MaxConnections",
            Gauge::PendingRequests => "MaxPendingRequests",
            Gauge::Requests => "MaxConcurrentRequests",
        }
    }
}

/// A limit was reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{upstream}: circuit breaker open ({} reached)", gauge.limit_name())]
pub struct Overflow {
    pub caller: String,
    pub upstream: String,
    pub gauge: Gauge,
    pub limit: u32,
}

type Key = (String, String);

/// The counts of every (caller, upstream) pair with something open.
#[derive(Debug, Default)]
pub struct Breakers {
    counts: Mutex<HashMap<Key, [u32; 3]>>,
}

/// One counted connection or request; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    breakers: Arc<Breakers>,
    key: Key,
    gauge: Gauge,
}

impl Breakers {
    /// Takes a slot of `gauge` for `source`'s calls to `upstream`, unless
    /// `limit` is reached.
    pub fn take(
        self: &Arc<Self>,
        source: &str,
        upstream: &str,
        gauge: Gauge,
        limit: Option<u32>,
    ) -> Result<Slot, Overflow> {
        let key = (source.to_string(), upstream.to_string());
        let mut counts = self.counts.lock().expect("breakers lock");
        let current = counts.get(&key).map_or(0, |c| c[gauge.index()]);
        if let Some(limit) = limit.filter(|limit| current >= *limit) {
            return Err(Overflow {
                caller: key.0,
                upstream: key.1,
                gauge,
                limit,
            });
        }
        counts.entry(key.clone()).or_default()[gauge.index()] += 1;
        Ok(Slot {
            breakers: self.clone(),
            key,
            gauge,
        })
    }

    /// How many slots of `gauge` are taken for the pair.
    pub fn count(&self, source: &str, upstream: &str, gauge: Gauge) -> u32 {
        let counts = self.counts.lock().expect("breakers lock");
        counts
            .get(&(source.to_string(), upstream.to_string()))
            .map_or(0, |c| c[gauge.index()])
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.breakers.counts.lock().expect("breakers lock");
        if let Some(c) = counts.get_mut(&self.key) {
            c[self.gauge.index()] = c[self.gauge.index()].saturating_sub(1);
            if *c == [0; 3] {
                counts.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_refuses_past_it_and_a_dropped_slot_frees_one() {
        let b = Arc::new(Breakers::default());
        let one = b.take("web", "api", Gauge::Requests, Some(2)).unwrap();
        let two = b.take("web", "api", Gauge::Requests, Some(2)).unwrap();
        let e = b.take("web", "api", Gauge::Requests, Some(2)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "api: circuit breaker open (MaxConcurrentRequests reached)"
        );
        // Other gauges, callers and upstreams count apart.
        b.take("web", "api", Gauge::Connections, Some(1)).unwrap();
        b.take("web", "db", Gauge::Requests, Some(1)).unwrap();
        b.take("admin", "api", Gauge::Requests, Some(1)).unwrap();
        drop(one);
        let three = b.take("web", "api", Gauge::Requests, Some(2)).unwrap();
        assert_eq!(b.count("web", "api", Gauge::Requests), 2);
        drop((two, three));
        assert_eq!(b.count("web", "api", Gauge::Requests), 0);
    }

    #[test]
    fn unlimited_slots_are_counted_and_the_map_empties() {
        let b = Arc::new(Breakers::default());
        let slots: Vec<_> = (0..5)
            .map(|_| b.take("web", "api", Gauge::Connections, None).unwrap())
            .collect();
        // A limit set now counts what is already open.
        assert!(b.take("web", "api", Gauge::Connections, Some(5)).is_err());
        drop(slots);
        assert!(b.counts.lock().unwrap().is_empty());
        assert!(b
            .take("web", "api", Gauge::PendingRequests, Some(0))
            .is_err());
        assert!(
            b.counts.lock().unwrap().is_empty(),
            "a refusal leaves nothing"
        );
    }
}
