//! cgroup-v2 directories for tests, removed (with every process in them
//! killed) on drop.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::leftovers::{self, Leftover, Registration};

pub struct TestCgroup {
    path: PathBuf,
    _leftover: Registration,
}

impl TestCgroup {
    /// Creates `parent/name`, replacing a leftover of the same name.
    pub fn create(parent: &Path, name: &str) -> anyhow::Result<Self> {
        let path = parent.join(name);
        let leftover = leftovers::register(Leftover::Cgroup(path.clone()));
        if path.exists() {
            remove_tree(&path);
        }
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self {
            path,
            _leftover: leftover,
        })
    }

    /// A test cgroup under the machine's cgroup2 mount.
    pub fn under_root(name: &str) -> anyhow::Result<Self> {
        let root = weft_agent::ebpf::cgroup2_mount()?;
        Self::create(&root, name)
    }

    pub fn child(&self, name: &str) -> anyhow::Result<Self> {
        Self::create(&self.path, name)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn id(&self) -> anyhow::Result<u64> {
        Ok(weft_agent::ebpf::cgroup_id(&self.path)?)
    }
}

/// The cgroup2 mount point, from `/proc/mounts` (`/sys/fs/cgroup/unified`
/// in the hybrid layout, `/sys/fs/cgroup` in the unified one).
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .context("no cgroup2 mount in /proc/mounts: weft needs cgroup v2")
}

/// Removes the bpffs pins an agent (or a test's loader) made for `root` and
/// for each cgroup directly below it (agents of a mesh test have one root per
/// node): their programs detach.
pub fn remove_pins(root: &Path) {
    let mut roots = vec![root.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(root) {
        roots.extend(
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    for dir in roots {
        let pins = weft_agent::ebpf::pins::default_dir(&dir);
        if let Err(e) = weft_agent::ebpf::Pins::uninstall(&pins) {
            eprintln!("removing eBPF pins {}: {e}", pins.display());
        }
    }
}

/// Kills everything in `dir` and below (`cgroup.kill`), then removes the
/// directories bottom-up, retrying each for up to 5 s while the killed
/// processes exit. A missing `dir` is fine.
pub fn remove_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e) = std::fs::remove_dir(dir) {
        if e.kind() == std::io::ErrorKind::NotFound {
            return;
        }
        if Instant::now() > deadline {
            eprintln!("cleanup: removing cgroup {}: {e}", dir.display());
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_pins(&self.path);
        remove_tree(&self.path);
    }
}
