//! Where the agent pins its eBPF programs' links and maps in bpffs, so that
//! they outlive the agent process.
//!
//! Layout under the pin directory (by default
//! `/sys/fs/bpf/weft/<cgroup root, as a name>`, one per agent):
//! - `maps-<build>/<MAP>`: the maps of one build of the programs. A restarted
//!   agent of the same build reuses them as they are; a different build gets
//!   its own, since map layouts may differ between builds.
//! - `links-<generation>/<program>`: the links attaching each program. A new
//!   agent pins its links in a new generation and then removes the others,
//!   so programs are attached at every moment.
//!
//! `weft-agent uninstall` removes the whole directory: the programs detach.
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

/// The root of bpffs.
pub const BPFFS: &str = "/sys/fs/bpf";
/// `statfs` magic number of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mounting bpffs on {BPFFS}: {0} (the agent needs root, or CAP_SYS_ADMIN)")]
    Mount(#[source] std::io::Error),
    #[error("{0} is not on a bpf file system")]
    NotBpffs(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PinError + '_ {
    move |source| PinError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One agent's pin directory.
#[derive(Debug, Clone)]
pub struct Pins {
    base: PathBuf,
}

/// The default pin directory for an agent managing `cgroup_root`: two
/// agents on one kernel (as nodes in tests are) each have their own.
pub fn default_dir(cgroup_root: &Path) -> PathBuf {
    let name: String = cgroup_root
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = if name.is_empty() { "root".into() } else { name };
    Path::new(BPFFS).join("weft").join(name)
}

/// Whether `path` is on bpffs.
fn is_bpffs(path: &Path) -> Result<bool, PinError> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io(path)(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and out-parameter.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io(path)(std::io::Error::last_os_error()));
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Mounts bpffs on /sys/fs/bpf unless it is there.
fn ensure_bpffs() -> Result<(), PinError> {
    let root = Path::new(BPFFS);
    std::fs::create_dir_all(root).map_err(io(root))?;
    if is_bpffs(root)? {
        return Ok(());
    }
    let (src, target, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
    // Its root is the world's to write in otherwise (1777): any user could
    // make the pin directory first, and own it.
    let options = c"mode=0700";
    // SAFETY: valid C strings; the data is a C string of options.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(PinError::Mount(std::io::Error::last_os_error()));
    }
    tracing::info!("mounted bpffs on {BPFFS}");
    Ok(())
}

/// A short name for a build of the programs.
fn build_tag(object: &[u8]) -> String {
    // A fixed-key hasher: the same bytes give the same tag in every process
    // of one agent binary, which is all a tag needs.
    let mut h = std::hash::DefaultHasher::new();
    object.hash(&mut h);
    format!("{:016x}", h.finish())
}

impl Pins {
    /// The pin directory `dir` (created 0700, bpffs mounted if it was not).
    pub fn open(dir: &Path) -> Result<Self, PinError> {
        if dir.starts_with(BPFFS) {
            ensure_bpffs()?;
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        if !is_bpffs(dir)? {
            return Err(PinError::NotBpffs(dir.to_path_buf()));
        }
        // A pin directory another user made first, or one inside a
        // directory of theirs, is theirs to unpin from or move aside (and
        // the mesh fails open when the agent is gone): refused. Checked
        // from the pin directory up to the bpffs root.
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        // SAFETY: geteuid has no preconditions.
        let own = unsafe { libc::geteuid() };
        // The directory as the kernel resolves it, each part as it is (a
        // link of another user's, re-pointed later, would move the pins).
        let real = std::fs::canonicalize(dir).map_err(io(dir))?;
        if real != dir {
            return Err(io(dir)(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "not the directory's own path (it is {}): give an absolute path without symbolic links",
                    real.display()
                ),
            )));
        }
        for ancestor in real.ancestors() {
            if !is_bpffs(ancestor)? {
                break;
            }
            let owner = std::fs::symlink_metadata(ancestor)
                .map_err(io(ancestor))?
                .uid();
            if owner != own && owner != 0 {
                return Err(io(dir)(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "{} belongs to uid {owner}, not this agent's ({own}) nor root's",
                        ancestor.display()
                    ),
                )));
            }
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        Ok(Self {
            base: dir.to_path_buf(),
        })
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    /// The map directory of this build of the programs (created).
    pub fn map_dir(&self, object: &[u8]) -> Result<PathBuf, PinError> {
        let dir = self.base.join(format!("maps-{}", build_tag(object)));
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(dir)
    }

    /// A new, empty link directory for this agent's links.
    pub fn new_link_dir(&self) -> Result<PathBuf, PinError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dir = self
            .base
            .join(format!("links-{nanos:x}-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(io(&dir))?;
        Ok(dir)
    }

    /// Removes every link directory but `keep`: earlier agents' programs
    /// detach.
    pub fn remove_other_links(&self, keep: &Path) -> Result<(), PinError> {
        self.remove_matching(|name| name.starts_with("links-"), keep)
    }

    /// Removes the maps of other builds (their programs are detached).
    pub fn remove_other_maps(&self, object: &[u8]) -> Result<(), PinError> {
        let keep = self.base.join(format!("maps-{}", build_tag(object)));
        self.remove_matching(|name| name.starts_with("maps-"), &keep)
    }

    fn remove_matching(&self, pick: impl Fn(&str) -> bool, keep: &Path) -> Result<(), PinError> {
        let entries = std::fs::read_dir(&self.base).map_err(io(&self.base))?;
        for entry in entries {
            let entry = entry.map_err(io(&self.base))?;
            let path = entry.path();
            if path != keep && pick(&entry.file_name().to_string_lossy()) {
                std::fs::remove_dir_all(&path).map_err(io(&path))?;
                tracing::info!(path = %path.display(), "removed earlier pins");
            }
        }
        Ok(())
    }

    /// Removes the pin directory `dir` and everything in it: the programs
    /// detach and the maps go. Ok(false) if there was nothing.
    pub fn uninstall(dir: &Path) -> Result<bool, PinError> {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io(dir)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cgroup_root_has_its_own_pin_directory() {
        assert_eq!(
            default_dir(Path::new("/sys/fs/cgroup")),
            Path::new("/sys/fs/bpf/weft/sys_fs_cgroup")
        );
        assert_eq!(
            default_dir(Path::new("/sys/fs/cgroup/weft-t1/node a/")),
            Path::new("/sys/fs/bpf/weft/sys_fs_cgroup_weft-t1_node_a")
        );
        assert_eq!(
            default_dir(Path::new("/")),
            Path::new("/sys/fs/bpf/weft/root")
        );
    }

    #[test]
    fn a_build_tag_names_the_bytes() {
        assert_eq!(build_tag(b"one"), build_tag(b"one"));
        assert_ne!(build_tag(b"one"), build_tag(b"two"));
    }
}
