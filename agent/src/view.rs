//! The agent's view of the mesh, built from the servers' watch stream: a
//! snapshot, then changes in index order. Pure data and lookups, no I/O:
//! which instances of a service are passing, which local service listens on
//! an address, what the intentions decide, and the trust bundle.
//!
//! Lookups on the data path go through indexes (by virtual IP, by instance
//! address, instances per service, intentions per destination), not by
//! scanning. The maps and the indexes are persistent and filed change by
//! change ([`filed`]), so a change costs about the same whatever the size of
//! the mesh, and a published view ([`crate::shared_view`]) shares all of
//! it with the working copy until either changes.
use std::collections::{BTreeMap, HashMap};

use im::OrdMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

use serde::Serialize;
use weft_api::catalog::{HealthStatus, Node, ServiceInstance};
use weft_api::compiled::Compiled;
use weft_api::config_entry::{ConfigEntry, EntryContext, EntryKind, EntrySet, Protocol};
use weft_api::convert::{instance_from_proto, intention_from_proto, node_from_proto};
use weft_api::intention::{
    evaluate, evaluate_connection, Caller, ConnectionDecision, Decision, Intention,
    IntentionAction, Request,
};
use weft_api::load_balancer::LoadBalancer;
use weft_api::proto::{self, change::Change as P, watch_event::Event};
use weft_api::routing;

mod filed;
use filed::Filed;

use crate::outlier::{
    EjectionPolicy, DEFAULT_EJECTION, DEFAULT_INTERVAL, DEFAULT_MAX_EJECTION_PERCENT,
};

#[derive(Debug, Clone, Default, Serialize)]
pub struct View {
    /// Index of the last event applied.
    pub index: u64,
    /// The large maps are persistent (`im`): copying the view to publish
    /// it shares them, and a change copies only the path to what changed.
    /// Their keys are shared names and their values shared records, so
    /// that copying a path copies pointers, not text: a map's node holds
    /// up to 64 entries, and copying the path to one instance of 10,000
    /// once allocated and later freed two strings per neighbour (measured
    /// in the large mesh's agents: about a third of a change's cost, in
    /// `malloc_consolidate` and copies).
    pub nodes: OrdMap<Name, Arc<Node>>,
    /// (node, instance id) -> instance; each shared, so that a change
    /// copying the path to one instance copies none of its neighbours.
    /// Changed only through [`View::apply`], which files it in the lookups.
    #[serde(serialize_with = "shared_values_as_list")]
    pub instances: OrdMap<InstanceKey, Arc<ServiceInstance>>,
    pub vips: OrdMap<String, IpAddr>,
    /// Changed only through [`View::apply`], which files it in the lookups.
    #[serde(serialize_with = "shared_values_as_list")]
    pub intentions: OrdMap<IntentionKey, Arc<Intention>>,
    /// Every config entry (routers, splitters, resolvers, defaults),
    /// shared by the published views until one changes: operators change
    /// entries rarely, while instances' health changes all the time, and a
    /// published view never copies the entries' rules.
    #[serde(serialize_with = "entries_as_list")]
    pub entries: Arc<EntrySet>,
    pub trust_domain: String,
    pub roots_pem: Vec<String>,
    pub default_allow: bool,
    /// Other datacenters of the federation and their gateways' WAN
    /// addresses.
    pub federation: BTreeMap<String, Vec<SocketAddr>>,
    /// Other datacenters' instances (of the services this agent may read).
    pub remote: BTreeMap<String, Vec<ServiceInstance>>,
    /// The parts of a snapshot received so far, and its index: the servers
    /// send a large snapshot in parts, applied once the last is in.
    #[serde(skip)]
    pub(crate) partial: Option<(u64, proto::StateSnapshot)>,
    #[serde(skip)]
    lookups: Index,
}

/// A name the view's maps share (a node, an instance id, a service).
pub type Name = Arc<str>;
/// (node, instance id): how the view keys an instance.
pub type InstanceKey = (Name, Name);
/// (source, destination): how the view keys an intention.
pub type IntentionKey = (Name, Name);

/// The key of `instance` in [`View::instances`].
fn instance_key(instance: &ServiceInstance) -> InstanceKey {
    (instance.node.as_str().into(), instance.id.as_str().into())
}

/// The key of `intention` in [`View::intentions`].
fn intention_key(intention: &Intention) -> IntentionKey {
    (
        intention.source.as_str().into(),
        intention.destination.as_str().into(),
    )
}

/// The view's lookups. Instances (by service, by address) and intentions
/// (by destination) are filed as each change applies, in persistent
/// indexes a published copy shares: a change copies the path to its
/// heading and that heading's list, so its cost grows with the instances
/// of one service (or the intentions naming one destination), not with
/// the size of the mesh. The virtual IPs' reverse map
/// changes only when a service is first given one; it is rebuilt then,
/// once, before the view is published ([`View::prepare`]).
#[derive(Clone, Default)]
struct Index {
    by_service: Filed<Name, InstanceKey>,
    by_addr: Filed<SocketAddr, InstanceKey>,
    /// Destination (or `*`) -> the intentions naming it.
    intentions_to: Filed<Name, IntentionKey>,
    /// A node's address -> the nodes registered there (the inbound port
    /// gives sources the view knows places of their own).
    node_addrs: Filed<IpAddr, Name>,
    vips: Arc<OnceLock<HashMap<IpAddr, String>>>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("vips", &self.vips.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Index {
    fn file_node(&mut self, node: &Node) {
        if let Ok(ip) = node.address.parse::<IpAddr>() {
            self.node_addrs
                .add(ip.to_canonical(), &node.name.as_str().into());
        }
    }

    fn unfile_node(&mut self, node: &Node) {
        if let Ok(ip) = node.address.parse::<IpAddr>() {
            self.node_addrs
                .remove(&ip.to_canonical(), &node.name.as_str().into());
        }
    }

    fn file(&mut self, key: &InstanceKey, i: &ServiceInstance) {
        self.by_service.add(i.service.as_str().into(), key);
        if let Some(addr) = i.socket_addr() {
            self.by_addr.add(addr, key);
        }
    }

    fn unfile(&mut self, key: &InstanceKey, i: &ServiceInstance) {
        self.by_service.remove(i.service.as_str(), key);
        if let Some(addr) = i.socket_addr() {
            self.by_addr.remove(&addr, key);
        }
    }
}

/// Virtual IP -> service.
fn vip_index(view: &View) -> HashMap<IpAddr, String> {
    let mut by_vip = HashMap::new();
    for (name, vip) in &view.vips {
        // Two services never share a virtual IP; the first by name wins.
        by_vip.entry(*vip).or_insert_with(|| name.clone());
    }
    by_vip
}

/// A map keyed by pairs as the list of its values (JSON keys are strings).
fn shared_values_as_list<K: Ord + Clone, V: Serialize, S: serde::Serializer>(
    map: &OrdMap<K, Arc<V>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(map.values().map(|v| &**v))
}

fn entries_as_list<S: serde::Serializer>(entries: &EntrySet, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(entries.iter())
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ViewError {
    #[error("watch event {index} has no body")]
    Empty { index: u64 },
    #[error("watch event {index}: {message}")]
    Bad { index: u64, message: String },
}

impl View {
    /// Applies one watch event. A snapshot replaces everything.
    pub fn apply(&mut self, event: proto::WatchEvent) -> Result<(), ViewError> {
        let index = event.index;
        let bad = |message: String| ViewError::Bad { index, message };
        match event.event.ok_or(ViewError::Empty { index })? {
            Event::Snapshot(part) => {
                // Parts of one snapshot share its index; a part of another
                // starts over.
                let mut s = match self.partial.take() {
                    Some((at, mut earlier)) if at == index => {
                        earlier.nodes.extend(part.nodes);
                        earlier.instances.extend(part.instances);
                        earlier.vips.extend(part.vips);
                        earlier.intentions.extend(part.intentions);
                        earlier.config_entries.extend(part.config_entries);
                        earlier.kv.extend(part.kv);
                        earlier.federation.extend(part.federation);
                        earlier.remote.extend(part.remote);
                        earlier.more = part.more;
                        earlier
                    }
                    _ => part,
                };
                if s.more {
                    s.more = false;
                    self.partial = Some((index, s));
                    return Ok(());
                }
                let mut next = View {
                    index,
                    default_allow: s.default_allow,
                    ..View::default()
                };
                for n in s.nodes {
                    next.upsert_node(node_from_proto(n));
                }
                for i in s.instances {
                    let i = instance_from_proto(i).map_err(|e| bad(e.to_string()))?;
                    let key = instance_key(&i);
                    let i = Arc::new(i);
                    // The same instance twice: the last one stands.
                    if let Some(old) = next.instances.insert(key.clone(), i.clone()) {
                        next.lookups.unfile(&key, &old);
                    }
                    next.lookups.file(&key, &i);
                }
                for v in s.vips {
                    next.vips.insert(
                        v.service,
                        v.vip.parse().map_err(|_| bad(format!("vip {:?}", v.vip)))?,
                    );
                }
                for i in s.intentions {
                    let i = intention_from_proto(i).map_err(|e| bad(e.to_string()))?;
                    let key = intention_key(&i);
                    next.lookups.intentions_to.add(key.1.clone(), &key);
                    next.intentions.insert(key, Arc::new(i));
                }
                for e in s.config_entries {
                    next.apply_config(&e);
                }
                for f in &s.federation {
                    next.apply_federation(f).map_err(bad)?;
                }
                for r in s.remote {
                    next.apply_remote(r).map_err(bad)?;
                }
                if let Some(ca) = s.ca {
                    next.trust_domain = ca.trust_domain;
                    next.roots_pem = ca.roots_pem;
                }
                *self = next;
            }
            Event::Changes(set) => {
                self.partial = None;
                for change in set.changes.into_iter().filter_map(|c| c.change) {
                    self.apply_change(change).map_err(bad)?;
                }
                self.index = index;
            }
        }
        Ok(())
    }

    /// Whether a snapshot is half received: the view is still the one
    /// before it.
    pub fn is_partial(&self) -> bool {
        self.partial.is_some()
    }

    /// Forgets a half-received snapshot (its stream broke).
    pub fn drop_partial(&mut self) {
        self.partial = None;
    }

    fn apply_change(&mut self, change: P) -> Result<(), String> {
        match change {
            P::NodeUpsert(n) => self.upsert_node(node_from_proto(n)),
            P::NodeDelete(name) => {
                if let Some(old) = self.nodes.remove(name.as_str()) {
                    self.lookups.unfile_node(&old);
                }
                // The node's instances are the keys (name, ..), together.
                let gone: Vec<InstanceKey> = self.on_node(&name).map(|(k, _)| k.clone()).collect();
                for key in gone {
                    if let Some(old) = self.instances.remove(&key) {
                        self.lookups.unfile(&key, &old);
                    }
                }
            }
            P::InstanceUpsert(i) => {
                let i = instance_from_proto(i).map_err(|e| e.to_string())?;
                let key = instance_key(&i);
                // Filed by service and address: a health change leaves the
                // index as it is.
                match self.instances.get(&key) {
                    Some(old)
                        if old.service == i.service && old.socket_addr() == i.socket_addr() => {}
                    Some(old) => {
                        self.lookups.unfile(&key, old);
                        self.lookups.file(&key, &i);
                    }
                    None => self.lookups.file(&key, &i),
                }
                self.instances.insert(key, Arc::new(i));
            }
            P::InstanceDelete(r) => {
                let key: InstanceKey = (r.node.into(), r.id.into());
                if let Some(old) = self.instances.remove(&key) {
                    self.lookups.unfile(&key, &old);
                }
            }
            P::VipAssigned(v) => {
                let vip = v.vip.parse().map_err(|_| format!("vip {:?}", v.vip))?;
                if self.vips.insert(v.service, vip) != Some(vip) {
                    self.lookups.vips = Default::default();
                }
            }
            P::VipReleased(v) => {
                if self.vips.remove(&v.service).is_some() {
                    self.lookups.vips = Default::default();
                }
            }
            P::IntentionUpsert(i) => {
                let i = intention_from_proto(i).map_err(|e| e.to_string())?;
                let key = intention_key(&i);
                // Filed by key: a new action leaves the index as it is.
                if !self.intentions.contains_key(&key) {
                    self.lookups.intentions_to.add(key.1.clone(), &key);
                }
                self.intentions.insert(key, Arc::new(i));
            }
            P::IntentionDelete(r) => {
                let key: IntentionKey = (r.source.into(), r.destination.into());
                if self.intentions.remove(&key).is_some() {
                    self.lookups.intentions_to.remove(&*key.1, &key);
                }
            }
            P::CaBundle(b) => {
                self.trust_domain = b.trust_domain;
                self.roots_pem = b.roots_pem;
            }
            P::Federation(f) => self.apply_federation(&f)?,
            P::Remote(r) => self.apply_remote(r)?,
            P::ConfigUpsert(e) => self.apply_config(&e),
            P::ConfigDelete(r) => {
                if let Ok(kind) = r.kind.parse::<EntryKind>() {
                    if self.entries.get(kind, &r.name).is_some() {
                        Arc::make_mut(&mut self.entries).remove(kind, &r.name);
                    }
                }
            }
            P::KvUpsert(_) | P::KvDelete(_) => {}
        }
        Ok(())
    }

    fn apply_config(&mut self, e: &proto::ConfigEntry) {
        match serde_json::from_str::<ConfigEntry>(&e.json) {
            Ok(entry) => {
                Arc::make_mut(&mut self.entries).insert(entry);
            }
            // Written through the servers' validation, so this is a bug or a
            // newer server: the entry is left out (requests are not routed by it).
            Err(err) => {
                tracing::warn!(kind = %e.kind, name = %e.name, "config entry not understood: {err}")
            }
        }
    }

    /// Builds the lookups a change left to build, off the data path, so
    /// that no connection pays for them.
    pub fn prepare(&self) {
        self.lookups.vips.get_or_init(|| vip_index(self));
    }

    /// Every instance of `service`, in a stable order.
    pub fn instances_of_service(&self, service: &str) -> Vec<&ServiceInstance> {
        (self.lookups.by_service.get(service).iter())
            .filter_map(|k| self.instances.get(k).map(|i| &**i))
            .collect()
    }

    /// The instances listening on `addr`.
    fn instances_at(&self, addr: SocketAddr) -> impl Iterator<Item = &ServiceInstance> {
        let keys = self.lookups.by_addr.get(&addr).iter();
        keys.filter_map(|k| self.instances.get(k).map(|i| &**i))
    }

    /// The intentions that may apply to calls to `destination`: those
    /// naming it, and those naming `*`.
    fn intentions_to(&self, destination: &str) -> impl Iterator<Item = &Intention> {
        let to = &self.lookups.intentions_to;
        let any: &[IntentionKey] = if destination == weft_api::names::WILDCARD {
            &[]
        } else {
            to.get(weft_api::names::WILDCARD)
        };
        (to.get(destination).iter())
            .chain(any)
            .filter_map(|k| self.intentions.get(k).map(|i| &**i))
    }

    /// The protocol of `service` (tcp unless a service-defaults says otherwise).
    pub fn protocol(&self, service: &str) -> Protocol {
        EntryContext::protocol(&*self.entries, service)
    }

    /// Whether `service` admits plaintext through its agent (permissive).
    pub fn mutual_tls_mode(&self, service: &str) -> weft_api::config_entry::MutualTlsMode {
        self.entries.mutual_tls_mode(service)
    }

    /// Passing instances of `service`, in a stable order.
    pub fn passing(&self, service: &str) -> Vec<&ServiceInstance> {
        let mut all = self.instances_of_service(service);
        all.retain(|i| i.health == HealthStatus::Passing && self.node_up(&i.node));
        all
    }

    fn apply_federation(&mut self, f: &proto::FederationState) -> Result<(), String> {
        let f = weft_api::federation::FederationState::from_proto(f).map_err(|e| e.to_string())?;
        self.federation.insert(f.datacenter, f.gateways);
        Ok(())
    }

    fn apply_remote(&mut self, r: proto::RemoteInstances) -> Result<(), String> {
        let instances = r
            .instances
            .into_iter()
            .map(|i| instance_from_proto(i).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        self.remote.insert(r.datacenter, instances);
        Ok(())
    }

    /// The LAN address of one of this datacenter's passing gateways, for a
    /// tunnel to another datacenter (`seed` spreads the choice).
    pub fn local_gateway(&self, seed: usize) -> Option<SocketAddr> {
        // As the servers take them: on agents' nodes, at an address other
        // nodes can reach.
        let gateways: Vec<SocketAddr> = self
            .passing(weft_api::gateway::SERVICE)
            .into_iter()
            .filter(|i| !self.node_is_external(&i.node))
            .filter_map(|i| i.socket_addr())
            .filter(weft_api::federation::advertisable)
            .collect();
        (!gateways.is_empty()).then(|| gateways[seed % gateways.len()])
    }

    /// The WAN addresses of datacenter `dc`'s gateways.
    pub fn gateways_of(&self, dc: &str) -> &[SocketAddr] {
        self.federation.get(dc).map_or(&[], Vec::as_slice)
    }

    /// Whether `node` was registered through the catalog API: no agent
    /// runs it, so the mesh has no tunnel to its instances.
    pub fn node_is_external(&self, node: &str) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|n| weft_api::catalog_register::is_external(n))
    }

    /// Whether `node` is not critical at node level: its agent is heard
    /// from (the servers' failure detection). Instances on a critical node
    /// count as critical, whatever their own checks last said.
    pub fn node_up(&self, node: &str) -> bool {
        self.nodes
            .get(node)
            .is_none_or(|n| n.health != HealthStatus::Critical)
    }

    /// Where another node's agent takes tunnels (its address; the port is
    /// the inbound port), and the node's datacenter.
    pub fn node_addr(&self, node: &str) -> Option<(IpAddr, &str)> {
        let n = self.nodes.get(node)?;
        Some((n.address.parse().ok()?, n.datacenter.as_str()))
    }

    /// Puts `node` in the view (the same name again: the last one stands),
    /// filed under its address.
    fn upsert_node(&mut self, node: Node) {
        if let Some(old) = self.nodes.remove(node.name.as_str()) {
            self.lookups.unfile_node(&old);
        }
        self.lookups.file_node(&node);
        self.nodes.insert(node.name.as_str().into(), Arc::new(node));
    }

    /// Whether `ip` is the address of a node in the view (a v4-mapped
    /// address as IPv4): one lookup.
    pub fn knows_node_address(&self, ip: IpAddr) -> bool {
        !self.lookups.node_addrs.get(&ip.to_canonical()).is_empty()
    }

    /// The instances registered on `node` (the map is keyed by node first:
    /// a range, not a scan).
    pub fn instances_on<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = &'a ServiceInstance> + 'a {
        self.on_node(node).map(|(_, i)| &**i)
    }

    /// The instances registered on `node` with their keys: a range of the
    /// map, which is keyed by node first.
    fn on_node<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = (&'a InstanceKey, &'a Arc<ServiceInstance>)> + 'a {
        let from: InstanceKey = (node.into(), "".into());
        (self.instances.range(from..)).take_while(move |((n, _), _)| &**n == node)
    }

    /// The instance on `node` that listens on `target`.
    pub fn local_instance(&self, node: &str, target: SocketAddr) -> Option<&ServiceInstance> {
        self.instances_at(target).find(|i| i.node == node)
    }

    /// The service a workload reaches at `addr`: by virtual IP (any port) or
    /// by an instance's address and port.
    pub fn service_at(&self, addr: SocketAddr, node: &str) -> Option<&str> {
        if let Some(name) = self.service_by_vip(addr.ip()) {
            return Some(name);
        }
        // Only instances this node's connect hook takes over (see
        // `intercept::Destinations`), and only when one service is there.
        let mut services = self
            .instances_at(addr)
            .filter(|i| i.node == node || !weft_api::catalog::is_node_local(addr.ip()))
            .map(|i| i.service.as_str());
        let first = services.next()?;
        services.all(|s| s == first).then_some(first)
    }

    /// The service whose virtual IP is `ip`.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&str> {
        let by_vip = self.lookups.vips.get_or_init(|| vip_index(self));
        by_vip.get(&ip).map(String::as_str)
    }

    /// The intentions' decision for `caller` calling `destination`.
    pub fn decide(
        &self,
        caller: Caller<'_>,
        destination: &str,
        request: Option<&Request>,
    ) -> Decision {
        evaluate(
            self.intentions_to(destination),
            caller,
            destination,
            request,
            self.default_action(),
        )
    }

    fn default_action(&self) -> IntentionAction {
        if self.default_allow {
            IntentionAction::Allow
        } else {
            IntentionAction::Deny
        }
    }

    /// How a connection from `caller` to `destination` is judged before any
    /// request on it is seen: decided, or per HTTP request (an L7 intention).
    pub fn decide_connection(&self, caller: Caller<'_>, destination: &str) -> ConnectionDecision {
        evaluate_connection(
            self.intentions_to(destination),
            caller,
            destination,
            self.default_action(),
        )
    }

    /// Where `request` to `service` goes (`roll` in `[0, 100)` for a
    /// splitter), with the matched route's policy.
    pub fn route_target(&self, service: &str, request: &Request, roll: f32) -> routing::Target {
        routing::route_request(&self.entries, service, request, roll)
    }

    /// The instances that may serve requests routed to `target` (or to its
    /// resolver's failover when it has none), their service and, when they
    /// are another datacenter's, which.
    pub fn instances_of(&self, target: &routing::Target, here: &str) -> routing::Resolved<'_> {
        let live = |service: &str| {
            let mut all = self.instances_of_service(service);
            all.retain(|i| self.node_up(&i.node));
            all
        };
        routing::instances_or_failover(&self.entries, target, (live, here), &self.remote)
    }

    /// The circuit breaking that `source`'s service-defaults ask for on its
    /// upstreams (`UpstreamConfig.Defaults.PassiveHealthCheck`).
    pub fn ejection_policy(&self, source: &str, upstream: &str) -> Option<EjectionPolicy> {
        let check = self
            .upstream_settings(source, upstream)?
            .passive_health_check?;
        let duration = |t: &Option<Compiled<Duration>>, default| {
            t.as_ref()
                .and_then(|t| t.get().ok().copied())
                .unwrap_or(default)
        };
        Some(EjectionPolicy {
            max_failures: check.max_failures,
            ejection: duration(&check.base_ejection_time, DEFAULT_EJECTION),
            interval: duration(&check.interval, DEFAULT_INTERVAL),
            enforcing: check.enforcing_consecutive_5xx.unwrap_or(100),
            max_ejection_percent: check
                .max_ejection_percent
                .unwrap_or(DEFAULT_MAX_EJECTION_PERCENT),
        })
    }

    /// `source`'s `UpstreamConfig` for its calls to `upstream` (the
    /// override for it, or the defaults).
    pub fn upstream_settings(
        &self,
        source: &str,
        upstream: &str,
    ) -> Option<weft_api::config_entry::UpstreamSettings<'_>> {
        match self.entries.get(EntryKind::ServiceDefaults, source) {
            Some(ConfigEntry::ServiceDefaults(d)) => d.upstream(upstream),
            _ => None,
        }
    }

    /// How `source`'s tunnels to another datacenter's instances of
    /// `upstream` are dialed: its `UpstreamConfig` for the upstream, else
    /// its service-defaults' `MeshGateway`, else proxy-defaults', else
    /// `local`.
    pub fn mesh_gateway_mode(
        &self,
        source: &str,
        upstream: &str,
    ) -> weft_api::config_entry::MeshGatewayMode {
        if let Some(mode) = self
            .upstream_settings(source, upstream)
            .and_then(|s| s.mesh_gateway)
        {
            return mode;
        }
        if let Some(ConfigEntry::ServiceDefaults(d)) =
            self.entries.get(EntryKind::ServiceDefaults, source)
        {
            if let Some(m) = &d.mesh_gateway {
                return m.mode;
            }
        }
        let global = weft_api::config_entry::PROXY_DEFAULTS_NAME;
        match self.entries.get(EntryKind::ProxyDefaults, global) {
            Some(ConfigEntry::ProxyDefaults(p)) => {
                p.mesh_gateway.as_ref().map(|m| m.mode).unwrap_or_default()
            }
            _ => Default::default(),
        }
    }

    /// The `LoadBalancer` of `service`'s resolver, if it has one.
    pub fn load_balancer(&self, service: &str) -> Option<&LoadBalancer> {
        self.entries.resolver(service)?.load_balancer.as_ref()
    }

    /// How long `source`, calling `upstream`, may take to open a connection
    /// to an instance of `service` (which answers for it): that service's
    /// resolver's `ConnectTimeout`, else the caller's `ConnectTimeoutMs` for
    /// the upstream it dialed, else proxy-defaults' `connect_timeout_ms`,
    /// else `default`.
    pub fn connect_timeout(
        &self,
        (source, upstream, service): (&str, &str, &str),
        default: Duration,
    ) -> Duration {
        let ms = self
            .upstream_settings(source, upstream)
            .and_then(|s| s.connect_timeout_ms)
            .or_else(|| self.entries.proxy_defaults()?.config.connect_timeout_ms);
        self.entries
            .resolver(service)
            .and_then(|r| r.connect_timeout())
            .or(ms.map(Duration::from_millis))
            .unwrap_or(default)
    }

    /// The trust bundle as one PEM text.
    pub fn bundle_pem(&self) -> String {
        self.roots_pem.concat()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn the_view_encodes_as_json() {
        let mut view = View::default();
        view.apply(snapshot(3)).unwrap();
        let json = serde_json::to_value(&view).expect("JSON");
        assert_eq!(
            json["instances"].as_array().map(Vec::len),
            Some(2),
            "{json}"
        );
        assert!(json["intentions"].is_array(), "{json}");
    }

    fn instance(
        node: &str,
        id: &str,
        service: &str,
        port: u32,
        health: proto::Health,
    ) -> proto::ServiceInstance {
        proto::ServiceInstance {
            id: id.into(),
            service: service.into(),
            node: node.into(),
            address: "10.0.0.2".into(),
            port,
            health: health as i32,
            ..Default::default()
        }
    }

    fn snapshot(index: u64) -> proto::WatchEvent {
        proto::WatchEvent {
            index,
            event: Some(Event::Snapshot(proto::StateSnapshot {
                nodes: vec![proto::Node {
                    name: "b".into(),
                    address: "10.0.0.2".into(),
                    datacenter: "dc1".into(),
                    ..Default::default()
                }],
                instances: vec![
                    instance("b", "api-1", "api", 8080, proto::Health::Passing),
                    instance("b", "api-2", "api", 8081, proto::Health::Critical),
                ],
                default_allow: false,
                ..Default::default()
            })),
        }
    }

    /// A watch event carrying `changes` at `index`.
    pub(crate) fn changes(index: u64, changes: Vec<P>) -> proto::WatchEvent {
        proto::WatchEvent {
            index,
            event: Some(Event::Changes(proto::ChangeSet {
                changes: changes
                    .into_iter()
                    .map(|c| proto::Change { change: Some(c) })
                    .collect(),
            })),
        }
    }

    #[test]
    fn a_health_change_keeps_the_lookups_and_a_move_refiles_the_instance() {
        let mut v = View::default();
        v.apply(snapshot(3)).unwrap();
        v.prepare();
        let published = v.clone();
        // api-2 passes now: same service, same address, the same index.
        let passing = instance("b", "api-2", "api", 8081, proto::Health::Passing);
        v.apply(changes(4, vec![P::InstanceUpsert(passing)]))
            .unwrap();
        assert!(v.lookups.by_addr.same_as(&published.lookups.by_addr));
        assert!(v.lookups.by_service.same_as(&published.lookups.by_service));
        assert_eq!(v.passing("api").len(), 2);
        // api-2 moves to 9090: filed there, and no longer at 8081.
        let moved = instance("b", "api-2", "api", 9090, proto::Health::Passing);
        v.apply(changes(5, vec![P::InstanceUpsert(moved)])).unwrap();
        assert!(!v.lookups.by_addr.same_as(&published.lookups.by_addr));
        let at = |view: &View, port| {
            let addr = SocketAddr::new("10.0.0.2".parse().unwrap(), port);
            view.local_instance("b", addr).map(|i| i.id.clone())
        };
        assert_eq!(at(&v, 9090).as_deref(), Some("api-2"));
        assert_eq!(at(&v, 8081), None);
        // The copy published before still answers as it did.
        assert_eq!(at(&published, 8081).as_deref(), Some("api-2"));
        assert_eq!(at(&published, 9090), None);
        // Gone: renewed again, and not found.
        let key = proto::InstanceRef {
            node: "b".into(),
            id: "api-2".into(),
        };
        v.apply(changes(6, vec![P::InstanceDelete(key)])).unwrap();
        assert_eq!(at(&v, 9090), None);
        assert_eq!(v.passing("api").len(), 1);
    }

    #[test]
    fn a_snapshot_in_parts_applies_once_the_last_is_in() {
        let mut v = View::default();
        v.apply(snapshot(5)).unwrap();
        let before = v.instances.len();
        assert!(before > 0);
        let whole = match snapshot(9).event {
            Some(Event::Snapshot(s)) => s,
            _ => unreachable!(),
        };
        let mut first = whole.clone();
        first.instances.clear();
        first.more = true;
        first.ca = Some(proto::CaBundle {
            trust_domain: "td".into(),
            roots_pem: Vec::new(),
        });
        let second = proto::StateSnapshot {
            instances: whole.instances.clone(),
            ..Default::default()
        };
        let event = |s: proto::StateSnapshot| proto::WatchEvent {
            index: 9,
            event: Some(Event::Snapshot(s)),
        };
        v.apply(event(first.clone())).unwrap();
        assert!(v.is_partial());
        assert_eq!(v.index, 5, "the view is the old one until the last part");
        assert_eq!(v.instances.len(), before);
        v.apply(event(second.clone())).unwrap();
        assert!(!v.is_partial());
        assert_eq!(v.index, 9);
        assert_eq!(v.instances.len(), whole.instances.len());
        assert_eq!(v.trust_domain, "td");
        // A stream that broke mid-snapshot leaves nothing behind.
        v.apply(event(first)).unwrap();
        v.drop_partial();
        v.apply(event(second)).unwrap();
        assert!(v.trust_domain.is_empty(), "the dropped part was kept");
        assert!(v.nodes.is_empty());
        assert_eq!(v.instances.len(), whole.instances.len());
    }

    #[test]
    fn only_passing_instances_receive_traffic() {
        let mut v = View::default();
        v.apply(snapshot(5)).unwrap();
        let ids: Vec<_> = v.passing("api").iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, vec!["api-1"]);
        v.apply(changes(
            6,
            vec![P::InstanceUpsert(instance(
                "b",
                "api-2",
                "api",
                8081,
                proto::Health::Passing,
            ))],
        ))
        .unwrap();
        assert_eq!(v.passing("api").len(), 2);
        v.apply(changes(
            7,
            vec![P::InstanceUpsert(instance(
                "b",
                "api-1",
                "api",
                8080,
                proto::Health::Warning,
            ))],
        ))
        .unwrap();
        let ids: Vec<_> = v.passing("api").iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, vec!["api-2"]);
        assert_eq!(v.index, 7);
    }

    #[test]
    fn config_entries_turn_routing_on_and_off() {
        let mut v = View::default();
        v.apply(snapshot(5)).unwrap();
        let has_splitter = |v: &View| v.entries.get(EntryKind::ServiceSplitter, "api").is_some();
        assert!(!has_splitter(&v));
        let splitter = proto::ConfigEntry {
            kind: "service-splitter".into(),
            name: "api".into(),
            json: r#"{"Kind":"service-splitter","Name":"api","Splits":[{"Weight":100.0}]}"#.into(),
            ..Default::default()
        };
        v.apply(changes(6, vec![P::ConfigUpsert(splitter)]))
            .unwrap();
        assert!(has_splitter(&v));
        let target = v.route_target("api", &Request::new("GET", "/"), 10.0);
        assert_eq!(target.service, "api");
        let weft_api::routing::Resolved {
            service, instances, ..
        } = v.instances_of(&target, "dc1");
        assert_eq!(service, "api");
        let ids: Vec<_> = instances.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, vec!["api-1"], "passing instances of the service");
        let gone = proto::ConfigRef {
            kind: "service-splitter".into(),
            name: "api".into(),
        };
        v.apply(changes(7, vec![P::ConfigDelete(gone)])).unwrap();
        assert!(!has_splitter(&v));
    }

    #[test]
    fn node_addresses_follow_nodes_joining_moving_and_leaving() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let node = |name: &str, address: &str| proto::Node {
            name: name.into(),
            address: address.into(),
            datacenter: "dc1".into(),
            ..Default::default()
        };
        let mut v = View::default();
        v.apply(snapshot(5)).unwrap();
        assert!(v.knows_node_address(ip("10.0.0.2")));
        assert!(v.knows_node_address(ip("::ffff:10.0.0.2")));
        assert!(!v.knows_node_address(ip("10.0.0.3")));
        // c joins at b's address, then b moves: the address stays known
        // while one node is there.
        v.apply(changes(6, vec![P::NodeUpsert(node("c", "10.0.0.2"))]))
            .unwrap();
        v.apply(changes(7, vec![P::NodeUpsert(node("b", "10.0.0.3"))]))
            .unwrap();
        assert!(v.knows_node_address(ip("10.0.0.2")));
        assert!(v.knows_node_address(ip("10.0.0.3")));
        v.apply(changes(8, vec![P::NodeDelete("c".into())]))
            .unwrap();
        assert!(!v.knows_node_address(ip("10.0.0.2")));
        v.apply(changes(9, vec![P::NodeDelete("b".into())]))
            .unwrap();
        assert!(!v.knows_node_address(ip("10.0.0.3")));
    }

    #[test]
    fn deleting_a_node_drops_its_instances() {
        let mut v = View::default();
        v.apply(snapshot(5)).unwrap();
        v.apply(changes(6, vec![P::NodeDelete("b".into())]))
            .unwrap();
        assert!(v.passing("api").is_empty());
    }

    #[test]
    fn intentions_and_the_default_decide() {
        let mut v = View::default();
        v.apply(snapshot(1)).unwrap();
        assert!(
            !v.decide(Caller::new("web", "dc1"), "api", None).allowed,
            "default deny"
        );
        let allow = proto::Intention {
            source: "web".into(),
            destination: "api".into(),
            action: "allow".into(),
            ..Default::default()
        };
        v.apply(changes(2, vec![P::IntentionUpsert(allow)]))
            .unwrap();
        assert!(v.decide(Caller::new("web", "dc1"), "api", None).allowed);
        v.apply(changes(
            3,
            vec![P::IntentionDelete(proto::IntentionRef {
                source: "web".into(),
                destination: "api".into(),
            })],
        ))
        .unwrap();
        assert!(!v.decide(Caller::new("web", "dc1"), "api", None).allowed);
    }

    #[test]
    fn a_destination_address_names_its_service() {
        let mut v = View::default();
        v.apply(snapshot(1)).unwrap();
        v.apply(changes(
            2,
            vec![P::VipAssigned(proto::ServiceVip {
                service: "api".into(),
                vip: "240.0.0.7".into(),
            })],
        ))
        .unwrap();
        assert_eq!(
            v.service_at("240.0.0.7:80".parse().unwrap(), "a"),
            Some("api")
        );
        assert_eq!(
            v.service_at("240.0.0.7:9999".parse().unwrap(), "a"),
            Some("api"),
            "a VIP takes any port"
        );
        assert_eq!(
            v.service_at("10.0.0.2:8081".parse().unwrap(), "a"),
            Some("api")
        );
        assert_eq!(v.service_at("10.0.0.2:1".parse().unwrap(), "a"), None);
        assert_eq!(v.service_at("240.0.0.8:80".parse().unwrap(), "a"), None);

        // Given back: the address names no service any more.
        v.apply(changes(
            3,
            vec![P::VipReleased(proto::ServiceVip {
                service: "api".into(),
                vip: "240.0.0.7".into(),
            })],
        ))
        .unwrap();
        assert_eq!(v.service_at("240.0.0.7:80".parse().unwrap(), "a"), None);
        assert!(!v.vips.contains_key("api"));
    }

    #[test]
    fn local_instance_is_found_by_address() {
        let mut v = View::default();
        v.apply(snapshot(1)).unwrap();
        let i = v
            .local_instance("b", "10.0.0.2:8080".parse().unwrap())
            .unwrap();
        assert_eq!(i.id, "api-1");
        assert!(v
            .local_instance("a", "10.0.0.2:8080".parse().unwrap())
            .is_none());
        assert!(v
            .local_instance("b", "10.0.0.2:9999".parse().unwrap())
            .is_none());
    }

    /// Instances by service, by address, intentions by destination: the
    /// ids or names each lookup gives, in its order.
    type Answers = (Vec<Vec<String>>, Vec<Vec<String>>, Vec<Vec<String>>);

    /// What the lookups must answer, found by scanning the whole view.
    fn scanned(v: &View) -> Answers {
        let services = ["s0", "s1", "s2"];
        let by_service = services
            .iter()
            .map(|s| {
                let all = v.instances.values().filter(|i| i.service == *s);
                all.map(|i| i.id.clone()).collect()
            })
            .collect();
        let by_addr = (0..3)
            .map(|p| {
                let addr = SocketAddr::new("10.0.0.2".parse().unwrap(), 8000 + p);
                let all = v
                    .instances
                    .values()
                    .filter(|i| i.socket_addr() == Some(addr));
                all.map(|i| i.id.clone()).collect()
            })
            .collect();
        let to = ["s0", "s1", "*"]
            .iter()
            .map(|d| {
                let all = v
                    .intentions
                    .values()
                    .filter(|i| i.destination == *d || (*d != "*" && i.destination == "*"));
                let mut all: Vec<String> = all
                    .map(|i| i.source.clone() + ">" + &i.destination)
                    .collect();
                all.sort();
                all
            })
            .collect();
        (by_service, by_addr, to)
    }

    /// What the lookups answer.
    fn looked_up(v: &View) -> Answers {
        let by_service = ["s0", "s1", "s2"]
            .iter()
            .map(|s| {
                v.instances_of_service(s)
                    .iter()
                    .map(|i| i.id.clone())
                    .collect()
            })
            .collect();
        let by_addr = (0..3)
            .map(|p| {
                let addr = SocketAddr::new("10.0.0.2".parse().unwrap(), 8000 + p);
                v.instances_at(addr).map(|i| i.id.clone()).collect()
            })
            .collect();
        let to = ["s0", "s1", "*"]
            .iter()
            .map(|d| {
                let all = v
                    .intentions_to(d)
                    .map(|i| i.source.clone() + ">" + &i.destination);
                let mut all: Vec<String> = all.collect();
                all.sort();
                all
            })
            .collect();
        (by_service, by_addr, to)
    }

    #[test]
    fn the_lookups_filed_change_by_change_answer_as_a_scan_does() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let mut v = View::default();
        v.apply(snapshot(1)).unwrap();
        let mut published: Vec<(View, _)> = Vec::new();
        for index in 2..3000u64 {
            let node = ["a", "b", "c"][rng.random_range(0..3)];
            // Ids are unique per node here, so ids name instances.
            let id = format!("{node}-{}", rng.random_range(0..6));
            let service = ["s0", "s1", "s2"][rng.random_range(0..3)];
            let party = |rng: &mut rand::rngs::StdRng| ["s0", "s1", "*"][rng.random_range(0..3)];
            let change = match rng.random_range(0..10) {
                0..=4 => P::InstanceUpsert(instance(
                    node,
                    &id,
                    service,
                    8000 + rng.random_range(0..3),
                    proto::Health::Passing,
                )),
                5 | 6 => P::InstanceDelete(proto::InstanceRef {
                    node: node.into(),
                    id,
                }),
                7 => P::NodeDelete(node.into()),
                8 => P::IntentionUpsert(proto::Intention {
                    source: party(&mut rng).into(),
                    destination: party(&mut rng).into(),
                    action: "allow".into(),
                    ..Default::default()
                }),
                _ => P::IntentionDelete(proto::IntentionRef {
                    source: party(&mut rng).into(),
                    destination: party(&mut rng).into(),
                }),
            };
            v.apply(changes(index, vec![change])).unwrap();
            assert_eq!(looked_up(&v), scanned(&v), "after change {index}");
            if index % 100 == 0 {
                published.push((v.clone(), looked_up(&v)));
            }
        }
        // Copies published along the way still answer as they did.
        for (copy, answers) in &published {
            assert_eq!(&looked_up(copy), answers);
            assert_eq!(&scanned(copy), answers);
        }
    }

    #[test]
    fn an_instance_twice_in_a_snapshot_is_filed_as_the_last_one() {
        let mut event = snapshot(3);
        if let Some(Event::Snapshot(s)) = &mut event.event {
            s.instances
                .push(instance("b", "api-1", "db", 9000, proto::Health::Passing));
        }
        let mut v = View::default();
        v.apply(event).unwrap();
        let ids = |list: Vec<&ServiceInstance>| -> Vec<String> {
            list.iter().map(|i| i.id.clone()).collect()
        };
        assert_eq!(ids(v.instances_of_service("api")), ["api-2"]);
        assert_eq!(ids(v.instances_of_service("db")), ["api-1"]);
        let at = |port| SocketAddr::new("10.0.0.2".parse().unwrap(), port);
        assert!(v.local_instance("b", at(8080)).is_none());
        assert_eq!(
            v.local_instance("b", at(9000)).map(|i| i.service.as_str()),
            Some("db")
        );
    }

    #[test]
    fn a_bad_event_is_an_error_and_changes_nothing_after_it() {
        let mut v = View::default();
        assert_eq!(
            v.apply(proto::WatchEvent {
                index: 3,
                event: None
            }),
            Err(ViewError::Empty { index: 3 })
        );
        let bad = changes(
            4,
            vec![P::VipAssigned(proto::ServiceVip {
                service: "x".into(),
                vip: "nope".into(),
            })],
        );
        assert!(v.apply(bad).is_err());
    }

    #[test]
    fn the_mesh_gateway_mode_is_the_upstreams_then_the_services_then_the_meshs() {
        use weft_api::config_entry::MeshGatewayMode::{Local, Remote};
        let entry = |kind: &str, name: &str, json: &str| {
            P::ConfigUpsert(proto::ConfigEntry {
                kind: kind.into(),
                name: name.into(),
                json: json.into(),
                ..Default::default()
            })
        };
        let mut v = View::default();
        assert_eq!(v.mesh_gateway_mode("web", "api"), Local, "the default");
        v.apply(changes(
            1,
            vec![entry(
                "proxy-defaults",
                "global",
                r#"{"Kind":"proxy-defaults","Name":"global","MeshGateway":{"Mode":"remote"}}"#,
            )],
        ))
        .unwrap();
        assert_eq!(v.mesh_gateway_mode("web", "api"), Remote, "the mesh's");
        v.apply(changes(
            2,
            vec![entry(
                "service-defaults",
                "web",
                r#"{"Kind":"service-defaults","Name":"web","MeshGateway":{"Mode":"local"},
                   "UpstreamConfig":{"Overrides":[{"Name":"db","MeshGateway":{"Mode":"remote"}}]}}"#,
            )],
        ))
        .unwrap();
        assert_eq!(v.mesh_gateway_mode("web", "api"), Local, "the service's");
        assert_eq!(v.mesh_gateway_mode("web", "db"), Remote, "the upstream's");
        assert_eq!(v.mesh_gateway_mode("other", "api"), Remote, "the mesh's");
    }
}
