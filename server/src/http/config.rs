//! `/v1/config…`: config entries as Consul serves them, through the gRPC
//! `Config` service: `GET /v1/config/<kind>`, `GET` and `DELETE
//! /v1/config/<kind>/<name>`, `PUT /v1/config` with the entry's JSON.
use std::sync::Arc;

use hyper::{Method, StatusCode};
use serde_json::Value;
use weft_api::proto::{self, config_server::Config};

use super::{json, json_at, Answer, Call, HttpError};
use crate::grpc::config::ConfigApi;
use crate::node::ServerNode;

/// An entry's JSON document with its indexes, as Consul answers it.
pub fn entry_json(e: &proto::ConfigEntry) -> Result<Value, HttpError> {
    let mut doc: Value = serde_json::from_str(&e.json)
        .map_err(|err| HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()))?;
    if let Some(map) = doc.as_object_mut() {
        map.insert("CreateIndex".into(), e.create_index.into());
        map.insert("ModifyIndex".into(), e.modify_index.into());
    }
    Ok(doc)
}

pub async fn config(node: &Arc<ServerNode>, call: &Call, rest: &str) -> Answer {
    let api = ConfigApi(node.clone());
    let parts: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    match (parts.as_slice(), &call.method) {
        ([""], &Method::PUT) => {
            call.only_params(&[])?;
            let json_text = std::str::from_utf8(&call.body)
                .map_err(|_| HttpError::bad_request("the body is not UTF-8"))?;
            api.write(call.grpc(proto::WriteConfigRequest {
                json: json_text.to_string(),
            }))
            .await?;
            Ok(json(StatusCode::OK, &true))
        }
        ([kind], &Method::GET) if !kind.is_empty() => {
            call.only_params(&[])?;
            let list = api
                .list(call.grpc(proto::ListConfigRequest {
                    kind: kind.to_string(),
                    read: call.read(),
                }))
                .await?
                .into_inner();
            let out = list
                .entries
                .iter()
                .map(entry_json)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(json_at(list.index, &out))
        }
        ([kind, name], method) if !kind.is_empty() && !name.is_empty() => {
            call.only_params(&[])?;
            let key = proto::ConfigRef {
                kind: kind.to_string(),
                name: name.to_string(),
            };
            match *method {
                Method::GET => {
                    let e = api
                        .read(call.grpc(proto::ReadConfigRequest {
                            r#ref: Some(key),
                            read: call.read(),
                        }))
                        .await?;
                    Ok(json_at(call.index(), &entry_json(&e.into_inner())?))
                }
                Method::DELETE => {
                    api.delete(call.grpc(key)).await?;
                    Ok(json(StatusCode::OK, &true))
                }
                _ => Err(HttpError::method_not_allowed()),
            }
        }
        ([""] | [_], _) => Err(HttpError::method_not_allowed()),
        _ => Err(HttpError::not_found()),
    }
}
