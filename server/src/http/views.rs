//! The web UI's own reads (`/v1/internal/ui/…`, as Consul's UI has its
//! own): services with health counts, nodes with their services, the
//! traffic graph with what the intentions decide for each edge, one
//! service's neighbours, and a service's traffic over time. Each is one
//! answer for one page, filtered by the token's read rights like every
//! other read.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use hyper::Method;
use serde::Serialize;
use serde_json::json;
use weft_api::acl::{Access, Resource, ResourceKind};
use weft_api::catalog::HealthStatus;
use weft_api::intention::{evaluate_connection, ConnectionDecision, Intention, IntentionAction};
use weft_api::proto::{self, telemetry_server::Telemetry};
use weft_api::traffic;

use super::catalog::worst_status;
use super::{json_at, only, Answer, Call, HttpError};
use crate::grpc::auth::Caller;
use crate::grpc::catalog::may_read_instance;
use crate::grpc::telemetry::{self, TelemetryApi};
use crate::node::ServerNode;
use crate::state::State;

pub async fn route(node: &Arc<ServerNode>, call: &Call, rest: &str) -> Answer {
    only(call, Method::GET)?;
    match rest {
        "services" => {
            call.only_params(&[])?;
            let caller = call.caller(node).await?;
            caller.require_any_read(ResourceKind::Service)?;
            let (rows, index) =
                crate::grpc::read(node, None, |s| (service_rows(s, &caller), s.index)).await?;
            Ok(json_at(index, &rows))
        }
        "nodes" => {
            call.only_params(&[])?;
            let caller = call.caller(node).await?;
            caller.require_any_read(ResourceKind::Node)?;
            let (rows, index) =
                crate::grpc::read(node, None, |s| (node_rows(s, &caller), s.index)).await?;
            Ok(json_at(index, &rows))
        }
        "topology" => {
            call.only_params(&["window"])?;
            let caller = call.caller(node).await?;
            caller.require_any_read(ResourceKind::Service)?;
            let window = window(call)?;
            let (rows, intentions, index) = crate::grpc::read(node, None, |s| {
                let intentions: Vec<Intention> = s.all_intentions().cloned().collect();
                (service_rows(s, &caller), intentions, s.index)
            })
            .await?;
            let (pairs, covered) = telemetry::merged(node, window).await;
            let edges: Vec<Edge> = pairs
                .iter()
                .filter(|p| telemetry::may_see(&caller, p))
                .map(|p| edge(&traffic::summarize(p, covered), &intentions, default(node)))
                .collect();
            Ok(json_at(
                index,
                &json!({ "WindowSecs": covered, "Services": rows, "Edges": edges }),
            ))
        }
        _ => {
            if let Some(name) = rest.strip_prefix("service-topology/") {
                return service_topology(node, call, name).await;
            }
            if let Some(name) = rest.strip_prefix("traffic/") {
                return service_traffic(node, call, name).await;
            }
            Err(HttpError::not_found())
        }
    }
}

fn default(node: &ServerNode) -> IntentionAction {
    if node.default_allow {
        IntentionAction::Allow
    } else {
        IntentionAction::Deny
    }
}

/// `?window=` in seconds: 1 to an hour, 60 if not given.
fn window(call: &Call) -> Result<u32, HttpError> {
    match call.number::<u32>("window")? {
        None => Ok(60),
        Some(w) if (1..=crate::traffic::KEEP_SECS as u32).contains(&w) => Ok(w),
        Some(w) => Err(HttpError::bad_request(format!(
            "window {w}: from 1 to {} seconds",
            crate::traffic::KEEP_SECS
        ))),
    }
}

/// A service as the UI lists it: instances counted once each, at their
/// worst check (their own or their node's).
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceRow {
    pub name: String,
    #[serde(rename = "VIP")]
    pub vip: String,
    pub instance_count: u32,
    pub checks_passing: u32,
    pub checks_warning: u32,
    pub checks_critical: u32,
    pub nodes: BTreeSet<String>,
    pub tags: BTreeSet<String>,
}

/// Every service `caller` may read, in one walk over the instances.
pub fn service_rows(s: &State, caller: &Caller) -> Vec<ServiceRow> {
    let mut rows: BTreeMap<&str, ServiceRow> = BTreeMap::new();
    let row = |name: &str| ServiceRow {
        name: name.to_string(),
        vip: s.vips.get(name).map(|v| v.to_string()).unwrap_or_default(),
        instance_count: 0,
        checks_passing: 0,
        checks_warning: 0,
        checks_critical: 0,
        nodes: BTreeSet::new(),
        tags: BTreeSet::new(),
    };
    for name in s.vips.keys() {
        rows.insert(name, row(name));
    }
    for i in s.instances.values().flat_map(|m| m.values()) {
        let r = rows.entry(&i.service).or_insert_with(|| row(&i.service));
        if !may_read_instance(caller, i) {
            continue;
        }
        r.instance_count += 1;
        match worst_status(s, i) {
            HealthStatus::Passing => r.checks_passing += 1,
            HealthStatus::Warning => r.checks_warning += 1,
            HealthStatus::Critical => r.checks_critical += 1,
        }
        r.nodes.insert(i.node.clone());
        r.tags.extend(i.tags.iter().cloned());
    }
    rows.into_values()
        .filter(|r| caller.can(Resource::Service(&r.name), Access::Read))
        .collect()
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct NodeRow {
    node: String,
    address: String,
    datacenter: String,
    meta: BTreeMap<String, String>,
    status: &'static str,
    output: String,
    services: BTreeSet<String>,
}

fn node_rows(s: &State, caller: &Caller) -> Vec<NodeRow> {
    s.nodes
        .values()
        .filter(|n| caller.can(Resource::Node(&n.name), Access::Read))
        .map(|n| NodeRow {
            node: n.name.clone(),
            address: n.address.clone(),
            datacenter: n.datacenter.clone(),
            meta: n.meta.clone(),
            status: n.health.as_str(),
            output: n.health_output.clone(),
            services: s
                .instances
                .get(&n.name)
                .into_iter()
                .flat_map(|m| m.values())
                .filter(|i| caller.can(Resource::Service(&i.service), Access::Read))
                .map(|i| i.service.clone())
                .collect(),
        })
        .collect()
}

/// A pair of services on the graph: its traffic over the window and what
/// the intentions decide now for a new connection between them.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct Edge {
    pub source: String,
    pub destination: String,
    pub requests_per_sec: f64,
    pub connections_per_sec: f64,
    pub error_rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub denied: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub allowed: bool,
    pub reason: String,
}

/// The edge of `p`, judged by `intentions` as an agent judges a new
/// connection: allowed, denied, or (an L7 intention) judged per request.
pub fn edge(p: &proto::PairSummary, intentions: &[Intention], default: IntentionAction) -> Edge {
    let (allowed, reason) =
        match evaluate_connection(intentions, &p.source, &p.destination, default) {
            ConnectionDecision::PerRequest => (
                true,
                "judged per HTTP request by L7 intention permissions".to_string(),
            ),
            ConnectionDecision::Decided(d) => {
                let reason = crate::grpc::intentions::explain(&d, default).2;
                (d.allowed, reason)
            }
        };
    Edge {
        source: p.source.clone(),
        destination: p.destination.clone(),
        requests_per_sec: p.requests_per_sec,
        connections_per_sec: p.connections_per_sec,
        error_rate: p.error_rate,
        p50_ms: p.p50_ms,
        p99_ms: p.p99_ms,
        denied: p.denied,
        bytes_sent: p.bytes_sent,
        bytes_received: p.bytes_received,
        allowed,
        reason,
    }
}

/// `/v1/internal/ui/service-topology/<name>`: the edges out of and into a
/// service, and the services an intention names with it that sent or got
/// no traffic in the window (rates 0).
async fn service_topology(node: &Arc<ServerNode>, call: &Call, name: &str) -> Answer {
    call.only_params(&["window"])?;
    weft_api::names::validate_name(name)
        .map_err(|e| HttpError::bad_request(format!("service: {e}")))?;
    let caller = call.caller(node).await?;
    caller.require(Resource::Service(name), Access::Read)?;
    let window = window(call)?;
    let (intentions, index) = crate::grpc::read(node, None, |s| {
        (s.all_intentions().cloned().collect::<Vec<_>>(), s.index)
    })
    .await?;
    let (pairs, covered) = telemetry::merged(node, window).await;
    let default = default(node);
    let summaries: Vec<proto::PairSummary> = pairs
        .iter()
        .filter(|p| p.source == name || p.destination == name)
        .filter(|p| telemetry::may_see(&caller, p))
        .map(|p| traffic::summarize(p, covered))
        .collect();
    let (mut up, mut down): (Vec<Edge>, Vec<Edge>) = (Vec::new(), Vec::new());
    for p in &summaries {
        let e = edge(p, &intentions, default);
        if p.source == name {
            up.push(e);
        } else {
            down.push(e);
        }
    }
    let named = |other: &str| {
        other != weft_api::names::WILDCARD
            && other != name
            && caller.can(Resource::Service(other), Access::Read)
    };
    for i in &intentions {
        if i.source == name
            && named(&i.destination)
            && !up.iter().any(|e| e.destination == i.destination)
        {
            up.push(edge(
                &traffic::summarize(&traffic::pair(name, &i.destination), covered),
                &intentions,
                default,
            ));
        }
        if i.destination == name && named(&i.source) && !down.iter().any(|e| e.source == i.source) {
            down.push(edge(
                &traffic::summarize(&traffic::pair(&i.source, name), covered),
                &intentions,
                default,
            ));
        }
    }
    Ok(json_at(
        index,
        &json!({ "WindowSecs": covered, "Upstreams": up, "Downstreams": down }),
    ))
}

/// `/v1/internal/ui/traffic/<name>?window=&step=`: `Telemetry.Series`.
async fn service_traffic(node: &Arc<ServerNode>, call: &Call, name: &str) -> Answer {
    call.only_params(&["window", "step"])?;
    let reply = TelemetryApi(node.clone())
        .series(call.grpc(proto::SeriesRequest {
            service: name.to_string(),
            window_secs: call.number("window")?.unwrap_or(3600),
            step_secs: call.number("step")?.unwrap_or(60),
        }))
        .await?
        .into_inner();
    let points: Vec<_> = reply
        .points
        .iter()
        .map(|p| {
            json!({
                "Start": p.start_secs,
                "Requests": p.requests,
                "Errors": p.errors,
                "Denied": p.denied,
                "Connections": p.connections,
                "P99Ms": p.p99_ms,
            })
        })
        .collect();
    Ok(json_at(
        1,
        &json!({ "StepSecs": reply.step_secs, "Points": points }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::acl::{parse_rules, Authorizer};
    use weft_api::catalog::{Node, ServiceInstance};

    fn caller(rules: &str) -> Caller {
        Caller {
            accessor: "t".into(),
            authz: Authorizer::from_rules([&parse_rules(rules).unwrap()]),
            request: None,
        }
    }

    fn state() -> State {
        let mut s = State::default();
        for (name, health) in [
            ("n1", HealthStatus::Passing),
            ("n2", HealthStatus::Critical),
        ] {
            s.nodes.insert(
                name.into(),
                Node {
                    name: name.into(),
                    health,
                    ..Node::default()
                },
            );
        }
        let mut add = |node: &str, id: &str, service: &str, health| {
            s.instances.entry(node.into()).or_default().insert(
                id.into(),
                ServiceInstance {
                    id: id.into(),
                    service: service.into(),
                    node: node.into(),
                    health,
                    tags: vec![format!("t-{id}")],
                    ..ServiceInstance::default()
                },
            );
        };
        add("n1", "api-1", "api", HealthStatus::Passing);
        add("n1", "api-2", "api", HealthStatus::Warning);
        // Passing itself, but on a critical node: critical.
        add("n2", "api-3", "api", HealthStatus::Passing);
        add("n1", "db-1", "db", HealthStatus::Passing);
        s
    }

    #[test]
    fn services_count_each_instance_once_at_its_worst_check() {
        let s = state();
        let all = service_rows(
            &s,
            &caller(r#"service_prefix "" { policy = "read" } node_prefix "" { policy = "read" }"#),
        );
        assert_eq!(all.len(), 2);
        let api = &all[0];
        assert_eq!(api.name, "api");
        assert_eq!(
            (
                api.instance_count,
                api.checks_passing,
                api.checks_warning,
                api.checks_critical
            ),
            (3, 1, 1, 1)
        );
        assert_eq!(api.nodes.len(), 2);
        assert!(api.tags.contains("t-api-3"));
    }

    #[test]
    fn services_show_only_what_the_token_reads() {
        let s = state();
        // db only, and only instances on n1.
        let rows = service_rows(
            &s,
            &caller(r#"service "db" { policy = "read" } node "n1" { policy = "read" }"#),
        );
        assert_eq!(
            rows.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["db"]
        );
        let rows = service_rows(
            &s,
            &caller(r#"service "api" { policy = "read" } node "n1" { policy = "read" }"#),
        );
        assert_eq!(
            rows[0].instance_count, 2,
            "api-3 is on n2, which the token cannot read"
        );
        assert!(service_rows(&s, &caller(r#"key_prefix "" { policy = "write" }"#)).is_empty());
        let nodes = node_rows(
            &s,
            &caller(r#"node "n2" { policy = "read" } service "api" { policy = "read" }"#),
        );
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].status, "critical");
        assert_eq!(nodes[0].services, BTreeSet::from(["api".to_string()]));
    }

    #[test]
    fn an_edge_says_what_the_intentions_decide_for_a_new_connection() {
        let summary = traffic::summarize(&traffic::pair("web", "api"), 60);
        let deny: Intention =
            serde_json::from_str(r#"{"Source":"web","Destination":"api","Action":"deny"}"#)
                .unwrap();
        let l7: Intention = serde_json::from_str(
            r#"{"Source":"web","Destination":"api","Permissions":[{"Action":"allow","HTTP":{"PathPrefix":"/"}}]}"#,
        )
        .unwrap();
        let e = edge(&summary, &[], IntentionAction::Allow);
        assert!(e.allowed, "{e:?}");
        assert!(e.reason.contains("default"), "{}", e.reason);
        let e = edge(&summary, &[deny], IntentionAction::Allow);
        assert!(!e.allowed);
        assert_eq!(e.reason, "denied by intention web => api");
        let e = edge(&summary, &[l7], IntentionAction::Deny);
        assert!(e.allowed);
        assert!(e.reason.contains("per HTTP request"));
    }
}
