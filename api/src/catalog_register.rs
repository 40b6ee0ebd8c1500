//! Consul's `PUT /v1/catalog/register` and `/v1/catalog/deregister` bodies,
//! for **external** nodes: nodes no weft agent runs (a database host, a
//! SaaS endpoint), which tools such as consul-esm and Terraform register
//! straight into the catalog. Such a node carries `external-node = "true"`
//! in its meta (consul-esm's convention), so the servers do not wait for
//! its heartbeats, and agents do not tunnel to it: its instances are found
//! by DNS and the catalog, and reached directly, outside the mesh.
//!
//! Keys are read as Consul reads them (any case, snake_case). An instance
//! takes its health from the body's checks for it (the worst of them;
//! passing without any), as weft keeps one health per instance. What weft
//! cannot honour is refused by name: node-level checks, tagged addresses,
//! node ids, service kinds, proxies and the like. Go clients' zero values
//! (`""`, `null`, `false`, `0`, `{}`, `[]`) count as absent.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::catalog::{
    validate_node, validate_service_instance, HealthStatus, Node, ServiceInstance,
};
use crate::consul_keys::{is_go_zero, normalize, Schema};

/// The node meta that marks a node as external (consul-esm's convention).
pub const EXTERNAL_NODE_META: &str = "external-node";

/// Whether `node` was registered through the catalog API, not by an agent.
pub fn is_external(node: &Node) -> bool {
    node.meta
        .get(EXTERNAL_NODE_META)
        .is_some_and(|v| v == "true")
}

/// Keys weft takes.
const TAKEN: &[&str] = &[
    "Node",
    "Address",
    "Datacenter",
    "NodeMeta",
    "Service",
    "ID",
    "Tags",
    "Meta",
    "Port",
    "Check",
    "Checks",
    "CheckID",
    "Name",
    "Notes",
    "Status",
    "ServiceID",
    "Output",
    "SkipNodeUpdate",
    "WriteRequest",
    "Token",
];

/// Consul's keys weft does not do (yet): refused when given a value.
const NOT_SUPPORTED: &[&str] = &[
    "TaggedAddresses",
    "Kind",
    "Proxy",
    "Connect",
    "Weights",
    "EnableTagOverride",
    "SocketPath",
    "LocallyRegisteredAsSidecar",
    "Definition",
    "Type",
    "Interval",
    "Timeout",
    "ExposedPort",
    "ServiceName",
    "ServiceTags",
    "Peer",
    "PeerName",
    "Locality",
];

const SCHEMA: Schema = Schema {
    known: &[TAKEN, NOT_SUPPORTED],
    user_keyed: &["NodeMeta", "Meta"],
    tenancy: &["Namespace", "Partition"],
};

/// Why a registration body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("request body: {0}")]
    Decode(String),
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{0}: not supported by weft yet")]
    NotSupported(String),
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> RegisterError {
    RegisterError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// An external node, and one of its instances, to register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The token a Go-shaped client puts in the body too
    /// (`WriteRequest.Token`): it must be the request's own.
    pub body_token: Option<String>,
    pub node: Node,
    /// Consul's `SkipNodeUpdate`: leave an existing node as it is.
    pub skip_node_update: bool,
    pub instance: Option<ServiceInstance>,
}

/// What to remove of an external node: one instance, or the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deregistration {
    pub body_token: Option<String>,
    pub node: String,
    pub service_id: Option<String>,
}

/// The object at `doc`, its keys normalized, zero values dropped, and
/// Consul's keys weft does not do refused (`path` names it in errors).
fn object(doc: Value, path: &str) -> Result<Map<String, Value>, RegisterError> {
    let Value::Object(mut map) = doc else {
        return Err(RegisterError::Decode(format!("{path}: want a JSON object")));
    };
    map.retain(|_, v| !is_go_zero(v));
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    for key in keys {
        let field = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        if NOT_SUPPORTED.contains(&key.as_str()) {
            return Err(RegisterError::NotSupported(field));
        }
        if !TAKEN.contains(&key.as_str()) {
            return Err(invalid(field, "unknown field"));
        }
    }
    Ok(map)
}

fn string(map: &mut Map<String, Value>, field: &str, path: &str) -> Result<String, RegisterError> {
    match map.remove(field) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(invalid(
            format!("{path}{field}"),
            format!("want a string, not {other}"),
        )),
    }
}

fn strings_map(
    map: &mut Map<String, Value>,
    field: &str,
    path: &str,
) -> Result<BTreeMap<String, String>, RegisterError> {
    match map.remove(field) {
        None => Ok(BTreeMap::new()),
        Some(v) => serde_json::from_value(v)
            .map_err(|e| invalid(format!("{path}{field}"), format!("want string values: {e}"))),
    }
}

/// The body's keys, and the token of its `WriteRequest`, if any.
fn parse_doc(body: &[u8]) -> Result<(Map<String, Value>, Option<String>), RegisterError> {
    let mut doc: Value =
        serde_json::from_slice(body).map_err(|e| RegisterError::Decode(e.to_string()))?;
    normalize(&mut doc, &SCHEMA).map_err(|e| RegisterError::Decode(e.to_string()))?;
    let mut map = object(doc, "")?;
    let token = match map.remove("WriteRequest") {
        None => None,
        Some(Value::Object(mut w)) => {
            let token = match w.remove("Token") {
                None | Some(Value::Null) => None,
                Some(Value::String(t)) => Some(t).filter(|t| !t.is_empty()),
                Some(_) => return Err(invalid("WriteRequest.Token", "want a string")),
            };
            if let Some(key) = w.keys().next() {
                return Err(invalid(format!("WriteRequest.{key}"), "unknown field here"));
            }
            token
        }
        Some(_) => return Err(invalid("WriteRequest", "want an object")),
    };
    if map.contains_key("Token") {
        return Err(invalid("Token", "unknown field here"));
    }
    Ok((map, token))
}

/// Parses a `/v1/catalog/register` body for a cluster of `datacenter`.
pub fn parse_register(body: &[u8], datacenter: &str) -> Result<Registration, RegisterError> {
    let (mut map, body_token) = parse_doc(body)?;
    if map.contains_key("ID") {
        return Err(RegisterError::NotSupported("ID (a node id)".into()));
    }
    for nested in [
        "Tags",
        "Meta",
        "Port",
        "CheckID",
        "Name",
        "Notes",
        "Status",
        "ServiceID",
        "Output",
    ] {
        if map.contains_key(nested) {
            return Err(invalid(
                nested,
                "unknown field here (it belongs in Service or Check)",
            ));
        }
    }
    let name = string(&mut map, "Node", "")?;
    let address = string(&mut map, "Address", "")?;
    let dc = string(&mut map, "Datacenter", "")?;
    if !dc.is_empty() && dc != datacenter {
        return Err(RegisterError::NotSupported(format!(
            "Datacenter {dc:?} (this cluster is {datacenter:?}; register through that datacenter's servers)"
        )));
    }
    let mut meta = strings_map(&mut map, "NodeMeta", "")?;
    meta.insert(EXTERNAL_NODE_META.into(), "true".into());
    let node = Node {
        name,
        address,
        datacenter: datacenter.to_string(),
        meta,
        ..Default::default()
    };
    validate_node(&node).map_err(|e| invalid("Node", e.to_string()))?;
    let skip_node_update = match map.remove("SkipNodeUpdate") {
        None => false,
        Some(Value::Bool(b)) => b,
        Some(other) => {
            return Err(invalid(
                "SkipNodeUpdate",
                format!("want a boolean, not {other}"),
            ))
        }
    };
    let mut checks = Vec::new();
    if let Some(check) = map.remove("Check") {
        checks.push((String::from("Check"), check));
    }
    match map.remove("Checks") {
        None => {}
        Some(Value::Array(list)) => {
            checks.extend(
                list.into_iter()
                    .enumerate()
                    .map(|(i, c)| (format!("Checks[{i}]"), c)),
            );
        }
        Some(other) => return Err(invalid("Checks", format!("want a list, not {other}"))),
    }
    let instance = match map.remove("Service") {
        None => None,
        Some(service) => Some(parse_service(service, &node)?),
    };
    let mut worst: Option<(HealthStatus, String)> = None;
    for (path, check) in checks {
        let (service_id, status, output) = parse_check(check, &path, &node.name)?;
        let Some(instance) = &instance else {
            return Err(RegisterError::NotSupported(format!(
                "{path}: a check without a Service in the same body (weft keeps one health per instance)"
            )));
        };
        if service_id.is_empty() {
            return Err(RegisterError::NotSupported(format!(
                "{path}: a node-level check (no ServiceID)"
            )));
        }
        if service_id != instance.id {
            return Err(invalid(
                format!("{path}.ServiceID"),
                format!(
                    "{service_id:?} is not the Service registered here ({:?})",
                    instance.id
                ),
            ));
        }
        if worst.as_ref().is_none_or(|(w, _)| status > *w) {
            worst = Some((status, output));
        }
    }
    let instance = instance.map(|mut i| {
        if let Some((status, output)) = worst {
            i.health = status;
            i.check_output = crate::catalog::truncate_check_output(&output).to_string();
        }
        i
    });
    Ok(Registration {
        body_token,
        node,
        skip_node_update,
        instance,
    })
}

fn parse_service(service: Value, node: &Node) -> Result<ServiceInstance, RegisterError> {
    let mut s = object(service, "Service")?;
    let name = string(&mut s, "Service", "Service.")?;
    let id = string(&mut s, "ID", "Service.")?;
    let address = string(&mut s, "Address", "Service.")?;
    let tags: Vec<String> = match s.remove("Tags") {
        None => Vec::new(),
        Some(v) => serde_json::from_value(v)
            .map_err(|e| invalid("Service.Tags", format!("want strings: {e}")))?,
    };
    let meta = strings_map(&mut s, "Meta", "Service.")?;
    let port = match s.remove("Port") {
        None => 0,
        Some(v) => v
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| invalid("Service.Port", format!("{v} is not a port")))?,
    };
    if let Some(key) = s.keys().next() {
        return Err(invalid(format!("Service.{key}"), "unknown field here"));
    }
    let instance = ServiceInstance {
        id: if id.is_empty() { name.clone() } else { id },
        service: name,
        node: node.name.clone(),
        address: if address.is_empty() {
            node.address.clone()
        } else {
            address
        },
        port,
        tags,
        meta,
        health: HealthStatus::Passing,
        ..Default::default()
    };
    validate_service_instance(&instance).map_err(|e| invalid("Service", e.to_string()))?;
    Ok(instance)
}

/// A check's (ServiceID, Status, Output).
fn parse_check(
    check: Value,
    path: &str,
    node: &str,
) -> Result<(String, HealthStatus, String), RegisterError> {
    let mut c = object(check, path)?;
    let on = string(&mut c, "Node", &format!("{path}."))?;
    if !on.is_empty() && on != node {
        return Err(invalid(
            format!("{path}.Node"),
            format!("{on:?} is not the Node {node:?}"),
        ));
    }
    let _ = string(&mut c, "CheckID", &format!("{path}."))?;
    let _ = string(&mut c, "Name", &format!("{path}."))?;
    let notes = string(&mut c, "Notes", &format!("{path}."))?;
    let output = string(&mut c, "Output", &format!("{path}."))?;
    let service_id = string(&mut c, "ServiceID", &format!("{path}."))?;
    let status = string(&mut c, "Status", &format!("{path}."))?;
    let status = if status.is_empty() {
        // Consul's default for a check registered without a status.
        HealthStatus::Critical
    } else {
        status.parse().map_err(|_| {
            invalid(
                format!("{path}.Status"),
                format!("{status:?}: want passing, warning or critical"),
            )
        })?
    };
    if let Some(key) = c.keys().next() {
        return Err(invalid(format!("{path}.{key}"), "unknown field here"));
    }
    let output = if output.is_empty() { notes } else { output };
    Ok((service_id, status, output))
}

/// Parses a `/v1/catalog/deregister` body.
pub fn parse_deregister(body: &[u8], datacenter: &str) -> Result<Deregistration, RegisterError> {
    let (mut map, body_token) = parse_doc(body)?;
    let node = string(&mut map, "Node", "")?;
    crate::names::validate_name(&node).map_err(|e| invalid("Node", e.to_string()))?;
    let dc = string(&mut map, "Datacenter", "")?;
    if !dc.is_empty() && dc != datacenter {
        return Err(RegisterError::NotSupported(format!("Datacenter {dc:?}")));
    }
    if map.contains_key("CheckID") {
        return Err(RegisterError::NotSupported(
            "CheckID: removing one check (weft keeps one health per instance; deregister the ServiceID)".into(),
        ));
    }
    let service_id = string(&mut map, "ServiceID", "")?;
    if let Some(key) = map.keys().next() {
        return Err(invalid(key.clone(), "unknown field here"));
    }
    Ok(Deregistration {
        body_token,
        node,
        service_id: (!service_id.is_empty()).then_some(service_id),
    })
}

#[cfg(test)]
mod tests;
