//! weft-server processes for tests: a cluster on loopback, each server with
//! its own data dir, started, killed (SIGKILL), wiped and restarted at will,
//! and the `weft` CLI pointed at them. Processes are killed on drop.
//!
//! Clusters run as in production: TLS on every port with certificates made
//! for the test (a CA and one server certificate per server), ACLs
//! bootstrapped at start; the CLI and gRPC clients get the CA and the
//! management token.
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::leftovers::ScratchDir;

/// A binary of the workspace, built by `cargo build --bins` (which
/// `cargo xtask test` runs before the tests).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    // Tests run from target/PROFILE/deps, other binaries from target/PROFILE.
    let mut dir = exe.parent().expect("target dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target dir");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace's binaries first (`cargo build --bins`; `cargo xtask test` does)",
        path.display()
    );
    path
}

/// Ports handed to servers come from below Linux's ephemeral range
/// (32768 and up), so that no client connection of another test can take
/// one between the moment it is chosen and the moment a server binds it.
const PORTS: std::ops::Range<u16> = 20000..32000;

/// A free TCP port on 127.0.0.1, never handed out twice by this process.
/// The walk starts at a point derived from the process id, so that test
/// binaries run one after another do not meet ports still in TIME_WAIT.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let span = PORTS.end - PORTS.start;
    let offset = (std::process::id() % u32::from(span)) as u16;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = PORTS.start + (offset.wrapping_add(n) % span);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {PORTS:?} on 127.0.0.1");
}

pub struct Server {
    pub id: u64,
    pub raft_addr: String,
    pub grpc_addr: String,
    pub http_addr: String,
    pub data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// What [`Cluster::http`] got back.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not JSON: {}", self.body))
    }
}

pub struct Cluster {
    _dir: ScratchDir,
    pub servers: Vec<Server>,
    extra_args: Vec<String>,
    /// The TLS CA's certificate (PEM file) clients verify servers with.
    pub ca_file: PathBuf,
    /// The TLS CA itself, to make more certificates in a test.
    pub tls_ca: weft_api::tls_certs::CertPair,
    /// The management token's secret.
    pub token: String,
    /// Relays between servers by (from, to), when started linked.
    links: std::collections::BTreeMap<(u64, u64), crate::relay::Relay>,
}

/// A CA and one server certificate per name in `dir`: writes `ca.pem` and
/// `<name>.pem` / `<name>-key.pem`; returns the CA.
pub fn make_tls(dir: &Path, names: &[String]) -> anyhow::Result<weft_api::tls_certs::CertPair> {
    use weft_api::tls_certs::{create_ca, create_server_cert};
    let ca = create_ca("weft test CA", 2)?;
    std::fs::write(dir.join("ca.pem"), &ca.cert_pem)?;
    for name in names {
        let cert = create_server_cert(&ca, "dc1", &[], &[], 2)?;
        std::fs::write(dir.join(format!("{name}.pem")), &cert.cert_pem)?;
        std::fs::write(dir.join(format!("{name}-key.pem")), &cert.key_pem)?;
    }
    Ok(ca)
}

/// The `--tls-*` flags of a server whose files `make_tls` wrote.
pub fn tls_args(dir: &Path, name: &str) -> Vec<String> {
    vec![
        format!("--tls-ca-file={}", dir.join("ca.pem").display()),
        format!(
            "--tls-cert-file={}",
            dir.join(format!("{name}.pem")).display()
        ),
        format!(
            "--tls-key-file={}",
            dir.join(format!("{name}-key.pem")).display()
        ),
    ]
}

/// A gRPC channel to a server's API over TLS (verified against `ca_pem`
/// for `server.dc1.weft`), sending `token` (if any) with every call.
pub async fn grpc_channel(
    addr: &str,
    ca_pem: &str,
    token: Option<&str>,
) -> anyhow::Result<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(weft_api::tls_certs::server_name("dc1"));
    let channel = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let bearer = Bearer(
        token
            .map(|t| format!("Bearer {t}").parse())
            .transpose()
            .context("token")?,
    );
    Ok(tonic::service::interceptor::InterceptedService::new(
        channel, bearer,
    ))
}

/// Adds `authorization: Bearer <token>` to every call (none: no token).
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            req.metadata_mut().insert("authorization", token.clone());
        }
        Ok(req)
    }
}

/// Runs `weft acl bootstrap` until a leader takes it (or `limit` passes);
/// returns the management token's secret.
/// `weft` runs the CLI and gives (success, stdout, stderr).
pub fn bootstrap_acl(
    limit: Duration,
    mut weft: impl FnMut(&[&str]) -> anyhow::Result<(bool, String, String)>,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        let (ok, stdout, stderr) = weft(&["--format", "json", "acl", "bootstrap"])?;
        if ok {
            let v: serde_json::Value = serde_json::from_str(&stdout)?;
            return v["secret_id"]
                .as_str()
                .map(String::from)
                .context("acl bootstrap printed no secret_id");
        }
        if Instant::now() > deadline {
            bail!("acl bootstrap: {}", stderr.trim());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Cluster {
    /// Starts `n` servers that form one cluster, and waits for a leader.
    pub fn start(n: u64, extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with(n, extra_args, false)
    }

    /// As [`Cluster::start`], but servers reach each other through relays
    /// (one per direction of every pair), so that a test can cut a server
    /// off ([`Cluster::isolate`]) and bring it back ([`Cluster::rejoin`]).
    pub fn start_linked(n: u64, extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with(n, extra_args, true)
    }

    fn start_with(n: u64, extra_args: &[&str], linked: bool) -> anyhow::Result<Self> {
        let dir = ScratchDir::new("weft-cluster-")?;
        let names: Vec<String> = (1..=n).map(|id| format!("server-{id}-tls")).collect();
        let tls_ca = make_tls(dir.path(), &names)?;
        let ca_file = dir.path().join("ca.pem");
        let servers = (1..=n)
            .map(|id| Server {
                id,
                raft_addr: format!("127.0.0.1:{}", free_port()),
                grpc_addr: format!("127.0.0.1:{}", free_port()),
                http_addr: format!("127.0.0.1:{}", free_port()),
                data_dir: dir.path().join(format!("server-{id}")),
                log: dir.path().join(format!("server-{id}.log")),
                child: None,
            })
            .collect::<Vec<Server>>();
        let mut links = std::collections::BTreeMap::new();
        if linked {
            for from in &servers {
                for to in servers.iter().filter(|s| s.id != from.id) {
                    let relay = crate::relay::Relay::start(to.raft_addr.parse()?)
                        .context("starting a relay between servers")?;
                    links.insert((from.id, to.id), relay);
                }
            }
        }
        let mut cluster = Cluster {
            _dir: dir,
            servers,
            links,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            ca_file,
            tls_ca,
            token: String::new(),
        };
        for id in 1..=n {
            cluster.start_server(id)?;
        }
        let token = bootstrap_acl(Duration::from_secs(15), |args| {
            let out = cluster.cli_at(&cluster.addrs(), args);
            Ok((
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ))
        })
        .map_err(|e| e.context(cluster.log_tails()))?;
        cluster.token = token;
        cluster.wait_for_leader(Duration::from_secs(15))?;
        Ok(cluster)
    }

    fn server(&self, id: u64) -> &Server {
        &self.servers[(id - 1) as usize]
    }

    /// Starts (or restarts) server `id` with its data dir as it is.
    pub fn start_server(&mut self, id: u64) -> anyhow::Result<()> {
        let peers: Vec<String> = self
            .servers
            .iter()
            .map(|s| match self.links.get(&(id, s.id)) {
                Some(relay) => format!("--peer={}={}", s.id, relay.addr()),
                None => format!("--peer={}={}", s.id, s.raft_addr),
            })
            .collect();
        let mut extra = self.extra_args.clone();
        extra.extend(tls_args(self._dir.path(), &format!("server-{id}-tls")));
        let s = &mut self.servers[(id - 1) as usize];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&s.log)?;
        let child = Command::new(bin("weft-server"))
            .arg(format!("--node-id={id}"))
            .arg("--data-dir")
            .arg(&s.data_dir)
            .arg(format!("--raft-addr={}", s.raft_addr))
            .arg(format!("--grpc-addr={}", s.grpc_addr))
            .arg(format!("--http-addr={}", s.http_addr))
            .args(&peers)
            .args(&extra)
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting weft-server")?;
        s.child = Some(child);
        Ok(())
    }

    /// Cuts server `id` off from the other servers (a cluster started with
    /// [`Cluster::start_linked`]): its Raft connections close and new ones
    /// are refused both ways. Clients still reach it.
    pub fn isolate(&self, id: u64) {
        assert!(
            !self.links.is_empty(),
            "isolate needs Cluster::start_linked"
        );
        for ((from, to), relay) in &self.links {
            if *from == id || *to == id {
                relay.cut();
            }
        }
    }

    /// Cuts the servers in `group` off from the others (a cluster started
    /// with [`Cluster::start_linked`]); inside the group, and inside the
    /// rest, servers still reach each other. [`Cluster::rejoin`] each to end it.
    pub fn partition(&self, group: &[u64]) {
        assert!(
            !self.links.is_empty(),
            "partition needs Cluster::start_linked"
        );
        for ((from, to), relay) in &self.links {
            if group.contains(from) != group.contains(to) {
                relay.cut();
            }
        }
    }

    /// Ends [`Cluster::isolate`].
    pub fn rejoin(&self, id: u64) {
        for ((from, to), relay) in &self.links {
            if *from == id || *to == id {
                relay.mend();
            }
        }
    }

    /// The extra flags every server is started with from now on (a
    /// restart with another setting).
    pub fn set_extra_args(&mut self, extra_args: &[&str]) {
        self.extra_args = extra_args.iter().map(|s| s.to_string()).collect();
    }

    /// SIGKILLs server `id`.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.servers[(id - 1) as usize].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Removes server `id`'s data dir (kill it first).
    pub fn wipe(&mut self, id: u64) -> anyhow::Result<()> {
        let dir = &self.server(id).data_dir;
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        Ok(())
    }

    /// What server `id` has logged so far.
    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(&self.server(id).log).unwrap_or_default()
    }

    /// The process id of server `id`, while it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.server(id).child.as_ref().map(|c| c.id())
    }

    /// Server `id`'s data dir (Raft log, vote and snapshots).
    pub fn data_dir(&self, id: u64) -> &Path {
        &self.server(id).data_dir
    }

    /// One HTTPS request to server `id`'s HTTP port with curl (verifying
    /// the server's certificate), with `token` in `X-Consul-Token`.
    pub fn http(
        &self,
        id: u64,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&[u8]>,
    ) -> anyhow::Result<HttpReply> {
        let port = self.server(id).http_addr.rsplit(':').next().unwrap_or("");
        let dir = tempfile::tempdir()?;
        let (headers, data) = (dir.path().join("headers"), dir.path().join("body"));
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-m", "10", "-X", method, "--cacert"])
            .arg(&self.ca_file)
            .args(["--resolve", &format!("server.dc1.weft:{port}:127.0.0.1")])
            .arg("-D")
            .arg(&headers)
            .args(["-o", "-", "-w", "\n%{http_code}"]);
        if let Some(token) = token {
            cmd.arg("-H")
                .arg(crate::mesh::token_header_in(dir.path(), token)?);
        }
        if let Some(body) = body {
            std::fs::write(&data, body)?;
            cmd.arg("--data-binary").arg(format!("@{}", data.display()));
        }
        let out = cmd
            .arg(format!("https://server.dc1.weft:{port}{path}"))
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "curl {method} {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').context("curl's -w line")?;
        let headers = std::fs::read_to_string(&headers)?
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Ok(HttpReply {
            status: code.trim().parse()?,
            headers,
            body: body.to_string(),
        })
    }

    pub fn grpc_addr(&self, id: u64) -> &str {
        &self.server(id).grpc_addr
    }

    /// Every running server's gRPC address, comma-separated (for `--addr`).
    pub fn addrs(&self) -> String {
        self.servers
            .iter()
            .filter(|s| s.child.is_some())
            .map(|s| s.grpc_addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs the `weft` CLI against `addr` with the management token.
    pub fn cli_at(&self, addr: &str, args: &[&str]) -> Output {
        self.cli_as(addr, &self.token, args)
    }

    /// Runs the `weft` CLI against `addr` with `token` (empty: none).
    pub fn cli_as(&self, addr: &str, token: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("weft"));
        cmd.arg(format!("--addr={addr}"))
            .arg("--ca-file")
            .arg(&self.ca_file)
            .env_remove("WEFT_TOKEN")
            .env_remove("WEFT_CACERT");
        if !token.is_empty() {
            cmd.env("WEFT_TOKEN", token);
        }
        cmd.args(args).output().expect("running weft")
    }

    /// Runs the CLI against server `id` alone with the management token and
    /// requires success; its output.
    pub fn cli_on(&self, id: u64, args: &[&str]) -> anyhow::Result<String> {
        stdout_of(args, self.cli_at(self.grpc_addr(id), args))
            .with_context(|| format!("on server {id}"))
    }

    /// A TLS gRPC channel to server `id` sending `token` (None: no token).
    pub async fn channel_as(
        &self,
        id: u64,
        token: Option<&str>,
    ) -> anyhow::Result<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
    > {
        grpc_channel(self.grpc_addr(id), &self.tls_ca.cert_pem, token).await
    }

    /// A TLS gRPC channel to server `id` with the management token.
    pub async fn channel(
        &self,
        id: u64,
    ) -> anyhow::Result<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
    > {
        self.channel_as(id, Some(&self.token)).await
    }

    /// Creates a token linked to a new policy with `rules`; returns its secret.
    pub fn token_with_rules(&self, name: &str, rules: &str) -> anyhow::Result<String> {
        self.cli(&["acl", "policy", "create", "--name", name, "--rules", rules])?;
        self.token_with(&["--policy", name])
    }

    /// `weft acl token create ARGS…`; returns the new token's secret.
    pub fn token_with(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["--format", "json", "acl", "token", "create"];
        full.extend_from_slice(args);
        let v: serde_json::Value = serde_json::from_str(&self.cli(&full)?)?;
        v["secret_id"]
            .as_str()
            .map(String::from)
            .context("token create printed no secret_id")
    }

    /// Runs the CLI against every running server (failover) and requires success.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        stdout_of(args, self.cli_at(&self.addrs(), args))
    }

    /// The current leader's id, from `weft members` on any running server.
    pub fn leader(&self) -> Option<u64> {
        let out = self.cli(&["members", "--format", "json"]).ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v["leader_id"].as_u64().filter(|id| *id > 0)
    }

    /// The last lines of every server's log.
    pub fn log_tails(&self) -> String {
        let logs: Vec<String> = self
            .servers
            .iter()
            .map(|s| {
                let log = std::fs::read_to_string(&s.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("server {} log tail:\n{}", s.id, tail.join("\n"))
            })
            .collect();
        logs.join("\n")
    }

    pub fn wait_for_leader(&self, limit: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(id) = self.leader() {
                return Ok(id);
            }
            if Instant::now() > deadline {
                bail!("no leader within {limit:?}\n{}", self.log_tails());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for s in &mut self.servers {
            if let Some(mut child) = s.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The output of `weft ARGS` that ran as `out`, if it succeeded.
fn stdout_of(args: &[&str], out: Output) -> anyhow::Result<String> {
    if !out.status.success() {
        bail!(
            "weft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A `weft-agent` on loopback in explicit mode, without services, following
/// a [`Cluster`] (every server listed) with a token of its node's identity;
/// killed on drop.
pub struct LoopbackAgent {
    child: Child,
    admin: String,
    /// The cluster's management token, for `/config`.
    token: String,
    log: PathBuf,
    _dir: ScratchDir,
}

impl Cluster {
    /// Starts an agent for node `node` and waits (20 s at most) until it is
    /// ready (registered, its certificates signed) and its view has the
    /// servers' state.
    pub fn start_agent(&self, node: &str) -> anyhow::Result<LoopbackAgent> {
        let dir = ScratchDir::new("weft-agent-")?;
        let token = self.token_with(&["--node-identity", &format!("{node}:dc1")])?;
        let token_file = dir.path().join("agent.token");
        crate::federation::write_private(&token_file, &token)?;
        let servers: Vec<String> = self
            .servers
            .iter()
            .map(|s| format!("{:?}", s.grpc_addr))
            .collect();
        let addr = || format!("127.0.0.1:{}", free_port());
        let admin = addr();
        let config = format!(
            "node_name = {node:?}\ndatacenter = \"dc1\"\nservers = [{}]\n\
             advertise_addr = \"127.0.0.1\"\ndata_dir = {:?}\nebpf = false\n\
             inbound_addr = {:?}\noutbound_addr = {:?}\npermissive_addr = {:?}\n\
             admin_addr = {admin:?}\ndns_addr = {:?}\nhttp_addr = {:?}\n\
             token_file = {:?}\nca_file = {:?}\n",
            servers.join(", "),
            dir.path().join("data").display().to_string(),
            addr(),
            addr(),
            addr(),
            addr(),
            addr(),
            token_file.display().to_string(),
            self.ca_file.display().to_string(),
        );
        let config_file = dir.path().join("agent.toml");
        std::fs::write(&config_file, config)?;
        let log = dir.path().join("agent.log");
        let child = Command::new(bin("weft-agent"))
            .arg("--config")
            .arg(&config_file)
            .env("RUST_LOG", "info,weft_agent=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting weft-agent")?;
        let agent = LoopbackAgent {
            child,
            admin,
            token: self.token.clone(),
            log,
            _dir: dir,
        };
        crate::mesh::wait_until(Duration::from_secs(20), "the agent ready", || {
            if !agent.log().contains("agent ready") {
                return Ok(None);
            }
            Ok(agent
                .config_dump()
                .ok()
                .filter(|dump| dump["view"]["index"].as_u64() > Some(0))
                .map(|_| ()))
        })
        .map_err(|e| e.context(format!("agent log:\n{}", agent.log())))?;
        Ok(agent)
    }

    /// A server's Prometheus metric `name`, summed over its labels.
    pub fn metric(&self, id: u64, name: &str) -> anyhow::Result<f64> {
        let reply = self.http(id, "GET", "/metrics", Some(&self.token), None)?;
        Ok(crate::mesh::metric_sum(&reply.body, name))
    }
}

impl LoopbackAgent {
    /// The agent's `/config` document (configuration and view).
    pub fn config_dump(&self) -> anyhow::Result<serde_json::Value> {
        let out = Command::new("curl")
            .args(["-sS", "-m", "5", "--fail", "-H"])
            .arg(crate::mesh::token_header_in(self._dir.path(), &self.token)?)
            .arg(format!("http://{}/config", self.admin))
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "curl /config: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// What the agent has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for LoopbackAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
