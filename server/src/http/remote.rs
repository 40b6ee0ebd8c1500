//! `?dc=` for another datacenter of the federation.
//!
//! - The catalog and health reads of services ([`ANSWERED`]) are answered
//!   here, from this datacenter's copy of that datacenter's instances
//!   (fetched through the gateways every 2 s, `crate::federation`), as far
//!   as the caller's token may read their services.
//! - Every other endpoint of the HTTP API is forwarded, as Consul forwards
//!   it: through this datacenter's gateways to that datacenter's servers
//!   (`Federation.Forward`, server to server over mutual TLS), which answer
//!   it with the caller's token. Tokens of the primary are replicated to
//!   every datacenter, so they work there; a datacenter's local tokens do
//!   not. A datacenter's snapshot and ACL bootstrap are its own, never
//!   forwarded.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use weft_api::acl::{Access, Resource, ResourceKind};
use weft_api::catalog::{HealthStatus, ServiceInstance};
use weft_api::proto;

use super::{json_at, only, Answer, Call, HttpError};
use crate::grpc::catalog::may_read_instance;
use crate::node::ServerNode;

/// The endpoints answered for another datacenter.
pub const ANSWERED: &[&str] = &[
    "/v1/catalog/services",
    "/v1/catalog/service/",
    "/v1/health/service/",
];

/// Whether this datacenter answers `path` for another one (else it is
/// forwarded there).
pub fn answers(path: &str) -> bool {
    path == ANSWERED[0] || ANSWERED[1..].iter().any(|p| path.starts_with(p))
}

/// Refuses a datacenter that is not of the federation.
fn require_known(node: &ServerNode, dc: &str) -> Result<(), HttpError> {
    let known = {
        let s = node.shared.state.read().expect("state lock");
        s.federation.contains_key(dc)
    };
    if known {
        Ok(())
    } else {
        Err(HttpError::bad_request(format!(
            "dc {dc:?} is not a datacenter of this federation"
        )))
    }
}

/// Refuses to send a secondary's own token (its bootstrap token, its
/// agents' tokens) to another datacenter: it works nowhere else, and a
/// server there would learn a secret of this one. The primary's tokens,
/// replicated everywhere, are the ones a call to another datacenter
/// carries.
fn require_global(node: &ServerNode, caller: &crate::grpc::auth::Caller) -> Result<(), HttpError> {
    if node.datacenter == node.primary_datacenter {
        return Ok(());
    }
    let replicated = {
        let s = node.shared.state.read().expect("state lock");
        s.acl
            .tokens
            .get(&caller.accessor)
            .is_some_and(|t| t.replicated)
    };
    if replicated {
        Ok(())
    } else {
        Err(HttpError::new(
            StatusCode::FORBIDDEN,
            format!(
                "this token is datacenter {}'s own: it is not sent to other datacenters (use one made in the primary, {})",
                node.datacenter, node.primary_datacenter
            ),
        ))
    }
}

/// Forwards `call` to datacenter `dc`'s servers and gives back their answer.
pub async fn forward(node: &Arc<ServerNode>, call: &Call, dc: &str) -> Answer {
    // Only for a token known here too (the primary's are everywhere): an
    // unknown one is not worth a call across the WAN, and does not learn
    // which datacenters there are.
    let caller = call.caller(node).await?;
    require_known(node, dc)?;
    require_global(node, &caller)?;
    if !super::forwardable(&call.path) {
        return Err(HttpError::bad_request(format!(
            "?dc={dc}: {} is each datacenter's own; ask {dc}'s servers",
            call.path
        )));
    }
    let (index, wait) = call.block.map_or((0, Duration::ZERO), |(i, w)| (i, w));
    let req = proto::ForwardRequest {
        method: call.method.as_str().to_string(),
        path: call.path.clone(),
        query: (call.query.iter())
            .map(|(name, value)| proto::ForwardParam {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        token: call.secret.clone().unwrap_or_default(),
        body: call.body.to_vec(),
        stale: call.stale,
        index,
        wait_ms: wait.as_millis() as u64,
    };
    let reply = crate::federation::forward(node, dc, req, &caller.accessor)
        .await
        .map_err(|e| match e {
            crate::federation::ForwardError::Busy | crate::federation::ForwardError::TokenBusy => {
                HttpError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string())
            }
            crate::federation::ForwardError::NoAnswer(why) => HttpError::new(
                StatusCode::BAD_GATEWAY,
                format!("no path to datacenter {dc}: {why}"),
            ),
        })?;
    let status = u16::try_from(reply.status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or_else(|| {
            HttpError::new(
                StatusCode::BAD_GATEWAY,
                format!("datacenter {dc} answered status {}", reply.status),
            )
        })?;
    let mut answer = Response::new(Full::new(Bytes::from(reply.body)));
    *answer.status_mut() = status;
    for p in reply.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(p.name.as_bytes()),
            HeaderValue::from_str(&p.value),
        ) {
            if carried_from_remote(&name) {
                answer.headers_mut().append(name, value);
            }
        }
    }
    Ok(answer)
}

/// Whether a header of another datacenter's answer is passed on: what
/// describes the answer (its type, Consul's index and currency headers),
/// not what frames the connection or sets state in the caller's client
/// (`content-length`, `transfer-encoding`, `connection`, `set-cookie`),
/// nor what this server decides for every answer (caching, framing
/// options).
fn carried_from_remote(name: &HeaderName) -> bool {
    name == hyper::header::CONTENT_TYPE || name.as_str().starts_with("x-consul-")
}

pub async fn route(node: &Arc<ServerNode>, call: &Call, path: &str, dc: &str) -> Answer {
    only(call, Method::GET)?;
    let caller = call.caller(node).await?;
    require_known(node, dc)?;
    // As for this datacenter's catalog: an instance is read with its
    // service and its node (node rules name nodes in every datacenter).
    let readable = |i: &&ServiceInstance| may_read_instance(&caller, i);
    if path == "/v1/catalog/services" {
        call.only_params(&[])?;
        caller
            .require_any_read(ResourceKind::Service)
            .map_err(HttpError::from)?;
        let (services, index) = crate::grpc::read(node, call.read(), |s| {
            let mut tags: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for i in s.remote.get(dc).into_iter().flatten() {
                let service = tags.entry(i.service.clone()).or_default();
                // Tags of instances on nodes the token cannot read stay out.
                if readable(&i) {
                    service.extend(i.tags.iter().cloned());
                }
            }
            tags.retain(|name, _| caller.can(Resource::Service(name), Access::Read));
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
            .filter(readable)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Another datacenter's server chose every header of its answer, and
    /// each reached the caller: a `content-length` or `transfer-encoding`
    /// of its own beside this server's framing, a `set-cookie`, and its
    /// `cache-control` over this server's `no-store`. Only what describes
    /// the answer passes.
    #[test]
    fn only_headers_that_describe_the_answer_pass() {
        let passes = |n: &str| carried_from_remote(&HeaderName::from_bytes(n.as_bytes()).unwrap());
        for name in ["content-type", "x-consul-index", "x-consul-knownleader"] {
            assert!(passes(name), "{name}");
        }
        for name in [
            "content-length",
            "transfer-encoding",
            "connection",
            "set-cookie",
            "cache-control",
            "x-frame-options",
            "location",
        ] {
            assert!(!passes(name), "{name}");
        }
    }
}
