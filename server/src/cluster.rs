//! Cluster formation: servers started with the same `--peer` list form one
//! cluster by themselves. The server with the lowest id initializes it, and
//! only if no peer reports an initialized cluster already (a server whose data
//! dir was wiped must rejoin, not start a second cluster). The others wait to
//! be contacted by the leader.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;

use crate::node::ServerNode;

/// Runs until the cluster is initialized (by this server or another).
pub async fn form(node: Arc<ServerNode>) {
    if node.raft.is_initialized().await.unwrap_or(false) {
        return;
    }
    let lowest = node.peers.keys().next().copied();
    if lowest != Some(node.id) {
        tracing::info!("waiting for server {lowest:?} to initialize the cluster");
        return;
    }
    loop {
        let mut others_initialized = false;
        for id in node.peers.keys().filter(|id| **id != node.id) {
            if node.peer_status(*id).await.is_some_and(|s| s.initialized) {
                others_initialized = true;
            }
        }
        if others_initialized {
            tracing::info!("the cluster exists already; waiting for its leader");
            return;
        }
        let members: BTreeMap<u64, BasicNode> = node
            .peers
            .iter()
            .map(|(id, addr)| (*id, BasicNode::new(addr)))
            .collect();
        match node.raft.initialize(members).await {
            Ok(()) => {
                tracing::info!(servers = node.peers.len(), "cluster initialized");
                return;
            }
            Err(e) if node.raft.is_initialized().await.unwrap_or(false) => {
                tracing::info!("cluster already initialized: {e}");
                return;
            }
            Err(e) => {
                tracing::warn!("initializing the cluster failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
