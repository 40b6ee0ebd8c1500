//! Datacenters federated through mesh gateways, as network namespaces.
//!
//! Each datacenter `k` (0: `dc1`, the primary; 1: `dc2`) has a LAN: a
//! namespace running its server and one node's agent, holding a bridge
//! (`10.8{1+2k}.S.1/24`), and a namespace per gateway (`.2`, `.3`, …) on
//! that bridge. The gateways alone are also on the WAN, a bridge in a
//! namespace of its own (`10.82.S.0/24`). No namespace forwards packets,
//! so the LANs reach each other only through the gateways; the tests check
//! it.
//!
//! Everything is torn down on drop (processes, then namespaces, then
//! files); the tails of the logs are printed unless the test said it
//! passed ([`Federation::passed`]).
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};

use crate::cgroup::TestCgroup;
use crate::leftovers::ScratchDir;
use crate::mesh::{in_netns, run_bounded, wait_until, Output, Proc};
use crate::netns::Netns;
use crate::servers::bin;

/// The gateways' port, LAN and WAN.
pub const GATEWAY_PORT: u16 = 8443;
/// The datacenters' names, by index.
pub const DCS: [&str; 2] = ["dc1", "dc2"];

/// What runs in a datacenter besides its server.
#[derive(Debug, Clone, Default)]
pub struct DcSpec {
    /// Gateways (each its own namespace and agent).
    pub gateways: usize,
    /// `[[service]]` blocks of the node agent (`node-a` in dc1, `node-b`
    /// in dc2), TOML; `NODE` is replaced by the node's address.
    pub services: String,
    /// Services the node agent's token may register.
    pub service_names: Vec<String>,
    /// The node agent in transparent mode: its own cgroup root (services
    /// with `cgroup = "NAME"` are mesh workloads, see
    /// [`Federation::exec_as`]) and DNS on `127.0.0.1:53` of the LAN.
    pub ebpf: bool,
    /// A second node (`node-c` in dc1, `node-d` in dc2) in a namespace of
    /// its own on the LAN (`.100`): its `[[service]]` blocks (`NODE` is its
    /// address) and the services its token may register.
    pub second_node: Option<(String, Vec<String>)>,
}

/// Where in a datacenter a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The LAN namespace: the server and the first node.
    Lan,
    /// Gateway j's namespace.
    Gateway(usize),
    /// The second node's namespace.
    Second,
}

struct Dc {
    lan: Netns,
    gateways: Vec<Netns>,
    second: Option<Netns>,
    procs: Vec<(String, Proc)>,
    token: String,
}

pub struct Federation {
    dcs: Vec<Dc>,
    /// Transparent node agents' cgroup roots, removed (processes, pins)
    /// after the processes are gone.
    cgroups: Vec<TestCgroup>,
    base: String,
    wan: Netns,
    subnet: u8,
    dir: ScratchDir,
    /// Set by a test that got to its end: otherwise the logs' tails are
    /// printed on drop.
    pub passed: bool,
}

impl Drop for Federation {
    fn drop(&mut self) {
        for dc in &mut self.dcs {
            dc.procs.clear();
        }
        self.cgroups.clear();
        if self.passed {
            return;
        }
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        for path in logs {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            eprintln!("--- {} ---", path.display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// A veth from `a` (named `a_if`, address `a_addr/24` if any) to `b`,
/// whose end (`b_if`) joins bridge `br0` there.
fn link_to_bridge(
    a: &Netns,
    a_if: &str,
    a_addr: &str,
    b: &Netns,
    b_if: &str,
) -> anyhow::Result<()> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        &b.path().display().to_string(),
    ])?;
    a.ip(&["addr", "add", &format!("{a_addr}/24"), "dev", a_if])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "master", "br0"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

fn bridge(ns: &Netns, addr: Option<&str>) -> anyhow::Result<()> {
    ns.ip(&["link", "add", "br0", "type", "bridge"])?;
    if let Some(a) = addr {
        ns.ip(&["addr", "add", &format!("{a}/24"), "dev", "br0"])?;
    }
    ns.ip(&["link", "set", "br0", "up"])
}

pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(text.as_bytes())?;
    Ok(())
}

impl Federation {
    /// Builds the namespaces and the servers' TLS files, starts both
    /// servers (dc2 knowing only dc1's first gateway's WAN address), the
    /// gateways and the node agents, and waits until both datacenters'
    /// gateways know each other and dc2 trusts dc1's roots.
    pub fn start(specs: [DcSpec; 2]) -> anyhow::Result<Federation> {
        // Tests of one process run at once: each federation its own names
        // and subnets.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let subnet = ((std::process::id() + n * 37) % 200 + 20) as u8;
        let base = crate::unique_name(&format!("f{n}"));
        let wan = Netns::new(&format!("{base}w"))?;
        bridge(&wan, None)?;
        let mut dcs = Vec::new();
        for (k, spec) in specs.iter().enumerate() {
            let lan = Netns::new(&format!("{base}{k}l"))?;
            let mut gateways = Vec::new();
            for j in 0..spec.gateways {
                gateways.push(Netns::new(&format!("{base}{k}g{j}"))?);
            }
            let second = match spec.second_node {
                Some(_) => Some(Netns::new(&format!("{base}{k}n"))?),
                None => None,
            };
            dcs.push(Dc {
                lan,
                gateways,
                second,
                procs: Vec::new(),
                token: String::new(),
            });
        }
        let dir = ScratchDir::new("weft-fed-")?;
        let mut fed = Federation {
            dcs,
            cgroups: Vec::new(),
            base: base.clone(),
            wan,
            subnet,
            dir,
            passed: false,
        };
        for (k, dc) in fed.dcs.iter().enumerate() {
            bridge(&dc.lan, Some(&fed.lan_ip(k, 1)))?;
            for (j, gw) in dc.gateways.iter().enumerate() {
                link_to_bridge(gw, "lan", &fed.lan_ip(k, 2 + j), &dc.lan, &format!("g{j}"))?;
                link_to_bridge(gw, "wan", &fed.wan_ip(k, j), &fed.wan, &format!("d{k}g{j}"))?;
            }
            if let Some(second) = &dc.second {
                link_to_bridge(second, "lan", &fed.lan_ip(k, 100), &dc.lan, "n2")?;
            }
        }
        let ca = weft_api::tls_certs::create_ca("weft test CA", 2)?;
        std::fs::write(fed.path("ca.pem"), &ca.cert_pem)?;
        for name in DCS {
            let cert = weft_api::tls_certs::create_server_cert(&ca, name, &[], &[], 2)?;
            std::fs::write(fed.path(&format!("{name}.pem")), &cert.cert_pem)?;
            write_private(&fed.path(&format!("{name}-key.pem")), &cert.key_pem)?;
        }
        for k in 0..2 {
            fed.start_server(k)?;
        }
        for (k, spec) in specs.iter().enumerate() {
            for j in 0..spec.gateways {
                fed.start_gateway(k, j)?;
            }
            let node = if k == 0 { "node-a" } else { "node-b" };
            fed.start_node(k, node, spec)?;
            if let Some((services, names)) = &spec.second_node {
                fed.start_second(k, services, names)?;
            }
        }
        fed.wait_federated()?;
        Ok(fed)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `10.8{1+2k}.S.host`: datacenter k's LAN.
    pub fn lan_ip(&self, k: usize, host: usize) -> String {
        format!("10.8{}.{}.{host}", 1 + 2 * k, self.subnet)
    }

    /// Gateway j of datacenter k on the WAN.
    pub fn wan_ip(&self, k: usize, j: usize) -> String {
        format!("10.82.{}.{}", self.subnet, 10 * (k + 1) + j)
    }

    pub fn server_ip(&self, k: usize) -> String {
        self.lan_ip(k, 1)
    }

    pub fn gateway_lan(&self, k: usize, j: usize) -> String {
        format!("{}:{GATEWAY_PORT}", self.lan_ip(k, 2 + j))
    }

    pub fn gateway_wan(&self, k: usize, j: usize) -> String {
        format!("{}:{GATEWAY_PORT}", self.wan_ip(k, j))
    }

    /// Datacenter k's LAN namespace (its server and node agent).
    pub fn lan(&self, k: usize) -> &Netns {
        &self.dcs[k].lan
    }

    pub fn gateway(&self, k: usize, j: usize) -> &Netns {
        &self.dcs[k].gateways[j]
    }

    pub fn wan(&self) -> &Netns {
        &self.wan
    }

    /// Runs `program args` in `ns`, bounded by `limit`.
    pub fn run_in(
        &self,
        ns: &Netns,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
        limit: Duration,
    ) -> anyhow::Result<Output> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        let _ns = in_netns(&mut cmd, ns)?;
        run_bounded(&mut cmd, limit)
    }

    /// `weft ARGS` in datacenter k's LAN against its server, with its
    /// management token: what it printed, however it ended.
    pub fn weft_out(&self, k: usize, args: &[&str]) -> anyhow::Result<Output> {
        self.weft_as(k, &self.dcs[k].token, args)
    }

    /// `weft ARGS` in datacenter k's LAN against its server, with `token`
    /// (empty: none).
    pub fn weft_as(&self, k: usize, token: &str, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = Command::new(bin("weft"));
        cmd.arg(format!("--addr={}:8502", self.server_ip(k)))
            .arg(format!("--ca-file={}", self.path("ca.pem").display()))
            .arg(format!("--tls-server-name=server.{}.weft", DCS[k]))
            .args(args)
            .env_remove("WEFT_TOKEN");
        // In the environment, not on the command line (see Mesh::weft_as).
        if !token.is_empty() {
            cmd.env("WEFT_TOKEN", token);
        }
        let _ns = in_netns(&mut cmd, self.lan(k))?;
        run_bounded(&mut cmd, Duration::from_secs(15))
    }

    /// `GET path` on datacenter k's server's HTTPS API, with its
    /// management token: the status and the body.
    pub fn http_get(&self, k: usize, path: &str) -> anyhow::Result<(u16, String)> {
        self.http_get_as(k, &self.dcs[k].token, path)
    }

    /// Datacenter k's management token.
    pub fn token(&self, k: usize) -> &str {
        &self.dcs[k].token
    }

    /// [`Federation::http_get`] with `token` (empty: none sent).
    pub fn http_get_as(&self, k: usize, token: &str, path: &str) -> anyhow::Result<(u16, String)> {
        self.http_as(k, token, ("GET", path), None)
    }

    /// `method path` with `body` on datacenter k's server's HTTPS API, with
    /// `token` (empty: none sent): the status and the body.
    pub fn http_as(
        &self,
        k: usize,
        token: &str,
        (method, path): (&str, &str),
        body: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        self.http_within(k, token, (method, path), body, 5)
    }

    /// `GET path` with `token` on datacenter k's server, given up to
    /// `max_secs` (a blocking query): the status and the body.
    pub fn http_get_within(
        &self,
        k: usize,
        token: &str,
        path: &str,
        max_secs: u64,
    ) -> anyhow::Result<(u16, String)> {
        self.http_within(k, token, ("GET", path), None, max_secs)
    }

    fn http_within(
        &self,
        k: usize,
        token: &str,
        (method, path): (&str, &str),
        body: Option<&str>,
        max_secs: u64,
    ) -> anyhow::Result<(u16, String)> {
        let host = format!("server.{}.weft", DCS[k]);
        let resolve = format!("{host}:8500:{}", self.server_ip(k));
        let token = crate::mesh::token_header_in(self.dir.path(), token)?;
        let url = format!("https://{host}:8500{path}");
        let ca = self.path("ca.pem").display().to_string();
        let max = max_secs.to_string();
        let mut args = vec![
            "-s",
            "-m",
            &max,
            "-X",
            method,
            "--cacert",
            &ca,
            "--resolve",
            &resolve,
            "-H",
            &token,
            "-w",
            "\n%{http_code}",
        ];
        if let Some(body) = body {
            args.extend(["--data-binary", body]);
        }
        args.push(&url);
        let out = self.run_in(
            self.lan(k),
            "curl",
            &args,
            Duration::from_secs(max_secs + 5),
        )?;
        let (body, code) = out
            .stdout
            .rsplit_once('\n')
            .context("curl printed no status")?;
        Ok((
            code.trim().parse().context("curl's status")?,
            body.to_string(),
        ))
    }

    /// Runs the `weft` CLI in datacenter k's LAN against its server, with
    /// its management token.
    pub fn weft(&self, k: usize, args: &[&str]) -> anyhow::Result<String> {
        let out = self.weft_as(k, &self.dcs[k].token, args)?;
        ensure!(
            out.success(),
            "weft {args:?} in {}: {}",
            DCS[k],
            out.describe()
        );
        Ok(out.stdout)
    }

    /// The namespace of `place` in datacenter k.
    pub fn ns(&self, k: usize, place: Place) -> &Netns {
        match place {
            Place::Lan => &self.dcs[k].lan,
            Place::Gateway(j) => &self.dcs[k].gateways[j],
            Place::Second => self.dcs[k].second.as_ref().expect("a second node"),
        }
    }

    fn spawn(
        &mut self,
        k: usize,
        place: Place,
        name: &str,
        cmd: &mut Command,
    ) -> anyhow::Result<()> {
        let log = self.path(&format!("{name}.log"));
        let ns = self.ns(k, place);
        let proc = Proc::spawn_in(ns, cmd, log)?;
        self.dcs[k].procs.push((name.to_string(), proc));
        Ok(())
    }

    /// SIGKILLs the process started as `name` (a gateway `gw1-0`, `node-b`, a
    /// workload…).
    pub fn kill(&self, name: &str) -> anyhow::Result<()> {
        let pid = self
            .dcs
            .iter()
            .flat_map(|dc| dc.procs.iter())
            .find(|(n, _)| n == name)
            .and_then(|(_, p)| p.pid())
            .with_context(|| format!("no process {name} running"))?;
        // SAFETY: a signal to a child this federation started and has not
        // reaped (its Proc waits for it on drop).
        let rc = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        ensure!(rc == 0, "kill {name}: {}", std::io::Error::last_os_error());
        Ok(())
    }

    fn start_server(&mut self, k: usize) -> anyhow::Result<()> {
        let ip = self.server_ip(k);
        let name = DCS[k];
        let dir = self.dir.path().to_path_buf();
        let mut cmd = Command::new(bin("weft-server"));
        cmd.args([
            format!("--tls-ca-file={}", dir.join("ca.pem").display()),
            format!(
                "--tls-cert-file={}",
                dir.join(format!("{name}.pem")).display()
            ),
            format!(
                "--tls-key-file={}",
                dir.join(format!("{name}-key.pem")).display()
            ),
            format!("--datacenter={name}"),
            "--primary-datacenter=dc1".into(),
            "--node-id=1".into(),
            format!("--data-dir={}", dir.join(format!("{name}-data")).display()),
            format!("--raft-addr={ip}:8300"),
            format!("--grpc-addr={ip}:8502"),
            format!("--http-addr={ip}:8500"),
            format!("--federation-addr={ip}:8302"),
            format!("--peer=1={ip}:8300"),
            "--default-intention=allow".into(),
        ])
        .env(
            "RUST_LOG",
            "info,openraft=warn,weft_server::federation=debug",
        );
        if k == 1 {
            cmd.arg(format!("--primary-gateway={}", self.gateway_wan(0, 0)));
        }
        self.spawn(k, Place::Lan, &format!("{name}-server"), &mut cmd)?;
        let token = crate::servers::bootstrap_acl(Duration::from_secs(20), |args| {
            let mut full = vec![
                format!("--addr={ip}:8502"),
                format!("--ca-file={}", dir.join("ca.pem").display()),
                format!("--tls-server-name=server.{name}.weft"),
            ];
            full.extend(args.iter().map(|a| a.to_string()));
            let full: Vec<&str> = full.iter().map(String::as_str).collect();
            let out = self.run_in(self.lan(k), bin("weft"), &full, Duration::from_secs(10))?;
            Ok((out.success(), out.stdout, out.stderr))
        })?;
        self.dcs[k].token = token;
        Ok(())
    }

    /// A token for agent `node` of datacenter k, allowed `services`.
    fn agent_token(&self, k: usize, node: &str, services: &[String]) -> anyhow::Result<PathBuf> {
        let identity = format!("{node}:{}", DCS[k]);
        let mut args = vec![
            "--format",
            "json",
            "acl",
            "token",
            "create",
            "--node-identity",
            &identity,
        ];
        for s in services {
            args.extend(["--service-identity", s.as_str()]);
        }
        let created: serde_json::Value = serde_json::from_str(&self.weft(k, &args)?)?;
        let secret = created["secret_id"].as_str().context("no secret_id")?;
        let path = self.path(&format!("{node}.token"));
        write_private(&path, secret)?;
        Ok(path)
    }

    fn agent_toml(&self, k: usize, node: &str, advertise: &str, token: &Path) -> String {
        let dc = DCS[k];
        format!(
            "node_name = {node:?}\ndatacenter = {dc:?}\nservers = [\"{}:8502\"]\n\
             advertise_addr = {advertise:?}\ndata_dir = {:?}\n\
             token_file = {:?}\nca_file = {:?}\ntls_server_name = \"server.{dc}.weft\"\n",
            self.server_ip(k),
            self.path(&format!("{node}-data")).display().to_string(),
            token.display().to_string(),
            self.path("ca.pem").display().to_string(),
        )
    }

    fn start_agent(&mut self, k: usize, ns: Place, node: &str, toml: String) -> anyhow::Result<()> {
        let config = self.path(&format!("{node}.toml"));
        std::fs::write(&config, toml)?;
        let mut cmd = Command::new(bin("weft-agent"));
        cmd.arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info,weft_agent::gateway=debug");
        self.spawn(k, ns, node, &mut cmd)
    }

    /// The name of gateway j of datacenter k (its node and process).
    pub fn gateway_name(k: usize, j: usize) -> String {
        format!("gw{}-{j}", k + 1)
    }

    fn start_gateway(&mut self, k: usize, j: usize) -> anyhow::Result<()> {
        let node = Self::gateway_name(k, j);
        let token = self.agent_token(k, &node, &["mesh-gateway".to_string()])?;
        let toml = self.agent_toml(k, &node, &self.lan_ip(k, 2 + j), &token)
            + "ebpf = false\n"
            + &format!(
                "[gateway]\nlan_address = {:?}\nwan_address = {:?}\n",
                self.gateway_lan(k, j),
                self.gateway_wan(k, j)
            );
        self.start_agent(k, Place::Gateway(j), &node, toml)
    }

    fn start_node(&mut self, k: usize, node: &str, spec: &DcSpec) -> anyhow::Result<()> {
        let token = self.agent_token(k, node, &spec.service_names)?;
        let ip = self.lan_ip(k, 1);
        let mode = if spec.ebpf {
            let top = TestCgroup::under_root(&format!("weft-{}-{k}", self.base))?;
            let root = top.path().to_path_buf();
            self.cgroups.push(top);
            format!(
                "ebpf = true\ncgroup_root = {:?}\ndns_addr = \"127.0.0.1:53\"\n",
                root.display().to_string()
            )
        } else {
            "ebpf = false\n".to_string()
        };
        let toml =
            self.agent_toml(k, node, &ip, &token) + &mode + &spec.services.replace("NODE", &ip);
        self.start_agent(k, Place::Lan, node, toml)
    }

    /// The second node's agent (explicit mode), `node-c` in dc1 and
    /// `node-d` in dc2.
    fn start_second(&mut self, k: usize, services: &str, names: &[String]) -> anyhow::Result<()> {
        let node = if k == 0 { "node-c" } else { "node-d" };
        let token = self.agent_token(k, node, names)?;
        let ip = self.lan_ip(k, 100);
        let toml = self.agent_toml(k, node, &ip, &token)
            + "ebpf = false
" + &services.replace("NODE", &ip);
        self.start_agent(k, Place::Second, node, toml)
    }

    /// Runs `args` in datacenter k's LAN as a workload of `service` of its
    /// node agent (through `weft-agent exec`, which also points the
    /// command's resolver at the agent), bounded by 15 s.
    pub fn exec_as(&self, k: usize, service: &str, args: &[&str]) -> anyhow::Result<Output> {
        let node = if k == 0 { "node-a" } else { "node-b" };
        let config = self.path(&format!("{node}.toml"));
        let config = config.display().to_string();
        let mut full = vec![
            "exec",
            "--config",
            config.as_str(),
            "--service",
            service,
            "--",
        ];
        full.extend_from_slice(args);
        self.run_in(
            self.lan(k),
            bin("weft-agent"),
            &full,
            Duration::from_secs(15),
        )
    }

    /// Starts `weft-workload ADDR NAME` in datacenter k's LAN and waits
    /// until it answers.
    pub fn workload(&mut self, k: usize, name: &str, addr: &str) -> anyhow::Result<()> {
        self.workload_in(k, Place::Lan, name, addr)
    }

    /// [`Federation::workload`] in `place`'s namespace (checked from the
    /// LAN's).
    pub fn workload_in(
        &mut self,
        k: usize,
        place: Place,
        name: &str,
        addr: &str,
    ) -> anyhow::Result<()> {
        let mut cmd = Command::new(bin("weft-workload"));
        cmd.args([addr, name]);
        self.spawn(k, place, &format!("workload-{name}"), &mut cmd)?;
        let url = format!("http://{addr}/healthz");
        wait_until(Duration::from_secs(10), &format!("workload {name}"), || {
            Ok(self
                .curl(k, &["-s", "-m", "2", &url])?
                .success()
                .then_some(()))
        })
    }

    /// `curl ARGS` in datacenter k's LAN.
    pub fn curl(&self, k: usize, args: &[&str]) -> anyhow::Result<Output> {
        self.run_in(self.lan(k), "curl", args, Duration::from_secs(20))
    }

    /// The view of datacenter k's agent whose admin listens in `ns`, asked
    /// with k's management token (`/config` needs `operator:read`).
    pub fn agent_view(&self, k: usize, ns: &Netns) -> anyhow::Result<serde_json::Value> {
        let out = self.run_in(
            ns,
            "curl",
            &[
                "-s",
                "-m",
                "5",
                "-H",
                &crate::mesh::token_header_in(self.dir.path(), self.token(k))?,
                "http://127.0.0.1:15020/config",
            ],
            Duration::from_secs(10),
        )?;
        let v: serde_json::Value = serde_json::from_str(&out.stdout)
            .with_context(|| format!("agent /config: {}", out.describe()))?;
        Ok(v["view"].clone())
    }

    /// Waits until each datacenter's first gateway knows every gateway of
    /// both, and dc2's node trusts dc1's roots.
    fn wait_federated(&self) -> anyhow::Result<()> {
        let wans: Vec<Vec<String>> = (0..2)
            .map(|k| {
                (0..self.dcs[k].gateways.len())
                    .map(|j| self.gateway_wan(k, j))
                    .collect()
            })
            .collect();
        wait_until(
            Duration::from_secs(40),
            "the datacenters to know each other",
            || {
                for k in 0..2 {
                    let f = &self.agent_view(k, self.gateway(k, 0))?["federation"];
                    for (other, addrs) in wans.iter().enumerate() {
                        let mut known: Vec<String> = f[DCS[other]]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter_map(|v| v.as_str().map(String::from))
                                    .collect()
                            })
                            .unwrap_or_default();
                        known.sort();
                        let mut want = addrs.clone();
                        want.sort();
                        if known != want {
                            return Ok(None);
                        }
                    }
                }
                let (v1, v2) = (
                    self.agent_view(0, self.lan(0))?,
                    self.agent_view(1, self.lan(1))?,
                );
                Ok((!v1["roots_pem"].as_array().is_none_or(|r| r.is_empty())
                    && v2["roots_pem"] == v1["roots_pem"]
                    && v2["trust_domain"] == v1["trust_domain"])
                    .then_some(()))
            },
        )
    }

    /// Starts tcpdump on `iface` in `ns`.
    pub fn capture(
        &self,
        ns: &Netns,
        iface: &str,
        name: &str,
    ) -> anyhow::Result<crate::mesh::Capture> {
        crate::mesh::capture_on(ns, iface, &self.path(name))
    }
}
