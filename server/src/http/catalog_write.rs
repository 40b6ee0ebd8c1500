//! `PUT /v1/catalog/register` and `PUT /v1/catalog/deregister`, in
//! Consul's shapes, for external nodes (nodes no agent runs; see
//! `weft_api::catalog_register`). Registering needs `node:write` on the node
//! and `service:write` on its service; deregistering `node:write` (and
//! `service:write` for one instance, and write on the service of an
//! instance replaced), as in Consul. A node an agent runs is its agent's:
//! the catalog API neither registers over it nor removes it (409), and the
//! state refuses the write too if an agent's node took the name meanwhile.
//! A registration is one Raft write (the node and its instance, or
//! nothing); removals go through the gRPC catalog service with the caller's
//! token. Removing what is gone already answers `true`, as Consul does.
use std::sync::Arc;

use hyper::{Method, StatusCode};
use weft_api::acl::{Access, Resource};
use weft_api::catalog::Node;
use weft_api::catalog_register::{is_external, parse_deregister, parse_register};
use weft_api::proto::{self, catalog_server::Catalog as _};

use super::{json, only, Answer, Call, HttpError};
use crate::grpc::catalog::CatalogApi;
use crate::node::ServerNode;
use crate::state::Command;

pub async fn route(node: &Arc<ServerNode>, call: &Call, path: &str) -> Answer {
    only(call, Method::PUT)?;
    call.only_params(&[])?;
    match path {
        "/v1/catalog/register" => register(node, call).await,
        "/v1/catalog/deregister" => deregister(node, call).await,
        _ => Err(HttpError::not_found()),
    }
}

/// A token in the body (`WriteRequest.Token`, which Go-shaped clients add)
/// must be the request's own: the request's token is the one authorized.
fn same_token(call: &Call, body_token: Option<&str>) -> Result<(), HttpError> {
    match body_token {
        Some(t) if Some(t) != call.token() => Err(HttpError::bad_request(
            "WriteRequest.Token is not the request's token (send one token, in X-Consul-Token)",
        )),
        _ => Ok(()),
    }
}

/// 409 unless the node `name` is absent or external.
fn external_or_absent(name: &str, existing: Option<&Node>) -> Result<(), HttpError> {
    match existing {
        Some(n) if !is_external(n) => Err(HttpError::new(
            StatusCode::CONFLICT,
            format!(
                "node {name:?} is run by a weft agent, which registers it and its services; \
                 the catalog API registers and removes external nodes only"
            ),
        )),
        _ => Ok(()),
    }
}

async fn register(node: &Arc<ServerNode>, call: &Call) -> Answer {
    let caller = call.caller(node).await?;
    let r = parse_register(&call.body, &node.datacenter)
        .map_err(|e| HttpError::bad_request(e.to_string()))?;
    same_token(call, r.body_token.as_deref())?;
    caller.require(Resource::Node(&r.node.name), Access::Write)?;
    if let Some(i) = &r.instance {
        caller.require(Resource::Service(&i.service), Access::Write)?;
    }
    let name = r.node.name.clone();
    let existing = crate::grpc::read(node, call.read(), |s| s.nodes.get(&name).cloned()).await?;
    external_or_absent(&name, existing.as_ref())?;
    if let Some(i) = &r.instance {
        crate::grpc::catalog::require_replaced_service(node, &caller, &i.node, &i.id, &i.service)
            .await?;
    }
    // `SkipNodeUpdate` keeps an existing node's address and meta.
    let node_entry = match existing {
        Some(old) if r.skip_node_update => old,
        _ => r.node,
    };
    // One write: the node and its instance both, or neither; the state
    // refuses it if an agent's node took the name meanwhile.
    let what = format!("register external node {name}");
    let cmd = Command::RegisterExternal {
        node: node_entry,
        instance: r.instance,
    };
    crate::grpc::write(node, &caller, &what, cmd).await?;
    Ok(json(StatusCode::OK, &true))
}

async fn deregister(node: &Arc<ServerNode>, call: &Call) -> Answer {
    let caller = call.caller(node).await?;
    let d = parse_deregister(&call.body, &node.datacenter)
        .map_err(|e| HttpError::bad_request(e.to_string()))?;
    same_token(call, d.body_token.as_deref())?;
    caller.require(Resource::Node(&d.node), Access::Write)?;
    let name = d.node.clone();
    let existing = crate::grpc::read(node, call.read(), |s| s.nodes.get(&name).cloned()).await?;
    if existing.is_none() {
        // Gone already: as Consul answers.
        return Ok(json(StatusCode::OK, &true));
    }
    external_or_absent(&name, existing.as_ref())?;
    let api = CatalogApi(node.clone());
    match d.service_id {
        Some(id) => {
            // As in Consul: the instance's service write too.
            let (n, i) = (name.clone(), id.clone());
            let service = crate::grpc::read(node, call.read(), move |s| {
                s.instances
                    .get(&n)
                    .and_then(|m| m.get(&i))
                    .map(|x| x.service.clone())
            })
            .await?;
            let Some(service) = service else {
                return Ok(json(StatusCode::OK, &true));
            };
            caller.require(Resource::Service(&service), Access::Write)?;
            let req = proto::DeregisterServiceRequest { node: d.node, id };
            api.deregister_service(call.grpc(req)).await?;
        }
        None => {
            let req = proto::DeregisterNodeRequest { name: d.node };
            api.deregister_node(call.grpc(req)).await?;
        }
    }
    Ok(json(StatusCode::OK, &true))
}
