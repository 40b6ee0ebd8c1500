//! L7 intentions in the data path. When the intention deciding a pair is an
//! L7 one ([`ConnectionDecision::PerRequest`]), the proxy speaks HTTP on the
//! connection instead of copying bytes: each request is judged on its
//! method, path and headers with the same pure evaluation the servers use,
//! and only an allowed request is forwarded to the instance, over one
//! upstream connection per downstream connection. A denied request gets a
//! 403 with the reason and never reaches the instance; the connection stays
//! open for the next request.
//!
//! The same HTTP serving carries traffic management: for a service with a
//! router, a splitter or resolver subsets, the source agent routes each
//! request on its own ([`serve_routed`]): the discovery chain in
//! `weft_api::routing` picks the service and subset, power of two choices
//! picks an instance, and the request goes over a connection to that
//! instance (straight to it on this node, else through an HBONE tunnel),
//! kept for the next request that lands there.
//!
//! Every request's path is normalized first (`weft_api::path`: dot
//! segments, merged slashes, unreserved escapes decoded; encoded `/` and `\`
//! refused with 400), and the normalized path is the one judged, routed and
//! forwarded.
//!
//! HTTP/1.1 for `http` services; HTTP/2 with prior knowledge for `http2` and
//! `grpc`. A service whose protocol carries no HTTP cannot be judged per
//! request, so such a connection is refused before it starts.
//!
//! [`ConnectionDecision::PerRequest`]: weft_api::intention::ConnectionDecision::PerRequest

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tower::ServiceExt;
use weft_api::config_entry::Protocol;
use weft_api::intention::Request as PolicyRequest;
use weft_api::load_balancer::{hash_request, NewCookie};
use weft_api::routing::{Answer, Attempt, RoutePolicy, Target};

use super::hop_headers;
use super::plan::{self, Call, Route};
use super::upstream::{self, Connected};
use super::{InFlight, ProxyContext};
use crate::breaker::{Gauge, Overflow, Slot};
use crate::metrics::Side;

type Body = BoxBody<Bytes, hyper::Error>;

/// Why an L7 connection ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum L7Error {
    #[error("{}", super::plan::not_http(*.0))]
    NotHttp(Protocol),
    #[error("HTTP handshake with the instance: {0}")]
    Upstream(hyper::Error),
    #[error("HTTP from the caller: {0}")]
    Downstream(hyper::Error),
}

/// The parts of a request that L7 permissions and routes match on: the
/// method in upper case, the path without its query, every header (values
/// that are not UTF-8 are matched in their lossy form) and the query's
/// parameters, decoded.
pub fn policy_request<B>(request: &Request<B>) -> PolicyRequest {
    let mut headers: Vec<(String, String)> = (request.headers().iter())
        .map(|(name, value)| {
            (
                name.as_str().to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    // HTTP/2 names the host in `:authority` and usually sends no `Host`:
    // rules on `host` see it all the same.
    if let (Some(authority), false) = (
        request.uri().authority(),
        request.headers().contains_key(http::header::HOST),
    ) {
        headers.push(("host".into(), authority.as_str().into()));
    }
    PolicyRequest {
        query: weft_api::http_match::parse_query(request.uri().query().unwrap_or("")),
        method: request.method().as_str().to_ascii_uppercase(),
        path: request.uri().path().to_string(),
        headers,
    }
}

/// The connection to the instance that allowed requests go over.
enum Upstream {
    /// HTTP/1.1 carries one request at a time.
    Http1(tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Body>>),
    Http2(hyper::client::conn::http2::SendRequest<Body>),
}

impl Upstream {
    async fn open<U>(stream: U, protocol: Protocol) -> Result<Self, L7Error>
    where
        U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(stream);
        match protocol {
            Protocol::Http => {
                let (send, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(L7Error::Upstream)?;
                // An upgrade (WebSocket) takes the connection over.
                tokio::spawn(conn.with_upgrades());
                Ok(Upstream::Http1(tokio::sync::Mutex::new(send)))
            }
            Protocol::Http2 | Protocol::Grpc => {
                let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(L7Error::Upstream)?;
                tokio::spawn(conn);
                Ok(Upstream::Http2(send))
            }
            Protocol::Tcp => Err(L7Error::NotHttp(protocol)),
        }
    }

    /// Whether the connection can carry no more requests.
    async fn is_closed(&self) -> bool {
        match self {
            Upstream::Http1(send) => send.lock().await.is_closed(),
            Upstream::Http2(send) => send.is_closed(),
        }
    }

    async fn send(&self, request: Request<Body>) -> hyper::Result<Response<Incoming>> {
        self.try_send(request, None).await.map_err(|(e, _)| e)
    }

    /// Sends `request`; when the connection cannot take it (it closed: the
    /// instance ended a kept-alive connection, or an unread response body
    /// was dropped before a retry) the request comes back unsent, to go on
    /// a new connection. `pending` counts the request as waiting for the
    /// connection until it can take it.
    async fn try_send(
        &self,
        request: Request<Body>,
        pending: Option<Slot>,
    ) -> Result<Response<Incoming>, (hyper::Error, Option<Request<Body>>)> {
        match self {
            Upstream::Http1(send) => {
                let mut send = send.lock().await;
                if let Err(e) = send.ready().await {
                    return Err((e, Some(request)));
                }
                drop(pending);
                send.try_send_request(request).await.map_err(unsent)
            }
            Upstream::Http2(send) => {
                let mut send = send.clone();
                if let Err(e) = send.ready().await {
                    return Err((e, Some(request)));
                }
                drop(pending);
                send.try_send_request(request).await.map_err(unsent)
            }
        }
    }
}

/// hyper's error, and the request when hyper never sent it.
fn unsent(
    mut e: hyper::client::conn::TrySendError<Request<Body>>,
) -> (hyper::Error, Option<Request<Body>>) {
    let request = e.take_message();
    (e.into_error(), request)
}

/// Where allowed requests go.
enum Forward {
    /// The one instance the connection was opened to.
    Instance(Upstream),
    /// Each request routed on its own; connections by instance address.
    Routed(Conns),
}

/// Kept connections to instances, by the way to them (a local address, or
/// a tunnel: node and address). Not by address alone: another
/// datacenter's instance may have the address of a local one.
type Conns = tokio::sync::Mutex<HashMap<Route, Arc<Kept>>>;

/// A kept connection to an instance, counted against the caller's
/// `MaxConnections` for as long as it is kept or used.
struct Kept {
    upstream: Upstream,
    _slot: Slot,
}

/// One routed request's attempts: the instances that could not be reached,
/// what its hash is computed from, and a cookie a hash policy made for it.
struct Tries<'a> {
    failed: std::sync::Mutex<Vec<SocketAddr>>,
    facts: &'a PolicyRequest,
    peer: Option<IpAddr>,
    /// The value of a cookie made for this request.
    fresh: u64,
    cookie: std::sync::Mutex<Option<NewCookie>>,
}

impl<'a> Tries<'a> {
    fn new(facts: &'a PolicyRequest, peer: Option<IpAddr>) -> Self {
        Tries {
            failed: Default::default(),
            facts,
            peer,
            fresh: rand::random(),
            cookie: Default::default(),
        }
    }
}

/// Why no connection to an instance was had.
#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("{0}")]
    Connect(String),
    #[error(transparent)]
    Overflow(#[from] Overflow),
}

/// The instance one try goes to: the service it belongs to (the target's,
/// or its failover's), the way to it, and how long connecting may take.
struct Picked {
    service: String,
    route: Route,
    addr: SocketAddr,
    timeout: Duration,
}

/// Marks a response that an instance gave (not one weft made up), so that
/// a route's `ResponseHeaders` apply to it alone.
#[derive(Debug, Clone, Copy)]
struct FromInstance;

/// Marks a response another datacenter's instance gave, with how metrics
/// and traffic reports name the destination then (`api@dc2`).
#[derive(Debug, Clone)]
struct FromDatacenter(String);

/// Largest request body kept for retries (bytes); a larger one is refused
/// with 413 on a route that retries or has a timeout.
const MAX_RETRIED_BODY: usize = 1024 * 1024;

/// Why one attempt at a routed request failed.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("{0}")]
    NoInstance(String),
    #[error("{0}")]
    Connect(String),
    #[error("the instance's connection failed: {0}")]
    Upstream(hyper::Error),
    #[error("refused: {0}")]
    Denied(String),
    #[error("circuit breaker: {0}")]
    Overflow(#[from] Overflow),
}

impl AttemptError {
    fn response(&self, destination: &str) -> Response<Body> {
        let status = match self {
            AttemptError::NoInstance(_) => StatusCode::SERVICE_UNAVAILABLE,
            AttemptError::Connect(_) | AttemptError::Upstream(_) => StatusCode::BAD_GATEWAY,
            AttemptError::Denied(_) => {
                tracing::info!(%destination, "routed request refused: {self}");
                return plain(StatusCode::FORBIDDEN, ACCESS_DENIED.into());
            }
            AttemptError::Overflow(_) => return overloaded(destination, self),
        };
        tracing::info!(%destination, "routed request failed: {self}");
        plain(status, format!("{destination}: {self}\n"))
    }
}

/// tower's retry policy for one request: the route's [`RoutePolicy`].
#[derive(Clone)]
struct Retries {
    policy: RoutePolicy,
    retried: u32,
}

impl tower::retry::Policy<Request<Bytes>, Response<Body>, AttemptError> for Retries {
    type Future = std::pin::Pin<Box<tokio::time::Sleep>>;

    fn retry(
        &mut self,
        _request: &mut Request<Bytes>,
        result: &mut Result<Response<Body>, AttemptError>,
    ) -> Option<Self::Future> {
        let attempt = match result {
            Ok(response) => Attempt::Answer(answer_of(response)),
            Err(AttemptError::Connect(_)) => Attempt::ConnectFailure,
            Err(AttemptError::Upstream(e)) => Attempt::Reset {
                refused_stream: is_refused_stream(e),
            },
            // Nowhere to send, or not allowed: not useful to repeat.
            Err(_) => return None,
        };
        if !self.policy.retries(self.retried, attempt) {
            return None;
        }
        let wait = RoutePolicy::backoff(self.retried, rand::random::<f64>());
        self.retried += 1;
        Some(Box::pin(tokio::time::sleep(wait)))
    }

    fn clone_request(&mut self, request: &Request<Bytes>) -> Option<Request<Bytes>> {
        let mut copy = Request::new(request.body().clone());
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        Some(copy)
    }
}

/// What a retry decision reads of an answer.
fn answer_of<B>(response: &Response<B>) -> Answer {
    let headers = response.headers();
    Answer {
        status: response.status().as_u16(),
        grpc_status: headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok()),
        ratelimited: headers.contains_key("x-envoy-ratelimited"),
    }
}

/// Whether the instance refused the request's HTTP/2 stream
/// (REFUSED_STREAM: it did no work on it).
fn is_refused_stream(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = err.source();
    }
    false
}

/// One host for `request`, the one rules and the instance see: an HTTP/1
/// request in absolute form takes its target's authority as `Host` (a
/// proxy ignores a `Host` that differs, RFC 9112 3.2.2); an HTTP/2
/// request's `Host`, if any, must be its `:authority` (RFC 9113 8.3.1;
/// [`policy_request`] shows `:authority` as `host`). Refused: more than one
/// `Host`, an HTTP/1.1 request without one (RFC 9112 3.2), and a host with
/// user information (`u@admin.internal`) or a port that is not a number
/// (`admin.internal:`, `admin.internal:x`): a rule on `admin.internal`
/// does not match those, and servers read them as that host.
fn host_from_authority<B>(request: &mut Request<B>) -> Result<(), String> {
    let mut hosts = request.headers().get_all(http::header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("the request has more than one Host".into());
    }
    if let Some(host) = host {
        check_host(&String::from_utf8_lossy(host.as_bytes()))?;
    }
    let Some(authority) = request.uri().authority() else {
        if host.is_none() && request.version() == http::Version::HTTP_11 {
            return Err("an HTTP/1.1 request needs a Host".into());
        }
        return Ok(());
    };
    // User information (`u@admin.internal`) among what is refused.
    check_host(authority.as_str())?;
    if request.version() >= http::Version::HTTP_2 {
        let host = request.headers().get(http::header::HOST);
        if host.is_some_and(|h| {
            !h.as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
        }) {
            return Err("the request's Host differs from its :authority".into());
        }
        return Ok(());
    }
    let value = http::HeaderValue::from_str(authority.as_str())
        .map_err(|e| format!("authority {:?}: {e}", authority.as_str()))?;
    request.headers_mut().insert(http::header::HOST, value);
    Ok(())
}

/// A `Host` value (or an authority) is `host[:port]` with a host of
/// letters, digits, `-._~` or sub-delimiters (no escapes: a server that
/// decodes `admin%2Einternal` sees a host the rules did not), or an IP
/// literal in brackets, and a port of 1 to 5 digits.
fn check_host(value: &str) -> Result<(), String> {
    // A value with user information is not repeated (it may hold a password).
    let shown = if value.contains('@') { "…" } else { value };
    let bad = |why: &str| Err(format!("Host {shown:?}: {why}"));
    let name = match crate::authority::split(value) {
        Ok((crate::authority::Host::Name(name), _)) => name,
        Ok((crate::authority::Host::V6(_), _)) => return Ok(()),
        Err(why) => return bad(why),
    };
    let allowed = |b: u8| {
        b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || matches!(
                b,
                b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
            )
    };
    match name.bytes().find(|b| !allowed(*b)) {
        Some(b'@') => bad("user information is refused"),
        Some(b) => bad(&format!("{:?} is not allowed in a host", b as char)),
        None => Ok(()),
    }
}

/// The method as sent, upper case: methods are case-sensitive (RFC 9110
/// 9.1), so `get` is not `GET` to the rules, while some servers treat it
/// as GET. Refused rather than judged as one and served as the other.
fn check_method(method: &http::Method) -> Result<(), String> {
    if method.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(format!(
            "method {:?}: methods are upper case; refused",
            method.as_str()
        ));
    }
    Ok(())
}

/// `uri` with its path replaced by `path` (the query kept).
fn with_path(uri: &http::Uri, path: &str) -> Result<http::Uri, http::Error> {
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse()?);
    Ok(http::Uri::from_parts(parts)?)
}

fn full(body: Bytes) -> Body {
    Full::new(body).map_err(|never| match never {}).boxed()
}

/// One L7 connection from `source` to `destination`.
struct Judge {
    ctx: Arc<ProxyContext>,
    source: String,
    destination: String,
    /// The destination's datacenter when another's (an upstream's
    /// `datacenter`): routing starts there.
    datacenter: Option<String>,
    protocol: Protocol,
    forward: Forward,
    /// The caller's address, for `SourceIP` hash policies.
    peer: Option<IpAddr>,
    /// How metrics name the source and the destination
    /// ([`ProxyContext::source_label`], [`ProxyContext::service_label`]).
    labels: (String, String),
}

impl Judge {
    /// Where this judge's counts belong: next to the instance (the
    /// destination's side, or the only agent for a local one), or routing at
    /// the source.
    fn side(&self) -> Side {
        match self.forward {
            Forward::Instance(_) => Side::Inbound,
            Forward::Routed(_) => Side::Outbound,
        }
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let arrived = std::time::Instant::now();
        let response = self.judge_and_forward(request).await;
        let code = response.status().as_u16();
        let (src, dst) = &self.labels;
        let dst = match response.extensions().get::<FromDatacenter>() {
            Some(FromDatacenter(label)) => label,
            None => dst,
        };
        (self.ctx.metrics).http_request(self.side(), src, dst, code, arrived.elapsed());
        response
    }

    async fn judge_and_forward(&self, mut request: Request<Incoming>) -> Response<Body> {
        // Rules and the workload see the same, normalized path.
        match weft_api::path::normalize_path(request.uri().path()) {
            Ok(Cow::Borrowed(_)) => {}
            Ok(Cow::Owned(path)) => match with_path(request.uri(), &path) {
                Ok(uri) => *request.uri_mut() = uri,
                Err(e) => return plain(StatusCode::BAD_REQUEST, format!("path: {e}\n")),
            },
            Err(e) => {
                tracing::info!(source = %self.source, destination = %self.destination,
                    "request refused: {e}");
                return plain(StatusCode::BAD_REQUEST, format!("{e}\n"));
            }
        }
        let websocket = hop_headers::strip(request.headers_mut());
        if let Err(e) =
            check_method(request.method()).and_then(|()| host_from_authority(&mut request))
        {
            tracing::info!(source = %self.source, destination = %self.destination,
                "request refused: {e}");
            return plain(StatusCode::BAD_REQUEST, format!("{e}\n"));
        }
        let facts = policy_request(&request);
        // Every request, also where an L4 intention allowed the connection
        // when it opened: a deny (or an L7 intention) written since applies
        // from the connection's next request on.
        let decision = self.ctx.view.load().decide(
            self.ctx.caller(&self.source),
            &self.destination,
            Some(&facts),
        );
        if !decision.allowed {
            let (src, dst) = &self.labels;
            (self.ctx.metrics).denied(self.side(), src, dst);
            tracing::info!(source = %self.source, destination = %self.destination,
                method = %facts.method, path = %facts.path, "request refused: {decision}");
            // Which intention and permission decided is the
            // operator's to know (logged above), not the caller's.
            return plain(StatusCode::FORBIDDEN, ACCESS_DENIED.into());
        }
        // An upgrade (WebSocket): once the instance completes the
        // handshake, both connections are handed over and their bytes
        // copied both ways.
        let client_upgrade = websocket
            .is_some()
            .then(|| hyper::upgrade::on(&mut request));
        let mut response = match &self.forward {
            Forward::Instance(upstream) => self.send(upstream, request).await,
            Forward::Routed(conns) => self.route(conns, &facts, request).await,
        };
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            hop_headers::strip_response(response.headers_mut());
            return response;
        }
        let completed = (websocket.as_ref())
            .filter(|keys| hop_headers::completes_websocket(&keys.upstream, response.headers()));
        match (client_upgrade, completed) {
            (Some(client), Some(keys)) => {
                // The client's key was not the instance's: its accept value.
                let accept = hop_headers::websocket_accept(&keys.client);
                response
                    .headers_mut()
                    .insert("sec-websocket-accept", accept);
                let upstream = hyper::upgrade::on(&mut response);
                tokio::spawn(splice_upgraded(client, upstream));
                response
            }
            // Dropped, the answer takes the instance's connection with it.
            _ => {
                tracing::info!(source = %self.source, destination = %self.destination,
                    method = %facts.method, path = %facts.path,
                    "the instance answered 101 without completing a WebSocket handshake: refused");
                let mut refused = plain(
                    StatusCode::BAD_GATEWAY,
                    "the instance switched protocols without completing a WebSocket handshake\n"
                        .into(),
                );
                (refused.headers_mut()).insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
                refused
            }
        }
    }

    async fn send(&self, upstream: &Upstream, request: Request<Incoming>) -> Response<Body> {
        match upstream.send(request.map(BodyExt::boxed)).await {
            Ok(response) => response.map(BodyExt::boxed),
            Err(e) => {
                tracing::info!(destination = %self.destination, "request to the instance failed: {e}");
                plain(
                    StatusCode::BAD_GATEWAY,
                    format!("{}: {e}\n", self.destination),
                )
            }
        }
    }

    /// Routes one request: the discovery chain picks the target; with a
    /// route policy (retries, timeout) the body is kept so that tower's
    /// retry and timeout layers can send it again, to a new pick.
    async fn route(
        &self,
        conns: &Conns,
        facts: &PolicyRequest,
        request: Request<Incoming>,
    ) -> Response<Body> {
        let target = {
            let view = self.ctx.view.load();
            let start = weft_api::routing::Target::service_in(
                &self.destination,
                self.datacenter.as_deref(),
            );
            weft_api::routing::route_request_in(
                &view.entries,
                start,
                facts,
                rand::random::<f32>() * 100.0,
            )
        };
        let mut request = request;
        for edits in &target.policy.request_headers {
            edits.apply(request.headers_mut());
        }
        let _slot = match (self.ctx).take_slot(&self.source, &self.destination, Gauge::Requests) {
            Ok(slot) => slot,
            Err(e) => return overloaded(&self.destination, &e),
        };
        let tries = Tries::new(facts, self.peer);
        let mut response = self.route_to(conns, &target, &tries, request).await;
        // Only an instance's answer: weft's own refusals stay as they are.
        if response.extensions().get::<FromInstance>().is_some() {
            for edits in &target.policy.response_headers {
                edits.apply(response.headers_mut());
            }
            let made = tries.cookie.lock().expect("cookie lock").take();
            if let Some(value) = made.and_then(|c| c.header_value().parse().ok()) {
                response
                    .headers_mut()
                    .append(http::header::SET_COOKIE, value);
            }
        }
        response
    }

    /// Sends a routed request to `target`, with its rewrite, retries and
    /// timeout.
    async fn route_to(
        &self,
        conns: &Conns,
        target: &Target,
        tries: &Tries<'_>,
        request: Request<Incoming>,
    ) -> Response<Body> {
        let mut request = request;
        if let Some(path) = target.policy.rewritten(request.uri().path()) {
            // The rewritten path is normalized as a request's is: the
            // instance and whoever judges it next see the same path.
            let path = match weft_api::path::normalize_path(&path) {
                Ok(normal) => normal.into_owned(),
                Err(e) => {
                    return plain(
                        StatusCode::BAD_REQUEST,
                        format!("PrefixRewrite gives a bad path {path:?}: {e}\n"),
                    )
                }
            };
            match with_path(request.uri(), &path) {
                Ok(uri) => *request.uri_mut() = uri,
                Err(e) => {
                    return plain(
                        StatusCode::BAD_REQUEST,
                        format!("PrefixRewrite gives a bad path {path:?}: {e}\n"),
                    )
                }
            }
        }
        // An upgrade goes once, as it is: it cannot be retried.
        if target.policy.is_plain() || is_upgrade(&request) {
            return match self
                .attempt(conns, target, tries, request.map(BodyExt::boxed))
                .await
            {
                Ok(response) => response,
                Err(e) => e.response(&self.destination),
            };
        }
        let (parts, body) = request.into_parts();
        let body = match Limited::new(body, MAX_RETRIED_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                return plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body for a retried route: {e}\n"),
                )
            }
        };
        let request = Request::from_parts(parts, body);
        let attempt = tower::service_fn(|request: Request<Bytes>| {
            self.attempt(conns, target, tries, request.map(full))
        });
        let retries = Retries {
            policy: target.policy.clone(),
            retried: 0,
        };
        let service = tower::retry::Retry::new(retries, attempt);
        let result = match target.policy.timeout {
            Some(limit) => {
                tower::timeout::Timeout::new(service, limit)
                    .oneshot(request)
                    .await
            }
            None => service
                .oneshot(request)
                .await
                .map_err(tower::BoxError::from),
        };
        match result {
            Ok(response) => response,
            Err(e) => match e.downcast::<AttemptError>() {
                Ok(e) => e.response(&self.destination),
                Err(e) if e.is::<tower::timeout::error::Elapsed>() => plain(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "{}: no answer within the route's RequestTimeout\n",
                        self.destination
                    ),
                ),
                Err(e) => plain(StatusCode::BAD_GATEWAY, format!("{e}\n")),
            },
        }
    }

    /// One try at a request: an instance of `target` that earlier tries of
    /// it could not connect to (`tries`) are passed over while others
    /// remain; a connection to it (kept, or new); the request.
    async fn attempt(
        &self,
        conns: &Conns,
        target: &Target,
        tries: &Tries<'_>,
        request: Request<Body>,
    ) -> Result<Response<Body>, AttemptError> {
        let mut request = request;
        let mut failed = None;
        // A connection refused (nothing was sent) tries another instance,
        // as a plain TCP connection does, up to CONNECT_ATTEMPTS.
        for n in 0..upstream::CONNECT_ATTEMPTS {
            let (picked, untried) = self.pick(target, tries)?;
            if n > 0 && !untried {
                break; // every instance failed to connect
            }
            // A resolver's failover or redirect: the intentions decide for
            // the service that answers, here as on its node. An instance on
            // this node: no agent after this one judges the request, so a
            // request the route changed (rewritten, its headers edited) is
            // judged again as it is sent, as a tunnelled one is by the
            // instance's agent.
            let local = matches!(picked.route, Route::Local(_));
            if picked.service != self.destination || (local && target.policy.changes_request()) {
                self.allowed_to(&picked.service, &request)?;
            }
            let addr = picked.addr;
            let _in_flight = InFlight::new(&self.ctx, addr);
            match self.send_to(conns, &picked, request).await {
                Ok(response) => return Ok(response),
                Err((AttemptError::Connect(e), Some(unsent))) => {
                    tracing::debug!(%addr, "{e}: trying another instance");
                    tries.failed.lock().expect("tried lock").push(addr);
                    request = unsent;
                    failed = Some(e);
                }
                Err((e, _)) => return Err(e),
            }
        }
        Err(AttemptError::Connect(failed.unwrap_or_else(|| {
            format!("{}: no instance took a connection", target.service)
        })))
    }

    /// An instance of `target` (one not in `tries` while others remain),
    /// and whether it is one not tried yet.
    fn pick(&self, target: &Target, tries: &Tries<'_>) -> Result<(Picked, bool), AttemptError> {
        let view = self.ctx.view.load();
        let weft_api::routing::Resolved {
            service,
            datacenter,
            mut instances,
        } = view.instances_of(target, &self.ctx.datacenter);
        let tried = tries.failed.lock().expect("tried lock");
        let untried: Vec<_> = instances
            .iter()
            .copied()
            .filter(|i| !tried.iter().any(|t| i.socket_addr() == Some(*t)))
            .collect();
        let fresh = !untried.is_empty();
        if fresh {
            instances = untried;
        }
        // The hash under the answering service's own hash policies. A
        // cookie one of them makes has the same value on every try.
        let hash = view.load_balancer(&service).and_then(|lb| {
            let hashed = hash_request(
                &lb.hash_policies,
                Some(tries.facts),
                tries.peer,
                tries.fresh,
            );
            if let Some(made) = hashed.new_cookie {
                *tries.cookie.lock().expect("cookie lock") = Some(made);
            }
            hashed.hash
        });
        let call = Call {
            source: &self.source,
            upstream: &self.destination,
            service: &service,
        };
        let route = upstream::pick(
            &self.ctx,
            &view,
            &instances,
            call,
            hash,
            datacenter.as_deref(),
        )
        .map_err(|e| AttemptError::NoInstance(e.to_string()))?;
        let timeout = call.connect_timeout(&view);
        let addr = route.target();
        let picked = Picked {
            service,
            route,
            addr,
            timeout,
        };
        Ok((picked, fresh))
    }

    /// Refuses `request`, as it is sent, unless the intentions let the
    /// source reach `service` (the connection's destination, or another
    /// answering for it).
    fn allowed_to(&self, service: &str, request: &Request<Body>) -> Result<(), AttemptError> {
        let view = self.ctx.view.load();
        let caller = self.ctx.caller(&self.source);
        let facts = policy_request(request);
        plan::answering(&view, caller, service, Some(&facts)).map_err(|reason| {
            (self.ctx.metrics).denied(self.side(), &self.labels.0, service);
            let of = match service == self.destination {
                true => String::new(),
                false => format!(" (failover of {})", self.destination),
            };
            AttemptError::Denied(format!("{} -> {reason}{of}", self.source))
        })
    }

    /// Sends `request` to the instance at `addr`: on the kept connection,
    /// or on a new one when the kept one turns out closed (hyper hands the
    /// request back unsent). A connection that cannot be made gives the
    /// request back too, for another instance.
    async fn send_to(
        &self,
        conns: &Conns,
        picked: &Picked,
        request: Request<Body>,
    ) -> Result<Response<Body>, (AttemptError, Option<Request<Body>>)> {
        let addr = picked.addr;
        let mut request = request;
        for fresh in [false, true] {
            let pending =
                match (self.ctx).take_slot(&self.source, &self.destination, Gauge::PendingRequests)
                {
                    Ok(slot) => slot,
                    Err(e) => return Err((e.into(), None)),
                };
            let (kept, new) = match self.upstream(conns, picked, fresh).await {
                Ok(u) => u,
                Err(UpstreamError::Overflow(e)) => return Err((e.into(), None)),
                Err(UpstreamError::Connect(e)) => {
                    self.ctx
                        .report(&self.source, &self.destination, addr, false);
                    return Err((AttemptError::Connect(e), Some(request)));
                }
            };
            match kept.upstream.try_send(request, Some(pending)).await {
                Ok(mut response) => {
                    let ok = !response.status().is_server_error();
                    self.ctx.report(&self.source, &self.destination, addr, ok);
                    response.extensions_mut().insert(FromInstance);
                    if let Route::Tunnel {
                        remote: Some(_), ..
                    } = &picked.route
                    {
                        let label = picked.route.label(&picked.service);
                        response.extensions_mut().insert(FromDatacenter(label));
                    }
                    return Ok(response.map(BodyExt::boxed));
                }
                Err((e, Some(unsent))) if !new => {
                    tracing::debug!(%addr, "kept connection closed ({e}): sending on a new one");
                    conns.lock().await.remove(&picked.route);
                    request = unsent;
                }
                Err((e, _)) => {
                    conns.lock().await.remove(&picked.route);
                    self.ctx
                        .report(&self.source, &self.destination, addr, false);
                    return Err((AttemptError::Upstream(e), None));
                }
            }
        }
        unreachable!("the second try is on a new connection, which returns")
    }

    /// The kept connection to `addr` (unless `fresh`, or it is closed), or
    /// a new one, kept for the next requests; and whether it is new. The
    /// map is not locked while connecting: one slow instance does not hold
    /// up this connection's other requests.
    async fn upstream(
        &self,
        conns: &Conns,
        picked: &Picked,
        fresh: bool,
    ) -> Result<(Arc<Kept>, bool), UpstreamError> {
        let key = &picked.route;
        if !fresh {
            let kept = conns.lock().await.get(key).cloned();
            if let Some(k) = kept {
                if !k.upstream.is_closed().await {
                    return Ok((k, false));
                }
            }
        }
        // A closed kept connection gives its slot back before a new one
        // takes one.
        let stale = conns.lock().await.remove(key);
        drop(stale);
        let slot = (self.ctx).take_slot(&self.source, &self.destination, Gauge::Connections)?;
        let upstream = self.open(&picked.route, picked.timeout).await;
        let kept = Arc::new(Kept {
            upstream: upstream.map_err(UpstreamError::Connect)?,
            _slot: slot,
        });
        conns.lock().await.insert(key.clone(), kept.clone());
        Ok((kept, true))
    }

    /// A new connection for requests to the instance `route` leads to,
    /// opened within `timeout`.
    async fn open(&self, route: &Route, timeout: Duration) -> Result<Upstream, String> {
        let connected = upstream::connect(&self.ctx, &self.source, route, timeout).await;
        match connected.map_err(|e| e.to_string())? {
            Connected::Local(tcp) => Upstream::open(tcp, self.protocol).await,
            Connected::Tunnel(tunnel) => Upstream::open(tunnel, self.protocol).await,
        }
        .map_err(|e| e.to_string())
    }
}

/// Whether `request` asks to upgrade the connection (HTTP/1.1 `Connection:
/// upgrade` with an `Upgrade` protocol, as WebSocket does).
fn is_upgrade<B>(request: &Request<B>) -> bool {
    let headers = request.headers();
    headers.contains_key(http::header::UPGRADE)
        && headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Copies bytes both ways between an upgraded client connection and the
/// upgraded connection to the instance, until either ends.
async fn splice_upgraded(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match (client.await, upstream.await) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!("upgrade not completed: {e}");
            return;
        }
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!("upgraded connection ended: {e}");
    }
}

/// The body of a request the intentions refuse, as Envoy's RBAC filter
/// answers it: the reason is logged, not told to the caller.
const ACCESS_DENIED: &str = "RBAC: access denied\n";

/// 503 for a request refused at a circuit breaker's limit, marked as
/// Envoy marks it (`x-envoy-overloaded: true`).
fn overloaded(destination: &str, e: &dyn std::fmt::Display) -> Response<Body> {
    let mut response = plain(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{destination}: {e}\n"),
    );
    (response.headers_mut()).insert("x-envoy-overloaded", http::HeaderValue::from_static("true"));
    response
}

fn plain(status: StatusCode, text: String) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Serves `downstream` as HTTP of `protocol`, judging every request from
/// `source` to `destination` and forwarding the allowed ones to the instance
/// at the other end of `upstream`.
pub async fn serve_instance<D, U>(
    ctx: Arc<ProxyContext>,
    downstream: D,
    upstream: U,
    protocol: Protocol,
    source: String,
    destination: String,
) -> Result<(), L7Error>
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let upstream = Upstream::open(upstream, protocol).await?;
    let labels = (
        ProxyContext::source_label(&source).to_string(),
        destination.clone(),
    );
    let judge = Judge {
        ctx,
        source,
        destination,
        datacenter: None,
        protocol,
        forward: Forward::Instance(upstream),
        peer: None,
        labels,
    };
    serve(downstream, judge).await
}

/// Serves `downstream` as HTTP of `protocol`, judging and routing every
/// request from `source` to `destination` on its own.
pub async fn serve_routed<D>(
    ctx: Arc<ProxyContext>,
    downstream: D,
    protocol: Protocol,
    source: String,
    (destination, datacenter): (String, Option<String>),
    peer: Option<IpAddr>,
) -> Result<(), L7Error>
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if protocol == Protocol::Tcp {
        return Err(L7Error::NotHttp(protocol));
    }
    let labels = (
        ProxyContext::source_label(&source).to_string(),
        ctx.service_label(&destination, datacenter.as_deref()),
    );
    let judge = Judge {
        ctx,
        source,
        destination,
        datacenter,
        protocol,
        forward: Forward::Routed(Default::default()),
        peer,
        labels,
    };
    serve(downstream, judge).await
}

async fn serve<D>(downstream: D, judge: Judge) -> Result<(), L7Error>
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let protocol = judge.protocol;
    let draining = crate::drain::started(judge.ctx.drain.signal());
    let judge = Arc::new(judge);
    let service = service_fn(move |request: Request<Incoming>| {
        let judge = judge.clone();
        async move { Ok::<_, Infallible>(judge.handle(request).await) }
    });
    let io = TokioIo::new(downstream);
    // When the agent drains, a kept-alive connection ends after its current
    // request (HTTP/1.1 `Connection: close`, HTTP/2 GOAWAY): the client's
    // next one opens a new connection, to the successor or elsewhere.
    macro_rules! until_drained {
        ($conn:expr) => {{
            let conn = $conn;
            tokio::pin!(conn);
            tokio::select! {
                served = conn.as_mut() => served,
                () = draining => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }};
    }
    match protocol {
        Protocol::Http => until_drained!(hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .with_upgrades())
        .map_err(L7Error::Downstream),
        Protocol::Http2 | Protocol::Grpc => until_drained!(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, service)
        )
        .map_err(L7Error::Downstream),
        Protocol::Tcp => Err(L7Error::NotHttp(protocol)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_path_keeps_the_query_and_the_authority() {
        let uri: http::Uri = "http://api:8080/v2/users?id=7".parse().unwrap();
        assert_eq!(
            with_path(&uri, "/users").unwrap().to_string(),
            "http://api:8080/users?id=7"
        );
        let origin: http::Uri = "/v2/x".parse().unwrap();
        assert_eq!(with_path(&origin, "/x").unwrap().to_string(), "/x");
        assert!(with_path(&origin, "/bad path").is_err());
    }

    #[test]
    fn the_targets_authority_is_the_host_rules_see() {
        let host = |r: &Request<()>| {
            (r.headers().get_all(http::header::HOST).iter())
                .map(|v| v.to_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        // HTTP/1.1 absolute form naming one host, Host another.
        let mut absolute = Request::builder()
            .uri("http://admin.internal/x")
            .header("host", "public")
            .body(())
            .unwrap();
        host_from_authority(&mut absolute).unwrap();
        assert_eq!(host(&absolute), ["admin.internal"]);
        // HTTP/2: `:authority`, no Host; the request stays as it is.
        let mut h2 = Request::builder()
            .uri("https://admin.internal:8443/x")
            .version(http::Version::HTTP_2)
            .body(())
            .unwrap();
        host_from_authority(&mut h2).unwrap();
        assert!(host(&h2).is_empty());
        let facts = policy_request(&h2);
        assert!(facts
            .headers
            .contains(&("host".to_string(), "admin.internal:8443".to_string())));
        // HTTP/2 with a Host that is not its :authority, two Hosts, user
        // information: refused.
        let mut two = Request::builder()
            .uri("https://admin.internal/x")
            .version(http::Version::HTTP_2)
            .header("host", "public")
            .body(())
            .unwrap();
        assert!(host_from_authority(&mut two).is_err());
        let mut hosts = Request::builder()
            .uri("/x")
            .header("host", "public")
            .header("host", "admin.internal")
            .body(())
            .unwrap();
        assert!(host_from_authority(&mut hosts).is_err());
        let mut userinfo = Request::builder()
            .uri("http://u@admin.internal/x")
            .header("host", "u@admin.internal")
            .body(())
            .unwrap();
        assert!(host_from_authority(&mut userinfo).is_err());
        // Origin form: Host stays as it came.
        let mut origin = Request::builder()
            .uri("/x")
            .header("host", "public")
            .body(())
            .unwrap();
        host_from_authority(&mut origin).unwrap();
        assert_eq!(host(&origin), ["public"]);
    }

    #[test]
    fn a_host_is_a_name_or_an_address_and_a_port() {
        for good in [
            "api",
            "api:8080",
            "admin.internal",
            "10.0.0.1:80",
            "[::1]",
            "[::1]:8443",
            "xn--bcher-kva.example",
        ] {
            assert_eq!(check_host(good), Ok(()), "{good}");
        }
        for bad in [
            "admin.internal:",
            "admin.internal:x",
            "admin.internal:123456",
            "u@admin.internal",
            "u:p@admin.internal",
            "admin internal",
            "admin.internal/x",
            "admin%2Einternal",
            "",
            ":80",
            "[::1",
            "[not-v6]",
            "[::1]x",
            "[::1]:",
        ] {
            assert!(check_host(bad).is_err(), "{bad}");
        }
        // In a request: HTTP/1.1 needs one; HTTP/1.0 may have none.
        let mut none = Request::builder().uri("/x").body(()).unwrap();
        assert!(host_from_authority(&mut none).is_err());
        let mut old = Request::builder()
            .uri("/x")
            .version(http::Version::HTTP_10)
            .body(())
            .unwrap();
        host_from_authority(&mut old).unwrap();
        let mut odd = Request::builder()
            .uri("/x")
            .header("host", "admin.internal:")
            .body(())
            .unwrap();
        assert!(host_from_authority(&mut odd).is_err());
    }

    #[test]
    fn a_method_in_lower_case_is_refused() {
        assert!(check_method(&http::Method::GET).is_ok());
        assert!(check_method(&http::Method::from_bytes(b"PURGE").unwrap()).is_ok());
        for lower in ["get", "Get", "delete"] {
            let method = http::Method::from_bytes(lower.as_bytes()).unwrap();
            assert!(check_method(&method).is_err(), "{lower}");
        }
    }

    #[test]
    fn policy_request_takes_method_path_and_headers() {
        let request = Request::builder()
            .method("get")
            .uri("http://api:8080/v1/users?id=7")
            .header("x-user", "alice")
            .header("x-user", "bob")
            .header("x-raw", &b"\xff\xfe"[..])
            .body(())
            .unwrap();
        let p = policy_request(&request);
        assert_eq!(p.method, "GET");
        assert_eq!(p.path, "/v1/users");
        assert_eq!(
            p.headers,
            vec![
                ("x-user".to_string(), "alice".to_string()),
                ("x-user".to_string(), "bob".to_string()),
                ("x-raw".to_string(), "\u{fffd}\u{fffd}".to_string()),
                ("host".to_string(), "api:8080".to_string()),
            ]
        );
    }
}
