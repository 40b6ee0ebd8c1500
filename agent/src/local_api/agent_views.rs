//! Consul's agent read endpoints in Consul's JSON shapes, built from what the
//! agent knows (pure): `/v1/agent/self` from the configuration,
//! `/v1/agent/services` and `/v1/agent/service/:id` from its services (the
//! file's and those registered through the API), `/v1/agent/checks` from the
//! local checks' latest results, and `/v1/agent/members` from the servers'
//! `/v1/catalog/nodes` and `/v1/health/state/critical`. Which entries a token
//! may see is decided before (`service:read`, `node:read`).

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::config::{AgentConfig, ServiceConfig};
use crate::health::CheckState;

/// The LAN gossip port Consul reports its members on; weft has no gossip,
/// but clients expect a port.
pub const MEMBER_PORT: u16 = 8301;
/// Consul's serf member status: alive, and failed.
pub const STATUS_ALIVE: u8 = 1;
pub const STATUS_FAILED: u8 = 4;

/// A stable, UUID-shaped id for a node (weft nodes have no UUID): the
/// first 16 bytes of SHA-256 of `datacenter/node`, as a version-4-shaped
/// UUID.
pub fn node_id(datacenter: &str, node: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{datacenter}/{node}").as_bytes(),
    );
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest.as_ref()[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// `GET /v1/agent/self`.
pub fn agent_self(config: &AgentConfig) -> Value {
    json!({
        "Config": {
            "Datacenter": config.datacenter,
            "NodeName": config.node_name,
            "NodeID": node_id(&config.datacenter, &config.node_name),
            "Server": false,
            "Revision": option_env!("WEFT_GIT_REVISION").unwrap_or(""),
            "Version": env!("CARGO_PKG_VERSION"),
        },
        "Member": {
            "Name": config.node_name,
            "Addr": config.advertise_addr.to_string(),
            "Port": MEMBER_PORT,
            "Tags": {"dc": config.datacenter, "role": "node"},
            "Status": STATUS_ALIVE,
        },
        "Meta": config.node_meta,
    })
}

/// One service of `/v1/agent/services`, `/v1/agent/service/:id`.
pub fn service(config: &AgentConfig, s: &ServiceConfig) -> Value {
    json!({
        "ID": s.id,
        "Service": s.name,
        "Tags": s.tags,
        "Meta": s.meta,
        "Port": s.port,
        "Address": s.address.to_string(),
        "Datacenter": config.datacenter,
        "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": false,
    })
}

/// `GET /v1/agent/services`: the services `visible` says, by id.
pub fn services(config: &AgentConfig, visible: impl Fn(&ServiceConfig) -> bool) -> Value {
    let map: Map<String, Value> = config
        .services
        .iter()
        .filter(|s| visible(s))
        .map(|s| (s.id.clone(), service(config, s)))
        .collect();
    Value::Object(map)
}

/// `GET /v1/agent/checks`: the checks `visible` says, by check id. A check
/// not run yet reads critical, as in Consul.
pub fn checks(
    config: &AgentConfig,
    states: &[CheckState],
    visible: impl Fn(&CheckState) -> bool,
) -> Value {
    let map: Map<String, Value> = states
        .iter()
        .filter(|c| visible(c))
        .map(|c| {
            let service = config.services.iter().find(|s| s.id == c.info.service_id);
            let tags = service.map(|s| s.tags.clone()).unwrap_or_default();
            let configured =
                service.and_then(|s| s.checks.iter().find(|k| k.id == c.info.check_id));
            let name = configured
                .and_then(|k| k.name.clone())
                .unwrap_or_else(|| format!("Service '{}' check", c.info.service_name));
            let notes = configured.and_then(|k| k.notes.clone()).unwrap_or_default();
            let (status, output) = match &c.result {
                Some(r) => (r.status.to_string(), r.output.clone()),
                None => ("critical".to_string(), String::new()),
            };
            (
                c.info.check_id.clone(),
                json!({
                    "Node": config.node_name,
                    "CheckID": c.info.check_id,
                    "Name": name,
                    "Status": status,
                    "Notes": notes,
                    "Output": output,
                    "ServiceID": c.info.service_id,
                    "ServiceName": c.info.service_name,
                    "ServiceTags": tags,
                    "Type": c.info.kind,
                }),
            )
        })
        .collect();
    Value::Object(map)
}

/// A node of the servers' `/v1/catalog/nodes`.
#[derive(Debug, Deserialize)]
pub struct CatalogNode {
    #[serde(rename = "Node")]
    pub node: String,
    #[serde(rename = "Address", default)]
    pub address: String,
    #[serde(rename = "Datacenter", default)]
    pub datacenter: String,
}

/// A check of the servers' `/v1/health/state/critical`.
#[derive(Debug, Deserialize)]
pub struct CriticalCheck {
    #[serde(rename = "Node")]
    pub node: String,
    #[serde(rename = "CheckID", default)]
    pub check_id: String,
}

/// `GET /v1/agent/members` from the catalog's nodes: alive, or failed when
/// the node's own check (`serfHealth`) is critical.
pub fn members(nodes: &[CatalogNode], critical: &[CriticalCheck]) -> Value {
    let failed: BTreeSet<&str> = critical
        .iter()
        .filter(|c| c.check_id == "serfHealth")
        .map(|c| c.node.as_str())
        .collect();
    Value::Array(
        nodes
            .iter()
            .map(|n| {
                let status = if failed.contains(n.node.as_str()) {
                    STATUS_FAILED
                } else {
                    STATUS_ALIVE
                };
                json!({
                    "Name": n.node,
                    "Addr": n.address,
                    "Port": MEMBER_PORT,
                    "Tags": BTreeMap::from([("dc", n.datacenter.as_str()), ("role", "node")]),
                    "Status": status,
                    "ProtocolMin": 1,
                    "ProtocolMax": 5,
                    "ProtocolCur": 2,
                    "DelegateMin": 2,
                    "DelegateMax": 5,
                    "DelegateCur": 4,
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_stable_uuids() {
        let id = node_id("dc1", "node-a");
        assert_eq!(id, node_id("dc1", "node-a"));
        assert_ne!(id, node_id("dc1", "node-b"));
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_eq!(id.matches('-').count(), 4);
    }

    #[test]
    fn members_mark_critical_nodes_failed() {
        let nodes: Vec<CatalogNode> = serde_json::from_str(
            r#"[{"Node":"a","Address":"10.0.0.2","Datacenter":"dc1","Meta":{}},
                {"Node":"b","Address":"10.0.0.3","Datacenter":"dc1"}]"#,
        )
        .unwrap();
        let critical: Vec<CriticalCheck> = serde_json::from_str(
            r#"[{"Node":"b","CheckID":"serfHealth","Status":"critical"},
                {"Node":"a","CheckID":"service:web","Status":"critical"}]"#,
        )
        .unwrap();
        let m = members(&nodes, &critical);
        assert_eq!(m[0]["Name"], "a");
        assert_eq!(m[0]["Addr"], "10.0.0.2");
        assert_eq!(m[0]["Port"], 8301);
        assert_eq!(m[0]["Status"], 1);
        assert_eq!(m[0]["Tags"], json!({"dc": "dc1", "role": "node"}));
        assert_eq!(m[1]["Status"], 4);
    }
}
