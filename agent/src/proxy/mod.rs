//! The proxy: outbound (a local workload's connection to a service) and
//! inbound (a tunnel from another node's agent to a local workload). Both
//! work on "an accepted connection with a known source service and
//! destination"; where that connection came from (an explicit upstream port
//! or an eBPF redirect) does not matter here.

pub mod counted;
pub mod hop_headers;
pub mod inbound;
pub mod l7;
pub mod outbound;
pub mod permissive;
pub mod plan;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::hbone::HbonePool;
use crate::identity::Identities;
use crate::metrics::AgentMetrics;
use crate::outlier::Outliers;
use crate::shared_view::SharedView;

/// How long opening a connection or tunnel may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What both directions share.
pub struct ProxyContext {
    pub node_name: String,
    /// This node's datacenter: inbound peers must be of it.
    pub datacenter: String,
    /// The port other agents take tunnels on (ours, and theirs).
    pub inbound_port: u16,
    pub view: Arc<SharedView>,
    /// The agent's own addresses ([`crate::config::AgentConfig::own_addresses`],
    /// kept current by reloads): a tunnel never reaches one, whatever
    /// instance the catalog has there.
    pub own: arc_swap::ArcSwap<Vec<SocketAddr>>,
    pub identities: Arc<Identities>,
    pub pool: HbonePool,
    pub metrics: Arc<AgentMetrics>,
    /// Open connections per destination instance, for load balancing.
    pub in_flight: Mutex<HashMap<SocketAddr, u64>>,
    /// Consecutive failures and ejections per instance (circuit breaking).
    pub outliers: Outliers,
    /// Round-robin turns and consistent-hash tables (resolvers'
    /// `LoadBalancer`).
    pub balancer: crate::lb::Balancer,
    /// Open connections and requests per (caller, upstream), against the
    /// callers' `Limits`.
    pub breakers: Arc<crate::breaker::Breakers>,
    /// The connections served, and the signal to wind them down.
    pub drain: Arc<crate::drain::Drain>,
}

impl ProxyContext {
    /// How metrics and traffic reports name a source: its label, or
    /// `unauthenticated` for a plaintext caller.
    pub fn source_label(source: &str) -> &str {
        if source == inbound::UNAUTHENTICATED {
            "unauthenticated"
        } else {
            source
        }
    }

    /// How metrics and traffic reports name `service` in `datacenter`:
    /// `api`, or `api@dc2` when that is another datacenter.
    pub fn service_label(&self, service: &str, datacenter: Option<&str>) -> String {
        match datacenter.filter(|dc| *dc != self.datacenter) {
            Some(dc) => format!("{service}@{dc}"),
            None => service.to_string(),
        }
    }

    /// Where this agent is, as plans need it.
    pub fn here(&self) -> plan::Here<'_> {
        plan::Here {
            node: &self.node_name,
            datacenter: &self.datacenter,
            inbound_port: self.inbound_port,
        }
    }

    /// The caller a source label names, as intentions judge it: a service
    /// of this datacenter (`web`), another datacenter's (`web@dc2`, as
    /// inbound labels a federated peer), or no one
    /// ([`inbound::UNAUTHENTICATED`]: no datacenter either, so only
    /// intentions from `*` that name none apply).
    pub fn caller<'a>(&'a self, source: &'a str) -> weft_api::intention::Caller<'a> {
        use weft_api::intention::{split_source, Caller};
        if source == inbound::UNAUTHENTICATED {
            return Caller::new(source, "");
        }
        let (service, datacenter) = split_source(source);
        Caller::new(service, datacenter.unwrap_or(&self.datacenter))
    }

    /// Takes a slot of `gauge` for `source`'s calls to `upstream`, under
    /// `source`'s `Limits` for it; a refusal is counted and logged.
    pub fn take_slot(
        &self,
        source: &str,
        upstream: &str,
        gauge: crate::breaker::Gauge,
    ) -> Result<crate::breaker::Slot, crate::breaker::Overflow> {
        use crate::breaker::Gauge;
        let limit = {
            let view = self.view.load();
            let limits = view
                .upstream_settings(source, upstream)
                .and_then(|s| s.limits.copied());
            limits.and_then(|l| match gauge {
                Gauge::Connections => l.max_connections,
                Gauge::PendingRequests => l.max_pending_requests,
                Gauge::Requests => l.max_concurrent_requests,
            })
        };
        self.breakers
            .take(source, upstream, gauge, limit)
            .inspect_err(|overflow| {
                self.metrics.overflow(overflow);
                tracing::info!(source = %overflow.caller, limit = overflow.limit,
                    "refused: {overflow}");
            })
    }

    /// Reports how a connection or request from `source` to the instance at
    /// `addr` of `upstream` went, when `source`'s defaults ask for passive
    /// health checks of it.
    pub fn report(&self, source: &str, upstream: &str, addr: SocketAddr, ok: bool) {
        let policy = (self.view.load()).ejection_policy(source, upstream);
        if let Some(policy) = policy {
            let roll = rand::random::<u32>() % 100;
            if (self.outliers).record(source, addr, ok, policy, Instant::now(), roll) {
                self.metrics.ejected(source, addr);
                tracing::info!(%source, instance = %addr, ejection = ?policy.ejection,
                    "instance ejected after {} failures in a row", policy.max_failures);
            }
        }
    }
}

/// Counts one open connection to an instance for as long as it lives.
pub struct InFlight<'a> {
    ctx: &'a ProxyContext,
    addr: SocketAddr,
}

impl<'a> InFlight<'a> {
    pub fn new(ctx: &'a ProxyContext, addr: SocketAddr) -> Self {
        *ctx.in_flight
            .lock()
            .expect("in-flight lock")
            .entry(addr)
            .or_default() += 1;
        Self { ctx, addr }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut map = self.ctx.in_flight.lock().expect("in-flight lock");
        if let Some(n) = map.get_mut(&self.addr) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.addr);
            }
        }
    }
}

/// A number for each proxied connection and tunnel stream, unique for the
/// agent's life: every log line of one connection carries it (the `conn`
/// and `stream` spans, with source and destination).
pub fn next_conn_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests;
