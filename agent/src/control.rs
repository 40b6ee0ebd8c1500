//! The agent's link to the servers: registering the node and its services,
//! writing health changes, signing certificates, and following the watch
//! stream into the agent's [`View`]. Connections go to the first server that
//! answers; a watch stream that ends (a server gone, or cut off from its
//! cluster, which ends its streams) is resumed from the last index, asking
//! another server first, with exponential backoff and jitter (capped at
//! 2 s) while none answers, logged once per outage.
//!
//! Registration is anti-entropy, not a ritual: the agent registers at start,
//! and again only when its view of the catalog (which the watch stream keeps
//! current, also across reconnects) lacks its node, shows the node or one of
//! its instances other than configured, or lacks an instance whose last
//! known health is not critical (a critical one may have been deregistered
//! on purpose, by `deregister_critical_service_after`). Servers that come
//! back with their data therefore see no writes from the agents at all; a
//! server that lost the data gets exactly one registration per agent. Health
//! changes that could not be written while no server answered are written
//! once heartbeats get through again, and an instance whose health in the
//! view is not what its checks last said (a server restored from an older
//! snapshot) has it written again ([`health_gaps`]).
//!
//! Every call is TLS to a server whose certificate chains to the configured
//! CA and names `tls_server_name`, and carries the agent's ACL token (a
//! token with this node's identity and its services').
//!
//! Calls share one connection (HTTP/2 carries them side by side), each
//! limited to [`CALL_LIMIT`], the connection pinged when idle. It is kept
//! until a heartbeat on it fails as a broken, leaderless or silent server
//! would, or the agent presents a new node certificate; then the next call
//! connects again, to the first server that answers (after a failed
//! heartbeat, starting past the server it failed on). The watch stream has
//! a connection of its own. A thousand agents heartbeating every two seconds
//! would otherwise cost the servers 500 TLS handshakes a second, and each
//! agent a handshake on every call. With [`Control::drive_on`], connecting
//! (the handshake) and the connections' I/O run on the given runtime (the
//! agent's background thread), not on the caller's.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use tokio::sync::watch;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use weft_api::catalog::HealthStatus;
use weft_api::convert::health_to_proto;
use weft_api::proto::{
    self, acl_client::AclClient, ca_client::CaClient, catalog_client::CatalogClient,
    watch_client::WatchClient,
};

use crate::backoff::{Backoff, Streak};
use crate::config::{AgentConfig, ServiceConfig};
use crate::shared_view::SharedView;
use crate::view::{InstanceKey, View};

/// The first and the longest wait between attempts to reach the servers.
/// At most this many events already received are applied before the
/// view is published.
const PUBLISH_BATCH: usize = 1000;
const RECONNECT_BASE: Duration = Duration::from_millis(100);
const RECONNECT_CAP: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    Credentials(String),
    #[error("no server answered: {0}")]
    Unreachable(String),
    #[error("server refused {what}: {status}")]
    Refused { what: String, status: tonic::Status },
}

/// Adds the agent's token to every call.
#[derive(Clone)]
pub struct TokenInterceptor(MetadataValue<Ascii>);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// What the agent proves itself and checks the servers with: the token on
/// every call and, once the agent has it, its node certificate as the TLS
/// client certificate (the servers take it for the node's identity).
pub struct Credentials {
    tls: RwLock<ClientTlsConfig>,
    token: TokenInterceptor,
}

impl Credentials {
    /// The token from `token`, `token_file` or `WEFT_TOKEN`, and the CA from
    /// `ca_file` or `WEFT_CACERT`, in that order. Both are required: an
    /// agent neither talks to an unverified server nor anonymously.
    pub fn load(config: &AgentConfig) -> Result<Self, ControlError> {
        let fail = |m: String| ControlError::Credentials(m);
        let token = match (&config.token, &config.token_file) {
            (Some(t), _) => t.expose().trim().to_string(),
            (None, Some(path)) => crate::private_file::read(path)
                .map_err(|e| fail(format!("token_file: {e}")))?
                .trim()
                .to_string(),
            (None, None) => std::env::var("WEFT_TOKEN")
                .unwrap_or_default()
                .trim()
                .to_string(),
        };
        if token.is_empty() {
            return Err(fail(
                "no ACL token: set token or token_file in the agent's configuration, or WEFT_TOKEN"
                    .into(),
            ));
        }
        let token: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| fail("the ACL token has characters a token cannot have".into()))?;
        let ca_file = config
            .ca_file
            .clone()
            .or_else(|| std::env::var_os("WEFT_CACERT").map(Into::into))
            .ok_or_else(|| {
                fail("no CA to verify the servers with: set ca_file, or WEFT_CACERT".into())
            })?;
        let (ca, _) = crate::private_file::read_trusted(&ca_file)
            .map_err(|e| fail(format!("ca_file: {e}")))?;
        Ok(Credentials {
            tls: RwLock::new(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name(config.tls_server_name.clone())
                    // A server that takes the TCP connection and then says
                    // nothing (stopped, hung) is given up on, also when a
                    // kept channel reconnects on its own.
                    .timeout(CONNECT_LIMIT),
            ),
            token: TokenInterceptor(token),
        })
    }
}

/// A channel to a server that adds the agent's token to every call.
pub type ServerChannel = InterceptedService<Channel, TokenInterceptor>;

/// How often the agent sends the servers its per-pair traffic.
pub const TRAFFIC_INTERVAL: Duration = Duration::from_secs(5);

/// How long a call on the shared connection may take before it fails
/// (and a failed heartbeat drops the connection): well within the servers'
/// node timeout (10 s by default), so that a server that went silent costs
/// one missed heartbeat, not the node's health.
pub const CALL_LIMIT: Duration = Duration::from_secs(5);
/// How long connecting to one server (TCP, TLS, HTTP/2) may take before
/// the next is tried.
const CONNECT_LIMIT: Duration = Duration::from_secs(2);
/// HTTP/2 pings on idle connections to the servers, and how long one may
/// go unanswered before the connection counts as broken: a server that
/// vanished without closing (power, partition) is noticed in seconds, not
/// when the kernel gives up on the socket.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long at most an agent waits before resubscribing after a watch
/// stream that ran ended.
const SPREAD: Duration = Duration::from_secs(1);

/// The server a new watch stream starts at after one from `server` ended:
/// another one, drawn with `draw`, so that the agents a server dropped
/// together spread over the others rather than all going to the next.
fn next_watch_server(server: usize, servers: usize, draw: usize) -> usize {
    match servers {
        0 | 1 => 0,
        n => (server + 1 + draw % (n - 1)) % n,
    }
}

/// The order servers are tried in: from `first` on, around.
pub(crate) fn dial_order(servers: usize, first: usize) -> impl Iterator<Item = usize> {
    (0..servers).map(move |k| (first + k) % servers)
}

/// A channel to the first of `addrs`, from `addrs[first]` on, that accepts
/// a TLS connection, its calls limited to `call_limit`; and which it is.
async fn connect_first(
    addrs: Vec<String>,
    first: usize,
    tls: ClientTlsConfig,
    call_limit: Option<Duration>,
) -> Result<(usize, Channel), ControlError> {
    let mut last = String::from("no servers configured");
    for i in dial_order(addrs.len(), first) {
        let addr = &addrs[i];
        let endpoint = match Endpoint::from_shared(format!("https://{addr}"))
            .and_then(|e| e.tls_config(tls.clone()))
        {
            Ok(e) => {
                let e = e
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                    .keep_alive_while_idle(true);
                match call_limit {
                    Some(limit) => e.timeout(limit),
                    None => e,
                }
            }
            Err(e) => {
                last = format!("{addr}: {e}");
                continue;
            }
        };
        // TCP, TLS and HTTP/2's start, bounded as a whole: the next
        // server is tried when this one does not answer.
        match tokio::time::timeout(CONNECT_LIMIT, endpoint.connect()).await {
            Ok(Ok(ch)) => return Ok((i, ch)),
            Ok(Err(e)) => last = format!("{addr}: {e:?}"),
            Err(_) => last = format!("{addr}: no connection within {CONNECT_LIMIT:?}"),
        }
    }
    Err(ControlError::Unreachable(last))
}

/// A workload's `token` as the `authorization` value of a call made for
/// it. A blank one is refused here: on the agent's connection the servers
/// would take a call without a token for the node's own.
fn workload_token(token: &str, what: &str) -> Result<MetadataValue<Ascii>, ControlError> {
    let refused = || ControlError::Refused {
        what: what.to_string(),
        status: tonic::Status::unauthenticated("ACL token not found"),
    };
    if token.trim().is_empty() {
        return Err(refused());
    }
    format!("Bearer {token}").parse().map_err(|_| refused())
}

/// Whether a heartbeat failing with `status` says its connection is of no
/// further use: broken, its server without a leader or not answering in
/// time. A server's answer (denied, invalid, not found) says nothing of
/// the connection.
fn connection_failed(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::DeadlineExceeded
    )
}

/// The servers, and the node's registration as this agent knows it.
pub struct Control {
    addrs: Vec<String>,
    credentials: Credentials,
    /// The running configuration (services change on reload).
    config: RwLock<Arc<AgentConfig>>,
    /// Last known health of each local service instance (by id).
    health: Mutex<BTreeMap<String, (HealthStatus, String)>>,
    /// The reason this agent put its node in maintenance, while it is: a
    /// registration (which the servers take as "alive, passing") puts it
    /// back, so that a watch reconnecting while the agent drains does not
    /// send sources to it again.
    maintenance: Mutex<Option<String>>,
    /// Instances whose last known health the servers may not have yet.
    unsent_health: Mutex<BTreeSet<String>>,
    /// Held while a health write is sent, so that writes of one instance's
    /// health reach the servers in order (the last one carries the latest).
    health_writes: tokio::sync::Mutex<()>,
    /// Registrations the servers took.
    registrations: Counter,
    /// The index of the last registration's last write: the view is not
    /// judged before it has caught up with it.
    registered_at: AtomicU64,
    /// The index of the last health write: the view's health is not
    /// compared with the checks' before it has caught up with it.
    health_written_at: AtomicU64,
    /// When each instance's health may be written again next.
    rewrites: Mutex<Rewrites>,
    /// The connection calls share, and the number of times it was
    /// forgotten (a connection made before the last time is not kept).
    shared: Mutex<(u64, Option<(usize, Channel)>)>,
    /// The server dials start from: past the one whose connection last
    /// failed a heartbeat.
    first_server: std::sync::atomic::AtomicUsize,
    /// Held while the shared connection is dialled.
    dialing: tokio::sync::Mutex<()>,
    /// Where connections are made and driven; unset: the caller's runtime.
    runtime: OnceLock<tokio::runtime::Handle>,
}

impl Control {
    pub fn new(config: Arc<AgentConfig>) -> Result<Self, ControlError> {
        Ok(Self {
            addrs: config.servers.clone(),
            credentials: Credentials::load(&config)?,
            config: RwLock::new(config),
            health: Mutex::new(BTreeMap::new()),
            maintenance: Mutex::new(None),
            unsent_health: Mutex::new(BTreeSet::new()),
            health_writes: tokio::sync::Mutex::new(()),
            registrations: Counter::default(),
            registered_at: AtomicU64::new(0),
            health_written_at: AtomicU64::new(0),
            rewrites: Mutex::new(Rewrites::default()),
            shared: Mutex::new((0, None)),
            first_server: std::sync::atomic::AtomicUsize::new(0),
            dialing: tokio::sync::Mutex::new(()),
            runtime: OnceLock::new(),
        })
    }

    /// Makes and drives connections to the servers on `runtime` from now
    /// on (the first call wins).
    pub fn drive_on(&self, runtime: tokio::runtime::Handle) {
        let _ = self.runtime.set(runtime);
    }

    /// Counts registrations in `counter` (the agent's metrics).
    pub fn counting_registrations(mut self, counter: Counter) -> Self {
        self.registrations = counter;
        self
    }

    /// How many registrations the servers took from this agent.
    pub fn registrations(&self) -> u64 {
        self.registrations.get()
    }

    /// The running configuration.
    pub fn config(&self) -> Arc<AgentConfig> {
        self.config.read().expect("config lock").clone()
    }

    /// Takes a reloaded configuration: later registrations use its services.
    pub fn set_config(&self, config: Arc<AgentConfig>) {
        *self.config.write().expect("config lock") = config;
    }

    /// The kept channel (a new one to the first server that accepts a TLS
    /// connection if there is none); a call on it fails after
    /// [`CALL_LIMIT`] without an answer.
    pub async fn channel(&self) -> Result<ServerChannel, ControlError> {
        let ch = self.connect().await?;
        Ok(InterceptedService::new(ch, self.credentials.token.clone()))
    }

    /// Asks the servers whether `token` (a workload's, not the agent's: the
    /// call carries it instead of the agent's) may do each of `checks`; one
    /// answer per check, in order. The token is never logged.
    pub async fn authorize(
        &self,
        token: &str,
        checks: Vec<proto::AuthorizeCheck>,
    ) -> Result<Vec<bool>, ControlError> {
        let what = "an authorization".to_string();
        let value = workload_token(token, &what)?;
        let asked = checks.len();
        let mut req = tonic::Request::new(proto::AuthorizeRequest { checks });
        req.set_timeout(Duration::from_secs(5));
        req.metadata_mut().insert("authorization", value);
        let answer = AclClient::new(self.connect().await?)
            .authorize(req)
            .await
            .map_err(Self::refused(what))?
            .into_inner();
        if answer.results.len() != asked {
            return Err(ControlError::Refused {
                what: "an authorization".into(),
                status: tonic::Status::internal(format!(
                    "{} answers to {asked} questions",
                    answer.results.len()
                )),
            });
        }
        Ok(answer.results.iter().map(|r| r.allowed).collect())
    }

    /// The shared plain channel (no token added), connected to the first
    /// server that accepts a TLS connection if there is none.
    async fn connect(&self) -> Result<Channel, ControlError> {
        let kept = || {
            let shared = self.shared.lock().expect("channel lock");
            (shared.0, shared.1.as_ref().map(|(_, ch)| ch.clone()))
        };
        if let (_, Some(ch)) = kept() {
            return Ok(ch);
        }
        // One dial at a time: callers that found no connection take the
        // one the first of them made.
        let _dialing = self.dialing.lock().await;
        let (generation, ch) = kept();
        if let Some(ch) = ch {
            return Ok(ch);
        }
        let first = self.first_server.load(Ordering::SeqCst);
        let (server, ch) = self.connect_new(first, Some(CALL_LIMIT)).await?;
        let mut shared = self.shared.lock().expect("channel lock");
        // Forgotten meanwhile (a new node certificate, say): used for this
        // call, not kept.
        if shared.0 == generation {
            shared.1 = Some((server, ch.clone()));
        }
        Ok(ch)
    }

    /// Drops the shared connection: the next call connects again.
    fn forget(&self) {
        let mut shared = self.shared.lock().expect("channel lock");
        shared.0 += 1;
        shared.1 = None;
    }

    /// Drops the shared connection after a heartbeat failed on it: the
    /// next dial starts at the server after its own (a silent first server
    /// is not waited for again by every agent that listed it first).
    fn forget_failed(&self) {
        let mut shared = self.shared.lock().expect("channel lock");
        if let Some((server, _)) = shared.1.take() {
            let next = (server + 1) % self.addrs.len().max(1);
            self.first_server.store(next, Ordering::SeqCst);
        }
        shared.0 += 1;
    }

    /// A new connection to the first server, from `addrs[first]` on, that
    /// accepts one, made on [`Self::drive_on`]'s runtime if set; calls on
    /// it limited to `call_limit` (a stream: its start).
    async fn connect_new(
        &self,
        first: usize,
        call_limit: Option<Duration>,
    ) -> Result<(usize, Channel), ControlError> {
        let tls = self.credentials.tls.read().expect("tls lock").clone();
        let dial = connect_first(self.addrs.clone(), first, tls, call_limit);
        match self.runtime.get() {
            Some(runtime) => runtime.spawn(dial).await.map_err(|e| {
                ControlError::Unreachable(format!("the task connecting to the servers: {e}"))
            })?,
            None => dial.await,
        }
    }

    /// Presents `cert_chain_pem` (the node certificate, renewed or not) as
    /// the TLS client certificate of later calls.
    pub fn present_node_certificate(&self, cert_chain_pem: &str, key_pem: &str) {
        {
            let mut tls = self.credentials.tls.write().expect("tls lock");
            *tls = tls.clone().identity(tonic::transport::Identity::from_pem(
                cert_chain_pem,
                key_pem,
            ));
        }
        // The servers see the new certificate on a new connection.
        self.forget();
    }

    fn refused(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> ControlError {
        let what = what.into();
        move |status| ControlError::Refused { what, status }
    }

    /// Registers the node and every local service, with their last known
    /// health; returns the index of the last write.
    pub async fn register(&self) -> Result<u64, ControlError> {
        let cfg = self.config();
        let mut catalog = CatalogClient::new(self.channel().await?);
        let node = proto::Node {
            name: cfg.node_name.clone(),
            address: cfg.advertise_addr.to_string(),
            datacenter: cfg.datacenter.clone(),
            meta: cfg.node_meta.clone().into_iter().collect(),
            ..Default::default()
        };
        let mut index = catalog
            .register_node(proto::RegisterNodeRequest { node: Some(node) })
            .await
            .map_err(Self::refused(format!("registering node {}", cfg.node_name)))?
            .into_inner()
            .index;
        let maintenance = self.maintenance.lock().expect("maintenance lock").clone();
        if let Some(reason) = maintenance {
            self.maintenance_on(&mut catalog, true, &reason).await?;
        }
        for s in &cfg.services {
            index = self.register_on(&mut catalog, s).await?;
        }
        self.registrations.inc();
        self.registered_at.fetch_max(index, Ordering::SeqCst);
        tracing::info!(node = %cfg.node_name, services = cfg.services.len(), index, "registered");
        Ok(index)
    }

    /// Registers one local service (added or changed by a reload).
    pub async fn register_service(&self, s: &ServiceConfig) -> Result<(), ControlError> {
        let mut catalog = CatalogClient::new(self.channel().await?);
        let index = self.register_on(&mut catalog, s).await?;
        // The view is not judged before it shows this registration.
        self.registered_at.fetch_max(index, Ordering::SeqCst);
        Ok(())
    }

    async fn register_on(
        &self,
        catalog: &mut CatalogClient<ServerChannel>,
        s: &ServiceConfig,
    ) -> Result<u64, ControlError> {
        let (status, output) = self
            .health
            .lock()
            .expect("health lock")
            .get(&s.id)
            .cloned()
            .unwrap_or((HealthStatus::Critical, "no check has run yet".into()));
        let instance = proto::ServiceInstance {
            id: s.id.clone(),
            service: s.name.clone(),
            node: self.config().node_name.clone(),
            address: s.address.to_string(),
            port: u32::from(s.port),
            tags: s.tags.clone(),
            meta: s.meta.clone().into_iter().collect(),
            health: health_to_proto(status) as i32,
            check_output: output,
            // The shortest of the service's checks', as Consul does.
            deregister_critical_after_ms: s
                .checks
                .iter()
                .filter_map(|c| c.deregister_critical_service_after)
                .min()
                .map_or(0, |d| d.as_millis() as u64),
            ..Default::default()
        };
        Ok(catalog
            .register_service(proto::RegisterServiceRequest {
                instance: Some(instance),
            })
            .await
            .map_err(Self::refused(format!("registering service {}", s.id)))?
            .into_inner()
            .index)
    }

    /// Why the node's registration in `view` is not what this agent would
    /// register, if it is not ([`registration_gap`]).
    pub fn registration_gap(&self, view: &View) -> Option<String> {
        registration_gap(
            &self.config(),
            &self.health.lock().expect("health lock"),
            view,
        )
    }

    /// Removes one local service instance (gone from the file on reload).
    pub async fn deregister_service(&self, id: &str) -> Result<(), ControlError> {
        let mut catalog = CatalogClient::new(self.channel().await?);
        catalog
            .deregister_service(proto::DeregisterServiceRequest {
                node: self.config().node_name.clone(),
                id: id.to_string(),
            })
            .await
            .map_err(Self::refused(format!("deregistering service {id}")))?;
        self.health.lock().expect("health lock").remove(id);
        self.unsent_health.lock().expect("health lock").remove(id);
        Ok(())
    }

    /// Registers, retrying until a server takes it or `limit` passes.
    pub async fn register_retrying(&self, limit: Duration) -> Result<(), ControlError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.register().await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!("registration failed, retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Removes the node (and with it its services) from the catalog.
    pub async fn deregister(&self) -> Result<(), ControlError> {
        let mut catalog = CatalogClient::new(self.channel().await?);
        catalog
            .deregister_node(proto::DeregisterNodeRequest {
                name: self.config().node_name.clone(),
            })
            .await
            .map_err(Self::refused("deregistering"))?;
        tracing::info!(node = %self.config().node_name, "deregistered");
        Ok(())
    }

    /// Writes a service's new health (called only when it changed). If it
    /// cannot be written now, it is written once heartbeats get through.
    pub async fn update_health(
        &self,
        id: &str,
        status: HealthStatus,
        output: &str,
    ) -> Result<(), ControlError> {
        self.health
            .lock()
            .expect("health lock")
            .insert(id.to_string(), (status, output.to_string()));
        self.unsent_health
            .lock()
            .expect("health lock")
            .insert(id.to_string());
        self.send_health(id).await
    }

    /// Sends the last known health of instance `id`.
    async fn send_health(&self, id: &str) -> Result<(), ControlError> {
        let _order = self.health_writes.lock().await;
        let Some((status, output)) = self.health.lock().expect("health lock").get(id).cloned()
        else {
            // Gone (a reload removed it): nothing to send, now or later.
            self.unsent_health.lock().expect("health lock").remove(id);
            return Ok(());
        };
        let mut catalog = CatalogClient::new(self.channel().await?);
        let written = catalog
            .update_health(proto::UpdateHealthRequest {
                node: self.config().node_name.clone(),
                id: id.to_string(),
                health: health_to_proto(status) as i32,
                output: output.clone(),
            })
            .await;
        if let Ok(result) = &written {
            (self.health_written_at).fetch_max(result.get_ref().index, Ordering::SeqCst);
        }
        if let Err(status) = written {
            use tonic::Code;
            if matches!(
                status.code(),
                Code::FailedPrecondition | Code::InvalidArgument | Code::PermissionDenied
            ) {
                // A server answered and will not take it (the instance is
                // gone, say): sending it again would not help; the next
                // registration carries it.
                self.unsent_health.lock().expect("health lock").remove(id);
            }
            return Err(Self::refused(format!("health of {id}"))(status));
        }
        // Sent under `health_writes`: a newer state marks it unsent again
        // only after this write, and is then sent after it.
        let latest = self.health.lock().expect("health lock").get(id).cloned();
        if latest == Some((status, output)) {
            self.unsent_health.lock().expect("health lock").remove(id);
        }
        Ok(())
    }

    /// Writes every health state the servers may have missed.
    async fn send_unsent_health(&self) -> Result<(), ControlError> {
        let unsent: Vec<String> = self
            .unsent_health
            .lock()
            .expect("health lock")
            .iter()
            .cloned()
            .collect();
        for id in unsent {
            self.send_health(&id).await?;
            tracing::info!(service = %id, "health written after the servers came back");
        }
        Ok(())
    }

    /// Starts from the health a predecessor last reported (an upgrade): the
    /// node's instances are registered as they are, not critical.
    pub fn seed_health(&self, health: BTreeMap<String, (HealthStatus, String)>) {
        self.health.lock().expect("health lock").extend(health);
    }

    /// The health last reported per local instance id.
    pub fn last_health(&self) -> BTreeMap<String, (HealthStatus, String)> {
        self.health.lock().expect("health lock").clone()
    }

    /// Puts the node in maintenance (critical: sources stop choosing its
    /// instances) or takes it out.
    pub async fn set_maintenance(&self, enable: bool, reason: &str) -> Result<(), ControlError> {
        *self.maintenance.lock().expect("maintenance lock") = enable.then(|| reason.to_string());
        let mut catalog = CatalogClient::new(self.channel().await?);
        self.maintenance_on(&mut catalog, enable, reason).await
    }

    async fn maintenance_on(
        &self,
        catalog: &mut CatalogClient<ServerChannel>,
        enable: bool,
        reason: &str,
    ) -> Result<(), ControlError> {
        catalog
            .set_node_maintenance(proto::NodeMaintenanceRequest {
                node: self.config().node_name.clone(),
                enable,
                reason: reason.to_string(),
            })
            .await
            .map_err(Self::refused("maintenance mode"))?;
        Ok(())
    }

    /// Tells the servers this node's agent is alive; returns how long to
    /// wait before the next heartbeat.
    pub async fn heartbeat(&self) -> Result<Duration, ControlError> {
        // Connecting and the call together: a dial stuck on a silent
        // server holds up no more than one heartbeat.
        let limit = CALL_LIMIT + CONNECT_LIMIT;
        match tokio::time::timeout(limit, self.heartbeat_once()).await {
            Ok(beat) => beat,
            Err(_) => {
                self.forget_failed();
                Err(ControlError::Unreachable(format!(
                    "no heartbeat answer within {limit:?}"
                )))
            }
        }
    }

    async fn heartbeat_once(&self) -> Result<Duration, ControlError> {
        let mut catalog = CatalogClient::new(self.channel().await?);
        let reply = catalog
            .heartbeat(proto::HeartbeatRequest {
                node: self.config().node_name.clone(),
            })
            .await
            .map_err(|status| {
                // The heartbeat (one at a time, every few seconds) is what
                // judges the kept connection: other calls' failures, a
                // workload's among them, leave it be.
                if connection_failed(&status) {
                    self.forget_failed();
                }
                ControlError::Refused {
                    what: "heartbeat".into(),
                    status,
                }
            })?;
        let ms = reply.into_inner().interval_ms.clamp(200, 30_000);
        Ok(Duration::from_millis(ms))
    }

    /// Sends heartbeats for as long as the agent runs: the servers mark the
    /// node critical when they stop. A failed one is retried after a second
    /// and logged once per failure streak. After a heartbeat got through,
    /// health changes the servers missed are written.
    pub async fn heartbeat_forever(self: Arc<Self>) {
        let mut streak = Streak::default();
        loop {
            let wait = match self.heartbeat().await {
                Ok(next) => {
                    if let Some((lasted, failures)) = streak.succeeded() {
                        tracing::info!(
                            "heartbeats reach the servers again after {:.1}s ({failures} failed)",
                            lasted.as_secs_f64()
                        );
                    }
                    let unsent = !self.unsent_health.lock().expect("health lock").is_empty();
                    if unsent {
                        if let Err(e) = self.send_unsent_health().await {
                            tracing::warn!("writing the health the servers missed: {e}");
                        }
                    }
                    next
                }
                Err(e) => {
                    if streak.failed() {
                        tracing::warn!("heartbeat failed: {e}; retrying every second");
                    }
                    Duration::from_secs(1)
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Sends the servers what `metrics` counted per pair of services, every
    /// [`TRAFFIC_INTERVAL`], for `weft top` and the UI. A report that fails
    /// is dropped (the Prometheus counters still have it), logged once per
    /// failure streak.
    pub async fn report_traffic_forever(
        self: Arc<Self>,
        metrics: Arc<crate::metrics::AgentMetrics>,
    ) {
        let mut streak = Streak::default();
        let mut tick = tokio::time::interval(TRAFFIC_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let pairs = metrics.take_traffic();
            if pairs.is_empty() {
                continue;
            }
            let sent = async {
                let mut telemetry =
                    proto::telemetry_client::TelemetryClient::new(self.channel().await?);
                // The servers take at most 1,024 pairs a report; a refused
                // pair costs itself (they keep the rest), a chunk itself.
                let mut first = Ok(());
                for chunk in pairs.chunks(1024) {
                    let sent = telemetry
                        .report(proto::TrafficReport {
                            node: self.config().node_name.clone(),
                            pairs: chunk.to_vec(),
                        })
                        .await
                        .map_err(Self::refused("traffic report".to_string()));
                    if first.is_ok() {
                        first = sent.map(|_| ());
                    }
                }
                first
            };
            match sent.await {
                Ok(()) => {
                    streak.succeeded();
                }
                Err(e) => {
                    if streak.failed() {
                        tracing::warn!("traffic report dropped: {e}");
                    }
                }
            }
        }
    }

    /// Asks the CA to sign `csr_pem` for `service` (None: this node).
    pub async fn sign(
        &self,
        csr_pem: String,
        service: Option<&str>,
    ) -> Result<proto::SignedLeaf, ControlError> {
        let mut ca = CaClient::new(self.channel().await?);
        let req = proto::SignRequest {
            csr_pem,
            node: self.config().node_name.clone(),
            service: service.unwrap_or_default().to_string(),
        };
        let what = format!("a certificate for {}", service.unwrap_or("this node"));
        Ok(ca
            .sign(req)
            .await
            .map_err(Self::refused(what))?
            .into_inner())
    }

    /// Asks the CA to sign `csr_pem` for `service` on this node with
    /// `token` (a workload's, not the agent's: the servers judge that
    /// caller's `service:write`). The token is never logged.
    pub async fn sign_as(
        &self,
        token: &str,
        csr_pem: String,
        service: &str,
    ) -> Result<proto::SignedLeaf, ControlError> {
        let what = format!("a certificate for {service}");
        let value = workload_token(token, &what)?;
        let mut req = tonic::Request::new(proto::SignRequest {
            csr_pem,
            node: self.config().node_name.clone(),
            service: service.to_string(),
        });
        req.set_timeout(Duration::from_secs(5));
        req.metadata_mut().insert("authorization", value);
        Ok(CaClient::new(self.connect().await?)
            .sign(req)
            .await
            .map_err(Self::refused(what))?
            .into_inner())
    }

    /// Follows the watch stream forever, applying events to a working copy
    /// of the view and publishing it to `view`, and its index to
    /// `index_tx`, after each. Reconnects with backoff when a stream
    /// breaks, resuming from the view's index; while no server answers, the
    /// view stays as it was. An outage is logged when it starts and when the
    /// stream resumes, not at every attempt.
    pub async fn follow(self: Arc<Self>, view: Arc<SharedView>, index_tx: watch::Sender<u64>) {
        let mut backoff = Backoff::new(RECONNECT_BASE, RECONNECT_CAP);
        let mut streak = Streak::default();
        let mut working = View::clone(&view.load());
        // The server the next stream is asked of first.
        let mut first = self.first_server.load(Ordering::SeqCst);
        loop {
            let from = working.index;
            let mut ran = false;
            let mut subscribed = || {
                ran = true;
                backoff.reset();
                if let Some((lasted, failures)) = streak.succeeded() {
                    tracing::info!(
                        from_index = from,
                        "watch stream resumed after {:.1}s ({failures} attempts failed)",
                        lasted.as_secs_f64()
                    );
                }
            };
            let result = self
                .stream_once(
                    (&mut working, &view),
                    &index_tx,
                    (from, &mut first),
                    &mut subscribed,
                )
                .await;
            // Whatever ended it (a server gone, cut off from its cluster,
            // refusing), the next stream starts at another server.
            first = next_watch_server(first, self.addrs.len(), rand::random::<u32>() as usize);
            let e = match result {
                Ok(()) => ControlError::Unreachable("the server ended the watch stream".into()),
                Err(e) => e,
            };
            if streak.failed() {
                tracing::warn!("watch stream: {e}; reconnecting with backoff (up to {RECONNECT_CAP:?}), the view stays as it is");
            } else {
                tracing::debug!(attempt = streak.failures(), "watch stream: {e}");
            }
            // A stream that ran and ended may have ended for every agent
            // at once (its server cut off or stopping): they come back
            // spread over a second, not in step.
            let wait = match ran {
                true => SPREAD.mul_f64(rand::random::<f64>()),
                false => backoff.next_wait(),
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// One watch stream, from subscribing (at index `from`, asking the
    /// servers from `first` on, which is left at the one that answered) to
    /// its end. `subscribed` is called once a server took the subscription.
    async fn stream_once(
        &self,
        (working, view): (&mut View, &SharedView),
        index_tx: &watch::Sender<u64>,
        (from, first): (u64, &mut usize),
        subscribed: &mut impl FnMut(),
    ) -> Result<(), ControlError> {
        // A snapshot half received on a stream that broke is of no use.
        working.drop_partial();
        let (server, channel) = self.connect_new(*first, None).await?;
        *first = server;
        let channel = InterceptedService::new(channel, self.credentials.token.clone());
        let mut stream = WatchClient::new(channel)
            .subscribe(proto::WatchRequest {
                from_index: from,
                include_kv: false,
            })
            .await
            .map_err(|status| ControlError::Refused {
                what: "a watch stream".into(),
                status,
            })?
            .into_inner();
        subscribed();
        // A registration that failed before the stream broke is retried
        // here; otherwise the view is as the servers' catalog was, and there
        // is nothing to do.
        self.reconcile(view).await?;
        loop {
            let event = match stream.message().await {
                Ok(Some(event)) => event,
                Ok(None) => return Ok(()),
                Err(status) => {
                    return Err(ControlError::Refused {
                        what: "the watch stream".into(),
                        status,
                    })
                }
            };
            let mut index = event.index;
            if let Err(e) = working.apply(event) {
                tracing::error!("ignoring a bad watch event: {e}");
                continue;
            }
            // Events already here are applied before the view is published
            // (a burst of writes costs one published view, not one each),
            // up to PUBLISH_BATCH of them. The stream's end or error, if
            // it comes, is dealt with once what came before is published.
            let mut ended = None;
            for _ in 1..PUBLISH_BATCH {
                use futures::FutureExt;
                let Some(next) = stream.message().now_or_never() else {
                    break;
                };
                match next {
                    Ok(Some(event)) => {
                        let at = event.index;
                        match working.apply(event) {
                            Ok(()) => index = at,
                            Err(e) => tracing::error!("ignoring a bad watch event: {e}"),
                        }
                    }
                    Ok(None) => {
                        ended = Some(Ok(()));
                        break;
                    }
                    Err(status) => {
                        ended = Some(Err(ControlError::Refused {
                            what: "the watch stream".into(),
                            status,
                        }));
                        break;
                    }
                }
            }
            if working.is_partial() {
                // More parts of a snapshot follow; nothing changed yet.
                match ended {
                    Some(end) => return end,
                    None => continue,
                }
            }
            view.publish(working);
            self.reconcile(view).await?;
            index_tx.send_replace(index);
            if let Some(end) = ended {
                return end;
            }
        }
    }

    /// Registers again if `view` shows the registration lost or changed
    /// (a wiped or restored server, an operator's deregistration); not
    /// before the view has caught up with the agent's own last registration,
    /// whose writes arrive one event at a time.
    async fn reconcile(&self, view: &SharedView) -> Result<(), ControlError> {
        let gap = {
            let view = view.load();
            if view.index < self.registered_at.load(Ordering::SeqCst) {
                return Ok(());
            }
            self.registration_gap(&view)
        };
        if let Some(gap) = gap {
            tracing::warn!("{gap} in the catalog; registering again");
            self.register().await?;
            return Ok(());
        }
        // The registration stands, but an instance's health in it may not
        // be what its checks last said (a server restored from an older
        // snapshot, say): written again, or the servers would keep an
        // instance out of rotation, or in it, until its checks next change.
        let stale = {
            let view = view.load();
            if view.index < self.health_written_at.load(Ordering::SeqCst) {
                return Ok(());
            }
            health_gaps(
                &self.config(),
                &self.health.lock().expect("health lock"),
                &self.unsent_health.lock().expect("health lock"),
                &view,
            )
        };
        // At most one rewrite per instance per wait, the wait doubling while
        // the catalog keeps disagreeing: a fight (two agents of one node
        // during an upgrade in place, whose checks start afresh) stays slow.
        let ids: Vec<String> = stale.iter().map(|(id, _, _)| id.clone()).collect();
        let due = (self.rewrites.lock().expect("health lock")).due(&ids, std::time::Instant::now());
        for (id, listed, known) in stale.into_iter().filter(|(id, _, _)| due.contains(id)) {
            tracing::warn!(
                service = %id,
                "health in the catalog is {listed}, its checks say {known}: writing it again"
            );
            // Not the watch's error, and the rest wait for the next view: a
            // write that failed for want of a server is sent again with the
            // heartbeats.
            if let Err(e) = self.send_health(&id).await {
                tracing::warn!(service = %id, "writing health again: {e}");
                break;
            }
        }
        Ok(())
    }
}

/// The first wait between two rewrites of one instance's health, and the
/// longest it doubles to.
pub const REWRITE_FIRST: Duration = Duration::from_secs(10);
pub const REWRITE_MAX: Duration = Duration::from_secs(300);

/// When each instance's health may be written again: the first rewrite at
/// once, then one per wait, the wait doubling from [`REWRITE_FIRST`] to
/// [`REWRITE_MAX`]; an instance quiet for a whole wait after its last one
/// starts afresh.
#[derive(Debug, Default)]
pub struct Rewrites {
    next: BTreeMap<String, (std::time::Instant, Duration)>,
}

impl Rewrites {
    /// Which of the instances `stale` at `now` may be written again.
    pub fn due(&mut self, stale: &[String], now: std::time::Instant) -> Vec<String> {
        self.next.retain(|_, (at, wait)| now < *at + *wait);
        let mut due = Vec::new();
        for id in stale {
            match self.next.get_mut(id) {
                Some((at, _)) if now < *at => {}
                Some((at, wait)) => {
                    *wait = (*wait * 2).min(REWRITE_MAX);
                    *at = now + *wait;
                    due.push(id.clone());
                }
                None => {
                    self.next
                        .insert(id.clone(), (now + REWRITE_FIRST, REWRITE_FIRST));
                    due.push(id.clone());
                }
            }
        }
        due
    }
}

/// Pure: the local instances (id, health in `view`, last known health)
/// whose health in `view` is not the last known one (`health`), leaving out
/// those with a write still to send (`unsent`) and those `view` lacks (a
/// registration's business).
pub fn health_gaps(
    cfg: &AgentConfig,
    health: &BTreeMap<String, (HealthStatus, String)>,
    unsent: &BTreeSet<String>,
    view: &View,
) -> Vec<(String, HealthStatus, HealthStatus)> {
    let mut gaps = Vec::new();
    for s in &cfg.services {
        let Some((known, _)) = health.get(&s.id) else {
            continue;
        };
        if unsent.contains(&s.id) {
            continue;
        }
        let key: InstanceKey = (cfg.node_name.as_str().into(), s.id.as_str().into());
        if let Some(i) = view.instances.get(&key) {
            if i.health != *known {
                gaps.push((s.id.clone(), i.health, *known));
            }
        }
    }
    gaps
}

/// Pure: why the registration of `cfg`'s node in `view` is not what the
/// agent would register, if it is not: the node is missing or differs, an
/// instance differs, or one is missing whose last known health (`health`,
/// by instance id) is not critical.
pub fn registration_gap(
    cfg: &AgentConfig,
    health: &BTreeMap<String, (HealthStatus, String)>,
    view: &View,
) -> Option<String> {
    let Some(node) = view.nodes.get(cfg.node_name.as_str()) else {
        return Some(format!("node {} is missing", cfg.node_name));
    };
    if node.address.parse().ok() != Some(cfg.advertise_addr) || node.datacenter != cfg.datacenter {
        return Some(format!(
            "node {} is registered at {} in {}",
            cfg.node_name, node.address, node.datacenter
        ));
    }
    for s in &cfg.services {
        let key: InstanceKey = (cfg.node_name.as_str().into(), s.id.as_str().into());
        let Some(i) = view.instances.get(&key) else {
            let critical = health
                .get(&s.id)
                .is_some_and(|(status, _)| *status == HealthStatus::Critical);
            if critical {
                // Perhaps deregistered for being critical: it comes back
                // with the next registration, not by itself.
                continue;
            }
            return Some(format!("instance {} is missing", s.id));
        };
        let deregister_after = s
            .checks
            .iter()
            .filter_map(|c| c.deregister_critical_service_after)
            .min()
            .map_or(0, |d| d.as_millis() as u64);
        if i.service != s.name
            || i.address.parse().ok() != Some(s.address)
            || i.port != s.port
            || i.tags != s.tags
            || i.meta != s.meta
            || i.deregister_critical_after_ms != deregister_after
        {
            return Some(format!("instance {} differs from its configuration", s.id));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::catalog::{Node, ServiceInstance};

    fn config() -> AgentConfig {
        AgentConfig::parse(
            r#"
node_name = "node-b"
datacenter = "dc1"
servers = ["10.0.0.1:8502"]
advertise_addr = "10.0.0.3"
data_dir = "/var/lib/weft"

[[service]]
id = "api-1"
name = "api"
port = 8080
address = "10.0.0.3"
tags = ["v1"]
"#,
            "test.toml",
        )
        .expect("config")
    }

    /// The view of a catalog holding exactly what `config()` registers.
    fn registered() -> View {
        let mut view = View::default();
        view.nodes.insert(
            "node-b".into(),
            Arc::new(Node {
                name: "node-b".into(),
                address: "10.0.0.3".into(),
                datacenter: "dc1".into(),
                ..Default::default()
            }),
        );
        view.instances.insert(
            ("node-b".into(), "api-1".into()),
            Arc::new(ServiceInstance {
                id: "api-1".into(),
                service: "api".into(),
                node: "node-b".into(),
                address: "10.0.0.3".into(),
                port: 8080,
                tags: vec!["v1".into()],
                health: HealthStatus::Passing,
                create_index: 7,
                modify_index: 9,
                ..Default::default()
            }),
        );
        view
    }

    #[test]
    fn health_the_catalog_lost_is_found_and_a_pending_write_is_not() {
        let cfg = config();
        let view = registered(); // api-1 passing
        let mut health = BTreeMap::new();
        let mut unsent = BTreeSet::new();
        // Nothing known yet: nothing to compare.
        assert!(health_gaps(&cfg, &health, &unsent, &view).is_empty());
        health.insert("api-1".to_string(), (HealthStatus::Passing, "ok".into()));
        assert!(health_gaps(&cfg, &health, &unsent, &view).is_empty());
        // The checks say critical, the catalog still passing.
        health.insert("api-1".to_string(), (HealthStatus::Critical, "down".into()));
        assert_eq!(
            health_gaps(&cfg, &health, &unsent, &view),
            [(
                "api-1".to_string(),
                HealthStatus::Passing,
                HealthStatus::Critical
            )]
        );
        // A write on its way: not written twice.
        unsent.insert("api-1".to_string());
        assert!(health_gaps(&cfg, &health, &unsent, &view).is_empty());
        // An instance the catalog lacks is the registration's business.
        unsent.clear();
        let mut empty = registered();
        empty.instances.clear();
        assert!(health_gaps(&cfg, &health, &unsent, &empty).is_empty());
    }

    #[test]
    fn rewrites_of_one_instance_slow_down_and_start_afresh_after_a_quiet_wait() {
        let t0 = std::time::Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let ids = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let mut r = Rewrites::default();
        assert_eq!(r.due(&ids(&["a"]), s(0)), ids(&["a"]));
        // A fight: stale again and again; once per wait, the wait doubling.
        assert!(r.due(&ids(&["a", "b"]), s(1)).contains(&"b".to_string()));
        assert!(r.due(&ids(&["a"]), s(9)).is_empty());
        assert_eq!(r.due(&ids(&["a"]), s(10)), ids(&["a"])); // next wait 20 s
        assert!(r.due(&ids(&["a"]), s(29)).is_empty());
        assert_eq!(r.due(&ids(&["a"]), s(30)), ids(&["a"])); // next wait 40 s
        assert!(r.due(&ids(&["a"]), s(69)).is_empty());
        // Quiet for its whole wait after that: afresh, at once.
        assert!(r.due(&[], s(111)).is_empty());
        assert_eq!(r.due(&ids(&["a"]), s(111)), ids(&["a"]));
        assert!(r.due(&ids(&["a"]), s(112)).is_empty());
        // The wait stops doubling at REWRITE_MAX.
        for _ in 0..8 {
            let at = r.next["a"].0;
            assert_eq!(r.due(&ids(&["a"]), at), ids(&["a"]));
        }
        assert_eq!(r.next["a"].1, REWRITE_MAX);
    }

    #[test]
    fn dials_go_around_the_servers_from_the_one_after_a_failure() {
        assert_eq!(dial_order(3, 0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(dial_order(3, 2).collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(dial_order(1, 0).collect::<Vec<_>>(), [0]);
        assert_eq!(dial_order(0, 0).count(), 0);
    }

    #[test]
    fn a_watch_that_ended_resumes_on_another_server_drawn_evenly() {
        // Every draw lands on another server, and the draws cover all of
        // them equally.
        let mut landed = [0; 5];
        for draw in 0..400 {
            let next = next_watch_server(2, 5, draw);
            assert_ne!(next, 2);
            landed[next] += 1;
        }
        assert_eq!(landed, [100, 100, 0, 100, 100]);
        assert_eq!(next_watch_server(0, 2, 7), 1);
        assert_eq!(next_watch_server(1, 2, 8), 0);
        assert_eq!(next_watch_server(0, 1, 3), 0);
        assert_eq!(next_watch_server(0, 0, 3), 0);
    }

    #[test]
    fn a_workload_call_without_a_usable_token_is_refused_before_it_is_sent() {
        for token in ["", "   ", "bad\ntoken"] {
            let Err(ControlError::Refused { status, .. }) = workload_token(token, "x") else {
                panic!("{token:?} taken");
            };
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{token:?}");
        }
        let value = workload_token("abc-123", "x").unwrap();
        assert_eq!(value.to_str().unwrap(), "Bearer abc-123");
    }

    #[test]
    fn an_intact_registration_needs_no_write_whatever_the_health() {
        let (cfg, mut view) = (config(), registered());
        let mut health = BTreeMap::new();
        assert_eq!(registration_gap(&cfg, &health, &view), None);
        // Health differences are written as health, not as registrations.
        health.insert("api-1".into(), (HealthStatus::Critical, "down".into()));
        Arc::make_mut(view.nodes.get_mut("node-b").unwrap()).health = HealthStatus::Critical;
        assert_eq!(registration_gap(&cfg, &health, &view), None);
    }

    #[test]
    fn a_lost_or_changed_registration_is_written_again() {
        let (cfg, health) = (config(), BTreeMap::new());
        let mut view = registered();
        view.nodes.clear();
        view.instances.clear();
        let gap = registration_gap(&cfg, &health, &view).expect("a gap");
        assert!(gap.contains("node node-b is missing"), "{gap}");

        let mut view = registered();
        view.instances.clear();
        let gap = registration_gap(&cfg, &health, &view).expect("a gap");
        assert!(gap.contains("instance api-1 is missing"), "{gap}");

        let mut view = registered();
        let first = view.instances.keys().next().unwrap().clone();
        Arc::make_mut(view.instances.get_mut(&first).unwrap()).port = 9090;
        assert!(registration_gap(&cfg, &health, &view).is_some());

        let mut view = registered();
        Arc::make_mut(view.nodes.get_mut("node-b").unwrap()).address = "10.0.0.9".into();
        assert!(registration_gap(&cfg, &health, &view).is_some());
    }

    #[test]
    fn a_missing_instance_last_known_critical_is_left_out() {
        let cfg = config();
        let mut view = registered();
        view.instances.clear();
        let mut health = BTreeMap::new();
        health.insert("api-1".into(), (HealthStatus::Critical, "down".into()));
        assert_eq!(registration_gap(&cfg, &health, &view), None);
    }
}
