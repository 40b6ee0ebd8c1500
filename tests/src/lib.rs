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
