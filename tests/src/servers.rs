//! weft-server processes for tests: a cluster on loopback, each server with
//! its own data dir, started, killed (SIGKILL), wiped and restarted at will,
//! and the `weft` CLI pointed at them. Processes are killed on drop.
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

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
    pub data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

pub struct Cluster {
    _dir: tempfile::TempDir,
    pub servers: Vec<Server>,
    extra_args: Vec<String>,
}

impl Cluster {
    /// Starts `n` servers that form one cluster, and waits for a leader.
    pub fn start(n: u64, extra_args: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let servers = (1..=n)
            .map(|id| Server {
                id,
                raft_addr: format!("127.0.0.1:{}", free_port()),
                grpc_addr: format!("127.0.0.1:{}", free_port()),
                data_dir: dir.path().join(format!("server-{id}")),
                log: dir.path().join(format!("server-{id}.log")),
                child: None,
            })
            .collect();
        let mut cluster = Cluster {
            _dir: dir,
            servers,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        for id in 1..=n {
            cluster.start_server(id)?;
        }
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
            .map(|s| format!("--peer={}={}", s.id, s.raft_addr))
            .collect();
        let extra = self.extra_args.clone();
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

    /// Runs the `weft` CLI against `addr`.
    pub fn cli_at(&self, addr: &str, args: &[&str]) -> Output {
        Command::new(bin("weft"))
            .arg(format!("--addr={addr}"))
            .args(args)
            .output()
            .expect("running weft")
    }

    /// Runs the CLI against every running server (failover) and requires success.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli_at(&self.addrs(), args);
        if !out.status.success() {
            bail!(
                "weft {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The current leader's id, from `weft members` on any running server.
    pub fn leader(&self) -> Option<u64> {
        let out = self.cli(&["members", "--format", "json"]).ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v["leader_id"].as_u64().filter(|id| *id > 0)
    }

    pub fn wait_for_leader(&self, limit: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(id) = self.leader() {
                return Ok(id);
            }
            if Instant::now() > deadline {
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
                bail!("no leader within {limit:?}\n{}", logs.join("\n"));
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
