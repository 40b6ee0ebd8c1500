use super::*;

const POLICY: EjectionPolicy = EjectionPolicy {
    max_failures: 3,
    ejection: Duration::from_secs(10),
    interval: Duration::from_secs(1),
    enforcing: 100,
    max_ejection_percent: 100,
};

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], port))
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn fail(o: &Outliers, a: SocketAddr, policy: EjectionPolicy, at: Instant) -> bool {
    o.record("web", a, false, policy, at, 0)
}

#[test]
fn max_failures_in_a_row_eject_until_the_review_after_the_ejection_time() {
    let t0 = Instant::now();
    let o = Outliers::new(t0);
    let at = t0 + Duration::from_millis(300);
    assert!(!fail(&o, addr(1), POLICY, at));
    assert!(!fail(&o, addr(1), POLICY, at));
    assert!(!o.is_ejected("web", addr(1), at));
    assert!(fail(&o, addr(1), POLICY, at), "third failure ejects");
    // 10 s from 0.3 s is 10.3 s; the review after it is at 11 s.
    assert!(o.is_ejected("web", addr(1), t0 + Duration::from_millis(10_900)));
    assert!(
        !o.is_ejected("web", addr(1), t0 + secs(11)),
        "then tried again"
    );
    assert!(!o.is_ejected("web", addr(2), at));
    // Another caller's view of the instance is its own.
    assert!(!o.is_ejected("api", addr(1), at));
}

#[test]
fn a_success_resets_the_count() {
    let t0 = Instant::now();
    let o = Outliers::new(t0);
    fail(&o, addr(1), POLICY, t0);
    fail(&o, addr(1), POLICY, t0);
    o.record("web", addr(1), true, POLICY, t0, 0);
    assert!(!fail(&o, addr(1), POLICY, t0));
    assert!(!fail(&o, addr(1), POLICY, t0));
    assert!(!o.is_ejected("web", addr(1), t0));
}

#[test]
fn enforcing_consecutive_5xx_is_a_chance() {
    let t0 = Instant::now();
    let o = Outliers::new(t0);
    let half = EjectionPolicy {
        enforcing: 50,
        max_failures: 1,
        ..POLICY
    };
    assert!(
        !o.record("web", addr(1), false, half, t0, 50),
        "roll 50 of 0..100: not enforced"
    );
    assert!(!o.is_ejected("web", addr(1), t0));
    assert!(o.record("web", addr(1), false, half, t0, 49));
    let never = EjectionPolicy {
        enforcing: 0,
        max_failures: 1,
        ..POLICY
    };
    assert!(!o.record("web", addr(2), false, never, t0, 0));
}

#[test]
fn repeated_ejections_last_longer_and_are_forgotten_interval_by_interval() {
    let t0 = Instant::now();
    let o = Outliers::new(t0);
    let one = EjectionPolicy {
        max_failures: 1,
        ..POLICY
    };
    assert!(fail(&o, addr(1), one, t0));
    assert!(!o.is_ejected("web", addr(1), t0 + secs(10)));
    // Back at 10 s and failing at once: ejected for 2 × 10 s.
    assert!(fail(&o, addr(1), one, t0 + secs(10)));
    assert!(o.is_ejected("web", addr(1), t0 + secs(29)));
    assert!(!o.is_ejected("web", addr(1), t0 + secs(30)));
    // Back at 30 s; one whole interval in service forgets one ejection,
    // so a failure at 31 s ejects for 2 × 10 s again, not 3 ×.
    assert!(fail(&o, addr(1), one, t0 + secs(31)));
    assert!(o.is_ejected("web", addr(1), t0 + secs(50)));
    assert!(!o.is_ejected("web", addr(1), t0 + secs(51)));
    // Long in service: every ejection forgotten, the entry gone on success.
    o.record("web", addr(1), true, one, t0 + secs(200), 0);
    assert!(o.instances.lock().unwrap().is_empty());
}

#[test]
fn ejection_time_is_capped_at_300s_or_the_base() {
    let t0 = Instant::now();
    let o = Outliers::new(t0);
    let long = EjectionPolicy {
        max_failures: 1,
        ejection: secs(200),
        ..POLICY
    };
    assert!(fail(&o, addr(1), long, t0));
    let back = t0 + secs(200);
    assert!(fail(&o, addr(1), long, back));
    assert!(o.is_ejected("web", addr(1), back + secs(299)));
    assert!(!o.is_ejected("web", addr(1), back + secs(300)), "not 400 s");
}

#[test]
fn at_most_max_ejection_percent_are_left_out_but_always_one() {
    let t0 = Instant::now();
    let o = Outliers::new(t0);
    let one = EjectionPolicy {
        max_failures: 1,
        ..POLICY
    };
    let candidates: Vec<SocketAddr> = (0..10).map(addr).collect();
    for (i, port) in [3, 1, 7].into_iter().enumerate() {
        fail(&o, addr(port), one, t0 + Duration::from_millis(i as u64));
    }
    let now = t0 + secs(1);
    let out = |pct| {
        let allowed = o.allowed("web", &candidates, now, pct);
        (0..10u16)
            .filter(|p| !allowed[*p as usize])
            .collect::<Vec<u16>>()
    };
    assert_eq!(out(10), vec![3], "10% of 10 is one: the earliest ejected");
    assert_eq!(out(0), vec![3], "always one");
    assert_eq!(out(20), vec![1, 3]);
    assert_eq!(out(100), vec![1, 3, 7]);
    assert_eq!(
        o.allowed("api", &candidates, now, 100),
        vec![true; 10],
        "another caller"
    );
    // Every candidate ejected: all of them, rather than none.
    let two = [addr(1), addr(3)];
    assert_eq!(o.allowed("web", &two, now, 100), vec![true, true]);
}

#[test]
fn the_pairs_followed_are_bounded() {
    let t0 = Instant::now();
    let o = Outliers::new(t0);
    let lenient = EjectionPolicy {
        max_failures: 1000,
        ..POLICY
    };
    for i in 0..(MAX_TRACKED + 10) {
        let a = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 80));
        o.record("web", a, false, lenient, t0, 0);
    }
    assert!(o.instances.lock().unwrap().len() <= MAX_TRACKED);
}
