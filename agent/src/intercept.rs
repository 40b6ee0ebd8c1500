//! Transparent interception (`ebpf = true`): the agent's eBPF programs,
//! attached to the cgroup subtree it manages, bring mesh workloads'
//! connections to the outbound listener. This module places each service's
//! cgroup, keeps the programs' maps in step with the agent's view (every
//! service's virtual IP, on any port, and every registered instance address
//! are taken over), and tells, for an accepted socket, which local service
//! called and where it wanted to go.
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tokio::net::TcpStream;

use crate::config::AgentConfig;
use crate::ebpf::{
    cgroup2_mount, cgroup_id, CgroupError, RedirectCounters, Redirector, RedirectorError,
};
use crate::view::View;

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

pub struct Interception {
    redirector: Mutex<Redirector>,
    /// Service name of each workload id (id = index + 1).
    workloads: Vec<String>,
    installed: Mutex<BTreeSet<(IpAddr, Option<u16>)>>,
    outbound: SocketAddr,
}

impl Interception {
    /// Loads the programs, places every service's cgroup (creating it when
    /// missing) in the workload map and attaches at the cgroup root. Call
    /// inside the tokio runtime.
    pub fn start(config: &AgentConfig) -> Result<Self, InterceptError> {
        let root = cgroup_root(config)?;
        ensure_dir(&root)?;
        let mut redirector = Redirector::load()?;
        let mut workloads = Vec::new();
        for (i, service) in config.services.iter().enumerate() {
            workloads.push(service.name.clone());
            let Some(relative) = &service.cgroup else {
                continue;
            };
            let path = root.join(relative);
            ensure_dir(&path)?;
            let id = cgroup_id(&path)?;
            redirector.add_workload(id, i as u32 + 1)?;
            tracing::info!(service = %service.name, cgroup = %path.display(), cgroup_id = id, "workload cgroup");
        }
        redirector.attach(&root)?;
        Ok(Self {
            redirector: Mutex::new(redirector),
            workloads,
            installed: Mutex::new(BTreeSet::new()),
            outbound: config.outbound_addr,
        })
    }

    /// What should be taken over: virtual IPs on any port, instances exactly.
    pub fn wanted(view: &View) -> BTreeSet<(IpAddr, Option<u16>)> {
        let mut wanted: BTreeSet<(IpAddr, Option<u16>)> =
            view.vips.values().map(|vip| (*vip, None)).collect();
        for instance in view.instances.values() {
            if let Ok(ip) = instance.address.parse::<IpAddr>() {
                wanted.insert((ip, Some(instance.port)));
            }
        }
        wanted.retain(|(ip, _)| ip.is_ipv4());
        wanted
    }

    /// Brings the destinations map in step with `view`.
    pub fn sync(&self, view: &View) -> Result<(), InterceptError> {
        let wanted = Self::wanted(view);
        let mut installed = self.installed.lock().expect("installed lock");
        let mut redirector = self.redirector.lock().expect("redirector lock");
        for (ip, port) in installed.difference(&wanted) {
            redirector.remove_destination(*ip, *port)?;
        }
        for (ip, port) in wanted.difference(&installed) {
            redirector.add_destination(*ip, *port, self.outbound)?;
        }
        *installed = wanted;
        Ok(())
    }

    /// Who connected and where to, for a socket accepted on the outbound
    /// listener; None if the programs did not bring it.
    pub fn lookup(&self, stream: &TcpStream) -> Result<Option<Intercepted>, InterceptError> {
        let (peer, local) = match (stream.peer_addr(), stream.local_addr()) {
            (Ok(p), Ok(l)) => (p, l),
            _ => return Ok(None),
        };
        let orig = self
            .redirector
            .lock()
            .expect("redirector lock")
            .original_dst(stream, peer, local)?;
        Ok(orig.and_then(|o| {
            let source = self
                .workloads
                .get((o.workload_id as usize).checked_sub(1)?)?
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
