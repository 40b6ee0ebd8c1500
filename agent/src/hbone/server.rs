//! The inbound HBONE server (`:15008`): mutual TLS, then HTTP/2 CONNECT.
//!
//! For each accepted TCP connection the server completes a TLS 1.3 handshake
//! that requires a client certificate chaining to the trust bundle, reads the
//! peer's SPIFFE id, and serves HTTP/2 on it. Every CONNECT stream names a
//! target `IP:PORT` on this node in `:authority`; a [`ConnectHandler`] decides
//! (policy) and connects to it. On success the server answers 200 and splices
//! the stream to the upstream, half-closes included; on refusal it answers the
//! refusal's status with the reason in `x-weft-reason`. Other methods get 405.
//!
//! Handshake failures never panic: they are logged and reported through the
//! `on_tls_failure` hook (for metrics).
//!
//! Anyone who reaches the port can open TCP connections to it, so places
//! are taken at accept ([`InboundLimits`], [`crate::admission`]): so many
//! connections at once and per source, with separate places for sources
//! the view knows (`known_sources`) and for all others. A connection that
//! finds no place is closed at once and reported through `on_refused`:
//! hosts outside the mesh opening connections they never complete hold
//! the few places for unknown sources, not the agent's descriptors nor
//! the nodes' places. A connection still in its TLS handshake gives its
//! place up to a newer one from its source when that source holds all it
//! may (see [`crate::admission`]): a local user on a node who opens
//! connections it never completes cannot keep that node's agent out. Once
//! TLS is done, the HTTP/2 preface must follow within the handshake
//! timeout too.
//!
//! A certificate proves a peer, not that it is welcome: the `peers` check
//! refuses, as the handshake ends, an identity no tunnel would be taken
//! from (a node's own, another namespace's, an unknown datacenter's), and
//! one identity holds only its share of its source's connections and
//! tunnels ([`InboundLimits::per_identity`]): a compromised workload with
//! its own leaf cannot take the places of its node's agent, nor, through a
//! gateway, those of its datacenter. A connection with no tunnel for
//! [`InboundLimits::idle`] is told to go away.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

use super::stream::HboneStream;
use super::tls::{self, Identity, TlsError, TrustBundle, ALPN_H2};
use super::{
    INITIAL_CONNECTION_WINDOW, INITIAL_STREAM_WINDOW, MAX_CONCURRENT_STREAMS, REASON_HEADER,
};
use crate::admission::{Places, Refused};

/// Default time a peer gets to complete the TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many inbound connections the server holds at once. Sources the
/// view knows (nodes, gateways) and other addresses draw on separate
/// places, so that hosts outside the mesh, which anyone can be, cannot
/// take the places of its nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundLimits {
    /// Connections at once from known sources. Each carries up to
    /// [`MAX_CONCURRENT_STREAMS`] tunnels, and a peer opens one per source
    /// identity and node (more past that many tunnels).
    pub known: usize,
    /// Connections one known source may hold. Another datacenter's
    /// tunnels all come from this datacenter's gateway, one per remote
    /// identity and node.
    pub known_per_source: usize,
    /// Connections at once from sources the view does not know: only a
    /// node that joined a moment ago has a certificate among them.
    pub unknown: usize,
    /// Connections one unknown source may hold.
    pub unknown_per_source: usize,
    /// Tunnels one source may have open at once, over all its
    /// connections: each costs the agent a connection to a workload, so
    /// one node cannot take every descriptor the agent may open.
    pub tunnels_per_source: usize,
    /// Connections one identity of this datacenter may hold from one
    /// source: a node's agent opens one per service it sends from (and a
    /// sibling once one carries [`MAX_CONCURRENT_STREAMS`] tunnels).
    pub per_identity: usize,
    /// The same for an identity of another datacenter: all of them arrive
    /// from a gateway's address, one connection per node the service runs
    /// on there.
    pub per_remote_identity: usize,
    /// Tunnels one identity may have open at once from one source: less
    /// than the source's, so that one cannot take them all.
    pub tunnels_per_identity: usize,
    /// A connection that has had no tunnel open for this long is told to
    /// go away (GOAWAY): a peer's pool dials again when it needs one. One
    /// with tunnels open but no new one for this long stops counting
    /// against its identity's connections until it takes a new one (a
    /// connection its peer retired at a certificate renewal, whose long
    /// tunnels run on).
    pub idle: Duration,
}

impl Default for InboundLimits {
    fn default() -> Self {
        InboundLimits {
            known: 8_192,
            known_per_source: 1_024,
            unknown: 256,
            unknown_per_source: 16,
            tunnels_per_source: 16_384,
            per_identity: 16,
            per_remote_identity: 512,
            tunnels_per_identity: 12_288,
            idle: Duration::from_secs(300),
        }
    }
}

/// The label a connection refused at accept is counted under.
fn refusal_label(known: bool, refused: Refused) -> &'static str {
    match (known, refused) {
        (true, Refused::Busy) => "busy",
        (true, Refused::SourceLimit) => "client_limit",
        (false, Refused::Busy) => "unknown_busy",
        (false, Refused::SourceLimit) => "unknown_client_limit",
    }
}

/// Errors of one inbound connection.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("TLS handshake timed out after {0:?}")]
    HandshakeTimeout(Duration),
    #[error("gave its place up to a newer connection of its source before completing TLS")]
    Displaced,
    #[error("peer did not negotiate ALPN h2")]
    NoH2Alpn,
    #[error("peer identity: {0}")]
    PeerIdentity(#[from] TlsError),
    #[error("no tunnel is taken from {peer_id}: {why}")]
    PeerRefused { peer_id: String, why: String },
    #[error("{peer_id} holds every connection its identity may from its source")]
    IdentityLimit { peer_id: String },
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
}

/// One CONNECT request, as the handler sees it.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// The client's SPIFFE id, from its verified certificate.
    pub peer_id: String,
    /// The `:authority` of the request: where on this node to connect.
    pub target: SocketAddr,
    /// The request's headers (not the pseudo-headers).
    pub headers: HeaderMap,
}

/// A handler's "no": the HTTP status to answer and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
}

impl Refusal {
    pub fn new(status: u16, reason: impl Into<String>) -> Self {
        Refusal {
            status,
            reason: reason.into(),
        }
    }

    /// 403: policy (intentions) denies the connection.
    pub fn forbidden(reason: impl Into<String>) -> Self {
        Refusal::new(403, reason)
    }

    /// 503: the target cannot be reached.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        Refusal::new(503, reason)
    }
}

/// Decides on and opens the upstream of each CONNECT stream.
///
/// Implemented for every `Fn(ConnectRequest) -> Future<Output =
/// Result<Upstream, Refusal>>` closure.
pub trait ConnectHandler: Send + Sync + 'static {
    type Upstream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    fn connect(
        &self,
        request: ConnectRequest,
    ) -> impl Future<Output = Result<Self::Upstream, Refusal>> + Send;
}

impl<F, Fut, U> ConnectHandler for F
where
    F: Fn(ConnectRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<U, Refusal>> + Send,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Upstream = U;

    fn connect(
        &self,
        request: ConnectRequest,
    ) -> impl Future<Output = Result<Self::Upstream, Refusal>> + Send {
        self(request)
    }
}

/// A failed inbound handshake, as reported to the `on_tls_failure` hook.
#[derive(Debug, Clone)]
pub struct TlsFailure {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// Why the connection was dropped.
    pub reason: String,
}

type FailureHook = Arc<dyn Fn(&TlsFailure) + Send + Sync>;
type AcceptHook = Arc<dyn Fn(&str) + Send + Sync>;
type RefusedHook = Arc<dyn Fn(&'static str) + Send + Sync>;
type KnownSources = Arc<dyn Fn(std::net::IpAddr) -> bool + Send + Sync>;
type PeerCheck = Arc<dyn Fn(&str) -> Result<PeerOrigin, String> + Send + Sync>;

/// Where a proven peer's identity is from, as the `peers` check sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerOrigin {
    ThisDatacenter,
    OtherDatacenter,
}

/// Places per source address and peer identity.
type IdentityPlaces = Places<(std::net::IpAddr, Arc<str>)>;

struct Inner<H> {
    acceptor: TlsAcceptor,
    local_id: String,
    handler: H,
    handshake_timeout: Duration,
    on_tls_failure: Option<FailureHook>,
    on_tls_accept: Option<AcceptHook>,
    on_refused: Option<RefusedHook>,
    drain: Option<Arc<crate::drain::Drain>>,
    limits: InboundLimits,
    known_sources: Option<KnownSources>,
    peers: Option<PeerCheck>,
}

/// The inbound HBONE server: configure it, then [`serve`](Self::serve) a
/// listener.
pub struct HboneServer<H> {
    inner: Inner<H>,
}

/// What the server answers to a request before any handler runs.
#[derive(Debug, PartialEq, Eq)]
pub enum Classified {
    Connect(SocketAddr),
    Reject(Refusal),
}

/// Pure request checks: CONNECT only, and `:authority` must be `IP:PORT`
/// (public for the fuzz target `connect_request`).
pub fn classify(method: &Method, authority: Option<&str>) -> Classified {
    if method != Method::CONNECT {
        return Classified::Reject(Refusal::new(405, "only CONNECT is served"));
    }
    let Some(authority) = authority else {
        return Classified::Reject(Refusal::new(400, "CONNECT without :authority"));
    };
    match authority.parse::<SocketAddr>() {
        Ok(addr) if addr.port() != 0 => Classified::Connect(addr),
        _ => Classified::Reject(Refusal::new(
            400,
            format!("CONNECT target {authority:?} is not IP:PORT"),
        )),
    }
}

/// A refusal's status, never a success: a bad or 2xx status becomes 500.
pub(crate) fn refusal_status(status: u16) -> StatusCode {
    match StatusCode::from_u16(status) {
        Ok(code) if !code.is_success() && !code.is_informational() => code,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The reason as a header value: non-printable bytes become `?`, capped in
/// length.
pub(crate) fn reason_header_value(reason: &str) -> HeaderValue {
    let cleaned: String = reason
        .chars()
        .take(256)
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect();
    HeaderValue::from_str(&cleaned).unwrap_or_else(|_| HeaderValue::from_static("refused"))
}

impl<H: ConnectHandler> HboneServer<H> {
    /// A server presenting `identity` and accepting clients that chain to
    /// `bundle` (rotations of the bundle apply to later handshakes).
    pub fn new(identity: &Identity, bundle: &TrustBundle, handler: H) -> Result<Self, TlsError> {
        let fixed = Arc::new(identity.clone());
        Self::renewing(
            identity,
            Arc::new(move || Some(fixed.clone())),
            bundle,
            handler,
        )
    }

    /// A server presenting, at every handshake, the certificate `current`
    /// gives (a renewed one from the moment it is there); `identity` is the
    /// one it starts with, for its SPIFFE id.
    pub fn renewing(
        identity: &Identity,
        current: tls::CurrentIdentity,
        bundle: &TrustBundle,
        handler: H,
    ) -> Result<Self, TlsError> {
        let config = tls::server_config(current, bundle)?;
        Ok(HboneServer {
            inner: Inner {
                acceptor: TlsAcceptor::from(config),
                local_id: identity.spiffe_id.clone(),
                handler,
                handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
                on_tls_failure: None,
                on_tls_accept: None,
                on_refused: None,
                drain: None,
                limits: InboundLimits::default(),
                known_sources: None,
                peers: None,
            },
        })
    }

    /// Called for every failed handshake (no or bad client certificate,
    /// wrong ALPN, timeout).
    pub fn on_tls_failure(mut self, hook: impl Fn(&TlsFailure) + Send + Sync + 'static) -> Self {
        self.inner.on_tls_failure = Some(Arc::new(hook));
        self
    }

    /// Called with the peer's SPIFFE id for every completed handshake.
    pub fn on_tls_accept(mut self, hook: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.inner.on_tls_accept = Some(Arc::new(hook));
        self
    }

    /// Called for every connection closed at accept for want of a place,
    /// with why: `busy`, `client_limit` (a known source),
    /// `unknown_busy`, `unknown_client_limit` (another); for every
    /// connection that gave its place up in its handshake: `displaced`; for
    /// a proven peer the `peers` check refuses: `identity`; past its
    /// identity's share: `identity_limit`; and for every tunnel refused past
    /// `tunnels_per_source` or `tunnels_per_identity`: `tunnel_limit`.
    pub fn on_refused(mut self, hook: impl Fn(&'static str) + Send + Sync + 'static) -> Self {
        self.inner.on_refused = Some(Arc::new(hook));
        self
    }

    /// How many connections the server holds at once (the default is
    /// [`InboundLimits::default`]).
    pub fn limits(mut self, limits: InboundLimits) -> Self {
        self.inner.limits = limits;
        self
    }

    /// Which source addresses take the places of known sources (the
    /// agent's: the nodes of its view). Without it every source is
    /// unknown.
    pub fn known_sources(
        mut self,
        known: impl Fn(std::net::IpAddr) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.inner.known_sources = Some(Arc::new(known));
        self
    }

    /// Which proven peers may open tunnels, and where their identity is
    /// from (for its share of places): a peer it refuses is let go as the
    /// handshake ends. Without it every peer is of this datacenter.
    pub fn peers(
        mut self,
        check: impl Fn(&str) -> Result<PeerOrigin, String> + Send + Sync + 'static,
    ) -> Self {
        self.inner.peers = Some(Arc::new(check));
        self
    }

    /// Counts every connection in `drain`, and when it starts draining tells
    /// each to go away (GOAWAY): peers open new tunnels elsewhere, open ones
    /// run to their end.
    pub fn draining(mut self, drain: Arc<crate::drain::Drain>) -> Self {
        self.inner.drain = Some(drain);
        self
    }

    /// How long a peer gets to complete the handshake.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.inner.handshake_timeout = timeout;
        self
    }

    /// Accepts connections forever, each served on its own task. Connections
    /// outlive this future if it is dropped.
    pub async fn serve(self, listener: TcpListener) {
        let inner = Arc::new(self.inner);
        let limits = inner.limits;
        let known_places = Places::new(limits.known);
        let unknown_places = Places::new(limits.unknown);
        // Bounded per source; the total is what the connections allow.
        let tunnels = Places::new(usize::MAX);
        let shares = Shares {
            connections: Places::new(usize::MAX),
            tunnels: Places::new(usize::MAX),
        };
        let mut errors = crate::accept::AcceptErrors::new("hbone");
        loop {
            let (tcp, peer) = errors.accept(&listener).await;
            let known = inner.known_sources.as_ref().is_some_and(|k| k(peer.ip()));
            let (places, per_source) = match known {
                true => (&known_places, limits.known_per_source),
                false => (&unknown_places, limits.unknown_per_source),
            };
            let place = match places.admit_unproven(peer.ip(), per_source) {
                Ok(place) => place,
                Err(refused) => {
                    let label = refusal_label(known, refused);
                    debug!(%peer, reason = label, "hbone: no place for the connection, closing it");
                    if let Some(hook) = &inner.on_refused {
                        hook(label);
                    }
                    continue;
                }
            };
            let inner = inner.clone();
            let tunnels = tunnels.clone();
            let shares = shares.clone();
            tokio::spawn(async move {
                if let Err(e) = inner
                    .serve_connection(tcp, peer, place, tunnels, shares)
                    .await
                {
                    debug!(%peer, error = %e, "hbone connection ended");
                }
            });
        }
    }
}

/// The places each peer identity has of its source's.
#[derive(Clone)]
struct Shares {
    connections: IdentityPlaces,
    tunnels: IdentityPlaces,
}

/// The most header bytes (as HTTP/2 counts them) a CONNECT may carry.
const MAX_HEADER_LIST: u32 = 16 * 1024;

impl<H: ConnectHandler> Inner<H> {
    fn refused(&self, reason: &'static str) {
        if let Some(hook) = &self.on_refused {
            hook(reason);
        }
    }

    fn tls_failure(&self, peer: SocketAddr, err: &ServerError) {
        warn!(%peer, local = %self.local_id, error = %err, "hbone TLS handshake rejected");
        if let Some(hook) = &self.on_tls_failure {
            hook(&TlsFailure {
                peer,
                reason: err.to_string(),
            });
        }
    }

    /// Serves one accepted TCP connection to its end.
    async fn serve_connection(
        self: &Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        place: crate::admission::Place,
        tunnels: Places,
        shares: Shares,
    ) -> Result<(), ServerError> {
        let _ = tcp.set_nodelay(true);
        let _tracked = self.drain.as_ref().map(|d| d.track());
        let draining = match &self.drain {
            Some(d) => futures::future::Either::Left(crate::drain::started(d.signal())),
            None => futures::future::Either::Right(std::future::pending::<()>()),
        };
        tokio::pin!(draining);
        let mut winding_down = false;
        let displaced = |inner: &Self| {
            debug!(%peer, "hbone: a newer connection of the source took this one's place in its handshake");
            if let Some(hook) = &inner.on_refused {
                hook("displaced");
            }
            ServerError::Displaced
        };
        let handshake = tokio::select! {
            biased;
            () = place.displaced() => return Err(displaced(self)),
            result = self.handshake(tcp) => result,
        };
        let (tls, peer_id) = match handshake {
            Ok(ok) => ok,
            Err(e) => {
                self.tls_failure(peer, &e);
                return Err(e);
            }
        };
        // The peer proved who it is: its place is its own until it ends,
        // unless a newer connection took it as the handshake ended.
        if !place.prove() {
            return Err(displaced(self));
        }
        let origin = match &self.peers {
            Some(check) => check(&peer_id),
            None => Ok(PeerOrigin::ThisDatacenter),
        };
        let origin = origin.map_err(|why| {
            info!(%peer, peer_id = %peer_id, "hbone: no tunnel is taken from this identity ({why}); closing");
            self.refused("identity");
            ServerError::PeerRefused {
                peer_id: peer_id.clone(),
                why,
            }
        })?;
        let share = match origin {
            PeerOrigin::ThisDatacenter => self.limits.per_identity,
            PeerOrigin::OtherDatacenter => self.limits.per_remote_identity,
        };
        let peer_id: Arc<str> = Arc::from(peer_id);
        let identity = (peer.ip().to_canonical(), peer_id.clone());
        // Given up while the connection takes no new tunnel (its peer's
        // pool retired it at a renewal, its old tunnels run on), taken
        // again for the next one.
        let Ok(identity_place) = shares.connections.admit_as(identity.clone(), share) else {
            info!(%peer, peer_id = %peer_id, "hbone: the identity holds {share} connections from this source, the most it may; closing");
            self.refused("identity_limit");
            return Err(ServerError::IdentityLimit {
                peer_id: peer_id.to_string(),
            });
        };
        // No new tunnels once the peer's certificate has expired: the
        // connection is told to go away (open tunnels run to their end).
        let (_, session) = tls.get_ref();
        let peer_leaf = session.peer_certificates().and_then(|c| c.first());
        let deadline = tls::session_deadline(None, peer_leaf)
            .and_then(|d| d.duration_since(std::time::SystemTime::now()).ok())
            .unwrap_or_default();
        let expiry = tokio::time::sleep(deadline);
        tokio::pin!(expiry);
        let mut going_away = false;
        debug!(%peer, peer_id = %peer_id, "hbone connection accepted");
        if let Some(hook) = &self.on_tls_accept {
            hook(&peer_id);
        }
        // Held by each tunnel's task: the connection is idle when only this
        // one is left.
        let open_tunnels = Arc::new(());
        let idle = tokio::time::sleep(self.limits.idle);
        tokio::pin!(idle);
        let mut identity_place = Some(identity_place);

        // A peer that completed TLS and never sends the HTTP/2 preface
        // holds its place for no longer than a handshake may take.
        let h2_handshake = h2::server::Builder::new()
            .initial_window_size(INITIAL_STREAM_WINDOW)
            .initial_connection_window_size(INITIAL_CONNECTION_WINDOW)
            .max_frame_size(super::MAX_FRAME_SIZE)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            // A CONNECT has a few short headers; h2's default is 16 MiB.
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake::<_, Bytes>(tls);
        let timeout = self.handshake_timeout;
        let mut conn = tokio::time::timeout(timeout, h2_handshake)
            .await
            .map_err(|_| ServerError::HandshakeTimeout(timeout))??;
        loop {
            let next = tokio::select! {
                next = conn.accept() => next,
                () = &mut idle, if !going_away && !winding_down => {
                    if Arc::strong_count(&open_tunnels) > 1 {
                        // Tunnels, but no new one for a while: not one of
                        // the identity's connections in use.
                        identity_place = None;
                        idle.as_mut().reset(tokio::time::Instant::now() + self.limits.idle);
                    } else {
                        debug!(%peer, peer_id = %peer_id, "no tunnel for {:?}: GOAWAY", self.limits.idle);
                        conn.graceful_shutdown();
                        going_away = true;
                    }
                    continue;
                }
                () = &mut expiry, if !going_away => {
                    debug!(%peer, peer_id = %peer_id, "the peer certificate is past its notAfter: GOAWAY, no new tunnels on this connection");
                    if !winding_down {
                        conn.graceful_shutdown();
                    }
                    going_away = true;
                    continue;
                }
                // The agent stops or hands over: the peer takes new tunnels
                // elsewhere; streams h2 still delivers (sent before the peer
                // saw the GOAWAY) are served.
                () = &mut draining, if !winding_down => {
                    debug!(%peer, peer_id = %peer_id, "draining: GOAWAY");
                    if !going_away {
                        conn.graceful_shutdown();
                    }
                    winding_down = true;
                    continue;
                }
            };
            let Some(next) = next else { break };
            let (request, respond) = match next {
                Ok(pair) => pair,
                Err(e) => {
                    debug!(%peer, error = %e, "hbone connection error");
                    return Err(e.into());
                }
            };
            if going_away {
                // A peer that ignores the GOAWAY gets no new tunnel.
                let mut respond = respond;
                respond.send_reset(h2::Reason::REFUSED_STREAM);
                drop(request);
                continue;
            }
            let per_identity = self.limits.tunnels_per_identity;
            if identity_place.is_none() {
                identity_place = shares.connections.admit_as(identity.clone(), share).ok();
                if identity_place.is_none() {
                    let why = format!("this identity holds {share} connections from this source in use, the most it may: use one of those");
                    debug!(%peer, peer_id = %peer_id, "hbone: {why}");
                    self.refused("identity_limit");
                    let mut respond = respond;
                    send_refusal(&mut respond, &Refusal::new(503, why));
                    continue;
                }
            }
            let admitted = tunnels
                .admit(peer.ip(), self.limits.tunnels_per_source)
                .map_err(|_| {
                    let limit = self.limits.tunnels_per_source;
                    format!("this source has {limit} tunnels open, the most it may")
                })
                .and_then(|by_source| {
                    let by_identity = shares.tunnels.admit_as(identity.clone(), per_identity);
                    let why = || format!("this identity has {per_identity} tunnels open from this source, the most it may");
                    Ok((by_source, by_identity.map_err(|_| why())?))
                });
            let tunnel = match admitted {
                Ok(places) => places,
                Err(why) => {
                    debug!(%peer, peer_id = %peer_id, "hbone: {why}");
                    self.refused("tunnel_limit");
                    let mut respond = respond;
                    send_refusal(&mut respond, &Refusal::new(503, why));
                    continue;
                }
            };
            idle.as_mut()
                .reset(tokio::time::Instant::now() + self.limits.idle);
            let open = open_tunnels.clone();
            let inner = self.clone();
            let peer_id = peer_id.clone();
            let span = tracing::info_span!(
                "stream",
                id = crate::proxy::next_conn_id(),
                peer = %peer_id,
                target = request.uri().authority().map_or("", |a| a.as_str()),
            );
            tokio::spawn(
                async move {
                    let _places = (tunnel, open);
                    inner.serve_stream(request, respond, &peer_id).await;
                }
                .instrument(span),
            );
        }
        Ok(())
    }

    async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> Result<(tokio_rustls::server::TlsStream<super::Wire>, String), ServerError> {
        let timeout = self.handshake_timeout;
        let mut tls = tokio::time::timeout(timeout, self.acceptor.accept(super::wire(tcp)))
            .await
            .map_err(|_| ServerError::HandshakeTimeout(timeout))?
            .map_err(ServerError::Handshake)?;
        tls.get_mut().1.set_buffer_limit(Some(super::TLS_WRITE));
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(ALPN_H2) {
            return Err(ServerError::NoH2Alpn);
        }
        let peer_id = tls::peer_spiffe_id(session.peer_certificates().unwrap_or_default())?;
        Ok((tls, peer_id))
    }

    async fn serve_stream(
        &self,
        request: Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        peer_id: &str,
    ) {
        let local = &self.local_id;
        let authority = request.uri().authority().map(|a| a.as_str());
        let target = match classify(request.method(), authority) {
            Classified::Connect(target) => target,
            Classified::Reject(refusal) => {
                debug!(peer = peer_id, method = %request.method(), reason = %refusal.reason,
                    "hbone request rejected");
                send_refusal(&mut respond, &refusal);
                return;
            }
        };
        let (parts, body) = request.into_parts();
        let connect = ConnectRequest {
            peer_id: peer_id.to_string(),
            target,
            headers: parts.headers,
        };
        let mut upstream = match self.handler.connect(connect).await {
            Ok(upstream) => upstream,
            Err(refusal) => {
                info!(src = peer_id, dst = %local, %target, status = refusal.status,
                    reason = %refusal.reason, "hbone tunnel refused");
                send_refusal(&mut respond, &refusal);
                return;
            }
        };
        let send = match respond.send_response(Response::new(()), false) {
            Ok(send) => send,
            Err(e) => {
                debug!(src = peer_id, %target, error = %e, "hbone stream gone before 200");
                return;
            }
        };
        let mut tunnel = HboneStream::new(send, body);
        match crate::splice::tunnel::splice_tunnel(&mut upstream, &mut tunnel).await {
            Ok((down, up)) => {
                debug!(src = peer_id, %target, bytes_in = up, bytes_out = down, "hbone tunnel closed")
            }
            Err(e) => debug!(src = peer_id, %target, error = %e, "hbone tunnel broken"),
        }
    }
}

fn send_refusal(respond: &mut h2::server::SendResponse<Bytes>, refusal: &Refusal) {
    let mut response = Response::new(());
    *response.status_mut() = refusal_status(refusal.status);
    response
        .headers_mut()
        .insert(REASON_HEADER, reason_header_value(&refusal.reason));
    // The peer may already have reset the stream; nothing more to do then.
    let _ = respond.send_response(response, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_accepts_connect_to_ip_port() {
        assert_eq!(
            classify(&Method::CONNECT, Some("10.0.0.1:8080")),
            Classified::Connect("10.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            classify(&Method::CONNECT, Some("[::1]:80")),
            Classified::Connect("[::1]:80".parse().unwrap())
        );
    }

    #[test]
    fn classify_rejects_other_methods_and_targets() {
        assert!(matches!(
            classify(&Method::GET, Some("10.0.0.1:80")),
            Classified::Reject(Refusal { status: 405, .. })
        ));
        for bad in [None, Some("web:80"), Some("10.0.0.1"), Some("10.0.0.1:0")] {
            assert!(matches!(
                classify(&Method::CONNECT, bad),
                Classified::Reject(Refusal { status: 400, .. })
            ));
        }
    }

    #[test]
    fn refusal_status_is_never_success() {
        assert_eq!(refusal_status(403), StatusCode::FORBIDDEN);
        assert_eq!(refusal_status(200), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(refusal_status(101), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(refusal_status(7), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn reason_header_is_sanitized() {
        assert_eq!(
            reason_header_value("denied by intention"),
            "denied by intention"
        );
        assert_eq!(reason_header_value("a\nb\u{e9}"), "a?b?");
    }
}
