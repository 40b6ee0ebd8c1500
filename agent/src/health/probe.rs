//! The network side of health checks: one probe of an HTTP, TCP or gRPC check,
//! bounded by the check's timeout, turned into a [`CheckResult`] by the pure
//! functions in [`super::status`].

use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::status::{grpc_result, http_result, tcp_result, timeout_result, CheckResult};
use crate::config::CheckKind;

/// The `User-Agent` of HTTP checks.
pub const USER_AGENT: &str = concat!("weft-agent/", env!("CARGO_PKG_VERSION"), " health-check");

/// Runs one probe of `kind` within `timeout`, its connections marked with
/// `mark` (0: none; see [`crate::mark`]). TTL checks are not probed: `None`.
pub async fn probe(kind: &CheckKind, timeout: Duration, mark: u32) -> Option<CheckResult> {
    let result = match kind {
        CheckKind::Http { url } => tokio::time::timeout(timeout, http_get(url, mark))
            .await
            .map(|r| http_result(url, r))
            .unwrap_or_else(|_| timeout_result(&format!("HTTP GET {url}"), timeout)),
        CheckKind::Tcp { addr } => tokio::time::timeout(timeout, tcp_connect(addr, mark))
            .await
            .map(|r| tcp_result(addr, r))
            .unwrap_or_else(|_| timeout_result(&format!("TCP connect {addr}"), timeout)),
        CheckKind::Grpc { addr, service } => {
            let target = grpc_target(addr, service);
            match tokio::time::timeout(timeout, grpc_check(addr, service, mark)).await {
                Ok(Ok(status)) => grpc_result(&target, Ok(status)),
                Ok(Err(e)) => grpc_result(&target, Err(e)),
                Err(_) => timeout_result(&format!("gRPC health {target}"), timeout),
            }
        }
        CheckKind::Ttl { .. } => return None,
    };
    Some(result)
}

fn grpc_target(addr: &str, service: &str) -> String {
    if service.is_empty() {
        addr.to_string()
    } else {
        format!("{addr}/{service}")
    }
}

/// `GET url` over a fresh HTTP/1.1 connection; the response code.
pub async fn http_get(url: &str, mark: u32) -> Result<StatusCode, String> {
    let uri: Uri = url.parse().map_err(|e| format!("invalid URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// URLs are supported".into());
    }
    let authority = uri
        .authority()
        .ok_or_else(|| "URL has no host".to_string())?
        .clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(80);
    let stream = connect_marked(host, port, mark)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let req = Request::get(path)
        .header(header::HOST, authority.as_str())
        .header(header::USER_AGENT, USER_AGENT)
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let result = sender
        .send_request(req)
        .await
        .map(|resp| resp.status())
        .map_err(|e| format!("request failed: {e}"));
    conn.abort();
    result
}

/// Opens and closes a TCP connection to `addr` (`HOST:PORT`).
pub async fn tcp_connect(addr: &str, mark: u32) -> Result<(), String> {
    let (host, port) = host_port(addr)?;
    connect_marked(host, port, mark)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// `HOST:PORT` (or `[V6]:PORT`) split.
fn host_port(addr: &str) -> Result<(&str, u16), String> {
    addr.rsplit_once(':')
        .and_then(|(h, p)| {
            let host = h.trim_start_matches('[').trim_end_matches(']');
            Some((host, p.parse().ok()?))
        })
        .ok_or_else(|| format!("{addr:?} is not HOST:PORT"))
}

/// Connects to the first address `host` resolves to, with `mark`: the
/// agent's, so that a check of the file passes inbound capture as the
/// agent's own connections do; a workload's own for a check it added.
async fn connect_marked(host: &str, port: u16, mark: u32) -> std::io::Result<TcpStream> {
    let addr = tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
    crate::mark::connect_with(addr, mark).await
}

/// `grpc.health.v1.Health/Check` for `service` at `addr`; the serving status name.
pub async fn grpc_check(addr: &str, service: &str, mark: u32) -> Result<&'static str, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("invalid address: {e}"))?;
    let (host, port) = host_port(addr)?;
    let host = host.to_string();
    let connector = tower::service_fn(move |_: http::Uri| {
        let host = host.clone();
        async move {
            connect_marked(&host, port, mark)
                .await
                .map(hyper_util::rt::TokioIo::new)
        }
    });
    let channel = endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("connect: {}", error_chain(&e)))?;
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    Ok(resp.into_inner().status().as_str_name())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
