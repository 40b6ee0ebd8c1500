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

    /// Entries from `start` up to `end`, stopping once they pass one
    /// append's bytes ([`super::network::APPEND_BYTES`]; at least one
    /// entry): replication asks for up to `max_payload_entries`, and a
    /// follower far behind on 512 KiB values would otherwise have the
    /// leader read and decode hundreds of megabytes per append, of which
    /// the transport sends one.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        let mut entries = Vec::new();
        let mut bytes = 0;
        for item in self.logs.range(index_key(start)..index_key(end)) {
            let (_, value) = item.map_err(read_err)?;
            bytes += value.len();
            if !entries.is_empty() && bytes > super::network::APPEND_BYTES {
                break;
            }
            entries.push(super::codec::decode(&value).map_err(read_err)?);
        }
        Ok(entries)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A store holding entries 1..=count, each a KV write of `bytes` bytes.
    fn store_with(count: u64, bytes: usize) -> (tempfile::TempDir, LogStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let store = LogStore::open(&db).unwrap();
        for index in 1..=count {
            let entry = super::super::network::tests::put(index, bytes);
            let encoded = super::super::codec::encode(&entry).unwrap();
            store.logs.insert(index_key(index), encoded).unwrap();
        }
        (dir, store)
    }

    #[tokio::test]
    async fn a_replication_read_stops_at_one_appends_bytes() {
        use super::super::network::APPEND_BYTES;
        // 256 KiB values: three and their framing fit in 1 MiB, four do not.
        let (_dir, mut store) = store_with(20, 256 << 10);
        let read = store.limited_get_log_entries(1, 21).await.unwrap();
        assert_eq!(read.len(), 3);
        assert_eq!(read[0].log_id.index, 1);
        assert_eq!(read[2].log_id.index, 3);
        // From the middle, the same bound.
        let read = store.limited_get_log_entries(10, 21).await.unwrap();
        assert_eq!(
            read.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            [10, 11, 12]
        );

        // An entry larger than the bound alone is still read (never none).
        let (_dir, mut store) = store_with(3, APPEND_BYTES + 1);
        assert_eq!(store.limited_get_log_entries(2, 4).await.unwrap().len(), 1);

        // Small entries: the whole range asked for, no more.
        let (_dir, mut store) = store_with(600, 100);
        assert_eq!(
            store.limited_get_log_entries(1, 513).await.unwrap().len(),
            512
        );
    }
}
