//! The server's HTTP port, TLS 1.3 like every port: Consul's two status
//! endpoints, which Consul (and so weft) answers without a token because
//! they tell no more than a member list does to whoever can reach Raft:
//!
//! - `GET /v1/status/leader`: the leader's Raft address as a JSON string
//!   (`""` while there is none);
//! - `GET /v1/status/peers`: the Raft addresses of the members;
//!
//! and `GET /metrics` for Prometheus, which needs a token with
//! `operator:read` (`X-Consul-Token: <secret>` or `Authorization: Bearer
//! <secret>`): Prometheus text 0.0.4, or OpenMetrics when the scraper asks
//! for it (`weft_api::exposition`).
//!
//! Anything else is 404 (405 for another method on those paths).
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

use weft_api::acl::{Access, Resource};
use weft_api::exposition;

use crate::node::ServerNode;

/// Serves the HTTP port until the process ends.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: Arc<crate::conn_limit::ClientLimits>,
    node: Arc<ServerNode>,
) {
    let mut incoming = crate::tls::incoming(listener, tls, limits);
    while let Some(conn) = incoming.next().await {
        let Ok(stream) = conn else { continue };
        let node = node.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let node = node.clone();
                async move { Ok::<_, Infallible>(respond(&node, &req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a static response")
}

/// The token secret a request carries (Consul's header, or a bearer token).
fn secret_of<B>(req: &Request<B>) -> Option<&str> {
    let headers = req.headers();
    let consul = headers
        .get("x-consul-token")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty());
    let secret = match consul {
        Some(v) => v,
        None => {
            let auth = headers.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
            // The scheme is case-insensitive (RFC 9110).
            let (scheme, secret) = auth.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(secret)?
        }
    };
    let secret = secret.trim();
    (!secret.is_empty()).then_some(secret)
}

/// `/metrics`, for a token with `operator:read`.
fn metrics<B>(node: &ServerNode, req: &Request<B>) -> Response<Full<Bytes>> {
    let allowed = secret_of(req).is_some_and(|secret| {
        let state = node.shared.state.read().expect("state lock");
        crate::grpc::auth::resolve_in(&state, &node.datacenter, secret)
            .is_some_and(|c| c.authz.allows(Resource::Operator, Access::Read))
    });
    if !allowed {
        return json(
            StatusCode::FORBIDDEN,
            serde_json::json!("Permission denied: /metrics needs a token with operator:read"),
        );
    }
    let accept = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let format = exposition::negotiate(accept);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", format.content_type())
        .header("vary", "accept")
        .body(Full::new(Bytes::from(
            format.render(node.metrics.encode(&node.raft)),
        )))
        .expect("a static response")
}

async fn respond<B>(node: &ServerNode, req: &Request<B>) -> Response<Full<Bytes>> {
    let (method, path) = (req.method(), req.uri().path());
    let known = matches!(path, "/v1/status/leader" | "/v1/status/peers" | "/metrics");
    if !known {
        return json(StatusCode::NOT_FOUND, serde_json::json!("not found"));
    }
    if method != Method::GET {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!("method not allowed"),
        );
    }
    if path == "/metrics" {
        return metrics(node, req);
    }
    if path == "/v1/status/peers" {
        let peers: Vec<&String> = node.peers.values().collect();
        return json(StatusCode::OK, serde_json::json!(peers));
    }
    let leader = node
        .raft
        .current_leader()
        .await
        .and_then(|id| node.peers.get(&id).cloned())
        .unwrap_or_default();
    json(StatusCode::OK, serde_json::json!(leader))
}
