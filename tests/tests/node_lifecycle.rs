//! Nodes that come and go: the servers notice an agent that stopped and take
//! its node's instances out of rotation; a node that comes back goes back in.
//!
//! Two agents in explicit mode and one server with a short node timeout:
//! web on node A reaches `api` through its upstream port; api has one
//! instance on each node.
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use weft_tests::mesh::{wait_until, Mesh, MeshSpec, NodeA, NodeB, Service};
use weft_tests::require_root;

const UPSTREAM: &str = "http://127.0.0.1:9191/";
const NODE_TIMEOUT: Duration = Duration::from_secs(3);

/// The node-level health of `node`, as `weft catalog nodes` shows it.
fn node_health(mesh: &Mesh, node: &str) -> anyhow::Result<String> {
    let nodes = mesh.weft_json(&["catalog", "nodes"])?;
    nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == node))
        .and_then(|n| n["health"].as_str())
        .map(String::from)
        .with_context(|| format!("node {node} not in {nodes}"))
}

/// An instance of api at its node's address on `port`, checked over HTTP
/// every second.
fn api(id: &str, port: u16) -> Service {
    Service::new("api", port)
        .id(id)
        .address(MeshSpec::NODE_ADDR)
        .healthz_check("1s")
}

/// One request through web's upstream: the instance that answered, or None.
fn ask(mesh: &Mesh) -> Option<String> {
    let body = mesh.curl_with(NodeA, UPSTREAM, &["-m", "1"]).ok()?;
    body.trim().strip_prefix("instance ").map(String::from)
}

#[test]
fn a_killed_agents_instances_leave_rotation_and_come_back_with_it() -> anyhow::Result<()> {
    require_root();
    let spec = MeshSpec::new("allow")
        .server_arg(&format!("--node-timeout={}s", NODE_TIMEOUT.as_secs()))
        .node_a(Service::new("web", 8000).upstream("api", 9191))
        .node_a(api("api-a", 8081))
        .node_b(api("api-b", 8080));
    let mut mesh = Mesh::start(spec)?;
    let (a, b) = (mesh.ip(NodeA), mesh.ip(NodeB));
    mesh.workload(NodeA, "api-a", &format!("{a}:8081"))?;
    mesh.workload(NodeB, "api-b", &format!("{b}:8080"))?;
    // Both instances are in rotation.
    let mut seen = std::collections::BTreeSet::new();
    wait_until(Duration::from_secs(30), "both api instances answer", || {
        if let Some(name) = ask(&mesh) {
            seen.insert(name);
        }
        Ok((seen.len() == 2).then_some(()))
    })?;
    ensure!(node_health(&mesh, "node-b")? == "passing");

    // kill -9 of node B's agent: no deregistration, no goodbye. A client
    // loop counts what fails until node B is critical and requests have
    // gone only to api-a for a while.
    mesh.kill_agent(NodeB);
    let killed = Instant::now();
    let (mut failed, mut sent) = (0u32, 0u32);
    let mut detected: Option<Duration> = None;
    let mut only_a_since: Option<Instant> = None;
    let deadline = killed + NODE_TIMEOUT + Duration::from_secs(20);
    loop {
        ensure!(
            Instant::now() < deadline,
            "node B's instance still chosen {:?} after the kill: {failed} of {sent} \
             requests failed, node-b is {}",
            killed.elapsed(),
            node_health(&mesh, "node-b").unwrap_or_default()
        );
        sent += 1;
        match ask(&mesh) {
            Some(name) if name == "api-a" => {
                only_a_since.get_or_insert_with(Instant::now);
            }
            other => {
                if other.is_none() {
                    failed += 1;
                }
                only_a_since = None;
            }
        }
        if detected.is_none() && node_health(&mesh, "node-b")? == "critical" {
            detected = Some(killed.elapsed());
        }
        // Detected, and nothing but api-a for two seconds since.
        if detected.is_some() && only_a_since.is_some_and(|t| t.elapsed() > Duration::from_secs(2))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let detected = detected.context("detected")?;
    eprintln!(
        "node B marked critical {detected:?} after kill -9 (node timeout {NODE_TIMEOUT:?}); \
         {failed} of {sent} requests failed meanwhile; api-a alone answers since"
    );
    ensure!(
        detected < NODE_TIMEOUT + Duration::from_secs(3),
        "node B went critical only {detected:?} after the kill"
    );
    // Clients see why.
    let instances = mesh.catalog_instances("api")?;
    ensure!(
        instances
            .iter()
            .any(|(id, _, health)| id == "api-b" && health == "critical"),
        "api-b is not shown critical: {instances:?}"
    );

    // The agent comes back: heartbeats lift the node-level check and api-b
    // takes requests again.
    mesh.start_agent(NodeB)?;
    mesh.wait_agent_ready(NodeB, Duration::from_secs(20))?;
    wait_until(Duration::from_secs(15), "node-b passing again", || {
        Ok((node_health(&mesh, "node-b")? == "passing").then_some(()))
    })?;
    wait_until(Duration::from_secs(15), "api-b answers again", || {
        Ok((ask(&mesh).as_deref() == Some("api-b")).then_some(()))
    })?;
    Ok(())
}

#[test]
fn an_instance_critical_past_its_deregister_delay_leaves_the_catalog() -> anyhow::Result<()> {
    require_root();
    let spec = MeshSpec::new("allow")
        .server_arg(&format!("--node-timeout={}s", NODE_TIMEOUT.as_secs()))
        .node_a(Service::new("web", 8000).upstream("api", 9191))
        .node_b(api("api-b", 8080).deregister_critical_after("2s"));
    let mut mesh = Mesh::start(spec)?;
    let b = mesh.ip(NodeB);
    mesh.workload(NodeB, "api-b", &format!("{b}:8080"))?;
    wait_until(Duration::from_secs(30), "api-b answers", || {
        Ok((ask(&mesh).as_deref() == Some("api-b")).then_some(()))
    })?;
    let registered = |mesh: &Mesh| -> anyhow::Result<bool> {
        Ok(mesh
            .catalog_instances("api")?
            .iter()
            .any(|(id, _, _)| id == "api-b"))
    };
    ensure!(registered(&mesh)?);

    // Its node goes silent: critical after the node timeout, removed 2 s
    // after that.
    mesh.kill_agent(NodeB);
    let killed = Instant::now();
    wait_until(
        NODE_TIMEOUT + Duration::from_secs(10),
        "api-b deregistered",
        || Ok((!registered(&mesh)?).then_some(())),
    )?;
    let gone = killed.elapsed();
    eprintln!("api-b deregistered {gone:?} after kill -9 (node timeout {NODE_TIMEOUT:?} + 2 s)");
    // The last heartbeat may have left up to one interval (a fifth of the
    // timeout) before the kill.
    let earliest = NODE_TIMEOUT + Duration::from_secs(2) - NODE_TIMEOUT / 5;
    ensure!(
        gone >= earliest,
        "deregistered after {gone:?}: before the node timeout and the delay had passed"
    );
    // The node itself stays, critical, until its agent comes back and
    // registers it (and its instance) again.
    ensure!(node_health(&mesh, "node-b")? == "critical");
    mesh.start_agent(NodeB)?;
    mesh.wait_agent_ready(NodeB, Duration::from_secs(20))?;
    wait_until(
        Duration::from_secs(15),
        "api-b registered and answering again",
        || Ok((registered(&mesh)? && ask(&mesh).as_deref() == Some("api-b")).then_some(())),
    )?;
    Ok(())
}

#[test]
fn maintenance_takes_a_node_out_of_rotation_until_lifted() -> anyhow::Result<()> {
    require_root();
    let spec = MeshSpec::new("allow")
        .server_arg(&format!("--node-timeout={}s", NODE_TIMEOUT.as_secs()))
        .node_a(Service::new("web", 8000).upstream("api", 9191))
        .node_a(
            Service::new("api", 8081)
                .id("api-a")
                .address(MeshSpec::NODE_ADDR),
        )
        .node_b(
            Service::new("api", 8080)
                .id("api-b")
                .address(MeshSpec::NODE_ADDR),
        );
    let mut mesh = Mesh::start(spec)?;
    let (a, b) = (mesh.ip(NodeA), mesh.ip(NodeB));
    mesh.workload(NodeA, "api-a", &format!("{a}:8081"))?;
    mesh.workload(NodeB, "api-b", &format!("{b}:8080"))?;
    wait_until(Duration::from_secs(30), "api-b answers", || {
        Ok((ask(&mesh).as_deref() == Some("api-b")).then_some(()))
    })?;

    // Node A's agent token (node A, and the api service) may not put
    // node B in maintenance.
    let token_a = std::fs::read_to_string(mesh.path("agent-a.token"))?;
    let out = mesh.weft_as(
        NodeA,
        Some(token_a.trim()),
        &["catalog", "maintenance", "node-b"],
    )?;
    ensure!(
        !out.success() && out.describe().contains("lacks write on node"),
        "another node's token put node B in maintenance: {}",
        out.describe()
    );
    ensure!(node_health(&mesh, "node-b")? == "passing");

    mesh.weft(&[
        "catalog",
        "maintenance",
        "node-b",
        "--reason",
        "kernel upgrade",
    ])?;
    let nodes = mesh.weft_json(&["catalog", "nodes"])?;
    let output = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == "node-b"))
        .map(|n| n["health_output"].to_string())
        .unwrap_or_default();
    ensure!(
        output.contains("node under maintenance: kernel upgrade"),
        "node-b's output: {output}"
    );
    // Agents stop choosing api-b, and node B's own heartbeats (several node
    // timeouts' worth) do not lift it.
    let until = Instant::now() + 2 * NODE_TIMEOUT;
    wait_until(Duration::from_secs(10), "api-a alone answers", || {
        Ok((ask(&mesh).as_deref() == Some("api-a")).then_some(()))
    })?;
    while Instant::now() < until {
        ensure!(
            ask(&mesh).as_deref() == Some("api-a"),
            "api-b chosen in maintenance"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(node_health(&mesh, "node-b")? == "critical");

    mesh.weft(&["catalog", "maintenance", "node-b", "--disable"])?;
    wait_until(Duration::from_secs(15), "api-b answers again", || {
        Ok((ask(&mesh).as_deref() == Some("api-b")).then_some(()))
    })?;
    ensure!(node_health(&mesh, "node-b")? == "passing");
    Ok(())
}

/// api-b's health in the catalog, as `weft catalog service api` shows it.
fn api_b_health(mesh: &Mesh) -> anyhow::Result<String> {
    let instances = mesh.catalog_instances("api")?;
    (instances.into_iter())
        .find(|(id, _, _)| id == "api-b")
        .map(|(_, _, health)| health)
        .context("api-b not in the catalog")
}

/// A server restored from a snapshot taken while an instance was critical
/// lists it critical again, while its checks have passed since: the agent
/// sees the catalog's health differ from its checks and writes it again.
/// Before, nothing was written until the checks next changed, and the
/// instance stayed out of rotation.
#[test]
fn health_a_restored_server_lost_is_written_again() -> anyhow::Result<()> {
    require_root();
    let spec = MeshSpec::new("allow")
        .node_a(Service::new("web", 8000).upstream("api", 9191))
        .node_b(api("api-b", 8080));
    let mut mesh = Mesh::start(spec)?;
    wait_until(
        Duration::from_secs(20),
        "api-b critical (no workload)",
        || Ok((api_b_health(&mesh)? == "critical").then_some(())),
    )?;
    let snapshot = mesh.path("critical.snap");
    let snapshot = snapshot.to_str().context("snapshot path")?;
    mesh.weft(&["snapshot", "save", snapshot])?;

    let b = mesh.ip(NodeB);
    mesh.workload(NodeB, "api-b", &format!("{b}:8080"))?;
    wait_until(Duration::from_secs(20), "web reaches api-b", || {
        Ok((ask(&mesh).as_deref() == Some("api-b")).then_some(()))
    })?;

    mesh.weft(&["snapshot", "restore", snapshot])?;
    let restored = Instant::now();
    wait_until(
        Duration::from_secs(20),
        "api-b passing again after the restore",
        || Ok((api_b_health(&mesh)? == "passing").then_some(())),
    )
    .map_err(|e| e.context(mesh.agent_log_tail(NodeB, 20)))?;
    wait_until(Duration::from_secs(10), "web reaches api-b again", || {
        Ok((ask(&mesh).as_deref() == Some("api-b")).then_some(()))
    })?;
    eprintln!(
        "api-b back in rotation {:?} after the restore",
        restored.elapsed()
    );
    ensure!(
        mesh.agent_log_tail(NodeB, 50).contains("writing it again"),
        "node B's agent did not say it wrote api-b's health again"
    );
    Ok(())
}
