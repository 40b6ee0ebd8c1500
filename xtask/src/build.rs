//! `cargo xtask build-ebpf`: builds the eBPF programs. They are built by the
//! agent's build script (so that the agent always embeds a current object);
//! this command drives that build and says where the object is.
use std::path::PathBuf;

use anyhow::Context;

use crate::run::{cargo, status, workspace_root};

pub fn ebpf(release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "weft-agent"]);
    if release {
        cmd.arg("--release");
    }
    status(&mut cmd)?;
    let object = newest_object(if release { "release" } else { "debug" })?;
    let size = std::fs::metadata(&object)?.len();
    println!(
        "eBPF object: {} ({size} bytes), embedded in weft-agent",
        object.display()
    );
    Ok(())
}

/// The eBPF object that the agent's build script produced most recently.
fn newest_object(profile: &str) -> anyhow::Result<PathBuf> {
    let build_dir = workspace_root().join("target").join(profile).join("build");
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(&build_dir).context("reading target build dir")? {
        let path = entry?.path().join("out/weft-agent-ebpf");
        if let Ok(meta) = std::fs::metadata(&path) {
            let modified = meta.modified()?;
            if newest.as_ref().is_none_or(|(t, _)| modified > *t) {
                newest = Some((modified, path));
            }
        }
    }
    newest
        .map(|(_, p)| p)
        .context("the agent build produced no eBPF object")
}
