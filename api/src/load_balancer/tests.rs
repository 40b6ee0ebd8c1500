use super::*;

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("10.0.0.{i}:80")).collect()
}

fn lb(json: &str) -> LoadBalancer {
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"))
}

#[test]
fn consuls_policies_parse_and_empty_is_weft_s_default() {
    assert_eq!(lb(r#"{"Policy":""}"#).policy, None);
    assert_eq!(lb(r#"{"Policy":"maglev"}"#).policy, Some(Policy::Maglev));
    assert_eq!(
        lb(r#"{"Policy":"least_request"}"#).policy,
        Some(Policy::LeastRequest)
    );
    let e = serde_json::from_str::<LoadBalancer>(r#"{"Policy":"fastest"}"#).unwrap_err();
    assert!(e.to_string().contains("unknown variant `fastest`"), "{e}");
}

#[test]
fn validation_follows_consul() {
    let err = |json: &str, http: bool| lb(json).validate(http).unwrap_err().to_string();
    assert!(err(
        r#"{"Policy":"random","HashPolicies":[{"SourceIP":true}]}"#,
        true
    )
    .starts_with("LoadBalancer.HashPolicies: only with"));
    assert!(err(
        r#"{"Policy":"random","LeastRequestConfig":{"ChoiceCount":3}}"#,
        true
    )
    .starts_with("LoadBalancer.LeastRequestConfig: only with"));
    assert!(err(r#"{"Policy":"maglev","RingHashConfig":{}}"#, true)
        .starts_with("LoadBalancer.RingHashConfig: only with"));
    assert!(err(
        r#"{"Policy":"least_request","LeastRequestConfig":{"ChoiceCount":1}}"#,
        true
    )
    .contains("ChoiceCount: 1 is not between 2"));
    assert!(err(
        r#"{"Policy":"ring_hash","RingHashConfig":{"MinimumRingSize":4096,"MaximumRingSize":1024}}"#,
        true
    )
    .contains("MaximumRingSize: 1024 is below"));
    assert!(err(
        r#"{"Policy":"ring_hash","RingHashConfig":{"MinimumRingSize":100000000}}"#,
        true
    )
    .contains("more than weft builds"));
    let hp = |p: &str| format!(r#"{{"Policy":"maglev","HashPolicies":[{p}]}}"#);
    assert!(err(
        &hp(r#"{"Field":"header","FieldValue":"x","SourceIP":true}"#),
        true
    )
    .contains("either Field or SourceIP"));
    assert!(err(&hp(r#"{"Terminal":true}"#), true).contains("one of Field or SourceIP"));
    assert!(err(&hp(r#"{"Field":"header"}"#), true).contains("FieldValue: names the"));
    assert!(err(&hp(r#"{"Field":"header","FieldValue":"x"}"#), false)
        .contains("needs the service to speak http"));
    assert!(err(
        &hp(r#"{"Field":"header","FieldValue":"x","CookieConfig":{"Session":true}}"#),
        true
    )
    .contains("CookieConfig: only with Field \"cookie\""));
    assert!(err(
        &hp(r#"{"Field":"cookie","FieldValue":"id","CookieConfig":{"Session":true,"TTL":"1h"}}"#),
        true
    )
    .contains("either Session or TTL"));
    assert!(err(
        &hp(r#"{"Field":"cookie","FieldValue":"id","CookieConfig":{"Path":"/a;Domain=evil"}}"#),
        true
    )
    .contains("Path"));
    assert!(err(
        &hp(r#"{"Field":"cookie","FieldValue":"a=b","CookieConfig":{"Session":true}}"#),
        true
    )
    .contains("a cookie weft makes"));
    lb(&hp(r#"{"SourceIP":true}"#)).validate(false).unwrap();
    lb(&hp(
        r#"{"Field":"query_parameter","FieldValue":"user"},{"SourceIP":true,"Terminal":true}"#,
    ))
    .validate(true)
    .unwrap();
}

#[test]
fn hash_policies_read_headers_cookies_query_and_source() {
    let policies = |json: &str| lb(json).hash_policies;
    let req = Request::new("GET", "/")
        .with_header("x-user", "ada")
        .with_header("Cookie", "theme=dark; session=s1")
        .with_query("tenant=t7");
    let ip: IpAddr = "10.1.2.3".parse().unwrap();
    let one = |p: &str| {
        hash_request(
            &policies(&format!(r#"{{"HashPolicies":[{p}]}}"#)),
            Some(&req),
            Some(ip),
            0,
        )
        .hash
    };
    assert_eq!(
        one(r#"{"Field":"header","FieldValue":"X-User"}"#),
        Some(xxh64(b"ada", 0))
    );
    assert_eq!(
        one(r#"{"Field":"cookie","FieldValue":"session"}"#),
        Some(xxh64(b"s1", 0))
    );
    assert_eq!(
        one(r#"{"Field":"query_parameter","FieldValue":"tenant"}"#),
        Some(xxh64(b"t7", 0))
    );
    assert_eq!(one(r#"{"SourceIP":true}"#), Some(xxh64(b"10.1.2.3", 0)));
    assert_eq!(one(r#"{"Field":"header","FieldValue":"x-none"}"#), None);
    // Two hashes combine; a terminal one that hashed ends the list.
    let both = one(r#"{"Field":"header","FieldValue":"x-user"},{"SourceIP":true}"#);
    assert_eq!(
        both,
        Some(xxh64(b"ada", 0).rotate_left(1) ^ xxh64(b"10.1.2.3", 0))
    );
    let terminal =
        one(r#"{"Field":"header","FieldValue":"x-user","Terminal":true},{"SourceIP":true}"#);
    assert_eq!(terminal, Some(xxh64(b"ada", 0)));
    let skipped =
        one(r#"{"Field":"header","FieldValue":"x-none","Terminal":true},{"SourceIP":true}"#);
    assert_eq!(
        skipped,
        Some(xxh64(b"10.1.2.3", 0)),
        "a terminal that hashed nothing"
    );
    // A connection (no request) hashes on its source only.
    let p = policies(
        r#"{"HashPolicies":[{"Field":"header","FieldValue":"x-user"},{"SourceIP":true}]}"#,
    );
    assert_eq!(
        hash_request(&p, None, Some(ip), 0).hash,
        Some(xxh64(b"10.1.2.3", 0))
    );
}

#[test]
fn a_missing_cookie_is_made_and_hashed_on() {
    let p = lb(r#"{"HashPolicies":[{"Field":"cookie","FieldValue":"route","CookieConfig":{"TTL":"1h","Path":"/"}}]}"#)
        .hash_policies;
    let fresh = hash_request(&p, Some(&Request::new("GET", "/")), None, 0xabc);
    let cookie = fresh.new_cookie.unwrap();
    assert_eq!(cookie.value, "0000000000000abc");
    assert_eq!(
        cookie.header_value(),
        "route=0000000000000abc; Max-Age=3600; Path=/; HttpOnly"
    );
    // The client sends it back: the same hash, nothing new to set.
    let back = Request::new("GET", "/").with_header("cookie", format!("route={}", cookie.value));
    let again = hash_request(&p, Some(&back), None, 0xdef);
    assert_eq!(again.hash, fresh.hash);
    assert_eq!(again.new_cookie, None);
    // Without CookieConfig nothing is made.
    let plain = lb(r#"{"HashPolicies":[{"Field":"cookie","FieldValue":"route"}]}"#).hash_policies;
    assert_eq!(
        hash_request(&plain, Some(&Request::new("GET", "/")), None, 1),
        RequestHash::default()
    );
}

/// How many of `hashes` go to another instance when the table changes.
fn moved(
    a: impl Fn(u64) -> Option<usize>,
    ka: &[String],
    b: impl Fn(u64) -> Option<usize>,
    kb: &[String],
    hashes: &[u64],
) -> usize {
    hashes
        .iter()
        .filter(|h| ka[a(**h).unwrap()] != kb[b(**h).unwrap()])
        .count()
}

fn hashes(n: u64) -> Vec<u64> {
    (0..n).map(|i| xxh64(&i.to_le_bytes(), 7)).collect()
}

#[test]
fn ring_hash_spreads_keys_and_moves_few_when_an_instance_goes() {
    let (five, four) = (keys(5), keys(4));
    let ring5 = Ring::new(&five, 1024);
    let ring4 = Ring::new(&four, 1024);
    let hs = hashes(10_000);
    let mut counts = [0usize; 5];
    for h in &hs {
        counts[ring5.pick(*h).unwrap()] += 1;
    }
    assert!(
        counts.iter().all(|c| (1200..=2800).contains(c)),
        "{counts:?}"
    );
    // Removing one of five moves its share and a little more (each of the
    // four gains points, as in Envoy), far from the 80% a modulo would.
    let m = moved(|h| ring5.pick(h), &five, |h| ring4.pick(h), &four, &hs);
    assert!(
        m >= counts[4] && m <= hs.len() * 2 / 5,
        "moved {m}, the removed one had {}",
        counts[4]
    );
    assert_eq!(Ring::new(&[], 1024).pick(1), None);
    // Lookups wrap past the last point.
    assert!(ring5.pick(u64::MAX).is_some());
}

#[test]
fn maglev_gives_equal_shares_and_moves_few_when_an_instance_goes() {
    let (five, four) = (keys(5), keys(4));
    let t5 = Maglev::new(&five);
    let t4 = Maglev::new(&four);
    let mut shares = [0usize; 5];
    for slot in &t5.table {
        shares[*slot as usize] += 1;
    }
    let even = MAGLEV_TABLE / 5;
    assert!(shares.iter().all(|s| s.abs_diff(even) <= 1), "{shares:?}");
    let hs = hashes(10_000);
    let m = moved(|h| t5.pick(h), &five, |h| t4.pick(h), &four, &hs);
    // The removed instance's fifth must move; Maglev moves a little more.
    assert!((1500..=3000).contains(&m), "moved {m}");
    // A small prime table for the fill loop with more instances than usual.
    let small = Maglev::with_size(&keys(7), 13);
    assert!(small.table.iter().all(|s| (*s as usize) < 7));
}

#[test]
fn ring_size_follows_envoy_within_weft_s_bound() {
    let none = LoadBalancer::default();
    assert_eq!(none.ring_size(3), 1024);
    assert_eq!(none.ring_size(5000), 5000);
    let sized = lb(
        r#"{"Policy":"ring_hash","RingHashConfig":{"MinimumRingSize":64,"MaximumRingSize":128}}"#,
    );
    assert_eq!(sized.ring_size(3), 64);
    assert_eq!(sized.ring_size(500), 128);
    assert_eq!(lb(r#"{"Policy":"least_request"}"#).choice_count(), 2);
    assert_eq!(
        lb(r#"{"Policy":"least_request","LeastRequestConfig":{"ChoiceCount":5}}"#).choice_count(),
        5
    );
}

#[test]
fn leaving_an_instance_out_moves_only_its_keys() {
    let k = keys(5);
    let ring = Ring::new(&k, 1024);
    let maglev = Maglev::new(&k);
    for h in hashes(2000) {
        for (all, without) in [
            (ring.pick(h), ring.pick_where(h, |i| i != 2)),
            (maglev.pick(h), maglev.pick_where(h, |i| i != 2)),
        ] {
            if all == Some(2) {
                assert!(without.is_some_and(|i| i != 2));
            } else {
                assert_eq!(all, without, "a key of another instance stays");
            }
        }
    }
    assert_eq!(ring.pick_where(1, |_| false), None);
    assert_eq!(maglev.pick_where(1, |_| false), None);
}
