//! `weft.v1.Watch`: a full snapshot, then every change in index order.
//!
//! A subscriber that resumes with `from_index` gets only the changes after
//! it, if this server still keeps them; otherwise (or when the state was
//! replaced) a new snapshot. A server that is behind the index a subscriber
//! resumes from first waits to catch up, so a subscriber never goes back.
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use weft_api::convert::{instance_to_proto, intention_to_proto, kv_to_proto, node_to_proto};
use weft_api::proto::{self, change::Change as P, watch_event::Event, watch_server::Watch};

use super::config::entry_to_proto;
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
        let from = req.into_inner().from_index;
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(stream_changes(self.0.clone(), from, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The whole state as a watch snapshot.
pub fn snapshot_of(state: &State, default_allow: bool) -> proto::StateSnapshot {
    proto::StateSnapshot {
        nodes: state.nodes.values().map(node_to_proto).collect(),
        instances: state
            .instances
            .values()
            .flat_map(|m| m.values())
            .map(instance_to_proto)
            .collect(),
        vips: state
            .vips
            .iter()
            .map(|(service, vip)| proto::ServiceVip {
                service: service.clone(),
                vip: vip.to_string(),
            })
            .collect(),
        intentions: state.all_intentions().map(intention_to_proto).collect(),
        config_entries: state
            .config
            .values()
            .flat_map(|m| m.values())
            .map(entry_to_proto)
            .collect(),
        kv: state.kv.values().map(kv_to_proto).collect(),
        ca: state.ca.as_ref().map(|ca| proto::CaBundle {
            trust_domain: ca.trust_domain.clone(),
            roots_pem: ca.roots.iter().map(|r| r.cert_pem.clone()).collect(),
        }),
        default_allow,
    }
}

fn change_to_proto(change: &Change) -> Option<proto::Change> {
    let c = match change {
        Change::NodeUpsert(n) => P::NodeUpsert(node_to_proto(n)),
        Change::NodeDelete(name) => P::NodeDelete(name.clone()),
        Change::InstanceUpsert(i) => P::InstanceUpsert(instance_to_proto(i)),
        Change::InstanceDelete { node, id } => P::InstanceDelete(proto::InstanceRef {
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
        Change::Replaced => return None,
    };
    Some(proto::Change { change: Some(c) })
}

fn changes_event(index: u64, changes: &[Change]) -> proto::WatchEvent {
    proto::WatchEvent {
        index,
        event: Some(Event::Changes(proto::ChangeSet {
            changes: changes.iter().filter_map(change_to_proto).collect(),
        })),
    }
}

fn snapshot_event(state: &State, default_allow: bool) -> proto::WatchEvent {
    proto::WatchEvent {
        index: state.index,
        event: Some(Event::Snapshot(snapshot_of(state, default_allow))),
    }
}

/// What a subscriber gets first, taken under the state's read lock together
/// with its subscription, so that nothing falls between the two.
fn start(
    node: &ServerNode,
    from: u64,
) -> (broadcast::Receiver<HubEvent>, Vec<proto::WatchEvent>, u64) {
    let state = node.shared.state.read().expect("state lock");
    let rx = node.shared.hub.subscribe();
    let first = match (from > 0)
        .then(|| node.shared.hub.since(from, state.index))
        .flatten()
    {
        Some(changes) if from <= state.index => changes
            .iter()
            .map(|(index, changes)| changes_event(*index, changes))
            .collect(),
        _ => vec![snapshot_event(&state, node.default_allow)],
    };
    (rx, first, state.index)
}

async fn stream_changes(node: Arc<ServerNode>, from: u64, tx: EventSender) {
    if from > 0 {
        // A subscriber resuming from an index this server has not applied yet
        // waits for it rather than going back in time.
        let _ = node
            .raft
            .wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(Some(from), "watch resume")
            .await;
    }
    let (mut rx, first, mut last) = start(&node, from);
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
            Ok(HubEvent::Changes(index, changes)) if index > last => {
                last = index;
                changes_event(index, &changes)
            }
            Ok(HubEvent::Changes(..)) => continue,
            Ok(HubEvent::Reset(_)) | Err(broadcast::error::RecvError::Lagged(_)) => {
                let state = node.shared.state.read().expect("state lock");
                last = state.index;
                snapshot_event(&state, node.default_allow)
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if tx.send(Ok(out)).await.is_err() {
            return;
        }
    }
}
