//! Who `weft-agent exec`'s command runs as. Joining a service's cgroup and
//! giving the command the agent's resolver need root; the command itself
//! should not have it: as root (or with CAP_NET_ADMIN / CAP_NET_RAW) a
//! workload can set the agent's socket mark and reach other workloads
//! around intentions, move itself out of the mesh's cgroups, or remove the
//! pinned programs. `--user` (and `--group`) name who it runs as instead:
//! the supplementary groups are the user's, the real, effective and saved
//! ids all change (so every capability is gone), and `no_new_privs` keeps
//! a set-user-id program from bringing any back.

use nix::unistd::{Gid, Group, Uid, User};

/// Why the command cannot run as asked.
#[derive(Debug, thiserror::Error)]
pub enum ExecUserError {
    #[error("--user {0:?}: no such user (a name or a numeric id)")]
    NoUser(String),
    #[error("--group {0:?}: no such group (a name or a numeric id)")]
    NoGroup(String),
    #[error("--user {0:?} is root: the command would keep every capability (leave --user out to run it as root)")]
    Root(String),
    #[error("--group needs --user")]
    GroupWithoutUser,
    #[error("dropping to {what}: {source}")]
    Drop {
        what: &'static str,
        source: std::io::Error,
    },
}

/// The user (and group) a command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

/// `user` (a name, or a numeric id) and `group` (the user's primary group
/// when None) looked up in the system's databases.
pub fn resolve(user: &str, group: Option<&str>) -> Result<RunAs, ExecUserError> {
    let found = match user.parse::<u32>() {
        Ok(id) => User::from_uid(Uid::from_raw(id)).ok().flatten(),
        Err(_) => User::from_name(user).ok().flatten(),
    };
    let found = found.ok_or_else(|| ExecUserError::NoUser(user.into()))?;
    if found.uid.is_root() {
        return Err(ExecUserError::Root(user.into()));
    }
    let gid = match group {
        None => found.gid,
        Some(g) => {
            let named = match g.parse::<u32>() {
                Ok(id) => Group::from_gid(Gid::from_raw(id)).ok().flatten(),
                Err(_) => Group::from_name(g).ok().flatten(),
            };
            named.ok_or_else(|| ExecUserError::NoGroup(g.into()))?.gid
        }
    };
    Ok(RunAs {
        name: found.name,
        uid: found.uid,
        gid,
    })
}

/// Becomes `run_as` for good: its groups, then its group, then its user
/// (real, effective and saved), and no new privileges from here on.
pub fn become_user(run_as: &RunAs) -> Result<(), ExecUserError> {
    let fail = |what| {
        move |e: nix::Error| ExecUserError::Drop {
            what,
            source: std::io::Error::from(e),
        }
    };
    let name = std::ffi::CString::new(run_as.name.as_bytes())
        .map_err(|_| ExecUserError::NoUser(run_as.name.clone()))?;
    nix::unistd::initgroups(&name, run_as.gid).map_err(fail("the user's groups"))?;
    nix::unistd::setresgid(run_as.gid, run_as.gid, run_as.gid).map_err(fail("the group"))?;
    nix::unistd::setresuid(run_as.uid, run_as.uid, run_as.uid).map_err(fail("the user"))?;
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(ExecUserError::Drop {
            what: "no_new_privs",
            source: std::io::Error::last_os_error(),
        });
    }
    // Nothing of root's left: a failed drop is not a run as root.
    if Uid::current().is_root() || Uid::effective().is_root() {
        return Err(ExecUserError::Drop {
            what: "the user",
            source: std::io::Error::other("still root after setresuid"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_resolve_by_name_or_id_and_root_is_refused() {
        let nobody = resolve("nobody", None).expect("nobody");
        assert!(!nobody.uid.is_root());
        assert_eq!(
            resolve(&nobody.uid.as_raw().to_string(), None).unwrap(),
            nobody
        );
        let with_group = resolve("nobody", Some("0")).unwrap();
        assert_eq!(with_group.gid, Gid::from_raw(0));
        assert!(matches!(resolve("root", None), Err(ExecUserError::Root(_))));
        assert!(matches!(resolve("0", None), Err(ExecUserError::Root(_))));
        assert!(matches!(
            resolve("no-such-user-weft", None),
            Err(ExecUserError::NoUser(_))
        ));
        assert!(matches!(
            resolve("nobody", Some("no-such-group-weft")),
            Err(ExecUserError::NoGroup(_))
        ));
    }
}
