//! Consul's catalog and health reads: `/v1/catalog/services`,
//! `/v1/catalog/service/<name>`, `/v1/catalog/nodes`,
//! `/v1/catalog/node/<name>`, `/v1/health/service/<name>[?passing]`,
//! `/v1/health/checks/<service>`, `/v1/health/node/<node>`,
//! `/v1/health/state/<state>`. They read the state after the read barrier
//! with the gRPC API's ACL filters (instances need read on their service
//! and their node). Each instance has two checks, as Consul shows them:
//! its node's `serfHealth` and its own `service:<id>` (weft keeps one
//! health per instance, the worst of its agent's checks).
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use hyper::Method;
use serde_json::{json, Value};
use weft_api::acl::{Access, Resource, ResourceKind};
use weft_api::catalog::{HealthStatus, Node, ServiceInstance};
use weft_api::filter::{parse_filter_as, Filter, Selectors, CATALOG_SELECTORS, SERVICE_SELECTORS};

use super::{json_at, only, Answer, Call, HttpError};
use crate::grpc::auth::Caller;
use crate::grpc::catalog::{effective_health, may_read_instance};
use crate::node::ServerNode;
use crate::state::State;

/// The node check's id, as in Consul.
pub const NODE_CHECK: &str = "serfHealth";

pub async fn route(node: &Arc<ServerNode>, call: &Call, path: &str) -> Answer {
    only(call, Method::GET)?;
    if path == "/v1/catalog/datacenters" {
        // Consul's shape: the names, this datacenter first.
        call.only_params(&[])?;
        call.caller(node).await?;
        let s = node.shared.state.read().expect("state lock");
        let mut names = vec![node.datacenter.clone()];
        names.extend(
            s.federation
                .keys()
                .filter(|d| **d != node.datacenter)
                .cloned(),
        );
        return Ok(json_at(s.index, &names));
    }
    if path == "/v1/catalog/services" {
        call.only_params(&[])?;
        let caller = call.caller(node).await?;
        caller.require_any_read(ResourceKind::Service)?;
        let (services, index) = crate::grpc::read(node, call.read(), |s| {
            let mut tags: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            // Remote services' virtual IPs (`api.dc2`) are not services here.
            for name in s
                .vips
                .keys()
                .filter(|n| weft_api::vip::split_key(n).1.is_none())
            {
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
        let (nodes, index) = crate::grpc::read(node, call.read(), |s| {
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
    if let Some(name) = path.strip_prefix("/v1/catalog/service/") {
        call.only_params(&["filter"])?;
        let filter = filter(call, CATALOG_SELECTORS)?;
        let caller = service_reader(node, call, name).await?;
        let (entries, index) = crate::grpc::read(node, call.read(), |s| {
            let entries: Vec<Value> = s
                .instances_of(name)
                .filter(|i| may_read_instance(&caller, i))
                .filter(|i| filter.matches(i))
                .map(|i| catalog_entry(s, i))
                .collect();
            (entries, s.index)
        })
        .await?;
        return Ok(json_at(index, &entries));
    }
    if let Some(name) = path.strip_prefix("/v1/catalog/node/") {
        call.only_params(&[])?;
        let caller = node_reader(node, call, name).await?;
        let (found, index) = crate::grpc::read(node, call.read(), |s| {
            let found = s.nodes.get(name).map(|n| {
                let services: BTreeMap<&str, Value> = instances_on(s, name)
                    .filter(|i| caller.can(Resource::Service(&i.service), Access::Read))
                    .map(|i| (i.id.as_str(), service_json(i)))
                    .collect();
                json!({ "Node": node_json(n), "Services": services })
            });
            (found, s.index)
        })
        .await?;
        // Consul answers null for a node it does not know.
        return Ok(json_at(index, &found));
    }
    if let Some(service) = path.strip_prefix("/v1/health/checks/") {
        call.only_params(&[])?;
        let caller = service_reader(node, call, service).await?;
        let (checks, index) = crate::grpc::read(node, call.read(), |s| {
            let checks: Vec<Value> = s
                .instances_of(service)
                .filter(|i| may_read_instance(&caller, i))
                .map(service_check)
                .collect();
            (checks, s.index)
        })
        .await?;
        return Ok(json_at(index, &checks));
    }
    if let Some(name) = path.strip_prefix("/v1/health/node/") {
        call.only_params(&[])?;
        let caller = node_reader(node, call, name).await?;
        let (checks, index) = crate::grpc::read(node, call.read(), |s| {
            let mut checks: Vec<Value> = s.nodes.get(name).map(node_check).into_iter().collect();
            checks.extend(
                instances_on(s, name)
                    .filter(|i| caller.can(Resource::Service(&i.service), Access::Read))
                    .map(service_check),
            );
            (checks, s.index)
        })
        .await?;
        return Ok(json_at(index, &checks));
    }
    if let Some(state) = path.strip_prefix("/v1/health/state/") {
        call.only_params(&[])?;
        let wanted = match state {
            "any" => None,
            "passing" => Some(HealthStatus::Passing),
            "warning" => Some(HealthStatus::Warning),
            "critical" => Some(HealthStatus::Critical),
            other => {
                return Err(HttpError::bad_request(format!(
                    "state {other:?}: any, passing, warning or critical"
                )))
            }
        };
        let caller = call.caller(node).await?;
        // Every check is a node's (instances are read with their node): a
        // token that reads no node gets none, without a walk over all.
        let any = caller.can_read_any(ResourceKind::Node);
        let (checks, index) = crate::grpc::read(node, call.read(), |s| {
            if !any {
                return (Vec::new(), s.index);
            }
            let in_state = |h: HealthStatus| wanted.is_none_or(|w| w == h);
            let nodes = s
                .nodes
                .values()
                .filter(|n| in_state(n.health))
                .filter(|n| caller.can(Resource::Node(&n.name), Access::Read))
                .map(node_check);
            let instances = s
                .instances
                .values()
                .flat_map(|m| m.values())
                .filter(|i| in_state(i.health))
                .filter(|i| may_read_instance(&caller, i))
                .map(service_check);
            (nodes.chain(instances).collect::<Vec<Value>>(), s.index)
        })
        .await?;
        return Ok(json_at(index, &checks));
    }
    if let Some(name) = path.strip_prefix("/v1/health/service/") {
        call.only_params(&["passing", "filter"])?;
        let filter = filter(call, SERVICE_SELECTORS)?;
        let caller = service_reader(node, call, name).await?;
        let passing_only = call.flag("passing")?;
        let (entries, index) = crate::grpc::read(node, call.read(), |s| {
            let entries: Vec<Value> = s
                .instances_of(name)
                .filter(|i| may_read_instance(&caller, i))
                .filter(|i| filter.matches(i))
                .filter(|i| !passing_only || effective_health(s, i) == HealthStatus::Passing)
                .map(|i| health_entry(s, i))
                .collect();
            (entries, s.index)
        })
        .await?;
        return Ok(json_at(index, &entries));
    }
    Err(HttpError::not_found())
}

/// The request's `?filter=`, in the part of Consul's filter language weft
/// takes (tags and service meta, joined with `and`; see
/// `weft_api::filter`), with the endpoint's names for them. Anything else
/// is refused with where it fails, never ignored.
fn filter(call: &Call, names: Selectors) -> Result<Filter, HttpError> {
    let text = call.query("filter").unwrap_or_default();
    parse_filter_as(text, names)
        .map_err(|e| HttpError::bad_request(format!("filter {text:?}: {e}")))
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

/// Read on service `name` (a valid name), for the caller of `call`.
async fn service_reader(node: &ServerNode, call: &Call, name: &str) -> Result<Caller, HttpError> {
    weft_api::names::validate_name(name)
        .map_err(|e| HttpError::bad_request(format!("service: {e}")))?;
    let caller = call.caller(node).await?;
    caller.require(Resource::Service(name), Access::Read)?;
    Ok(caller)
}

/// Read on node `name` (a valid name), for the caller of `call`.
async fn node_reader(node: &ServerNode, call: &Call, name: &str) -> Result<Caller, HttpError> {
    weft_api::names::validate_name(name)
        .map_err(|e| HttpError::bad_request(format!("node: {e}")))?;
    let caller = call.caller(node).await?;
    caller.require(Resource::Node(name), Access::Read)?;
    Ok(caller)
}

fn instances_on<'a>(s: &'a State, node: &str) -> impl Iterator<Item = &'a ServiceInstance> {
    s.instances.get(node).into_iter().flat_map(|m| m.values())
}

/// An instance as Consul's agent and catalog node views show it.
pub(super) fn service_json(i: &ServiceInstance) -> Value {
    json!({
        "ID": i.id,
        "Service": i.service,
        "Tags": i.tags,
        "Address": i.address,
        "Port": i.port,
        "Meta": i.meta,
        "CreateIndex": i.create_index,
        "ModifyIndex": i.modify_index,
    })
}

/// A node's `serfHealth` check.
fn node_check(n: &Node) -> Value {
    json!({
        "Node": n.name,
        "CheckID": NODE_CHECK,
        "Name": "Node health",
        "Status": n.health.as_str(),
        "Output": n.health_output,
        "ServiceID": "",
        "ServiceName": "",
        "ServiceTags": [],
    })
}

/// An instance's own check, `service:<id>`.
pub(super) fn service_check(i: &ServiceInstance) -> Value {
    json!({
        "Node": i.node,
        "CheckID": format!("service:{}", i.id),
        "Name": format!("Service '{}' check", i.service),
        "Status": i.health.as_str(),
        "Output": i.check_output,
        "ServiceID": i.id,
        "ServiceName": i.service,
        "ServiceTags": i.tags,
    })
}

/// One `/v1/catalog/service` entry: the node's fields and the instance's,
/// flat, as Consul has them.
fn catalog_entry(s: &State, i: &ServiceInstance) -> Value {
    let node = s.nodes.get(&i.node);
    json!({
        "Node": i.node,
        "Address": node.map(|n| n.address.as_str()).unwrap_or(""),
        "Datacenter": node.map(|n| n.datacenter.as_str()).unwrap_or(""),
        "NodeMeta": node.map(|n| &n.meta),
        "ServiceID": i.id,
        "ServiceName": i.service,
        "ServiceTags": i.tags,
        "ServiceAddress": i.address,
        "ServicePort": i.port,
        "ServiceMeta": i.meta,
        "CreateIndex": i.create_index,
        "ModifyIndex": i.modify_index,
    })
}

/// One `/v1/health/service` entry: the node, the instance and its two
/// checks (the node's `serfHealth` and the instance's `service:<id>`).
fn health_entry(s: &State, i: &ServiceInstance) -> Value {
    let node = s.nodes.get(&i.node);
    let node_check = node.map(node_check).unwrap_or_else(|| {
        json!({
            "Node": i.node, "CheckID": NODE_CHECK, "Name": "Node health",
            "Status": "critical", "Output": "node not registered",
            "ServiceID": "", "ServiceName": "", "ServiceTags": [],
        })
    });
    json!({
        "Node": {
            "Node": i.node,
            "Address": node.map(|n| n.address.as_str()).unwrap_or(""),
            "Datacenter": node.map(|n| n.datacenter.as_str()).unwrap_or(""),
            "Meta": node.map(|n| &n.meta),
        },
        "Service": service_json(i),
        "Checks": [node_check, service_check(i)],
    })
}
