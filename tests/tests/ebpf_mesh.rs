//! Two agents in transparent mode (`ebpf = true`), each with its own cgroup
//! subtree, and one server, in two network namespaces joined by a veth:
//! `web` (cgroup `web`) on node A reaches `api` on node B by name,
//! `http://api.service.weft:8080/`: node A's agent answers the name with
//! api's virtual IP, its connect hook brings the connection to the agent,
//! which carries it over HBONE to node B's agent.
//!
//! Every test builds its own mesh (own namespaces, subnet and cgroups), so
//! they run in parallel. Nothing is sent to a virtual IP from the host's
//! namespace: only from inside the nodes, which have no default route.
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use weft_tests::mesh::{wait_until, Mesh, MeshSpec, NodeA, NodeB, Service};
use weft_tests::require_root;

const API_URL: &str = "http://api.service.weft:8080/";
const OPENED: &str = "weft_agent_connections_opened_total";
const EBPF_EVENTS: &str = "weft_agent_ebpf_events_total";

/// web on node A (cgroup web), api on node B at its node address, checked
/// over HTTP every second.
fn spec(default_intention: &str) -> MeshSpec {
    MeshSpec::new(default_intention)
        .ebpf()
        .node_a(Service::new("web", 8000).cgroup("web"))
        .node_b(
            Service::new("api", 8080)
                .id("api-1")
                .address(MeshSpec::NODE_ADDR)
                .healthz_check("1s"),
        )
}

/// Starts the mesh and api's workload, and waits until web reaches api by
/// name.
fn start(spec: MeshSpec) -> anyhow::Result<Mesh> {
    let mut mesh = Mesh::start(spec)?;
    let b = mesh.ip(NodeB);
    mesh.workload(NodeB, "api-1", &format!("{b}:8080"))?;
    wait_for(&mesh, API_URL, "api-1", Duration::from_secs(30))?;
    Ok(mesh)
}

/// Waits until `url`, fetched as web on node A, answers `instance NAME`.
fn wait_for(mesh: &Mesh, url: &str, name: &str, limit: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let want = format!("instance {name}\n");
    wait_until(limit, &format!("web -> {url} answers {want:?}"), || {
        let body = mesh.curl_as(NodeA, "web", url, &["-m", "2"])?;
        ensure!(body == want, "unexpected body {body:?}");
        Ok(Some(()))
    })
    .map_err(|e| e.context(agent_logs(mesh)))?;
    Ok(start.elapsed())
}

fn agent_logs(mesh: &Mesh) -> String {
    format!(
        "agent A log tail:\n{}\nagent B log tail:\n{}",
        mesh.agent_log_tail(NodeA, 20),
        mesh.agent_log_tail(NodeB, 20)
    )
}

fn ebpf_event(mesh: &Mesh, event: &str) -> anyhow::Result<f64> {
    mesh.metric_with(NodeA, EBPF_EVENTS, &[("event", event)])
}

/// A's eBPF counter `event` once it has caught up: the agent copies the
/// programs' counters every second, so a value read at once may be stale.
fn settled_event(mesh: &Mesh, event: &str) -> anyhow::Result<f64> {
    std::thread::sleep(Duration::from_millis(1100));
    ebpf_event(mesh, event)
}

fn opened(mesh: &Mesh, source: &str, destination: &str) -> anyhow::Result<f64> {
    mesh.metric_with(
        NodeA,
        OPENED,
        &[("source", source), ("destination", destination)],
    )
}

/// Waits until A's eBPF counter `event` is above `before` (the agent copies
/// the programs' counters every second).
fn wait_event_above(mesh: &Mesh, event: &str, before: f64) -> anyhow::Result<f64> {
    wait_until(
        Duration::from_secs(5),
        &format!("{event} counter above {before}"),
        || {
            let now = ebpf_event(mesh, event)?;
            Ok((now > before).then_some(now))
        },
    )
}

#[test]
fn web_reaches_api_by_name_through_dns_vip_and_tunnel() -> anyhow::Result<()> {
    require_root();
    let mesh = start(spec("allow"))?;
    let vip = mesh.vip("api")?;
    ensure!(vip.starts_with("24"), "api's virtual IP {vip}");

    // The name resolves, through node A's agent, to api's virtual IP.
    let out = mesh.exec_as(NodeA, "web", &["getent", "ahostsv4", "api.service.weft"])?;
    ensure!(
        out.success() && out.stdout.split_whitespace().next() == Some(vip.as_str()),
        "getent api.service.weft as web: {}",
        out.describe()
    );
    // And an unknown name does not resolve.
    let out = mesh.exec_as(NodeA, "web", &["getent", "hosts", "nope.service.weft"])?;
    ensure!(!out.success(), "nope.service.weft: {}", out.describe());

    let redirected = settled_event(&mesh, "redirected")?;
    let opened_before = opened(&mesh, "web", "api")?;
    for i in 0..5 {
        let body = mesh.curl_as(NodeA, "web", API_URL, &[])?;
        assert_eq!(body, "instance api-1\n", "request {i}");
    }
    let now = wait_event_above(&mesh, "redirected", redirected + 4.0)?;
    let opened_after = opened(&mesh, "web", "api")?;
    eprintln!(
        "redirected {redirected} -> {now}, opened web->api {opened_before} -> {opened_after}"
    );
    ensure!(
        opened_after >= opened_before + 5.0,
        "node A's agent opened {opened_before} -> {opened_after} web->api connections"
    );
    // Carried to node B's agent (HBONE), which connected to the instance.
    let inbound = mesh.metric_with(NodeB, OPENED, &[("source", "web"), ("destination", "api")])?;
    ensure!(inbound >= 5.0, "node B saw {inbound} web->api connections");

    // `exec --user`: the workload runs as that user, with no capability
    // (as root it could set the agent's mark, leave the cgroup, remove
    // the pins) and no new privileges, in web's cgroup, and still reaches
    // api through the mesh.
    let out = mesh.exec_as_user(
        NodeA,
        "web",
        "nobody",
        &[
            "sh",
            "-c",
            "grep -E '^(Uid|CapEff|NoNewPrivs):' /proc/self/status; cat /proc/self/cgroup",
        ],
    )?;
    let status = &out.stdout;
    ensure!(
        out.success()
            && status.contains("Uid:\t65534\t65534\t65534")
            && status.contains("CapEff:\t0000000000000000")
            && status.contains("NoNewPrivs:\t1")
            && status.contains("web"),
        "exec --user nobody: {}",
        out.describe()
    );
    let out = mesh.exec_as_user(NodeA, "web", "nobody", &["curl", "-sS", "-m", "5", API_URL])?;
    ensure!(
        out.success() && out.stdout == "instance api-1\n",
        "curl as nobody: {}",
        out.describe()
    );
    let refused = mesh.exec_as_user(NodeA, "web", "root", &["true"])?;
    ensure!(
        !refused.success() && refused.stderr.contains("is root"),
        "exec --user root: {}",
        refused.describe()
    );
    Ok(())
}

#[test]
fn processes_outside_mesh_cgroups_are_not_redirected() -> anyhow::Result<()> {
    require_root();
    let mut mesh = start(spec("allow"))?;
    let vip = mesh.vip("api")?;
    let direct = format!("http://{}:8080/", mesh.ip(NodeB));

    let redirected = settled_event(&mesh, "redirected")?;
    let opened_before = opened(&mesh, "web", "api")?;
    // The name resolves for everyone in the node...
    let out = mesh.run_with_mesh_dns(
        NodeA,
        &["getent", "ahostsv4", "api.service.weft"],
        Duration::from_secs(10),
    )?;
    ensure!(
        out.success() && out.stdout.contains(&vip),
        "getent outside the mesh: {}",
        out.describe()
    );
    // ...but a process in no mesh cgroup is not taken over: no route to the VIP.
    let out = mesh.run_with_mesh_dns(
        NodeA,
        &["curl", "-sS", "-m", "2", API_URL],
        Duration::from_secs(10),
    )?;
    ensure!(
        !out.success(),
        "reached the VIP unredirected: {}",
        out.describe()
    );
    ensure!(
        out.stderr.contains("unreachable") || out.stderr.contains("Couldn't connect"),
        "{}",
        out.describe()
    );
    // It reaches api's real address directly, without the agent.
    for _ in 0..3 {
        assert_eq!(mesh.curl(NodeA, &direct)?, "instance api-1\n");
    }
    std::thread::sleep(Duration::from_millis(1500)); // counters are copied every second
    assert_eq!(ebpf_event(&mesh, "redirected")?, redirected);
    assert_eq!(opened(&mesh, "web", "api")?, opened_before);

    // The control: the same address from web's cgroup is a registered
    // instance, so it is taken over and counted.
    assert_eq!(
        mesh.curl_as(NodeA, "web", &direct, &[])?,
        "instance api-1\n"
    );
    wait_event_above(&mesh, "redirected", redirected)?;
    ensure!(opened(&mesh, "web", "api")? > opened_before);

    // An external node's instance (registered through the catalog, no
    // agent runs it) is reached directly from web's cgroup too: no agent
    // can carry it, so taking its address over would only cut web off
    // from it (and a token that may register an external node, from any
    // address it names).
    let b = mesh.ip(NodeB);
    mesh.workload(NodeB, "db-1", &format!("{b}:8090"))?;
    let register = format!(
        r#"{{"Node": "db-host", "Address": "{b}",
            "Service": {{"ID": "db-1", "Service": "db", "Address": "{b}", "Port": 8090}}}}"#
    );
    let token = mesh.token.clone();
    let (status, body) = mesh.local_api(
        NodeA,
        ("PUT", "/v1/catalog/register"),
        Some(&token),
        Some(&register),
    )?;
    ensure!(status == 200, "registering db-host: {status} {body}");
    // Node A's agent has it in its view once its DNS answers for it.
    wait_until(
        Duration::from_secs(10),
        "db.service.weft in node A's DNS",
        || {
            let out = mesh.run_with_mesh_dns(
                NodeA,
                &["getent", "ahostsv4", "db.service.weft"],
                Duration::from_secs(10),
            )?;
            Ok((out.success() && out.stdout.contains(&b)).then_some(()))
        },
    )?;
    let db = format!("http://{b}:8090/");
    for _ in 0..3 {
        let body = mesh.curl_as(NodeA, "web", &db, &["-m", "2"])?;
        ensure!(body == "instance db-1\n", "web -> db-host: {body:?}");
    }
    Ok(())
}

#[test]
fn deny_refuses_vip_connections_within_a_second_and_delete_restores() -> anyhow::Result<()> {
    require_root();
    let mesh = start(spec("allow"))?;
    let url = format!("http://{}:8080/", mesh.vip("api")?);
    let denials = |mesh: &Mesh| -> anyhow::Result<[f64; 2]> {
        let name = "weft_agent_intention_denials_total";
        Ok([mesh.metric(NodeA, name)?, mesh.metric(NodeB, name)?])
    };
    let denied_before = denials(&mesh)?;

    mesh.weft(&["intention", "create", "web", "api", "--deny"])?;
    let written = Instant::now();
    let mut refused = None;
    for _ in 0..50 {
        if written.elapsed() > Duration::from_secs(1) {
            break;
        }
        if let Err(e) = mesh.curl_as(NodeA, "web", &url, &["-m", "0.5"]) {
            refused = Some((written.elapsed(), e));
            break;
        }
    }
    let Some((after, error)) = refused else {
        bail!(
            "web -> api's VIP still answered 1 s after the deny was written\n{}",
            agent_logs(&mesh)
        );
    };
    eprintln!("refused {after:?} after the deny was written: {error:#}");
    for _ in 0..3 {
        assert!(
            mesh.curl_as(NodeA, "web", &url, &["-m", "2"]).is_err(),
            "a request was let through after the deny"
        );
    }
    // Early deny: node A's agent refuses at the source, before any tunnel.
    let denied_after = denials(&mesh)?;
    eprintln!("denials [node A, node B]: {denied_before:?} -> {denied_after:?}");
    ensure!(
        denied_after[0] >= denied_before[0] + 4.0,
        "the source agent should refuse at once: denials [node A, node B] went from {denied_before:?} to {denied_after:?}"
    );

    mesh.weft(&["intention", "delete", "web", "api"])?;
    let back = wait_for(&mesh, &url, "api-1", Duration::from_secs(5))?;
    eprintln!("answering again {back:?} after the intention was deleted");
    Ok(())
}

#[test]
fn same_node_fast_path_skips_the_agent() -> anyhow::Result<()> {
    require_root();
    // db: a plain TCP service (no service-defaults) on node A itself.
    let mut mesh = start(
        spec("allow").node_a(
            Service::new("db", 8090)
                .id("db-1")
                .address(MeshSpec::NODE_ADDR)
                .healthz_check("1s"),
        ),
    )?;
    let a = mesh.ip(NodeA);
    mesh.workload(NodeA, "db-1", &format!("{a}:8090"))?;
    let db_url = "http://db.service.weft:8090/";
    wait_for(&mesh, db_url, "db-1", Duration::from_secs(20))?;

    let fast = settled_event(&mesh, "fast_path")?;
    let opened_before = opened(&mesh, "web", "db")?;
    for i in 0..5 {
        let body = mesh.curl_as(NodeA, "web", db_url, &[])?;
        assert_eq!(body, "instance db-1\n", "request {i}");
    }
    let now = wait_event_above(&mesh, "fast_path", fast + 4.0)?;
    let opened_after = opened(&mesh, "web", "db")?;
    eprintln!("fast_path {fast} -> {now}; opened web->db {opened_before} -> {opened_after}");
    assert_eq!(
        opened_after, opened_before,
        "fast-path connections went through node A's agent"
    );

    // A deny takes the pair off the fast path: refused by the agent.
    mesh.weft(&["intention", "create", "web", "db", "--deny"])?;
    wait_until(Duration::from_secs(2), "web -> db refused", || {
        Ok(mesh
            .curl_as(NodeA, "web", db_url, &["-m", "1"])
            .is_err()
            .then_some(()))
    })?;
    Ok(())
}

#[test]
fn stopping_the_agent_fails_closed_and_restart_restores() -> anyhow::Result<()> {
    require_root();
    let mut mesh = start(spec("allow"))?;
    let url = format!("http://{}:8080/", mesh.vip("api")?);
    wait_for(&mesh, &url, "api-1", Duration::from_secs(5))?;

    let status = mesh.stop_agent(NodeA)?;
    ensure!(status.is_some(), "node A's agent did not exit on SIGTERM");
    let out = mesh.exec_as(NodeA, "web", &["curl", "-sS", "-m", "2", &url])?;
    ensure!(
        !out.success(),
        "web reached api's VIP with its agent stopped: {}",
        out.describe()
    );
    eprintln!("agent A stopped: {}", out.stderr.trim());

    mesh.start_agent(NodeA)?;
    mesh.wait_agent_ready(NodeA, Duration::from_secs(20))?;
    let back = wait_for(&mesh, &url, "api-1", Duration::from_secs(10))?;
    eprintln!("web reaches api again {back:?} after node A's agent was ready");
    wait_for(&mesh, API_URL, "api-1", Duration::from_secs(5))?;
    Ok(())
}

/// A service whose last instance went gives its virtual IP back once the
/// servers' `--vip-release-after` passed: the name stops resolving and the
/// address stops being taken over on the nodes (in the eBPF map of every
/// agent: before, a VIP stayed there for every name ever registered, and
/// 65,536 of them failed every agent's sync). Another new service does not
/// get the address; the service, when it comes back, does.
#[test]
fn a_departed_services_virtual_ip_is_given_back_and_kept_for_it() -> anyhow::Result<()> {
    require_root();
    let mut mesh = start(spec("allow").server_arg("--vip-release-after=2s"))?;
    mesh.grant_agent_services(NodeB, &["cache", "other"])?;
    let token = mesh.service_token(&["cache", "other"])?;
    let b = mesh.ip(NodeB);
    mesh.workload(NodeB, "cache-1", &format!("{b}:8081"))?;
    let register = |id: &str, name: &str, port: u16| -> anyhow::Result<()> {
        let body = format!(r#"{{"ID":"{id}","Name":"{name}","Address":"{b}","Port":{port}}}"#);
        let path = "/v1/agent/service/register";
        let (code, answer) = mesh.local_api(NodeB, ("PUT", path), Some(&token), Some(&body))?;
        ensure!(code == 200, "register {id}: {code} {answer}");
        Ok(())
    };
    register("cache-1", "cache", 8081)?;
    wait_for(
        &mesh,
        "http://cache.service.weft:8081/",
        "cache-1",
        Duration::from_secs(30),
    )?;
    let vip = mesh.vip("cache")?;
    let by_vip = format!("http://{vip}:8081/");

    let path = "/v1/agent/service/deregister/cache-1";
    let (code, answer) = mesh.local_api(NodeB, ("PUT", path), Some(&token), None)?;
    ensure!(code == 200, "deregister cache-1: {code} {answer}");
    // Until it is given back the agent takes the connection (and resets it:
    // no instance); after, nothing takes the address over and node A, with
    // no default route, has no way to it.
    wait_until(
        Duration::from_secs(30),
        &format!("{vip} no longer taken over"),
        || {
            let out = mesh.exec_as(NodeA, "web", &["curl", "-v", "-sS", "-m", "2", &by_vip])?;
            Ok(out.stderr.contains("Network is unreachable").then_some(()))
        },
    )
    .map_err(|e| e.context(agent_logs(&mesh)))?;
    let left = mesh.weft_raw(&["catalog", "service", "cache"])?;
    ensure!(
        !left.success() && left.stderr.contains("not registered"),
        "cache still listed: {}",
        left.describe()
    );
    let out = mesh.exec_as(NodeA, "web", &["getent", "hosts", "cache.service.weft"])?;
    ensure!(
        !out.success(),
        "cache.service.weft still resolves: {}",
        out.describe()
    );

    register("other-1", "other", 8082)?;
    let other = wait_until(Duration::from_secs(10), "other's virtual IP", || {
        Ok(mesh.vip("other").ok())
    })?;
    ensure!(
        other != vip,
        "a new service got {vip}, which cache gave back"
    );

    register("cache-1", "cache", 8081)?;
    wait_for(&mesh, &by_vip, "cache-1", Duration::from_secs(30))?;
    ensure!(
        mesh.vip("cache")? == vip,
        "cache came back to another address"
    );
    Ok(())
}
