//! The Raft state machine: applies committed commands to the in-memory
//! `State`, publishes their changes to watchers, and builds, stores (in sled)
//! and installs snapshots. On start it loads the last snapshot; openraft then
//! re-applies the committed log entries after it.
use std::io::Cursor;
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::{LogId, NodeId, StorageError, TypeConfig};
use crate::state::{CommandResult, State};
use crate::watch::WatchHub;

const CURRENT: &str = "current";

/// The state and the watch hub, shared with the API layer.
pub struct Shared {
    pub state: RwLock<State>,
    pub hub: WatchHub,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

#[derive(Clone)]
pub struct StateMachineStore {
    shared: Arc<Shared>,
    applied: Option<LogId>,
    membership: StoredMembership<NodeId, BasicNode>,
    snapshots: sled::Tree,
    snapshot_seq: u64,
}

fn sm_read(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_state_machine(&e).into()
}
fn snap_write(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_snapshot(None, &e).into()
}

impl StateMachineStore {
    /// Opens the store, loading the last snapshot if there is one.
    pub fn open(db: &sled::Db, vip_cidr: Option<String>) -> Result<Self, StorageError> {
        let snapshots = db.open_tree("snapshots").map_err(sm_read)?;
        let mut store = Self {
            shared: Arc::new(Shared {
                state: RwLock::new(State {
                    vip_cidr,
                    ..State::default()
                }),
                hub: WatchHub::new(),
            }),
            applied: None,
            membership: StoredMembership::default(),
            snapshots,
            snapshot_seq: 0,
        };
        if let Some(stored) = store.load_snapshot()? {
            let state: State = super::codec::decode(&stored.data).map_err(sm_read)?;
            *store.shared.state.write().expect("state lock") = state;
            // The changes up to the snapshot are not in the hub: a watcher
            // resuming from before it needs a snapshot, not the changes
            // re-applied after it alone.
            let index = stored.meta.last_log_id.map_or(0, |id| id.index);
            store.shared.hub.reset(index);
            store.applied = stored.meta.last_log_id;
            store.membership = stored.meta.last_membership;
        }
        Ok(store)
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    fn load_snapshot(&self) -> Result<Option<StoredSnapshot>, StorageError> {
        match self.snapshots.get(CURRENT).map_err(sm_read)? {
            Some(bytes) => Ok(Some(super::codec::decode(&bytes).map_err(sm_read)?)),
            None => Ok(None),
        }
    }

    async fn save_snapshot(&self, stored: &StoredSnapshot) -> Result<(), StorageError> {
        let bytes = super::codec::encode(stored).map_err(snap_write)?;
        self.snapshots.insert(CURRENT, bytes).map_err(snap_write)?;
        self.snapshots.flush_async().await.map_err(snap_write)?;
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let data = {
            let state = self.shared.state.read().expect("state lock");
            super::codec::encode(&*state).map_err(sm_read)?
        };
        self.snapshot_seq += 1;
        let snapshot_id = match self.applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, self.snapshot_seq),
            None => format!("empty-{}", self.snapshot_seq),
        };
        let meta = SnapshotMeta {
            last_log_id: self.applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot { meta, data };
        self.save_snapshot(&stored).await?;
        tracing::info!(snapshot = %stored.meta.snapshot_id, bytes = stored.data.len(), "snapshot built");
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, BasicNode>), StorageError> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        let mut state = self.shared.state.write().expect("state lock");
        for entry in entries {
            let index = entry.log_id.index;
            self.applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => {
                    state.index = index;
                    results.push(CommandResult::Applied { index });
                }
                EntryPayload::Normal(cmd) => {
                    let (result, changes) = state.apply(cmd, index);
                    self.shared.hub.publish(index, changes);
                    results.push(result);
                }
                EntryPayload::Membership(m) => {
                    state.index = index;
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    results.push(CommandResult::Applied { index });
                }
            }
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let new_state: State = super::codec::decode(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let index = meta.last_log_id.map_or(0, |id| id.index);
        {
            let mut state = self.shared.state.write().expect("state lock");
            *state = new_state;
            state.index = index;
            self.shared.hub.reset(index);
        }
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.save_snapshot(&StoredSnapshot {
            meta: meta.clone(),
            data,
        })
        .await?;
        tracing::info!(snapshot = %meta.snapshot_id, index, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.load_snapshot()?.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}
