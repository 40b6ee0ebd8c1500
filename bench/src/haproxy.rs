//! The mutual-TLS proxy baseline: two HAProxy instances (Debian's), one per
//! node, in TCP mode like weft's tunnel.
//!
//! - node A: plain TCP frontends on 127.0.0.1 (one per destination), each
//!   to a backend on node B's haproxy with `ssl crt A ca-file CA verify
//!   required` (client certificate, server verified against the CA);
//! - node B: TLS frontends on node B's address with `verify required`
//!   (client certificates checked against the CA), to the workloads.
//!
//! Certificates (ECDSA P-256, like weft's) are made with openssl in the
//! mesh's directory. Unlike weft, HAProxy opens one TLS connection to node B
//! per client connection (TLS sessions resumed) instead of multiplexing
//! tunnels over a pooled one.
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use weft_tests::mesh::{run_bounded, Mesh, NodeA, NodeB, Proc};

/// A frontend on node A's 127.0.0.1:`local_port` carried to `target` (an
/// address on node B) through node B's TLS port `tls_port`.
pub struct Route {
    pub local_port: u16,
    pub tls_port: u16,
    pub target: String,
}

pub struct Haproxy {
    pub a: Proc,
    pub b: Proc,
}

impl Haproxy {
    pub fn pids(&self) -> Vec<u32> {
        [self.a.pid(), self.b.pid()].into_iter().flatten().collect()
    }
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new("openssl");
    cmd.current_dir(dir).args(args);
    let out = run_bounded(&mut cmd, Duration::from_secs(20))?;
    if !out.success() {
        bail!("openssl {}: {}", args.join(" "), out.stderr.trim());
    }
    Ok(())
}

/// A CA and one client/server certificate per node, as `NAME.pem` (chain
/// and key) in `dir`.
fn certificates(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=bench-ca",
        "-days",
        "2",
    ]);
    openssl(dir, &ca)?;
    std::fs::write(
        dir.join("leaf.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
         extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:node-a,DNS:node-b\n",
    )?;
    for node in ["node-a", "node-b"] {
        let (key, csr, crt) = (
            format!("{node}.key"),
            format!("{node}.csr"),
            format!("{node}.crt"),
        );
        let subj = format!("/CN={node}");
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &req)?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "leaf.ext",
                "-out",
                &crt,
            ],
        )?;
        let pem =
            std::fs::read_to_string(dir.join(&crt))? + &std::fs::read_to_string(dir.join(&key))?;
        std::fs::write(dir.join(format!("{node}.pem")), pem)?;
    }
    Ok(())
}

const HEAD: &str = "global\n  maxconn 4000\n\
defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n";

/// Writes the certificates and both configurations, starts both haproxys in
/// their nodes and waits until `check_port`'s route answers HTTP.
pub fn start(mesh: &Mesh, routes: &[Route], check_port: u16) -> anyhow::Result<Haproxy> {
    let dir = mesh.path("haproxy");
    certificates(&dir)?;
    let d = dir.display();
    let b_ip = mesh.ip(NodeB);
    let mut a = String::from(HEAD);
    let mut b = String::from(HEAD);
    for (i, r) in routes.iter().enumerate() {
        a += &format!(
            "frontend fa{i}\n  bind 127.0.0.1:{}\n  default_backend ba{i}\n\
             backend ba{i}\n  server b {b_ip}:{} ssl crt {d}/node-a.pem ca-file {d}/ca.pem verify required verifyhost node-b\n",
            r.local_port, r.tls_port
        );
        b += &format!(
            "frontend fb{i}\n  bind {b_ip}:{} ssl crt {d}/node-b.pem ca-file {d}/ca.pem verify required\n  default_backend bb{i}\n\
             backend bb{i}\n  server w {}\n",
            r.tls_port, r.target
        );
    }
    std::fs::write(dir.join("a.cfg"), a)?;
    std::fs::write(dir.join("b.cfg"), b)?;
    for cfg in ["a.cfg", "b.cfg"] {
        let out = run_bounded(
            Command::new("haproxy")
                .args(["-c", "-q", "-f"])
                .arg(dir.join(cfg)),
            Duration::from_secs(10),
        )?;
        if !out.success() {
            bail!("haproxy -c {cfg}: {}{}", out.stdout, out.stderr);
        }
    }
    let spawn = |node, cfg: &str, log: &str| {
        mesh.spawn(
            node,
            Command::new("haproxy")
                .arg("-db")
                .arg("-f")
                .arg(dir.join(cfg)),
            log,
        )
    };
    let haproxy = Haproxy {
        b: spawn(NodeB, "b.cfg", "haproxy-b.log")?,
        a: spawn(NodeA, "a.cfg", "haproxy-a.log")?,
    };
    let url = format!("http://127.0.0.1:{check_port}/healthz");
    weft_tests::mesh::wait_until(Duration::from_secs(10), "haproxy mTLS route", || {
        Ok(mesh.curl_with(NodeA, &url, &["-m", "2"]).ok().map(|_| ()))
    })
    .with_context(|| {
        format!(
            "haproxy logs:\n{}\n{}",
            mesh.log("haproxy-a.log"),
            mesh.log("haproxy-b.log")
        )
    })?;
    Ok(haproxy)
}
