//! Fills a weft server with a large mesh for the benchmark's "large mesh"
//! section, from inside the mesh's network namespace, and then keeps it
//! changing:
//!
//! - `fill`: NODES nodes (no agent runs them), SERVICES services with
//!   PER_SERVICE instances each spread over the nodes, INTENTIONS
//!   intentions between those services (allow and deny in turn), and
//!   ROUTERS service-routers (each on an HTTP service, with a header, a
//!   path-regex and a prefix route). Prints one JSON line with the counts
//!   and the seconds it took.
//! - `churn`: PER_SECOND changes a second (an instance's health flips, an
//!   intention's action flips, in turn) for at most SECONDS seconds or until
//!   stopped; prints how many it made.
//!
//! None of these names a service the benchmark's own traffic uses. The
//! management token is read from a file, never from the command line.
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use weft_api::proto::catalog_client::CatalogClient;
use weft_api::proto::config_client::ConfigClient;
use weft_api::proto::intentions_client::IntentionsClient;
use weft_api::proto::{self, RegisterNodeRequest, RegisterServiceRequest};
use weft_bench::mesh_shape::{http_defaults, instance, intention, node_address, node_name, router};
use weft_tests::servers::{grpc_channel, Bearer};

type Ch = InterceptedService<Channel, Bearer>;

/// One call may take this long.
const CALL_LIMIT: Duration = Duration::from_secs(30);
/// The whole fill may take this long.
const FILL_LIMIT: Duration = Duration::from_secs(15 * 60);

#[derive(Parser)]
struct Args {
    /// The server's gRPC address.
    #[arg(long)]
    server: String,
    /// The CA that signed the server's certificate.
    #[arg(long)]
    ca_file: PathBuf,
    /// A file holding the management token.
    #[arg(long)]
    token_file: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Fill {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, default_value_t = 1000)]
        services: usize,
        #[arg(long, default_value_t = 10)]
        per_service: usize,
        #[arg(long, default_value_t = 1000)]
        intentions: usize,
        #[arg(long, default_value_t = 100)]
        routers: usize,
        /// Calls in flight at once.
        #[arg(long, default_value_t = 16)]
        clients: usize,
    },
    Churn {
        #[arg(long, default_value_t = 10)]
        per_second: u64,
        /// At most this long.
        #[arg(long)]
        seconds: u64,
        /// The services and instances `fill` made (changes pick among them).
        #[arg(long, default_value_t = 1000)]
        services: usize,
        #[arg(long, default_value_t = 1000)]
        intentions: usize,
    },
}

/// One write of the fill.
#[derive(Debug, Clone)]
enum Write {
    Node(usize),
    Instance(usize, usize),
    Intention(usize),
    Entry(String),
}

struct Sizes {
    nodes: usize,
    services: usize,
    per_service: usize,
}

async fn write(channel: &Ch, sizes: &Sizes, w: &Write) -> Result<(), tonic::Status> {
    match w {
        Write::Node(i) => {
            let node = proto::Node {
                name: node_name(*i),
                address: node_address(*i),
                datacenter: "dc1".into(),
                ..Default::default()
            };
            let request = RegisterNodeRequest { node: Some(node) };
            CatalogClient::new(channel.clone())
                .register_node(request)
                .await?;
        }
        Write::Instance(s, k) => {
            let i = instance(*s, *k, sizes.per_service, sizes.nodes, true);
            let request = RegisterServiceRequest { instance: Some(i) };
            CatalogClient::new(channel.clone())
                .register_service(request)
                .await?;
        }
        Write::Intention(i) => {
            let request = proto::UpsertIntentionRequest {
                intention: Some(intention(*i, sizes.services, false)),
            };
            IntentionsClient::new(channel.clone())
                .upsert(request)
                .await?;
        }
        Write::Entry(json) => {
            let request = proto::WriteConfigRequest { json: json.clone() };
            ConfigClient::new(channel.clone()).write(request).await?;
        }
    }
    Ok(())
}

/// Makes `writes` from `clients` tasks at once, each retried up to 3 times
/// when the server is briefly unavailable.
async fn write_all(
    channel: &Ch,
    sizes: Arc<Sizes>,
    writes: Vec<Write>,
    clients: usize,
) -> anyhow::Result<()> {
    let writes = Arc::new(writes);
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + FILL_LIMIT;
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let (channel, sizes, writes, next) =
            (channel.clone(), sizes.clone(), writes.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(w) = writes.get(n) else {
                    return Ok(());
                };
                if Instant::now() > deadline {
                    bail!(
                        "the fill took over {FILL_LIMIT:?} (at write {n} of {})",
                        writes.len()
                    );
                }
                let mut attempt = 0;
                loop {
                    let result = tokio::time::timeout(CALL_LIMIT, write(&channel, &sizes, w))
                        .await
                        .with_context(|| format!("{w:?} took over {CALL_LIMIT:?}"))?;
                    match result {
                        Ok(()) => break,
                        Err(e) if attempt < 3 && e.code() == tonic::Code::Unavailable => {
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => return Err(anyhow::Error::new(e).context(format!("{w:?}"))),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ca = std::fs::read_to_string(&args.ca_file)
        .with_context(|| format!("reading {}", args.ca_file.display()))?;
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("reading {}", args.token_file.display()))?;
    let channel = grpc_channel(&args.server, &ca, Some(token.trim())).await?;
    match args.command {
        Command::Fill {
            nodes,
            services,
            per_service,
            intentions,
            routers,
            clients,
        } => {
            if routers > services || nodes == 0 || services == 0 {
                bail!("need at least one node and one service, and no more routers than services");
            }
            let sizes = Arc::new(Sizes {
                nodes,
                services,
                per_service,
            });
            let start = Instant::now();
            // Nodes before their instances, HTTP defaults before routers.
            let phases: Vec<Vec<Write>> = vec![
                (0..nodes).map(Write::Node).collect(),
                (0..services)
                    .flat_map(|s| (0..per_service).map(move |k| Write::Instance(s, k)))
                    .chain((0..intentions).map(Write::Intention))
                    // The routers' services and those they route to.
                    .chain((0..(routers + 3).min(services)).map(|s| Write::Entry(http_defaults(s))))
                    .collect(),
                (0..routers)
                    .map(|s| Write::Entry(router(s, services)))
                    .collect(),
            ];
            for writes in phases {
                write_all(&channel, sizes.clone(), writes, clients).await?;
            }
            println!(
                "{}",
                serde_json::json!({
                    "nodes": nodes,
                    "services": services,
                    "instances": services * per_service,
                    "intentions": intentions,
                    "routers": routers,
                    "secs": start.elapsed().as_secs_f64(),
                })
            );
        }
        Command::Churn {
            per_second,
            seconds,
            services,
            intentions,
        } => {
            let sizes = Sizes {
                nodes: 1000,
                services,
                per_service: 10,
            };
            let mut tick =
                tokio::time::interval(Duration::from_micros(1_000_000 / per_second.max(1)));
            let end = Instant::now() + Duration::from_secs(seconds);
            let mut made = 0usize;
            let mut late = 0usize;
            // Stopped by SIGTERM (the benchmark, when it has measured): it
            // reports what it made and exits.
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            while Instant::now() < end {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = term.recv() => break,
                }
                let n = made / 2;
                let flipped = (made / 2 / services.max(1)).is_multiple_of(2);
                let call = async {
                    if made.is_multiple_of(2) {
                        // Service n's first instance: critical, then passing
                        // again on the next round through the services.
                        let i = instance(n % services, 0, sizes.per_service, sizes.nodes, !flipped);
                        let request = RegisterServiceRequest { instance: Some(i) };
                        CatalogClient::new(channel.clone())
                            .register_service(request)
                            .await
                            .map(|_| ())
                    } else {
                        let request = proto::UpsertIntentionRequest {
                            intention: Some(intention(n % intentions.max(1), services, flipped)),
                        };
                        IntentionsClient::new(channel.clone())
                            .upsert(request)
                            .await
                            .map(|_| ())
                    }
                };
                let started = Instant::now();
                tokio::time::timeout(CALL_LIMIT, call)
                    .await
                    .context("a change took over 30 s")??;
                if started.elapsed() > Duration::from_micros(1_000_000 / per_second.max(1)) {
                    late += 1;
                }
                made += 1;
            }
            println!("{}", serde_json::json!({ "changes": made, "late": late }));
        }
    }
    Ok(())
}
