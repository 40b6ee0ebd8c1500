//! Every branch of the plan, on views built as the watch stream builds
//! them: deny, bytes, HTTP (judged per request or not), the failover gate,
//! routed requests, a local instance, a tunnel, another datacenter through
//! a gateway, no instance, an external node and an ejected instance.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use weft_api::intention::{Caller, Request};
use weft_api::proto::{self, watch_event::Event};

use super::*;
use crate::lb::Balancer;
use crate::outlier::Outliers;

const HERE: Here<'static> = Here {
    node: "a",
    datacenter: "dc1",
    inbound_port: 15008,
};

fn web() -> Caller<'static> {
    Caller::new("web", "dc1")
}

fn node(name: &str, address: &str) -> proto::Node {
    proto::Node {
        name: name.into(),
        address: address.into(),
        datacenter: "dc1".into(),
        ..Default::default()
    }
}

fn instance(
    node: &str,
    id: &str,
    service: &str,
    addr: &str,
    passing: bool,
) -> proto::ServiceInstance {
    let addr: SocketAddr = addr.parse().unwrap();
    let health = if passing {
        proto::Health::Passing
    } else {
        proto::Health::Critical
    };
    proto::ServiceInstance {
        id: id.into(),
        service: service.into(),
        node: node.into(),
        address: addr.ip().to_string(),
        port: addr.port().into(),
        health: health as i32,
        ..Default::default()
    }
}

fn intention(source: &str, destination: &str, action: &str) -> proto::Intention {
    proto::Intention {
        source: source.into(),
        destination: destination.into(),
        action: action.into(),
        ..Default::default()
    }
}

/// web may GET /public on `destination` and nothing else (an L7 intention).
fn l7_intention(destination: &str) -> proto::Intention {
    proto::Intention {
        source: "web".into(),
        destination: destination.into(),
        permissions: vec![proto::Permission {
            action: "allow".into(),
            http: Some(proto::HttpMatch {
                path_prefix: Some("/public".into()),
                ..Default::default()
            }),
        }],
        ..Default::default()
    }
}

fn entry(json: &str) -> proto::ConfigEntry {
    let value: serde_json::Value = serde_json::from_str(json).unwrap();
    proto::ConfigEntry {
        kind: value["Kind"].as_str().unwrap().into(),
        name: value["Name"].as_str().unwrap().into(),
        json: json.into(),
        ..Default::default()
    }
}

fn http(service: &str) -> proto::ConfigEntry {
    entry(&format!(
        r#"{{"Kind":"service-defaults","Name":"{service}","Protocol":"http"}}"#
    ))
}

/// Node a (here) and node b, each with an instance of api; default deny
/// unless `snapshot` says otherwise.
fn base() -> proto::StateSnapshot {
    proto::StateSnapshot {
        nodes: vec![node("a", "10.0.0.1"), node("b", "10.0.0.2")],
        ca: Some(proto::CaBundle {
            trust_domain: "test.weft".into(),
            roots_pem: Vec::new(),
        }),
        ..Default::default()
    }
}

fn view_of(snapshot: proto::StateSnapshot) -> View {
    let mut v = View::default();
    v.apply(proto::WatchEvent {
        index: 1,
        event: Some(Event::Snapshot(snapshot)),
    })
    .unwrap();
    v
}

fn call(service: &str) -> Call<'_> {
    Call {
        source: "web",
        upstream: "api",
        service,
    }
}

/// What a pick consults besides the view: no ejections, no load, unless
/// a test sets them.
#[derive(Default)]
struct State {
    outliers: Outliers,
    balancer: Balancer,
    in_flight: HashMap<SocketAddr, u64>,
}

impl State {
    fn balancing(&self) -> Balancing<'_> {
        Balancing {
            outliers: &self.outliers,
            balancer: &self.balancer,
            in_flight: &self.in_flight,
        }
    }
}

/// A pick of `service`'s passing instances with no ejections, no load.
fn pick_of(view: &View, service: &str, draw: usize) -> Result<Route, String> {
    let state = State::default();
    let balancing = state.balancing();
    let instances = view.passing(service);
    pick(
        view,
        HERE,
        call(service),
        (&instances, None, None),
        &balancing,
        Instant::now(),
        &mut || draw,
    )
}

#[test]
fn a_deny_intention_refuses_the_connection() {
    let mut s = base();
    s.default_allow = true;
    s.intentions.push(intention("web", "api", "deny"));
    let view = view_of(s);
    let Plan::Deny(reason) = connection(&view, web(), "api") else {
        panic!("not refused");
    };
    assert!(reason.contains("denied"), "{reason}");
    // Another caller is not named by it: the default allows.
    assert_eq!(
        connection(&view, Caller::new("admin", "dc1"), "api"),
        Plan::Bytes
    );
    // Default deny with no intention refuses too.
    let view = view_of(base());
    assert!(matches!(connection(&view, web(), "api"), Plan::Deny(_)));
}

#[test]
fn an_allowed_tcp_service_is_carried_as_bytes_and_http_per_request() {
    let mut s = base();
    s.intentions.push(intention("web", "api", "allow"));
    s.intentions.push(intention("web", "shop", "allow"));
    s.config_entries.push(http("shop"));
    let view = view_of(s);
    assert_eq!(connection(&view, web(), "api"), Plan::Bytes);
    assert_eq!(
        connection(&view, web(), "shop"),
        Plan::Requests {
            judge: false,
            protocol: Protocol::Http
        }
    );
}

#[test]
fn an_l7_intention_judges_each_request_and_refuses_what_is_not_http() {
    let mut s = base();
    s.intentions.push(l7_intention("shop"));
    s.intentions.push(l7_intention("db"));
    s.config_entries.push(http("shop"));
    let view = view_of(s);
    assert_eq!(
        connection(&view, web(), "shop"),
        Plan::Requests {
            judge: true,
            protocol: Protocol::Http
        }
    );
    // db speaks TCP: nothing to judge the permissions on.
    let Plan::Deny(reason) = connection(&view, web(), "db") else {
        panic!("a TCP service under an L7 intention was let through");
    };
    assert_eq!(reason, not_http(Protocol::Tcp));
}

#[test]
fn a_service_answering_for_another_is_judged_as_itself() {
    let mut s = base();
    s.intentions.push(intention("web", "api", "allow"));
    s.intentions.push(intention("web", "backup", "deny"));
    s.intentions.push(l7_intention("shop"));
    s.config_entries.push(http("shop"));
    let view = view_of(s);
    assert_eq!(answering(&view, web(), "api", None), Ok(()));
    let refused = answering(&view, web(), "backup", None).unwrap_err();
    assert!(refused.starts_with("backup: denied"), "{refused}");
    // An L7 intention: judged on the request; with none, refused.
    let public = Request::new("GET", "/public/x");
    let private = Request::new("GET", "/admin");
    assert_eq!(answering(&view, web(), "shop", Some(&public)), Ok(()));
    assert!(answering(&view, web(), "shop", Some(&private)).is_err());
    assert!(answering(&view, web(), "shop", None).is_err());
}

#[test]
fn an_instance_on_this_node_is_reached_directly() {
    let mut s = base();
    s.instances
        .push(instance("a", "api-1", "api", "10.0.0.1:8080", true));
    let view = view_of(s);
    let route = pick_of(&view, "api", 0).unwrap();
    assert_eq!(route, Route::Local("10.0.0.1:8080".parse().unwrap()));
    assert_eq!(route.label("api"), "api");
}

#[test]
fn an_instance_on_another_node_is_reached_through_its_agent() {
    let mut s = base();
    s.instances
        .push(instance("b", "api-1", "api", "10.0.0.2:8080", true));
    let view = view_of(s);
    let Route::Tunnel {
        node,
        target,
        remote,
    } = pick_of(&view, "api", 0).unwrap()
    else {
        panic!("not a tunnel");
    };
    assert_eq!(node.addr, "10.0.0.2:15008".parse().unwrap());
    assert_eq!(target, "10.0.0.2:8080".parse().unwrap());
    assert_eq!(remote, None);
}

#[test]
fn another_datacenters_instance_is_reached_through_a_gateway() {
    let mut s = base();
    s.instances.push(instance(
        "a",
        "gw-1",
        weft_api::gateway::SERVICE,
        "10.0.0.1:8443",
        true,
    ));
    s.federation.push(proto::FederationState {
        datacenter: "dc2".into(),
        gateways: vec!["192.0.2.7:443".into()],
        updated_ms: 1,
    });
    s.config_entries.push(entry(
        r#"{"Kind":"service-defaults","Name":"web","UpstreamConfig":{"Overrides":[{"Name":"orders","MeshGateway":{"Mode":"remote"}}]}}"#,
    ));
    let view = view_of(s);
    let far = instance("c", "api-9", "api", "10.9.0.3:8080", true);
    let far = weft_api::convert::instance_from_proto(far).unwrap();
    let state = State::default();
    let balancing = state.balancing();
    let via = |upstream: &str| {
        let call = Call {
            source: "web",
            upstream,
            service: "api",
        };
        let route = pick(
            &view,
            HERE,
            call,
            (&[&far], Some("dc2"), None),
            &balancing,
            Instant::now(),
            &mut || 0,
        )
        .unwrap();
        let Route::Tunnel { node, remote, .. } = &route else {
            panic!("not a tunnel: {route:?}");
        };
        assert_eq!(remote.as_deref(), Some("dc2"));
        assert_eq!(route.label("api"), "api@dc2");
        node.addr
    };
    // Mode local (the default): this datacenter's gateway.
    assert_eq!(via("api"), "10.0.0.1:8443".parse().unwrap());
    // Mode remote for web's calls to orders: dc2's gateway.
    assert_eq!(via("orders"), "192.0.2.7:443".parse().unwrap());
}

#[test]
fn no_passing_instance_leaves_nothing_to_pick() {
    let mut s = base();
    s.instances
        .push(instance("b", "api-1", "api", "10.0.0.2:8080", false));
    let view = view_of(s);
    assert_eq!(pick_of(&view, "api", 0), Err("api".to_string()));
    assert_eq!(pick_of(&view, "nothing", 0), Err("nothing".to_string()));
}

#[test]
fn an_external_nodes_instance_is_not_carried_by_the_mesh() {
    let mut s = base();
    let mut outside = node("ext", "203.0.113.5");
    outside.meta.insert(
        weft_api::catalog_register::EXTERNAL_NODE_META.into(),
        "true".into(),
    );
    s.nodes.push(outside);
    s.instances
        .push(instance("ext", "api-x", "api", "203.0.113.5:80", true));
    let view = view_of(s);
    assert!(pick_of(&view, "api", 0).is_err());
    let instances = view.passing("api");
    assert!(candidates(&view, &instances, None, &[]).is_empty());
}

#[test]
fn an_instance_tried_already_is_left_out() {
    let mut s = base();
    s.instances
        .push(instance("b", "api-1", "api", "10.0.0.2:8080", true));
    s.instances
        .push(instance("b", "api-2", "api", "10.0.0.2:8081", true));
    let view = view_of(s);
    let instances = view.passing("api");
    let failed: SocketAddr = "10.0.0.2:8080".parse().unwrap();
    let left = candidates(&view, &instances, None, &[failed]);
    assert_eq!(left, vec![("10.0.0.2:8081".parse().unwrap(), "b")]);
}

#[test]
fn an_ejected_instance_is_passed_over() {
    let mut s = base();
    s.instances
        .push(instance("b", "api-1", "api", "10.0.0.2:8080", true));
    s.instances
        .push(instance("b", "api-2", "api", "10.0.0.2:8081", true));
    s.config_entries.push(entry(
        r#"{"Kind":"service-defaults","Name":"web","UpstreamConfig":{"Defaults":{"PassiveHealthCheck":{"MaxFailures":1,"MaxEjectionPercent":50}}}}"#,
    ));
    let view = view_of(s);
    let bad: SocketAddr = "10.0.0.2:8080".parse().unwrap();
    let now = Instant::now();
    let state = State {
        outliers: Outliers::new(now),
        ..State::default()
    };
    let outliers = &state.outliers;
    let policy = view
        .ejection_policy("web", "api")
        .expect("a passive health check");
    assert!(
        outliers.record("web", bad, false, policy, now, 0),
        "not ejected"
    );
    let balancing = state.balancing();
    let instances = view.passing("api");
    for draw in 0..20 {
        let route = pick(
            &view,
            HERE,
            call("api"),
            (&instances, None, None),
            &balancing,
            now,
            &mut || draw,
        )
        .unwrap();
        assert_ne!(route.target(), bad, "the ejected instance was picked");
    }
    // Another caller has not ejected it.
    let ours = Call {
        source: "admin",
        upstream: "api",
        service: "api",
    };
    let picked: Vec<SocketAddr> = (0..20)
        .map(|draw| {
            pick(
                &view,
                HERE,
                ours,
                (&instances, None, None),
                &balancing,
                now,
                &mut || draw,
            )
            .unwrap()
            .target()
        })
        .collect();
    assert!(picked.contains(&bad), "{picked:?}");
}

#[test]
fn a_routed_request_reaches_the_routes_service() {
    let mut s = base();
    s.instances
        .push(instance("b", "api-1", "api", "10.0.0.2:8080", true));
    s.instances.push(instance(
        "a",
        "canary-1",
        "api-canary",
        "10.0.0.1:9090",
        true,
    ));
    s.config_entries.push(http("api"));
    s.config_entries.push(http("api-canary"));
    s.config_entries.push(entry(
        r#"{"Kind":"service-router","Name":"api","Routes":[{"Match":{"HTTP":{"Header":[{"Name":"x-canary","Exact":"1"}]}},"Destination":{"Service":"api-canary"}}]}"#,
    ));
    let view = view_of(s);
    let mut canary = Request::new("GET", "/");
    canary.headers.push(("x-canary".into(), "1".into()));
    let target = view.route_target("api", &canary, 0.0);
    assert_eq!(target.service, "api-canary");
    let resolved = view.instances_of(&target, "dc1");
    assert_eq!(resolved.service, "api-canary");
    let state = State::default();
    let balancing = state.balancing();
    let route = pick(
        &view,
        HERE,
        call("api-canary"),
        (&resolved.instances, None, None),
        &balancing,
        Instant::now(),
        &mut || 0,
    )
    .unwrap();
    assert_eq!(route, Route::Local("10.0.0.1:9090".parse().unwrap()));
    // Without the header: api, on node b.
    let plain = view.route_target("api", &Request::new("GET", "/"), 0.0);
    assert_eq!(plain.service, "api");
}
