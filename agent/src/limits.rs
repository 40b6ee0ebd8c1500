//! Process limits the agent raises for itself at start: every proxied
//! connection costs it one descriptor (two where it connects onwards), so
//! the soft limit on open files (often 1,024) would cap the mesh long before
//! memory does. The soft limit goes up to the hard limit, which only the
//! administrator sets.

/// The open-files limit before and after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit found at start.
    pub before: libc::rlim_t,
    /// The soft limit now (the hard limit, unless raising failed).
    pub soft: libc::rlim_t,
    /// The hard limit.
    pub hard: libc::rlim_t,
}

/// Raises `RLIMIT_NOFILE`'s soft limit to its hard limit.
pub fn raise_nofile() -> std::io::Result<NofileLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(NofileLimit {
        before,
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

#[cfg(test)]
mod tests {
    use super::raise_nofile;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let limit = raise_nofile().expect("raising the open-files limit");
        assert_eq!(limit.soft, limit.hard);
        assert!(limit.soft >= limit.before);
        // Raising again changes nothing.
        let again = raise_nofile().unwrap();
        assert_eq!((again.before, again.soft), (limit.soft, limit.soft));
    }
}
