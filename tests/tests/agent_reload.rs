//! Live reload: the agents re-read agent.toml on SIGHUP and on
//! `weft-agent reload`, taking added, changed and removed services without
//! a restart and without touching unrelated connections; a broken file, or
//! one changing what cannot change live, is refused with its reason and the
//! running configuration keeps serving.
//!
//! Explicit mode: web on node A reaches api on node B through upstream
//! port 9191; both are echo servers (`weft-holder`).
use std::time::Duration;

use anyhow::{ensure, Context};
use weft_tests::mesh::{wait_until, Mesh, MeshSpec, NodeA, NodeB, Service};
use weft_tests::require_root;

const API: &str = "127.0.0.1:9191";
const DB: &str = "127.0.0.1:9292";

/// Whether one short connection from node A to `addr` gets its echo.
fn reaches(mesh: &Mesh, addr: &str) -> anyhow::Result<bool> {
    let mut load = mesh.spawn_load(NodeA, None, &["churn", addr, "1", "1"], "probe.log")?;
    Ok(mesh.load_summary(&mut load, Duration::from_secs(20))?["ok"] == 1)
}

fn append(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let mut config = std::fs::read_to_string(path)?;
    config += text;
    std::fs::write(path, config)?;
    Ok(())
}

/// `weft-agent reload --config` for node's agent: (success, output).
fn reload(mesh: &Mesh, node: weft_tests::mesh::Node) -> anyhow::Result<(bool, String)> {
    let config = mesh.agent_config(node);
    let out = mesh.run(
        node,
        weft_tests::servers::bin("weft-agent"),
        &[
            "reload",
            "--config",
            config.to_str().context("config path")?,
        ],
        Duration::from_secs(30),
    )?;
    Ok((out.success(), out.describe()))
}

fn sighup(mesh: &Mesh, node: weft_tests::mesh::Node) -> anyhow::Result<()> {
    let pid = mesh.agent_pid(node).context("agent pid")?;
    // SAFETY: kill(2) on our own child's pid.
    ensure!(
        unsafe { libc::kill(pid as i32, libc::SIGHUP) } == 0,
        "kill -HUP"
    );
    Ok(())
}

#[test]
fn services_come_and_go_live_and_a_broken_file_changes_nothing() -> anyhow::Result<()> {
    require_root();
    let spec = MeshSpec::new("allow")
        .node_a(Service::new("web", 8000).upstream("api", 9191))
        .node_b(
            Service::new("api", 8080)
                .id("api-b")
                .address(MeshSpec::NODE_ADDR),
        );
    let mut mesh = Mesh::start(spec)?;
    let b = mesh.ip(NodeB);
    mesh.holder(NodeB, &format!("{b}:8080"))?;
    wait_until(Duration::from_secs(30), "web reaches api", || {
        Ok(reaches(&mesh, API)?.then_some(()))
    })?;
    // A connection held across every reload below.
    let mut held = mesh.spawn_load(NodeA, None, &["hold", API, "20"], "held.log")?;

    // SIGHUP on node B with a service added: registered, and reachable
    // once node A's web has an upstream to it (added by `weft-agent
    // reload`, which prints what changed).
    mesh.holder(NodeB, &format!("{b}:8082"))?;
    // Without the right, the agent's own token refuses it (tested below).
    mesh.grant_agent_services(NodeB, &["db"])?;
    let db = Service::new("db", 8082)
        .id("db-b")
        .address(MeshSpec::NODE_ADDR);
    append(&mesh.agent_config(NodeB), &db.toml(&b))?;
    sighup(&mesh, NodeB)?;
    wait_until(Duration::from_secs(15), "db registered by node B", || {
        Ok(mesh
            .catalog_instances("db")?
            .iter()
            .any(|(id, node, health)| id == "db-b" && node == "node-b" && health == "passing")
            .then_some(()))
    })
    .map_err(|e| e.context(mesh.agent_log_tail(NodeB, 30)))?;
    append(
        &mesh.agent_config(NodeA),
        "  [[service.upstream]]\n  name = \"db\"\n  local_port = 9292\n",
    )?;
    let (ok, out) = reload(&mesh, NodeA)?;
    ensure!(ok && out.contains("changed web"), "reload of node A: {out}");
    ensure!(
        reaches(&mesh, DB)?,
        "web does not reach db after the reload"
    );

    // A broken file: refused with its line, by both ways; everything keeps
    // serving as it was.
    let path_b = mesh.agent_config(NodeB);
    let good_b = std::fs::read_to_string(&path_b)?;
    let broken = format!("{good_b}\n[[service]]\nname = \"oops\"\nport = \"x\"\n");
    std::fs::write(&path_b, &broken)?;
    let line = 1 + broken
        .lines()
        .position(|l| l == "port = \"x\"")
        .context("the broken line")?;
    let (ok, out) = reload(&mesh, NodeB)?;
    ensure!(
        !ok && out.contains(&format!(".toml:{line}:")) && out.contains("port"),
        "broken file: {out}"
    );
    sighup(&mesh, NodeB)?;
    wait_until(Duration::from_secs(10), "SIGHUP refusal logged", || {
        Ok(mesh
            .agent_log(NodeB)
            .contains("SIGHUP: reload refused")
            .then_some(()))
    })?;
    // A field that cannot change live: refused by name.
    std::fs::write(&path_b, format!("upgrade_drain_timeout = \"1m\"\n{good_b}"))?;
    let (ok, out) = reload(&mesh, NodeB)?;
    ensure!(
        !ok && out.contains("upgrade_drain_timeout cannot change"),
        "fixed field: {out}"
    );
    // Only a reload reads the file: a registration through the local API
    // runs with the file as last loaded. (It read the file again, so an
    // edit staged for a restart made every registration fail, and one
    // staged for later went live with any workload's registration.)
    mesh.grant_agent_services(NodeB, &["cache"])?;
    let cache_token = mesh.service_token(&["cache"])?;
    let cache = format!(r#"{{"ID":"cache-b","Name":"cache","Port":8083,"Address":"{b}"}}"#);
    let (code, body) = mesh.local_api(
        NodeB,
        ("PUT", "/v1/agent/service/register"),
        Some(&cache_token),
        Some(&cache),
    )?;
    ensure!(
        code == 200,
        "registering cache with an edit staged: {code} {body}"
    );
    let (code, body) = mesh.local_api(
        NodeB,
        ("PUT", "/v1/agent/service/deregister/cache-b"),
        Some(&cache_token),
        None,
    )?;
    ensure!(code == 200, "deregistering cache: {code} {body}");
    ensure!(
        reaches(&mesh, API)? && reaches(&mesh, DB)?,
        "not serving after refused reloads"
    );

    // Removing db: deregistered; the held connection to api never noticed.
    std::fs::write(&path_b, good_b.replace(&db.toml(&b), ""))?;
    let (ok, out) = reload(&mesh, NodeB)?;
    ensure!(ok && out.contains("removed db-b"), "removing db: {out}");
    ensure!(
        mesh.catalog_instances("db")?.is_empty(),
        "db still registered: {:?}",
        mesh.catalog_instances("db")?
    );
    let held = mesh.load_summary(&mut held, Duration::from_secs(40))?;
    ensure!(
        held["error"].is_null(),
        "the held connection was cut: {held}"
    );
    Ok(())
}
