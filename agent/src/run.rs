//! The agent's main loop: registers with the servers, follows their watch
//! stream, runs health checks, gets certificates, serves the inbound tunnel
//! port, the explicit upstream ports and the admin port.
//!
//! It ends one of two ways:
//! - SIGTERM: the node goes into maintenance on the servers (sources stop
//!   choosing it), then the agent stops accepting, tells open connections to
//!   wind down, waits for them up to `drain_timeout` and deregisters.
//! - An in-place upgrade: a successor started with the same configuration
//!   takes the listening sockets over the control socket (see
//!   [`crate::handover`]); this agent stops accepting, serves its open
//!   connections until they end or `upgrade_drain_timeout`, and exits with
//!   the node registered and the eBPF lease running (the successor renews
//!   it).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use weft_api::catalog::HealthStatus;

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::admin::{AdminServer, AdminState};
use crate::background::Background;
use crate::config::AgentConfig;
use crate::control::{Control, ControlError};
use crate::dns::{DnsError, DnsServer, ServiceResolver};
use crate::drain::Drain;
use crate::handover::{self, ControlSocket, HandoverError, Inherited, Predecessor};
use crate::hbone::{HbonePool, HboneServer, TlsError, TrustBundle};
use crate::health::runner::{HealthChecks, HealthUpdate};
use crate::identity::{Identities, IdentityError};
use crate::intercept::{InterceptError, Interception};
use crate::metrics::{AgentMetrics, EbpfCounter, Side};
use crate::proxy::{inbound, outbound, permissive, ProxyContext};
use crate::running::{upstream_name, Running};
use crate::shared_view::SharedView;

/// How long the agent waits for the servers at start-up.
const STARTUP_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("trust bundle: {0}")]
    Tls(#[from] TlsError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin: {0}")]
    Admin(#[from] crate::admin::AdminError),
    #[error("local API: {0}")]
    LocalApi(#[from] crate::local_api::LocalApiError),
    #[error("local API forwarding: {0}")]
    Forward(#[from] crate::local_api::forward::ForwardError),
    #[error("no trust bundle from the servers within {0:?} (is their CA up?)")]
    NoBundle(Duration),
    #[error("dns: {0}")]
    Dns(#[from] DnsError),
    #[error("transparent interception: {0}")]
    Intercept(#[from] InterceptError),
    #[error("in-place upgrade: {0}")]
    Handover(#[from] HandoverError),
    #[error("SIGHUP handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("starting the background thread: {0}")]
    Background(#[source] std::io::Error),
    #[error("the {0} socket has no address to guard")]
    OwnPort(&'static str),
}

async fn listen(addr: SocketAddr) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Listen { addr, source })
}

/// The agent's listening sockets: the predecessor's when it hands them over,
/// bound here otherwise. Each is also kept, duplicated, to hand over to a
/// successor in turn.
struct Sockets {
    inherited: Inherited,
    offered: Arc<Mutex<Vec<(String, OwnedFd)>>>,
    own_mark: OwnMark,
}

/// The mark the agent's own sockets ([`OWN_PORTS`]) carry from the moment
/// they are bound, in either mode: the programs an earlier transparent-mode
/// agent pinned (until `weft-agent uninstall`) let callers reach those
/// ports only so. An explicit-mode agent may lack the privilege to mark
/// (CAP_NET_ADMIN); its sockets then stay unmarked.
#[derive(Clone, Copy)]
struct OwnMark {
    mark: u32,
    /// Transparent mode: failing to mark is an error.
    required: bool,
}

impl OwnMark {
    fn apply(self, socket: &impl AsRawFd, addr: SocketAddr) -> Result<(), RunError> {
        match crate::mark::set_on(socket, self.mark) {
            Ok(()) => Ok(()),
            Err(source) if self.required => Err(RunError::Listen { addr, source }),
            Err(e) => {
                tracing::debug!(%addr, "not marking the agent's own socket: {e}");
                Ok(())
            }
        }
    }
}

impl Sockets {
    /// The TCP listener `name` on `addr`.
    async fn tcp(&mut self, name: &str, addr: SocketAddr) -> Result<TcpListener, RunError> {
        let listen_err = |source| RunError::Listen { addr, source };
        let listener = match self.inherited.tcp(name) {
            Some(l) if same_place(l.local_addr().ok(), addr) => {
                l.set_nonblocking(true).map_err(listen_err)?;
                TcpListener::from_std(l).map_err(listen_err)?
            }
            // The configuration moved it: the old one closes with the
            // predecessor.
            _ => listen(addr).await?,
        };
        if OWN_PORTS.iter().any(|(own, _)| *own == name) {
            self.own_mark.apply(&listener, addr)?;
        }
        self.offer(name, listener.as_fd(), addr)?;
        Ok(listener)
    }

    /// Keeps a duplicate of `fd` to hand over.
    fn offer(&self, name: &str, fd: BorrowedFd<'_>, addr: SocketAddr) -> Result<(), RunError> {
        let dup = fd
            .try_clone_to_owned()
            .map_err(|source| RunError::Listen { addr, source })?;
        self.offered
            .lock()
            .expect("sockets lock")
            .push((name.to_string(), dup));
        Ok(())
    }
}

/// The agent's own local ports, by the name their sockets are offered
/// under: what workloads and local tools send the agent there (tokens, DNS
/// queries) must not reach a process that took the port after a crash.
const OWN_PORTS: [(&str, u16); 4] = [
    ("http", weft_agent_common::PROTO_TCP),
    ("dns-tcp", weft_agent_common::PROTO_TCP),
    ("dns-udp", weft_agent_common::PROTO_UDP),
    ("admin", weft_agent_common::PROTO_TCP),
];

/// Tells the programs where the sockets of [`OWN_PORTS`] are (marked
/// where they were bound, [`OwnMark`]): from then on, and after the
/// agent is gone, those ports are reached only while a socket with the
/// mark is bound there. Until then an earlier agent's entries stand, which
/// the sockets, marked from the start, pass.
fn guard_own_ports(
    interception: &Interception,
    offered: &Mutex<Vec<(String, OwnedFd)>>,
) -> Result<(), RunError> {
    use nix::sys::socket::{getsockname, SockaddrStorage};
    let offered = offered.lock().expect("sockets lock");
    let mut ports = Vec::new();
    for (name, protocol) in OWN_PORTS {
        for (_, fd) in offered.iter().filter(|(n, _)| n == name) {
            let addr = getsockname::<SockaddrStorage>(fd.as_raw_fd())
                .ok()
                .and_then(|a| {
                    a.as_sockaddr_in()
                        .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
                        .or_else(|| {
                            a.as_sockaddr_in6()
                                .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
                        })
                });
            let Some(addr) = addr else {
                return Err(RunError::OwnPort(name));
            };
            if addr.ip().to_canonical().is_ipv4() {
                ports.push((addr, protocol));
            } else {
                tracing::warn!(%addr, "{name}: an IPv6 port is not guarded after a crash (IPv4 only)");
            }
        }
    }
    let any = offered
        .first()
        .map(|(_, fd)| fd)
        .ok_or(RunError::OwnPort("any"))?;
    interception.set_agent_ports(any, &ports)?;
    tracing::debug!(
        ?ports,
        "the agent's own ports are reached only while it holds them"
    );
    Ok(())
}

/// Whether a socket bound at `bound` serves the configured `addr` (port 0:
/// any port).
fn same_place(bound: Option<SocketAddr>, addr: SocketAddr) -> bool {
    bound.is_some_and(|b| b == addr || (addr.port() == 0 && b.ip() == addr.ip()))
}

/// What this agent offers a successor or `weft-agent reload` on its control
/// socket (called on the socket's own thread).
struct AgentHost {
    node: String,
    running: Arc<Running>,
    runtime: tokio::runtime::Handle,
    gate: Arc<handover::Gate>,
}

impl handover::Host for AgentHost {
    fn node_name(&self) -> String {
        self.node.clone()
    }

    fn health(&self) -> BTreeMap<String, (HealthStatus, String)> {
        self.running.control.last_health()
    }

    fn workload_ids(&self) -> BTreeMap<String, u32> {
        self.running
            .interception
            .as_ref()
            .map(|i| i.workload_ids())
            .unwrap_or_default()
    }

    fn listeners(&self) -> Result<Vec<(String, OwnedFd)>, String> {
        if !self.gate.sending() {
            return Err("this agent is stopping (SIGTERM): start the new one after it".into());
        }
        Ok(self
            .running
            .offered
            .lock()
            .expect("sockets lock")
            .iter()
            .filter_map(|(name, fd)| Some((name.clone(), fd.try_clone().ok()?)))
            .collect())
    }

    fn handed_over(&self) {
        self.running.offered.lock().expect("sockets lock").clear();
        self.gate.done();
    }

    fn handover_abandoned(&self) {
        self.gate.abandoned();
    }

    fn reload(&self) -> Result<String, String> {
        self.runtime.block_on(self.running.reload())
    }
}

/// Why the main loop ended.
enum Stop {
    /// SIGTERM or Ctrl-C.
    Signal,
    /// A successor took the listeners.
    HandedOver,
}

/// Runs the agent until `shutdown` completes or a successor takes over.
/// `path` is the configuration file and `file_text` what was read of it
/// for `config` (registrations through the local API run with that text
/// until a reload reads the file again).
pub async fn run(
    config: AgentConfig,
    registered: crate::registered::Registered,
    (path, file_text): (PathBuf, crate::config::ConfigFile),
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let config = Arc::new(config);
    tokio::pin!(shutdown);
    // From now on SIGHUP reloads (its default would end the process).
    let mut hangups = signal(SignalKind::hangup()).map_err(RunError::Signal)?;
    let current = Arc::new(RwLock::new(config.clone()));
    let metrics = Arc::new(AgentMetrics::new());
    let view = Arc::new(SharedView::default());
    let control =
        Arc::new(Control::new(config.clone())?.counting_registrations(metrics.registrations()));
    // The control plane's work (the watch stream, the eBPF map syncs,
    // calls to the servers, the admin endpoint) runs on a thread of its
    // own, apart from the connections.
    let background = Background::start().map_err(RunError::Background)?;
    control.drive_on(background.handle());
    // The serving thread's beats, which `/healthz` (served on the
    // background thread) reads.
    let serving = Arc::new(crate::pulse::Pulse::default());
    let pulse_task = tokio::spawn(crate::pulse::beat_forever(serving.clone()));
    let (ready_tx, ready_rx) = watch::channel(false);

    // An agent with this configuration running already: this is an
    // upgrade, and it serves until this one is ready.
    let control_path = handover::socket_path(&config.data_dir);
    let predecessor = {
        let (path, node) = (control_path.clone(), config.node_name.clone());
        tokio::task::spawn_blocking(move || Predecessor::find(&path, &node))
            .await
            .expect("handover task")?
    };
    if let Some(predecessor) = &predecessor {
        tracing::info!(
            pid = predecessor.pid(),
            "an agent runs with this configuration: taking over from it once ready"
        );
        control.seed_health(predecessor.health.clone());
    }
    let mut sockets = Sockets {
        inherited: Inherited::default(),
        offered: Arc::new(Mutex::new(Vec::new())),
        own_mark: OwnMark {
            mark: config.socket_mark,
            required: config.ebpf,
        },
    };

    // Tokens are judged by the servers, for /config and the local API.
    let judge = Arc::new(crate::local_api::authz::ServerJudge::new(control.clone()));
    // Admin first, so that /healthz answers (503) while the rest starts;
    // after the predecessor's when taking over (it answers meanwhile).
    let mut admin_state = Some(AdminState {
        ready: ready_rx,
        serving,
        metrics: metrics.clone(),
        config: {
            let (current, view) = (current.clone(), view.clone());
            Arc::new(move || {
                serde_json::json!({
                    "config": &**current.read().expect("config lock"),
                    "view": &*view.load(),
                })
            })
        },
        judge: judge.clone(),
        dumping: Arc::new(tokio::sync::Semaphore::new(1)),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut admin_task = None;
    if let (None, Some(state)) = (&predecessor, admin_state.take()) {
        let listener = sockets.tcp("admin", config.admin_addr).await?;
        let stop = wait_for(stop_rx.clone());
        admin_task =
            Some(serve_admin(&background, listener, config.admin_addr, state, stop).await?);
    }

    // Interception before anything else: adopt what an earlier agent pinned
    // and keep failing closed (no lease) until the view is loaded.
    let interception = if config.ebpf {
        Some(Arc::new(Interception::start(
            &config,
            predecessor.as_ref().map(|p| &p.workloads),
        )?))
    } else {
        None
    };

    control.register_retrying(STARTUP_LIMIT).await?;
    // Heartbeats from the serving thread (their connection's I/O runs on
    // the background thread): when it hangs, the servers mark the node
    // critical and sources stop choosing it.
    let heartbeat_task = tokio::spawn(control.clone().heartbeat_forever());
    let traffic_task = background.spawn(control.clone().report_traffic_forever(metrics.clone()));

    let (index_tx, mut index_rx) = watch::channel(0u64);
    let follow_task = background.spawn(control.clone().follow(view.clone(), index_tx));
    let drain = Drain::new();
    let mut accept_tasks = Vec::new();
    // A gateway needs no certificate, and a secondary datacenter gets its
    // CA through its gateways: it starts before the trust bundle is in
    // (when upgrading, later, on the predecessor's listeners).
    let upgrading = predecessor.is_some();
    if !upgrading {
        start_gateway(
            &config,
            &view,
            &metrics,
            &drain,
            &mut sockets,
            &mut accept_tasks,
        )
        .await?;
    }

    // Health: write changes to the servers.
    let (health_tx, health_rx) = mpsc::unbounded_channel();
    let checks = HealthChecks::new(health_tx);
    for s in &config.services {
        checks.add(&s.id, &s.name, s.checks.clone());
    }
    let health_task = background.spawn(report_health(control.clone(), health_rx));
    let bundle = wait_for_bundle(&view, &mut index_rx).await?;

    // Certificates.
    let identities = Arc::new(Identities::new(control.clone()));
    let names: Vec<String> = config
        .services
        .iter()
        .map(|s| s.name.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    identities.init(&names).await?;
    let renew_task = background.spawn(identities.clone().renew_forever());
    let trim_task = tokio::spawn(crate::allocator::trim_after_bursts());
    // Woken by every published view: on the background thread, so that
    // the serving thread is not.
    let bundle_task = background.spawn(follow_bundle(
        view.clone(),
        index_rx.clone(),
        bundle.clone(),
    ));

    let ctx = Arc::new(ProxyContext {
        node_name: config.node_name.clone(),
        datacenter: config.datacenter.clone(),
        inbound_port: config.inbound_addr.port(),
        view: view.clone(),
        own: arc_swap::ArcSwap::from_pointee(config.own_addresses()),
        identities: identities.clone(),
        pool: HbonePool::with_metrics(bundle.clone(), metrics.tunnel())
            .leaving_from(config.advertise_addr),
        metrics: metrics.clone(),
        in_flight: Mutex::new(HashMap::new()),
        outliers: Default::default(),
        balancer: Default::default(),
        breakers: Default::default(),
        drain: drain.clone(),
    });

    // Inbound tunnels.
    let node_identity = identities
        .node()
        .ok_or(IdentityError::Unknown("node".into()))?;
    let inbound_ctx = ctx.clone();
    let failure_metrics = metrics.clone();
    let refused_metrics = metrics.clone();
    // The node certificate is looked up at every handshake: a renewed one
    // is presented from the moment it is there.
    let current_node: crate::hbone::tls::CurrentIdentity = {
        let identities = identities.clone();
        Arc::new(move || identities.node())
    };
    let server = HboneServer::renewing(&node_identity, current_node, &bundle, move |req| {
        inbound::accept(inbound_ctx.clone(), req)
    })?
    .on_tls_failure(move |f| {
        tracing::info!(peer = %f.peer, "inbound TLS handshake failed: {}", f.reason);
        failure_metrics.tls_failure(Side::Inbound, short_reason(&f.reason));
    })
    .on_refused(move |reason| refused_metrics.inbound_refused("inbound", reason))
    // The nodes of the view (gateways among them) have places of their
    // own: hosts outside the mesh cannot take them.
    .known_sources({
        let view = view.clone();
        move |ip| view.load().knows_node_address(ip)
    })
    .peers({
        let view = view.clone();
        let datacenter = config.datacenter.clone();
        move |peer_id| {
            let view = view.load();
            let federated = |dc: &str| view.federation.contains_key(dc);
            inbound::peer_origin(peer_id, &view.trust_domain, &datacenter, federated)
        }
    })
    .draining(drain.clone());

    // Everything but the listeners is ready: take the predecessor's.
    let predecessor = match predecessor {
        Some(predecessor) => {
            let (predecessor, inherited) = tokio::task::spawn_blocking(move || {
                let inherited = predecessor.take_listeners()?;
                Ok::<_, HandoverError>((predecessor, inherited))
            })
            .await
            .expect("handover task")?;
            sockets.inherited = inherited;
            Some(predecessor)
        }
        None => None,
    };
    if let Some(state) = admin_state.take() {
        let listener = sockets.tcp("admin", config.admin_addr).await?;
        let stop = wait_for(stop_rx.clone());
        admin_task =
            Some(serve_admin(&background, listener, config.admin_addr, state, stop).await?);
    }

    let inbound_listener = sockets.tcp("inbound", config.inbound_addr).await?;
    accept_tasks.push(tokio::spawn(server.serve(inbound_listener)));
    if upgrading {
        start_gateway(
            &config,
            &view,
            &metrics,
            &drain,
            &mut sockets,
            &mut accept_tasks,
        )
        .await?;
    }

    let running = Arc::new(Running::new(
        path,
        current.clone(),
        control.clone(),
        checks.clone(),
        identities.clone(),
        ctx.clone(),
        interception.clone(),
        sockets.offered.clone(),
        file_text,
    ));

    // Explicit upstreams.
    for s in &config.services {
        for up in &s.upstreams {
            let addr = SocketAddr::from(([127, 0, 0, 1], up.local_port));
            let listener = sockets.tcp(&upstream_name(addr), addr).await?;
            crate::mark::listener(&listener).map_err(|source| RunError::Listen { addr, source })?;
            running.serve_upstream(listener, &s.name, &(up.name.clone(), up.datacenter.clone()));
        }
    }

    // Local HTTP API: workloads update their TTL checks and register
    // services (crate::local_api).
    running.set_registered(registered);
    // Other /v1/ requests go to the servers' HTTPS API with the caller's token.
    let forwarder = Arc::new(crate::local_api::forward::Forwarder::from_config(&config)?);
    let api_state = crate::local_api::LocalApiState::new(checks.clone(), judge)
        .with_registrar(running.clone())
        .with_signer(control.clone())
        .with_config(current.clone())
        .with_forwarder(forwarder);
    let listener = sockets.tcp("http", config.http_addr).await?;
    let local_api = crate::local_api::LocalApi::from_listener(listener, api_state)?;
    let local_api_task = tokio::spawn(local_api.serve(wait_for(stop_rx.clone())));

    // DNS: the mesh's names (NAME.service.weft and Consul's other forms).
    let resolver = ServiceResolver {
        catalog: Arc::new(crate::dns::ViewCatalog(view.clone())),
        zone: crate::dns::Zone {
            domains: config.dns_domains(),
            datacenter: config.datacenter.clone(),
        },
        recursors: crate::dns::recurse::Recursors::new(config.recursors.clone()),
    };
    let dns = match (
        sockets.inherited.udp("dns-udp"),
        sockets.inherited.tcp("dns-tcp"),
    ) {
        (Some(udp), Some(tcp)) if same_place(udp.local_addr().ok(), config.dns_addr) => {
            DnsServer::from_sockets(udp, tcp, resolver)?
        }
        _ => DnsServer::bind(config.dns_addr, resolver).await?,
    };
    let (udp, tcp) = dns.sockets();
    for socket in [udp, tcp] {
        sockets.own_mark.apply(&socket, config.dns_addr)?;
    }
    sockets.offer("dns-udp", udp, config.dns_addr)?;
    sockets.offer("dns-tcp", tcp, config.dns_addr)?;
    let dns_task = tokio::spawn(dns.serve(wait_for(stop_rx.clone())));

    // Transparent interception: the maps follow the view, the listeners are
    // up, and only then does the lease admit mesh connections.
    if let Some(interception) = &interception {
        interception.sync(&view.load())?;
        let listener = sockets.tcp("outbound", config.outbound_addr).await?;
        crate::mark::listener(&listener).map_err(|source| RunError::Listen {
            addr: config.outbound_addr,
            source,
        })?;
        accept_tasks.push(tokio::spawn(outbound::serve_redirected(
            ctx.clone(),
            listener,
            interception.clone(),
        )));
        let permissive = sockets.tcp("permissive", config.permissive_addr).await?;
        interception.set_permissive_listener(&permissive)?;
        accept_tasks.push(tokio::spawn(permissive::serve(ctx.clone(), permissive)));
        accept_tasks.push(background.spawn(follow_destinations(
            view.clone(),
            index_rx.clone(),
            interception.clone(),
        )));
        // Metrics: on the background thread (it takes the lock map syncs hold).
        accept_tasks
            .push(background.spawn(export_ebpf_counters(interception.clone(), metrics.clone())));
        guard_own_ports(interception, &sockets.offered)?;
        interception.renew_lease()?;
        accept_tasks.push(tokio::spawn(renew_lease(interception.clone())));
        tracing::info!(outbound = %config.outbound_addr, permissive = %config.permissive_addr, "transparent interception on");
    }
    let unused = sockets.inherited.unused();
    if !unused.is_empty() {
        tracing::info!(
            ?unused,
            "the predecessor's listeners this configuration has no use for are closed"
        );
    }
    sockets.inherited = Inherited::default();

    // Serving: the predecessor stops accepting and drains; this agent takes
    // the control socket for the next upgrade.
    let took_over = match predecessor {
        Some(predecessor) => {
            let pid = predecessor.pid();
            tokio::task::spawn_blocking(move || predecessor.serving())
                .await
                .expect("handover task")?;
            Some(pid)
        }
        None => None,
    };
    let gate = Arc::new(handover::Gate::default());
    let host = Arc::new(AgentHost {
        node: config.node_name.clone(),
        running: running.clone(),
        runtime: tokio::runtime::Handle::current(),
        gate: gate.clone(),
    });
    match ControlSocket::bind(&config.data_dir) {
        Ok(control_socket) => control_socket.serve(host),
        // The predecessor stopped accepting when told this agent serves:
        // giving up now would leave the node with no agent at all.
        Err(e) if took_over.is_some() => tracing::error!(
            "control socket: {e}; serving without one (no reload by `weft-agent reload`, \
             no in-place upgrade of this agent: SIGHUP reloads, a restart upgrades)"
        ),
        Err(e) => return Err(e.into()),
    }
    let reload_task = {
        let running = running.clone();
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                match running.reload().await {
                    Ok(what) => tracing::info!("SIGHUP: reloaded: {what}"),
                    Err(why) => tracing::error!(
                        "SIGHUP: reload refused, the running configuration stays: {why}"
                    ),
                }
            }
        })
    };

    ready_tx.send_replace(true);
    tracing::info!(node = %config.node_name, inbound = %config.inbound_addr, "agent ready");
    match took_over {
        Some(pid) => println!(
            "weft-agent {} ready: inbound {}, admin {}; took over from pid {pid}",
            config.node_name, config.inbound_addr, config.admin_addr
        ),
        None => println!(
            "weft-agent {} ready: inbound {}, admin {}",
            config.node_name, config.inbound_addr, config.admin_addr
        ),
    }

    let stop = tokio::select! {
        () = &mut shutdown => Stop::Signal,
        () = gate.handed_over() => Stop::HandedOver,
    };
    // SIGTERM: no successor from now on; one that has the listeners is
    // waited for, and if it serves this agent leaves as after a handover
    // (not deregistering the node it now serves).
    let signalled = matches!(stop, Stop::Signal);
    let stop = match stop {
        Stop::Signal if gate.stop().await => Stop::HandedOver,
        stop => stop,
    };
    ready_tx.send_replace(false);
    let limit = match stop {
        Stop::Signal => {
            tracing::info!("shutting down: maintenance on, then no new connections, draining");
            enter_maintenance(&control, &view, index_rx.clone(), &config.node_name).await;
            config.drain_timeout
        }
        Stop::HandedOver if signalled => {
            tracing::info!("handed over while stopping: no new connections here, draining");
            config.drain_timeout.min(config.upgrade_drain_timeout)
        }
        Stop::HandedOver => {
            tracing::info!("handed over: no new connections here, serving the open ones");
            config.upgrade_drain_timeout
        }
    };
    reload_task.abort();
    running.stop_upstreams();
    for task in accept_tasks {
        task.abort();
    }
    // The duplicates kept for a successor held the listening sockets open:
    // connections to them were queued and never accepted (a client hung
    // until its own timeout) rather than refused at once. No successor
    // comes any more (see `Gate::stop`); after a handover this is done.
    running.offered.lock().expect("sockets lock").clear();
    if let (Stop::Signal, Some(interception)) = (&stop, &interception) {
        // New mesh connections are refused from here on; the programs stay.
        if let Err(e) = interception.end_lease() {
            tracing::error!("ending the eBPF lease: {e}");
        }
    }
    if matches!(stop, Stop::HandedOver) {
        // The successor runs these now.
        let _ = stop_tx.send(true);
        checks.stop_all();
        follow_task.abort();
        heartbeat_task.abort();
        traffic_task.abort();
    }
    drain.start();
    let open = drain.open();
    tokio::select! {
        left = drain.wait_idle(limit) => {
            if left > 0 {
                tracing::warn!(left, "drain limit {limit:?} reached with connections still open");
            } else {
                tracing::info!(drained = open, "every connection ended");
            }
        }
        () = &mut shutdown, if matches!(stop, Stop::HandedOver) && !signalled => {
            tracing::info!(left = drain.open(), "stopped while draining after a handover");
        }
    }
    follow_task.abort();
    checks.stop_all();
    for task in [
        health_task,
        renew_task,
        bundle_task,
        trim_task,
        pulse_task,
        heartbeat_task,
        traffic_task,
    ] {
        task.abort();
    }
    if matches!(stop, Stop::Signal) {
        if let Err(e) = control.deregister().await {
            tracing::warn!("deregistration failed: {e}");
        }
        let _ = std::fs::remove_file(&control_path);
    }
    let _ = stop_tx.send(true);
    if let Some(admin_task) = admin_task {
        let _ = admin_task.await;
    }
    let _ = dns_task.await;
    let _ = local_api_task.await;
    Ok(())
}

/// Puts the node in maintenance and waits (2 s at most) until this agent's
/// own watch shows it, as the sources' watches then do too.
async fn enter_maintenance(
    control: &Control,
    view: &SharedView,
    mut index_rx: watch::Receiver<u64>,
    node: &str,
) {
    const SEEN_LIMIT: Duration = Duration::from_secs(2);
    if let Err(e) = control.set_maintenance(true, "agent shutting down").await {
        tracing::warn!("maintenance mode: {e}; draining without it");
        return;
    }
    let seen = tokio::time::timeout(SEEN_LIMIT, async {
        while view.load().node_up(node) {
            if index_rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    match seen {
        Ok(()) => tracing::info!("node in maintenance: sources no longer choose it"),
        Err(_) => tracing::warn!("maintenance not seen on the watch within {SEEN_LIMIT:?}"),
    }
}

async fn wait_for(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Serves the admin endpoint on `listener` on the background thread (its
/// socket moved to that thread's runtime) until `stop`: a scrape or a
/// `/config` dump of a large view never holds up a connection.
async fn serve_admin(
    background: &Background,
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    state: AdminState,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, RunError> {
    let listen_err = |source| RunError::Listen { addr, source };
    let listener = listener.into_std().map_err(listen_err)?;
    let admin = background
        .spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            Ok::<_, std::io::Error>(AdminServer::from_listener(listener, state))
        })
        .await
        .map_err(|e| listen_err(std::io::Error::other(e)))?
        .map_err(listen_err)??;
    Ok(background.spawn(admin.serve(stop)))
}

/// Starts the mesh gateway's listeners, when this agent is one.
async fn start_gateway(
    config: &AgentConfig,
    view: &Arc<SharedView>,
    metrics: &AgentMetrics,
    drain: &Arc<Drain>,
    sockets: &mut Sockets,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<(), RunError> {
    let Some(g) = &config.gateway else {
        return Ok(());
    };
    let gateway = crate::gateway::Gateway::new(
        config.datacenter.clone(),
        view.clone(),
        config.inbound_addr.port(),
        crate::gateway::server_addresses(&config.servers, g.server_port),
        metrics.gateway(),
        drain.clone(),
        vec![g.lan_address, g.wan_address],
    );
    let lan = sockets.tcp("gateway-lan", g.lan_address).await?;
    let wan = sockets.tcp("gateway-wan", g.wan_address).await?;
    use crate::gateway::Side;
    tasks.push(tokio::spawn(gateway.clone().serve(lan, Side::Lan)));
    tasks.push(tokio::spawn(gateway.serve(wan, Side::Wan)));
    tracing::info!(lan = %g.lan_address, wan = %g.wan_address, "mesh gateway on");
    Ok(())
}

/// The first trust bundle from the watch stream.
async fn wait_for_bundle(
    view: &SharedView,
    index_rx: &mut watch::Receiver<u64>,
) -> Result<TrustBundle, RunError> {
    let deadline = tokio::time::Instant::now() + STARTUP_LIMIT;
    loop {
        {
            let v = view.load();
            if !v.trust_domain.is_empty() && !v.roots_pem.is_empty() {
                return Ok(TrustBundle::from_pem(&v.trust_domain, &v.bundle_pem())?);
            }
        }
        match tokio::time::timeout_at(deadline, index_rx.changed()).await {
            Ok(Ok(())) => {}
            _ => return Err(RunError::NoBundle(STARTUP_LIMIT)),
        }
    }
}

/// Keeps `bundle` equal to the servers' (root rotation): new handshakes use
/// the new roots, open connections stay.
async fn follow_bundle(
    view: Arc<SharedView>,
    mut index_rx: watch::Receiver<u64>,
    bundle: TrustBundle,
) {
    let mut current = view.load().bundle_pem();
    while index_rx.changed().await.is_ok() {
        let latest = view.load().bundle_pem();
        if latest != current && !latest.is_empty() {
            match bundle.replace_pem(&latest) {
                Ok(()) => tracing::info!("trust bundle updated"),
                Err(e) => tracing::error!("new trust bundle refused: {e}"),
            }
            current = latest;
        }
    }
}

/// Keeps the programs' destinations in step with the view.
async fn follow_destinations(
    view: Arc<SharedView>,
    mut index_rx: watch::Receiver<u64>,
    interception: Arc<Interception>,
) {
    while index_rx.changed().await.is_ok() {
        let result = interception.sync(&view.load());
        if let Err(e) = result {
            tracing::error!("updating the eBPF destinations: {e}");
        }
    }
}

/// Renews the programs' liveness lease for as long as the agent runs. If the
/// agent stops (crash, hang), the lease runs out and mesh connections are
/// refused.
async fn renew_lease(interception: Arc<Interception>) {
    let mut tick = tokio::time::interval(crate::intercept::LEASE_RENEWAL);
    loop {
        tick.tick().await;
        if let Err(e) = interception.renew_lease() {
            tracing::error!("renewing the eBPF lease: {e}");
        }
    }
}

/// Copies the programs' counters into the metrics every second.
async fn export_ebpf_counters(interception: Arc<Interception>, metrics: Arc<AgentMetrics>) {
    loop {
        if let Ok(c) = interception.counters() {
            metrics.set_ebpf_counter(EbpfCounter::Redirected, c.redirected);
            metrics.set_ebpf_counter(EbpfCounter::Rekeyed, c.rekeyed);
            metrics.set_ebpf_counter(EbpfCounter::Closed, c.closed);
            metrics.set_ebpf_counter(EbpfCounter::FastPath, c.fast_path);
            metrics.set_ebpf_counter(EbpfCounter::EgressAllowed, c.egress_allowed);
            metrics.set_ebpf_counter(EbpfCounter::EgressDenied, c.egress_denied);
            metrics.set_ebpf_counter(EbpfCounter::NoAgent, c.no_agent);
            metrics.set_ebpf_counter(EbpfCounter::InboundRefused, c.inbound_refused);
            metrics.set_ebpf_counter(EbpfCounter::PermissiveSteered, c.permissive_steered);
            metrics.set_ebpf_counter(EbpfCounter::AgentPortRefused, c.agent_port_refused);
        }
        metrics.set_destinations_left_out(interception.destinations_left_out());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn report_health(control: Arc<Control>, mut updates: mpsc::UnboundedReceiver<HealthUpdate>) {
    while let Some(u) = updates.recv().await {
        tracing::info!(service = %u.service_id, status = %u.status, "health changed: {}", u.output);
        if let Err(e) = control
            .update_health(&u.service_id, u.status, &u.output)
            .await
        {
            // Kept in `control`, and written once heartbeats get through.
            tracing::warn!(service = %u.service_id, "writing health failed, will retry: {e}");
        }
    }
}

/// A low-cardinality label for a handshake failure.
fn short_reason(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    if r.contains("certificate") && (r.contains("no ") || r.contains("required")) {
        "no_client_certificate"
    } else if r.contains("unknown") || r.contains("issuer") || r.contains("certificate") {
        "bad_certificate"
    } else if r.contains("timed out") || r.contains("timeout") {
        "timeout"
    } else {
        "handshake"
    }
}
