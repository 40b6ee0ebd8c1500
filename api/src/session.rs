//! Consul's sessions: what applications take locks and elect leaders with.
//!
//! A session belongs to a node. While it lives it may hold locks on KV keys
//! (`PUT /v1/kv/KEY?acquire=SESSION`); when it is invalidated (destroyed,
//! its TTL not renewed in time, or its node failing its node-level check),
//! every lock it holds is released (`Behavior = "release"`) or its keys are
//! deleted (`"delete"`), and for `LockDelay` no other session may take
//! those keys, so that a holder that has not yet noticed its loss stops
//! before another starts.
//!
//! This module is pure: the create request's decoding (Consul's JSON,
//! whose keys are case-insensitive, as Go decodes them), validation, and
//! the timing rules. The servers store sessions and apply invalidation.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::duration::parse_duration;

/// Consul's default lock delay.
pub const DEFAULT_LOCK_DELAY: Duration = Duration::from_secs(15);
/// Longest lock delay (Consul's limit).
pub const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);
/// Shortest and longest TTL (Consul's limits).
pub const MIN_TTL: Duration = Duration::from_secs(10);
pub const MAX_TTL: Duration = Duration::from_secs(86_400);
/// Longest session name.
pub const MAX_NAME_BYTES: usize = 256;
/// Most sessions in a cluster, and on one node: a bound on the state.
pub const MAX_SESSIONS: usize = 16_384;
pub const MAX_SESSIONS_PER_NODE: usize = 1_024;
/// The node-level check's id, as Consul names it.
pub const NODE_CHECK: &str = "serfHealth";

/// What happens to a session's locks when it is invalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Behavior {
    /// The keys stay; their lock is released.
    #[default]
    Release,
    /// The keys are deleted.
    Delete,
}

impl Behavior {
    pub fn as_str(self) -> &'static str {
        match self {
            Behavior::Release => "release",
            Behavior::Delete => "delete",
        }
    }
}

/// A session as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// A UUID, chosen by the server that took the request.
    pub id: String,
    pub name: String,
    pub node: String,
    pub lock_delay_ms: u64,
    pub behavior: Behavior,
    /// `None`: no TTL (lives until destroyed or its node fails).
    pub ttl_secs: Option<u64>,
    /// Invalidated when its node fails its node-level check or leaves.
    pub node_checks: bool,
    pub create_index: u64,
    pub modify_index: u64,
    /// For TTL sessions: unix milliseconds after which the leader
    /// invalidates it, two TTLs after its creation or last renewal (Consul
    /// also waits up to twice the TTL; the margin absorbs clock differences
    /// between servers).
    pub expires_at_ms: Option<i64>,
}

impl Session {
    /// The deadline a renewal at `now_ms` gives.
    pub fn deadline(&self, now_ms: i64) -> Option<i64> {
        self.ttl_secs
            .map(|ttl| now_ms.saturating_add((ttl as i64).saturating_mul(2_000)))
    }

    /// Whether the leader may invalidate it at `now_ms`.
    pub fn expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_some_and(|at| now_ms >= at)
    }
}

/// Checks a stored session (a snapshot's) as a create would have made it.
pub fn validate_stored(s: &Session) -> Result<(), SessionError> {
    uuid_like(&s.id)?;
    crate::names::validate_name(&s.node).map_err(|e| field("Node", e.to_string()))?;
    if s.name.len() > MAX_NAME_BYTES || s.name.chars().any(char::is_control) {
        return Err(field("Name", "too long or not printable"));
    }
    if s.lock_delay_ms > MAX_LOCK_DELAY.as_millis() as u64 {
        return Err(field("LockDelay", "longer than 60s"));
    }
    match (s.ttl_secs, s.expires_at_ms) {
        (None, None) => Ok(()),
        (Some(ttl), Some(_)) if (MIN_TTL.as_secs()..=MAX_TTL.as_secs()).contains(&ttl) => Ok(()),
        _ => Err(field("TTL", "out of range, or a TTL without a deadline")),
    }
}

/// A UUID's shape: 36 characters of hex digits and dashes.
fn uuid_like(id: &str) -> Result<(), SessionError> {
    let ok = id.len() == 36 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    ok.then_some(()).ok_or_else(|| field("ID", "not a UUID"))
}

/// Why a create request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("request body: {0}")]
    Body(String),
    #[error("{field}: {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
    #[error("{0}: not supported by weft yet")]
    NotSupported(String),
}

fn field(field: &'static str, problem: impl Into<String>) -> SessionError {
    SessionError::Field {
        field,
        problem: problem.into(),
    }
}

/// A decoded create request (before the server names the node and id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateRequest {
    pub name: String,
    /// `None`: the agent's own node (the agent fills it in).
    pub node: Option<String>,
    pub lock_delay: Duration,
    pub behavior: Behavior,
    pub ttl: Option<Duration>,
    pub node_checks: bool,
}

/// Decodes Consul's `PUT /v1/session/create` body (empty: all defaults).
/// Keys are matched case-insensitively; unknown keys are refused.
pub fn parse_create(body: &[u8]) -> Result<CreateRequest, SessionError> {
    let mut req = CreateRequest {
        name: String::new(),
        node: None,
        lock_delay: DEFAULT_LOCK_DELAY,
        behavior: Behavior::Release,
        ttl: None,
        node_checks: true,
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(req);
    }
    let doc: Value = serde_json::from_slice(body).map_err(|e| SessionError::Body(e.to_string()))?;
    let Value::Object(map) = doc else {
        return Err(SessionError::Body("want a JSON object".into()));
    };
    let mut seen = std::collections::HashSet::new();
    for (key, value) in &map {
        let lower = key.to_ascii_lowercase();
        if !seen.insert(lower.clone()) {
            return Err(SessionError::Body(format!("{key}: given twice")));
        }
        match lower.as_str() {
            "name" => req.name = string("Name", value)?,
            "node" => {
                let node = string("Node", value)?;
                if !node.is_empty() {
                    crate::names::validate_name(&node).map_err(|e| field("Node", e.to_string()))?;
                    req.node = Some(node);
                }
            }
            "lockdelay" => req.lock_delay = lock_delay(value)?,
            "behavior" => {
                req.behavior = match string("Behavior", value)?.as_str() {
                    "" | "release" => Behavior::Release,
                    "delete" => Behavior::Delete,
                    other => {
                        return Err(field(
                            "Behavior",
                            format!("{other:?}: want \"release\" or \"delete\""),
                        ))
                    }
                }
            }
            "ttl" => req.ttl = ttl(&string("TTL", value)?)?,
            "checks" | "nodechecks" => {
                let name = if lower == "checks" {
                    "Checks"
                } else {
                    "NodeChecks"
                };
                req.node_checks = checks(name, value)?;
            }
            "servicechecks" => {
                if !matches!(value, Value::Null) && value.as_array().is_none_or(|a| !a.is_empty()) {
                    return Err(SessionError::NotSupported(
                        "ServiceChecks (sessions tied to service checks)".into(),
                    ));
                }
            }
            "namespace" | "partition" => {
                let v = string(
                    if lower == "namespace" {
                        "Namespace"
                    } else {
                        "Partition"
                    },
                    value,
                )?;
                if !v.is_empty() && v != "default" {
                    return Err(SessionError::NotSupported(format!(
                        "{key} {v:?} (only \"default\")"
                    )));
                }
            }
            _ => return Err(SessionError::Body(format!("unknown field {key:?}"))),
        }
    }
    if req.name.len() > MAX_NAME_BYTES {
        return Err(field(
            "Name",
            format!("{} bytes, more than {MAX_NAME_BYTES}", req.name.len()),
        ));
    }
    if req.name.chars().any(char::is_control) {
        return Err(field("Name", "must not contain control characters"));
    }
    Ok(req)
}

fn string(name: &'static str, value: &Value) -> Result<String, SessionError> {
    match value {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        other => Err(field(name, format!("want a string, not {other}"))),
    }
}

/// `LockDelay`: a duration string, or a number (Consul: under 1000 means
/// seconds, otherwise nanoseconds).
fn lock_delay(value: &Value) -> Result<Duration, SessionError> {
    let delay = match value {
        Value::Null => DEFAULT_LOCK_DELAY,
        Value::String(s) => parse_duration(s).map_err(|e| field("LockDelay", e.to_string()))?,
        Value::Number(n) => match n.as_u64() {
            Some(n) if n < 1000 => Duration::from_secs(n),
            Some(n) => Duration::from_nanos(n),
            None => return Err(field("LockDelay", format!("{n}: want a duration"))),
        },
        other => return Err(field("LockDelay", format!("want a duration, not {other}"))),
    };
    if delay > MAX_LOCK_DELAY {
        return Err(field(
            "LockDelay",
            format!("{delay:?} is longer than {MAX_LOCK_DELAY:?}"),
        ));
    }
    Ok(delay)
}

/// `TTL`: empty or `"0s"` for none, else 10 s to 24 h.
fn ttl(text: &str) -> Result<Option<Duration>, SessionError> {
    if text.is_empty() {
        return Ok(None);
    }
    let ttl = parse_duration(text).map_err(|e| field("TTL", e.to_string()))?;
    if ttl.is_zero() {
        return Ok(None);
    }
    if ttl < MIN_TTL || ttl > MAX_TTL {
        return Err(field(
            "TTL",
            format!("{text:?}: want between 10s and 86400s"),
        ));
    }
    if ttl.subsec_nanos() != 0 {
        return Err(field("TTL", format!("{text:?}: want whole seconds")));
    }
    Ok(Some(ttl))
}

/// `Checks` / `NodeChecks`: weft's only node check is `serfHealth`; an
/// empty list ties the session to no check.
fn checks(name: &'static str, value: &Value) -> Result<bool, SessionError> {
    let items = match value {
        Value::Null => return Ok(true),
        Value::Array(items) => items,
        other => {
            return Err(field(
                name,
                format!("want a list of check ids, not {other}"),
            ))
        }
    };
    let mut node = false;
    for item in items {
        match item.as_str() {
            Some(NODE_CHECK) => node = true,
            Some(other) => {
                return Err(SessionError::NotSupported(format!(
                    "{name} {other:?} (sessions can be tied to {NODE_CHECK} only)"
                )))
            }
            None => return Err(field(name, format!("want check ids, not {item}"))),
        }
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_from_an_empty_body() {
        let r = parse_create(b"").unwrap();
        assert_eq!(r.lock_delay, DEFAULT_LOCK_DELAY);
        assert_eq!(r.behavior, Behavior::Release);
        assert_eq!(r.ttl, None);
        assert!(r.node_checks);
        assert_eq!(r.node, None);
        assert_eq!(parse_create(b"{}").unwrap(), r);
    }

    #[test]
    fn keys_are_case_insensitive_as_consul_decodes_them() {
        // What py-consul sends.
        let r = parse_create(
            br#"{"name": "lock", "node": "n1", "checks": [], "lockdelay": "5s", "behavior": "delete", "ttl": "10s"}"#,
        )
        .unwrap();
        assert_eq!(r.name, "lock");
        assert_eq!(r.node.as_deref(), Some("n1"));
        assert!(!r.node_checks);
        assert_eq!(r.lock_delay, Duration::from_secs(5));
        assert_eq!(r.behavior, Behavior::Delete);
        assert_eq!(r.ttl, Some(Duration::from_secs(10)));
        let r = parse_create(br#"{"Name":"x","TTL":"0s","NodeChecks":["serfHealth"]}"#).unwrap();
        assert_eq!(r.ttl, None);
        assert!(r.node_checks);
    }

    #[test]
    fn lock_delay_numbers_as_consul_reads_them() {
        let d = |v: &str| {
            parse_create(format!("{{\"LockDelay\": {v}}}").as_bytes()).map(|r| r.lock_delay)
        };
        assert_eq!(d("7").unwrap(), Duration::from_secs(7));
        assert_eq!(d("2000000000").unwrap(), Duration::from_secs(2));
        assert_eq!(d("\"250ms\"").unwrap(), Duration::from_millis(250));
        assert!(d("\"61s\"").unwrap_err().to_string().contains("LockDelay"));
        assert!(d("-1").is_err());
        assert!(d("true").is_err());
    }

    #[test]
    fn bad_and_unsupported_fields_are_named() {
        let err = |b: &str| parse_create(b.as_bytes()).unwrap_err().to_string();
        assert!(err(r#"{"TTL":"5s"}"#).contains("TTL"));
        assert!(err(r#"{"TTL":"86401s"}"#).contains("TTL"));
        assert!(err(r#"{"TTL":"10.5s"}"#).contains("whole seconds"));
        assert!(err(r#"{"Behavior":"keep"}"#).contains("Behavior"));
        assert!(err(r#"{"Checks":["service:web"]}"#).contains("not supported by weft yet"));
        assert!(err(r#"{"ServiceChecks":[{"ID":"x"}]}"#).contains("not supported by weft yet"));
        assert!(err(r#"{"Namespace":"team"}"#).contains("not supported by weft yet"));
        assert!(err(r#"{"Nmae":"typo"}"#).contains("unknown field \"Nmae\""));
        assert!(err(r#"{"Name":"a","name":"b"}"#).contains("given twice"));
        // A node name is checked before it goes anywhere (and is never
        // quoted back at length).
        let long = format!("{{\"Node\":\"{}\"}}", "\\u0001".repeat(100_000));
        let e = err(&long);
        assert!(e.starts_with("Node:") && e.len() < 200, "{} bytes", e.len());
        assert!(err("[1]").contains("object"));
        assert!(err("{").contains("request body"));
        assert!(err(&format!(
            "{{\"Name\":\"{}\"}}",
            "n".repeat(MAX_NAME_BYTES + 1)
        ))
        .contains("Name"));
        // Accepted and meaning what they say.
        parse_create(br#"{"ServiceChecks":[],"Namespace":"default","Partition":""}"#).unwrap();
    }

    #[test]
    fn stored_sessions_are_checked_as_a_create_makes_them() {
        let good = Session {
            id: "3f1b2c4d-0000-4000-8000-000000000001".into(),
            name: "lock".into(),
            node: "n1".into(),
            lock_delay_ms: 15_000,
            behavior: Behavior::Release,
            ttl_secs: Some(10),
            node_checks: true,
            create_index: 1,
            modify_index: 1,
            expires_at_ms: Some(20_000),
        };
        validate_stored(&good).unwrap();
        for bad in [
            Session {
                id: "x".into(),
                ..good.clone()
            },
            Session {
                node: "Not A Node".into(),
                ..good.clone()
            },
            Session {
                lock_delay_ms: 61_000,
                ..good.clone()
            },
            Session {
                ttl_secs: Some(5),
                ..good.clone()
            },
            Session {
                expires_at_ms: None,
                ..good.clone()
            },
            Session {
                ttl_secs: None,
                ..good.clone()
            },
        ] {
            assert!(validate_stored(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ttl_deadlines_are_two_ttls() {
        let s = Session {
            id: "i".into(),
            name: String::new(),
            node: "n".into(),
            lock_delay_ms: 0,
            behavior: Behavior::Release,
            ttl_secs: Some(10),
            node_checks: true,
            create_index: 1,
            modify_index: 1,
            expires_at_ms: Some(20_000),
        };
        assert_eq!(s.deadline(1_000), Some(21_000));
        assert!(!s.expired(19_999));
        assert!(s.expired(20_000));
        let forever = Session {
            ttl_secs: None,
            expires_at_ms: None,
            ..s
        };
        assert_eq!(forever.deadline(1_000), None);
        assert!(!forever.expired(i64::MAX));
    }
}
