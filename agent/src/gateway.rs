//! A mesh gateway (`[gateway]` in agent.toml): forwards TLS connections
//! between datacenters by the server name (SNI) of their ClientHello,
//! without terminating TLS. The two ends authenticate each other; the
//! gateway reads the ClientHello and nothing after it.
//!
//! It listens twice:
//! - on its LAN address, for this datacenter's agents and servers: a name
//!   of another datacenter goes to one of that datacenter's gateways (their
//!   WAN addresses come from the federation, in the view); a name of this
//!   datacenter goes to the node or the servers;
//! - on its WAN address, for other datacenters' gateways: only names of
//!   this datacenter are taken, so a gateway is never a hop to a third
//!   datacenter (no loops, no open relay).
//!
//! Where each name goes is [`weft_api::gateway::hop`]; this module does the
//! I/O: read the hello (bounded in size and time), dial (trying the next
//! address when one refuses), send what was read, splice.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;
use weft_api::client_hello::{self, Parsed};
use weft_api::gateway::{hop, parse_sni, Destination, Hop};

use crate::accept::AcceptErrors;
use crate::admission::Places;
use crate::shared_view::SharedView;

/// How long a client has to send its whole ClientHello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one dial of the next hop may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Addresses tried for one connection (several gateways of a datacenter,
/// several servers).
pub const DIAL_ATTEMPTS: usize = 3;
/// Connections one gateway carries at once on each listener; more are
/// closed at accept. The WAN cannot starve the LAN, nor the other way.
pub const MAX_CONNECTIONS: usize = 8_192;
/// Connections one client address may hold at once on a listener.
pub const MAX_PER_CLIENT: usize = 256;
/// How many times [`MAX_PER_CLIENT`] another datacenter's gateway may hold
/// on the WAN listener: it carries its whole datacenter's connections, so
/// that one unauthenticated host there filling its own share on that
/// gateway's LAN side cannot use up the datacenter's.
pub const REMOTE_GATEWAY_FACTOR: usize = 16;

/// Whether `ip`, arriving on the `side` listener, is another datacenter's
/// gateway (by the federation's addresses; only on the WAN).
pub fn is_remote_gateway(
    side: Side,
    ip: std::net::IpAddr,
    federation: &std::collections::BTreeMap<String, Vec<std::net::SocketAddr>>,
) -> bool {
    // Compared canonically: on a dual-stack socket an IPv4 peer arrives
    // v4-mapped, and federation states hold IPv4 addresses as such.
    let ip = ip.to_canonical();
    side == Side::Wan && (federation.values().flatten()).any(|a| a.ip().to_canonical() == ip)
}

/// The connections `ip` may hold at once on the `side` listener: more for
/// another datacenter's gateway on the WAN.
pub fn per_client_limit(
    side: Side,
    ip: std::net::IpAddr,
    federation: &std::collections::BTreeMap<String, Vec<std::net::SocketAddr>>,
) -> usize {
    match is_remote_gateway(side, ip, federation) {
        true => MAX_PER_CLIENT * REMOTE_GATEWAY_FACTOR,
        false => MAX_PER_CLIENT,
    }
}
/// How long a connection may stay silent once one side closed: what a
/// gateway carries is TLS, whose ends close together, and a client that
/// keeps a connection open after the next hop left it (a hop that refused
/// its handshake) must not hold its place for good.
pub const HALF_CLOSED_LIMIT: Duration = Duration::from_secs(30);

/// Which listener a connection arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Lan,
    Wan,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("reading the ClientHello: {0}")]
    Read(std::io::Error),
    #[error("no ClientHello within {HELLO_TIMEOUT:?}")]
    HelloTimeout,
    #[error("not a TLS ClientHello: {0}")]
    Hello(#[from] client_hello::HelloError),
    #[error("{0}")]
    Sni(#[from] weft_api::gateway::SniError),
    #[error(
        "{0} arrived from the WAN: only this datacenter's nodes and servers are reached from there"
    )]
    Transit(String),
    #[error("no route to {0}")]
    NoRoute(String),
    #[error("{0} leads back to this datacenter's gateways")]
    Loop(String),
    #[error("dialing {what}: {error}")]
    Dial { what: String, error: String },
}

impl GatewayError {
    /// A short label for the refusal counter.
    fn reason(&self) -> &'static str {
        match self {
            GatewayError::Read(_) => "read",
            GatewayError::HelloTimeout => "hello_timeout",
            GatewayError::Hello(_) => "not_tls",
            GatewayError::Sni(_) => "unknown_name",
            GatewayError::Transit(_) => "wan_transit",
            GatewayError::NoRoute(_) => "no_route",
            GatewayError::Loop(_) => "loop",
            GatewayError::Dial { .. } => "unreachable",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DcLabels {
    /// The datacenter the connection goes to.
    datacenter: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DcDirectionLabels {
    datacenter: String,
    /// `sent` toward the destination, `received` back from it.
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The gateway's metrics (registered by [`crate::metrics::AgentMetrics`]).
#[derive(Debug, Clone, Default)]
pub struct GatewayMetrics {
    connections: Family<DcLabels, Counter>,
    active: Family<DcLabels, Gauge>,
    bytes: Family<DcDirectionLabels, Counter>,
    refused: Family<ReasonLabels, Counter>,
}

impl GatewayMetrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "gateway_connections",
            "Connections the mesh gateway forwarded, by the datacenter they went to",
            self.connections.clone(),
        );
        registry.register(
            "gateway_connections_active",
            "Connections the mesh gateway carries now, by the datacenter they go to",
            self.active.clone(),
        );
        registry.register(
            "gateway_bytes",
            "Bytes the mesh gateway carried, by the datacenter of the destination and direction",
            self.bytes.clone(),
        );
        registry.register(
            "gateway_refused",
            "Connections the mesh gateway closed without forwarding, by reason",
            self.refused.clone(),
        );
    }
}

/// What a gateway needs: the view (nodes, other datacenters' gateways),
/// where this datacenter's servers take federation connections, and its
/// datacenter.
pub struct Gateway {
    pub datacenter: String,
    pub view: Arc<SharedView>,
    /// Port of the agents' inbound (HBONE) listeners.
    pub inbound_port: u16,
    /// The servers' federation addresses (`host:port`).
    pub servers: Vec<String>,
    pub metrics: GatewayMetrics,
    pub drain: Arc<crate::drain::Drain>,
    /// Connections carried now on the LAN and the WAN listener, against
    /// [`MAX_CONNECTIONS`] each and [`per_client_limit`] per client. Other
    /// datacenters' gateways have places of their own on the WAN: hosts
    /// anyone may run, each filling its share, cannot take theirs.
    lan_places: Places,
    wan_places: Places,
    remote_gateway_places: Places,
    /// This gateway's own listeners: never a next hop.
    own: Vec<std::net::SocketAddr>,
}

impl Gateway {
    pub fn new(
        datacenter: String,
        view: Arc<SharedView>,
        inbound_port: u16,
        servers: Vec<String>,
        metrics: GatewayMetrics,
        drain: Arc<crate::drain::Drain>,
        own: Vec<std::net::SocketAddr>,
    ) -> Arc<Self> {
        Arc::new(Gateway {
            datacenter,
            view,
            inbound_port,
            servers,
            metrics,
            drain,
            lan_places: Places::new(MAX_CONNECTIONS),
            wan_places: Places::new(MAX_CONNECTIONS),
            remote_gateway_places: Places::new(MAX_CONNECTIONS),
            own,
        })
    }

    /// Accepts on `listener` (the `side` one) until the task is stopped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, side: Side) {
        let mut errors = AcceptErrors::new(match side {
            Side::Lan => "gateway-lan",
            Side::Wan => "gateway-wan",
        });
        let mut next_id: u64 = 0;
        loop {
            let (stream, peer) = errors.accept(&listener).await;
            let federation = &self.view.load().federation;
            let places = match side {
                Side::Lan => &self.lan_places,
                Side::Wan if is_remote_gateway(side, peer.ip(), federation) => {
                    &self.remote_gateway_places
                }
                Side::Wan => &self.wan_places,
            };
            let limit = per_client_limit(side, peer.ip(), federation);
            let place = match places.admit(peer.ip(), limit) {
                Ok(place) => place,
                Err(refused) => {
                    self.refuse_count(refused.reason());
                    continue;
                }
            };
            next_id += 1;
            let span = tracing::info_span!("gateway", id = next_id, %peer, side = ?side);
            let gateway = self.clone();
            let tracked = self.drain.track();
            tokio::spawn(
                async move {
                    let _place = place;
                    let _tracked = tracked;
                    if let Err(e) = gateway.carry(stream, side).await {
                        gateway.refuse_count(e.reason());
                        tracing::debug!("refused: {e}");
                    }
                }
                .instrument(span),
            );
        }
    }

    fn refuse_count(&self, reason: &'static str) {
        self.metrics
            .refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Forwards one connection, or says why not.
    async fn carry(&self, mut client: TcpStream, side: Side) -> Result<(), GatewayError> {
        let _ = client.set_nodelay(true);
        let (hello, destination) =
            tokio::time::timeout(HELLO_TIMEOUT, self.read_hello(&mut client))
                .await
                .map_err(|_| GatewayError::HelloTimeout)??;
        let next = hop(&destination, &self.datacenter);
        if side == Side::Wan && matches!(next, Hop::RemoteGateway(_)) {
            return Err(GatewayError::Transit(format!("{destination:?}")));
        }
        let candidates = self.candidates(&next)?;
        let mut upstream = None;
        let mut last = String::new();
        for addr in candidates.iter().take(DIAL_ATTEMPTS) {
            match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr.as_str())).await {
                Ok(Ok(s)) => {
                    upstream = Some(s);
                    break;
                }
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: no answer within {DIAL_TIMEOUT:?}"),
            }
        }
        let Some(mut upstream) = upstream else {
            return Err(GatewayError::Dial {
                what: format!("{next:?}"),
                error: last,
            });
        };
        let _ = upstream.set_nodelay(true);
        let dc = DcLabels {
            datacenter: destination.datacenter().to_string(),
        };
        self.metrics.connections.get_or_create(&dc).inc();
        let active = self.metrics.active.get_or_create(&dc).clone();
        active.inc();
        tracing::debug!(?destination, "forwarding");
        let result = async {
            upstream.write_all(&hello).await?;
            let sizes = crate::splice::Sizes::DEFAULT;
            crate::splice::Splice::new(&mut client, &mut upstream, sizes, None)
                .half_closed_limit(HALF_CLOSED_LIMIT)
                .await
        }
        .await;
        active.dec();
        let (sent, received) = match result {
            Ok(counts) => counts,
            Err(e) => {
                tracing::debug!("connection ended: {e}");
                (0, 0)
            }
        };
        let bytes = |direction| DcDirectionLabels {
            datacenter: dc.datacenter.clone(),
            direction,
        };
        let hello_len = hello.len() as u64;
        self.metrics
            .bytes
            .get_or_create(&bytes("sent"))
            .inc_by(sent + hello_len);
        self.metrics
            .bytes
            .get_or_create(&bytes("received"))
            .inc_by(received);
        Ok(())
    }

    /// Reads until a whole ClientHello is in: the bytes read, and where its
    /// name leads.
    async fn read_hello(
        &self,
        client: &mut TcpStream,
    ) -> Result<(Vec<u8>, Destination), GatewayError> {
        let mut buf = Vec::with_capacity(2048);
        loop {
            if let Parsed::Hello { server_name, .. } = client_hello::parse(&buf)? {
                let trust_domain = self.view.load().trust_domain.clone();
                let destination = parse_sni(server_name.as_deref(), &trust_domain)?;
                return Ok((buf, destination));
            }
            let mut chunk = [0u8; 4096];
            let n = client.read(&mut chunk).await.map_err(GatewayError::Read)?;
            if n == 0 {
                return Err(GatewayError::Read(std::io::ErrorKind::UnexpectedEof.into()));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The addresses to dial for `next`, in the order to try them.
    fn candidates(&self, next: &Hop) -> Result<Vec<String>, GatewayError> {
        let view = self.view.load();
        let mut found: Vec<String> = match next {
            Hop::LocalNode(node) => {
                let n = view
                    .nodes
                    .get(node.as_str())
                    .filter(|n| n.datacenter == self.datacenter)
                    .filter(|_| !view.node_is_external(node) && view.node_up(node))
                    .ok_or_else(|| GatewayError::NoRoute(format!("node {node}")))?;
                vec![format!("{}:{}", n.address, self.inbound_port)]
            }
            Hop::LocalServers => self.servers.clone(),
            Hop::RemoteGateway(dc) => {
                // Never back to a gateway of this datacenter (a federation
                // state naming one would make a gateway dial itself).
                // Compared in canonical form: a mapped IPv6 address is the
                // IPv4 one.
                let canonical = |a: std::net::SocketAddr| {
                    std::net::SocketAddr::new(a.ip().to_canonical(), a.port())
                };
                let local: Vec<std::net::SocketAddr> = view
                    .passing(weft_api::gateway::SERVICE)
                    .iter()
                    .filter_map(|i| i.socket_addr())
                    .chain(self.own.iter().copied())
                    .map(canonical)
                    .collect();
                let all = view.gateways_of(dc);
                if all.iter().any(|a| local.contains(&canonical(*a))) {
                    return Err(GatewayError::Loop(format!("datacenter {dc}")));
                }
                all.iter().map(|a| a.to_string()).collect()
            }
        };
        if found.is_empty() {
            return Err(GatewayError::NoRoute(format!("{next:?}")));
        }
        // Spread connections over the datacenter's gateways or servers.
        let start = rand::random::<u32>() as usize % found.len();
        found.rotate_left(start);
        Ok(found)
    }
}

/// Where this datacenter's servers take federation connections: the
/// agent's `servers` hosts at `port`.
pub fn server_addresses(servers: &[String], port: u16) -> Vec<String> {
    servers
        .iter()
        .map(|s| {
            let host = s.rsplit_once(':').map_or(s.as_str(), |(h, _)| h);
            format!("{host}:{port}")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_datacenters_gateway_holds_more_connections_on_the_wan_only() {
        let federation = [("dc2".to_string(), vec!["192.0.2.7:8443".parse().unwrap()])]
            .into_iter()
            .collect();
        let gateway: std::net::IpAddr = "192.0.2.7".parse().unwrap();
        let stranger: std::net::IpAddr = "192.0.2.8".parse().unwrap();
        let wan = MAX_PER_CLIENT * REMOTE_GATEWAY_FACTOR;
        assert_eq!(per_client_limit(Side::Wan, gateway, &federation), wan);
        // As a dual-stack socket gives it.
        let mapped: std::net::IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(per_client_limit(Side::Wan, mapped, &federation), wan);
        assert_eq!(
            per_client_limit(Side::Wan, stranger, &federation),
            MAX_PER_CLIENT
        );
        assert_eq!(
            per_client_limit(Side::Lan, gateway, &federation),
            MAX_PER_CLIENT
        );
    }

    #[test]
    fn servers_are_reached_at_their_federation_port() {
        assert_eq!(
            server_addresses(&["10.0.0.1:8502".into(), "[fd00::1]:8502".into()], 8302),
            vec!["10.0.0.1:8302".to_string(), "[fd00::1]:8302".to_string()]
        );
    }
}
