//! `cargo xtask setup`: checks what building and testing weft needs and
//! installs what is missing, one line per step: present / installed / failed.
//!
//! * the nightly toolchain and its rust-src component (eBPF is built with
//!   `-Z build-std=core`);
//! * Debian packages: LLVM 22 (for bpf-linker), and the tools the tests and
//!   benchmarks drive (iproute2, openssl, tcpdump, curl, python3 and
//!   python3-venv, iperf3, haproxy, wrk,
//!   sslscan, prometheus for promtool, dig, chromium and chromium-driver for
//!   the web UI's browser test);
//! * bpf-linker, built against Debian's LLVM 22;
//! * cargo-fuzz, which runs the fuzz targets of `fuzz/` (`cargo install`);
//! * Consul's client libraries the compatibility tests drive, pinned, under
//!   `target/test-clients/`: the Python `py-consul` package in a virtualenv
//!   (`py/`, from PyPI) and the npm `consul` package (`js/`, from npm).
use std::path::Path;
use std::process::Command;

use anyhow::bail;

use crate::run::{output, succeeds};

/// Debian packages weft's build, tests and benchmarks use, with why.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "LLVM for bpf-linker"),
    ("libpolly-22-dev", "LLVM's Polly, linked by bpf-linker"),
    ("zlib1g-dev", "linked by bpf-linker"),
    ("libzstd-dev", "linked by bpf-linker"),
    ("iproute2", "network namespaces and veth in tests"),
    ("util-linux", "nsenter in the demo"),
    ("openssl", "certificate checks in tests"),
    ("tcpdump", "packet captures in tests"),
    ("curl", "HTTP clients in tests and the demo"),
    (
        "python3",
        "scripts in tests (py-consul's, a connection holder, a stand-in DNS upstream)",
    ),
    ("python3-venv", "the virtualenv py-consul is installed into"),
    ("iperf3", "bulk throughput in benchmarks"),
    ("haproxy", "the mTLS proxy baseline in benchmarks"),
    ("wrk", "HTTP load in benchmarks"),
    (
        "prometheus",
        "promtool, which checks the metrics agents and servers expose, in tests",
    ),
    (
        "sslscan",
        "checks the TLS versions and ciphers servers offer, in tests",
    ),
    (
        "bind9-dnsutils",
        "dig, which asks the agents' DNS for SRV, tags, nodes and PTR in tests",
    ),
    ("chromium", "the headless browser the web UI's test drives"),
    (
        "chromium-driver",
        "chromedriver, the WebDriver server that test speaks to",
    ),
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const PY_CONSUL_VERSION: &str = "1.8.0";
const NPM_CONSUL_VERSION: &str = "2.0.1";
const CARGO_FUZZ_VERSION: &str = "0.13.2";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

enum Step {
    Present(String),
    Installed(String),
}

fn report(name: &str, result: anyhow::Result<Step>) -> bool {
    match result {
        Ok(Step::Present(what)) => {
            println!("setup: {name:<24} present ({what})");
            true
        }
        Ok(Step::Installed(what)) => {
            println!("setup: {name:<24} installed ({what})");
            true
        }
        Err(e) => {
            println!("setup: {name:<24} FAILED: {e:#}");
            false
        }
    }
}

pub fn run() -> anyhow::Result<()> {
    let mut ok = true;
    ok &= report("nightly toolchain", nightly());
    ok &= report("nightly rust-src", rust_src());
    ok &= report("debian packages", debian_packages());
    ok &= report("bpf-linker", bpf_linker());
    ok &= report("cargo-fuzz", cargo_fuzz());
    ok &= report("py-consul", py_consul());
    ok &= report("npm consul", npm_consul());
    if !ok {
        bail!("setup failed: see the FAILED lines above");
    }
    Ok(())
}

fn nightly() -> anyhow::Result<Step> {
    if let Ok(out) = output(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        if out.status.success() {
            return Ok(Step::Present(
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            ));
        }
    }
    println!("setup: installing the nightly toolchain with rustup");
    if !succeeds(Command::new("rustup").args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ])) {
        bail!("`rustup toolchain install nightly` failed");
    }
    Ok(Step::Installed("rustup toolchain install nightly".into()))
}

fn rust_src() -> anyhow::Result<Step> {
    let out =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let core = Path::new(&sysroot).join("lib/rustlib/src/rust/library/core");
    if core.exists() {
        return Ok(Step::Present(core.display().to_string()));
    }
    println!("setup: installing rust-src for nightly with rustup");
    if !succeeds(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ])) {
        bail!("`rustup component add rust-src --toolchain nightly` failed");
    }
    Ok(Step::Installed("rustup component add rust-src".into()))
}

fn debian_installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .map(|o| String::from_utf8_lossy(&o.stdout).ends_with("install ok installed"))
        .unwrap_or(false)
}

fn debian_packages() -> anyhow::Result<Step> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !debian_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(Step::Present(format!("{} packages", DEBIAN_PACKAGES.len())));
    }
    for (p, why) in DEBIAN_PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
        println!("setup: installing {p} ({why})");
    }
    if !crate::run::is_root() {
        bail!("installing {} needs root (apt-get)", missing.join(" "));
    }
    let update = output(Command::new("apt-get").args(["update", "-q"]))?;
    if !update.status.success() {
        bail!(
            "apt-get update: {}",
            String::from_utf8_lossy(&update.stderr).trim()
        );
    }
    let install = output(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )?;
    if !install.status.success() {
        let stderr = String::from_utf8_lossy(&install.stderr);
        bail!("apt-get install {}: {}", missing.join(" "), stderr.trim());
    }
    Ok(Step::Installed(missing.join(" ")))
}

fn bpf_linker() -> anyhow::Result<Step> {
    if let Ok(out) = output(Command::new("bpf-linker").arg("--version")) {
        if out.status.success() {
            return Ok(Step::Present(
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            ));
        }
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (cargo install, a few minutes)"
    );
    let out = output(
        Command::new("cargo")
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .args([
                "install",
                "--locked",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            ])
            .args(["--no-default-features", "--features", "llvm-22"]),
    )?;
    if !out.status.success() {
        bail!("cargo install bpf-linker failed:\n{}", stderr_tail(&out));
    }
    Ok(Step::Installed(format!("bpf-linker {BPF_LINKER_VERSION}")))
}

fn cargo_fuzz() -> anyhow::Result<Step> {
    if let Ok(out) = output(Command::new("cargo").args(["fuzz", "--version"])) {
        if out.status.success() {
            return Ok(Step::Present(
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            ));
        }
    }
    println!("setup: building cargo-fuzz {CARGO_FUZZ_VERSION} (cargo install, a minute or two)");
    let out = output(Command::new("cargo").args([
        "install",
        "--locked",
        &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
    ]))?;
    if !out.status.success() {
        bail!("cargo install cargo-fuzz failed:\n{}", stderr_tail(&out));
    }
    Ok(Step::Installed(format!("cargo-fuzz {CARGO_FUZZ_VERSION}")))
}

/// Where the client libraries of the compatibility tests live.
pub fn test_clients() -> std::path::PathBuf {
    crate::run::workspace_root().join("target/test-clients")
}

/// The tail of a failed command's stderr, for the FAILED line.
fn stderr_tail(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

fn py_consul() -> anyhow::Result<Step> {
    let venv = test_clients().join("py");
    let python = venv.join("bin/python");
    let check = format!(
        "import importlib.metadata as m; assert m.version('py-consul') == '{PY_CONSUL_VERSION}'"
    );
    if succeeds(Command::new(&python).args(["-c", &check])) {
        return Ok(Step::Present(format!(
            "py-consul {PY_CONSUL_VERSION} in {}",
            venv.display()
        )));
    }
    println!(
        "setup: installing py-consul {PY_CONSUL_VERSION} from PyPI into {}",
        venv.display()
    );
    let out = output(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    if !out.status.success() {
        bail!("python3 -m venv failed:\n{}", stderr_tail(&out));
    }
    let out = output(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("py-consul=={PY_CONSUL_VERSION}"),
    ]))?;
    if !out.status.success() {
        bail!("pip install py-consul failed:\n{}", stderr_tail(&out));
    }
    Ok(Step::Installed(format!("py-consul {PY_CONSUL_VERSION}")))
}

fn npm_consul() -> anyhow::Result<Step> {
    let prefix = test_clients().join("js");
    let manifest = prefix.join("node_modules/consul/package.json");
    let wanted = format!("\"version\": \"{NPM_CONSUL_VERSION}\"");
    if std::fs::read_to_string(&manifest).is_ok_and(|m| m.contains(&wanted)) {
        return Ok(Step::Present(format!(
            "consul {NPM_CONSUL_VERSION} in {}",
            prefix.display()
        )));
    }
    println!(
        "setup: installing the npm consul client {NPM_CONSUL_VERSION} into {}",
        prefix.display()
    );
    std::fs::create_dir_all(&prefix)?;
    let out = output(
        Command::new("npm")
            .arg("install")
            .arg("--prefix")
            .arg(&prefix)
            .args([
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                &format!("consul@{NPM_CONSUL_VERSION}"),
            ]),
    )?;
    if !out.status.success() {
        bail!("npm install consul failed:\n{}", stderr_tail(&out));
    }
    Ok(Step::Installed(format!(
        "consul {NPM_CONSUL_VERSION} (npm)"
    )))
}
