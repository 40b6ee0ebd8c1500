//! `/v1/session/*`: Consul's session endpoints over the gRPC `Session`
//! service. `PUT create` (Consul's body; `Node` required here, which an
//! agent's local API fills in), `PUT destroy/:id`, `PUT renew/:id`,
//! `GET info/:id`, `GET node/:node`, `GET list`.
use std::sync::Arc;

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use weft_api::proto::{self, session_server::Session as _};

use super::{json, json_at, only, Answer, Call, HttpError};
use crate::grpc::session::SessionApi;
use crate::node::ServerNode;

/// A session in Consul's JSON.
fn session_json(s: &proto::SessionEntry) -> Value {
    let checks: Vec<&str> = if s.node_checks {
        vec![weft_api::session::NODE_CHECK]
    } else {
        vec![]
    };
    json!({
        "ID": s.id,
        "Name": s.name,
        "Node": s.node,
        "LockDelay": s.lock_delay_ms.saturating_mul(1_000_000),
        "Behavior": s.behavior,
        "TTL": if s.ttl_secs == 0 { String::new() } else { format!("{}s", s.ttl_secs) },
        "Checks": checks,
        "NodeChecks": checks,
        "ServiceChecks": null,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    })
}

pub async fn route(node: &Arc<ServerNode>, call: &Call, rest: &str) -> Answer {
    let api = SessionApi(node.clone());
    let (verb, arg) = rest.split_once('/').unwrap_or((rest, ""));
    let needs_arg = !matches!(verb, "create" | "list");
    if needs_arg == arg.is_empty() || arg.contains('/') {
        return Err(HttpError::not_found());
    }
    match verb {
        "create" => {
            only(call, Method::PUT)?;
            call.only_params(&[])?;
            let created = api
                .create(call.grpc(proto::SessionCreateRequest {
                    body: call.body.to_vec(),
                }))
                .await?
                .into_inner();
            Ok(json(StatusCode::OK, &json!({ "ID": created.id })))
        }
        "destroy" => {
            only(call, Method::PUT)?;
            call.only_params(&[])?;
            api.destroy(call.grpc(proto::SessionRef { id: arg.into() }))
                .await?;
            Ok(json(StatusCode::OK, &true))
        }
        "renew" => {
            only(call, Method::PUT)?;
            call.only_params(&[])?;
            let s = api
                .renew(call.grpc(proto::SessionRef { id: arg.into() }))
                .await?
                .into_inner();
            Ok(json(StatusCode::OK, &[session_json(&s)]))
        }
        "info" => {
            only(call, Method::GET)?;
            call.only_params(&[])?;
            let found = api
                .get(call.grpc(proto::SessionGetRequest {
                    id: arg.into(),
                    read: call.read(),
                }))
                .await;
            match found {
                Ok(s) => Ok(json_at(call.index(), &[session_json(s.get_ref())])),
                // Consul answers an unknown session with an empty list.
                Err(s) if s.code() == tonic::Code::NotFound => {
                    Ok(json_at(call.index(), &Vec::<Value>::new()))
                }
                Err(s) => Err(s.into()),
            }
        }
        "node" | "list" => {
            only(call, Method::GET)?;
            call.only_params(&[])?;
            let list = api
                .list(call.grpc(proto::SessionListRequest {
                    node: arg.into(),
                    read: call.read(),
                }))
                .await?
                .into_inner();
            let out: Vec<Value> = list.sessions.iter().map(session_json).collect();
            Ok(json_at(call.index(), &out))
        }
        _ => Err(HttpError::not_found()),
    }
}
