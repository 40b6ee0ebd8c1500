//! Loads weft's eBPF programs, attaches them to a cgroup-v2 subtree, and gives
//! the agent typed access to their maps: which cgroups are mesh workloads,
//! which destinations are taken over and where they go, and what the programs
//! recorded about each redirected connection.
//!
//! The programs are attached with bpf links owned by this value: dropping the
//! `Redirector` (or the agent dying) detaches them.
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SockOps};
use aya::Ebpf;
use weft_agent_common::{
    counter, maps, programs, DestKey, FastKey, OrigDst, RedirectTarget, SockTuple, WorkloadInfo,
    AF_INET,
};

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
    #[error("only IPv4 destinations are supported so far, not {0}")]
    NotIpv4(IpAddr),
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
}

/// weft's loaded eBPF programs and their maps.
pub struct Redirector {
    ebpf: Ebpf,
    workloads: HashMap<MapData, u64, WorkloadInfo>,
    destinations: HashMap<MapData, DestKey, RedirectTarget>,
    fast_path: HashMap<MapData, FastKey, RedirectTarget>,
    by_tuple: HashMap<MapData, SockTuple, OrigDst>,
    by_cookie: HashMap<MapData, u64, OrigDst>,
    counters: PerCpuArray<MapData, u64>,
    log_task: Option<tokio::task::JoinHandle<()>>,
}

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

fn v4_of(addr: SocketAddr) -> Result<SocketAddrV4, RedirectorError> {
    match addr {
        SocketAddr::V4(v4) => Ok(v4),
        SocketAddr::V6(v6) => Err(RedirectorError::NotIpv4(IpAddr::V6(*v6.ip()))),
    }
}

impl Redirector {
    /// Loads the embedded programs into the kernel (not yet attached). Call it
    /// inside a tokio runtime so that the programs' log records are forwarded.
    pub fn load() -> Result<Self, RedirectorError> {
        // No kernel BTF: the programs use no CO-RE relocations, and parsing
        // the kernel's BTF would triple the agent's peak memory.
        let mut ebpf = aya::EbpfLoader::new().btf(None).load(OBJECT)?;
        let log_task = super::logs::spawn_forwarder(&mut ebpf);
        let workloads = take_map(&mut ebpf, maps::WORKLOADS)?;
        let destinations = take_map(&mut ebpf, maps::DESTINATIONS)?;
        let fast_path = take_map(&mut ebpf, maps::FAST_PATH)?;
        let by_tuple = take_map(&mut ebpf, maps::ORIG_BY_TUPLE)?;
        let by_cookie = take_map(&mut ebpf, maps::ORIG_BY_COOKIE)?;
        let counters = take_map(&mut ebpf, maps::COUNTERS)?;
        Ok(Self {
            ebpf,
            workloads,
            destinations,
            fast_path,
            by_tuple,
            by_cookie,
            counters,
            log_task,
        })
    }

    /// Attaches connect4, connect6 and sockops to the cgroup-v2 directory `root`; they
    /// then see every socket of every process in its subtree.
    pub fn attach(&mut self, root: &Path) -> Result<(), RedirectorError> {
        let cgroup = std::fs::File::open(root).map_err(|source| RedirectorError::Cgroup {
            path: root.to_path_buf(),
            source,
        })?;
        let program = |name: &'static str, e| RedirectorError::Program { name, source: e };
        // aya attaches with a bpf link, which the kernel always stacks with
        // other programs on the cgroup (links refuse explicit attach flags),
        // so `Single` here means "no flags", not "exclusive".

        for name in [programs::CONNECT4, programs::CONNECT6] {
            let connect: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(RedirectorError::Missing {
                    kind: "program",
                    name,
                })?
                .try_into()
                .map_err(|e| program(name, e))?;
            connect.load().map_err(|e| program(name, e))?;
            connect
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|e| program(name, e))?;
        }

        let sockops: &mut SockOps = self
            .ebpf
            .program_mut(programs::SOCKOPS)
            .ok_or(RedirectorError::Missing {
                kind: "program",
                name: programs::SOCKOPS,
            })?
            .try_into()
            .map_err(|e| program(programs::SOCKOPS, e))?;
        sockops.load().map_err(|e| program(programs::SOCKOPS, e))?;
        sockops
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|e| program(programs::SOCKOPS, e))?;
        tracing::info!(cgroup = %root.display(), "eBPF redirect attached");
        Ok(())
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
        self.destinations
            .remove(&key)
            .map_err(|source| RedirectorError::Map {
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
        self.fast_path
            .remove(&key)
            .map_err(|source| RedirectorError::Map {
                name: maps::FAST_PATH,
                source,
            })
    }

    /// The record of an accepted, redirected connection: looked up by the
    /// workload's end (our peer), our end, and the socket's network namespace.
    /// `None` when the connection was not redirected by these programs.
    pub fn original_dst<S: AsRawFd>(
        &self,
        accepted: &S,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<Option<OriginalDst>, RedirectorError> {
        let netns_cookie = super::netns_cookie(accepted).map_err(RedirectorError::Socket)?;
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
        match self.by_tuple.get(&key, 0) {
            Ok(orig) => Ok(Some(OriginalDst {
                addr: SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(orig.addr[0].to_ne_bytes()),
                    orig.port,
                )),
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

    /// How many connection records the programs hold right now (both maps).
    pub fn records_held(&self) -> usize {
        self.by_tuple.keys().count() + self.by_cookie.keys().count()
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
        })
    }
}

impl Drop for Redirector {
    fn drop(&mut self) {
        if let Some(task) = self.log_task.take() {
            task.abort();
        }
    }
}

fn dest_key(ip: IpAddr, port: Option<u16>) -> Result<DestKey, RedirectorError> {
    let IpAddr::V4(ip) = ip else {
        return Err(RedirectorError::NotIpv4(ip));
    };
    Ok(DestKey {
        addr: [v4_word(ip), 0, 0, 0],
        port: port.unwrap_or(0),
        family: AF_INET,
    })
}
