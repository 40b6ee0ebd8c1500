//! Loads weft's eBPF programs, attaches them to a cgroup-v2 subtree, and gives
//! the agent typed access to their maps: which cgroups are mesh workloads,
//! which destinations are taken over and where they go, and what the programs
//! recorded about each redirected connection.
//!
//! Programs, links and maps are pinned in bpffs (see [`super::pins`]), so
//! they outlive the agent process: with no agent the programs go on refusing
//! mesh workloads' connections (the liveness lease in `AGENT` runs out) and
//! dropping unchecked connection attempts to them. A new agent reuses the
//! pinned maps of the same program build, attaches its programs, and only
//! then removes the links of its predecessor.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, MapData, PerCpuArray, SockMap};
use aya::programs::{
    links::FdLink, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SkLookup,
    SockOps,
};
use aya::Ebpf;
use weft_agent_common::{
    agent, counter, maps, programs, AgentPort, DestKey, FastKey, OrigDst, RedirectTarget,
    SockTuple, WorkloadInfo, AF_INET, AF_INET6,
};

use super::pins::{PinError, Pins};

/// The programs, built by build.rs from `agent-ebpf` for this very build.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft-agent-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum RedirectorError {
    #[error("loading the eBPF object: {0} (the agent needs root, or CAP_BPF and CAP_NET_ADMIN)")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading socket addresses: {0}")]
    Socket(#[source] std::io::Error),
    #[error("redirect targets are IPv4 (the agent's listeners), not {0}")]
    NotIpv4(IpAddr),
    #[error("opening the network namespace: {0}")]
    Netns(#[source] std::io::Error),
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error("pinning the link of {name}: {source}")]
    PinLink {
        name: &'static str,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("the link of {name} cannot be pinned: {source}")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
}

impl RedirectorError {
    /// Whether a map had no room for a new entry (`E2BIG`).
    pub fn is_map_full(&self) -> bool {
        matches!(self, RedirectorError::Map {
            source: aya::maps::MapError::SyscallError(e),
            ..
        } if e.io_error.raw_os_error() == Some(libc::E2BIG))
    }
}

/// What the programs recorded about a redirected connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDst {
    /// Where the workload was connecting to.
    pub addr: SocketAddr,
    /// The workload id the agent registered for the source cgroup.
    pub workload_id: u32,
    /// The cgroup-v2 id of the connecting process.
    pub cgroup_id: u64,
}

/// The programs' counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectCounters {
    pub connects_seen: u64,
    pub redirected: u64,
    pub rekeyed: u64,
    pub closed: u64,
    /// Connections sent straight to a local instance (same-node fast path).
    pub fast_path: u64,
    /// Connections to destinations outside the mesh let through / refused.
    pub egress_allowed: u64,
    pub egress_denied: u64,
    /// Connections refused because no live agent could check them.
    pub no_agent: u64,
    /// Unchecked connection attempts to mesh workloads refused.
    pub inbound_refused: u64,
    /// Plaintext connections to permissive services steered to the agent.
    pub permissive_steered: u64,
    /// connect() and sendmsg() calls to one of the agent's own ports with
    /// no socket of the agent bound there.
    pub agent_port_refused: u64,
}

/// weft's loaded eBPF programs and their maps.
pub struct Redirector {
    ebpf: Ebpf,
    pins: Pins,
    settings: Settings,
    permissive: HashMap<MapData, u32, u32>,
    permissive_listener: SockMap<MapData>,
    agent_ports: HashMap<MapData, AgentPort, u32>,
    workloads: HashMap<MapData, u64, WorkloadInfo>,
    destinations: HashMap<MapData, DestKey, RedirectTarget>,
    fast_path: HashMap<MapData, FastKey, RedirectTarget>,
    by_tuple: Records,
    by_cookie: HashMap<MapData, u64, OrigDst>,
    counters: PerCpuArray<MapData, u64>,
    log_task: Option<tokio::task::JoinHandle<()>>,
}

/// The programs' settings (the `AGENT` array: lease, egress policy, mark),
/// shared with the redirector: one map write under a lock of its own.
#[derive(Clone)]
pub struct Settings(std::sync::Arc<std::sync::Mutex<Array<MapData, u64>>>);

impl Settings {
    /// Renews the agent's liveness lease for `lease`.
    pub fn renew_lease(&self, lease: std::time::Duration) -> Result<(), RedirectorError> {
        self.renew_lease_while(lease, || true)
    }

    /// Renews the lease for `lease` if `keep()` says so, else ends it;
    /// `keep` is asked under the lock that ending the lease takes, so that
    /// a renewal never lands after an end decided on a later answer.
    pub fn renew_lease_while(
        &self,
        lease: std::time::Duration,
        keep: impl FnOnce() -> bool,
    ) -> Result<(), RedirectorError> {
        let mut map = self.0.lock().expect("settings lock");
        let until = match keep() {
            true => monotonic_ns().saturating_add(lease.as_nanos() as u64),
            false => 0,
        };
        Self::write(&mut map, agent::ALIVE_UNTIL, until)
    }

    /// Ends the lease at once.
    pub fn end_lease(&self) -> Result<(), RedirectorError> {
        self.set(agent::ALIVE_UNTIL, 0)
    }

    /// Whether the lease runs now: the programs take the agent for alive.
    pub fn lease_runs(&self) -> Result<bool, RedirectorError> {
        Ok(self.get(agent::ALIVE_UNTIL)? > monotonic_ns())
    }

    /// The egress policy the programs apply now.
    pub fn egress(&self) -> Result<Egress, RedirectorError> {
        Ok(match self.get(agent::EGRESS)? {
            agent::EGRESS_DENY => Egress::Deny,
            _ => Egress::Allow,
        })
    }

    fn get(&self, slot: u32) -> Result<u64, RedirectorError> {
        (self.0.lock().expect("settings lock"))
            .get(&slot, 0)
            .map_err(|source| RedirectorError::Map {
                name: maps::AGENT,
                source,
            })
    }

    fn set(&self, slot: u32, value: u64) -> Result<(), RedirectorError> {
        Self::write(&mut self.0.lock().expect("settings lock"), slot, value)
    }

    fn write(map: &mut Array<MapData, u64>, slot: u32, value: u64) -> Result<(), RedirectorError> {
        map.set(slot, value, 0)
            .map_err(|source| RedirectorError::Map {
                name: maps::AGENT,
                source,
            })
    }
}

/// The programs' records of redirected connections, by their tuple: read
/// (one map lookup) for every accepted connection, without the lock the
/// map updates take.
#[derive(Clone)]
pub struct Records(std::sync::Arc<HashMap<MapData, SockTuple, OrigDst>>);

impl Records {
    /// The record of an accepted, redirected connection: looked up by the
    /// workload's end (our `peer`), our end (`local`), and the network
    /// namespace of the accepted socket (`netns_cookie`). `None` when the
    /// connection was not redirected by these programs.
    pub fn original_dst(
        &self,
        netns_cookie: u64,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<Option<OriginalDst>, RedirectorError> {
        let (peer, local) = (v4_of(peer)?, v4_of(local)?);
        let key = SockTuple {
            netns_cookie,
            local_addr: [v4_word(*peer.ip()), 0, 0, 0],
            remote_addr: [v4_word(*local.ip()), 0, 0, 0],
            local_port: peer.port(),
            remote_port: local.port(),
            family: AF_INET,
            _pad: 0,
        };
        match self.0.get(&key, 0) {
            Ok(orig) => Ok(Some(OriginalDst {
                addr: SocketAddr::new(addr_of(orig.addr, orig.family), orig.port),
                workload_id: orig.workload_id,
                cgroup_id: orig.cgroup_id,
            })),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(RedirectorError::Map {
                name: maps::ORIG_BY_TUPLE,
                source,
            }),
        }
    }
}

/// Loads program `name` of type `P` and attaches it with `attach`, which
/// returns its link as an `FdLink` (so that it can be pinned).
fn attach_program<P>(
    ebpf: &mut Ebpf,
    name: &'static str,
    attach: impl FnOnce(
        &mut P,
    ) -> Result<
        Result<FdLink, aya::programs::links::LinkError>,
        aya::programs::ProgramError,
    >,
) -> Result<FdLink, RedirectorError>
where
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    P: LoadProgram,
{
    let program = |source| RedirectorError::Program { name, source };
    let p: &mut P = ebpf
        .program_mut(name)
        .ok_or(RedirectorError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(program)?;
    p.load_program().map_err(program)?;
    attach(p)
        .map_err(program)?
        .map_err(|source| RedirectorError::Link { name, source })
}

/// The programs' `load()`, which aya defines on each type, not in a trait.
trait LoadProgram {
    fn load_program(&mut self) -> Result<(), aya::programs::ProgramError>;
}

macro_rules! load_program {
    ($($ty:ty),*) => {$(
        impl LoadProgram for $ty {
            fn load_program(&mut self) -> Result<(), aya::programs::ProgramError> {
                self.load()
            }
        }
    )*};
}
load_program!(CgroupSockAddr, SockOps, CgroupSkb, SkLookup);

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, RedirectorError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(RedirectorError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| RedirectorError::Map { name, source })
}

fn v4_word(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn v6_words(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [word(0), word(4), word(8), word(12)]
}

/// The address a program recorded: IPv4 in the first word, or IPv6.
fn addr_of(words: [u32; 4], family: u16) -> IpAddr {
    if family == AF_INET6 {
        let mut octets = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            octets[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(octets))
    } else {
        IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What happens to mesh workloads' connections to destinations outside the
/// mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Egress {
    /// Let through, counted.
    Allow,
    /// Refused in the kernel (EPERM), counted.
    Deny,
}

fn v4_of(addr: SocketAddr) -> Result<SocketAddrV4, RedirectorError> {
    match addr {
        SocketAddr::V4(v4) => Ok(v4),
        SocketAddr::V6(v6) => Err(RedirectorError::NotIpv4(IpAddr::V6(*v6.ip()))),
    }
}

impl Redirector {
    /// Loads the embedded programs into the kernel (not yet attached), with
    /// their maps pinned under `pins`: the maps a previous agent of the same
    /// build pinned there are reused as they are. Call it inside a tokio
    /// runtime so that the programs' log records are forwarded, and after
    /// the tracing subscriber is installed: the programs write records only
    /// at the levels it keeps (none without one).
    pub fn load(pins: Pins) -> Result<Self, RedirectorError> {
        let map_dir = pins.map_dir(OBJECT)?;
        let paths: Vec<(&str, PathBuf)> = maps::ALL
            .iter()
            .map(|name| (*name, map_dir.join(name)))
            .collect();
        let log_level = super::logs::kernel_level();
        let mut loader = aya::EbpfLoader::new();
        // No kernel BTF: the programs use no CO-RE relocations, and parsing
        // the kernel's BTF would triple the agent's peak memory.
        loader.btf(None);
        // Records the agent's subscriber would drop are not written at all.
        // (Not required to exist: an object without log statements has no
        // level to set, and the forwarder copes with that too.)
        loader.override_global(aya_log::LEVEL, &log_level, false);
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT)?;
        let log_task = super::logs::spawn_forwarder(&mut ebpf);
        let workloads = take_map(&mut ebpf, maps::WORKLOADS)?;
        let destinations = take_map(&mut ebpf, maps::DESTINATIONS)?;
        let fast_path = take_map(&mut ebpf, maps::FAST_PATH)?;
        let by_tuple = Records(std::sync::Arc::new(take_map(
            &mut ebpf,
            maps::ORIG_BY_TUPLE,
        )?));
        let by_cookie = take_map(&mut ebpf, maps::ORIG_BY_COOKIE)?;
        let counters = take_map(&mut ebpf, maps::COUNTERS)?;
        let settings = Settings(std::sync::Arc::new(std::sync::Mutex::new(take_map(
            &mut ebpf,
            maps::AGENT,
        )?)));
        let permissive = take_map(&mut ebpf, maps::PERMISSIVE)?;
        let permissive_listener = take_map(&mut ebpf, maps::PERMISSIVE_LISTENER)?;
        let agent_ports = take_map(&mut ebpf, maps::AGENT_PORTS)?;
        Ok(Self {
            ebpf,
            pins,
            settings,
            permissive,
            permissive_listener,
            agent_ports,
            workloads,
            destinations,
            fast_path,
            by_tuple,
            by_cookie,
            counters,
            log_task,
        })
    }

    /// Attaches the programs: connect4, connect6, sendmsg4, sockops and the inbound
    /// capture to the cgroup-v2 directory `root` (they then see every socket
    /// of every process in its subtree), sk_lookup to this process's network
    /// namespace. Each link is pinned, and only then are the links of an
    /// earlier agent removed: there is no moment without programs.
    pub fn attach(&mut self, root: &Path) -> Result<(), RedirectorError> {
        let cgroup = std::fs::File::open(root).map_err(|source| RedirectorError::Cgroup {
            path: root.to_path_buf(),
            source,
        })?;
        let netns = std::fs::File::open("/proc/self/ns/net").map_err(RedirectorError::Netns)?;
        let links = self.pins.new_link_dir()?;
        // aya attaches with a bpf link, which the kernel always stacks with
        // other programs on the cgroup (links refuse explicit attach flags),
        // so `Single` here means "no flags", not "exclusive".
        let single = CgroupAttachMode::Single;
        let mut attached: Vec<(&'static str, FdLink)> = Vec::new();
        for name in [
            programs::CONNECT4,
            programs::CONNECT6,
            programs::SENDMSG4,
            programs::SENDMSG6,
        ] {
            let link = attach_program(&mut self.ebpf, name, |p: &mut CgroupSockAddr| {
                let id = p.attach(&cgroup, single)?;
                Ok(p.take_link(id)?.try_into())
            })?;
            attached.push((name, link));
        }
        let name = programs::SOCKOPS;
        let link = attach_program(&mut self.ebpf, name, |p: &mut SockOps| {
            let id = p.attach(&cgroup, single)?;
            Ok(p.take_link(id)?.try_into())
        })?;
        attached.push((name, link));
        let name = programs::INGRESS;
        let link = attach_program(&mut self.ebpf, name, |p: &mut CgroupSkb| {
            let id = p.attach(&cgroup, CgroupSkbAttachType::Ingress, single)?;
            Ok(p.take_link(id)?.try_into())
        })?;
        attached.push((name, link));
        let name = programs::SK_LOOKUP;
        let link = attach_program(&mut self.ebpf, name, |p: &mut SkLookup| {
            let id = p.attach(&netns)?;
            Ok(Ok(p.take_link(id)?.into()))
        })?;
        attached.push((name, link));

        for (name, link) in attached {
            // The pinned file holds the link; our descriptor may close.
            link.pin(links.join(name))
                .map_err(|source| RedirectorError::PinLink { name, source })?;
        }
        self.pins.remove_other_links(&links)?;
        self.pins.remove_other_maps(OBJECT)?;
        tracing::info!(cgroup = %root.display(), pins = %self.pins.base().display(), "eBPF programs attached and pinned");
        Ok(())
    }

    /// Renews the agent's liveness lease for `lease`: until then the programs
    /// send mesh connections to the agent and take the fast path.
    pub fn renew_lease(&mut self, lease: std::time::Duration) -> Result<(), RedirectorError> {
        self.settings.renew_lease(lease)
    }

    /// Ends the lease at once: from now on mesh connections are refused.
    pub fn end_lease(&mut self) -> Result<(), RedirectorError> {
        self.settings.end_lease()
    }

    /// The programs' settings, to renew or end the lease without this
    /// redirector (whose lock map syncs hold).
    pub fn settings(&self) -> Settings {
        self.settings.clone()
    }

    /// Sets the egress policy and the socket mark of checked connections.
    pub fn configure(&mut self, egress: Egress, mark: u32) -> Result<(), RedirectorError> {
        self.set_egress(egress)?;
        self.set_mark(mark)
    }

    /// Sets the egress policy alone.
    pub fn set_egress(&mut self, egress: Egress) -> Result<(), RedirectorError> {
        let egress = match egress {
            Egress::Allow => agent::EGRESS_ALLOW,
            Egress::Deny => agent::EGRESS_DENY,
        };
        self.set(agent::EGRESS, egress)
    }

    /// Sets the socket mark of checked connections alone.
    pub fn set_mark(&mut self, mark: u32) -> Result<(), RedirectorError> {
        self.set(agent::MARK, u64::from(mark))
    }

    fn set(&mut self, slot: u32, value: u64) -> Result<(), RedirectorError> {
        self.settings.set(slot, value)
    }

    /// Puts the agent's permissive listener where sk_lookup finds it.
    pub fn set_permissive_listener<S: AsRawFd>(
        &mut self,
        listener: &S,
    ) -> Result<(), RedirectorError> {
        self.permissive_listener
            .set(0, listener, 0)
            .map_err(|source| RedirectorError::Map {
                name: maps::PERMISSIVE_LISTENER,
                source,
            })
    }

    /// Steers plaintext connections from other hosts to local `port` to the
    /// permissive listener (`on`), or stops doing so.
    pub fn set_permissive_port(&mut self, port: u16, on: bool) -> Result<(), RedirectorError> {
        let key = u32::from(port);
        let result = if on {
            self.permissive.insert(key, 1, 0)
        } else {
            self.permissive.remove(&key)
        };
        result.map_err(|source| RedirectorError::Map {
            name: maps::PERMISSIVE,
            source,
        })
    }

    /// The permissive ports in the map now (a restarted agent finds its
    /// predecessor's).
    pub fn permissive_ports(&self) -> Vec<u16> {
        self.permissive
            .keys()
            .filter_map(|k| k.ok())
            .filter_map(|k| u16::try_from(k).ok())
            .collect()
    }

    /// Every entry of the destination and fast-path maps, as keys, so that
    /// a restarted agent knows what its predecessor left there.
    pub fn installed_destinations(&self) -> Vec<(IpAddr, Option<u16>)> {
        self.destinations
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| (addr_of(k.addr, k.family), (k.port != 0).then_some(k.port)))
            .collect()
    }

    /// The fast-path entries in the map now.
    pub fn installed_fast_paths(&self) -> Vec<(u32, IpAddr, Option<u16>)> {
        self.fast_path
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| {
                let d = k.dest;
                (
                    k.workload_id,
                    addr_of(d.addr, d.family),
                    (d.port != 0).then_some(d.port),
                )
            })
            .collect()
    }

    /// The workload cgroups in the map now.
    pub fn installed_workloads(&self) -> Vec<u64> {
        self.workloads.keys().filter_map(|k| k.ok()).collect()
    }

    /// Marks the cgroup `cgroup_id` as holding mesh workload `workload_id`.
    pub fn add_workload(
        &mut self,
        cgroup_id: u64,
        workload_id: u32,
    ) -> Result<(), RedirectorError> {
        let info = WorkloadInfo {
            workload_id,
            _pad: 0,
        };
        self.workloads
            .insert(cgroup_id, info, 0)
            .map_err(|source| RedirectorError::Map {
                name: maps::WORKLOADS,
                source,
            })
    }

    /// Stops treating `cgroup_id` as a mesh workload.
    pub fn remove_workload(&mut self, cgroup_id: u64) -> Result<(), RedirectorError> {
        self.workloads
            .remove(&cgroup_id)
            .map_err(|source| RedirectorError::Map {
                name: maps::WORKLOADS,
                source,
            })
    }

    /// Takes over workloads' connections to `ip:port` (`port` None: any port)
    /// and sends them to `target`.
    pub fn add_destination(
        &mut self,
        ip: IpAddr,
        port: Option<u16>,
        target: SocketAddr,
    ) -> Result<(), RedirectorError> {
        let key = dest_key(ip, port)?;
        let target = v4_of(target)?;
        let value = RedirectTarget {
            addr: [v4_word(*target.ip()), 0, 0, 0],
            port: target.port(),
            family: AF_INET,
        };
        self.destinations
            .insert(key, value, 0)
            .map_err(|source| RedirectorError::Map {
                name: maps::DESTINATIONS,
                source,
            })
    }

    /// Stops taking over `ip:port`.
    pub fn remove_destination(
        &mut self,
        ip: IpAddr,
        port: Option<u16>,
    ) -> Result<(), RedirectorError> {
        let key = dest_key(ip, port)?;
        absent_is_removed(self.destinations.remove(&key)).map_err(|source| RedirectorError::Map {
            name: maps::DESTINATIONS,
            source,
        })
    }

    /// Sends `workload_id`'s connections to `ip:port` (`port` None: any port)
    /// straight to `target`, without the agent: the same-node fast path.
    pub fn add_fast_path(
        &mut self,
        workload_id: u32,
        ip: IpAddr,
        port: Option<u16>,
        target: SocketAddr,
    ) -> Result<(), RedirectorError> {
        let key = FastKey {
            workload_id,
            dest: dest_key(ip, port)?,
        };
        let target = v4_of(target)?;
        let value = RedirectTarget {
            addr: [v4_word(*target.ip()), 0, 0, 0],
            port: target.port(),
            family: AF_INET,
        };
        self.fast_path
            .insert(key, value, 0)
            .map_err(|source| RedirectorError::Map {
                name: maps::FAST_PATH,
                source,
            })
    }

    /// Ends the fast path for `workload_id` to `ip:port`.
    pub fn remove_fast_path(
        &mut self,
        workload_id: u32,
        ip: IpAddr,
        port: Option<u16>,
    ) -> Result<(), RedirectorError> {
        let key = FastKey {
            workload_id,
            dest: dest_key(ip, port)?,
        };
        absent_is_removed(self.fast_path.remove(&key)).map_err(|source| RedirectorError::Map {
            name: maps::FAST_PATH,
            source,
        })
    }

    /// The record of an accepted, redirected connection ([`Records`]).
    pub fn original_dst<S: AsRawFd>(
        &self,
        accepted: &S,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<Option<OriginalDst>, RedirectorError> {
        let netns_cookie = super::netns_cookie(accepted).map_err(RedirectorError::Socket)?;
        self.by_tuple.original_dst(netns_cookie, peer, local)
    }

    /// The connection records, to read apart from this redirector.
    pub fn records(&self) -> Records {
        self.by_tuple.clone()
    }

    /// How many connection records the programs hold right now (both maps).
    pub fn records_held(&self) -> usize {
        self.by_tuple.0.keys().count() + self.by_cookie.keys().count()
    }

    /// The programs' counters, summed over CPUs.
    pub fn counters(&self) -> Result<RedirectCounters, RedirectorError> {
        let read = |index: u32| -> Result<u64, RedirectorError> {
            let values = self
                .counters
                .get(&index, 0)
                .map_err(|source| RedirectorError::Map {
                    name: maps::COUNTERS,
                    source,
                })?;
            Ok(values.iter().sum())
        };
        Ok(RedirectCounters {
            connects_seen: read(counter::CONNECT_SEEN)?,
            redirected: read(counter::REDIRECTED)?,
            rekeyed: read(counter::REKEYED)?,
            closed: read(counter::CLOSED)?,
            fast_path: read(counter::FAST_PATH)?,
            egress_allowed: read(counter::EGRESS_ALLOWED)?,
            egress_denied: read(counter::EGRESS_DENIED)?,
            no_agent: read(counter::NO_AGENT)?,
            inbound_refused: read(counter::INBOUND_REFUSED)?,
            permissive_steered: read(counter::PERMISSIVE_STEERED)?,
            agent_port_refused: read(counter::AGENT_PORT_REFUSED)?,
        })
    }

    /// Makes `ports` (address and `PROTO_TCP`/`PROTO_UDP`) the agent's own
    /// ports in the network namespace `netns_cookie`, in place of whatever
    /// an earlier agent put there: connect() and sendmsg() reach them only
    /// while a socket with the agent's mark is bound there.
    pub fn set_agent_ports(
        &mut self,
        netns_cookie: u64,
        ports: &[(SocketAddr, u16)],
    ) -> Result<(), RedirectorError> {
        let map_err = |source| RedirectorError::Map {
            name: maps::AGENT_PORTS,
            source,
        };
        let wanted = agent_port_keys(netns_cookie, ports)?;
        let stale: Vec<AgentPort> = (self.agent_ports.keys())
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for key in stale {
            absent_is_removed(self.agent_ports.remove(&key)).map_err(map_err)?;
        }
        for key in wanted {
            self.agent_ports.insert(key, 1, 0).map_err(map_err)?;
        }
        Ok(())
    }
}

/// The map keys of the agent's own ports: IPv4 (a v4-mapped address as
/// IPv4); an address bound on every interface (`0.0.0.0`) is guarded where
/// local clients reach it, on `127.0.0.1`.
fn agent_port_keys(
    netns_cookie: u64,
    ports: &[(SocketAddr, u16)],
) -> Result<Vec<AgentPort>, RedirectorError> {
    let mut keys = Vec::new();
    for (addr, protocol) in ports {
        let v4 = match addr.ip().to_canonical() {
            IpAddr::V4(v4) if v4.is_unspecified() => Ipv4Addr::LOCALHOST,
            IpAddr::V4(v4) => v4,
            IpAddr::V6(v6) => return Err(RedirectorError::NotIpv4(IpAddr::V6(v6))),
        };
        let key = AgentPort {
            netns_cookie,
            addr: v4_word(v4),
            port: addr.port(),
            protocol: *protocol,
        };
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    Ok(keys)
}

impl Drop for Redirector {
    fn drop(&mut self) {
        if let Some(task) = self.log_task.take() {
            task.abort();
        }
    }
}

/// A removal of a key that is not there has done what it was for.
fn absent_is_removed(result: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

fn dest_key(ip: IpAddr, port: Option<u16>) -> Result<DestKey, RedirectorError> {
    // A v4-mapped IPv6 address is the IPv4 address (connect6 looks it up so).
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    let (addr, family) = match ip {
        IpAddr::V4(v4) => ([v4_word(v4), 0, 0, 0], AF_INET),
        IpAddr::V6(v6) => (v6_words(v6), AF_INET6),
    };
    Ok(DestKey {
        addr,
        port: port.unwrap_or(0),
        family,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_agent_common::{PROTO_TCP, PROTO_UDP};

    #[test]
    fn the_agents_ports_are_keyed_as_the_programs_read_them() {
        let ports = [
            ("127.0.0.1:8500".parse().unwrap(), PROTO_TCP),
            ("127.0.0.1:53".parse().unwrap(), PROTO_TCP),
            ("127.0.0.1:53".parse().unwrap(), PROTO_UDP),
            ("0.0.0.0:15020".parse().unwrap(), PROTO_TCP),
            ("[::ffff:127.0.0.1]:8500".parse().unwrap(), PROTO_TCP),
        ];
        let keys = agent_port_keys(7, &ports).unwrap();
        // The mapped 8500 is the same key as the plain one.
        assert_eq!(keys.len(), 4);
        assert!(keys.iter().all(|k| k.netns_cookie == 7));
        assert_eq!(keys[0].addr.to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!((keys[0].port, keys[0].protocol), (8500, PROTO_TCP));
        assert_eq!((keys[2].port, keys[2].protocol), (53, PROTO_UDP));
        // Every interface: guarded where local clients reach it.
        assert_eq!(keys[3].addr.to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(keys[3].port, 15020);
        let v6 = [("[::1]:8500".parse().unwrap(), PROTO_TCP)];
        assert!(matches!(
            agent_port_keys(7, &v6),
            Err(RedirectorError::NotIpv4(_))
        ));
    }

    #[test]
    fn keys_carry_ipv4_ipv6_and_mapped_addresses_as_the_programs_read_them() {
        let v4 = dest_key("10.0.0.1".parse().unwrap(), Some(80)).unwrap();
        assert_eq!(v4.family, AF_INET);
        assert_eq!(v4.addr[0].to_ne_bytes(), [10, 0, 0, 1]);
        let mapped = dest_key("::ffff:10.0.0.1".parse().unwrap(), Some(80)).unwrap();
        assert_eq!(mapped, v4);
        let v6: IpAddr = "fe80::1".parse().unwrap();
        let key = dest_key(v6, None).unwrap();
        assert_eq!((key.family, key.port), (AF_INET6, 0));
        assert_eq!(addr_of(key.addr, key.family), v6);
        assert_eq!(
            addr_of(v4.addr, v4.family),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }
}
