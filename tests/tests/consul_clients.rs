//! Consul's own client libraries against a weft mesh, as a team moving
//! from Consul would use them: pointed at the node's agent
//! (`127.0.0.1:8500`), which answers `/v1/agent/*` itself and forwards the
//! rest to the servers with the caller's token.
//!
//! - py-consul (PyPI): agent, catalog, health, KV with check-and-set and a
//!   blocking query, service and TTL-check registration, a check registered
//!   and deregistered on its own, a leaf certificate, sessions and a lock,
//!   intentions, ACL tokens (`tests/clients/py_consul.py`).
//! - the npm `consul` package: KV with check-and-set, a watch (blocking
//!   reads) and a delete, and the catalog (`tests/clients/npm_consul.js`).
use std::time::Duration;

use anyhow::Context;
use weft_tests::mesh::{Mesh, MeshSpec, NodeA, NodeB, Service};
use weft_tests::{clients, require_root};

/// A token that may read keys under `nothing/` only.
fn weak_token(mesh: &Mesh) -> anyhow::Result<String> {
    let rules = r#"key_prefix "nothing/" { policy = "read" }"#;
    mesh.weft(&[
        "acl", "policy", "create", "--name", "weak", "--rules", rules,
    ])?;
    let v = mesh.weft_json(&["acl", "token", "create", "--policy", "weak"])?;
    v["secret_id"]
        .as_str()
        .map(String::from)
        .context("token create printed no secret_id")
}

#[test]
fn py_consul_through_the_agent() -> anyhow::Result<()> {
    require_root();
    let mesh = Mesh::start(MeshSpec::new("deny"))?;
    // The agent registers what its callers register: its own token needs
    // the right too, as with Consul.
    mesh.grant_agent_services(NodeA, &["pyapp"])?;
    let weak = weak_token(&mesh)?;
    let script = clients::script("py_consul.py");
    let out = mesh.run(
        NodeA,
        clients::python(),
        &[
            script.to_str().context("script path")?,
            &mesh.token,
            &weak,
            NodeA.node_name(),
        ],
        Duration::from_secs(120),
    )?;
    anyhow::ensure!(
        out.success(),
        "py-consul: {}\nagent log:\n{}",
        out.describe(),
        mesh.agent_log_tail(NodeA, 40)
    );
    let summary: serde_json::Value =
        serde_json::from_str(out.stdout.lines().last().context("no summary printed")?)
            .with_context(|| format!("summary of {}", out.stdout))?;
    assert_eq!(summary["datacenter"], "dc1");
    assert_eq!(
        summary["members"],
        serde_json::json!([NodeA.node_name(), NodeB.node_name()])
    );
    assert_eq!(summary["pyapp"]["node"], NodeA.node_name());
    assert_eq!(summary["pyapp"]["port"], 9100);
    assert_eq!(summary["pyapp"]["tags"], serde_json::json!(["py"]));
    assert!(
        summary["pyapp"]["checks"].as_array().is_some_and(|c| c
            .iter()
            .any(|c| c == &serde_json::json!(["passing", "all good"]))),
        "{summary}"
    );
    assert_eq!(
        summary["check"],
        serde_json::json!({"name": "pyapp beat", "notes": "from python", "service": "pyapp-1"})
    );
    assert_eq!(summary["node_check"], true);
    assert_eq!(
        summary["leaf"],
        serde_json::json!({"service": "pyapp", "uri": "ns/default/dc/dc1/svc/pyapp", "key": true, "cert": true})
    );
    assert_eq!(summary["kv"], "four");
    assert_eq!(summary["sessions"], serde_json::json!(["py-standby"]));
    assert_eq!(summary["lock"]["value"], "second");
    assert_eq!(summary["lock"]["session"], "");
    assert_eq!(summary["lock"]["lock_index"], 2);
    assert_eq!(
        summary["external"],
        serde_json::json!({"node": "db-host", "address": "10.9.0.5", "external": "true"})
    );
    assert_eq!(summary["agent_node_register"], "refused");
    assert_eq!(summary["tree_kept"], "z");
    assert_eq!(summary["web_to_pyapp_allowed"], false);
    assert_eq!(summary["weak_write"], "refused");
    // Nothing the weak token tried landed, and the session's lock went
    // with it.
    let kv = mesh.weft(&["kv", "get", "py/config"])?;
    assert_eq!(kv.trim(), "four");
    Ok(())
}

#[test]
fn npm_consul_through_the_agent() -> anyhow::Result<()> {
    require_root();
    let mesh = Mesh::start(MeshSpec::new("deny").node_b(Service::new("api", 8080)))?;
    let script = clients::script("npm_consul.js");
    let mut cmd = std::process::Command::new("node");
    cmd.arg(&script)
        .args([mesh.token.as_str(), "api", NodeA.node_name()])
        .env("NODE_PATH", clients::node_modules());
    let _ns = weft_tests::mesh::in_netns(&mut cmd, mesh.netns(NodeA))?;
    let out = weft_tests::mesh::run_bounded(&mut cmd, Duration::from_secs(60))?;
    anyhow::ensure!(
        out.success(),
        "npm consul: {}\nagent log:\n{}",
        out.describe(),
        mesh.agent_log_tail(NodeA, 40)
    );
    let summary: serde_json::Value =
        serde_json::from_str(out.stdout.lines().last().context("no summary printed")?)
            .with_context(|| format!("summary of {}", out.stdout))?;
    assert_eq!(
        summary["keys"],
        serde_json::json!(["js/greeting", "js/other"])
    );
    assert_eq!(summary["watched"], serde_json::json!(["hi", "woken"]));
    assert_eq!(
        summary["instances"],
        serde_json::json!([{"node": NodeB.node_name(), "service": "api", "port": 8080}])
    );
    assert_eq!(
        summary["nodes"],
        serde_json::json!([NodeA.node_name(), NodeB.node_name()])
    );
    assert_eq!(summary["anonymous"], "refused");
    Ok(())
}
