//! Who `weft-agent exec`'s command runs as. Joining a service's cgroup and
//! giving the command the agent's resolver need root; the command itself
//! should not have it: as root (or with CAP_NET_ADMIN / CAP_NET_RAW) a
//! workload can set the agent's socket mark and reach other workloads
//! around intentions, move itself out of the mesh's cgroups, or remove the
//! pinned programs. `--user` (and `--group`) name who it runs as instead:
//! the real, effective and saved ids all change, the ambient capabilities
//! are cleared (so none is left, which is checked), and `no_new_privs`
//! keeps a set-user-id program from bringing any back.
//!
//! The supplementary groups are the user's memberships in the group
//! database; `--group` sets the primary group (the user's own by default)
//! and does not narrow those. Neither the user nor the group may be root's.

use nix::unistd::{Gid, Group, Uid, User};

/// Why the command cannot run as asked.
#[derive(Debug, thiserror::Error)]
pub enum ExecUserError {
    #[error("--user {0:?}: no such user (a name, or a numeric id)")]
    NoUser(String),
    #[error("--group {0:?}: no such group (a name, or a numeric id)")]
    NoGroup(String),
    #[error("--user {0:?} is root: the command would keep every capability (leave --user out to run it as root)")]
    Root(String),
    #[error("--group {0:?} is root's group (gid 0): give the command another")]
    RootGroup(String),
    #[error("--group needs --user")]
    GroupWithoutUser,
    #[error("the groups of {user:?}: {source}")]
    Groups {
        user: String,
        #[source]
        source: nix::Error,
    },
    #[error("dropping to {what}: {source}")]
    Drop {
        what: &'static str,
        source: std::io::Error,
    },
}

/// The user (and groups) a command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: Uid,
    pub gid: Gid,
    /// The supplementary groups.
    pub groups: Vec<Gid>,
    /// The user's entry, when it has one: its name and home for the
    /// command's `USER`, `LOGNAME` and `HOME`.
    pub entry: Option<(String, std::path::PathBuf)>,
}

/// `user` (a name, or a numeric id, which may have no entry: a container's
/// arbitrary uid) and `group` (the user's primary group when None; needed
/// for a uid without an entry) looked up in the system's databases.
pub fn resolve(user: &str, group: Option<&str>) -> Result<RunAs, ExecUserError> {
    let numeric = user.parse::<u32>().ok();
    let found = match numeric {
        Some(id) => User::from_uid(Uid::from_raw(id)).ok().flatten(),
        None => User::from_name(user).ok().flatten(),
    };
    let uid = match (&found, numeric) {
        (Some(u), _) => u.uid,
        (None, Some(id)) => Uid::from_raw(id),
        (None, None) => return Err(ExecUserError::NoUser(user.into())),
    };
    if uid.is_root() {
        return Err(ExecUserError::Root(user.into()));
    }
    let gid = match (group, &found) {
        (Some(g), _) => {
            let named = match g.parse::<u32>() {
                // A number stands for itself, in the database or not.
                Ok(id) => Some(Gid::from_raw(id)),
                Err(_) => Group::from_name(g).ok().flatten().map(|g| g.gid),
            };
            named.ok_or_else(|| ExecUserError::NoGroup(g.into()))?
        }
        (None, Some(u)) => u.gid,
        // No entry to take a group from: the uid's number, as containers do.
        (None, None) => Gid::from_raw(uid.as_raw()),
    };
    if gid.as_raw() == 0 {
        return Err(ExecUserError::RootGroup(group.unwrap_or(user).into()));
    }
    let groups = match &found {
        Some(u) => {
            let name = std::ffi::CString::new(u.name.as_bytes())
                .map_err(|_| ExecUserError::NoUser(user.into()))?;
            nix::unistd::getgrouplist(&name, gid).map_err(|source| ExecUserError::Groups {
                user: user.into(),
                source,
            })?
        }
        None => vec![gid],
    };
    if let Some(root) = groups.iter().find(|g| g.as_raw() == 0) {
        return Err(ExecUserError::RootGroup(format!("{user}'s group {root}")));
    }
    Ok(RunAs {
        uid,
        gid,
        groups,
        entry: found.map(|u| (u.name, u.dir)),
    })
}

/// Becomes `run_as` for good: its groups, then its group, then its user
/// (real, effective and saved), no ambient capabilities and no new
/// privileges from here on; then checks that no capability is left.
pub fn become_user(run_as: &RunAs) -> Result<(), ExecUserError> {
    let fail = |what| {
        move |e: nix::Error| ExecUserError::Drop {
            what,
            source: std::io::Error::from(e),
        }
    };
    nix::unistd::setgroups(&run_as.groups).map_err(fail("the user's groups"))?;
    nix::unistd::setresgid(run_as.gid, run_as.gid, run_as.gid).map_err(fail("the group"))?;
    // SAFETY: prctl with integer arguments only.
    let cleared = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if cleared != 0 {
        return Err(drop_error("the ambient capabilities"));
    }
    nix::unistd::setresuid(run_as.uid, run_as.uid, run_as.uid).map_err(fail("the user"))?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(drop_error("no_new_privs"));
    }
    // Nothing of root's left: a failed drop is not a run as root.
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(|source| ExecUserError::Drop {
            what: "the capabilities (reading /proc/self/status)",
            source,
        })?;
    if Uid::current().is_root() || Uid::effective().is_root() || holds_capabilities(&status) {
        return Err(ExecUserError::Drop {
            what: "the user",
            source: std::io::Error::other("root's ids or capabilities are left"),
        });
    }
    Ok(())
}

impl RunAs {
    /// `USER`, `LOGNAME` and `HOME` for the command (root's are not its).
    pub fn environment(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        match &self.entry {
            Some((name, home)) => vec![
                ("USER", name.into()),
                ("LOGNAME", name.into()),
                ("HOME", home.into()),
            ],
            None => Vec::new(),
        }
    }
}

fn drop_error(what: &'static str) -> ExecUserError {
    ExecUserError::Drop {
        what,
        source: std::io::Error::last_os_error(),
    }
}

/// Whether `/proc/self/status` text shows any permitted, effective or
/// ambient capability.
fn holds_capabilities(status: &str) -> bool {
    status.lines().any(|line| {
        ["CapPrm:", "CapEff:", "CapAmb:"].iter().any(|field| {
            line.strip_prefix(field)
                .is_some_and(|hex| u64::from_str_radix(hex.trim(), 16) != Ok(0))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_resolve_by_name_or_id_and_root_is_refused() {
        let nobody = resolve("nobody", None).expect("nobody");
        assert!(!nobody.uid.is_root() && nobody.gid.as_raw() != 0);
        assert!(nobody.groups.contains(&nobody.gid));
        assert_eq!(
            resolve(&nobody.uid.as_raw().to_string(), None).unwrap(),
            nobody
        );
        assert!(matches!(resolve("root", None), Err(ExecUserError::Root(_))));
        assert!(matches!(resolve("0", None), Err(ExecUserError::Root(_))));
        assert!(matches!(
            resolve("nobody", Some("0")),
            Err(ExecUserError::RootGroup(_))
        ));
        assert!(matches!(
            resolve("no-such-user-weft", None),
            Err(ExecUserError::NoUser(_))
        ));
        assert!(matches!(
            resolve("nobody", Some("no-such-group-weft")),
            Err(ExecUserError::NoGroup(_))
        ));
        // A container's arbitrary uid, without an entry: its number as
        // its group unless one is given.
        let arbitrary = resolve("1234567", None).unwrap();
        assert_eq!(
            (arbitrary.uid.as_raw(), arbitrary.gid.as_raw()),
            (1234567, 1234567)
        );
        assert_eq!(arbitrary.entry, None);
        assert_eq!(
            resolve("1234567", Some("7654321")).unwrap().gid.as_raw(),
            7654321
        );
    }

    #[test]
    fn capabilities_left_are_seen() {
        let none = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n";
        assert!(!holds_capabilities(none));
        assert!(holds_capabilities(&none.replace(
            "CapEff:\t0000000000000000",
            "CapEff:\t0000000000003000"
        )));
        assert!(holds_capabilities(&none.replace(
            "CapAmb:\t0000000000000000",
            "CapAmb:\t0000000000002000"
        )));
    }
}
