//! Circuit breaking by outlier detection. When a service's defaults carry a
//! `PassiveHealthCheck` for its upstreams, every connection or request the
//! agent makes for it reports how it went; an instance that fails
//! `MaxFailures` times in a row (refused connections, unreachable nodes,
//! 5xx answers) is left out of balancing for `BaseEjectionTime`, then
//! tried again. Balancing never leaves out every instance of a choice: with
//! all of them ejected it uses them all, rather than refuse traffic that
//! some instance might serve.
//!
//! The decisions are pure functions of the recorded outcomes and the time
//! passed in, so they are tested without waiting.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When an instance is ejected, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectionPolicy {
    pub max_failures: u32,
    pub ejection: Duration,
}

/// The default `BaseEjectionTime`.
pub const DEFAULT_EJECTION: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct InstanceState {
    consecutive_failures: u32,
    ejected_until: Option<Instant>,
}

/// Outcomes per instance address, shared by the agent's proxies.
#[derive(Debug, Default)]
pub struct Outliers {
    instances: Mutex<HashMap<SocketAddr, InstanceState>>,
}

impl Outliers {
    /// Records one outcome at `addr` under `policy`; `true` when this
    /// failure ejects the instance.
    pub fn record(&self, addr: SocketAddr, ok: bool, policy: EjectionPolicy, now: Instant) -> bool {
        let mut instances = self.instances.lock().expect("outliers lock");
        if ok {
            instances.remove(&addr);
            return false;
        }
        let state = instances.entry(addr).or_default();
        state.consecutive_failures += 1;
        if state.consecutive_failures >= policy.max_failures.max(1) {
            state.consecutive_failures = 0;
            state.ejected_until = Some(now + policy.ejection);
            return true;
        }
        false
    }

    /// Whether `addr` is ejected at `now`.
    pub fn is_ejected(&self, addr: SocketAddr, now: Instant) -> bool {
        ejected(&self.instances.lock().expect("outliers lock"), addr, now)
    }

    /// The candidates that are not ejected at `now`, or all of them when
    /// every one is.
    pub fn filter<T: Copy>(
        &self,
        candidates: &[(SocketAddr, T)],
        now: Instant,
    ) -> Vec<(SocketAddr, T)> {
        let instances = self.instances.lock().expect("outliers lock");
        let healthy: Vec<_> = candidates
            .iter()
            .copied()
            .filter(|(addr, _)| !ejected(&instances, *addr, now))
            .collect();
        if healthy.is_empty() {
            candidates.to_vec()
        } else {
            healthy
        }
    }
}

fn ejected(instances: &HashMap<SocketAddr, InstanceState>, addr: SocketAddr, now: Instant) -> bool {
    instances
        .get(&addr)
        .and_then(|s| s.ejected_until)
        .is_some_and(|until| now < until)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: EjectionPolicy = EjectionPolicy {
        max_failures: 3,
        ejection: Duration::from_secs(10),
    };

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn max_failures_in_a_row_eject_for_the_ejection_time() {
        let o = Outliers::default();
        let t0 = Instant::now();
        assert!(!o.record(addr(1), false, POLICY, t0));
        assert!(!o.record(addr(1), false, POLICY, t0));
        assert!(!o.is_ejected(addr(1), t0));
        assert!(o.record(addr(1), false, POLICY, t0), "third failure ejects");
        assert!(o.is_ejected(addr(1), t0 + Duration::from_secs(9)));
        assert!(
            !o.is_ejected(addr(1), t0 + Duration::from_secs(10)),
            "then tried again"
        );
        assert!(!o.is_ejected(addr(2), t0));
    }

    #[test]
    fn a_success_resets_the_count() {
        let o = Outliers::default();
        let t0 = Instant::now();
        o.record(addr(1), false, POLICY, t0);
        o.record(addr(1), false, POLICY, t0);
        o.record(addr(1), true, POLICY, t0);
        assert!(!o.record(addr(1), false, POLICY, t0));
        assert!(!o.record(addr(1), false, POLICY, t0));
        assert!(!o.is_ejected(addr(1), t0));
    }

    #[test]
    fn filtering_never_leaves_nothing() {
        let o = Outliers::default();
        let t0 = Instant::now();
        let one = EjectionPolicy {
            max_failures: 1,
            ..POLICY
        };
        o.record(addr(1), false, one, t0);
        let candidates = [(addr(1), 'a'), (addr(2), 'b')];
        assert_eq!(o.filter(&candidates, t0), vec![(addr(2), 'b')]);
        o.record(addr(2), false, one, t0);
        assert_eq!(
            o.filter(&candidates, t0),
            candidates.to_vec(),
            "all ejected: all"
        );
    }
}
