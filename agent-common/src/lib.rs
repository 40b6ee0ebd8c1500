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
/// Protocol values of [`AgentPort`], as `IPPROTO_TCP` / `IPPROTO_UDP`.
pub const PROTO_TCP: u16 = 6;
pub const PROTO_UDP: u16 = 17;

/// Map names, shared so that the loader and the programs cannot drift apart.
pub mod maps {
    /// `cgroup id -> WorkloadInfo`: which cgroups hold mesh workloads.
    pub const WORKLOADS: &str = "WORKLOADS";
    /// `DestKey -> RedirectTarget`: destinations that are taken over.
    pub const DESTINATIONS: &str = "DESTINATIONS";
    /// How many destinations `DESTINATIONS` holds at most.
    pub const DESTINATIONS_CAPACITY: u32 = 65_536;
    /// `socket cookie -> OrigDst`: written by connect4/6, read by sockops.
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    /// `SockTuple -> OrigDst`: written by sockops once a connection is up.
    pub const ORIG_BY_TUPLE: &str = "ORIG_BY_TUPLE";
    /// Per-CPU counters, indexed by the `counter` constants.
    pub const COUNTERS: &str = "COUNTERS";
    /// `FastKey -> RedirectTarget`: same-node connections that intentions
    /// allow and that need no proxying go straight to the local instance.
    pub const FAST_PATH: &str = "FAST_PATH";
    /// Array of `u64` settings, indexed by the `agent` constants: the
    /// agent's liveness lease, the egress policy and the socket mark.
    pub const AGENT: &str = "AGENT";
    /// `port (u32) -> 1`: local instance ports of services in permissive
    /// mode, whose plaintext connections from other hosts go to the agent.
    pub const PERMISSIVE: &str = "PERMISSIVE";
    /// Sockmap holding the agent's permissive listener at index 0.
    pub const PERMISSIVE_LISTENER: &str = "PERMISSIVE_LISTENER";
    /// `AgentPort -> 1`: the agent's own local ports (local API, DNS,
    /// admin), which a connect() or sendmsg() reaches only while a socket
    /// with the agent's mark is bound there.
    pub const AGENT_PORTS: &str = "AGENT_PORTS";
    /// `socket cookie -> mark`: a fast-path socket's mark, put on when the
    /// kernel sends its SYN (sockops), not at connect().
    pub const FAST_PENDING: &str = "FAST_PENDING";
    /// Every map, in the order they are pinned.
    pub const ALL: [&str; 11] = [
        WORKLOADS,
        DESTINATIONS,
        ORIG_BY_COOKIE,
        ORIG_BY_TUPLE,
        COUNTERS,
        FAST_PATH,
        AGENT,
        PERMISSIVE,
        PERMISSIVE_LISTENER,
        AGENT_PORTS,
        FAST_PENDING,
    ];
}

/// Slots of the `AGENT` array.
pub mod agent {
    /// `CLOCK_MONOTONIC` nanoseconds until which the agent is known to be
    /// alive and its maps current. Past it, mesh workloads' connections are
    /// refused: the agent renews it while it runs.
    pub const ALIVE_UNTIL: u32 = 0;
    /// What happens to connections to destinations outside the mesh:
    /// `EGRESS_ALLOW` or `EGRESS_DENY`.
    pub const EGRESS: u32 = 1;
    /// The socket mark (`SO_MARK`) that tells connections the agent checked.
    pub const MARK: u32 = 2;
    /// Number of slots.
    pub const COUNT: u32 = 3;
    pub const EGRESS_ALLOW: u64 = 0;
    pub const EGRESS_DENY: u64 = 1;
}

/// Program names (the Rust function names in `agent-ebpf`).
pub mod programs {
    pub const CONNECT4: &str = "weft_connect4";
    pub const CONNECT6: &str = "weft_connect6";
    pub const SOCKOPS: &str = "weft_sockops";
    pub const INGRESS: &str = "weft_ingress";
    pub const SK_LOOKUP: &str = "weft_sk_lookup";
    pub const SENDMSG4: &str = "weft_sendmsg4";
    pub const SENDMSG6: &str = "weft_sendmsg6";
    /// Every program, in the order they are attached.
    pub const ALL: [&str; 7] = [
        CONNECT4, CONNECT6, SOCKOPS, INGRESS, SK_LOOKUP, SENDMSG4, SENDMSG6,
    ];
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
    /// connect() calls to destinations outside the mesh let through.
    pub const EGRESS_ALLOWED: u32 = 5;
    /// connect() calls to destinations outside the mesh refused.
    pub const EGRESS_DENIED: u32 = 6;
    /// connect() calls refused because no live agent could check them.
    pub const NO_AGENT: u32 = 7;
    /// Connection attempts to mesh workloads refused because the agent had
    /// not checked them (inbound capture).
    pub const INBOUND_REFUSED: u32 = 8;
    /// Plaintext connections to permissive services steered to the agent.
    pub const PERMISSIVE_STEERED: u32 = 9;
    /// connect() and sendmsg() calls to one of the agent's own ports
    /// refused: no socket with the agent's mark was bound there.
    pub const AGENT_PORT_REFUSED: u32 = 10;
    /// Number of counters.
    pub const COUNT: u32 = 11;
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
/// `family` is `AF_INET` (address in the first word) or `AF_INET6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DestKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
}

/// One of the agent's own ports, in the network namespace it serves.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AgentPort {
    /// The namespace's cookie (`SO_NETNS_COOKIE`).
    pub netns_cookie: u64,
    /// IPv4 address, network byte order.
    pub addr: u32,
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u16,
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
    unsafe impl aya::Pod for super::AgentPort {}
}
