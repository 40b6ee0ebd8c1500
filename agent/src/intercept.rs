//! Transparent interception (`ebpf = true`): the agent's eBPF programs,
//! attached to the cgroup subtree it manages, bring mesh workloads'
//! connections to the outbound listener. This module places each service's
//! cgroup, keeps the programs' maps in step with the agent's view (every
//! service's virtual IP, on any port, and every registered instance address
//! are taken over), and tells, for an accepted socket, which local service
//! called and where it wanted to go.
use std::collections::{BTreeMap, BTreeSet};
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
    fast_installed: Mutex<BTreeMap<FastEntry, SocketAddr>>,
    node_name: String,
    outbound: SocketAddr,
}

/// (source workload id, destination ip, port or None for any port)
pub type FastEntry = (u32, IpAddr, Option<u16>);

/// The same-node fast path: pairs whose connections may go straight to a
/// local instance: the source is a local workload, the destination service
/// has a passing instance on this node, speaks plain TCP, and intentions
/// allow the pair. Everything else goes through the agent.
pub fn fast_paths(
    view: &View,
    node: &str,
    workloads: &[(u32, String)],
) -> BTreeMap<FastEntry, SocketAddr> {
    let mut entries = BTreeMap::new();
    for (service, vip) in &view.vips {
        if view.protocol(service).is_http() || !vip.is_ipv4() {
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
            if view.decide(source, service, None).allowed {
                entries.insert((*workload_id, *vip, None), local);
                entries.insert((*workload_id, local.ip(), Some(local.port())), local);
            }
        }
    }
    entries
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
            fast_installed: Mutex::new(BTreeMap::new()),
            node_name: config.node_name.clone(),
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

        let workloads: Vec<(u32, String)> = self
            .workloads
            .iter()
            .enumerate()
            .map(|(i, name)| (i as u32 + 1, name.clone()))
            .collect();
        let fast = fast_paths(view, &self.node_name, &workloads);
        let mut fast_installed = self.fast_installed.lock().expect("fast path lock");
        for (key, target) in fast_installed.iter() {
            if fast.get(key) != Some(target) {
                redirector.remove_fast_path(key.0, key.1, key.2)?;
            }
        }
        for (key, target) in &fast {
            if fast_installed.get(key) != Some(target) {
                redirector.add_fast_path(key.0, key.1, key.2, *target)?;
            }
        }
        *fast_installed = fast;
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

    const WEB: &[(u32, &str)] = &[(1, "web")];

    fn workloads() -> Vec<(u32, String)> {
        WEB.iter().map(|(i, n)| (*i, n.to_string())).collect()
    }

    #[test]
    fn allowed_local_tcp_pairs_take_the_fast_path() {
        let entries = fast_paths(&view(Some("allow"), None, "a"), "a", &workloads());
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(
            entries.get(&(1, "240.0.0.2".parse().unwrap(), None)),
            Some(&local)
        );
        assert_eq!(entries.get(&(1, local.ip(), Some(8080))), Some(&local));
    }

    #[test]
    fn denied_remote_or_http_pairs_do_not() {
        assert!(fast_paths(&view(Some("deny"), None, "a"), "a", &workloads()).is_empty());
        assert!(
            fast_paths(&view(None, None, "a"), "a", &workloads()).is_empty(),
            "default deny"
        );
        assert!(fast_paths(&view(Some("allow"), None, "b"), "a", &workloads()).is_empty());
        assert!(fast_paths(&view(Some("allow"), Some("http"), "a"), "a", &workloads()).is_empty());
    }

    #[test]
    fn an_intention_change_takes_the_pair_off_the_fast_path() {
        let mut v = view(Some("allow"), None, "a");
        assert!(!fast_paths(&v, "a", &workloads()).is_empty());
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
        assert!(fast_paths(&v, "a", &workloads()).is_empty());
    }
}
