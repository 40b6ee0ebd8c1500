//! Data-plane enforcement, tried as an attacker would: every way around the
//! agent to a mesh workload, and out of one, is refused in the kernel, and
//! the mesh fails closed when its agent dies.
//!
//! Two nodes in transparent mode (`ebpf = true`): `web` (cgroup `web`) on
//! node A, `api` (cgroup `api`) on node B, its workload bound to every
//! address, IPv4 and IPv6 (`[::]:8080`). Intentions default to deny; web ->
//! api is allowed unless a test says otherwise.
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use weft_tests::mesh::{
    wait_until, Mesh, MeshSpec, NodeA, NodeB, Output, Service, AGENT_HTTP, EBPF_DNS,
};
use weft_tests::require_root;

const API_URL: &str = "http://api.service.weft:8080/";
const EBPF_EVENTS: &str = "weft_agent_ebpf_events_total";

fn spec() -> MeshSpec {
    spec_with_api_at(MeshSpec::NODE_ADDR)
}

/// The mesh with api registered at `address`.
fn spec_with_api_at(address: &str) -> MeshSpec {
    MeshSpec::new("deny")
        .ebpf()
        .node_a(Service::new("web", 8000).cgroup("web"))
        .node_b(
            Service::new("api", 8080)
                .id("api-1")
                .cgroup("api")
                .address(address)
                .healthz_check("1s"),
        )
}

/// Starts the mesh with `spec`, api's workload in api's cgroup on
/// `[::]:8080`, allows web -> api, and waits until web reaches api by name
/// (which needs node B's health check, itself a connection to the
/// workload, to pass).
fn start(spec: MeshSpec) -> anyhow::Result<Mesh> {
    let mut mesh = Mesh::start(spec)?;
    mesh.workload_as(NodeB, "api", "api-1", "[::]:8080")?;
    mesh.weft(&["intention", "create", "web", "api", "--allow"])?;
    wait_for_api(&mesh, API_URL)?;
    Ok(mesh)
}

fn wait_for_api(mesh: &Mesh, url: &str) -> anyhow::Result<()> {
    wait_until(Duration::from_secs(30), &format!("web -> {url}"), || {
        Ok(mesh
            .curl_as(NodeA, "web", url, &["-m", "2"])
            .ok()
            .filter(|body| body == "instance api-1\n")
            .map(|_| ()))
    })
    .map_err(|e| e.context(agent_logs(mesh)))
}

fn agent_logs(mesh: &Mesh) -> String {
    format!(
        "agent A log tail:\n{}\nagent B log tail:\n{}",
        mesh.agent_log_tail(NodeA, 30),
        mesh.agent_log_tail(NodeB, 30)
    )
}

/// The attempt must fail and must not have got an answer from the workload.
fn refused(what: &str, out: &Output) -> anyhow::Result<()> {
    ensure!(
        !out.success() && !out.stdout.contains("instance"),
        "{what} reached the workload: {}",
        out.describe()
    );
    eprintln!("refused as it should be: {what}: {}", out.stderr.trim());
    Ok(())
}

fn curl_args(url: &str) -> Vec<&str> {
    vec!["curl", "-sS", "-g", "--fail", "-m", "2", url]
}

/// `node`'s eBPF counter `event`, once above `before` (copied every second).
fn wait_event_above(
    mesh: &Mesh,
    node: weft_tests::mesh::Node,
    event: &str,
    before: f64,
) -> anyhow::Result<f64> {
    wait_until(
        Duration::from_secs(5),
        &format!("{event} counter of node {node:?} above {before}"),
        || {
            let now = mesh.metric_with(node, EBPF_EVENTS, &[("event", event)])?;
            Ok((now > before).then_some(now))
        },
    )
}

#[test]
fn inbound_capture_refuses_every_way_around_the_agent() -> anyhow::Result<()> {
    require_root();
    let mut mesh = start(spec())?;
    let b = mesh.ip(NodeB);
    let direct = format!("http://{b}:8080/");
    let refused_before = mesh.metric_with(NodeB, EBPF_EVENTS, &[("event", "inbound_refused")])?;

    // From node A, a process outside the mesh.
    refused(
        "node A outside the mesh",
        &mesh.run_with_mesh_dns(NodeA, &curl_args(&direct), Duration::from_secs(10))?,
    )?;
    // From node B itself, outside the mesh: loopback and the node address.
    for url in [
        "http://127.0.0.1:8080/",
        direct.as_str(),
        "http://[::1]:8080/",
    ] {
        refused(
            &format!("node B outside the mesh to {url}"),
            &mesh.run_with_mesh_dns(NodeB, &curl_args(url), Duration::from_secs(10))?,
        )?;
    }
    // From a namespace outside the mesh, linked to node B only.
    let (outsider, b_outside) = mesh.outsider()?;
    let mut cmd = std::process::Command::new("curl");
    cmd.args(&curl_args(&format!("http://{b_outside}:8080/"))[1..]);
    let _ns = weft_tests::mesh::in_netns(&mut cmd, &outsider)?;
    refused(
        "the outsider namespace",
        &weft_tests::mesh::run_bounded(&mut cmd, Duration::from_secs(10))?,
    )?;
    // From web's own cgroup, over IPv6 link-local: not a mesh address, so
    // not redirected, and refused at api's socket.
    let link_local = mesh.ipv6_link_local(NodeB)?;
    let v6 = format!("http://[{link_local}%25{}]:8080/", weft_tests::mesh::VETH);
    refused(
        "web over IPv6 link-local",
        &mesh.exec_as(NodeA, "web", &curl_args(&v6))?,
    )?;
    // The same with an IPv6 extension header before TCP, which a filter
    // parsing headers might take for something else than a SYN...
    let probe = |mesh: &Mesh, port: &str| {
        mesh.run(
            NodeA,
            weft_tests::servers::bin("weft-probe"),
            &["connect-dstopts", &link_local, weft_tests::mesh::VETH, port],
            Duration::from_secs(10),
        )
    };
    refused(
        "IPv6 with a Destination Options header",
        &probe(&mesh, "8080")?,
    )?;
    // ...while the same probe reaches a workload outside the mesh.
    mesh.workload(NodeB, "plain", "[::]:8090")?;
    let out = probe(&mesh, "8090")?;
    ensure!(
        out.success() && out.stdout.contains("instance plain"),
        "the extension-header probe does not work at all: {}",
        out.describe()
    );
    let refused_now = wait_event_above(&mesh, NodeB, "inbound_refused", refused_before)?;
    eprintln!(
        "node B refused {refused_now} unchecked connection attempts (SYNs, retries included)"
    );

    // Through the mesh it works, and a deny refuses web by VIP and by
    // api's real address: both are taken over and judged.
    wait_for_api(&mesh, &direct)?;
    mesh.weft(&["intention", "delete", "web", "api"])?;
    mesh.weft(&["intention", "create", "web", "api", "--deny"])?;
    wait_until(
        Duration::from_secs(5),
        "web -> api refused under the deny",
        || Ok((!mesh.exec_as(NodeA, "web", &curl_args(API_URL))?.success()).then_some(())),
    )?;
    refused(
        "web by its real address under a deny",
        &mesh.exec_as(NodeA, "web", &curl_args(&direct))?,
    )?;
    refused(
        "web by VIP under a deny",
        &mesh.exec_as(NodeA, "web", &curl_args(API_URL))?,
    )?;
    Ok(())
}

#[test]
fn permissive_mode_admits_plaintext_only_through_the_agent() -> anyhow::Result<()> {
    require_root();
    let mesh = start(spec())?;
    let direct = format!("http://{}:8080/", mesh.ip(NodeB));
    let path = mesh.path("api-defaults.toml");
    std::fs::write(
        &path,
        "Kind = \"service-defaults\"\nName = \"api\"\nMutualTLSMode = \"permissive\"\n",
    )?;
    mesh.weft(&["config", "write", &path.display().to_string()])?;
    let steered_before =
        mesh.metric_with(NodeB, EBPF_EVENTS, &[("event", "permissive_steered")])?;

    // Plaintext from node A now reaches node B's agent, but only an
    // intention from `*` can allow it: web -> api does not, the default
    // denies.
    wait_until(
        Duration::from_secs(20),
        "plaintext to api steered to node B's agent",
        || {
            let _ = mesh.run_with_mesh_dns(NodeA, &curl_args(&direct), Duration::from_secs(10));
            let now = mesh.metric_with(NodeB, EBPF_EVENTS, &[("event", "permissive_steered")])?;
            Ok((now > steered_before).then_some(()))
        },
    )?;
    refused(
        "plaintext with only web -> api allowed",
        &mesh.run_with_mesh_dns(NodeA, &curl_args(&direct), Duration::from_secs(10))?,
    )?;
    ensure!(
        mesh.agent_log(NodeB)
            .contains("permissive connection refused"),
        "node B's agent did not judge the plaintext connection:\n{}",
        agent_logs(&mesh)
    );

    mesh.weft(&["intention", "create", "*", "api", "--allow"])?;
    let answered = wait_until(
        Duration::from_secs(10),
        "plaintext allowed by * -> api",
        || {
            let out =
                mesh.run_with_mesh_dns(NodeA, &curl_args(&direct), Duration::from_secs(10))?;
            Ok(out.success().then_some(out.stdout))
        },
    )
    .map_err(|e| e.context(agent_logs(&mesh)))?;
    ensure!(answered == "instance api-1\n", "{answered:?}");
    let opened = mesh.metric_with(
        NodeB,
        "weft_agent_connections_opened_total",
        &[("source", "unauthenticated"), ("destination", "api")],
    )?;
    ensure!(
        opened >= 1.0,
        "plaintext connections are not counted: {opened}"
    );
    // One host holds at most 256 plaintext connections through the agent:
    // node A opens 260 and keeps them; those past its share are closed at
    // accept, and counted.
    let labels = [("listener", "permissive"), ("reason", "client_limit")];
    let counter = "weft_agent_inbound_connections_refused_total";
    let refused_before = mesh.metric_with(NodeB, counter, &labels)?;
    let target: std::net::SocketAddr = format!("{}:8080", mesh.ip(NodeB)).parse()?;
    let (held, open, closed) = mesh.netns(NodeA).run(move || -> anyhow::Result<_> {
        use std::io::{ErrorKind, Read};
        let mut held = Vec::new();
        for _ in 0..260 {
            held.push(std::net::TcpStream::connect_timeout(
                &target,
                Duration::from_secs(2),
            )?);
        }
        // The agent accepts in order: the last four find the share taken
        // and are closed (waited for); the others are carried to the
        // workload, which waits for a request (checked without waiting).
        for (i, conn) in held.iter().enumerate() {
            if i < 256 {
                conn.set_nonblocking(true)?;
            } else {
                conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            }
        }
        let (mut open, mut closed) = (0, 0);
        for conn in &held {
            match (&*conn).read(&mut [0u8; 1]) {
                Ok(0) => closed += 1,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => closed += 1,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    open += 1
                }
                other => anyhow::bail!("a plaintext connection answered {other:?}"),
            }
        }
        Ok((held, open, closed))
    })??;
    ensure!(
        open <= 256 && closed >= 1,
        "one host held {open} plaintext connections ({closed} closed)"
    );
    let counted = wait_until(Duration::from_secs(3), "the refusals counted", || {
        let now = mesh.metric_with(NodeB, counter, &labels)? - refused_before;
        Ok((now >= closed as f64).then_some(now))
    })?;
    ensure!(
        counted == closed as f64,
        "{closed} closed, {counted} counted"
    );
    drop(held);
    // Even with `*` allowed, the permissive listener itself serves only
    // what sk_lookup steered to it: a direct connection names no instance.
    refused(
        "a local process straight to the permissive listener",
        &mesh.run_with_mesh_dns(
            NodeB,
            &curl_args("http://127.0.0.1:15006/"),
            Duration::from_secs(10),
        )?,
    )?;
    // Local processes outside the mesh are still refused: permissive is for
    // other hosts, through the agent.
    refused(
        "node B outside the mesh, permissive",
        &mesh.run_with_mesh_dns(
            NodeB,
            &curl_args("http://127.0.0.1:8080/"),
            Duration::from_secs(10),
        )?,
    )?;
    // And the mesh path is unchanged.
    wait_for_api(&mesh, API_URL)?;
    Ok(())
}

#[test]
fn a_killed_agent_fails_closed_and_a_restarted_one_admits_nothing_before_its_view(
) -> anyhow::Result<()> {
    require_root();
    let mut mesh = start(spec())?;
    let vip_url = format!("http://{}:8080/", mesh.vip("api")?);
    let direct = format!("http://{}:8080/", mesh.ip(NodeB));
    wait_for_api(&mesh, &vip_url)?;
    wait_for_api(&mesh, &direct)?;

    mesh.kill_agent(NodeA);
    for (what, url) in [("VIP", &vip_url), ("real address", &direct)] {
        let out = mesh.exec_as(NodeA, "web", &curl_args(url))?;
        refused(
            &format!("web to api's {what} after kill -9 of its agent"),
            &out,
        )?;
    }
    // Past the lease the programs refuse by themselves, whatever the maps say.
    std::thread::sleep(weft_agent::intercept::LEASE + Duration::from_millis(500));
    for (what, url) in [("VIP", &vip_url), ("real address", &direct)] {
        let out = mesh.exec_as(NodeA, "web", &curl_args(url))?;
        refused(&format!("web to api's {what} past the lease"), &out)?;
    }

    // A deny written while the agent is down, then the agent starts while
    // web probes every 50 ms: no probe may get through, before or after
    // the agent is ready.
    mesh.weft(&["intention", "delete", "web", "api"])?;
    mesh.weft(&["intention", "create", "web", "api", "--deny"])?;
    let probes = mesh.path("probes.log");
    let script = format!(
        "i=0; while [ $i -lt 300 ]; do i=$((i+1)); \
         curl -s -m 1 {vip_url}; curl -s -m 1 {direct}; echo \" probe $i\"; \
         [ -e {stop} ] && break; sleep 0.05; done",
        stop = mesh.path("stop-probing").display()
    );
    mesh.spawn_as(NodeA, "web", &["sh", "-c", &script], "probes.log")?;
    wait_until(Duration::from_secs(10), "probes running", || {
        Ok(std::fs::read_to_string(&probes)
            .unwrap_or_default()
            .contains("probe 3")
            .then_some(()))
    })?;
    let started = Instant::now();
    mesh.start_agent(NodeA)?;
    mesh.wait_agent_ready(NodeA, Duration::from_secs(30))?;
    eprintln!("node A's agent ready {:?} after start", started.elapsed());
    let ready_probes = std::fs::read_to_string(&probes)?.matches("probe").count();
    wait_until(
        Duration::from_secs(20),
        "20 probes after the agent is ready",
        || {
            let n = std::fs::read_to_string(&probes)?.matches("probe").count();
            Ok((n >= ready_probes + 20).then_some(()))
        },
    )?;
    std::fs::write(mesh.path("stop-probing"), "")?;
    let log = std::fs::read_to_string(&probes)?;
    let count = log.matches("probe").count();
    ensure!(
        !log.contains("instance api-1"),
        "a probe got through around the agent's start:\n{log}"
    );
    eprintln!(
        "{count} probes (every 50 ms, VIP and real address) through the agent start: none answered"
    );

    // The deny is what refuses now: deleting it restores web -> api.
    mesh.weft(&["intention", "delete", "web", "api"])?;
    mesh.weft(&["intention", "create", "web", "api", "--allow"])?;
    wait_for_api(&mesh, &vip_url)?;
    Ok(())
}

/// Starts `weft-probe ARGS` in node A (an attacker waiting for a port),
/// logging to `log`, and waits until it listens.
fn spawn_taker(mesh: &Mesh, args: &[&str], log: &str) -> anyhow::Result<weft_tests::mesh::Proc> {
    let mut cmd = std::process::Command::new(weft_tests::servers::bin("weft-probe"));
    cmd.args(args);
    let taker = mesh.spawn(NodeA, &mut cmd, log)?;
    wait_until(
        Duration::from_secs(5),
        &format!("{args:?} listening"),
        || Ok(mesh.log(log).contains("listening").then_some(())),
    )?;
    Ok(taker)
}

/// Runs `args` in node A as a process under the agent's cgroup root that
/// is no workload (in production the root is the cgroup2 mount: every
/// process of the host).
fn as_bystander(mesh: &Mesh, args: &[&str]) -> anyhow::Result<Output> {
    let dir = mesh
        .cgroup_root(NodeA)
        .context("ebpf mesh")?
        .join("bystander");
    if !dir.exists() {
        std::fs::create_dir(&dir)?;
    }
    let script = format!("echo $$ > {}/cgroup.procs && exec \"$@\"", dir.display());
    let mut argv = vec!["-c", script.as_str(), "sh"];
    argv.extend(args);
    mesh.run(NodeA, "sh", &argv, Duration::from_secs(10))
}

/// Each attempt (what, command, the error it must fail with), made by web
/// and by a process that is no workload, is refused.
fn all_refused(mesh: &Mesh, attempts: &[(&str, Vec<String>, &str)]) -> anyhow::Result<()> {
    for (what, args, refusal) in attempts {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let args = args.as_slice();
        for (who, out) in [
            ("web", mesh.exec_as(NodeA, "web", args)?),
            ("a process that is no workload", as_bystander(mesh, args)?),
        ] {
            ensure!(
                !out.success() && out.stderr.contains(refusal),
                "{who} to {what} was not refused: {}",
                out.describe()
            );
        }
    }
    Ok(())
}

/// The attack: node A's agent crashes, and a local process outside the
/// mesh binds the agent's outbound port before anything else does. For the
/// rest of the lease the programs still send web's connections to that
/// port, so the process would read web's traffic in plaintext. The connect
/// hook sends a connection to the agent's port only when the socket
/// listening there carries the agent's mark: this one is refused. The same
/// for the agent's local API and DNS ports, where web (and any process)
/// would otherwise send its token and its queries to the taker; and, with
/// the agent running, for `[::1]` at those ports, which anyone may bind and
/// a client trying `localhost` as `::1` first would reach.
#[test]
fn a_process_that_takes_the_agents_ports_after_a_crash_hears_nothing() -> anyhow::Result<()> {
    require_root();
    let mut mesh = start(spec())?;
    let vip_url = format!("http://{}:8080/", mesh.vip("api")?);
    wait_for_api(&mesh, &vip_url)?;
    let probe = weft_tests::servers::bin("weft-probe");
    let probe = probe.to_str().context("probe path")?;
    let token = mesh.token_header(&mesh.token)?;
    let curl = |url: &str| -> Vec<String> {
        ["curl", "-sS", "-m", "2", "-H", &token, url]
            .map(String::from)
            .to_vec()
    };
    let udp = |to: &str, how: &str| -> Vec<String> {
        [probe, "send-udp", to, how].map(String::from).to_vec()
    };
    let api = format!("http://{AGENT_HTTP}/v1/agent/self");
    let (api6, dns6) = ("http://[::1]:8500/v1/agent/self", "[::1]:53");

    // With the agent running: [::1] at its ports is another process's.
    let _api6_taker = spawn_taker(&mesh, &["listen-in-place", "[::1]:8500", "60"], "api6.log")?;
    let _dns6_taker = spawn_taker(&mesh, &["udp-in-place", dns6, "60"], "dns6.log")?;
    let attempts6 = [
        (
            "[::1] at the local API's port",
            curl(api6),
            "Couldn't connect",
        ),
        (
            "[::1] at the DNS port, connected",
            udp(dns6, "connected"),
            "not permitted",
        ),
        (
            "[::1] at the DNS port, unconnected",
            udp(dns6, "unconnected"),
            "not permitted",
        ),
    ];
    all_refused(&mesh, &attempts6)?;
    let (api6_heard, dns6_heard) = (mesh.log("api6.log"), mesh.log("dns6.log"));
    ensure!(
        !api6_heard.contains("accepted") && !dns6_heard.contains("received"),
        "a process on [::1] at the agent's ports heard its clients: {api6_heard} / {dns6_heard}"
    );
    // 127.0.0.1 is the agent's, and answers.
    let answered = mesh.exec_as(
        NodeA,
        "web",
        &["curl", "-sS", "-m", "2", "-H", &token, &api],
    )?;
    ensure!(answered.success(), "the local API: {}", answered.describe());

    let port = weft_agent::config::DEFAULT_OUTBOUND_ADDR;
    let killed = Instant::now();
    mesh.kill_agent(NodeA);
    let log = mesh.path("taker.log");
    let _taker = mesh.spawn(
        NodeA,
        std::process::Command::new(probe).args(["listen-in-place", port, "5"]),
        "taker.log",
    )?;
    wait_until(Duration::from_secs(2), "the agent's port taken", || {
        Ok(std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("listening")
            .then_some(()))
    })?;
    let out = mesh.exec_as(NodeA, "web", &curl_args(&vip_url))?;
    let tried = killed.elapsed();
    // Renewed every LEASE_RENEWAL, the lease runs at least LEASE minus that
    // from the kill: only an attempt inside it shows anything.
    let sure = weft_agent::intercept::LEASE - weft_agent::intercept::LEASE_RENEWAL;
    ensure!(
        tried < sure,
        "the attempt came {tried:?} after the kill, too late to be sure the lease still ran ({sure:?})"
    );
    let taken = std::fs::read_to_string(&log)?;
    ensure!(
        !taken.contains("accepted"),
        "web's connection reached the process on the agent's port {tried:?} after the kill: {taken}"
    );
    refused("web to api's VIP with the agent's port taken", &out)?;
    eprintln!("the process on the agent's port got nothing ({tried:?} after the kill): {taken}");

    // The agent's own ports, its local API (which takes tokens) and DNS,
    // taken by a process after the crash: they hear nothing, for as long
    // as the programs stay pinned (no lease involved), IPv4 or v4-mapped.
    let _api_taker = spawn_taker(
        &mesh,
        &["listen-in-place", AGENT_HTTP, "20"],
        "api-taker.log",
    )?;
    let _dns_taker = spawn_taker(&mesh, &["udp-in-place", EBPF_DNS, "20"], "dns-taker.log")?;
    let mapped = "[::ffff:127.0.0.1]:53";
    let attempts = [
        (
            "the local API's port, taken",
            curl(&api),
            "Couldn't connect",
        ),
        (
            "the DNS port, taken, connected UDP",
            udp(EBPF_DNS, "connected"),
            "not permitted",
        ),
        (
            "the DNS port, taken, unconnected UDP",
            udp(EBPF_DNS, "unconnected"),
            "not permitted",
        ),
        (
            "the DNS port, taken, v4-mapped",
            udp(mapped, "unconnected"),
            "not permitted",
        ),
        (
            "the DNS port, taken, v4-mapped, connected",
            udp(mapped, "connected"),
            "not permitted",
        ),
    ];
    all_refused(&mesh, &attempts)?;
    let (api_taken, dns_taken) = (mesh.log("api-taker.log"), mesh.log("dns-taker.log"));
    ensure!(
        !api_taken.contains("accepted") && !dns_taken.contains("received"),
        "a process on the agent's ports heard from its clients: {api_taken} / {dns_taken}"
    );
    Ok(())
}

#[test]
fn egress_deny_refuses_destinations_outside_the_mesh_and_uninstall_detaches() -> anyhow::Result<()>
{
    require_root();
    let mut spec = spec();
    spec.agent_extra.push_str("egress = \"deny\"\n");
    let mut mesh = start(spec)?;
    // A listener on node A that is no mesh service.
    let outside = format!("{}:9099", mesh.ip(NodeA));
    mesh.workload(NodeA, "outside", &outside)?;
    let url = format!("http://{outside}/");
    let denied_before = mesh.metric_with(NodeA, EBPF_EVENTS, &[("event", "egress_denied")])?;
    let out = mesh.exec_as(NodeA, "web", &curl_args(&url))?;
    ensure!(
        !out.success() && !out.stdout.contains("instance"),
        "web reached a destination outside the mesh: {}",
        out.describe()
    );
    wait_event_above(&mesh, NodeA, "egress_denied", denied_before)?;
    // A workload that makes a cgroup below its own and moves into it is
    // still that workload: refused outside the mesh, carried inside it.
    let web = mesh.cgroup_root(NodeA).context("ebpf mesh")?.join("web");
    let escape = web.join("escape");
    std::fs::create_dir(&escape)?;
    let moved = |cmd: &str| format!("echo $$ > {}/cgroup.procs && exec {cmd}", escape.display());
    let out = mesh.exec_as(
        NodeA,
        "web",
        &["sh", "-c", &moved(&format!("curl -sS -m 2 {url}"))],
    )?;
    ensure!(
        !out.success() && !out.stdout.contains("instance"),
        "a process in a cgroup below web's escaped the egress policy: {}",
        out.describe()
    );
    let out = mesh.exec_as(
        NodeA,
        "web",
        &["sh", "-c", &moved(&format!("curl -sS -m 2 {API_URL}"))],
    )?;
    ensure!(
        out.success() && out.stdout == "instance api-1\n",
        "a process in a cgroup below web's is not carried by the mesh: {}",
        out.describe()
    );
    // Processes outside the mesh are not concerned, and the mesh works.
    ensure!(mesh.curl(NodeA, &url)? == "instance outside\n");
    wait_for_api(&mesh, API_URL)?;

    // `weft-agent uninstall` with the agent stopped removes the pins: the
    // programs detach and web's connections are no longer checked.
    mesh.stop_agent(NodeA)?;
    let pins = weft_agent::ebpf::pins::default_dir(&mesh.cgroup_root(NodeA).context("ebpf mesh")?);
    ensure!(pins.exists(), "no pins at {}", pins.display());
    let config = mesh.agent_config(NodeA).display().to_string();
    let out = mesh.run(
        NodeA,
        weft_tests::servers::bin("weft-agent"),
        &["uninstall", "--config", &config],
        Duration::from_secs(10),
    )?;
    ensure!(out.success(), "uninstall: {}", out.describe());
    ensure!(!pins.exists(), "{} is still there", pins.display());
    let out = mesh.exec_as(NodeA, "web", &curl_args(&url))?;
    ensure!(
        out.success() && out.stdout == "instance outside\n",
        "after uninstall web's connection is still steered: {}",
        out.describe()
    );
    Ok(())
}

#[test]
fn ipv6_instance_addresses_are_taken_over_like_ipv4_ones() -> anyhow::Result<()> {
    require_root();
    const A6: &str = "fd00:77::2";
    const B6: &str = "fd00:77::3";
    let spec = spec_with_api_at(B6);
    let mut mesh = Mesh::start(spec)?;
    for (node, addr) in [(NodeA, A6), (NodeB, B6)] {
        mesh.netns(node).ip(&[
            "-6",
            "addr",
            "add",
            &format!("{addr}/64"),
            "dev",
            weft_tests::mesh::VETH,
            "nodad",
        ])?;
    }
    mesh.workload_as(NodeB, "api", "api-1", "[::]:8080")?;
    mesh.weft(&["intention", "create", "web", "api", "--allow"])?;
    let url = format!("http://[{B6}]:8080/");
    wait_for_api(&mesh, &url)?;
    // It went through both agents, not straight over IPv6.
    let carried = mesh.metric_with(
        NodeB,
        "weft_agent_connections_opened_total",
        &[("source", "web"), ("destination", "api")],
    )?;
    ensure!(carried >= 1.0, "node B's agent carried nothing: {carried}");
    wait_for_api(&mesh, API_URL)?;

    mesh.weft(&["intention", "delete", "web", "api"])?;
    mesh.weft(&["intention", "create", "web", "api", "--deny"])?;
    wait_until(
        Duration::from_secs(5),
        "web -> api over IPv6 refused under the deny",
        || Ok((!mesh.exec_as(NodeA, "web", &curl_args(&url))?.success()).then_some(())),
    )?;
    refused(
        "web over IPv6 under a deny",
        &mesh.exec_as(NodeA, "web", &curl_args(&url))?,
    )?;
    // And outside the mesh, plain IPv6 to api is refused by inbound capture.
    refused(
        "node A outside the mesh over IPv6",
        &mesh.run_with_mesh_dns(NodeA, &curl_args(&url), Duration::from_secs(10))?,
    )?;
    Ok(())
}

#[test]
fn a_socket_reused_after_the_fast_path_keeps_no_mark() -> anyhow::Result<()> {
    require_root();
    // web may reach `local` (plain TCP, same node: the fast path); nothing
    // allows web -> victim, a mesh workload on the same node.
    let spec = MeshSpec::new("deny")
        .ebpf()
        .node_a(Service::new("web", 8000).cgroup("web"))
        .node_a(
            Service::new("local", 8070)
                .address(MeshSpec::NODE_ADDR)
                .healthz_check("1s"),
        )
        .node_a(
            Service::new("victim", 8060)
                .cgroup("victim")
                .address(MeshSpec::NODE_ADDR)
                .healthz_check("1s"),
        );
    let mut mesh = Mesh::start(spec)?;
    let a = mesh.ip(NodeA);
    mesh.workload(NodeA, "local", &format!("{a}:8070"))?;
    mesh.workload_as(NodeA, "victim", "victim", "0.0.0.0:8060")?;
    mesh.weft(&["intention", "create", "web", "local", "--allow"])?;
    let local = format!("{}:8070", mesh.vip("local")?);
    let fast_before = mesh.metric_with(NodeA, EBPF_EVENTS, &[("event", "fast_path")])?;
    // Until a connection is counted on the fast path: the first ones may
    // go through the agent, before its maps have the pair.
    wait_until(
        Duration::from_secs(30),
        "web -> local on the fast path",
        || {
            let ok = mesh
                .curl_as(NodeA, "web", &format!("http://{local}/"), &["-m", "2"])
                .is_ok_and(|body| body == "instance local\n");
            let fast = mesh.metric_with(NodeA, EBPF_EVENTS, &[("event", "fast_path")])?;
            Ok((ok && fast > fast_before).then_some(()))
        },
    )?;

    let probe = weft_tests::servers::bin("weft-probe").display().to_string();
    // The control: the reused socket works, to an allowed destination.
    let out = mesh.exec_as(NodeA, "web", &[&probe, "connect-reuse", &local, &local])?;
    ensure!(
        out.success() && out.stdout.contains("instance local"),
        "the reuse probe does not work at all: {}",
        out.describe()
    );
    // The attack: a socket that took the fast path (and its mark) is
    // dissolved and pointed at the victim, by an address that is no mesh
    // destination. It must not carry the mark there.
    for victim in ["0.0.0.0:8060".to_string(), format!("{a}:8060")] {
        let out = mesh.exec_as(NodeA, "web", &[&probe, "connect-reuse", &local, &victim])?;
        refused(&format!("a reused fast-path socket to {victim}"), &out)?;
    }
    // The same socket handed to a process outside the mesh (the probe moves
    // itself out of web's cgroup, into this test's, between the connects).
    // The connect hook decides by the caller's cgroup and leaves such a
    // caller alone: the mark must be gone with the first connection.
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("this process's cgroup-v2 path")?;
    let outside = weft_agent::ebpf::cgroup2_mount()?
        .join(own.trim_start_matches('/'))
        .join("cgroup.procs");
    let outside = outside.to_str().context("cgroup path")?;
    for victim in ["0.0.0.0:8060".to_string(), format!("{a}:8060")] {
        let out = mesh.exec_as(
            NodeA,
            "web",
            &[&probe, "connect-reuse", &local, &victim, outside],
        )?;
        refused(
            &format!("a fast-path socket handed out of the mesh, to {victim}"),
            &out,
        )?;
    }
    // A socket whose fast-path connect failed before the kernel sent its
    // SYN (bound to the port of another connection to the same place), so
    // that no connection ended to take a mark off it, handed out of the
    // mesh: it must carry no mark either. (The probe's first connect takes
    // the fast path: counted below, so the collision is the fast path's.)
    let fast_before = mesh.metric_with(NodeA, EBPF_EVENTS, &[("event", "fast_path")])?;
    for victim in ["0.0.0.0:8060".to_string(), format!("{a}:8060")] {
        let out = mesh.exec_as(
            NodeA,
            "web",
            &[&probe, "connect-collide", &local, &victim, outside],
        )?;
        ensure!(
            !out.stderr.contains("did not collide"),
            "the probe's second connect did not fail: {}",
            out.describe()
        );
        refused(
            &format!("a socket whose fast-path connect failed, out of the mesh, to {victim}"),
            &out,
        )?;
    }
    wait_event_above(&mesh, NodeA, "fast_path", fast_before)?;
    Ok(())
}

/// `PUT http://127.0.0.1:8500{path}` in node B with `token`: code and body.
fn put_on_b(mesh: &Mesh, path: &str, token: &str, body: &str) -> anyhow::Result<(u16, String)> {
    mesh.local_api(NodeB, ("PUT", path), Some(token), Some(body))
}

/// Check `check_id` in node B's `/v1/agent/checks`, once it has run:
/// status and output.
fn check_result(mesh: &Mesh, token: &str, check_id: &str) -> anyhow::Result<(String, String)> {
    let url = format!("http://{AGENT_HTTP}/v1/agent/checks");
    let header = mesh.token_header(token)?;
    wait_until(
        Duration::from_secs(20),
        &format!("check {check_id} run"),
        || {
            let out = mesh.curl_raw(NodeB, &["-sS", "-m", "5", "-H", &header, &url])?;
            let checks: serde_json::Value = serde_json::from_str(&out.stdout)
                .with_context(|| format!("agent checks: {}", out.describe()))?;
            let check = &checks[check_id];
            let (status, output) = (check["Status"].as_str(), check["Output"].as_str());
            Ok(match (status, output) {
                (Some(s), Some(o)) if !o.is_empty() => Some((s.to_string(), o.to_string())),
                _ => None,
            })
        },
    )
    .map_err(|e| e.context(agent_logs(mesh)))
}

/// A health check is a connection the agent makes, and the agent's mark
/// lets a connection past inbound capture. A check a workload adds through
/// the local API (its token may write only its own service) is the
/// workload's connection, not the agent's: aimed at another workload
/// (api's port, which web's intentions may not even reach), it is refused
/// in the kernel and the check is critical; aimed at the workload's own
/// port it passes, as the workload reaching itself does.
#[test]
fn a_check_added_through_the_local_api_reaches_only_its_own_workload() -> anyhow::Result<()> {
    require_root();
    let mesh = start(spec())?;
    let target = format!("http://{}:8080/healthz", mesh.ip(NodeB));
    // evil: registered through node B's API, no cgroup of its own.
    mesh.grant_agent_services(NodeB, &["evil"])?;
    let evil = mesh.service_token(&["evil"])?;
    let register = format!(
        r#"{{"ID":"evil-1","Name":"evil","Port":9999,"Check":{{"HTTP":"{target}","Interval":"1s","Timeout":"1s"}}}}"#
    );
    let (code, body) = put_on_b(&mesh, "/v1/agent/service/register", &evil, &register)?;
    ensure!(code == 200, "register evil-1: {code} {body}");
    let (status, output) = check_result(&mesh, &evil, "service:evil-1")?;
    ensure!(
        status == "critical" && !output.contains("200"),
        "evil's check reached api's workload: {status} {output}"
    );

    // api's own token adds the same check to api-1, whose workload (cgroup
    // api) listens there: it passes.
    let api = mesh.service_token(&["api"])?;
    let own = format!(
        r#"{{"Name":"own","CheckID":"api-own","ServiceID":"api-1","HTTP":"{target}","Interval":"1s","Timeout":"1s"}}"#
    );
    let (code, body) = put_on_b(&mesh, "/v1/agent/check/register", &api, &own)?;
    ensure!(code == 200, "api's own check: {code} {body}");
    let (status, output) = check_result(&mesh, &api, "api-own")?;
    ensure!(status == "passing", "api's own check: {status} {output}");

    // The agent probes from outside every workload's cgroup, where the
    // egress policy does not hold: a check elsewhere than its service, the
    // loopback or the node would carry data out, or scan the network.
    for probe in [
        r#""HTTP":"http://10.99.0.7/leak?data=secret""#,
        r#""TCP":"example.com:443""#,
        r#""GRPC":"[fd00::7]:50051/x""#,
    ] {
        let check = format!(
            r#"{{"Name":"out","CheckID":"api-out","ServiceID":"api-1",{probe},"Interval":"1s"}}"#
        );
        let (code, body) = put_on_b(&mesh, "/v1/agent/check/register", &api, &check)?;
        ensure!(
            code == 400 && body.contains("probes its service's own address"),
            "a check at {probe}: {code} {body}"
        );
    }
    let claim = r#"{"ID":"evil-2","Name":"evil","Port":9998,"Check":{"TCP":"10.99.0.7:22","Interval":"1s"}}"#;
    let (code, body) = put_on_b(&mesh, "/v1/agent/service/register", &evil, claim)?;
    ensure!(
        code == 400 && body.contains("probes its service's own address"),
        "a registration with a check elsewhere: {code} {body}"
    );
    Ok(())
}

/// A workload that may register its own service cannot register it at a
/// port another user's process listens on: transparent mode takes an
/// instance's address over for the node's workloads, and would hand their
/// connections to a node-local daemon outside the mesh (its clients'
/// passwords and data) to the service. A port nothing listens on yet it
/// may still claim.
#[test]
fn a_workload_cannot_register_its_service_at_another_users_port() -> anyhow::Result<()> {
    use std::os::unix::fs::chown;
    const NOBODY: u32 = 65534;
    require_root();
    let mut mesh = start(spec())?;
    // A node-local daemon outside the mesh, root's, on node B.
    mesh.workload(NodeB, "local-db", "127.0.0.1:6390")?;
    mesh.grant_agent_services(NodeB, &["evil"])?;
    let evil = mesh.service_token(&["evil"])?;
    // The workload calls as the user it runs as, its token in a file only
    // that user reads.
    let dir = tempfile::tempdir()?;
    chown(dir.path(), Some(NOBODY), Some(NOBODY))?;
    let header = weft_tests::mesh::token_header_in(dir.path(), &evil)?;
    let file = header.strip_prefix('@').context("curl's header file")?;
    chown(file, Some(NOBODY), Some(NOBODY))?;
    let register = |port: u16| -> anyhow::Result<(String, String)> {
        let body =
            format!(r#"{{"ID":"evil-{port}","Name":"evil","Address":"127.0.0.1","Port":{port}}}"#);
        let out = mesh.exec_as_user(
            NodeB,
            "api",
            "nobody",
            &[
                "curl",
                "-sS",
                "-m",
                "5",
                "-X",
                "PUT",
                "-H",
                &header,
                "--data-binary",
                &body,
                "-w",
                "\n%{http_code}",
                "http://127.0.0.1:8500/v1/agent/service/register",
            ],
        )?;
        let (answer, code) = out.stdout.rsplit_once('\n').context(out.describe())?;
        Ok((code.to_string(), answer.to_string()))
    };
    let (code, answer) = register(6390)?;
    ensure!(
        code == "403" && answer.contains("another user's process"),
        "evil at root's 127.0.0.1:6390: {code} {answer}"
    );
    ensure!(
        !mesh
            .weft(&["catalog", "service", "evil"])
            .is_ok_and(|s| s.contains("6390")),
        "registered anyway"
    );
    let (code, answer) = register(6391)?;
    ensure!(code == "200", "evil at a free port: {code} {answer}");
    Ok(())
}

/// In transparent mode an explicit upstream listener of a mesh workload
/// (web's `127.0.0.1:9191` to api) takes only web's own connections: the
/// programs send a connection to it on to itself with a record of who made
/// it, and the agent resets any other. Before, any process on the node (a
/// process outside the mesh, or another workload that may not call api)
/// was carried to api as web. A service without a cgroup (`batch`, whose
/// processes are no mesh workloads) keeps its listener for the node's
/// processes, as in explicit mode, but no mesh workload is carried as it.
#[test]
fn an_upstream_listener_takes_only_its_own_workloads_connections() -> anyhow::Result<()> {
    require_root();
    let spec = MeshSpec::new("deny")
        .ebpf()
        .node_a(
            Service::new("web", 8000)
                .cgroup("web")
                .upstream("api", 9191),
        )
        .node_a(Service::new("evil", 8001).cgroup("evil"))
        .node_a(Service::new("batch", 8002).upstream("api", 9292))
        .node_b(
            Service::new("api", 8080)
                .id("api-1")
                .cgroup("api")
                .address(MeshSpec::NODE_ADDR)
                .healthz_check("1s"),
        );
    let mesh = start(spec)?;
    let upstream = "http://127.0.0.1:9191/";
    wait_until(Duration::from_secs(20), "web through its upstream", || {
        Ok(mesh
            .curl_as(NodeA, "web", upstream, &["-m", "2"])
            .ok()
            .filter(|body| body == "instance api-1\n"))
    })
    .map_err(|e| e.context(agent_logs(&mesh)))?;
    let evil = mesh.exec_as(NodeA, "evil", &curl_args(upstream))?;
    refused("another workload through web's upstream listener", &evil)?;
    let outside = mesh.run(
        NodeA,
        "curl",
        &curl_args(upstream)[1..],
        Duration::from_secs(10),
    )?;
    refused(
        "a process outside the mesh through web's upstream listener",
        &outside,
    )?;
    // And web's own still passes.
    let body = mesh.curl_as(NodeA, "web", upstream, &["-m", "2"])?;
    ensure!(body == "instance api-1\n", "{body:?}");

    // batch may call api; the node's processes reach api through batch's
    // listener, a mesh workload does not.
    mesh.weft(&["intention", "create", "batch", "api", "--allow"])?;
    let batch = "http://127.0.0.1:9292/";
    wait_until(Duration::from_secs(20), "batch's listener", || {
        let out = mesh.run(
            NodeA,
            "curl",
            &curl_args(batch)[1..],
            Duration::from_secs(10),
        )?;
        Ok((out.stdout == "instance api-1\n").then_some(()))
    })?;
    let evil = mesh.exec_as(NodeA, "evil", &curl_args(batch))?;
    refused(
        "a workload through the listener of a service without a cgroup",
        &evil,
    )?;
    Ok(())
}
