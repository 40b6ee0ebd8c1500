//! The server's metrics for Prometheus, served on the HTTP port's
//! `/metrics` to a token with `operator:read`: Raft (term, indexes,
//! leadership, leader changes, elections this server started), the time a
//! write takes to commit and apply, writes by outcome, and open watch
//! streams. Label values come from small fixed sets.
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::raft::Raft;

/// An API call's method and gRPC status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: String,
    pub code: String,
}

/// How a write ended, as a label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// `applied`, `refused`, `no_leader`, `unknown` or `error`.
    pub outcome: &'static str,
}

/// Labels of accepted TLS connections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `api` (gRPC), `http`, `raft` or `federation`.
    pub listener: &'static str,
}

pub struct ServerMetrics {
    registry: Registry,
    /// TLS connections accepted (handshake completed), by listener.
    tls_connections: Family<ListenerLabels, Counter>,
    /// Seconds from handing a group of writes to Raft until applied.
    pub commit_seconds: Histogram,
    /// Writes (one per command) by outcome.
    pub writes: Family<WriteLabels, Counter>,
    /// Elections this server started (after a won pre-vote).
    pub elections: Counter,
    /// Times the leader this server knows of changed (to none included).
    pub leader_changes: Counter,
    /// Watch streams open now.
    pub watch_streams: Gauge,
    /// 1 while this server is in contact with its cluster (`contact`).
    pub in_contact: Gauge,
    /// API calls by method and code, timed.
    rpc_seconds: Family<RpcLabels, Histogram, fn() -> Histogram>,
    term: Gauge,
    last_log_index: Gauge,
    applied_index: Gauge,
    is_leader: Gauge,
}

/// 0.5 ms to about 16 s.
fn rpc_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weft_server");
        let m = ServerMetrics {
            registry: Registry::default(),
            tls_connections: Family::default(),
            // 0.5 ms to about 16 s.
            commit_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            writes: Family::default(),
            elections: Counter::default(),
            leader_changes: Counter::default(),
            watch_streams: Gauge::default(),
            in_contact: Gauge::default(),
            rpc_seconds: Family::new_with_constructor(rpc_buckets),
            term: Gauge::default(),
            last_log_index: Gauge::default(),
            applied_index: Gauge::default(),
            is_leader: Gauge::default(),
        };
        registry.register(
            "raft_commit_seconds",
            "Time from handing writes to Raft on the leader until they are committed and applied",
            m.commit_seconds.clone(),
        );
        registry.register(
            "writes",
            "Writes received by this server, by outcome (applied, refused, no_leader, unknown, error)",
            m.writes.clone(),
        );
        registry.register(
            "raft_elections",
            "Elections this server started after a majority agreed in pre-vote",
            m.elections.clone(),
        );
        registry.register(
            "raft_leader_changes",
            "Changes of the leader this server knows of",
            m.leader_changes.clone(),
        );
        registry.register(
            "watch_streams",
            "Watch streams open on this server",
            m.watch_streams.clone(),
        );
        registry.register(
            "in_contact",
            "1 while this server holds what its cluster committed within the last 3 s (it serves watches, and as leader takes writes and heartbeats)",
            m.in_contact.clone(),
        );
        registry.register(
            "rpc_seconds",
            "API calls by method and gRPC status code, timed until the answer (or a stream) began",
            m.rpc_seconds.clone(),
        );
        registry.register(
            "tls_connections",
            "TLS connections accepted (handshake completed) by listener: api, http, raft, federation",
            m.tls_connections.clone(),
        );
        registry.register("raft_term", "The current Raft term", m.term.clone());
        registry.register(
            "raft_last_log_index",
            "Index of the last entry in this server's Raft log",
            m.last_log_index.clone(),
        );
        registry.register(
            "raft_applied_index",
            "Index of the last Raft entry applied to this server's state",
            m.applied_index.clone(),
        );
        registry.register(
            "raft_leader",
            "1 if this server is the leader, else 0",
            m.is_leader.clone(),
        );
        ServerMetrics { registry, ..m }
    }

    /// Times an API call.
    pub fn rpc(&self, method: String, code: String, took: std::time::Duration) {
        self.rpc_seconds
            .get_or_create(&RpcLabels { method, code })
            .observe(took.as_secs_f64());
    }

    /// The count of TLS connections accepted on `listener`.
    pub fn tls_connections(&self, listener: &'static str) -> Counter {
        self.tls_connections
            .get_or_create(&ListenerLabels { listener })
            .clone()
    }

    /// Counts a write's outcome.
    pub fn write(&self, outcome: &'static str) {
        self.writes.get_or_create(&WriteLabels { outcome }).inc();
    }

    /// Every metric in OpenMetrics text, Raft's gauges read from `raft` now.
    pub fn encode(&self, raft: &Raft) -> String {
        let m = raft.metrics().borrow().clone();
        let set = |g: &Gauge, v: u64| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set(&self.term, m.current_term);
        set(&self.last_log_index, m.last_log_index.unwrap_or(0));
        set(&self.applied_index, m.last_applied.map_or(0, |id| id.index));
        set(
            &self.is_leader,
            u64::from(m.state == openraft::ServerState::Leader),
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Counts changes of the leader `raft` knows of, until Raft stops.
pub async fn count_leader_changes(raft: Raft, changes: Counter<u64, AtomicU64>) {
    let mut rx = raft.metrics();
    let mut leader = rx.borrow().current_leader;
    while rx.changed().await.is_ok() {
        let now = rx.borrow().current_leader;
        if now != leader {
            changes.inc();
            leader = now;
        }
    }
}

/// Counts one open watch stream while it lives.
pub struct StreamGuard(Gauge);

impl StreamGuard {
    pub fn open(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_help_are_in_both_formats() {
        let m = ServerMetrics::new();
        m.write("applied");
        m.commit_seconds.observe(0.002);
        let _stream = StreamGuard::open(&m.watch_streams);
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &m.registry).unwrap();
        for want in [
            "weft_server_writes_total{outcome=\"applied\"} 1",
            "weft_server_watch_streams 1",
            "weft_server_raft_commit_seconds_count 1",
        ] {
            assert!(om.contains(want), "missing {want} in\n{om}");
        }
        let text = weft_api::exposition::to_text_004(&om);
        assert!(text.contains("# HELP weft_server_writes_total Writes received"));
        assert!(text.contains("# TYPE weft_server_raft_commit_seconds histogram"));
        drop(_stream);
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &m.registry).unwrap();
        assert!(om.contains("weft_server_watch_streams 0"));
    }
}
