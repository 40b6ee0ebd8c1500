//! `State::apply`: the deterministic effect of each command.
use std::collections::BTreeSet;

use weft_api::catalog::{
    validate_node, validate_service_instance, HealthStatus, Node, ServiceInstance,
};
use weft_api::catalog_register::{is_external, EXTERNAL_NODE_META};
use weft_api::config_entry::{validate_entry, validate_intention_protocol, ConfigEntry};
use weft_api::intention::{validate_intention, Intention};
use weft_api::kv::{validate_key, KvEntry, MAX_VALUE_BYTES};

use super::{Change, Command, CommandResult, State, StoredEntry, STANDING_CHANGED};

/// Why a command was refused. The state is unchanged.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ApplyError {
    #[error("{0}")]
    Invalid(String),
    #[error("node {0:?} is not registered")]
    UnknownNode(String),
    #[error("service instance {id:?} is not registered on node {node:?}")]
    UnknownInstance { node: String, id: String },
    // Starts with CAS_MISMATCH: the HTTP API answers `false` for it.
    #[error("check-and-set failed for {key:?}: index is {actual}, not {expected}")]
    CasMismatch {
        key: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("no free virtual IP: {0}")]
    VipExhausted(String),
}

/// How a check-and-set mismatch's message starts.
pub const CAS_MISMATCH: &str = "check-and-set failed";

/// At most this many instances on one node.
pub const MAX_INSTANCES_PER_NODE: usize = 1024;
/// At most this many external nodes (registered through the catalog API).
pub const MAX_EXTERNAL_NODES: usize = 4096;

fn invalid(e: impl std::fmt::Display) -> ApplyError {
    ApplyError::Invalid(e.to_string())
}

/// The changes each applied command made, by the command's index.
pub type Published = Vec<(u64, Vec<Change>)>;

impl State {
    /// The index of the next command applied from the Raft entry at
    /// `log_index`. It is the entry's index unless a batch before it used
    /// that one already: indexes only grow, one per command, and every
    /// server gives the same ones (they follow from the log alone).
    pub fn next_index(&self, log_index: u64) -> u64 {
        (self.index + 1).max(log_index)
    }

    /// Applies the Raft entry at `log_index`: one command, or each command
    /// of a batch with an index of its own. Returns the result for the
    /// client and, by index, the changes for watchers.
    pub fn apply_entry(&mut self, cmd: Command, log_index: u64) -> (CommandResult, Published) {
        let mut published = Vec::new();
        let mut apply_one = |state: &mut State, cmd: Command| {
            let index = state.next_index(log_index);
            let (result, changes) = state.apply(cmd, index);
            published.push((index, changes));
            result
        };
        let result = match cmd {
            Command::Batch(cmds) => {
                CommandResult::Batch(cmds.into_iter().map(|c| apply_one(self, c)).collect())
            }
            cmd => apply_one(self, cmd),
        };
        (result, published)
    }

    /// Applies `cmd` as Raft entry `index`. Returns the result for the client
    /// and the changes for watchers (none when refused).
    pub fn apply(&mut self, cmd: Command, index: u64) -> (CommandResult, Vec<Change>) {
        self.index = index;
        if let Command::Once {
            client,
            request,
            cmd,
            standing,
        } = cmd
        {
            if let Some(first) = self.sessions.result(&client, &request) {
                return (first.clone(), Vec::new());
            }
            // Not recorded as the request's result: sent again, it is
            // judged anew and may be applied.
            if standing.is_some_and(|s| !self.still_stands(&s)) {
                let reason = STANDING_CHANGED.to_string();
                return (CommandResult::Refused { reason }, Vec::new());
            }
            let (result, changes) = match *cmd {
                Command::Once { .. } => (
                    CommandResult::Refused {
                        reason: "a request inside a request".into(),
                    },
                    Vec::new(),
                ),
                cmd => self.apply(cmd, index),
            };
            self.sessions
                .record(&client, &request, result.clone(), index);
            return (result, changes);
        }
        match self.try_apply(cmd, index) {
            Ok(changes) => (CommandResult::Applied { index }, changes),
            Err(e) => (
                CommandResult::Refused {
                    reason: e.to_string(),
                },
                Vec::new(),
            ),
        }
    }

    fn try_apply(&mut self, cmd: Command, index: u64) -> Result<Vec<Change>, ApplyError> {
        match cmd {
            // Taken apart by `apply`.
            Command::Once { .. } => Err(invalid("a request inside a request")),
            // Taken apart by `apply_entry`, once.
            Command::Batch(_) => Err(invalid("a batch inside a batch or a request")),
            Command::RegisterNode(mut node) => {
                validate_node(&node).map_err(invalid)?;
                if node.meta.contains_key(EXTERNAL_NODE_META) {
                    return Err(invalid(format!(
                        "meta: {EXTERNAL_NODE_META:?} is set by weft for nodes registered through \
                         /v1/catalog/register"
                    )));
                }
                node.create_index = self.nodes.get(&node.name).map_or(index, |n| n.create_index);
                node.modify_index = index;
                // The node's agent is registering it: it is alive. Only the
                // servers set the node-level check.
                node.health = HealthStatus::Passing;
                node.health_output = String::new();
                self.nodes.insert(node.name.clone(), node.clone());
                Ok(vec![Change::NodeUpsert(node)])
            }
            Command::DeregisterNode { name, now_ms } => {
                if self.nodes.remove(&name).is_none() {
                    return Err(ApplyError::UnknownNode(name));
                }
                // A node that leaves takes all its sessions with it.
                let mut changes = self.invalidate_node_sessions(&name, false, now_ms, index);
                changes.extend(
                    self.instances
                        .remove(&name)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(id, instance)| {
                            self.endpoints.remove(&instance);
                            Change::InstanceDelete {
                                node: name.clone(),
                                id,
                                service: instance.service,
                            }
                        })
                        .collect::<Vec<Change>>(),
                );
                changes.push(Change::NodeDelete(name));
                Ok(changes)
            }
            Command::RegisterService(instance) => self.register_service(instance, index),
            Command::DeregisterService { node, id } => {
                let removed = self.instances.get_mut(&node).and_then(|m| m.remove(&id));
                let Some(removed) = removed else {
                    return Err(ApplyError::UnknownInstance { node, id });
                };
                self.endpoints.remove(&removed);
                Ok(vec![Change::InstanceDelete {
                    node,
                    id,
                    service: removed.service,
                }])
            }
            Command::UpdateHealth {
                node,
                id,
                health,
                output,
            } => {
                let Some(instance) = self.instances.get_mut(&node).and_then(|m| m.get_mut(&id))
                else {
                    return Err(ApplyError::UnknownInstance { node, id });
                };
                instance.health = health;
                instance.check_output =
                    weft_api::catalog::truncate_check_output(&output).to_string();
                instance.modify_index = index;
                Ok(vec![Change::InstanceUpsert(instance.clone())])
            }
            Command::SetNodeHealth {
                node,
                health,
                output,
                now_ms,
            } => {
                let Some(n) = self.nodes.get_mut(&node) else {
                    return Err(ApplyError::UnknownNode(node));
                };
                n.health = health;
                n.health_output = weft_api::catalog::truncate_check_output(&output).to_string();
                n.modify_index = index;
                let mut changes = vec![Change::NodeUpsert(n.clone())];
                if health == HealthStatus::Critical {
                    changes.extend(self.invalidate_node_sessions(&node, true, now_ms, index));
                }
                Ok(changes)
            }
            Command::UpsertIntention(intention) => {
                validate_intention(&intention).map_err(invalid)?;
                validate_intention_protocol(&intention, &*self).map_err(invalid)?;
                Ok(vec![self.upsert_intention(intention, index)])
            }
            Command::DeleteIntention {
                source,
                destination,
            } => match self.delete_intention(&source, &destination) {
                Some(change) => Ok(vec![change]),
                None => Err(ApplyError::NotFound {
                    what: format!("intention {source} => {destination}"),
                }),
            },
            Command::ReplaceIntentions {
                destination,
                intentions,
            } => self.replace_intentions(destination, intentions, index),
            Command::WriteConfig(entry) => {
                validate_entry(&entry, &*self).map_err(invalid)?;
                let (kind, name) = (entry.kind().as_str().to_string(), entry.name().to_string());
                let by_name = self.config.entry(kind).or_default();
                let create_index = by_name.get(&name).map_or(index, |e| e.create_index);
                let stored = StoredEntry {
                    entry,
                    create_index,
                    modify_index: index,
                };
                by_name.insert(name, stored.clone());
                Ok(vec![Change::ConfigUpsert(stored)])
            }
            Command::DeleteConfig { kind, name } => {
                let removed = self.config.get_mut(&kind).and_then(|m| m.remove(&name));
                if removed.is_none() {
                    return Err(ApplyError::NotFound {
                        what: format!("config entry {kind}/{name}"),
                    });
                }
                Ok(vec![Change::ConfigDelete { kind, name }])
            }
            Command::KvPut {
                key,
                value,
                cas,
                flags,
                lock,
            } => {
                validate_key(&key).map_err(invalid)?;
                if value.len() > MAX_VALUE_BYTES {
                    return Err(ApplyError::Invalid(format!(
                        "value of {key:?} is {} bytes, more than the limit of {MAX_VALUE_BYTES}",
                        value.len()
                    )));
                }
                let existing = self.kv.get(&key);
                check_cas(&key, cas, existing.map(|e| e.modify_index))?;
                let (lock_index, session) = self.lock_after_put(&key, existing, lock.as_ref())?;
                if matches!(lock, Some(super::KvLock::Acquire { .. })) {
                    // Taken: its delay, if any, is over.
                    self.lock_delays.remove(&key);
                }
                let entry = KvEntry {
                    key: key.clone(),
                    value,
                    create_index: existing.map_or(index, |e| e.create_index),
                    modify_index: index,
                    flags,
                    lock_index,
                    session,
                };
                let old = existing.map_or(0, |e| e.value.len() as u64);
                self.kv_total.replace(old, entry.value.len() as u64);
                self.kv.insert(key, entry.clone());
                Ok(vec![Change::KvUpsert(entry)])
            }
            Command::KvDelete { key, cas } => {
                let Some(existing) = self.kv.get(&key) else {
                    return Err(ApplyError::NotFound {
                        what: format!("key {key:?}"),
                    });
                };
                check_cas(&key, cas, Some(existing.modify_index))?;
                self.kv_total.replace(existing.value.len() as u64, 0);
                self.kv.remove(&key);
                Ok(vec![Change::KvDelete(key)])
            }
            Command::RegisterExternal { node, instance } => {
                self.register_external(node, instance, index)
            }
            Command::KvDeleteTree { prefix } => {
                let keys: Vec<String> = self
                    .kv
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(prefix.as_str()))
                    .map(|(k, _)| k.clone())
                    .collect();
                let mut changes = Vec::with_capacity(keys.len());
                for key in keys {
                    if let Some(old) = self.kv.remove(&key) {
                        self.kv_total.replace(old.value.len() as u64, 0);
                        changes.push(Change::KvDelete(key));
                    }
                }
                Ok(changes)
            }
            Command::SetFederationState(state) => {
                if self.federation.len() >= weft_api::federation::MAX_DATACENTERS
                    && !self.federation.contains_key(&state.datacenter)
                {
                    return Err(invalid(format!(
                        "datacenter {}: the federation has {} datacenters already, the most it takes",
                        state.datacenter,
                        weft_api::federation::MAX_DATACENTERS
                    )));
                }
                self.federation
                    .insert(state.datacenter.clone(), state.clone());
                Ok(vec![Change::Federation(state)])
            }
            Command::CaInit(ca) => {
                if self.ca.is_some() {
                    return Err(ApplyError::Invalid(
                        "the certificate authority exists already".into(),
                    ));
                }
                self.ca = Some(ca);
                Ok(vec![self.ca_bundle_change()])
            }
            Command::SetRemoteInstances {
                datacenter,
                instances,
            } => {
                if instances.len() > weft_api::federation::MAX_REMOTE_INSTANCES {
                    return Err(invalid(format!(
                        "datacenter {datacenter}: {} instances, at most {} are kept of another datacenter",
                        instances.len(),
                        weft_api::federation::MAX_REMOTE_INSTANCES
                    )));
                }
                if !self.federation.contains_key(&datacenter) {
                    return Err(invalid(format!(
                        "datacenter {datacenter} is not in the federation"
                    )));
                }
                // Another datacenter's answer is checked as a registration
                // here would be (names are DNS labels: no dots).
                for i in &instances {
                    weft_api::catalog::validate_service_instance(i).map_err(|e| {
                        invalid(format!("datacenter {datacenter}: instance {:?}: {e}", i.id))
                    })?;
                }
                let services: BTreeSet<&str> =
                    instances.iter().map(|i| i.service.as_str()).collect();
                if services.len() > weft_api::federation::MAX_REMOTE_SERVICES {
                    return Err(invalid(format!(
                        "datacenter {datacenter}: {} services, at most {} are kept of another datacenter",
                        services.len(),
                        weft_api::federation::MAX_REMOTE_SERVICES
                    )));
                }
                // Each remote service gets a virtual IP of its own here
                // (`api.service.dc2.weft`), kept as local ones are, up to
                // MAX_REMOTE_VIPS for the datacenter; all or none, before
                // anything changes.
                let wanting: Vec<String> = services
                    .iter()
                    .map(|service| weft_api::vip::remote_key(service, &datacenter))
                    .filter(|key| !self.vips.contains_key(key))
                    .collect();
                let held = if wanting.is_empty() {
                    0
                } else {
                    (self.vips.keys())
                        .filter(|key| weft_api::vip::split_key(key).1 == Some(datacenter.as_str()))
                        .count()
                };
                let cap = weft_api::federation::MAX_REMOTE_VIPS;
                let room = cap.saturating_sub(held);
                if wanting.len() > room {
                    // Loud once, as the datacenter reaches its bound (each
                    // answer after would say it again every 2 s).
                    if held < cap {
                        tracing::warn!(
                            datacenter = %datacenter,
                            without = wanting.len() - room,
                            "another datacenter's services have taken every virtual IP kept for them ({cap}): new ones get none"
                        );
                    } else {
                        tracing::debug!(datacenter = %datacenter, without = wanting.len(), "no virtual IP left for another datacenter's new services");
                    }
                }
                let new: Vec<String> = wanting.into_iter().take(room).collect();
                let mut changes = self.assign_vips(new)?;
                self.remote.insert(datacenter.clone(), instances.clone());
                changes.push(Change::Remote {
                    datacenter,
                    instances,
                });
                Ok(changes)
            }
            Command::ReplacePolicy {
                intentions,
                entries,
            } => Ok(self.replace_policy(intentions, entries, index)),
            Command::ReplicateAcl { policies, tokens } => {
                let skipped = self.acl.replace_replicated(policies, tokens, index);
                if !skipped.is_empty() {
                    tracing::warn!(
                        ?skipped,
                        "the primary's ACL entries that clash with this datacenter's own are left out"
                    );
                }
                Ok(vec![Change::Acl])
            }
            Command::CaFederate(ca) => {
                if ca.intermediate.is_none() || ca.roots.iter().any(|r| !r.key.expose().is_empty())
                {
                    return Err(invalid(
                        "a federated CA has an intermediate and the primary's roots without keys",
                    ));
                }
                self.ca = Some(ca);
                Ok(vec![self.ca_bundle_change()])
            }
            Command::CaRotate { root, now } => {
                let Some(ca) = &self.ca else {
                    return Err(ApplyError::Invalid(
                        "no certificate authority to rotate".into(),
                    ));
                };
                let active = ca.roots.last().map_or(0, |r| r.serial);
                if root.serial != active + 1 {
                    return Err(ApplyError::Invalid(format!(
                        "root {} does not follow the active root {active} (another rotation came first)",
                        root.serial
                    )));
                }
                self.ca = Some(ca.rotated(root, now));
                Ok(vec![self.ca_bundle_change()])
            }
            Command::CaPrune { now } => {
                let Some(ca) = &mut self.ca else {
                    return Ok(Vec::new());
                };
                let before = ca.roots.len();
                ca.prune(now);
                if ca.roots.len() == before {
                    return Ok(Vec::new());
                }
                Ok(vec![self.ca_bundle_change()])
            }
            Command::ReleaseVips { keys } => self.release_vips(keys, index),
            Command::CaLeafTtl { secs } => {
                let Some(ca) = &mut self.ca else {
                    return Err(invalid("no certificate authority yet".to_string()));
                };
                ca.leaf_ttl_secs = secs;
                Ok(Vec::new())
            }
            Command::SessionCreate(session) => self.create_session(session, index),
            Command::SessionDestroy { id, now_ms } => {
                if !self.lock_sessions.contains_key(&id) {
                    return Err(ApplyError::NotFound {
                        what: format!("session {id:?}"),
                    });
                }
                Ok(self.invalidate_session(&id, now_ms, index))
            }
            Command::SessionExpire { id, now_ms } => match self.lock_sessions.get(&id) {
                Some(s) if s.expired(now_ms) => Ok(self.invalidate_session(&id, now_ms, index)),
                Some(_) => Err(invalid(format!("session {id:?} was renewed: not expired"))),
                None => Err(ApplyError::NotFound {
                    what: format!("session {id:?}"),
                }),
            },
            Command::SessionRenew { id, now_ms } => {
                let Some(s) = self.lock_sessions.get_mut(&id) else {
                    return Err(ApplyError::NotFound {
                        what: format!("session {id:?}"),
                    });
                };
                s.expires_at_ms = s.deadline(now_ms);
                s.modify_index = index;
                Ok(Vec::new())
            }
            Command::Restore(state) => {
                // Checked here, in the state machine, so that a forwarded
                // restore is held to exactly what a direct one is.
                state.check().map_err(invalid)?;
                let mut state = *state;
                state.ca = self.ca.take();
                if !state.acl.bootstrapped {
                    state.acl = std::mem::take(&mut self.acl);
                }
                *self = state;
                self.index = index;
                Ok(vec![Change::Replaced])
            }
            Command::AclBootstrap(token) => {
                self.acl.bootstrap(token, index).map_err(invalid)?;
                Ok(vec![Change::Acl])
            }
            Command::AclPolicyUpsert(policy) => {
                self.acl.upsert_policy(policy, index).map_err(invalid)?;
                Ok(vec![Change::Acl])
            }
            Command::AclPolicyDelete { id } => {
                self.acl.delete_policy(&id).map_err(invalid)?;
                Ok(vec![Change::Acl])
            }
            Command::AclTokenUpsert(token) => {
                self.acl.upsert_token(token, index).map_err(invalid)?;
                Ok(vec![Change::Acl])
            }
            Command::AclTokenDelete { accessor } => {
                self.acl.delete_token(&accessor).map_err(invalid)?;
                Ok(vec![Change::Acl])
            }
        }
    }

    /// Writes `intention` (its create index kept if it exists).
    fn upsert_intention(&mut self, mut intention: Intention, index: u64) -> Change {
        let by_dest = self.intentions.entry(intention.source.clone()).or_default();
        intention.create_index = by_dest
            .get(&intention.destination)
            .map_or(index, |i| i.create_index);
        intention.modify_index = index;
        by_dest.insert(intention.destination.clone(), intention.clone());
        Change::IntentionUpsert(intention)
    }

    /// Removes an intention; `None` when there is none.
    fn delete_intention(&mut self, source: &str, destination: &str) -> Option<Change> {
        self.intentions.get_mut(source)?.remove(destination)?;
        if self.intentions.get(source).is_some_and(|m| m.is_empty()) {
            self.intentions.remove(source);
        }
        Some(Change::IntentionDelete {
            source: source.to_string(),
            destination: destination.to_string(),
        })
    }

    /// A `service-intentions` entry written (or, with none, deleted): the
    /// intentions of `destination` become exactly `intentions`, each
    /// checked first, in one step.
    fn replace_intentions(
        &mut self,
        destination: String,
        intentions: Vec<Intention>,
        index: u64,
    ) -> Result<Vec<Change>, ApplyError> {
        for i in &intentions {
            if i.destination != destination {
                return Err(invalid(format!(
                    "intention {} => {} is not of destination {destination}",
                    i.source, i.destination
                )));
            }
            validate_intention(i).map_err(invalid)?;
            validate_intention_protocol(i, &*self).map_err(invalid)?;
        }
        let existing: Vec<String> = self
            .all_intentions()
            .filter(|i| i.destination == destination)
            .map(|i| i.source.clone())
            .collect();
        if intentions.is_empty() && existing.is_empty() {
            return Err(ApplyError::NotFound {
                what: format!("config entry service-intentions/{destination}"),
            });
        }
        let kept: BTreeSet<&str> = intentions.iter().map(|i| i.source.as_str()).collect();
        let gone: Vec<&String> = existing
            .iter()
            .filter(|s| !kept.contains(s.as_str()))
            .collect();
        // Found by their values above; each must be filed under its pair
        // (State::check makes sure), or nothing changes.
        if let Some(source) = gone.iter().find(|s| {
            !self
                .intentions
                .get(s.as_str())
                .is_some_and(|m| m.contains_key(&destination))
        }) {
            return Err(invalid(format!(
                "intention {source} => {destination} is not filed under its pair"
            )));
        }
        let mut changes: Vec<Change> = gone
            .into_iter()
            .filter_map(|s| self.delete_intention(s, &destination))
            .collect();
        for i in intentions {
            changes.push(self.upsert_intention(i, index));
        }
        Ok(changes)
    }

    /// A secondary's intentions and config entries become the primary's:
    /// what is gone is deleted, what differs (indexes aside) is written,
    /// what is the same is left as it is. Not validated again: the primary
    /// did, against the federation's policy.
    fn replace_policy(
        &mut self,
        intentions: Vec<Intention>,
        entries: Vec<ConfigEntry>,
        index: u64,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        let wanted: BTreeSet<(String, String)> = intentions
            .iter()
            .map(|i| (i.source.clone(), i.destination.clone()))
            .collect();
        let gone: Vec<(String, String)> = self
            .all_intentions()
            .map(|i| (i.source.clone(), i.destination.clone()))
            .filter(|k| !wanted.contains(k))
            .collect();
        for (source, destination) in gone {
            changes.extend(self.delete_intention(&source, &destination));
        }
        for i in intentions {
            let same = self
                .intentions
                .get(&i.source)
                .and_then(|m| m.get(&i.destination))
                .is_some_and(|old| {
                    Intention {
                        create_index: 0,
                        modify_index: 0,
                        ..old.clone()
                    } == Intention {
                        create_index: 0,
                        modify_index: 0,
                        ..i.clone()
                    }
                });
            if !same {
                changes.push(self.upsert_intention(i, index));
            }
        }
        let wanted: BTreeSet<(String, String)> = entries
            .iter()
            .map(|e| (e.kind().as_str().to_string(), e.name().to_string()))
            .collect();
        let gone: Vec<(String, String)> = self
            .config
            .iter()
            .flat_map(|(kind, m)| m.keys().map(move |name| (kind.clone(), name.clone())))
            .filter(|k| !wanted.contains(k))
            .collect();
        for (kind, name) in gone {
            if let Some(m) = self.config.get_mut(&kind) {
                m.remove(&name);
            }
            changes.push(Change::ConfigDelete { kind, name });
        }
        for entry in entries {
            let (kind, name) = (entry.kind().as_str().to_string(), entry.name().to_string());
            let by_name = self.config.entry(kind).or_default();
            if by_name.get(&name).is_some_and(|old| old.entry == entry) {
                continue;
            }
            let create_index = by_name.get(&name).map_or(index, |e| e.create_index);
            let stored = StoredEntry {
                entry,
                create_index,
                modify_index: index,
            };
            by_name.insert(name, stored.clone());
            changes.push(Change::ConfigUpsert(stored));
        }
        self.config.retain(|_, m| !m.is_empty());
        changes
    }

    fn ca_bundle_change(&self) -> Change {
        let ca = self.ca.as_ref();
        Change::CaBundle {
            trust_domain: ca.map(|c| c.trust_domain.clone()).unwrap_or_default(),
            roots_pem: ca
                .map(|c| c.roots.iter().map(|r| r.cert_pem.clone()).collect())
                .unwrap_or_default(),
        }
    }

    /// An external node and its instance, all or nothing.
    fn register_external(
        &mut self,
        mut node: Node,
        instance: Option<ServiceInstance>,
        index: u64,
    ) -> Result<Vec<Change>, ApplyError> {
        validate_node(&node).map_err(invalid)?;
        if !is_external(&node) {
            return Err(invalid(format!(
                "meta: an external node carries {EXTERNAL_NODE_META} = \"true\""
            )));
        }
        let previous = self.nodes.get(&node.name).cloned();
        match &previous {
            Some(p) if !is_external(p) => {
                return Err(invalid(format!(
                "node {:?} is run by a weft agent: the catalog API registers external nodes only",
                node.name
            )))
            }
            None => {
                let external = self.nodes.values().filter(|n| is_external(n)).count();
                if external >= MAX_EXTERNAL_NODES {
                    return Err(invalid(format!(
                        "at most {MAX_EXTERNAL_NODES} external nodes"
                    )));
                }
            }
            Some(_) => {}
        }
        if let Some(i) = &instance {
            if i.node != node.name {
                return Err(invalid("instance: on another node than the one registered"));
            }
        }
        node.create_index = previous.as_ref().map_or(index, |n| n.create_index);
        node.modify_index = index;
        node.health = HealthStatus::Passing;
        node.health_output = String::new();
        self.nodes.insert(node.name.clone(), node.clone());
        let mut changes = vec![Change::NodeUpsert(node.clone())];
        if let Some(instance) = instance {
            match self.register_service(instance, index) {
                Ok(more) => changes.extend(more),
                Err(e) => {
                    // Nothing of the write stays.
                    match previous {
                        Some(p) => self.nodes.insert(p.name.clone(), p),
                        None => self.nodes.remove(&node.name),
                    };
                    return Err(e);
                }
            }
        }
        Ok(changes)
    }

    fn register_service(
        &mut self,
        mut instance: ServiceInstance,
        index: u64,
    ) -> Result<Vec<Change>, ApplyError> {
        validate_service_instance(&instance).map_err(invalid)?;
        if !self.nodes.contains_key(&instance.node) {
            return Err(ApplyError::UnknownNode(instance.node));
        }
        let on_node = self.instances.get(&instance.node);
        let known = on_node.is_some_and(|m| m.contains_key(&instance.id));
        if !known && on_node.is_some_and(|m| m.len() >= MAX_INSTANCES_PER_NODE) {
            return Err(invalid(format!(
                "node {:?} has {MAX_INSTANCES_PER_NODE} instances, the most a node may have",
                instance.node
            )));
        }
        // One address:port is one service: another service's instance there
        // would take its traffic. A node-local address (loopback,
        // link-local) clashes only on the same node.
        let node_local = instance
            .address
            .parse()
            .is_ok_and(weft_api::catalog::is_node_local);
        let instances = &self.instances;
        self.endpoints
            .ensure(|| instances.values().flat_map(|m| m.values()).collect());
        let clash = self
            .endpoints
            .candidates(&instance)
            .filter_map(|(node, id)| self.instances.get(node)?.get(id))
            .find(|other| {
                (!node_local || other.node == instance.node)
                    && other.address == instance.address
                    && other.port == instance.port
                    && other.service != instance.service
            });
        // Not naming the other instance: the caller may not read it, and
        // probing addresses would map services it may not see.
        if clash.is_some() {
            return Err(invalid(format!(
                "address: {}:{} is already another service's (an address:port belongs to one \
                 service)",
                instance.address, instance.port
            )));
        }
        let mut changes = Vec::new();
        if !self.vips.contains_key(&instance.service) {
            changes = self.assign_vips(vec![instance.service.clone()])?;
        }
        let by_id = self.instances.entry(instance.node.clone()).or_default();
        instance.create_index = by_id.get(&instance.id).map_or(index, |i| i.create_index);
        instance.modify_index = index;
        if let Some(old) = by_id.insert(instance.id.clone(), instance.clone()) {
            self.endpoints.remove(&old);
        }
        self.endpoints.insert(&instance);
        changes.push(Change::InstanceUpsert(instance));
        Ok(changes)
    }
}

fn check_cas(key: &str, cas: Option<u64>, actual: Option<u64>) -> Result<(), ApplyError> {
    match cas {
        None => Ok(()),
        Some(expected) if actual.unwrap_or(0) == expected => Ok(()),
        Some(expected) => Err(ApplyError::CasMismatch {
            key: key.to_string(),
            expected,
            actual: actual.unwrap_or(0),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use weft_api::catalog::{HealthStatus, Node, ServiceInstance};
    use weft_api::intention::{Intention, IntentionAction};

    use super::*;

    #[test]
    fn a_cas_mismatch_says_so_first() {
        let e = check_cas("k", Some(3), Some(4)).unwrap_err();
        assert!(e.to_string().starts_with(CAS_MISMATCH), "{e}");
    }

    fn node(name: &str) -> Node {
        Node {
            name: name.into(),
            address: "10.0.0.1".into(),
            datacenter: "dc1".into(),
            meta: BTreeMap::new(),
            create_index: 0,
            modify_index: 0,
            ..Default::default()
        }
    }

    fn instance(node: &str, id: &str, service: &str) -> ServiceInstance {
        ServiceInstance {
            id: id.into(),
            service: service.into(),
            node: node.into(),
            address: "10.0.0.1".into(),
            port: 8080,
            tags: vec![],
            meta: BTreeMap::new(),
            health: HealthStatus::Critical,
            check_output: String::new(),
            create_index: 0,
            modify_index: 0,
            ..Default::default()
        }
    }

    fn external(name: &str) -> Node {
        let mut n = node(name);
        n.meta.insert(EXTERNAL_NODE_META.into(), "true".into());
        n
    }

    #[test]
    fn the_external_mark_is_the_catalog_apis_and_an_agents_node_stays_its_own() {
        let mut s = State::default();
        // An agent's registration may not carry the mark.
        let reason = refused(s.apply(Command::RegisterNode(external("a")), 1).0);
        assert!(reason.contains("external-node"), "{reason}");
        s.apply(Command::RegisterNode(node("a")), 2);
        // The catalog API cannot take an agent's node over.
        let over = Command::RegisterExternal {
            node: external("a"),
            instance: None,
        };
        let reason = refused(s.apply(over, 3).0);
        assert!(reason.contains("run by a weft agent"), "{reason}");
        assert!(!is_external(&s.nodes["a"]));
        // All or nothing: an instance refused leaves no new node behind.
        s.apply(Command::RegisterService(instance("a", "db-1", "db")), 4);
        let clash = Command::RegisterExternal {
            node: external("ext"),
            instance: Some(instance("ext", "x", "evil")),
        };
        let reason = refused(s.apply(clash, 5).0);
        assert!(reason.contains("already another service's"), "{reason}");
        assert!(!reason.contains("db"), "names the other service: {reason}");
        assert!(
            !s.nodes.contains_key("ext"),
            "the node went with its instance"
        );
        let fine = Command::RegisterExternal {
            node: external("ext"),
            instance: Some(ServiceInstance {
                port: 5432,
                ..instance("ext", "pg-1", "postgres")
            }),
        };
        assert!(matches!(s.apply(fine, 6).0, CommandResult::Applied { .. }));
        assert!(is_external(&s.nodes["ext"]));
        // An agent may take an external node's name: the mark goes.
        s.apply(Command::RegisterNode(node("ext")), 7);
        assert!(!is_external(&s.nodes["ext"]));
    }

    /// The attack: another datacenter answers with new service names each
    /// time. Each took a virtual IP here for good; now that datacenter's
    /// hold at most MAX_REMOTE_VIPS, and its answers are still taken.
    #[test]
    fn another_datacenters_services_hold_a_bounded_number_of_virtual_ips() {
        use weft_api::federation::{FederationState, MAX_REMOTE_SERVICES, MAX_REMOTE_VIPS};
        let mut s = State::default();
        let dc2 = FederationState {
            datacenter: "dc2".into(),
            gateways: vec!["10.9.0.1:8443".parse().unwrap()],
            updated_ms: 1,
        };
        s.apply(Command::SetFederationState(dc2), 1);
        let rounds = MAX_REMOTE_VIPS / MAX_REMOTE_SERVICES + 2;
        for round in 0..rounds {
            let instances = (0..MAX_REMOTE_SERVICES)
                .map(|i| {
                    let mut one = instance("n", &format!("i-{i}"), &format!("s{round}x{i}"));
                    one.port = 1 + i as u16;
                    one
                })
                .collect();
            let r = s.apply(
                Command::SetRemoteInstances {
                    datacenter: "dc2".into(),
                    instances,
                },
                2 + round as u64,
            );
            assert!(matches!(r.0, CommandResult::Applied { .. }), "{:?}", r.0);
            assert_eq!(s.remote["dc2"].len(), MAX_REMOTE_SERVICES);
        }
        let held = s.vips.keys().filter(|k| k.ends_with(".dc2")).count();
        assert_eq!(held, MAX_REMOTE_VIPS);
        // A local service still gets one.
        s.apply(Command::RegisterNode(node("a")), 100);
        s.apply(Command::RegisterService(instance("a", "web-1", "web")), 101);
        assert!(s.vips.contains_key("web"));
    }

    #[test]
    fn a_node_holds_a_bounded_number_of_instances() {
        let mut s = State::default();
        s.apply(Command::RegisterNode(node("a")), 1);
        for i in 0..MAX_INSTANCES_PER_NODE {
            let mut one = instance("a", &format!("i-{i}"), "many");
            one.port = 1 + i as u16;
            let r = s.apply(Command::RegisterService(one), 2 + i as u64).0;
            assert!(matches!(r, CommandResult::Applied { .. }), "{r:?}");
        }
        let mut past = instance("a", "one-more", "many");
        past.port = 60000;
        let reason = refused(s.apply(Command::RegisterService(past), 5000).0);
        assert!(reason.contains("the most a node may have"), "{reason}");
        // Registering a known one again is not a new one.
        let mut again = instance("a", "i-0", "many");
        again.port = 1;
        let r = s.apply(Command::RegisterService(again), 5001).0;
        assert!(matches!(r, CommandResult::Applied { .. }), "{r:?}");
    }

    #[test]
    fn an_address_belongs_to_one_service() {
        let mut s = State::default();
        s.apply(Command::RegisterNode(node("a")), 1);
        s.apply(Command::RegisterNode(node("b")), 2);
        s.apply(Command::RegisterService(instance("a", "db-1", "db")), 3);
        // Another service at db's address, on any node: refused.
        for (i, on) in ["a", "b"].into_iter().enumerate() {
            let evil = instance(on, "0", "evil");
            let reason = refused(s.apply(Command::RegisterService(evil), 4 + i as u64).0);
            assert!(reason.contains("already another service's"), "{reason}");
            assert!(!reason.contains("db"), "names the other service: {reason}");
        }
        // Another instance of db there, or evil elsewhere: fine.
        assert!(matches!(
            s.apply(Command::RegisterService(instance("b", "db-2", "db")), 6)
                .0,
            CommandResult::Applied { .. }
        ));
        let mut elsewhere = instance("a", "evil-1", "evil");
        elsewhere.port = 9090;
        assert!(matches!(
            s.apply(Command::RegisterService(elsewhere), 7).0,
            CommandResult::Applied { .. }
        ));
        // Loopback is per node: each node may have its own 127.0.0.1:8080.
        let mut local_a = instance("a", "cache-a", "cache");
        local_a.address = "127.0.0.1".into();
        let mut local_b = instance("b", "other-b", "other");
        local_b.address = "127.0.0.1".into();
        s.apply(Command::RegisterService(local_a), 8);
        assert!(matches!(
            s.apply(Command::RegisterService(local_b.clone()), 9).0,
            CommandResult::Applied { .. }
        ));
        local_b.node = "a".into();
        local_b.id = "other-a".into();
        assert!(!matches!(
            s.apply(Command::RegisterService(local_b), 10).0,
            CommandResult::Applied { .. }
        ));
    }

    /// The address index follows deregistrations, moves and snapshots:
    /// an address is free once its instance is gone or has moved, and a
    /// state read back from a snapshot (no index) still refuses a clash.
    #[test]
    fn an_address_is_freed_and_kept_across_snapshots() {
        let applied = |r: CommandResult| matches!(r, CommandResult::Applied { .. });
        let mut s = State::default();
        s.apply(Command::RegisterNode(node("a")), 1);
        s.apply(Command::RegisterNode(node("b")), 2);
        s.apply(Command::RegisterService(instance("a", "db-1", "db")), 3);
        let evil = || instance("b", "evil-1", "evil");
        assert!(!applied(s.apply(Command::RegisterService(evil()), 4).0));

        // Read back as a snapshot would be: the index is rebuilt on use.
        let json = serde_json::to_string(&s).unwrap();
        let mut restored: State = serde_json::from_str(&json).unwrap();
        assert_eq!(restored, s);
        let reason = refused(restored.apply(Command::RegisterService(evil()), 5).0);
        assert!(reason.contains("already another service's"), "{reason}");
        assert!(!reason.contains("db"), "names the other service: {reason}");

        // db-1 moves to another port: its old address is free.
        let mut moved = instance("a", "db-1", "db");
        moved.port = 9000;
        assert!(applied(s.apply(Command::RegisterService(moved), 6).0));
        assert!(applied(s.apply(Command::RegisterService(evil()), 7).0));
        // Deregistered, one by one or with its node: free too.
        let mut at_9000 = instance("b", "evil-2", "evil");
        at_9000.port = 9000;
        assert!(!applied(
            s.apply(Command::RegisterService(at_9000.clone()), 8).0
        ));
        let dereg = Command::DeregisterService {
            node: "a".into(),
            id: "db-1".into(),
        };
        assert!(applied(s.apply(dereg, 9).0));
        assert!(applied(s.apply(Command::RegisterService(at_9000), 10).0));
        let mut web = instance("a", "web-1", "web");
        web.port = 7000;
        assert!(applied(s.apply(Command::RegisterService(web), 11).0));
        assert!(applied(
            s.apply(
                Command::DeregisterNode {
                    name: "a".into(),
                    now_ms: 0,
                },
                12
            )
            .0
        ));
        let mut at_7000 = instance("b", "evil-3", "evil");
        at_7000.port = 7000;
        assert!(applied(s.apply(Command::RegisterService(at_7000), 13).0));
    }

    fn refused(result: CommandResult) -> String {
        match result {
            CommandResult::Refused { reason } => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn indexes_track_creation_and_modification() {
        let mut s = State::default();
        s.apply(Command::RegisterNode(node("a")), 3);
        s.apply(Command::RegisterNode(node("a")), 7);
        assert_eq!(s.nodes["a"].create_index, 3);
        assert_eq!(s.nodes["a"].modify_index, 7);
        assert_eq!(s.index, 7);
    }

    #[test]
    fn a_service_needs_its_node_and_keeps_its_vip() {
        let mut s = State::default();
        let r = s
            .apply(Command::RegisterService(instance("a", "web-1", "web")), 1)
            .0;
        assert!(refused(r).contains("node \"a\" is not registered"));
        assert!(
            s.instances.is_empty() && s.vips.is_empty(),
            "nothing partial"
        );

        s.apply(Command::RegisterNode(node("a")), 2);
        let (_, changes) = s.apply(Command::RegisterService(instance("a", "web-1", "web")), 3);
        let vip = s.vips["web"];
        assert!(changes.contains(&Change::VipAssigned {
            service: "web".into(),
            vip
        }));
        s.apply(
            Command::DeregisterService {
                node: "a".into(),
                id: "web-1".into(),
            },
            4,
        );
        s.apply(Command::RegisterService(instance("a", "web-2", "web")), 5);
        assert_eq!(s.vips["web"], vip, "the VIP is kept");
        let mut api = instance("a", "api-1", "api");
        api.port = 9090;
        s.apply(Command::RegisterService(api), 6);
        assert_ne!(s.vips["api"], vip);
    }

    #[test]
    fn deregistering_a_node_removes_its_instances() {
        let mut s = State::default();
        s.apply(Command::RegisterNode(node("a")), 1);
        s.apply(Command::RegisterService(instance("a", "web-1", "web")), 2);
        let (_, changes) = s.apply(
            Command::DeregisterNode {
                name: "a".into(),
                now_ms: 0,
            },
            3,
        );
        assert!(!s.instances.contains_key("a"));
        assert_eq!(changes.len(), 2);
    }

    #[test]
    fn health_updates_need_the_instance() {
        let mut s = State::default();
        let r = s.apply(
            Command::UpdateHealth {
                node: "a".into(),
                id: "x".into(),
                health: HealthStatus::Passing,
                output: String::new(),
            },
            1,
        );
        assert!(refused(r.0).contains("not registered"));
    }

    #[test]
    fn kv_check_and_set() {
        let mut s = State::default();
        let put = |cas| Command::KvPut {
            key: "k".into(),
            value: b"v".to_vec(),
            cas,
            flags: 0,
            lock: None,
        };
        assert_eq!(
            s.apply(put(Some(0)), 1).0,
            CommandResult::Applied { index: 1 }
        );
        assert!(refused(s.apply(put(Some(0)), 2).0).contains("check-and-set failed"));
        assert!(refused(s.apply(put(Some(5)), 3).0).contains("index is 1, not 5"));
        assert_eq!(
            s.apply(put(Some(1)), 4).0,
            CommandResult::Applied { index: 4 }
        );
        assert_eq!(s.kv["k"].create_index, 1);
        assert_eq!(s.kv["k"].modify_index, 4);
        let del = |cas| Command::KvDelete {
            key: "k".into(),
            cas,
        };
        assert!(refused(s.apply(del(Some(1)), 5).0).contains("check-and-set"));
        assert_eq!(
            s.apply(del(Some(4)), 6).0,
            CommandResult::Applied { index: 6 }
        );
        assert!(refused(s.apply(del(None), 7).0).contains("not found"));
    }

    #[test]
    fn bad_keys_and_oversized_values_change_nothing() {
        let mut s = State::default();
        let r = s.apply(
            Command::KvPut {
                key: "/x".into(),
                value: vec![],
                cas: None,
                flags: 0,
                lock: None,
            },
            1,
        );
        assert!(refused(r.0).contains("must not start with '/'"));
        let big = vec![0u8; MAX_VALUE_BYTES + 1];
        let r = s.apply(
            Command::KvPut {
                key: "x".into(),
                value: big,
                cas: None,
                flags: 0,
                lock: None,
            },
            2,
        );
        assert!(refused(r.0).contains("more than the limit"));
        assert!(s.kv.is_empty());
    }

    #[test]
    fn l7_intentions_need_an_http_destination() {
        let mut s = State::default();
        let l7 = Intention {
            source: "web".into(),
            destination: "api".into(),
            action: None,
            permissions: vec![weft_api::intention::Permission {
                action: IntentionAction::Allow,
                http: weft_api::intention::HttpMatch {
                    path_prefix: Some("/".into()),
                    ..Default::default()
                },
            }],
            description: String::new(),
            create_index: 0,
            modify_index: 0,
        };
        let r = s.apply(Command::UpsertIntention(l7.clone()), 1);
        refused(r.0);
        assert!(s.intentions.is_empty());
        let defaults: weft_api::config_entry::ConfigEntry =
            serde_json::from_str(r#"{"Kind":"service-defaults","Name":"api","Protocol":"http"}"#)
                .unwrap();
        assert_eq!(
            s.apply(Command::WriteConfig(defaults), 2).0,
            CommandResult::Applied { index: 2 }
        );
        assert_eq!(
            s.apply(Command::UpsertIntention(l7), 3).0,
            CommandResult::Applied { index: 3 }
        );
    }

    #[test]
    fn ca_rotation_must_follow_the_active_root() {
        let mut s = State::default();
        let ca = crate::ca::CaState::init("t.weft", 3600, 1_790_000_000).unwrap();
        let root = ca.next_root(1_790_000_100).unwrap();
        s.apply(Command::CaInit(ca.clone()), 1);
        assert!(refused(s.apply(Command::CaInit(ca), 2).0).contains("exists already"));
        let rotate = Command::CaRotate {
            root,
            now: 1_790_000_100,
        };
        assert_eq!(
            s.apply(rotate.clone(), 3).0,
            CommandResult::Applied { index: 3 }
        );
        assert!(refused(s.apply(rotate, 4).0).contains("another rotation came first"));
        assert_eq!(s.ca.as_ref().unwrap().roots.len(), 2);
    }

    /// A restore is checked by the state machine itself, so a restore that
    /// reaches Raft by any path (a forwarded write included) is held to the
    /// same rules; it keeps the running CA and, when the snapshot's ACLs were
    /// never bootstrapped, the running ACLs.
    #[test]
    fn a_restore_is_validated_and_keeps_the_ca_and_acls() {
        let mut state = State::default();
        let ca = crate::ca::CaState::init("td.weft", 3600, 1_790_000_000).unwrap();
        state.apply(Command::CaInit(ca.clone()), 1);
        let token = crate::acl::AclToken {
            accessor_id: "a".into(),
            secret_hash: crate::acl::hash_secret("s"),
            description: String::new(),
            policies: vec![crate::acl::GLOBAL_MANAGEMENT_ID.into()],
            service_identities: vec![],
            node_identities: vec![],
            create_index: 0,
            modify_index: 0,
            replicated: false,
        };
        state.apply(Command::AclBootstrap(token), 2);

        let mut bad = State::default();
        bad.instances
            .entry("ghost".into())
            .or_default()
            .insert("web".into(), instance("ghost", "web", "web"));
        let reason = refused(state.apply(Command::Restore(Box::new(bad)), 3).0);
        assert!(reason.contains("ghost"), "{reason}");
        assert!(state.ca.is_some() && state.acl.bootstrapped);
        // An allow filed under another pair would outlive every delete of
        // its own: refused.
        let mut misfiled = State::default();
        misfiled.intentions.entry("x".into()).or_default().insert(
            "y".into(),
            Intention::l4("web", "db", weft_api::intention::IntentionAction::Allow),
        );
        let reason = refused(state.apply(Command::Restore(Box::new(misfiled)), 3).0);
        assert!(reason.contains("another pair"), "{reason}");

        let mut good = State::default();
        good.nodes.insert("n1".into(), node("n1"));
        let (result, _) = state.apply(Command::Restore(Box::new(good)), 4);
        assert_eq!(result, CommandResult::Applied { index: 4 });
        assert!(state.nodes.contains_key("n1"));
        assert_eq!(state.ca, Some(ca), "the running CA is kept");
        assert!(
            state.acl.token_by_secret("s").is_some(),
            "the running ACLs are kept"
        );
    }
}

#[cfg(test)]
mod once_tests {
    use super::*;

    fn put(value: &str, cas: Option<u64>) -> Command {
        Command::KvPut {
            key: "counter".into(),
            value: value.as_bytes().to_vec(),
            cas,
            flags: 0,
            lock: None,
        }
    }

    fn once(client: &str, request: &str, cmd: Command) -> Command {
        Command::Once {
            client: client.into(),
            request: request.into(),
            cmd: Box::new(cmd),
            standing: None,
        }
    }

    #[test]
    fn a_retried_cas_gets_its_first_result_not_a_mismatch() {
        let mut s = State::default();
        assert_eq!(
            s.apply(once("alice", "r1", put("1", Some(0))), 5).0,
            CommandResult::Applied { index: 5 }
        );
        // The same request again (a client retry after a failover): the
        // first answer, nothing applied, no changes for watchers.
        let (result, changes) = s.apply(once("alice", "r1", put("1", Some(0))), 6);
        assert_eq!(result, CommandResult::Applied { index: 5 });
        assert!(changes.is_empty());
        assert_eq!(s.kv["counter"].modify_index, 5);
        // Without the id it is a new CAS, and it fails as it should.
        assert!(matches!(
            s.apply(put("1", Some(0)), 7).0,
            CommandResult::Refused { .. }
        ));
        // Another client reusing alice's id is its own request.
        assert!(matches!(
            s.apply(once("mallory", "r1", put("2", Some(5))), 8).0,
            CommandResult::Applied { index: 8 }
        ));
    }

    #[test]
    fn a_refusal_is_remembered_too_and_nesting_is_refused() {
        let mut s = State::default();
        let first = s.apply(once("a", "r", put("x", Some(9))), 1).0;
        assert!(matches!(first, CommandResult::Refused { .. }));
        assert_eq!(s.apply(once("a", "r", put("x", None)), 2).0, first);
        let nested = once("a", "n", once("a", "m", put("y", None)));
        assert!(matches!(
            s.apply(nested, 3).0,
            CommandResult::Refused { .. }
        ));
        assert!(!s.kv.contains_key("counter") || s.kv["counter"].value != b"y");
    }
}

#[cfg(test)]
mod batch_tests {
    use super::*;

    fn put(key: &str, value: &str, cas: Option<u64>) -> Command {
        Command::KvPut {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            cas,
            flags: 0,
            lock: None,
        }
    }

    fn indexes(result: &CommandResult) -> Vec<Option<u64>> {
        match result {
            CommandResult::Batch(results) => results
                .iter()
                .map(|r| match r {
                    CommandResult::Applied { index } => Some(*index),
                    _ => None,
                })
                .collect(),
            other => panic!("not a batch result: {other:?}"),
        }
    }

    #[test]
    fn each_command_of_a_batch_gets_its_own_index() {
        let mut s = State::default();
        s.apply_entry(put("k", "a", None), 5);
        assert_eq!(s.kv["k"].modify_index, 5);
        // Entry 6 holds three writes: indexes 6, 7 and 8.
        let (result, published) = s.apply_entry(
            Command::Batch(vec![
                put("k", "b", Some(5)),
                put("k", "c", None),
                put("other", "x", None),
            ]),
            6,
        );
        assert_eq!(indexes(&result), vec![Some(6), Some(7), Some(8)]);
        assert_eq!(
            published.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![6, 7, 8]
        );
        // The check-and-set writer's index is not the plain writer's: a
        // CAS based on what it wrote fails after the overwrite.
        assert_eq!(s.kv["k"].modify_index, 7);
        assert!(matches!(
            s.apply_entry(put("k", "d", Some(6)), 7).0,
            CommandResult::Refused { .. }
        ));
        // Entry 7 came after the batch: it took index 9, not 7.
        assert_eq!(s.index, 9);
        s.apply_entry(put("k", "e", Some(7)), 8);
        assert_eq!(s.kv["k"].modify_index, 10);
        // Once the log passes the indexes, they follow it again.
        s.apply_entry(put("k", "f", None), 20);
        assert_eq!(s.kv["k"].modify_index, 20);
    }

    #[test]
    fn a_refused_command_refuses_only_itself_and_batches_do_not_nest() {
        let mut s = State::default();
        let (result, _) = s.apply_entry(
            Command::Batch(vec![
                put("k", "a", Some(99)),
                Command::Batch(vec![put("n", "x", None)]),
                put("k", "b", None),
            ]),
            1,
        );
        assert_eq!(indexes(&result), vec![None, None, Some(3)]);
        assert!(!s.kv.contains_key("n"));
        assert_eq!(s.kv["k"].value, b"b");
    }
}
