//! `weft-server`: runs one control-plane server. See `weft_server` for the parts.
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing_subscriber::EnvFilter;
use weft_api::proto::raft_server::RaftServer;
use weft_server::node::ServerNode;
use weft_server::raft::log_store::LogStore;
use weft_server::raft::network::NetworkFactory;
use weft_server::raft::service::RaftService;
use weft_server::raft::sm_store::StateMachineStore;
use weft_server::settings::{Args, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn,sled=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let settings = Settings::resolve(Args::parse())?;
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
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let db = sled::Config::new()
        .path(data_dir.join("raft.sled"))
        .open()
        .with_context(|| format!("opening the store in {}", data_dir.display()))?;
    let log_store = LogStore::open(&db)?;
    let sm_store = StateMachineStore::open(&db, settings.vip_cidr.clone())?;
    let shared = sm_store.shared();

    let config = openraft::Config {
        cluster_name: "weft".into(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(settings.snapshot_threshold),
        max_in_snapshot_log_to_keep: settings.snapshot_threshold / 2,
        ..Default::default()
    };
    let config = Arc::new(config.validate().context("raft config")?);
    let raft = openraft::Raft::new(
        settings.node_id,
        config,
        NetworkFactory,
        log_store,
        sm_store,
    )
    .await
    .context("starting raft")?;
    let node = Arc::new(ServerNode {
        id: settings.node_id,
        raft,
        shared,
        peers: settings
            .peers
            .iter()
            .map(|(id, a)| (*id, a.to_string()))
            .collect(),
        default_allow: settings.default_allow,
        leaf_ttl_secs: settings.leaf_ttl_secs,
    });

    let raft_listener = TcpListener::bind(settings.raft_addr)
        .await
        .with_context(|| format!("listening for raft on {}", settings.raft_addr))?;
    let grpc_listener = TcpListener::bind(settings.grpc_addr)
        .await
        .with_context(|| format!("listening for grpc on {}", settings.grpc_addr))?;
    let raft_addr = raft_listener.local_addr()?;
    let grpc_addr = grpc_listener.local_addr()?;

    let raft_service = RaftServer::new(RaftService::new(node.clone()))
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let raft_server = tonic::transport::Server::builder()
        .add_service(raft_service)
        .serve_with_incoming(TcpListenerStream::new(raft_listener));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let api = weft_server::grpc::services(node.clone());
    let api_server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(api.catalog)
        .add_service(api.intentions)
        .add_service(api.config)
        .add_service(api.kv)
        .add_service(api.operator)
        .add_service(api.watch)
        .add_service(api.ca)
        .serve_with_incoming_shutdown(TcpListenerStream::new(grpc_listener), shutdown_signal());

    tokio::spawn(weft_server::cluster::form(node.clone()));
    tokio::spawn(weft_server::grpc::ca::maintain(node.clone()));
    let raft_task = tokio::spawn(raft_server);

    if settings.dev {
        // Ready means able to take writes: wait for this server to lead.
        let _ = node
            .raft
            .wait(Some(Duration::from_secs(5)))
            .current_leader(settings.node_id, "dev leader")
            .await;
    }
    println!(
        "weft-server {} ready in {} ms: grpc {grpc_addr}, raft {raft_addr}, data {}{}",
        settings.node_id,
        started.elapsed().as_millis(),
        data_dir.display(),
        if settings.dev {
            " (dev, default intention allow)"
        } else {
            ""
        }
    );

    api_server.await.context("grpc server")?;
    tracing::info!("shutting down");
    raft_task.abort();
    let _ = node.raft.shutdown().await;
    drop(db);
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
