//! `/v1/snapshot`: Consul's snapshot endpoint over the gRPC `Operator`
//! service, for a management token only. `GET` answers the whole replicated
//! state (weft's own document, without the CA's keys, as `weft snapshot
//! save` writes it; Consul's clients keep it as opaque bytes) with
//! `X-Consul-Index`; `PUT` with such a document as the body restores it
//! (checked whole before anything changes).
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use weft_api::proto::{self, operator_server::Operator};

use super::{Answer, Call, HttpError};
use crate::grpc::operator::OperatorApi;
use crate::node::ServerNode;

/// The largest snapshot a `PUT` may send, one at a time, outside the budget
/// other request bodies share (`weft snapshot restore` takes up to 64 MiB
/// over gRPC).
pub const MAX_SNAPSHOT_BODY: usize = 48 << 20;

pub async fn snapshot(node: &Arc<ServerNode>, call: &Call) -> Answer {
    let api = OperatorApi(node.clone());
    call.only_params(&[])?;
    match call.method {
        Method::GET => {
            let saved = api
                .snapshot_save(call.grpc(proto::Empty {}))
                .await?
                .into_inner();
            Ok(Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/octet-stream")
                .header("content-disposition", "attachment; filename=\"weft.snap\"")
                .header("x-consul-index", saved.index.max(1))
                .body(Full::new(Bytes::from(saved.state)))
                .expect("a static response"))
        }
        Method::PUT => {
            api.snapshot_restore(call.grpc(proto::SnapshotData {
                state: call.body.to_vec(),
                index: 0,
            }))
            .await?;
            Ok(Response::builder()
                .status(StatusCode::OK)
                .body(Full::new(Bytes::new()))
                .expect("a static response"))
        }
        _ => Err(HttpError::method_not_allowed()),
    }
}
