//! Raft's transport, client side: openraft's messages, encoded by
//! [`super::codec`], in gRPC calls to the peer's `weft.v1.Raft` service,
//! over mutual TLS (this server's certificate; the peer's must name the
//! server role). A peer that cannot be reached is reported as unreachable,
//! so that openraft backs off.
//!
//! An append carrying entries runs in a task of its own ([`InflightAppend`]):
//! openraft gives up on an append after its heartbeat interval and asks
//! again, and the retry waits for the append already on its way instead of
//! starting it over.
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
use openraft::{BasicNode, LogId, Vote};
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
            inflight: None,
        }
    }
}

/// The largest Raft message a server sends or accepts: a hostile or buggy
/// peer cannot make a server buffer more than this for one call.
pub const MAX_RAFT_MESSAGE: usize = 64 << 20;

pub struct PeerClient {
    target: NodeId,
    client: Option<RaftClient<Channel>>,
    /// The append on its way to the peer, if one is.
    inflight: Option<InflightAppend>,
}

/// How long an append with entries may take in all (encoding, carrying,
/// the peer decoding and storing it) before it counts as failed; openraft
/// stops waiting after its heartbeat interval and asks again meanwhile.
const APPEND_DEADLINE: Duration = Duration::from_secs(2);

type AppendResult = RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible>;

/// An append with entries, running in its own task so that openraft giving
/// up on it (after its heartbeat interval, 100 ms) does not cancel it. A
/// large entry on a busy machine can take longer than that to encode,
/// carry, decode and store; started over on every retry it never arrived,
/// its follower heard nothing from the leader meanwhile, and stood for
/// election. openraft's retry of the same entries waits for this one
/// instead ([`Sent::asked_again_by`]). At most one per peer: a different
/// append aborts it.
struct InflightAppend {
    sent: Sent,
    task: tokio::task::JoinHandle<AppendResult>,
}

impl Drop for InflightAppend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What an append carried: the leader's vote, the entry before its entries,
/// how many entries and the last one's id.
#[derive(Debug, Clone, PartialEq)]
struct Sent {
    vote: Vote<NodeId>,
    prev: Option<LogId<NodeId>>,
    count: usize,
    last: Option<LogId<NodeId>>,
}

impl Sent {
    fn of(rpc: &AppendEntriesRequest<TypeConfig>) -> Self {
        Self {
            vote: rpc.vote,
            prev: rpc.prev_log_id,
            count: rpc.entries.len(),
            last: rpc.entries.last().map(|e| e.log_id),
        }
    }

    /// Whether `rpc` asks again for these entries (and maybe more after
    /// them): the same leader's vote, the same entry before, and the same
    /// entry in the last sent place. A leader's log holds one entry per id
    /// in its term, so the entries between are the same too, and the
    /// answer to the first append answers the second.
    fn asked_again_by(&self, rpc: &AppendEntriesRequest<TypeConfig>) -> bool {
        self.count > 0
            && self.vote == rpc.vote
            && self.prev == rpc.prev_log_id
            && rpc.entries.get(self.count - 1).map(|e| e.log_id) == self.last
    }

    /// The answer to a request for `asked` entries, given the peer's
    /// answer to this append: a success for fewer entries than asked is a
    /// partial one, and openraft sends the rest next.
    fn answer(
        &self,
        asked: usize,
        reply: AppendEntriesResponse<NodeId>,
    ) -> AppendEntriesResponse<NodeId> {
        match reply {
            AppendEntriesResponse::Success if self.count < asked => {
                AppendEntriesResponse::PartialSuccess(self.last)
            }
            other => other,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

type RpcResult<T, E> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

/// What a call past its deadline tells openraft.
#[derive(Clone, Copy)]
enum Late {
    /// The peer is unreachable: openraft backs off (500 ms) before it
    /// sends it anything again.
    Unreachable,
    /// A network error: openraft goes on at once (heartbeats included).
    Failed,
}

/// Sends `req` to peer `target` as `method` and decodes its answer.
async fn call<Req, Resp, E>(
    client: Option<RaftClient<Channel>>,
    target: NodeId,
    method: &'static str,
    req: &Req,
    (timeout, late): (Duration, Late),
) -> RpcResult<Resp, E>
where
    Req: Serialize,
    Resp: DeserializeOwned,
    E: std::error::Error + DeserializeOwned,
{
    let Some(mut client) = client else {
        return Err(RPCError::Unreachable(Unreachable::new(&TransportError(
            "bad peer address".into(),
        ))));
    };
    let json = super::codec::encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
    let mut request = tonic::Request::new(RaftPayload { json });
    request.set_timeout(timeout);
    request.metadata_mut().insert(
        super::service::RAFT_TARGET,
        tonic::metadata::MetadataValue::from(target),
    );
    let reply = match method {
        "append" => client.append_entries(request).await,
        "vote" => client.vote(request).await,
        _ => client.install_snapshot(request).await,
    };
    let reply = reply.map_err(|status| {
        let e = TransportError(format!("{method} to {target}: {}", status.message()));
        match (status.code(), late) {
            (tonic::Code::Unavailable, _) | (tonic::Code::DeadlineExceeded, Late::Unreachable) => {
                RPCError::Unreachable(Unreachable::new(&e))
            }
            _ => RPCError::Network(NetworkError::new(&e)),
        }
    })?;
    let result: Result<Resp, RaftError<NodeId, E>> = super::codec::decode(&reply.into_inner().json)
        .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
    result.map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
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
    ) -> AppendResult {
        if rpc.entries.is_empty() {
            // A heartbeat: small, and sent beside an append in flight (as
            // openraft does between its retries), which it does not touch.
            return call(
                self.client.clone(),
                self.target,
                "append",
                &rpc,
                (option.hard_ttl(), Late::Unreachable),
            )
            .await;
        }
        let asked = rpc.entries.len();
        if !self
            .inflight
            .as_ref()
            .is_some_and(|f| f.sent.asked_again_by(&rpc))
        {
            rpc.entries
                .truncate(entries_within(&rpc.entries, APPEND_BYTES));
            let sent = Sent::of(&rpc);
            let (client, target) = (self.client.clone(), self.target);
            let task = tokio::spawn(
                // A peer alive but slower than the deadline is not backed
                // off from: its heartbeats would stop too.
                async move {
                    call(
                        client,
                        target,
                        "append",
                        &rpc,
                        (APPEND_DEADLINE, Late::Failed),
                    )
                    .await
                },
            );
            // Replacing an earlier append aborts it.
            self.inflight = Some(InflightAppend { sent, task });
        }
        let inflight = self.inflight.as_mut().expect("an append in flight");
        // If openraft stops waiting here, the append goes on, and stays in
        // `inflight` for the retry.
        let joined = (&mut inflight.task).await;
        let sent = inflight.sent.clone();
        self.inflight = None;
        let reply = joined.map_err(|e| RPCError::Network(NetworkError::new(&e)))??;
        Ok(sent.answer(asked, reply))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        // A snapshot replaces whatever append was on its way.
        self.inflight = None;
        call(
            self.client.clone(),
            self.target,
            "snapshot",
            &rpc,
            (option.hard_ttl(), Late::Unreachable),
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        call(
            self.client.clone(),
            self.target,
            "vote",
            &rpc,
            (option.hard_ttl(), Late::Unreachable),
        )
        .await
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

    fn append(
        term: u64,
        prev: u64,
        entries: std::ops::RangeInclusive<u64>,
    ) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(term, 1),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), prev)),
            leader_commit: None,
            entries: entries.map(|i| put(i, 10)).collect(),
        }
    }

    #[test]
    fn a_retry_of_the_same_entries_waits_for_the_append_in_flight() {
        let sent = Sent::of(&append(2, 4, 5..=7));
        // The same append again, and with more entries after it.
        assert!(sent.asked_again_by(&append(2, 4, 5..=7)));
        assert!(sent.asked_again_by(&append(2, 4, 5..=9)));
        // Fewer entries, another entry before, another leader's vote: a
        // different append.
        assert!(!sent.asked_again_by(&append(2, 4, 5..=6)));
        assert!(!sent.asked_again_by(&append(2, 3, 4..=7)));
        assert!(!sent.asked_again_by(&append(2, 7, 8..=9)));
        assert!(!sent.asked_again_by(&append(3, 4, 5..=7)));
        // The same index written in another term is another entry.
        let mut other = append(2, 4, 5..=7);
        other.entries[2].log_id = LogId::new(CommittedLeaderId::new(2, 1), 7);
        assert!(!sent.asked_again_by(&other));
        // A heartbeat carries nothing to wait for.
        let mut beat = append(2, 4, 5..=5);
        beat.entries.clear();
        assert!(!Sent::of(&beat).asked_again_by(&beat));
    }

    /// A peer that answers every append with success after `delay`, and
    /// counts the appends it receives and those given up before their
    /// answer. (Only appends: a test's edge.)
    struct SlowPeer {
        delay: Duration,
        appends: Arc<std::sync::atomic::AtomicUsize>,
        cancelled: Arc<std::sync::atomic::AtomicUsize>,
    }

    /// Counts an append given up (its handler dropped) unless disarmed.
    struct Cancelled(Option<Arc<std::sync::atomic::AtomicUsize>>);

    impl Drop for Cancelled {
        fn drop(&mut self) {
            if let Some(count) = &self.0 {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    type Reply<T> = Result<tonic::Response<T>, tonic::Status>;

    #[tonic::async_trait]
    impl weft_api::proto::raft_server::Raft for SlowPeer {
        async fn append_entries(&self, _: tonic::Request<RaftPayload>) -> Reply<RaftPayload> {
            self.appends
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut cancelled = Cancelled(Some(self.cancelled.clone()));
            tokio::time::sleep(self.delay).await;
            cancelled.0 = None;
            let ok: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> =
                Ok(AppendEntriesResponse::Success);
            let json = crate::raft::codec::encode(&ok).expect("encode");
            Ok(tonic::Response::new(RaftPayload { json }))
        }
        async fn vote(&self, _: tonic::Request<RaftPayload>) -> Reply<RaftPayload> {
            Err(tonic::Status::unimplemented("vote"))
        }
        async fn install_snapshot(&self, _: tonic::Request<RaftPayload>) -> Reply<RaftPayload> {
            Err(tonic::Status::unimplemented("install_snapshot"))
        }
        async fn forward_write(&self, _: tonic::Request<RaftPayload>) -> Reply<RaftPayload> {
            Err(tonic::Status::unimplemented("forward_write"))
        }
        async fn forward_heartbeat(
            &self,
            _: tonic::Request<weft_api::proto::HeartbeatRequest>,
        ) -> Reply<weft_api::proto::Empty> {
            Err(tonic::Status::unimplemented("forward_heartbeat"))
        }
        async fn read_index(
            &self,
            _: tonic::Request<weft_api::proto::Empty>,
        ) -> Reply<weft_api::proto::WriteResult> {
            Err(tonic::Status::unimplemented("read_index"))
        }
        async fn traffic(
            &self,
            _: tonic::Request<weft_api::proto::TopRequest>,
        ) -> Reply<weft_api::proto::TrafficReport> {
            Err(tonic::Status::unimplemented("traffic"))
        }
        async fn traffic_series(
            &self,
            _: tonic::Request<weft_api::proto::SeriesRequest>,
        ) -> Reply<weft_api::proto::SlotReports> {
            Err(tonic::Status::unimplemented("traffic_series"))
        }
        async fn status(&self, _: tonic::Request<weft_api::proto::Empty>) -> Reply<RaftPayload> {
            Err(tonic::Status::unimplemented("status"))
        }
    }

    /// Sends `rpc` as openraft does: gives up after its heartbeat interval
    /// (100 ms) and asks again, until it has an answer. Gives the answer and
    /// how many times it asked.
    async fn append_as_openraft(
        peer: &mut PeerClient,
        rpc: &AppendEntriesRequest<TypeConfig>,
    ) -> (AppendEntriesResponse<NodeId>, usize) {
        let interval = Duration::from_millis(100);
        for attempt in 1..=30 {
            let call = peer.append_entries(rpc.clone(), RPCOption::new(interval));
            if let Ok(reply) = tokio::time::timeout(interval, call).await {
                return (reply.expect("an answer"), attempt);
            }
        }
        panic!("no answer in 30 attempts");
    }

    #[tokio::test]
    async fn a_slow_append_is_sent_once_and_its_retries_wait_for_it() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let appends = Arc::new(AtomicUsize::new(0));
        let cancelled = Arc::new(AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(weft_api::proto::raft_server::RaftServer::new(SlowPeer {
                    delay: Duration::from_millis(350),
                    appends: appends.clone(),
                    cancelled: cancelled.clone(),
                }))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let mut peer = PeerClient {
            target: 2,
            client: Some(RaftClient::new(channel)),
            inflight: None,
        };
        let option = || RPCOption::new(Duration::from_millis(100));

        // Given up on every 100 ms, answered after 350: sent once.
        let (reply, attempts) = append_as_openraft(&mut peer, &append(2, 4, 5..=7)).await;
        assert_eq!(reply, AppendEntriesResponse::Success);
        assert!(attempts >= 3, "answered after {attempts} attempts");
        assert_eq!(appends.load(SeqCst), 1, "the peer received the retries");
        assert_eq!(cancelled.load(SeqCst), 0, "a retry cancelled the append");

        // Once answered, the same append asked again is sent again.
        let (reply, _) = append_as_openraft(&mut peer, &append(2, 4, 5..=7)).await;
        assert_eq!(reply, AppendEntriesResponse::Success);
        assert_eq!(appends.load(SeqCst), 2);

        // A retry asking for more after the append in flight waits for it
        // and is told the sent entries succeeded (the rest go next).
        let given_up = tokio::time::timeout(
            Duration::from_millis(50),
            peer.append_entries(append(2, 7, 8..=9), option()),
        )
        .await;
        assert!(given_up.is_err(), "answered within 50 ms");
        let (reply, _) = append_as_openraft(&mut peer, &append(2, 7, 8..=12)).await;
        let sent = Some(LogId::new(CommittedLeaderId::new(1, 1), 9));
        assert_eq!(reply, AppendEntriesResponse::PartialSuccess(sent));
        assert_eq!(appends.load(SeqCst), 3);

        // Another append aborts the one in flight: the peer sees it go.
        let given_up = tokio::time::timeout(
            Duration::from_millis(50),
            peer.append_entries(append(2, 12, 13..=13), option()),
        )
        .await;
        assert!(given_up.is_err(), "answered within 50 ms");
        let (reply, _) = append_as_openraft(&mut peer, &append(3, 12, 13..=13)).await;
        assert_eq!(reply, AppendEntriesResponse::Success);
        assert_eq!(appends.load(SeqCst), 5);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while cancelled.load(SeqCst) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the replaced append went on"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(cancelled.load(SeqCst), 1);
        server.abort();
    }

    #[test]
    fn a_success_for_fewer_entries_than_asked_is_partial() {
        let sent = Sent::of(&append(2, 4, 5..=7));
        let last = Some(LogId::new(CommittedLeaderId::new(1, 1), 7));
        assert_eq!(
            sent.answer(3, AppendEntriesResponse::Success),
            AppendEntriesResponse::Success
        );
        assert_eq!(
            sent.answer(5, AppendEntriesResponse::Success),
            AppendEntriesResponse::PartialSuccess(last)
        );
        assert_eq!(
            sent.answer(5, AppendEntriesResponse::Conflict),
            AppendEntriesResponse::Conflict
        );
    }
}
