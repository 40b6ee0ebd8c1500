//! Consul's catalog and health reads: `/v1/catalog/services`,
//! `/v1/catalog/nodes`, `/v1/health/service/<name>[?passing]`. They read
//! the state after the read barrier with the gRPC API's ACL filters
//! (instances need read on their service and their node).
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use hyper::Method;
use serde_json::{json, Value};
use weft_api::acl::{Access, Resource, ResourceKind};
use weft_api::catalog::{HealthStatus, Node, ServiceInstance};

use super::{json_at, only, Answer, Call, HttpError};
use crate::grpc::catalog::may_read_instance;
use crate::node::ServerNode;
use crate::state::State;

/// The node check's id, as in Consul.
pub const NODE_CHECK: &str = "serfHealth";

pub async fn route(node: &Arc<ServerNode>, call: &Call, path: &str) -> Answer {
    only(call, Method::GET)?;
    if path == "/v1/catalog/services" {
        call.only_params(&[])?;
        let caller = call.caller(node).await?;
        caller.require_any_read(ResourceKind::Service)?;
        let (services, index) = crate::grpc::read(node, None, |s| {
            let mut tags: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for name in s.vips.keys() {
                tags.entry(name.clone()).or_default();
            }
            for i in s.instances.values().flat_map(|m| m.values()) {
                let service = tags.entry(i.service.clone()).or_default();
                // Tags of instances on nodes the token cannot read stay out.
                if may_read_instance(&caller, i) {
                    service.extend(i.tags.iter().cloned());
                }
            }
            tags.retain(|name, _| caller.can(Resource::Service(name), Access::Read));
            (tags, s.index)
        })
        .await?;
        return Ok(json_at(index, &services));
    }
    if path == "/v1/catalog/nodes" {
        call.only_params(&[])?;
        let caller = call.caller(node).await?;
        caller.require_any_read(ResourceKind::Node)?;
        let (nodes, index) = crate::grpc::read(node, None, |s| {
            let nodes: Vec<Value> = s
                .nodes
                .values()
                .filter(|n| caller.can(Resource::Node(&n.name), Access::Read))
                .map(node_json)
                .collect();
            (nodes, s.index)
        })
        .await?;
        return Ok(json_at(index, &nodes));
    }
    if let Some(name) = path.strip_prefix("/v1/health/service/") {
        call.only_params(&["passing"])?;
        weft_api::names::validate_name(name)
            .map_err(|e| HttpError::bad_request(format!("service: {e}")))?;
        let caller = call.caller(node).await?;
        caller.require(Resource::Service(name), Access::Read)?;
        let passing_only = call.flag("passing")?;
        let (entries, index) = crate::grpc::read(node, None, |s| {
            let entries: Vec<Value> = s
                .instances_of(name)
                .filter(|i| may_read_instance(&caller, i))
                .filter(|i| !passing_only || worst_status(s, i) == HealthStatus::Passing)
                .map(|i| health_entry(s, i))
                .collect();
            (entries, s.index)
        })
        .await?;
        return Ok(json_at(index, &entries));
    }
    Err(HttpError::not_found())
}

fn node_json(n: &Node) -> Value {
    json!({
        "Node": n.name,
        "Address": n.address,
        "Datacenter": n.datacenter,
        "Meta": n.meta,
        "CreateIndex": n.create_index,
        "ModifyIndex": n.modify_index,
    })
}

/// The worse of two statuses.
pub fn worse(a: HealthStatus, b: HealthStatus) -> HealthStatus {
    let rank = |h: HealthStatus| match h {
        HealthStatus::Passing => 0,
        HealthStatus::Warning => 1,
        HealthStatus::Critical => 2,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

/// An instance's worst check: its own, or its node's (a node the servers
/// do not know counts as critical).
pub fn worst_status(state: &State, i: &ServiceInstance) -> HealthStatus {
    let node = state
        .nodes
        .get(&i.node)
        .map_or(HealthStatus::Critical, |n| n.health);
    worse(i.health, node)
}

/// One `/v1/health/service` entry: the node, the instance and its two
/// checks (the node's `serfHealth` and the instance's `service:<id>`).
fn health_entry(s: &State, i: &ServiceInstance) -> Value {
    let node = s.nodes.get(&i.node);
    let (node_status, node_output) = node
        .map_or((HealthStatus::Critical, "node not registered"), |n| {
            (n.health, n.health_output.as_str())
        });
    json!({
        "Node": {
            "Node": i.node,
            "Address": node.map(|n| n.address.as_str()).unwrap_or(""),
            "Datacenter": node.map(|n| n.datacenter.as_str()).unwrap_or(""),
            "Meta": node.map(|n| &n.meta),
        },
        "Service": {
            "ID": i.id,
            "Service": i.service,
            "Tags": i.tags,
            "Address": i.address,
            "Port": i.port,
            "Meta": i.meta,
        },
        "Checks": [
            {
                "Node": i.node,
                "CheckID": NODE_CHECK,
                "Name": "Node health",
                "Status": node_status.as_str(),
                "Output": node_output,
                "ServiceID": "",
                "ServiceName": "",
            },
            {
                "Node": i.node,
                "CheckID": format!("service:{}", i.id),
                "Name": format!("Service '{}' check", i.service),
                "Status": i.health.as_str(),
                "Output": i.check_output,
                "ServiceID": i.id,
                "ServiceName": i.service,
            },
        ],
    })
}
