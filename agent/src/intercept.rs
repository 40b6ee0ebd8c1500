//! Transparent interception (`ebpf = true`): the agent's eBPF programs,
//! attached to the cgroup subtree it manages, bring mesh workloads'
//! connections to the outbound listener and keep unchecked connections from
//! reaching them. This module places each service's cgroup, keeps the
//! programs' maps in step with the agent's view (every service's virtual IP,
//! on any port, and every registered instance address are taken over; the
//! same-node fast path; the ports of permissive services), renews the
//! agent's liveness lease, and tells, for an accepted socket, which local
//! service called and where it wanted to go.
//!
//! Start-up order matters for failing closed: [`Interception::start`] runs
//! before anything else in the agent. It adopts the pinned maps of an earlier
//! agent, fills the workload map and attaches its programs (removing the
//! earlier links); until [`Interception::renew_lease`] is first called,
//! after the view is loaded and synced, the programs refuse mesh workloads'
//! connections.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::net::TcpStream;

use weft_api::config_entry::MutualTlsMode;
use weft_api::intention::Caller;

use crate::config::{AgentConfig, EgressPolicy};
use crate::ebpf::{
    cgroup2_mount, cgroup_id, pins, CgroupError, Egress, Pins, Records, RedirectCounters,
    Redirector, RedirectorError, Settings,
};
use crate::view::View;

mod destinations;
pub use destinations::{Destination, Destinations};

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Redirector(#[from] RedirectorError),
    #[error("creating cgroup {path}: {source}")]
    CreateCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("service {0:?} has no cgroup in the configuration")]
    NoCgroup(String),
    #[error("no service {0:?} in the configuration")]
    UnknownService(String),
    #[error(transparent)]
    Pins(#[from] pins::PinError),
}

/// Where the agent pins its programs and maps.
pub fn pin_dir(config: &AgentConfig) -> Result<PathBuf, InterceptError> {
    match &config.bpf_pin_dir {
        Some(dir) => Ok(dir.clone()),
        None => Ok(pins::default_dir(&cgroup_root(config)?)),
    }
}

/// `weft-agent uninstall`: removes the pinned programs and maps of the
/// agent `config` describes. Ok(false) if nothing was pinned.
pub fn uninstall(config: &AgentConfig) -> Result<bool, InterceptError> {
    Ok(Pins::uninstall(&pin_dir(config)?)?)
}

/// Where the agent's cgroup subtree is: `cgroup_root` or the cgroup2 mount.
pub fn cgroup_root(config: &AgentConfig) -> Result<PathBuf, InterceptError> {
    match &config.cgroup_root {
        Some(root) => Ok(root.clone()),
        None => Ok(cgroup2_mount()?),
    }
}

/// The cgroup directory of service `name`.
pub fn service_cgroup(config: &AgentConfig, name: &str) -> Result<PathBuf, InterceptError> {
    let service = config
        .services
        .iter()
        .find(|s| s.name == name || s.id == name)
        .ok_or_else(|| InterceptError::UnknownService(name.to_string()))?;
    let relative = service
        .cgroup
        .as_ref()
        .ok_or_else(|| InterceptError::NoCgroup(name.to_string()))?;
    Ok(cgroup_root(config)?.join(relative))
}

fn ensure_dir(path: &Path) -> Result<(), InterceptError> {
    std::fs::create_dir_all(path).map_err(|source| InterceptError::CreateCgroup {
        path: path.to_path_buf(),
        source,
    })
}

/// A connection the programs brought to the outbound listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intercepted {
    /// The local service whose workload connected.
    pub source: String,
    /// Where it was connecting to.
    pub original: SocketAddr,
}

/// The workload id (1..=4095, the low bits of the socket mark) of each
/// local service, by service id.
pub type WorkloadIds = BTreeMap<String, u32>;

/// The largest workload id (the low 12 bits of the socket mark).
pub const MAX_WORKLOAD_ID: u32 = crate::config::MAX_SERVICES as u32;

/// Pure: workload ids for `service_ids`: those in `previous` kept, new ones
/// given the first free id after `last` (the highest given so far), wrapping
/// to 1 after [`MAX_WORKLOAD_ID`]. An id is not given again soon after its
/// service goes: the programs' records of connections the old service made
/// (waiting in the outbound accept queue), its fast-path entries until the
/// next sync and its loopback socket marks all name it by id, and would
/// otherwise be taken for the new service's.
pub fn assign_ids(previous: &WorkloadIds, service_ids: &[&str], last: u32) -> (WorkloadIds, u32) {
    let mut ids: WorkloadIds = service_ids
        .iter()
        .filter_map(|s| Some((s.to_string(), *previous.get(*s)?)))
        .collect();
    let mut taken: BTreeSet<u32> = ids.values().copied().collect();
    let mut next = last;
    for service in service_ids {
        if ids.contains_key(*service) {
            continue;
        }
        // At most MAX_SERVICES services: a free id exists.
        loop {
            next = if next >= MAX_WORKLOAD_ID { 1 } else { next + 1 };
            if !taken.contains(&next) {
                break;
            }
        }
        ids.insert(service.to_string(), next);
        taken.insert(next);
    }
    (ids, next)
}

/// The local services as the programs know them.
#[derive(Debug, Default)]
struct Workloads {
    /// Workload id by service id.
    ids: WorkloadIds,
    /// Service name by workload id.
    names: BTreeMap<u32, String>,
    /// Workload id by cgroup id, as in the programs' map.
    cgroups: BTreeMap<u64, u32>,
    /// (service name, port) of every local service.
    local_services: Vec<(String, u16)>,
    /// The names of the local services with a cgroup (mesh workloads).
    captured: BTreeSet<String>,
    /// The explicit upstream listeners of mesh workloads, sent to
    /// themselves in the programs' map so that a connection to one comes
    /// with a record of who made it ([`Interception::captures`]).
    upstream_listeners: BTreeSet<Destination>,
    /// The last workload id given (see [`assign_ids`]).
    last: u32,
}

impl Workloads {
    /// Places `config`'s services (ids from `previous` kept): their cgroups
    /// (created when missing) go in the programs' workload map.
    fn place(
        &mut self,
        config: &AgentConfig,
        root: &Path,
        previous: WorkloadIds,
        redirector: &mut Redirector,
    ) -> Result<(), InterceptError> {
        let service_ids: Vec<&str> = config.services.iter().map(|s| s.id.as_str()).collect();
        let (ids, last) = assign_ids(&previous, &service_ids, self.last);
        let mut cgroups = BTreeMap::new();
        for service in &config.services {
            let id = ids[&service.id];
            let Some(relative) = &service.cgroup else {
                continue;
            };
            let path = root.join(relative);
            ensure_dir(&path)?;
            let cgroup = cgroup_id(&path)?;
            if self.cgroups.get(&cgroup) != Some(&id) {
                redirector.add_workload(cgroup, id)?;
                tracing::info!(service = %service.name, cgroup = %path.display(), cgroup_id = cgroup, workload_id = id, "workload cgroup");
            }
            cgroups.insert(cgroup, id);
        }
        crate::mark::set_workloads(
            (config.services.iter())
                .filter(|s| s.cgroup.is_some())
                .map(|s| (s.id.clone(), ids[&s.id]))
                .collect(),
        );
        self.names = config
            .services
            .iter()
            .map(|s| (ids[&s.id], s.name.clone()))
            .collect();
        self.ids = ids;
        self.last = last;
        self.cgroups = cgroups;
        self.local_services = config
            .services
            .iter()
            .map(|s| (s.name.clone(), s.port))
            .collect();
        let workloads = config.services.iter().filter(|s| s.cgroup.is_some());
        self.captured = workloads.map(|s| s.name.clone()).collect();
        // Every service's listeners, captured or not: a mesh workload's
        // connection to one arrives with a record naming it, and is
        // carried only as that service.
        let listeners: BTreeSet<Destination> = (config.services.iter())
            .flat_map(|s| &s.upstreams)
            .map(|u| (IpAddr::from([127, 0, 0, 1]), Some(u.local_port)))
            .collect();
        for (ip, port) in self.upstream_listeners.difference(&listeners) {
            redirector.remove_destination(*ip, *port)?;
        }
        for (ip, port) in listeners.difference(&self.upstream_listeners) {
            let to_itself = SocketAddr::new(*ip, port.unwrap_or_default());
            redirector.add_destination(*ip, *port, to_itself)?;
        }
        self.upstream_listeners = listeners;
        Ok(())
    }
}

pub struct Interception {
    redirector: Mutex<Redirector>,
    /// The lease, renewed and ended apart from the redirector's lock (a
    /// sync's thousands of map writes do not hold up a renewal on the
    /// serving thread). A renewal reads `synced` under the lock a failed
    /// sync ends the lease under, after storing `false`: no renewal
    /// outlives a failure.
    lease: Settings,
    /// The redirect records, read for every accepted connection without
    /// the redirector's lock (which map syncs hold).
    records: Records,
    /// The network namespace cookie of the outbound listener's sockets
    /// (all in the agent's namespace), read once.
    netns_cookie: std::sync::OnceLock<u64>,
    workloads: Mutex<Workloads>,
    /// The cgroup subtree the agent manages.
    root: PathBuf,
    /// What the destinations map holds.
    installed: Mutex<BTreeSet<Destination>>,
    /// What the view wants taken over, as of the last sync.
    destinations: Mutex<Destinations>,
    /// Whether the next sync compares every destination with the map
    /// instead of those a change touched: the first sync (a predecessor's
    /// entries), and the one after a failed sync.
    full_sync: AtomicBool,
    fast_installed: Mutex<BTreeMap<FastEntry, SocketAddr>>,
    permissive_installed: Mutex<BTreeSet<u16>>,
    /// Whether the last sync brought every map in step with the view.
    synced: AtomicBool,
    /// Destinations the last sync found no room for in the map.
    left_out: AtomicUsize,
    /// The configured egress policy (held at deny while destinations are
    /// left out).
    egress: Egress,
    node_name: String,
    datacenter: String,
    outbound: SocketAddr,
}

/// The liveness lease the agent renews: past it, with no renewal, the
/// programs refuse mesh workloads' connections.
pub const LEASE: std::time::Duration = std::time::Duration::from_secs(3);
/// Entries of the destinations map kept for upstream listeners (placed
/// apart from syncs, and at start against what a predecessor left): the
/// view's destinations fill at most the rest.
pub const LISTENER_ROOM: usize = crate::config::MAX_UPSTREAM_LISTENERS;
/// How many of the view's destinations the map takes.
pub const VIEW_DESTINATIONS: usize = crate::ebpf::DESTINATIONS_CAPACITY as usize - LISTENER_ROOM;

/// How often the lease is renewed.
pub const LEASE_RENEWAL: std::time::Duration = std::time::Duration::from_millis(500);

/// Local ports of permissive services: plaintext from other hosts to them is
/// steered to the agent.
pub fn permissive_ports(view: &View, local_services: &[(String, u16)]) -> BTreeSet<u16> {
    local_services
        .iter()
        .filter(|(name, _)| view.mutual_tls_mode(name) == MutualTlsMode::Permissive)
        .map(|(_, port)| *port)
        .collect()
}

/// (source workload id, destination ip, port or None for any port)
pub type FastEntry = (u32, IpAddr, Option<u16>);

/// The same-node fast path: pairs whose connections may go straight to a
/// local instance: the source is a local workload, the destination service
/// has a passing instance on this node, speaks plain TCP, and intentions
/// allow the pair. Everything else goes through the agent.
pub fn fast_paths(
    view: &View,
    (node, datacenter): (&str, &str),
    workloads: &[(u32, String)],
) -> BTreeMap<FastEntry, SocketAddr> {
    let mut entries = BTreeMap::new();
    // Only a service with an instance on this node can take it: those,
    // not every service of the mesh.
    let here: BTreeSet<&str> = view
        .instances_on(node)
        .map(|i| i.service.as_str())
        .collect();
    for (service, vip) in here
        .into_iter()
        .filter_map(|s| Some((s, view.vips.get(s)?)))
    {
        // A resolver (default subset, redirect, failover) decides where the
        // service's connections go: the agent, not the fast path.
        let resolved = view
            .entries
            .get(weft_api::config_entry::EntryKind::ServiceResolver, service)
            .is_some();
        if resolved || view.protocol(service).is_http() || !vip.is_ipv4() {
            continue;
        }
        let Some(local) = view
            .passing(service)
            .into_iter()
            .find(|i| i.node == node)
            .and_then(|i| i.socket_addr())
        else {
            continue;
        };
        for (workload_id, source) in workloads {
            if view
                .decide(Caller::new(source, datacenter), service, None)
                .allowed
            {
                entries.insert((*workload_id, *vip, None), local);
                entries.insert((*workload_id, local.ip(), Some(local.port())), local);
            }
        }
    }
    entries
}

impl Interception {
    /// Adopts what an earlier agent pinned, loads the programs, places every
    /// service's cgroup (creating it when missing) in the workload map and
    /// attaches at the cgroup root. Mesh workloads' connections are refused
    /// until the first [`Interception::renew_lease`], unless `taking_over`:
    /// then the predecessor's lease runs on (it serves until this agent
    /// does, see `handover`). Call inside the tokio runtime.
    pub fn start(
        config: &AgentConfig,
        taking_over: Option<&WorkloadIds>,
    ) -> Result<Self, InterceptError> {
        let root = cgroup_root(config)?;
        ensure_dir(&root)?;
        let pins = Pins::open(&pin_dir(config)?)?;
        let mut redirector = Redirector::load(pins)?;
        let egress = match config.egress {
            EgressPolicy::Allow => Egress::Allow,
            EgressPolicy::Deny => Egress::Deny,
        };
        // A predecessor's lease may still run (a crash a moment ago): this
        // agent has no view yet, so nothing is admitted until it renews. A
        // predecessor that hands over renews it until this agent serves.
        // A predecessor handing over keeps serving on the maps it synced,
        // egress held at deny included if it left destinations out: the
        // policy is this agent's to write from its first sync on.
        if taking_over.is_none() {
            redirector.end_lease()?;
            redirector.configure(egress, config.socket_mark)?;
        } else {
            redirector.set_mark(config.socket_mark)?;
        }
        crate::mark::set(config.socket_mark);
        // A successor keeps its predecessor's workload ids: the records of
        // connections made meanwhile name their source by id.
        let previous = taking_over.cloned().unwrap_or_default();
        let mut workloads = Workloads {
            // New services after the predecessor's highest id.
            last: previous.values().copied().max().unwrap_or(0),
            ..Workloads::default()
        };
        workloads.place(config, &root, previous, &mut redirector)?;
        let wanted: BTreeSet<u64> = workloads.cgroups.keys().copied().collect();
        for stale in redirector.installed_workloads() {
            if !wanted.contains(&stale) {
                redirector.remove_workload(stale)?;
            }
        }
        redirector.attach(&root)?;
        // What an earlier agent left in reused maps is known as installed,
        // so that the first sync removes what the view no longer wants.
        let installed = redirector.installed_destinations().into_iter().collect();
        let unknown_target = SocketAddr::from(([0, 0, 0, 0], 0));
        let fast_installed = redirector
            .installed_fast_paths()
            .into_iter()
            .map(|key| (key, unknown_target))
            .collect();
        let permissive_installed = redirector.permissive_ports().into_iter().collect();
        Ok(Self {
            records: redirector.records(),
            lease: redirector.settings(),
            netns_cookie: std::sync::OnceLock::new(),
            redirector: Mutex::new(redirector),
            workloads: Mutex::new(workloads),
            root,
            installed: Mutex::new(installed),
            destinations: Mutex::new(Destinations::new(&config.node_name, config.own_addresses())),
            full_sync: AtomicBool::new(true),
            fast_installed: Mutex::new(fast_installed),
            permissive_installed: Mutex::new(permissive_installed),
            synced: AtomicBool::new(false),
            left_out: AtomicUsize::new(0),
            egress,
            node_name: config.node_name.clone(),
            datacenter: config.datacenter.clone(),
            outbound: config.outbound_addr,
        })
    }

    /// The workload id of each local service (by service id), for a
    /// successor to keep.
    pub fn workload_ids(&self) -> WorkloadIds {
        self.workloads.lock().expect("workloads lock").ids.clone()
    }

    /// Takes a reloaded configuration's services: cgroups of new services
    /// placed (ids of the others kept), those of removed ones taken out,
    /// then the maps synced with `view`.
    pub fn reconfigure(&self, config: &AgentConfig, view: &View) -> Result<(), InterceptError> {
        {
            let mut redirector = self.redirector.lock().expect("redirector lock");
            let mut workloads = self.workloads.lock().expect("workloads lock");
            let before: BTreeSet<u64> = workloads.cgroups.keys().copied().collect();
            let previous = workloads.ids.clone();
            workloads.place(config, &self.root, previous, &mut redirector)?;
            for gone in before.difference(&workloads.cgroups.keys().copied().collect()) {
                redirector.remove_workload(*gone)?;
            }
            // Upstream ports added or moved are the agent's own from now on:
            // an instance of this node claiming one is no longer taken over.
            let mut destinations = self.destinations.lock().expect("destinations lock");
            if !destinations.set_own(config.own_addresses()).is_empty() {
                self.full_sync.store(true, Ordering::Release);
            }
        }
        self.sync(view)
    }

    /// Renews the liveness lease: call every [`LEASE_RENEWAL`] once the view
    /// is loaded and synced and the outbound listener is up.
    pub fn renew_lease(&self) -> Result<(), InterceptError> {
        // After a failed sync the lease ends instead: refused until one
        // succeeds.
        let synced = || self.synced.load(Ordering::Acquire);
        Ok(self.lease.renew_lease_while(LEASE, synced)?)
    }

    /// Ends the lease: mesh workloads' connections are refused from now on
    /// (shutdown).
    pub fn end_lease(&self) -> Result<(), InterceptError> {
        Ok(self.lease.end_lease()?)
    }

    /// Puts the permissive listener where the sk_lookup program finds it.
    pub fn set_permissive_listener<S: std::os::fd::AsRawFd>(
        &self,
        listener: &S,
    ) -> Result<(), InterceptError> {
        Ok(self
            .redirector
            .lock()
            .expect("redirector lock")
            .set_permissive_listener(listener)?)
    }

    /// Makes `ports` (address, `PROTO_TCP`/`PROTO_UDP`) the agent's own in
    /// the network namespace `socket` lives in: from now on, and after the
    /// agent is gone, they are reached only while a socket with the agent's
    /// mark is bound there.
    pub fn set_agent_ports<S: std::os::fd::AsRawFd>(
        &self,
        socket: &S,
        ports: &[(std::net::SocketAddr, u16)],
    ) -> Result<(), InterceptError> {
        let cookie = crate::ebpf::netns_cookie(socket).map_err(RedirectorError::Socket)?;
        Ok(self
            .redirector
            .lock()
            .expect("redirector lock")
            .set_agent_ports(cookie, ports)?)
    }

    /// Brings the destinations map in step with `view`.
    pub fn sync(&self, view: &View) -> Result<(), InterceptError> {
        // One sync at a time from start to end, its outcome recorded under
        // the same lock: a sync that follows a failed one always sees that
        // it must compare everything.
        let mut redirector = self.redirector.lock().expect("redirector lock");
        let result = self.sync_maps(&mut redirector, view);
        // Until the maps are in step with the view again, the lease is not
        // renewed: the programs refuse rather than act on stale maps.
        self.synced.store(result.is_ok(), Ordering::Release);
        if result.is_err() {
            // What this sync was to change may be half done: the next
            // compares everything.
            self.full_sync.store(true, Ordering::Release);
            if let Err(e) = self.lease.end_lease() {
                // It runs out within LEASE anyway: no renewal follows.
                tracing::error!("ending the eBPF lease after a failed sync: {e}");
            }
        }
        result
    }

    fn sync_maps(&self, redirector: &mut Redirector, view: &View) -> Result<(), InterceptError> {
        // Fast-path removals first: a deny must take effect even if a later
        // step fails.
        let (workloads, local_services, listeners) = {
            let w = self.workloads.lock().expect("workloads lock");
            let ids: Vec<(u32, String)> = w.names.iter().map(|(id, n)| (*id, n.clone())).collect();
            (ids, w.local_services.clone(), w.upstream_listeners.clone())
        };
        let fast = fast_paths(view, (&self.node_name, &self.datacenter), &workloads);
        let mut fast_installed = self.fast_installed.lock().expect("fast path lock");
        let stale: Vec<FastEntry> = fast_installed
            .iter()
            .filter(|(key, target)| fast.get(key) != Some(target))
            .map(|(key, _)| *key)
            .collect();
        for key in stale {
            redirector.remove_fast_path(key.0, key.1, key.2)?;
            fast_installed.remove(&key);
        }

        let mut destinations = self.destinations.lock().expect("destinations lock");
        let touched = destinations.update(view);
        let mut installed = self.installed.lock().expect("installed lock");
        let candidates = if self.full_sync.swap(false, Ordering::AcqRel) {
            let mut all = destinations.all();
            all.extend(installed.iter().copied());
            all
        } else {
            touched
        };
        // Upstream listeners' entries are the workloads' (`place`), not the
        // view's.
        let (new, gone): (Vec<Destination>, Vec<Destination>) = candidates
            .into_iter()
            .filter(|d| !listeners.contains(d))
            .filter(|d| destinations.wants(d) != installed.contains(d))
            .partition(|d| destinations.wants(d));
        for (ip, port) in gone {
            redirector.remove_destination(ip, port)?;
            installed.remove(&(ip, port));
        }
        // What does not fit is left out and the rest of the node goes on:
        // a failed sync would end the lease, and the programs would refuse
        // every workload's connection. A destination left out is not taken
        // over, so while any is, egress is refused (a workload's connection
        // to it would otherwise leave unchecked, to a service without
        // inbound capture or a node without eBPF).
        let room = VIEW_DESTINATIONS.saturating_sub(installed.len());
        let mut left_out = new.len().saturating_sub(room);
        self.hold_egress(redirector, left_out > 0)?;
        for (ip, port) in new.into_iter().take(room) {
            match redirector.add_destination(ip, port, self.outbound) {
                Ok(()) => {
                    installed.insert((ip, port));
                }
                // Upstream listeners' entries took more than their room.
                Err(e) if e.is_map_full() => {
                    left_out += 1;
                    self.hold_egress(redirector, true)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let before = self.left_out.swap(left_out, Ordering::Relaxed);
        if left_out > 0 {
            // Tried again at every sync until removals make room.
            self.full_sync.store(true, Ordering::Release);
            if left_out != before {
                tracing::error!(
                    left_out,
                    installed = installed.len(),
                    "the eBPF destinations map is full: workloads' connections to these \
                     destinations are not taken over, and to destinations outside the mesh \
                     are refused until they are"
                );
            }
        } else {
            self.hold_egress(redirector, false)?;
            if before > 0 {
                tracing::info!("every destination is taken over again");
            }
        }

        for (key, target) in &fast {
            if fast_installed.get(key) != Some(target) {
                redirector.add_fast_path(key.0, key.1, key.2, *target)?;
                fast_installed.insert(*key, *target);
            }
        }

        let permissive = permissive_ports(view, &local_services);
        let mut permissive_installed = self.permissive_installed.lock().expect("permissive lock");
        let off: Vec<u16> = permissive_installed
            .difference(&permissive)
            .copied()
            .collect();
        for port in off {
            redirector.set_permissive_port(port, false)?;
            permissive_installed.remove(&port);
        }
        let on: Vec<u16> = permissive
            .difference(&permissive_installed)
            .copied()
            .collect();
        for port in on {
            redirector.set_permissive_port(port, true)?;
            permissive_installed.insert(port);
            tracing::info!(
                port,
                "permissive: plaintext from other hosts goes through the agent"
            );
        }
        Ok(())
    }

    /// Refuses egress while `held` (destinations are left out), else
    /// applies the configured policy. Compared with what the programs have,
    /// not with what this agent last wrote: during a handover the
    /// predecessor writes the same slot.
    fn hold_egress(&self, redirector: &mut Redirector, held: bool) -> Result<(), InterceptError> {
        let wanted = if held { Egress::Deny } else { self.egress };
        if self.lease.egress()? != wanted {
            redirector.set_egress(wanted)?;
        }
        Ok(())
    }

    /// How many destinations the last sync found no room for in the map.
    pub fn destinations_left_out(&self) -> usize {
        self.left_out.load(Ordering::Relaxed)
    }

    /// Whether the lease runs now, and the egress policy in force.
    pub fn programs_state(&self) -> Result<(bool, Egress), InterceptError> {
        Ok((self.lease.lease_runs()?, self.lease.egress()?))
    }

    /// Whether `service` is a mesh workload (has a cgroup): its explicit
    /// upstream listeners take only its own workload's connections, which
    /// the programs bring with a record ([`Interception::lookup`]).
    pub fn captures(&self, service: &str) -> bool {
        (self.workloads.lock().expect("workloads lock"))
            .captured
            .contains(service)
    }

    /// Who connected and where to, for a socket accepted on the outbound
    /// listener; None if the programs did not bring it.
    /// The record of `stream`, accepted on the outbound listener at `local`
    /// from `peer`: one map lookup, no lock shared with map syncs.
    pub fn lookup(
        &self,
        stream: &TcpStream,
        (peer, local): (SocketAddr, SocketAddr),
    ) -> Result<Option<Intercepted>, InterceptError> {
        let netns_cookie = match self.netns_cookie.get() {
            Some(cookie) => *cookie,
            None => {
                let cookie = crate::ebpf::netns_cookie(stream)
                    .map_err(|e| InterceptError::from(RedirectorError::Socket(e)))?;
                *self.netns_cookie.get_or_init(|| cookie)
            }
        };
        let orig = self.records.original_dst(netns_cookie, peer, local)?;
        Ok(orig.and_then(|o| {
            let source = self
                .workloads
                .lock()
                .expect("workloads lock")
                .names
                .get(&o.workload_id)?
                .clone();
            Some(Intercepted {
                source,
                original: o.addr,
            })
        }))
    }

    pub fn counters(&self) -> Result<RedirectCounters, InterceptError> {
        Ok(self
            .redirector
            .lock()
            .expect("redirector lock")
            .counters()?)
    }
}

#[cfg(test)]
mod tests {
    use weft_api::proto::{self, change::Change as P, watch_event::Event};

    use super::*;

    fn view(intention: Option<&str>, protocol: Option<&str>, api_node: &str) -> View {
        let mut v = View::default();
        let mut snapshot = proto::StateSnapshot {
            nodes: vec![proto::Node {
                name: "a".into(),
                address: "10.0.0.1".into(),
                ..Default::default()
            }],
            instances: vec![proto::ServiceInstance {
                id: "api-1".into(),
                service: "api".into(),
                node: api_node.into(),
                address: "127.0.0.1".into(),
                port: 8080,
                health: proto::Health::Passing as i32,
                ..Default::default()
            }],
            vips: vec![proto::ServiceVip {
                service: "api".into(),
                vip: "240.0.0.2".into(),
            }],
            ..Default::default()
        };
        if let Some(action) = intention {
            snapshot.intentions.push(proto::Intention {
                source: "web".into(),
                destination: "api".into(),
                action: action.into(),
                ..Default::default()
            });
        }
        if let Some(p) = protocol {
            snapshot.config_entries.push(proto::ConfigEntry {
                kind: "service-defaults".into(),
                name: "api".into(),
                json: format!(r#"{{"Kind":"service-defaults","Name":"api","Protocol":"{p}"}}"#),
                ..Default::default()
            });
        }
        v.apply(proto::WatchEvent {
            index: 1,
            event: Some(Event::Snapshot(snapshot)),
        })
        .unwrap();
        v
    }

    #[test]
    fn workload_ids_are_kept_and_a_removed_services_id_is_not_given_again() {
        let (first, last) = assign_ids(&WorkloadIds::new(), &["web", "api", "db"], 0);
        assert_eq!(
            first,
            [("web".into(), 1), ("api".into(), 2), ("db".into(), 3)].into()
        );
        assert_eq!(last, 3);
        // api removed, cache added: web and db keep theirs; cache does not
        // take api's 2, which connection records, fast-path entries and
        // loopback marks made for api may still carry.
        let (second, last) = assign_ids(&first, &["web", "db", "cache"], last);
        assert_eq!(
            second,
            [("web".into(), 1), ("db".into(), 3), ("cache".into(), 4)].into()
        );
        // A successor given its predecessor's ids keeps them, whatever the
        // order of its file.
        assert_eq!(assign_ids(&second, &["cache", "db", "web"], last).0, second);
        // Past the last id, numbering wraps around to the free ones.
        let (wrapped, last) = assign_ids(
            &[("a".to_string(), 1), ("z".to_string(), MAX_WORKLOAD_ID)].into(),
            &["a", "z", "b", "c"],
            MAX_WORKLOAD_ID - 1,
        );
        assert_eq!((wrapped["b"], wrapped["c"], last), (2, 3, 3));
    }

    const WEB: &[(u32, &str)] = &[(1, "web")];

    fn workloads() -> Vec<(u32, String)> {
        WEB.iter().map(|(i, n)| (*i, n.to_string())).collect()
    }

    #[test]
    fn every_instance_address_and_vip_is_taken_over_ipv4_and_ipv6() {
        let mut v = view(None, None, "b");
        v.apply(proto::WatchEvent {
            index: 2,
            event: Some(Event::Changes(proto::ChangeSet {
                changes: vec![proto::Change {
                    change: Some(P::InstanceUpsert(proto::ServiceInstance {
                        id: "api-2".into(),
                        service: "api".into(),
                        node: "b".into(),
                        address: "fd00::2".into(),
                        port: 8080,
                        ..Default::default()
                    })),
                }],
            })),
        })
        .unwrap();
        let mut destinations = Destinations::new("b", Vec::new());
        destinations.update(&v);
        let wanted = destinations.all();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(wanted.contains(&(ip("240.0.0.2"), None)), "{wanted:?}");
        assert!(
            wanted.contains(&(ip("127.0.0.1"), Some(8080))),
            "{wanted:?}"
        );
        assert!(wanted.contains(&(ip("fd00::2"), Some(8080))), "{wanted:?}");
    }

    #[test]
    fn only_local_permissive_services_have_their_ports_steered() {
        let mut v = view(None, None, "a");
        let local = vec![("api".to_string(), 8080), ("web".to_string(), 9000)];
        assert!(permissive_ports(&v, &local).is_empty(), "strict by default");
        v.apply(proto::WatchEvent {
            index: 2,
            event: Some(Event::Changes(proto::ChangeSet {
                changes: vec![proto::Change {
                    change: Some(P::ConfigUpsert(proto::ConfigEntry {
                        kind: "service-defaults".into(),
                        name: "api".into(),
                        json: r#"{"Kind":"service-defaults","Name":"api","MutualTLSMode":"permissive"}"#.into(),
                        ..Default::default()
                    })),
                }],
            })),
        })
        .unwrap();
        assert_eq!(permissive_ports(&v, &local), BTreeSet::from([8080]));
        assert!(permissive_ports(&v, &local[1..]).is_empty());
    }

    #[test]
    fn allowed_local_tcp_pairs_take_the_fast_path() {
        let entries = fast_paths(&view(Some("allow"), None, "a"), ("a", "dc1"), &workloads());
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(
            entries.get(&(1, "240.0.0.2".parse().unwrap(), None)),
            Some(&local)
        );
        assert_eq!(entries.get(&(1, local.ip(), Some(8080))), Some(&local));
    }

    #[test]
    fn denied_remote_or_http_pairs_do_not() {
        assert!(fast_paths(&view(Some("deny"), None, "a"), ("a", "dc1"), &workloads()).is_empty());
        assert!(
            fast_paths(&view(None, None, "a"), ("a", "dc1"), &workloads()).is_empty(),
            "default deny"
        );
        assert!(fast_paths(&view(Some("allow"), None, "b"), ("a", "dc1"), &workloads()).is_empty());
        assert!(fast_paths(
            &view(Some("allow"), Some("http"), "a"),
            ("a", "dc1"),
            &workloads()
        )
        .is_empty());
    }

    #[test]
    fn an_intention_change_takes_the_pair_off_the_fast_path() {
        let mut v = view(Some("allow"), None, "a");
        assert!(!fast_paths(&v, ("a", "dc1"), &workloads()).is_empty());
        let deny = proto::Intention {
            source: "web".into(),
            destination: "api".into(),
            action: "deny".into(),
            ..Default::default()
        };
        v.apply(proto::WatchEvent {
            index: 2,
            event: Some(Event::Changes(proto::ChangeSet {
                changes: vec![proto::Change {
                    change: Some(P::IntentionUpsert(deny)),
                }],
            })),
        })
        .unwrap();
        assert!(fast_paths(&v, ("a", "dc1"), &workloads()).is_empty());
    }
}
