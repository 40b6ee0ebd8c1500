//! `weft.v1.Watch`: a full snapshot, then every change in index order.
//!
//! A subscriber that resumes with `from_index` gets only the changes after
//! it, if this server still keeps them; otherwise (or when the state was
//! replaced) a new snapshot. A server that is behind the index a subscriber
//! resumes from first waits to catch up, so a subscriber never goes back.
//!
//! A stream shows only what its token may read: nodes, instances (service
//! and node read), virtual IPs and config entries (service read),
//! intentions (intentions read on the destination), KV (key read); the
//! trust bundle goes to every authenticated subscriber. When ACLs change,
//! the stream looks its token up again: a deleted token ends the stream,
//! otherwise a new snapshot filtered by the new rights follows.
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
use super::config::entry_to_proto;
use super::intentions::may_access;
use crate::node::ServerNode;
use crate::state::{Change, State};
use crate::watch::HubEvent;

pub struct WatchApi(pub Arc<ServerNode>);

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
        let secret = secret_of(&req).unwrap_or_default().to_string();
        let from = req.into_inner().from_index;
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(stream_changes(self.0.clone(), from, tx, caller, secret));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The state as a watch snapshot, as far as `caller` may read it.
pub fn snapshot_of(state: &State, default_allow: bool, caller: &Caller) -> proto::StateSnapshot {
    proto::StateSnapshot {
        nodes: state
            .nodes
            .values()
            .filter(|n| caller.can(Resource::Node(&n.name), Access::Read))
            .map(node_to_proto)
            .collect(),
        instances: state
            .instances
            .values()
            .flat_map(|m| m.values())
            .filter(|i| may_read_instance(caller, i))
            .map(instance_to_proto)
            .collect(),
        vips: state
            .vips
            .iter()
            .filter(|(service, _)| caller.can(Resource::Service(service), Access::Read))
            .map(|(service, vip)| proto::ServiceVip {
                service: service.clone(),
                vip: vip.to_string(),
            })
            .collect(),
        intentions: state
            .all_intentions()
            .filter(|i| may_access(caller, &i.destination, Access::Read))
            .map(intention_to_proto)
            .collect(),
        config_entries: state
            .config
            .values()
            .flat_map(|m| m.values())
            .filter(|e| caller.can(Resource::Service(e.entry.name()), Access::Read))
            .map(entry_to_proto)
            .collect(),
        kv: state
            .kv
            .values()
            .filter(|e| caller.can(Resource::Key(&e.key), Access::Read))
            .map(kv_to_proto)
            .collect(),
        ca: state.ca.as_ref().map(|ca| proto::CaBundle {
            trust_domain: ca.trust_domain.clone(),
            roots_pem: ca.roots.iter().map(|r| r.cert_pem.clone()).collect(),
        }),
        default_allow,
    }
}

/// Whether `caller` may see `change`.
fn may_see(caller: &Caller, change: &Change) -> bool {
    let can = |r| caller.can(r, Access::Read);
    match change {
        Change::NodeUpsert(n) => can(Resource::Node(&n.name)),
        Change::NodeDelete(name) => can(Resource::Node(name)),
        Change::InstanceUpsert(i) => may_read_instance(caller, i),
        Change::InstanceDelete { node, service, .. } => {
            can(Resource::Node(node)) && can(Resource::Service(service))
        }
        Change::VipAssigned { service, .. } => can(Resource::Service(service)),
        Change::IntentionUpsert(i) => may_access(caller, &i.destination, Access::Read),
        Change::IntentionDelete { destination, .. } => {
            may_access(caller, destination, Access::Read)
        }
        Change::ConfigUpsert(e) => can(Resource::Service(e.entry.name())),
        Change::ConfigDelete { name, .. } => can(Resource::Service(name)),
        Change::KvUpsert(e) => can(Resource::Key(&e.key)),
        Change::KvDelete(key) => can(Resource::Key(key)),
        Change::CaBundle { .. } => true,
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
        Change::Acl | Change::Replaced => return None,
    };
    Some(proto::Change { change: Some(c) })
}

/// The part of a write's changes that `caller` may see; None when that is
/// nothing (the subscriber does not even learn that a write happened).
fn changes_event(index: u64, changes: &[Change], caller: &Caller) -> Option<proto::WatchEvent> {
    let visible: Vec<proto::Change> = changes
        .iter()
        .filter(|c| may_see(caller, c))
        .filter_map(change_to_proto)
        .collect();
    (!visible.is_empty()).then_some(proto::WatchEvent {
        index,
        event: Some(Event::Changes(proto::ChangeSet { changes: visible })),
    })
}

fn snapshot_event(state: &State, default_allow: bool, caller: &Caller) -> proto::WatchEvent {
    proto::WatchEvent {
        index: state.index,
        event: Some(Event::Snapshot(snapshot_of(state, default_allow, caller))),
    }
}

/// What a subscriber gets first, taken under the state's read lock together
/// with its subscription, so that nothing falls between the two.
fn start(
    node: &ServerNode,
    from: u64,
    caller: &Caller,
) -> (broadcast::Receiver<HubEvent>, Vec<proto::WatchEvent>, u64) {
    let state = node.shared.state.read().expect("state lock");
    let rx = node.shared.hub.subscribe();
    let first = match (from > 0)
        .then(|| node.shared.hub.since(from, state.index))
        .flatten()
    {
        Some(changes) if from <= state.index => changes
            .iter()
            .filter_map(|(index, changes)| changes_event(*index, changes, caller))
            .collect(),
        _ => vec![snapshot_event(&state, node.default_allow, caller)],
    };
    (rx, first, state.index)
}

/// A new snapshot for the subscriber whose token is `secret`, as its token
/// now allows (None: the token is gone): the caller, the index, the event.
fn resnapshot(node: &ServerNode, secret: &str) -> Option<(Caller, u64, proto::WatchEvent)> {
    let state = node.shared.state.read().expect("state lock");
    let caller = resolve_in(&state, &node.datacenter, secret)?;
    let event = snapshot_event(&state, node.default_allow, &caller);
    Some((caller, state.index, event))
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
    tx: EventSender,
    mut caller: Caller,
    secret: String,
) {
    if from > 0 {
        // A subscriber resuming from an index this server has not applied yet
        // waits for it rather than going back in time.
        let _ = node
            .raft
            .wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(Some(from), "watch resume")
            .await;
    }
    let (mut rx, first, mut last) = start(&node, from, &caller);
    for event in first {
        if tx.send(Ok(event)).await.is_err() {
            return;
        }
    }
    loop {
        let event = tokio::select! {
            e = rx.recv() => e,
            _ = tx.closed() => return,
        };
        let out = match event {
            Ok(HubEvent::Changes(index, changes))
                if index > last && changes.iter().any(|c| matches!(c, Change::Acl)) =>
            {
                match resnapshot(&node, &secret) {
                    Some((again, index, event)) => {
                        (caller, last) = (again, index);
                        event
                    }
                    None => return token_gone(&tx).await,
                }
            }
            Ok(HubEvent::Changes(index, changes)) if index > last => {
                last = index;
                match changes_event(index, &changes, &caller) {
                    Some(event) => event,
                    None => continue,
                }
            }
            Ok(HubEvent::Changes(..)) => continue,
            Ok(HubEvent::Reset(_)) | Err(broadcast::error::RecvError::Lagged(_)) => {
                match resnapshot(&node, &secret) {
                    Some((again, index, event)) => {
                        (caller, last) = (again, index);
                        event
                    }
                    None => return token_gone(&tx).await,
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if tx.send(Ok(out)).await.is_err() {
            return;
        }
    }
}
