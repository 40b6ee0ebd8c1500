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

/// Role shown for a server that says it leads a term older than another
/// server's: it has not yet learned that it was replaced (a restarted or
/// cut-off ex-leader, for a moment).
pub const STALE_LEADER: &str = "stale-leader";

/// Pure: the leader of `members` as their statuses show it: the one saying
/// it leads whose term is the highest any member knows (0: none, e.g. in an
/// election). Any other server saying it leads is shown as
/// [`STALE_LEADER`], so that the list never shows two leaders.
pub fn settle_leader(members: &mut [proto::Member]) -> u64 {
    let newest = members.iter().map(|m| m.term).max().unwrap_or(0);
    let mut leader = 0;
    for m in members.iter_mut().filter(|m| m.role == "leader") {
        if m.term == newest && leader == 0 {
            leader = m.id;
        } else {
            m.role = STALE_LEADER.into();
        }
    }
    leader
}

#[tonic::async_trait]
impl Operator for OperatorApi {
    async fn datacenters(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::DatacenterList>, Status> {
        caller(&self.0, &req)
            .await?
            .require(Resource::Operator, Access::Read)?;
        let node = &self.0;
        let s = node.shared.state.read().expect("state lock");
        let mut names: std::collections::BTreeSet<&str> =
            s.federation.keys().map(String::as_str).collect();
        names.insert(node.datacenter.as_str());
        let datacenters = names
            .into_iter()
            .map(|name| {
                let state = s.federation.get(name);
                proto::Datacenter {
                    name: name.to_string(),
                    primary: name == node.primary_datacenter,
                    local: name == node.datacenter,
                    gateways: state
                        .map(|f| f.gateways.iter().map(|g| g.to_string()).collect())
                        .unwrap_or_default(),
                    updated_ms: state.map_or(0, |f| f.updated_ms),
                    instances: s.remote.get(name).map_or(0, |r| r.len() as u32),
                }
            })
            .collect();
        Ok(Response::new(proto::DatacenterList { datacenters }))
    }

    async fn members(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::MemberList>, Status> {
        caller(&self.0, &req)
            .await?
            .require(Resource::Operator, Access::Read)?;
        let mut members = Vec::new();
        for (id, addr) in &self.0.peers {
            let member = match self.0.peer_status(*id).await {
                Some(status) => proto::Member {
                    id: *id,
                    raft_addr: addr.clone(),
                    role: status.role,
                    last_applied: status.last_applied,
                    last_log_index: status.last_log_index,
                    term: status.term,
                },
                None => proto::Member {
                    id: *id,
                    raft_addr: addr.clone(),
                    role: "unreachable".into(),
                    ..Default::default()
                },
            };
            members.push(member);
        }
        let leader_id = settle_leader(&mut members);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, role: &str, term: u64) -> proto::Member {
        proto::Member {
            id,
            role: role.into(),
            term,
            ..Default::default()
        }
    }

    #[test]
    fn one_leader_at_most_the_newest_terms() {
        // A restarted ex-leader still says it leads term 3; server 2 leads 4.
        let mut m = vec![
            member(1, "leader", 3),
            member(2, "leader", 4),
            member(3, "follower", 4),
        ];
        assert_eq!(settle_leader(&mut m), 2);
        assert_eq!(m[0].role, STALE_LEADER);
        assert_eq!(m[1].role, "leader");
        // An election under way (a candidate at term 5): nobody leads yet.
        let mut m = vec![
            member(1, "leader", 4),
            member(2, "candidate", 5),
            member(3, "follower", 4),
        ];
        assert_eq!(settle_leader(&mut m), 0);
        assert_eq!(m[0].role, STALE_LEADER);
        // The usual case, and an unreachable member (term 0) changing nothing.
        let mut m = vec![
            member(1, "follower", 7),
            member(2, "leader", 7),
            member(3, "unreachable", 0),
        ];
        assert_eq!(settle_leader(&mut m), 2);
        assert_eq!(m[1].role, "leader");
    }
}
