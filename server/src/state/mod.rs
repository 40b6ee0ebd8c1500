//! The replicated state of a weft cluster and the commands that change it.
//!
//! `State` is what every server holds after applying the Raft log: nodes,
//! service instances with health, one virtual IP per service, intentions,
//! config entries and KV. `State::apply` is deterministic and pure (no I/O,
//! no clock): every server computes the same result from the same log. A
//! command is checked completely before anything changes, so a refused
//! command leaves the state as it was.

mod apply;
mod endpoints;
mod kv_total;
mod locks;
pub mod sessions;
mod standing;
mod vips;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use weft_api::federation::FederationState;

use serde::{Deserialize, Serialize};
use weft_api::catalog::{HealthStatus, Node, ServiceInstance};
pub use weft_api::config_entry::StoredEntry;
use weft_api::config_entry::{
    protocol_of, ConfigEntry, EntryContext, Protocol, ServiceResolver, PROXY_DEFAULTS_NAME,
};
use weft_api::intention::Intention;
use weft_api::kv::KvEntry;
use weft_api::session::Session;

use crate::acl::{AclPolicy, AclState, AclToken};
use crate::ca::{CaRoot, CaState};

pub use apply::{ApplyError, CAS_MISMATCH};
pub use locks::LOCK_REFUSED;
pub use standing::{Standing, STANDING_CHANGED};
pub use vips::{ReleasedVip, ReleasedVips, MAX_RELEASED_VIPS, MAX_RELEASE_BATCH};

/// The registration of an agent's node `name` in dc1 at 10.0.0.1, for the
/// state's tests.
#[cfg(test)]
fn register_node(name: &str) -> Command {
    Command::RegisterNode(Node {
        name: name.into(),
        address: "10.0.0.1".into(),
        datacenter: "dc1".into(),
        ..Default::default()
    })
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Index of the last applied command: the Raft entry's index, or past
    /// it once batches have given each of their commands an index.
    pub index: u64,
    /// How far `index` runs ahead of the last applied Raft entry's index,
    /// so that a server loading this state from a snapshot goes on with the
    /// same indexes as its peers. States of earlier versions have none (0).
    #[serde(default)]
    pub index_ahead: u64,
    /// The virtual-IP range services get their address from.
    pub vip_cidr: Option<String>,
    pub nodes: BTreeMap<String, Node>,
    /// node name -> instance id -> instance
    pub instances: BTreeMap<String, BTreeMap<String, ServiceInstance>>,
    /// service name (or `service.dc`) -> virtual IP, while something holds
    /// it (see `vips.rs`).
    pub vips: BTreeMap<String, Ipv4Addr>,
    /// source -> destination -> intention
    pub intentions: BTreeMap<String, BTreeMap<String, Intention>>,
    /// kind -> name -> entry
    pub config: BTreeMap<String, BTreeMap<String, StoredEntry>>,
    pub kv: BTreeMap<String, KvEntry>,
    /// The certificate authority, once the leader has created it.
    #[serde(default)]
    pub ca: Option<CaState>,
    /// ACL policies and tokens (secrets only as hashes).
    #[serde(default)]
    pub acl: AclState,
    /// Results of recent client requests, for exactly-once writes.
    #[serde(default)]
    pub sessions: sessions::Sessions,
    /// Consul's sessions (what KV locks belong to), by id.
    #[serde(default)]
    pub lock_sessions: BTreeMap<String, Session>,
    /// Keys no session may lock before these unix milliseconds: the lock
    /// delay after the session holding them was invalidated.
    #[serde(default)]
    pub lock_delays: BTreeMap<String, i64>,
    /// The federation's datacenters and their gateways (this one's too).
    #[serde(default)]
    pub federation: BTreeMap<String, FederationState>,
    /// Other datacenters' instances, as the leader last fetched them.
    #[serde(default)]
    pub remote: BTreeMap<String, Vec<ServiceInstance>>,
    /// Virtual IPs given back, kept for the services that had them.
    #[serde(default)]
    pub released_vips: ReleasedVips,
    /// Where the next new virtual IP is looked for: past the last one
    /// given (None: from the block's first address).
    #[serde(default)]
    pub vip_next: Option<Ipv4Addr>,
    /// Which instances hold each address:port: derived from `instances`,
    /// never stored, built on first use.
    #[serde(skip)]
    pub endpoints: endpoints::Endpoints,
    /// Total bytes of KV values: derived from `kv`, never stored.
    #[serde(skip)]
    pub kv_total: kv_total::KvTotal,
}

/// A change to the state, as written through Raft.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    RegisterNode(Node),
    DeregisterNode {
        name: String,
        /// When (unix ms, the proposer's clock): starts the lock delay of
        /// the node's sessions' keys.
        #[serde(default)]
        now_ms: i64,
    },
    RegisterService(ServiceInstance),
    DeregisterService {
        node: String,
        id: String,
    },
    UpdateHealth {
        node: String,
        id: String,
        health: HealthStatus,
        output: String,
    },
    /// The node-level check, written by the leader's liveness monitor.
    SetNodeHealth {
        node: String,
        health: HealthStatus,
        output: String,
        /// When (unix ms): a critical node's sessions are invalidated and
        /// their keys' lock delay starts here.
        #[serde(default)]
        now_ms: i64,
    },
    UpsertIntention(Intention),
    DeleteIntention {
        source: String,
        destination: String,
    },
    WriteConfig(ConfigEntry),
    DeleteConfig {
        kind: String,
        name: String,
    },
    KvPut {
        key: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// Write only if the key's modify index is this; 0: only if absent.
        cas: Option<u64>,
        #[serde(default)]
        flags: u64,
        /// Take or give back the key's lock with this write.
        #[serde(default)]
        lock: Option<KvLock>,
    },
    KvDelete {
        key: String,
        cas: Option<u64>,
    },
    /// Every intention of `destination` replaced by `intentions` (a
    /// `service-intentions` entry written; none: deleted).
    ReplaceIntentions {
        destination: String,
        intentions: Vec<Intention>,
    },
    /// A new session (its id chosen by the proposer).
    SessionCreate(Session),
    /// A client destroys a session: its locks are released or its keys
    /// deleted, as its behavior says.
    SessionDestroy {
        id: String,
        now_ms: i64,
    },
    /// The leader invalidates a TTL session not renewed in time; refused
    /// when a renewal came first (it is not expired at `now_ms`).
    SessionExpire {
        id: String,
        now_ms: i64,
    },
    /// Restarts a TTL session's clock.
    SessionRenew {
        id: String,
        now_ms: i64,
    },
    /// Replace the whole state (snapshot restore). The running CA is kept
    /// (snapshots never carry CA keys), and so are the running ACLs when
    /// the snapshot's were never bootstrapped.
    Restore(Box<State>),
    /// Create the CA (refused if there is one).
    CaInit(CaState),
    /// A secondary datacenter's intentions and config entries replaced by
    /// the primary's (replication).
    ReplacePolicy {
        intentions: Vec<Intention>,
        entries: Vec<ConfigEntry>,
    },
    /// A secondary's copy of the primary's ACL policies and tokens
    /// replaced (its own are kept).
    ReplicateAcl {
        policies: Vec<crate::acl::AclPolicy>,
        tokens: Vec<crate::acl::AclToken>,
    },
    /// A secondary datacenter's CA: the primary's roots and this
    /// datacenter's intermediate, replacing what it had.
    CaFederate(CaState),
    /// Make `root` (cross-signed by the active root) the active root.
    CaRotate {
        root: CaRoot,
        now: i64,
    },
    /// Drop roots whose last leaf has expired by `now`.
    CaPrune {
        now: i64,
    },
    /// Leaves signed from now on live `secs` (the leader's `--leaf-ttl`).
    CaLeafTtl {
        secs: u64,
    },
    /// The first management token (refused once bootstrapped).
    AclBootstrap(AclToken),
    AclPolicyUpsert(AclPolicy),
    AclPolicyDelete {
        id: String,
    },
    AclTokenUpsert(AclToken),
    AclTokenDelete {
        accessor: String,
    },
    /// `cmd` as request `request` of `client` (a token accessor): applied
    /// once; a retry gets the first application's result.
    Once {
        client: String,
        request: String,
        cmd: Box<Command>,
        /// What the server that received the request judged it on: `cmd`
        /// is applied only while that still holds (see `standing`). Entries
        /// of earlier versions have none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        standing: Option<Standing>,
    },
    /// A datacenter's gateways, from its leader (this datacenter's) or
    /// from the primary (others').
    SetFederationState(FederationState),
    /// Another datacenter's instances, replacing what was known of them.
    SetRemoteInstances {
        datacenter: String,
        instances: Vec<ServiceInstance>,
    },
    /// Commands written together as one Raft entry (the leader groups
    /// concurrent writes): each applied in order, with an index of its own,
    /// as if each were its own entry.
    Batch(Vec<Command>),
    /// Every key that starts with `prefix` deleted (Consul's recursive
    /// delete); none there is no error.
    KvDeleteTree {
        prefix: String,
    },
    /// An external node (no agent runs it) and, optionally, one of its
    /// instances, in one write: refused when an agent's node has the name.
    RegisterExternal {
        node: Node,
        instance: Option<ServiceInstance>,
    },
    /// These keys' virtual IPs given back, those that nothing holds when
    /// it is applied (the leader's `crate::vip_release` writes it).
    ReleaseVips {
        keys: Vec<String>,
    },
}

/// A lock taken or given back with a KV write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvLock {
    /// Consul's `?acquire=SESSION`; `now_ms` checks the key's lock delay.
    Acquire { session: String, now_ms: i64 },
    /// Consul's `?release=SESSION`.
    Release { session: String },
}

/// What applying a command gave: its index, or why it was refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CommandResult {
    Applied {
        index: u64,
    },
    Refused {
        reason: String,
    },
    /// The result of each command of a `Command::Batch`, in order.
    Batch(Vec<CommandResult>),
}

/// One observable change, for watchers.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    NodeUpsert(Node),
    NodeDelete(String),
    InstanceUpsert(ServiceInstance),
    InstanceDelete {
        node: String,
        id: String,
        /// The deleted instance's service (for who may see the deletion).
        service: String,
    },
    VipAssigned {
        service: String,
        vip: Ipv4Addr,
    },
    /// A virtual IP given back (`service` as in `VipAssigned`).
    VipReleased {
        service: String,
        vip: Ipv4Addr,
    },
    IntentionUpsert(Intention),
    IntentionDelete {
        source: String,
        destination: String,
    },
    ConfigUpsert(StoredEntry),
    ConfigDelete {
        kind: String,
        name: String,
    },
    KvUpsert(KvEntry),
    KvDelete(String),
    /// The trust bundle changed.
    CaBundle {
        trust_domain: String,
        roots_pem: Vec<String>,
    },
    /// A datacenter's gateways changed.
    Federation(FederationState),
    /// Another datacenter's instances changed (all of them, replaced).
    Remote {
        datacenter: String,
        instances: Vec<ServiceInstance>,
    },
    /// ACL policies or tokens changed: a watcher re-checks its token and
    /// what it may see.
    Acl,
    /// The whole state was replaced; watchers need a new snapshot.
    Replaced,
}

impl Command {
    /// Whether this writes intentions or config entries: the primary
    /// datacenter's to write, which secondaries replicate.
    pub fn is_policy(&self) -> bool {
        matches!(
            self,
            Command::UpsertIntention(_)
                | Command::DeleteIntention { .. }
                | Command::ReplaceIntentions { .. }
                | Command::WriteConfig(_)
                | Command::DeleteConfig { .. }
        )
    }
}

impl State {
    /// The mesh CA's roots (DER), for verifying agents' node certificates;
    /// empty before the CA exists.
    pub fn ca_roots_der(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        use rustls::pki_types::pem::PemObject;
        self.ca
            .iter()
            .flat_map(|ca| ca.roots.iter())
            .filter_map(|r| {
                rustls::pki_types::CertificateDer::from_pem_slice(r.cert_pem.as_bytes()).ok()
            })
            .collect()
    }

    /// All intentions, in no particular order.
    pub fn all_intentions(&self) -> impl Iterator<Item = &Intention> {
        self.intentions.values().flat_map(|m| m.values())
    }

    /// All instances of `service`, on every node.
    pub fn instances_of<'a>(
        &'a self,
        service: &'a str,
    ) -> impl Iterator<Item = &'a ServiceInstance> {
        self.instances
            .values()
            .flat_map(|m| m.values())
            .filter(move |i| i.service == service)
    }

    /// Every service name with an instance or a virtual IP.
    pub fn service_names(&self) -> std::collections::BTreeSet<String> {
        let mut names: std::collections::BTreeSet<String> = self
            .vips
            .keys()
            .filter(|n| weft_api::vip::split_key(n).1.is_none())
            .cloned()
            .collect();
        names.extend(
            self.instances
                .values()
                .flat_map(|m| m.values())
                .map(|i| i.service.clone()),
        );
        names
    }
}

impl State {
    /// Checks a whole state document (a snapshot to restore) object by
    /// object, so that a bad file is refused before anything changes.
    pub fn check(&self) -> Result<(), String> {
        for (name, node) in &self.nodes {
            weft_api::catalog::validate_node(node).map_err(|e| format!("nodes.{name}: {e}"))?;
        }
        for (node, instances) in &self.instances {
            if !self.nodes.contains_key(node) {
                return Err(format!("instances.{node}: node {node:?} is not in nodes"));
            }
            for (id, i) in instances {
                weft_api::catalog::validate_service_instance(i)
                    .map_err(|e| format!("instances.{node}.{id}: {e}"))?;
            }
        }
        for (source, by_destination) in &self.intentions {
            for (destination, i) in by_destination {
                if i.source != *source || i.destination != *destination {
                    return Err(format!(
                        "intentions.{source}.{destination}: filed under another pair than its own ({} => {})",
                        i.source, i.destination
                    ));
                }
                weft_api::intention::validate_intention(i)
                    .map_err(|e| format!("intentions.{source}.{destination}: {e}"))?;
                weft_api::config_entry::validate_intention_protocol(i, self)
                    .map_err(|e| format!("intentions.{source}.{destination}: {e}"))?;
            }
        }
        for (kind, entries) in &self.config {
            for (name, e) in entries {
                if e.entry.kind().as_str() != kind || e.entry.name() != name {
                    return Err(format!(
                        "config.{kind}.{name}: filed under another kind or name than its own"
                    ));
                }
                weft_api::config_entry::validate_entry(&e.entry, self)
                    .map_err(|e| format!("config.{kind}.{name}: {e}"))?;
            }
        }
        if self.lock_sessions.len() > weft_api::session::MAX_SESSIONS {
            return Err("lock_sessions: more than the cluster's limit".into());
        }
        let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
        for (id, s) in &self.lock_sessions {
            if s.id != *id || !self.nodes.contains_key(&s.node) {
                return Err(format!(
                    "lock_sessions.{id}: not filed under its id, or node {:?} is not in nodes",
                    s.node
                ));
            }
            weft_api::session::validate_stored(s)
                .map_err(|e| format!("lock_sessions.{id}: {e}"))?;
            let count = per_node.entry(&s.node).or_default();
            *count += 1;
            if *count > weft_api::session::MAX_SESSIONS_PER_NODE {
                return Err(format!(
                    "lock_sessions: more than the limit on node {:?}",
                    s.node
                ));
            }
        }
        if self.lock_delays.len() > locks::MAX_LOCK_DELAYS {
            return Err("lock_delays: more than the limit".into());
        }
        for key in self.lock_delays.keys() {
            weft_api::kv::validate_key(key).map_err(|e| format!("lock_delays: {e}"))?;
        }
        for (key, e) in &self.kv {
            weft_api::kv::validate_key(key).map_err(|e| format!("kv: {e}"))?;
            if e.value.len() > weft_api::kv::MAX_VALUE_BYTES {
                return Err(format!("kv.{key}: value too large"));
            }
            if let Some(s) = e
                .session
                .as_ref()
                .filter(|s| !self.lock_sessions.contains_key(*s))
            {
                return Err(format!(
                    "kv.{key}: held by session {s:?}, which is not in lock_sessions"
                ));
            }
        }
        Ok(())
    }
}

impl EntryContext for State {
    fn protocol(&self, service: &str) -> Protocol {
        let entry = |kind: &str, name: &str| {
            self.config
                .get(kind)
                .and_then(|m| m.get(name))
                .map(|e| &e.entry)
        };
        let defaults = match entry("service-defaults", service) {
            Some(ConfigEntry::ServiceDefaults(d)) => Some(d),
            _ => None,
        };
        let proxy = match entry("proxy-defaults", PROXY_DEFAULTS_NAME) {
            Some(ConfigEntry::ProxyDefaults(p)) => Some(p),
            _ => None,
        };
        protocol_of(defaults, proxy)
    }

    fn resolver(&self, service: &str) -> Option<&ServiceResolver> {
        match self
            .config
            .get("service-resolver")
            .and_then(|m| m.get(service))
            .map(|e| &e.entry)
        {
            Some(ConfigEntry::ServiceResolver(r)) => Some(r),
            _ => None,
        }
    }
}
