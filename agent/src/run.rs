//! The agent's main loop: registers with the servers, follows their watch
//! stream, runs health checks, gets certificates, serves the inbound tunnel
//! port, the explicit upstream ports and the admin port, and on shutdown
//! stops accepting, drains open connections up to a deadline and
//! deregisters.
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::admin::{AdminServer, AdminState};
use crate::config::AgentConfig;
use crate::control::{Control, ControlError};
use crate::dns::{DnsError, DnsServer, ServiceResolver};
use crate::hbone::{HbonePool, HboneServer, TlsError, TrustBundle};
use crate::health::runner::{HealthChecks, HealthUpdate};
use crate::identity::{Identities, IdentityError};
use crate::intercept::{InterceptError, Interception};
use crate::metrics::{AgentMetrics, EbpfCounter, Side};
use crate::proxy::{inbound, outbound, permissive, ProxyContext};
use crate::view::View;

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
    #[error("no trust bundle from the servers within {0:?} (is their CA up?)")]
    NoBundle(Duration),
    #[error("dns: {0}")]
    Dns(#[from] DnsError),
    #[error("transparent interception: {0}")]
    Intercept(#[from] InterceptError),
}

async fn listen(addr: std::net::SocketAddr) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Listen { addr, source })
}

/// Runs the agent until `shutdown` completes.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let config = Arc::new(config);
    let metrics = Arc::new(AgentMetrics::new());
    let view = Arc::new(RwLock::new(View::default()));
    let control = Arc::new(Control::new(config.clone())?);
    let (ready_tx, ready_rx) = watch::channel(false);

    // Admin first, so that /healthz answers (503) while the rest starts.
    let admin_state = AdminState {
        ready: ready_rx,
        metrics: metrics.clone(),
        config: {
            let (config, view) = (config.clone(), view.clone());
            Arc::new(move || {
                serde_json::json!({
                    "config": &*config,
                    "view": &*view.read().expect("view lock"),
                })
            })
        },
    };
    let admin = AdminServer::bind(config.admin_addr, admin_state).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let admin_task = tokio::spawn(admin.serve(wait_for(stop_rx.clone())));

    // Interception before anything else: adopt what an earlier agent pinned
    // and keep failing closed (no lease) until the view is loaded.
    let interception = if config.ebpf {
        Some(Arc::new(Interception::start(&config)?))
    } else {
        None
    };

    control.register_retrying(STARTUP_LIMIT).await?;
    let heartbeat_task = tokio::spawn(control.clone().heartbeat_forever());

    let (index_tx, mut index_rx) = watch::channel(0u64);
    let follow_task = tokio::spawn(control.clone().follow(view.clone(), index_tx));
    let bundle = wait_for_bundle(&view, &mut index_rx).await?;

    // Health: write changes to the servers.
    let (health_tx, health_rx) = mpsc::unbounded_channel();
    let checks = HealthChecks::new(health_tx);
    for s in &config.services {
        checks.add(&s.id, &s.name, s.checks.clone());
    }
    let health_task = tokio::spawn(report_health(control.clone(), health_rx));
    // Local HTTP API: workloads update their TTL checks (crate::local_api).
    let judge = Arc::new(crate::local_api::authz::ServerJudge::new(control.clone()));
    let api_state = crate::local_api::LocalApiState::new(checks.clone(), judge);
    let local_api = crate::local_api::LocalApi::bind(config.http_addr, api_state).await?;
    let local_api_task = tokio::spawn(local_api.serve(wait_for(stop_rx.clone())));

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
    let renew_task = tokio::spawn(identities.clone().renew_forever());
    let trim_task = tokio::spawn(crate::allocator::trim_after_bursts());
    let bundle_task = tokio::spawn(follow_bundle(
        view.clone(),
        index_rx.clone(),
        bundle.clone(),
    ));

    let ctx = Arc::new(ProxyContext {
        node_name: config.node_name.clone(),
        datacenter: config.datacenter.clone(),
        inbound_port: config.inbound_addr.port(),
        view: view.clone(),
        identities: identities.clone(),
        pool: HbonePool::new(bundle.clone()),
        metrics: metrics.clone(),
        in_flight: Mutex::new(HashMap::new()),
        outliers: Default::default(),
    });

    // Inbound tunnels.
    let node_identity = identities
        .node()
        .ok_or(IdentityError::Unknown("node".into()))?;
    let inbound_ctx = ctx.clone();
    let failure_metrics = metrics.clone();
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
    });
    let inbound_listener = listen(config.inbound_addr).await?;
    let mut accept_tasks = vec![tokio::spawn(server.serve(inbound_listener))];

    // Explicit upstreams.
    for s in &config.services {
        for up in &s.upstreams {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], up.local_port));
            let listener = listen(addr).await?;
            tracing::info!(%addr, source = %s.name, destination = %up.name, "upstream listening");
            accept_tasks.push(tokio::spawn(outbound::serve_upstream(
                ctx.clone(),
                listener,
                s.name.clone(),
                up.name.clone(),
            )));
        }
    }

    // DNS: NAME.service.weft -> the service's virtual IP.
    let dns_view = view.clone();
    let resolver: ServiceResolver = Arc::new(move |service: &str| {
        match dns_view.read().expect("view lock").vips.get(service) {
            Some(std::net::IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        }
    });
    let dns = DnsServer::bind(config.dns_addr, resolver).await?;
    let dns_task = tokio::spawn(dns.serve(wait_for(stop_rx.clone())));

    // Transparent interception: the maps follow the view, the listeners are
    // up, and only then does the lease admit mesh connections.
    if let Some(interception) = &interception {
        interception.sync(&view.read().expect("view lock"))?;
        let listener = listen(config.outbound_addr).await?;
        accept_tasks.push(tokio::spawn(outbound::serve_redirected(
            ctx.clone(),
            listener,
            interception.clone(),
        )));
        let permissive = listen(config.permissive_addr).await?;
        interception.set_permissive_listener(&permissive)?;
        accept_tasks.push(tokio::spawn(permissive::serve(ctx.clone(), permissive)));
        accept_tasks.push(tokio::spawn(follow_destinations(
            view.clone(),
            index_rx.clone(),
            interception.clone(),
        )));
        accept_tasks.push(tokio::spawn(export_ebpf_counters(
            interception.clone(),
            metrics.clone(),
        )));
        interception.renew_lease()?;
        accept_tasks.push(tokio::spawn(renew_lease(interception.clone())));
        tracing::info!(outbound = %config.outbound_addr, permissive = %config.permissive_addr, "transparent interception on");
    }

    ready_tx.send_replace(true);
    tracing::info!(node = %config.node_name, inbound = %config.inbound_addr, "agent ready");
    println!(
        "weft-agent {} ready: inbound {}, admin {}",
        config.node_name, config.inbound_addr, config.admin_addr
    );

    shutdown.await;
    tracing::info!("shutting down: no new connections, draining");
    ready_tx.send_replace(false);
    for task in accept_tasks {
        task.abort();
    }
    if let Some(interception) = &interception {
        // New mesh connections are refused from here on; the programs stay.
        if let Err(e) = interception.end_lease() {
            tracing::error!("ending the eBPF lease: {e}");
        }
    }
    drain(&ctx, config.drain_timeout).await;
    follow_task.abort();
    checks.stop_all();
    for task in [
        health_task,
        renew_task,
        bundle_task,
        trim_task,
        heartbeat_task,
    ] {
        task.abort();
    }
    if let Err(e) = control.deregister().await {
        tracing::warn!("deregistration failed: {e}");
    }
    let _ = stop_tx.send(true);
    let _ = admin_task.await;
    let _ = dns_task.await;
    let _ = local_api_task.await;
    Ok(())
}

async fn wait_for(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The first trust bundle from the watch stream.
async fn wait_for_bundle(
    view: &RwLock<View>,
    index_rx: &mut watch::Receiver<u64>,
) -> Result<TrustBundle, RunError> {
    let deadline = tokio::time::Instant::now() + STARTUP_LIMIT;
    loop {
        {
            let v = view.read().expect("view lock");
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
    view: Arc<RwLock<View>>,
    mut index_rx: watch::Receiver<u64>,
    bundle: TrustBundle,
) {
    let mut current = view.read().expect("view lock").bundle_pem();
    while index_rx.changed().await.is_ok() {
        let latest = view.read().expect("view lock").bundle_pem();
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
    view: Arc<RwLock<View>>,
    mut index_rx: watch::Receiver<u64>,
    interception: Arc<Interception>,
) {
    while index_rx.changed().await.is_ok() {
        let result = interception.sync(&view.read().expect("view lock"));
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
        }
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
            // Kept in `control`; the next registration carries it.
            tracing::warn!(service = %u.service_id, "writing health failed: {e}");
        }
    }
}

/// Waits until no outbound connection is open, or `limit`.
async fn drain(ctx: &ProxyContext, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if ctx.in_flight.lock().expect("in-flight lock").is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::warn!("drain deadline reached with connections still open");
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
