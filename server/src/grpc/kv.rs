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
use crate::state::Command;

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
        let what = format!("kv put {}", r.key);
        let cmd = Command::KvPut {
            key: r.key,
            value: r.value,
            cas: r.cas,
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
        let list = read(&self.0, r.read, |s| proto::KvList {
            entries: s
                .kv
                .range(r.prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&r.prefix))
                .filter(|(k, _)| caller.can(Resource::Key(k), Access::Read))
                .map(|(_, e)| kv_to_proto(e))
                .collect(),
            index: s.index,
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
