//! `weft.v1.Operator`: cluster members, and saving and restoring the state.
//!
//! Members needs `operator:read`. Snapshots need a management token; a
//! saved snapshot never carries the CA (its private keys stay on the
//! servers), and a restore keeps the cluster's CA.
use std::sync::Arc;

use tonic::{Request, Response, Status};
use weft_api::acl::{Access, Resource};
use weft_api::proto::{self, operator_server::Operator};

use super::auth::caller;
use super::{invalid, read, write};
use crate::node::ServerNode;
use crate::state::{Command, State};

pub struct OperatorApi(pub Arc<ServerNode>);

#[tonic::async_trait]
impl Operator for OperatorApi {
    async fn members(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::MemberList>, Status> {
        caller(&self.0, &req)
            .await?
            .require(Resource::Operator, Access::Read)?;
        let mut members = Vec::new();
        let mut leader_id = 0;
        for (id, addr) in &self.0.peers {
            let member = match self.0.peer_status(*id).await {
                Some(status) => {
                    if status.role == "leader" {
                        leader_id = *id;
                    }
                    proto::Member {
                        id: *id,
                        raft_addr: addr.clone(),
                        role: status.role,
                        last_applied: status.last_applied,
                        last_log_index: status.last_log_index,
                        term: status.term,
                    }
                }
                None => proto::Member {
                    id: *id,
                    raft_addr: addr.clone(),
                    role: "unreachable".into(),
                    ..Default::default()
                },
            };
            members.push(member);
        }
        Ok(Response::new(proto::MemberList { members, leader_id }))
    }

    async fn snapshot_save(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::SnapshotData>, Status> {
        let caller = caller(&self.0, &req).await?;
        caller.require_management()?;
        let (state, index) = read(&self.0, None, |s| {
            let mut saved = s.clone();
            saved.ca = None;
            (serde_json::to_vec(&saved), s.index)
        })
        .await?;
        let state = state.map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(accessor = %caller.accessor, index, "snapshot saved");
        Ok(Response::new(proto::SnapshotData { state, index }))
    }

    async fn snapshot_restore(
        &self,
        req: Request<proto::SnapshotData>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let caller = caller(&self.0, &req).await?;
        caller.require_management()?;
        let data = req.into_inner();
        let state: State = serde_json::from_slice(&data.state)
            .map_err(|e| invalid(format!("snapshot: not a weft state document: {e}")))?;
        state
            .check()
            .map_err(|e| invalid(format!("snapshot: {e}")))?;
        let cmd = Command::Restore(Box::new(state));
        Ok(Response::new(
            write(&self.0, &caller, "snapshot restore", cmd).await?,
        ))
    }
}
