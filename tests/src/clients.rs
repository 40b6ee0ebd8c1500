//! Consul's client libraries, as `cargo xtask setup` installs them under
//! `target/test-clients/`, and the scripts in `tests/clients/` that drive
//! them. A missing client fails the test loudly, naming the setup step.
use std::path::PathBuf;

/// The workspace's root directory.
fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

fn installed(path: PathBuf, what: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: {what} is installed by `cargo xtask setup` (which `cargo xtask test` runs)",
        path.display()
    );
    path
}

/// The Python of the virtualenv that holds py-consul.
pub fn python() -> PathBuf {
    installed(
        workspace().join("target/test-clients/py/bin/python"),
        "py-consul",
    )
}

/// The `node_modules` directory that holds the npm `consul` package.
pub fn node_modules() -> PathBuf {
    installed(
        workspace().join("target/test-clients/js/node_modules"),
        "the npm consul client",
    )
}

/// A script of `tests/clients/`.
pub fn script(name: &str) -> PathBuf {
    installed(
        workspace().join("tests/clients").join(name),
        "a test script",
    )
}
