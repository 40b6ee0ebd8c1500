//! Helpers for weft's end-to-end tests: weft-server clusters as processes,
//! network namespaces, cgroups, processes placed in both, and a capture of
//! the tracing logs.
//!
//! Tests that use them need root. They call [`require_root`] first, which fails
//! the test with a message saying so: a privileged test never passes without
//! running.

pub mod cgroup;
pub mod echo;
pub mod logs;
pub mod mesh;
pub mod netns;
pub mod relay;
pub mod servers;

/// Fails the calling test unless it runs as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this test needs root (eBPF, network namespaces, cgroups) and was NOT run: \
         run `cargo xtask test` as root"
    );
}

/// A name unique to this test process and `tag`, short enough for interface
/// and namespace names.
pub fn unique_name(tag: &str) -> String {
    format!("wt{}{tag}", std::process::id() % 100_000)
}

/// Runs `promtool check metrics` (Debian's `prometheus` package, installed
/// by `cargo xtask setup`) on `text`; an error carries what promtool said.
pub fn promtool_check(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("promtool (run `cargo xtask setup`): {e}"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- input:\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
