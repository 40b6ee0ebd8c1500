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
        let list = read(&self.0, r.read, |s| {
            use std::ops::Bound::{Excluded, Included, Unbounded};
            let from = if r.after.is_empty() || r.after < r.prefix {
                Included(r.prefix.clone())
            } else {
                Excluded(r.after.clone())
            };
            let keys =
                s.kv.range::<String, _>((from, Unbounded))
                    .take_while(|(k, _)| k.starts_with(&r.prefix));
            let readable = |key: &str| caller.can(Resource::Key(key), Access::Read);
            let page = Page::fill(limit, keys, readable);
            proto::KvList {
                next: page.next(),
                entries: page.entries,
                index: s.index,
            }
        })
        .await?;
        Ok(Response::new(list))
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
/// Most keys one page of a list examines, readable by the token or not.
pub const LIST_PAGE_EXAMINED: usize = 10 * LIST_PAGE_ENTRIES;

/// One page of a list: entries until the count or the byte bound is reached.
struct Page {
    entries: Vec<proto::KvEntry>,
    bytes: usize,
    limit: usize,
    byte_limit: usize,
    /// A key left out: the list goes on after the last one taken.
    full: bool,
    /// Keys left unexamined: the list goes on after this one.
    resume: Option<String>,
}

impl Page {
    fn new(limit: usize, byte_limit: usize) -> Self {
        Self {
            entries: Vec::new(),
            bytes: 0,
            limit,
            byte_limit,
            full: false,
            resume: None,
        }
    }

    /// A page of `limit` entries at most of `keys` (in order) that are
    /// `readable`. A token that reads few of many keys would otherwise walk
    /// them all in one read of the state (which holds the lock the Raft
    /// apply needs): a page examines at most [`LIST_PAGE_EXAMINED`] keys,
    /// and the list goes on after the last.
    fn fill<'a>(
        limit: usize,
        keys: impl Iterator<Item = (&'a String, &'a weft_api::kv::KvEntry)>,
        readable: impl Fn(&str) -> bool,
    ) -> Page {
        let mut page = Page::new(limit, LIST_PAGE_BYTES);
        let mut examined: Option<&String> = None;
        for (n, (key, entry)) in keys.enumerate() {
            if let (LIST_PAGE_EXAMINED, Some(last)) = (n, examined) {
                page.resume = Some(last.clone());
                break;
            }
            examined = Some(key);
            if readable(key) && !page.add(kv_to_proto(entry)) {
                break;
            }
        }
        page
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
        if let Some(key) = &self.resume {
            return key.clone();
        }
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
    fn a_page_examines_a_bounded_number_of_keys_readable_or_not() {
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
        // A token that reads one key in 10,000: the first page stops after
        // LIST_PAGE_EXAMINED keys with the one it found, and says where
        // the list goes on.
        let readable = |k: &str| k.ends_with("0000") || k.ends_with("9999");
        let page = Page::fill(LIST_PAGE_ENTRIES, kv.iter(), readable);
        let keys: Vec<&str> = page.entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["k/00000", "k/09999"]);
        assert_eq!(page.next(), "k/09999");
        let rest = kv.range::<String, _>((
            std::ops::Bound::Excluded(page.next()),
            std::ops::Bound::Unbounded,
        ));
        let page = Page::fill(LIST_PAGE_ENTRIES, rest, readable);
        let keys: Vec<&str> = page.entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["k/10000", "k/19999"]);
        assert_eq!(page.next(), "k/19999");
        // A token that reads everything fills a page before the bound.
        let page = Page::fill(LIST_PAGE_ENTRIES, kv.iter(), |_| true);
        assert_eq!(page.entries.len(), LIST_PAGE_ENTRIES);
        assert_eq!(page.next(), "k/00999");
    }
}
