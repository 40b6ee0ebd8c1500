//! Files that hold a secret the agent reads (its `token_file`, or a
//! configuration with a `token` in it): refused unless only their owner,
//! the agent's own user or root, may read or write them, as ssh treats
//! private keys. A token file left at the usual 0644 hands every local user the
//! node's identity and its services' (enough to have their certificates
//! signed), and one owned by another user is that user's to replace.
//!
//! Files that decide what the agent trusts and does (agent.toml, the
//! `ca_file` it verifies the servers with) need not be secret, but no one
//! but their owner (the agent's user, or root) may write them: whoever can
//! write them sends the node's token to a server of their choosing, or
//! has the agent run checks with its socket mark ([`check_trusted`]).
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why a secret's file is refused.
#[derive(Debug, thiserror::Error)]
pub enum PrivateFileError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds a secret that group or others may read or write (mode {mode:04o}): `chmod 600` it", path.display())]
    Exposed { path: PathBuf, mode: u32 },
    #[error("{} holds a secret and belongs to uid {owner}, not this agent's ({own}): `chown` it", path.display())]
    Owner { path: PathBuf, owner: u32, own: u32 },
    #[error("{} decides what the agent trusts, and group or others may write it (mode {mode:04o}): `chmod go-w` it", path.display())]
    Writable { path: PathBuf, mode: u32 },
    #[error("{} decides what the agent trusts and belongs to uid {owner}, not this agent's ({own}) nor root: `chown` it", path.display())]
    Untrusted { path: PathBuf, owner: u32, own: u32 },
}

/// Checks a file that decides what the agent trusts: no one but its owner
/// may write it, and its owner is this process's user or root.
pub fn check_trusted(path: &Path, meta: &std::fs::Metadata) -> Result<(), PrivateFileError> {
    let path = path.to_path_buf();
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(PrivateFileError::Writable { path, mode });
    }
    match weft_api::private_dir::foreign_owner(meta) {
        Some((owner, own)) => Err(PrivateFileError::Untrusted { path, owner, own }),
        None => Ok(()),
    }
}

/// The bytes of the file at `path` that decides what the agent trusts,
/// once [`check_trusted`] (the file opened is the one checked), and what
/// the file was as it was read.
pub fn read_trusted(path: &Path) -> Result<(Vec<u8>, std::fs::Metadata), PrivateFileError> {
    read_checked(path, check_trusted)
}

/// Checks the file `meta` describes (at `path`): no access for group or
/// others, owned by this process's user (or root).
pub fn check(path: &Path, meta: &std::fs::Metadata) -> Result<(), PrivateFileError> {
    let path = path.to_path_buf();
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PrivateFileError::Exposed { path, mode });
    }
    match weft_api::private_dir::foreign_owner(meta) {
        Some((owner, own)) => Err(PrivateFileError::Owner { path, owner, own }),
        None => Ok(()),
    }
}

/// The contents of the secret's file at `path`, once [`check`]ed (the
/// file opened is the one checked).
pub fn read(path: &Path) -> Result<String, PrivateFileError> {
    let (bytes, _) = read_checked(path, check)?;
    String::from_utf8(bytes).map_err(|_| PrivateFileError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"),
    })
}

/// The bytes of the file at `path` once `check` passed on the file opened
/// (not on a path looked up again), and what it was as it was read.
fn read_checked(
    path: &Path,
    check: fn(&Path, &std::fs::Metadata) -> Result<(), PrivateFileError>,
) -> Result<(Vec<u8>, std::fs::Metadata), PrivateFileError> {
    use std::io::Read;
    let io = |source| PrivateFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    check(path, &meta)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io)?;
    Ok((bytes, meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// The attack: an agent.toml (or ca_file) that another local user may
    /// write: they point `servers` and `ca_file` at their own server, and
    /// the agent sends it the node's token at its next start.
    #[test]
    fn a_file_the_agent_trusts_is_written_by_its_owner_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "x = 1\n").unwrap();
        for mode in [0o600, 0o644, 0o444, 0o640] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(read_trusted(&path).unwrap().0, b"x = 1\n", "{mode:o}");
        }
        for mode in [0o664, 0o646, 0o666, 0o622] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = read_trusted(&path).unwrap_err();
            assert!(
                matches!(e, PrivateFileError::Writable { mode: m, .. } if m == mode),
                "{mode:o}: {e}"
            );
            assert!(e.to_string().contains("chmod go-w"), "{e}");
        }
    }

    #[test]
    fn only_a_file_its_owner_alone_may_read_holds_a_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.token");
        std::fs::write(&path, "secret\n").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o602] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = read(&path).unwrap_err();
            assert!(
                matches!(e, PrivateFileError::Exposed { mode: m, .. } if m == mode),
                "{mode:o}: {e}"
            );
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(read(&path).unwrap(), "secret\n", "{mode:o}");
        }
        let missing = read(&dir.path().join("none")).unwrap_err();
        assert!(matches!(missing, PrivateFileError::Io { .. }), "{missing}");
    }
}
