//! `/v1/status/leader`, `/v1/status/peers` (Consul's, no token) and
//! `/metrics` (Prometheus, `operator:read`).
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use weft_api::acl::{Access, Resource};
use weft_api::exposition;

use super::{json, only, Answer, Call, HttpError};
use crate::node::ServerNode;

/// `/v1/status/<what>`.
pub async fn status(node: &ServerNode, call: &Call, what: &str) -> Answer {
    match what {
        "peers" => {
            only(call, Method::GET)?;
            let peers: Vec<&String> = node.peers.values().collect();
            Ok(json(StatusCode::OK, &peers))
        }
        "leader" => {
            only(call, Method::GET)?;
            let leader = node
                .raft
                .current_leader()
                .await
                .and_then(|id| node.peers.get(&id).cloned())
                .unwrap_or_default();
            Ok(json(StatusCode::OK, &leader))
        }
        _ => Err(HttpError::not_found()),
    }
}

/// `/metrics`, for a token with `operator:read`: Prometheus text 0.0.4, or
/// OpenMetrics when the scraper asks for it.
pub fn metrics(node: &ServerNode, call: &Call) -> Answer {
    only(call, Method::GET)?;
    let allowed = call.secret.as_deref().is_some_and(|secret| {
        let state = node.shared.state.read().expect("state lock");
        crate::grpc::auth::resolve_in(&state, &node.datacenter, secret)
            .is_some_and(|c| c.authz.allows(Resource::Operator, Access::Read))
    });
    if !allowed {
        return Err(HttpError::new(
            StatusCode::FORBIDDEN,
            "Permission denied: /metrics needs a token with operator:read",
        ));
    }
    let accept = call
        .headers
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let format = exposition::negotiate(accept);
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header("content-type", format.content_type())
        .header("vary", "accept")
        .body(Full::new(Bytes::from(
            format.render(node.metrics.encode(&node.raft)),
        )))
        .expect("a static response"))
}
