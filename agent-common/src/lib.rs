//! Map keys and values shared by weft's eBPF programs (`agent-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of padding surprises: the
//! kernel side and the user side read the same bytes. Addresses are stored as
//! four `u32` words in network byte order (an IPv4 address uses the first word),
//! ports in host byte order. With the `user` feature the types implement
//! `aya::Pod` so that the agent can read and write them in maps.
#![no_std]

/// Address family values, as in `AF_INET` / `AF_INET6`.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Map names, shared so that the loader and the programs cannot drift apart.
pub mod maps {
    /// `cgroup id -> WorkloadInfo`: which cgroups hold mesh workloads.
    pub const WORKLOADS: &str = "WORKLOADS";
    /// `DestKey -> RedirectTarget`: destinations that are taken over.
    pub const DESTINATIONS: &str = "DESTINATIONS";
    /// `socket cookie -> OrigDst`: written by connect4/6, read by sockops.
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    /// `SockTuple -> OrigDst`: written by sockops once a connection is up.
    pub const ORIG_BY_TUPLE: &str = "ORIG_BY_TUPLE";
    /// Per-CPU counters, indexed by the `counter` constants.
    pub const COUNTERS: &str = "COUNTERS";
    /// `FastKey -> RedirectTarget`: same-node connections that intentions
    /// allow and that need no proxying go straight to the local instance.
    pub const FAST_PATH: &str = "FAST_PATH";
}

/// Program names (the Rust function names in `agent-ebpf`).
pub mod programs {
    pub const CONNECT4: &str = "weft_connect4";
    pub const CONNECT6: &str = "weft_connect6";
    pub const SOCKOPS: &str = "weft_sockops";
}

/// Indexes into the `COUNTERS` per-CPU array.
pub mod counter {
    /// connect() calls seen from mesh workloads.
    pub const CONNECT_SEEN: u32 = 0;
    /// connect() calls rewritten towards a redirect target.
    pub const REDIRECTED: u32 = 1;
    /// Established connections re-keyed by 4-tuple.
    pub const REKEYED: u32 = 2;
    /// Tuple records removed when their connection closed.
    pub const CLOSED: u32 = 3;
    /// connect() calls sent straight to a local instance.
    pub const FAST_PATH: u32 = 4;
    /// Number of counters.
    pub const COUNT: u32 = 5;
}

/// A mesh workload's cgroup, as the agent registered it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadInfo {
    /// The agent's index of the local service this cgroup belongs to.
    pub workload_id: u32,
    pub _pad: u32,
}

/// A destination that mesh workloads' connections are taken over for.
///
/// `port == 0` matches any port of `addr` (a service's virtual IP).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DestKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
}

/// A (source workload, destination) pair for the same-node fast path.
/// `dest.port == 0` matches any port (a virtual IP).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FastKey {
    pub workload_id: u32,
    pub dest: DestKey,
}

/// Where a taken-over connection goes instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectTarget {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
}

/// What the programs record about a redirected connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// The destination the workload asked for.
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
    /// The workload index from `WorkloadInfo`.
    pub workload_id: u32,
    /// The cgroup-v2 id of the connecting process.
    pub cgroup_id: u64,
}

/// A TCP connection as seen from the workload's socket: its local and remote
/// ends after the rewrite, with the network namespace it lives in.
/// The agent looks an accepted socket up as (peer, local).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockTuple {
    pub netns_cookie: u64,
    pub local_addr: [u32; 4],
    pub remote_addr: [u32; 4],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u16,
    pub _pad: u16,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are repr(C), Copy, and every bit pattern is valid.
    unsafe impl aya::Pod for super::WorkloadInfo {}
    unsafe impl aya::Pod for super::DestKey {}
    unsafe impl aya::Pod for super::RedirectTarget {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::SockTuple {}
    unsafe impl aya::Pod for super::FastKey {}
}
