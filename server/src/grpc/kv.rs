//! `weft.v1.Kv`: the key/value store, with check-and-set on modify indexes.
//! Keys are guarded by `key` and `key_prefix` rules; lists are filtered.
use std::sync::Arc;

use tonic::{Request, Response, Status};
use weft_api::acl::{Access, Resource, ResourceKind};
use weft_api::convert::kv_to_proto;
use weft_api::kv::{validate_key, MAX_VALUE_BYTES};
use weft_api::proto::{self, kv_server::Kv};

use super::auth::caller;
use super::{invalid, read, write};
use crate::node::ServerNode;
use crate::state::{Command, KvLock};

pub struct KvApi(pub Arc<ServerNode>);

#[tonic::async_trait]
impl Kv for KvApi {
    async fn put(
        &self,
        req: Request<proto::KvPutRequest>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let caller = caller(&self.0, &req).await?;
        let r = req.into_inner();
        caller.require(Resource::Key(&r.key), Access::Write)?;
        validate_key(&r.key).map_err(invalid)?;
        if r.value.len() > MAX_VALUE_BYTES {
            return Err(invalid(format!(
                "value: {} bytes is more than the limit of {MAX_VALUE_BYTES}",
                r.value.len()
            )));
        }
        {
            let state = self.0.shared.state.read().expect("state lock");
            self.0.limits.check_kv_put(&state, &r.key, r.value.len())?;
        }
        for id in [&r.acquire, &r.release] {
            if !id.is_empty() {
                super::session::check_id(id)?;
            }
        }
        let lock = match (r.acquire.is_empty(), r.release.is_empty()) {
            (true, true) => None,
            (false, true) => Some(KvLock::Acquire {
                session: r.acquire,
                now_ms: super::ca::unix_now_ms(),
            }),
            (true, false) => Some(KvLock::Release { session: r.release }),
            (false, false) => return Err(invalid("acquire and release: not both in one write")),
        };
        let what = format!("kv put {}", r.key);
        let cmd = Command::KvPut {
            key: r.key,
            value: r.value,
            cas: r.cas,
            flags: r.flags,
            lock,
        };
        Ok(Response::new(write(&self.0, &caller, &what, cmd).await?))
    }

    async fn get(
        &self,
        req: Request<proto::KvGetRequest>,
    ) -> Result<Response<proto::KvEntry>, Status> {
        let caller = caller(&self.0, &req).await?;
        let r = req.into_inner();
        caller.require(Resource::Key(&r.key), Access::Read)?;
        validate_key(&r.key).map_err(invalid)?;
        let found = read(&self.0, r.read, |s| s.kv.get(&r.key).map(kv_to_proto)).await?;
        found
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("key {:?} not found", r.key)))
    }

    async fn list(
        &self,
        req: Request<proto::KvListRequest>,
    ) -> Result<Response<proto::KvList>, Status> {
        let caller = caller(&self.0, &req).await?;
        caller.require_any_read(ResourceKind::Key)?;
        let r = req.into_inner();
        let limit = match r.limit {
            0 => LIST_PAGE_ENTRIES,
            n => (n as usize).min(LIST_PAGE_ENTRIES),
        };
        // A token that reads few of many keys walks them all for a page:
        // in chunks of LIST_CHUNK_EXAMINED keys, each one read of the
        // state (whose lock the Raft apply needs), the first after the
        // read barrier (the later ones need none: the first made the read
        // as recent as the caller asked). Where a chunk stopped stays
        // here: a cursor the caller saw would name a key it may not read.
        let readable = |key: &str| caller.can(Resource::Key(key), Access::Read);
        let mut page = Page::new(limit, LIST_PAGE_BYTES);
        let mut after = r.after.clone();
        let mut options = r.read;
        let stale = proto::ReadOptions {
            stale: true,
            ..Default::default()
        };
        let mut first_index = None;
        for _ in 0..LIST_CHUNKS {
            let now = options.replace(stale.clone());
            let (cut, index) = read(&self.0, now, |s| {
                use std::ops::Bound::{Excluded, Included, Unbounded};
                let from = if after.is_empty() || after < r.prefix {
                    Included(r.prefix.clone())
                } else {
                    Excluded(after.clone())
                };
                let keys =
                    s.kv.range::<String, _>((from, Unbounded))
                        .take_while(|(k, _)| k.starts_with(&r.prefix));
                (page.fill(keys, readable), s.index)
            })
            .await?;
            // The first chunk's index: the later ones' may be newer than
            // what the page holds from the first (never higher than what
            // the answer reflects).
            let index = *first_index.get_or_insert(index);
            match cut {
                Some(last) => {
                    after = last;
                    tokio::task::yield_now().await;
                }
                None => {
                    return Ok(Response::new(proto::KvList {
                        next: page.next(),
                        entries: page.entries,
                        index,
                    }))
                }
            }
        }
        Err(Status::resource_exhausted(format!(
            "more than {} keys under {:?} before a page of what this token may read: \
             list a narrower prefix",
            LIST_CHUNKS * LIST_CHUNK_EXAMINED,
            r.prefix
        )))
    }

    async fn delete(
        &self,
        req: Request<proto::KvDeleteRequest>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let caller = caller(&self.0, &req).await?;
        let r = req.into_inner();
        if r.recurse {
            caller.require_under(ResourceKind::Key, &r.key, Access::Write)?;
            if r.cas.is_some() {
                return Err(invalid("cas: not with a recursive delete"));
            }
            if !r.key.is_empty() {
                validate_key(&r.key).map_err(invalid)?;
            }
            let what = format!("kv delete tree {:?}", r.key);
            let cmd = Command::KvDeleteTree { prefix: r.key };
            return Ok(Response::new(write(&self.0, &caller, &what, cmd).await?));
        }
        caller.require(Resource::Key(&r.key), Access::Write)?;
        validate_key(&r.key).map_err(invalid)?;
        let what = format!("kv delete {}", r.key);
        let cmd = Command::KvDelete {
            key: r.key,
            cas: r.cas,
        };
        Ok(Response::new(write(&self.0, &caller, &what, cmd).await?))
    }
}

/// Entries of one `Kv.List` page at most.
pub const LIST_PAGE_ENTRIES: usize = 1000;
/// Bytes of one page at most (one larger entry still gets a page).
pub const LIST_PAGE_BYTES: usize = 1 << 20;
/// Most keys one read of the state examines for a list, readable by the
/// token or not (a page takes as many such reads as it needs).
pub const LIST_CHUNK_EXAMINED: usize = 10 * LIST_PAGE_ENTRIES;
/// Most such reads for one page: a token that reads too few of the keys
/// under a prefix to fill a page from 100,000 is asked for a narrower one.
pub const LIST_CHUNKS: usize = 10;

/// One page of a list: entries until the count or the byte bound is reached.
struct Page {
    entries: Vec<proto::KvEntry>,
    bytes: usize,
    limit: usize,
    byte_limit: usize,
    /// A key left out: the list goes on after the last one taken.
    full: bool,
}

impl Page {
    fn new(limit: usize, byte_limit: usize) -> Self {
        Self {
            entries: Vec::new(),
            bytes: 0,
            limit,
            byte_limit,
            full: false,
        }
    }

    /// Adds the `readable` ones of `keys` (in order) until the page is
    /// full or [`LIST_CHUNK_EXAMINED`] keys were examined: then the last
    /// key examined, where the next chunk goes on (None: the page is done,
    /// full or at the keys' end).
    fn fill<'a>(
        &mut self,
        keys: impl Iterator<Item = (&'a String, &'a weft_api::kv::KvEntry)>,
        readable: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let mut examined: Option<&String> = None;
        for (n, (key, entry)) in keys.enumerate() {
            if let (LIST_CHUNK_EXAMINED, Some(last)) = (n, examined) {
                return Some(last.clone());
            }
            examined = Some(key);
            if readable(key) && !self.add(kv_to_proto(entry)) {
                return None;
            }
        }
        None
    }

    /// Takes `entry` if there is room; false once the page is full.
    fn add(&mut self, entry: proto::KvEntry) -> bool {
        use prost::Message;
        let size = entry.encoded_len();
        let room = self.entries.len() < self.limit
            && (self.entries.is_empty() || self.bytes + size <= self.byte_limit);
        if !room {
            self.full = true;
            return false;
        }
        self.bytes += size;
        self.entries.push(entry);
        true
    }

    /// Where the next page starts, when there is one.
    fn next(&self) -> String {
        match (self.full, self.entries.last()) {
            (true, Some(last)) => last.key.clone(),
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, bytes: usize) -> proto::KvEntry {
        proto::KvEntry {
            key: key.into(),
            value: vec![0; bytes],
            ..Default::default()
        }
    }

    #[test]
    fn a_page_ends_at_its_count_or_bytes_and_says_where_to_go_on() {
        let mut p = Page::new(2, 1 << 20);
        assert!(p.add(entry("a", 1)) && p.add(entry("b", 1)));
        assert!(!p.add(entry("c", 1)));
        assert_eq!(p.next(), "b");
        let mut p = Page::new(10, 100);
        assert!(p.add(entry("a", 500)), "a first entry always fits");
        assert!(!p.add(entry("b", 1)));
        assert_eq!(p.next(), "a");
        let mut p = Page::new(10, 100);
        assert!(p.add(entry("a", 1)));
        assert_eq!(p.next(), "", "the last page");
    }

    #[test]
    fn a_chunk_examines_a_bounded_number_of_keys_and_the_page_names_only_readable_ones() {
        let kv: std::collections::BTreeMap<String, weft_api::kv::KvEntry> = (0..25_000)
            .map(|i| {
                let key = format!("k/{i:05}");
                let entry = weft_api::kv::KvEntry {
                    key: key.clone(),
                    ..Default::default()
                };
                (key, entry)
            })
            .collect();
        let from = |after: &str| {
            kv.range::<String, _>((
                std::ops::Bound::Excluded(after.to_string()),
                std::ops::Bound::Unbounded,
            ))
        };
        // A token that reads one key in 10,000: each chunk stops after
        // LIST_CHUNK_EXAMINED keys and the next goes on after it, into the
        // same page; the page's end names a key the token read, never one
        // of the others.
        let readable = |k: &str| k.ends_with("0000") || k.ends_with("9999");
        let mut page = Page::new(LIST_PAGE_ENTRIES, LIST_PAGE_BYTES);
        let cut = page.fill(kv.iter(), readable);
        assert_eq!(cut.as_deref(), Some("k/09999"));
        let cut = page.fill(from("k/09999"), readable);
        assert_eq!(cut.as_deref(), Some("k/19999"));
        assert_eq!(page.fill(from("k/19999"), readable), None);
        let keys: Vec<&str> = page.entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["k/00000", "k/09999", "k/10000", "k/19999", "k/20000"]
        );
        assert_eq!(page.next(), "", "the last page");
        // A page filled within a chunk ends at its last entry.
        let mut page = Page::new(LIST_PAGE_ENTRIES, LIST_PAGE_BYTES);
        assert_eq!(page.fill(kv.iter(), |_| true), None);
        assert_eq!(page.entries.len(), LIST_PAGE_ENTRIES);
        assert_eq!(page.next(), "k/00999");
        // A token that reads none: chunk after chunk, an empty last page.
        let mut page = Page::new(LIST_PAGE_ENTRIES, LIST_PAGE_BYTES);
        let mut after: Option<String> = None;
        let mut chunks = 0;
        loop {
            chunks += 1;
            let cut = match &after {
                None => page.fill(kv.iter(), |_| false),
                Some(a) => page.fill(from(a), |_| false),
            };
            match cut {
                Some(last) => after = Some(last),
                None => break,
            }
        }
        assert_eq!(chunks, 3);
        assert!(page.entries.is_empty() && page.next().is_empty());
    }
}
