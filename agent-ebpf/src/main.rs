//! weft's eBPF programs: they bring mesh workloads' connections to the agent,
//! keep everything else from reaching them, and fail closed without it.
//!
//! * `weft_connect4` (cgroup/connect4) and `weft_connect6` (cgroup/connect6)
//!   run when a process in the attached cgroup subtree calls `connect()`. For
//!   a mesh workload (`WORKLOADS`) they decide with [`steer`]: the same-node
//!   fast path, a redirect to the agent for mesh destinations (`DESTINATIONS`:
//!   virtual IPs and registered instances, IPv4 and IPv6), the `egress`
//!   policy for everything else, and a refusal when no live agent renews its
//!   lease in `AGENT` or no socket with the agent's mark listens where the
//!   connection would go (the mesh fails closed when the agent is gone).
//! * `weft_sockops` (sockops) moves the redirect record to a map keyed by the
//!   connection's 4-tuple and netns cookie once the connection is established,
//!   so that the agent can look up each accepted socket, and removes it again
//!   when the connection closes.
//! * `weft_ingress` (cgroup_skb/ingress) is inbound capture: a connection
//!   attempt (a packet for a listening socket) to a mesh workload is dropped
//!   unless it carries the agent's socket mark (the agent's own connections, and
//!   same-node fast-path ones the connect hook checked), or the workload's
//!   own mark (a workload reaching itself over loopback).
//! * `weft_sk_lookup` (sk_lookup, on the node's network namespace) steers
//!   plaintext connections from other hosts (not on loopback, not from the
//!   address they dial) to ports of services in permissive mode to the
//!   agent's permissive listener; with no listener (agent gone) they are
//!   refused.
//! * The agent's own local ports (`AGENT_PORTS`: local API, DNS, admin) are
//!   reached, by any process in the agent's network namespace, only while a
//!   socket with the agent's mark is bound there: connect4 and connect6
//!   check TCP and connected UDP, `weft_sendmsg4` and `weft_sendmsg6`
//!   (cgroup/sendmsg4, sendmsg6) unconnected UDP; an IPv6 socket's
//!   v4-mapped address counts as the IPv4 one, and `[::1]` at one of those
//!   ports is refused (the agent is on 127.0.0.1; a client trying
//!   `localhost` as `::1` first would reach whoever bound it). A process
//!   that binds one after the agent crashed hears nothing of what workloads
//!   send the agent (tokens, DNS queries).
//!
//! Every decision is made from maps the agent fills; nothing is hard-coded.
// On the host (clippy, `cargo check --workspace`) this is an ordinary binary
// that only says what it is for, so that the programs are still checked there.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as bpf_sock_tuple_ipv4,
        BPF_F_CURRENT_NETNS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_LISTEN,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
        bpf_get_socket_cookie, bpf_getsockopt, bpf_ktime_get_ns, bpf_setsockopt, bpf_sk_lookup_tcp,
        bpf_sk_lookup_udp, bpf_sk_release, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockMap},
    programs::{SkBuffContext, SkLookupContext, SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use weft_agent_common::{
    agent, counter, AgentPort, DestKey, FastKey, OrigDst, RedirectTarget, SockTuple, WorkloadInfo,
    AF_INET, AF_INET6, PROTO_TCP, PROTO_UDP,
};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
/// Let the connect() go on; pass the packet.
const ALLOW: i32 = 1;
/// Fail the connect() with EPERM; drop the packet.
const REFUSE: i32 = 0;
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;
/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

#[map(name = "WORKLOADS")]
static WORKLOADS: HashMap<u64, WorkloadInfo> = HashMap::with_max_entries(4096, 0);

#[map(name = "DESTINATIONS")]
static DESTINATIONS: HashMap<DestKey, RedirectTarget> =
    HashMap::with_max_entries(weft_agent_common::maps::DESTINATIONS_CAPACITY, 0);

#[map(name = "ORIG_BY_COOKIE")]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(65536, 0);

#[map(name = "ORIG_BY_TUPLE")]
static ORIG_BY_TUPLE: LruHashMap<SockTuple, OrigDst> = LruHashMap::with_max_entries(65536, 0);

#[map(name = "FAST_PATH")]
static FAST_PATH: HashMap<FastKey, RedirectTarget> = HashMap::with_max_entries(16384, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[map(name = "AGENT")]
static AGENT: Array<u64> = Array::with_max_entries(agent::COUNT, 0);

#[map(name = "PERMISSIVE")]
static PERMISSIVE: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

#[map(name = "PERMISSIVE_LISTENER")]
static PERMISSIVE_LISTENER: SockMap = SockMap::with_max_entries(1, 0);

#[map(name = "AGENT_PORTS")]
static AGENT_PORTS: HashMap<AgentPort, u32> = HashMap::with_max_entries(16, 0);

#[map(name = "FAST_PENDING")]
static FAST_PENDING: LruHashMap<u64, u32> = LruHashMap::with_max_entries(16384, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *slot += 1 };
    }
}

/// How deep below the cgroup root a workload's cgroup is looked for.
const MAX_CGROUP_DEPTH: i32 = 16;

/// The mesh workload a cgroup belongs to: its own entry, or else the
/// deepest ancestor's (`ancestor(level)` gives the ancestor at `level`, 0
/// when the cgroup is not that deep). A process that makes a cgroup below
/// its workload's stays that workload.
#[inline(always)]
fn workload_of(cgroup_id: u64, ancestor: impl Fn(i32) -> u64) -> Option<WorkloadInfo> {
    // SAFETY: values in this map are plain data written by the agent.
    if let Some(w) = unsafe { WORKLOADS.get(cgroup_id) } {
        return Some(*w);
    }
    let mut found = None;
    for level in 0..MAX_CGROUP_DEPTH {
        let id = ancestor(level);
        if id == 0 || id == cgroup_id {
            break;
        }
        // SAFETY: as above.
        if let Some(w) = unsafe { WORKLOADS.get(id) } {
            found = Some(*w);
        }
    }
    found
}

#[inline(always)]
fn setting(slot: u32) -> u64 {
    AGENT.get(slot).copied().unwrap_or(0)
}

/// Whether a live agent renewed its lease: its maps are current and it is
/// there to take redirected connections.
#[inline(always)]
fn agent_alive() -> bool {
    let until = setting(agent::ALIVE_UNTIL);
    // SAFETY: helper without arguments.
    until != 0 && unsafe { bpf_ktime_get_ns() } < until
}

/// Sets `SO_MARK` on the context's socket (a connect hook's, or sockops').
#[inline(always)]
fn mark_socket(ctx: &impl EbpfContext, mark: u32) {
    let mut value = mark;
    // SAFETY: a valid context and a 4-byte value of the advertised size.
    unsafe {
        bpf_setsockopt(
            ctx.as_ptr(),
            SOL_SOCKET,
            SO_MARK,
            (&mut value as *mut u32).cast(),
            4,
        );
    }
}

/// Whether `addr:port` (`protocol`) is one of the agent's own ports in the
/// caller's network namespace.
#[inline(always)]
fn is_agent_port(ctx: &SockAddrContext, addr: u32, port: u16, protocol: u16) -> bool {
    // SAFETY: the context pointer is valid for this program type.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = AgentPort {
        netns_cookie,
        addr,
        port,
        protocol,
    };
    // SAFETY: values in this map are plain data written by the agent.
    unsafe { AGENT_PORTS.get(key) }.is_some()
}

/// `127.0.0.1` as the kernel hands an IPv4 address (network order, read on
/// a little-endian host).
const V4_LOCALHOST: u32 = 0x0100_007f;

/// [`agent_port_taken`] for an IPv6 destination: a v4-mapped address is
/// the IPv4 one; `[::1]` at a port the agent holds on 127.0.0.1 is never
/// the agent's.
#[inline(always)]
fn agent_port_taken6(ctx: &SockAddrContext, ip6: [u32; 4], port: u16, protocol: u16) -> bool {
    if ip6[0] != 0 || ip6[1] != 0 {
        return false;
    }
    if ip6[2] == V4_MAPPED {
        return agent_port_taken(ctx, ip6[3], port, protocol);
    }
    if ip6[2] == 0 && ip6[3] == V6_LOOPBACK_LAST && is_agent_port(ctx, V4_LOCALHOST, port, protocol)
    {
        count(counter::AGENT_PORT_REFUSED);
        return true;
    }
    false
}

/// Whether `addr:port` (`protocol`) is one of the agent's own ports in the
/// caller's network namespace with no socket of the agent bound there: a
/// connect() or sendmsg() to it would reach whoever took the port.
#[inline(always)]
fn agent_port_taken(ctx: &SockAddrContext, addr: u32, port: u16, protocol: u16) -> bool {
    if !is_agent_port(ctx, addr, port, protocol) {
        return false;
    }
    let target = RedirectTarget {
        addr: [addr, 0, 0, 0],
        port,
        family: AF_INET,
    };
    if agent_bound(ctx, &target, protocol, setting(agent::MARK) as u32) {
        return false;
    }
    count(counter::AGENT_PORT_REFUSED);
    true
}

#[cgroup_sock_addr(connect4)]
pub fn weft_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the whole call.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip = sa.user_ip4;
    let port = u16::from_be(sa.user_port as u16);
    if sa.type_ == SOCK_DGRAM {
        // A connected UDP socket (glibc's resolver connects its queries).
        return if agent_port_taken(&ctx, ip, port, PROTO_UDP) {
            REFUSE
        } else {
            ALLOW
        };
    }
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    if agent_port_taken(&ctx, ip, port, PROTO_TCP) {
        return REFUSE;
    }
    let key = DestKey {
        addr: [ip, 0, 0, 0],
        port,
        family: AF_INET,
    };
    // 127.0.0.0/8: the first byte in network order is the low byte here.
    let loopback = ip & 0xff == 127;
    match steer(&ctx, key, loopback) {
        Steer::Leave => ALLOW,
        Steer::Refuse => REFUSE,
        Steer::To(target) => {
            // Separate volatile stores: the verifier refuses a merged wide
            // store to the context.
            // SAFETY: writable fields of bpf_sock_addr for connect4.
            unsafe {
                core::ptr::write_volatile(&mut sa.user_ip4, target.addr[0]);
                core::ptr::write_volatile(&mut sa.user_port, u32::from(target.port.to_be()));
            }
            ALLOW
        }
    }
}

/// The third word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), as the
/// network-order bytes 00 00 ff ff read on a little-endian host.
const V4_MAPPED: u32 = 0xffff_0000;
/// `::1` as read on a little-endian host.
const V6_LOOPBACK_LAST: u32 = 0x0100_0000;

/// IPv6 sockets: v4-mapped destinations are steered exactly like connect4;
/// other IPv6 destinations (global, link-local, loopback) are looked up as
/// IPv6, and redirected to the v4-mapped form of the agent's listener.
#[cgroup_sock_addr(connect6)]
pub fn weft_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the whole call.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip6 = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let port = u16::from_be(sa.user_port as u16);
    let protocol = match sa.type_ {
        SOCK_STREAM => PROTO_TCP,
        SOCK_DGRAM => PROTO_UDP,
        _ => return ALLOW,
    };
    if agent_port_taken6(&ctx, ip6, port, protocol) {
        return REFUSE;
    }
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    let mapped = ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED;
    let (key, loopback) = if mapped {
        let key = DestKey {
            addr: [ip6[3], 0, 0, 0],
            port,
            family: AF_INET,
        };
        (key, ip6[3] & 0xff == 127)
    } else {
        let key = DestKey {
            addr: ip6,
            port,
            family: AF_INET6,
        };
        let loopback = ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == V6_LOOPBACK_LAST;
        (key, loopback)
    };
    match steer(&ctx, key, loopback) {
        Steer::Leave => ALLOW,
        Steer::Refuse => REFUSE,
        Steer::To(target) => {
            // Targets are IPv4: an IPv6 socket reaches them v4-mapped (a
            // socket with IPV6_V6ONLY cannot, and its connect fails).
            // SAFETY: writable fields of bpf_sock_addr for connect6.
            unsafe {
                core::ptr::write_volatile(&mut sa.user_ip6[0], 0);
                core::ptr::write_volatile(&mut sa.user_ip6[1], 0);
                core::ptr::write_volatile(&mut sa.user_ip6[2], V4_MAPPED);
                core::ptr::write_volatile(&mut sa.user_ip6[3], target.addr[0]);
                core::ptr::write_volatile(&mut sa.user_port, u32::from(target.port.to_be()));
            }
            ALLOW
        }
    }
}

/// What to do with a mesh workload's connect().
enum Steer {
    /// Not a mesh connection, and allowed out: leave it alone.
    Leave,
    /// Go to this address instead.
    To(RedirectTarget),
    /// Fail the connect (EPERM): it must not go out unchecked.
    Refuse,
}

/// Looks `key` up exactly, then as "any port" (a virtual IP).
#[inline(always)]
fn destination(mut key: DestKey) -> Option<RedirectTarget> {
    // SAFETY: values in this map are plain data written by the agent.
    if let Some(t) = unsafe { DESTINATIONS.get(key) } {
        return Some(*t);
    }
    key.port = 0;
    unsafe { DESTINATIONS.get(key) }.copied()
}

/// Whether the socket listening at `target`, in the connecting socket's
/// network namespace, carries the agent's mark: the agent marks the ports
/// it takes connections on, and setting a mark needs CAP_NET_ADMIN or CAP_NET_RAW. After a
/// crash, while the lease runs, a process that bound the agent's port first
/// would otherwise be sent every redirected connection, in plaintext. (The
/// one way a workload gets a socket with this mark, the fast path, gives it
/// for that connection only: the mark goes when the connection does, see
/// [`on_close`], so the socket cannot be made to listen with it.)
#[inline(always)]
fn agent_listens(ctx: &SockAddrContext, target: &RedirectTarget, mark: u32) -> bool {
    agent_bound(ctx, target, PROTO_TCP, mark)
}

/// [`agent_listens`] for `protocol`: for UDP, whether the socket bound at
/// `target` carries the mark.
#[inline(always)]
fn agent_bound(ctx: &SockAddrContext, target: &RedirectTarget, protocol: u16, mark: u32) -> bool {
    // Looked up as a connection from the target's own address and port 0,
    // which no established socket has: only a listener matches, and the
    // sk_lookup program leaves a connection from this host alone.
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple_ipv4 {
                saddr: target.addr[0],
                daddr: target.addr[0],
                sport: 0,
                dport: target.port.to_be(),
            },
        },
    };
    let size = core::mem::size_of::<bpf_sock_tuple_ipv4>() as u32;
    let netns = BPF_F_CURRENT_NETNS as u64;
    // SAFETY: a valid context and tuple; the IPv4 part's size says which.
    let sk = unsafe {
        if protocol == PROTO_UDP {
            bpf_sk_lookup_udp(ctx.as_ptr(), &mut tuple, size, netns, 0)
        } else {
            bpf_sk_lookup_tcp(ctx.as_ptr(), &mut tuple, size, netns, 0)
        }
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket the lookup returned, released right after.
    let listening = unsafe { (*sk).mark };
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(sk.cast()) };
    mark != 0 && listening == mark
}

/// Decides a mesh workload's connect() to `key`: the same-node fast path, a
/// redirect to the agent (recording the original destination under the
/// socket cookie), the egress policy, or a refusal when no live agent can
/// check it. `loopback`: the destination is on the loopback network.
#[inline(always)]
fn steer(ctx: &SockAddrContext, key: DestKey, loopback: bool) -> Steer {
    // A mark waiting from an earlier connect of this socket (one that failed
    // before its SYN) is not for this one, whoever makes it.
    // SAFETY: the context pointer is valid for this program type.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = FAST_PENDING.remove(cookie);
    // SAFETY: helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: helper with a plain integer argument.
    let ancestor = |level| unsafe { bpf_get_current_ancestor_cgroup_id(level) };
    let Some(workload) = workload_of(cgroup_id, ancestor) else {
        return Steer::Leave;
    };
    let workload_id = workload.workload_id;
    count(counter::CONNECT_SEEN);
    let alive = agent_alive();
    let mark = setting(agent::MARK) as u32;

    // Same-node fast path: the agent put this pair here because intentions
    // allow it and the service is plain TCP; go straight to the instance,
    // with the mark that lets the connection past inbound capture. Only
    // while the agent is alive: a deny written since must not be bypassed.
    if alive {
        let mut fast = FastKey {
            workload_id,
            dest: key,
        };
        // SAFETY: values in this map are plain data written by the agent.
        let direct = match unsafe { FAST_PATH.get(fast) } {
            Some(t) => Some(*t),
            None => {
                fast.dest.port = 0;
                unsafe { FAST_PATH.get(fast) }.copied()
            }
        };
        if let Some(target) = direct {
            // The mark goes on when the kernel sends the SYN (sockops,
            // [`on_connect`]): a connect that fails before it (a 4-tuple
            // taken) would leave a marked socket that no connection's end
            // unmarks, to be handed out of the mesh.
            mark_socket(ctx, 0);
            if FAST_PENDING.insert(cookie, mark, 0).is_err() {
                return Steer::Refuse;
            }
            count(counter::FAST_PATH);
            return Steer::To(target);
        }
    }

    // Every other outcome clears the socket's mark: a socket reused after
    // `connect(AF_UNSPEC)` must not keep a mark this hook gave it for an
    // earlier, checked destination.
    mark_socket(ctx, 0);
    let Some(target) = destination(key) else {
        // Not a mesh destination.
        if loopback {
            // The workload's own loopback traffic; marked so that it may
            // reach the workload itself, and nothing else of the mesh.
            mark_socket(ctx, mark | workload_id);
            return Steer::Leave;
        }
        if !alive {
            count(counter::NO_AGENT);
            return Steer::Refuse;
        }
        if setting(agent::EGRESS) == agent::EGRESS_DENY {
            count(counter::EGRESS_DENIED);
            return Steer::Refuse;
        }
        count(counter::EGRESS_ALLOWED);
        return Steer::Leave;
    };
    if !alive || !agent_listens(ctx, &target, mark) {
        count(counter::NO_AGENT);
        return Steer::Refuse;
    }

    // SAFETY: the context pointer is valid for this program type.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr: key.addr,
        port: key.port,
        family: key.family,
        workload_id,
        cgroup_id,
    };
    if ORIG_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        // Without a record the agent could not tell who connected, and the
        // connection must not go out unchecked either: fail it.
        return Steer::Refuse;
    }
    count(counter::REDIRECTED);
    debug!(ctx, "redirect cgroup {} port {}", cgroup_id, key.port);
    Steer::To(target)
}

/// Inbound capture: drops every packet for a listening socket of a mesh
/// workload (a connection attempt: the SYN, and the ACK that would complete
/// a handshake) unless the connecting socket carried the agent's mark, or
/// the workload's own mark. Packets for established sockets pass: they got
/// in through a checked handshake, or are replies to the workload's own
/// connections. The decision reads the socket's state, not the packet, so
/// no header layout (IPv6 extension headers, TCP options) can hide a SYN.
#[cgroup_skb(ingress)]
pub fn weft_ingress(ctx: SkBuffContext) -> i32 {
    // SAFETY: the context's skb pointer is valid for this program type.
    let skb = unsafe { &*ctx.skb.skb };
    // SAFETY: reading the socket pointer of the __sk_buff.
    let sk = unsafe { skb.__bindgen_anon_2.sk };
    if sk.is_null() {
        return ALLOW;
    }
    // SAFETY: checked non-null; `state` is in the common part of a socket.
    if unsafe { (*sk).state } != BPF_TCP_LISTEN {
        return ALLOW;
    }
    // SAFETY: helper on the valid skb of this program.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    // SAFETY: helper on the valid skb of this program.
    let ancestor = |level| unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, level) };
    let Some(workload) = workload_of(cgroup_id, ancestor) else {
        return ALLOW;
    };
    let workload_id = workload.workload_id;
    let packet_mark = skb.mark;
    let mark = setting(agent::MARK) as u32;
    if mark != 0 && (packet_mark == mark || packet_mark == mark | workload_id) {
        return ALLOW;
    }
    count(counter::INBOUND_REFUSED);
    REFUSE
}

/// Permissive mode: a connection from another host to a local port of a
/// permissive service goes to the agent's permissive listener; with no
/// listener (agent gone) it is refused. Connections arriving on loopback
/// (the agent's own, local processes) go on to inbound capture.
#[sk_lookup]
pub fn weft_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands us a valid bpf_sk_lookup for the whole call.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP || lookup.ingress_ifindex == LOOPBACK_IFINDEX {
        return SK_PASS;
    }
    // A connection from this host to one of its own addresses (its source
    // is the address it dials; the agent's own connections to instances
    // and health checks are such) is not from another host: it goes on to
    // inbound capture, which admits it only with the agent's mark.
    let from_this_host = if lookup.family == u32::from(AF_INET) {
        lookup.remote_ip4 == lookup.local_ip4
    } else {
        let (r, l) = (lookup.remote_ip6, lookup.local_ip6);
        r[0] == l[0] && r[1] == l[1] && r[2] == l[2] && r[3] == l[3]
    };
    if from_this_host {
        return SK_PASS;
    }
    let port = lookup.local_port;
    // SAFETY: values in this map are plain data written by the agent.
    if unsafe { PERMISSIVE.get(port) }.is_none() {
        return SK_PASS;
    }
    match PERMISSIVE_LISTENER.redirect_sk_lookup(&ctx, 0, 0) {
        Ok(()) => {
            count(counter::PERMISSIVE_STEERED);
            SK_PASS
        }
        Err(_) => {
            count(counter::INBOUND_REFUSED);
            SK_DROP
        }
    }
}

/// Unconnected UDP (`sendto`, as musl's resolver sends its queries): a
/// datagram for one of the agent's own ports goes only to the agent.
#[cgroup_sock_addr(sendmsg4)]
pub fn weft_sendmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the whole call.
    let sa = unsafe { &*ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    if agent_port_taken(&ctx, sa.user_ip4, port, PROTO_UDP) {
        REFUSE
    } else {
        ALLOW
    }
}

/// [`weft_sendmsg4`] for IPv6 sockets (v4-mapped destinations, `[::1]`).
#[cgroup_sock_addr(sendmsg6)]
pub fn weft_sendmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the whole call.
    let sa = unsafe { &*ctx.sock_addr };
    let ip6 = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let port = u16::from_be(sa.user_port as u16);
    if agent_port_taken6(&ctx, ip6, port, PROTO_UDP) {
        REFUSE
    } else {
        ALLOW
    }
}

#[sock_ops]
pub fn weft_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    0
}

/// The socket's `SO_MARK` (0 when it cannot be read).
#[inline(always)]
fn socket_mark(ctx: &SockOpsContext) -> u32 {
    let mut value: u32 = 0;
    // SAFETY: a valid context and a 4-byte buffer of the advertised size.
    unsafe {
        bpf_getsockopt(
            ctx.as_ptr(),
            SOL_SOCKET,
            SO_MARK,
            (&mut value as *mut u32).cast(),
            4,
        );
    }
    value
}

/// A workload's socket the connect hook sent on the fast path gets the
/// agent's mark now, as the kernel sends its SYN, and is watched from here
/// on, so that the mark goes with its connection (see [`on_close`]).
#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    // SAFETY: the context pointer is valid for this program type.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain data written by the connect hook.
    let Some(mark) = (unsafe { FAST_PENDING.get(cookie) }).copied() else {
        return;
    };
    let _ = FAST_PENDING.remove(cookie);
    // A SYN sent long after its connect() (a deferred Fast Open connect
    // sends it at the first write) goes unmarked once no live agent vouches
    // for the maps the connect hook read: inbound capture refuses it.
    if !agent_alive() {
        return;
    }
    mark_socket(ctx, mark);
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// The IPv4 addresses of the connection (local, remote): plain IPv4, or an
/// IPv6 socket talking to a v4-mapped address. None for real IPv6.
#[inline(always)]
fn v4_ends(ctx: &SockOpsContext) -> Option<(u32, u32)> {
    // Every field is read once, up front, with volatile loads: otherwise
    // LLVM shares one context pointer between the branches and the verifier
    // refuses a dereference of a modified context pointer.
    // SAFETY: valid bpf_sock_ops fields for this program type.
    let (family, l4, r4, l6, r6) = unsafe {
        let ops = ctx.ops;
        (
            core::ptr::read_volatile(&(*ops).family),
            core::ptr::read_volatile(&(*ops).local_ip4),
            core::ptr::read_volatile(&(*ops).remote_ip4),
            core::ptr::read_volatile(&(*ops).local_ip6),
            core::ptr::read_volatile(&(*ops).remote_ip6),
        )
    };
    let mapped = |a: [u32; 4]| a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED;
    if family == u32::from(AF_INET) {
        Some((l4, r4))
    } else if family == u32::from(AF_INET6) && mapped(l6) && mapped(r6) {
        Some((l6[3], r6[3]))
    } else {
        None
    }
}

#[inline(always)]
fn tuple_of(ctx: &SockOpsContext, (local, remote): (u32, u32)) -> SockTuple {
    // SAFETY: the context pointer is valid for this program type.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    SockTuple {
        netns_cookie,
        local_addr: [local, 0, 0, 0],
        remote_addr: [remote, 0, 0, 0],
        local_port: ctx.local_port() as u16,
        // The kernel hands remote_port over as the big-endian 16-bit port
        // shifted into the upper half of the 32-bit field (little-endian hosts).
        remote_port: u16::from_be((ctx.remote_port() >> 16) as u16),
        family: AF_INET,
        _pad: 0,
    }
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    let Some(ends) = v4_ends(ctx) else {
        return;
    };
    // SAFETY: the context pointer is valid for this program type.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain data written by connect4.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(cookie) }) else {
        return;
    };
    let orig = *orig;
    let tuple = tuple_of(ctx, ends);
    if ORIG_BY_TUPLE.insert(tuple, orig, 0).is_ok() {
        count(counter::REKEYED);
        debug!(ctx, "established: local port {}", tuple.local_port);
    }
    let _ = ORIG_BY_COOKIE.remove(cookie);
    // Ask for state changes so the record goes when the connection does.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    // The fast path's mark is for the one connection the connect hook
    // checked. A socket dissolved with connect(AF_UNSPEC) keeps its mark,
    // and the hook, which decides by the calling process's cgroup, leaves
    // it alone in a process outside the mesh that the socket was handed
    // to; listening, it would pass for the agent's listener. So the mark
    // goes when the connection does.
    let mark = setting(agent::MARK) as u32;
    if mark != 0 && socket_mark(ctx) == mark {
        mark_socket(ctx, 0);
    }
    let Some(ends) = v4_ends(ctx) else {
        return;
    };
    let tuple = tuple_of(ctx, ends);
    if ORIG_BY_TUPLE.remove(tuple).is_ok() {
        count(counter::CLOSED);
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("weft-agent-ebpf holds eBPF programs: build it with `cargo xtask build-ebpf`");
    std::process::exit(1);
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
