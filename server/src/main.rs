//! `weft-server`: runs one control-plane server. See `weft_server` for the parts.
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use weft_api::proto::raft_server::RaftServer;
use weft_server::conn_limit::ClientLimits;
use weft_server::node::ServerNode;
use weft_server::raft::log_store::LogStore;
use weft_server::raft::network::{NetworkFactory, PeerChannels, MAX_RAFT_MESSAGE};
use weft_server::raft::prevote;
use weft_server::raft::service::RaftService;
use weft_server::raft::sm_store::StateMachineStore;
use weft_server::settings::{Args, Settings};
use weft_server::tls::{self, ServerTls};

/// Election timing: a follower that has heard no leader for 800 ms
/// (openraft's leader lease) asks its peers, every 400 to 800 ms, whether
/// they would vote for it (pre-vote), and stands if a majority would.
const ELECTION: prevote::Timing = prevote::Timing {
    min: Duration::from_millis(400),
    max: Duration::from_millis(800),
};

/// HTTP/2 streams one connection may have open at once on each of the
/// server's ports (tonic leaves it unlimited): with the per-address
/// connection limit, what one peer can make the server hold is bounded.
const MAX_STREAMS_PER_CONNECTION: u32 = 128;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    weft_api::logging::init(args.log_format, "info,openraft=warn,sled=warn");
    let settings = Settings::resolve(args)?;
    run(settings).await
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    // Dev mode keeps its data in a directory removed at exit.
    let temp_dir = if settings.data_dir.is_none() {
        Some(tempfile::tempdir().context("creating a temporary data dir")?)
    } else {
        None
    };
    let data_dir = match (&settings.data_dir, &temp_dir) {
        (Some(dir), _) => dir.clone(),
        (None, Some(t)) => t.path().to_path_buf(),
        (None, None) => unreachable!("resolve() requires a data dir outside dev mode"),
    };
    weft_api::private_dir::create_private_dir(&data_dir)
        .with_context(|| "--data-dir: it would hold the CA's keys")?;
    let tls_files = match &settings.tls {
        Some(files) => files.clone(),
        None => tls::dev_files(&data_dir, &settings.datacenter)
            .context("making the dev server's TLS certificates")?,
    };
    let db = sled::Config::new()
        .path(data_dir.join("raft.sled"))
        // sled caches up to 1 GiB by default; the state lives in memory
        // anyway, and the log is read back mostly while it is fresh.
        .cache_capacity(64 << 20)
        .open()
        .with_context(|| format!("opening the store in {}", data_dir.display()))?;
    let log_store = LogStore::open(&db)?;
    let sm_store = StateMachineStore::open(&db, settings.vip_cidr.clone())?;
    let shared = sm_store.shared();
    let mesh_roots: tls::MeshRoots = {
        let shared = shared.clone();
        Arc::new(move || shared.state.read().expect("state lock").ca_roots_der())
    };
    let server_tls = ServerTls::load(&tls_files, &settings.datacenter, mesh_roots)?;
    let peer_channels = PeerChannels::new(server_tls.peer_client.clone());

    let config = openraft::Config {
        cluster_name: "weft".into(),
        heartbeat_interval: 100,
        election_timeout_min: ELECTION.min.as_millis() as u64,
        election_timeout_max: ELECTION.max.as_millis() as u64,
        // Elections start only through pre-vote (raft::prevote).
        enable_elect: false,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(settings.snapshot_threshold),
        // Consul's defaults (16384 and 10240): a follower a few seconds
        // behind under load catches up from the log, not by being sent the
        // whole state again and again.
        max_in_snapshot_log_to_keep: settings.raft_trailing_logs,
        // Appends are bounded in entries here and in bytes by the transport
        // (raft::network::APPEND_BYTES, 1 MiB, or one entry if larger: at
        // most a 2 MiB config entry by default). openraft also uses the
        // heartbeat interval as the append timeout; an append that takes
        // longer goes on, and the retry waits for it (raft::network).
        max_payload_entries: 512,
        snapshot_max_chunk_size: 4 << 20,
        ..Default::default()
    };
    let config = Arc::new(config.validate().context("raft config")?);
    let raft = openraft::Raft::new(
        settings.node_id,
        config,
        NetworkFactory {
            peers: peer_channels.clone(),
            addrs: settings
                .peers
                .iter()
                .map(|(id, a)| (*id, a.to_string()))
                .collect(),
        },
        log_store,
        sm_store,
    )
    .await
    .context("starting raft")?;
    let metrics = Arc::new(weft_server::metrics::ServerMetrics::new());
    tokio::spawn(weft_server::metrics::count_leader_changes(
        raft.clone(),
        metrics.leader_changes.clone(),
    ));
    let node = Arc::new(ServerNode {
        id: settings.node_id,
        raft: raft.clone(),
        shared,
        peers: settings
            .peers
            .iter()
            .map(|(id, a)| (*id, a.to_string()))
            .collect(),
        default_allow: settings.default_allow,
        leaf_ttl_secs: settings.leaf_ttl_secs,
        vip_release_after: settings.vip_release_after,
        peer_channels,
        datacenter: settings.datacenter.clone(),
        primary_datacenter: settings.primary_datacenter.clone(),
        liveness: weft_server::liveness::Liveness::new(settings.node_timeout),
        limits: settings.limits,
        leader_contact: Default::default(),
        contact: Default::default(),
        federation_tls: Default::default(),
        traffic: Default::default(),
        batcher: weft_server::raft::batch::Batcher::start(
            raft.clone(),
            metrics.commit_seconds.clone(),
        ),
        metrics,
    });
    tokio::spawn(weft_server::raft::batch::enable_when_all_apply(
        node.clone(),
        node.batcher.clone(),
    ));
    tokio::spawn(prevote::run(
        node.clone(),
        ELECTION,
        node.metrics.elections.clone(),
    ));
    tokio::spawn(weft_server::contact::run(node.clone()));
    if settings.node_timeout < 2 * weft_server::contact::CONTACT_LIMIT {
        tracing::warn!(
            node_timeout = ?settings.node_timeout,
            "the node timeout is under twice the {:?} a server may go without contact before \
             it refuses heartbeats: in a partition, nodes whose agents heartbeat a cut-off \
             server may be judged critical before their heartbeats reach the elected leader",
            weft_server::contact::CONTACT_LIMIT
        );
    }

    let raft_listener = TcpListener::bind(settings.raft_addr)
        .await
        .with_context(|| format!("listening for raft on {}", settings.raft_addr))?;
    let grpc_listener = TcpListener::bind(settings.grpc_addr)
        .await
        .with_context(|| format!("listening for grpc on {}", settings.grpc_addr))?;
    let http_listener = TcpListener::bind(settings.http_addr)
        .await
        .with_context(|| format!("listening for http on {}", settings.http_addr))?;
    let federation_listener = match settings.federation_addr {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening for federation on {addr}"))?,
        ),
        None => None,
    };
    let raft_addr = raft_listener.local_addr()?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;

    let raft_service = RaftServer::new(RaftService::new(node.clone()))
        .max_decoding_message_size(MAX_RAFT_MESSAGE)
        .max_encoding_message_size(MAX_RAFT_MESSAGE);
    let raft_server = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .add_service(raft_service)
        .serve_with_incoming(tls::incoming(
            raft_listener,
            server_tls.raft.clone(),
            ClientLimits::new(settings.max_conns_per_client),
            node.metrics.tls_connections("raft"),
        ));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let api = weft_server::grpc::services(node.clone());
    let api_server = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .layer(weft_server::grpc::rpc_metrics::RpcMetricsLayer(
            node.metrics.clone(),
        ))
        .layer(weft_server::grpc::known_token::KnownTokenLayer(
            node.clone(),
        ))
        .add_service(health_service)
        .add_service(api.catalog)
        .add_service(api.intentions)
        .add_service(api.config)
        .add_service(api.kv)
        .add_service(api.session)
        .add_service(api.operator)
        .add_service(api.watch)
        .add_service(api.ca)
        .add_service(api.acl)
        .add_service(api.telemetry)
        .serve_with_incoming_shutdown(
            tls::incoming(
                grpc_listener,
                server_tls.api.clone(),
                ClientLimits::new(settings.max_conns_per_client),
                node.metrics.tls_connections("api"),
            ),
            shutdown_signal(),
        );

    if let Some(listener) = federation_listener {
        let federation_server = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .add_service(weft_api::proto::federation_server::FederationServer::new(
                weft_server::federation::FederationService::new(
                    node.clone(),
                    settings.primary_datacenter.clone(),
                ),
            ))
            .serve_with_incoming(tls::incoming(
                listener,
                server_tls.federation.clone(),
                // Every connection comes from a gateway's address: the
                // gateways limit each client, so the limit per address
                // here is the gateways' share.
                ClientLimits::new(
                    settings
                        .max_conns_per_client
                        .saturating_mul(weft_server::federation::CONNS_PER_GATEWAY_FACTOR),
                ),
                node.metrics.tls_connections("federation"),
            ));
        tokio::spawn(async move {
            if let Err(e) = federation_server.await {
                tracing::error!("federation listener: {e}");
            }
        });
        let _ = node
            .federation_tls
            .set(server_tls.federation_client.clone());
        tokio::spawn(weft_server::federation::maintain(
            node.clone(),
            weft_server::federation::FederationSettings {
                primary: settings.primary_datacenter.clone(),
                primary_gateways: settings.primary_gateways.clone(),
                client_tls: server_tls.federation_client.clone(),
            },
        ));
    }
    tokio::spawn(weft_server::cluster::form(node.clone()));
    tokio::spawn(weft_server::grpc::ca::maintain(node.clone()));
    tokio::spawn(weft_server::vip_release::run(node.clone()));
    tokio::spawn(exit_on_raft_failure(node.clone()));
    tokio::spawn(weft_server::liveness::monitor(node.clone()));
    tokio::spawn(weft_server::grpc::session::reap(node.clone()));
    tokio::spawn(weft_server::http::serve(
        http_listener,
        server_tls.http.clone(),
        ClientLimits::new(settings.max_conns_per_client),
        node.clone(),
    ));
    let raft_task = tokio::spawn(raft_server);

    let dev_token = if settings.dev {
        // Ready means able to take writes: wait for this server to lead.
        node.raft
            .wait(Some(Duration::from_secs(5)))
            .current_leader(settings.node_id, "dev leader")
            .await
            .context("the dev server did not become leader")?;
        let (_, secret) = weft_server::grpc::acl::bootstrap(&node)
            .await
            .map_err(|s| anyhow::anyhow!("bootstrapping ACLs: {}", s.message()))?;
        Some(secret)
    } else {
        None
    };
    println!(
        "weft-server {} ready in {} ms: grpc {grpc_addr} (TLS), http {http_addr} (TLS), raft {raft_addr} (mutual TLS), data {}{}",
        settings.node_id,
        started.elapsed().as_millis(),
        data_dir.display(),
        if settings.dev {
            format!(
                " (dev, default intention {})",
                if settings.default_allow { "allow" } else { "deny" }
            )
        } else {
            String::new()
        }
    );
    if let Some(token) = dev_token {
        // Lines a shell can paste (the token is the management token of
        // this throw-away server).
        println!("export WEFT_ADDR={grpc_addr}");
        println!("export WEFT_CACERT={}", tls_files.ca.display());
        println!("export WEFT_TOKEN={}", token.expose());
    }

    api_server.await.context("grpc server")?;
    tracing::info!("shutting down");
    SHUTTING_DOWN.store(true, std::sync::atomic::Ordering::SeqCst);
    raft_task.abort();
    let _ = node.raft.shutdown().await;
    drop(db);
    Ok(())
}

/// Set once this server shuts Raft down on purpose.
static SHUTTING_DOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A server whose Raft core failed cannot serve: it exits non-zero so that
/// its supervisor restarts it, instead of answering "shutting down".
async fn exit_on_raft_failure(node: Arc<ServerNode>) {
    let mut metrics = node.raft.metrics();
    loop {
        if SHUTTING_DOWN.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if let Err(fatal) = &metrics.borrow().running_state {
            tracing::error!("raft stopped: {fatal}; exiting");
            std::process::exit(70);
        }
        if metrics.changed().await.is_err()
            && !SHUTTING_DOWN.load(std::sync::atomic::Ordering::SeqCst)
        {
            tracing::error!("raft stopped; exiting");
            std::process::exit(70);
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
