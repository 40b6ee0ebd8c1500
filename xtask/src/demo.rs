//! `cargo xtask demo`: weft's data path, visibly, in a network namespace.
//!
//! It builds the agent, makes a network namespace and a cgroup subtree with
//! two workload cgroups ("web", a mesh workload, and "other", not one), starts
//! `weft-agent redirect` there, and connects from both to a virtual IP that
//! exists nowhere: web's connection is taken over by the agent, which tells
//! where it was going and from which cgroup; other's goes nowhere. Everything
//! it made is removed at the end, also when a step fails.
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};

use crate::run::{cargo, is_root, output, status, workspace_root};

const NETNS: &str = "weft-demo";
const VIP: &str = "240.0.0.10";

struct Demo {
    cgroup: PathBuf,
    agent: Option<Child>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        println!("\n== cleaning up: agent, cgroups, network namespace");
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        for dir in ["web", "other", ""] {
            let path = self.cgroup.join(dir);
            let _ = std::fs::write(path.join("cgroup.kill"), "1");
            for _ in 0..100 {
                if !path.exists() || std::fs::remove_dir(&path).is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        let _ = output(Command::new("ip").args(["netns", "del", NETNS]));
    }
}

fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let out = output(Command::new("findmnt").args(["-n", "-t", "cgroup2", "-o", "TARGET"]))?;
    let first = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_string);
    first
        .map(PathBuf::from)
        .context("no cgroup2 mount: weft needs the unified cgroup-v2 hierarchy")
}

fn in_netns(program: &Path) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{NETNS}")).arg(program);
    cmd
}

/// `weft-probe connect VIP:80` from inside `cgroup`, in the namespace.
fn probe_from(cgroup: &Path, probe: &Path) -> anyhow::Result<(bool, String)> {
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec {} connect {VIP}:80 hello",
        cgroup.display(),
        probe.display()
    );
    let out = output(in_netns(Path::new("sh")).args(["-c", &script]))?;
    let text = String::from_utf8_lossy(if out.status.success() {
        &out.stdout
    } else {
        &out.stderr
    });
    Ok((out.status.success(), text.trim().to_string()))
}

pub fn run() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo loads eBPF programs and makes network namespaces: run it as root");
    }
    println!("== building weft-agent (with its eBPF programs) and the test probe");
    status(cargo().args([
        "build",
        "--package",
        "weft-agent",
        "--package",
        "weft-tests",
        "--bins",
    ]))?;
    let bin = workspace_root().join("target/debug");
    let (agent_bin, probe_bin) = (bin.join("weft-agent"), bin.join("weft-probe"));

    let mut demo = Demo {
        cgroup: cgroup2_mount()?.join("weft-demo"),
        agent: None,
    };
    println!(
        "== network namespace {NETNS} (loopback only, no routes) and cgroups under {}",
        demo.cgroup.display()
    );
    let _ = output(Command::new("ip").args(["netns", "del", NETNS]));
    status(Command::new("ip").args(["netns", "add", NETNS]))?;
    status(Command::new("ip").args(["-n", NETNS, "link", "set", "lo", "up"]))?;
    for dir in ["", "web", "other"] {
        let path = demo.cgroup.join(dir);
        if !path.exists() {
            std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        }
    }

    println!("== starting weft-agent: workload cgroup web, virtual IP {VIP} taken over to 127.0.0.1:15001");
    let mut agent = in_netns(&agent_bin)
        .args(["redirect", "--cgroup-root"])
        .arg(&demo.cgroup)
        .arg("--workload-cgroup")
        .arg(demo.cgroup.join("web"))
        .args([
            "--take-over",
            VIP,
            "--listen",
            "127.0.0.1:15001",
            "--count",
            "1",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting weft-agent")?;
    let stdout = agent.stdout.take().context("agent stdout")?;
    demo.agent = Some(agent);
    let mut lines = BufReader::new(stdout).lines();
    match lines.next() {
        Some(Ok(line)) => println!("agent: {line}"),
        _ => bail!("weft-agent did not start (see its log above)"),
    }

    println!("\n== a process in cgroup web connects to {VIP}:80");
    let (ok, text) = probe_from(&demo.cgroup.join("web"), &probe_bin)?;
    println!("web got: {text}");
    if !ok || !text.starts_with("redirected:") {
        bail!("web's connection was not redirected");
    }

    println!("\n== a process in cgroup other (not a mesh workload) connects to {VIP}:80");
    let (ok, text) = probe_from(&demo.cgroup.join("other"), &probe_bin)?;
    println!("other got: {text}");
    if ok {
        bail!("other's connection should not have been taken over");
    }
    println!("(untouched: {VIP} does not exist in the namespace, so the connection fails)");

    if let Some(mut agent) = demo.agent.take() {
        agent.wait()?;
    }
    println!(
        "\n== done: the eBPF program's log line `redirect cgroup …` is in the agent's log above"
    );
    Ok(())
}
