//! `cargo xtask fuzz [--seconds N] [TARGET…]`: runs the cargo-fuzz targets
//! of `fuzz/` (every parser that sees untrusted bytes: the HBONE CONNECT
//! request, L7 path normalization and matching, DNS messages, config
//! entries, ACL rules) with the nightly toolchain, each for N seconds.
//! Seeds come from `fuzz/seeds/<target>/`; what the fuzzer learns stays in
//! `target/fuzz-corpus/<target>/`. A crash fails the command, and libFuzzer
//! leaves the input under `fuzz/artifacts/<target>/` for a regression test.
use std::process::Command;

use anyhow::bail;

use crate::run::{status, workspace_root};

/// Every fuzz target, as named in fuzz/Cargo.toml.
pub const TARGETS: &[&str] = &[
    "connect_request",
    "http_path",
    "dns_message",
    "config_entry",
    "acl_rules",
    "client_hello",
];

/// Seconds per target when `cargo xtask test` runs them.
pub const SECONDS_IN_TEST: u64 = 15;

pub fn run(seconds: u64, only: &[String]) -> anyhow::Result<()> {
    for name in only {
        if !TARGETS.contains(&name.as_str()) {
            bail!(
                "no fuzz target {name:?}; the targets are {}",
                TARGETS.join(", ")
            );
        }
    }
    let root = workspace_root();
    for target in TARGETS
        .iter()
        .filter(|t| only.is_empty() || only.iter().any(|o| o == *t))
    {
        let corpus = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&root)
            .args(["+nightly", "fuzz", "run", target])
            .arg(&corpus);
        let seeds = root.join("fuzz/seeds").join(target);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
        ]);
        status(&mut cmd)?;
    }
    Ok(())
}
