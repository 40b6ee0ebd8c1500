//! The agent's admin HTTP server (default `127.0.0.1:15020`): `/healthz`
//! for liveness and readiness probes (503 until ready, and while the
//! serving thread's [`Pulse`](crate::pulse::Pulse) is stale: this server
//! runs on the background thread), `/metrics` for Prometheus, `/config` for a JSON dump of what
//! the agent is running with. Plain HTTP/1.1 on hyper 1.
//!
//! `/config` holds the whole view (every instance, intention and config
//! entry the node may read), so it is answered only to a loopback peer
//! with an ACL token that has `operator:read` (asked of the servers, as the
//! local API asks them), one at a time (the question and the dump), built
//! off the server's thread.
//! Bound to another address than loopback (e.g. `0.0.0.0:15020`, for
//! Prometheus to scrape every agent), the server still answers `/config`
//! to loopback peers only. At most [`MAX_ADMIN_CONNECTIONS`] connections
//! are open at once ([`LOOPBACK_RESERVE`] of them for loopback peers only),
//! each for at most [`ADMIN_CONNECTION_LIFETIME`]: a client that stops
//! reading holds neither memory nor a slot for long.
//!
//! [`respond`] decides the answer to a request from the [`AdminState`] alone (pure and
//! unit-tested); [`AdminServer`] accepts connections and stops gracefully when the
//! shutdown future given to [`AdminServer::serve`] completes.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::idle_conns::{IdleConn, IdleConns};
use crate::local_api::authz::{Judge, JudgeError, Right};
use crate::metrics::AgentMetrics;
use weft_api::exposition;

/// How long open admin connections get to finish once shutdown starts.
pub const ADMIN_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Most admin connections open at once; a connection past them is closed
/// as it is accepted.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// Of [`MAX_ADMIN_CONNECTIONS`], how many only loopback peers may take:
/// with `admin_addr` off loopback (for scrapers), other hosts holding every
/// slot would otherwise fail the node's own probes of `/healthz`.
pub const LOOPBACK_RESERVE: usize = 16;
/// How long one admin connection may stay open (a scraper's keep-alive
/// connection included: it opens another); past it the connection ends
/// after its current answer, or at once if that answer is not being read.
pub const ADMIN_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Admin server errors.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The listening socket could not be bound (field `admin_addr`).
    #[error("admin_addr {addr}: cannot listen: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The bound socket's address could not be read.
    #[error("admin listener: {0}")]
    LocalAddr(#[source] std::io::Error),
}

/// Produces the `/config` document on each request.
pub type ConfigDump = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What the admin server reports; the agent keeps the other ends.
#[derive(Clone)]
pub struct AdminState {
    /// `true` once the agent is ready to serve (then `/healthz` answers 200).
    pub ready: watch::Receiver<bool>,
    /// The serving thread's beats: stale, `/healthz` answers 503.
    pub serving: Arc<crate::pulse::Pulse>,
    /// Encoded on `/metrics`.
    pub metrics: Arc<AgentMetrics>,
    /// Called on `/config`.
    pub config: ConfigDump,
    /// Whether a `/config` caller's token has `operator:read`.
    pub judge: Arc<dyn Judge>,
    /// One `/config` dump at a time.
    pub dumping: Arc<Semaphore>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("ready", &*self.ready.borrow())
            .finish_non_exhaustive()
    }
}

fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_str(content_type)
            .unwrap_or(header::HeaderValue::from_static("text/plain")),
    );
    resp
}

const PLAIN: &str = "text/plain; charset=utf-8";

/// What [`respond`] decided.
#[derive(Debug)]
pub enum Answer {
    /// This response.
    Now(Response<Full<Bytes>>),
    /// A `GET /config`: the caller's rights decide ([`config_dump`]).
    ConfigDump,
}

/// The response to `method path` (the query string already removed);
/// `accept` (the request's Accept header) picks the metrics format.
pub fn respond(state: &AdminState, method: &Method, path: &str, accept: Option<&str>) -> Answer {
    let known = matches!(path, "/healthz" | "/metrics" | "/config");
    if !known {
        return Answer::Now(text(StatusCode::NOT_FOUND, PLAIN, "not found\n"));
    }
    if method != Method::GET && method != Method::HEAD {
        let mut resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "method not allowed\n",
        );
        resp.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Answer::Now(resp);
    }
    Answer::Now(match path {
        "/healthz" => {
            if !*state.ready.borrow() {
                text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, "not ready")
            } else if state.serving.is_stale() {
                let age = state.serving.age().as_secs();
                let body = format!("the thread serving connections has not run for {age} s");
                text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, body)
            } else {
                text(StatusCode::OK, PLAIN, "ok")
            }
        }
        "/metrics" => {
            let format = exposition::negotiate(accept);
            let body = format.render(state.metrics.encode());
            let mut resp = text(StatusCode::OK, format.content_type(), body);
            resp.headers_mut()
                .insert(header::VARY, header::HeaderValue::from_static("accept"));
            resp
        }
        _ => return Answer::ConfigDump,
    })
}

/// The `/config` answer for `peer` presenting `token` (from the request's
/// `X-Consul-Token`, `Authorization: Bearer` or `?token=`).
pub async fn config_dump(
    state: &AdminState,
    peer: SocketAddr,
    token: Result<Option<String>, crate::local_api::route::RouteError>,
) -> Response<Full<Bytes>> {
    let refused = |status, why: &str| text(status, PLAIN, format!("{why}\n"));
    if !peer.ip().to_canonical().is_loopback() {
        return refused(
            StatusCode::FORBIDDEN,
            "/config is served to loopback peers only",
        );
    }
    let token = match token {
        Ok(Some(token)) => token,
        Ok(None) => {
            return refused(
                StatusCode::FORBIDDEN,
                "Permission denied: /config needs an ACL token with operator:read \
                 (send X-Consul-Token or Authorization: Bearer)",
            )
        }
        Err(_) => return refused(StatusCode::BAD_REQUEST, "malformed ACL token"),
    };
    // One dump at a time, taken before the servers are asked: callers with
    // made-up tokens queue no more than one question at a time here.
    let Ok(_one) = state.dumping.clone().try_acquire_owned() else {
        return refused(
            StatusCode::TOO_MANY_REQUESTS,
            "a /config dump is being made; ask again when it is done",
        );
    };
    let right = Right::operator_read();
    match state
        .judge
        .authorize(&token, std::slice::from_ref(&right))
        .await
    {
        Ok(answers) if answers == [true] => {}
        Ok(_) => {
            return refused(
                StatusCode::FORBIDDEN,
                "Permission denied: the token lacks operator:read",
            )
        }
        Err(JudgeError::UnknownToken) => return refused(StatusCode::FORBIDDEN, "ACL not found"),
        Err(e) => return refused(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
    let build = state.config.clone();
    // Megabytes for a large view: off the background thread's tasks.
    let encoded = tokio::task::spawn_blocking(move || serde_json::to_vec_pretty(&build())).await;
    match encoded {
        Ok(Ok(body)) => text(StatusCode::OK, "application/json", body),
        Ok(Err(e)) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            PLAIN,
            format!("cannot encode the configuration: {e}\n"),
        ),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            PLAIN,
            format!("building the configuration: {e}\n"),
        ),
    }
}

/// A bound admin server; [`AdminServer::serve`] runs it.
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: AdminState,
}

impl AdminServer {
    /// Binds `addr` (port 0 picks a free port; see [`Self::local_addr`]).
    pub async fn bind(addr: SocketAddr, state: AdminState) -> Result<AdminServer, AdminError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Bind { addr, source })?;
        Self::from_listener(listener, state)
    }

    /// Uses an already bound listener.
    pub fn from_listener(
        listener: TcpListener,
        state: AdminState,
    ) -> Result<AdminServer, AdminError> {
        let local_addr = listener.local_addr().map_err(AdminError::LocalAddr)?;
        Ok(AdminServer {
            listener,
            local_addr,
            state,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, then stops accepting, lets open connections
    /// finish their current request (at most [`ADMIN_DRAIN_TIMEOUT`]) and returns.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut conns = JoinSet::new();
        let mut accept_errors = crate::accept::AcceptErrors::new("admin");
        let slots = Slots::new();
        let idle = crate::idle_conns::IdleConns::default();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Some(slot) = slots.admit_or_evict(peer.ip(), &idle).await else {
                            tracing::debug!(%peer, "admin: no connection slot free to this peer, closing its new one");
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
        if tokio::time::timeout(ADMIN_DRAIN_TIMEOUT, drain)
            .await
            .is_err()
        {
            conns.abort_all();
        }
    }
}

/// The admin server's connection slots: any peer takes one of the shared
/// ones, only a loopback peer one of the [`LOOPBACK_RESERVE`].
struct Slots {
    all: Arc<Semaphore>,
    shared: Arc<Semaphore>,
}

/// A connection's place, given back when it is dropped.
struct Slot {
    _all: OwnedSemaphorePermit,
    _shared: Option<OwnedSemaphorePermit>,
}

impl Slots {
    fn new() -> Self {
        Slots {
            all: Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS)),
            shared: Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS - LOOPBACK_RESERVE)),
        }
    }

    /// A slot for a new connection from `peer`, or None if none is free
    /// to it.
    fn admit(&self, peer: IpAddr) -> Option<Slot> {
        let shared = if peer.to_canonical().is_loopback() {
            None
        } else {
            Some(self.shared.clone().try_acquire_owned().ok()?)
        };
        let all = self.all.clone().try_acquire_owned().ok()?;
        Some(Slot {
            _all: all,
            _shared: shared,
        })
    }

    /// [`Slots::admit`], and for a loopback peer finding every slot taken
    /// the one of the connection waiting longest for its client's next
    /// request, once closed: a local process holding the slots idle cannot
    /// keep the node's own probes of `/healthz` out.
    async fn admit_or_evict(&self, peer: IpAddr, idle: &IdleConns) -> Option<Slot> {
        if let Some(slot) = self.admit(peer) {
            return Some(slot);
        }
        if !peer.to_canonical().is_loopback() {
            return None;
        }
        let all = idle.take_slot(&self.all).await?;
        Some(Slot {
            _all: all,
            _shared: None,
        })
    }
}

async fn serve_conn(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    state: AdminState,
    mut stop: watch::Receiver<bool>,
    place: IdleConn,
) {
    // Waiting for a request until one comes, and again after each answer.
    let place = Arc::new(place);
    place.set_waiting(true);
    let serving = place.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        serving.set_waiting(false);
        let serving = serving.clone();
        let accept = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok());
        // Only a config dump reads the token and needs the state after
        // this call; probes and scrapes are answered as they are.
        let dump = match respond(&state, req.method(), req.uri().path(), accept) {
            Answer::Now(resp) => Err(resp),
            Answer::ConfigDump => Ok((
                state.clone(),
                crate::local_api::route::token(req.headers(), req.uri().query()),
            )),
        };
        async move {
            let answer = match dump {
                Err(resp) => resp,
                Ok((state, token)) => config_dump(&state, peer, token).await,
            };
            serving.set_waiting(true);
            Ok::<_, Infallible>(answer)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let stopping = async move {
        // Dropping the borrow before returning keeps the future `Send`.
        let _ = stop.wait_for(|s| *s).await.map(|_| ());
    };
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stopping => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        () = place.evicted() => {
            tracing::debug!(%peer, "admin: idle connection closed for a local one");
            conn.as_mut().graceful_shutdown();
            // Dropped when it does not close at once (an answer the
            // client does not read, a half-sent request).
            match tokio::time::timeout(crate::idle_conns::EVICTED_GRACE, conn).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
        () = tokio::time::sleep(ADMIN_CONNECTION_LIFETIME) => {
            conn.as_mut().graceful_shutdown();
            // An answer nobody reads would hold the connection for good.
            match tokio::time::timeout(ADMIN_DRAIN_TIMEOUT, conn).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::debug!(%peer, "admin: connection past its lifetime, closed");
                    return;
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "admin: connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// Tokens and whether each has operator:read; others are unknown.
    struct Tokens(&'static [(&'static str, bool)]);

    impl Judge for Tokens {
        fn authorize<'a>(
            &'a self,
            token: &'a str,
            rights: &'a [Right],
        ) -> futures::future::BoxFuture<'a, Result<Vec<bool>, JudgeError>> {
            let answer = match self.0.iter().find(|(t, _)| *t == token) {
                Some((_, operator)) => Ok(rights
                    .iter()
                    .map(|r| *operator && *r == Right::operator_read())
                    .collect()),
                None => Err(JudgeError::UnknownToken),
            };
            Box::pin(async move { answer })
        }
    }

    const OPERATOR: &str = "operator-token";
    const READER: &str = "service-reader";

    fn state(ready: bool) -> (AdminState, watch::Sender<bool>) {
        let (tx, rx) = watch::channel(ready);
        let metrics = Arc::new(AgentMetrics::new());
        let serving = Arc::new(crate::pulse::Pulse::default());
        serving.beat();
        let st = AdminState {
            ready: rx,
            serving,
            metrics,
            config: Arc::new(|| serde_json::json!({"node_name": "node-a", "services": []})),
            judge: Arc::new(Tokens(&[(OPERATOR, true), (READER, false)])),
            dumping: Arc::new(Semaphore::new(1)),
        };
        (st, tx)
    }

    fn now(answer: Answer) -> Response<Full<Bytes>> {
        match answer {
            Answer::Now(resp) => resp,
            Answer::ConfigDump => panic!("not answered at once: a config dump"),
        }
    }

    /// Serves `st` on a free loopback port until the sender is used.
    async fn serving(
        st: AdminState,
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let server = AdminServer::bind("127.0.0.1:0".parse().unwrap(), st)
            .await
            .unwrap();
        let addr = server.local_addr();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async {
            let _ = stop_rx.await;
        }));
        (addr, stop_tx, task)
    }

    async fn body(resp: Response<Full<Bytes>>) -> String {
        let b = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn metrics_are_openmetrics_only_when_asked_for() {
        let (st, _tx) = state(true);
        st.metrics
            .conn_opened(crate::metrics::Side::Outbound, "web", "api");
        let om = now(respond(
            &st,
            &Method::GET,
            "/metrics",
            Some("application/openmetrics-text;version=1.0.0;q=0.5,text/plain;q=0.3"),
        ));
        assert_eq!(om.headers()[header::CONTENT_TYPE], exposition::OPENMETRICS);
        let om = body(om).await;
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.contains("# TYPE weft_agent_connections_opened counter"));
        let text = body(now(respond(
            &st,
            &Method::GET,
            "/metrics",
            Some("text/plain"),
        )))
        .await;
        assert!(text.contains("# TYPE weft_agent_connections_opened_total counter"));
        assert!(!text.contains("# EOF"));
    }

    #[tokio::test(start_paused = true)]
    async fn healthz_fails_once_the_serving_thread_stops_beating() {
        let (st, _ready) = state(true);
        let r = now(respond(&st, &Method::GET, "/healthz", None));
        assert_eq!(r.status(), StatusCode::OK);
        tokio::time::advance(crate::pulse::STALE + std::time::Duration::from_secs(1)).await;
        let r = now(respond(&st, &Method::GET, "/healthz", None));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        let text = body(r).await;
        assert!(text.contains("has not run for 6 s"), "{text}");
        st.serving.beat();
        let r = now(respond(&st, &Method::GET, "/healthz", None));
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn respond_routes() {
        let (st, tx) = state(false);
        let r = now(respond(&st, &Method::GET, "/healthz", None));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        tx.send(true).unwrap();
        let r = now(respond(&st, &Method::GET, "/healthz", None));
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(body(r).await, "ok");
        let r = now(respond(&st, &Method::POST, "/healthz", None));
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "GET, HEAD");
        let r = now(respond(&st, &Method::GET, "/nope", None));
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert!(matches!(
            respond(&st, &Method::GET, "/config", None),
            Answer::ConfigDump
        ));
        let r = now(respond(&st, &Method::DELETE, "/config", None));
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn the_config_dump_needs_a_loopback_peer_with_operator_read() {
        let (st, _ready) = state(true);
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let remote: SocketAddr = "10.0.0.9:40000".parse().unwrap();
        let token = |t: &str| Ok(Some(t.to_string()));
        let cases = [
            (local, Ok(None), StatusCode::FORBIDDEN, "needs an ACL token"),
            (
                local,
                token("made-up"),
                StatusCode::FORBIDDEN,
                "ACL not found",
            ),
            (
                local,
                token(READER),
                StatusCode::FORBIDDEN,
                "lacks operator:read",
            ),
            (
                remote,
                token(OPERATOR),
                StatusCode::FORBIDDEN,
                "loopback peers only",
            ),
        ];
        for (peer, token, status, why) in cases {
            let r = config_dump(&st, peer, token).await;
            assert_eq!(r.status(), status, "{why}");
            let text = body(r).await;
            assert!(text.contains(why), "{text}");
            assert!(!text.contains("node-a"), "{text}");
        }
        let r = config_dump(&st, local, token(OPERATOR)).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let v: serde_json::Value = serde_json::from_str(&body(r).await).unwrap();
        assert_eq!(v["node_name"], "node-a");
        // One dump at a time.
        let _making = st.dumping.clone().try_acquire_owned().unwrap();
        let r = config_dump(&st, local, token(OPERATOR)).await;
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    }

    /// GET `path` from `addr` with a hyper client; returns status and body.
    async fn get(addr: SocketAddr, path: &str) -> (StatusCode, String, String) {
        let mut sender = crate::test_http::connect(addr).await;
        let resp = (sender.send_request(crate::test_http::get(addr, path)).await).unwrap();
        let status = resp.status();
        let ct = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let b = resp.into_body().collect().await.unwrap().to_bytes();
        (status, ct, String::from_utf8(b.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn serves_every_path_and_shuts_down() {
        let (st, ready) = state(false);
        let metrics = st.metrics.clone();
        let (addr, stop_tx, task) = serving(st).await;

        let (s, _, b) = get(addr, "/healthz").await;
        assert_eq!(
            (s, b.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "not ready")
        );
        ready.send(true).unwrap();
        let (s, _, b) = get(addr, "/healthz").await;
        assert_eq!((s, b.as_str()), (StatusCode::OK, "ok"));

        metrics.conn_opened(crate::metrics::Side::Outbound, "web", "api");
        metrics.bytes(
            crate::metrics::Side::Outbound,
            "web",
            "api",
            crate::metrics::Direction::Sent,
            10,
        );
        metrics.denied(crate::metrics::Side::Outbound, "web", "db");
        metrics.tls_failure(crate::metrics::Side::Outbound, "timeout");
        metrics.set_ebpf_counter(crate::metrics::EbpfCounter::Rekeyed, 9);
        let (s, ct, b) = get(addr, "/metrics?x=1").await;
        assert_eq!(s, StatusCode::OK);
        // Prometheus text 0.0.4 unless OpenMetrics is asked for.
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        assert!(b.contains("# TYPE weft_agent_connections_opened_total counter"));
        assert!(!b.contains("# EOF"));
        for want in [
            "weft_agent_connections_opened_total{source=\"web\",destination=\"api\"} 1",
            "weft_agent_connections_active{source=\"web\",destination=\"api\"} 1",
            "weft_agent_bytes_total{source=\"web\",destination=\"api\",direction=\"sent\"} 10",
            "weft_agent_intention_denials_total{source=\"web\",destination=\"db\"} 1",
            "weft_agent_tls_handshake_failures_total{side=\"outbound\",reason=\"timeout\"} 1",
            "weft_agent_ebpf_events_total{event=\"rekeyed\"} 9",
        ] {
            assert!(b.contains(want), "missing {want:?} in\n{b}");
        }

        // No token: refused (the token's rights are the unit test's).
        let (s, _, b) = get(addr, "/config").await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{b}");

        let (s, _, _) = get(addr, "/").await;
        assert_eq!(s, StatusCode::NOT_FOUND);

        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("server stops")
            .unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn shutdown_with_an_idle_keepalive_connection_is_prompt() {
        let (st, _ready) = state(true);
        let (addr, stop_tx, task) = serving(st).await;
        // An idle keep-alive connection left open by a client.
        let mut sender = crate::test_http::connect(addr).await;
        let req = crate::test_http::get(addr, "/healthz");
        assert_eq!(
            sender.send_request(req).await.unwrap().status(),
            StatusCode::OK
        );

        let started = std::time::Instant::now();
        stop_tx.send(()).unwrap();
        task.await.unwrap();
        assert!(
            started.elapsed() < ADMIN_DRAIN_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
    }

    /// Reads until the server closes, for at most 5 s: whether it did.
    async fn closed_by_server(stream: &mut tokio::net::TcpStream) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        let read_all = async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read_all)
            .await
            .is_ok()
    }

    /// Connections that send nothing hold every slot (a local process, on
    /// purpose); a new local one, the node's health probe say, is still
    /// served: the connection idle longest is closed for it. Before, the
    /// newcomer was closed until a held one let go.
    #[tokio::test]
    async fn a_local_connection_past_the_limit_takes_the_slot_idle_longest() {
        let (st, _ready) = state(true);
        let (addr, stop_tx, task) = serving(st).await;
        let mut held = Vec::new();
        for _ in 0..MAX_ADMIN_CONNECTIONS {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let mut sender = crate::test_http::connect(addr).await;
        let req = crate::test_http::get(addr, "/healthz");
        let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
            .await
            .expect("answered within 5 s")
            .expect("not closed");
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(
            closed_by_server(&mut held[0]).await,
            "the connection idle longest stays open"
        );
        stop_tx.send(()).unwrap();
        task.await.unwrap();
    }

    #[test]
    fn other_hosts_cannot_take_the_slots_kept_for_loopback() {
        let slots = Slots::new();
        let remote: IpAddr = "10.0.0.9".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.9".parse().unwrap();
        let mut shared: Vec<Slot> = (0..MAX_ADMIN_CONNECTIONS - LOOPBACK_RESERVE)
            .map(|i| {
                slots
                    .admit(remote)
                    .unwrap_or_else(|| panic!("shared slot {i}"))
            })
            .collect();
        assert!(
            slots.admit(remote).is_none(),
            "another host took a reserved slot"
        );
        assert!(
            slots.admit(mapped).is_none(),
            "a v4-mapped address is that host"
        );
        let mut reserved: Vec<Slot> = ["127.0.0.1", "::1", "::ffff:127.0.0.1", "127.0.0.2"]
            .iter()
            .cycle()
            .take(LOOPBACK_RESERVE)
            .map(|ip| slots.admit(ip.parse().unwrap()).expect("a reserved slot"))
            .collect();
        assert!(
            slots.admit("127.0.0.1".parse().unwrap()).is_none(),
            "past the limit"
        );
        // A shared slot given back is another host's to take again.
        drop(shared.pop());
        let back = slots.admit(remote).expect("the freed shared slot");
        assert!(slots.admit(remote).is_none());
        // A reserved slot given back is loopback's only.
        drop(reserved.pop());
        assert!(
            slots.admit(remote).is_none(),
            "a freed reserved slot went to a host"
        );
        assert!(slots.admit("::1".parse().unwrap()).is_some());
        drop(back);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_nobody_reads_ends_with_the_connections_lifetime() {
        use tokio::io::AsyncWriteExt;
        let (mut st, _ready) = state(true);
        // An answer far larger than the sockets' buffers.
        st.config = Arc::new(|| serde_json::json!({"big": "x".repeat(32 << 20)}));
        let (addr, stop_tx, task) = serving(st).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request =
            format!("GET /config HTTP/1.1\r\nhost: {addr}\r\nx-consul-token: {OPERATOR}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        // Not read: the server's write stalls until the lifetime (the
        // paused clock jumps to it when nothing else is ready).
        tokio::time::sleep(ADMIN_CONNECTION_LIFETIME + ADMIN_DRAIN_TIMEOUT).await;
        let mut received = 0usize;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            use tokio::io::AsyncReadExt;
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received += n,
            }
        }
        assert!(
            received < 32 << 20,
            "the whole answer came ({received} bytes): the connection was not cut"
        );
        stop_tx.send(()).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn bind_error_names_the_field() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let (st, _ready) = state(true);
        let e = AdminServer::bind(addr, st).await.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("admin_addr {addr}: cannot listen")),
            "{e}"
        );
    }
}
