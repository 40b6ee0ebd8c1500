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
                    .take_while(|(k, _)| k.starts_with(&r.prefix))
                    .filter(|(k, _)| caller.can(Resource::Key(k), Access::Read));
            let mut page = Page::new(limit, LIST_PAGE_BYTES);
            for (_, entry) in keys {
                if !page.add(kv_to_proto(entry)) {
                    break;
                }
            }
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
}
