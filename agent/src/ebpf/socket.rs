//! Socket facts the agent needs to find a connection's record.
use std::os::fd::AsRawFd;

/// `SO_NETNS_COOKIE` (Linux 5.14+): the cookie of the socket's network namespace.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The network-namespace cookie of a socket, as `bpf_get_netns_cookie` sees it.
pub fn netns_cookie(sock: &impl AsRawFd) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a buffer of the advertised length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}
