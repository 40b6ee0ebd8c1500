//! The outbound side of HBONE: a pool of mutual-TLS HTTP/2 connections to
//! other nodes' agents, and CONNECT tunnels over them.
//!
//! Connections are pooled per (source SPIFFE id, destination node address):
//! the TLS session presents the source workload's certificate, so two
//! workloads never share one. Each connection carries many CONNECT streams.
//! Concurrent callers for the same key wait for one dial instead of racing.
//! A connection whose driver has ended (peer closed, GOAWAY, I/O error) is
//! evicted, and the next call dials anew; a reused connection that fails
//! before the CONNECT was sent is redialed once within the same call.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::stream::{HboneStream, StreamPlace};
use super::tls::{self, Identity, TlsError, TrustBundle, ALPN_H2};
use super::{
    INITIAL_CONNECTION_WINDOW, INITIAL_STREAM_WINDOW, MAX_CONCURRENT_STREAMS, REASON_HEADER,
};

/// Errors of opening a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connecting to {node}: {source}")]
    Dial { node: SocketAddr, source: io::Error },
    #[error("TLS handshake with {node}: {source}")]
    Handshake { node: SocketAddr, source: io::Error },
    #[error("{node} did not negotiate ALPN h2")]
    NoH2Alpn { node: SocketAddr },
    #[error("TLS configuration: {0}")]
    Tls(#[from] TlsError),
    #[error("{0:?} is not a DNS name to send as SNI")]
    ServerName(String),
    #[error("HTTP/2 with {node}: {source}")]
    H2 { node: SocketAddr, source: h2::Error },
    #[error("building CONNECT request: {0}")]
    Request(#[from] http::Error),
    #[error("tunnel refused with status {status}: {reason}")]
    Refused { status: u16, reason: String },
    #[error("tunnel not established within {0:?}")]
    Timeout(Duration),
}

impl HboneError {
    /// For a failed TLS handshake, a short reason for metrics:
    /// `wrong_node` (a valid certificate, but not of the node meant),
    /// `bad_certificate`, or `handshake`; `None` for other errors.
    pub fn handshake_failure(&self) -> Option<&'static str> {
        let HboneError::Handshake { source, .. } = self else {
            return None;
        };
        let text = source.to_string();
        Some(if text.contains(tls::WRONG_NODE) {
            "wrong_node"
        } else if text.to_ascii_lowercase().contains("certificate") {
            "bad_certificate"
        } else {
            "handshake"
        })
    }
}

/// A CONNECT response's verdict: pure, from status and `x-weft-reason`.
pub(crate) fn check_response(status: StatusCode, reason: Option<&[u8]>) -> Result<(), HboneError> {
    if status == StatusCode::OK {
        return Ok(());
    }
    let reason = reason
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("").to_string());
    Err(HboneError::Refused {
        status: status.as_u16(),
        reason,
    })
}

/// Whether a stream failed without the peer processing it: refused
/// (REFUSED_STREAM), or beyond a GOAWAY's last stream id.
fn not_processed(e: &h2::Error) -> bool {
    e.reason() == Some(h2::Reason::REFUSED_STREAM) || (e.is_go_away() && e.is_remote())
}

/// (source SPIFFE id, address dialed, the node's expected SPIFFE id, SNI).
type PoolKey = (String, SocketAddr, Arc<str>, Arc<str>);

/// The agent a tunnel goes through: where it listens and the SPIFFE id its
/// certificate must carry (`spiffe://<td>/ns/default/dc/<dc>/node/<node>`),
/// so that only the node meant answers, not any holder of a certificate of
/// the trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodePeer {
    /// Where to dial: the node's agent, or a mesh gateway on the way to it.
    pub addr: SocketAddr,
    pub spiffe_id: Arc<str>,
    /// The server name sent (`<node>.<dc>.node.<trust-domain>`): what
    /// gateways route on. Not what is verified (the SPIFFE id is).
    pub sni: Arc<str>,
}

impl NodePeer {
    /// The agent of `node` in `dc`, dialed at `addr`.
    pub fn new(addr: SocketAddr, trust_domain: &str, dc: &str, node: &str) -> Self {
        NodePeer {
            addr,
            spiffe_id: weft_api::spiffe::node_id(trust_domain, dc, node).into(),
            sni: weft_api::gateway::node_sni(node, dc, trust_domain).into(),
        }
    }
}

/// One pooled TLS+h2 connection.
#[derive(Clone)]
struct PooledConn {
    id: u64,
    send: h2::client::SendRequest<Bytes>,
    /// Set when the connection's driver task ends.
    closed: Arc<AtomicBool>,
    /// Tunnels open (or being opened) on it.
    streams: Arc<AtomicUsize>,
    /// The pool's count of tunnels on all its connections.
    streams_gauge: Gauge,
    /// The leaf certificate this side presented.
    local_cert: rustls::pki_types::CertificateDer<'static>,
    /// When the first of the two leaves expires: no new tunnels after it.
    deadline: Option<SystemTime>,
}

impl PooledConn {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Whether new tunnels from `source` may use this connection: it was
    /// authenticated with `source`'s current certificate (a renewed one
    /// gets a new connection) and neither side's certificate has expired.
    /// Tunnels already on a retired connection run to their end.
    fn current_for(&self, source: &Identity, now: SystemTime) -> bool {
        source.cert_chain.first() == Some(&self.local_cert)
            && self.deadline.is_some_and(|d| now < d)
    }

    /// Takes a place for one more tunnel if the connection has one.
    fn reserve(&self, limit: usize) -> Option<StreamPlace> {
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| {
                self.streams_gauge.inc();
                StreamPlace::new(self.streams.clone(), self.streams_gauge.clone())
            })
    }
}

/// What the pool counts for `/metrics` (registered by
/// [`crate::metrics::AgentMetrics`]; a pool made without it counts into
/// metrics nobody reads).
#[derive(Debug, Clone)]
pub struct TunnelMetrics {
    /// TLS connections dialed to other nodes' agents.
    pub dials: Counter,
    /// Dial to usable connection: TCP connect, TLS and h2 handshakes.
    pub handshake_seconds: Histogram,
    /// Pooled connections open now.
    pub connections: Gauge,
    /// Tunnels open now on pooled connections.
    pub streams: Gauge,
}

impl Default for TunnelMetrics {
    fn default() -> Self {
        TunnelMetrics {
            dials: Counter::default(),
            handshake_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            connections: Gauge::default(),
            streams: Gauge::default(),
        }
    }
}

/// The connections of one key; its async lock makes concurrent callers
/// share a dial. A connection whose tunnels reach the streams limit gets a
/// sibling, so there is no fixed cap of tunnels per source and node.
type Slot = Arc<tokio::sync::Mutex<Vec<PooledConn>>>;

struct PoolInner {
    bundle: TrustBundle,
    slots: Mutex<HashMap<PoolKey, Slot>>,
    next_id: AtomicU64,
    dials: AtomicU64,
    /// Tunnels per connection: the servers' MAX_CONCURRENT_STREAMS.
    streams_per_connection: usize,
    metrics: TunnelMetrics,
    /// The address connections leave from, when it is one of this host's:
    /// the node's registered address, which peers give the places of the
    /// view's nodes (on a host with several addresses the kernel might
    /// pick another, which peers would take for a stranger's).
    from: Option<std::net::IpAddr>,
}

/// Connects to `node` from `from` when this host has that address (and
/// `node` is of its family); from whatever address the kernel picks
/// otherwise.
async fn connect_from(
    from: Option<std::net::IpAddr>,
    node: SocketAddr,
) -> std::io::Result<TcpStream> {
    let Some(from) = from.filter(|f| f.is_ipv4() == node.is_ipv4()) else {
        return TcpStream::connect(node).await;
    };
    let socket = match node {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    match socket.bind(SocketAddr::new(from, 0)) {
        Ok(()) => socket.connect(node).await,
        // Not this host's address (NAT): the kernel's choice.
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => TcpStream::connect(node).await,
        Err(e) => Err(e),
    }
}

/// Pooled HBONE connections to other nodes. Cloning shares the pool.
#[derive(Clone)]
pub struct HbonePool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for HbonePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HbonePool")
            .field("dials", &self.dials())
            .finish_non_exhaustive()
    }
}

impl HbonePool {
    /// A pool whose connections verify servers against `bundle` (rotations
    /// apply to later dials).
    pub fn new(bundle: TrustBundle) -> Self {
        Self::with_metrics(bundle, TunnelMetrics::default())
    }

    /// [`HbonePool::new`], counting into `metrics`.
    pub fn with_metrics(bundle: TrustBundle, metrics: TunnelMetrics) -> Self {
        HbonePool {
            inner: Arc::new(PoolInner {
                bundle,
                slots: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                streams_per_connection: MAX_CONCURRENT_STREAMS as usize,
                dials: AtomicU64::new(0),
                metrics,
                from: None,
            }),
        }
    }

    /// A pool whose connections leave from `ip` (the node's advertised
    /// address) where this host has it; from whatever address the kernel
    /// picks where it does not (behind NAT).
    pub fn leaving_from(self, ip: std::net::IpAddr) -> Self {
        let mut inner = Arc::into_inner(self.inner).expect("a new pool is not shared");
        inner.from = (!ip.is_unspecified()).then_some(ip);
        HbonePool {
            inner: Arc::new(inner),
        }
    }

    /// A pool that opens another connection once one carries `limit`
    /// tunnels (tests; the default is the servers' stream limit).
    #[cfg(test)]
    pub(crate) fn with_streams_per_connection(bundle: TrustBundle, limit: usize) -> Self {
        let pool = Self::new(bundle);
        let mut inner = Arc::into_inner(pool.inner).expect("a new pool is not shared");
        inner.streams_per_connection = limit;
        HbonePool {
            inner: Arc::new(inner),
        }
    }

    /// How many TLS connections this pool has dialed successfully.
    pub fn dials(&self) -> u64 {
        self.inner.dials.load(Ordering::Relaxed)
    }

    /// Opens a tunnel from `source` to `target` through the agent at `node`,
    /// reusing a pooled connection when there is a live one. The whole
    /// operation (dial, handshake, CONNECT, response) is bounded by `timeout`.
    pub async fn connect(
        &self,
        source: &Identity,
        node: &NodePeer,
        target: SocketAddr,
        timeout: Duration,
    ) -> Result<HboneStream, HboneError> {
        tokio::time::timeout(timeout, self.connect_inner(source, node, target))
            .await
            .map_err(|_| HboneError::Timeout(timeout))?
    }

    async fn connect_inner(
        &self,
        source: &Identity,
        peer: &NodePeer,
        target: SocketAddr,
    ) -> Result<HboneStream, HboneError> {
        let node = peer.addr;
        let key: PoolKey = (
            source.spiffe_id.clone(),
            node,
            peer.spiffe_id.clone(),
            peer.sni.clone(),
        );
        let mut retried = false;
        loop {
            let (conn, place, fresh) = self.checkout(&key, source).await?;
            let h2_err = |source| HboneError::H2 { node, source };
            // Failures before the request is sent are safe to retry on a new
            // connection once, when the pooled one turned out to be dead.
            let sent = match conn.send.clone().ready().await {
                Ok(mut send) => {
                    let request = Request::builder()
                        .method(Method::CONNECT)
                        .uri(target.to_string())
                        .body(())?;
                    send.send_request(request, false)
                }
                Err(e) => Err(e),
            };
            let (response, send_stream) = match sent {
                Ok(pair) => pair,
                Err(e) => {
                    self.evict(&key, conn.id).await;
                    if fresh || retried {
                        return Err(h2_err(e));
                    }
                    debug!(%node, error = %e, "pooled hbone connection dead, redialing");
                    retried = true;
                    continue;
                }
            };
            let response = match response.await {
                Ok(response) => response,
                Err(e) => {
                    if conn.is_closed() || e.is_go_away() || e.is_io() {
                        self.evict(&key, conn.id).await;
                    }
                    // The peer did not take the stream (it is going away:
                    // an agent draining or handing over): nothing was
                    // processed, so a new connection may carry it.
                    if not_processed(&e) && !retried {
                        debug!(%node, error = %e, "tunnel not taken by a departing peer, redialing");
                        retried = true;
                        continue;
                    }
                    return Err(h2_err(e));
                }
            };
            check_response(
                response.status(),
                response.headers().get(REASON_HEADER).map(|v| v.as_bytes()),
            )?;
            return Ok(HboneStream::new(send_stream, response.into_body()).holding(place));
        }
    }

    /// A live connection for `key` with room for one more tunnel, and that
    /// room; dials one if none has room. `true` when it was dialed by this
    /// call.
    async fn checkout(
        &self,
        key: &PoolKey,
        source: &Identity,
    ) -> Result<(PooledConn, StreamPlace, bool), HboneError> {
        let limit = self.inner.streams_per_connection;
        let slot = self.slot(key);
        let mut conns = slot.lock().await;
        let now = SystemTime::now();
        conns.retain(|c| !c.is_closed() && c.current_for(source, now));
        for conn in conns.iter() {
            if let Some(place) = conn.reserve(limit) {
                return Ok((conn.clone(), place, false));
            }
        }
        if conns.is_empty() {
            self.prune();
        }
        let conn = self.dial(source, key.1, &key.2, &key.3).await?;
        let place = conn
            .reserve(limit)
            .expect("a new connection has room for a tunnel");
        conns.push(conn.clone());
        Ok((conn, place, true))
    }

    fn slot(&self, key: &PoolKey) -> Slot {
        let mut slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(key.clone()).or_default().clone()
    }

    /// Forgets slots whose connections are gone and that nobody is using.
    fn prune(&self) {
        let mut slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|_, slot| {
            Arc::strong_count(slot) > 1
                || slot
                    .try_lock()
                    .map(|conns| conns.iter().any(|c| !c.is_closed()))
                    .unwrap_or(true)
        });
    }

    async fn evict(&self, key: &PoolKey, id: u64) {
        let slot = self.slot(key);
        slot.lock().await.retain(|c| c.id != id);
    }

    async fn dial(
        &self,
        source: &Identity,
        node: SocketAddr,
        expected: &str,
        sni: &str,
    ) -> Result<PooledConn, HboneError> {
        let started = std::time::Instant::now();
        let tcp = connect_from(self.inner.from, node)
            .await
            .map_err(|source| HboneError::Dial { node, source })?;
        let _ = tcp.set_nodelay(true);
        let connector =
            TlsConnector::from(tls::client_config(source, &self.inner.bundle, expected)?);
        // The name is sent for gateways to route on; it is not checked
        // (the SPIFFE id is).
        let name = ServerName::try_from(sni.to_string())
            .map_err(|_| HboneError::ServerName(sni.to_string()))?;
        let mut tls = connector
            .connect(name, super::wire(tcp))
            .await
            .map_err(|source| HboneError::Handshake { node, source })?;
        tls.get_mut().1.set_buffer_limit(Some(super::TLS_WRITE));
        let session = tls.get_ref().1;
        if session.alpn_protocol() != Some(ALPN_H2) {
            return Err(HboneError::NoH2Alpn { node });
        }
        let local_cert = source
            .cert_chain
            .first()
            .cloned()
            .unwrap_or_else(|| rustls::pki_types::CertificateDer::from(Vec::new()));
        let peer_leaf = session.peer_certificates().and_then(|c| c.first());
        let deadline = tls::session_deadline(Some(&local_cert), peer_leaf);
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(INITIAL_STREAM_WINDOW)
            .initial_connection_window_size(INITIAL_CONNECTION_WINDOW)
            .max_frame_size(super::MAX_FRAME_SIZE)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| HboneError::H2 { node, source })?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let closed = Arc::new(AtomicBool::new(false));
        let closed_by_driver = closed.clone();
        let metrics = &self.inner.metrics;
        metrics
            .handshake_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.dials.inc();
        metrics.connections.inc();
        let open = metrics.connections.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%node, error = %e, "hbone connection closed with error");
            }
            closed_by_driver.store(true, Ordering::Release);
            open.dec();
        });
        self.inner.dials.fetch_add(1, Ordering::Relaxed);
        debug!(%node, source = %source.spiffe_id, id, "hbone connection established");
        Ok(PooledConn {
            id,
            send,
            closed,
            streams: Arc::new(AtomicUsize::new(0)),
            streams_gauge: metrics.streams.clone(),
            local_cert,
            deadline,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_is_the_only_success() {
        assert!(check_response(StatusCode::OK, None).is_ok());
        match check_response(StatusCode::FORBIDDEN, Some(b"denied by intention")) {
            Err(HboneError::Refused { status, reason }) => {
                assert_eq!(status, 403);
                assert_eq!(reason, "denied by intention");
            }
            other => panic!("unexpected {other:?}"),
        }
        match check_response(StatusCode::METHOD_NOT_ALLOWED, None) {
            Err(HboneError::Refused { status, reason }) => {
                assert_eq!(status, 405);
                assert_eq!(reason, "Method Not Allowed");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(check_response(StatusCode::NO_CONTENT, None).is_err());
    }
}
