//! A running server's Raft node and what the API needs from it: writes (on
//! the leader, or forwarded to it), linearizable or stale reads, and the
//! shared state.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, RaftError};
use weft_api::proto::raft_client::RaftClient;
use weft_api::proto::{Empty, RaftPayload};

use crate::raft::network::PeerChannels;
use crate::raft::peer_status::PeerStatus;
use crate::raft::sm_store::Shared;
use crate::raft::{NodeId, Raft};
use crate::state::{Command, CommandResult};

/// How long a write or a read waits for a leader before giving up.
const LEADER_WAIT: Duration = Duration::from_secs(10);

pub use crate::write_error::{ForwardedResult, WriteError};

pub struct ServerNode {
    pub id: NodeId,
    pub raft: Raft,
    pub shared: Arc<Shared>,
    /// Peers' Raft addresses by id.
    pub peers: BTreeMap<NodeId, String>,
    /// The intention default this server applies ("allow" in dev mode).
    pub default_allow: bool,
    /// How long a virtual IP nothing holds is kept before the leader gives
    /// it back (`--vip-release-after`).
    pub vip_release_after: Duration,
    /// Lifetime of leaf certificates as the operator set it (`--leaf-ttl`),
    /// None when not set: the CA is created with it (72 h when None), and
    /// while this server leads it writes a new setting into the CA.
    pub leaf_ttl_secs: Option<u64>,
    /// Mutual-TLS channels to peers (forwarded writes, read index, status).
    pub peer_channels: PeerChannels,
    /// This cluster's datacenter: nodes register in it, node identities of
    /// other datacenters grant nothing here.
    pub datacenter: String,
    /// The federation's primary datacenter (this one when not federated).
    pub primary_datacenter: String,
    /// Agents' heartbeats, as the leader heard them.
    pub liveness: crate::liveness::Liveness,
    /// What a write may add (checked where it is received).
    pub limits: crate::limits::Limits,
    /// Agents' traffic reports sent to this server.
    pub traffic: crate::traffic::TrafficStore,
    /// What Prometheus scrapes on the HTTP port.
    pub metrics: Arc<crate::metrics::ServerMetrics>,
    /// Groups this leader's writes into Raft entries.
    pub batcher: crate::raft::batch::Batcher,
    /// When this server last heard from a leader (for pre-vote).
    pub leader_contact: crate::raft::prevote::LeaderContact,
    /// Whether this server is in contact with its cluster (watch streams
    /// are served only while it is).
    pub contact: crate::contact::Contact,
    /// This server's TLS for calls to other datacenters' servers, once it
    /// is federated (`--federation-addr`): `?dc=` forwards with it.
    pub federation_tls: std::sync::OnceLock<tonic::transport::ClientTlsConfig>,
}

impl crate::raft::Member for ServerNode {
    fn id(&self) -> NodeId {
        self.id
    }

    fn raft(&self) -> &Raft {
        &self.raft
    }

    fn leader_contact(&self) -> &crate::raft::prevote::LeaderContact {
        &self.leader_contact
    }

    async fn peer_status(&self, id: NodeId) -> Option<PeerStatus> {
        ServerNode::peer_status(self, id).await
    }
}

impl ServerNode {
    /// Applies `cmd` through Raft: here if this server leads, otherwise on
    /// the leader. Waits for a leader (up to a limit) during elections.
    pub async fn write(&self, cmd: Command) -> Result<u64, WriteError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            let attempt = match self.raft.current_leader().await {
                Some(leader) if leader == self.id => self.write_as_leader(cmd.clone()).await,
                Some(leader) => self.forward(leader, &cmd).await,
                None => Err(WriteError::NoLeader("election in progress".into())),
            };
            // The command carries its request id (`Command::Once`): a retry
            // after an unknown outcome is answered, not applied again.
            match attempt {
                Err(WriteError::NoLeader(why) | WriteError::Unknown(why))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tracing::debug!("write waits for a leader: {why}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => {
                    self.metrics.write(match &other {
                        Ok(_) => "applied",
                        Err(WriteError::Refused(_)) => "refused",
                        Err(WriteError::NoLeader(_)) => "no_leader",
                        Err(WriteError::Unknown(_)) => "unknown",
                        Err(WriteError::Raft(_)) => "error",
                    });
                    return other;
                }
            }
        }
    }

    /// Writes on this server, which must be the leader (grouped with
    /// concurrent writes, see `raft::batch`).
    pub async fn write_as_leader(&self, cmd: Command) -> ForwardedResult {
        self.leads_in_contact()?;
        match self.batcher.write(cmd).await {
            Ok(CommandResult::Applied { index }) => Ok(index),
            Ok(CommandResult::Refused { reason }) => Err(WriteError::Refused(reason)),
            Ok(CommandResult::Batch(_)) => {
                Err(WriteError::Raft("a batch result for one write".into()))
            }
            Err(WriteError::NoLeader(why)) => {
                Err(WriteError::NoLeader(format!("server {}: {why}", self.id)))
            }
            Err(e) => Err(e),
        }
    }

    async fn forward(&self, leader: NodeId, cmd: &Command) -> ForwardedResult {
        let mut client = self.peer_client(leader)?;
        let json = crate::raft::codec::encode(cmd).map_err(|e| WriteError::Raft(e.to_string()))?;
        let reply = client
            .forward_write(RaftPayload { json })
            .await
            .map_err(|s| WriteError::Unknown(format!("forwarded to {leader}: {}", s.message())))?;
        crate::raft::codec::decode(&reply.into_inner().json)
            .map_err(|e| WriteError::Raft(e.to_string()))?
    }

    /// Records a heartbeat of `node`'s agent: here if this server leads,
    /// otherwise on the leader.
    pub async fn heartbeat(&self, node: &str) -> Result<(), WriteError> {
        match self.raft.current_leader().await {
            Some(leader) if leader == self.id => {
                self.leads_in_contact()?;
                self.liveness.heard(node, std::time::Instant::now());
                Ok(())
            }
            Some(leader) => {
                let mut client = self.peer_client(leader)?;
                client
                    .forward_heartbeat(weft_api::proto::HeartbeatRequest {
                        node: node.to_string(),
                    })
                    .await
                    .map_err(|s| {
                        WriteError::NoLeader(format!("forwarding to {leader}: {}", s.message()))
                    })?;
                Ok(())
            }
            None => Err(WriteError::NoLeader("election in progress".into())),
        }
    }

    /// A heartbeat handed over by a follower: taken only by the leader.
    pub async fn heartbeat_as_leader(&self, node: &str) -> Result<(), WriteError> {
        if self.raft.current_leader().await != Some(self.id) {
            return Err(WriteError::NoLeader(format!(
                "server {} is not the leader",
                self.id
            )));
        }
        self.leads_in_contact()?;
        self.liveness.heard(node, std::time::Instant::now());
        Ok(())
    }

    /// Refuses what only a leader its quorum still answers may take: a
    /// leader cut off from the others (which openraft does not depose
    /// until it hears of a newer term) would take writes it cannot commit,
    /// and heartbeats the leader the others elected never hears of.
    fn leads_in_contact(&self) -> Result<(), WriteError> {
        if self.contact.in_contact() {
            return Ok(());
        }
        Err(WriteError::NoLeader(format!(
            "server {} leads, but no quorum has answered it for {:?}",
            self.id,
            crate::contact::CONTACT_LIMIT
        )))
    }

    fn peer_client(&self, id: NodeId) -> Result<RaftClient<tonic::transport::Channel>, WriteError> {
        let addr = self
            .peers
            .get(&id)
            .ok_or_else(|| WriteError::NoLeader(format!("leader {id} is not in the peer list")))?;
        let channel = self
            .peer_channels
            .get(addr)
            .map_err(|e| WriteError::NoLeader(e.to_string()))?;
        Ok(RaftClient::new(channel))
    }

    /// This server's view of Raft, for `weft members` and cluster formation.
    pub async fn local_status(&self) -> PeerStatus {
        let m = self.raft.metrics().borrow().clone();
        let role = match m.state {
            openraft::ServerState::Leader => "leader",
            openraft::ServerState::Follower => "follower",
            openraft::ServerState::Candidate => "candidate",
            openraft::ServerState::Learner => "learner",
            openraft::ServerState::Shutdown => "shutdown",
        };
        let last_log = self.raft.data_metrics().borrow().last_log;
        let leader_silence = match m.state {
            openraft::ServerState::Leader => Duration::ZERO,
            _ => self.leader_contact.silence(),
        };
        PeerStatus {
            id: self.id,
            initialized: self.raft.is_initialized().await.unwrap_or(false),
            leader: m.current_leader,
            role: role.to_string(),
            term: m.current_term,
            last_log_index: last_log.map_or(0, |id| id.index),
            last_applied: m.last_applied.map_or(0, |id| id.index),
            last_log_term: last_log.map_or(0, |id| id.leader_id.term),
            leader_silence_ms: leader_silence.as_millis() as u64,
            applies_batches: true,
            applies_leaf_ttl: true,
            checks_standing: true,
            releases_vips: true,
        }
    }

    /// Peer `id`'s traffic reports over `window_secs` (None when it does not
    /// answer within `limit`).
    pub async fn peer_traffic(
        &self,
        id: NodeId,
        window_secs: u32,
        limit: Duration,
    ) -> Option<Vec<weft_api::proto::PairTraffic>> {
        let mut client = self.peer_client(id).ok()?;
        let mut req = tonic::Request::new(weft_api::proto::TopRequest { window_secs });
        req.set_timeout(limit);
        match client.traffic(req).await {
            Ok(reply) => Some(reply.into_inner().pairs),
            Err(e) => {
                tracing::debug!(peer = id, "traffic of a peer: {}", e.message());
                None
            }
        }
    }

    /// Peer `id`'s slots of the traffic into a service (None when it does not
    /// answer within `limit`).
    pub async fn peer_traffic_series(
        &self,
        id: NodeId,
        req: weft_api::proto::SeriesRequest,
        limit: Duration,
    ) -> Option<Vec<weft_api::proto::SlotTraffic>> {
        let mut client = self.peer_client(id).ok()?;
        let mut req = tonic::Request::new(req);
        req.set_timeout(limit);
        match client.traffic_series(req).await {
            Ok(reply) => Some(reply.into_inner().slots),
            Err(e) => {
                tracing::debug!(peer = id, "traffic series of a peer: {}", e.message());
                None
            }
        }
    }

    /// Asks peer `id` for its status (None when it does not answer in time).
    pub async fn peer_status(&self, id: NodeId) -> Option<PeerStatus> {
        if id == self.id {
            return Some(self.local_status().await);
        }
        let mut client = self.peer_client(id).ok()?;
        let mut req = tonic::Request::new(Empty {});
        req.set_timeout(Duration::from_millis(800));
        let reply = client.status(req).await.ok()?;
        crate::raft::codec::decode(&reply.into_inner().json).ok()
    }

    /// Whether every member, voters and learners alike (a learner applies
    /// the same log), answers `Status` and `says` holds of its answer: what
    /// the leader asks before writing a command that a server of an earlier
    /// version, in a rolling upgrade, would not apply alike.
    pub async fn every_server_says(&self, says: fn(&PeerStatus) -> bool) -> bool {
        let metrics = self.raft.metrics().borrow().clone();
        let members: Vec<_> = (metrics.membership_config.membership().nodes())
            .map(|(id, _)| *id)
            .collect();
        let statuses =
            futures::future::join_all(members.iter().map(|id| self.peer_status(*id))).await;
        (statuses.iter().zip(&members))
            .all(|(s, id)| s.as_ref().is_some_and(|s| s.id == *id && says(s)))
    }

    /// On the leader: the index a linearizable read must wait for, once a
    /// quorum confirmed the leadership. Not waiting for this server to apply
    /// it: the reader waits for its own apply (a follower its own, not the
    /// leader's; `read_barrier`), and a follower's contact check
    /// (`contact`) does not stall on a leader's slow apply.
    pub async fn read_index_as_leader(&self) -> Result<u64, WriteError> {
        match self.raft.get_read_log_id().await {
            Ok((read_log_id, _applied)) => Ok(read_log_id.map_or(0, |id| id.index)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => Err(
                WriteError::NoLeader(format!("server {} is not the leader", self.id)),
            ),
            Err(e) => Err(WriteError::NoLeader(e.to_string())),
        }
    }

    /// The index a linearizable read must wait for: this server's own if
    /// it leads, else its leader's (over the Raft port), within `limit`.
    pub async fn read_index(&self, limit: Duration) -> Result<u64, WriteError> {
        match self.raft.current_leader().await {
            Some(leader) if leader == self.id => {
                tokio::time::timeout(limit, self.read_index_as_leader())
                    .await
                    .unwrap_or_else(|_| {
                        Err(WriteError::NoLeader(format!(
                            "no quorum confirmed server {} within {limit:?}",
                            self.id
                        )))
                    })
            }
            Some(leader) => self.read_index_of(leader, limit).await,
            None => Err(WriteError::NoLeader("election in progress".into())),
        }
    }

    /// A read index from `leader` (over the Raft port), within `limit`.
    async fn read_index_of(&self, leader: NodeId, limit: Duration) -> Result<u64, WriteError> {
        let mut client = self.peer_client(leader)?;
        let mut request = tonic::Request::new(Empty {});
        request.set_timeout(limit);
        client
            .read_index(request)
            .await
            .map(|r| r.into_inner().index)
            .map_err(|s| WriteError::NoLeader(s.message().to_string()))
    }

    /// Makes a following read linearizable: waits until this server has
    /// applied everything the leader had committed when the read began.
    /// A stale read skips this.
    pub async fn read_barrier(&self, stale: bool) -> Result<(), WriteError> {
        if stale {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            match self.read_index(LEADER_WAIT).await {
                Ok(index) => {
                    self.raft
                        .wait(Some(LEADER_WAIT))
                        .applied_index_at_least(Some(index), "linearizable read")
                        .await
                        .map_err(|e| WriteError::NoLeader(e.to_string()))?;
                    return Ok(());
                }
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
