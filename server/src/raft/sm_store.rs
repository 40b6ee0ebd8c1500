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
    /// The last log id applied to `state` and the membership then: changed
    /// only with `state`'s write lock held, so that a snapshot built under
    /// its read lock says exactly what it holds (openraft builds snapshots
    /// while it goes on applying).
    applied: std::sync::Mutex<(Option<LogId>, StoredMembership<NodeId, BasicNode>)>,
    /// `state.index` as it grows, for those who wait for an index.
    index: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    /// Waits (up to `limit`) until the state has applied index `index`;
    /// false if it has not by then.
    pub async fn wait_for_index(&self, index: u64, limit: std::time::Duration) -> bool {
        let mut rx = self.index.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|i| *i >= index))
            .await
            .is_ok_and(|r| r.is_ok())
    }
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
                applied: Default::default(),
                index: tokio::sync::watch::Sender::new(0),
            }),
            applied: None,
            membership: StoredMembership::default(),
            snapshots,
            snapshot_seq: 0,
        };
        if let Some(stored) = store.load_snapshot()? {
            let mut state: State = super::codec::decode(&stored.data).map_err(sm_read)?;
            state.index = stored.meta.last_log_id.map_or(0, |id| id.index) + state.index_ahead;
            store.shared.index.send_replace(state.index);
            // The changes up to the snapshot are not in the hub: a watcher
            // resuming from before it needs a snapshot, not the changes
            // re-applied after it alone.
            store.shared.hub.reset(state.index);
            *store.shared.state.write().expect("state lock") = state;
            store.applied = stored.meta.last_log_id;
            store.membership = stored.meta.last_membership;
            store.record_applied();
        }
        Ok(store)
    }

    /// Copies what was applied into `shared` (call it with the state's
    /// write lock held).
    fn record_applied(&self) {
        *self.shared.applied.lock().expect("applied lock") =
            (self.applied, self.membership.clone());
    }

    /// Tells those waiting for an index (call it with the state's write
    /// lock held).
    fn record_index(&self, state: &State) {
        self.shared.index.send_replace(state.index);
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
        let (data, (applied, membership)) = {
            let state = self.shared.state.read().expect("state lock");
            let applied = self.shared.applied.lock().expect("applied lock").clone();
            (super::codec::encode(&*state).map_err(sm_read)?, applied)
        };
        self.snapshot_seq += 1;
        let snapshot_id = match applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, self.snapshot_seq),
            None => format!("empty-{}", self.snapshot_seq),
        };
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
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
            let log_index = entry.log_id.index;
            self.applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => {
                    state.index = state.next_index(log_index);
                    results.push(CommandResult::Applied { index: state.index });
                }
                EntryPayload::Normal(cmd) => {
                    let (result, published) = state.apply_entry(cmd, log_index);
                    for (index, changes) in published {
                        self.shared.hub.publish(index, changes);
                    }
                    results.push(result);
                }
                EntryPayload::Membership(m) => {
                    state.index = state.next_index(log_index);
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    results.push(CommandResult::Applied { index: state.index });
                }
            }
            state.index_ahead = state.index - log_index;
        }
        self.record_applied();
        self.record_index(&state);
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
        let log_index = meta.last_log_id.map_or(0, |id| id.index);
        let index = {
            let mut state = self.shared.state.write().expect("state lock");
            *state = new_state;
            // Ahead of the log's by as much as on the server that built it
            // (0 in a snapshot of an earlier version).
            state.index = log_index + state.index_ahead;
            self.record_index(&state);
            self.shared.hub.reset(state.index);
            self.applied = meta.last_log_id;
            self.membership = meta.last_membership.clone();
            self.record_applied();
            state.index
        };
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::Command;
    use openraft::{CommittedLeaderId, Entry};

    fn entry(index: u64, cmd: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: openraft::LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(cmd),
        }
    }

    pub(crate) fn put(key: &str) -> Command {
        Command::KvPut {
            key: key.into(),
            value: b"v".to_vec(),
            cas: None,
            flags: 0,
            lock: None,
        }
    }

    fn store() -> (tempfile::TempDir, StateMachineStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let store = StateMachineStore::open(&db, None).unwrap();
        (dir, store)
    }

    /// A server that starts from a snapshot goes on with the same indexes as
    /// the server that built it, after batches put them ahead of the log's.
    #[tokio::test]
    async fn indexes_ahead_of_the_log_survive_a_snapshot() {
        let (_a, mut leader) = store();
        leader
            .apply([
                entry(1, put("a")),
                entry(2, Command::Batch(vec![put("b"), put("c"), put("d")])),
            ])
            .await
            .unwrap();
        assert_eq!(leader.shared.state.read().unwrap().index, 4);
        let snapshot = leader.build_snapshot().await.unwrap();
        assert_eq!(snapshot.meta.last_log_id.unwrap().index, 2);

        let (_b, mut follower) = store();
        follower
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        assert_eq!(follower.shared.state.read().unwrap().index, 4);
        for s in [&mut leader, &mut follower] {
            s.apply([entry(3, put("e"))]).await.unwrap();
            let state = s.shared.state.read().unwrap();
            assert_eq!((state.index, state.kv["e"].modify_index), (5, 5));
        }
        assert!(
            follower
                .shared
                .wait_for_index(5, std::time::Duration::from_millis(10))
                .await
        );
    }

    /// A snapshot of an earlier version (no `index_ahead`) starts at its
    /// log index, as that version did, even if its state said more.
    #[tokio::test]
    async fn a_snapshot_of_before_batches_starts_at_its_log_index() {
        let (_a, mut leader) = store();
        leader.apply([entry(1, put("a"))]).await.unwrap();
        let mut snapshot = leader.build_snapshot().await.unwrap();
        let mut old: State = super::super::codec::decode(snapshot.snapshot.get_ref()).unwrap();
        old.index = 7; // built while later entries applied (the old race)
        old.index_ahead = 0;
        snapshot.snapshot = Box::new(Cursor::new(super::super::codec::encode(&old).unwrap()));
        let (_b, mut follower) = store();
        follower
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        assert_eq!(follower.shared.state.read().unwrap().index, 1);
    }
}
