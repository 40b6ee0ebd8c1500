//! The agent's Prometheus metrics: connection, byte, denial and TLS-failure counters
//! labelled by source and destination service, an active-connection gauge, and
//! counters mirrored from the eBPF programs' maps. The admin server serves
//! [`AgentMetrics::encode`] on `/metrics`.
//!
//! Families (all prefixed `weft_agent_`):
//! - `connections_opened_total{source,destination}`
//! - `connections_closed_total{source,destination}`
//! - `connections_active{source,destination}` (gauge)
//! - `bytes_total{source,destination,direction="sent"|"received"}`
//! - `intention_denials_total{source,destination}`
//! - `tls_handshake_failures_total{side="inbound"|"outbound",reason}`
//! - `ebpf_events_total{event="redirected"|"rekeyed"|"closed"|"fast_path"|
//!   "egress_allowed"|"egress_denied"|"no_agent"|"inbound_refused"|"permissive_steered"|
//!   "agent_port_refused"}`
//! - `ebpf_destinations_left_out` (gauge): destinations the full eBPF map
//!   had no room for at the last sync (not taken over)
//! - `registrations_total`: registrations of the node and its services the
//!   servers took (one at start; again only when the catalog lost them)
//! - `http_request_duration_seconds{source,destination,code}` (histogram):
//!   from a request's arrival at the L7 proxy to its response's headers
//! - `connection_duration_seconds{source,destination}` (histogram): how long
//!   proxied connections lived
//! - `tunnel_dials_total`, `tunnel_handshake_duration_seconds`,
//!   `tunnel_connections_open`, `tunnel_streams_active`: the HBONE pool
//! - `gateway_connections_total{datacenter}`, `gateway_connections_active`,
//!   `gateway_bytes_total{datacenter,direction}`, `gateway_refused_total{reason}`:
//!   a mesh gateway ([`crate::gateway`])

use std::fmt;
use std::str::FromStr;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use weft_api::proto::PairTraffic;
use weft_api::traffic;

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// 0.5 ms to about 16 s.
fn request_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// 1 ms to about 4.7 h, by fours.
fn connection_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 12))
}

/// Metric errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricsError {
    /// A name that is not one of the eBPF counters.
    #[error("unknown eBPF counter {0:?} (known: redirected, rekeyed, closed, fast_path)")]
    UnknownEbpfCounter(String),
}

/// Which way bytes went, seen from the source workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From source to destination.
    Sent,
    /// From destination back to source.
    Received,
}

/// Which proxy a TLS handshake failed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The `:15008` listener, as TLS server.
    Inbound,
    /// Connections to other agents, as TLS client.
    Outbound,
}

/// Counters the eBPF programs keep in their maps, mirrored by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EbpfCounter {
    /// Connections the connect hook redirected to the agent.
    Redirected,
    /// Records sockops moved to the 4-tuple map.
    Rekeyed,
    /// Records removed when sockets closed.
    Closed,
    /// Same-node connections sent straight to the instance.
    FastPath,
    /// Connections to destinations outside the mesh let through (`egress = "allow"`).
    EgressAllowed,
    /// Connections to destinations outside the mesh refused (`egress = "deny"`).
    EgressDenied,
    /// Connections refused because no live agent could check them.
    NoAgent,
    /// Unchecked connection attempts to mesh workloads refused (inbound capture).
    InboundRefused,
    /// Plaintext connections to permissive services steered to the agent.
    PermissiveSteered,
    /// Connections and datagrams to one of the agent's own ports refused:
    /// no socket of the agent was bound there.
    AgentPortRefused,
}

impl EbpfCounter {
    /// All counters, in a fixed order.
    pub const ALL: [EbpfCounter; 10] = [
        EbpfCounter::Redirected,
        EbpfCounter::Rekeyed,
        EbpfCounter::Closed,
        EbpfCounter::FastPath,
        EbpfCounter::EgressAllowed,
        EbpfCounter::EgressDenied,
        EbpfCounter::NoAgent,
        EbpfCounter::InboundRefused,
        EbpfCounter::PermissiveSteered,
        EbpfCounter::AgentPortRefused,
    ];
}

impl fmt::Display for EbpfCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EbpfCounter {
    type Err = MetricsError;
    fn from_str(s: &str) -> Result<Self, MetricsError> {
        EbpfCounter::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| MetricsError::UnknownEbpfCounter(s.to_string()))
    }
}

/// Encodes an enum as a label value with the given lowercase names.
macro_rules! label_value {
    ($ty:ident { $($variant:ident => $name:literal),* $(,)? }) => {
        impl $ty {
            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name,)*
                }
            }
        }

        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
                fmt::Write::write_str(encoder, self.as_str())
            }
        }
    };
}

label_value!(Direction { Sent => "sent", Received => "received" });
label_value!(Side { Inbound => "inbound", Outbound => "outbound" });
label_value!(EbpfCounter {
    Redirected => "redirected",
    Rekeyed => "rekeyed",
    Closed => "closed",
    FastPath => "fast_path",
    EgressAllowed => "egress_allowed",
    EgressDenied => "egress_denied",
    NoAgent => "no_agent",
    InboundRefused => "inbound_refused",
    PermissiveSteered => "permissive_steered",
    AgentPortRefused => "agent_port_refused",
});

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ConnLabels {
    source: String,
    destination: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ByteLabels {
    source: String,
    destination: String,
    direction: Direction,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    source: String,
    destination: String,
    code: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EjectionLabels {
    source: String,
    instance: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OverflowLabels {
    source: String,
    destination: String,
    limit: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TlsLabels {
    side: Side,
    reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusedLabels {
    /// `inbound` (HBONE) or `permissive`.
    listener: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EbpfLabels {
    event: EbpfCounter,
}

fn conn(src: &str, dst: &str) -> ConnLabels {
    ConnLabels {
        source: src.to_string(),
        destination: dst.to_string(),
    }
}

/// The agent's metrics and the registry that encodes them. Cheap to share behind an
/// `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    opened: Family<ConnLabels, Counter>,
    closed: Family<ConnLabels, Counter>,
    active: Family<ConnLabels, Gauge>,
    bytes: Family<ByteLabels, Counter>,
    denied: Family<ConnLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    ejections: Family<EjectionLabels, Counter>,
    overflows: Family<OverflowLabels, Counter>,
    tls_failures: Family<TlsLabels, Counter>,
    inbound_refused: Family<RefusedLabels, Counter>,
    ebpf: Family<EbpfLabels, Counter>,
    destinations_left_out: Gauge,
    registrations: Counter,
    request_seconds: Histograms<RequestLabels>,
    connection_seconds: Histograms<ConnLabels>,
    tunnel: crate::hbone::client::TunnelMetrics,
    gateway: crate::gateway::GatewayMetrics,
    /// Traffic per (side, source, destination) since the last report.
    traffic: std::sync::Mutex<std::collections::HashMap<(Side, String, String), PairTraffic>>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// Creates the metrics in a fresh registry prefixed `weft_agent`.
    pub fn new() -> Self {
        Self::with_registry(Registry::with_prefix("weft_agent"))
    }

    /// Creates the metrics in `registry`, which may already hold other metrics.
    pub fn with_registry(mut registry: Registry) -> Self {
        let m = AgentMetricsParts::default();
        registry.register(
            "connections_opened",
            "Connections the proxy accepted, by source and destination service",
            m.opened.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections the proxy finished, by source and destination service",
            m.closed.clone(),
        );
        registry.register(
            "connections_active",
            "Connections open now, by source and destination service",
            m.active.clone(),
        );
        registry.register(
            "bytes",
            "Bytes proxied, by source and destination service and direction",
            m.bytes.clone(),
        );
        registry.register(
            "intention_denials",
            "Connections or requests refused by intentions",
            m.denied.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests the proxy served at L7 (L7 intentions, routing), by source and destination service and response status",
            m.requests.clone(),
        );
        registry.register(
            "outlier_ejections",
            "Instances left out of balancing by passive health checks, by calling service and instance address",
            m.ejections.clone(),
        );
        registry.register(
            "circuit_breaker_overflows",
            "Connections and requests refused because a Limits of the caller's UpstreamConfig was reached, by source and destination service and limit",
            m.overflows.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Failed mTLS handshakes, by side and reason",
            m.tls_failures.clone(),
        );
        registry.register(
            "inbound_connections_refused",
            "Connections from other hosts closed at accept for want of a place, and tunnels refused past a source's limit, by listener (inbound, permissive) and reason (busy, client_limit; inbound also unknown_busy, unknown_client_limit, displaced, identity, identity_limit, tunnel_limit)",
            m.inbound_refused.clone(),
        );
        registry.register(
            "ebpf_events",
            "Counters read from the eBPF programs' maps",
            m.ebpf.clone(),
        );
        registry.register(
            "ebpf_destinations_left_out",
            "Destinations the full eBPF destinations map had no room for at the last sync: workloads' connections to them are not taken over",
            m.destinations_left_out.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from a request's arrival at the L7 proxy to its response's headers, by source and destination service and response status",
            m.request_seconds.clone(),
        );
        registry.register(
            "connection_duration_seconds",
            "How long proxied connections lived, by source and destination service",
            m.connection_seconds.clone(),
        );
        registry.register(
            "registrations",
            "Registrations of the node and its services that the servers took",
            m.registrations.clone(),
        );
        let tunnel = crate::hbone::client::TunnelMetrics::default();
        registry.register(
            "tunnel_dials",
            "mTLS connections dialed to other nodes' agents (tunnels then share them)",
            tunnel.dials.clone(),
        );
        registry.register(
            "tunnel_handshake_duration_seconds",
            "Time to dial another node's agent: TCP connect, TLS and HTTP/2 handshakes",
            tunnel.handshake_seconds.clone(),
        );
        registry.register(
            "tunnel_connections_open",
            "Pooled mTLS connections to other nodes' agents open now",
            tunnel.connections.clone(),
        );
        registry.register(
            "tunnel_streams_active",
            "Tunnels (HTTP/2 CONNECT streams) open now on pooled connections",
            tunnel.streams.clone(),
        );
        let gateway = crate::gateway::GatewayMetrics::default();
        gateway.register(&mut registry);
        AgentMetrics {
            registry,
            gateway,
            opened: m.opened,
            closed: m.closed,
            active: m.active,
            bytes: m.bytes,
            denied: m.denied,
            requests: m.requests,
            ejections: m.ejections,
            overflows: m.overflows,
            tls_failures: m.tls_failures,
            inbound_refused: m.inbound_refused,
            ebpf: m.ebpf,
            destinations_left_out: m.destinations_left_out,
            registrations: m.registrations,
            request_seconds: m.request_seconds,
            connection_seconds: m.connection_seconds,
            tunnel,
            traffic: Default::default(),
        }
    }

    /// What the tunnel pool counts into (see [`crate::hbone::HbonePool::with_metrics`]).
    pub fn gateway(&self) -> crate::gateway::GatewayMetrics {
        self.gateway.clone()
    }

    pub fn tunnel(&self) -> crate::hbone::client::TunnelMetrics {
        self.tunnel.clone()
    }

    /// The registrations counter, for [`crate::control::Control`] to count with.
    pub fn registrations(&self) -> Counter {
        self.registrations.clone()
    }

    /// Adds to the traffic of `src` -> `dst` seen on `side`, for the next
    /// report to the servers ([`Self::take_traffic`]).
    fn traffic(&self, side: Side, src: &str, dst: &str, add: impl FnOnce(&mut PairTraffic)) {
        let mut pairs = self.traffic.lock().expect("traffic lock");
        let key = (side, src.to_string(), dst.to_string());
        let pair = pairs.entry(key).or_insert_with(|| {
            let mut p = traffic::pair(src, dst);
            p.side = side.as_str().to_string();
            p
        });
        add(pair);
    }

    /// The traffic counted since the last call, per pair and side.
    pub fn take_traffic(&self) -> Vec<PairTraffic> {
        let mut pairs = self.traffic.lock().expect("traffic lock");
        std::mem::take(&mut *pairs).into_values().collect()
    }

    /// A connection from `src` to `dst` was accepted on `side` (outbound:
    /// at the source's agent; inbound: at the destination's).
    pub fn conn_opened(&self, side: Side, src: &str, dst: &str) {
        let l = conn(src, dst);
        self.opened.get_or_create(&l).inc();
        self.active.get_or_create(&l).inc();
        self.traffic(side, src, dst, |p| p.connections += 1);
    }

    /// A connection from `src` to `dst` finished after `lived` (call once
    /// per [`Self::conn_opened`]).
    pub fn conn_closed(&self, src: &str, dst: &str, lived: std::time::Duration) {
        let l = conn(src, dst);
        self.closed.get_or_create(&l).inc();
        self.active.get_or_create(&l).dec();
        self.connection_seconds
            .get_or_create(&l)
            .observe(lived.as_secs_f64());
    }

    /// `n` bytes went `direction` on a connection from `src` to `dst`.
    pub fn bytes(&self, side: Side, src: &str, dst: &str, direction: Direction, n: u64) {
        self.traffic(side, src, dst, |p| match direction {
            Direction::Sent => p.bytes_sent += n,
            Direction::Received => p.bytes_received += n,
        });
        self.bytes
            .get_or_create(&ByteLabels {
                source: src.to_string(),
                destination: dst.to_string(),
                direction,
            })
            .inc_by(n);
    }

    /// Intentions refused a connection or request from `src` to `dst`.
    pub fn denied(&self, side: Side, src: &str, dst: &str) {
        self.denied.get_or_create(&conn(src, dst)).inc();
        self.traffic(side, src, dst, |p| p.denied += 1);
    }

    /// An HTTP request from `src` to `dst` served at L7 was answered with `code` (a
    /// refusal, the instance's answer, or a gateway error).
    /// `took` is from the request's arrival to the response's headers.
    pub fn http_request(
        &self,
        side: Side,
        src: &str,
        dst: &str,
        code: u16,
        took: std::time::Duration,
    ) {
        self.traffic(side, src, dst, |p| {
            traffic::add_request(p, took.as_secs_f64() * 1000.0, code >= 500)
        });
        let labels = RequestLabels {
            source: src.to_string(),
            destination: dst.to_string(),
            code: u32::from(code),
        };
        self.request_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        self.requests.get_or_create(&labels).inc();
    }

    /// `source`'s passive health check ejected the instance at `instance`.
    pub fn ejected(&self, source: &str, instance: std::net::SocketAddr) {
        self.ejections
            .get_or_create(&EjectionLabels {
                source: source.to_string(),
                instance: instance.to_string(),
            })
            .inc();
    }

    /// A connection or request was refused at a circuit breaker's limit.
    pub fn overflow(&self, overflow: &crate::breaker::Overflow) {
        self.overflows
            .get_or_create(&OverflowLabels {
                source: overflow.caller.clone(),
                destination: overflow.upstream.clone(),
                limit: overflow.gauge.limit_name().to_string(),
            })
            .inc();
    }

    /// A TLS handshake failed; `reason` should come from a small fixed set
    /// (e.g. `bad_certificate`, `unknown_ca`, `timeout`) to bound cardinality.
    pub fn tls_failure(&self, side: Side, reason: &str) {
        self.tls_failures
            .get_or_create(&TlsLabels {
                side,
                reason: reason.to_string(),
            })
            .inc();
    }

    /// A connection from another host was closed at accept on `listener`
    /// (`inbound` or `permissive`); `reason` is a fixed label.
    pub fn inbound_refused(&self, listener: &'static str, reason: &'static str) {
        self.inbound_refused
            .get_or_create(&RefusedLabels { listener, reason })
            .inc();
    }

    /// Sets an eBPF counter to the value read from its map (the kernel's counter is
    /// the source of truth; a lower value reads as a counter reset).
    pub fn set_ebpf_counter(&self, counter: EbpfCounter, value: u64) {
        self.ebpf
            .get_or_create(&EbpfLabels { event: counter })
            .inner()
            .store(value, std::sync::atomic::Ordering::Relaxed);
    }

    /// Destinations the eBPF map had no room for at the last sync.
    pub fn set_destinations_left_out(&self, count: usize) {
        self.destinations_left_out
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// [`Self::set_ebpf_counter`] by name: `redirected`, `rekeyed`, `closed`, `fast_path`.
    pub fn set_ebpf_counter_by_name(&self, name: &str, value: u64) -> Result<(), MetricsError> {
        self.set_ebpf_counter(name.parse()?, value);
        Ok(())
    }

    /// Connections open now from `src` to `dst`.
    pub fn active(&self, src: &str, dst: &str) -> i64 {
        self.active.get_or_create(&conn(src, dst)).get()
    }

    /// The registry, for encoding elsewhere.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// All metrics in the OpenMetrics text format (`weft_api::exposition`
    /// rewrites it for scrapers that want Prometheus text 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

struct AgentMetricsParts {
    opened: Family<ConnLabels, Counter>,
    closed: Family<ConnLabels, Counter>,
    active: Family<ConnLabels, Gauge>,
    bytes: Family<ByteLabels, Counter>,
    denied: Family<ConnLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    ejections: Family<EjectionLabels, Counter>,
    overflows: Family<OverflowLabels, Counter>,
    tls_failures: Family<TlsLabels, Counter>,
    inbound_refused: Family<RefusedLabels, Counter>,
    ebpf: Family<EbpfLabels, Counter>,
    destinations_left_out: Gauge,
    registrations: Counter,
    request_seconds: Histograms<RequestLabels>,
    connection_seconds: Histograms<ConnLabels>,
}

impl Default for AgentMetricsParts {
    fn default() -> Self {
        Self {
            opened: Family::default(),
            closed: Family::default(),
            active: Family::default(),
            bytes: Family::default(),
            denied: Family::default(),
            requests: Family::default(),
            ejections: Family::default(),
            overflows: Family::default(),
            tls_failures: Family::default(),
            inbound_refused: Family::default(),
            ebpf: Family::default(),
            destinations_left_out: Gauge::default(),
            registrations: Counter::default(),
            request_seconds: Family::new_with_constructor(request_buckets),
            connection_seconds: Family::new_with_constructor(connection_buckets),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_labels() {
        let m = AgentMetrics::new();
        m.conn_opened(Side::Outbound, "web", "api");
        m.conn_opened(Side::Outbound, "web", "api");
        m.conn_closed("web", "api", std::time::Duration::from_millis(1500));
        m.bytes(Side::Outbound, "web", "api", Direction::Sent, 100);
        m.bytes(Side::Outbound, "web", "api", Direction::Received, 7);
        m.bytes(Side::Outbound, "web", "api", Direction::Sent, 23);
        m.denied(Side::Outbound, "web", "db");
        m.http_request(
            Side::Inbound,
            "web",
            "api",
            403,
            std::time::Duration::from_micros(700),
        );
        m.http_request(
            Side::Inbound,
            "web",
            "api",
            403,
            std::time::Duration::from_millis(3),
        );
        m.ejected("web", "10.0.0.2:8080".parse().unwrap());
        m.tls_failure(Side::Inbound, "unknown_ca");
        m.set_ebpf_counter(EbpfCounter::Redirected, 42);
        m.set_ebpf_counter(EbpfCounter::Redirected, 50);
        m.set_ebpf_counter_by_name("fast_path", 3).unwrap();
        assert_eq!(m.active("web", "api"), 1);

        let text = m.encode();
        for line in [
            "# TYPE weft_agent_connections_opened counter",
            "weft_agent_connections_opened_total{source=\"web\",destination=\"api\"} 2",
            "weft_agent_connections_closed_total{source=\"web\",destination=\"api\"} 1",
            "# TYPE weft_agent_connections_active gauge",
            "weft_agent_connections_active{source=\"web\",destination=\"api\"} 1",
            "weft_agent_bytes_total{source=\"web\",destination=\"api\",direction=\"sent\"} 123",
            "weft_agent_bytes_total{source=\"web\",destination=\"api\",direction=\"received\"} 7",
            "weft_agent_intention_denials_total{source=\"web\",destination=\"db\"} 1",
            "weft_agent_http_requests_total{source=\"web\",destination=\"api\",code=\"403\"} 2",
            "weft_agent_outlier_ejections_total{source=\"web\",instance=\"10.0.0.2:8080\"} 1",
            "weft_agent_tls_handshake_failures_total{side=\"inbound\",reason=\"unknown_ca\"} 1",
            "weft_agent_ebpf_events_total{event=\"redirected\"} 50",
            "weft_agent_ebpf_events_total{event=\"fast_path\"} 3",
            "# TYPE weft_agent_http_request_duration_seconds histogram",
            "weft_agent_http_request_duration_seconds_count{source=\"web\",destination=\"api\",code=\"403\"} 2",
            "weft_agent_http_request_duration_seconds_bucket{le=\"0.001\",source=\"web\",destination=\"api\",code=\"403\"} 1",
            "weft_agent_connection_duration_seconds_count{source=\"web\",destination=\"api\"} 1",
            "weft_agent_connection_duration_seconds_sum{source=\"web\",destination=\"api\"} 1.5",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn unknown_ebpf_counter_is_an_error() {
        let m = AgentMetrics::new();
        let e = m.set_ebpf_counter_by_name("dropped", 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown eBPF counter \"dropped\" (known: redirected, rekeyed, closed, fast_path)"
        );
        for c in EbpfCounter::ALL {
            assert_eq!(c.as_str().parse::<EbpfCounter>().unwrap(), c);
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let m = AgentMetrics::new();
        m.tls_failure(Side::Outbound, "bad \"cert\"");
        let text = m.encode();
        assert!(
            text.contains("side=\"outbound\",reason=\"bad \\\"cert\\\"\""),
            "{text}"
        );
    }
}

#[cfg(test)]
mod traffic_tests {
    use super::*;

    #[test]
    fn traffic_is_kept_by_side_and_taken_once() {
        let m = AgentMetrics::new();
        m.conn_opened(Side::Outbound, "web", "api");
        m.bytes(Side::Outbound, "web", "api", Direction::Sent, 10);
        m.conn_opened(Side::Inbound, "web", "api");
        m.http_request(
            Side::Inbound,
            "web",
            "api",
            503,
            std::time::Duration::from_millis(4),
        );
        m.denied(Side::Inbound, "web", "db");
        let mut taken = m.take_traffic();
        taken.sort_by(|a, b| (&a.destination, &a.side).cmp(&(&b.destination, &b.side)));
        let got: Vec<_> = taken
            .iter()
            .map(|p| {
                (
                    p.destination.as_str(),
                    p.side.as_str(),
                    p.connections,
                    p.requests,
                    p.errors,
                    p.denied,
                    p.bytes_sent,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("api", "inbound", 1, 1, 1, 0, 0),
                ("api", "outbound", 1, 0, 0, 0, 10),
                ("db", "inbound", 0, 0, 0, 1, 0),
            ]
        );
        assert!(m.take_traffic().is_empty(), "taken once");
    }
}
