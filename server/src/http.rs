//! The server's HTTP port, TLS 1.3 like every port: Consul's two status
//! endpoints, which Consul (and so weft) answers without a token because
//! they tell no more than a member list does to whoever can reach Raft:
//!
//! - `GET /v1/status/leader`: the leader's Raft address as a JSON string
//!   (`""` while there is none);
//! - `GET /v1/status/peers`: the Raft addresses of the members.
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
                async move { Ok::<_, Infallible>(respond(&node, req.method(), req.uri().path()).await) }
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

async fn respond(node: &ServerNode, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let known = matches!(path, "/v1/status/leader" | "/v1/status/peers");
    if !known {
        return json(StatusCode::NOT_FOUND, serde_json::json!("not found"));
    }
    if method != Method::GET {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!("method not allowed"),
        );
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
