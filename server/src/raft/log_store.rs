//! The Raft log, vote and committed index in sled. Every append and vote is
//! flushed (fsync) before openraft is told it is durable.
//!
//! (openraft 0.9 waits for each append to be durable before it appends
//! again, so fsyncs cannot be grouped here; the leader groups writes into
//! entries instead, see `batch`.)
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError, Vote};

use super::{LogId, NodeId, StorageError, TypeConfig};

type Entry = openraft::Entry<TypeConfig>;

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// Log entries keyed by big-endian index (so sled orders them), and the
/// vote, committed and last-purged ids in a metadata tree.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    logs: sled::Tree,
    meta: sled::Tree,
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_logs(&e).into()
}
fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

impl LogStore {
    pub fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        Ok(Self {
            db: db.clone(),
            logs: db.open_tree("raft_log")?,
            meta: db.open_tree("raft_meta")?,
        })
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        match self.meta.get(key).map_err(read_err)? {
            Some(bytes) => Ok(Some(super::codec::decode(&bytes).map_err(read_err)?)),
            None => Ok(None),
        }
    }

    async fn put_meta<T: serde::Serialize>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<(), StorageError> {
        let bytes = super::codec::encode(value).map_err(write_err)?;
        self.meta.insert(key, bytes).map_err(write_err)?;
        self.db.flush_async().await.map_err(write_err)?;
        Ok(())
    }

    /// Whether this store has ever held a vote or a log entry (a server that
    /// has been part of a cluster).
    pub fn is_empty(&self) -> Result<bool, StorageError> {
        Ok(self.get_meta::<Vote<NodeId>>(VOTE)?.is_none() && self.logs.is_empty())
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        self.logs
            .range::<[u8; 8], _>((start, end))
            .map(|item| {
                let (_, bytes) = item.map_err(read_err)?;
                super::codec::decode(&bytes).map_err(read_err)
            })
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.get_meta(LAST_PURGED)?;
        let last_log_id = match self.logs.last().map_err(read_err)? {
            Some((_, bytes)) => {
                let entry: Entry = super::codec::decode(&bytes).map_err(read_err)?;
                Some(entry.log_id)
            }
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta(VOTE, vote)
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not flushed on its own: losing it only means re-applying entries.
        let bytes = super::codec::encode(&committed).map_err(write_err)?;
        self.meta.insert(COMMITTED, bytes).map_err(write_err)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = super::codec::encode(&entry).map_err(write_err)?;
            batch.insert(&index_key(entry.log_id.index), bytes);
        }
        self.logs.apply_batch(batch).map_err(write_err)?;
        let flushed = self.db.flush_async().await.map(|_| ());
        let result = flushed.map_err(|e| std::io::Error::other(e.to_string()));
        let failed = result.as_ref().err().map(|e| e.to_string());
        callback.log_io_completed(result);
        match failed {
            Some(e) => Err(StorageIOError::write_logs(&std::io::Error::other(e)).into()),
            None => Ok(()),
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let keys: Vec<_> = self
            .logs
            .range(index_key(log_id.index)..)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(write_err)?;
        for key in keys {
            self.logs.remove(key).map_err(write_err)?;
        }
        self.db.flush_async().await.map_err(write_err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.put_meta(LAST_PURGED, &log_id).await?;
        let keys: Vec<_> = self
            .logs
            .range(..=index_key(log_id.index))
            .keys()
            .collect::<Result<_, _>>()
            .map_err(write_err)?;
        for key in keys {
            self.logs.remove(key).map_err(write_err)?;
        }
        Ok(())
    }
}
