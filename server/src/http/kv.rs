//! `/v1/kv/<key>`: Consul's KV endpoints over the gRPC `Kv` service.
//! `GET` (one key, `?recurse`, `?keys[&separator=]`, `?raw`), `PUT` with
//! the value as the body (`?cas`, `?flags`, and `?acquire=SESSION` /
//! `?release=SESSION` for locks, answered `true` or `false` as Consul
//! does), `DELETE` (`?cas`). A recursive delete is refused as not
//! supported yet rather than ignored.
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use serde_json::{json, Value};
use weft_api::proto::{self, kv_server::Kv};

use super::{json, json_at, Answer, Call, HttpError};
use crate::grpc::kv::KvApi;
use crate::node::ServerNode;

/// The most bytes of values one recursive read gathers; a larger answer is
/// refused (ask for a narrower prefix).
const MAX_RECURSE_BYTES: usize = 16 << 20;

fn entry_json(e: &proto::KvEntry) -> Value {
    let value =
        (!e.value.is_empty()).then(|| base64::engine::general_purpose::STANDARD.encode(&e.value));
    json!({
        "Key": e.key,
        "Value": value,
        "Flags": e.flags,
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
        "LockIndex": e.lock_index,
        "Session": e.session,
    })
}

pub async fn kv(node: &Arc<ServerNode>, call: &Call, key: &str) -> Answer {
    let api = KvApi(node.clone());
    match call.method {
        Method::GET => get(&api, call, key).await,
        Method::PUT => {
            call.only_params(&["cas", "flags", "acquire", "release"])?;
            let cas = call.number::<u64>("cas")?;
            let session = |name| match call.query(name) {
                Some("") => Err(HttpError::bad_request(format!(
                    "query parameter {name}: a session id"
                ))),
                v => Ok(v.unwrap_or_default().to_string()),
            };
            let (acquire, release) = (session("acquire")?, session("release")?);
            let locking = !acquire.is_empty() || !release.is_empty();
            let put = api
                .put(call.grpc(proto::KvPutRequest {
                    key: key.to_string(),
                    value: call.body.to_vec(),
                    cas,
                    flags: call.number::<u64>("flags")?.unwrap_or(0),
                    acquire,
                    release,
                }))
                .await;
            bool_answer(put.map(|_| ()), cas.is_some(), locking)
        }
        Method::DELETE => {
            call.only_params(&["cas", "recurse"])?;
            let cas = call.number::<u64>("cas")?;
            let deleted = api
                .delete(call.grpc(proto::KvDeleteRequest {
                    key: key.to_string(),
                    cas,
                    recurse: call.flag("recurse")?,
                }))
                .await;
            bool_answer(deleted.map(|_| ()), cas.is_some(), false)
        }
        _ => Err(HttpError::method_not_allowed()),
    }
}

/// `true`, or `false` when a check-and-set did not match or a lock was
/// not taken or given back (Consul's answers).
fn bool_answer(result: Result<(), tonic::Status>, cas: bool, locking: bool) -> Answer {
    match result {
        Ok(()) => Ok(json(StatusCode::OK, &true)),
        Err(s)
            if s.code() == tonic::Code::FailedPrecondition
                && ((cas && s.message().starts_with(crate::state::CAS_MISMATCH))
                    || (locking && s.message().starts_with(crate::state::LOCK_REFUSED))) =>
        {
            Ok(json(StatusCode::OK, &false))
        }
        Err(s) => Err(s.into()),
    }
}

async fn get(api: &KvApi, call: &Call, key: &str) -> Answer {
    call.only_params(&["recurse", "keys", "separator", "raw"])?;
    let (recurse, keys, raw) = (call.flag("recurse")?, call.flag("keys")?, call.flag("raw")?);
    let combined = match (recurse, keys, raw, call.query("separator").is_some()) {
        (true, true, ..) => Some("recurse with keys"),
        (true, _, true, _) | (_, true, true, _) => Some("raw with a list"),
        (_, false, _, true) => Some("separator without keys"),
        _ => None,
    };
    if let Some(what) = combined {
        return Err(HttpError::bad_request(format!(
            "{what}: not both in one answer"
        )));
    }
    if keys || recurse {
        let (entries, _) = list(api, call, key).await?;
        let index = call.index();
        if entries.is_empty() {
            return Err(HttpError::not_found());
        }
        if keys {
            let separator = call.query("separator").unwrap_or("");
            let mut keys: Vec<String> = Vec::new();
            for e in &entries {
                let folded = match e.key[key.len()..].find(separator) {
                    Some(at) if !separator.is_empty() => &e.key[..key.len() + at + separator.len()],
                    _ => e.key.as_str(),
                };
                if keys.last().map(String::as_str) != Some(folded) {
                    keys.push(folded.to_string());
                }
            }
            return Ok(json_at(index, &keys));
        }
        let out: Vec<Value> = entries.iter().map(entry_json).collect();
        return Ok(json_at(index, &out));
    }
    let e = api
        .get(call.grpc(proto::KvGetRequest {
            key: key.to_string(),
            read: call.read(),
        }))
        .await?
        .into_inner();
    if raw {
        return Ok(Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/octet-stream")
            .header("content-disposition", "attachment")
            .body(Full::new(Bytes::from(e.value)))
            .expect("a static response"));
    }
    // The state's index, as for every read: a blocking query on it waits
    // for the next write (the key's own index is older than the state's).
    Ok(json_at(call.index(), &[entry_json(&e)]))
}

/// Every entry under `prefix` the token may read, page after page.
async fn list(
    api: &KvApi,
    call: &Call,
    prefix: &str,
) -> Result<(Vec<proto::KvEntry>, u64), HttpError> {
    let (mut entries, mut bytes, mut after, mut index) = (Vec::new(), 0usize, String::new(), 0);
    loop {
        let page = api
            .list(call.grpc(proto::KvListRequest {
                prefix: prefix.to_string(),
                read: call.read(),
                after: after.clone(),
                limit: 0,
            }))
            .await?
            .into_inner();
        index = index.max(page.index);
        // Values go out in base64: 4 bytes for every 3.
        bytes += page
            .entries
            .iter()
            .map(|e| e.key.len() + e.value.len() * 4 / 3)
            .sum::<usize>();
        if bytes > MAX_RECURSE_BYTES {
            return Err(HttpError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("more than {MAX_RECURSE_BYTES} bytes under {prefix:?}: ask for a narrower prefix"),
            ));
        }
        entries.extend(page.entries);
        if page.next.is_empty() {
            return Ok((entries, index));
        }
        after = page.next;
    }
}
