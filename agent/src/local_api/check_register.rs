//! `PUT /v1/agent/check/register` and `PUT /v1/agent/check/deregister/:id`
//! in Consul's shapes, for checks of services registered through this API.
//!
//! A check body is read as Consul's agent reads it (keys in any case or
//! snake_case, `ID` or `CheckID`). weft takes `Name`, `ID`/`CheckID`,
//! `ServiceID`, `Notes`, `Status` (TTL checks), one of `HTTP`, `TCP`, `GRPC`,
//! `TTL`, with `Interval`, `Timeout` and `DeregisterCriticalServiceAfter`.
//! A node-level check (no `ServiceID`) and every other Consul field given a
//! value (`Args`, `Header`, `TLSSkipVerify`, …) are refused by name as not
//! supported by weft yet, never ignored; zero values (`""`, `null`, `false`,
//! `0`), which Go clients send for fields they leave unset, are absent.
//!
//! A check of a service registered through this API joins its
//! registration (kept in `services.json`); one of a service of agent.toml
//! is kept in `checks.json` and added to the file's checks (which the API
//! does not remove). Either way the service's checks are replaced (TTL
//! checks kept go on from their last update, probes run again at once),
//! and its combined health reaches the servers as the instance's
//! `service:<id>` check.

use bytes::Bytes;
use http::{request::Parts, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Body;
use serde_json::{Map, Value};
use weft_api::catalog::HealthStatus;
use weft_api::consul_keys::{self, Schema};

use super::{
    read_body, registrar, registration_error, require_write, text, token_of, LocalApiState,
};
use crate::config::{AgentConfig, MAX_CHECKS_PER_SERVICE, MIN_CHECK_INTERVAL};
use crate::registered::{RegisteredCheck, RegisteredService};

/// The keys weft takes.
const TAKEN: &[&str] = &[
    "Name",
    "ID",
    "CheckID",
    "ServiceID",
    "Notes",
    "Status",
    "HTTP",
    "TCP",
    "GRPC",
    "TTL",
    "Interval",
    "Timeout",
    "DeregisterCriticalServiceAfter",
];

/// Consul's check fields weft does not do (yet): refused when given a value.
const NOT_SUPPORTED: &[&str] = &[
    "Args",
    "ScriptArgs",
    "Script",
    "Shell",
    "DockerContainerID",
    "AliasNode",
    "AliasService",
    "H2PING",
    "H2PingUseTLS",
    "GRPCUseTLS",
    "TCPUseTLS",
    "UDP",
    "OSService",
    "Method",
    "Body",
    "Header",
    "DisableRedirects",
    "TLSServerName",
    "TLSSkipVerify",
    "OutputMaxSize",
    "SuccessBeforePassing",
    "FailuresBeforeWarning",
    "FailuresBeforeCritical",
    "Definition",
    "Node",
    "Type",
];

const CHECK_KEYS: Schema = Schema {
    known: &[TAKEN, NOT_SUPPORTED],
    user_keyed: &["Header"],
    tenancy: &["Namespace", "Partition"],
};

/// Why a check body was refused: a 400 naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckBodyError {
    #[error("Request decode failed: {0}")]
    Decode(String),
    #[error("{0}: not supported by weft yet")]
    NotSupported(String),
    #[error("{0}: unknown field")]
    Unknown(String),
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// A check to add to a local service.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckRequest {
    pub service_id: String,
    /// With its id set (`ID`, `CheckID`, or the name as Consul defaults it).
    pub check: RegisteredCheck,
}

fn invalid(field: &'static str, message: impl Into<String>) -> CheckBodyError {
    CheckBodyError::Invalid {
        field,
        message: message.into(),
    }
}

/// Takes a string field out of `map`; `None` when absent or empty.
fn string(
    map: &mut Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, CheckBodyError> {
    match map.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(field, format!("want a string, not {other}"))),
    }
}

/// A duration field, checked as weft reads durations (`10s`, `1m30s`).
fn duration(
    map: &mut Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, CheckBodyError> {
    let Some(text) = string(map, field)? else {
        return Ok(None);
    };
    match weft_api::duration::parse_duration(&text) {
        Ok(d) if !d.is_zero() => Ok(Some(text)),
        Ok(_) => Err(invalid(
            field,
            format!("{text:?} must be greater than zero"),
        )),
        Err(e) => Err(invalid(field, format!("{text:?}: {e}"))),
    }
}

/// Parses and checks a `/v1/agent/check/register` body.
pub fn parse(body: &[u8]) -> Result<CheckRequest, CheckBodyError> {
    let mut doc: Value =
        serde_json::from_slice(body).map_err(|e| CheckBodyError::Decode(e.to_string()))?;
    consul_keys::normalize(&mut doc, &CHECK_KEYS)
        .map_err(|e| CheckBodyError::Decode(e.to_string()))?;
    let Value::Object(mut map) = doc else {
        return Err(CheckBodyError::Decode("want a JSON object".into()));
    };
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    for key in keys {
        if NOT_SUPPORTED.contains(&key.as_str()) {
            if !consul_keys::is_go_zero(&map[key]) {
                return Err(CheckBodyError::NotSupported(key.clone()));
            }
        } else if !TAKEN.contains(&key.as_str()) {
            return Err(CheckBodyError::Unknown(key.clone()));
        }
    }
    let name = string(&mut map, "Name")?.ok_or_else(|| invalid("Name", "missing check name"))?;
    let id = string(&mut map, "ID")?;
    let check_id = string(&mut map, "CheckID")?;
    let id = match (id, check_id) {
        (Some(a), Some(b)) if a != b => {
            return Err(invalid("ID", format!("{a:?} and CheckID {b:?} differ")))
        }
        (Some(id), _) | (None, Some(id)) => id,
        (None, None) => name.clone(),
    };
    if id.len() > 128
        || !id.chars().all(|c| c.is_ascii_graphic())
        || id.contains(['/', '?', '#', '%'])
    {
        return Err(invalid(
            "ID",
            format!("{id:?}: a check id is 1 to 128 printable ASCII characters without spaces, '/', '?', '#' or '%' (without ID or CheckID it is the Name)"),
        ));
    }
    if id.starts_with("service:") {
        // The agent names a service's own checks so (`service:<id>`,
        // `service:<id>:<n>`): taking one would shadow them.
        return Err(invalid(
            "ID",
            format!("{id:?}: ids beginning with \"service:\" are the agent's own"),
        ));
    }
    let service_id = string(&mut map, "ServiceID")?.ok_or_else(|| {
        CheckBodyError::NotSupported(
            "ServiceID missing: a node-level check (one without ServiceID)".into(),
        )
    })?;
    let status = string(&mut map, "Status")?;
    if let Some(s) = &status {
        s.parse::<HealthStatus>().map_err(|_| {
            invalid(
                "Status",
                format!("{s:?}: want \"passing\", \"warning\" or \"critical\""),
            )
        })?;
    }
    let check = RegisteredCheck {
        check_id: Some(id),
        http: string(&mut map, "HTTP")?,
        tcp: string(&mut map, "TCP")?,
        grpc: string(&mut map, "GRPC")?,
        ttl: duration(&mut map, "TTL")?,
        interval: duration(&mut map, "Interval")?,
        timeout: duration(&mut map, "Timeout")?,
        deregister_critical_service_after: duration(&mut map, "DeregisterCriticalServiceAfter")?,
        name: Some(name),
        notes: string(&mut map, "Notes")?,
        status,
    };
    let kinds = [&check.http, &check.tcp, &check.grpc, &check.ttl]
        .iter()
        .filter(|k| k.is_some())
        .count();
    if kinds != 1 {
        return Err(invalid(
            "HTTP",
            format!("{kinds} of HTTP, TCP, GRPC, TTL given: a check is exactly one of them (Args, H2PING, UDP, OSService, AliasService, DockerContainerID: not supported by weft yet)"),
        ));
    }
    if let Some(interval) = &check.interval {
        if weft_api::duration::parse_duration(interval).is_ok_and(|d| d < MIN_CHECK_INTERVAL) {
            return Err(invalid(
                "Interval",
                format!("{interval:?}: at least 1s, as Consul's agent probes"),
            ));
        }
    }
    if check.status.is_some() && check.ttl.is_none() {
        return Err(CheckBodyError::NotSupported(
            "Status on an HTTP, TCP or GRPC check (weft probes it at once; only TTL checks take an initial Status)".into(),
        ));
    }
    Ok(CheckRequest { service_id, check })
}

/// `service`'s checks in one list, each with the id it runs under now
/// (Consul's default ids are positional: adding or removing a check must
/// not rename the others).
fn pinned_checks(
    service: &mut RegisteredService,
    config: Option<&AgentConfig>,
) -> Vec<RegisteredCheck> {
    let mut checks: Vec<RegisteredCheck> = service
        .check
        .take()
        .into_iter()
        .chain(std::mem::take(&mut service.checks))
        .collect();
    let running = config.and_then(|c| c.services.iter().find(|s| s.id == service.id()));
    if let Some(running) = running {
        if running.checks.len() == checks.len() {
            for (check, now) in checks.iter_mut().zip(&running.checks) {
                check.check_id.get_or_insert_with(|| now.id.clone());
            }
        }
    }
    checks
}

type Answer = Result<Response<Full<Bytes>>, Response<Full<Bytes>>>;

/// The refusal of one more check on a service that has `count`.
#[allow(clippy::result_large_err)]
fn too_many(service_id: &str, count: usize) -> Result<(), Response<Full<Bytes>>> {
    if count < MAX_CHECKS_PER_SERVICE {
        return Ok(());
    }
    Err(text(
        StatusCode::BAD_REQUEST,
        format!("ServiceID {service_id:?} has {count} checks: at most {MAX_CHECKS_PER_SERVICE} per service"),
    ))
}

/// `PUT /v1/agent/check/register`: `service:write` on the check's service,
/// which must have been registered through this API.
pub(super) async fn register<B>(state: &LocalApiState, parts: &Parts, body: B) -> Answer
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let registrar = registrar(state)?;
    let token = token_of(parts, "registering a check")?;
    let body = read_body(parts, body).await?;
    let req = parse(&body).map_err(|e| text(StatusCode::BAD_REQUEST, e.to_string()))?;
    let _one = state.check_edits.lock().await;
    // An id another service's check has stays that service's.
    let id = req.check.check_id.as_deref().unwrap_or_default();
    if let Some(other) = state
        .checks
        .check(id)
        .filter(|c| c.service_id != req.service_id)
    {
        return Err(text(
            StatusCode::CONFLICT,
            format!(
                "check id {id:?} belongs to service {:?}: choose another ID",
                other.service_id
            ),
        ));
    }
    let config = state.current_config();
    let Some(mut service) = registrar.registration(&req.service_id) else {
        let in_file = config
            .as_ref()
            .and_then(|c| c.services.iter().find(|s| s.id == req.service_id));
        let Some(in_file) = in_file else {
            return Err(text(
                StatusCode::BAD_REQUEST,
                format!(
                    "ServiceID {:?} does not exist on this agent",
                    req.service_id
                ),
            ));
        };
        require_write(state, &token, &in_file.name, "check registration").await?;
        // The file's checks and those added here, but for the one replaced.
        let replaced = registrar
            .api_checks(&req.service_id)
            .iter()
            .any(|c| c.check_id == req.check.check_id);
        too_many(
            &req.service_id,
            in_file.checks.len() - usize::from(replaced),
        )?;
        let id = req.check.check_id.clone().unwrap_or_default();
        let done = registrar
            .register_check(req.service_id.clone(), req.check)
            .await
            .map_err(registration_error)?;
        tracing::info!(check = ?id, service = ?req.service_id, "check registered through the local API: {done}");
        return Ok(text(StatusCode::OK, ""));
    };
    require_write(state, &token, &service.name, "check registration").await?;
    let mut checks = pinned_checks(&mut service, config.as_deref());
    // Consul replaces a check registered again under its id.
    checks.retain(|c| c.check_id != req.check.check_id);
    too_many(&req.service_id, checks.len())?;
    let id = req.check.check_id.clone().unwrap_or_default();
    checks.push(req.check);
    service.checks = checks;
    // The same registration with its checks changed: only if it is still
    // of the service the caller may write.
    let name = service.name.clone();
    let done = registrar
        .register(service, Some(name))
        .await
        .map_err(registration_error)?;
    tracing::info!(check = ?id, service = ?req.service_id, "check registered through the local API: {done}");
    Ok(text(StatusCode::OK, ""))
}

/// `PUT /v1/agent/check/deregister/:id`: `service:write` on the check's
/// service; checks written in agent.toml stay.
pub(super) async fn deregister(state: &LocalApiState, parts: &Parts, check_id: String) -> Answer {
    let registrar = registrar(state)?;
    let token = token_of(parts, "deregistering a check")?;
    let _one = state.check_edits.lock().await;
    let unknown = || {
        text(
            StatusCode::NOT_FOUND,
            format!("Unknown check ID {check_id:?}"),
        )
    };
    let info = state.checks.check(&check_id).ok_or_else(unknown)?;
    require_write(state, &token, &info.service_name, "check deregistration").await?;
    let Some(mut service) = registrar.registration(&info.service_id) else {
        let added = registrar
            .api_checks(&info.service_id)
            .iter()
            .any(|c| c.check_id.as_deref() == Some(check_id.as_str()));
        if !added {
            return Err(text(
                StatusCode::BAD_REQUEST,
                format!("check {check_id:?} is defined in the agent's configuration file: remove it there and reload"),
            ));
        }
        let done = registrar
            .deregister_check(check_id.clone())
            .await
            .map_err(registration_error)?;
        tracing::info!(check = ?check_id, service = ?info.service_id, "check deregistered through the local API: {done}");
        return Ok(text(StatusCode::OK, ""));
    };
    let config = state.current_config();
    let mut checks = pinned_checks(&mut service, config.as_deref());
    let before = checks.len();
    checks.retain(|c| c.check_id.as_deref() != Some(check_id.as_str()));
    if checks.len() == before {
        return Err(unknown());
    }
    service.checks = checks;
    // The same registration with its checks changed: only if it is still
    // of the service the caller may write.
    let name = info.service_name.clone();
    let done = registrar
        .register(service, Some(name))
        .await
        .map_err(registration_error)?;
    tracing::info!(check = ?check_id, service = ?info.service_id, "check deregistered through the local API: {done}");
    Ok(text(StatusCode::OK, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> String {
        parse(body.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn consuls_shapes_in_any_case() {
        let pascal = parse(
            br#"{"Name":"db ttl","CheckID":"db-ttl","ServiceID":"db-1","TTL":"10s","Notes":"n","Status":"passing"}"#,
        )
        .unwrap();
        // What py-consul sends.
        let lower = parse(
            br#"{"name":"db ttl","id":"db-ttl","serviceid":"db-1","ttl":"10s","notes":"n","status":"passing"}"#,
        )
        .unwrap();
        assert_eq!(pascal, lower);
        assert_eq!(pascal.service_id, "db-1");
        assert_eq!(pascal.check.check_id.as_deref(), Some("db-ttl"));
        assert_eq!(pascal.check.status.as_deref(), Some("passing"));
        let http = parse(
            br#"{"Name":"web","ServiceID":"web-1","HTTP":"http://127.0.0.1:8080/health","Interval":"5s","Timeout":"1s","DeregisterCriticalServiceAfter":"1m","service_id":null}"#,
        );
        // ServiceID twice (once null) is still twice.
        assert!(http.is_err());
        let http = parse(
            br#"{"Name":"web","ServiceID":"web-1","HTTP":"http://127.0.0.1:8080/health","Interval":"5s","Timeout":"1s","DeregisterCriticalServiceAfter":"1m"}"#,
        )
        .unwrap();
        // The id defaults to the name, as in Consul.
        assert_eq!(http.check.check_id.as_deref(), Some("web"));
        assert_eq!(http.check.interval.as_deref(), Some("5s"));
        assert_eq!(
            http.check.deregister_critical_service_after.as_deref(),
            Some("1m")
        );
    }

    #[test]
    fn the_agents_own_ids_and_busy_probes_are_refused() {
        let e = err(r#"{"Name":"x","ID":"service:web:2","ServiceID":"web","TTL":"5s"}"#);
        assert!(e.contains("are the agent's own"), "{e}");
        let e = err(r#"{"Name":"x","ServiceID":"web","TCP":"127.0.0.1:1","Interval":"1ns"}"#);
        assert!(e.contains("Interval") && e.contains("at least 1s"), "{e}");
        parse(br#"{"Name":"x","ServiceID":"web","TCP":"127.0.0.1:1","Interval":"1s"}"#).unwrap();
    }

    #[test]
    fn go_clients_zero_values_are_absent() {
        let r = parse(
            br#"{"Name":"t","ServiceID":"s","TTL":"5s","Args":null,"Header":{},"TLSSkipVerify":false,"SuccessBeforePassing":0,"Shell":"","HTTP":""}"#,
        )
        .unwrap();
        assert_eq!(r.check.ttl.as_deref(), Some("5s"));
        assert_eq!(r.check.http, None);
    }

    #[test]
    fn what_weft_cannot_honour_is_refused_by_name() {
        let e = err(r#"{"Name":"n","TTL":"5s"}"#);
        assert!(
            e.contains("node-level check") && e.contains("not supported by weft yet"),
            "{e}"
        );
        for (field, body) in [
            (
                "Args",
                r#"{"Name":"n","ServiceID":"s","Args":["/bin/true"],"Interval":"5s"}"#,
            ),
            (
                "Header",
                r#"{"Name":"n","ServiceID":"s","HTTP":"http://a:1/","Header":{"X":["y"]}}"#,
            ),
            (
                "TLSSkipVerify",
                r#"{"Name":"n","ServiceID":"s","HTTP":"http://a:1/","tls_skip_verify":true}"#,
            ),
            (
                "SuccessBeforePassing",
                r#"{"Name":"n","ServiceID":"s","TTL":"5s","SuccessBeforePassing":2}"#,
            ),
            (
                "Status on an HTTP",
                r#"{"Name":"n","ServiceID":"s","TCP":"a:1","Status":"passing"}"#,
            ),
        ] {
            let e = err(body);
            assert!(
                e.contains(field) && e.contains("not supported by weft yet"),
                "{field}: {e}"
            );
        }
        let e = err(r#"{"Name":"n","ServiceID":"s","TTL":"5s","Namespace":"team"}"#);
        assert!(
            e.contains("Namespace") && e.contains("not supported by weft yet"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        for (field, body) in [
            ("Name", r#"{"ServiceID":"s","TTL":"5s"}"#),
            ("TTL", r#"{"Name":"n","ServiceID":"s","TTL":"soon"}"#),
            (
                "Interval",
                r#"{"Name":"n","ServiceID":"s","TCP":"a:1","Interval":5}"#,
            ),
            (
                "Timeout",
                r#"{"Name":"n","ServiceID":"s","TCP":"a:1","Timeout":"0s"}"#,
            ),
            (
                "Status",
                r#"{"Name":"n","ServiceID":"s","TTL":"5s","Status":"ok"}"#,
            ),
            ("HTTP", r#"{"Name":"n","ServiceID":"s"}"#),
            (
                "HTTP",
                r#"{"Name":"n","ServiceID":"s","TTL":"5s","TCP":"a:1"}"#,
            ),
            (
                "ID",
                r#"{"Name":"n","ID":"a","CheckID":"b","ServiceID":"s","TTL":"5s"}"#,
            ),
            ("ID", r#"{"Name":"has spaces","ServiceID":"s","TTL":"5s"}"#),
            (
                "ID",
                r#"{"Name":"n","ID":"a/b","ServiceID":"s","TTL":"5s"}"#,
            ),
            (
                "Bogus",
                r#"{"Name":"n","ServiceID":"s","TTL":"5s","Bogus":1}"#,
            ),
        ] {
            let e = err(body);
            assert!(e.starts_with(field), "{field}: {e}");
        }
        for bad in ["", "[]", "not json", "{\"Name\":"] {
            assert!(
                matches!(parse(bad.as_bytes()), Err(CheckBodyError::Decode(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn positional_ids_are_pinned_before_the_list_changes() {
        let base = r#"
node_name = "node-a"
datacenter = "dc1"
servers = ["127.0.0.1:8502"]
advertise_addr = "10.0.0.1"
data_dir = "/var/lib/weft-agent"
ebpf = false
"#;
        let mut db = RegisteredService::from_json(
            br#"{"ID":"db-1","Name":"db","Port":5432,"Check":{"TTL":"10s"}}"#,
        )
        .unwrap();
        let text = format!(
            "{base}{}",
            crate::registered::as_toml(std::slice::from_ref(&db))
        );
        let config = AgentConfig::parse(&text, "agent.toml").unwrap();
        let checks = pinned_checks(&mut db, Some(&config));
        assert_eq!(checks[0].check_id.as_deref(), Some("service:db-1"));
        assert!(db.check.is_none() && db.checks.is_empty());
    }
}
