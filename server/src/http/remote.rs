//! `?dc=` for another datacenter of the federation: the catalog and health
//! reads Consul forwards there are answered here, from this datacenter's
//! copy of that datacenter's instances (fetched through the gateways every
//! 2 s, `crate::federation`), as far as the caller's token may read their
//! services. Other endpoints refuse another datacenter by name.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use http::Method;
use serde_json::{json, Value};
use weft_api::acl::{Access, Resource, ResourceKind};
use weft_api::catalog::{HealthStatus, ServiceInstance};

use super::{json_at, only, Answer, Call, HttpError};
use crate::node::ServerNode;

/// The endpoints answered for another datacenter.
pub const ANSWERED: &[&str] = &[
    "/v1/catalog/services",
    "/v1/catalog/service/",
    "/v1/health/service/",
];

pub async fn route(node: &Arc<ServerNode>, call: &Call, path: &str, dc: &str) -> Answer {
    only(call, Method::GET)?;
    let caller = call.caller(node).await?;
    let known = {
        let s = node.shared.state.read().expect("state lock");
        s.federation.contains_key(dc)
    };
    if !known {
        return Err(HttpError::bad_request(format!(
            "dc {dc:?} is not a datacenter of this federation"
        )));
    }
    let readable = |i: &&ServiceInstance| caller.can(Resource::Service(&i.service), Access::Read);
    if path == "/v1/catalog/services" {
        call.only_params(&[])?;
        caller
            .require_any_read(ResourceKind::Service)
            .map_err(HttpError::from)?;
        let (services, index) = crate::grpc::read(node, call.read(), |s| {
            let mut tags: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for i in s.remote.get(dc).into_iter().flatten().filter(readable) {
                tags.entry(i.service.clone())
                    .or_default()
                    .extend(i.tags.iter().cloned());
            }
            (tags, s.index)
        })
        .await?;
        return Ok(json_at(index, &services));
    }
    let (name, health) = if let Some(name) = path.strip_prefix("/v1/catalog/service/") {
        call.only_params(&[])?;
        (name, false)
    } else if let Some(name) = path.strip_prefix("/v1/health/service/") {
        call.only_params(&["passing"])?;
        (name, true)
    } else {
        return Err(HttpError::bad_request(format!(
            "?dc={dc}: another datacenter answers {} here; ask its servers for the rest",
            ANSWERED.join(", ")
        )));
    };
    weft_api::names::validate_name(name)
        .map_err(|e| HttpError::bad_request(format!("service: {e}")))?;
    caller
        .require(Resource::Service(name), Access::Read)
        .map_err(HttpError::from)?;
    let passing_only = health && call.flag("passing")?;
    let (entries, index) = crate::grpc::read(node, call.read(), |s| {
        let entries: Vec<Value> = s
            .remote
            .get(dc)
            .into_iter()
            .flatten()
            .filter(|i| i.service == name)
            .filter(|i| !passing_only || i.health == HealthStatus::Passing)
            .map(|i| {
                if health {
                    health_entry(dc, i)
                } else {
                    catalog_entry(dc, i)
                }
            })
            .collect();
        (entries, s.index)
    })
    .await?;
    Ok(json_at(index, &entries))
}

/// A `/v1/catalog/service` entry of another datacenter: its node's name
/// and datacenter (the node's own fields stay there).
fn catalog_entry(dc: &str, i: &ServiceInstance) -> Value {
    json!({
        "Node": i.node,
        "Address": "",
        "Datacenter": dc,
        "ServiceID": i.id,
        "ServiceName": i.service,
        "ServiceTags": i.tags,
        "ServiceAddress": i.address,
        "ServicePort": i.port,
        "ServiceMeta": i.meta,
    })
}

/// A `/v1/health/service` entry of another datacenter: the instance's
/// health as that datacenter judged it (node and service together).
fn health_entry(dc: &str, i: &ServiceInstance) -> Value {
    json!({
        "Node": { "Node": i.node, "Address": "", "Datacenter": dc },
        "Service": super::catalog::service_json(i),
        "Checks": [super::catalog::service_check(i)],
    })
}
