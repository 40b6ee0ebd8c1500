//! Agents that are upgraded or stopped while traffic flows.
//!
//! `web` on node A reaches `api` on node B, an echo server (`weft-holder`).
//! Two clients run as web throughout (`weft-load`): one connection held
//! open, a byte there and back every 100 ms, and about 200 new connections
//! a second. The test counts what they saw fail; nothing may.
//!
//! - Upgrade: a second `weft-agent` started with the same configuration
//!   takes over from the running one (its listening sockets, over the
//!   control socket), first on node A (the source), then on node B (the
//!   destination); both predecessors then serve the held connection to its
//!   end and exit by themselves. Explicit and transparent (eBPF) mode.
//! - SIGTERM of the destination's agent, with a second api instance on
//!   node A: node B goes into maintenance, new connections go to node A's
//!   instance, held connections finish, and the agent exits.
use std::time::Duration;

use anyhow::{ensure, Context};
use weft_tests::mesh::{metric_sum, wait_until, Mesh, MeshSpec, NodeA, NodeB, Proc, Service};
use weft_tests::require_root;

/// Connections node B's agent has opened to api.
const OPENED: &str = "weft_agent_connections_opened_total";
/// New connections a second, as the issue asks.
const RATE: &str = "200";
/// How long the load runs, and the held connection lasts (over 30 s).
const LOAD_SECS: u64 = 36;
/// What a successor may take to start and take over.
const TAKEOVER_LIMIT: Duration = Duration::from_secs(30);
/// Extra time the load gets to finish after its nominal duration.
const LOAD_SLACK: Duration = Duration::from_secs(30);

/// Where web's clients connect: the explicit upstream, or api's virtual IP.
fn target(mesh: &Mesh) -> anyhow::Result<String> {
    if mesh.is_ebpf() {
        Ok(format!("{}:8080", mesh.vip("api")?))
    } else {
        Ok("127.0.0.1:9191".into())
    }
}

fn web(mesh: &Mesh) -> Option<&'static str> {
    mesh.is_ebpf().then_some("web")
}

/// Waits until one short connection from web reaches api.
fn wait_reachable(mesh: &Mesh, addr: &str) -> anyhow::Result<()> {
    wait_until(Duration::from_secs(30), "web reaches api", || {
        let mut load =
            mesh.spawn_load(NodeA, web(mesh), &["churn", addr, "1", "1"], "probe.log")?;
        let summary = mesh.load_summary(&mut load, Duration::from_secs(20))?;
        Ok((summary["ok"] == 1).then_some(()))
    })
}

/// Reads the clients' summaries and checks that nothing failed.
fn judge(mesh: &Mesh, held: &mut Proc, churn: &mut Proc) -> anyhow::Result<()> {
    let limit = Duration::from_secs(LOAD_SECS) + LOAD_SLACK;
    let held = mesh.load_summary(held, limit)?;
    let churn = mesh.load_summary(churn, limit)?;
    eprintln!("held connection: {held}\nnew connections: {churn}");
    ensure!(
        held["error"].is_null(),
        "the held connection was cut: {held}"
    );
    ensure!(
        held["held_ms"].as_u64().unwrap_or(0) >= LOAD_SECS * 1000,
        "the held connection did not last: {held}"
    );
    ensure!(
        churn["failed"] == 0 && churn["ok"] == churn["sent"],
        "new connections failed: {churn}"
    );
    Ok(())
}

fn upgrade_drops_nothing(spec: MeshSpec) -> anyhow::Result<()> {
    let mut mesh = Mesh::start(spec)?;
    let b = mesh.ip(NodeB);
    mesh.holder(NodeB, &format!("{b}:8080"))?;
    let addr = target(&mesh)?;
    wait_reachable(&mesh, &addr)?;

    let secs = LOAD_SECS.to_string();
    let mut held = mesh.spawn_load(NodeA, web(&mesh), &["hold", &addr, &secs], "held.log")?;
    let mut churn = mesh.spawn_load(
        NodeA,
        web(&mesh),
        &["churn", &addr, RATE, &secs],
        "churn.log",
    )?;
    // Let the load get going, then upgrade the source's agent, then the
    // destination's, each while the other runs.
    wait_until(
        Duration::from_secs(10),
        "the held connection is open",
        || {
            let metrics = mesh.metrics(NodeB)?;
            Ok((metric_sum(&metrics, OPENED) >= 1.0).then_some(()))
        },
    )?;
    let mut old_a = mesh.upgrade_agent(NodeA, TAKEOVER_LIMIT)?;
    let mut old_b = mesh.upgrade_agent(NodeB, TAKEOVER_LIMIT)?;
    eprintln!("both agents upgraded; the predecessors drain");

    judge(&mesh, &mut held, &mut churn).map_err(|e| {
        e.context(format!(
            "agent A log:\n{}\nagent B log:\n{}",
            mesh.agent_log_tail(NodeA, 40),
            mesh.agent_log_tail(NodeB, 40)
        ))
    })?;
    // With their last connection gone, the predecessors exit by themselves,
    // the node still registered and served by the successors.
    for (name, old) in [("A", &mut old_a), ("B", &mut old_b)] {
        let status = old
            .wait_exit(Duration::from_secs(20))
            .with_context(|| format!("node {name}'s predecessor still runs"))?;
        ensure!(
            status.success(),
            "node {name}'s predecessor exited with {status}"
        );
    }
    let nodes = mesh.catalog_nodes()?;
    ensure!(nodes.len() == 2, "nodes after the upgrades: {nodes:?}");
    wait_reachable(&mesh, &addr)?;
    Ok(())
}

#[test]
fn an_upgrade_in_place_drops_no_connection_explicit() -> anyhow::Result<()> {
    require_root();
    upgrade_drops_nothing(
        MeshSpec::new("allow")
            .node_a(Service::new("web", 8000).upstream("api", 9191))
            .node_b(
                Service::new("api", 8080)
                    .id("api-b")
                    .address(MeshSpec::NODE_ADDR),
            ),
    )
}

#[test]
fn an_upgrade_in_place_drops_no_connection_ebpf() -> anyhow::Result<()> {
    require_root();
    upgrade_drops_nothing(
        MeshSpec::new("allow")
            .ebpf()
            .node_a(Service::new("web", 8000).cgroup("web"))
            .node_b(
                Service::new("api", 8080)
                    .id("api-b")
                    .address(MeshSpec::NODE_ADDR),
            ),
    )
}

#[test]
fn a_stopping_destination_agent_sends_new_connections_elsewhere() -> anyhow::Result<()> {
    require_root();
    let spec = MeshSpec::new("allow")
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
    mesh.holder(NodeA, &format!("{a}:8081"))?;
    mesh.holder(NodeB, &format!("{b}:8080"))?;
    let addr = target(&mesh)?;
    wait_reachable(&mesh, &addr)?;

    // Held connections shorter than the drain timeout (5 s), several so
    // that some go to node B; and new connections throughout.
    let mut held: Vec<_> = (0..6)
        .map(|i| mesh.spawn_load(NodeA, None, &["hold", &addr, "4"], &format!("held-{i}.log")))
        .collect::<anyhow::Result<_>>()?;
    let mut churn = mesh.spawn_load(NodeA, None, &["churn", &addr, RATE, "10"], "churn.log")?;
    wait_until(
        Duration::from_secs(10),
        "a connection through node B",
        || {
            let metrics = mesh.metrics(NodeB)?;
            Ok((metric_sum(&metrics, OPENED) >= 1.0).then_some(()))
        },
    )?;
    let status = mesh.stop_agent(NodeB)?;
    ensure!(
        status.is_some_and(|s| s.success()),
        "node B's agent did not exit cleanly within 10 s: {status:?}\n{}",
        mesh.agent_log_tail(NodeB, 40)
    );
    for (i, h) in held.iter_mut().enumerate() {
        let summary = mesh.load_summary(h, Duration::from_secs(20))?;
        ensure!(
            summary["error"].is_null(),
            "held connection {i} was cut: {summary}\n{}",
            mesh.agent_log_tail(NodeB, 40)
        );
    }
    let churn = mesh.load_summary(&mut churn, Duration::from_secs(40))?;
    eprintln!("new connections across node B's SIGTERM: {churn}");
    ensure!(
        churn["failed"] == 0 && churn["ok"] == churn["sent"],
        "new connections failed: {churn}\nagent A:\n{}\nagent B:\n{}",
        mesh.agent_log_tail(NodeA, 30),
        mesh.agent_log_tail(NodeB, 30)
    );
    let log = mesh.agent_log(NodeB);
    ensure!(
        log.contains("node in maintenance"),
        "node B did not go into maintenance first:\n{}",
        mesh.agent_log_tail(NodeB, 40)
    );
    Ok(())
}
