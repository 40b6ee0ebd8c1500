//! `/v1/acl/…` in Consul's shapes, over the gRPC `Acl` service:
//! `PUT /v1/acl/bootstrap`; tokens (`GET /v1/acl/tokens`, `PUT
//! /v1/acl/token`, `GET|PUT|DELETE /v1/acl/token/<accessor>`, `GET
//! /v1/acl/token/self`) and policies (`GET /v1/acl/policies`, `PUT
//! /v1/acl/policy`, `GET|PUT|DELETE /v1/acl/policy/<id>`). A token's
//! `SecretID` appears only in the answer that created it (servers keep its
//! hash); Consul's token fields weft does not have (roles, expiry, local
//! tokens, a secret of the caller's choosing) are refused by name.
use std::sync::Arc;

use hyper::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use weft_api::proto::{self, acl_server::Acl};

use super::{json, json_at, Answer, Call, HttpError};
use crate::grpc::acl::AclApi;
use crate::node::ServerNode;

/// A token as Consul shows it; `SecretID` only when `t` carries one (the
/// answer that created it).
fn token_json(t: &proto::AclToken) -> Value {
    let mut v = json!({
        "AccessorID": t.accessor_id,
        "Description": t.description,
        "Policies": t.policies.iter().map(|p| json!({ "Name": p })).collect::<Vec<_>>(),
        "ServiceIdentities": t
            .service_identities
            .iter()
            .map(|s| json!({ "ServiceName": s }))
            .collect::<Vec<_>>(),
        "NodeIdentities": t
            .node_identities
            .iter()
            .map(|n| json!({ "NodeName": n.node_name, "Datacenter": n.datacenter }))
            .collect::<Vec<_>>(),
        "CreateIndex": t.create_index,
        "ModifyIndex": t.modify_index,
    });
    if !t.secret_id.is_empty() {
        v["SecretID"] = t.secret_id.clone().into();
    }
    v
}

fn policy_json(p: &proto::AclPolicy) -> Value {
    json!({
        "ID": p.id,
        "Name": p.name,
        "Description": p.description,
        "Rules": p.rules,
        "CreateIndex": p.create_index,
        "ModifyIndex": p.modify_index,
    })
}

/// A linked policy: by `ID` or `Name`, as Consul takes it.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct PolicyLink {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct ServiceIdentity {
    service_name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct NodeIdentity {
    node_name: String,
    datacenter: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct TokenBody {
    #[serde(rename = "AccessorID", default)]
    accessor_id: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    policies: Vec<PolicyLink>,
    #[serde(default)]
    service_identities: Vec<ServiceIdentity>,
    #[serde(default)]
    node_identities: Vec<NodeIdentity>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct PolicyBody {
    #[serde(rename = "ID", default)]
    id: String,
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    rules: String,
}

/// The token a body describes; `accessor` when the path names one (a body
/// naming another is refused).
fn token_of(call: &Call, accessor: Option<&str>) -> Result<proto::AclToken, HttpError> {
    let body: TokenBody = call.json_body()?;
    if let Some(a) = accessor {
        if !body.accessor_id.is_empty() && body.accessor_id != a {
            return Err(HttpError::bad_request(format!(
                "AccessorID in the body differs from the path's {a:?}"
            )));
        }
    } else if !body.accessor_id.is_empty() {
        return Err(HttpError::bad_request(
            "AccessorID: servers make a new token's ids; leave it out",
        ));
    }
    let policies = body
        .policies
        .into_iter()
        .map(|p| match (p.id.is_empty(), p.name.is_empty()) {
            (false, _) => Ok(p.id),
            (true, false) => Ok(p.name),
            (true, true) => Err(HttpError::bad_request("Policies: a link needs ID or Name")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(proto::AclToken {
        accessor_id: accessor.unwrap_or_default().to_string(),
        description: body.description,
        policies,
        service_identities: body
            .service_identities
            .into_iter()
            .map(|s| s.service_name)
            .collect(),
        node_identities: body
            .node_identities
            .into_iter()
            .map(|n| proto::AclNodeIdentity {
                node_name: n.node_name,
                datacenter: n.datacenter,
            })
            .collect(),
        ..Default::default()
    })
}

fn policy_of(call: &Call, id: Option<&str>) -> Result<proto::AclPolicy, HttpError> {
    let body: PolicyBody = call.json_body()?;
    match id {
        Some(id) if !body.id.is_empty() && body.id != id => {
            return Err(HttpError::bad_request(format!(
                "ID in the body differs from the path's {id:?}"
            )))
        }
        None if !body.id.is_empty() => {
            return Err(HttpError::bad_request(
                "ID: servers make a new policy's id; leave it out",
            ))
        }
        _ => {}
    }
    Ok(proto::AclPolicy {
        id: id.unwrap_or_default().to_string(),
        name: body.name,
        description: body.description,
        rules: body.rules,
        ..Default::default()
    })
}

pub async fn acl(node: &Arc<ServerNode>, call: &Call, rest: &str) -> Answer {
    call.only_params(&[])?;
    let api = AclApi(node.clone());
    let index = || call.index();
    let aref = |id: &str| proto::AclRef { id: id.to_string() };
    match (&call.method, rest) {
        (&Method::PUT, "bootstrap") => {
            let t = api
                .bootstrap(call.grpc(proto::Empty {}))
                .await?
                .into_inner();
            Ok(json(StatusCode::OK, &token_json(&t)))
        }
        (&Method::GET, "token/self") => {
            let t = api
                .token_self(call.grpc(proto::Empty {}))
                .await?
                .into_inner();
            Ok(json_at(index(), &token_json(&t)))
        }
        (&Method::GET, "tokens") => {
            let list = api
                .token_list(call.grpc(proto::Empty {}))
                .await?
                .into_inner();
            let out: Vec<Value> = list.tokens.iter().map(token_json).collect();
            Ok(json_at(index(), &out))
        }
        (&Method::PUT, "token") => {
            let t = api.token_upsert(call.grpc(token_of(call, None)?)).await?;
            Ok(json(StatusCode::OK, &token_json(&t.into_inner())))
        }
        (&Method::GET, "policies") => {
            let list = api
                .policy_list(call.grpc(proto::Empty {}))
                .await?
                .into_inner();
            let out: Vec<Value> = list.policies.iter().map(policy_json).collect();
            Ok(json_at(index(), &out))
        }
        (&Method::PUT, "policy") => {
            let p = api.policy_upsert(call.grpc(policy_of(call, None)?)).await?;
            Ok(json(StatusCode::OK, &policy_json(&p.into_inner())))
        }
        (method, path) => {
            if let Some(accessor) = path.strip_prefix("token/").filter(|a| !a.is_empty()) {
                return match *method {
                    Method::GET => {
                        let t = api.token_read(call.grpc(aref(accessor))).await?;
                        Ok(json_at(index(), &token_json(&t.into_inner())))
                    }
                    Method::PUT => {
                        let t = token_of(call, Some(accessor))?;
                        let t = api.token_upsert(call.grpc(t)).await?;
                        Ok(json(StatusCode::OK, &token_json(&t.into_inner())))
                    }
                    Method::DELETE => {
                        api.token_delete(call.grpc(aref(accessor))).await?;
                        Ok(json(StatusCode::OK, &true))
                    }
                    _ => Err(HttpError::method_not_allowed()),
                };
            }
            if let Some(id) = path.strip_prefix("policy/").filter(|a| !a.is_empty()) {
                return match *method {
                    Method::GET => {
                        let p = api.policy_read(call.grpc(aref(id))).await?;
                        Ok(json_at(index(), &policy_json(&p.into_inner())))
                    }
                    Method::PUT => {
                        let p = policy_of(call, Some(id))?;
                        let p = api.policy_upsert(call.grpc(p)).await?;
                        Ok(json(StatusCode::OK, &policy_json(&p.into_inner())))
                    }
                    Method::DELETE => {
                        api.policy_delete(call.grpc(aref(id))).await?;
                        Ok(json(StatusCode::OK, &true))
                    }
                    _ => Err(HttpError::method_not_allowed()),
                };
            }
            match path {
                "bootstrap" | "token" | "tokens" | "policy" | "policies" | "token/self" => {
                    Err(HttpError::method_not_allowed())
                }
                _ => Err(HttpError::not_found()),
            }
        }
    }
}
