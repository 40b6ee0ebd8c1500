//! A state larger than one gRPC message (4 MiB): KV of 80 × 64 KiB.
//!
//! - A watch with `include_kv` gets the snapshot in parts, each under the
//!   server's part bound, together every key; one without gets no KV.
//! - `weft kv list` pages through it.
//! - Agents (which do not ask for KV) start and follow the watch as
//!   before: a restarted agent serves, no "message length too large".
use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context};
use weft_api::proto::watch_client::WatchClient;
use weft_api::proto::{watch_event, WatchRequest};
use weft_tests::mesh::{wait_until, Mesh, MeshSpec, NodeA, NodeB, Service};
use weft_tests::require_root;

const KEYS: usize = 80;
const VALUE_BYTES: usize = 64 * 1024;
/// The server's snapshot part bound (server/src/grpc/watch.rs), plus one
/// item's slack.
const PART_BOUND: usize = (1 << 20) + VALUE_BYTES + 1024;

/// The snapshot parts a watch from index 0 gets: (encoded size, KV keys).
/// Runs inside node A's namespace (the server is reachable there only).
fn snapshot_parts(mesh: &Mesh, include_kv: bool) -> anyhow::Result<Vec<(usize, Vec<String>)>> {
    let ca = std::fs::read_to_string(mesh.path("ca.pem"))?;
    let (addr, token) = (mesh.server_addr(), mesh.token.clone());
    mesh.netns(NodeA).run(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(watch_snapshot(addr, ca, token, include_kv))
    })?
}

async fn watch_snapshot(
    addr: String,
    ca: String,
    token: String,
    include_kv: bool,
) -> anyhow::Result<Vec<(usize, Vec<String>)>> {
    use prost::Message;
    let channel = weft_tests::servers::grpc_channel(&addr, &ca, Some(&token)).await?;
    let mut stream = WatchClient::new(channel)
        .subscribe(WatchRequest {
            from_index: 0,
            include_kv,
        })
        .await?
        .into_inner();
    let mut parts = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .context("no snapshot part within 20 s")??
            .context("the stream ended")?;
        let Some(watch_event::Event::Snapshot(s)) = event.event else {
            continue;
        };
        let size = s.encoded_len();
        let more = s.more;
        parts.push((size, s.kv.into_iter().map(|e| e.key).collect()));
        if !more {
            return Ok(parts);
        }
    }
}

#[test]
fn a_state_larger_than_a_message_reaches_watchers_in_parts() -> anyhow::Result<()> {
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
    mesh.workload(NodeB, "api-b", &format!("{b}:8080"))?;
    let value = "x".repeat(VALUE_BYTES);
    for i in 0..KEYS {
        mesh.weft(&["kv", "put", &format!("big/{i:03}"), &value])?;
    }

    let listed = mesh.weft_json(&["kv", "list", "big/"])?;
    let listed = listed.as_array().context("kv list JSON")?.len();
    ensure!(listed == KEYS, "kv list gave {listed} of {KEYS} keys");

    let parts = snapshot_parts(&mesh, true)?;
    let sizes: Vec<usize> = parts.iter().map(|(s, _)| *s).collect();
    eprintln!(
        "snapshot with KV in {} parts of {sizes:?} bytes",
        parts.len()
    );
    ensure!(parts.len() > 1, "one part of {sizes:?} bytes");
    ensure!(
        sizes.iter().all(|s| *s <= PART_BOUND),
        "a part over the bound: {sizes:?}"
    );
    let keys: BTreeSet<&String> = parts.iter().flat_map(|(_, k)| k).collect();
    ensure!(
        keys.len() == KEYS,
        "{} of {KEYS} keys in the parts",
        keys.len()
    );
    let without = snapshot_parts(&mesh, false)?;
    ensure!(
        without.iter().all(|(_, k)| k.is_empty()),
        "KV sent to a watcher that did not ask for it"
    );

    // An agent started now gets its snapshot and serves.
    mesh.restart_agent(NodeA)?;
    wait_until(Duration::from_secs(30), "web reaches api", || {
        Ok(mesh
            .curl_with(NodeA, "http://127.0.0.1:9191/", &["-m", "2"])
            .ok()
            .filter(|body| body.contains("api-b"))
            .map(|_| ()))
    })?;
    let log = mesh.agent_log(NodeA);
    ensure!(
        !log.contains("too large"),
        "the agent refused a watch message:\n{}",
        mesh.agent_log_tail(NodeA, 20)
    );
    Ok(())
}
