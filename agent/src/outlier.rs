//! Circuit breaking by outlier detection, with Envoy's semantics for
//! Consul's `PassiveHealthCheck`. When a service's defaults carry one for an
//! upstream, every connection or request the agent makes for it reports how
//! it went, and the outcomes are kept per (calling service, instance):
//!
//! - `MaxFailures` failures in a row (refused connections, unreachable
//!   nodes, 5xx answers) eject the instance, with a chance of
//!   `EnforcingConsecutive5xx` percent;
//! - the ejection lasts `BaseEjectionTime` times the number of times the
//!   instance has been ejected (at most 300 s, or the base if longer), and
//!   ends at the first review after that: reviews come every `Interval`;
//! - each whole `Interval` an instance stays in forgets one past ejection;
//! - at most `MaxEjectionPercent` of a choice's candidates (but always one)
//!   are left out: the earliest ejected. Balancing never leaves out every
//!   instance of a choice: with all of them ejected it uses them all, rather
//!   than refuse traffic that some instance might serve.
//!
//! The decisions are pure functions of the recorded outcomes and the time
//! and dice passed in, so they are tested without waiting.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When an instance is ejected, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectionPolicy {
    pub max_failures: u32,
    /// `BaseEjectionTime`.
    pub ejection: Duration,
    pub interval: Duration,
    /// `EnforcingConsecutive5xx`, in percent.
    pub enforcing: u32,
    pub max_ejection_percent: u32,
}

/// The default `BaseEjectionTime`.
pub const DEFAULT_EJECTION: Duration = Duration::from_secs(30);
/// The default `Interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// The default `MaxEjectionPercent`.
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;
/// Envoy's `max_ejection_time`.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);
/// At most this many (caller, instance) pairs are followed; past it, pairs
/// that are neither ejected nor remembered as ejected are let go first.
pub const MAX_TRACKED: usize = 16_384;

impl EjectionPolicy {
    /// A policy with Envoy's defaults for all but `max_failures`.
    pub fn new(max_failures: u32) -> Self {
        EjectionPolicy {
            max_failures,
            ejection: DEFAULT_EJECTION,
            interval: DEFAULT_INTERVAL,
            enforcing: 100,
            max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct InstanceState {
    consecutive_failures: u32,
    /// Ejections not yet forgotten.
    times_ejected: u32,
    ejected_at: Option<Instant>,
    ejected_until: Option<Instant>,
    /// From when whole intervals in service forget past ejections.
    forget_from: Instant,
}

/// Outcomes per (calling service, instance address), shared by the agent's
/// proxies.
#[derive(Debug)]
pub struct Outliers {
    /// Reviews happen at whole intervals from here.
    epoch: Instant,
    instances: Mutex<HashMap<(String, SocketAddr), InstanceState>>,
}

impl Default for Outliers {
    fn default() -> Self {
        Outliers::new(Instant::now())
    }
}

impl Outliers {
    pub fn new(epoch: Instant) -> Self {
        Outliers {
            epoch,
            instances: Mutex::default(),
        }
    }

    /// The first review at or after `at`.
    fn review_after(&self, at: Instant, interval: Duration) -> Instant {
        let since = at.saturating_duration_since(self.epoch);
        let step = interval.as_nanos().max(1);
        let reviews = since.as_nanos().div_ceil(step);
        self.epoch + Duration::from_nanos((reviews * step).min(u64::MAX as u128) as u64)
    }

    /// Records one outcome of `source`'s call to `addr` under `policy`;
    /// `roll` is a number in `[0, 100)` for `EnforcingConsecutive5xx`.
    /// `true` when this failure ejects the instance.
    pub fn record(
        &self,
        source: &str,
        addr: SocketAddr,
        ok: bool,
        policy: EjectionPolicy,
        now: Instant,
        roll: u32,
    ) -> bool {
        let mut instances = self.instances.lock().expect("outliers lock");
        let key = (source.to_string(), addr);
        if !ok && !instances.contains_key(&key) && instances.len() >= MAX_TRACKED {
            instances
                .retain(|_, s| s.times_ejected > 0 || s.ejected_until.is_some_and(|u| now < u));
            if instances.len() >= MAX_TRACKED {
                return false;
            }
        }
        let Some(state) = instances.get_mut(&key) else {
            if !ok {
                let fresh = InstanceState {
                    consecutive_failures: 0,
                    times_ejected: 0,
                    ejected_at: None,
                    ejected_until: None,
                    forget_from: now,
                };
                let state = instances.entry(key).or_insert(fresh);
                return self.fail(state, policy, now, roll);
            }
            return false;
        };
        forget(state, policy.interval, now);
        if ok {
            state.consecutive_failures = 0;
            let ejected = state.ejected_until.is_some_and(|until| now < until);
            if state.times_ejected == 0 && !ejected {
                instances.remove(&key);
            }
            return false;
        }
        self.fail(state, policy, now, roll)
    }

    fn fail(
        &self,
        state: &mut InstanceState,
        policy: EjectionPolicy,
        now: Instant,
        roll: u32,
    ) -> bool {
        state.consecutive_failures += 1;
        if state.consecutive_failures < policy.max_failures.max(1) {
            return false;
        }
        state.consecutive_failures = 0;
        if roll >= policy.enforcing {
            return false;
        }
        state.times_ejected += 1;
        let cap = MAX_EJECTION.max(policy.ejection);
        let ejection = policy.ejection.saturating_mul(state.times_ejected).min(cap);
        let end = now.checked_add(ejection).unwrap_or(now + MAX_EJECTION);
        let until = self.review_after(end, policy.interval);
        state.ejected_at = Some(now);
        state.ejected_until = Some(until);
        state.forget_from = until;
        true
    }

    /// Whether `source`'s calls leave `addr` out at `now`.
    pub fn is_ejected(&self, source: &str, addr: SocketAddr, now: Instant) -> bool {
        let instances = self.instances.lock().expect("outliers lock");
        ejected_at(&instances, source, addr, now).is_some()
    }

    /// Which of one choice's `candidates` (by address) `source` may use at
    /// `now`: those not ejected, with at most `max_percent` of them left
    /// out (at least one, the earliest ejected), or all of them when every
    /// one is.
    pub fn allowed(
        &self,
        source: &str,
        candidates: &[SocketAddr],
        now: Instant,
        max_percent: u32,
    ) -> Vec<bool> {
        let instances = self.instances.lock().expect("outliers lock");
        let mut ejected: Vec<(Instant, usize)> = candidates
            .iter()
            .enumerate()
            .filter_map(|(k, addr)| Some((ejected_at(&instances, source, *addr, now)?, k)))
            .collect();
        let cap = (candidates.len() * max_percent as usize / 100).max(1);
        // The earliest ejected stay out; later ones past the cap come back.
        ejected.sort();
        ejected.truncate(cap);
        let mut allowed = vec![true; candidates.len()];
        for (_, k) in &ejected {
            allowed[*k] = false;
        }
        if !allowed.contains(&true) {
            allowed.fill(true);
        }
        allowed
    }
}

/// Forgets one past ejection per whole interval spent in service since
/// `forget_from`.
fn forget(state: &mut InstanceState, interval: Duration, now: Instant) {
    if now < state.forget_from || state.times_ejected == 0 {
        return;
    }
    let step = interval.as_nanos().max(1);
    let whole = now.duration_since(state.forget_from).as_nanos() / step;
    let whole = whole.min(u32::MAX as u128) as u32;
    state.times_ejected = state.times_ejected.saturating_sub(whole);
    state.forget_from += Duration::from_nanos((whole as u128 * step).min(u64::MAX as u128) as u64);
}

/// When `addr` was ejected, if `source`'s calls leave it out at `now`.
fn ejected_at(
    instances: &HashMap<(String, SocketAddr), InstanceState>,
    source: &str,
    addr: SocketAddr,
    now: Instant,
) -> Option<Instant> {
    let state = instances.get(&(source.to_string(), addr))?;
    let until = state.ejected_until?;
    (now < until).then_some(state.ejected_at?)
}

#[cfg(test)]
mod tests;
