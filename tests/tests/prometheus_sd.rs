//! Prometheus scraping every agent, found through weft's Consul API.
//!
//! Debian's `prometheus` (installed by `cargo xtask setup`) is built without
//! Consul discovery: Debian disabled it in 2.33.5+ds1-4 ("until its Debian
//! package is back in shape"), and bookworm's 2.42 and trixie's 2.53 both
//! refuse `consul_sd_configs` ("field consul_sd_configs not found"). So the
//! test sends the requests Prometheus's Consul discovery sends (Consul's Go
//! client: `/v1/agent/self` for the datacenter, `/v1/catalog/services` and
//! `/v1/health/service/NAME` with `?stale`, `?dc`, `?index` and `?wait` in
//! Go's units) to node A's agent, which answers the first and forwards the
//! others to the servers with the job's token; it derives the targets as
//! Consul discovery with the usual relabeling for agents does (each node's
//! address at the agents' metrics port), and hands them to Debian's
//! Prometheus as `file_sd_configs`. Prometheus's own `/api/v1/targets` and a
//! query show both agents scraped; `/config` stays closed to the other
//! node.
use std::time::Duration;

use anyhow::{ensure, Context};
use weft_tests::mesh::{wait_until, Mesh, MeshSpec, NodeA, NodeB, Service};
use weft_tests::require_root;

const PROMETHEUS: &str = "127.0.0.1:9099";

#[test]
fn prometheus_discovers_and_scrapes_every_agent() -> anyhow::Result<()> {
    require_root();
    let mesh = Mesh::start(
        MeshSpec::new("deny")
            .admin_on_every_address()
            .node_a(Service::new("web", 8081))
            .node_b(Service::new("api", 8080)),
    )?;
    // What a scraper needs: read on services and nodes (the agent's
    // `/v1/agent/self` takes node read on its node).
    let rules = r#"service_prefix "" { policy = "read" } node_prefix "" { policy = "read" }"#;
    mesh.weft(&[
        "acl", "policy", "create", "--name", "scrape", "--rules", rules,
    ])?;
    let token = mesh.weft_json(&["acl", "token", "create", "--policy", "scrape"])?["secret_id"]
        .as_str()
        .context("a secret")?
        .to_string();
    // What Prometheus's Consul discovery asks, through the agent.
    let get = |path: &str| -> anyhow::Result<serde_json::Value> {
        let url = format!("http://127.0.0.1:8500{path}");
        let out = mesh.curl_raw(
            NodeA,
            &[
                "-sS",
                "-m",
                "10",
                "-f",
                "-H",
                &mesh.token_header(&token)?,
                &url,
            ],
        )?;
        ensure!(out.success(), "GET {path}: {}", out.describe());
        Ok(serde_json::from_str(&out.stdout)?)
    };
    let dc = get("/v1/agent/self")?["Config"]["Datacenter"]
        .as_str()
        .context("the agent's datacenter")?
        .to_string();
    let services = get(&format!(
        "/v1/catalog/services?dc={dc}&index=1&stale=&wait=2000ms"
    ))?;
    let mut targets: Vec<(String, String)> = Vec::new();
    for name in services.as_object().context("services")?.keys() {
        let entries = get(&format!(
            "/v1/health/service/{name}?dc={dc}&index=1&stale=&wait=2000ms"
        ))?;
        for e in entries.as_array().context("entries")? {
            let node = e["Node"]["Node"].as_str().context("node")?.to_string();
            let address = e["Node"]["Address"].as_str().context("address")?;
            let target = (format!("{address}:15020"), node);
            if !targets.contains(&target) {
                targets.push(target);
            }
        }
    }
    targets.sort();
    let file_sd: Vec<serde_json::Value> = targets
        .iter()
        .map(|(t, node)| serde_json::json!({"targets": [t], "labels": {"node": node}}))
        .collect();
    let targets_file = mesh.path("agents.json");
    std::fs::write(&targets_file, serde_json::to_vec(&file_sd)?)?;
    let config = mesh.path("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n\
             - job_name: weft-agents\n\
             \x20 file_sd_configs:\n\
             \x20 - files: [{:?}]\n",
            targets_file.display().to_string()
        ),
    )?;
    let mut prometheus = std::process::Command::new("prometheus");
    prometheus.args([
        &format!("--config.file={}", config.display()),
        &format!(
            "--storage.tsdb.path={}",
            mesh.path("prometheus-data").display()
        ),
        &format!("--web.listen-address={PROMETHEUS}"),
    ]);
    let _prometheus = mesh.spawn(NodeA, &mut prometheus, "prometheus.log")?;
    let log = || std::fs::read_to_string(mesh.path("prometheus.log")).unwrap_or_default();

    // Both agents discovered and scraped up.
    let targets = wait_until(Duration::from_secs(60), "both agents scraped", || {
        let out = mesh.curl_raw(
            NodeA,
            &[
                "-sS",
                "-m",
                "5",
                &format!("http://{PROMETHEUS}/api/v1/targets?state=active"),
            ],
        )?;
        if !out.success() {
            return Ok(None);
        }
        let v: serde_json::Value = serde_json::from_str(&out.stdout)?;
        let mut up: Vec<(String, String)> = v["data"]["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["health"] == "up")
            .map(|t| {
                (
                    t["labels"]["node"].as_str().unwrap_or_default().to_string(),
                    t["labels"]["instance"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect();
        up.sort();
        Ok((up.len() == 2).then_some((up, v)))
    })
    .map_err(|e| e.context(format!("prometheus log:\n{}", log())))?;
    assert_eq!(
        targets.0,
        [
            (
                NodeA.node_name().to_string(),
                format!("{}:15020", mesh.ip(NodeA))
            ),
            (
                NodeB.node_name().to_string(),
                format!("{}:15020", mesh.ip(NodeB))
            ),
        ],
        "{}",
        targets.1
    );
    // The scrapes hold the agents' own metrics.
    // (The registrations counter has a value from the agent's start.)
    let query = "sum by (node) (weft_agent_registrations_total) > 0";
    let out = mesh.curl_raw(
        NodeA,
        &[
            "-sS",
            "-m",
            "5",
            "-G",
            &format!("http://{PROMETHEUS}/api/v1/query"),
            "--data-urlencode",
            &format!("query={query}"),
        ],
    )?;
    ensure!(out.success(), "{}", out.describe());
    let v: serde_json::Value = serde_json::from_str(&out.stdout)?;
    let mut nodes: Vec<&str> = v["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["metric"]["node"].as_str())
        .collect();
    nodes.sort();
    assert_eq!(nodes, [NodeA.node_name(), NodeB.node_name()], "{v}");

    // The admin port on the network serves metrics, not the configuration,
    // even to a token that may read it.
    let b = mesh.ip(NodeB);
    let config_from_a = mesh.curl_raw(
        NodeA,
        &[
            "-sS",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &mesh.token_header(&mesh.token)?,
            &format!("http://{b}:15020/config"),
        ],
    )?;
    assert_eq!(
        config_from_a.stdout.trim(),
        "403",
        "{}",
        config_from_a.describe()
    );
    Ok(())
}
