//! A two-node mesh for end-to-end tests and benchmarks: two network
//! namespaces, "node A" (`10.77.X.2/24`) and "node B" (`10.77.X.3/24`), joined
//! by one veth pair, loopback up and no default route. One `weft-server` runs
//! in node A on `10.77.X.2`, and a `weft-agent` (explicit mode, `ebpf =
//! false`) in each node, with its admin on `127.0.0.1:15020` and its local
//! HTTP API on `127.0.0.1:8500` of its own namespace. Workloads (`weft-workload`), `curl`, `tcpdump` and the `weft`
//! CLI run inside either namespace.
//!
//! With [`MeshSpec::ebpf`] the agents run in transparent mode instead: each
//! gets its own `cgroup_root` (`<cgroup2 mount>/weft-<unique>/{a,b}`: two
//! agents on one kernel must not share a subtree) and serves DNS on
//! `127.0.0.1:53` of its node; services with a [`Service::cgroup`] are mesh
//! workloads, and [`Mesh::exec_as`] runs a command as one (through
//! `weft-agent exec`), resolving `NAME.service.weft` through the agent.
//!
//! Everything is torn down on drop, also when a test fails: processes are
//! killed (and also die with the thread that started them), the cgroup
//! subtree is emptied (`cgroup.kill`) and removed, namespaces are deleted,
//! and the temporary directory with configs and logs is removed (after the
//! tails of the logs are printed when the thread is panicking).
//!
//! ```ignore
//! let mesh = Mesh::start(MeshSpec::new("allow")
//!     .node_a(Service::new("web", 8000).upstream("api", 9191))
//!     .node_b(Service::new("api", 8080).address(MeshSpec::B_ADDR)))?;
//! mesh.workload(Node::B, "api", "0.0.0.0:8080")?;
//! let body = mesh.curl(Node::A, "http://127.0.0.1:9191/")?;
//!
//! // Transparent:
//! let mut mesh = Mesh::start(MeshSpec::new("allow").ebpf()
//!     .node_a(Service::new("web", 8000).cgroup("web"))
//!     .node_b(Service::new("api", 8080).address(MeshSpec::NODE_ADDR)))?;
//! mesh.workload(Node::B, "api", &format!("{}:8080", mesh.ip(Node::B)))?;
//! let body = mesh.curl_as(Node::A, "web", "http://api.service.weft:8080/", &[])?;
//! ```
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

use crate::cgroup::TestCgroup;
use crate::leftovers::ScratchDir;
use crate::netns::Netns;
use crate::servers::bin;

/// One of the two nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    A,
    B,
}

pub use Node::{A as NodeA, B as NodeB};

impl Node {
    fn index(self) -> usize {
        match self {
            Node::A => 0,
            Node::B => 1,
        }
    }
    fn label(self) -> &'static str {
        match self {
            Node::A => "a",
            Node::B => "b",
        }
    }
    /// The node's name in the catalog: `node-a`, `node-b`.
    pub fn node_name(self) -> &'static str {
        match self {
            Node::A => "node-a",
            Node::B => "node-b",
        }
    }
}

/// The name of the veth end inside each namespace.
pub const VETH: &str = "weft0";
/// The agents' admin address inside their namespaces.
pub const ADMIN: &str = "127.0.0.1:15020";
/// The same port on every address ([`MeshSpec::admin_on_every_address`]).
pub const ADMIN_ANYWHERE: &str = "0.0.0.0:15020";
/// The agents' local HTTP API (`http_addr`) inside their namespaces.
pub const AGENT_HTTP: &str = "127.0.0.1:8500";
/// The agents' inbound (HBONE) port.
pub const INBOUND_PORT: u16 = 15008;
/// The server's gRPC port on node A.
pub const GRPC_PORT: u16 = 8502;

/// A `[[service]]` block of an agent's configuration.
#[derive(Debug, Clone)]
pub struct Service {
    pub id: Option<String>,
    pub name: String,
    pub port: u16,
    /// `None`: the agent's default (127.0.0.1). `"NODE"` is replaced by the
    /// node's own address.
    pub address: Option<String>,
    /// An HTTP check URL (`NODE` replaced as in `address`).
    pub http_check: Option<String>,
    pub check_interval: String,
    /// The check's `deregister_critical_service_after`.
    pub deregister_after: Option<String>,
    pub upstreams: Vec<(String, u16)>,
    /// The workload's cgroup, relative to the agent's `cgroup_root`
    /// (transparent meshes, [`MeshSpec::ebpf`]).
    pub cgroup: Option<String>,
    /// The instance's `meta` (resolver subsets filter on it).
    pub meta: Vec<(String, String)>,
    /// TTL checks: `(ttl, id)` each ([`Service::ttl_check`]).
    pub ttl_checks: Vec<(String, Option<String>)>,
    /// The instance's `tags`.
    pub tags: Vec<String>,
}

impl Service {
    pub fn new(name: &str, port: u16) -> Self {
        Service {
            id: None,
            name: name.to_string(),
            port,
            address: None,
            http_check: None,
            check_interval: "1s".into(),
            deregister_after: None,
            upstreams: Vec::new(),
            cgroup: None,
            meta: Vec::new(),
            ttl_checks: Vec::new(),
            tags: Vec::new(),
        }
    }
    /// A TTL check of `ttl` (`"2s"`), with check id `id` (None: Consul's
    /// default, `service:<service id>`, or `service:<service id>:<n>` when
    /// the service has several checks).
    pub fn ttl_check(mut self, ttl: &str, id: Option<&str>) -> Self {
        self.ttl_checks
            .push((ttl.to_string(), id.map(str::to_string)));
        self
    }
    /// The HTTP check's `deregister_critical_service_after` (with
    /// [`Service::healthz_check`]).
    pub fn deregister_critical_after(mut self, after: &str) -> Self {
        self.deregister_after = Some(after.to_string());
        self
    }
    /// One tag of the instance.
    pub fn tag(mut self, tag: &str) -> Self {
        self.tags.push(tag.to_string());
        self
    }
    /// One `meta` entry of the instance.
    pub fn meta(mut self, key: &str, value: &str) -> Self {
        self.meta.push((key.to_string(), value.to_string()));
        self
    }
    pub fn id(mut self, id: &str) -> Self {
        self.id = Some(id.to_string());
        self
    }
    /// The workload's address; `"NODE"` stands for the node's veth address.
    pub fn address(mut self, address: &str) -> Self {
        self.address = Some(address.to_string());
        self
    }
    /// An HTTP check of `http://ADDRESS:PORT/healthz` every `interval`.
    pub fn healthz_check(mut self, interval: &str) -> Self {
        let host = self.address.clone().unwrap_or_else(|| "127.0.0.1".into());
        // An IPv6 address goes in brackets in a URL.
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        self.http_check = Some(format!("http://{host}:{}/healthz", self.port));
        self.check_interval = interval.to_string();
        self
    }
    pub fn upstream(mut self, name: &str, local_port: u16) -> Self {
        self.upstreams.push((name.to_string(), local_port));
        self
    }
    /// The workload's cgroup (`"web"`), relative to the node's cgroup root:
    /// in a transparent mesh the agent intercepts what processes there
    /// connect to ([`Mesh::exec_as`] runs a command there).
    pub fn cgroup(mut self, relative: &str) -> Self {
        self.cgroup = Some(relative.to_string());
        self
    }

    /// The block as written into an agent configuration on `node_ip`.
    pub fn toml(&self, node_ip: &str) -> String {
        let subst = |s: &str| s.replace("NODE", node_ip);
        let mut t = String::from("\n[[service]]\n");
        if let Some(id) = &self.id {
            t += &format!("id = {id:?}\n");
        }
        t += &format!("name = {:?}\nport = {}\n", self.name, self.port);
        if let Some(a) = &self.address {
            t += &format!("address = {:?}\n", subst(a));
        }
        if let Some(cg) = &self.cgroup {
            t += &format!("cgroup = {cg:?}\n");
        }
        if !self.tags.is_empty() {
            t += &format!("tags = {:?}\n", self.tags);
        }
        if !self.meta.is_empty() {
            let pairs: Vec<String> = self
                .meta
                .iter()
                .map(|(k, v)| format!("{k} = {v:?}"))
                .collect();
            t += &format!("meta = {{ {} }}\n", pairs.join(", "));
        }
        if let Some(url) = &self.http_check {
            t += &format!(
                "  [[service.check]]\n  http = {:?}\n  interval = {:?}\n  timeout = \"500ms\"\n",
                subst(url),
                self.check_interval
            );
            if let Some(after) = &self.deregister_after {
                t += &format!("  deregister_critical_service_after = {after:?}\n");
            }
        }
        for (ttl, id) in &self.ttl_checks {
            t += &format!("  [[service.check]]\n  ttl = {ttl:?}\n");
            if let Some(id) = id {
                t += &format!("  id = {id:?}\n");
            }
        }
        for (name, port) in &self.upstreams {
            t += &format!("  [[service.upstream]]\n  name = {name:?}\n  local_port = {port}\n");
        }
        t
    }
}

/// What to run: the services each agent registers, the server's default
/// intention, and whether to start the agents at once.
#[derive(Debug, Clone)]
pub struct MeshSpec {
    pub a: Vec<Service>,
    pub b: Vec<Service>,
    pub default_intention: String,
    pub start_agents: bool,
    /// Extra lines for both agents' TOML (top-level fields).
    pub agent_extra: String,
    /// Transparent interception ([`MeshSpec::ebpf`]).
    pub ebpf: bool,
    /// Extra `weft-server` flags ([`MeshSpec::server_arg`]).
    pub server_args: Vec<String>,
    /// The agents' admin port on every address of their node, not only
    /// loopback ([`MeshSpec::admin_on_every_address`]).
    pub admin_anywhere: bool,
    /// The agents' `RUST_LOG` ([`MeshSpec::agent_log`]).
    pub agent_log: String,
}

impl MeshSpec {
    /// Stands for the node's own veth address in [`Service::address`].
    pub const NODE_ADDR: &'static str = "NODE";

    pub fn new(default_intention: &str) -> Self {
        MeshSpec {
            a: Vec::new(),
            b: Vec::new(),
            default_intention: default_intention.to_string(),
            start_agents: true,
            agent_extra: String::new(),
            ebpf: false,
            server_args: Vec::new(),
            admin_anywhere: false,
            agent_log: AGENT_LOG.to_string(),
        }
    }

    /// The agents' `RUST_LOG` filter instead of [`AGENT_LOG`] (tests read
    /// the agents' debug lines; a benchmark runs them as an operator
    /// would, at `info`).
    pub fn agent_log(mut self, filter: &str) -> Self {
        self.agent_log = filter.to_string();
        self
    }

    /// Both agents serve their admin port (metrics) on `0.0.0.0:15020`, so
    /// that the other node can scrape them.
    pub fn admin_on_every_address(mut self) -> Self {
        self.admin_anywhere = true;
        self
    }
    pub fn node_a(mut self, s: Service) -> Self {
        self.a.push(s);
        self
    }
    pub fn node_b(mut self, s: Service) -> Self {
        self.b.push(s);
        self
    }
    /// An extra `weft-server` flag, e.g. `--leaf-ttl=10s`.
    pub fn server_arg(mut self, arg: &str) -> Self {
        self.server_args.push(arg.to_string());
        self
    }
    pub fn without_agents(mut self) -> Self {
        self.start_agents = false;
        self
    }
    /// Transparent mode: both agents run with `ebpf = true`, each with its
    /// own `cgroup_root` (a unique subtree of the cgroup2 mount, removed with
    /// the mesh), and serve DNS on `127.0.0.1:53` of their node, which
    /// [`Mesh::exec_as`] and [`Mesh::run_with_mesh_dns`] use as resolver.
    /// Give services a [`Service::cgroup`] to make them mesh workloads.
    pub fn ebpf(mut self) -> Self {
        self.ebpf = true;
        self
    }
}

/// The agents' `RUST_LOG` in tests: their own debug lines, which some
/// tests wait for.
pub const AGENT_LOG: &str = "info,weft_agent=debug";

/// The agents' DNS address in transparent meshes (the resolver of commands
/// run with [`Mesh::exec_as`]).
pub const EBPF_DNS: &str = "127.0.0.1:53";

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` in `netns`, its stdout and stderr appended to `log`.
    pub fn spawn_in(netns: &Netns, cmd: &mut Command, log: PathBuf) -> anyhow::Result<Proc> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let _ns = in_netns(cmd, netns)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {:?} in {}", cmd.get_program(), netns.name()))?;
        Ok(Proc {
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `Some(status)` once it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `limit` for the process to exit by itself: its status,
    /// or `None` if it still runs.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` and waits up to `limit` for the exit; SIGKILLs after that.
    /// Returns the exit status, or `None` if it had to be killed.
    pub fn stop(&mut self, signal: i32, limit: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Makes `cmd` start inside `netns`, and die with the thread that spawns it.
pub fn in_netns(cmd: &mut Command, netns: &Netns) -> anyhow::Result<std::fs::File> {
    let file = std::fs::File::open(netns.path()).context("opening netns")?;
    let fd = file.as_raw_fd();
    // SAFETY: only async-signal-safe calls on an fd the caller keeps open
    // until the spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(file)
}

/// What a bounded command produced.
#[derive(Debug)]
pub struct Output {
    /// `None`: killed at the time limit.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Exit code, stdout and stderr in one line, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "exit {:?}, stdout {:?}, stderr {:?}",
            self.code(),
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }
}

/// Runs `cmd` to completion, killing it after `limit`.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> anyhow::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let pipe = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut s);
            }
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = pipe(child.stdout.take().map(|r| Box::new(r) as _));
    let err = pipe(child.stderr.take().map(|r| Box::new(r) as _));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Calls `f` until it returns `Some`, at most for `limit` (and at most 10 000
/// times, 50 ms apart); the error names `what` and `f`'s last error.
pub fn wait_until<T>(
    limit: Duration,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + limit;
    let mut last = String::from("no attempt");
    for _ in 0..10_000 {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => last = "not yet".into(),
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what}: not within {limit:?} (last: {last})")
}

/// The sum of every sample of metric `name` (all label sets) in a Prometheus
/// text exposition; 0 when absent.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name).then(|| value.parse::<f64>().ok())?
        })
        .sum::<f64>()
        + 0.0 // an empty sum is -0.0
}

/// [`metric_sum`] over the samples whose labels include every `labels`
/// pair (`key="value"`).
pub fn metric_sum_with(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            let matches = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}={v:?}")));
            (metric == name && matches).then(|| value.parse::<f64>().ok())?
        })
        .sum::<f64>()
        + 0.0
}

/// Names resolve through the agent only when glibc asks DNS for hosts.
fn warn_unless_hosts_use_dns() {
    let Ok(nsswitch) = std::fs::read_to_string("/etc/nsswitch.conf") else {
        return; // glibc's default includes dns
    };
    let hosts = nsswitch
        .lines()
        .find(|l| l.trim_start().starts_with("hosts:"));
    if hosts.is_some_and(|l| !l.split_whitespace().any(|w| w == "dns")) {
        eprintln!(
            "warning: /etc/nsswitch.conf's hosts line has no `dns`: NAME.service.weft \
             will not resolve through the agents"
        );
    }
}

static NEXT_MESH: AtomicU32 = AtomicU32::new(0);

/// Writes `text` to a new file readable by its owner only.
fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

pub struct Mesh {
    subnet: u8,
    // Field order is drop order: processes first, then cgroups, then
    // namespaces, then files.
    agents: [Option<Proc>; 2],
    workloads: Vec<Proc>,
    /// Behind a lock so that a test can kill and restart the server while
    /// other threads send requests through the mesh.
    server: std::sync::Mutex<Option<Proc>>,
    /// The server's arguments, to restart it as it was.
    server_args: Vec<String>,
    /// The agents' `RUST_LOG`.
    agent_log: String,
    /// A transparent mesh's cgroup subtree (`<cgroup2 mount>/<unique>`,
    /// one `a`/`b` below it per node): on drop the agents' eBPF pins are
    /// removed, every process in it is killed and the directories go.
    cgroups: Option<TestCgroup>,
    netns: [Netns; 2],
    dir: ScratchDir,
    /// The management token's secret (the server's ACLs are bootstrapped
    /// at start).
    pub token: String,
}

impl Mesh {
    /// Builds the two nodes, starts the server (waiting for it to lead) and,
    /// unless told otherwise, both agents (waiting for their `/healthz`).
    pub fn start(spec: MeshSpec) -> anyhow::Result<Mesh> {
        let n = NEXT_MESH.fetch_add(1, Ordering::SeqCst);
        let subnet = ((std::process::id() + n * 37) % 250 + 1) as u8;
        let base = crate::unique_name(&format!("m{n}"));
        let netns = [
            Netns::new(&format!("{base}a"))?,
            Netns::new(&format!("{base}b"))?,
        ];
        let dir = ScratchDir::new("weft-mesh-")?;
        let cgroups = if spec.ebpf {
            warn_unless_hosts_use_dns();
            Some(TestCgroup::under_root(&format!("weft-{base}"))?)
        } else {
            None
        };
        let mut mesh = Mesh {
            subnet,
            agents: [None, None],
            workloads: Vec::new(),
            server: std::sync::Mutex::new(None),
            server_args: Vec::new(),
            agent_log: spec.agent_log.clone(),
            cgroups,
            netns,
            dir,
            token: String::new(),
        };
        std::fs::write(
            mesh.resolv_conf(),
            "nameserver 127.0.0.1\noptions timeout:1 attempts:2\n",
        )?;
        mesh.netns[0].ip(&[
            "link",
            "add",
            VETH,
            "type",
            "veth",
            "peer",
            "name",
            VETH,
            "netns",
            &mesh.netns[1].path().display().to_string(),
        ])?;
        for node in [Node::A, Node::B] {
            let ns = mesh.netns(node);
            ns.ip(&["addr", "add", &format!("{}/24", mesh.ip(node)), "dev", VETH])?;
            ns.ip(&["link", "set", VETH, "up"])?;
        }
        mesh.start_server(&spec.default_intention, &spec.server_args)?;
        for (node, services) in [(Node::A, &spec.a), (Node::B, &spec.b)] {
            let ip = mesh.ip(node);
            let transparent = match mesh.cgroup_root(node) {
                Some(root) => format!(
                    "ebpf = true\ncgroup_root = {:?}\ndns_addr = {EBPF_DNS:?}\n",
                    root.display().to_string()
                ),
                None => "ebpf = false\n".to_string(),
            };
            let token_file = mesh.agent_token(node, services)?;
            let mut toml = format!(
                "node_name = {:?}\ndatacenter = \"dc1\"\nservers = [\"{}:{GRPC_PORT}\"]\n\
                 advertise_addr = {ip:?}\ndata_dir = {:?}\n{transparent}\
                 admin_addr = {:?}\nhttp_addr = {AGENT_HTTP:?}\ntoken_file = {:?}\nca_file = {:?}\n{}\n",
                node.node_name(),
                mesh.ip(Node::A),
                mesh.agent_data_dir(node),
                if spec.admin_anywhere { ADMIN_ANYWHERE } else { ADMIN },
                token_file.display().to_string(),
                mesh.path("ca.pem").display().to_string(),
                spec.agent_extra,
            );
            for s in services {
                toml += &s.toml(&ip);
            }
            std::fs::write(mesh.agent_config(node), toml)?;
        }
        if spec.start_agents {
            mesh.start_agent(Node::A)?;
            mesh.start_agent(Node::B)?;
            mesh.wait_agent_ready(Node::A, Duration::from_secs(20))?;
            mesh.wait_agent_ready(Node::B, Duration::from_secs(20))?;
        }
        Ok(mesh)
    }

    /// The node's veth address, `10.77.X.2` or `10.77.X.3`.
    pub fn ip(&self, node: Node) -> String {
        format!("10.77.{}.{}", self.subnet, node.index() + 2)
    }

    pub fn netns(&self, node: Node) -> &Netns {
        &self.netns[node.index()]
    }

    /// A path in the mesh's temporary directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Makes node's agent token (its node identity and a service identity
    /// per service it runs) and writes it to a 0600 file; returns the path.
    fn agent_token(&self, node: Node, services: &[Service]) -> anyhow::Result<PathBuf> {
        let identity = format!("{}:dc1", node.node_name());
        let mut args = vec![
            "--format",
            "json",
            "acl",
            "token",
            "create",
            "--description",
            "agent",
            "--node-identity",
            &identity,
        ];
        let mut names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
        names.sort();
        names.dedup();
        for name in &names {
            args.extend(["--service-identity", name]);
        }
        let v: serde_json::Value = serde_json::from_str(&self.weft(&args)?)?;
        let secret = v["secret_id"]
            .as_str()
            .context("token create printed no secret_id")?;
        let path = self.path(&format!("agent-{}.token", node.label()));
        write_private(&path, secret)?;
        let accessor = v["accessor_id"]
            .as_str()
            .context("token create printed no accessor_id")?;
        std::fs::write(
            self.path(&format!("agent-{}.accessor", node.label())),
            accessor,
        )?;
        Ok(path)
    }

    /// Makes a token with a service identity for each of `services` (write
    /// on them, read on all services and nodes); returns its secret.
    pub fn service_token(&self, services: &[&str]) -> anyhow::Result<String> {
        let mut args = vec!["--format", "json", "acl", "token", "create"];
        args.extend(["--description", "workload"]);
        for s in services {
            args.extend(["--service-identity", s]);
        }
        let v: serde_json::Value = serde_json::from_str(&self.weft(&args)?)?;
        v["secret_id"]
            .as_str()
            .map(String::from)
            .context("token create printed no secret_id")
    }

    /// Lets node's agent token act for `services` too (its secret stays),
    /// as an operator does before adding services to an agent's file.
    pub fn grant_agent_services(&self, node: Node, services: &[&str]) -> anyhow::Result<()> {
        let accessor =
            std::fs::read_to_string(self.path(&format!("agent-{}.accessor", node.label())))?;
        let token = self.weft_json(&["acl", "token", "read", &accessor])?;
        let mut names: Vec<String> = token["service_identities"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        names.extend(services.iter().map(|s| s.to_string()));
        let identity = format!("{}:dc1", node.node_name());
        let mut args = vec![
            "acl",
            "token",
            "update",
            &accessor,
            "--node-identity",
            &identity,
        ];
        for name in &names {
            args.extend(["--service-identity", name.as_str()]);
        }
        self.weft(&args)?;
        Ok(())
    }

    pub fn agent_config(&self, node: Node) -> PathBuf {
        self.path(&format!("agent-{}.toml", node.label()))
    }

    /// node's agent's `data_dir` (what it keeps across restarts).
    pub fn agent_data_dir(&self, node: Node) -> PathBuf {
        self.path(&format!("agent-{}-data", node.label()))
    }

    /// Whether the agents run in transparent mode ([`MeshSpec::ebpf`]).
    pub fn is_ebpf(&self) -> bool {
        self.cgroups.is_some()
    }

    /// Node's `cgroup_root` in a transparent mesh (the agent creates it).
    pub fn cgroup_root(&self, node: Node) -> Option<PathBuf> {
        self.cgroups.as_ref().map(|c| c.path().join(node.label()))
    }

    /// The `resolv.conf` that commands run by [`Mesh::exec_as`] and
    /// [`Mesh::run_with_mesh_dns`] see (`nameserver 127.0.0.1`: the node's
    /// agent).
    pub fn resolv_conf(&self) -> PathBuf {
        self.path("resolv.conf")
    }

    /// The command that runs `args` in `node` with the agent's DNS as the
    /// resolver: with `service`, `weft-agent exec`, which puts it in that
    /// service's cgroup and gives it the agent's resolver itself; without,
    /// a private mount namespace where the mesh's `resolv.conf` is bound
    /// over `/etc/resolv.conf`.
    pub fn workload_command(
        &self,
        node: Node,
        service: Option<&str>,
        args: &[&str],
    ) -> anyhow::Result<Command> {
        self.workload_command_as(node, service, None, args)
    }

    /// [`Mesh::workload_command`], run as `user` (`weft-agent exec
    /// --user`) when given.
    pub fn workload_command_as(
        &self,
        node: Node,
        service: Option<&str>,
        user: Option<&str>,
        args: &[&str],
    ) -> anyhow::Result<Command> {
        let (program, rest) = args.split_first().context("no command given")?;
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(service) = service {
            if !self.is_ebpf() {
                bail!("running as service {service}: the mesh is not in eBPF mode");
            }
            argv.push(bin("weft-agent").into());
            argv.extend(["exec".into(), "--config".into()]);
            argv.push(self.agent_config(node).into());
            argv.extend(["--service".into(), service.into()]);
            if let Some(user) = user {
                argv.extend(["--user".into(), user.into()]);
            }
            argv.push("--".into());
            argv.push(program.into());
        } else {
            let script = format!(
                "mount --bind {} /etc/resolv.conf && exec \"$@\"",
                self.resolv_conf().display()
            );
            argv.extend(["unshare", "-m", "sh", "-c", &script, "sh", program].map(Into::into));
        }
        argv.extend(rest.iter().map(Into::into));
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        Ok(cmd)
    }

    /// Runs `args` as a workload of `service` (in its cgroup, through
    /// `weft-agent exec`) in `node`, resolving names through the node's agent
    /// ([`Mesh::workload_command`]), bounded by `limit`.
    pub fn exec_as_with(
        &self,
        node: Node,
        service: &str,
        args: &[&str],
        limit: Duration,
    ) -> anyhow::Result<Output> {
        self.run_in(
            node,
            self.workload_command(node, Some(service), args)?,
            limit,
        )
    }

    /// Runs `cmd` in `node`'s network namespace, bounded by `limit`.
    fn run_in(&self, node: Node, mut cmd: Command, limit: Duration) -> anyhow::Result<Output> {
        let _ns = in_netns(&mut cmd, self.netns(node))?;
        run_bounded(&mut cmd, limit)
    }

    /// Runs `args` as a workload of `service` in `node` as `user`
    /// (`weft-agent exec --user`), bounded by 15 s.
    pub fn exec_as_user(
        &self,
        node: Node,
        service: &str,
        user: &str,
        args: &[&str],
    ) -> anyhow::Result<Output> {
        let cmd = self.workload_command_as(node, Some(service), Some(user), args)?;
        self.run_in(node, cmd, Duration::from_secs(15))
    }

    /// [`Mesh::exec_as_with`] with a 15 s limit:
    /// `mesh.exec_as(NodeA, "web", &["curl", "-sS", "http://api.service.weft:8080/"])`.
    pub fn exec_as(&self, node: Node, service: &str, args: &[&str]) -> anyhow::Result<Output> {
        self.exec_as_with(node, service, args, Duration::from_secs(15))
    }

    /// Runs `args` in `node` outside every mesh cgroup, resolving names
    /// through the node's agent, bounded by `limit`.
    pub fn run_with_mesh_dns(
        &self,
        node: Node,
        args: &[&str],
        limit: Duration,
    ) -> anyhow::Result<Output> {
        self.run_in(node, self.workload_command(node, None, args)?, limit)
    }

    /// `GET url` with curl as a workload of `service` (5 s limit, names
    /// resolved by the node's agent): the body of a 2xx response, or an error
    /// with curl's exit code and message.
    pub fn curl_as(
        &self,
        node: Node,
        service: &str,
        url: &str,
        extra: &[&str],
    ) -> anyhow::Result<String> {
        let mut args = vec!["curl", "-sS", "--fail", "-m", "5"];
        args.extend_from_slice(extra);
        args.push(url);
        let out = self.exec_as(node, service, &args)?;
        if !out.success() {
            bail!(
                "curl {url} as {service} in node {node:?}: exit {:?}: {}",
                out.code(),
                out.stderr.trim()
            );
        }
        Ok(out.stdout)
    }

    /// Starts `args` as a long-running workload of `service` (in its cgroup)
    /// in `node`, its output in `log_name`; killed with the mesh.
    pub fn spawn_as(
        &mut self,
        node: Node,
        service: &str,
        args: &[&str],
        log_name: &str,
    ) -> anyhow::Result<()> {
        let mut cmd = self.workload_command(node, Some(service), args)?;
        let proc = self.spawn(node, &mut cmd, log_name)?;
        self.workloads.push(proc);
        Ok(())
    }

    /// The virtual IP of `service` (`weft catalog service`).
    pub fn vip(&self, service: &str) -> anyhow::Result<String> {
        let v = self.weft_json(&["catalog", "service", service])?;
        v["vip"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(String::from)
            .with_context(|| format!("no virtual IP for {service}: {v}"))
    }

    /// The server's process id, while it runs.
    pub fn server_pid(&self) -> Option<u32> {
        (self.server.lock().expect("server lock").as_ref()).and_then(Proc::pid)
    }

    /// The server's gRPC address (reachable from both nodes).
    pub fn server_addr(&self) -> String {
        format!("{}:{GRPC_PORT}", self.ip(Node::A))
    }

    /// Starts `cmd` in `node`, its stdout and stderr appended to `log_name` in
    /// the mesh's directory.
    pub fn spawn(&self, node: Node, cmd: &mut Command, log_name: &str) -> anyhow::Result<Proc> {
        Proc::spawn_in(self.netns(node), cmd, self.path(log_name))
    }

    /// Runs `program args…` in `node`, bounded by `limit`.
    pub fn run(
        &self,
        node: Node,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
        limit: Duration,
    ) -> anyhow::Result<Output> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        self.run_in(node, cmd, limit)
    }

    fn start_server(&mut self, default_intention: &str, extra: &[String]) -> anyhow::Result<()> {
        let ip = self.ip(Node::A);
        crate::servers::make_tls(self.dir.path(), &["server-tls".to_string()])?;
        let mut args = crate::servers::tls_args(self.dir.path(), "server-tls");
        args.extend([
            "--node-id=1".to_string(),
            format!("--data-dir={}", self.path("server-data").display()),
            format!("--raft-addr={ip}:8300"),
            format!("--grpc-addr={ip}:{GRPC_PORT}"),
            format!("--http-addr={ip}:8500"),
            format!("--peer=1={ip}:8300"),
            format!("--default-intention={default_intention}"),
        ]);
        args.extend(extra.iter().cloned());
        self.server_args = args;
        self.spawn_server()?;
        self.token = crate::servers::bootstrap_acl(Duration::from_secs(20), |args| {
            self.weft_raw(args)
                .map(|o| (o.success(), o.stdout, o.stderr))
        })
        .map_err(|e| {
            e.context(format!(
                "server log:\n{}",
                tail(&self.log("server.log"), 30)
            ))
        })?;
        self.wait_for_leader(Duration::from_secs(20))
    }

    fn spawn_server(&self) -> anyhow::Result<()> {
        let mut cmd = Command::new(bin("weft-server"));
        cmd.args(&self.server_args)
            .env("RUST_LOG", "info,openraft=warn");
        let proc = self.spawn(Node::A, &mut cmd, "server.log")?;
        *self.server.lock().expect("server lock") = Some(proc);
        Ok(())
    }

    /// SIGKILLs the server; its data dir stays.
    pub fn kill_server(&self) {
        if let Some(mut proc) = self.server.lock().expect("server lock").take() {
            proc.stop(libc::SIGKILL, Duration::from_secs(5));
        }
    }

    /// Starts the server again, at the same addresses with the same data
    /// dir and arguments, and waits until it leads.
    pub fn restart_server(&self, limit: Duration) -> anyhow::Result<()> {
        if self.server.lock().expect("server lock").is_some() {
            bail!("the server is running");
        }
        self.spawn_server()?;
        self.wait_for_leader(limit)
    }

    /// Waits until the server answers `weft members` with a leader.
    pub fn wait_for_leader(&self, limit: Duration) -> anyhow::Result<()> {
        wait_until(limit, "weft-server leader", || {
            let out = self.weft_raw(&["--format", "json", "members"])?;
            if !out.success() {
                bail!("{}", out.stderr.trim());
            }
            let v: serde_json::Value = serde_json::from_str(&out.stdout)?;
            Ok(v["leader_id"].as_u64().filter(|id| *id > 0).map(|_| ()))
        })
        .map_err(|e| {
            e.context(format!(
                "server log:\n{}",
                tail(&self.log("server.log"), 30)
            ))
        })
    }

    /// Node's agent's `/config` document: its configuration and its view
    /// (`view.nodes`, `view.instances`, `view.intentions`, `view.index`…),
    /// asked with the management token (it needs `operator:read`).
    pub fn agent_config_dump(&self, node: Node) -> anyhow::Result<serde_json::Value> {
        let header = self.token_header(&self.token)?;
        let text = self.curl_with(node, &format!("http://{ADMIN}/config"), &["-H", &header])?;
        serde_json::from_str(&text).with_context(|| format!("agent /config: {text:?}"))
    }

    /// Runs the `weft` CLI (inside node A) against the server, with the
    /// management token.
    pub fn weft_raw(&self, args: &[&str]) -> anyhow::Result<Output> {
        let token = (!self.token.is_empty()).then_some(self.token.as_str());
        self.weft_as(Node::A, token, args)
    }

    /// Runs the `weft` CLI in `node` against the server with `token` (None:
    /// no token at all), as a process that holds only the public CA file.
    pub fn weft_as(
        &self,
        node: Node,
        token: Option<&str>,
        args: &[&str],
    ) -> anyhow::Result<Output> {
        let mut cmd = Command::new(bin("weft"));
        cmd.arg(format!("--addr={}", self.server_addr()))
            .arg(format!("--ca-file={}", self.path("ca.pem").display()))
            .args(args)
            .env_remove("WEFT_TOKEN");
        // In the environment, which only its user reads, not on the command
        // line, which every local user does.
        if let Some(token) = token {
            cmd.env("WEFT_TOKEN", token);
        }
        self.run_in(node, cmd, Duration::from_secs(10))
    }

    /// Runs the `weft` CLI and requires success; returns its stdout.
    pub fn weft(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.weft_raw(args)?;
        if !out.success() {
            bail!(
                "weft {}: {:?}: {}",
                args.join(" "),
                out.status,
                out.stderr.trim()
            );
        }
        Ok(out.stdout)
    }

    /// `weft --format json ARGS…`, parsed.
    pub fn weft_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut full = vec!["--format", "json"];
        full.extend_from_slice(args);
        let out = self.weft(&full)?;
        serde_json::from_str(&out)
            .with_context(|| format!("weft {}: output {out:?}", args.join(" ")))
    }

    /// The names of the nodes in the catalog.
    pub fn catalog_nodes(&self) -> anyhow::Result<Vec<String>> {
        let v = self.weft_json(&["catalog", "nodes"])?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|n| n["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `(instance id, node, health)` of every instance of `service`.
    pub fn catalog_instances(
        &self,
        service: &str,
    ) -> anyhow::Result<Vec<(String, String, String)>> {
        let v = self.weft_json(&["catalog", "service", service])?;
        Ok(v["instances"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| {
                        let s = |k: &str| i[k].as_str().unwrap_or_default().to_string();
                        (s("id"), s("node"), s("health"))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Starts node's agent with its generated configuration (not waiting).
    pub fn start_agent(&mut self, node: Node) -> anyhow::Result<()> {
        if self.agents[node.index()].is_some() {
            bail!("the agent of node {node:?} is already running");
        }
        let mut cmd = Command::new(bin("weft-agent"));
        cmd.arg("--config")
            .arg(self.agent_config(node))
            .env("RUST_LOG", &self.agent_log)
            .env("RUST_LIB_BACKTRACE", "0");
        let proc = self.spawn(node, &mut cmd, &format!("agent-{}.log", node.label()))?;
        self.agents[node.index()] = Some(proc);
        Ok(())
    }

    /// SIGTERMs node's agent and waits (10 s at most) for it to exit; the
    /// exit status, or `None` when it had to be SIGKILLed.
    pub fn stop_agent(&mut self, node: Node) -> anyhow::Result<Option<ExitStatus>> {
        let Some(mut proc) = self.agents[node.index()].take() else {
            bail!("the agent of node {node:?} is not running");
        };
        Ok(proc.stop(libc::SIGTERM, Duration::from_secs(10)))
    }

    /// The process id of node's agent, while it runs.
    pub fn agent_pid(&self, node: Node) -> Option<u32> {
        self.agents[node.index()].as_ref().and_then(Proc::pid)
    }

    /// Upgrades node's agent in place: starts a second `weft-agent` with the
    /// same configuration while the first runs, and waits (`limit`) until it
    /// says it took over. Returns the predecessor, which drains and exits
    /// by itself.
    pub fn upgrade_agent(&mut self, node: Node, limit: Duration) -> anyhow::Result<Proc> {
        let old_pid = self
            .agent_pid(node)
            .with_context(|| format!("the agent of node {node:?} is not running"))?;
        let old = self.agents[node.index()].take().expect("running agent");
        self.start_agent(node)?;
        let said = format!("took over from pid {old_pid}");
        let result = wait_until(
            limit,
            &format!("node {node:?}'s successor agent serving"),
            || {
                if let Some(status) = self.agents[node.index()]
                    .as_mut()
                    .and_then(|p| p.try_wait())
                {
                    bail!("the successor exited: {status}");
                }
                Ok(self.agent_log(node).contains(&said).then_some(()))
            },
        );
        result.map_err(|e| e.context(format!("agent log:\n{}", self.agent_log_tail(node, 40))))?;
        Ok(old)
    }

    /// Starts `weft-load ARGS…` in `node`: as a workload of `service` in a
    /// transparent mesh, as a plain process otherwise. Its summary is
    /// [`Mesh::load_summary`] once it exited.
    pub fn spawn_load(
        &self,
        node: Node,
        service: Option<&str>,
        args: &[&str],
        log_name: &str,
    ) -> anyhow::Result<Proc> {
        let program = bin("weft-load").display().to_string();
        let mut argv = vec![program.as_str()];
        argv.extend_from_slice(args);
        let mut cmd = self.workload_command(node, service, &argv)?;
        self.spawn(node, &mut cmd, log_name)
    }

    /// Waits (`limit`) for a `weft-load` to finish and reads its summary.
    pub fn load_summary(
        &self,
        load: &mut Proc,
        limit: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let status = load
            .wait_exit(limit)
            .with_context(|| format!("weft-load still running after {limit:?}"))?;
        let log = std::fs::read_to_string(&load.log).unwrap_or_default();
        ensure!(status.success(), "weft-load failed ({status}): {log}");
        let line = log
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .with_context(|| format!("no summary from weft-load: {log}"))?;
        Ok(serde_json::from_str(line)?)
    }

    /// SIGKILLs node's agent.
    pub fn kill_agent(&mut self, node: Node) {
        if let Some(mut proc) = self.agents[node.index()].take() {
            proc.stop(libc::SIGKILL, Duration::from_secs(5));
        }
    }

    /// Stops (SIGTERM), starts, and waits for the agent's `/healthz`.
    pub fn restart_agent(&mut self, node: Node) -> anyhow::Result<()> {
        self.stop_agent(node)?;
        self.start_agent(node)?;
        self.wait_agent_ready(node, Duration::from_secs(20))
    }

    /// Waits until node's agent answers `/healthz` with 200.
    pub fn wait_agent_ready(&mut self, node: Node, limit: Duration) -> anyhow::Result<()> {
        let url = format!("http://{ADMIN}/healthz");
        let result = wait_until(limit, &format!("agent {node:?} /healthz 200"), || {
            if let Some(status) = self.agents[node.index()]
                .as_mut()
                .and_then(|p| p.try_wait())
            {
                bail!("the agent exited: {status}");
            }
            let out =
                self.curl_raw(node, &["-s", "-o", "/dev/null", "-w", "%{http_code}", &url])?;
            Ok((out.stdout.trim() == "200").then_some(()))
        });
        result.map_err(|e| e.context(format!("agent log:\n{}", self.agent_log_tail(node, 40))))
    }

    /// What node's agent has logged (all its runs).
    pub fn agent_log(&self, node: Node) -> String {
        self.log(&format!("agent-{}.log", node.label()))
    }

    pub fn agent_log_tail(&self, node: Node, lines: usize) -> String {
        tail(&self.agent_log(node), lines)
    }

    /// A log file of the mesh's directory.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// Starts `weft-workload ADDR NAME` in `node` and waits until it answers.
    pub fn workload(&mut self, node: Node, name: &str, addr: &str) -> anyhow::Result<()> {
        let mut cmd = Command::new(bin("weft-workload"));
        cmd.args([addr, name]);
        let proc = self.spawn(node, &mut cmd, &format!("workload-{name}.log"))?;
        self.workloads.push(proc);
        let port = addr.rsplit(':').next().unwrap_or_default();
        let host = match addr.rsplit_once(':').map(|(h, _)| h) {
            Some("0.0.0.0") | None => "127.0.0.1".to_string(),
            Some(h) => h.to_string(),
        };
        let url = format!("http://{host}:{port}/healthz");
        wait_until(
            Duration::from_secs(10),
            &format!("workload {name} at {addr}"),
            || Ok(self.curl(node, &url).ok().map(|_| ())),
        )
    }

    /// Starts `weft-workload ADDR NAME` as a workload of `service` (in its
    /// cgroup) in `node` and waits until it listens. Inbound capture keeps
    /// plain connections from reaching it, so readiness is its own report.
    pub fn workload_as(
        &mut self,
        node: Node,
        service: &str,
        name: &str,
        addr: &str,
    ) -> anyhow::Result<()> {
        let log = format!("workload-{name}.log");
        let program = bin("weft-workload").display().to_string();
        let mut cmd = self.workload_command(node, Some(service), &[&program, addr, name])?;
        let proc = self.spawn(node, &mut cmd, &log)?;
        self.workloads.push(proc);
        wait_until(
            Duration::from_secs(10),
            &format!("workload {name} listening at {addr}"),
            || Ok(self.log(&log).contains("listening on").then_some(())),
        )
    }

    /// A third network namespace, outside the mesh, linked to node B only
    /// (by a veth of its own): returns it and node B's address on that link.
    pub fn outsider(&self) -> anyhow::Result<(Netns, String)> {
        let ns = Netns::new(&crate::unique_name(&format!("o{}", self.subnet)))?;
        ns.ip(&[
            "link",
            "add",
            "weftout",
            "type",
            "veth",
            "peer",
            "name",
            "weftout",
            "netns",
            &self.netns(Node::B).path().display().to_string(),
        ])?;
        let (b, outsider) = (
            format!("10.78.{}.1", self.subnet),
            format!("10.78.{}.2", self.subnet),
        );
        for (side, addr) in [(self.netns(Node::B), &b), (&ns, &outsider)] {
            side.ip(&["addr", "add", &format!("{addr}/24"), "dev", "weftout"])?;
            side.ip(&["link", "set", "weftout", "up"])?;
        }
        Ok((ns, b))
    }

    /// The IPv6 link-local address of `node`'s veth, once duplicate address
    /// detection has finished with it (`fe80::…`, without the scope).
    pub fn ipv6_link_local(&self, node: Node) -> anyhow::Result<String> {
        wait_until(
            Duration::from_secs(10),
            &format!("an IPv6 link-local address on node {node:?}"),
            || {
                let out = Command::new("ip")
                    .args(["-n", self.netns(node).name(), "-6", "-o", "addr", "show"])
                    .args(["dev", VETH, "scope", "link"])
                    .output()?;
                let text = String::from_utf8_lossy(&out.stdout).to_string();
                if text.contains("tentative") {
                    return Ok(None);
                }
                Ok(text
                    .split_whitespace()
                    .skip_while(|w| *w != "inet6")
                    .nth(1)
                    .and_then(|a| a.split('/').next())
                    .map(str::to_string))
            },
        )
    }

    /// Starts `weft-holder ADDR` (an echo server holding every connection
    /// until its client closes) in `node`, waits until it listens, and
    /// returns its process id.
    pub fn holder(&mut self, node: Node, addr: &str) -> anyhow::Result<u32> {
        let mut cmd = Command::new(bin("weft-holder"));
        cmd.arg(addr);
        let log = format!("holder-{}.log", node.label());
        let proc = self.spawn(node, &mut cmd, &log)?;
        let pid = proc.pid().context("the holder's pid")?;
        self.workloads.push(proc);
        wait_until(
            Duration::from_secs(10),
            &format!("weft-holder at {addr}"),
            || Ok(self.log(&log).contains("listening on").then_some(())),
        )?;
        Ok(pid)
    }

    /// curl's `-H` argument that sends `token` as `X-Consul-Token`: `@` and
    /// a 0600 file holding the header, so that the token is not on the
    /// command line, where every local user reads it.
    pub fn token_header(&self, token: &str) -> anyhow::Result<String> {
        token_header_in(self.dir.path(), token)
    }

    /// curl's `-H` argument for the header line `line` (`Name: value`),
    /// from a 0600 file in the mesh's directory (see [`header_file_in`]).
    pub fn header_arg(&self, line: &str) -> anyhow::Result<String> {
        header_file_in(self.dir.path(), line)
    }

    /// `METHOD http://127.0.0.1:8500{path}` (the agent's local API) in
    /// `node` with curl, with `token` and `body` if given: the status code
    /// and the body.
    pub fn local_api(
        &self,
        node: Node,
        (method, path): (&str, &str),
        token: Option<&str>,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        let url = format!("http://{AGENT_HTTP}{path}");
        let header = token.map(|t| self.token_header(t)).transpose()?;
        let mut args = vec!["-sS", "-m", "15", "-X", method, "-w", "\n%{http_code}"];
        if let Some(h) = &header {
            args.extend(["-H", h]);
        }
        if let Some(b) = body {
            args.extend(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        args.push(&url);
        let out = self.curl_raw(node, &args)?;
        ensure!(out.success(), "curl {url}: {}", out.describe());
        let (body, code) = (out.stdout.rsplit_once('\n'))
            .with_context(|| format!("curl output {:?}", out.stdout))?;
        Ok((code.trim().parse()?, body.to_string()))
    }

    /// `curl ARGS…` in `node` (15 s at most).
    pub fn curl_raw(&self, node: Node, args: &[&str]) -> anyhow::Result<Output> {
        self.run(node, "curl", args, Duration::from_secs(15))
    }

    /// `GET url` from `node` with curl (5 s limit): the body of a 2xx
    /// response, or an error with curl's exit code and message.
    pub fn curl(&self, node: Node, url: &str) -> anyhow::Result<String> {
        self.curl_with(node, url, &[])
    }

    /// [`Mesh::curl`] with extra curl arguments (headers, timeouts…).
    pub fn curl_with(&self, node: Node, url: &str, extra: &[&str]) -> anyhow::Result<String> {
        let mut args = vec!["-sS", "--fail", "-m", "5"];
        args.extend_from_slice(extra);
        args.push(url);
        let out = self.curl_raw(node, &args)?;
        if !out.success() {
            bail!(
                "curl {url} from node {node:?}: exit {:?}: {}",
                out.code(),
                out.stderr.trim()
            );
        }
        Ok(out.stdout)
    }

    /// The server's `/metrics` text (its HTTP port, TLS, the management
    /// token), fetched from node A.
    pub fn server_metrics(&self) -> anyhow::Result<String> {
        let ip = self.ip(Node::A);
        let resolve = format!("server.dc1.weft:8500:{ip}");
        let ca = self.path("ca.pem").display().to_string();
        let token = self.token_header(&self.token)?;
        let extra = ["--resolve", &resolve, "--cacert", &ca, "-H", &token];
        self.curl_with(Node::A, "https://server.dc1.weft:8500/metrics", &extra)
    }

    /// The agent's `/metrics` text.
    pub fn metrics(&self, node: Node) -> anyhow::Result<String> {
        self.curl(node, &format!("http://{ADMIN}/metrics"))
    }

    /// The sum of metric `name` over its label sets on node's agent.
    pub fn metric(&self, node: Node, name: &str) -> anyhow::Result<f64> {
        Ok(metric_sum(&self.metrics(node)?, name))
    }

    /// The sum of metric `name` over the label sets that carry every
    /// `labels` pair, on node's agent:
    /// `metric_with(NodeA, "weft_agent_ebpf_events_total", &[("event", "fast_path")])`.
    pub fn metric_with(
        &self,
        node: Node,
        name: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<f64> {
        Ok(metric_sum_with(&self.metrics(node)?, name, labels))
    }

    /// Starts tcpdump on node's veth, writing to a file in the mesh's
    /// directory; waits until it listens.
    pub fn capture(&self, node: Node) -> anyhow::Result<Capture> {
        let file = self.path(&format!("capture-{}.pcap", node.label()));
        capture_on(self.netns(node), VETH, &file)
    }
}

/// Starts tcpdump on `iface` in `netns`, writing every packet whole to
/// `file`; returns once it listens.
pub fn capture_on(netns: &Netns, iface: &str, file: &std::path::Path) -> anyhow::Result<Capture> {
    let file = file.to_path_buf();
    let mut cmd = Command::new("tcpdump");
    cmd.args(["-i", iface, "-n", "-U", "--immediate-mode", "-s", "0", "-w"])
        .arg(&file);
    let _ns = in_netns(&mut cmd, netns)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting tcpdump")?;
    let stderr = child.stderr.take().context("tcpdump stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stderr).lines();
        let mut seen = String::new();
        for line in lines.by_ref().map_while(Result::ok) {
            seen += &line;
            seen.push('\n');
            if line.contains("listening on") {
                let _ = tx.send(Ok(()));
                break;
            }
        }
        let _ = tx.send(Err(seen));
        for l in lines.map_while(Result::ok) {
            eprintln!("tcpdump: {l}");
        }
    });
    let capture = Capture {
        proc: Proc {
            child: Some(child),
            log: PathBuf::new(),
        },
        file,
    };
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => Ok(capture),
        Ok(Err(seen)) => bail!("tcpdump did not start: {seen}"),
        Err(_) => bail!("tcpdump did not say it listens within 10 s"),
    }
}

/// A running tcpdump; [`Capture::finish`] stops it and returns the file.
pub struct Capture {
    proc: Proc,
    file: PathBuf,
}

impl Capture {
    /// Stops tcpdump (SIGINT, so that it flushes) and returns the capture's bytes.
    pub fn finish(mut self) -> anyhow::Result<CaptureFile> {
        // Let the last packets reach the capture buffer.
        std::thread::sleep(Duration::from_millis(300));
        self.proc.stop(libc::SIGINT, Duration::from_secs(5));
        let bytes = std::fs::read(&self.file).context("reading the capture")?;
        Ok(CaptureFile {
            path: self.file.clone(),
            bytes,
        })
    }
}

pub struct CaptureFile {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

impl CaptureFile {
    /// Whether `needle` appears anywhere in the raw capture.
    pub fn contains(&self, needle: &[u8]) -> bool {
        !needle.is_empty() && self.bytes.windows(needle.len()).any(|w| w == needle)
    }

    /// How many captured packets match the tcpdump `filter`.
    pub fn count(&self, filter: &str) -> anyhow::Result<usize> {
        let mut cmd = Command::new("tcpdump");
        cmd.arg("-nn")
            .arg("-r")
            .arg(&self.path)
            .args(filter.split_whitespace());
        let out = run_bounded(&mut cmd, Duration::from_secs(10))?;
        if !out.success() {
            bail!("tcpdump -r: {}", out.stderr.trim());
        }
        Ok(out.stdout.lines().filter(|l| !l.trim().is_empty()).count())
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for name in ["server.log", "agent-a.log", "agent-b.log"] {
                let text = self.log(name);
                if !text.is_empty() {
                    eprintln!("---- {name} (last 40 lines) ----\n{}", tail(&text, 40));
                }
            }
        }
        if std::env::var_os("WEFT_KEEP_MESH").is_some() {
            let spare = ScratchDir::new("weft-mesh-").expect("tempdir");
            let dir = std::mem::replace(&mut self.dir, spare);
            eprintln!("mesh files kept in {}", dir.keep().display());
        }
    }
}

/// curl's `-H` argument that sends `token` as `X-Consul-Token`: `@` and a
/// 0600 file in `dir` holding the header, so that the token is not on the
/// command line, where every local user reads it.
pub fn token_header_in(dir: &std::path::Path, token: &str) -> anyhow::Result<String> {
    header_file_in(dir, &format!("X-Consul-Token: {token}"))
}

/// curl's `-H` argument for the header line `line`: `@` and a 0600 file in
/// `dir` holding it, so that a secret in it (a token, a bearer) is not on
/// the command line, where every local user reads it.
pub fn header_file_in(dir: &std::path::Path, line: &str) -> anyhow::Result<String> {
    use std::hash::{Hash, Hasher};
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    line.hash(&mut hasher);
    let path = dir.join(format!("header-{:016x}", hasher.finish()));
    if !path.exists() {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        writeln!(file, "{line}")?;
    }
    Ok(format!("@{}", path.display()))
}
