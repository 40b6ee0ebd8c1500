//! `cargo xtask bench [--quick]`: the per-node overhead benchmark (issue 7).
//!
//! After `cargo xtask setup` (haproxy, wrk, iperf3 come from Debian), it
//! checks for the one tool Debian does not have, `oha` (an open-loop HTTP
//! load generator with latency percentiles and JSON output; from crates.io,
//! `cargo install --locked oha`), printing present / installed like setup
//! does. Then it builds the release binaries and runs
//! `target/release/weft-bench view [--quick]` (what one change costs the
//! agent's view at the large mesh's size, in process: seconds) and
//! `target/release/weft-bench node [--quick]`, which measure and write
//! bench/results/view.{md,json} and node.{md,json} (bench/README.md says
//! how to read them).
use std::process::Command;

use anyhow::bail;

use crate::run::{cargo, is_root, output, status, workspace_root};

const OHA_VERSION: &str = "1.16.0";

pub fn run(quick: bool) -> anyhow::Result<()> {
    match oha() {
        Ok(what) => println!("bench: {:<24} {what}", "oha"),
        Err(e) => {
            println!("bench: {:<24} FAILED: {e:#}", "oha");
            bail!("bench setup failed: see the FAILED line above");
        }
    }
    if !is_root() {
        bail!("the node benchmark needs root (network namespaces, eBPF, cgroups)");
    }
    status(cargo().args(["build", "--release", "--bins"]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| workspace_root().join(d))
        .unwrap_or_else(|| workspace_root().join("target"));
    let bench = target.join("release/weft-bench");
    for what in ["view", "node"] {
        let mut cmd = Command::new(&bench);
        cmd.arg(what).current_dir(workspace_root());
        if quick {
            cmd.arg("--quick");
        }
        status(&mut cmd)?;
    }
    Ok(())
}

/// `oha` on the PATH or in cargo's bin directory; installed with cargo if absent.
fn oha() -> anyhow::Result<String> {
    if let Some(v) = oha_version() {
        return Ok(format!("present ({v})"));
    }
    println!("bench: installing oha {OHA_VERSION} with cargo install (a few minutes, once)");
    let out = output(cargo().args(["install", "--locked", &format!("oha@{OHA_VERSION}")]))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        bail!(
            "cargo install oha failed:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    match oha_version() {
        Some(v) => Ok(format!("installed ({v})")),
        None => bail!("cargo install oha succeeded but oha does not run"),
    }
}

fn oha_version() -> Option<String> {
    let out = output(Command::new("oha").arg("--version")).ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
