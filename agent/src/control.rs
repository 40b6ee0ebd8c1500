//! The agent's link to the servers: registering the node and its services,
//! writing health changes, signing certificates, and following the watch
//! stream into the agent's [`View`]. Every call goes to the first server that
//! answers; a broken watch stream is resumed from the last index on the next
//! server, and the node is registered again after such a reconnect (a server
//! restart or a leader change must not lose it).
//!
//! Every call is TLS to a server whose certificate chains to the configured
//! CA and names `tls_server_name`, and carries the agent's ACL token (a
//! token with this node's identity and its services').
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

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

use crate::config::AgentConfig;
use crate::view::View;

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
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| fail(format!("token_file {}: {e}", path.display())))?
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
        let ca = std::fs::read(&ca_file)
            .map_err(|e| fail(format!("ca_file {}: {e}", ca_file.display())))?;
        Ok(Credentials {
            tls: RwLock::new(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name(config.tls_server_name.clone()),
            ),
            token: TokenInterceptor(token),
        })
    }
}

/// A channel to a server that adds the agent's token to every call.
pub type ServerChannel = InterceptedService<Channel, TokenInterceptor>;

/// The servers, and the node's registration as this agent knows it.
pub struct Control {
    addrs: Vec<String>,
    credentials: Credentials,
    config: Arc<AgentConfig>,
    /// Last known health of each local service instance (by id).
    health: Mutex<BTreeMap<String, (HealthStatus, String)>>,
}

impl Control {
    pub fn new(config: Arc<AgentConfig>) -> Result<Self, ControlError> {
        Ok(Self {
            addrs: config.servers.clone(),
            credentials: Credentials::load(&config)?,
            config,
            health: Mutex::new(BTreeMap::new()),
        })
    }

    /// A channel to the first server that accepts a TLS connection.
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
        let value: MetadataValue<Ascii> =
            format!("Bearer {token}")
                .parse()
                .map_err(|_| ControlError::Refused {
                    what: what.clone(),
                    status: tonic::Status::unauthenticated("ACL token not found"),
                })?;
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

    /// A plain channel (no token added) to the first server that accepts a
    /// TLS connection.
    async fn connect(&self) -> Result<Channel, ControlError> {
        let mut last = String::from("no servers configured");
        for addr in &self.addrs {
            let tls = self.credentials.tls.read().expect("tls lock").clone();
            let endpoint = match Endpoint::from_shared(format!("https://{addr}"))
                .and_then(|e| e.tls_config(tls))
            {
                Ok(e) => e.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true),
                Err(e) => {
                    last = format!("{addr}: {e}");
                    continue;
                }
            };
            match endpoint.connect().await {
                Ok(ch) => return Ok(ch),
                Err(e) => last = format!("{addr}: {e:?}"),
            }
        }
        Err(ControlError::Unreachable(last))
    }

    /// Presents `cert_chain_pem` (the node certificate, renewed or not) as
    /// the TLS client certificate of later calls.
    pub fn present_node_certificate(&self, cert_chain_pem: &str, key_pem: &str) {
        let mut tls = self.credentials.tls.write().expect("tls lock");
        *tls = tls.clone().identity(tonic::transport::Identity::from_pem(
            cert_chain_pem,
            key_pem,
        ));
    }

    fn refused(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> ControlError {
        let what = what.into();
        move |status| ControlError::Refused { what, status }
    }

    /// Registers the node and every local service, with their last known health.
    pub async fn register(&self) -> Result<(), ControlError> {
        let cfg = &self.config;
        let mut catalog = CatalogClient::new(self.channel().await?);
        let node = proto::Node {
            name: cfg.node_name.clone(),
            address: cfg.advertise_addr.to_string(),
            datacenter: cfg.datacenter.clone(),
            ..Default::default()
        };
        catalog
            .register_node(proto::RegisterNodeRequest { node: Some(node) })
            .await
            .map_err(Self::refused(format!("registering node {}", cfg.node_name)))?;
        let health = self.health.lock().expect("health lock").clone();
        for s in &cfg.services {
            let (status, output) = health
                .get(&s.id)
                .cloned()
                .unwrap_or((HealthStatus::Critical, "no check has run yet".into()));
            let instance = proto::ServiceInstance {
                id: s.id.clone(),
                service: s.name.clone(),
                node: cfg.node_name.clone(),
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
            catalog
                .register_service(proto::RegisterServiceRequest {
                    instance: Some(instance),
                })
                .await
                .map_err(Self::refused(format!("registering service {}", s.id)))?;
        }
        tracing::info!(node = %cfg.node_name, services = cfg.services.len(), "registered");
        Ok(())
    }

    /// Registers, retrying until a server takes it or `limit` passes.
    pub async fn register_retrying(&self, limit: Duration) -> Result<(), ControlError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.register().await {
                Ok(()) => return Ok(()),
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
                name: self.config.node_name.clone(),
            })
            .await
            .map_err(Self::refused("deregistering"))?;
        tracing::info!(node = %self.config.node_name, "deregistered");
        Ok(())
    }

    /// Writes a service's new health (called only when it changed).
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
        let mut catalog = CatalogClient::new(self.channel().await?);
        catalog
            .update_health(proto::UpdateHealthRequest {
                node: self.config.node_name.clone(),
                id: id.to_string(),
                health: health_to_proto(status) as i32,
                output: output.to_string(),
            })
            .await
            .map_err(Self::refused(format!("health of {id}")))?;
        Ok(())
    }

    /// Tells the servers this node's agent is alive; returns how long to
    /// wait before the next heartbeat.
    pub async fn heartbeat(&self) -> Result<Duration, ControlError> {
        let mut catalog = CatalogClient::new(self.channel().await?);
        let reply = catalog
            .heartbeat(proto::HeartbeatRequest {
                node: self.config.node_name.clone(),
            })
            .await
            .map_err(Self::refused("heartbeat".to_string()))?;
        let ms = reply.into_inner().interval_ms.clamp(200, 30_000);
        Ok(Duration::from_millis(ms))
    }

    /// Sends heartbeats for as long as the agent runs: the servers mark the
    /// node critical when they stop. A failed one is retried after a second
    /// and logged once per failure streak.
    pub async fn heartbeat_forever(self: Arc<Self>) {
        let mut failing = false;
        loop {
            let wait = match self.heartbeat().await {
                Ok(next) => {
                    if failing {
                        tracing::info!("heartbeats reach the servers again");
                    }
                    failing = false;
                    next
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!("heartbeat failed: {e}; retrying every second");
                    }
                    failing = true;
                    Duration::from_secs(1)
                }
            };
            tokio::time::sleep(wait).await;
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
            node: self.config.node_name.clone(),
            service: service.unwrap_or_default().to_string(),
        };
        let what = format!("a certificate for {}", service.unwrap_or("this node"));
        Ok(ca
            .sign(req)
            .await
            .map_err(Self::refused(what))?
            .into_inner())
    }

    /// Follows the watch stream forever, applying events to `view` and
    /// publishing the index after each. Reconnects (and re-registers) when a
    /// stream breaks; while no server answers, the view stays as it was.
    pub async fn follow(self: Arc<Self>, view: Arc<RwLock<View>>, index_tx: watch::Sender<u64>) {
        let mut backoff = Duration::from_millis(100);
        let mut first = true;
        loop {
            let from = view.read().expect("view lock").index;
            match self.stream_once(&view, &index_tx, from, first).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!("watch stream: {e}; reconnecting");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
            first = false;
        }
    }

    async fn stream_once(
        &self,
        view: &RwLock<View>,
        index_tx: &watch::Sender<u64>,
        from: u64,
        first: bool,
    ) -> Result<(), ControlError> {
        let channel = self.channel().await?;
        if !first {
            // Whatever broke the stream (a server restart, a leader change, a
            // restore) may have lost this node: register again.
            self.register().await?;
        }
        let mut stream = WatchClient::new(channel)
            .subscribe(proto::WatchRequest { from_index: from })
            .await
            .map_err(Self::refused("a watch stream"))?
            .into_inner();
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
            let index = event.index;
            if let Err(e) = view.write().expect("view lock").apply(event) {
                tracing::error!("ignoring a bad watch event: {e}");
                continue;
            }
            let registered = view
                .read()
                .expect("view lock")
                .nodes
                .contains_key(&self.config.node_name);
            if !registered {
                tracing::warn!("this node is missing from the catalog; registering again");
                if let Err(e) = self.register().await {
                    tracing::warn!("re-registration failed: {e}");
                }
            }
            index_tx.send_replace(index);
        }
    }
}
