//! A data directory only its owner may enter. A server's holds the CA's
//! keys and the Raft log; an agent's its control socket, its registrations
//! and the state it hands over in an upgrade. One that another user made
//! (a pre-created `/tmp/weft-1`), or a link of theirs to one of ours,
//! stays theirs to open or replace: refused, naming the owner.
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a data directory is refused.
#[derive(Debug, thiserror::Error)]
pub enum PrivateDirError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: the {what} belongs to uid {owner}, not this process's ({own}) nor root's", path.display())]
    Owner {
        path: PathBuf,
        what: &'static str,
        owner: u32,
        own: u32,
    },
}

/// Who owns what `meta` describes, when it is neither this process's user
/// nor root (whose files are as safe as root is): `(owner, own)`.
pub fn foreign_owner(meta: &std::fs::Metadata) -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    (meta.uid() != own && meta.uid() != 0).then_some((meta.uid(), own))
}

/// Creates `dir` (and its parents) if missing, checks that it (and a link
/// at its path) belongs to this process's user or root, and makes it 0700.
pub fn create_private_dir(dir: &Path) -> Result<(), PrivateDirError> {
    let io = |source| PrivateDirError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    for (what, meta) in [
        ("symbolic link", std::fs::symlink_metadata(dir).map_err(io)?),
        ("directory", std::fs::metadata(dir).map_err(io)?),
    ] {
        if let Some((owner, own)) = foreign_owner(&meta) {
            return Err(PrivateDirError::Owner {
                path: dir.to_path_buf(),
                what,
                owner,
                own,
            });
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_is_made_private() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/b");
        create_private_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // One that was there with a wider mode is narrowed.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    }
}
