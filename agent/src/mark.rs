//! The socket mark (`SO_MARK`) of connections the agent checked.
//!
//! With transparent interception on, the eBPF inbound capture lets a
//! connection attempt reach a mesh workload only if it carries this mark: the
//! agent marks every connection it opens (to instances, for health checks).
//! Setting a mark needs CAP_NET_ADMIN, so no unprivileged process can forge
//! one; marks do not cross hosts.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::net::{TcpSocket, TcpStream};

/// 0: no mark (interception off).
static MARK: AtomicU32 = AtomicU32::new(0);

/// Sets the mark for every later [`connect`] of this process.
pub fn set(mark: u32) {
    MARK.store(mark, Ordering::Relaxed);
}

/// The mark in use (0: none).
pub fn get() -> u32 {
    MARK.load(Ordering::Relaxed)
}

/// Connects to `addr` with the agent's mark, if one is set.
pub async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    let mark = get();
    if mark != 0 {
        set_mark(&socket, mark)?;
    }
    socket.connect(addr).await
}

fn set_mark(socket: &impl std::os::fd::AsRawFd, mark: u32) -> std::io::Result<()> {
    // SAFETY: a valid fd and a 4-byte value of the advertised length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
