//! weft's eBPF programs: they bring mesh workloads' connections to the agent.
//!
//! * `weft_connect4` (cgroup/connect4) runs when a process in the attached
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
    counter, DestKey, FastKey, OrigDst, RedirectTarget, SockTuple, WorkloadInfo, AF_INET,
};

const SOCK_STREAM: u32 = 1;
/// Let the connect() go on (0 would fail it with EPERM).
const ALLOW: i32 = 1;

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
    connect4(&ctx);
    ALLOW
}

#[inline(always)]
fn connect4(ctx: &SockAddrContext) {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the whole call.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return;
    }
    // SAFETY: helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: values in this map are plain data written by the agent.
    let Some(workload) = (unsafe { WORKLOADS.get(cgroup_id) }) else {
        return;
    };
    count(counter::CONNECT_SEEN);

    let ip = sa.user_ip4;
    let port = u16::from_be(sa.user_port as u16);
    let mut key = DestKey {
        addr: [ip, 0, 0, 0],
        port,
        family: AF_INET,
    };

    // Same-node fast path: the agent put this pair here because intentions
    // allow it and the service is plain TCP; go straight to the instance.
    let mut fast = FastKey {
        workload_id: workload.workload_id,
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
        // SAFETY: writable fields of bpf_sock_addr for connect4.
        unsafe {
            core::ptr::write_volatile(&mut sa.user_ip4, target.addr[0]);
            core::ptr::write_volatile(&mut sa.user_port, u32::from(target.port.to_be()));
        }
        count(counter::FAST_PATH);
        return;
    }
    // SAFETY: as above.
    let target = match unsafe { DESTINATIONS.get(key) } {
        Some(t) => *t,
        None => {
            key.port = 0;
            match unsafe { DESTINATIONS.get(key) } {
                Some(t) => *t,
                None => return,
            }
        }
    };

    // SAFETY: the context pointer is valid for this program type.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr: [ip, 0, 0, 0],
        port,
        family: AF_INET,
        workload_id: workload.workload_id,
        cgroup_id,
    };
    if ORIG_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        // Without a record the agent could not tell who connected: let the
        // connection go where it was going rather than arrive anonymous.
        return;
    }
    // Separate volatile stores: the verifier refuses a merged wide store
    // to the context.
    // SAFETY: writable fields of bpf_sock_addr for connect4.
    unsafe {
        core::ptr::write_volatile(&mut sa.user_ip4, target.addr[0]);
        core::ptr::write_volatile(&mut sa.user_port, u32::from(target.port.to_be()));
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

#[inline(always)]
fn tuple_of(ctx: &SockOpsContext) -> SockTuple {
    // SAFETY: the context pointer is valid for this program type.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    SockTuple {
        netns_cookie,
        local_addr: [ctx.local_ip4(), 0, 0, 0],
        remote_addr: [ctx.remote_ip4(), 0, 0, 0],
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
    if ctx.family() != u32::from(AF_INET) {
        return;
    }
    // SAFETY: the context pointer is valid for this program type.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain data written by connect4.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(cookie) }) else {
        return;
    };
    let orig = *orig;
    let tuple = tuple_of(ctx);
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
    if ctx.family() != u32::from(AF_INET) {
        return;
    }
    let tuple = tuple_of(ctx);
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
