//! Helpers for weft's end-to-end tests: weft-server clusters as processes,
//! network namespaces, cgroups, processes placed in both, and a capture of
//! the tracing logs.
//!
//! Tests that use them need root. They call [`require_root`] first, which fails
//! the test with a message saying so: a privileged test never passes without
//! running.

pub mod browser;
pub mod cgroup;
pub mod clients;
pub mod echo;
pub mod federation;
pub mod leftovers;
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

/// The metric names the Grafana dashboard in docs/ queries (as written in
/// its expressions, `_bucket` taken off), and the expressions themselves.
pub fn dashboard_queries() -> anyhow::Result<(std::collections::BTreeSet<String>, Vec<String>)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/grafana-dashboard.json"
    );
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("{path}: no panels"))?
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(String::from))
        .collect();
    let mut names = std::collections::BTreeSet::new();
    for expr in &exprs {
        for (at, _) in expr.match_indices("weft_") {
            let name: String = expr[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.insert(name.strip_suffix("_bucket").unwrap_or(&name).to_string());
        }
    }
    Ok((names, exprs))
}

/// Checks PromQL `exprs` with `promtool check rules` (as recording rules).
pub fn promtool_check_queries(exprs: &[String]) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let rules = dir.path().join("rules.yml");
    let mut text = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        text.push_str(&format!(
            "      - record: weft:dashboard_{i}\n        expr: {}\n",
            serde_json::to_string(expr)?
        ));
    }
    std::fs::write(&rules, text)?;
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
