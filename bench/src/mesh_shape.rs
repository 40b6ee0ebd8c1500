//! The shape of the benchmark's large mesh, shared by the program that
//! writes it into a server (`weft-bench-populate`) and the in-process
//! measurement of what a change costs the agent's view (`weft-bench view`):
//! names, addresses, instances, intentions and config entries, each a pure
//! function of its number, so both build the same mesh.
use weft_api::proto;

pub fn node_name(i: usize) -> String {
    format!("large-node-{i}")
}

/// A distinct address per node, in 10.200.0.0/16 and up.
pub fn node_address(i: usize) -> String {
    format!("10.{}.{}.{}", 200 + (i >> 16), (i >> 8) & 0xff, i & 0xff)
}

pub fn service_name(s: usize) -> String {
    format!("large-{s}")
}

/// Instance `k` of service `s`: on node `(s * per_service + k) % nodes`,
/// port 20000 + `s` (so no two share an address and port).
pub fn instance(
    s: usize,
    k: usize,
    per_service: usize,
    nodes: usize,
    passing: bool,
) -> proto::ServiceInstance {
    let node = (s * per_service + k) % nodes;
    let health = if passing {
        proto::Health::Passing
    } else {
        proto::Health::Critical
    };
    proto::ServiceInstance {
        id: format!("{}-{k}", service_name(s)),
        service: service_name(s),
        node: node_name(node),
        address: node_address(node),
        port: (20_000 + s) as u32,
        health: health as i32,
        ..Default::default()
    }
}

/// Intention `i`: between two of the services, allow or deny in turn.
pub fn intention(i: usize, services: usize, flipped: bool) -> proto::Intention {
    let allow = i.is_multiple_of(2) != flipped;
    proto::Intention {
        source: service_name(i % services),
        destination: service_name((i * 7 + 1) % services),
        action: if allow { "allow" } else { "deny" }.into(),
        description: "benchmark: large mesh".into(),
        ..Default::default()
    }
}

pub fn http_defaults(s: usize) -> String {
    format!(
        r#"{{"Kind":"service-defaults","Name":"{}","Protocol":"http"}}"#,
        service_name(s)
    )
}

/// A router on service `s`: a header route, a path-regex route and a
/// prefix route, each to another service.
pub fn router(s: usize, services: usize) -> String {
    let to = |n: usize| service_name((s + n) % services);
    format!(
        r#"{{"Kind":"service-router","Name":"{name}","Routes":[
            {{"Match":{{"HTTP":{{"Header":[{{"Name":"x-canary","Exact":"1"}}]}}}},"Destination":{{"Service":"{a}"}}}},
            {{"Match":{{"HTTP":{{"PathRegex":"/v[0-9]+/items/[a-z0-9-]+"}}}},"Destination":{{"Service":"{b}"}}}},
            {{"Match":{{"HTTP":{{"PathPrefix":"/admin"}}}},"Destination":{{"Service":"{c}","RequestTimeout":"2s"}}}}]}}"#,
        name = service_name(s),
        a = to(1),
        b = to(2),
        c = to(3),
    )
}
