//! Two datacenters federated through mesh gateways. Each datacenter is a
//! LAN of two network namespaces: one runs its server and an agent, the
//! other an agent that is its mesh gateway. The two gateways alone share a
//! third link, the WAN. No namespace routes between the links (checked), so
//! the only way between the datacenters is through the gateways.
//!
//! dc1 is the primary; dc2's server knows only the WAN address of dc1's
//! gateway (`--primary-gateway`). Through the gateways dc2's leader reports
//! its gateway to dc1's servers and learns dc1's, so each datacenter's
//! gateway knows the other's, and a server of one datacenter is reached
//! from the other only with a server certificate.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};
use weft_tests::mesh::{run_bounded, wait_until, Proc};
use weft_tests::netns::Netns;
use weft_tests::require_root;
use weft_tests::servers::bin;

const GATEWAY_PORT: u16 = 8443;

/// One datacenter: `lan` (server and a node) and `gw` (its gateway).
struct Dc {
    name: &'static str,
    lan_prefix: String,
    procs: Vec<Proc>,
    token: String,
}

struct Federation {
    dcs: [Dc; 2],
    // Drop order: processes (in dcs) first, then namespaces, then files.
    netns: Vec<Netns>,
    dir: tempfile::TempDir,
    wan_prefix: String,
    /// Set at the end of a test that passed: otherwise the logs' tails are
    /// printed on drop.
    passed: bool,
}

impl Drop for Federation {
    fn drop(&mut self) {
        for dc in &mut self.dcs {
            dc.procs.clear();
        }
        if !self.passed {
            for entry in std::fs::read_dir(self.dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(25).collect();
                    eprintln!("--- {} ---", path.display());
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}

fn veth(a: &Netns, a_addr: &str, b: &Netns, b_addr: &str) -> anyhow::Result<()> {
    // Each namespace may hold several links: name each end after its peer.
    let a_if = format!("to-{}", &b.name()[b.name().len().saturating_sub(6)..]);
    let b_if = format!("to-{}", &a.name()[a.name().len().saturating_sub(6)..]);
    a.ip(&[
        "link",
        "add",
        &a_if,
        "type",
        "veth",
        "peer",
        "name",
        &b_if,
        "netns",
        &b.path().display().to_string(),
    ])?;
    a.ip(&["addr", "add", &format!("{a_addr}/24"), "dev", &a_if])?;
    a.ip(&["link", "set", &a_if, "up"])?;
    b.ip(&["addr", "add", &format!("{b_addr}/24"), "dev", &b_if])?;
    b.ip(&["link", "set", &b_if, "up"])?;
    Ok(())
}

impl Federation {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn lan(&self, dc: usize) -> &Netns {
        &self.netns[dc * 2]
    }

    fn gw(&self, dc: usize) -> &Netns {
        &self.netns[dc * 2 + 1]
    }

    fn server_ip(&self, dc: usize) -> String {
        format!("{}.1", self.dcs[dc].lan_prefix)
    }

    fn gateway_lan(&self, dc: usize) -> String {
        format!("{}.2:{GATEWAY_PORT}", self.dcs[dc].lan_prefix)
    }

    fn gateway_wan(&self, dc: usize) -> String {
        format!("{}.{}:{GATEWAY_PORT}", self.wan_prefix, dc + 1)
    }

    /// Runs the `weft` CLI in dc's LAN against its server.
    fn weft(&self, dc: usize, args: &[&str]) -> anyhow::Result<String> {
        let d = &self.dcs[dc];
        let mut cmd = Command::new(bin("weft"));
        cmd.arg(format!("--addr={}:8502", self.server_ip(dc)))
            .arg(format!("--ca-file={}", self.path("ca.pem").display()))
            .arg(format!("--tls-server-name=server.{}.weft", d.name));
        if !d.token.is_empty() {
            cmd.args(["--token", &d.token]);
        }
        cmd.args(args);
        let _ns = weft_tests::mesh::in_netns(&mut cmd, self.lan(dc))?;
        let out = run_bounded(&mut cmd, Duration::from_secs(10))?;
        ensure!(
            out.success(),
            "weft {args:?} in {}: {}",
            d.name,
            out.describe()
        );
        Ok(out.stdout)
    }

    fn start_server(&mut self, dc: usize) -> anyhow::Result<()> {
        let ip = self.server_ip(dc);
        let name = self.dcs[dc].name;
        let dir = self.dir.path();
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
        if dc == 1 {
            cmd.arg(format!("--primary-gateway={}", self.gateway_wan(0)));
        }
        let proc = Proc::spawn_in(
            self.lan(dc),
            &mut cmd,
            self.path(&format!("{name}-server.log")),
        )?;
        self.dcs[dc].procs.push(proc);
        let token = weft_tests::servers::bootstrap_acl(Duration::from_secs(20), |args| {
            let mut cmd = Command::new(bin("weft"));
            cmd.arg(format!("--addr={ip}:8502"))
                .arg(format!("--ca-file={}", dir.join("ca.pem").display()))
                .arg(format!("--tls-server-name=server.{name}.weft"))
                .args(args);
            let _ns = weft_tests::mesh::in_netns(&mut cmd, self.lan(dc))?;
            let out = run_bounded(&mut cmd, Duration::from_secs(10))?;
            Ok((out.success(), out.stdout, out.stderr))
        })?;
        self.dcs[dc].token = token;
        Ok(())
    }

    /// Starts an agent named `node` in dc (its LAN namespace, or its
    /// gateway's with `gateway`).
    fn start_agent(&mut self, dc: usize, node: &str, gateway: bool) -> anyhow::Result<()> {
        let name = self.dcs[dc].name;
        let mut args = vec![
            "--format".to_string(),
            "json".into(),
            "acl".into(),
            "token".into(),
            "create".into(),
            "--node-identity".into(),
            format!("{node}:{name}"),
        ];
        if gateway {
            args.extend(["--service-identity".into(), "mesh-gateway".into()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let created: serde_json::Value = serde_json::from_str(&self.weft(dc, &args)?)?;
        let secret = created["secret_id"].as_str().context("no secret_id")?;
        let token_file = self.path(&format!("{node}.token"));
        write_private(&token_file, secret)?;
        let advertise = if gateway {
            format!("{}.2", self.dcs[dc].lan_prefix)
        } else {
            self.server_ip(dc)
        };
        let mut toml = format!(
            "node_name = {node:?}\ndatacenter = {name:?}\nservers = [\"{}:8502\"]\n\
             advertise_addr = {advertise:?}\ndata_dir = {:?}\nebpf = false\n\
             token_file = {:?}\nca_file = {:?}\ntls_server_name = \"server.{name}.weft\"\n",
            self.server_ip(dc),
            self.path(&format!("{node}-data")).display().to_string(),
            token_file.display().to_string(),
            self.path("ca.pem").display().to_string(),
        );
        if gateway {
            toml += &format!(
                "[gateway]\nlan_address = {:?}\nwan_address = {:?}\n",
                self.gateway_lan(dc),
                self.gateway_wan(dc)
            );
        }
        let config = self.path(&format!("{node}.toml"));
        std::fs::write(&config, toml)?;
        let mut cmd = Command::new(bin("weft-agent"));
        cmd.arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info,weft_agent::gateway=debug");
        let ns = if gateway { self.gw(dc) } else { self.lan(dc) };
        let proc = Proc::spawn_in(ns, &mut cmd, self.path(&format!("{node}.log")))?;
        self.dcs[dc].procs.push(proc);
        Ok(())
    }

    /// The federation as the agent of `ns` sees it.
    fn agent_federation(&self, ns: &Netns) -> anyhow::Result<serde_json::Value> {
        Ok(self.agent_view(ns)?["federation"].clone())
    }

    /// What `openssl s_client` from dc's LAN, through its gateway's LAN
    /// address with SNI `name`, sees presented: the certificate's DNS and
    /// URI names and the certificates sent after it (PEM), if a handshake
    /// got that far.
    fn presented(&self, dc: usize, name: &str) -> anyhow::Result<Option<(String, String)>> {
        let mut cmd = Command::new("openssl");
        cmd.args([
            "s_client",
            "-connect",
            &self.gateway_lan(dc),
            "-servername",
            name,
            "-alpn",
            "h2",
            "-showcerts",
        ]);
        let _ns = weft_tests::mesh::in_netns(&mut cmd, self.lan(dc))?;
        let out = run_bounded(&mut cmd, Duration::from_secs(15))?;
        let begin = "-----BEGIN CERTIFICATE-----";
        let end = "-----END CERTIFICATE-----";
        let mut pems = Vec::new();
        let mut rest = out.stdout.as_str();
        while let (Some(from), Some(to)) = (rest.find(begin), rest.find(end)) {
            pems.push(format!("{}\n", &rest[from..to + end.len()]));
            rest = &rest[to + end.len()..];
        }
        let Some(leaf) = pems.first() else {
            return Ok(None);
        };
        let pem = self.path("presented.pem");
        std::fs::write(&pem, leaf)?;
        let text = run_bounded(
            Command::new("openssl").args([
                "x509",
                "-in",
                &pem.display().to_string(),
                "-noout",
                "-ext",
                "subjectAltName",
            ]),
            Duration::from_secs(10),
        )?;
        Ok(Some((text.stdout, pems[1..].concat())))
    }

    /// The view of the agent in `ns` (its `/config`).
    fn agent_view(&self, ns: &Netns) -> anyhow::Result<serde_json::Value> {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-m", "5", "http://127.0.0.1:15020/config"]);
        let _ns = weft_tests::mesh::in_netns(&mut cmd, ns)?;
        let out = run_bounded(&mut cmd, Duration::from_secs(10))?;
        let v: serde_json::Value = serde_json::from_str(&out.stdout)
            .with_context(|| format!("agent /config: {}", out.describe()))?;
        Ok(v["view"].clone())
    }
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
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

/// Whether a TCP connection from `ns` to `addr` is refused as unroutable
/// (no route), rather than reaching anything.
fn unreachable_from(ns: &Netns, addr: &str) -> anyhow::Result<bool> {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-m", "3", &format!("http://{addr}/")]);
    let _ns = weft_tests::mesh::in_netns(&mut cmd, ns)?;
    let out = run_bounded(&mut cmd, Duration::from_secs(10))?;
    // curl: 7 = could not connect (network unreachable at once).
    Ok(out.code() == Some(7))
}

#[test]
fn two_datacenters_federate_through_their_gateways_only() -> anyhow::Result<()> {
    require_root();
    let id = std::process::id() % 200 + 20;
    let base = weft_tests::unique_name("fd");
    let mut netns = Vec::new();
    for n in ["1l", "1g", "2l", "2g"] {
        netns.push(Netns::new(&format!("{base}{n}"))?);
    }
    let dir = tempfile::Builder::new().prefix("weft-fed-").tempdir()?;
    let mut fed = Federation {
        dcs: [
            Dc {
                name: "dc1",
                lan_prefix: format!("10.81.{id}"),
                procs: Vec::new(),
                token: String::new(),
            },
            Dc {
                name: "dc2",
                lan_prefix: format!("10.83.{id}"),
                procs: Vec::new(),
                token: String::new(),
            },
        ],
        netns,
        dir,
        wan_prefix: format!("10.82.{id}"),
        passed: false,
    };
    for dc in 0..2 {
        let prefix = fed.dcs[dc].lan_prefix.clone();
        veth(
            fed.lan(dc),
            &format!("{prefix}.1"),
            fed.gw(dc),
            &format!("{prefix}.2"),
        )?;
    }
    let wan = fed.wan_prefix.clone();
    veth(
        fed.gw(0),
        &format!("{wan}.1"),
        fed.gw(1),
        &format!("{wan}.2"),
    )?;

    // One CA for the servers' TLS, a certificate per datacenter.
    let ca = weft_api::tls_certs::create_ca("weft test CA", 2)?;
    std::fs::write(fed.path("ca.pem"), &ca.cert_pem)?;
    for name in ["dc1", "dc2"] {
        let cert = weft_api::tls_certs::create_server_cert(&ca, name, &[], &[], 2)?;
        std::fs::write(fed.path(&format!("{name}.pem")), &cert.cert_pem)?;
        write_private(&fed.path(&format!("{name}-key.pem")), &cert.key_pem)?;
    }

    // The LANs do not reach each other or the WAN.
    let dc2_server = format!("{}:8502", fed.server_ip(1));
    ensure!(
        unreachable_from(fed.lan(0), &dc2_server)?,
        "dc1's LAN reaches dc2's server directly"
    );
    ensure!(
        unreachable_from(fed.lan(0), &fed.gateway_wan(1))?,
        "dc1's LAN reaches dc2's gateway's WAN address"
    );
    ensure!(
        unreachable_from(fed.gw(0), &dc2_server)?,
        "dc1's gateway reaches dc2's LAN: it must only go through dc2's gateway"
    );

    fed.start_server(0)?;
    fed.start_server(1)?;
    fed.start_agent(0, "gw1", true)?;
    fed.start_agent(1, "gw2", true)?;
    fed.start_agent(0, "node-a", false)?;
    fed.start_agent(1, "node-b", false)?;

    // Each side's gateway learns the other's WAN address: dc2's leader
    // reported to dc1's servers through the gateways and took dc1's back.
    let (wan1, wan2) = (fed.gateway_wan(0), fed.gateway_wan(1));
    wait_until(
        Duration::from_secs(40),
        "both gateways to know both datacenters",
        || {
            let (f1, f2) = (
                fed.agent_federation(fed.gw(0))?,
                fed.agent_federation(fed.gw(1))?,
            );
            let knows = |f: &serde_json::Value, dc: &str, addr: &str| {
                f[dc]
                    .as_array()
                    .is_some_and(|a| a.len() == 1 && a[0] == addr)
            };
            Ok((knows(&f1, "dc2", &wan2)
                && knows(&f1, "dc1", &wan1)
                && knows(&f2, "dc1", &wan1)
                && knows(&f2, "dc2", &wan2))
            .then_some(()))
        },
    )?;

    // From dc1's LAN, through dc1's gateway, a TLS client naming dc2's
    // servers meets dc2's server certificate (the gateways did not
    // terminate TLS), and nothing without a server certificate gets past
    // the handshake (openssl presents none).
    let (seen, _) = fed
        .presented(0, "server.dc2.weft")?
        .context("no certificate came back from dc2's servers")?;
    ensure!(
        seen.contains("DNS:server.dc2.weft"),
        "dc2's servers presented: {seen}"
    );
    let mut cmd = Command::new(bin("weft"));
    cmd.args([
        &format!("--addr={}", fed.gateway_lan(0)),
        &format!("--ca-file={}", fed.path("ca.pem").display()),
        "--tls-server-name=server.dc2.weft",
        "--token",
        &fed.dcs[1].token.clone(),
        "catalog",
        "services",
    ]);
    let _ns = weft_tests::mesh::in_netns(&mut cmd, fed.lan(0))?;
    let out = run_bounded(&mut cmd, Duration::from_secs(15))?;
    ensure!(
        !out.success(),
        "a client without a server certificate used dc2's servers through the gateways: {}",
        out.describe()
    );

    // One trust domain: dc2 signs with an intermediate of dc1's root. dc2's
    // node, reached from dc1's LAN through both gateways by its name,
    // presents a certificate of dc2 that verifies against dc1's roots with
    // the intermediate it sends.
    let (td, roots) = wait_until(
        Duration::from_secs(30),
        "dc2's agents to trust dc1's roots",
        || {
            let (v1, v2) = (fed.agent_view(fed.lan(0))?, fed.agent_view(fed.lan(1))?);
            let td = v1["trust_domain"].as_str().unwrap_or_default().to_string();
            Ok((!td.is_empty()
                && v2["trust_domain"] == v1["trust_domain"]
                && v2["roots_pem"] == v1["roots_pem"])
                .then(|| (td, v1["roots_pem"].clone())))
        },
    )?;
    let roots: String = roots
        .as_array()
        .context("no roots")?
        .iter()
        .filter_map(|r| r.as_str())
        .collect();
    let node_b = format!("spiffe://{td}/ns/default/dc/dc2/node/node-b");
    let (names, chain) = wait_until(Duration::from_secs(30), "node-b's dc2 certificate", || {
        Ok(fed
            .presented(0, &format!("node-b.dc2.node.{td}"))?
            .filter(|(names, _)| names.contains(&node_b)))
    })?;
    ensure!(!chain.is_empty(), "node-b sent no intermediate: {names}");
    std::fs::write(fed.path("roots.pem"), &roots)?;
    std::fs::write(fed.path("chain.pem"), &chain)?;
    let verify = run_bounded(
        Command::new("openssl").args([
            "verify",
            "-CAfile",
            &fed.path("roots.pem").display().to_string(),
            "-untrusted",
            &fed.path("chain.pem").display().to_string(),
            &fed.path("presented.pem").display().to_string(),
        ]),
        Duration::from_secs(10),
    )?;
    ensure!(
        verify.success(),
        "node-b's certificate does not chain to dc1's roots: {}",
        verify.describe()
    );
    fed.passed = true;
    Ok(())
}
