//! Outbound: a local workload's connection to a service. One snapshot of
//! the view plans it ([`plan::connection`]): refused at once (the
//! workload's connection is reset, a prompt and clear failure), an HTTP
//! service's requests served one by one ([`l7::serve_routed`]: routed,
//! balanced, retried, judged where an L7 intention decides), or its bytes
//! carried to one instance ([`upstream`]), another tried when one cannot be
//! reached. Same node: straight to the instance, no TLS (the intentions were
//! checked here); another node: an HBONE tunnel presenting the source
//! service's certificate.
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use weft_api::catalog::ServiceInstance;

use super::counted::Counted;
use super::l7;
use super::plan::{self, Call, Plan, Route};
use super::upstream::{self, ConnectError, Connected, NoInstance, CONNECT_ATTEMPTS};
use super::{InFlight, ProxyContext};
use crate::accept::AcceptErrors;
use crate::intercept::Interception;
use crate::metrics::{Direction, Side};
use crate::splice::splice;
use crate::splice::tunnel::splice_tunnel;
use crate::view::View;

/// Why a connection could not be carried.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error(transparent)]
    NoInstance(#[from] NoInstance),
    #[error("denied: {0}")]
    Denied(String),
    #[error(transparent)]
    Connect(Box<ConnectError>),
    #[error("circuit breaker: {0}")]
    Overflow(#[from] crate::breaker::Overflow),
}

/// Picks the route for a connection from `source` at `peer` to `service`,
/// avoiding the instances at `failed` (tried already for this connection),
/// and names the service that answers (`service`, or where its resolver's
/// redirect or failover leads). A resolver's hash policies hash a
/// connection on its source address alone.
fn route_avoiding(
    ctx: &ProxyContext,
    view: &View,
    (source, peer): (&str, Option<IpAddr>),
    (service, datacenter): (&str, Option<&str>),
    failed: &[SocketAddr],
) -> Result<(Route, String), OutboundError> {
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
    // Another service answering (a redirect or failover): the intentions
    // must let the source reach it too. (An instance of it on another node
    // is judged there again; one on this node only here.)
    if answering != service {
        plan::answering(view, ctx.caller(source), answering, None)
            .map_err(OutboundError::Denied)?;
    }
    let call = Call {
        source,
        upstream: service,
        service: answering,
    };
    let datacenter = resolved.datacenter.as_deref();
    let route = upstream::pick(ctx, view, &instances, call, hash, datacenter)?;
    Ok((route, resolved.service))
}

/// A connection [`carry`] could not carry, and the client's stream when it
/// still has it (to reset).
pub struct NotCarried {
    pub error: OutboundError,
    pub stream: Option<TcpStream>,
}

/// Carries one accepted connection from `source` (at `peer`, as `accept`
/// gave it) to `destination`: an HTTP service's requests one by one
/// ([`l7::serve_routed`]), anything else as bytes to one instance.
pub async fn carry(
    ctx: &Arc<ProxyContext>,
    (mut client, peer): (TcpStream, IpAddr),
    source: &str,
    (destination, datacenter): (&str, Option<&str>),
) -> Result<(), NotCarried> {
    // One snapshot of the view decides the connection. Early deny: refuse
    // here at once rather than after a tunnel; the destination's agent
    // checks again with its own view.
    let view = ctx.view.load();
    let refused = |error: OutboundError, client: TcpStream| NotCarried {
        error,
        stream: Some(client),
    };
    // An upstream of another datacenter is counted as `api@dc2`.
    let label = ctx.service_label(destination, datacenter);
    match plan::connection(&view, ctx.caller(source), destination) {
        Plan::Deny(reason) => {
            ctx.metrics.denied(Side::Outbound, source, &label);
            Err(refused(OutboundError::Denied(reason), client))
        }
        Plan::Requests { protocol, .. } => {
            // Every HTTP service is served per request at the source:
            // balanced request by request, retried and watched for 5xx by
            // its resolver's and router's rules (or their defaults), as
            // Consul's proxies do. The client's connection is counted
            // (opened, bytes, closed) here.
            drop(view);
            let client = Counted::client(client, ctx.metrics.clone(), source, &label);
            let (src, dst) = (source.to_string(), destination.to_string());
            let dst = (dst, datacenter.map(str::to_string));
            let served =
                l7::serve_routed(ctx.clone(), client, protocol, src, dst, Some(peer)).await;
            if let Err(e) = served {
                tracing::debug!("L7 connection ended: {e}");
            }
            Ok(())
        }
        Plan::Bytes => {
            let carried = splice_to_instance(
                ctx,
                view,
                (&mut client, peer),
                source,
                (destination, datacenter),
            )
            .await;
            carried.map_err(|error| refused(error, client))
        }
    }
}

/// Carries a TCP connection's bytes to an instance of `destination`,
/// trying another instance when one cannot be reached. The view's snapshot
/// is let go once the instance is reached: a long connection does not keep
/// an old view alive.
async fn splice_to_instance(
    ctx: &Arc<ProxyContext>,
    view: Arc<View>,
    (client, peer): (&mut TcpStream, IpAddr),
    source: &str,
    (destination, datacenter): (&str, Option<&str>),
) -> Result<(), OutboundError> {
    let _slot = ctx.take_slot(source, destination, crate::breaker::Gauge::Connections)?;
    let mut failed: Vec<SocketAddr> = Vec::new();
    let timeout = Call {
        source,
        upstream: destination,
        service: destination,
    }
    .connect_timeout(&view);
    let (opened, _in_flight, label) = loop {
        let picked = route_avoiding(
            ctx,
            &view,
            (source, Some(peer)),
            (destination, datacenter),
            &failed,
        );
        let (route, answering) = match picked {
            Ok(picked) => picked,
            Err(e) if failed.is_empty() => return Err(e),
            Err(_) => {
                let tried = format!("{destination} (tried {} instances)", failed.len());
                return Err(NoInstance(tried).into());
            }
        };
        let target = route.target();
        let label = route.label(&answering);
        let in_flight = InFlight::new(ctx, target);
        match open(ctx, (source, destination), &route, timeout).await {
            Ok(opened) => break (opened, in_flight, label),
            Err(e) if e.worth_another_instance() && failed.len() + 1 < CONNECT_ATTEMPTS => {
                tracing::debug!(%target, "{source} -> {destination}: {e}; trying another instance");
                failed.push(target);
            }
            Err(e) => return Err(OutboundError::Connect(Box::new(e))),
        }
    };
    drop(view);
    // Another datacenter's instance is counted as `api@dc2`.
    ctx.metrics.conn_opened(Side::Outbound, source, &label);
    let started = std::time::Instant::now();
    let copied = match opened {
        Connected::Local(mut upstream) => splice(client, &mut upstream).await,
        Connected::Tunnel(mut tunnel) => splice_tunnel(client, &mut tunnel).await,
    };
    ctx.metrics.conn_closed(source, &label, started.elapsed());
    let (sent, received) = copied.unwrap_or_default();
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

/// Opens the connection `route` names, within `timeout`, and reports the
/// outcome for outlier detection (a policy refusal says nothing of the
/// instance's health).
async fn open(
    ctx: &ProxyContext,
    (source, destination): (&str, &str),
    route: &Route,
    timeout: std::time::Duration,
) -> Result<Connected, ConnectError> {
    let opened = upstream::connect(ctx, source, route, timeout).await;
    match &opened {
        Err(e) if e.is_policy_refusal() => {}
        other => ctx.report(source, destination, route.target(), other.is_ok()),
    }
    if let Some(reason) = opened.as_ref().err().and_then(|e| e.handshake_failure()) {
        ctx.metrics.tls_failure(Side::Outbound, reason);
    }
    opened
}

/// Resets a connection (RST rather than FIN), so the workload sees a prompt,
/// clear failure.
pub fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Serves an explicit upstream: every connection to `listener` belongs to
/// `source` and goes to `destination`. With `interception`, the upstream
/// of a mesh workload takes only that workload's connections (the
/// programs' record names who connected); anything else on the node would
/// otherwise be carried as `source`.
pub async fn serve_upstream(
    ctx: Arc<ProxyContext>,
    listener: TcpListener,
    source: String,
    (destination, datacenter): (String, Option<String>),
    interception: Option<Arc<Interception>>,
) {
    let mut errors = AcceptErrors::new("upstream");
    let Ok(local) = listener.local_addr() else {
        return;
    };
    loop {
        let (stream, peer) = errors.accept(&listener).await;
        let _ = stream.set_nodelay(true);
        let (ctx, source, destination) = (ctx.clone(), source.clone(), destination.clone());
        let (datacenter, interception) = (datacenter.clone(), interception.clone());
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
                // A mesh workload's connection comes with a record: it is
                // carried only as its own service. Without one (a process
                // that is no workload) only a service without a cgroup's
                // listener takes it, as in explicit mode.
                if let Some(records) = interception {
                    match records.lookup(&stream, (peer, local)) {
                        Ok(Some(found)) if found.source == source => {}
                        Ok(None) if !records.captures(&source) => {}
                        Ok(found) => {
                            let from = found.map(|f| f.source);
                            tracing::info!(%local, ?from, "not {source}'s workload; reset");
                            return reset(stream);
                        }
                        Err(e) => {
                            tracing::warn!(%local, "reading the redirect record: {e}; reset");
                            return reset(stream);
                        }
                    }
                }
                let to = (destination.as_str(), datacenter.as_deref());
                if let Err(e) = carry(&ctx, (stream, peer.ip()), &source, to).await {
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
    // Every accepted connection's own end is the listener's address (read
    // per connection only for a listener on every address).
    let fixed_local = listener
        .local_addr()
        .ok()
        .filter(|a| !a.ip().is_unspecified());
    loop {
        let (stream, peer) = errors.accept(&listener).await;
        let Some(local) = fixed_local.or_else(|| stream.local_addr().ok()) else {
            reset(stream);
            continue;
        };
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
            let found = match interception.lookup(&stream, (peer, local)) {
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
                .load()
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
            let client = (stream, peer.ip());
            if let Err(e) = carry(&ctx, client, &found.source, (service, dc)).await {
                tracing::info!(original = %found.original, "{} -> {destination}: {}", found.source, e.error);
                if let Some(stream) = e.stream {
                    reset(stream);
                }
            }
        }.instrument(span));
    }
}
