//! Outbound: a local workload's connection to a service. Picks a passing
//! instance (the resolver's `LoadBalancer`, or power of two choices over
//! open connections), then either
//! connects straight to it (same node: no TLS, but intentions are checked
//! here) or opens an HBONE tunnel to the instance's node, presenting the
//! source service's certificate. With no passing instance, or a refusal, the
//! workload's connection is reset at once. HTTP services with a router,
//! splitter or resolver subsets are routed request by request instead
//! ([`l7::serve_routed`]).
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use weft_api::config_entry::Protocol;
use weft_api::intention::ConnectionDecision;

use super::counted::Counted;
use super::l7::{self, L7Error};
use super::{InFlight, ProxyContext, CONNECT_TIMEOUT};
use crate::accept::AcceptErrors;
use crate::hbone::{HboneError, NodePeer};
use crate::intercept::Interception;
use crate::metrics::{Direction, Side};
use crate::splice::splice;
use crate::view::View;
use weft_api::catalog::ServiceInstance;

/// Where a connection goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Route {
    /// An instance on this node.
    Local(SocketAddr),
    /// An instance behind another node's agent; `remote` names the node's
    /// datacenter when it is another one.
    Tunnel {
        node: NodePeer,
        target: SocketAddr,
        remote: Option<Arc<str>>,
    },
}

impl Route {
    /// The instance's address.
    pub fn target(&self) -> SocketAddr {
        match self {
            Route::Local(addr) | Route::Tunnel { target: addr, .. } => *addr,
        }
    }

    /// How metrics and traffic reports name `service` reached by this
    /// route: `api`, or `api@dc2` in another datacenter.
    pub fn label(&self, service: &str) -> String {
        match self {
            Route::Tunnel {
                remote: Some(dc), ..
            } => format!("{service}@{dc}"),
            _ => service.to_string(),
        }
    }
}

/// Why a connection could not be carried.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("no passing instance of {0}")]
    NoInstance(String),
    #[error("denied: {0}")]
    Denied(String),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("tunnel: {0}")]
    Tunnel(#[from] HboneError),
    #[error("no certificate for {0}")]
    Identity(String),
    #[error("circuit breaker: {0}")]
    Overflow(#[from] crate::breaker::Overflow),
}

/// Picks the route for a connection from `source` at `peer` to `service`,
/// avoiding the instances at `failed` (tried already for this connection),
/// and names the service that answers (`service`, or where its resolver's
/// redirect or failover leads). A resolver's hash policies hash a
/// connection on its source address alone.
pub fn route_avoiding(
    ctx: &ProxyContext,
    (source, peer): (&str, Option<IpAddr>),
    (service, datacenter): (&str, Option<&str>),
    failed: &[SocketAddr],
) -> Result<(Route, String), OutboundError> {
    let view = ctx.view.read().expect("view lock");
    // The resolver's redirect and failover (to other datacenters too)
    // apply to connections as to requests.
    let start = weft_api::routing::Target::service_in(service, datacenter);
    let resolved = view.instances_of(
        &weft_api::routing::resolve(&view.entries, start),
        &ctx.datacenter,
    );
    let instances: Vec<&ServiceInstance> = resolved
        .instances
        .into_iter()
        .filter(|i| i.socket_addr().is_none_or(|a| !failed.contains(&a)))
        .collect();
    let answering = resolved.service.as_str();
    let hash = view.load_balancer(answering).and_then(|lb| {
        weft_api::load_balancer::hash_request(&lb.hash_policies, None, peer, 0).hash
    });
    let call = Call {
        source,
        upstream: service,
        service: answering,
    };
    // Another service answering (a redirect or failover): the intentions
    // must let the source reach it too. (An instance of it on another node
    // is judged there again; one on this node only here.)
    if answering != service {
        let refused = match view.decide_connection(ctx.caller(source), answering) {
            ConnectionDecision::Decided(d) if !d.allowed => Some(d.to_string()),
            ConnectionDecision::Decided(_) => None,
            ConnectionDecision::PerRequest => {
                Some(L7Error::NotHttp(view.protocol(answering)).to_string())
            }
        };
        if let Some(reason) = refused {
            return Err(OutboundError::Denied(format!("{answering}: {reason}")));
        }
    }
    let route = pick(
        ctx,
        &view,
        &instances,
        call,
        hash,
        resolved.datacenter.as_deref(),
    )?;
    Ok((route, resolved.service))
}

/// Who calls what: the calling service, the upstream it dialed (whose
/// `UpstreamConfig` applies: limits, passive health check, connect timeout)
/// and the service whose instance answers (the upstream, or where its
/// routes, splits, redirects or failovers lead; its resolver balances).
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub source: &'a str,
    pub upstream: &'a str,
    pub service: &'a str,
}

/// How many instances one connection is tried on when opening it fails
/// (nothing has been sent then): an instance whose agent stops or whose
/// node just died costs a retry, not a failed connection.
pub const CONNECT_ATTEMPTS: usize = 3;

impl OutboundError {
    /// Whether another instance may succeed where this failed: the instance
    /// or its node could not be reached. A policy refusal is final.
    pub fn worth_another_instance(&self) -> bool {
        match self {
            OutboundError::Connect { .. } => true,
            OutboundError::Tunnel(HboneError::Refused { status, .. }) => *status == 503,
            OutboundError::Tunnel(_) => true,
            _ => false,
        }
    }
}

/// Picks one of `instances` (of `call.service`: those the caller's passive
/// health check for the upstream has not ejected, then by the service's
/// resolver's `LoadBalancer` with the request's or connection's `hash`, or
/// power of two choices over open connections) and the way to it.
pub fn pick(
    ctx: &ProxyContext,
    view: &View,
    instances: &[&ServiceInstance],
    call: Call<'_>,
    hash: Option<u64>,
    datacenter: Option<&str>,
) -> Result<Route, OutboundError> {
    let Call {
        source,
        upstream,
        service,
    } = call;
    let remote = datacenter.filter(|dc| *dc != ctx.datacenter);
    // Instances of external nodes (no agent to tunnel to) are reached
    // outside the mesh, not through it (other datacenters share none).
    let all: Vec<(SocketAddr, &str)> = instances
        .iter()
        .filter(|i| remote.is_some() || !view.node_is_external(&i.node))
        .filter_map(|i| Some((i.socket_addr()?, i.node.as_str())))
        .collect();
    let addrs: Vec<SocketAddr> = all.iter().map(|(a, _)| *a).collect();
    // Ejections count only while the caller asks for them.
    let allowed: Vec<bool> = match view.ejection_policy(source, upstream) {
        Some(policy) => {
            let now = std::time::Instant::now();
            (ctx.outliers).allowed(source, &addrs, now, policy.max_ejection_percent)
        }
        None => vec![true; all.len()],
    };
    let loads: Vec<u64> = {
        let in_flight = ctx.in_flight.lock().expect("in-flight lock");
        all.iter()
            .map(|(a, _)| in_flight.get(a).copied().unwrap_or(0))
            .collect()
    };
    let policy = view.load_balancer(service);
    let draw = || rand::random::<u32>() as usize;
    let pick = (ctx.balancer)
        .choose(service, policy, (&addrs, &allowed), &loads, hash, draw)
        .ok_or_else(|| OutboundError::NoInstance(service.to_string()))?;
    let (target, node) = all[pick];
    if let Some(dc) = remote {
        // Another datacenter's node: through one of this datacenter's
        // gateways (mode `local`), or straight to one of that datacenter's
        // (`remote`); either routes by the SNI naming the node.
        let seed = rand::random::<u32>() as usize;
        let gateway = match view.mesh_gateway_mode(source, upstream) {
            weft_api::config_entry::MeshGatewayMode::Remote => {
                let theirs = view.gateways_of(dc);
                (!theirs.is_empty()).then(|| theirs[seed % theirs.len()])
            }
            _ => view.local_gateway(seed),
        }
        .ok_or_else(|| {
            OutboundError::NoInstance(format!(
                "{service} in {dc}: no passing mesh-gateway to reach it through"
            ))
        })?;
        return Ok(Route::Tunnel {
            node: NodePeer::new(gateway, &view.trust_domain, dc, node),
            target,
            remote: Some(dc.into()),
        });
    }
    if node == ctx.node_name {
        return Ok(Route::Local(target));
    }
    let (node_ip, datacenter) = view.node_addr(node).ok_or_else(|| {
        OutboundError::NoInstance(format!("{service} (node {node} has no address)"))
    })?;
    Ok(Route::Tunnel {
        node: NodePeer::new(
            SocketAddr::new(node_ip, ctx.inbound_port),
            &view.trust_domain,
            datacenter,
            node,
        ),
        target,
        remote: None,
    })
}

/// A connection [`carry`] could not carry, and the client's stream when it
/// still has it (to reset).
pub struct NotCarried {
    pub error: OutboundError,
    pub stream: Option<TcpStream>,
}

/// Carries one accepted connection from `source` to `destination`: an HTTP
/// service's requests one by one ([`l7::serve_routed`]), anything else as
/// bytes to one instance.
pub async fn carry(
    ctx: &Arc<ProxyContext>,
    mut client: TcpStream,
    source: &str,
    (destination, datacenter): (&str, Option<&str>),
) -> Result<(), NotCarried> {
    // Early deny: refuse here at once rather than after a tunnel; the
    // destination's agent checks again with its own view. Where an L7
    // intention decides, every request is judged (here, and again by the
    // destination's agent).
    let (decision, protocol) = {
        let view = ctx.view.read().expect("view lock");
        (
            view.decide_connection(ctx.caller(source), destination),
            view.protocol(destination),
        )
    };
    let refused = |error: OutboundError, client: TcpStream| NotCarried {
        error,
        stream: Some(client),
    };
    // An upstream of another datacenter is counted as `api@dc2`.
    let label = ctx.service_label(destination, datacenter);
    let per_request = match decision {
        ConnectionDecision::Decided(d) if !d.allowed => {
            ctx.metrics.denied(Side::Outbound, source, &label);
            return Err(refused(OutboundError::Denied(d.to_string()), client));
        }
        ConnectionDecision::Decided(_) => false,
        ConnectionDecision::PerRequest if protocol == Protocol::Tcp => {
            ctx.metrics.denied(Side::Outbound, source, &label);
            let reason = L7Error::NotHttp(protocol).to_string();
            return Err(refused(OutboundError::Denied(reason), client));
        }
        ConnectionDecision::PerRequest => true,
    };
    if protocol.is_http() {
        // Every HTTP service is served per request at the source: balanced
        // request by request, retried and watched for 5xx by its resolver's
        // and router's rules (or their defaults), as Consul's proxies do.
        // The client's connection is counted (opened, bytes, closed) here.
        let peer = client.peer_addr().ok().map(|a| a.ip());
        let client = Counted::client(client, ctx.metrics.clone(), source, &label);
        let (src, dst) = (source.to_string(), destination.to_string());
        let dst = (dst, datacenter.map(str::to_string));
        let served =
            l7::serve_routed(ctx.clone(), client, protocol, src, dst, per_request, peer).await;
        if let Err(e) = served {
            tracing::debug!("L7 connection ended: {e}");
        }
        return Ok(());
    }
    let carried = splice_to_instance(ctx, &mut client, source, (destination, datacenter)).await;
    carried.map_err(|error| refused(error, client))
}

/// Carries a TCP connection's bytes to an instance of `destination`,
/// trying another instance when one cannot be reached.
async fn splice_to_instance(
    ctx: &Arc<ProxyContext>,
    client: &mut TcpStream,
    source: &str,
    (destination, datacenter): (&str, Option<&str>),
) -> Result<(), OutboundError> {
    let _slot = ctx.take_slot(source, destination, crate::breaker::Gauge::Connections)?;
    let mut failed: Vec<SocketAddr> = Vec::new();
    let peer = client.peer_addr().ok().map(|a| a.ip());
    let timeout = (ctx.view.read().expect("view lock")).connect_timeout(
        Call {
            source,
            upstream: destination,
            service: destination,
        },
        CONNECT_TIMEOUT,
    );
    let (opened, _in_flight, label) = loop {
        let (route, answering) =
            match route_avoiding(ctx, (source, peer), (destination, datacenter), &failed) {
                Ok(picked) => picked,
                Err(e) if failed.is_empty() => return Err(e),
                Err(_) => {
                    return Err(OutboundError::NoInstance(format!(
                        "{destination} (tried {} instances)",
                        failed.len()
                    )))
                }
            };
        let target = route.target();
        let label = route.label(&answering);
        let in_flight = InFlight::new(ctx, target);
        match open(ctx, (source, destination), route, timeout).await {
            Ok(opened) => break (opened, in_flight, label),
            Err(e) if e.worth_another_instance() && failed.len() + 1 < CONNECT_ATTEMPTS => {
                tracing::debug!(%target, "{source} -> {destination}: {e}; trying another instance");
                failed.push(target);
            }
            Err(e) => return Err(e),
        }
    };
    // Another datacenter's instance is counted as `api@dc2`.
    let (sent, received) = match opened {
        Opened::Local(mut upstream) => {
            let _ = upstream.set_nodelay(true);
            ctx.metrics.conn_opened(Side::Outbound, source, &label);
            let started = std::time::Instant::now();
            let copied = splice(client, &mut upstream).await;
            ctx.metrics.conn_closed(source, &label, started.elapsed());
            copied.unwrap_or_default()
        }
        Opened::Tunnel(mut tunnel) => {
            ctx.metrics.conn_opened(Side::Outbound, source, &label);
            let started = std::time::Instant::now();
            let copied = splice(client, &mut tunnel).await;
            ctx.metrics.conn_closed(source, &label, started.elapsed());
            copied.unwrap_or_default()
        }
    };
    ctx.metrics
        .bytes(Side::Outbound, source, &label, Direction::Sent, sent);
    ctx.metrics.bytes(
        Side::Outbound,
        source,
        &label,
        Direction::Received,
        received,
    );
    Ok(())
}

/// An upstream connection, opened.
enum Opened {
    Local(TcpStream),
    Tunnel(crate::hbone::HboneStream),
}

/// Opens the connection `route` names, within `timeout`: to the local
/// instance, or a tunnel to the instance's node. Reports the outcome for
/// outlier detection.
async fn open(
    ctx: &ProxyContext,
    (source, destination): (&str, &str),
    route: Route,
    timeout: Duration,
) -> Result<Opened, OutboundError> {
    match route {
        Route::Local(addr) => {
            let connected = tokio::time::timeout(timeout, crate::mark::connect(addr))
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
            ctx.report(source, destination, addr, connected.is_ok());
            let stream = connected.map_err(|source| OutboundError::Connect { addr, source })?;
            Ok(Opened::Local(stream))
        }
        Route::Tunnel { node, target, .. } => {
            let identity = ctx
                .identities
                .service(source)
                .map_err(|_| OutboundError::Identity(source.to_string()))?;
            let tunnel = ctx.pool.connect(&identity, &node, target, timeout).await;
            match &tunnel {
                // A policy refusal says nothing of the instance's health.
                Err(HboneError::Refused { status: 403, .. }) => {}
                other => ctx.report(source, destination, target, other.is_ok()),
            }
            if let Some(reason) = tunnel.as_ref().err().and_then(|e| e.handshake_failure()) {
                ctx.metrics.tls_failure(Side::Outbound, reason);
            }
            Ok(Opened::Tunnel(tunnel?))
        }
    }
}

/// Resets a connection (RST rather than FIN), so the workload sees a prompt,
/// clear failure.
pub fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Serves an explicit upstream: every connection to `listener` belongs to
/// `source` and goes to `destination`.
pub async fn serve_upstream(
    ctx: Arc<ProxyContext>,
    listener: TcpListener,
    source: String,
    (destination, datacenter): (String, Option<String>),
) {
    let mut errors = AcceptErrors::new("upstream");
    loop {
        let (stream, peer) = errors.accept(&listener).await;
        let _ = stream.set_nodelay(true);
        let (ctx, source, destination) = (ctx.clone(), source.clone(), destination.clone());
        let datacenter = datacenter.clone();
        let span = tracing::info_span!(
            "conn",
            id = super::next_conn_id(),
            %peer,
            source = %source,
            destination = %destination
        );
        tokio::spawn(
            async move {
                let _tracked = ctx.drain.track();
                if let Err(e) =
                    carry(&ctx, stream, &source, (&destination, datacenter.as_deref())).await
                {
                    tracing::info!("{source} -> {destination}: {}", e.error);
                    if let Some(stream) = e.stream {
                        reset(stream);
                    }
                }
            }
            .instrument(span),
        );
    }
}

/// Serves the outbound listener that the eBPF programs redirect mesh
/// workloads' connections to: the source service and the original
/// destination come from the programs' records.
pub async fn serve_redirected(
    ctx: Arc<ProxyContext>,
    listener: TcpListener,
    interception: Arc<Interception>,
) {
    let mut errors = AcceptErrors::new("outbound");
    loop {
        let (stream, peer) = errors.accept(&listener).await;
        let _ = stream.set_nodelay(true);
        let (ctx, interception) = (ctx.clone(), interception.clone());
        let span = tracing::info_span!(
            "conn",
            id = super::next_conn_id(),
            %peer,
            source = tracing::field::Empty,
            destination = tracing::field::Empty
        );
        tokio::spawn(async move {
            let _tracked = ctx.drain.track();
            let found = match interception.lookup(&stream) {
                Ok(Some(found)) => found,
                Ok(None) => {
                    tracing::info!(%peer, "outbound: not a redirected mesh connection; reset");
                    return reset(stream);
                }
                Err(e) => {
                    tracing::warn!(%peer, "outbound: reading the redirect record: {e}");
                    return reset(stream);
                }
            };
            let destination = ctx
                .view
                .read()
                .expect("view lock")
                .service_at(found.original, &ctx.node_name)
                .map(str::to_string);
            let span = tracing::Span::current();
            span.record("source", found.source.as_str());
            let Some(destination) = destination else {
                tracing::info!(original = %found.original, "outbound: no service there any more; reset");
                return reset(stream);
            };
            span.record("destination", destination.as_str());
            // Another datacenter's service by its virtual IP (`api.dc2`).
            let (service, dc) = weft_api::vip::split_key(&destination);
            if let Err(e) = carry(&ctx, stream, &found.source, (service, dc)).await {
                tracing::info!(original = %found.original, "{} -> {destination}: {}", found.source, e.error);
                if let Some(stream) = e.stream {
                    reset(stream);
                }
            }
        }.instrument(span));
    }
}
