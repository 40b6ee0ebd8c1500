//! The socket mark (`SO_MARK`) of connections the agent checked.
//!
//! With transparent interception on, the eBPF inbound capture lets a
//! connection attempt reach a mesh workload only if it carries this mark: the
//! agent marks every connection it opens (to instances, for health checks).
//! Setting a mark needs CAP_NET_ADMIN or CAP_NET_RAW, so no unprivileged process can forge
//! one; marks do not cross hosts.
//!
//! What a workload asks the agent to connect to (a health check added
//! through the local API) is not the agent's own connection: it carries the
//! workload's own mark ([`of_workload`]), which inbound capture admits only
//! to that workload's sockets, as it admits the workload reaching itself
//! over loopback; a service without a cgroup gets no mark, and reaches no
//! mesh workload at all.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

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

/// The workload id of each local service with a cgroup, by service id.
static WORKLOADS: Mutex<BTreeMap<String, u32>> = Mutex::new(BTreeMap::new());

/// Sets the workload ids [`of_workload`] gives marks for.
pub fn set_workloads(ids: BTreeMap<String, u32>) {
    *WORKLOADS.lock().unwrap_or_else(|p| p.into_inner()) = ids;
}

/// The mark of a connection made for service `service_id`'s workload at
/// its asking: the agent's mark with the workload's id (the workload's own
/// mark), 0 when the service has no cgroup or no mark is set.
pub fn of_workload(service_id: &str) -> u32 {
    let mark = get();
    let workloads = WORKLOADS.lock().unwrap_or_else(|p| p.into_inner());
    match (mark, workloads.get(service_id)) {
        (0, _) | (_, None) => 0,
        (mark, Some(id)) => mark | id,
    }
}

/// Connects to `addr` with the agent's mark, if one is set.
pub async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    connect_with(addr, get()).await
}

/// Connects to `addr` with `mark` (0: none).
pub async fn connect_with(addr: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if mark != 0 {
        set_mark(&socket, mark)?;
    }
    socket.connect(addr).await
}

/// Gives a listening socket of the agent its mark (nothing when no mark is
/// set). The connect hook sends a workload's connection to one of the
/// agent's ports only while the socket listening there carries the mark:
/// a process that binds the port after the agent is gone gets nothing.
pub fn listener(socket: &impl std::os::fd::AsRawFd) -> std::io::Result<()> {
    match get() {
        0 => Ok(()),
        mark => set_mark(socket, mark),
    }
}

/// Gives `socket` the mark `mark`, whatever [`get`] says.
pub fn set_on(socket: &impl std::os::fd::AsRawFd, mark: u32) -> std::io::Result<()> {
    set_mark(socket, mark)
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
