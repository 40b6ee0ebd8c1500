//! What the proxy does with a connection or a request, decided from one
//! snapshot of the view and nothing else: no sockets, no clocks, no
//! randomness (a caller passes in its draw). Outbound and inbound both ask
//! here; the I/O around the answer lives in [`super::outbound`],
//! [`super::inbound`], [`super::l7`] and [`super::upstream`].
//!
//! - [`connection`]: refused, bytes to one instance, or HTTP served and
//!   judged request by request.
//! - [`answering`]: the policy gate for a service that answers in place of
//!   the one dialed (a resolver's redirect or failover).
//! - [`candidates`] and [`route`]: which instances a connection may go to,
//!   and how the chosen one is reached (this node, a tunnel to its node, or
//!   through a mesh gateway to another datacenter).
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_api::catalog::ServiceInstance;
use weft_api::config_entry::{MeshGatewayMode, Protocol};
use weft_api::intention::{Caller, ConnectionDecision, Request};

use crate::hbone::NodePeer;
use crate::lb::Balancer;
use crate::outlier::Outliers;
use crate::view::View;

/// How a connection is carried, decided before any of its bytes is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Refused, and why.
    Deny(String),
    /// Bytes, as they come, to one instance.
    Bytes,
    /// An HTTP service's requests, one by one, in its `protocol`. The
    /// source's agent judges each against the view of its moment; `judge`:
    /// an L7 intention decides for the pair, so the destination's agent
    /// serves and judges them too (otherwise it carries their bytes).
    Requests { judge: bool, protocol: Protocol },
}

/// Why a connection that an L7 intention must judge is refused: its
/// service's protocol is not HTTP.
pub fn not_http(protocol: Protocol) -> String {
    format!("service protocol {protocol} carries no HTTP: an L7 intention cannot judge it")
}

/// The plan for a connection from `caller` to `destination`.
pub fn connection(view: &View, caller: Caller<'_>, destination: &str) -> Plan {
    let protocol = view.protocol(destination);
    match view.decide_connection(caller, destination) {
        ConnectionDecision::Decided(d) if !d.allowed => Plan::Deny(d.to_string()),
        ConnectionDecision::Decided(_) if protocol.is_http() => Plan::Requests {
            judge: false,
            protocol,
        },
        ConnectionDecision::Decided(_) => Plan::Bytes,
        ConnectionDecision::PerRequest if protocol.is_http() => Plan::Requests {
            judge: true,
            protocol,
        },
        ConnectionDecision::PerRequest => Plan::Deny(not_http(protocol)),
    }
}

/// Whether `caller` may reach `service`, which answers in place of the
/// service it dialed (a redirect or failover): judged as a call to it, on
/// `request` where an L7 intention decides (a connection, with no request,
/// is then refused).
pub fn answering(
    view: &View,
    caller: Caller<'_>,
    service: &str,
    request: Option<&Request>,
) -> Result<(), String> {
    let decision = match (view.decide_connection(caller, service), request) {
        (ConnectionDecision::Decided(d), _) => d,
        (ConnectionDecision::PerRequest, Some(request)) => {
            view.decide(caller, service, Some(request))
        }
        (ConnectionDecision::PerRequest, None) => {
            return Err(format!("{service}: {}", not_http(view.protocol(service))))
        }
    };
    if decision.allowed {
        Ok(())
    } else {
        Err(format!("{service}: {decision}"))
    }
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

impl Call<'_> {
    /// How long opening a connection for this call may take.
    pub fn connect_timeout(&self, view: &View) -> Duration {
        view.connect_timeout(
            (self.source, self.upstream, self.service),
            super::CONNECT_TIMEOUT,
        )
    }
}

/// Where this agent is.
#[derive(Debug, Clone, Copy)]
pub struct Here<'a> {
    pub node: &'a str,
    pub datacenter: &'a str,
    /// The port agents take tunnels on.
    pub inbound_port: u16,
}

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

/// One instance a connection may go to: its address and its node.
pub type Candidate<'v> = (SocketAddr, &'v str);

/// The instances (of this datacenter, or of `remote`) that the mesh can
/// carry a connection to, less those at `failed`: an instance of an
/// external node (registered through the catalog, no agent to tunnel to)
/// is reached outside the mesh, not through it.
pub fn candidates<'v>(
    view: &View,
    instances: &[&'v ServiceInstance],
    remote: Option<&str>,
    failed: &[SocketAddr],
) -> Vec<Candidate<'v>> {
    instances
        .iter()
        .filter(|i| remote.is_some() || !view.node_is_external(&i.node))
        .filter_map(|i| Some((i.socket_addr()?, i.node.as_str())))
        .filter(|(addr, _)| !failed.contains(addr))
        .collect()
}

/// What a pick consults besides the view: the callers' ejections (their
/// passive health checks), the balancers' turns and hash tables, and the
/// open connections per instance.
pub struct Balancing<'a> {
    pub outliers: &'a Outliers,
    pub balancer: &'a Balancer,
    pub in_flight: &'a HashMap<SocketAddr, u64>,
}

/// Picks one of `instances` of `call.service` (in `datacenter`, when it is
/// another one) and the way to it: less the instances the caller's
/// passive health check ejected at `now`, by the service's resolver's
/// `LoadBalancer` with the request's or connection's `hash`, or else power
/// of two choices over open connections (`draw` gives random numbers).
/// Nothing to pick names the service (and why, when there is more to say).
pub fn pick(
    view: &View,
    here: Here<'_>,
    call: Call<'_>,
    (instances, datacenter, hash): (&[&ServiceInstance], Option<&str>, Option<u64>),
    balancing: &Balancing<'_>,
    now: Instant,
    draw: &mut dyn FnMut() -> usize,
) -> Result<Route, String> {
    let Call {
        source,
        upstream,
        service,
    } = call;
    let remote = datacenter.filter(|dc| *dc != here.datacenter);
    let all = candidates(view, instances, remote, &[]);
    let addrs: Vec<SocketAddr> = all.iter().map(|(a, _)| *a).collect();
    // Ejections count only while the caller asks for them.
    let allowed: Vec<bool> = match view.ejection_policy(source, upstream) {
        Some(policy) => {
            (balancing.outliers).allowed(source, &addrs, now, policy.max_ejection_percent)
        }
        None => vec![true; all.len()],
    };
    let loads: Vec<u64> = (addrs.iter())
        .map(|a| balancing.in_flight.get(a).copied().unwrap_or(0))
        .collect();
    let policy = view.load_balancer(service);
    let chosen = (balancing.balancer)
        .choose(
            service,
            policy,
            (&addrs, &allowed),
            &loads,
            hash,
            &mut *draw,
        )
        .ok_or_else(|| service.to_string())?;
    let seed = draw();
    route(view, here, call, all[chosen], remote, seed)
}

/// How the chosen instance `(target, node)` of `service` is reached from
/// here by `source` calling `upstream`: on this node, through a tunnel to
/// its node, or, in another datacenter (`remote`), through a mesh gateway
/// (one of this datacenter's in mode `local`, one of that datacenter's in
/// mode `remote`; `seed` spreads the choice).
pub fn route(
    view: &View,
    here: Here<'_>,
    Call {
        source,
        upstream,
        service,
    }: Call<'_>,
    (target, node): Candidate<'_>,
    remote: Option<&str>,
    seed: usize,
) -> Result<Route, String> {
    if let Some(dc) = remote.filter(|dc| *dc != here.datacenter) {
        let gateway = match view.mesh_gateway_mode(source, upstream) {
            MeshGatewayMode::Remote => {
                let theirs = view.gateways_of(dc);
                (!theirs.is_empty()).then(|| theirs[seed % theirs.len()])
            }
            _ => view.local_gateway(seed),
        }
        .ok_or_else(|| format!("{service} in {dc}: no passing mesh-gateway to reach it through"))?;
        return Ok(Route::Tunnel {
            node: NodePeer::new(gateway, &view.trust_domain, dc, node),
            target,
            remote: Some(dc.into()),
        });
    }
    if node == here.node {
        return Ok(Route::Local(target));
    }
    let (node_ip, datacenter) = view
        .node_addr(node)
        .ok_or_else(|| format!("{service} (node {node} has no address)"))?;
    Ok(Route::Tunnel {
        node: NodePeer::new(
            SocketAddr::new(node_ip, here.inbound_port),
            &view.trust_domain,
            datacenter,
            node,
        ),
        target,
        remote: None,
    })
}

#[cfg(test)]
mod tests;
