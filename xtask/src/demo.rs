//! `cargo xtask demo`: weft end to end on this machine (root).
//!
//! It builds the workspace's binaries and runs `weft-demo` (tests crate,
//! `tests/src/bin/weft-demo.rs`): two nodes as network namespaces, a dev
//! server, two agents in eBPF mode and two workloads; web calls api by name,
//! an intention denies it, and the agents' metrics show both. The demo prints
//! every command it runs with its output, and removes everything it made at
//! the end, also when a step fails or on Ctrl-C. With `--datacenters`:
//! two datacenters federated through mesh gateways, web reaching api in the
//! other datacenter, and a failover there and back.
//!
//! xtask itself does not depend on the weft crates, so that it builds on a
//! machine without the eBPF toolchain (which `cargo xtask setup` installs).
use std::path::PathBuf;
use std::process::Command;

use anyhow::bail;

use crate::run::{cargo, describe, is_root, status, workspace_root};

/// Where cargo puts debug binaries (`CARGO_TARGET_DIR` or `target/`).
fn debug_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let target = if target.is_relative() {
        workspace_root().join(target)
    } else {
        target
    };
    target.join("debug")
}

pub fn run(datacenters: bool) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the demo loads eBPF programs and makes network namespaces and cgroups: run it as root"
        );
    }
    println!("== building weft's binaries (the agent embeds its eBPF programs)");
    status(cargo().args(["build", "--bins"]))?;
    let demo = debug_dir().join("weft-demo");
    if !demo.exists() {
        bail!("{} is missing after the build", demo.display());
    }
    let mut cmd = Command::new(&demo);
    cmd.current_dir(workspace_root());
    if datacenters {
        cmd.arg("--datacenters");
    }
    eprintln!("$ {}", describe(&cmd));
    let exit = cmd.status()?;
    if !exit.success() {
        bail!("the demo failed ({exit})");
    }
    Ok(())
}
