//! cgroup-v2 facts the data path needs: where the hierarchy is mounted and the
//! id of a cgroup directory (the id `bpf_get_current_cgroup_id` returns).
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 file system in /proc/mounts: weft needs the unified cgroup-v2 hierarchy")]
    NoCgroup2,
    #[error("reading /proc/mounts: {0}")]
    Mounts(#[source] std::io::Error),
    #[error("cgroup {path}: {source}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a cgroup-v2 directory")]
    NotCgroup2 { path: PathBuf },
}

/// The first cgroup2 mount point listed in /proc/mounts.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(CgroupError::Mounts)?;
    parse_cgroup2_mount(&mounts).ok_or(CgroupError::NoCgroup2)
}

fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// The cgroup id of a cgroup-v2 directory: its inode number on cgroupfs.
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    let meta = std::fs::metadata(path).map_err(|source| CgroupError::Stat {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() || !path.join("cgroup.procs").exists() {
        return Err(CgroupError::NotCgroup2 {
            path: path.to_path_buf(),
        });
    }
    Ok(meta.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_among_v1_mounts() {
        let mounts = "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_mount_is_none() {
        assert_eq!(parse_cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn a_plain_directory_is_not_a_cgroup() {
        let dir = std::env::temp_dir();
        assert!(matches!(
            cgroup_id(&dir),
            Err(CgroupError::NotCgroup2 { .. })
        ));
    }
}
