//! `weft.v1.Kv`: the key/value store, with check-and-set on modify indexes.
use std::sync::Arc;

use tonic::{Request, Response, Status};
use weft_api::convert::kv_to_proto;
use weft_api::kv::{validate_key, MAX_VALUE_BYTES};
use weft_api::proto::{self, kv_server::Kv};

use super::{invalid, read};
use crate::node::ServerNode;
use crate::state::Command;

pub struct KvApi(pub Arc<ServerNode>);

#[tonic::async_trait]
impl Kv for KvApi {
    async fn put(
        &self,
        req: Request<proto::KvPutRequest>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let r = req.into_inner();
        validate_key(&r.key).map_err(invalid)?;
        if r.value.len() > MAX_VALUE_BYTES {
            return Err(invalid(format!(
                "value: {} bytes is more than the limit of {MAX_VALUE_BYTES}",
                r.value.len()
            )));
        }
        let cmd = Command::KvPut {
            key: r.key,
            value: r.value,
            cas: r.cas,
        };
        Ok(Response::new(proto::WriteResult {
            index: self.0.write(cmd).await?,
        }))
    }

    async fn get(
        &self,
        req: Request<proto::KvGetRequest>,
    ) -> Result<Response<proto::KvEntry>, Status> {
        let r = req.into_inner();
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
        let r = req.into_inner();
        let list = read(&self.0, r.read, |s| proto::KvList {
            entries: s
                .kv
                .range(r.prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&r.prefix))
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
        let r = req.into_inner();
        validate_key(&r.key).map_err(invalid)?;
        let cmd = Command::KvDelete {
            key: r.key,
            cas: r.cas,
        };
        Ok(Response::new(proto::WriteResult {
            index: self.0.write(cmd).await?,
        }))
    }
}
