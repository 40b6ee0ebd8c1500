//! Forwarding to the servers' HTTPS API: every `/v1/` request the agent does
//! not answer itself goes, as it came, to the first server (the hosts of
//! `servers`, at `server_http_port`) that accepts a TLS connection verified
//! against `ca_file` and `tls_server_name`, as the gRPC client verifies them.
//!
//! The request keeps its method, path, query and body (at most
//! [`MAX_FORWARD_BODY_BYTES`]) and the caller's own token headers; the
//! agent's token is never added (the forwarder does not even hold it) and no
//! client certificate is presented, so a request has exactly the caller's
//! rights. A `?token=` moves into `X-Consul-Token` (the servers never read
//! tokens from URLs, which they would log). Hop-by-hop headers are dropped
//! both ways; the answer's status, headers and body stream back.
//!
//! Connections are pooled (hyper-util's client, at most
//! [`POOL_IDLE_PER_SERVER`] idle per server). A server that cannot be
//! connected to is skipped; once a request is sent it is not sent again.
//! Requests go first to the server that last answered, unless it said it
//! was out of contact with its cluster (`X-Consul-KnownLeader: false`):
//! then to the one after it.
//! Blocking queries (`?index=`, `?wait=`) get their wait (Consul's default
//! 5 min, at most 10 min) plus its jitter and [`BLOCKING_MARGIN`]; others
//! [`DEFAULT_TIMEOUT`]. An answer body still streaming then ends in an
//! error. At most [`MAX_BLOCKING`] blocking queries are forwarded at once,
//! and [`MAX_BLOCKING_PER_TOKEN`] of one token (429 beyond; see
//! [`super::blocking`]), so that held-open queries cannot take every
//! connection of the local API from the workloads' check updates, nor one
//! token every place from the others.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::AgentConfig;

/// Largest request body forwarded (Consul's KV values are at most 512 KiB).
pub const MAX_FORWARD_BODY_BYTES: usize = 1024 * 1024;
/// How long a non-blocking request may take, answer included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Consul's wait when a blocking query names none, and its longest.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
pub const MAX_WAIT: Duration = Duration::from_secs(10 * 60);
/// What a blocking query gets beyond its wait and jitter.
pub const BLOCKING_MARGIN: Duration = Duration::from_secs(30);
/// How long connecting (TCP and TLS) to one server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub use super::blocking::{MAX_BLOCKING, MAX_BLOCKING_PER_TOKEN};

/// Why a request got no answer from the servers.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The CA could not be read or used (at start).
    #[error("{0}")]
    Setup(String),
    /// The request cannot be forwarded as it is (400): nothing was sent.
    #[error("{0}")]
    BadRequest(String),
    /// No server accepted a connection: nothing was sent (503).
    #[error("cannot reach the servers' HTTP API: {0}")]
    Unreachable(String),
    /// The request was sent, but no answer came (502).
    #[error("the server {addr} did not answer: {reason}")]
    Failed { addr: String, reason: String },
    /// No answer within the request's time (504).
    #[error("the server {addr} did not answer within {timeout:?}")]
    TimedOut { addr: String, timeout: Duration },
    /// As many blocking queries as allowed are open already, for the node
    /// or for the token (429).
    #[error("{0}")]
    TooManyBlocking(#[from] super::blocking::Full),
}

/// Idle connections to one server kept for reuse, and for how long (the
/// servers close connections idle for 10 s).
pub const POOL_IDLE_PER_SERVER: usize = 8;
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends requests to the servers' HTTPS API over pooled connections.
#[derive(Clone)]
pub struct Forwarder {
    /// `HOST:PORT` of each server's HTTP API, in the order tried.
    addrs: Vec<String>,
    client: Client<Connect, Full<Bytes>>,
    /// The places of the blocking queries in flight.
    blocking: super::blocking::BlockingPlaces,
    /// The server requests are tried at first: the last that answered,
    /// or the one after it if it said it is out of contact with its
    /// cluster.
    first: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

/// Whether a server's answer says it is out of contact with its cluster
/// (`X-Consul-KnownLeader: false`): what it holds may be stale, and its
/// reads that need the leader fail.
fn out_of_contact(headers: &HeaderMap) -> bool {
    headers
        .get("x-consul-knownleader")
        .is_some_and(|v| v.as_bytes() == b"false")
}

/// `host:port` of the servers' HTTP API from their gRPC `HOST:PORT`s.
pub fn http_addrs(servers: &[String], port: u16) -> Vec<String> {
    servers
        .iter()
        .map(|s| {
            let host = s.rsplit_once(':').map_or(s.as_str(), |(h, _)| h);
            format!("{host}:{port}")
        })
        .collect()
}

impl Forwarder {
    /// From the agent's configuration: `servers`' hosts at
    /// `server_http_port`, the CA from `ca_file` or `WEFT_CACERT` (as
    /// [`crate::control::Credentials`] reads it), `tls_server_name`.
    pub fn from_config(config: &AgentConfig) -> Result<Forwarder, ForwardError> {
        let ca_file = config
            .ca_file
            .clone()
            .or_else(|| std::env::var_os("WEFT_CACERT").map(Into::into))
            .ok_or_else(|| {
                ForwardError::Setup(
                    "no CA to verify the servers with: set ca_file, or WEFT_CACERT".into(),
                )
            })?;
        let (ca, _) = crate::private_file::read_trusted(&ca_file)
            .map_err(|e| ForwardError::Setup(format!("ca_file: {e}")))?;
        Forwarder::new(
            http_addrs(&config.servers, config.server_http_port),
            &ca,
            &config.tls_server_name,
        )
    }

    /// Servers at `addrs` whose certificates chain to a CA in `ca_pem` and
    /// name `server_name`. TLS 1.3 (what the servers speak), ring as the
    /// crypto provider, no client certificate.
    pub fn new(
        addrs: Vec<String>,
        ca_pem: &[u8],
        server_name: &str,
    ) -> Result<Forwarder, ForwardError> {
        let setup = |m: String| ForwardError::Setup(m);
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| setup(format!("CA PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| setup(format!("CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(setup("CA PEM: no certificate".into()));
        }
        let config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| setup(format!("TLS configuration: {e}")))?
                .with_root_certificates(roots)
                .with_no_client_auth();
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| setup(format!("tls_server_name {server_name:?}: {e}")))?;
        let connect = Connect {
            tls: TlsConnector::from(Arc::new(config)),
            server_name,
        };
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_IDLE_PER_SERVER)
            .build(connect);
        Ok(Forwarder {
            addrs,
            client,
            blocking: Default::default(),
            first: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Sends `parts` (the caller's request head) with `body` to the first
    /// server that can be connected to (over a pooled connection when one
    /// is idle); its answer, whose body streams until the request's time is
    /// up.
    pub async fn forward(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
    ) -> Result<Response<DeadlineBody>, ForwardError> {
        let timeout = timeout_for(parts.uri.query());
        let permit = match is_blocking(parts.uri.query()) {
            true => Some(self.blocking.take(caller_token(parts).as_deref())?),
            false => None,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let req = outgoing(parts, body).map_err(ForwardError::BadRequest)?;
        let target = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        // With a `dc` parameter (even a malformed one) the answer may be
        // another datacenter's, its headers that datacenter's servers'.
        let other_dc = !matches!(super::route::query_param(parts.uri.query(), "dc"), Ok(None));
        let mut failed = Vec::new();
        let n = self.addrs.len();
        let start = self.first.load(Ordering::Relaxed);
        for i in crate::control::dial_order(n, start) {
            let addr = &self.addrs[i];
            let mut attempt = req.clone();
            *attempt.uri_mut() = format!("https://{addr}{target}")
                .parse()
                .map_err(|e| ForwardError::BadRequest(format!("request target: {e}")))?;
            match tokio::time::timeout_at(deadline, self.client.request(attempt)).await {
                Err(_) => {
                    return Err(ForwardError::TimedOut {
                        addr: addr.clone(),
                        timeout,
                    })
                }
                // Nothing was sent: the next server.
                Ok(Err(e)) if e.is_connect() => failed.push(format!("{addr}: {}", chain(&e))),
                Ok(Err(e)) => {
                    return Err(ForwardError::Failed {
                        addr: addr.clone(),
                        reason: chain(&e),
                    })
                }
                Ok(Ok(resp)) => {
                    // This answer goes back as it is (a request is sent
                    // once); the next request goes first to a server in
                    // contact, as far as this one knows. Another
                    // datacenter's answer speaks of that datacenter.
                    let next = match !other_dc && out_of_contact(resp.headers()) {
                        true => (i + 1) % n,
                        false => i,
                    };
                    self.first.store(next, Ordering::Relaxed);
                    let (mut head, body) = resp.into_parts();
                    strip_hop_by_hop(&mut head.headers);
                    let body = DeadlineBody {
                        body,
                        deadline: Box::pin(tokio::time::sleep_until(deadline)),
                        timeout,
                        _permit: permit,
                    };
                    return Ok(Response::from_parts(head, body));
                }
            }
        }
        if failed.is_empty() {
            failed.push("no servers configured".into());
        }
        Err(ForwardError::Unreachable(failed.join("; ")))
    }
}

/// An error and its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text = format!("{text}: {next}");
        }
        source = s.source();
    }
    text
}

/// Opens TLS connections to servers for the pooled client: TCP to the
/// URI's `HOST:PORT`, then TLS naming `tls_server_name`, within
/// [`CONNECT_TIMEOUT`].
#[derive(Clone)]
pub struct Connect {
    tls: TlsConnector,
    server_name: ServerName<'static>,
}

impl tower::Service<Uri> for Connect {
    type Response = TlsConn;
    type Error = std::io::Error;
    type Future = futures::future::BoxFuture<'static, Result<TlsConn, std::io::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let addr = uri
                .authority()
                .map(|a| a.as_str().to_string())
                .ok_or_else(|| std::io::Error::other("no server address"))?;
            let attempt = async {
                let tcp = TcpStream::connect(addr.as_str()).await?;
                let _ = tcp.set_nodelay(true);
                this.tls
                    .connect(this.server_name, tcp)
                    .await
                    .map_err(|e| std::io::Error::other(format!("TLS: {e}")))
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                Ok(Ok(stream)) => Ok(TlsConn(TokioIo::new(stream))),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {CONNECT_TIMEOUT:?}"),
                )),
            }
        })
    }
}

/// A TLS connection to a server, as hyper's pooled client takes it.
pub struct TlsConn(TokioIo<tokio_rustls::client::TlsStream<TcpStream>>);

impl Connection for TlsConn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A server's answer body that ends with an error once the request's time
/// is up (a body that stalls does not hold the caller forever).
pub struct DeadlineBody {
    body: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    /// A blocking query's place, held until its answer has streamed.
    _permit: Option<super::blocking::BlockingPlace>,
}

impl hyper::body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let timeout = self.timeout;
            return Poll::Ready(Some(Err(format!(
                "the server's answer did not end within {timeout:?}"
            )
            .into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Headers that describe one connection, not the request: never forwarded
/// (RFC 9110 7.6.1), nor the ones a `Connection` header names.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Drops hop-by-hop headers and those `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The token a request carries, as the servers will read it: the
/// `X-Consul-Token` header, else `Authorization: Bearer`, else `?token=`.
fn caller_token(parts: &http::request::Parts) -> Option<String> {
    match super::route::token(&parts.headers, None) {
        Ok(Some(token)) => Some(token),
        _ => take_query_token(parts.uri.query()).1,
    }
}

/// The query without its `token` parameter (its name percent-encoded or
/// not), and that token (the servers take tokens only in headers).
pub fn take_query_token(query: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(query) = query else {
        return (None, None);
    };
    let mut token = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            // `%74oken` is `token` to the servers, which would refuse it
            // as a parameter: the secret would travel in the URL.
            let key = super::route::percent_decode(key, true);
            if key.as_deref() == Some("token") {
                if token.is_none() {
                    token = super::route::percent_decode(value, true);
                }
                false
            } else {
                true
            }
        })
        .collect();
    let kept = (!kept.is_empty()).then(|| kept.join("&"));
    (kept, token.filter(|t| !t.is_empty()))
}

/// The request sent to a server: the caller's method, path, query (less
/// `token`), headers (less hop-by-hop ones, `Host` and `Content-Length`) and
/// body. The server's `Host` is added once it is known.
pub fn outgoing(parts: &http::request::Parts, body: Bytes) -> Result<Request<Full<Bytes>>, String> {
    let (query, query_token) = take_query_token(parts.uri.query());
    let target = match query {
        Some(q) => format!("{}?{q}", parts.uri.path()),
        None => parts.uri.path().to_string(),
    };
    let uri: Uri = target.parse().map_err(|e| format!("request target: {e}"))?;
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    headers.remove(header::CONTENT_LENGTH);
    let has_header_token =
        headers.contains_key("x-consul-token") || headers.contains_key(header::AUTHORIZATION);
    if let (false, Some(token)) = (has_header_token, query_token) {
        let value = HeaderValue::from_str(&token).map_err(|_| "malformed ACL token".to_string())?;
        headers.insert("x-consul-token", value);
    }
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    Ok(req)
}

/// `query`'s parameters, decoded as the servers decode them (so that
/// `%69ndex` is `index` here too).
fn parameters(query: Option<&str>) -> form_urlencoded::Parse<'_> {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes())
}

/// Whether `query` makes a blocking query (`index` or `wait` given).
pub fn is_blocking(query: Option<&str>) -> bool {
    parameters(query).any(|(key, _)| key == "index" || key == "wait")
}

/// How long a request with `query` may take: a blocking query (`index` or
/// `wait` given) its wait, capped at [`MAX_WAIT`], plus Consul's jitter
/// (wait/16) and [`BLOCKING_MARGIN`]; others [`DEFAULT_TIMEOUT`].
pub fn timeout_for(query: Option<&str>) -> Duration {
    if !is_blocking(query) {
        return DEFAULT_TIMEOUT;
    }
    let wait = parameters(query)
        .find_map(|(key, value)| (key == "wait").then_some(value))
        .and_then(|v| parse_duration(&v));
    let wait = wait
        .filter(|w| !w.is_zero())
        .unwrap_or(DEFAULT_WAIT)
        .min(MAX_WAIT);
    wait + wait / 16 + BLOCKING_MARGIN
}

/// A duration as Consul's `wait` takes it (`10s`, `5m`, `1m30s`, `250ms`).
pub fn parse_duration(text: &str) -> Option<Duration> {
    weft_api::duration::parse_duration(text).ok()
}

/// A session create body (Consul's JSON, or empty) with `Node` set to
/// `node` when it names none.
pub fn session_on_node(body: &[u8], node: &str) -> Result<Bytes, String> {
    let mut doc: serde_json::Value = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| format!("request body: {e}"))?
    };
    let Some(map) = doc.as_object_mut() else {
        return Err("request body: want a JSON object".into());
    };
    let named = map
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("node") && v.as_str().is_some_and(|n| !n.is_empty()));
    if !named {
        map.retain(|k, _| !k.eq_ignore_ascii_case("node"));
        map.insert("Node".into(), node.into());
    }
    Ok(Bytes::from(doc.to_string()))
}

/// Whether `method` may carry a body the servers read.
pub fn has_body(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_default_to_this_node() {
        let on = |b: &str| -> serde_json::Value {
            serde_json::from_slice(&session_on_node(b.as_bytes(), "node-a").unwrap()).unwrap()
        };
        assert_eq!(on(""), serde_json::json!({"Node": "node-a"}));
        assert_eq!(
            on(r#"{"name":"x","node":null}"#),
            serde_json::json!({"name": "x", "Node": "node-a"})
        );
        assert_eq!(
            on(r#"{"node":"node-b"}"#),
            serde_json::json!({"node": "node-b"})
        );
        assert!(session_on_node(b"[1]", "n").is_err());
        assert!(session_on_node(b"{", "n").is_err());
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        for bad in ["", "10", "s", "5 m", "1d", "-1s", "1..2s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn timeouts_follow_blocking_queries() {
        assert_eq!(timeout_for(None), DEFAULT_TIMEOUT);
        assert_eq!(timeout_for(Some("recurse&dc=dc1")), DEFAULT_TIMEOUT);
        let blocking = |wait: Duration| wait + wait / 16 + BLOCKING_MARGIN;
        assert_eq!(timeout_for(Some("index=42")), blocking(DEFAULT_WAIT));
        assert_eq!(
            timeout_for(Some("index=42&wait=30s")),
            blocking(Duration::from_secs(30))
        );
        assert_eq!(timeout_for(Some("wait=1h&index=1")), blocking(MAX_WAIT));
        assert_eq!(
            timeout_for(Some("index=1&wait=soon")),
            blocking(DEFAULT_WAIT)
        );
        // A 10-minute wait is never cut.
        assert!(timeout_for(Some("index=1&wait=10m")) > Duration::from_secs(600));
        assert!(is_blocking(Some("a=1&index")) && is_blocking(Some("wait=5s")));
        assert!(!is_blocking(Some("indexes=1&waiting")) && !is_blocking(None));
        // Escaped as the servers read them: a blocking query all the same,
        // which takes a blocking slot and its wait.
        assert!(is_blocking(Some("%69ndex=1")) && is_blocking(Some("w%61it=5s")));
        assert_eq!(
            timeout_for(Some("%69ndex=42&%77ait=30%73")),
            blocking(Duration::from_secs(30))
        );
    }

    #[test]
    fn query_token_moves_to_a_header() {
        assert_eq!(take_query_token(None), (None, None));
        assert_eq!(
            take_query_token(Some("recurse&token=s%2B1&dc=dc1")),
            (Some("recurse&dc=dc1".into()), Some("s+1".into()))
        );
        assert_eq!(take_query_token(Some("token=")), (None, None));
        assert_eq!(
            take_query_token(Some("tokens=x")),
            (Some("tokens=x".into()), None)
        );
        // An encoded name is the same parameter: never left in the URL.
        assert_eq!(
            take_query_token(Some("%74oken=SECRET&recurse")),
            (Some("recurse".into()), Some("SECRET".into()))
        );
        assert_eq!(
            take_query_token(Some("t%6Fken=SECRET")),
            (None, Some("SECRET".into()))
        );
    }

    fn parts(req: Request<()>) -> http::request::Parts {
        req.into_parts().0
    }

    #[test]
    fn forwarded_headers() {
        let p = parts(
            Request::put("http://127.0.0.1:8500/v1/kv/a?cas=3&token=q-1")
                .header("x-consul-token", "caller")
                .header("content-type", "application/json")
                .header("connection", "keep-alive, x-private")
                .header("x-private", "1")
                .header("keep-alive", "timeout=5")
                .header("transfer-encoding", "chunked")
                .header("upgrade", "h2c")
                .header("te", "trailers")
                .header("content-length", "3")
                .header("x-consul-namespace", "default")
                .body(())
                .unwrap(),
        );
        let req = outgoing(&p, Bytes::from_static(b"abc")).unwrap();
        assert_eq!(req.method(), Method::PUT);
        assert_eq!(req.uri(), "/v1/kv/a?cas=3");
        let h = req.headers();
        assert_eq!(h["x-consul-token"], "caller");
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["x-consul-namespace"], "default");
        assert!(!h.contains_key(header::HOST));
        for gone in [
            "connection",
            "x-private",
            "keep-alive",
            "transfer-encoding",
            "upgrade",
            "te",
            "content-length",
        ] {
            assert!(!h.contains_key(gone), "{gone}");
        }

        // A query token becomes the header; a bearer token passes as it is.
        let p = parts(
            Request::get("/v1/catalog/nodes?token=q-1")
                .body(())
                .unwrap(),
        );
        let req = outgoing(&p, Bytes::new()).unwrap();
        assert_eq!(req.uri(), "/v1/catalog/nodes");
        assert_eq!(req.headers()["x-consul-token"], "q-1");
        let p = parts(
            Request::get("/v1/catalog/nodes")
                .header("authorization", "Bearer b-1")
                .body(())
                .unwrap(),
        );
        let req = outgoing(&p, Bytes::new()).unwrap();
        assert_eq!(req.headers()["authorization"], "Bearer b-1");
        assert!(!req.headers().contains_key("x-consul-token"));
        // A query token that cannot be a header: refused before sending.
        let p = parts(Request::get("/v1/kv/a?token=a%0Ab").body(()).unwrap());
        assert!(outgoing(&p, Bytes::new()).is_err());
        // No token: none sent.
        let p = parts(Request::get("/v1/status/leader").body(()).unwrap());
        let req = outgoing(&p, Bytes::new()).unwrap();
        assert!(!req.headers().contains_key("x-consul-token"));
        assert!(!req.headers().contains_key("authorization"));

        let mut answer = HeaderMap::new();
        answer.insert("x-consul-index", HeaderValue::from_static("7"));
        answer.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        answer.insert("connection", HeaderValue::from_static("close"));
        strip_hop_by_hop(&mut answer);
        assert_eq!(answer.len(), 1);
        assert_eq!(answer["x-consul-index"], "7");
    }

    #[test]
    fn server_http_addresses() {
        let servers = [
            "10.0.0.1:8502".to_string(),
            "[fd00::1]:8502".into(),
            "s.dc1:9".into(),
        ];
        assert_eq!(
            http_addrs(&servers, 8500),
            ["10.0.0.1:8500", "[fd00::1]:8500", "s.dc1:8500"]
        );
    }
}
