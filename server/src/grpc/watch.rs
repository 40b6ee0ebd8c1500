//! `weft.v1.Watch`: a full snapshot, then every change in index order.
//!
//! A subscriber that resumes with `from_index` gets only the changes after
//! it, if this server still keeps them; otherwise (or when the state was
//! replaced) a new snapshot. A server that is behind the index a subscriber
//! resumes from first waits to catch up, so a subscriber never goes back.
//!
//! A stream shows only what its token may read: nodes, instances (service
//! and node read), virtual IPs and config entries (service read),
//! intentions (intentions read on the destination), KV (key read, and only
//! when the subscriber asks for it: agents do not); the trust bundle goes
//! to every authenticated subscriber. A snapshot comes in parts of at most
//! about [`SNAPSHOT_PART_BYTES`], all at its index, the last with
//! `more = false`. When ACLs change,
//! the stream looks its token up again: a deleted token ends the stream,
//! otherwise a new snapshot filtered by the new rights follows.
//!
//! A server out of contact with its cluster ([`crate::contact`]) refuses
//! subscriptions and ends the streams it serves with `UNAVAILABLE`: what
//! it holds may be stale, and a subscriber resumes on another server.
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use weft_api::convert::{instance_to_proto, intention_to_proto, kv_to_proto, node_to_proto};
use weft_api::proto::{self, change::Change as P, watch_event::Event, watch_server::Watch};

use weft_api::acl::{Access, Resource, ResourceKind};

use super::auth::{caller, resolve_in, secret_of, Caller};
use super::catalog::may_read_instance;
use super::config::{entry_to_proto, may_read_entry};
use super::intentions::may_access;
use crate::conn_limit::ClientLimits;
use crate::node::ServerNode;
use crate::state::{Change, Standing, State};
use crate::watch::HubEvent;

/// The watch API, and the streams each token holds open on this server
/// (by accessor and client address, against [`WATCHES_PER_TOKEN`]).
pub struct WatchApi(pub Arc<ServerNode>, pub Arc<ClientLimits<String>>);

impl WatchApi {
    pub fn new(node: Arc<ServerNode>) -> WatchApi {
        WatchApi(node, ClientLimits::new(WATCHES_PER_TOKEN))
    }
}

/// Watch streams one token (but a management token) may hold open on one
/// server at once from one address. An agent holds one (agents sharing a
/// token come from their own addresses); each stream costs a snapshot of
/// what the token may read, held while its client does not read it.
pub const WATCHES_PER_TOKEN: usize = 16;

type EventSender = mpsc::Sender<Result<proto::WatchEvent, Status>>;

#[tonic::async_trait]
impl Watch for WatchApi {
    type SubscribeStream = ReceiverStream<Result<proto::WatchEvent, Status>>;

    async fn subscribe(
        &self,
        req: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = caller(&self.0, &req).await?;
        caller.require_any_read(ResourceKind::Service)?;
        if !self.0.contact.in_contact() {
            return Err(out_of_contact(&self.0));
        }
        let from = req
            .remote_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let slot = match caller.authz.is_management() {
            true => None,
            false => Some(self.1.admit(format!("{} from {from}", caller.accessor)).ok_or_else(|| {
                Status::resource_exhausted(format!(
                    "token {} holds {WATCHES_PER_TOKEN} watch streams from {from} on this server already",
                    caller.accessor
                ))
            })?),
        };
        let secret = secret_of(&req).unwrap_or_default().to_string();
        let r = req.into_inner();
        let node = self.0.clone();
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            // Held for as long as the stream is served.
            let _slot = slot;
            stream_changes(node, r.from_index, r.include_kv, tx, caller, secret).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Why a server out of contact serves no watch.
fn out_of_contact(node: &ServerNode) -> Status {
    Status::unavailable(format!(
        "server {} is out of contact with its cluster's leader: what it holds may be stale; \
         subscribe to another server",
        node.id
    ))
}

/// Bytes of one snapshot part at most (an item larger than that gets a
/// part of its own): a snapshot of any size reaches a client in messages
/// well under gRPC's 4 MiB default.
pub const SNAPSHOT_PART_BYTES: usize = 1 << 20;

/// A snapshot cut into parts of bounded size.
struct Parts {
    done: Vec<proto::StateSnapshot>,
    current: proto::StateSnapshot,
    size: usize,
    limit: usize,
}

impl Parts {
    fn new(limit: usize) -> Self {
        Self {
            done: Vec::new(),
            current: proto::StateSnapshot::default(),
            size: 0,
            limit,
        }
    }

    /// Adds one item of `size` encoded bytes with `put`.
    fn add(&mut self, size: usize, put: impl FnOnce(&mut proto::StateSnapshot)) {
        if self.size > 0 && self.size + size > self.limit {
            self.done.push(std::mem::take(&mut self.current));
            self.size = 0;
        }
        put(&mut self.current);
        // Field tag and length prefix.
        self.size += size + 6;
    }

    /// The parts, every one but the last marked `more`.
    fn finish(mut self) -> Vec<proto::StateSnapshot> {
        self.done.push(self.current);
        let last = self.done.len() - 1;
        for part in &mut self.done[..last] {
            part.more = true;
        }
        self.done
    }
}

/// The state as a watch snapshot, as far as `caller` may read it (KV only
/// if asked for), in parts of at most about `limit` bytes.
pub fn snapshot_parts(
    state: &State,
    default_allow: bool,
    caller: &Caller,
    include_kv: bool,
    limit: usize,
) -> Vec<proto::StateSnapshot> {
    use prost::Message;
    let mut parts = Parts::new(limit);
    parts.current.default_allow = default_allow;
    parts.current.ca = state.ca.as_ref().map(|ca| proto::CaBundle {
        trust_domain: ca.trust_domain.clone(),
        roots_pem: ca.roots.iter().map(|r| r.cert_pem.clone()).collect(),
    });
    let readable = |n: &&weft_api::catalog::Node| caller.can(Resource::Node(&n.name), Access::Read);
    for n in state.nodes.values().filter(readable).map(node_to_proto) {
        parts.add(n.encoded_len(), |s| s.nodes.push(n));
    }
    let instances = state.instances.values().flat_map(|m| m.values());
    for i in instances
        .filter(|i| may_read_instance(caller, i))
        .map(instance_to_proto)
    {
        parts.add(i.encoded_len(), |s| s.instances.push(i));
    }
    for (service, vip) in &state.vips {
        // A remote service's key (`api.dc2`) is read as its service.
        let (name, _) = weft_api::vip::split_key(service);
        if caller.can(Resource::Service(name), Access::Read) {
            let v = proto::ServiceVip {
                service: service.clone(),
                vip: vip.to_string(),
            };
            parts.add(v.encoded_len(), |s| s.vips.push(v));
        }
    }
    let intentions = state.all_intentions();
    for i in intentions.filter(|i| may_access(caller, &i.destination, Access::Read)) {
        let i = intention_to_proto(i);
        parts.add(i.encoded_len(), |s| s.intentions.push(i));
    }
    let entries = state.config.values().flat_map(|m| m.values());
    for e in entries.filter(|e| may_read_entry(caller, e.entry.kind().as_str(), e.entry.name())) {
        let e = entry_to_proto(e);
        parts.add(e.encoded_len(), |s| s.config_entries.push(e));
    }
    for f in state.federation.values() {
        let f = f.to_proto();
        parts.add(f.encoded_len(), |s| s.federation.push(f));
    }
    for (dc, instances) in &state.remote {
        let r = remote_to_proto(caller, dc, instances);
        parts.add(r.encoded_len(), |s| s.remote.push(r));
    }
    if include_kv {
        for e in state.kv.values() {
            if caller.can(Resource::Key(&e.key), Access::Read) {
                let e = kv_to_proto(e);
                parts.add(e.encoded_len(), |s| s.kv.push(e));
            }
        }
    }
    parts.finish()
}

/// Another datacenter's instances as far as `caller` may read their
/// services (the nodes are the other datacenter's).
fn remote_to_proto(
    caller: &Caller,
    dc: &str,
    instances: &[weft_api::catalog::ServiceInstance],
) -> proto::RemoteInstances {
    proto::RemoteInstances {
        datacenter: dc.to_string(),
        instances: instances
            .iter()
            .filter(|i| may_read_instance(caller, i))
            .map(instance_to_proto)
            .collect(),
    }
}

/// Whether `caller` may see `change` (KV changes only with `include_kv`).
fn may_see(caller: &Caller, change: &Change, include_kv: bool) -> bool {
    let can = |r| caller.can(r, Access::Read);
    match change {
        Change::KvUpsert(_) | Change::KvDelete(_) if !include_kv => false,
        Change::NodeUpsert(n) => can(Resource::Node(&n.name)),
        Change::NodeDelete(name) => can(Resource::Node(name)),
        Change::InstanceUpsert(i) => may_read_instance(caller, i),
        Change::InstanceDelete { node, service, .. } => {
            can(Resource::Node(node)) && can(Resource::Service(service))
        }
        Change::VipAssigned { service, .. } | Change::VipReleased { service, .. } => {
            can(Resource::Service(weft_api::vip::split_key(service).0))
        }
        Change::IntentionUpsert(i) => may_access(caller, &i.destination, Access::Read),
        Change::IntentionDelete { destination, .. } => {
            may_access(caller, destination, Access::Read)
        }
        Change::ConfigUpsert(e) => may_read_entry(caller, e.entry.kind().as_str(), e.entry.name()),
        Change::ConfigDelete { kind, name } => may_read_entry(caller, kind, name),
        Change::KvUpsert(e) => can(Resource::Key(&e.key)),
        Change::KvDelete(key) => can(Resource::Key(key)),
        // Where other datacenters' gateways are: what agents and gateways
        // route by, nothing secret.
        Change::CaBundle { .. } | Change::Federation(_) => true,
        // Filtered by service in `changes_event`.
        Change::Remote { .. } => true,
        Change::Acl | Change::Replaced => false,
    }
}

fn change_to_proto(change: &Change) -> Option<proto::Change> {
    let c = match change {
        Change::NodeUpsert(n) => P::NodeUpsert(node_to_proto(n)),
        Change::NodeDelete(name) => P::NodeDelete(name.clone()),
        Change::InstanceUpsert(i) => P::InstanceUpsert(instance_to_proto(i)),
        Change::InstanceDelete { node, id, .. } => P::InstanceDelete(proto::InstanceRef {
            node: node.clone(),
            id: id.clone(),
        }),
        Change::VipAssigned { service, vip } => P::VipAssigned(proto::ServiceVip {
            service: service.clone(),
            vip: vip.to_string(),
        }),
        Change::VipReleased { service, vip } => P::VipReleased(proto::ServiceVip {
            service: service.clone(),
            vip: vip.to_string(),
        }),
        Change::IntentionUpsert(i) => P::IntentionUpsert(intention_to_proto(i)),
        Change::IntentionDelete {
            source,
            destination,
        } => P::IntentionDelete(proto::IntentionRef {
            source: source.clone(),
            destination: destination.clone(),
        }),
        Change::ConfigUpsert(e) => P::ConfigUpsert(entry_to_proto(e)),
        Change::ConfigDelete { kind, name } => P::ConfigDelete(proto::ConfigRef {
            kind: kind.clone(),
            name: name.clone(),
        }),
        Change::KvUpsert(e) => P::KvUpsert(kv_to_proto(e)),
        Change::KvDelete(key) => P::KvDelete(key.clone()),
        Change::CaBundle {
            trust_domain,
            roots_pem,
        } => P::CaBundle(proto::CaBundle {
            trust_domain: trust_domain.clone(),
            roots_pem: roots_pem.clone(),
        }),
        Change::Federation(f) => P::Federation(f.to_proto()),
        Change::Remote { .. } => return None,
        Change::Acl | Change::Replaced => return None,
    };
    Some(proto::Change { change: Some(c) })
}

/// The part of a write's changes that `caller` may see; None when that is
/// nothing (the subscriber does not even learn that a write happened).
fn changes_event(
    index: u64,
    changes: &[Change],
    caller: &Caller,
    include_kv: bool,
) -> Option<proto::WatchEvent> {
    let visible: Vec<proto::Change> = changes
        .iter()
        .filter(|c| may_see(caller, c, include_kv))
        .filter_map(|c| match c {
            Change::Remote {
                datacenter,
                instances,
            } => Some(proto::Change {
                change: Some(P::Remote(remote_to_proto(caller, datacenter, instances))),
            }),
            c => change_to_proto(c),
        })
        .collect();
    (!visible.is_empty()).then_some(proto::WatchEvent {
        index,
        event: Some(Event::Changes(proto::ChangeSet { changes: visible })),
    })
}

fn snapshot_events(
    state: &State,
    default_allow: bool,
    caller: &Caller,
    include_kv: bool,
) -> Vec<proto::WatchEvent> {
    snapshot_parts(
        state,
        default_allow,
        caller,
        include_kv,
        SNAPSHOT_PART_BYTES,
    )
    .into_iter()
    .map(|part| proto::WatchEvent {
        index: state.index,
        event: Some(Event::Snapshot(part)),
    })
    .collect()
}

/// What a subscriber gets first, taken under the state's read lock together
/// with its subscription, so that nothing falls between the two.
/// None when the caller's standing changed since it was judged (a token
/// deleted or changed, a certificate's node gone while the stream waited
/// to catch up): changes from then on would not show it.
fn start(
    node: &ServerNode,
    from: u64,
    caller: &Caller,
    include_kv: bool,
) -> Option<(broadcast::Receiver<HubEvent>, Vec<proto::WatchEvent>, u64)> {
    let state = node.shared.state.read().expect("state lock");
    if !state.still_stands(&caller.standing) {
        return None;
    }
    let rx = node.shared.hub.subscribe();
    let first = match (from > 0)
        .then(|| node.shared.hub.since(from, state.index))
        .flatten()
    {
        Some(changes) if from <= state.index => changes
            .iter()
            .filter_map(|(index, changes)| changes_event(*index, changes, caller, include_kv))
            .collect(),
        _ => snapshot_events(&state, node.default_allow, caller, include_kv),
    };
    Some((rx, first, state.index))
}

/// A new snapshot for the subscriber whose token is `secret`, as its token
/// now allows (None: the token is gone): the caller, the index, the events.
fn resnapshot(
    node: &ServerNode,
    secret: &str,
    include_kv: bool,
) -> Option<(Caller, u64, Vec<proto::WatchEvent>)> {
    let state = node.shared.state.read().expect("state lock");
    let caller = resolve_in(&state, &node.datacenter, secret)?;
    let events = snapshot_events(&state, node.default_allow, &caller, include_kv);
    Some((caller, state.index, events))
}

/// Whether `changes` take the node of the certificate `caller` was
/// authenticated by out of the catalog.
fn removes_certificates_node(caller: &Caller, changes: &[Change]) -> bool {
    let Standing::NodeCertificate { node, .. } = &caller.standing else {
        return false;
    };
    (changes.iter()).any(|c| matches!(c, Change::NodeDelete(name) if name == node))
}

/// Ends a stream whose token was deleted.
async fn token_gone(tx: &EventSender) {
    let _ = tx
        .send(Err(Status::unauthenticated("ACL token not found")))
        .await;
}

async fn stream_changes(
    node: Arc<ServerNode>,
    from: u64,
    include_kv: bool,
    tx: EventSender,
    mut caller: Caller,
    secret: String,
) {
    let _open = crate::metrics::StreamGuard::open(&node.metrics.watch_streams);
    if from > 0 {
        // A subscriber resuming from an index this server has not applied yet
        // waits for it rather than going back in time.
        // (A command index, not Raft's: batches put it ahead of the log's.)
        let caught_up = node
            .shared
            .wait_for_index(from, Duration::from_secs(10))
            .await;
        // Still behind: a server out of contact is refused (the subscriber
        // goes to another); one in contact holds what the cluster committed
        // a moment ago, so the subscriber's index is of another history (a
        // cluster that lost its data) and it gets a snapshot of this one.
        if !caught_up && !node.contact.in_contact() {
            let _ = tx.try_send(Err(out_of_contact(&node)));
            return;
        }
    }
    let Some((mut rx, first, mut last)) = start(&node, from, &caller, include_kv) else {
        let changed =
            "the token or node certificate changed as the stream started: subscribe again";
        let _ = tx.try_send(Err(Status::unauthenticated(changed)));
        return;
    };
    for event in first {
        if tx.send(Ok(event)).await.is_err() {
            return;
        }
    }
    // A node certificate speaks until it expires (a stream opened just
    // before would otherwise outlive it), and while its node stays.
    let valid_until = caller.valid_until;
    let expiry = async move {
        match valid_until {
            Some(t) => {
                tokio::time::sleep(
                    t.duration_since(std::time::SystemTime::now())
                        .unwrap_or_default(),
                )
                .await
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expiry);
    loop {
        let event = tokio::select! {
            e = rx.recv() => e,
            _ = tx.closed() => return,
            () = &mut expiry => {
                let gone = Status::unauthenticated("the node certificate expired");
                let _ = tx.try_send(Err(gone));
                return;
            }
            _ = node.contact.lost() => {
                // Not waiting on a subscriber that does not read: if its
                // queue is full, the stream just ends.
                let _ = tx.try_send(Err(out_of_contact(&node)));
                return;
            }
        };
        let out = match event {
            Ok(HubEvent::Changes(index, changes))
                if index > last && changes.iter().any(|c| matches!(c, Change::Acl)) =>
            {
                match resnapshot(&node, &secret, include_kv) {
                    Some((again, index, events)) => {
                        (caller, last) = (again, index);
                        events
                    }
                    None => return token_gone(&tx).await,
                }
            }
            Ok(HubEvent::Changes(index, changes))
                if index > last && removes_certificates_node(&caller, &changes) =>
            {
                let gone = Status::unauthenticated(
                    "the node certificate's node left the catalog: it speaks for nothing",
                );
                let _ = tx.try_send(Err(gone));
                return;
            }
            Ok(HubEvent::Changes(index, changes)) if index > last => {
                last = index;
                match changes_event(index, &changes, &caller, include_kv) {
                    Some(event) => vec![event],
                    None => continue,
                }
            }
            Ok(HubEvent::Changes(..)) => continue,
            Ok(HubEvent::Reset(_)) | Err(broadcast::error::RecvError::Lagged(_)) => {
                match resnapshot(&node, &secret, include_kv) {
                    Some((again, index, events)) => {
                        (caller, last) = (again, index);
                        events
                    }
                    None => return token_gone(&tx).await,
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        for event in out {
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_stay_under_the_bound_and_only_the_last_says_done() {
        let mut parts = Parts::new(100);
        for i in 0..10 {
            parts.add(30, |s| {
                s.kv.push(proto::KvEntry {
                    key: format!("k{i}"),
                    ..Default::default()
                })
            });
        }
        // One item larger than the bound gets a part of its own.
        parts.add(500, |s| {
            s.kv.push(proto::KvEntry {
                key: "big".into(),
                ..Default::default()
            })
        });
        let parts = parts.finish();
        let keys: Vec<String> = parts
            .iter()
            .flat_map(|p| p.kv.iter().map(|e| e.key.clone()))
            .collect();
        assert_eq!(keys.len(), 11);
        assert!(parts.iter().all(|p| p.kv.len() <= 3), "{parts:?}");
        assert_eq!(parts.last().unwrap().kv[0].key, "big");
        assert!(parts[..parts.len() - 1].iter().all(|p| p.more));
        assert!(!parts.last().unwrap().more);
        assert_eq!(Parts::new(10).finish().len(), 1);
    }
}
