//! weft's eBPF programs: they bring mesh workloads' connections to the agent.
//!
//! * `weft_connect4` (cgroup/connect4), and `weft_connect6` for IPv6 sockets
//!   connecting to v4-mapped addresses, run when a process in the attached
//!   cgroup subtree calls `connect()`. If the process's cgroup is a mesh
//!   workload (`WORKLOADS`) and the destination is taken over
//!   (`DESTINATIONS`, exact port first, then port 0 = any port), it records
//!   the original destination under the socket cookie and rewrites the
//!   destination to the target from the map.
//! * `weft_sockops` (sockops) moves that record to a map keyed by the
//!   connection's 4-tuple and netns cookie once the connection is established,
//!   so that the agent can look up each accepted socket, and removes it again
//!   when the connection closes.
//!
//! Every decision is made from maps the agent fills; nothing is hard-coded.
// On the host (clippy, `cargo check --workspace`) this is an ordinary binary
// that only says what it is for, so that the programs are still checked there.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::{debug, info};
use weft_agent_common::{
    counter, DestKey, FastKey, OrigDst, RedirectTarget, SockTuple, WorkloadInfo, AF_INET, AF_INET6,
};

const SOCK_STREAM: u32 = 1;
/// Let the connect() go on.
const ALLOW: i32 = 1;
/// Fail the connect() with EPERM.
const REFUSE: i32 = 0;

#[map(name = "WORKLOADS")]
static WORKLOADS: HashMap<u64, WorkloadInfo> = HashMap::with_max_entries(4096, 0);

#[map(name = "DESTINATIONS")]
static DESTINATIONS: HashMap<DestKey, RedirectTarget> = HashMap::with_max_entries(65536, 0);

#[map(name = "ORIG_BY_COOKIE")]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(65536, 0);

#[map(name = "ORIG_BY_TUPLE")]
static ORIG_BY_TUPLE: LruHashMap<SockTuple, OrigDst> = LruHashMap::with_max_entries(65536, 0);

#[map(name = "FAST_PATH")]
static FAST_PATH: HashMap<FastKey, RedirectTarget> = HashMap::with_max_entries(16384, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *slot += 1 };
    }
}

#[cgroup_sock_addr(connect4)]
pub fn weft_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the whole call.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    let port = u16::from_be(sa.user_port as u16);
    match steer(&ctx, sa.user_ip4, port) {
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

/// IPv6 sockets reach IPv4 destinations through v4-mapped addresses; those
/// are steered exactly like connect4. Other IPv6 destinations are not mesh
/// addresses (virtual IPs are IPv4) and pass.
#[cgroup_sock_addr(connect6)]
pub fn weft_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the whole call.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    let ip6 = sa.user_ip6;
    if ip6[0] != 0 || ip6[1] != 0 || ip6[2] != V4_MAPPED {
        return ALLOW;
    }
    let port = u16::from_be(sa.user_port as u16);
    match steer(&ctx, ip6[3], port) {
        Steer::Leave => ALLOW,
        Steer::Refuse => REFUSE,
        Steer::To(target) => {
            // SAFETY: writable fields of bpf_sock_addr for connect6; the
            // address stays v4-mapped.
            unsafe {
                core::ptr::write_volatile(&mut sa.user_ip6[3], target.addr[0]);
                core::ptr::write_volatile(&mut sa.user_port, u32::from(target.port.to_be()));
            }
            ALLOW
        }
    }
}

/// What to do with a mesh workload's connect().
enum Steer {
    /// Not a mesh connection: leave it alone.
    Leave,
    /// Go to this address instead.
    To(RedirectTarget),
    /// Fail the connect (EPERM): it must not go out unchecked.
    Refuse,
}

/// Decides a connect() to IPv4 `ip` (network order) and `port`: the
/// same-node fast path, a redirect to the agent (recording the original
/// destination under the socket cookie), or nothing.
#[inline(always)]
fn steer<C: EbpfContext>(ctx: &C, ip: u32, port: u16) -> Steer {
    // SAFETY: helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: values in this map are plain data written by the agent.
    let Some(workload) = (unsafe { WORKLOADS.get(cgroup_id) }) else {
        return Steer::Leave;
    };
    let workload_id = workload.workload_id;
    count(counter::CONNECT_SEEN);
    let mut key = DestKey {
        addr: [ip, 0, 0, 0],
        port,
        family: AF_INET,
    };

    // Same-node fast path: the agent put this pair here because intentions
    // allow it and the service is plain TCP; go straight to the instance.
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
        count(counter::FAST_PATH);
        return Steer::To(target);
    }
    // SAFETY: as above.
    let target = match unsafe { DESTINATIONS.get(key) } {
        Some(t) => *t,
        None => {
            key.port = 0;
            match unsafe { DESTINATIONS.get(key) } {
                Some(t) => *t,
                None => return Steer::Leave,
            }
        }
    };

    // SAFETY: the context pointer is valid for this program type.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr: [ip, 0, 0, 0],
        port,
        family: AF_INET,
        workload_id,
        cgroup_id,
    };
    if ORIG_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        // Without a record the agent could not tell who connected, and the
        // connection must not go out unchecked either: fail it.
        return Steer::Refuse;
    }
    count(counter::REDIRECTED);
    info!(
        ctx,
        "redirect cgroup {} to {:i}:{} -> {:i}:{}",
        cgroup_id,
        u32::from_be(ip),
        port,
        u32::from_be(target.addr[0]),
        target.port
    );
    Steer::To(target)
}

#[sock_ops]
pub fn weft_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    0
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
