//! Builds weft's eBPF programs (`agent-ebpf`) for `bpfel-unknown-none` and puts
//! the object in OUT_DIR, where `src/ebpf/loader.rs` embeds it. The object is
//! rebuilt whenever the eBPF or common crates change, so the agent never ships a
//! stale one. When the eBPF toolchain is missing, the build stops here with a
//! message that says what to run, before any confusing compiler or linker error.
use std::path::Path;
use std::process::{exit, Command};

fn main() {
    let missing = missing_toolchain();
    if !missing.is_empty() {
        eprintln!();
        eprintln!("error: weft-agent embeds eBPF programs, and this machine cannot build them:");
        for m in &missing {
            eprintln!("  - {m}");
        }
        eprintln!(
            "run `cargo xtask setup` to install what is missing (or `cargo xtask build-ebpf`,"
        );
        eprintln!("which runs the setup first), then build again.");
        exit(1);
    }
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    let ebpf_dir = Path::new(&manifest).join("../agent-ebpf");
    let common_dir = Path::new(&manifest).join("../agent-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    let package = aya_build::Package {
        name: "weft-agent-ebpf",
        root_dir: ebpf_dir.to_str().expect("utf-8 path"),
        ..Default::default()
    };
    // aya-build replays everything the nested cargo prints as a warning (and
    // cargo repeats those on every build): keep it to errors.
    std::env::set_var("CARGO_TERM_QUIET", "true");
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::default()) {
        eprintln!("error: building the eBPF programs failed: {e:#}");
        eprintln!("`cargo xtask build-ebpf` shows the full compiler output.");
        exit(1);
    }
}

/// What the eBPF build needs and does not find: the nightly toolchain with
/// rust-src, and bpf-linker on PATH.
fn missing_toolchain() -> Vec<String> {
    let mut missing = Vec::new();
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output();
    match sysroot {
        Ok(out) if out.status.success() => {
            let root = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let src = Path::new(&root).join("lib/rustlib/src/rust/library/core");
            if !src.exists() {
                missing.push("the nightly toolchain's rust-src component".to_string());
            }
        }
        _ => missing.push("the nightly Rust toolchain (rustup run nightly rustc)".to_string()),
    }
    if which::which("bpf-linker").is_err() {
        missing.push("bpf-linker (not on PATH)".to_string());
    }
    missing
}
