//! Raft's transport, server side: the `weft.v1.Raft` gRPC service that peers
//! call. Besides openraft's three RPCs it takes writes forwarded by followers,
//! answers read-index requests, and tells whether this server's cluster is
//! initialized (used while servers form a cluster).
use std::sync::Arc;

use serde::Serialize;

use tonic::{Request, Response, Status};
use weft_api::proto::raft_server::Raft as RaftRpc;
use weft_api::proto::{Empty, RaftPayload, WriteResult};

use crate::node::{ForwardedResult, ServerNode};
use crate::state::Command;

pub struct RaftService {
    node: Arc<ServerNode>,
}

impl RaftService {
    pub fn new(node: Arc<ServerNode>) -> Self {
        Self { node }
    }

    /// A leader's append or snapshot chunk counts as contact when it
    /// arrives, as Raft resets its election timer, not once it is stored: a
    /// large append on a busy machine can take longer to store than the
    /// election timeout, and its follower (every follower, for a large
    /// write) would stand for election while hearing its leader. Only a
    /// leader's vote (committed) at least as new as this server's counts:
    /// a deposed leader's messages do not.
    fn heard_if_current(&self, vote: &openraft::Vote<super::NodeId>) {
        let current = self.node.raft.metrics().borrow().vote;
        if vote.is_committed() && *vote >= current {
            self.node.leader_contact.heard();
        }
    }

    /// Refuses a Raft message meant for another server id: a `--peer` list
    /// that gives one server's address for another must not let a server
    /// answer (and be counted) twice. Peers of earlier versions name no
    /// target and are taken as before.
    fn check_addressed(&self, req: &Request<RaftPayload>) -> Result<(), Status> {
        let Some(to) = req.metadata().get(RAFT_TARGET) else {
            return Ok(());
        };
        match to.to_str().ok().and_then(|s| s.parse::<u64>().ok()) {
            Some(id) if id == self.node.id => Ok(()),
            _ => Err(Status::failed_precondition(format!(
                "this is server {}, not {:?}: check the sender's --peer list",
                self.node.id, to
            ))),
        }
    }
}

/// The metadata key naming the server a Raft message is for.
pub const RAFT_TARGET: &str = "x-weft-raft-to";

fn decode<T: serde::de::DeserializeOwned>(req: Request<RaftPayload>) -> Result<T, Status> {
    super::codec::decode(&req.into_inner().json)
        .map_err(|e| Status::invalid_argument(format!("bad raft payload: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Response<RaftPayload>, Status> {
    let json = super::codec::encode(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftPayload { json }))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        self.check_addressed(&req)?;
        let rpc: openraft::raft::AppendEntriesRequest<super::TypeConfig> = decode(req)?;
        self.heard_if_current(&rpc.vote);
        let result = self.node.raft.append_entries(rpc).await;
        if matches!(&result, Ok(r) if !matches!(r, openraft::raft::AppendEntriesResponse::HigherVote(_)))
        {
            self.node.leader_contact.heard();
        }
        encode(&result)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.check_addressed(&req)?;
        let result = self.node.raft.vote(decode(req)?).await;
        if matches!(&result, Ok(r) if r.vote_granted) {
            self.node.leader_contact.heard();
        }
        encode(&result)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        self.check_addressed(&req)?;
        let rpc: openraft::raft::InstallSnapshotRequest<super::TypeConfig> = decode(req)?;
        let vote = rpc.vote;
        self.heard_if_current(&vote);
        let result = self.node.raft.install_snapshot(rpc).await;
        // openraft answers a stale leader's chunk Ok too, with its own vote.
        if matches!(&result, Ok(r) if r.vote == vote) {
            self.node.leader_contact.heard();
        }
        encode(&result)
    }

    async fn forward_write(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let cmd: Command = decode(req)?;
        let result: ForwardedResult = self.node.write_as_leader(cmd).await;
        encode(&result)
    }

    async fn forward_heartbeat(
        &self,
        req: Request<weft_api::proto::HeartbeatRequest>,
    ) -> Result<Response<Empty>, Status> {
        let node = req.into_inner().node;
        weft_api::names::validate_name(&node)
            .map_err(|e| Status::invalid_argument(format!("node: {e}")))?;
        self.node
            .heartbeat_as_leader(&node)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(Empty {}))
    }

    async fn read_index(&self, _req: Request<Empty>) -> Result<Response<WriteResult>, Status> {
        let index = self
            .node
            .read_index_as_leader()
            .await
            .map_err(Status::from)?;
        Ok(Response::new(WriteResult { index }))
    }

    async fn traffic(
        &self,
        req: Request<weft_api::proto::TopRequest>,
    ) -> Result<Response<weft_api::proto::TrafficReport>, Status> {
        let window = crate::grpc::telemetry::window(req.get_ref())?;
        let now = crate::grpc::telemetry::now_secs();
        let (pairs, _covered) = self.node.traffic.window(now, u64::from(window));
        Ok(Response::new(weft_api::proto::TrafficReport {
            node: String::new(),
            pairs,
        }))
    }

    async fn traffic_series(
        &self,
        req: Request<weft_api::proto::SeriesRequest>,
    ) -> Result<Response<weft_api::proto::SlotReports>, Status> {
        let (window, _) = crate::grpc::telemetry::series_shape(req.get_ref())?;
        let now = crate::grpc::telemetry::now_secs();
        let slots = self
            .node
            .traffic
            .slots_into(now, u64::from(window), &req.get_ref().service);
        Ok(Response::new(weft_api::proto::SlotReports { slots }))
    }

    async fn status(&self, _req: Request<Empty>) -> Result<Response<RaftPayload>, Status> {
        encode(&self.node.local_status().await)
    }
}
