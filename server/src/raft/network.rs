//! Raft's transport, client side: openraft's messages as JSON in gRPC calls
//! to the peer's `weft.v1.Raft` service, over mutual TLS (this server's
//! certificate; the peer's must name the server role). A peer that cannot
//! be reached is reported as unreachable, so that openraft backs off.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use weft_api::proto::raft_client::RaftClient;
use weft_api::proto::RaftPayload;

use super::{NodeId, TypeConfig};

/// Opens a mutual-TLS gRPC channel (lazily) to a peer's Raft address.
pub fn channel(addr: &str, tls: &ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls.clone())?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// One channel per peer address, shared by everything that calls peers
/// (openraft's replication, forwarded writes, read-index requests): a
/// channel keeps its connection (and TLS session) and reconnects when it
/// breaks, so no call pays a new handshake.
#[derive(Clone)]
pub struct PeerChannels {
    tls: ClientTlsConfig,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl PeerChannels {
    pub fn new(tls: ClientTlsConfig) -> Self {
        Self {
            tls,
            channels: Arc::default(),
        }
    }

    /// The channel to `addr`, made on first use.
    pub fn get(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut channels = self.channels.lock().expect("peer channels lock");
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let c = channel(addr, &self.tls)?;
        channels.insert(addr.to_string(), c.clone());
        Ok(c)
    }
}

#[derive(Clone)]
pub struct NetworkFactory {
    pub peers: PeerChannels,
    /// Peers' Raft addresses as this server's settings give them: they win
    /// over the address in the membership, so a server reaches every peer
    /// the way everything else on it does (forwarded writes, status).
    pub addrs: std::collections::BTreeMap<NodeId, String>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            client: self
                .peers
                .get(self.addrs.get(&target).unwrap_or(&node.addr))
                .ok()
                .map(|c| RaftClient::new(c).max_decoding_message_size(MAX_RAFT_MESSAGE)),
        }
    }
}

/// The largest Raft message a server sends or accepts: a hostile or buggy
/// peer cannot make a server buffer more than this for one call.
pub const MAX_RAFT_MESSAGE: usize = 64 << 20;

pub struct PeerClient {
    target: NodeId,
    client: Option<RaftClient<Channel>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

type RpcResult<T, E> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        method: &'static str,
        req: &Req,
        timeout: Duration,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(client) = self.client.as_mut() else {
            return Err(RPCError::Unreachable(Unreachable::new(&TransportError(
                "bad peer address".into(),
            ))));
        };
        let json =
            super::codec::encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(RaftPayload { json });
        request.set_timeout(timeout);
        request.metadata_mut().insert(
            super::service::RAFT_TARGET,
            tonic::metadata::MetadataValue::from(self.target),
        );
        let reply = match method {
            "append" => client.append_entries(request).await,
            "vote" => client.vote(request).await,
            _ => client.install_snapshot(request).await,
        };
        let reply = reply.map_err(|status| {
            let e = TransportError(format!("{method} to {}: {}", self.target, status.message()));
            match status.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                    RPCError::Unreachable(Unreachable::new(&e))
                }
                _ => RPCError::Network(NetworkError::new(&e)),
            }
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            super::codec::decode(&reply.into_inner().json)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// The most entry bytes (encoded) one append carries, unless its first entry
/// alone is larger: openraft bounds appends only in entries
/// (`max_payload_entries`), so the transport sends the longest prefix
/// within this bound and reports the rest as not yet sent.
pub const APPEND_BYTES: usize = 1 << 20;

/// How many of `entries` fit in one append of at most `budget` bytes: at
/// least one (a single entry is never split), then as many more as fit.
fn entries_within(entries: &[openraft::Entry<TypeConfig>], budget: usize) -> usize {
    let mut total = 0;
    for (i, entry) in entries.iter().enumerate() {
        total += super::codec::encoded_len(entry);
        if i > 0 && total > budget {
            return i;
        }
    }
    entries.len()
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        let fit = entries_within(&rpc.entries, APPEND_BYTES);
        if fit == rpc.entries.len() {
            return self.call("append", &rpc, option.hard_ttl()).await;
        }
        rpc.entries.truncate(fit);
        let sent = rpc.entries.last().map(|e| e.log_id);
        match self.call("append", &rpc, option.hard_ttl()).await? {
            // openraft sends the rest next.
            AppendEntriesResponse::Success => Ok(AppendEntriesResponse::PartialSuccess(sent)),
            other => Ok(other),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call("snapshot", &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call("vote", &rpc, option.hard_ttl()).await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::Command;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

    /// Log entry `index`: a KV write of a `bytes`-byte value.
    pub(crate) fn put(index: u64, bytes: usize) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::KvPut {
                key: format!("k{index}"),
                value: vec![1; bytes],
                cas: None,
                flags: 0,
                lock: None,
            }),
        }
    }

    #[test]
    fn an_append_is_cut_where_its_bytes_pass_the_bound() {
        let small: Vec<_> = (1..=300).map(|i| put(i, 100)).collect();
        assert_eq!(entries_within(&small, APPEND_BYTES), 300);
        // 256 KiB values: four fit in 1 MiB only with no overhead, so three.
        let large: Vec<_> = (1..=8).map(|i| put(i, 256 << 10)).collect();
        assert_eq!(entries_within(&large, APPEND_BYTES), 3);
        // A single entry over the bound still travels, alone.
        let huge = vec![put(1, 2 << 20), put(2, 10)];
        assert_eq!(entries_within(&huge, APPEND_BYTES), 1);
        assert_eq!(entries_within(&[], APPEND_BYTES), 0);
    }
}
