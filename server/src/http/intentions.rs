//! `/v1/connect/intentions…`: list, read, write and delete intentions by
//! source and destination (Consul's `/exact` endpoints), and check what they
//! decide, with the deciding rule explained as `weft intention check` does.
//! Everything goes through the gRPC `Intentions` service.
use std::sync::Arc;

use hyper::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use weft_api::convert::{intention_from_proto, intention_to_proto};
use weft_api::intention::{Intention, IntentionAction, Permission};
use weft_api::proto::{self, intentions_server::Intentions};

use super::{json, json_at, Answer, Call, HttpError};
use crate::grpc::intentions::IntentionsApi;
use crate::node::ServerNode;

/// An intention in Consul's JSON: `SourceName`, `DestinationName`, `Action`
/// (empty when permissions decide), `Permissions`, `Description`, indexes.
pub fn intention_json(i: &Intention) -> Value {
    let permissions = serde_json::to_value(&i.permissions).unwrap_or(Value::Null);
    json!({
        "SourceName": i.source,
        "DestinationName": i.destination,
        "Action": i.action.map(|a| a.to_string()).unwrap_or_default(),
        "Permissions": permissions,
        "Description": i.description,
        "CreateIndex": i.create_index,
        "ModifyIndex": i.modify_index,
    })
}

/// The body of `PUT /v1/connect/intentions/exact`. Consul's fields weft
/// does not have (`Meta`, `SourceType` other than `consul`…) are refused by
/// name.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct Body {
    #[serde(default)]
    source_name: Option<String>,
    #[serde(default)]
    destination_name: Option<String>,
    #[serde(default)]
    source_type: Option<String>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    permissions: Vec<Permission>,
    #[serde(default)]
    description: String,
}

fn from_proto(i: proto::Intention) -> Result<Intention, HttpError> {
    intention_from_proto(i)
        .map_err(|e| HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

pub async fn intentions(node: &Arc<ServerNode>, call: &Call, rest: &str) -> Answer {
    let api = IntentionsApi(node.clone());
    match (rest, &call.method) {
        ("", &Method::GET) => {
            call.only_params(&[])?;
            let list = api.list(call.grpc(call.read().unwrap_or_default())).await?;
            let list = list.into_inner();
            let out = list
                .intentions
                .into_iter()
                .map(|i| from_proto(i).map(|i| intention_json(&i)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(json_at(list.index, &out))
        }
        ("/exact", method) => {
            call.only_params(&["source", "destination"])?;
            let key = proto::IntentionRef {
                source: call.required("source")?.to_string(),
                destination: call.required("destination")?.to_string(),
            };
            match *method {
                Method::GET => {
                    let i = api
                        .get(call.grpc(proto::GetIntentionRequest {
                            r#ref: Some(key),
                            read: call.read(),
                        }))
                        .await?;
                    Ok(json_at(
                        call.index(),
                        &intention_json(&from_proto(i.into_inner())?),
                    ))
                }
                Method::PUT | Method::POST => {
                    let intention = intention_of(call, key)?;
                    api.upsert(call.grpc(proto::UpsertIntentionRequest {
                        intention: Some(intention_to_proto(&intention)),
                    }))
                    .await?;
                    Ok(json(StatusCode::OK, &true))
                }
                Method::DELETE => {
                    api.delete(call.grpc(key)).await?;
                    Ok(json(StatusCode::OK, &true))
                }
                _ => Err(HttpError::method_not_allowed()),
            }
        }
        ("/check", &Method::GET) => check(&api, call).await,
        ("" | "/check", _) => Err(HttpError::method_not_allowed()),
        _ => Err(HttpError::not_found()),
    }
}

/// The intention a PUT body describes, for the source and destination of
/// the query (a body naming others is refused).
fn intention_of(call: &Call, key: proto::IntentionRef) -> Result<Intention, HttpError> {
    let body: Body = call.json_body()?;
    for (field, given, want) in [
        ("SourceName", &body.source_name, &key.source),
        ("DestinationName", &body.destination_name, &key.destination),
    ] {
        if given.as_ref().is_some_and(|g| g != want) {
            return Err(HttpError::bad_request(format!(
                "{field} in the body differs from the query's {want:?}"
            )));
        }
    }
    if let Some(t) = body.source_type.as_deref().filter(|t| *t != "consul") {
        return Err(HttpError::bad_request(format!(
            "SourceType {t:?}: only \"consul\" (a service of the mesh) is supported"
        )));
    }
    let action = match body.action.as_deref() {
        None | Some("") => None,
        Some(a) => Some(
            a.parse::<IntentionAction>()
                .map_err(|_| HttpError::bad_request(format!("Action {a:?}: allow or deny")))?,
        ),
    };
    Ok(Intention {
        source: key.source,
        destination: key.destination,
        action,
        permissions: body.permissions,
        description: body.description,
        create_index: 0,
        modify_index: 0,
    })
}

/// `GET /v1/connect/intentions/check?source=&destination=[&method=&path=]`.
async fn check(api: &IntentionsApi, call: &Call) -> Answer {
    call.only_params(&["source", "destination", "method", "path"])?;
    if call.query("path").is_some() && call.query("method").is_none() {
        return Err(HttpError::bad_request(
            "path without method: an HTTP request's check needs its method",
        ));
    }
    let answer = api
        .check(call.grpc(proto::CheckRequest {
            source: call.required("source")?.to_string(),
            destination: call.required("destination")?.to_string(),
            method: call.query("method").unwrap_or("").to_string(),
            path: call.query("path").unwrap_or("").to_string(),
            headers: Default::default(),
            read: call.read(),
        }))
        .await?
        .into_inner();
    let decided_by = answer
        .decided_by
        .map(|r| json!({ "SourceName": r.source, "DestinationName": r.destination }));
    Ok(json_at(
        call.index(),
        &json!({
            "Allowed": answer.allowed,
            "Reason": answer.reason,
            "DecidedBy": decided_by,
            "PermissionIndex": answer.permission_index,
        }),
    ))
}
