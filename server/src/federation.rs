//! Federation of datacenters through mesh gateways (Consul's "WAN
//! federation via mesh gateways").
//!
//! Every datacenter's leader keeps its own datacenter's state (the WAN
//! addresses of its passing `mesh-gateway` instances) in its Raft state. A
//! secondary's leader also calls the primary's servers every
//! [`EXCHANGE_EVERY`] with it, and takes back every datacenter's state, so
//! each datacenter's agents and gateways learn where the others' gateways
//! are. Until it first hears from the primary, a secondary knows the
//! primary's gateways from `--primary-gateway`.
//!
//! Servers of different datacenters only ever meet through gateways: a
//! server dials one of its own datacenter's gateways (their LAN address,
//! from the catalog) with SNI `server.<dc>.weft`; the gateways forward the
//! TLS stream untouched to the other datacenter's federation port, where
//! both ends authenticate with their server certificates. The caller's
//! datacenter is the one its certificate names.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status};
use weft_api::catalog::HealthStatus;
use weft_api::federation::FederationState;
use weft_api::proto::federation_client::FederationClient;
use weft_api::proto::{self, federation_server::Federation};

use crate::ca::{CaRoot, CaState, Intermediate, SecretPem};
use crate::node::ServerNode;
use crate::state::Command;

/// How often a secondary's leader reports to the primary (and its own
/// state is refreshed from its catalog).
pub const EXCHANGE_EVERY: Duration = Duration::from_secs(2);
/// The federation port takes this many times `--max-conns-per-client`
/// from one address: connections arrive from gateways, each carrying many
/// clients (which the gateway limits one by one).
pub const CONNS_PER_GATEWAY_FACTOR: usize = 16;
/// One exchange, dial to answer.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Who may federate, and where the primary is.
#[derive(Debug, Clone)]
pub struct FederationSettings {
    pub primary: String,
    /// WAN addresses of the primary's gateways (secondaries).
    pub primary_gateways: Vec<SocketAddr>,
    /// This server's certificate and the CA, for calls to other
    /// datacenters.
    pub client_tls: ClientTlsConfig,
}

/// The datacenter of the server that called, from its certificate.
fn caller_datacenter<T>(req: &Request<T>) -> Result<String, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    certs
        .first()
        .and_then(crate::tls::server_datacenter)
        .ok_or_else(|| Status::unauthenticated("the client certificate names no server.<dc>.weft"))
}

/// This datacenter's state now: its passing gateways' WAN addresses.
pub fn own_state(node: &ServerNode, now_ms: i64) -> FederationState {
    let state = node.shared.state.read().expect("state lock");
    let mut gateways: Vec<SocketAddr> = state
        .instances
        .values()
        .flat_map(|m| m.values())
        .filter(|i| gateway_instance(&state, i))
        .filter_map(|i| i.meta.get(weft_api::gateway::WAN_META)?.parse().ok())
        .filter(weft_api::federation::advertisable)
        .collect();
    gateways.sort();
    gateways.dedup();
    gateways.truncate(weft_api::federation::MAX_GATEWAYS);
    FederationState {
        datacenter: node.datacenter.clone(),
        gateways,
        updated_ms: now_ms,
    }
}

/// Whether `i` is a passing gateway on a live agent's node (registering
/// `mesh-gateway` takes `service:write` on it, as in Consul; nodes
/// registered through the catalog API run no agent and count for nothing).
fn gateway_instance(state: &crate::state::State, i: &weft_api::catalog::ServiceInstance) -> bool {
    i.service == weft_api::gateway::SERVICE
        && i.health == HealthStatus::Passing
        && state.nodes.get(&i.node).is_some_and(|n| {
            n.health != HealthStatus::Critical && !weft_api::catalog_register::is_external(n)
        })
}

/// Gateways a server tries, at most, for one call to another datacenter.
const GATEWAYS_TRIED: usize = 3;

/// Some of this datacenter's passing gateways' LAN addresses, in random
/// order: where its servers dial to reach another datacenter.
fn local_gateways(node: &ServerNode) -> Vec<SocketAddr> {
    let state = node.shared.state.read().expect("state lock");
    let mut found: Vec<SocketAddr> = state
        .instances
        .values()
        .flat_map(|m| m.values())
        .filter(|i| gateway_instance(&state, i))
        .filter_map(|i| i.socket_addr())
        .filter(|a| !a.ip().is_unspecified())
        .collect();
    if !found.is_empty() {
        let start = rand::random::<u32>() as usize % found.len();
        found.rotate_left(start);
    }
    found.truncate(GATEWAYS_TRIED);
    found
}

/// A channel to datacenter `dc`'s servers through the gateway at `via`.
pub fn channel_via(
    tls: &ClientTlsConfig,
    dc: &str,
    via: SocketAddr,
    timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    let name = weft_api::gateway::server_sni(dc);
    let connector = tower::service_fn(move |_: http::Uri| async move {
        let tcp = tokio::net::TcpStream::connect(via).await?;
        let _ = tcp.set_nodelay(true);
        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tcp))
    });
    Ok(Endpoint::from_shared(format!("https://{name}:8302"))?
        .tls_config(tls.clone().domain_name(name))?
        .connect_timeout(EXCHANGE_TIMEOUT)
        .timeout(timeout)
        .connect_with_connector_lazy(connector))
}

/// Writes `state` when it says something new.
async fn store(node: &ServerNode, state: FederationState) {
    let known = {
        let s = node.shared.state.read().expect("state lock");
        s.federation.get(&state.datacenter).cloned()
    };
    // Rewritten when the gateways change, or when a datacenter known only
    // from the configuration (`--primary-gateway`, never heard from) is
    // first heard from.
    if known
        .is_some_and(|k| k.same_gateways(&state) && (k.updated_ms != 0 || state.updated_ms == 0))
    {
        return;
    }
    let dc = state.datacenter.clone();
    match node.write(Command::SetFederationState(state)).await {
        Ok(_) => tracing::info!(datacenter = %dc, "federation state stored"),
        Err(e) => tracing::warn!(datacenter = %dc, "storing the federation state: {e}"),
    }
}

/// The leader's loop: keeps this datacenter's state, and a secondary's
/// exchange with the primary.
pub async fn maintain(node: Arc<ServerNode>, settings: FederationSettings) {
    let mut warned = false;
    // Failed exchanges with the primary in a row.
    let mut exchange_failures = 0u32;
    // Failed fetches in a row, per other datacenter.
    let mut unreachable: std::collections::HashMap<String, u32> = Default::default();
    loop {
        tokio::time::sleep(EXCHANGE_EVERY).await;
        if node.raft.current_leader().await != Some(node.id) {
            continue;
        }
        let own = own_state(&node, now_ms());
        store(&node, own.clone()).await;
        fetch_remote_instances(&node, &settings, &mut unreachable).await;
        if settings.primary == node.datacenter {
            continue;
        }
        // Until the primary answers, its gateways are the configured ones.
        let primary_known = {
            let s = node.shared.state.read().expect("state lock");
            s.federation.contains_key(&settings.primary)
        };
        if !primary_known {
            let mut gateways = settings.primary_gateways.clone();
            gateways.sort();
            store(
                &node,
                FederationState {
                    datacenter: settings.primary.clone(),
                    gateways,
                    updated_ms: 0,
                },
            )
            .await;
        }
        match exchange(&node, &settings, own).await {
            Ok(states) => {
                warned = false;
                exchange_failures = 0;
                for s in states {
                    if s.datacenter == node.datacenter {
                        continue;
                    }
                    let known = {
                        let state = node.shared.state.read().expect("state lock");
                        state.federation.get(&s.datacenter).cloned()
                    };
                    if s.datacenter == settings.primary && keeps_known_gateways(known.as_ref(), &s)
                    {
                        tracing::debug!(primary = %settings.primary, "the primary lists no passing gateway: the known ones stay");
                        continue;
                    }
                    store(&node, s).await;
                }
                if let Err(e) = follow_primary_ca(&node, &settings).await {
                    tracing::warn!(primary = %settings.primary, "following the primary's CA: {e}");
                }
                if let Err(e) = replicate_policy(&node, &settings).await {
                    tracing::warn!(primary = %settings.primary, "replicating intentions and config entries: {e}");
                }
                if let Err(e) = replicate_acl(&node, &settings).await {
                    tracing::warn!(primary = %settings.primary, "replicating ACL policies and tokens: {e}");
                }
            }
            Err(e) => {
                exchange_failures += 1;
                if !warned {
                    tracing::warn!(primary = %settings.primary, "federation exchange failed: {e}");
                    warned = true;
                } else {
                    tracing::debug!(primary = %settings.primary, "federation exchange failed: {e}");
                }
                // The gateways the primary listed last may all be gone
                // (replaced, their addresses changed): the configured ones
                // are tried beside them, as before the primary answered.
                if exchange_failures.is_multiple_of(STALE_AFTER) {
                    let known = {
                        let s = node.shared.state.read().expect("state lock");
                        s.federation.get(&settings.primary).cloned()
                    };
                    if let Some(known) = known {
                        store(&node, with_configured(known, &settings.primary_gateways)).await;
                    }
                }
            }
        }
    }
}

/// Whether the primary's answer lists no gateway while some are known: it
/// lists only passing ones, and a moment without any (their agents cut off
/// from its servers, a replacement under way) must not leave this
/// datacenter without a way to reach it, which it would then never regain
/// (that state lives in Raft; `--primary-gateway` is used only while
/// nothing is known).
fn keeps_known_gateways(known: Option<&FederationState>, answer: &FederationState) -> bool {
    answer.gateways.is_empty() && known.is_some_and(|k| !k.gateways.is_empty())
}

/// `known`, its gateways with `configured` added (sorted, once each).
fn with_configured(mut known: FederationState, configured: &[SocketAddr]) -> FederationState {
    known.gateways.extend(configured.iter().copied());
    known.gateways.sort();
    known.gateways.dedup();
    known
}

/// Fetches every other datacenter's instances through this datacenter's
/// gateways, and stores those that changed.
async fn fetch_remote_instances(
    node: &ServerNode,
    settings: &FederationSettings,
    unreachable: &mut std::collections::HashMap<String, u32>,
) {
    let others: Vec<String> = {
        let s = node.shared.state.read().expect("state lock");
        s.federation
            .keys()
            .filter(|dc| **dc != node.datacenter)
            .cloned()
            .collect()
    };
    for dc in others {
        let fetched = ask(
            node,
            &settings.client_tls,
            (&dc, EXCHANGE_TIMEOUT),
            |mut c| async move { c.instances(proto::Empty {}).await },
        );
        let reply = match fetched.await {
            Ok(reply) if reply.datacenter == dc => reply,
            Ok(reply) => {
                tracing::warn!(datacenter = %dc, answered = %reply.datacenter, "another datacenter answered for it");
                continue;
            }
            Err(e) => {
                let failed = unreachable.entry(dc.clone()).or_default();
                *failed += 1;
                tracing::debug!(datacenter = %dc, failed = *failed, "fetching instances: {e}");
                if *failed == STALE_AFTER {
                    forget_health(node, &dc, &e).await;
                }
                continue;
            }
        };
        unreachable.remove(&dc);
        let mut instances = Vec::with_capacity(reply.instances.len());
        for i in reply.instances {
            match weft_api::convert::instance_from_proto(i) {
                Ok(i) => instances.push(i),
                Err(e) => tracing::warn!(datacenter = %dc, "an instance refused: {e}"),
            }
        }
        instances.sort_by(|a, b| (&a.node, &a.id).cmp(&(&b.node, &b.id)));
        let same = {
            let s = node.shared.state.read().expect("state lock");
            s.remote.get(&dc) == Some(&instances)
        };
        if same {
            continue;
        }
        let count = instances.len();
        match node
            .write(Command::SetRemoteInstances {
                datacenter: dc.clone(),
                instances,
            })
            .await
        {
            Ok(_) => tracing::debug!(datacenter = %dc, count, "remote instances stored"),
            Err(e) => tracing::warn!(datacenter = %dc, "storing remote instances: {e}"),
        }
    }
}

/// Failed fetches in a row after which another datacenter's instances no
/// longer count as passing (failover must not pick a datacenter that is
/// gone, nor prefer it to the next one).
const STALE_AFTER: u32 = 3;
/// The largest answer taken from another datacenter's servers.
const MAX_REPLY: usize = 64 << 20;

/// Marks every instance of `dc` critical: it could not be asked.
async fn forget_health(node: &ServerNode, dc: &str, why: &str) {
    let instances: Vec<_> = {
        let s = node.shared.state.read().expect("state lock");
        s.remote.get(dc).cloned().unwrap_or_default()
    };
    if instances.iter().all(|i| i.health == HealthStatus::Critical) {
        return;
    }
    let instances = instances
        .into_iter()
        .map(|mut i| {
            i.health = HealthStatus::Critical;
            i
        })
        .collect();
    tracing::warn!(datacenter = %dc, "its servers cannot be reached ({why}): its instances count as critical");
    if let Err(e) = node
        .write(Command::SetRemoteInstances {
            datacenter: dc.to_string(),
            instances,
        })
        .await
    {
        tracing::warn!(datacenter = %dc, "marking its instances critical: {e}");
    }
}

/// One exchange with the primary, through each of this datacenter's
/// gateways in turn until one answers.
async fn exchange(
    node: &ServerNode,
    settings: &FederationSettings,
    own: FederationState,
) -> Result<Vec<FederationState>, String> {
    let own = own.to_proto();
    let reply = ask(
        node,
        &settings.client_tls,
        (&settings.primary, EXCHANGE_TIMEOUT),
        |mut c| {
            let own = own.clone();
            async move { c.exchange(own).await }
        },
    )
    .await?;
    reply
        .states
        .iter()
        .map(|s| FederationState::from_proto(s).map_err(|e| e.to_string()))
        .collect()
}

/// Calls another datacenter's servers (`dc`) through each of this
/// datacenter's passing gateways in turn until one answers within
/// `timeout`: the answer, or why none did.
async fn ask<T, F, Fut>(
    node: &ServerNode,
    tls: &ClientTlsConfig,
    (dc, timeout): (&str, Duration),
    call: F,
) -> Result<T, String>
where
    F: Fn(FederationClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<Response<T>, Status>>,
{
    let mut last = format!("this datacenter has no passing mesh-gateway to reach {dc} through");
    for via in local_gateways(node) {
        let channel = channel_via(tls, dc, via, timeout).map_err(|e| e.to_string())?;
        let client = FederationClient::new(channel).max_decoding_message_size(MAX_REPLY);
        match call(client).await {
            Ok(reply) => return Ok(reply.into_inner()),
            Err(status) => last = format!("through {via}: {}", status.message()),
        }
    }
    Err(last)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// How long an HTTP request forwarded to another datacenter (`?dc=`) may
/// take, beyond a blocking query's wait.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// HTTP requests one server forwards to other datacenters at once. Each is
/// a connection through a gateway of this datacenter, which gives one
/// source address 256 places: unbounded, blocking queries with any known
/// token (`?dc=dc2&index=…&wait=10m`) took them all, and the federation's
/// own calls from this server (the other datacenters' instances, the
/// primary's intentions and ACLs) found none.
pub const MAX_FORWARDS: usize = 64;
/// Of those, what one token may hold: one caller's blocking queries do not
/// take the others' share (a quarter: clients sharing a token, as a fleet
/// of Prometheus servers may, still get 16 at once).
pub const MAX_FORWARDS_PER_TOKEN: usize = MAX_FORWARDS / 4;

static FORWARDS: std::sync::LazyLock<Arc<tokio::sync::Semaphore>> =
    std::sync::LazyLock::new(|| Arc::new(tokio::sync::Semaphore::new(MAX_FORWARDS)));

static FORWARDS_BY_TOKEN: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<String, usize>>,
> = std::sync::LazyLock::new(Default::default);

/// One token's forwarded request in flight, counted until dropped.
struct TokenForward(String);

impl TokenForward {
    fn take(accessor: &str) -> Option<Self> {
        let mut by_token = FORWARDS_BY_TOKEN.lock().expect("forwards lock");
        let held = by_token.entry(accessor.to_string()).or_insert(0);
        if *held >= MAX_FORWARDS_PER_TOKEN {
            return None;
        }
        *held += 1;
        Some(TokenForward(accessor.to_string()))
    }
}

impl Drop for TokenForward {
    fn drop(&mut self) {
        let mut by_token = FORWARDS_BY_TOKEN.lock().expect("forwards lock");
        if let Some(held) = by_token.get_mut(&self.0) {
            *held -= 1;
            if *held == 0 {
                by_token.remove(&self.0);
            }
        }
    }
}

/// Why a request was not forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("{MAX_FORWARDS} requests of this server are with other datacenters already: try again later")]
    Busy,
    #[error("this token has {MAX_FORWARDS_PER_TOKEN} requests with other datacenters already: try again later")]
    TokenBusy,
    #[error("{0}")]
    NoAnswer(String),
}

/// Sends an HTTP API request of the token `accessor` to datacenter `dc`'s
/// servers (`?dc=`), through this datacenter's gateways: their answer, or
/// why there is none.
pub async fn forward(
    node: &ServerNode,
    dc: &str,
    req: proto::ForwardRequest,
    accessor: &str,
) -> Result<proto::ForwardReply, ForwardError> {
    let _token = TokenForward::take(accessor).ok_or(ForwardError::TokenBusy)?;
    let _slot = FORWARDS
        .clone()
        .try_acquire_owned()
        .map_err(|_| ForwardError::Busy)?;
    forward_now(node, dc, req)
        .await
        .map_err(ForwardError::NoAnswer)
}

async fn forward_now(
    node: &ServerNode,
    dc: &str,
    req: proto::ForwardRequest,
) -> Result<proto::ForwardReply, String> {
    let tls = (node.federation_tls.get())
        .ok_or("this server is not federated (it has no --federation-addr)")?;
    let timeout = FORWARD_TIMEOUT + Duration::from_millis(req.wait_ms);
    ask(node, tls, (dc, timeout), |mut c| {
        let req = req.clone();
        async move { c.forward(req).await }
    })
    .await
}

/// The `weft.v1.Federation` service, on the federation port.
pub struct FederationService {
    node: Arc<ServerNode>,
    primary: String,
}

impl FederationService {
    pub fn new(node: Arc<ServerNode>, primary: String) -> Self {
        FederationService { node, primary }
    }
}

#[tonic::async_trait]
impl Federation for FederationService {
    async fn exchange(
        &self,
        req: Request<proto::FederationState>,
    ) -> Result<Response<proto::FederationStates>, Status> {
        let caller = caller_datacenter(&req)?;
        if self.node.datacenter != self.primary {
            return Err(Status::failed_precondition(format!(
                "datacenter {} is not the primary ({}): exchange with the primary",
                self.node.datacenter, self.primary
            )));
        }
        let state = FederationState::from_proto(req.get_ref())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if state.datacenter != caller {
            return Err(Status::permission_denied(format!(
                "a server of {caller} may report only {caller}'s state, not {}'s",
                state.datacenter
            )));
        }
        if caller == self.node.datacenter {
            return Err(Status::permission_denied(
                "the primary's own state is its leader's to keep",
            ));
        }
        let state = FederationState {
            updated_ms: now_ms(),
            ..state
        };
        store(&self.node, state).await;
        let s = self.node.shared.state.read().expect("state lock");
        Ok(Response::new(proto::FederationStates {
            states: s
                .federation
                .values()
                .map(FederationState::to_proto)
                .collect(),
            primary: self.primary.clone(),
        }))
    }

    async fn instances(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::RemoteInstances>, Status> {
        caller_datacenter(&req)?;
        // The leader's state, as of now (a lagging server would answer
        // with an old or empty catalog).
        let node = &self.node;
        let built = crate::grpc::read(node, Some(proto::ReadOptions::default()), |s| {
            let mut instances = Vec::new();
            for i in s.instances.values().flat_map(|m| m.values()) {
                let Some(n) = s.nodes.get(&i.node) else {
                    continue;
                };
                // Gateways are found by the federation state; external nodes'
                // instances have no agent to tunnel to.
                if i.service == weft_api::gateway::SERVICE
                    || weft_api::catalog_register::is_external(n)
                {
                    continue;
                }
                if instances.len() == weft_api::federation::MAX_REMOTE_INSTANCES {
                    return Err(Status::resource_exhausted(format!(
                        "datacenter {} has more than {} instances to share",
                        node.datacenter,
                        weft_api::federation::MAX_REMOTE_INSTANCES
                    )));
                }
                // What other datacenters route by: no check output or indexes
                // (they would change the copy, and its Raft write, on every
                // check run).
                let mut i = i.clone();
                if n.health == HealthStatus::Critical {
                    i.health = HealthStatus::Critical;
                }
                i.check_output.clear();
                i.create_index = 0;
                i.modify_index = 0;
                instances.push(weft_api::convert::instance_to_proto(&i));
            }
            Ok(instances)
        })
        .await??;
        Ok(Response::new(proto::RemoteInstances {
            datacenter: node.datacenter.clone(),
            instances: built,
        }))
    }

    async fn policy(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::PolicySnapshot>, Status> {
        caller_datacenter(&req)?;
        if self.node.datacenter != self.primary {
            return Err(Status::failed_precondition(format!(
                "datacenter {} is not the primary ({})",
                self.node.datacenter, self.primary
            )));
        }
        // The leader's state, as of now: a lagging or just-restored server
        // must not hand secondaries an old (or empty) policy.
        let snapshot = crate::grpc::read(&self.node, Some(proto::ReadOptions::default()), |s| {
            proto::PolicySnapshot {
                intentions: s
                    .all_intentions()
                    .map(weft_api::convert::intention_to_proto)
                    .collect(),
                config_entries: s
                    .config
                    .values()
                    .flat_map(|m| m.values())
                    .map(crate::grpc::config::entry_to_proto)
                    .collect(),
            }
        })
        .await?;
        Ok(Response::new(snapshot))
    }

    async fn acl(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::AclReplication>, Status> {
        caller_datacenter(&req)?;
        if self.node.datacenter != self.primary {
            return Err(Status::failed_precondition(format!(
                "datacenter {} is not the primary ({})",
                self.node.datacenter, self.primary
            )));
        }
        let (policies, tokens) =
            crate::grpc::read(&self.node, Some(proto::ReadOptions::default()), |s| {
                s.acl.own()
            })
            .await?;
        let json =
            serde_json::to_vec(&serde_json::json!({ "policies": policies, "tokens": tokens }))
                .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(proto::AclReplication { json }))
    }

    async fn forward(
        &self,
        req: Request<proto::ForwardRequest>,
    ) -> Result<Response<proto::ForwardReply>, Status> {
        let from = caller_datacenter(&req)?;
        if from == self.node.datacenter {
            return Err(Status::permission_denied(
                "a request of this datacenter is not forwarded to it",
            ));
        }
        let reply = crate::http::answer_forwarded(&self.node, req.into_inner()).await;
        Ok(Response::new(reply))
    }

    async fn ca(
        &self,
        req: Request<proto::FederationCaRequest>,
    ) -> Result<Response<proto::FederationCaReply>, Status> {
        let caller = caller_datacenter(&req)?;
        if self.node.datacenter != self.primary {
            return Err(Status::failed_precondition(format!(
                "datacenter {} is not the primary ({})",
                self.node.datacenter, self.primary
            )));
        }
        if caller == self.node.datacenter {
            return Err(Status::permission_denied(
                "the primary signs with its own roots, not an intermediate",
            ));
        }
        let ca = {
            let s = self.node.shared.state.read().expect("state lock");
            s.ca.clone()
        }
        .ok_or_else(|| Status::unavailable("the primary's CA is not initialized yet"))?;
        let mut reply = proto::FederationCaReply {
            trust_domain: ca.trust_domain.clone(),
            roots: ca
                .roots
                .iter()
                .map(|r| proto::FederatedRoot {
                    serial: r.serial,
                    cert_pem: r.cert_pem.clone(),
                    cross_signed_pem: r.cross_signed_pem.clone().unwrap_or_default(),
                    not_after: r.not_after,
                    retire_after: r.retire_after.unwrap_or(0),
                })
                .collect(),
            leaf_ttl_secs: ca.leaf_ttl_secs,
            ..Default::default()
        };
        let csr = &req.get_ref().csr_pem;
        if !csr.is_empty() {
            let (cert, not_after) = ca
                .sign_intermediate(csr, &caller, now_ms() / 1000)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            tracing::info!(datacenter = %caller, root = ca.active_serial(), "intermediate CA signed");
            reply.intermediate_pem = cert;
            reply.intermediate_not_after = not_after;
        }
        Ok(Response::new(reply))
    }
}

/// A secondary takes the primary's intentions and config entries as they
/// are, when they differ from its own.
async fn replicate_policy(node: &ServerNode, settings: &FederationSettings) -> Result<(), String> {
    let reply = ask(
        node,
        &settings.client_tls,
        (&settings.primary, EXCHANGE_TIMEOUT),
        |mut c| async move { c.policy(proto::Empty {}).await },
    )
    .await?;
    let mut intentions = reply
        .intentions
        .into_iter()
        .map(|i| weft_api::convert::intention_from_proto(i).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut entries = reply
        .config_entries
        .iter()
        .map(|e| {
            serde_json::from_str::<weft_api::config_entry::ConfigEntry>(&e.json)
                .map_err(|err| format!("{} {}: {err}", e.kind, e.name))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let key = |i: &weft_api::intention::Intention| (i.source.clone(), i.destination.clone());
    intentions.sort_by_key(key);
    entries.sort_by_key(|e| (e.kind().as_str().to_string(), e.name().to_string()));
    let same = {
        let s = node.shared.state.read().expect("state lock");
        let strip = |i: &weft_api::intention::Intention| weft_api::intention::Intention {
            create_index: 0,
            modify_index: 0,
            ..i.clone()
        };
        let mut mine: Vec<_> = s.all_intentions().map(strip).collect();
        mine.sort_by_key(key);
        let theirs: Vec<_> = intentions.iter().map(strip).collect();
        let mut my_entries: Vec<_> = s
            .config
            .values()
            .flat_map(|m| m.values())
            .map(|e| e.entry.clone())
            .collect();
        my_entries.sort_by_key(|e| (e.kind().as_str().to_string(), e.name().to_string()));
        mine == theirs && my_entries == entries
    };
    if same {
        return Ok(());
    }
    let (n, m) = (intentions.len(), entries.len());
    node.write(Command::ReplacePolicy {
        intentions,
        entries,
    })
    .await
    .map_err(|e| e.to_string())?;
    tracing::info!(
        intentions = n,
        config_entries = m,
        "replicated the primary's intentions and config entries"
    );
    Ok(())
}

/// A secondary copies the primary's ACL policies and tokens, when they
/// differ from its copy; its own stay as they are.
async fn replicate_acl(node: &ServerNode, settings: &FederationSettings) -> Result<(), String> {
    #[derive(serde::Deserialize)]
    struct Replicated {
        policies: Vec<crate::acl::AclPolicy>,
        tokens: Vec<crate::acl::AclToken>,
    }
    let reply = ask(
        node,
        &settings.client_tls,
        (&settings.primary, EXCHANGE_TIMEOUT),
        |mut c| async move { c.acl(proto::Empty {}).await },
    )
    .await?;
    let Replicated { policies, tokens } =
        serde_json::from_slice(&reply.json).map_err(|e| format!("the primary's ACL: {e}"))?;
    // Compared as the state would keep them (what clashes with this
    // datacenter's own left out, links to policies left out dropped): a
    // copy compared with what was received never matched when something
    // was left out, and every token, and every watch's snapshot, was
    // rewritten every 2 s.
    let (acl, mut mine) = {
        let s = node.shared.state.read().expect("state lock");
        (s.acl.clone(), s.acl.replicated())
    };
    let mut theirs = acl.into_replicated(policies.clone(), tokens.clone());
    for side in [&mut theirs, &mut mine] {
        side.0.sort_by(|a, b| a.id.cmp(&b.id));
        side.1.sort_by(|a, b| a.accessor_id.cmp(&b.accessor_id));
    }
    if mine == theirs {
        return Ok(());
    }
    let (p, t) = (policies.len(), tokens.len());
    node.write(Command::ReplicateAcl { policies, tokens })
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(
        policies = p,
        tokens = t,
        "replicated the primary's ACL policies and tokens"
    );
    Ok(())
}

/// The primary's roots as a secondary keeps them (no keys).
fn roots_from(reply: &proto::FederationCaReply) -> Vec<CaRoot> {
    reply
        .roots
        .iter()
        .map(|r| CaRoot {
            serial: r.serial,
            cert_pem: r.cert_pem.clone(),
            key: SecretPem::new(String::new()),
            not_after: r.not_after,
            cross_signed_pem: (!r.cross_signed_pem.is_empty()).then(|| r.cross_signed_pem.clone()),
            retire_after: (r.retire_after != 0).then_some(r.retire_after),
        })
        .collect()
}

/// A secondary's CA follows the primary's: the same trust domain and
/// roots, and an intermediate signed by the active root, renewed when that
/// root changes or at half its life.
async fn follow_primary_ca(node: &ServerNode, settings: &FederationSettings) -> Result<(), String> {
    let call = |csr_pem: String| {
        ask(
            node,
            &settings.client_tls,
            (&settings.primary, EXCHANGE_TIMEOUT),
            move |mut c| {
                let csr_pem = csr_pem.clone();
                async move { c.ca(proto::FederationCaRequest { csr_pem }).await }
            },
        )
    };
    let reply = call(String::new()).await?;
    let roots = roots_from(&reply);
    let primary_active = roots.last().map_or(0, |r| r.serial);
    let current = {
        let s = node.shared.state.read().expect("state lock");
        s.ca.clone()
    };
    let now = now_ms() / 1000;
    let same_domain = current
        .as_ref()
        .is_some_and(|c| c.trust_domain == reply.trust_domain);
    let next = match current.filter(|_| same_domain) {
        Some(c) if !c.needs_intermediate(primary_active, now) => {
            // The leaf lifetime is the primary's too (`--leaf-ttl` there).
            if c.roots == roots && c.leaf_ttl_secs == reply.leaf_ttl_secs {
                return Ok(());
            }
            CaState {
                roots,
                leaf_ttl_secs: reply.leaf_ttl_secs,
                ..c
            }
        }
        _ => {
            let (csr, key) = crate::ca::intermediate_request(&reply.trust_domain, &node.datacenter)
                .map_err(|e| e.to_string())?;
            let signed = call(csr).await?;
            let roots = roots_from(&signed);
            CaState {
                trust_domain: signed.trust_domain.clone(),
                leaf_ttl_secs: signed.leaf_ttl_secs,
                intermediate: Some(Intermediate {
                    cert_pem: signed.intermediate_pem.clone(),
                    key,
                    not_after: signed.intermediate_not_after,
                    root_serial: roots.last().map_or(0, |r| r.serial),
                    issued_at: now,
                }),
                roots,
            }
        }
    };
    let renewed = next.intermediate.as_ref().map(|i| i.root_serial);
    node.write(Command::CaFederate(next))
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(root = ?renewed, "CA follows the primary's");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(gateways: &[&str]) -> FederationState {
        FederationState {
            datacenter: "dc1".into(),
            gateways: gateways.iter().map(|g| g.parse().unwrap()).collect(),
            updated_ms: 7,
        }
    }

    /// The failure: the primary answered once while none of its gateways
    /// passed, its empty list replaced the known one, and the secondary
    /// never reached it again. An empty answer now leaves known gateways
    /// alone; any other answer replaces them.
    #[test]
    fn an_empty_answer_leaves_the_known_gateways() {
        let known = state(&["192.0.2.1:8443"]);
        assert!(keeps_known_gateways(Some(&known), &state(&[])));
        assert!(!keeps_known_gateways(
            Some(&known),
            &state(&["192.0.2.2:8443"])
        ));
        assert!(!keeps_known_gateways(None, &state(&[])));
        assert!(!keeps_known_gateways(Some(&state(&[])), &state(&[])));
    }

    #[test]
    fn the_configured_gateways_join_the_known_ones_once() {
        let known = state(&["192.0.2.9:8443", "192.0.2.1:8443"]);
        let configured: Vec<SocketAddr> = vec!["192.0.2.1:8443".parse().unwrap()];
        let merged = with_configured(known, &configured);
        assert_eq!(merged, state(&["192.0.2.1:8443", "192.0.2.9:8443"]));
        let other: Vec<SocketAddr> = vec!["198.51.100.1:8443".parse().unwrap()];
        let merged = with_configured(merged, &other);
        assert_eq!(merged.gateways.len(), 3);
        assert_eq!(merged.updated_ms, 7, "the primary's report time stays");
    }
}
