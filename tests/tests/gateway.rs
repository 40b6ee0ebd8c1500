//! A mesh gateway (agent.toml `[gateway]`, here on node A's agent) forwards
//! TLS by the server name of its ClientHello, without terminating it: a
//! real TLS client (`openssl s_client`) that names node B through the
//! gateway gets node B's own certificate. What the gateway must not
//! forward is closed and counted: another datacenter's name arriving on the
//! WAN listener (no transit), names outside the mesh, no name, not TLS.
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use weft_tests::mesh::{metric_sum_with, wait_until, Mesh, MeshSpec, NodeA, NodeB, Service};
use weft_tests::require_root;

const LAN_PORT: u16 = 8443;
/// The WAN listener, on node A's loopback (another address than the LAN
/// one, as the gateway requires).
const WAN: &str = "127.0.0.1:8444";

/// What `openssl s_client -servername NAME` to `addr` from node A got: the
/// SPIFFE id of the certificate presented, if a handshake reached one.
fn presented_id(mesh: &Mesh, addr: &str, name: Option<&str>) -> anyhow::Result<Option<String>> {
    let mut args = vec!["s_client", "-connect", addr, "-alpn", "h2", "-tls1_3"];
    match name {
        Some(n) => args.extend(["-servername", n]),
        None => args.push("-noservername"),
    }
    let out = mesh.run(NodeA, "openssl", &args, Duration::from_secs(15))?;
    let begin = "-----BEGIN CERTIFICATE-----";
    let end = "-----END CERTIFICATE-----";
    let (Some(from), Some(to)) = (out.stdout.find(begin), out.stdout.find(end)) else {
        return Ok(None);
    };
    let pem = mesh.path("presented.pem");
    std::fs::write(&pem, &out.stdout[from..to + end.len()])?;
    let text = mesh.run(
        NodeA,
        "openssl",
        &[
            "x509",
            "-in",
            &pem.display().to_string(),
            "-noout",
            "-ext",
            "subjectAltName",
        ],
        Duration::from_secs(10),
    )?;
    let id = text
        .stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("URI:"))
        .map(|s| s.trim_end_matches(',').to_string());
    Ok(id)
}

#[test]
fn a_gateway_forwards_tls_by_its_name_untouched_and_refuses_the_rest() -> anyhow::Result<()> {
    require_root();
    let mut mesh = Mesh::start(
        MeshSpec::new("allow")
            .without_agents()
            .node_a(Service::new("web", 8000))
            .node_b(Service::new("api", 8080)),
    )?;
    let lan = format!("{}:{LAN_PORT}", mesh.ip(NodeA));
    mesh.grant_agent_services(NodeA, &["mesh-gateway"])?;
    let config = mesh.agent_config(NodeA);
    let toml = std::fs::read_to_string(&config)?
        + &format!("\n[gateway]\nlan_address = {lan:?}\nwan_address = {WAN:?}\n");
    std::fs::write(&config, toml)?;
    for node in [NodeA, NodeB] {
        mesh.start_agent(node)?;
        mesh.wait_agent_ready(node, Duration::from_secs(20))?;
    }

    // The gateway is in the catalog, with its WAN address.
    let gateways = mesh.catalog_instances("mesh-gateway")?;
    ensure!(gateways.len() == 1, "mesh-gateway instances: {gateways:?}");
    let instance = mesh.weft_json(&["catalog", "service", "mesh-gateway"])?;
    ensure!(
        instance.to_string().contains(WAN),
        "the gateway's instance does not carry its WAN address: {instance}"
    );

    let dump = mesh.agent_config_dump(NodeA)?;
    let td = dump["view"]["trust_domain"]
        .as_str()
        .context("no trust domain in agent A's view")?
        .to_string();
    let node_b = format!("node-b.dc1.node.{td}");
    let node_b_id = format!("spiffe://{td}/ns/default/dc/dc1/node/node-b");

    // Through either listener, node B's name reaches node B's agent: its
    // certificate, not the gateway's (the gateway has none of its own).
    for addr in [lan.as_str(), WAN] {
        let id = presented_id(&mesh, addr, Some(&node_b))?;
        ensure!(
            id.as_deref() == Some(node_b_id.as_str()),
            "through {addr}: presented {id:?}, not {node_b_id}"
        );
    }

    // Refused: another datacenter from the WAN (no transit; and dc2 has no
    // gateways yet from the LAN), a name outside the mesh, no name, a
    // node that does not exist.
    for (addr, name) in [
        (WAN, Some(format!("node-x.dc2.node.{td}"))),
        (lan.as_str(), Some(format!("node-x.dc2.node.{td}"))),
        (lan.as_str(), Some("example.com".to_string())),
        (lan.as_str(), None),
        (lan.as_str(), Some(format!("node-z.dc1.node.{td}"))),
    ] {
        let id = presented_id(&mesh, addr, name.as_deref())?;
        ensure!(id.is_none(), "{addr} {name:?}: reached {id:?}");
    }
    // Plain HTTP is not TLS.
    let plain = mesh.curl_raw(NodeA, &["-s", "-m", "5", &format!("http://{lan}/")])?;
    ensure!(
        !plain.success(),
        "plain HTTP through the gateway: {plain:?}"
    );

    let counted = |reason: &str| -> anyhow::Result<f64> {
        let text = mesh.metrics(NodeA)?;
        Ok(metric_sum_with(
            &text,
            "weft_agent_gateway_refused_total",
            &[("reason", reason)],
        ))
    };
    wait_until(
        Duration::from_secs(10),
        "the refusals to be counted",
        || {
            Ok((counted("wan_transit")? == 1.0
                && counted("no_route")? == 2.0
                && counted("unknown_name")? == 2.0
                && counted("not_tls")? == 1.0)
                .then_some(()))
        },
    )
    .with_context(|| {
        format!(
            "gateway metrics:\n{}",
            mesh.metrics(NodeA)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("gateway"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    let text = mesh.metrics(NodeA)?;
    let forwarded = metric_sum_with(
        &text,
        "weft_agent_gateway_connections_total",
        &[("datacenter", "dc1")],
    );
    if forwarded != 2.0 {
        bail!("forwarded connections counted: {forwarded}, not 2");
    }
    Ok(())
}
