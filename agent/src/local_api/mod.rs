//! The agent's local HTTP API (`http_addr`, default `127.0.0.1:8500`, Consul's
//! agent port), in Consul's shape, for the workloads on this node and the
//! Consul client libraries they use:
//!
//! - `PUT /v1/agent/check/pass/:check_id?note=TEXT`, `…/warn/…`, `…/fail/…`:
//!   sets TTL check `check_id` passing, warning or critical with the note as
//!   its output, and restarts its TTL;
//! - `PUT /v1/agent/check/update/:check_id` with `{"Status": "passing|warning|critical",
//!   "Output": "…"}`: the same with the status in the body.
//!
//! Check ids are the `[[service.check]]` ids (`id`, or Consul's default
//! `service:<service id>`, `service:<service id>:<n>` with several checks).
//! Only TTL checks take updates. The caller needs a token (`X-Consul-Token`,
//! `Authorization: Bearer`, or `?token=`) with `service:write` on the check's
//! service, which the servers judge ([`authz`]). Answers: 200 (empty body),
//! 400 (bad request, or not a TTL check), 403 (no token, unknown token, no
//! right), 404 (unknown endpoint or check), 405, 413 (body over
//! [`MAX_BODY_BYTES`]), 503 (servers unreachable: nothing changed). Errors
//! are one line of text; tokens never appear in answers or logs.
//!
//! The other endpoints:
//!
//! - `PUT /v1/agent/service/register`, `PUT /v1/agent/service/deregister/:id`:
//!   services of this node (`service:write` on the service).
//! - `PUT /v1/agent/check/register`, `PUT /v1/agent/check/deregister/:id`:
//!   checks of services registered here ([`check_register`]).
//! - `GET /v1/agent/connect/ca/leaf/:service`: a leaf certificate, signed
//!   with the caller's token ([`leaf`]).
//! - `GET /v1/agent/self` (`node:read` on this node), `/v1/agent/services`,
//!   `/v1/agent/service/:id`, `/v1/agent/checks` (only what the token has
//!   `service:read` on), `/v1/agent/members` (the servers' catalog nodes,
//!   read with the caller's token): Consul's JSON ([`agent_views`]).
//! - Any other `/v1/agent/...`: 404, not supported by weft yet.
//! - A request from a web page (`Origin`, `Sec-Fetch-Site`) or to a host
//!   name other than `localhost` (DNS rebinding): 403 before anything else
//!   ([`browser`]).
//! - Every other `/v1/...` request is forwarded to the servers' HTTPS API
//!   with the caller's own token, never the agent's ([`forward`]): catalog,
//!   health, kv, session, connect, config, acl, status. Its answer streams
//!   back; 503 when no server can be reached, 413 for a body over
//!   [`forward::MAX_FORWARD_BODY_BYTES`]. Anything else: 404.
//!
//! [`route`] decodes requests (pure); [`handle`] answers one; [`LocalApi`]
//! serves HTTP/1.1 on hyper and stops gracefully like the admin server. New
//! endpoints are a [`route::Route`] variant and an arm in [`handle`].

pub mod agent_views;
pub mod authz;
pub mod blocking;
pub mod browser;
pub mod check_register;
pub mod forward;
pub mod leaf;
pub mod route;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, request::Parts, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use weft_api::catalog::HealthStatus;

use crate::config::AgentConfig;
use crate::health::{HealthChecks, HealthError};
use crate::registered::RegisteredService;
use authz::{AllowCache, Judge, JudgeError, Right};
use forward::{ForwardError, Forwarder, MAX_FORWARD_BODY_BYTES};
use route::{CheckOp, Route, RouteError};

/// The body of every answer: a local one, or a server's streamed through.
pub type ApiBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Largest request body read.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest request target (path and query) taken.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Most connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client gets to send its headers, and then its body.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections get to finish once shutdown starts.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Local API server errors.
#[derive(Debug, thiserror::Error)]
pub enum LocalApiError {
    /// The listening socket could not be bound (field `http_addr`).
    #[error("http_addr {addr}: cannot listen: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The bound socket's address could not be read.
    #[error("local API listener: {0}")]
    LocalAddr(#[source] std::io::Error),
}

/// A future the [`Registrar`] returns.
pub type RegistrarFuture<'a> = std::pin::Pin<
    Box<dyn Future<Output = Result<String, crate::running::RegistrationError>> + Send + 'a>,
>;

/// Who adds and removes local services (the running agent).
pub trait Registrar: Send + Sync {
    /// Registers `service`, replacing the registration of its id if it is
    /// of service `replacing` (the name the caller was allowed to write);
    /// [`Changed`](crate::running::RegistrationError::Changed) when the id's
    /// registration is not (or no longer) what the caller was allowed.
    fn register(
        &self,
        service: RegisteredService,
        replacing: Option<String>,
    ) -> RegistrarFuture<'_>;
    /// Deregisters `id` if it is still an instance of `name`.
    fn deregister(&self, id: String, name: String) -> RegistrarFuture<'_>;
    /// Why `id` is not registered through this API: defined in the file, or
    /// unknown. Changes nothing.
    fn not_registered(&self, id: &str) -> crate::running::RegistrationError;
    /// The service name of an instance registered through this API.
    fn registered_name(&self, id: &str) -> Option<String>;
    /// The registration of an instance registered through this API.
    fn registration(&self, id: &str) -> Option<RegisteredService>;
    /// The checks added through this API to service `service_id` of the
    /// configuration file.
    fn api_checks(&self, service_id: &str) -> Vec<crate::registered::RegisteredCheck>;
    /// Adds (or replaces, by id) a check of a service of the file.
    fn register_check(
        &self,
        service_id: String,
        check: crate::registered::RegisteredCheck,
    ) -> RegistrarFuture<'_>;
    /// Removes a check added through this API to a service of the file.
    fn deregister_check(&self, check_id: String) -> RegistrarFuture<'_>;
}

impl Registrar for crate::running::Running {
    fn register(
        &self,
        service: RegisteredService,
        replacing: Option<String>,
    ) -> RegistrarFuture<'_> {
        Box::pin(crate::running::Running::register(self, service, replacing))
    }
    fn deregister(&self, id: String, name: String) -> RegistrarFuture<'_> {
        Box::pin(async move { crate::running::Running::deregister(self, &id, &name).await })
    }
    fn not_registered(&self, id: &str) -> crate::running::RegistrationError {
        crate::running::Running::not_registered(self, id)
    }
    fn registered_name(&self, id: &str) -> Option<String> {
        crate::running::Running::registered_name(self, id)
    }
    fn registration(&self, id: &str) -> Option<RegisteredService> {
        crate::running::Running::registration(self, id)
    }
    fn api_checks(&self, service_id: &str) -> Vec<crate::registered::RegisteredCheck> {
        crate::running::Running::api_checks(self, service_id)
    }
    fn register_check(
        &self,
        service_id: String,
        check: crate::registered::RegisteredCheck,
    ) -> RegistrarFuture<'_> {
        Box::pin(
            async move { crate::running::Running::register_check(self, &service_id, check).await },
        )
    }
    fn deregister_check(&self, check_id: String) -> RegistrarFuture<'_> {
        Box::pin(async move { crate::running::Running::deregister_check(self, &check_id).await })
    }
}

/// What the API acts on: the local checks, who judges tokens, and who
/// registers services.
#[derive(Clone)]
pub struct LocalApiState {
    checks: HealthChecks,
    judge: Arc<dyn Judge>,
    allowed: Arc<Mutex<AllowCache>>,
    registrar: Option<Arc<dyn Registrar>>,
    /// The running configuration (services change on reload and
    /// registration): what the agent read endpoints show.
    config: Option<Arc<RwLock<Arc<AgentConfig>>>>,
    forwarder: Option<Arc<Forwarder>>,
    signer: Option<Arc<dyn leaf::LeafSigner>>,
    /// One check registration or deregistration at a time (each rewrites
    /// its service's registration).
    check_edits: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for LocalApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalApiState")
            .field("checks", &self.checks.service_ids())
            .finish_non_exhaustive()
    }
}

impl LocalApiState {
    pub fn new(checks: HealthChecks, judge: Arc<dyn Judge>) -> LocalApiState {
        LocalApiState {
            checks,
            judge,
            allowed: Arc::default(),
            registrar: None,
            config: None,
            forwarder: None,
            signer: None,
            check_edits: Arc::default(),
        }
    }

    /// Serves leaf certificates, signed through `signer`.
    pub fn with_signer(mut self, signer: Arc<dyn leaf::LeafSigner>) -> LocalApiState {
        self.signer = Some(signer);
        self
    }

    /// Serves the agent read endpoints from `config`.
    pub fn with_config(mut self, config: Arc<RwLock<Arc<AgentConfig>>>) -> LocalApiState {
        self.config = Some(config);
        self
    }

    /// Forwards other `/v1/` requests through `forwarder`.
    pub fn with_forwarder(mut self, forwarder: Arc<Forwarder>) -> LocalApiState {
        self.forwarder = Some(forwarder);
        self
    }

    fn current_config(&self) -> Option<Arc<AgentConfig>> {
        self.config
            .as_ref()
            .map(|c| c.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Serves service registration too, through `registrar`.
    pub fn with_registrar(mut self, registrar: Arc<dyn Registrar>) -> LocalApiState {
        self.registrar = Some(registrar);
        self
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, AllowCache> {
        self.allowed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `token` has each of `rights`: remembered "yes"es, and the
    /// judge's answers for the rest (in one call).
    async fn rights(&self, token: &str, rights: &[Right]) -> Result<Vec<bool>, JudgeError> {
        let now = Instant::now();
        let mut answers: Vec<bool> = {
            let cache = self.cache();
            rights
                .iter()
                .map(|r| cache.allowed(now, token, r))
                .collect()
        };
        let ask: Vec<Right> = rights
            .iter()
            .zip(&answers)
            .filter(|(_, known)| !**known)
            .map(|(r, _)| r.clone())
            .collect();
        if ask.is_empty() {
            return Ok(answers);
        }
        let mut got = Vec::with_capacity(ask.len());
        for batch in ask.chunks(authz::MAX_RIGHTS_PER_CALL) {
            let answers = self.judge.authorize(token, batch).await?;
            if answers.len() != batch.len() {
                return Err(JudgeError::Failed(format!(
                    "{} answers to {} questions",
                    answers.len(),
                    batch.len()
                )));
            }
            got.extend(answers);
        }
        let mut got = got.into_iter();
        let mut cache = self.cache();
        for (right, answer) in rights.iter().zip(answers.iter_mut()) {
            if !*answer {
                *answer = got.next().unwrap_or(false);
                if *answer {
                    cache.remember(Instant::now(), token, right);
                }
            }
        }
        Ok(answers)
    }

    /// Whether `token` may write `service`: a remembered "yes", or the judge's.
    async fn may_write(&self, token: &str, service: &str) -> Result<bool, JudgeError> {
        let answers = self.rights(token, &[Right::service_write(service)]).await?;
        Ok(answers == [true])
    }
}

/// A one-line text answer.
fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut body = body.into();
    if !body.is_empty() && !body.ends_with('\n') {
        body.push('\n');
    }
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn route_error(e: RouteError) -> Response<Full<Bytes>> {
    match &e {
        RouteError::NotFound(_) | RouteError::NotSupported(_) => {
            text(StatusCode::NOT_FOUND, e.to_string())
        }
        RouteError::BadRequest(_) => text(StatusCode::BAD_REQUEST, e.to_string()),
        RouteError::MethodNotAllowed { allow, .. } => {
            let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, e.to_string());
            resp.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static(allow));
            resp
        }
    }
}

fn boxed(resp: Response<Full<Bytes>>) -> Response<ApiBody> {
    resp.map(|b| b.map_err(|never| match never {}).boxed())
}

/// The answer to one request.
pub async fn handle<B>(state: &LocalApiState, req: Request<B>) -> Response<ApiBody>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = req.into_parts();
    if let Some(why) = browser::refusal(&parts.headers) {
        return boxed(text(StatusCode::FORBIDDEN, why));
    }
    let target_len = parts.uri.path_and_query().map_or(0, |p| p.as_str().len());
    if target_len > MAX_URI_BYTES {
        return boxed(text(
            StatusCode::URI_TOO_LONG,
            format!("request target over {MAX_URI_BYTES} bytes"),
        ));
    }
    let route = route::route(&parts.method, parts.uri.path());
    if let Ok(Route::Forward) = route {
        return forward(state, &parts, body).await.unwrap_or_else(boxed);
    }
    boxed(handle_local(state, &parts, body, route).await)
}

/// The answer to a request the agent serves itself.
async fn handle_local<B>(
    state: &LocalApiState,
    parts: &Parts,
    body: B,
    route: Result<Route, RouteError>,
) -> Response<Full<Bytes>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let done = |r: Result<Response<Full<Bytes>>, Response<Full<Bytes>>>| r.unwrap_or_else(|e| e);
    match route {
        Ok(Route::Forward) => text(StatusCode::INTERNAL_SERVER_ERROR, "not a local route"),
        Ok(Route::AgentSelf) => done(agent_read::agent_self(state, parts).await),
        Ok(Route::AgentServices) => done(agent_read::agent_services(state, parts).await),
        Ok(Route::AgentService { service_id }) => {
            done(agent_read::agent_service(state, parts, &service_id).await)
        }
        Ok(Route::AgentChecks) => done(agent_read::agent_checks(state, parts).await),
        Ok(Route::AgentMembers) => done(agent_read::agent_members(state, parts).await),
        Err(e) => route_error(e),
        Ok(Route::CheckUpdate { check_id, op }) => check_update(state, parts, body, check_id, op)
            .await
            .unwrap_or_else(|resp| resp),
        Ok(Route::ServiceRegister) => service_register(state, parts, body)
            .await
            .unwrap_or_else(|resp| resp),
        Ok(Route::ServiceDeregister { service_id }) => service_deregister(state, parts, service_id)
            .await
            .unwrap_or_else(|resp| resp),
        Ok(Route::CheckRegister) => done(check_register::register(state, parts, body).await),
        Ok(Route::CheckDeregister { check_id }) => {
            done(check_register::deregister(state, parts, check_id).await)
        }
        Ok(Route::ConnectLeaf { service }) => done(leaf::leaf(state, parts, &service).await),
    }
}

/// The caller's token, or the 403 for its absence.
// The refusal is the answer itself, built once per refused request.
#[allow(clippy::result_large_err)]
fn token_of(parts: &Parts, what: &str) -> Result<String, Response<Full<Bytes>>> {
    match route::token(&parts.headers, parts.uri.query()) {
        Ok(Some(token)) => Ok(token),
        Ok(None) => Err(text(
            StatusCode::FORBIDDEN,
            format!("Permission denied: no ACL token for {what} (send X-Consul-Token, Authorization: Bearer, or ?token=)"),
        )),
        Err(_) => Err(text(StatusCode::FORBIDDEN, "ACL not found")),
    }
}

/// Passes when `token` may write `service`; the answer otherwise.
async fn require_write(
    state: &LocalApiState,
    token: &str,
    service: &str,
    what: &str,
) -> Result<(), Response<Full<Bytes>>> {
    let refused = |status: StatusCode, why: String| {
        tracing::info!(%service, status = status.as_u16(), "{what} refused: {why}");
        text(status, why)
    };
    match state.may_write(token, service).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(refused(
            StatusCode::FORBIDDEN,
            format!("Permission denied: the token lacks service:write on {service:?}"),
        )),
        Err(e @ JudgeError::UnknownToken) => Err(refused(StatusCode::FORBIDDEN, e.to_string())),
        Err(e @ JudgeError::Unreachable(_)) => Err(refused(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{e}; nothing changed"),
        )),
        Err(e @ JudgeError::Failed(_)) => Err(refused(
            StatusCode::BAD_GATEWAY,
            format!("{e}; nothing changed"),
        )),
    }
}

#[allow(clippy::result_large_err)]
fn registrar(state: &LocalApiState) -> Result<&Arc<dyn Registrar>, Response<Full<Bytes>>> {
    state.registrar.as_ref().ok_or_else(|| {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "service registration is not served by this agent",
        )
    })
}

fn registration_error(e: crate::running::RegistrationError) -> Response<Full<Bytes>> {
    use crate::running::RegistrationError as E;
    let status = match &e {
        E::Invalid(_) | E::InFile(_) => StatusCode::BAD_REQUEST,
        E::NotFound(_) | E::CheckNotFound(_) => StatusCode::NOT_FOUND,
        E::Changed(_) => StatusCode::CONFLICT,
        E::Failed(_) => StatusCode::BAD_GATEWAY,
    };
    text(status, e.to_string())
}

/// `PUT /v1/agent/service/register`: the caller needs `service:write` on
/// the service; the agent's own token must allow it too (it registers it).
async fn service_register<B>(
    state: &LocalApiState,
    parts: &Parts,
    body: B,
) -> Result<Response<Full<Bytes>>, Response<Full<Bytes>>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let registrar = registrar(state)?;
    let token = token_of(parts, "registering a service")?;
    let body = read_body(parts, body).await?;
    let service = RegisteredService::from_json(&body).map_err(|e| {
        text(
            StatusCode::BAD_REQUEST,
            format!("Request decode failed: {e}"),
        )
    })?;
    require_write(state, &token, &service.name, "service registration").await?;
    // The address is taken over for the node's workloads: not a port
    // another user's process listens on (crate::socket_owner). A request
    // that did not come on a connection (in-process) has nothing to check.
    let claim = parts
        .extensions
        .get::<ApiCaller>()
        .zip(service.socket_addr());
    if let Some((caller, target)) = claim {
        (crate::socket_owner::check_claim(caller.peer, caller.local, target).await).map_err(
            |e| {
                tracing::warn!(%target, "local API: registration refused: {e}");
                text(StatusCode::FORBIDDEN, format!("Address {target}: {e}"))
            },
        )?;
    }
    let id = service.id().to_string();
    // Replacing another service's instance of the same id takes the right
    // to write that one too (as Consul's agent asks).
    let replacing = registrar.registered_name(&id);
    if let Some(other) = replacing.as_ref().filter(|n| **n != service.name) {
        require_write(state, &token, other, "replacing a service registration").await?;
    }
    let done = registrar
        .register(service, replacing)
        .await
        .map_err(registration_error)?;
    tracing::info!(service = ?id, "registered through the local API: {done}");
    Ok(text(StatusCode::OK, ""))
}

/// `PUT /v1/agent/service/deregister/:id`: only services registered through
/// this API; `service:write` on the service.
async fn service_deregister(
    state: &LocalApiState,
    parts: &Parts,
    id: String,
) -> Result<Response<Full<Bytes>>, Response<Full<Bytes>>> {
    let registrar = registrar(state)?;
    let token = token_of(parts, "deregistering a service")?;
    let Some(name) = registrar.registered_name(&id) else {
        // Found in the file, or nowhere: nothing to change either way.
        return Err(registration_error(registrar.not_registered(&id)));
    };
    require_write(state, &token, &name, "service deregistration").await?;
    // Only the instance of the service the caller may write: one
    // re-registered meanwhile under another name stays.
    let done = registrar
        .deregister(id.clone(), name)
        .await
        .map_err(registration_error)?;
    tracing::info!(service = ?id, "deregistered through the local API: {done}");
    Ok(text(StatusCode::OK, ""))
}

/// The body, at most [`MAX_BODY_BYTES`] within [`READ_TIMEOUT`].
async fn read_body<B>(parts: &Parts, body: B) -> Result<Bytes, Response<Full<Bytes>>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    read_body_up_to(parts, body, MAX_BODY_BYTES).await
}

/// The body, at most `limit` bytes within [`READ_TIMEOUT`].
async fn read_body_up_to<B>(
    parts: &Parts,
    body: B,
    limit: usize,
) -> Result<Bytes, Response<Full<Bytes>>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body over {limit} bytes"),
        )
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let collect = Limited::new(body, limit).collect();
    match tokio::time::timeout(READ_TIMEOUT, collect).await {
        Err(_) => Err(text(StatusCode::REQUEST_TIMEOUT, "body not sent in time")),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(text(
            StatusCode::BAD_REQUEST,
            format!("reading the body: {e}"),
        )),
    }
}

async fn check_update<B>(
    state: &LocalApiState,
    parts: &Parts,
    body: B,
    check_id: String,
    op: CheckOp,
) -> Result<Response<Full<Bytes>>, Response<Full<Bytes>>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let query = parts.uri.query();
    let refused = |status: StatusCode, why: String| {
        tracing::info!(check = ?check_id, status = status.as_u16(), "check update refused: {why}");
        text(status, why)
    };
    let token = match route::token(&parts.headers, query) {
        Ok(Some(token)) => token,
        Ok(None) => {
            return Err(refused(
                StatusCode::FORBIDDEN,
                "Permission denied: no ACL token (send X-Consul-Token, Authorization: Bearer, or ?token=)"
                    .into(),
            ))
        }
        Err(_) => return Err(refused(StatusCode::FORBIDDEN, "ACL not found".into())),
    };
    let (status, output): (HealthStatus, String) = match op.status() {
        Some(status) => (
            status,
            route::query_param(query, "note")
                .map_err(route_error)?
                .unwrap_or_default(),
        ),
        None => route::update_body(&read_body(parts, body).await?).map_err(route_error)?,
    };
    let Some(check) = state.checks.check(&check_id) else {
        return Err(refused(
            StatusCode::NOT_FOUND,
            format!("Unknown check ID {check_id:?}"),
        ));
    };
    match state.may_write(&token, &check.service_name).await {
        Ok(true) => {}
        Ok(false) => {
            return Err(refused(
                StatusCode::FORBIDDEN,
                format!(
                    "Permission denied: the token lacks service:write on {:?} (check {check_id:?})",
                    check.service_name
                ),
            ))
        }
        Err(e @ JudgeError::UnknownToken) => {
            return Err(refused(StatusCode::FORBIDDEN, e.to_string()))
        }
        Err(e @ JudgeError::Unreachable(_)) => {
            return Err(refused(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{e}; check {check_id:?} unchanged"),
            ))
        }
        Err(e @ JudgeError::Failed(_)) => {
            return Err(refused(
                StatusCode::BAD_GATEWAY,
                format!("{e}; check {check_id:?} unchanged"),
            ))
        }
    }
    match state.checks.update_ttl(&check_id, status, output) {
        Ok(()) => {
            tracing::debug!(check = ?check_id, service = ?check.service_id, %status, "TTL check updated");
            Ok(text(StatusCode::OK, ""))
        }
        Err(e @ HealthError::NotTtl { .. }) => Err(refused(StatusCode::BAD_REQUEST, e.to_string())),
        Err(e @ HealthError::UnknownCheck(_)) => Err(refused(StatusCode::NOT_FOUND, e.to_string())),
        Err(e @ HealthError::Stopped(_)) => {
            Err(refused(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
        }
    }
}

/// Forwards a `/v1/` request to the servers ([`forward`]) and streams
/// their answer back.
async fn forward<B>(
    state: &LocalApiState,
    parts: &Parts,
    body: B,
) -> Result<Response<ApiBody>, Response<Full<Bytes>>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Some(forwarder) = &state.forwarder else {
        return Err(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "this agent does not forward to the servers",
        ));
    };
    let mut body = if forward::has_body(&parts.method) {
        read_body_up_to(parts, body, MAX_FORWARD_BODY_BYTES).await?
    } else {
        Bytes::new()
    };
    // As Consul's agent does: a session is this node's unless it names one.
    if parts.method == http::Method::PUT && parts.uri.path() == "/v1/session/create" {
        if let Some(config) = state.current_config() {
            body = forward::session_on_node(&body, &config.node_name)
                .map_err(|e| text(StatusCode::BAD_REQUEST, e))?;
        }
    }
    match forwarder.forward(parts, body).await {
        Ok(resp) => Ok(resp.map(|b| b.map_err(Into::into).boxed())),
        Err(e) => {
            let status = forward_status(&e);
            tracing::info!(path = %parts.uri.path(), status = status.as_u16(), "forwarding failed: {e}");
            Err(text(status, e.to_string()))
        }
    }
}

fn forward_status(e: &ForwardError) -> StatusCode {
    match e {
        ForwardError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ForwardError::Unreachable(_) => StatusCode::SERVICE_UNAVAILABLE,
        ForwardError::TimedOut { .. } => StatusCode::GATEWAY_TIMEOUT,
        ForwardError::TooManyBlocking(_) => StatusCode::TOO_MANY_REQUESTS,
        ForwardError::Failed { .. } | ForwardError::Setup(_) => StatusCode::BAD_GATEWAY,
    }
}

/// A bound local API server; [`LocalApi::serve`] runs it.
#[derive(Debug)]
pub struct LocalApi {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: LocalApiState,
}

impl LocalApi {
    /// Binds `addr` (port 0 picks a free port; see [`Self::local_addr`]).
    pub async fn bind(addr: SocketAddr, state: LocalApiState) -> Result<LocalApi, LocalApiError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| LocalApiError::Bind { addr, source })?;
        Self::from_listener(listener, state)
    }

    /// Serves an already bound listener (a predecessor's, after an upgrade).
    pub fn from_listener(
        listener: TcpListener,
        state: LocalApiState,
    ) -> Result<LocalApi, LocalApiError> {
        let local_addr = listener.local_addr().map_err(LocalApiError::LocalAddr)?;
        Ok(LocalApi {
            listener,
            local_addr,
            state,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, then stops accepting, lets open
    /// connections finish their request (at most [`DRAIN_TIMEOUT`]) and returns.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let idle = crate::idle_conns::IdleConns::default();
        let mut conns = JoinSet::new();
        let mut accept_errors = crate::accept::AcceptErrors::new("local API");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Full: the connection waiting longest for its
                        // client's next request makes room (kept-alive or
                        // held-open connections cannot lock the others out).
                        let Some(slot) = idle.take_slot(&slots).await else {
                            tracing::debug!(%peer, "local API: every connection busy; closing");
                            continue;
                        };
                        let (state, stop, place) = (self.state.clone(), stop_rx.clone(), idle.register());
                        conns.spawn(async move {
                            serve_conn(stream, peer, state, stop, place).await;
                            drop(slot);
                        });
                    }
                    Err(e) => accept_errors.failed(&e).await,
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(self.listener);
        let _ = stop_tx.send(true);
        let drain = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
            conns.abort_all();
        }
    }
}

/// The connection a request came on: its far end and the local API's
/// address (a request extension).
#[derive(Debug, Clone, Copy)]
pub struct ApiCaller {
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

async fn serve_conn(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    state: LocalApiState,
    mut stop: watch::Receiver<bool>,
    place: crate::idle_conns::IdleConn,
) {
    let caller = stream
        .local_addr()
        .ok()
        .map(|local| ApiCaller { peer, local });
    // Waiting for a request until one comes, and again after each answer.
    let place = Arc::new(place);
    place.set_waiting(true);
    let serving = place.clone();
    let service = service_fn(move |mut req: Request<hyper::body::Incoming>| {
        let (state, serving) = (state.clone(), serving.clone());
        if let Some(caller) = caller {
            req.extensions_mut().insert(caller);
        }
        serving.set_waiting(false);
        async move {
            let answer = handle(&state, req).await;
            serving.set_waiting(true);
            Ok::<_, Infallible>(answer)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .max_buf_size(MAX_URI_BYTES + 16 * 1024)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let stopping = async move {
        let _ = stop.wait_for(|s| *s).await.map(|_| ());
    };
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stopping => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        () = place.evicted() => {
            tracing::debug!(%peer, "local API: idle connection closed for a new one");
            conn.as_mut().graceful_shutdown();
            // Dropped when it does not close at once (an answer the
            // client does not read, a half-sent request).
            match tokio::time::timeout(crate::idle_conns::EVICTED_GRACE, conn).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "local API: connection ended with an error");
    }
}

mod agent_read;

#[cfg(test)]
mod forward_tests;
#[cfg(test)]
mod tests;
