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
use weft_api::intention::{
    evaluate_connection, split_source, ConnectionDecision, Intention, IntentionAction,
};
use weft_api::proto::{self, telemetry_server::Telemetry};
use weft_api::traffic;

use super::{json_at, only, Answer, Call, HttpError};
use crate::grpc::auth::Caller;
use crate::grpc::catalog::may_read_instance;
use crate::grpc::telemetry::{self, TelemetryApi};
use crate::node::ServerNode;
use crate::state::State;

pub async fn route(node: &Arc<ServerNode>, call: &Call, rest: &str) -> Answer {
    only(call, Method::GET)?;
    // The graph views merge every server's traffic: they take turns with
    // weft top and each other.
    // (Series takes its own turn.)
    let _turn = if rest == "topology" || rest.starts_with("service-topology/") {
        Some(telemetry::turn().await?)
    } else {
        None
    };
    match rest {
        "services" => {
            call.only_params(&[])?;
            let caller = call.caller(node).await?;
            caller.require_any_read(ResourceKind::Service)?;
            let (rows, index) =
                crate::grpc::read(node, call.read(), |s| (service_rows(s, &caller), s.index))
                    .await?;
            Ok(json_at(index, &rows))
        }
        "datacenters" => {
            call.only_params(&[])?;
            let caller = call.caller(node).await?;
            caller.require_any_read(ResourceKind::Service)?;
            let (rows, index) = crate::grpc::read(node, call.read(), |s| {
                (datacenter_rows(node, s, &caller), s.index)
            })
            .await?;
            Ok(json_at(index, &rows))
        }
        "nodes" => {
            call.only_params(&[])?;
            let caller = call.caller(node).await?;
            caller.require_any_read(ResourceKind::Node)?;
            let (rows, index) =
                crate::grpc::read(node, call.read(), |s| (node_rows(s, &caller), s.index)).await?;
            Ok(json_at(index, &rows))
        }
        "topology" => {
            call.only_params(&["window"])?;
            let caller = call.caller(node).await?;
            caller.require_any_read(ResourceKind::Service)?;
            let window = window(call)?;
            let (rows, intentions, index) =
                crate::grpc::read(node, call.read(), |s| {
                    let intentions: Vec<Intention> = s.all_intentions().cloned().collect();
                    // Other datacenters' services, as edges name them (`api@dc2`).
                    let mut rows = service_rows(s, &caller);
                    for dc in s.remote.keys() {
                        rows.extend(remote_service_rows(s, &caller, dc).into_iter().map(
                            |mut r| {
                                r.name = format!("{}@{dc}", r.name);
                                r
                            },
                        ));
                    }
                    (rows, intentions, s.index)
                })
                .await?;
            let (pairs, covered) = telemetry::merged(node, window).await;
            let judge = Judge::new(&intentions, &caller, default(node), &node.datacenter);
            let edges: Vec<Edge> = pairs
                .iter()
                .filter(|p| telemetry::may_see(&caller, p))
                .map(|p| judge.edge(&traffic::summarize(p, covered)))
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

/// Query parameter `name` as a number above 0, if given.
fn positive(call: &Call, name: &str) -> Result<Option<u32>, HttpError> {
    match call.number::<u32>(name)? {
        Some(0) => Err(HttpError::bad_request(format!(
            "query parameter {name}: 0 is not a number of seconds"
        ))),
        n => Ok(n),
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
/// health as clients see it (critical on a critical node).
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
    for name in s
        .vips
        .keys()
        .filter(|n| weft_api::vip::split_key(n).1.is_none())
    {
        rows.insert(name, row(name));
    }
    for i in s.instances.values().flat_map(|m| m.values()) {
        let r = rows.entry(&i.service).or_insert_with(|| row(&i.service));
        if !may_read_instance(caller, i) {
            continue;
        }
        r.instance_count += 1;
        match crate::grpc::catalog::effective_health(s, i) {
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

/// The services of datacenter `dc` (another one) that `caller` may read,
/// from this datacenter's copy of its instances.
pub fn remote_service_rows(s: &State, caller: &Caller, dc: &str) -> Vec<ServiceRow> {
    let mut rows: BTreeMap<&str, ServiceRow> = BTreeMap::new();
    for i in s.remote.get(dc).into_iter().flatten() {
        if !may_read_instance(caller, i) {
            continue;
        }
        let r = rows.entry(&i.service).or_insert_with(|| ServiceRow {
            name: i.service.clone(),
            vip: (s.vips.get(&format!("{}.{dc}", i.service)))
                .map(|v| v.to_string())
                .unwrap_or_default(),
            instance_count: 0,
            checks_passing: 0,
            checks_warning: 0,
            checks_critical: 0,
            nodes: BTreeSet::new(),
            tags: BTreeSet::new(),
        });
        r.instance_count += 1;
        match i.health {
            HealthStatus::Passing => r.checks_passing += 1,
            HealthStatus::Warning => r.checks_warning += 1,
            HealthStatus::Critical => r.checks_critical += 1,
        }
        r.nodes.insert(i.node.clone());
        r.tags.extend(i.tags.iter().cloned());
    }
    rows.into_values().collect()
}

/// One datacenter of the federation, as the UI's Datacenters page shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct DatacenterRow {
    name: String,
    primary: bool,
    local: bool,
    /// Its gateways' WAN addresses (for a caller with `operator:read`).
    gateways: Vec<String>,
    /// When its state (its gateways) last changed, as this datacenter
    /// heard (unix ms; 0 for this one, and without `operator:read`).
    updated_ms: i64,
    services: Vec<ServiceRow>,
}

/// This datacenter and every other of the federation, with the services
/// of each that `caller` may read.
fn datacenter_rows(node: &ServerNode, s: &State, caller: &Caller) -> Vec<DatacenterRow> {
    let mut names: BTreeSet<&str> = s.federation.keys().map(String::as_str).collect();
    names.insert(&node.datacenter);
    // Where the gateways are, and when they changed, is the operator's
    // (as `weft members --wan`).
    let operator = caller.can(Resource::Operator, Access::Read);
    names
        .into_iter()
        .map(|name| {
            let state = s.federation.get(name);
            let local = name == node.datacenter;
            DatacenterRow {
                name: name.to_string(),
                primary: name == node.primary_datacenter,
                local,
                gateways: match state {
                    Some(f) if operator => f.gateways.iter().map(|g| g.to_string()).collect(),
                    _ => Vec::new(),
                },
                updated_ms: if local || !operator {
                    0
                } else {
                    state.map_or(0, |f| f.updated_ms)
                },
                services: if local {
                    service_rows(s, caller)
                } else {
                    remote_service_rows(s, caller, name)
                },
            }
        })
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
/// the intentions decide now for a new connection between them (`None`
/// when the token may not read the destination's intentions).
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
    pub allowed: Option<bool>,
    pub reason: Option<String>,
}

/// Judges edges as an agent judges a new connection (allowed, denied, or,
/// with an L7 intention, per request), looking at the intentions of the
/// destination and of `*` only; and only for a caller that may read them.
pub struct Judge<'a> {
    by_destination: BTreeMap<&'a str, Vec<&'a Intention>>,
    caller: &'a Caller,
    default: IntentionAction,
    /// This server's datacenter: a source's when it names none.
    datacenter: &'a str,
}

impl<'a> Judge<'a> {
    pub fn new(
        intentions: &'a [Intention],
        caller: &'a Caller,
        default: IntentionAction,
        datacenter: &'a str,
    ) -> Self {
        let mut by_destination: BTreeMap<&str, Vec<&Intention>> = BTreeMap::new();
        for i in intentions {
            by_destination.entry(&i.destination).or_default().push(i);
        }
        Judge {
            by_destination,
            caller,
            default,
            datacenter,
        }
    }

    /// What decides `source` -> `destination`: (allowed, the reason). Either
    /// may be another datacenter's (`web@dc1` as an inbound agent reports
    /// it, `api@dc2` as an outbound one does): intentions are the same in
    /// every datacenter, and judge the caller's datacenter too.
    fn decide(&self, source: &str, destination: &str) -> Option<(bool, String)> {
        // As agents judge them: a plaintext caller has no datacenter.
        let source = if source == telemetry::UNAUTHENTICATED {
            weft_api::intention::Caller::new("", "")
        } else {
            let (service, datacenter) = split_source(source);
            weft_api::intention::Caller::new(service, datacenter.unwrap_or(self.datacenter))
        };
        let destination = split_source(destination).0;
        if !crate::grpc::intentions::may_access(self.caller, destination, Access::Read) {
            return None;
        }
        let candidates = [destination, weft_api::names::WILDCARD]
            .into_iter()
            .filter_map(|d| self.by_destination.get(d))
            .flatten()
            .copied();
        Some(
            match evaluate_connection(candidates, source, destination, self.default) {
                ConnectionDecision::PerRequest => (
                    true,
                    "judged per HTTP request by L7 intention permissions".to_string(),
                ),
                ConnectionDecision::Decided(d) => {
                    let reason = crate::grpc::intentions::explain(&d, self.default).2;
                    (d.allowed, reason)
                }
            },
        )
    }

    /// The edge of `p`.
    pub fn edge(&self, p: &proto::PairSummary) -> Edge {
        let decided = self.decide(&p.source, &p.destination);
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
            allowed: decided.as_ref().map(|d| d.0),
            reason: decided.map(|d| d.1),
        }
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
    let (intentions, index) = crate::grpc::read(node, call.read(), |s| {
        (s.all_intentions().cloned().collect::<Vec<_>>(), s.index)
    })
    .await?;
    let (pairs, covered) = telemetry::merged(node, window).await;
    let judge = Judge::new(&intentions, &caller, default(node), &node.datacenter);
    let (mut up, mut down): (Vec<Edge>, Vec<Edge>) = (Vec::new(), Vec::new());
    for p in pairs
        .iter()
        .filter(|p| p.source == name || p.destination == name)
        .filter(|p| telemetry::may_see(&caller, p))
    {
        let e = judge.edge(&traffic::summarize(p, covered));
        if p.source == name {
            up.push(e);
        } else {
            down.push(e);
        }
    }
    // Services an intention names with this one, without traffic yet: only
    // intentions the token may read, to services it may read.
    let (mut ups, mut downs): (BTreeSet<String>, BTreeSet<String>) = (
        up.iter().map(|e| e.destination.clone()).collect(),
        down.iter().map(|e| e.source.clone()).collect(),
    );
    // (A source naming a datacenter, `web@dc2`, is read as its service.)
    let named = |other: &str| {
        let service = split_source(other).0;
        service != weft_api::names::WILDCARD
            && other != name
            && caller.can(Resource::Service(service), Access::Read)
    };
    for i in &intentions {
        if !crate::grpc::intentions::may_access(&caller, &i.destination, Access::Read) {
            continue;
        }
        if i.source == name && named(&i.destination) && ups.insert(i.destination.clone()) {
            let quiet = traffic::summarize(&traffic::pair(name, &i.destination), covered);
            up.push(judge.edge(&quiet));
        }
        if i.destination == name && named(&i.source) && downs.insert(i.source.clone()) {
            let quiet = traffic::summarize(&traffic::pair(&i.source, name), covered);
            down.push(judge.edge(&quiet));
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
            // 0 would mean "the default" to the RPC: refused here instead.
            window_secs: positive(call, "window")?.unwrap_or(3600),
            step_secs: positive(call, "step")?.unwrap_or(60),
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
            standing: crate::state::Standing::Token {
                accessor: "t".into(),
                epoch: 0,
            },
            valid_until: None,
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
        let reader = caller(r#"service_prefix "" { policy = "read" }"#);
        let e = Judge::new(&[], &reader, IntentionAction::Allow, "dc1").edge(&summary);
        assert_eq!(e.allowed, Some(true), "{e:?}");
        assert!(
            e.reason.as_deref().is_some_and(|r| r.contains("default")),
            "{e:?}"
        );
        let deny = [deny];
        let e = Judge::new(&deny, &reader, IntentionAction::Allow, "dc1").edge(&summary);
        assert_eq!(e.allowed, Some(false));
        assert_eq!(e.reason.as_deref(), Some("denied by intention web => api"));
        let e = Judge::new(&[l7], &reader, IntentionAction::Deny, "dc1").edge(&summary);
        assert_eq!(e.allowed, Some(true));
        assert!(e
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("per HTTP request")));
        // A wildcard deny decides too; another destination's does not.
        let star: Intention =
            serde_json::from_str(r#"{"Source":"*","Destination":"*","Action":"deny"}"#).unwrap();
        let other: Intention =
            serde_json::from_str(r#"{"Source":"web","Destination":"db","Action":"allow"}"#)
                .unwrap();
        let both = [star, other];
        let e = Judge::new(&both, &reader, IntentionAction::Allow, "dc1").edge(&summary);
        assert_eq!(e.reason.as_deref(), Some("denied by intention * => *"));
        // A token that may not read api's intentions learns nothing of them.
        let blind = caller(r#"service_prefix "" { policy = "read" intentions = "deny" }"#);
        let e = Judge::new(&deny, &blind, IntentionAction::Allow, "dc1").edge(&summary);
        assert_eq!((e.allowed, e.reason), (None, None));
    }
}
