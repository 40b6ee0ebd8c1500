//! `cargo xtask test`: the whole suite, in the order that fails fastest:
//! format, clippy, unit tests, each fuzz target for a short bounded time,
//! then the privileged integration tests (real eBPF, network namespaces,
//! processes), which need root. Without root it
//! stops before them and says so: it never reports them as passed.
use anyhow::bail;

use crate::run::{cargo, is_root, status};

pub fn run() -> anyhow::Result<()> {
    status(cargo().args(["fmt", "--all", "--check"]))?;
    status(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    status(cargo().args(["test", "--workspace", "--exclude", "weft-tests"]))?;
    crate::fuzz::run(crate::fuzz::SECONDS_IN_TEST, &[])?;
    // The end-to-end tests run the binaries as processes.
    status(cargo().args(["build", "--workspace", "--bins"]))?;
    if !is_root() {
        bail!(
            "the privileged integration tests (eBPF, network namespaces) need root and were NOT run; \
             run `cargo xtask test` as root"
        );
    }
    status(cargo().args(["test", "--package", "weft-tests"]))?;
    println!("xtask test: all checks and tests passed");
    Ok(())
}
