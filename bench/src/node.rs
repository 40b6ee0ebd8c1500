//! Per-node overhead (issue 7): the two-node mesh of the tests (network
//! namespaces joined by a veth, release binaries), a client in node A and
//! the workloads on node B, through each configuration in turn:
//!
//! - `direct`: no mesh, the client connects to node B's address;
//! - `weft explicit`: to web's upstream ports on 127.0.0.1 (agent A carries
//!   each connection over HBONE, mutual TLS, to agent B);
//! - `weft eBPF`: the client runs in web's cgroup and connects to the
//!   service's virtual IP; the connect hook hands it to agent A (a second
//!   mesh with `ebpf = true`, side by side with the first);
//! - `haproxy mTLS`: two HAProxy instances doing mutual TLS between the nodes.
//!
//! In each round every configuration runs every load, the order rotating
//! from round to round; every figure is min / median / max over rounds and
//! each ratio or difference to `direct` is taken within a round. The
//! proxies' CPU (utime + stime from /proc over the load window) and peak RSS
//! (VmHWM, reset before the window) are read under each load.
//!
//! Same-node (eBPF mesh): a client in web's cgroup reaching a service on its
//! own node through its virtual IP (the fast path: the connect hook sends it
//! straight to the local instance) next to the same client outside the mesh
//! connecting to the instance directly.
//!
//! The meshes' servers run at idle priority ([`crate::priority`]): in a
//! deployment the control plane has machines of its own.
use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use weft_tests::mesh::{wait_until, Mesh, MeshSpec, NodeA, NodeB, Output, Proc, Service};
use weft_tests::servers::bin;

use crate::haproxy::{self, Route};
use crate::large_mesh;
use crate::load::{self, Percentiles, Window};
use crate::quiet;
use crate::report::{Figure, Section};

const BODY_BYTES: &str = "1024";
const RATE: u32 = 1000;
const CONNS: u32 = 4;
/// The agents' log filter: the agent's own default, as an operator runs it
/// (the tests' meshes log the agents' debug lines, about two per connection).
pub const AGENT_LOG: &str = "info";
const HTTP_PORT: u16 = 8080;
const BULK_PORT: u16 = 5201;
const LOCAL_HTTP_PORT: u16 = 8081;
const LOCAL_BULK_PORT: u16 = 5202;
const UP_HTTP: u16 = 9191;
const UP_BULK: u16 = 9202;
const HA_HTTP: u16 = 9301;
const HA_BULK: u16 = 9302;

pub(crate) const DIRECT: &str = "direct";
const EXPLICIT: &str = "weft explicit";
const EBPF: &str = "weft eBPF";
const HAPROXY: &str = "haproxy mTLS";
const SAME_DIRECT: &str = "same-node direct";
const SAME_FAST: &str = "same-node fast path";

struct Params {
    rounds: usize,
    rate_secs: u64,
    max_secs: u64,
    conn_secs: u64,
    bulk_secs: u64,
    /// How long a round waits for a quiet machine before it starts anyway.
    quiet_wait: Duration,
    /// Rounds in the large mesh.
    large_rounds: usize,
}

/// One way from the client in node A to the workloads.
struct Target<'a> {
    name: &'static str,
    mesh: &'a Mesh,
    url: String,
    bulk: (String, u16),
    /// Run the client as web's workload (in its cgroup).
    as_web: bool,
    /// The proxies on node A and node B whose CPU and memory count.
    proxies: Vec<u32>,
}

impl Target<'_> {
    fn client(&self, program: &str, args: &[String], secs: u64) -> anyhow::Result<Output> {
        let program = load::tool(program)?.display().to_string();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let limit = Duration::from_secs(secs + 20);
        if self.as_web {
            let mut full = vec![program.as_str()];
            full.extend(args);
            self.mesh.exec_as_with(NodeA, "web", &full, limit)
        } else {
            self.mesh.run(NodeA, &program, &args, limit)
        }
    }
}

/// What one round measured, by `configuration: figure`.
type Round = BTreeMap<String, f64>;

fn unit_of(metric: &str) -> &'static str {
    if metric.contains("per GB") {
        "CPU s/GB"
    } else if metric.contains("faults per connection") {
        "faults/conn"
    } else if metric.contains("minor faults") {
        "faults"
    } else if metric.contains("connections total") {
        "conn"
    } else if metric.contains("vCPU") {
        "vCPU"
    } else if metric.contains("RSS") {
        "MB"
    } else if metric.contains("bulk") {
        "Gbit/s"
    } else if metric.contains(" p") {
        "µs"
    } else if metric.contains("connections") {
        "conn/s"
    } else {
        "req/s"
    }
}

fn record_latency(out: &mut Round, prefix: &str, p: Percentiles) {
    out.insert(format!("{prefix} p50"), p.p50);
    out.insert(format!("{prefix} p90"), p.p90);
    out.insert(format!("{prefix} p99"), p.p99);
    out.insert(format!("{prefix} p99.9"), p.p999);
}

/// Runs `f` as load `label`, recording the proxies' CPU and peak RSS.
fn under_load(
    t: &Target,
    out: &mut Round,
    label: &str,
    f: impl FnOnce(&mut Round) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let window = Window::start(&t.proxies)?;
    f(out).with_context(|| format!("{}: {label}", t.name))?;
    let usage = window.finish()?;
    for (u, node) in usage.into_iter().zip(["A", "B"]) {
        out.insert(format!("{label}: proxy vCPU node {node}"), u.vcpu);
        out.insert(
            format!("{label}: proxy peak RSS node {node}"),
            u.peak_rss_mb,
        );
        out.insert(
            format!("{label}: proxy minor faults node {node}"),
            u.minor_faults,
        );
    }
    Ok(())
}

fn rate_load(t: &Target, p: &Params, out: &mut Round) -> anyhow::Result<()> {
    under_load(t, out, "at 1000 rps", |out| {
        let stdout = load::stdout_of(
            "oha",
            t.client(
                "oha",
                &load::oha_rate_args(&t.url, RATE, CONNS, p.rate_secs),
                p.rate_secs,
            )?,
        )?;
        let r = load::parse_oha(&stdout)?;
        if r.success_rate < 0.999 {
            bail!(
                "only {:.1} % of {} requests succeeded",
                r.success_rate * 100.0,
                r.total
            );
        }
        out.insert("1000 rps achieved".into(), r.rps);
        record_latency(out, "1000 rps", r.latency);
        Ok(())
    })
}

fn max_load(
    t: &Target,
    p: &Params,
    script: &std::path::Path,
    out: &mut Round,
) -> anyhow::Result<()> {
    under_load(t, out, "at max rate", |out| {
        let stdout = load::stdout_of(
            "wrk",
            t.client(
                "wrk",
                &load::wrk_args(&t.url, script, CONNS, p.max_secs),
                p.max_secs,
            )?,
        )?;
        let (rps, lat, errors) = load::parse_wrk(&stdout)?;
        if errors > 0.0 {
            bail!("wrk: {errors} errors");
        }
        out.insert("max rate".into(), rps);
        record_latency(out, "max rate", lat);
        Ok(())
    })
}

fn conn_load(t: &Target, p: &Params, out: &mut Round) -> anyhow::Result<()> {
    under_load(t, out, "new connections", |out| {
        let stdout = load::stdout_of(
            "oha",
            t.client(
                "oha",
                &load::oha_connections_args(&t.url, CONNS, p.conn_secs),
                p.conn_secs,
            )?,
        )?;
        let r = load::parse_oha(&stdout)?;
        if r.success_rate < 0.99 {
            bail!(
                "only {:.1} % of {} connections succeeded",
                r.success_rate * 100.0,
                r.total
            );
        }
        out.insert("new connections".into(), r.rps);
        out.insert("new connections total".into(), r.total);
        Ok(())
    })
}

fn bulk_load(t: &Target, p: &Params, streams: u32, out: &mut Round) -> anyhow::Result<()> {
    let label = if streams == 1 {
        "bulk 1 stream".to_string()
    } else {
        format!("bulk {streams} streams")
    };
    let key = label.clone();
    under_load(t, out, &label, |out| {
        let (host, port) = &t.bulk;
        let stdout = load::stdout_of(
            "iperf3",
            t.client(
                "iperf3",
                &load::iperf_args(host, *port, streams, p.bulk_secs),
                p.bulk_secs,
            )?,
        )?;
        out.insert(key, load::parse_iperf(&stdout)?);
        Ok(())
    })
}

/// The name `--only` takes for the large-mesh rounds.
const LARGE: &str = "large mesh";
/// The phase of the large mesh's reference rounds, before the fill.
const BEFORE_FILL: &str = "small mesh, before the fill";
/// The phase after the large mesh's rounds, its churn stopped.
const LARGE_STILL: &str = "large mesh, no changes";
/// At least this long after the fill before the large view's memory is
/// read: two of the agent's heap-trim periods (`TRIM_PERIOD`,
/// agent/src/allocator.rs).
const TRIM_SETTLE: Duration = Duration::from_secs(10);

/// What the large-mesh phase measured: its rounds (figures named
/// `CONFIGURATION (large mesh): figure`), facts (memory, fill times) and
/// notes.
#[derive(Default)]
struct LargeRun {
    rounds: Vec<Round>,
    facts: Round,
    notes: Vec<String>,
}

/// Fills `meshes`' servers, waits for every agent's view to hold the fill,
/// and measures 1000 rps latency and new connections of `targets` in
/// rounds, each first while changes arrive and then with them stopped;
/// agent memory before and after.
fn large_mesh_rounds(
    meshes: &[&Mesh],
    targets: &[&Target],
    p: &Params,
    out: &mut LargeRun,
) -> anyhow::Result<()> {
    let agents: Vec<(String, u32)> = meshes
        .iter()
        .enumerate()
        .flat_map(|(i, m)| {
            [NodeA, NodeB].map(|n| {
                let mode = if i == 0 { "explicit" } else { "eBPF" };
                (format!("{mode} mesh, {}", n.node_name()), m.agent_config(n))
            })
        })
        .map(|(label, config)| Ok((label, load::agent_pid(&config)?)))
        .collect::<anyhow::Result<_>>()?;
    for (label, pid) in &agents {
        let rss = load::rss_mb(*pid)?;
        out.facts.insert(format!("agent RSS before, {label}"), rss);
    }
    // The small mesh measured as the large one will be, loads and order
    // alike, just before the fill: the large mesh's reference.
    phase_rounds(targets, p, BEFORE_FILL, out)?;
    for (i, mesh) in meshes.iter().enumerate() {
        eprintln!("large mesh: filling mesh {i}");
        let secs = large_mesh::fill(mesh)?;
        out.facts.insert(format!("fill seconds, mesh {i}"), secs);
        for node in [NodeA, NodeB] {
            let secs = large_mesh::wait_for_view(mesh, node)?;
            out.facts.insert(
                format!("view loaded after, mesh {i} {}", node.node_name()),
                secs,
            );
        }
    }
    // Right after both meshes' fills the agents may still hold what taking
    // them in allocated and freed (mesh 0's less surely: its fill is older);
    // their periodic heap trim gives that back within seconds. What the view
    // costs, under its steady churn, is read after settling.
    let filled = std::time::Instant::now();
    for (label, pid) in &agents {
        let rss = load::rss_mb(*pid)?;
        out.facts
            .insert(format!("agent RSS right after the fill, {label}"), rss);
    }
    // Generous: every round waits for a quiet machine at most quiet_wait.
    let per_round = targets.len() as u64 * (p.rate_secs + p.conn_secs + 30) + 60;
    let bound = p.quiet_wait.as_secs() + per_round;
    let start_churns = || -> anyhow::Result<Vec<large_mesh::Churn>> {
        (meshes.iter())
            .map(|m| large_mesh::Churn::start(m, bound))
            .collect()
    };
    let churns = start_churns()?;
    // The fill is a burst (servers writing and compacting, agents taking
    // 10,000 writes) and not what is measured: the steady churn is. Let
    // the machine settle, as every round does, before the first round.
    let (settled, waited, _) = quiet::wait_for_quiet(p.quiet_wait)?;
    out.facts
        .insert("load after settling from the fill".into(), settled);
    out.facts.insert(
        "seconds waited to settle from the fill".into(),
        waited.as_secs_f64(),
    );
    if let Some(rest) = TRIM_SETTLE.checked_sub(filled.elapsed()) {
        std::thread::sleep(rest);
    }
    for (label, pid) in &agents {
        let rss = load::rss_mb(*pid)?;
        out.facts
            .insert(format!("agent RSS with the large view, {label}"), rss);
    }
    // What taking the changes costs each agent, with no request to serve:
    // its CPU over a window of churn alone, per change of its mesh.
    let before = (agents.iter())
        .map(|(_, pid)| load::cpu_seconds(*pid))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    let began = std::time::Instant::now();
    std::thread::sleep(CHURN_ALONE);
    let changes = began.elapsed().as_secs_f64() * large_mesh::CHANGES_PER_SECOND as f64;
    for ((label, pid), before) in agents.iter().zip(before) {
        let used = load::cpu_seconds(*pid)? - before;
        out.facts.insert(
            format!("agent CPU ms per change with no load, {label}"),
            used * 1000.0 / changes,
        );
    }
    for churn in churns {
        churn.finish()?;
    }
    let servers = meshes
        .iter()
        .map(|m| server_pid(m))
        .collect::<anyhow::Result<Vec<u32>>>()?;
    // Each round measures every target with changes arriving, then again
    // with them stopped: the time since the fill and whatever the machine
    // does meanwhile fall on both alike, and the difference is what taking
    // the changes costs (the agents' and the servers').
    let mut made = vec![0.0; meshes.len()];
    let mut late = vec![0.0; meshes.len()];
    let mut server_cpu_ms = vec![0.0; meshes.len()];
    for round in 0..p.large_rounds {
        let churns = start_churns()?;
        let window = Window::start(&servers)?;
        let began = std::time::Instant::now();
        one_round(targets, p, (LARGE, round), out)?;
        let secs = began.elapsed().as_secs_f64();
        let usage = window.finish()?;
        for (i, churn) in churns.into_iter().enumerate() {
            let (m, l) = churn.finish()?;
            made[i] += m;
            late[i] += l;
            server_cpu_ms[i] += usage[i].vcpu * secs * 1000.0;
        }
        one_round(targets, p, (LARGE_STILL, round), out)?;
    }
    for i in 0..meshes.len() {
        out.facts.insert(
            format!("server CPU ms per change during the rounds, mesh {i}"),
            server_cpu_ms[i] / made[i].max(1.0),
        );
        out.notes.push(format!(
            "large mesh {i}: {:.0} changes arrived during its rounds ({:.0} took longer than their tick of {} ms)",
            made[i],
            late[i],
            1000 / large_mesh::CHANGES_PER_SECOND
        ));
    }
    Ok(())
}

/// How long the agents' CPU is read while only the churn runs.
const CHURN_ALONE: Duration = Duration::from_secs(10);

/// `p.large_rounds` rounds of 1000 rps latency and new connections of
/// each of `targets`, the order rotating from round to round, figures keyed
/// `NAME (PHASE): figure`; the load at the start of each round in `out`'s
/// facts.
fn phase_rounds(
    targets: &[&Target],
    p: &Params,
    phase: &str,
    out: &mut LargeRun,
) -> anyhow::Result<()> {
    for round in 0..p.large_rounds {
        one_round(targets, p, (phase, round), out)?;
    }
    Ok(())
}

/// Round `round` of `phase`: 1000 rps latency and new connections of each
/// of `targets`, the order rotating from round to round, figures keyed
/// `NAME (PHASE): figure`; the load at its start in `out`'s facts.
fn one_round(
    targets: &[&Target],
    p: &Params,
    (phase, round): (&str, usize),
    out: &mut LargeRun,
) -> anyhow::Result<()> {
    // The large mesh's churn keeps the machine busy by design: a short
    // wait, and the load recorded.
    let (start, _, _) = quiet::wait_for_quiet(Duration::from_secs(30))?;
    let mut r = Round::new();
    for i in 0..targets.len() {
        let t = targets[(i + round) % targets.len()];
        eprintln!("{phase} round {round}: {}", t.name);
        let mut m = Round::new();
        rate_load(t, p, &mut m)?;
        conn_load(t, p, &mut m)?;
        r.extend(
            m.into_iter()
                .map(|(k, v)| (format!("{} ({phase}): {k}", t.name), v)),
        );
    }
    out.facts.insert(
        format!("load at the start of round {round}, {phase}"),
        start,
    );
    out.rounds.push(r);
    Ok(())
}

/// Every load against `t`, figures keyed `NAME: figure`.
fn measure(
    t: &Target,
    p: &Params,
    script: &std::path::Path,
    same_node: bool,
) -> anyhow::Result<Round> {
    let mut out = Round::new();
    rate_load(t, p, &mut out)?;
    max_load(t, p, script, &mut out)?;
    if !same_node {
        conn_load(t, p, &mut out)?;
    }
    bulk_load(t, p, 1, &mut out)?;
    if !same_node {
        bulk_load(t, p, 8, &mut out)?;
    }
    Ok(out
        .into_iter()
        .map(|(k, v)| (format!("{}: {k}", t.name), v))
        .collect())
}

fn http_workload(mesh: &Mesh, node: weft_tests::mesh::Node, addr: &str) -> anyhow::Result<Proc> {
    let mut cmd = std::process::Command::new(bin("weft-bench-http"));
    cmd.args([addr, BODY_BYTES]);
    let proc = mesh.spawn(node, &mut cmd, &format!("http-{addr}.log"))?;
    let url = format!("http://{addr}/healthz");
    wait_until(
        Duration::from_secs(10),
        &format!("workload at {addr}"),
        || Ok(mesh.curl_with(node, &url, &["-m", "2"]).ok().map(|_| ())),
    )?;
    Ok(proc)
}

fn iperf_server(
    mesh: &Mesh,
    node: weft_tests::mesh::Node,
    ip: &str,
    port: u16,
) -> anyhow::Result<Proc> {
    let mut cmd = std::process::Command::new("iperf3");
    cmd.args(["-s", "-B", ip, "-p", &port.to_string()]);
    mesh.spawn(node, &mut cmd, &format!("iperf-{ip}-{port}.log"))
}

/// A workload of `service` in its cgroup (eBPF mesh: inbound capture guards
/// it, so its readiness is checked through the mesh, by `wait_http`).
fn workload_as(
    mesh: &Mesh,
    node: weft_tests::mesh::Node,
    service: &str,
    args: &[&str],
) -> anyhow::Result<Proc> {
    let mut cmd = mesh.workload_command(node, Some(service), args)?;
    mesh.spawn(node, &mut cmd, &format!("{service}-workload.log"))
}

/// The cross-node services: api (HTTP) and bulk (iperf3) on node B; in the
/// eBPF mesh (`cgroups`) each in its own cgroup, so that its workload is a
/// mesh workload (inbound capture on).
fn node_b_services(spec: MeshSpec, cgroups: bool) -> MeshSpec {
    let service = |name: &str, port: u16| {
        let s = Service::new(name, port).address(MeshSpec::NODE_ADDR);
        if cgroups {
            s.cgroup(name)
        } else {
            s
        }
    };
    spec.node_b(service("api", HTTP_PORT).healthz_check("1s"))
        .node_b(service("bulk", BULK_PORT))
}

fn wait_http(t: &Target) -> anyhow::Result<()> {
    let url = format!("{}healthz", t.url);
    wait_until(
        Duration::from_secs(30),
        &format!("{} reaches {url}", t.name),
        || {
            let out = t.client(
                "curl",
                &["-sS", "--fail", "-m", "2", "-o", "/dev/null", &url].map(String::from),
                2,
            )?;
            Ok(out.success().then_some(()))
        },
    )
}

fn server_pid(mesh: &Mesh) -> anyhow::Result<u32> {
    mesh.server_pid()
        .context("the mesh's server is not running")
}

/// `mesh`'s server at idle priority: in a deployment it runs on a machine
/// of its own (see [`crate::priority`]).
fn control_plane_idle(mesh: &Mesh) -> anyhow::Result<()> {
    crate::priority::make_idle(server_pid(mesh)?)?;
    Ok(())
}

/// A short warm-up: pools, caches, first TLS handshakes.
fn warm_up(t: &Target) -> anyhow::Result<()> {
    let out = t.client("oha", &load::oha_rate_args(&t.url, 200, CONNS, 1), 1)?;
    load::parse_oha(&load::stdout_of("oha", out)?).map(|_| ())
}

pub struct NodeResults {
    pub figures: Vec<Figure>,
    pub sections: Vec<Section>,
    pub extra: Value,
}

/// Measures every configuration for which `wanted(name)` holds.
pub fn run(quick: bool, wanted: &dyn Fn(&str) -> bool) -> anyhow::Result<NodeResults> {
    let p = if quick {
        Params {
            rounds: 3,
            rate_secs: 3,
            max_secs: 2,
            conn_secs: 2,
            bulk_secs: 2,
            quiet_wait: quiet::wait_limit(quick),
            large_rounds: 3,
        }
    } else {
        Params {
            rounds: 5,
            rate_secs: 10,
            max_secs: 5,
            conn_secs: 5,
            bulk_secs: 5,
            quiet_wait: quiet::wait_limit(quick),
            large_rounds: 5,
        }
    };
    let mut notes: Vec<String> = Vec::new();

    // Mesh 1, explicit mode: direct, weft explicit and haproxy.
    let m1 = Mesh::start(node_b_services(
        MeshSpec::new("allow").agent_log(AGENT_LOG).node_a(
            Service::new("web", 8000)
                .upstream("api", UP_HTTP)
                .upstream("bulk", UP_BULK),
        ),
        false,
    ))
    .context("starting the explicit-mode mesh")?;
    control_plane_idle(&m1)?;
    let b1 = m1.ip(NodeB);
    let mut procs: Vec<Proc> = vec![
        http_workload(&m1, NodeB, &format!("{b1}:{HTTP_PORT}"))?,
        iperf_server(&m1, NodeB, &b1, BULK_PORT)?,
    ];
    let agents1 = vec![
        load::agent_pid(&m1.agent_config(NodeA))?,
        load::agent_pid(&m1.agent_config(NodeB))?,
    ];
    let ha = haproxy::start(
        &m1,
        &[
            Route {
                local_port: HA_HTTP,
                tls_port: 9443,
                target: format!("{b1}:{HTTP_PORT}"),
            },
            Route {
                local_port: HA_BULK,
                tls_port: 9444,
                target: format!("{b1}:{BULK_PORT}"),
            },
        ],
        HA_HTTP,
    )?;
    let mut targets = vec![
        Target {
            name: DIRECT,
            mesh: &m1,
            url: format!("http://{b1}:{HTTP_PORT}/"),
            bulk: (b1.clone(), BULK_PORT),
            as_web: false,
            proxies: vec![],
        },
        Target {
            name: EXPLICIT,
            mesh: &m1,
            url: format!("http://127.0.0.1:{UP_HTTP}/"),
            bulk: ("127.0.0.1".into(), UP_BULK),
            as_web: false,
            proxies: agents1,
        },
        Target {
            name: HAPROXY,
            mesh: &m1,
            url: format!("http://127.0.0.1:{HA_HTTP}/"),
            bulk: ("127.0.0.1".into(), HA_BULK),
            as_web: false,
            proxies: ha.pids(),
        },
    ];

    // Mesh 2, eBPF mode: weft eBPF and the same-node fast path.
    let m2 = Mesh::start(node_b_services(
        MeshSpec::new("allow")
            .agent_log(AGENT_LOG)
            .ebpf()
            .node_a(Service::new("web", 8000).cgroup("web"))
            .node_a(
                Service::new("local", LOCAL_HTTP_PORT)
                    .address(MeshSpec::NODE_ADDR)
                    .healthz_check("1s"),
            )
            .node_a(Service::new("bulk-local", LOCAL_BULK_PORT).address(MeshSpec::NODE_ADDR)),
        true,
    ));
    let mut same_node = Vec::new();
    let m2 = match m2 {
        Ok(m) => Some(m),
        Err(e) => {
            eprintln!("the eBPF mesh did not start: {e:#}");
            let cause: String = e
                .root_cause()
                .to_string()
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(300)
                .collect();
            let note = format!(
                "weft eBPF and the same-node fast path were not measured: the eBPF mesh did not start ({cause})"
            );
            notes.push(note);
            None
        }
    };
    if let Some(m2) = &m2 {
        control_plane_idle(m2)?;
        let (a2, b2) = (m2.ip(NodeA), m2.ip(NodeB));
        // api and bulk are mesh workloads (inbound capture guards them); the
        // same-node services stay outside the mesh's cgroups, so that the
        // client outside the mesh can reach them directly for comparison.
        let http = bin("weft-bench-http").display().to_string();
        let api_addr = format!("{b2}:{HTTP_PORT}");
        let bulk_port = BULK_PORT.to_string();
        procs.push(workload_as(
            m2,
            NodeB,
            "api",
            &[&http, &api_addr, BODY_BYTES],
        )?);
        procs.push(workload_as(
            m2,
            NodeB,
            "bulk",
            &["iperf3", "-s", "-B", &b2, "-p", &bulk_port],
        )?);
        procs.push(http_workload(
            m2,
            NodeA,
            &format!("{a2}:{LOCAL_HTTP_PORT}"),
        )?);
        procs.push(iperf_server(m2, NodeA, &a2, LOCAL_BULK_PORT)?);
        let agents2 = vec![
            load::agent_pid(&m2.agent_config(NodeA))?,
            load::agent_pid(&m2.agent_config(NodeB))?,
        ];
        let (api, bulk) = (m2.vip("api")?, m2.vip("bulk")?);
        let (local, bulk_local) = (m2.vip("local")?, m2.vip("bulk-local")?);
        targets.push(Target {
            name: EBPF,
            mesh: m2,
            url: format!("http://{api}:{HTTP_PORT}/"),
            bulk: (bulk, BULK_PORT),
            as_web: true,
            proxies: agents2.clone(),
        });
        same_node.push(Target {
            name: SAME_DIRECT,
            mesh: m2,
            url: format!("http://{a2}:{LOCAL_HTTP_PORT}/"),
            bulk: (a2.clone(), LOCAL_BULK_PORT),
            as_web: false,
            proxies: agents2.clone(),
        });
        same_node.push(Target {
            name: SAME_FAST,
            mesh: m2,
            url: format!("http://{local}:{LOCAL_HTTP_PORT}/"),
            bulk: (bulk_local, LOCAL_BULK_PORT),
            as_web: true,
            proxies: agents2,
        });
    }
    targets.retain(|t| wanted(t.name));
    same_node.retain(|t| wanted(t.name));
    for t in targets.iter().chain(&same_node) {
        wait_http(t)?;
        warm_up(t).with_context(|| format!("warming up {}", t.name))?;
    }
    let script = m1.path("wrk-report.lua");
    std::fs::write(&script, load::WRK_SCRIPT)?;

    let counters = |m: &Mesh| -> (f64, f64) {
        let get = |e: &str| {
            m.metric_with(NodeA, "weft_agent_ebpf_events_total", &[("event", e)])
                .unwrap_or(f64::NAN)
        };
        (get("redirected"), get("fast_path"))
    };
    let before = m2.as_ref().map(counters);

    let mut rounds: Vec<Round> = Vec::new();
    let mut failed: BTreeMap<&str, String> = BTreeMap::new();
    let mut loads: Vec<quiet::RoundLoad> = Vec::new();
    for round in 0..p.rounds {
        let (start, waited, is_quiet) = quiet::wait_for_quiet(p.quiet_wait)?;
        if is_quiet {
            eprintln!(
                "round {round}: load {start:.2} after waiting {:.0} s",
                waited.as_secs_f64()
            );
        } else {
            eprintln!(
                "WARNING round {round}: NOT A QUIET MACHINE, load {start:.2} after waiting {:.0} s; starting anyway",
                waited.as_secs_f64()
            );
        }
        let mut r = Round::new();
        let n = targets.len();
        for i in 0..n {
            let t = &targets[(i + round) % n];
            if failed.contains_key(t.name) {
                continue;
            }
            eprintln!("round {round}: {}", t.name);
            match measure(t, &p, &script, false) {
                Ok(m) => r.extend(m),
                Err(e) => {
                    eprintln!("{}: {e:#}", t.name);
                    failed.insert(t.name, format!("{e:#}"));
                }
            }
        }
        for i in 0..same_node.len() {
            let t = &same_node[(i + round) % same_node.len()];
            if failed.contains_key(t.name) {
                continue;
            }
            eprintln!("round {round}: {}", t.name);
            match measure(t, &p, &script, true) {
                Ok(m) => r.extend(m),
                Err(e) => {
                    eprintln!("{}: {e:#}", t.name);
                    failed.insert(t.name, format!("{e:#}"));
                }
            }
        }
        eprintln!(
            "round {round}: direct p50 {:.0} µs, explicit p50 {:.0} µs, haproxy p50 {:.0} µs, eBPF p50 {:.0} µs",
            r.get("direct: 1000 rps p50").unwrap_or(&f64::NAN),
            r.get("weft explicit: 1000 rps p50").unwrap_or(&f64::NAN),
            r.get("haproxy mTLS: 1000 rps p50").unwrap_or(&f64::NAN),
            r.get("weft eBPF: 1000 rps p50").unwrap_or(&f64::NAN),
        );
        rounds.push(r);
        loads.push(quiet::RoundLoad {
            round,
            start,
            end: quiet::load_average()?,
            waited,
            quiet: is_quiet,
        });
    }
    let (load_table, load_warnings) = quiet::section(&loads, p.quiet_wait);
    for w in &load_warnings {
        eprintln!("WARNING {w}");
    }
    notes.extend(load_warnings);
    for (name, e) in &failed {
        notes.push(format!(
            "{name} failed and was left out of later rounds: {e}"
        ));
    }
    if let (Some(m2), Some((red0, fast0))) = (&m2, before) {
        let (red1, fast1) = counters(m2);
        notes.push(format!(
            "node A's eBPF counters over the rounds: {} connections redirected to the agent, {} took the same-node fast path",
            red1 - red0,
            fast1 - fast0
        ));
        if fast1 - fast0 <= 0.0 {
            notes.push("the same-node client never took the fast path: its figures are the agent's same-node path".into());
        }
    }
    // The large mesh: the same meshes, their servers filled, changes
    // arriving, direct, explicit and eBPF measured again.
    let mut large = LargeRun::default();
    if wanted(LARGE) {
        let meshes: Vec<&Mesh> = std::iter::once(&m1).chain(m2.as_ref()).collect();
        let again: Vec<&Target> = targets
            .iter()
            .filter(|t| [DIRECT, EXPLICIT, EBPF].contains(&t.name) && !failed.contains_key(t.name))
            .collect();
        if let Err(e) = large_mesh_rounds(&meshes, &again, &p, &mut large) {
            eprintln!("large mesh: {e:#}");
            notes.push(format!("the large mesh was not measured in full: {e:#}"));
        }
        notes.append(&mut large.notes);
    }
    rounds.append(&mut large.rounds);
    drop(ha);
    drop(procs);

    // Derived per round: differences and ratios to direct.
    for r in &mut rounds {
        let mut derived = Round::new();
        for (cfg, base) in [
            (EXPLICIT, DIRECT),
            (EBPF, DIRECT),
            (HAPROXY, DIRECT),
            (SAME_FAST, SAME_DIRECT),
        ] {
            for q in ["p50", "p90", "p99", "p99.9"] {
                let k = format!("1000 rps {q}");
                if let (Some(a), Some(b)) = (
                    r.get(&format!("{cfg}: {k}")),
                    r.get(&format!("{base}: {k}")),
                ) {
                    derived.insert(format!("{cfg}: added latency at 1000 rps {q}"), a - b);
                }
            }
            for k in [
                "max rate",
                "new connections",
                "bulk 1 stream",
                "bulk 8 streams",
            ] {
                if let (Some(a), Some(b)) = (
                    r.get(&format!("{cfg}: {k}")),
                    r.get(&format!("{base}: {k}")),
                ) {
                    derived.insert(format!("{cfg}: {k} × {base}"), a / b);
                }
            }
        }
        // The large mesh, within its own rounds.
        for (cfg, phase) in [EXPLICIT, EBPF]
            .into_iter()
            .flat_map(|c| [(c, LARGE), (c, BEFORE_FILL), (c, LARGE_STILL)])
        {
            let (c, d) = (format!("{cfg} ({phase})"), format!("{DIRECT} ({phase})"));
            for q in ["p50", "p99"] {
                let k = format!("1000 rps {q}");
                if let (Some(a), Some(b)) =
                    (r.get(&format!("{c}: {k}")), r.get(&format!("{d}: {k}")))
                {
                    derived.insert(format!("{c}: added latency at 1000 rps {q}"), a - b);
                }
            }
        }
        // Per unit of work: CPU seconds per GB carried, page faults per
        // new connection.
        for cfg in [EXPLICIT, EBPF, HAPROXY] {
            for node in ["A", "B"] {
                for k in ["bulk 1 stream", "bulk 8 streams"] {
                    if let (Some(vcpu), Some(gbit)) = (
                        r.get(&format!("{cfg}: {k}: proxy vCPU node {node}")),
                        r.get(&format!("{cfg}: {k}")),
                    ) {
                        derived.insert(
                            format!("{cfg}: {k}: proxy CPU s per GB node {node}"),
                            vcpu / (gbit / 8.0),
                        );
                    }
                }
                if let (Some(faults), Some(total)) = (
                    r.get(&format!(
                        "{cfg}: new connections: proxy minor faults node {node}"
                    )),
                    r.get(&format!("{cfg}: new connections total")),
                ) {
                    derived.insert(
                        format!("{cfg}: proxy page faults per connection node {node}"),
                        faults / total.max(1.0),
                    );
                }
            }
        }
        if let (Some(a), Some(b)) = (
            r.get(&format!("{EBPF}: new connections")),
            r.get(&format!("{EXPLICIT}: new connections")),
        ) {
            derived.insert(format!("{EBPF}: new connections × {EXPLICIT}"), a / b);
        }
        // The mutual-TLS baseline the data path is held to (issue 17).
        for cfg in [EXPLICIT, EBPF] {
            for k in ["bulk 1 stream", "bulk 8 streams", "new connections"] {
                if let (Some(a), Some(b)) = (
                    r.get(&format!("{cfg}: {k}")),
                    r.get(&format!("{HAPROXY}: {k}")),
                ) {
                    derived.insert(format!("{cfg}: {k} × {HAPROXY}"), a / b);
                }
            }
        }
        r.extend(derived);
    }
    let mut names: Vec<String> = Vec::new();
    for r in &rounds {
        for k in r.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    let order = [DIRECT, EXPLICIT, EBPF, HAPROXY, SAME_DIRECT, SAME_FAST];
    names.sort_by_key(|n| {
        order
            .iter()
            .position(|o| n.starts_with(&format!("{o}:")))
            .unwrap_or(9)
    });
    let figures: Vec<Figure> = names
        .iter()
        .map(|n| {
            let samples: Vec<f64> = rounds.iter().filter_map(|r| r.get(n).copied()).collect();
            let metric = n.split_once(": ").map_or(n.as_str(), |x| x.1);
            let unit = if metric.contains('×') {
                "×"
            } else if metric.contains("added") {
                "µs"
            } else {
                unit_of(metric)
            };
            Figure::new(n.clone(), unit, samples)
        })
        .collect();
    let mut sections = summary(&figures, &targets, &notes);
    sections.push(Section::new("Machine load per round", load_table));
    if wanted(LARGE) {
        sections.push(large_mesh::section(
            &figures,
            &[EXPLICIT, EBPF],
            (BEFORE_FILL, LARGE_STILL),
            &large.facts,
        ));
    }
    let round_load: Vec<Value> = loads.iter().map(quiet::RoundLoad::to_json).collect();
    let extra = json!({ "notes": notes, "configurations": order, "round_load": round_load, "params": {
        "rounds": p.rounds, "rate_rps": RATE, "connections": CONNS, "body_bytes": 1024,
        "rate_secs": p.rate_secs, "max_rate_secs": p.max_secs, "connection_secs": p.conn_secs,
        "bulk_secs": p.bulk_secs } });
    Ok(NodeResults {
        figures,
        sections,
        extra,
    })
}

fn find<'f>(figures: &'f [Figure], name: &str) -> Option<&'f Figure> {
    figures.iter().find(|f| f.name == name)
}

fn med(figures: &[Figure], name: &str, digits: usize) -> String {
    find(figures, name).map_or("–".into(), |f| format!("{:.*}", digits, f.median()))
}

fn spread(figures: &[Figure], name: &str, digits: usize) -> String {
    find(figures, name).map_or("not measured".into(), |f| {
        format!(
            "{:.*} ({:.*} – {:.*})",
            digits,
            f.median(),
            digits,
            f.min(),
            digits,
            f.max()
        )
    })
}

/// The headline tables: ratios to direct, the proxies' cost, the targets.
fn summary(figures: &[Figure], targets: &[Target], notes: &[String]) -> Vec<Section> {
    let mut head = String::from(
        "Medians over the rounds; × is the ratio to direct within a round, + the latency added to direct's.\n\n\
         | configuration | p50 @1000 rps µs | p99 @1000 rps µs | p99.9 @1000 rps µs | max rate req/s | new conn/s | bulk 1 stream Gbit/s | bulk 8 streams Gbit/s | proxy vCPU A / B @1000 rps | proxy peak RSS A / B @1000 rps MB |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut names: Vec<&str> = targets.iter().map(|t| t.name).collect();
    if !names.contains(&EBPF) {
        names.push(EBPF);
    }
    for cfg in names {
        let f = |k: &str, d| med(figures, &format!("{cfg}: {k}"), d);
        let with = |k: &str, d| {
            if cfg == DIRECT {
                f(k, d)
            } else {
                format!("{} (×{})", f(k, d), f(&format!("{k} × direct"), 2))
            }
        };
        let lat = |q: &str| {
            if cfg == DIRECT {
                f(&format!("1000 rps {q}"), 0)
            } else {
                format!(
                    "{} (+{})",
                    f(&format!("1000 rps {q}"), 0),
                    f(&format!("added latency at 1000 rps {q}"), 0)
                )
            }
        };
        head += &format!(
            "| {cfg} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} / {} |\n",
            lat("p50"),
            lat("p99"),
            lat("p99.9"),
            with("max rate", 0),
            with("new connections", 0),
            with("bulk 1 stream", 2),
            with("bulk 8 streams", 2),
            f("at 1000 rps: proxy vCPU node A", 3),
            f("at 1000 rps: proxy vCPU node B", 3),
            f("at 1000 rps: proxy peak RSS node A", 1),
            f("at 1000 rps: proxy peak RSS node B", 1),
        );
    }

    let mut same =
        String::from("| | direct | fast path | fast path × direct |\n|---|---|---|---|\n");
    for (k, d) in [("max rate", 0), ("bulk 1 stream", 2)] {
        same += &format!(
            "| {k} | {} | {} | {} |\n",
            med(figures, &format!("{SAME_DIRECT}: {k}"), d),
            med(figures, &format!("{SAME_FAST}: {k}"), d),
            med(figures, &format!("{SAME_FAST}: {k} × {SAME_DIRECT}"), 2),
        );
    }
    same += &format!(
        "| p50 / p99 @1000 rps µs | {} / {} | {} / {} | +{} / +{} µs |\n",
        med(figures, &format!("{SAME_DIRECT}: 1000 rps p50"), 0),
        med(figures, &format!("{SAME_DIRECT}: 1000 rps p99"), 0),
        med(figures, &format!("{SAME_FAST}: 1000 rps p50"), 0),
        med(figures, &format!("{SAME_FAST}: 1000 rps p99"), 0),
        med(
            figures,
            &format!("{SAME_FAST}: added latency at 1000 rps p50"),
            0
        ),
        med(
            figures,
            &format!("{SAME_FAST}: added latency at 1000 rps p99"),
            0
        ),
    );

    let mut tgt = String::from(
        "Median (min – max) over the rounds. Agent figures: the larger of node A's and node B's agent.\n\n\
         | target | configuration | measured | met |\n|---|---|---|---|\n",
    );
    for cfg in [EXPLICIT, EBPF] {
        for (q, limit) in [("p50", 40.0), ("p99", 120.0)] {
            let name = format!("{cfg}: added latency at 1000 rps {q}");
            tgt += &format!(
                "| cross-node added latency at 1000 rps {q} ≤ {limit} µs | {cfg} | {} µs | {} |\n",
                spread(figures, &name, 0),
                met(find(figures, &name), &|v| v <= limit)
            );
        }
        for (what, key, limit, unit) in [
            (
                "agent CPU at 1000 rps ≤ 0.03 vCPU",
                "proxy vCPU",
                0.03,
                "vCPU",
            ),
            (
                "agent peak RSS at 1000 rps ≤ 10 MB",
                "proxy peak RSS",
                10.0,
                "MB",
            ),
        ] {
            let worst = worst_of(
                figures,
                &format!("{cfg}: at 1000 rps: {key} node A"),
                &format!("{cfg}: at 1000 rps: {key} node B"),
            );
            let digits = if unit == "MB" { 1 } else { 3 };
            tgt += &format!(
                "| {what} | {cfg} | {} {unit} | {} |\n",
                worst.as_ref().map_or("not measured".into(), |f| format!(
                    "{:.*} ({:.*} – {:.*})",
                    digits,
                    f.median(),
                    digits,
                    f.min(),
                    digits,
                    f.max()
                )),
                met(worst.as_ref(), &|v| v <= limit)
            );
        }
        let name = format!("{cfg}: bulk 1 stream × direct");
        tgt += &format!(
            "| one-stream bulk ≥ 0.6 × direct | {cfg} | {} × | {} |\n",
            spread(figures, &name, 2),
            met(find(figures, &name), &|v| v >= 0.6)
        );
    }
    for k in ["bulk 1 stream", "max rate"] {
        let name = format!("{SAME_FAST}: {k} × {SAME_DIRECT}");
        tgt += &format!(
            "| same-node fast path ≥ 0.95 × direct ({k}) | {EBPF} | {} × | {} |\n",
            spread(figures, &name, 2),
            met(find(figures, &name), &|v| v >= 0.95)
        );
    }
    let mut sections = vec![
        Section::new("Headline: each configuration next to direct", head),
        Section::new("Same node: fast path vs direct", same),
        Section::new("Targets (issue 7)", tgt),
        Section::new(
            "Targets (issue 17): against HAProxy",
            issue17_targets(figures),
        ),
    ];
    if !notes.is_empty() {
        sections.push(Section::new(
            "Notes from this run",
            notes.iter().map(|n| format!("- {n}\n")).collect::<String>(),
        ));
    }
    sections
}

/// Issue 17's targets: bulk against HAProxy's mutual TLS in the same
/// rounds, CPU per GB, eBPF mode's new connections against explicit mode's
/// and page faults per connection.
fn issue17_targets(figures: &[Figure]) -> String {
    let mut t = String::from(
        "Median (min – max) over the rounds; ratios within a round. CPU per GB: the larger of node A's and node B's proxy.\n\n\
         | target | configuration | measured | met |\n|---|---|---|---|\n",
    );
    for cfg in [EXPLICIT, EBPF] {
        for (k, limit) in [("bulk 1 stream", 1.5), ("bulk 8 streams", 1.4)] {
            let name = format!("{cfg}: {k} × {HAPROXY}");
            t += &format!(
                "| {k} ≥ {limit} × HAProxy | {cfg} | {} × | {} |\n",
                spread(figures, &name, 2),
                met(find(figures, &name), &|v| v >= limit)
            );
        }
        for k in ["bulk 1 stream", "bulk 8 streams"] {
            let ours = worst_of(
                figures,
                &format!("{cfg}: {k}: proxy CPU s per GB node A"),
                &format!("{cfg}: {k}: proxy CPU s per GB node B"),
            );
            let theirs = worst_of(
                figures,
                &format!("{HAPROXY}: {k}: proxy CPU s per GB node A"),
                &format!("{HAPROXY}: {k}: proxy CPU s per GB node B"),
            );
            let show = |f: &Option<Figure>| {
                f.as_ref().map_or("not measured".to_string(), |f| {
                    format!("{:.2} ({:.2} – {:.2})", f.median(), f.min(), f.max())
                })
            };
            let met = match (&ours, &theirs) {
                (Some(o), Some(h)) if !o.samples.is_empty() && !h.samples.is_empty() => {
                    if o.median() < h.median() {
                        "yes"
                    } else {
                        "**no**"
                    }
                }
                _ => "not measured",
            };
            t += &format!(
                "| CPU s per GB ({k}) below HAProxy's | {cfg} | {} vs HAProxy {} | {met} |\n",
                show(&ours),
                show(&theirs)
            );
        }
        let faults = worst_of(
            figures,
            &format!("{cfg}: proxy page faults per connection node A"),
            &format!("{cfg}: proxy page faults per connection node B"),
        );
        t += &format!(
            "| about zero page faults per new connection (≤ 0.5) | {cfg} | {} | {} |\n",
            faults
                .as_ref()
                .map_or("not measured".to_string(), |f| format!(
                    "{:.2} ({:.2} – {:.2})",
                    f.median(),
                    f.min(),
                    f.max()
                )),
            met(faults.as_ref(), &|v| v <= 0.5)
        );
    }
    let name = format!("{EBPF}: new connections × {EXPLICIT}");
    t += &format!(
        "| new connections ≥ explicit mode's | {EBPF} | {} × | {} |\n",
        spread(figures, &name, 2),
        met(find(figures, &name), &|v| v >= 1.0)
    );
    t
}

/// Whether the median of `f` meets `ok`, as a table cell.
fn met(f: Option<&Figure>, ok: &dyn Fn(f64) -> bool) -> &'static str {
    match f {
        Some(f) if !f.samples.is_empty() => {
            if ok(f.median()) {
                "yes"
            } else {
                "**no**"
            }
        }
        _ => "not measured",
    }
}

/// Per round, the larger of two figures.
fn worst_of(figures: &[Figure], a: &str, b: &str) -> Option<Figure> {
    let (a, b) = (find(figures, a)?, find(figures, b)?);
    let samples = a
        .samples
        .iter()
        .zip(&b.samples)
        .map(|(x, y)| x.max(*y))
        .collect();
    Some(Figure::new("worst", a.unit, samples))
}
