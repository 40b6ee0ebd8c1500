//! Two agents in explicit mode (`ebpf = false`) and one server, as processes
//! in two network namespaces joined by a veth: `web` on node A reaches `api`
//! on node B through its upstream port 127.0.0.1:9191, carried over HBONE
//! (HTTP/2 CONNECT in mutual TLS) to node B's agent on :15008.
//!
//! Every test builds its own mesh (own namespaces and subnet), so they run in
//! parallel.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use weft_tests::mesh::{wait_until, Mesh, MeshSpec, NodeA, NodeB, Service};
use weft_tests::require_root;

const UPSTREAM: &str = "http://127.0.0.1:9191/";

/// A random-enough marker for this run.
fn marker(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{tag}{:x}{nanos:08x}", std::process::id())
}

/// An `api` instance at `NODE:port` with an HTTP check every second.
fn api(id: &str, port: u16) -> Service {
    Service::new("api", port)
        .id(id)
        .address(MeshSpec::NODE_ADDR)
        .healthz_check("1s")
}

/// web on node A with an upstream to api (local port 9191).
fn spec() -> MeshSpec {
    MeshSpec::new("allow").node_a(Service::new("web", 8000).upstream("api", 9191))
}

/// The standard mesh: one `api` instance, `api-1` (workload named `name`).
fn one_api_mesh(name: &str) -> anyhow::Result<Mesh> {
    let mut mesh = Mesh::start(spec().node_b(api("api-1", 8080)))?;
    let b = mesh.ip(NodeB);
    mesh.workload(NodeB, name, &format!("{b}:8080"))?;
    wait_for_body(&mesh, name, Duration::from_secs(30))?;
    Ok(mesh)
}

/// Waits until a request through the upstream port answers with `instance NAME`.
fn wait_for_body(mesh: &Mesh, name: &str, limit: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let want = format!("instance {name}\n");
    wait_until(
        limit,
        &format!("web -> api answers `{}`", want.trim()),
        || {
            let body = mesh.curl_with(NodeA, UPSTREAM, &["-m", "2"])?;
            ensure!(body == want, "unexpected body {body:?}");
            Ok(Some(()))
        },
    )
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

/// The instance named in a response body.
fn instance_of(body: &str) -> Option<&str> {
    body.trim().strip_prefix("instance ")
}

fn denials(mesh: &Mesh) -> anyhow::Result<f64> {
    Ok(mesh.metric(NodeA, "weft_agent_intention_denials_total")?
        + mesh.metric(NodeB, "weft_agent_intention_denials_total")?)
}

#[test]
fn intention_deny_refuses_within_a_second_and_delete_restores() -> anyhow::Result<()> {
    require_root();
    let mesh = one_api_mesh("api-1")?;
    assert!(mesh.metric(NodeA, "weft_agent_connections_opened_total")? >= 1.0);
    // What a scraper without OpenMetrics reads, with traffic counted.
    weft_tests::promtool_check(&mesh.metrics(NodeA)?)?;
    // `/config`: the running configuration and the view, as JSON, to a
    // token with operator:read only.
    let url = format!("http://{}/config", weft_tests::mesh::ADMIN);
    let anonymous = mesh.curl_raw(NodeA, &["-sS", "-m", "5", "-w", "%{http_code}", &url])?;
    ensure!(
        anonymous.stdout.ends_with("403") && !anonymous.stdout.contains("instances"),
        "/config without a token: {}",
        anonymous.describe()
    );
    let config = mesh.agent_config_dump(NodeA)?;
    ensure!(config["config"]["node_name"].is_string(), "{config}");
    let instances = config["view"]["instances"]
        .as_array()
        .context("view instances")?;
    ensure!(
        instances.iter().any(|i| i["service"] == "api"),
        "the view should hold api's instance: {config}"
    );
    let denied_before = denials(&mesh)?;

    mesh.weft(&["intention", "create", "web", "api", "--deny"])?;
    let written = Instant::now();
    let mut last = String::new();
    let mut refused = None;
    for _ in 0..100 {
        if written.elapsed() > Duration::from_secs(1) {
            break;
        }
        match mesh.curl_with(NodeA, UPSTREAM, &["-m", "0.5"]) {
            Ok(body) => last = body,
            Err(e) => {
                refused = Some((written.elapsed(), e));
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let Some((after, error)) = refused else {
        bail!(
            "web -> api still answered ({last:?}) 1 s after the deny intention was written\n{}",
            agent_logs(&mesh)
        );
    };
    eprintln!("refused {after:?} after the deny was written: {error:#}");
    // And it stays refused.
    for _ in 0..3 {
        assert!(
            mesh.curl_with(NodeA, UPSTREAM, &["-m", "2"]).is_err(),
            "a request was let through after the deny"
        );
    }
    let denied_after = denials(&mesh)?;
    assert!(
        denied_after >= denied_before + 4.0,
        "intention denial counters went from {denied_before} to {denied_after}"
    );
    // Each refusal is logged inside its connection's span: a connection
    // id, the source and the destination (and no terminal colours).
    let refusal = mesh
        .agent_log(NodeA)
        .lines()
        .rev()
        .find(|l| l.contains("web -> api"))
        .map(str::to_string)
        .context("agent A logged no refusal of web -> api")?;
    ensure!(
        refusal.contains("conn{id=")
            && refusal.contains("source=web")
            && refusal.contains("destination=api")
            && !refusal.contains('\u{1b}'),
        "the refusal is not in a connection span: {refusal}"
    );

    mesh.weft(&["intention", "delete", "web", "api"])?;
    let back = wait_for_body(&mesh, "api-1", Duration::from_secs(5))?;
    eprintln!("answering again {back:?} after the intention was deleted");
    Ok(())
}

#[test]
fn tunnel_carries_no_plaintext_on_the_wire() -> anyhow::Result<()> {
    require_root();
    let response_marker = marker("RESPMARK");
    let name = format!("api-{}", response_marker.to_lowercase());
    let mut mesh = one_api_mesh(&name)?;
    let control_addr = format!("{}:8090", mesh.ip(NodeB));
    mesh.workload(NodeB, "control", &control_addr)?;
    let request_marker = marker("REQMARK");
    let control_marker = marker("DIRECTMARK");

    let capture = mesh.capture(NodeA)?;
    let body = mesh.curl_with(
        NodeA,
        &format!("{UPSTREAM}{request_marker}"),
        &["-H", &format!("x-marker: {request_marker}")],
    )?;
    assert_eq!(body, format!("instance {name}\n"));
    // A control: a workload outside the mesh on node B, reached directly
    // in plaintext during the same capture.
    let control = mesh.curl(
        NodeA,
        &format!("http://{}:8090/{control_marker}", mesh.ip(NodeB)),
    )?;
    assert_eq!(control, "instance control\n");
    let file = capture.finish()?;

    let tunnel_packets = file.count("tcp port 15008")?;
    eprintln!(
        "capture: {} bytes, {tunnel_packets} packets on port 15008, {} in all",
        file.bytes.len(),
        file.count("")?
    );
    assert!(
        tunnel_packets > 0,
        "the capture saw no traffic on port 15008"
    );
    assert!(
        file.contains(control_marker.as_bytes()),
        "the capture missed the plaintext control request: it could not have seen a leak"
    );
    assert!(
        !file.contains(request_marker.as_bytes()),
        "the request's marker crossed the wire in plaintext"
    );
    assert!(
        !file.contains(name.as_bytes()),
        "the response body crossed the wire in plaintext"
    );
    Ok(())
}

/// Writes a CA and a leaf for `spiffe_id` signed by it (openssl), returns
/// (chain PEM, key PEM).
fn foreign_identity(mesh: &Mesh, spiffe_id: &str) -> anyhow::Result<(String, String)> {
    let p = |n: &str| mesh.path(n).display().to_string();
    std::fs::write(
        mesh.path("foreign-ext.cnf"),
        format!("subjectAltName=URI:{spiffe_id}\n"),
    )?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let steps: Vec<Vec<String>> = vec![
        [
            &["req", "-x509"][..],
            &ec[..],
            &["-days", "1", "-subj", "/CN=foreign-ca"],
        ]
        .concat()
        .iter()
        .map(|s| s.to_string())
        .chain([
            "-keyout".into(),
            p("foreign-ca.key"),
            "-out".into(),
            p("foreign-ca.pem"),
        ])
        .collect(),
        [&["req"][..], &ec[..], &["-subj", "/CN=web"]]
            .concat()
            .iter()
            .map(|s| s.to_string())
            .chain([
                "-keyout".into(),
                p("foreign.key"),
                "-out".into(),
                p("foreign.csr"),
            ])
            .collect(),
        vec![
            "x509".into(),
            "-req".into(),
            "-days".into(),
            "1".into(),
            "-in".into(),
            p("foreign.csr"),
            "-CA".into(),
            p("foreign-ca.pem"),
            "-CAkey".into(),
            p("foreign-ca.key"),
            "-CAcreateserial".into(),
            "-extfile".into(),
            p("foreign-ext.cnf"),
            "-out".into(),
            p("foreign.pem"),
        ],
    ];
    for args in steps {
        let out = std::process::Command::new("openssl").args(&args).output()?;
        ensure!(
            out.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let chain = std::fs::read_to_string(mesh.path("foreign.pem"))?
        + &std::fs::read_to_string(mesh.path("foreign-ca.pem"))?;
    Ok((chain, std::fs::read_to_string(mesh.path("foreign.key"))?))
}

/// A leaf for web from the mesh's CA, and the mesh's trust bundle.
fn web_identity(
    mesh: &Mesh,
) -> anyhow::Result<(weft_agent::hbone::Identity, weft_agent::hbone::TrustBundle)> {
    let leaf = mesh.weft_json(&["ca", "leaf", "web"])?;
    let roots = mesh.weft(&["ca", "roots"])?;
    let spiffe_id = leaf["spiffe_id"].as_str().context("leaf spiffe_id")?;
    let trust_domain = spiffe_id
        .strip_prefix("spiffe://")
        .and_then(|s| s.split('/').next())
        .context("trust domain")?;
    let bundle = weft_agent::hbone::TrustBundle::from_pem(trust_domain, &roots)?;
    let chain = format!(
        "{}{}",
        leaf["cert_pem"].as_str().unwrap_or_default(),
        leaf["chain_pem"].as_str().unwrap_or_default()
    );
    let identity = weft_agent::hbone::Identity::from_pem(
        &chain,
        leaf["key_pem"].as_str().unwrap_or_default(),
    )?;
    Ok((identity, bundle))
}

/// The attack: a host that reaches node B's inbound port, with no
/// certificate, opens connections and never starts their handshakes. Each
/// held a task and a descriptor for the 10 s handshake timeout, without
/// limit, until the agent had no descriptor left for anyone. Now a host the
/// view does not know holds 16 of the places for unknown sources: each
/// newer connection takes the place of its oldest one still in its
/// handshake, which is closed and counted, and node A, which the view
/// knows, still gets its tunnel.
#[test]
fn a_host_outside_the_view_holds_its_share_and_no_more() -> anyhow::Result<()> {
    use std::io::{ErrorKind, Read};
    require_root();
    let mesh = one_api_mesh("api-1")?;
    let (outsider, b) = mesh.outsider()?;
    let inbound: SocketAddr = format!("{b}:15008").parse()?;
    let refused = || {
        let labels = [("listener", "inbound"), ("reason", "displaced")];
        mesh.metric_with(
            NodeB,
            "weft_agent_inbound_connections_refused_total",
            &labels,
        )
    };
    let before = refused()?;
    let (held, open, closed) = outsider.run(move || -> anyhow::Result<_> {
        let mut held = Vec::new();
        for _ in 0..40 {
            held.push(std::net::TcpStream::connect_timeout(
                &inbound,
                Duration::from_secs(2),
            )?);
        }
        // The agent accepts in order: the 17th takes the first one's place,
        // and so on; the last 16 wait for a ClientHello that never comes.
        let mut closed = 0;
        for conn in &held[..24] {
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            match (&*conn).read(&mut [0u8; 1]) {
                Ok(0) => closed += 1,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => closed += 1,
                other => anyhow::bail!("an older connection: {other:?}"),
            }
        }
        let mut open = 0;
        for conn in &held[24..] {
            conn.set_nonblocking(true)?;
            if let Err(e) = (&*conn).read(&mut [0u8; 1]) {
                if e.kind() == ErrorKind::WouldBlock {
                    open += 1;
                }
            }
        }
        Ok((held, open, closed))
    })??;
    assert_eq!((open, closed), (16, 24), "held open, displaced");
    let counted = wait_until(Duration::from_secs(3), "24 refusals counted", || {
        let now = refused()?;
        Ok((now >= before + 24.0).then_some(now - before))
    })?;
    assert_eq!(counted, 24.0);

    // While the host holds its share, node A, a node of the view,
    // completes a handshake and gets a tunnel.
    let (web, bundle) = web_identity(&mesh)?;
    let target: SocketAddr = format!("{}:8080", mesh.ip(NodeB)).parse()?;
    let response = hbone_get(&mesh, web, bundle, target)?;
    assert!(response.contains("instance api-1"), "{response}");
    drop(held);
    Ok(())
}

/// Opens an HBONE tunnel from node A to `target` through node B's agent as
/// `identity`, sends `GET /` and returns the response.
fn hbone_get(
    mesh: &Mesh,
    identity: weft_agent::hbone::Identity,
    bundle: weft_agent::hbone::TrustBundle,
    target: SocketAddr,
) -> anyhow::Result<String> {
    let node = weft_agent::hbone::NodePeer::new(
        format!("{}:15008", mesh.ip(NodeB)).parse()?,
        bundle.trust_domain(),
        "dc1",
        "node-b",
    );
    mesh.netns(NodeA).run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let pool = weft_agent::hbone::HbonePool::new(bundle);
            let mut stream = pool
                .connect(&identity, &node, target, Duration::from_secs(5))
                .await?;
            stream
                .write_all(b"GET / HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n")
                .await?;
            let mut response = String::new();
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
                .await
                .context("reading the tunnel")??;
            Ok(response)
        })
    })?
}

#[test]
fn inbound_refuses_foreign_and_missing_client_certificates() -> anyhow::Result<()> {
    require_root();
    let mesh = one_api_mesh("api-1")?;
    let target: SocketAddr = format!("{}:8080", mesh.ip(NodeB)).parse()?;

    // The mesh's own CA: a leaf for web gets through (the control).
    let (good, bundle) = web_identity(&mesh)?;
    let spiffe_id = good.spiffe_id.clone();
    let response = hbone_get(&mesh, good.clone(), bundle.clone(), target)
        .context("a tunnel with the mesh CA's certificate")?;
    assert!(response.contains("instance api-1"), "{response}");

    // The destination checks intentions itself: a tunnel that no source
    // agent vetted is refused once web -> api is denied.
    mesh.weft(&["intention", "create", "web", "api", "--deny"])?;
    let denied_before = mesh.metric(NodeB, "weft_agent_intention_denials_total")?;
    let refused = wait_until(Duration::from_secs(2), "node B refusing web", || {
        Ok(hbone_get(&mesh, good.clone(), bundle.clone(), target).err())
    })?;
    assert!(format!("{refused:#}").contains("403"), "{refused:#}");
    assert!(mesh.metric(NodeB, "weft_agent_intention_denials_total")? > denied_before);
    mesh.weft(&["intention", "delete", "web", "api"])?;

    let failures_before = mesh.metric(NodeB, "weft_agent_tls_handshake_failures_total")?;

    // Another CA, same SPIFFE id: refused.
    let (foreign_chain, foreign_key) = foreign_identity(&mesh, &spiffe_id)?;
    let foreign = weft_agent::hbone::Identity::from_pem(&foreign_chain, &foreign_key)?;
    match hbone_get(&mesh, foreign, bundle, target) {
        Ok(response) => bail!("a foreign CA's certificate got a tunnel: {response:?}"),
        Err(e) => eprintln!("foreign certificate refused: {e:#}"),
    }

    // No client certificate at all: refused (curl, TLS 1.3 with ALPN h2).
    let url = format!("https://{}:15008/", mesh.ip(NodeB));
    let out = mesh.curl_raw(NodeA, &["-sS", "-k", "--http2", "-m", "5", &url])?;
    assert!(
        !out.success(),
        "no client certificate and yet an answer: {}",
        out.stdout
    );
    eprintln!(
        "no certificate: curl exit {:?}: {}",
        out.code(),
        out.stderr.trim()
    );

    let failures = wait_until(Duration::from_secs(3), "tls failure counter +2", || {
        let now = mesh.metric(NodeB, "weft_agent_tls_handshake_failures_total")?;
        Ok((now >= failures_before + 2.0).then_some(now))
    })
    .map_err(|e| {
        let metrics = mesh.metrics(NodeB).unwrap_or_default();
        e.context(format!(
            "before: {failures_before}; node B metrics:\n{}",
            metrics
                .lines()
                .filter(|l| l.contains("tls"))
                .collect::<Vec<_>>()
                .join("\n")
        ))
    })?;
    eprintln!("tls handshake failures on node B: {failures_before} -> {failures}");
    Ok(())
}

/// Two `api` instances: api-1 on node B (reached over HBONE), api-2 on node
/// A (same node). The agent refuses two `[[service]]` blocks with one name on
/// a node, so the second instance cannot sit on node B as well.
#[test]
fn instance_failing_its_check_leaves_rotation() -> anyhow::Result<()> {
    require_root();
    let mut mesh = Mesh::start(spec().node_b(api("api-1", 8080)).node_a(api("api-2", 8081)))?;
    let (a, b) = (mesh.ip(NodeA), mesh.ip(NodeB));
    mesh.workload(NodeB, "api-1", &format!("{b}:8080"))?;
    mesh.workload(NodeA, "api-2", &format!("{a}:8081"))?;

    let health = |mesh: &Mesh, id: &str| -> anyhow::Result<String> {
        let all = mesh.catalog_instances("api")?;
        Ok(all
            .into_iter()
            .find(|(i, _, _)| i == id)
            .map(|(_, _, h)| h)
            .unwrap_or_default())
    };
    wait_until(
        Duration::from_secs(20),
        "both api instances passing",
        || {
            Ok(
                (health(&mesh, "api-1")? == "passing" && health(&mesh, "api-2")? == "passing")
                    .then_some(()),
            )
        },
    )?;

    // Both take traffic.
    let mut seen = std::collections::BTreeMap::new();
    wait_until(
        Duration::from_secs(30),
        "requests reach both instances",
        || {
            if let Ok(body) = mesh.curl_with(NodeA, UPSTREAM, &["-m", "2"]) {
                *seen
                    .entry(instance_of(&body).unwrap_or_default().to_string())
                    .or_insert(0) += 1;
            }
            Ok((seen.contains_key("api-1") && seen.contains_key("api-2")).then_some(()))
        },
    )
    .map_err(|e| e.context(format!("seen {seen:?}\n{}", agent_logs(&mesh))))?;
    eprintln!("before the failure: {seen:?}");

    // api-1, on node B, fails its check.
    mesh.curl(NodeB, &format!("http://{b}:8080/fail"))?;
    let failed_at = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "api-1 critical in the catalog",
        || Ok((health(&mesh, "api-1")? == "critical").then_some(())),
    )?;
    eprintln!(
        "api-1 critical in the catalog after {:?}",
        failed_at.elapsed()
    );

    // Once node A's agent has heard, every request lands on api-2.
    let mut run = 0;
    wait_until(
        Duration::from_secs(5),
        "10 requests in a row on api-2",
        || {
            let body = mesh.curl_with(NodeA, UPSTREAM, &["-m", "2"])?;
            run = if instance_of(&body) == Some("api-2") {
                run + 1
            } else {
                0
            };
            Ok((run >= 10).then_some(()))
        },
    )?;
    for i in 0..30 {
        let body = mesh.curl_with(NodeA, UPSTREAM, &["-m", "2"])?;
        assert_eq!(
            instance_of(&body),
            Some("api-2"),
            "request {i} after api-1 failed its check"
        );
    }
    Ok(())
}

#[test]
fn agent_restart_reregisters_node_and_traffic_resumes() -> anyhow::Result<()> {
    require_root();
    let mut mesh = one_api_mesh("api-1")?;
    assert!(mesh.catalog_nodes()?.contains(&"node-b".to_string()));

    let status = mesh.stop_agent(NodeB)?;
    eprintln!("node B's agent exited on SIGTERM with {status:?}");
    assert!(
        status.is_some(),
        "node B's agent did not exit within 10 s of SIGTERM\n{}",
        mesh.agent_log_tail(NodeB, 20)
    );
    wait_until(Duration::from_secs(5), "node-b deregistered", || {
        Ok((!mesh.catalog_nodes()?.contains(&"node-b".to_string())).then_some(()))
    })?;
    let down = mesh.curl_with(NodeA, UPSTREAM, &["-m", "2"]);
    assert!(
        down.is_err(),
        "api answered with node B's agent down: {down:?}"
    );

    mesh.start_agent(NodeB)?;
    mesh.wait_agent_ready(NodeB, Duration::from_secs(20))?;
    wait_until(Duration::from_secs(10), "node-b registered again", || {
        let nodes = mesh.catalog_nodes()?;
        let instances = mesh.catalog_instances("api")?;
        Ok((nodes.contains(&"node-b".to_string())
            && instances
                .iter()
                .any(|(id, node, _)| id == "api-1" && node == "node-b"))
        .then_some(()))
    })?;
    let took = wait_for_body(&mesh, "api-1", Duration::from_secs(20))?;
    eprintln!("traffic resumed {took:?} after node B's agent was ready again");
    Ok(())
}

/// Agents call the servers over a connection they keep (the watch stream
/// over one of its own): heartbeats, health and traffic reports do not each
/// cost the servers a TLS handshake. Counted by the server: its accepted
/// API connections stay as they are while both agents heartbeat.
#[test]
fn agents_keep_their_connections_to_the_servers() -> anyhow::Result<()> {
    use weft_tests::mesh::metric_sum_with;
    require_root();
    let mesh = one_api_mesh("api-1")?;
    let heartbeats = |text: &str| {
        metric_sum_with(
            text,
            "weft_server_rpc_seconds_count",
            &[("method", "/weft.v1.Catalog/Heartbeat")],
        )
    };
    let accepted = |text: &str| {
        metric_sum_with(
            text,
            "weft_server_tls_connections_total",
            &[("listener", "api")],
        )
    };
    // Each agent connects once more after it presents its node
    // certificate: past that, two heartbeats of each.
    let start = heartbeats(&mesh.server_metrics()?);
    let before = wait_until(Duration::from_secs(20), "agents heartbeating", || {
        let text = mesh.server_metrics()?;
        Ok((heartbeats(&text) >= start + 4.0).then_some(text))
    })?;
    let after = wait_until(Duration::from_secs(30), "six more heartbeats", || {
        let text = mesh.server_metrics()?;
        Ok((heartbeats(&text) >= heartbeats(&before) + 6.0).then_some(text))
    })?;
    // At least each agent's watch and calls.
    assert!(accepted(&before) >= 4.0, "{before}");
    assert_eq!(
        accepted(&after),
        accepted(&before),
        "TLS connections accepted by the server's API during {} heartbeats",
        heartbeats(&after) - heartbeats(&before)
    );
    // The agents' calls still go through: node B's instance is reached.
    wait_for_body(&mesh, "api-1", Duration::from_secs(10))?;
    Ok(())
}

/// A server that goes silent without closing its connections (SIGSTOP: a
/// hung host, a partition) costs the agent a heartbeat that fails within
/// the call limit (5 s) on its kept connection, not one that waits for as
/// long as the socket lives; heartbeats resume once the server answers.
#[test]
fn a_silent_server_fails_a_heartbeat_within_the_call_limit() -> anyhow::Result<()> {
    require_root();
    let mesh = one_api_mesh("api-1")?;
    let pid = mesh.server_pid().context("the server's pid")? as i32;
    /// Resumes the server however the test ends.
    struct Resume(i32);
    impl Drop for Resume {
        fn drop(&mut self) {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }
    let from = mesh.agent_log(NodeA).len();
    // SAFETY: kill(2) on our own child's pid.
    ensure!(unsafe { libc::kill(pid, libc::SIGSTOP) } == 0, "SIGSTOP");
    let resume = Resume(pid);
    let stopped = Instant::now();
    // Within the node timeout (10 s): the next heartbeat (2 s) and its limit.
    wait_until(Duration::from_secs(10), "a failed heartbeat logged", || {
        Ok(mesh.agent_log(NodeA)[from..]
            .contains("heartbeat failed")
            .then_some(()))
    })?;
    eprintln!(
        "heartbeat failed {:?} after the server stopped",
        stopped.elapsed()
    );
    drop(resume);
    wait_until(Duration::from_secs(20), "heartbeats resumed", || {
        Ok(mesh.agent_log(NodeA)[from..]
            .contains("heartbeats reach the servers again")
            .then_some(()))
    })?;
    Ok(())
}

/// The HTTP status of `METHOD url` from node A (curl's `%{http_code}`).
fn status_of(mesh: &Mesh, method: &str, url: &str, header: Option<&str>) -> anyhow::Result<u16> {
    status_with(mesh, method, url, header.as_slice())
}

/// [`status_of`] with every header of `headers` sent, repeats included.
fn status_with(mesh: &Mesh, method: &str, url: &str, headers: &[&str]) -> anyhow::Result<u16> {
    let mut args = vec!["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-m", "2"];
    args.extend(["-X", method]);
    for h in headers {
        args.extend(["-H", h]);
    }
    args.push(url);
    let out = mesh.curl_raw(NodeA, &args)?;
    ensure!(out.success(), "curl {method} {url}: {}", out.stderr.trim());
    Ok(out.stdout.trim().parse()?)
}

#[test]
fn l7_intention_judges_every_request_by_method_path_and_header() -> anyhow::Result<()> {
    require_root();
    let mesh = one_api_mesh("api-1")?;
    l7_intention_cycle(&mesh, "api-1")
}

#[test]
fn l7_intention_is_enforced_for_a_same_node_instance_too() -> anyhow::Result<()> {
    require_root();
    // api's only instance is on web's node: the source agent judges requests.
    let mesh = same_node_api_mesh()?;
    l7_intention_cycle(&mesh, "api-a")
}

/// The mesh with api's only instance, `api-a`, on web's node A, answering.
fn same_node_api_mesh() -> anyhow::Result<Mesh> {
    let mut mesh = Mesh::start(spec().node_a(api("api-a", 8080)))?;
    let a = mesh.ip(NodeA);
    mesh.workload(NodeA, "api-a", &format!("{a}:8080"))?;
    wait_for_body(&mesh, "api-a", Duration::from_secs(30))?;
    Ok(mesh)
}

/// Writes the L7 intention web => api with `permissions` (TOML).
fn l7_intention(mesh: &Mesh, permissions: &str) -> anyhow::Result<()> {
    let l7 = mesh.path("web-api-l7.toml");
    std::fs::write(&l7, permissions)?;
    let l7 = l7.display().to_string();
    mesh.weft(&["intention", "create", "web", "api", "--file", &l7])?;
    Ok(())
}

/// A route's rewrite cannot carry a request past an L7 intention to an
/// instance on the source's own node, where no second agent judges it: the
/// request is judged as it is sent. web may reach anything of api but
/// `/admin`; a router sends `/v1/...` to api as `/...` (`/v1/admin`, which
/// the intention does not name, reached the instance as `/admin`), and
/// `/v2...` as `/...` too, its rewritten path normalized (`/v2/admin` became
/// `//admin`, which servers read as `/admin`).
#[test]
fn a_rewritten_request_to_a_same_node_instance_is_judged_as_sent() -> anyhow::Result<()> {
    require_root();
    let mesh = same_node_api_mesh()?;
    write_entry(&mesh, "api-defaults.toml", API_IS_HTTP)?;
    l7_intention(
        &mesh,
        r#"
[[Permissions]]
Action = "deny"
HTTP = { PathPrefix = "/admin" }

[[Permissions]]
Action = "allow"
HTTP = { PathPrefix = "/" }
"#,
    )?;
    write_entry(
        &mesh,
        "router.toml",
        r#"
Kind = "service-router"
Name = "api"
[[Routes]]
Match = { HTTP = { PathPrefix = "/v1/" } }
Destination = { Service = "api", PrefixRewrite = "/" }

[[Routes]]
Match = { HTTP = { PathPrefix = "/v2" } }
Destination = { Service = "api", PrefixRewrite = "/" }
"#,
    )?;
    let public = format!("{UPSTREAM}v1/echo/public");
    wait_until(Duration::from_secs(20), "the route rewrites", || {
        let body = mesh
            .curl_with(NodeA, &public, &["-m", "2"])
            .unwrap_or_default();
        Ok((body == "instance api-a got /echo/public\n").then_some(()))
    })?;
    let body = mesh.curl_with(NodeA, &format!("{UPSTREAM}v2/echo/public"), &["-m", "2"])?;
    ensure!(body == "instance api-a got /echo/public\n", "{body:?}");
    for path in ["v1/admin", "v1/admin/users", "v1/./admin", "v2/admin"] {
        let status = status_of(&mesh, "GET", &format!("{UPSTREAM}{path}"), None)?;
        ensure!(status == 403, "{path}: {status}\n{}", agent_logs(&mesh));
    }
    Ok(())
}

/// Makes api an HTTP service, writes an L7 intention web => api and checks
/// request by request that only what its permissions allow reaches
/// `instance`; then deletes it and checks that the default applies again.
fn l7_intention_cycle(mesh: &Mesh, instance: &str) -> anyhow::Result<()> {
    write_entry(mesh, "api-defaults.toml", API_IS_HTTP)?;
    // web may GET under /public, and POST only with x-env: prod; nothing
    // else, and nothing as x-user admin.
    l7_intention(
        mesh,
        r#"
[[Permissions]]
Action = "deny"
HTTP = { Header = [ { Name = "x-user", Exact = "admin" } ] }

[[Permissions]]
Action = "allow"
HTTP = { PathPrefix = "/public", Methods = ["GET"] }

[[Permissions]]
Action = "allow"
[Permissions.HTTP]
Methods = ["POST"]
Header = [ { Name = "x-env", Exact = "prod" } ]

[[Permissions]]
Action = "deny"
HTTP = { PathPrefix = "/" }
"#,
    )?;
    let private = format!("{UPSTREAM}private");
    wait_until(
        Duration::from_secs(5),
        "GET /private is refused with 403",
        || Ok((status_of(mesh, "GET", &private, None)? == 403).then_some(())),
    )
    .map_err(|e| e.context(agent_logs(mesh)))?;
    let denied_before = denials(mesh)?;

    let public = format!("{UPSTREAM}public/page");
    assert_eq!(
        mesh.curl_with(NodeA, &public, &["-m", "2"])?,
        format!("instance {instance}\n"),
        "an allowed request reaches the instance"
    );
    assert_eq!(status_of(mesh, "DELETE", &public, None)?, 403);
    assert_eq!(status_of(mesh, "POST", &private, None)?, 403);
    assert_eq!(status_of(mesh, "POST", &private, Some("x-env: prod"))?, 200);
    assert_eq!(status_of(mesh, "POST", &private, Some("x-env: dev"))?, 403);
    assert_eq!(status_of(mesh, "GET", &private, None)?, 403);
    // A header sent twice is judged on every reading the instance may take
    // (read joined, `admin,admin` escaped the deny on `admin`).
    assert_eq!(status_of(mesh, "GET", &public, Some("x-user: guest"))?, 200);
    for users in [["admin", "admin"], ["guest", "admin"]] {
        let sent = users.map(|u| format!("x-user: {u}"));
        let sent: Vec<&str> = sent.iter().map(String::as_str).collect();
        assert_eq!(status_with(mesh, "GET", &public, &sent)?, 403, "{users:?}");
    }
    let prod_and_dev = ["x-env: prod", "x-env: dev"];
    assert_eq!(status_with(mesh, "POST", &private, &prod_and_dev)?, 403);
    // Nor as the name CGI-style servers read as x-user, nor in a list.
    for sent in ["X_User: admin", "x-user: guest, admin"] {
        assert_eq!(status_of(mesh, "GET", &public, Some(sent))?, 403, "{sent}");
    }
    // The caller learns only that it was refused (as from Envoy); which
    // intention and permission decided is in the agents' logs.
    let out = mesh.curl_raw(NodeA, &["-sS", "-m", "2", &private])?;
    ensure!(
        out.stdout == "RBAC: access denied\n",
        "unexpected refusal body {:?}",
        out.stdout
    );
    let logs = mesh.agent_log(NodeA) + &mesh.agent_log(NodeB);
    ensure!(
        logs.contains("intention web => api, permission 3"),
        "the refusal's reason is not logged: {}",
        agent_logs(mesh)
    );
    let denied = denials(mesh)? - denied_before;
    ensure!(
        denied >= 10.0,
        "10 refused requests counted as {denied} denials"
    );
    let requests = |code| -> anyhow::Result<f64> {
        let labels = [("source", "web"), ("destination", "api"), ("code", code)];
        Ok(
            mesh.metric_with(NodeA, "weft_agent_http_requests_total", &labels)?
                + mesh.metric_with(NodeB, "weft_agent_http_requests_total", &labels)?,
        )
    };
    ensure!(
        requests("403")? >= 5.0,
        "refused requests are counted by code"
    );
    ensure!(
        requests("200")? >= 2.0,
        "answered requests are counted by code"
    );
    // Each counted request is timed too, by the same labels.
    let timed = |code| -> anyhow::Result<f64> {
        let labels = [("source", "web"), ("destination", "api"), ("code", code)];
        let name = "weft_agent_http_request_duration_seconds_count";
        Ok(mesh.metric_with(NodeA, name, &labels)? + mesh.metric_with(NodeB, name, &labels)?)
    };
    ensure!(timed("200")? == requests("200")? && timed("403")? == requests("403")?);

    // Several requests on one keep-alive connection are judged one by one.
    let out = mesh.curl_raw(
        NodeA,
        &[
            "-sS",
            "-m",
            "5",
            "-w",
            "%{http_code} ",
            "-o",
            "/dev/null",
            &public,
            "-o",
            "/dev/null",
            &private,
            "-o",
            "/dev/null",
            &public,
        ],
    )?;
    assert_eq!(out.stdout.trim(), "200 403 200");

    // With the intention gone, the default (allow) applies to every path.
    mesh.weft(&["intention", "delete", "web", "api"])?;
    wait_until(Duration::from_secs(5), "GET /private answers 200", || {
        Ok((status_of(mesh, "GET", &private, None)? == 200).then_some(()))
    })?;
    Ok(())
}

/// api speaks HTTP (L7 intentions, routers and splitters need it).
const API_IS_HTTP: &str = "Kind = \"service-defaults\"\nName = \"api\"\nProtocol = \"http\"\n";

/// api's subsets by `version` meta, v1 by default.
const RESOLVER: &str = r#"
Kind = "service-resolver"
Name = "api"
DefaultSubset = "v1"
[Subsets.v1]
Filter = "Service.Meta.version == v1"
[Subsets.v2]
Filter = "Service.Meta.version == v2"
"#;

/// Writes a config entry (TOML) through the CLI.
fn write_entry(mesh: &Mesh, file: &str, text: &str) -> anyhow::Result<()> {
    let path = mesh.path(file);
    std::fs::write(&path, text)?;
    mesh.weft(&["config", "write", &path.display().to_string()])?;
    Ok(())
}

/// Waits until `n` requests in a row (with `extra` curl arguments) answer
/// from instance `want`, then checks `n` more.
fn settles_on(mesh: &Mesh, extra: &[&str], want: &str, n: usize) -> anyhow::Result<()> {
    let mut args = vec!["-m", "2"];
    args.extend_from_slice(extra);
    let mut run = 0;
    wait_until(
        Duration::from_secs(10),
        &format!("{n} requests in a row ({extra:?}) on {want}"),
        || {
            let body = mesh.curl_with(NodeA, UPSTREAM, &args)?;
            run = if instance_of(&body) == Some(want) {
                run + 1
            } else {
                0
            };
            Ok((run >= n).then_some(()))
        },
    )
    .map_err(|e| e.context(agent_logs(mesh)))?;
    for i in 0..n {
        let body = mesh.curl_with(NodeA, UPSTREAM, &args)?;
        ensure!(
            instance_of(&body) == Some(want),
            "request {i} ({extra:?}) answered {body:?}, not from {want}"
        );
    }
    Ok(())
}

/// api-1 (version v1) on node B, api-2 (v2) on web's own node A: a
/// resolver's default subset, a splitter, a header route and a failover
/// each decide, request by request, which one answers.
#[test]
fn resolver_splitter_and_router_pick_the_instance_of_every_request() -> anyhow::Result<()> {
    require_root();
    let mut mesh = Mesh::start(
        spec()
            .node_b(api("api-1", 8080).meta("version", "v1"))
            .node_a(api("api-2", 8081).meta("version", "v2")),
    )?;
    let (a, b) = (mesh.ip(NodeA), mesh.ip(NodeB));
    mesh.workload(NodeB, "api-1", &format!("{b}:8080"))?;
    mesh.workload(NodeA, "api-2", &format!("{a}:8081"))?;
    let mut seen = std::collections::BTreeSet::new();
    wait_until(
        Duration::from_secs(30),
        "requests reach both instances",
        || {
            if let Ok(body) = mesh.curl_with(NodeA, UPSTREAM, &["-m", "2"]) {
                seen.insert(instance_of(&body).unwrap_or_default().to_string());
            }
            Ok((seen.contains("api-1") && seen.contains("api-2")).then_some(()))
        },
    )?;

    write_entry(&mesh, "defaults.toml", API_IS_HTTP)?;
    write_entry(&mesh, "resolver.toml", RESOLVER)?;
    // The default subset: every request to v1, across the tunnel.
    settles_on(&mesh, &[], "api-1", 10)?;

    write_entry(
        &mesh,
        "splitter.toml",
        "Kind = \"service-splitter\"\nName = \"api\"\n[[Splits]]\nWeight = 100\nServiceSubset = \"v2\"\n",
    )?;
    // The splitter: every request to v2, on this node.
    settles_on(&mesh, &[], "api-2", 10)?;

    write_entry(
        &mesh,
        "router.toml",
        r#"
Kind = "service-router"
Name = "api"
[[Routes]]
[Routes.Match.HTTP]
Header = [ { Name = "x-canary", Exact = "1" } ]
[Routes.Destination]
ServiceSubset = "v1"
"#,
    )?;
    // The route: requests with the header to v1, the others still split to v2.
    settles_on(&mesh, &["-H", "x-canary: 1"], "api-1", 10)?;
    settles_on(&mesh, &[], "api-2", 10)?;

    // One keep-alive connection (curl reuses it: 0 new connects after the
    // first), its requests routed one by one.
    let one = |header: Option<&'static str>| {
        let mut a = vec!["-sS", "-m", "5", "-w", "connects=%{num_connects}\n"];
        if let Some(h) = header {
            a.extend(["-H", h]);
        }
        a.push(UPSTREAM);
        a
    };
    let mut args = one(None);
    for header in [Some("x-canary: 1"), None] {
        args.push("--next");
        args.extend(one(header));
    }
    let out = mesh.curl_raw(NodeA, &args)?;
    ensure!(out.success(), "curl: {}", out.stderr);
    assert_eq!(
        out.stdout,
        "instance api-2\nconnects=1\ninstance api-1\nconnects=0\ninstance api-2\nconnects=0\n"
    );

    // With v2's only instance failing its check, the split goes nowhere: 503,
    // and no request is sent to v1 instead (no failover is configured).
    mesh.curl(NodeA, &format!("http://{a}:8081/fail"))?;
    wait_until(
        Duration::from_secs(10),
        "requests split to v2 get 503",
        || Ok((status_of(&mesh, "GET", UPSTREAM, None)? == 503).then_some(())),
    )?;
    assert_eq!(
        status_of(&mesh, "GET", UPSTREAM, Some("x-canary: 1"))?,
        200,
        "the v1 route still answers"
    );

    // A failover for v2: its requests go to v1 while v2 has no instance.
    write_entry(
        &mesh,
        "resolver.toml",
        &format!("{RESOLVER}[Failover.v2]\nServiceSubset = \"v1\"\n"),
    )?;
    settles_on(&mesh, &[], "api-1", 10)?;
    Ok(())
}

/// A TCP service's failover to another service with an instance on the
/// caller's own node: no agent but the caller's sees that connection, so
/// the caller's agent judges it by the intentions of the service that
/// answers, not only of the one dialed.
#[test]
fn a_failover_to_a_service_on_the_callers_node_is_judged_by_its_intentions() -> anyhow::Result<()> {
    require_root();
    let backup = Service::new("backup", 8090)
        .id("backup-1")
        .address(MeshSpec::NODE_ADDR);
    let mut mesh = Mesh::start(spec().node_b(api("api-1", 8080)).node_a(backup))?;
    let (a, b) = (mesh.ip(NodeA), mesh.ip(NodeB));
    mesh.workload(NodeB, "api-1", &format!("{b}:8080"))?;
    mesh.workload(NodeA, "backup-1", &format!("{a}:8090"))?;
    wait_for_body(&mesh, "api-1", Duration::from_secs(30))?;
    write_entry(
        &mesh,
        "resolver.hcl",
        "Kind = \"service-resolver\"\nName = \"api\"\nFailover = { \"*\" = { Service = \"backup\" } }\n",
    )?;
    mesh.weft(&["intention", "create", "web", "backup", "--deny"])?;
    // api-1 fails its check: api fails over to backup, which web may not
    // reach.
    mesh.curl(NodeB, &format!("http://{b}:8080/fail"))?;
    wait_until(
        Duration::from_secs(10),
        "web's connections to api refused",
        || {
            Ok(mesh
                .curl_with(NodeA, UPSTREAM, &["-m", "2"])
                .is_err()
                .then_some(()))
        },
    )?;
    for _ in 0..5 {
        if let Ok(body) = mesh.curl_with(NodeA, UPSTREAM, &["-m", "2"]) {
            anyhow::bail!("web reached {body:?} past its deny of backup");
        }
    }
    // Without the deny, the failover takes web to backup.
    mesh.weft(&["intention", "delete", "web", "backup"])?;
    settles_on(&mesh, &[], "backup-1", 3)?;
    Ok(())
}

/// api-1 answering on node B, and api-2 registered on node A without a
/// check with nothing listening there, so that a connection to it is
/// refused: returned once requests have been seen both answered and failed.
fn mesh_with_a_refusing_instance() -> anyhow::Result<Mesh> {
    let dead = Service::new("api", 8081)
        .id("api-2")
        .address(MeshSpec::NODE_ADDR);
    let mut mesh = Mesh::start(spec().node_b(api("api-1", 8080)).node_a(dead))?;
    let b = mesh.ip(NodeB);
    mesh.workload(NodeB, "api-1", &format!("{b}:8080"))?;
    let (mut answered, mut failed) = (0, 0);
    wait_until(
        Duration::from_secs(30),
        "requests both answered and failed",
        || {
            match mesh.curl_with(NodeA, UPSTREAM, &["-m", "2"]) {
                Ok(_) => answered += 1,
                Err(_) => failed += 1,
            }
            Ok((answered > 0 && failed > 0).then_some(()))
        },
    )
    .map_err(|e| e.context(format!("{answered} answered, {failed} failed")))?;
    Ok(mesh)
}

/// api-1 answers on node B; api-2 is registered on node A without a check
/// and nothing listens there, so a connection to it is refused. A route
/// with `RetryOnConnectFailure` sends every request that picked api-2 on to
/// api-1; a route with `PrefixRewrite` changes the path the instance sees.
#[test]
fn a_route_retries_refused_connections_and_rewrites_paths() -> anyhow::Result<()> {
    require_root();
    let mesh = mesh_with_a_refusing_instance()?;
    write_entry(&mesh, "defaults.toml", API_IS_HTTP)?;
    // Without a route, some requests would still land on api-2 and fail.

    write_entry(
        &mesh,
        "router.toml",
        r#"
Kind = "service-router"
Name = "api"
[[Routes]]
[Routes.Destination]
NumRetries = 2
RetryOnConnectFailure = true
RequestTimeout = "3s"
"#,
    )?;
    settles_on(&mesh, &[], "api-1", 30)?;

    // A route with PrefixRewrite: /v2/... arrives at the instance as /echo/...
    write_entry(
        &mesh,
        "router.toml",
        r#"
Kind = "service-router"
Name = "api"
[[Routes]]
[Routes.Match.HTTP]
PathPrefix = "/v2/"
[Routes.Destination]
PrefixRewrite = "/echo/"
NumRetries = 2
RetryOnConnectFailure = true
"#,
    )?;
    let url = format!("{UPSTREAM}v2/users?id=7");
    wait_until(
        Duration::from_secs(10),
        "the rewritten path arrives",
        || {
            let body = mesh
                .curl_with(NodeA, &url, &["-m", "2"])
                .unwrap_or_default();
            Ok((body == "instance api-1 got /echo/users?id=7\n").then_some(()))
        },
    )?;
    Ok(())
}

/// `curl` with `n` copies of `url` on one kept-alive connection from node
/// A: each transfer's status code, and how many connections it opened.
fn on_one_connection(mesh: &Mesh, url: &str, n: usize) -> anyhow::Result<(Vec<u16>, u32, String)> {
    let mut args = vec![
        "-sS",
        "-m",
        "30",
        "-w",
        "\ncode=%{http_code} connects=%{num_connects}\n",
    ];
    args.extend(std::iter::repeat_n(url, n));
    let out = mesh.curl_raw(NodeA, &args)?;
    ensure!(out.success(), "curl: {}", out.describe());
    let mut codes = Vec::new();
    let mut connects = 0;
    for line in out.stdout.lines() {
        if let Some(rest) = line.strip_prefix("code=") {
            let (code, n) = rest.split_once(" connects=").context("write-out line")?;
            codes.push(code.parse()?);
            connects += n.parse::<u32>()?;
        }
    }
    Ok((codes, connects, out.stdout))
}

/// Issue 15's case: an instance answering 503 and 200 in turn, a route
/// retrying 503 twice, 40 requests on one kept-alive connection: every one
/// is answered 200 (a retry never finds the pooled connection closed under
/// it after the 503's unread body was dropped).
#[test]
fn status_retries_on_a_kept_alive_connection_answer_every_request() -> anyhow::Result<()> {
    require_root();
    let mesh = one_api_mesh("api-1")?;
    write_entry(&mesh, "defaults.toml", API_IS_HTTP)?;
    write_entry(
        &mesh,
        "router.toml",
        r#"
Kind = "service-router"
Name = "api"
[[Routes]]
[Routes.Destination]
NumRetries = 2
RetryOnStatusCodes = [503]
"#,
    )?;
    let url = format!("{UPSTREAM}flaky");
    // The route reaches node A's agent: a request no longer sees the 503.
    wait_until(
        Duration::from_secs(10),
        "the retrying route applies",
        || {
            let (codes, _, _) = on_one_connection(&mesh, &url, 4)?;
            Ok(codes.iter().all(|c| *c == 200).then_some(()))
        },
    )?;
    let (codes, connects, out) = on_one_connection(&mesh, &url, 40)?;
    let ok = codes.iter().filter(|c| **c == 200).count();
    eprintln!("40 requests, one connection: {ok} answered 200, {connects} connection(s) opened");
    ensure!(
        codes.len() == 40 && ok == 40,
        "{ok} of {} answered 200:\n{out}",
        codes.len()
    );
    ensure!(connects == 1, "the client opened {connects} connections");
    Ok(())
}

/// A service whose protocol is HTTP, with no router, splitter or resolver:
/// 300 requests on one client connection are balanced request by request
/// over its two instances.
#[test]
fn an_http_service_is_balanced_per_request_without_a_router() -> anyhow::Result<()> {
    require_root();
    let mut mesh = Mesh::start(spec().node_b(api("api-1", 8080)).node_b(api("api-2", 8081)))?;
    let b = mesh.ip(NodeB);
    mesh.workload(NodeB, "api-1", &format!("{b}:8080"))?;
    mesh.workload(NodeB, "api-2", &format!("{b}:8081"))?;
    write_entry(&mesh, "defaults.toml", API_IS_HTTP)?;
    wait_until(Duration::from_secs(30), "both instances answer", || {
        let (_, _, out) = on_one_connection(&mesh, UPSTREAM, 20)?;
        Ok((out.contains("instance api-1") && out.contains("instance api-2")).then_some(()))
    })
    .map_err(|e| e.context(agent_logs(&mesh)))?;
    let (codes, connects, out) = on_one_connection(&mesh, UPSTREAM, 300)?;
    let (one, two) = (
        out.matches("instance api-1\n").count(),
        out.matches("instance api-2\n").count(),
    );
    eprintln!("300 requests, {connects} connection(s): api-1 {one}, api-2 {two}");
    ensure!(
        codes.iter().all(|c| *c == 200) && codes.len() == 300,
        "{codes:?}"
    );
    ensure!(connects == 1, "the client opened {connects} connections");
    ensure!(
        one + two == 300 && one >= 60 && two >= 60,
        "api-1 {one}, api-2 {two}"
    );
    Ok(())
}

/// Consul's route and balancing fields doing what its docs say, on two
/// `api` instances (v1 on node B, v2 on node A): a `QueryParam` route to
/// v2 that sets a request header and adds an answer header, a `RetryOn`
/// route without `NumRetries` (one retry, as in Consul), and a `ring_hash`
/// resolver hashing on `x-user`, which keeps each user on one instance.
#[test]
fn query_routes_header_changes_retry_on_and_ring_hash_do_what_consul_says() -> anyhow::Result<()> {
    require_root();
    let mut mesh = Mesh::start(
        spec()
            .node_b(api("api-1", 8080).meta("version", "v1"))
            .node_a(api("api-2", 8081).meta("version", "v2")),
    )?;
    let (a, b) = (mesh.ip(NodeA), mesh.ip(NodeB));
    mesh.workload(NodeB, "api-1", &format!("{b}:8080"))?;
    mesh.workload(NodeA, "api-2", &format!("{a}:8081"))?;
    write_entry(&mesh, "defaults.toml", API_IS_HTTP)?;
    write_entry(
        &mesh,
        "resolver.hcl",
        r#"
Kind = "service-resolver"
Name = "api"
Subsets = {
  v1 = { Filter = "Service.Meta.version == v1" }
  v2 = { Filter = "Service.Meta.version == v2" }
}
LoadBalancer = {
  Policy = "ring_hash"
  HashPolicies = [ { Field = "header", FieldValue = "x-user" } ]
}
"#,
    )?;
    write_entry(
        &mesh,
        "router.json",
        r#"{"Kind": "service-router", "Name": "api", "Routes": [
  {"Match": {"HTTP": {"QueryParam": [{"Name": "canary", "Exact": "yes"}]}},
   "Destination": {"ServiceSubset": "v2",
     "RequestHeaders": {"Set": {"x-route": "canary"}, "Remove": ["x-secret"]},
     "ResponseHeaders": {"Add": {"x-served-by": "canary-route"}}}},
  {"Match": {"HTTP": {"PathPrefix": "/flaky"}},
   "Destination": {"ServiceSubset": "v1", "RetryOn": ["gateway-error"]}}
]}"#,
    )?;

    // The query route: v2 every time, with the request header set and the
    // one to remove gone, and the answer carrying the added header.
    let canary = format!("{UPSTREAM}headers?canary=yes");
    let lines = |text: &str| -> std::collections::BTreeSet<String> {
        text.lines()
            .skip_while(|l| !l.starts_with("instance "))
            .map(str::to_string)
            .collect()
    };
    let want = lines("instance api-2\nx-route: canary\nx-user: ada\n");
    wait_until(Duration::from_secs(20), "the canary route applies", || {
        let out = mesh.curl_raw(
            NodeA,
            &[
                "-sS",
                "-m",
                "2",
                "-i",
                "-H",
                "x-user: ada",
                "-H",
                "x-secret: s",
                &canary,
            ],
        )?;
        ensure!(
            lines(&out.stdout) == want && out.stdout.contains("x-served-by: canary-route"),
            "{}",
            out.describe()
        );
        Ok(Some(()))
    })
    .map_err(|e| e.context(agent_logs(&mesh)))?;
    for _ in 0..10 {
        let body = mesh.curl_with(NodeA, &canary, &["-m", "2", "-H", "x-route: forged"])?;
        ensure!(
            body == "instance api-2\nx-route: canary\n",
            "set replaces: {body:?}"
        );
    }
    // Another value of the parameter, or none, is not the route's.
    let plain = format!("{UPSTREAM}headers?canary=no");
    let body = mesh.curl_with(NodeA, &plain, &["-m", "2"])?;
    ensure!(!body.contains("x-route"), "{body:?}");

    // RetryOn gateway-error, no NumRetries: the 503 of every other answer
    // of v1's one instance is retried once, so all 40 on one connection
    // answer 200.
    let flaky = format!("{UPSTREAM}flaky");
    let (codes, connects, out) = on_one_connection(&mesh, &flaky, 40)?;
    ensure!(
        codes.len() == 40 && codes.iter().all(|c| *c == 200),
        "{codes:?}\n{out}"
    );
    ensure!(connects == 1, "{connects} connections");

    // ring_hash on x-user: each user's 10 requests on one instance; across
    // 16 users both instances serve. (Balanced per request without it, a
    // user's 10 would all land on one instance 1 time in 512.)
    let mut instances = std::collections::BTreeSet::new();
    for user in 0..16 {
        let header = format!("x-user: user-{user}");
        let mut seen = std::collections::BTreeSet::new();
        let (_, _, out) = {
            let mut args = vec!["-sS", "-m", "20"];
            for _ in 0..10 {
                args.extend(["-H", &header, UPSTREAM, "--next"]);
            }
            args.pop();
            let out = mesh.curl_raw(NodeA, &args)?;
            ensure!(out.success(), "{}", out.describe());
            ((), (), out.stdout)
        };
        for line in out.lines() {
            seen.insert(line.to_string());
        }
        ensure!(seen.len() == 1, "user-{user} was served by {seen:?}");
        instances.extend(seen);
    }
    ensure!(instances.len() == 2, "16 users all on {instances:?}");
    Ok(())
}

/// A caller's `Limits` for an upstream, as Envoy's circuit breakers: with
/// `MaxConnections = 1`, a client holding one kept-alive connection to api
/// through web's agent holds the only upstream connection, so another
/// client's request is refused at once with 503 and `x-envoy-overloaded`,
/// and counted; once the first client leaves, requests pass again.
#[test]
fn a_callers_limits_refuse_past_max_connections_and_free_up_after() -> anyhow::Result<()> {
    require_root();
    let mesh = one_api_mesh("api-1")?;
    write_entry(&mesh, "defaults.toml", API_IS_HTTP)?;
    write_entry(
        &mesh,
        "web.hcl",
        r#"
Kind = "service-defaults"
Name = "web"
UpstreamConfig = {
  Overrides = [ { Name = "api", Limits = { MaxConnections = 1 } } ]
}
"#,
    )?;
    // A client that keeps its connection (and so web's agent keeps one to
    // api-1) until it is killed; at most 60 s.
    let hold = r#"
import socket, sys, time
s = socket.create_connection(("127.0.0.1", 9191), timeout=5)
s.sendall(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
got = b""
while b"instance" not in got:
    got += s.recv(4096)
print("held", flush=True)
time.sleep(60)
"#;
    let overloaded = || -> anyhow::Result<bool> {
        let out = mesh.curl_raw(NodeA, &["-sS", "-m", "5", "-i", UPSTREAM])?;
        Ok(out.stdout.starts_with("HTTP/1.1 503")
            && out.stdout.contains("x-envoy-overloaded: true"))
    };
    let mut holder = None;
    // The limit reaches web's agent; then the held connection is the one.
    wait_until(Duration::from_secs(20), "a second client refused", || {
        if holder.is_none() {
            let mut cmd = std::process::Command::new("python3");
            cmd.args(["-c", hold]);
            let proc = mesh.spawn(NodeA, &mut cmd, "holder.log")?;
            wait_until(Duration::from_secs(10), "the holder's answer", || {
                Ok(mesh.log("holder.log").contains("held").then_some(()))
            })?;
            holder = Some(proc);
        }
        Ok(overloaded()?.then_some(()))
    })
    .map_err(|e| e.context(agent_logs(&mesh)))?;
    ensure!(overloaded()?, "still refused while the first client holds");
    let refused = mesh.metric(NodeA, "weft_agent_circuit_breaker_overflows_total")?;
    ensure!(refused >= 2.0, "overflows counted: {refused}");
    drop(holder);
    wait_until(
        Duration::from_secs(10),
        "requests pass once the holder left",
        || {
            let body = mesh
                .curl_with(NodeA, UPSTREAM, &["-m", "2"])
                .unwrap_or_default();
            Ok((body == "instance api-1\n").then_some(()))
        },
    )?;
    Ok(())
}

/// A raw client of web's upstream for api: an upgrade request to `/upgrade`
/// with `headers`, then a line sent; prints the status line, whatever
/// came back after the head, and the head's `Sec-WebSocket-Accept` (lower
/// case).
const UPGRADE_CLIENT: &str = r#"
import socket, sys
crlf = b"\r\n"
s = socket.create_connection(("127.0.0.1", 9191), timeout=5)
head = [b"GET /upgrade HTTP/1.1", b"Host: api"] + [h.encode() for h in sys.argv[1:]]
s.sendall(crlf.join(head + [b"", b""]))
head = b""
while crlf + crlf not in head:
    chunk = s.recv(4096)
    if not chunk:
        sys.exit("closed during the handshake: %r" % head)
    head += chunk
status = head.split(crlf)[0]
rest = head.split(crlf + crlf, 1)[1]
s.sendall(b"ping over the upgraded connection\n")
while not rest.endswith(b"\n"):
    chunk = s.recv(4096)
    if not chunk:
        break
    rest += chunk
accept = [l for l in head.split(crlf + crlf)[0].split(crlf) if l.lower().startswith(b"sec-websocket-accept:")]
print(status.decode())
print(rest.decode().strip())
print(b",".join(accept).decode().lower())
"#;

/// An HTTP service's WebSocket upgrade goes through the per-request proxy:
/// the 101 that completes the handshake comes back and then bytes flow
/// both ways. Any other upgrade is
/// not carried: an allowed request offering `h2c` (which would turn the
/// connection into HTTP/2 whose requests no intention judges, with an
/// instance that switches to whatever it is asked) reaches the instance as
/// a plain HTTP/1.1 request, and what follows is HTTP again, not bytes.
#[test]
fn only_a_websocket_upgrade_passes_through_an_http_service() -> anyhow::Result<()> {
    require_root();
    let mesh = one_api_mesh("api-1")?;
    write_entry(&mesh, "defaults.toml", API_IS_HTTP)?;
    let upgrade = |headers: &[&str]| -> anyhow::Result<Vec<String>> {
        let mut args = vec!["-c", UPGRADE_CLIENT];
        args.extend_from_slice(headers);
        let out = mesh.run(NodeA, "python3", &args, Duration::from_secs(10))?;
        ensure!(out.success(), "{}", out.describe());
        Ok(out.stdout.lines().map(str::to_string).collect())
    };
    let websocket = [
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ];
    let lines = wait_until(
        Duration::from_secs(10),
        "an upgraded connection echoes",
        || {
            let lines = upgrade(&websocket)?;
            Ok(lines
                .first()
                .is_some_and(|l| l.contains("101"))
                .then_some(lines))
        },
    )?;
    // The client gets the accept value of its own key (RFC 6455's
    // example), though each agent sent the next hop a key of its own.
    ensure!(
        lines.first().is_some_and(|l| l.starts_with("HTTP/1.1 101"))
            && lines.get(1).map(String::as_str) == Some("ping over the upgraded connection")
            && lines.get(2).map(String::as_str)
                == Some("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{lines:?}"
    );
    let h2c = [
        "Connection: Upgrade, HTTP2-Settings",
        "Upgrade: h2c",
        "HTTP2-Settings: AAMAAABkAAQAAP__",
    ];
    let lines = upgrade(&h2c)?;
    ensure!(
        lines.first().is_some_and(|l| l.starts_with("HTTP/1.1 200"))
            && lines.get(1).map(String::as_str) == Some("instance api-1"),
        "an h2c upgrade was carried: {lines:?}"
    );
    let lines = upgrade(&["Connection: Upgrade", "Upgrade: websocket, h2c"])?;
    ensure!(
        lines.first().is_some_and(|l| l.starts_with("HTTP/1.1 200")),
        "an upgrade offering more than WebSocket was carried: {lines:?}"
    );
    // A WebSocket upgrade without its key is no handshake either.
    let lines = upgrade(&["Connection: Upgrade", "Upgrade: websocket"])?;
    ensure!(
        lines.first().is_some_and(|l| l.starts_with("HTTP/1.1 200")),
        "an upgrade without a Sec-WebSocket-Key was carried: {lines:?}"
    );
    Ok(())
}

/// `dig` in node A against its agent's DNS (127.0.0.1:8600): the answer
/// section's records, one per line (`+short`).
fn dig(mesh: &Mesh, args: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut full = vec!["@127.0.0.1", "-p", "8600", "+short", "+tries=1", "+time=2"];
    full.extend_from_slice(args);
    let out = mesh.run(NodeA, "dig", &full, Duration::from_secs(10))?;
    ensure!(out.success(), "dig {args:?}: {}", out.describe());
    Ok(out.stdout.lines().map(|l| l.trim().to_string()).collect())
}

/// The agent's DNS as Consul users query it, with `dig`: SRV with every
/// passing instance's port and a target that resolves, a tag, a node, the
/// `consul` domain and the datacenter form, and PTR for a virtual IP.
#[test]
fn dns_answers_srv_tags_nodes_and_reverse_lookups() -> anyhow::Result<()> {
    require_root();
    let mut mesh = Mesh::start(
        spec()
            .node_b(api("api-1", 8080).tag("canary"))
            .node_b(api("api-2", 8081)),
    )?;
    let b = mesh.ip(NodeB);
    mesh.workload(NodeB, "api-1", &format!("{b}:8080"))?;
    mesh.workload(NodeB, "api-2", &format!("{b}:8081"))?;
    let vip = mesh.vip("api")?;
    // Both instances passing: SRV lists both ports, node-b as the target.
    let srv = wait_until(Duration::from_secs(20), "SRV with both instances", || {
        let mut lines = dig(&mesh, &["SRV", "api.service.weft"])?;
        lines.sort();
        Ok((lines.len() == 2).then_some(lines))
    })?;
    ensure!(
        srv == [
            "1 1 8080 node-b.node.dc1.weft.",
            "1 1 8081 node-b.node.dc1.weft."
        ],
        "{srv:?}"
    );
    ensure!(dig(&mesh, &["A", "node-b.node.dc1.weft"])? == [b.as_str()]);
    // The same names in Consul's domain and with the datacenter.
    ensure!(dig(&mesh, &["A", "api.service.consul"])? == [vip.as_str()]);
    ensure!(dig(&mesh, &["A", "api.service.dc1.weft"])? == [vip.as_str()]);
    ensure!(
        dig(&mesh, &["A", "api.service.dc9.weft"])?.is_empty(),
        "another datacenter"
    );
    // PTR of the virtual IP.
    ensure!(dig(&mesh, &["-x", &vip])? == ["api.service.weft."]);
    // A tag: the tagged instance's address and port only; a tag nobody
    // has: nothing.
    ensure!(dig(&mesh, &["A", "canary.api.service.weft"])? == [b.as_str()]);
    ensure!(dig(&mesh, &["SRV", "canary.api.service.weft"])? == ["1 1 8080 node-b.node.dc1.weft."]);
    ensure!(dig(&mesh, &["A", "stable.api.service.weft"])?.is_empty());
    // api-1 fails its check: SRV drops it.
    mesh.curl(NodeB, &format!("http://{b}:8080/fail"))?;
    wait_until(
        Duration::from_secs(20),
        "SRV without the failing api-1",
        || {
            let lines = dig(&mesh, &["SRV", "api.service.weft"])?;
            Ok((lines == ["1 1 8081 node-b.node.dc1.weft."]).then_some(()))
        },
    )?;
    // Names outside the mesh are refused, not answered.
    let args = [
        "@127.0.0.1",
        "-p",
        "8600",
        "+tries=1",
        "+time=2",
        "example.com",
    ];
    let outside = mesh.run(NodeA, "dig", &args, Duration::from_secs(10))?;
    ensure!(
        outside.stdout.contains("status: REFUSED"),
        "{}",
        outside.describe()
    );
    Ok(())
}

/// api-2 refuses connections (nothing listens); with a passive health check
/// in web's service-defaults, one failure ejects it and every later
/// connection goes to api-1, even for plain TCP (no retries involved).
#[test]
fn a_passive_health_check_ejects_an_instance_that_refuses_connections() -> anyhow::Result<()> {
    require_root();
    let mesh = mesh_with_a_refusing_instance()?;
    write_entry(
        &mesh,
        "web-defaults.toml",
        r#"
Kind = "service-defaults"
Name = "web"
[UpstreamConfig.Defaults.PassiveHealthCheck]
MaxFailures = 1
BaseEjectionTime = "120s"
"#,
    )?;
    // At most one more failure (the one that ejects), then only api-1.
    settles_on(&mesh, &[], "api-1", 30)?;
    let log = mesh.agent_log_tail(NodeA, 500);
    ensure!(
        log.contains("instance ejected"),
        "the ejection is logged\n{log}"
    );
    let ejections = mesh.metric_with(
        NodeA,
        "weft_agent_outlier_ejections_total",
        &[("source", "web")],
    )?;
    ensure!(ejections >= 1.0, "the ejection is counted ({ejections})");
    Ok(())
}

/// A deny on the path prefix `/admin/` holds against every spelling that
/// walked around the unnormalized match (Consul's CVE-2024-10005 class):
/// dot segments, doubled slashes and escaped letters are normalized before
/// the rules see the path, encoded slashes are refused with 400, and the
/// workload gets the normalized path.
#[test]
fn l7_paths_are_normalized_before_they_are_judged_and_forwarded() -> anyhow::Result<()> {
    require_root();
    let mesh = one_api_mesh("api-1")?;
    write_entry(&mesh, "api-defaults.toml", API_IS_HTTP)?;
    let l7 = mesh.path("web-api-admin.toml");
    std::fs::write(
        &l7,
        "[[Permissions]]\nAction = \"deny\"\nHTTP = { PathPrefix = \"/admin/\" }\n",
    )?;
    mesh.weft(&[
        "intention",
        "create",
        "web",
        "api",
        "--file",
        &l7.display().to_string(),
    ])?;
    let status = |path: &str| -> anyhow::Result<u16> {
        let url = format!("{}{}", UPSTREAM.trim_end_matches('/'), path);
        let out = mesh.curl_raw(
            NodeA,
            &[
                "-sS",
                "--path-as-is",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-m",
                "2",
                &url,
            ],
        )?;
        ensure!(out.success(), "curl {path}: {}", out.stderr.trim());
        Ok(out.stdout.trim().parse()?)
    };
    wait_until(Duration::from_secs(5), "GET /admin/ is refused", || {
        Ok((status("/admin/")? == 403).then_some(()))
    })
    .map_err(|e| e.context(agent_logs(&mesh)))?;
    for path in [
        "/admin/x",
        "//admin/",
        "/./admin/",
        "/x/../admin/",
        "/%61dmin/",
        "/%61%64%6D%69%6E/users",
        "/.%2e/admin/",
        "///admin//x",
    ] {
        assert_eq!(status(path)?, 403, "{path}");
    }
    for path in ["/%2fadmin/", "/%2Fadmin/", "/admin%2fx", "/%5cadmin/"] {
        assert_eq!(status(path)?, 400, "{path}");
    }
    assert_eq!(status("/public")?, 200);
    let url = format!("{}/echo/./a//b/../c", UPSTREAM.trim_end_matches('/'));
    let body = mesh.curl_with(NodeA, &url, &["--path-as-is", "-m", "2"])?;
    assert_eq!(
        body.trim(),
        "instance api-1 got /echo/a/c",
        "the forwarded path"
    );
    Ok(())
}

/// With 10 s leaves, node B's agent renews its node certificate every ~5 s.
/// Once the certificate it started with has expired, a fresh TLS handshake
/// (node A's agent restarted, so its pooled connection is gone) must meet
/// the renewed certificate: inbound presents the current one, not the one
/// of the start.
#[test]
fn inbound_presents_the_renewed_node_certificate() -> anyhow::Result<()> {
    require_root();
    let mut mesh = Mesh::start(
        spec()
            .node_b(api("api-1", 8080))
            .server_arg("--leaf-ttl=10s"),
    )?;
    let b = mesh.ip(NodeB);
    mesh.workload(NodeB, "api-1", &format!("{b}:8080"))?;
    wait_for_body(&mesh, "api-1", Duration::from_secs(30))?;
    let started = Instant::now();
    // Three renewals of node B's certificate after the first one.
    wait_until(
        Duration::from_secs(40),
        "three renewals of node-b's certificate",
        || {
            let issued = mesh
                .agent_log(NodeB)
                .lines()
                .filter(|l| l.contains("certificate issued") && l.contains("/node/node-b"))
                .count();
            Ok((issued >= 4).then_some(()))
        },
    )?;
    ensure!(
        started.elapsed() > Duration::from_secs(10),
        "the first certificate cannot have expired yet"
    );
    mesh.restart_agent(NodeA)?;
    wait_for_body(&mesh, "api-1", Duration::from_secs(20))?;
    ensure!(
        !mesh.agent_log(NodeA).contains("expired"),
        "node A met an expired certificate:\n{}",
        agent_logs(&mesh)
    );
    Ok(())
}

/// A node certificate of this mesh for `node_name`, got as that node's
/// agent gets it: a token with the node's identity registers the node
/// (at node B's address) and has the CA sign a CSR for it.
fn node_identity(
    mesh: &Mesh,
    node_name: &str,
) -> anyhow::Result<std::sync::Arc<weft_agent::hbone::Identity>> {
    let token = mesh.weft_json(&[
        "acl",
        "token",
        "create",
        "--description",
        node_name,
        "--node-identity",
        &format!("{node_name}:dc1"),
    ])?;
    let token_file = mesh.path(&format!("{node_name}.token"));
    weft_tests::federation::write_private(
        &token_file,
        token["secret_id"].as_str().context("no secret_id")?,
    )?;
    // Node B's agent configuration, without its services, for node_name.
    let b_config = std::fs::read_to_string(mesh.agent_config(NodeB))?;
    let head = b_config.split("\n[[service]]").next().unwrap_or_default();
    let text = head
        .lines()
        .map(|l| {
            if l.starts_with("node_name") {
                format!("node_name = {node_name:?}")
            } else if l.starts_with("token_file") {
                format!("token_file = {:?}", token_file.display().to_string())
            } else if l.starts_with("data_dir") {
                let dir = mesh.path(&format!("{node_name}-data"));
                format!("data_dir = {:?}", dir.display().to_string())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let config = weft_agent::config::AgentConfig::parse(&text, &format!("{node_name}.toml"))?;
    mesh.netns(NodeB).run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let control = std::sync::Arc::new(weft_agent::control::Control::new(
                std::sync::Arc::new(config),
            )?);
            control.register().await?;
            let identities = weft_agent::identity::Identities::new(control);
            identities.init(&[]).await?;
            identities.node().context("no node certificate")
        })
    })?
}

/// Node B's address answered by an impostor holding a genuine certificate
/// of the mesh's CA, but node-c's: the source agent refuses to open web's
/// tunnel there (the certificate is not node-b's), logs and counts why, and
/// no CONNECT reaches the impostor.
#[test]
fn the_source_refuses_a_destination_presenting_another_nodes_certificate() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    require_root();
    let mut mesh = one_api_mesh("api-1")?;
    let identity = node_identity(&mesh, "node-c")?;
    ensure!(
        identity.spiffe_id.ends_with("/node/node-c"),
        "got {}",
        identity.spiffe_id
    );
    let trust_domain = identity
        .spiffe_id
        .strip_prefix("spiffe://")
        .and_then(|s| s.split('/').next())
        .context("trust domain")?
        .to_string();
    let bundle =
        weft_agent::hbone::TrustBundle::from_pem(&trust_domain, &mesh.weft(&["ca", "roots"])?)?;

    // Node B's agent dies (SIGKILL: api-1 stays in the catalog, passing)
    // and the impostor takes its port.
    mesh.kill_agent(NodeB);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let _entered = rt.enter();
    let listener = mesh
        .netns(NodeB)
        .listen(format!("{}:{}", mesh.ip(NodeB), weft_tests::mesh::INBOUND_PORT).parse()?)?;
    let connects = Arc::new(AtomicUsize::new(0));
    let handshakes = Arc::new(AtomicUsize::new(0));
    let (c, h) = (connects.clone(), handshakes.clone());
    let impostor = weft_agent::hbone::HboneServer::new(&identity, &bundle, move |_req| {
        c.fetch_add(1, Ordering::SeqCst);
        async {
            Err::<tokio::net::TcpStream, _>(weft_agent::hbone::Refusal::unavailable("impostor"))
        }
    })?
    .on_tls_accept(move |_| {
        h.fetch_add(1, Ordering::SeqCst);
    });
    rt.spawn(impostor.serve(listener));

    let wrong_node = |mesh: &Mesh| {
        mesh.metric_with(
            NodeA,
            "weft_agent_tls_handshake_failures_total",
            &[("side", "outbound"), ("reason", "wrong_node")],
        )
    };
    ensure!(
        wrong_node(&mesh)? == 0.0,
        "wrong_node counted before the impostor"
    );
    let refusal = wait_until(
        Duration::from_secs(15),
        "agent A refusing node-c's certificate for node-b",
        || {
            if let Ok(body) = mesh.curl_with(NodeA, UPSTREAM, &["-m", "2"]) {
                bail!("web -> api answered through the impostor: {body:?}");
            }
            Ok(mesh
                .agent_log(NodeA)
                .lines()
                .find(|l| l.contains("not the node meant"))
                .map(String::from))
        },
    )
    .map_err(|e| e.context(mesh.agent_log_tail(NodeA, 20)))?;
    eprintln!("agent A: {}", refusal.trim());
    ensure!(
        refusal.contains("/node/node-c") && refusal.contains("/node/node-b"),
        "the refusal names neither the node presented nor the one meant: {refusal}"
    );
    // Again and again: refused every time, counted every time.
    let counted = wrong_node(&mesh)?;
    ensure!(counted >= 1.0, "agent A did not count the refusal");
    for _ in 0..3 {
        ensure!(
            mesh.curl_with(NodeA, UPSTREAM, &["-m", "2"]).is_err(),
            "web -> api answered through the impostor"
        );
    }
    ensure!(
        wrong_node(&mesh)? >= counted + 3.0,
        "not every refusal was counted"
    );
    ensure!(
        connects.load(Ordering::SeqCst) == 0,
        "a CONNECT reached the impostor"
    );
    ensure!(
        handshakes.load(Ordering::SeqCst) == 0,
        "a handshake with the impostor completed"
    );
    Ok(())
}

/// `weft top` on a running mesh: real agents report what they carried, and
/// the pair web -> api shows with its connections and bytes.
#[test]
fn weft_top_shows_the_pairs_of_a_running_mesh() -> anyhow::Result<()> {
    require_root();
    let mesh = one_api_mesh("api-1")?;
    for _ in 0..10 {
        mesh.curl_with(NodeA, UPSTREAM, &["-m", "2"])?;
    }
    let line = wait_until(Duration::from_secs(20), "web -> api in weft top", || {
        let top: serde_json::Value = serde_json::from_str(
            &mesh.weft(&["--format", "json", "top", "--once", "--window", "1m"])?,
        )?;
        Ok(top["pairs"].as_array().and_then(|pairs| {
            pairs
                .iter()
                .find(|p| {
                    p["source"] == "web"
                        && p["destination"] == "api"
                        && p["connections_per_sec"].as_f64().unwrap_or(0.0)
                            * top["window_secs"].as_f64().unwrap_or(0.0)
                            >= 9.99
                })
                .cloned()
        }))
    })?;
    ensure!(line["bytes_received"].as_u64().unwrap_or(0) > 0, "{line}");
    // The tunnels went over pooled mTLS connections node A dialed, timed.
    let dials = mesh.metric(NodeA, "weft_agent_tunnel_dials_total")?;
    let timed = mesh.metric(NodeA, "weft_agent_tunnel_handshake_duration_seconds_count")?;
    let open = mesh.metric(NodeA, "weft_agent_tunnel_connections_open")?;
    ensure!(
        dials >= 1.0 && timed == dials && open >= 1.0 && dials < 10.0,
        "10 requests: {dials} dials, {timed} timed, {open} open (pooled: fewer dials than tunnels)"
    );
    // And as a table, the way an operator reads it.
    let table = mesh.weft(&["top", "--once", "--window", "1m"])?;
    ensure!(
        table
            .lines()
            .any(|l| l.starts_with("web") && l.contains("api")),
        "{table}"
    );
    eprintln!("{table}");
    Ok(())
}

/// With `recursors`, names outside the mesh's domains go to them (UDP and
/// TCP), so the agent can be a workload's only resolver; mesh names, known
/// or not, never leave the agent; without "recursion desired" nothing is
/// forwarded.
#[test]
fn dns_forwards_other_names_to_recursors_and_keeps_mesh_names() -> anyhow::Result<()> {
    require_root();
    let mut spec = spec().node_b(api("api-1", 8080));
    spec.agent_extra = "recursors = [\"127.0.0.2:5353\"]\n".into();
    let mesh = Mesh::start(spec)?;
    let mut upstream = std::process::Command::new("python3");
    upstream.args([
        weft_tests::clients::script("fake_dns.py")
            .to_str()
            .context("script path")?,
        "127.0.0.2",
        "5353",
    ]);
    let upstream = mesh.spawn(NodeA, &mut upstream, "fake-dns.log")?;
    let asked = || std::fs::read_to_string(mesh.path("fake-dns.log")).unwrap_or_default();
    wait_until(
        Duration::from_secs(10),
        "the upstream resolver ready",
        || Ok(asked().contains("ready").then_some(())),
    )?;
    assert_eq!(dig(&mesh, &["example.test"])?, ["192.0.2.44"]);
    assert_eq!(dig(&mesh, &["+tcp", "www.example.test"])?, ["192.0.2.44"]);
    // The mesh's own names are answered here, and unknown ones are NXDOMAIN
    // here: neither reaches the upstream.
    let vip = mesh.vip("api")?;
    assert_eq!(dig(&mesh, &["api.service.weft"])?, [vip]);
    let args = ["@127.0.0.1", "-p", "8600", "+tries=1", "+time=2"];
    let unknown = mesh.run(
        NodeA,
        "dig",
        &[&args[..], &["nothing.service.consul"]].concat(),
        Duration::from_secs(10),
    )?;
    ensure!(
        unknown.stdout.contains("status: NXDOMAIN"),
        "{}",
        unknown.describe()
    );
    let norecurse = mesh.run(
        NodeA,
        "dig",
        &[&args[..], &["+norecurse", "plain.example.test"]].concat(),
        Duration::from_secs(10),
    )?;
    ensure!(
        norecurse.stdout.contains("status: REFUSED"),
        "{}",
        norecurse.describe()
    );
    let seen = asked();
    let names: Vec<&str> = seen.lines().filter(|l| *l != "ready").collect();
    assert_eq!(
        names,
        ["example.test", "www.example.test"],
        "the upstream saw {seen:?}"
    );
    drop(upstream);
    Ok(())
}
