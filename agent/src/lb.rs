//! Choosing an instance. Without a resolver's `LoadBalancer`: power of two
//! choices over in-flight requests. Two instances are picked at random and
//! the one with fewer active connections wins, which spreads load almost as
//! well as least-connections without herding on one instance. With one:
//! Consul's policies ([`weft_api::load_balancer`]), over the candidates in
//! address order, so that every agent lays out a consistent-hash table alike.
//! The tables are built once per set of candidates and kept
//! ([`Balancer`]). The decisions are pure: the caller supplies the random
//! numbers and the in-flight counts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use weft_api::load_balancer::{LoadBalancer, Maglev, Policy, Ring};

/// How many consistent-hash tables are kept (one per service and set of
/// instances, at most 1 MiB each); past that the cache starts again.
const MAX_TABLES: usize = 64;

enum Table {
    Ring(Ring),
    Maglev(Maglev),
}

/// A table's key: the policy, the ring's size and the candidates.
type TableKey = (Policy, usize, Vec<SocketAddr>);

/// Balancing state the agent's proxies share: round-robin turns per
/// service, and the consistent-hash tables in use.
#[derive(Default)]
pub struct Balancer {
    turns: Mutex<HashMap<String, usize>>,
    tables: Mutex<HashMap<TableKey, Arc<Table>>>,
}

impl Balancer {
    /// Picks one of `all` (instances of `service`, each with its in-flight
    /// count in `loads`) that `allowed` takes (not ejected, not tried
    /// already), under `policy`; `hash` is the request's or connection's
    /// hash under the policy's hash policies; `draw` gives random numbers.
    /// A consistent-hash table is laid over `all`, so that instances left
    /// out for a while move only their own keys and build no new table.
    /// None only when no instance is allowed.
    pub fn choose(
        &self,
        service: &str,
        policy: Option<&LoadBalancer>,
        (all, allowed): (&[SocketAddr], &[bool]),
        loads: &[u64],
        hash: Option<u64>,
        mut draw: impl FnMut() -> usize,
    ) -> Option<usize> {
        let mut ok: Vec<usize> = (0..all.len()).filter(|i| allowed[*i]).collect();
        let n = ok.len();
        if n == 0 {
            return None;
        }
        let Some(lb) = policy.filter(|lb| lb.policy.is_some()) else {
            let l: Vec<u64> = ok.iter().map(|i| loads[*i]).collect();
            return p2c(&l, draw(), draw()).map(|k| ok[k]);
        };
        ok.sort_by_key(|i| all[*i]);
        let chosen = match lb.policy.expect("filtered") {
            Policy::Random => ok[draw() % n],
            Policy::RoundRobin => {
                let mut turns = self.turns.lock().expect("turns lock");
                let turn = turns.entry(service.to_string()).or_default();
                let at = *turn % n;
                *turn = turn.wrapping_add(1);
                ok[at]
            }
            Policy::LeastRequest => {
                let sorted: Vec<u64> = ok.iter().map(|i| loads[*i]).collect();
                ok[least_of(&sorted, lb.choice_count(), &mut draw)?]
            }
            policy @ (Policy::RingHash | Policy::Maglev) => match hash {
                // No hash for this request: a random instance, as in Envoy.
                None => ok[draw() % n],
                Some(hash) => {
                    let mut every: Vec<usize> = (0..all.len()).collect();
                    every.sort_by_key(|i| all[*i]);
                    let sorted: Vec<SocketAddr> = every.iter().map(|i| all[*i]).collect();
                    let size = if policy == Policy::RingHash {
                        lb.ring_size(all.len())
                    } else {
                        0
                    };
                    let table = self.table(policy, size, sorted);
                    every[table.pick_where(hash, |k| allowed[every[k]])?]
                }
            },
        };
        Some(chosen)
    }

    /// The table for `candidates` (in address order), built when new.
    fn table(&self, policy: Policy, size: usize, candidates: Vec<SocketAddr>) -> Arc<Table> {
        let key = (policy, size, candidates);
        if let Some(t) = self.tables.lock().expect("tables lock").get(&key) {
            return t.clone();
        }
        // Built without the lock: other services' requests go on meanwhile.
        let names: Vec<String> = key.2.iter().map(SocketAddr::to_string).collect();
        let table = Arc::new(match policy {
            Policy::Maglev => Table::Maglev(Maglev::new(&names)),
            _ => Table::Ring(Ring::new(&names, size)),
        });
        let mut tables = self.tables.lock().expect("tables lock");
        if tables.len() >= MAX_TABLES {
            tables.clear();
        }
        tables.insert(key, table.clone());
        table
    }
}

impl Table {
    fn pick_where(&self, hash: u64, allowed: impl Fn(usize) -> bool) -> Option<usize> {
        match self {
            Table::Ring(r) => r.pick_where(hash, allowed),
            Table::Maglev(m) => m.pick_where(hash, allowed),
        }
    }
}

/// Least request over `choices` distinct candidates drawn at random (all of
/// them when there are no more).
pub fn least_of(loads: &[u64], choices: usize, mut draw: impl FnMut() -> usize) -> Option<usize> {
    let n = loads.len();
    if n == 0 {
        return None;
    }
    if choices >= n {
        return (0..n).min_by_key(|i| loads[*i]);
    }
    let mut drawn: Vec<usize> = Vec::with_capacity(choices);
    while drawn.len() < choices {
        // Draw among those not drawn yet, so the loop ends.
        let mut k = draw() % (n - drawn.len());
        let mut pick = 0;
        loop {
            if !drawn.contains(&pick) {
                if k == 0 {
                    break;
                }
                k -= 1;
            }
            pick += 1;
        }
        drawn.push(pick);
    }
    drawn.into_iter().min_by_key(|i| loads[*i])
}

/// Picks an index into `loads` (in-flight connections per candidate) from
/// two random draws `r1`, `r2`. None when there is no candidate.
pub fn p2c(loads: &[u64], r1: usize, r2: usize) -> Option<usize> {
    match loads.len() {
        0 => None,
        1 => Some(0),
        n => {
            let a = r1 % n;
            let mut b = r2 % (n - 1);
            if b >= a {
                b += 1;
            }
            Some(if loads[b] < loads[a] { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_candidates_no_choice() {
        assert_eq!(p2c(&[], 1, 2), None);
        assert_eq!(p2c(&[7], 1, 2), Some(0));
    }

    #[test]
    fn the_less_loaded_of_the_two_wins() {
        assert_eq!(p2c(&[5, 1], 0, 0), Some(1));
        assert_eq!(p2c(&[1, 5], 0, 0), Some(0));
    }

    #[test]
    fn two_draws_never_pick_the_same_candidate_twice() {
        for r1 in 0..10 {
            for r2 in 0..10 {
                let loads = [0, 0, 0];
                let a = r1 % 3;
                let mut b = r2 % 2;
                if b >= a {
                    b += 1;
                }
                assert_ne!(a, b);
                assert!(p2c(&loads, r1, r2).is_some());
            }
        }
    }

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, 1], 8000 + i)))
            .collect()
    }

    fn lb(json: &str) -> LoadBalancer {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn round_robin_takes_turns_per_service_in_address_order() {
        let b = Balancer::default();
        let policy = lb(r#"{"Policy":"round_robin"}"#);
        let mut c = addrs(3);
        c.reverse(); // the view's order does not matter
        let picks: Vec<_> = (0..6)
            .map(|_| {
                c[b.choose("api", Some(&policy), (&c, &[true; 3]), &[0; 3], None, || 0)
                    .unwrap()]
            })
            .collect();
        let a = addrs(3);
        assert_eq!(picks, [a[0], a[1], a[2], a[0], a[1], a[2]]);
        // Another service has turns of its own.
        let other = b
            .choose("db", Some(&policy), (&c, &[true; 3]), &[0; 3], None, || 0)
            .unwrap();
        assert_eq!(c[other], a[0]);
    }

    #[test]
    fn least_request_draws_choice_count_distinct_candidates() {
        // Draws among the not-yet-drawn: 3 % 4 picks index 3, then 3 % 3
        // picks the first left, index 0. The least loaded overall (index 2)
        // was not drawn.
        let loads = [5, 9, 1, 7];
        assert_eq!(least_of(&loads, 2, || 3), Some(0));
        // Three draws: 3, then 0, then 3 % 2 = 1 among {1, 2}: index 2.
        assert_eq!(least_of(&loads, 3, || 3), Some(2));
        assert_eq!(
            least_of(&loads, 9, || 0),
            Some(2),
            "more choices than candidates: all"
        );
        assert_eq!(least_of(&[], 2, || 0), None);
        let policy = lb(r#"{"Policy":"least_request","LeastRequestConfig":{"ChoiceCount":4}}"#);
        let c = addrs(4);
        let b = Balancer::default();
        let loads = [4, 3, 0, 8];
        assert_eq!(
            b.choose("api", Some(&policy), (&c, &[true; 4]), &loads, None, || 1),
            Some(2)
        );
    }

    #[test]
    fn hashing_policies_keep_a_key_on_one_instance() {
        let b = Balancer::default();
        let c = addrs(5);
        for json in [r#"{"Policy":"ring_hash"}"#, r#"{"Policy":"maglev"}"#] {
            let policy = lb(json);
            let first = b.choose(
                "api",
                Some(&policy),
                (&c, &[true; 5]),
                &[0; 5],
                Some(42),
                || 0,
            );
            for _ in 0..20 {
                let again = b.choose(
                    "api",
                    Some(&policy),
                    (&c, &[true; 5]),
                    &[9; 5],
                    Some(42),
                    || 3,
                );
                assert_eq!(again, first, "{json}");
            }
            // Another agent, the instances listed in another order: the same.
            let mut shuffled = c.clone();
            shuffled.rotate_left(2);
            let other = Balancer::default()
                .choose(
                    "api",
                    Some(&policy),
                    (&shuffled, &[true; 5]),
                    &[0; 5],
                    Some(42),
                    || 0,
                )
                .unwrap();
            assert_eq!(shuffled[other], c[first.unwrap()], "{json}");
            // Many keys spread over every instance.
            let mut hit = [false; 5];
            for h in 0..200u64 {
                let key = xxhash_rust::xxh64::xxh64(&h.to_le_bytes(), 0);
                hit[b
                    .choose(
                        "api",
                        Some(&policy),
                        (&c, &[true; 5]),
                        &[0; 5],
                        Some(key),
                        || 0,
                    )
                    .unwrap()] = true;
            }
            assert!(hit.iter().all(|h| *h), "{json}: {hit:?}");
        }
    }

    #[test]
    fn an_instance_left_out_keeps_the_table_and_the_others_keys() {
        let b = Balancer::default();
        let c = addrs(5);
        let policy = lb(r#"{"Policy":"maglev"}"#);
        let pick = |allowed: &[bool], key: u64| {
            b.choose(
                "api",
                Some(&policy),
                (&c, allowed),
                &[0; 5],
                Some(key),
                || 0,
            )
        };
        for h in 0..300u64 {
            let key = xxhash_rust::xxh64::xxh64(&h.to_le_bytes(), 0);
            let all = pick(&[true; 5], key).unwrap();
            let without = pick(&[true, true, false, true, true], key).unwrap();
            assert_ne!(without, 2);
            if all != 2 {
                assert_eq!(all, without);
            }
        }
        assert_eq!(b.tables.lock().unwrap().len(), 1, "one table for both");
        assert_eq!(pick(&[false; 5], 1), None);
    }

    #[test]
    fn the_table_cache_is_bounded() {
        let b = Balancer::default();
        let policy = lb(r#"{"Policy":"ring_hash","RingHashConfig":{"MinimumRingSize":8}}"#);
        for n in 1..(MAX_TABLES as u16 + 10) {
            let c = addrs(n);
            b.choose(
                "api",
                Some(&policy),
                (&c, &vec![true; c.len()]),
                &vec![0; c.len()],
                Some(1),
                || 0,
            );
        }
        assert!(b.tables.lock().unwrap().len() <= MAX_TABLES);
    }

    #[test]
    fn load_spreads_over_all_instances() {
        let mut loads = [0u64; 4];
        let mut seed = 12345usize;
        for _ in 0..400 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let i = p2c(&loads, seed >> 7, seed >> 23).unwrap();
            loads[i] += 1;
        }
        assert!(loads.iter().all(|l| *l >= 90), "{loads:?}");
    }
}
