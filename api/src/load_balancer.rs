//! Consul's `LoadBalancer` of a service-resolver: which instance of the
//! service a connection or request goes to. Pure: the policy as written,
//! its validation, the hash of a request under `HashPolicies`, and the two
//! consistent-hash tables (Envoy's ring hash and Maglev), built once per set
//! of instances and looked up per request.
//!
//! - `round_robin`, `random`, `least_request` (`LeastRequestConfig.ChoiceCount`
//!   candidates drawn at random, the one with the fewest requests in flight
//!   wins; 2 by default) and, without a `LoadBalancer`, weft's default: least
//!   request over two choices.
//! - `ring_hash` (`RingHashConfig.MinimumRingSize`, `MaximumRingSize`) and
//!   `maglev` map a request's hash to an instance so that the same key keeps
//!   going to the same instance while the set of instances stays, and moves
//!   as few keys as it can when it changes. A request without a hash (no
//!   policy produced one) goes to a random instance, as in Envoy.
//! - `HashPolicies`, in order: `Field` `header`, `cookie` or
//!   `query_parameter` named by `FieldValue`, or `SourceIP`. Hashes of several
//!   policies are combined; a `Terminal` policy that produced a hash ends the
//!   list. A `cookie` policy with `CookieConfig` (`TTL` or `Session`) makes
//!   the cookie when the request has none: the request is hashed on the new
//!   value and the answer sets it, so the client sticks from then on.
//!
//! Hashes are xxHash64, as Envoy's, so every agent maps a key alike.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh64::xxh64;

use crate::duration::parse_duration;
use crate::http_match::Request;

/// Envoy's default `MinimumRingSize`.
pub const DEFAULT_MIN_RING: u64 = 1024;
/// Envoy's default `MaximumRingSize`.
pub const DEFAULT_MAX_RING: u64 = 8 * 1024 * 1024;
/// The largest ring weft builds (entries, 1 MiB of memory); a
/// `MinimumRingSize` above it is refused, a larger `MaximumRingSize` is
/// only a bound that is never reached.
pub const MAX_RING: u64 = 1 << 16;
/// Maglev's table size (a prime, Envoy's default).
pub const MAGLEV_TABLE: usize = 65_537;
/// The largest `ChoiceCount`.
pub const MAX_CHOICE_COUNT: u32 = 64;
/// At most this many hash policies.
pub const MAX_HASH_POLICIES: usize = 16;

/// A load-balancing policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    RoundRobin,
    LeastRequest,
    Random,
    RingHash,
    Maglev,
}

impl Policy {
    fn hashes(self) -> bool {
        matches!(self, Policy::RingHash | Policy::Maglev)
    }
}

/// `LoadBalancer` of a service-resolver.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct LoadBalancer {
    /// None (Consul's `""`): weft's default, least request over two choices.
    #[serde(
        default,
        deserialize_with = "empty_is_none",
        skip_serializing_if = "Option::is_none"
    )]
    pub policy: Option<Policy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub least_request_config: Option<LeastRequestConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_hash_config: Option<RingHashConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hash_policies: Vec<HashPolicy>,
}

fn empty_is_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Policy>, D::Error> {
    let text = String::deserialize(d)?;
    if text.is_empty() {
        return Ok(None);
    }
    Policy::deserialize(serde::de::value::StrDeserializer::<D::Error>::new(&text)).map(Some)
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct LeastRequestConfig {
    /// A number, or a string holding one (Consul decodes weakly, and its
    /// docs write `ChoiceCount = "2"`).
    #[serde(default, deserialize_with = "number_or_text")]
    pub choice_count: u32,
}

fn number_or_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Weak {
        Number(u32),
        Text(String),
    }
    match Weak::deserialize(d)? {
        Weak::Number(n) => Ok(n),
        Weak::Text(t) => t.trim().parse().map_err(|_| {
            serde::de::Error::custom(format!("ChoiceCount: {t:?} is not a whole number"))
        }),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct RingHashConfig {
    #[serde(default)]
    pub minimum_ring_size: u64,
    #[serde(default)]
    pub maximum_ring_size: u64,
}

/// What a hash policy hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashField {
    Header,
    Cookie,
    QueryParameter,
}

/// One of `HashPolicies`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct HashPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<HashField>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie_config: Option<CookieConfig>,
    #[serde(rename = "SourceIP", default, skip_serializing_if = "is_false")]
    pub source_ip: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub terminal: bool,
}

/// How a `cookie` policy makes its cookie when a request has none.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct CookieConfig {
    /// A session cookie (no expiry).
    #[serde(default, skip_serializing_if = "is_false")]
    pub session: bool,
    /// The cookie's lifetime, e.g. `"1h"`.
    #[serde(rename = "TTL", default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Why a `LoadBalancer` was refused; the message starts with the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct LoadBalancerError {
    pub field: String,
    pub reason: String,
}

fn refuse(field: impl Into<String>, reason: impl Into<String>) -> LoadBalancerError {
    LoadBalancerError {
        field: field.into(),
        reason: reason.into(),
    }
}

impl LoadBalancer {
    /// Checks the policy at write time, as Consul does, for a service that
    /// speaks HTTP (`http`) or not.
    pub fn validate(&self, http: bool) -> Result<(), LoadBalancerError> {
        let policy = self.policy;
        if self.least_request_config.is_some() && policy != Some(Policy::LeastRequest) {
            return Err(refuse(
                "LoadBalancer.LeastRequestConfig",
                "only with Policy \"least_request\"",
            ));
        }
        if self.ring_hash_config.is_some() && policy != Some(Policy::RingHash) {
            return Err(refuse(
                "LoadBalancer.RingHashConfig",
                "only with Policy \"ring_hash\"",
            ));
        }
        if !self.hash_policies.is_empty() && !policy.is_some_and(Policy::hashes) {
            return Err(refuse(
                "LoadBalancer.HashPolicies",
                "only with Policy \"ring_hash\" or \"maglev\"",
            ));
        }
        if let Some(c) = &self.least_request_config {
            if c.choice_count != 0 && !(2..=MAX_CHOICE_COUNT).contains(&c.choice_count) {
                return Err(refuse(
                    "LoadBalancer.LeastRequestConfig.ChoiceCount",
                    format!("{} is not between 2 and {MAX_CHOICE_COUNT}", c.choice_count),
                ));
            }
        }
        if let Some(c) = &self.ring_hash_config {
            let field = "LoadBalancer.RingHashConfig";
            if c.minimum_ring_size > MAX_RING {
                return Err(refuse(
                    format!("{field}.MinimumRingSize"),
                    format!(
                        "{} is more than weft builds ({MAX_RING})",
                        c.minimum_ring_size
                    ),
                ));
            }
            if c.maximum_ring_size != 0 && c.maximum_ring_size < c.minimum_ring_size {
                return Err(refuse(
                    format!("{field}.MaximumRingSize"),
                    format!(
                        "{} is below MinimumRingSize {}",
                        c.maximum_ring_size, c.minimum_ring_size
                    ),
                ));
            }
        }
        if self.hash_policies.len() > MAX_HASH_POLICIES {
            return Err(refuse(
                "LoadBalancer.HashPolicies",
                format!("at most {MAX_HASH_POLICIES}"),
            ));
        }
        for (i, p) in self.hash_policies.iter().enumerate() {
            p.validate(&format!("LoadBalancer.HashPolicies[{i}]"), http)?;
        }
        Ok(())
    }

    /// The ring size to build for `instances`: Envoy's, at least
    /// `MinimumRingSize` and one entry per instance, at most
    /// `MaximumRingSize` (and [`MAX_RING`]).
    pub fn ring_size(&self, instances: usize) -> usize {
        let (min, max) = match &self.ring_hash_config {
            Some(c) => (
                if c.minimum_ring_size == 0 {
                    DEFAULT_MIN_RING
                } else {
                    c.minimum_ring_size
                },
                if c.maximum_ring_size == 0 {
                    DEFAULT_MAX_RING
                } else {
                    c.maximum_ring_size
                },
            ),
            None => (DEFAULT_MIN_RING, DEFAULT_MAX_RING),
        };
        let size = min.max(instances as u64).min(max).min(MAX_RING);
        size as usize
    }

    /// `ChoiceCount` of least request (2 when not given).
    pub fn choice_count(&self) -> usize {
        match &self.least_request_config {
            Some(c) if c.choice_count >= 2 => c.choice_count as usize,
            _ => 2,
        }
    }
}

impl HashPolicy {
    fn validate(&self, field: &str, http: bool) -> Result<(), LoadBalancerError> {
        match (&self.field, self.source_ip) {
            (Some(_), true) => {
                return Err(refuse(field, "either Field or SourceIP, not both"));
            }
            (None, false) => return Err(refuse(field, "one of Field or SourceIP is required")),
            (None, true) => {
                if self.field_value.is_some() || self.cookie_config.is_some() {
                    return Err(refuse(
                        field,
                        "FieldValue and CookieConfig go with Field, not SourceIP",
                    ));
                }
            }
            (Some(f), false) => {
                if !http {
                    return Err(refuse(
                        format!("{field}.Field"),
                        "hashing on a request field needs the service to speak http, http2 or \
                         grpc (SourceIP works for tcp)",
                    ));
                }
                let value = self.field_value.as_deref().unwrap_or("");
                if value.is_empty() {
                    return Err(refuse(
                        format!("{field}.FieldValue"),
                        "names the header, cookie or query parameter to hash; required with Field",
                    ));
                }
                if *f == HashField::Header
                    && http::HeaderName::from_bytes(value.as_bytes()).is_err()
                {
                    return Err(refuse(
                        format!("{field}.FieldValue"),
                        format!("{value:?} is not a valid header name"),
                    ));
                }
                if self.cookie_config.is_some() && *f != HashField::Cookie {
                    return Err(refuse(
                        format!("{field}.CookieConfig"),
                        "only with Field \"cookie\"",
                    ));
                }
            }
        }
        if let Some(c) = &self.cookie_config {
            let cf = format!("{field}.CookieConfig");
            if c.session && c.ttl.is_some() {
                return Err(refuse(cf, "either Session or TTL, not both"));
            }
            if let Some(ttl) = &c.ttl {
                let d =
                    parse_duration(ttl).map_err(|e| refuse(format!("{cf}.TTL"), e.to_string()))?;
                if d.as_secs() == 0 {
                    return Err(refuse(
                        format!("{cf}.TTL"),
                        format!("{ttl:?}: at least 1s (use Session for a cookie without expiry)"),
                    ));
                }
            }
            if let Some(path) = &c.path {
                let printable = |ch: char| ch.is_ascii_graphic() && ch != ';';
                if !path.starts_with('/') || !path.chars().all(printable) {
                    return Err(refuse(
                        format!("{cf}.Path"),
                        format!(
                            "{path:?} must start with '/' and hold printable ASCII other than ';'"
                        ),
                    ));
                }
            }
            let name = self.field_value.as_deref().unwrap_or("");
            if !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
            {
                return Err(refuse(
                    format!("{field}.FieldValue"),
                    format!(
                        "{name:?}: a cookie weft makes has a name of letters, digits, -, _ and ."
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A cookie to make: the request was hashed on its value, and the answer
/// carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCookie {
    pub name: String,
    pub value: String,
    /// `Max-Age` in seconds; none for a session cookie.
    pub max_age: Option<u64>,
    pub path: Option<String>,
}

impl NewCookie {
    /// The `Set-Cookie` header's value.
    pub fn header_value(&self) -> String {
        let mut v = format!("{}={}", self.name, self.value);
        if let Some(age) = self.max_age {
            v.push_str(&format!("; Max-Age={age}"));
        }
        if let Some(path) = &self.path {
            v.push_str(&format!("; Path={path}"));
        }
        v.push_str("; HttpOnly");
        v
    }
}

/// A request's hash under a list of hash policies.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestHash {
    pub hash: Option<u64>,
    pub new_cookie: Option<NewCookie>,
}

/// Hashes `request` (None for a connection) from `source` under `policies`.
/// `fresh` is a random value for a cookie that has to be made.
pub fn hash_request(
    policies: &[HashPolicy],
    request: Option<&Request>,
    source: Option<IpAddr>,
    fresh: u64,
) -> RequestHash {
    let mut out = RequestHash::default();
    for policy in policies {
        let hashed = match (&policy.field, policy.source_ip) {
            (None, true) => source.map(|ip| xxh64(ip.to_string().as_bytes(), 0)),
            (Some(field), _) => {
                let name = policy.field_value.as_deref().unwrap_or("");
                let value = request.and_then(|r| match field {
                    HashField::Header => r.header(name),
                    HashField::Cookie => cookie(r, name),
                    HashField::QueryParameter => r
                        .query
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone()),
                });
                match (value, &policy.cookie_config) {
                    (Some(v), _) => Some(xxh64(v.as_bytes(), 0)),
                    (None, Some(config))
                        if request.is_some() && (config.session || config.ttl.is_some()) =>
                    {
                        let value = format!("{fresh:016x}");
                        let hash = xxh64(value.as_bytes(), 0);
                        out.new_cookie = Some(NewCookie {
                            name: name.to_string(),
                            value,
                            max_age: config
                                .ttl
                                .as_deref()
                                .and_then(|t| parse_duration(t).ok())
                                .map(|d| d.as_secs()),
                            path: config.path.clone(),
                        });
                        Some(hash)
                    }
                    (None, _) => None,
                }
            }
            (None, false) => None,
        };
        if let Some(h) = hashed {
            out.hash = Some(match out.hash {
                None => h,
                Some(prev) => prev.rotate_left(1) ^ h,
            });
            if policy.terminal {
                break;
            }
        }
    }
    out
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie(request: &Request, name: &str) -> Option<String> {
    request
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("cookie"))
        .flat_map(|(_, v)| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// A ring of hashes (Envoy's ring hash): each instance holds
/// `size / instances` points, hashed from its key and the point's number; a
/// request goes to the instance of the first point at or after its hash.
#[derive(Debug, Clone)]
pub struct Ring {
    points: Vec<(u64, u32)>,
}

impl Ring {
    /// A ring of about `size` points over instances known by `keys`.
    pub fn new(keys: &[String], size: usize) -> Ring {
        if keys.is_empty() {
            return Ring { points: Vec::new() };
        }
        let per = size.div_ceil(keys.len()).max(1);
        let mut points = Vec::with_capacity(per * keys.len());
        for (i, key) in keys.iter().enumerate() {
            for n in 0..per {
                points.push((xxh64(format!("{key}_{n}").as_bytes(), 0), i as u32));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    /// The index of the instance `hash` goes to.
    pub fn pick(&self, hash: u64) -> Option<usize> {
        self.pick_where(hash, |_| true)
    }

    /// The instance of the first point at or after `hash` that `allowed`
    /// takes (the ring walked once round), so that leaving one instance out
    /// moves only its keys.
    pub fn pick_where(&self, hash: u64, allowed: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.points.len();
        let at = self.points.partition_point(|(h, _)| *h < hash);
        (0..n)
            .map(|k| self.points[(at + k) % n].1 as usize)
            .find(|i| allowed(*i))
    }
}

/// A Maglev lookup table: every instance fills table slots in the order of
/// its own permutation, in turns, so each holds an equal share and a change
/// of instances moves few slots.
#[derive(Debug, Clone)]
pub struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    pub fn new(keys: &[String]) -> Maglev {
        Maglev::with_size(keys, MAGLEV_TABLE)
    }

    /// A table of `size` slots (a prime).
    fn with_size(keys: &[String], size: usize) -> Maglev {
        if keys.is_empty() {
            return Maglev { table: Vec::new() };
        }
        let m = size as u64;
        let perms: Vec<(u64, u64)> = keys
            .iter()
            .map(|k| {
                let offset = xxh64(k.as_bytes(), 0) % m;
                let skip = xxh64(k.as_bytes(), 1) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; keys.len()];
        let mut table = vec![u32::MAX; size];
        let mut filled = 0;
        'fill: loop {
            for (i, (offset, skip)) in perms.iter().enumerate() {
                let mut slot = (offset + next[i] * skip) % m;
                while table[slot as usize] != u32::MAX {
                    next[i] += 1;
                    slot = (offset + next[i] * skip) % m;
                }
                table[slot as usize] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == size {
                    break 'fill;
                }
            }
        }
        Maglev { table }
    }

    pub fn pick(&self, hash: u64) -> Option<usize> {
        self.pick_where(hash, |_| true)
    }

    /// The instance of `hash`'s slot, or when `allowed` does not take it,
    /// of the next slots in turn, so that leaving one instance out moves
    /// only its keys.
    pub fn pick_where(&self, hash: u64, allowed: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.table.len();
        let at = (hash % n.max(1) as u64) as usize;
        (0..n)
            .map(|k| self.table[(at + k) % n] as usize)
            .find(|i| allowed(*i))
    }
}

#[cfg(test)]
mod tests;
