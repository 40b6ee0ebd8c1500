//! Raft for weft-server: openraft's type configuration, the sled-backed log
//! and state-machine stores, and the gRPC transport between servers; write
//! batching and pre-vote, which see the server they run in through
//! [`Member`].

// openraft's traits return its StorageError (224 bytes); our helpers that
// feed them return the same type rather than boxing and unboxing it.
#![allow(clippy::result_large_err)]

pub mod batch;
pub mod codec;
pub mod log_store;
pub mod network;
pub mod peer_status;
pub mod prevote;
pub mod service;
pub mod sm_store;

use std::future::Future;
use std::io::Cursor;

use crate::state::{Command, CommandResult};

/// What pre-vote ([`prevote::run`]) and the switch to batched writes
/// ([`batch::enable_when_all_apply`]) need of the server they run in, so
/// that they do not depend on the node (`node::ServerNode` implements it).
pub trait Member: Send + Sync + 'static {
    /// This server's Raft id.
    fn id(&self) -> NodeId;
    /// This server's Raft handle.
    fn raft(&self) -> &Raft;
    /// When this server last heard from a leader.
    fn leader_contact(&self) -> &prevote::LeaderContact;
    /// Voter `id`'s answer to `Status` (this server's own for its id);
    /// `None` when it did not answer.
    fn peer_status(
        &self,
        id: NodeId,
    ) -> impl Future<Output = Option<peer_status::PeerStatus>> + Send;
}

openraft::declare_raft_types!(
    /// weft's Raft types: commands on the replicated state, u64 node ids.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type NodeId = u64;
pub type StorageError = openraft::StorageError<NodeId>;
pub type LogId = openraft::LogId<NodeId>;
