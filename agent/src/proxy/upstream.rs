//! The way to an instance, for TCP connections and HTTP requests alike:
//! picking one of a service's instances (less those the caller's passive
//! health check ejected; by the service's resolver's `LoadBalancer`, or
//! power of two choices over open connections), the route to it
//! ([`plan::route`]), and connecting within the connect timeout: straight to
//! an instance on this node with the agent's mark, or an HBONE tunnel to its
//! node presenting the caller's certificate.
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use weft_api::catalog::ServiceInstance;

use super::plan::{self, Call, Route};
use super::ProxyContext;
use crate::hbone::{HboneError, HboneStream};
use crate::view::View;

/// How many instances one connection is tried on when opening it fails
/// (nothing has been sent then): an instance whose agent stops or whose
/// node just died costs a retry, not a failed connection.
pub const CONNECT_ATTEMPTS: usize = 3;

/// Nothing to reach: the service, and why when it is not simply that no
/// instance passes.
#[derive(Debug, thiserror::Error)]
#[error("no passing instance of {0}")]
pub struct NoInstance(pub String);

/// Picks one of `instances` of `call.service` (in `datacenter`, when it is
/// another one) with the request's or connection's `hash`, and the way to
/// it ([`plan::pick`], with this agent's ejections, balancers and open
/// connections).
pub fn pick(
    ctx: &ProxyContext,
    view: &View,
    instances: &[&ServiceInstance],
    call: Call<'_>,
    hash: Option<u64>,
    datacenter: Option<&str>,
) -> Result<Route, NoInstance> {
    // The candidates' open connections, copied: the lock is not held
    // while picking.
    let in_flight: std::collections::HashMap<SocketAddr, u64> = {
        let all = ctx.in_flight.lock().expect("in-flight lock");
        (instances.iter())
            .filter_map(|i| i.socket_addr())
            .filter_map(|a| Some((a, *all.get(&a)?)))
            .collect()
    };
    let balancing = plan::Balancing {
        outliers: &ctx.outliers,
        balancer: &ctx.balancer,
        in_flight: &in_flight,
    };
    let mut draw = || rand::random::<u32>() as usize;
    let chosen = (instances, datacenter, hash);
    let now = std::time::Instant::now();
    plan::pick(view, ctx.here(), call, chosen, &balancing, now, &mut draw).map_err(NoInstance)
}

/// Why an instance could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {addr}: {source}")]
    Local {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("tunnel to {target} via {via}: {source}")]
    Tunnel {
        target: SocketAddr,
        via: SocketAddr,
        #[source]
        source: HboneError,
    },
    #[error("no certificate for {0}")]
    Identity(String),
}

impl ConnectError {
    /// Whether another instance may succeed where this failed: the instance
    /// or its node could not be reached. A policy refusal is final.
    pub fn worth_another_instance(&self) -> bool {
        match self {
            ConnectError::Local { .. } => true,
            ConnectError::Tunnel {
                source: HboneError::Refused { status, .. },
                ..
            } => *status == 503,
            ConnectError::Tunnel { .. } => true,
            ConnectError::Identity(_) => false,
        }
    }

    /// Whether the instance's node refused by policy (which says nothing
    /// of the instance's health).
    pub fn is_policy_refusal(&self) -> bool {
        matches!(
            self,
            ConnectError::Tunnel {
                source: HboneError::Refused { status: 403, .. },
                ..
            }
        )
    }

    /// The TLS handshake's failure, as metrics name it.
    pub fn handshake_failure(&self) -> Option<&'static str> {
        match self {
            ConnectError::Tunnel { source, .. } => source.handshake_failure(),
            _ => None,
        }
    }
}

/// A connection to an instance, open.
pub enum Connected {
    Local(TcpStream),
    Tunnel(HboneStream),
}

/// Connects to the instance on this node at `addr` within `timeout`, with
/// the agent's mark (so the eBPF programs let it through).
pub async fn connect_local(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, crate::mark::connect(addr))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Opens the connection `route` names for `source`, within `timeout`.
pub async fn connect(
    ctx: &ProxyContext,
    source: &str,
    route: &Route,
    timeout: Duration,
) -> Result<Connected, ConnectError> {
    match route {
        Route::Local(addr) => connect_local(*addr, timeout)
            .await
            .map(Connected::Local)
            .map_err(|source| ConnectError::Local {
                addr: *addr,
                source,
            }),
        Route::Tunnel { node, target, .. } => {
            let identity = (ctx.identities)
                .service(source)
                .map_err(|_| ConnectError::Identity(source.to_string()))?;
            let tunnel = ctx.pool.connect(&identity, node, *target, timeout).await;
            tunnel
                .map(Connected::Tunnel)
                .map_err(|source| ConnectError::Tunnel {
                    target: *target,
                    via: node.addr,
                    source,
                })
        }
    }
}
