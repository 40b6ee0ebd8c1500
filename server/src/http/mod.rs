//! The server's HTTP port (TLS 1.3, like every port): Consul's HTTP API
//! where weft has the feature, the web UI's own endpoints and the UI itself.
//! `docs/http-api.md` lists every endpoint and its JSON.
//!
//! Handlers call the gRPC services in process, with the caller's token in
//! the request's metadata, so that the HTTP API authorizes, checks and
//! writes exactly as the gRPC API does; views the gRPC API has no call for
//! (the UI's summaries) read the state with the same ACL filters.
//!
//! - No token: `/v1/status/leader`, `/v1/status/peers` (no more than a
//!   member list tells whoever can reach Raft) and the UI's static files.
//! - Everything else needs a token: `X-Consul-Token: <secret>` or
//!   `Authorization: Bearer <secret>`, never the URL (it would be logged).
//!   Without one the gRPC layer refuses; the answer is 403 as in Consul.
//! - Bodies are read only for PUT and POST, only from a token the cluster
//!   knows, up to [`MAX_BODY`], within 30 s, and 64 MiB for all requests
//!   together (more waits for a 503 and a retry).
//! - Every answer says `X-Content-Type-Options: nosniff`,
//!   `X-Frame-Options: DENY` and `Cache-Control: no-store`; no answer allows
//!   another origin (no CORS), and since the token travels in a header a
//!   page of another site cannot make a browser send it (no CSRF).
mod acl;
mod ca;
mod catalog;
mod catalog_write;
mod config;
mod intentions;
mod kv;
mod remote;
mod session;
mod snapshot;
mod status;
mod ui;
mod views;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

use crate::conn_limit::{ClientLimits, Slot};
use crate::grpc::auth::{Caller, TOKEN_METADATA};
use crate::node::ServerNode;

/// The largest request body read (a KV value is at most 512 KiB, a config
/// entry at most what one Raft entry carries).
pub const MAX_BODY: usize = 2 << 20;

/// Serves the HTTP port until the process ends.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: Arc<ClientLimits>,
    node: Arc<ServerNode>,
) {
    let accepted = node.metrics.tls_connections("http");
    let mut incoming = crate::tls::incoming(listener, tls, limits, accepted);
    while let Some(conn) = incoming.next().await {
        let Ok(stream) = conn else { continue };
        let node = node.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let node = node.clone();
                async move { Ok::<_, Infallible>(handle(&node, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// What a handler refuses with: an HTTP status and the reason, sent as a
/// JSON string.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HttpError {
    pub status: StatusCode,
    pub message: String,
}

impl HttpError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not found")
    }

    pub fn method_not_allowed() -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
    }
}

impl From<tonic::Status> for HttpError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let status = match s.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            // Consul answers 403 for a missing or unknown token too.
            Code::Unauthenticated | Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable | Code::DeadlineExceeded => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        HttpError::new(status, s.message())
    }
}

pub type Reply = Response<Full<Bytes>>;
pub type Answer = Result<Reply, HttpError>;

/// One request, read: what every handler needs.
pub struct Call {
    pub method: Method,
    /// The path, percent-decoded.
    pub path: String,
    query: Vec<(String, String)>,
    pub headers: HeaderMap,
    pub body: Bytes,
    secret: Option<String>,
    /// Consul's read options, taken out of the query: `?stale`, and a
    /// blocking query's `?index=` and `?wait=`.
    stale: bool,
    block: Option<(u64, Duration)>,
    /// `?dc=` naming another datacenter ([`remote`]).
    remote_dc: Option<String>,
    /// See [`Call::index`].
    read_index: std::sync::atomic::AtomicU64,
    /// The share of the body budget this request's body holds.
    _budget: Option<BodyPermit>,
}

impl Call {
    /// The value of query parameter `name` (`Some("")` for a bare `?name`).
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the query has flag `name` (see [`flag_value`]).
    pub fn flag(&self, name: &str) -> Result<bool, HttpError> {
        self.query(name).map_or(Ok(false), |v| flag_value(name, v))
    }

    /// Refuses query parameters other than `known`, so that one weft does
    /// not implement yet is never silently ignored.
    pub fn only_params(&self, known: &[&str]) -> Result<(), HttpError> {
        match self
            .query
            .iter()
            .find(|(k, _)| !known.contains(&k.as_str()))
        {
            Some((k, _)) => Err(HttpError::bad_request(format!(
                "query parameter {k:?} is not supported here (known: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ))),
            None => Ok(()),
        }
    }

    /// Query parameter `name` as a number, if given.
    pub fn number<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, HttpError> {
        self.query(name)
            .map(|v| {
                v.parse().map_err(|_| {
                    HttpError::bad_request(format!("query parameter {name}: {v:?} is not a number"))
                })
            })
            .transpose()
    }

    /// A required query parameter.
    pub fn required(&self, name: &str) -> Result<&str, HttpError> {
        self.query(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| HttpError::bad_request(format!("query parameter {name} is required")))
    }

    /// How to read: from this server's state with `?stale`, else
    /// linearizable (Consul's `?consistent`, which is also the default).
    pub fn read(&self) -> Option<weft_api::proto::ReadOptions> {
        Some(weft_api::proto::ReadOptions {
            stale: self.stale,
            ..Default::default()
        })
    }

    /// A blocking query (`?index=N[&wait=5m]`): returns once the state's
    /// index is past N, or when the wait is over (a jitter of up to a
    /// sixteenth added, as Consul does, so that clients do not come back
    /// together); the read that follows answers either way.
    async fn block(&self, node: &ServerNode) {
        let Some((index, wait)) = self.block else {
            return;
        };
        let jitter = wait.mul_f64(rand::random::<f64>() / 16.0);
        node.shared
            .wait_for_index(index.saturating_add(1), wait + jitter)
            .await;
    }

    /// The state's index when the read began (after any blocking wait):
    /// what `X-Consul-Index` says. Read before the data, it may be lower
    /// than the data's, which only wakes a blocking client early; never
    /// higher, which could make it miss a write.
    pub fn index(&self) -> u64 {
        self.read_index.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The token secret the request carries, if any.
    pub fn token(&self) -> Option<&str> {
        self.secret.as_deref()
    }

    /// `msg` as an in-process gRPC request carrying the caller's token.
    pub fn grpc<T>(&self, msg: T) -> tonic::Request<T> {
        grpc_request(self.secret.as_deref(), msg)
    }

    /// The caller the token stands for, as the gRPC API authenticates it.
    pub async fn caller(&self, node: &ServerNode) -> Result<Caller, HttpError> {
        Ok(crate::grpc::auth::caller(node, &self.grpc(())).await?)
    }

    /// The body as JSON of type `T`.
    pub fn json_body<T: serde::de::DeserializeOwned>(&self) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| HttpError::bad_request(format!("request body: {e}")))
    }
}

/// A flag's value: given alone, or a value Go's `strconv.ParseBool` reads
/// (`1`, `t`, `true`, `0`, `f`, `false`, …), as Consul takes it (py-consul
/// sends `passing=1`, the npm client `stale=1`). Any other value is refused
/// rather than read one way or the other.
fn flag_value(name: &str, value: &str) -> Result<bool, HttpError> {
    match value {
        "" | "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        v => Err(HttpError::bad_request(format!(
            "query parameter {name}={v:?}: a flag, given alone or as {name}=true or {name}=false"
        ))),
    }
}

/// The token secret a request carries (Consul's header, or a bearer token).
fn secret_of(headers: &HeaderMap) -> Option<String> {
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
    (!secret.is_empty()).then(|| secret.to_string())
}

/// Reads `req` into a [`Call`]: the path decoded, the query parsed (a
/// repeated parameter refused), and for a PUT or POST from a known token the
/// body, up to [`MAX_BODY`], within [`BODY_TIMEOUT`] and the global budget.
async fn read_call(node: &ServerNode, req: Request<Incoming>) -> Result<Call, HttpError> {
    let (parts, body) = req.into_parts();
    let path = percent_encoding::percent_decode_str(parts.uri.path())
        .decode_utf8()
        .map_err(|_| HttpError::bad_request("the path is not UTF-8 once decoded"))?
        .into_owned();
    let query: Vec<(String, String)> =
        form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    once_each(&query)?;
    let (mut stale, mut consistent, mut index, mut wait, mut dc) = (false, false, None, None, None);
    let mut query = query;
    let mut refused = None;
    query.retain(|(k, v)| {
        let mut flag = |slot: &mut bool| match flag_value(k, v) {
            Ok(set) => *slot = set,
            Err(e) => refused = Some(e),
        };
        match k.as_str() {
            "stale" => flag(&mut stale),
            "consistent" => flag(&mut consistent),
            "index" => index = Some(v.clone()),
            "wait" => wait = Some(v.clone()),
            "dc" => dc = Some(v.clone()),
            _ => return true,
        }
        false
    });
    if let Some(e) = refused {
        return Err(e);
    }
    if stale && consistent {
        return Err(HttpError::bad_request(
            "stale and consistent: one or the other",
        ));
    }
    let remote_dc = dc.filter(|dc| *dc != node.datacenter);
    if let Some(dc) = &remote_dc {
        weft_api::names::validate_name(dc)
            .map_err(|e| HttpError::bad_request(format!("dc {dc:?}: {e}")))?;
    }
    let block = blocking(index.as_deref(), wait.as_deref())?;
    if block.is_some() && parts.method != Method::GET {
        return Err(HttpError::bad_request("index and wait are for reads (GET)"));
    }
    // A snapshot to restore may be as large as the gRPC call takes; only a
    // management token may send one (checked before it is read).
    let snapshot = path == "/v1/snapshot";
    let max_body = if snapshot {
        snapshot::MAX_SNAPSHOT_BODY
    } else {
        MAX_BODY
    };
    let too_large = || {
        HttpError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {max_body} bytes"),
        )
    };
    // Refused from the header when it says so, before the client sends it.
    let declared = parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body as u64) {
        return Err(too_large());
    }
    let secret = secret_of(&parts.headers);
    // Only writes that take a body read one, and only for a token this
    // cluster knows: nobody without one makes the server buffer anything.
    // Bootstrap has no token yet, and no body.
    let takes_body =
        matches!(parts.method, Method::PUT | Method::POST) && path != "/v1/acl/bootstrap";
    let (body, budget) = if takes_body {
        let caller = crate::grpc::auth::caller(node, &grpc_request(secret.as_deref(), ())).await?;
        if snapshot {
            caller.require_management()?;
        }
        // What the client says it sends (a request with neither length nor
        // chunks has no body: hyper knows it as exactly 0).
        let exact = hyper::body::Body::size_hint(&body).exact();
        let wanted = declared.or(exact).map_or(max_body, |n| n as usize);
        // A restore has a budget of its own (one at a time), so that other
        // writers' bodies cannot starve an operator's restore.
        let budget = if snapshot {
            (SNAPSHOT_BUDGET.clone().try_acquire_owned().ok()).map(|permit| BodyPermit {
                _permit: permit,
                _share: None,
            })
        } else {
            body_permit(&caller.accessor, wanted)
        };
        let budget = budget.ok_or_else(|| {
            HttpError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many request bodies in flight: retry shortly",
            )
        })?;
        let read = tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, max_body).collect());
        match read.await {
            Ok(Ok(b)) => (b.to_bytes(), Some(budget)),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
            Ok(Err(e)) => return Err(HttpError::bad_request(format!("reading the body: {e}"))),
            Err(_) => {
                return Err(HttpError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the body did not arrive within {BODY_TIMEOUT:?}"),
                ))
            }
        }
    } else {
        (Bytes::new(), None)
    };
    Ok(Call {
        secret,
        method: parts.method,
        path,
        query,
        headers: parts.headers,
        body,
        _budget: budget,
        stale,
        block,
        remote_dc,
        read_index: Default::default(),
    })
}

/// The longest a blocking query waits (Consul's limit), and its default.
const MAX_WAIT: Duration = Duration::from_secs(600);
const DEFAULT_WAIT: Duration = Duration::from_secs(300);

/// A blocking query's index and wait, from `?index=` and `?wait=` (`10s`,
/// `5m`; at most ten minutes). `index=0` or none: no wait, as in Consul.
fn blocking(index: Option<&str>, wait: Option<&str>) -> Result<Option<(u64, Duration)>, HttpError> {
    // As Consul: no wait (or 0) is the default, a longer one is capped.
    let wait = wait
        .filter(|w| !w.is_empty())
        .map(|w| {
            weft_api::duration::parse_duration(w)
                .map_err(|e| HttpError::bad_request(format!("query parameter wait: {e}")))
        })
        .transpose()?
        .filter(|w| !w.is_zero())
        .map(|w| w.min(MAX_WAIT));
    let index = index
        .filter(|i| !i.is_empty())
        .map(|i| {
            i.parse::<u64>().map_err(|_| {
                HttpError::bad_request(format!("query parameter index: {i:?} is not a number"))
            })
        })
        .transpose()?;
    Ok(match index {
        Some(i) if i > 0 => Some((i, wait.unwrap_or(DEFAULT_WAIT))),
        _ => None,
    })
}

/// How long a request body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Request bodies held at once, all connections together, in KiB (64 MiB):
/// a write over it is refused with 503 until others are done.
static BODY_BUDGET: std::sync::LazyLock<Arc<tokio::sync::Semaphore>> =
    std::sync::LazyLock::new(|| Arc::new(tokio::sync::Semaphore::new(BODY_BUDGET_KIB as usize)));
const BODY_BUDGET_KIB: u32 = 64 * 1024;

/// What one token's bodies may hold of [`BODY_BUDGET`] at once: an eighth,
/// so that no one token (one that may write nothing at all included:
/// rights are judged once the body is in) can hold every writer off by
/// declaring large bodies and sending none.
const PER_TOKEN_KIB: u32 = BODY_BUDGET_KIB / 8;

/// Bodies of at most this many bytes (a session renewal, a check update,
/// most KV writes) come out of [`SMALL_BODIES`] instead, which large ones
/// cannot exhaust.
const SMALL_BODY_BYTES: usize = 4 * 1024;

/// Small bodies held at once, in KiB (1 MiB), of which one token holds at
/// most an eighth too.
static SMALL_BODIES: std::sync::LazyLock<Arc<tokio::sync::Semaphore>> =
    std::sync::LazyLock::new(|| Arc::new(tokio::sync::Semaphore::new(SMALL_BODIES_KIB as usize)));
const SMALL_BODIES_KIB: u32 = 1024;

/// KiB of [`BODY_BUDGET`] and of [`SMALL_BODIES`] each token holds now, by
/// accessor, against its share of each.
static HELD_BY_TOKEN: std::sync::LazyLock<Arc<ClientLimits<String>>> =
    std::sync::LazyLock::new(|| ClientLimits::new(PER_TOKEN_KIB as usize));
static SMALL_HELD_BY_TOKEN: std::sync::LazyLock<Arc<ClientLimits<String>>> =
    std::sync::LazyLock::new(|| ClientLimits::new(SMALL_BODIES_KIB as usize / 8));

/// A body's place in the budgets, given back on drop.
pub(crate) struct BodyPermit {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _share: Option<Slot<String>>,
}

/// A place for a body of `bytes` from `accessor`: from the small bodies'
/// budget or the shared one, within the token's share of it. None when
/// there is no room now.
fn body_permit(accessor: &str, bytes: usize) -> Option<BodyPermit> {
    let (pool, held) = match bytes <= SMALL_BODY_BYTES {
        true => (&SMALL_BODIES, &SMALL_HELD_BY_TOKEN),
        false => (&BODY_BUDGET, &HELD_BY_TOKEN),
    };
    let kib = kib(bytes);
    let share = held.admit_weighing(accessor.to_string(), kib as usize)?;
    let permit = (*pool).clone().try_acquire_many_owned(kib).ok()?;
    Some(BodyPermit {
        _permit: permit,
        _share: Some(share),
    })
}

/// Snapshot bodies held at once: one.
static SNAPSHOT_BUDGET: std::sync::LazyLock<Arc<tokio::sync::Semaphore>> =
    std::sync::LazyLock::new(|| Arc::new(tokio::sync::Semaphore::new(1)));

fn kib(bytes: usize) -> u32 {
    (bytes / 1024 + 1) as u32
}

/// `msg` as an in-process gRPC request carrying `secret`, if any.
fn grpc_request<T>(secret: Option<&str>, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(secret) = secret {
        if let Ok(value) = format!("Bearer {secret}").parse() {
            req.metadata_mut().insert(TOKEN_METADATA, value);
        }
    }
    req
}

async fn handle(node: &Arc<ServerNode>, req: Request<Incoming>) -> Reply {
    respond(node, read_call(node, req).await).await
}

/// Answers a request another datacenter's server forwarded here (`?dc=`
/// naming this datacenter), as if its client had sent it here: the same
/// handlers, the client's token. The snapshot, bootstrap, UI and metrics
/// are this datacenter's own and are not answered so.
pub async fn answer_forwarded(
    node: &Arc<ServerNode>,
    req: weft_api::proto::ForwardRequest,
) -> weft_api::proto::ForwardReply {
    let reply = respond(node, forwarded_call(req)).await;
    let (parts, body) = reply.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    weft_api::proto::ForwardReply {
        status: u32::from(parts.status.as_u16()),
        headers: (parts.headers.iter())
            .filter_map(|(name, value)| {
                Some(weft_api::proto::ForwardParam {
                    name: name.as_str().to_string(),
                    value: value.to_str().ok()?.to_string(),
                })
            })
            .collect(),
        body: body.to_vec(),
    }
}

/// The most query parameters a request may have: no endpoint takes more
/// than a handful.
const MAX_QUERY_PARAMETERS: usize = 32;

/// Refuses a query with more than [`MAX_QUERY_PARAMETERS`] parameters or
/// one given twice (checked before any token is looked at: in time linear
/// in the query).
fn once_each(query: &[(String, String)]) -> Result<(), HttpError> {
    if query.len() > MAX_QUERY_PARAMETERS {
        return Err(HttpError::bad_request(format!(
            "{} query parameters: at most {MAX_QUERY_PARAMETERS}",
            query.len()
        )));
    }
    let mut seen = std::collections::HashSet::with_capacity(query.len());
    for (k, _) in query {
        if !seen.insert(k.as_str()) {
            return Err(HttpError::bad_request(format!(
                "query parameter {k:?} is given more than once"
            )));
        }
    }
    Ok(())
}

/// The [`Call`] of a forwarded request, checked as [`read_call`] checks a
/// client's.
fn forwarded_call(req: weft_api::proto::ForwardRequest) -> Result<Call, HttpError> {
    if !forwardable(&req.path) {
        return Err(HttpError::bad_request(format!(
            "{} is not answered for another datacenter",
            req.path
        )));
    }
    let method = Method::from_bytes(req.method.as_bytes())
        .map_err(|_| HttpError::bad_request(format!("method {:?}", req.method)))?;
    if req.body.len() > MAX_BODY {
        return Err(HttpError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {MAX_BODY} bytes"),
        ));
    }
    let query: Vec<(String, String)> = req.query.into_iter().map(|p| (p.name, p.value)).collect();
    once_each(&query)?;
    for (k, _) in &query {
        // Read options come in their own fields.
        if matches!(k.as_str(), "dc" | "stale" | "consistent" | "index" | "wait") {
            return Err(HttpError::bad_request(format!(
                "query parameter {k:?} is not forwarded as such"
            )));
        }
    }
    let block = (req.index > 0).then(|| {
        let wait = Duration::from_millis(req.wait_ms);
        (
            req.index,
            if wait.is_zero() {
                DEFAULT_WAIT
            } else {
                wait.min(MAX_WAIT)
            },
        )
    });
    if block.is_some() && method != Method::GET {
        return Err(HttpError::bad_request("index and wait are for reads (GET)"));
    }
    Ok(Call {
        secret: (!req.token.is_empty()).then_some(req.token),
        method,
        path: req.path,
        query,
        headers: HeaderMap::new(),
        body: Bytes::from(req.body),
        _budget: None,
        stale: req.stale,
        block,
        remote_dc: None,
        read_index: Default::default(),
    })
}

/// Whether a request for `path` may be forwarded to another datacenter:
/// the HTTP API, except what is a datacenter's own (its snapshot, its ACL
/// bootstrap).
pub fn forwardable(path: &str) -> bool {
    path.starts_with("/v1/") && path != "/v1/snapshot" && path != "/v1/acl/bootstrap"
}

/// The reply to `call` (or to why it could not be read), with the headers
/// every answer carries.
async fn respond(node: &Arc<ServerNode>, call: Result<Call, HttpError>) -> Reply {
    let (answer, index, token_valid) = match call {
        Ok(call) => {
            let answer = route(node, &call).await;
            let read = call.method == Method::GET;
            // Looked up for reads only (the index and contact headers below).
            let token_valid = read
                && call.secret.as_deref().is_some_and(|secret| {
                    let state = node.shared.state.read().expect("state lock");
                    state.acl.token_by_secret(secret).is_some()
                });
            // The index tells how fast the cluster writes: to known tokens
            // only.
            let index = token_valid.then(|| call.index());
            (answer, index, token_valid)
        }
        Err(e) => (Err(e), None, false),
    };
    let mut reply = answer.unwrap_or_else(|e| json(e.status, &e.message));
    // Every read's answer to a known token, a 404 too, carries the index a
    // blocking query waits on (as Consul's do).
    if let Some(index) = index.filter(|i| *i > 0) {
        reply
            .headers_mut()
            .entry("x-consul-index")
            .or_insert(hyper::header::HeaderValue::from(index));
    }
    // And how current what this server holds is (Consul's clients check a
    // `?stale` read's last contact against their `max_stale`): a known
    // leader while in contact, and how long since the last confirmation.
    // Only to a caller whose token the servers know: the cluster's state
    // is not told to whoever asks. Another datacenter's answer keeps its
    // own.
    if token_valid {
        let (in_contact, staleness) = node.contact.currency();
        let known = match in_contact {
            true => "true",
            false => "false",
        };
        let headers = reply.headers_mut();
        headers
            .entry("x-consul-knownleader")
            .or_insert(hyper::header::HeaderValue::from_static(known));
        headers
            .entry("x-consul-lastcontact")
            .or_insert(hyper::header::HeaderValue::from(
                staleness.as_millis() as u64
            ));
    }
    let headers = reply.headers_mut();
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
    ] {
        headers.insert(name, hyper::header::HeaderValue::from_static(value));
    }
    headers
        .entry(hyper::header::CACHE_CONTROL)
        .or_insert(hyper::header::HeaderValue::from_static("no-store"));
    reply
}

/// Which handler a path goes to.
async fn route(node: &Arc<ServerNode>, call: &Call) -> Answer {
    let path = call.path.as_str();
    // Another datacenter's: its servers block and answer (but for what this
    // datacenter's copy of its catalog answers).
    if let Some(dc) = call.remote_dc.as_ref().filter(|_| !remote::answers(path)) {
        return remote::forward(node, call, dc).await;
    }
    if call.block.is_some() {
        // Only a known token may hold a request open.
        call.caller(node).await?;
        call.block(node).await;
    }
    let index = node.shared.state.read().expect("state lock").index;
    call.read_index
        .store(index, std::sync::atomic::Ordering::Release);
    if let Some(dc) = &call.remote_dc {
        return remote::route(node, call, path, dc).await;
    }
    if path == "/" || path == "/ui" || path.starts_with("/ui/") {
        return ui::asset(call);
    }
    if path == "/metrics" {
        return status::metrics(node, call);
    }
    if let Some(rest) = path.strip_prefix("/v1/status/") {
        return status::status(node, call, rest).await;
    }
    if let Some(rest) = path.strip_prefix("/v1/acl/") {
        return acl::acl(node, call, rest).await;
    }
    if let Some(rest) = path.strip_prefix("/v1/kv/") {
        return kv::kv(node, call, rest).await;
    }
    if path == "/v1/snapshot" {
        return snapshot::snapshot(node, call).await;
    }
    if let Some(rest) = path.strip_prefix("/v1/session/") {
        return session::route(node, call, rest).await;
    }
    if path == "/v1/connect/ca/roots" {
        return ca::roots(node, call).await;
    }
    if let Some(rest) = path.strip_prefix("/v1/connect/intentions") {
        return intentions::intentions(node, call, rest).await;
    }
    if path == "/v1/config" || path.starts_with("/v1/config/") {
        return config::config(node, call, &path["/v1/config".len()..]).await;
    }
    if let Some(rest) = path.strip_prefix("/v1/internal/ui/") {
        return views::route(node, call, rest).await;
    }
    if path == "/v1/catalog/register" || path == "/v1/catalog/deregister" {
        return catalog_write::route(node, call, path).await;
    }
    if path.starts_with("/v1/catalog/") || path.starts_with("/v1/health/") {
        return catalog::route(node, call, path).await;
    }
    Err(HttpError::not_found())
}

/// A JSON answer.
pub fn json(status: StatusCode, body: &impl Serialize) -> Reply {
    let body = serde_json::to_vec(body).expect("JSON of plain data");
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a static response")
}

/// A JSON answer with Consul's `X-Consul-Index` (the state's index).
pub fn json_at(index: u64, body: &impl Serialize) -> Reply {
    let mut reply = json(StatusCode::OK, body);
    reply.headers_mut().insert(
        "x-consul-index",
        hyper::header::HeaderValue::from(index.max(1)),
    );
    reply
}

/// Requires `method` (405 otherwise).
pub fn only(call: &Call, method: Method) -> Result<(), HttpError> {
    if call.method == method {
        Ok(())
    } else {
        Err(HttpError::method_not_allowed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(keys: impl Iterator<Item = String>) -> Vec<(String, String)> {
        keys.map(|k| (k, String::new())).collect()
    }

    #[test]
    fn a_query_has_few_parameters_each_once() {
        let fine = query((0..MAX_QUERY_PARAMETERS).map(|i| format!("k{i}")));
        assert!(once_each(&fine).is_ok());
        let twice = query(["index", "wait", "index"].map(String::from).into_iter());
        let e = once_each(&twice).unwrap_err();
        assert!(
            e.to_string().contains("\"index\" is given more than once"),
            "{e}"
        );
        // What a 64 KiB request target holds: about 18,000 distinct keys,
        // which a pairwise check compared 10^8 times before any token was
        // looked at. Refused by their count.
        let flood = query((0..18_000).map(|i| format!("{i:x}")));
        let e = once_each(&flood).unwrap_err();
        assert!(e.to_string().contains("18000 query parameters"), "{e}");
    }

    /// One token declaring large bodies and sending none holds at most its
    /// share: another token still gets room, and small bodies (a session
    /// renewal) come out of their own budget whatever large ones hold.
    #[test]
    fn no_one_token_holds_the_body_budget() {
        let large = 2047 * 1024;
        let mut held = Vec::new();
        while let Some(p) = body_permit("stalling", large) {
            held.push(p);
        }
        assert_eq!(held.len() as u32, PER_TOKEN_KIB / kib(large));
        let other = body_permit("writer", large);
        assert!(other.is_some(), "another token found no room");
        // Small bodies: a budget of their own, of which one token holds an
        // eighth too; a body of exactly 4 KiB is a small one.
        let mut small = Vec::new();
        while let Some(p) = body_permit("stalling", SMALL_BODY_BYTES) {
            small.push(p);
        }
        assert_eq!(
            small.len() as u32,
            SMALL_BODIES_KIB / 8 / kib(SMALL_BODY_BYTES)
        );
        assert!(
            body_permit("renewer", 0).is_some(),
            "a renewal found no room"
        );
        drop(held);
        assert!(
            body_permit("stalling", large).is_some(),
            "the share came back"
        );
    }
}
