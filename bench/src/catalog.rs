//! The control plane at size (issue 13): nodes and service instances
//! registered over gRPC by many concurrent clients (10,000 and 100,000 in
//! the full run), then watch streams as agents hold them (real gRPC, spread
//! over connections and over the 3 servers, each taking its full snapshot
//! first), then single intention writes, each timed until every stream has
//! it. The servers' memory and disk are read before and after.
//!
//! Every loop is bounded in count, and every wait in time.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use weft_api::proto::catalog_client::CatalogClient;
use weft_api::proto::{self, RegisterNodeRequest, RegisterServiceRequest};
use weft_tests::servers::{Bearer, Cluster};

use crate::control_plane::{channel, failover, fanout, Creds, FanoutPlan};
use crate::report::{number, Figure, Section};
use crate::usage;

type Ch = InterceptedService<Channel, Bearer>;

/// How large the catalog and the fan-out are.
#[derive(Clone, Copy)]
pub struct Size {
    pub nodes: usize,
    pub services: usize,
    /// Instances of each service, spread over the nodes.
    pub per_service: usize,
    pub streams: usize,
    /// Intention writes timed until every stream has them.
    pub changes: usize,
    /// Registering clients at once.
    pub clients: usize,
    /// Streams taking their snapshot at once.
    pub opening: usize,
}

impl Size {
    pub fn full() -> Self {
        Self {
            nodes: 10_000,
            services: 1_000,
            per_service: 100,
            streams: 1_000,
            changes: 100,
            clients: 64,
            opening: 32,
        }
    }

    pub fn quick() -> Self {
        Self {
            nodes: 1_000,
            services: 100,
            per_service: 100,
            streams: 1_000,
            changes: 20,
            clients: 64,
            opening: 32,
        }
    }

    fn instances(&self) -> usize {
        self.services * self.per_service
    }
}

/// Registration may take this long in all.
const REGISTER_LIMIT: Duration = Duration::from_secs(20 * 60);
/// Every stream may take this long to have its snapshot.
const OPEN_LIMIT: Duration = Duration::from_secs(10 * 60);
/// One registration call may take this long.
const CALL_LIMIT: Duration = Duration::from_secs(30);

fn node_name(i: usize) -> String {
    format!("node-{i}")
}

/// A distinct address per node, in 10.0.0.0/8.
fn node_address(i: usize) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff)
}

/// Instance `j`: service `j / per_service`, on node `j % nodes` at port
/// 10000 + `j / nodes`, so that every address:port is held once.
fn instance(size: &Size, j: usize) -> proto::ServiceInstance {
    let (service, k, node) = (j / size.per_service, j % size.per_service, j % size.nodes);
    proto::ServiceInstance {
        id: format!("svc-{service}-{k}"),
        service: format!("svc-{service}"),
        node: node_name(node),
        address: node_address(node),
        port: (10_000 + j / size.nodes) as u32,
        health: proto::Health::Passing as i32,
        ..Default::default()
    }
}

#[derive(Clone, Copy, Debug)]
enum Item {
    Node(usize),
    Instance(usize),
}

async fn register(
    client: &mut CatalogClient<Ch>,
    size: &Size,
    item: Item,
) -> Result<(), tonic::Status> {
    match item {
        Item::Node(i) => {
            let node = proto::Node {
                name: node_name(i),
                address: node_address(i),
                datacenter: "dc1".into(),
                ..Default::default()
            };
            client
                .register_node(RegisterNodeRequest { node: Some(node) })
                .await?;
        }
        Item::Instance(j) => {
            let instance = Some(instance(size, j));
            client
                .register_service(RegisterServiceRequest { instance })
                .await?;
        }
    }
    Ok(())
}

/// Registers items 0..count (made by `item`) from `size.clients` clients
/// at once over `channels`; returns the seconds it took. A call that fails
/// as UNAVAILABLE (a leader change) is tried again, up to 3 times.
async fn register_all(
    channels: &[Ch],
    size: &Arc<Size>,
    count: usize,
    item: fn(usize) -> Item,
    deadline: Instant,
) -> anyhow::Result<f64> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..size.clients {
        let mut client = CatalogClient::new(channels[c % channels.len()].clone());
        let (next, size) = (next.clone(), size.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!(
                        "registration past its time limit ({REGISTER_LIMIT:?}) at {i} of {count}"
                    );
                }
                let mut attempt = 0;
                loop {
                    let call = register(&mut client, &size, item(i));
                    let result =
                        tokio::time::timeout(CALL_LIMIT, call)
                            .await
                            .with_context(|| {
                                format!("registering {:?} took over {CALL_LIMIT:?}", item(i))
                            })?;
                    match result {
                        Ok(()) => break,
                        Err(e) if attempt < 3 && e.code() == tonic::Code::Unavailable => {
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => {
                            return Err(
                                anyhow::Error::new(e).context(format!("registering {:?}", item(i)))
                            )
                        }
                    }
                }
            }
        }));
    }
    let mut failed = None;
    for t in tasks {
        if let Err(e) = t.await? {
            failed.get_or_insert(e);
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(start.elapsed().as_secs_f64()),
    }
}

/// Names of the figures [`headline`] quotes.
const NODES: &str = "catalog at size: register nodes";
const INSTANCES: &str = "catalog at size: register service instances";
const FANOUT: &str = "catalog at size: intention write visible on all watch streams";
const PEAK: &str = "catalog at size: server peak RSS (VmHWM) over the whole run, per server";

/// Registers the catalog, opens the streams, times the changes, reads
/// memory and disk on the way, and measures one failover at the end.
pub fn run(
    runtime: &tokio::runtime::Runtime,
    cluster: &mut Cluster,
    size: &Size,
) -> anyhow::Result<Vec<Figure>> {
    let size = Arc::new(*size);
    let mut figures = Vec::new();
    let usage_figures = |what: &str, figures: &mut Vec<Figure>| {
        figures.push(Figure::new(
            format!("catalog at size: server RSS {what}, per server"),
            "MB",
            usage::rss_mb(cluster),
        ));
        figures.push(Figure::new(
            format!("catalog at size: server disk (data dir) {what}, per server"),
            "MB",
            usage::disk_mb(cluster),
        ));
    };
    usage_figures("before registration", &mut figures);

    let leader = cluster.wait_for_leader(Duration::from_secs(10))?;
    let creds = Creds::of(cluster);
    let leader_addr = cluster.grpc_addr(leader).to_string();
    let deadline = Instant::now() + REGISTER_LIMIT;
    let (nodes_secs, instances_secs) = runtime.block_on(async {
        let mut channels = Vec::new();
        for _ in 0..4 {
            channels.push(channel(&creds, &leader_addr).await?);
        }
        let nodes = register_all(&channels, &size, size.nodes, Item::Node, deadline).await?;
        let instances =
            register_all(&channels, &size, size.instances(), Item::Instance, deadline).await?;
        Ok::<_, anyhow::Error>((nodes, instances))
    })?;
    let (n, i, c) = (size.nodes, size.instances(), size.clients);
    figures.push(Figure::new(
        format!("{NODES}: {n}, {c} clients"),
        "s",
        vec![nodes_secs],
    ));
    figures.push(Figure::new(
        format!("{NODES}: {n}, {c} clients, rate"),
        "writes/s",
        vec![n as f64 / nodes_secs],
    ));
    figures.push(Figure::new(
        format!(
            "{INSTANCES}: {i} ({} services x {}), {c} clients",
            size.services, size.per_service
        ),
        "s",
        vec![instances_secs],
    ));
    figures.push(Figure::new(
        format!("{INSTANCES}: {i}, {c} clients, rate"),
        "writes/s",
        vec![i as f64 / instances_secs],
    ));
    usage_figures("after registration", &mut figures);

    let plan = FanoutPlan {
        streams: size.streams,
        changes: size.changes,
        opening: size.opening,
        open_limit: OPEN_LIMIT,
        label: "size",
    };
    let fan = runtime
        .block_on(fanout(cluster, &plan))
        .context("watch fan-out with the catalog at size")?;
    let s = size.streams;
    figures.push(Figure::new(
        format!(
            "catalog at size: {s} watch streams opened, each with its full snapshot ({} at a time)",
            size.opening
        ),
        "s",
        vec![fan.open_secs],
    ));
    figures.push(Figure::new(
        format!(
            "catalog at size: one stream's snapshot, {} parts",
            fan.snapshot_parts
        ),
        "MB",
        vec![fan.snapshot_bytes as f64 / 1e6],
    ));
    figures.push(Figure::new(
        format!("catalog at size: server RSS with {s} watch streams open, per server"),
        "MB",
        fan.rss_open,
    ));
    figures.push(Figure::new(
        format!("{FANOUT}: {s} streams, {i} instances"),
        "ms",
        fan.samples,
    ));
    figures.push(Figure::new(PEAK, "MB", usage::peak_rss_mb(cluster)));
    figures.push(Figure::new(
        "catalog at size: server disk (data dir) at the end, per server",
        "MB",
        usage::disk_mb(cluster),
    ));
    let took = runtime.block_on(failover(cluster, 1000))?;
    figures.push(Figure::new(
        format!("catalog at size: leader failover with {i} instances, kill -9 to first acknowledged write"),
        "ms",
        vec![took],
    ));
    Ok(figures)
}

fn find<'a>(figures: &'a [Figure], prefix: &str) -> Option<&'a Figure> {
    figures.iter().find(|f| f.name.starts_with(prefix))
}

/// The figures against its targets and the figures before it.
pub fn headline(size: &Size, before: &[Figure], at: &[Figure]) -> Section {
    let get = |figures: &[Figure], prefix: &str, f: fn(&Figure) -> f64| {
        find(figures, prefix).map_or("n/a".to_string(), |x| number(f(x)))
    };
    let verdict = |ok: Option<bool>| match ok {
        Some(true) => "met",
        Some(false) => "missed",
        None => "n/a",
    };
    let fan = find(at, FANOUT);
    let p99 = fan.map(|f| f.percentile(99.0));
    let peak = find(at, PEAK).map(|f| f.max());
    let tput = find(before, "3-server commit throughput, fsync, 64 clients").map(|f| f.median());
    let (i, s) = (size.instances(), size.streams);
    let mut md = String::from(
        "| figure | target (issue 13) | before | this run | |\n|---|---|---|---|---|\n",
    );
    md.push_str(&format!(
        "| change visible on all {s} streams, {i} instances: p50 / p99 / max ({} changes) | p99 ≤ 200 ms | 9 ms (small catalog) | {} / {} / {} ms | {} |\n",
        fan.map_or(0, |f| f.samples.len()),
        get(at, FANOUT, |f: &Figure| f.percentile(50.0)),
        get(at, FANOUT, |f: &Figure| f.percentile(99.0)),
        get(at, FANOUT, Figure::max),
        verdict(p99.map(|p| p <= 200.0)),
    ));
    md.push_str(&format!(
        "| server peak RSS (largest of 3) | ≤ 1 GB | | {} MB | {} |\n",
        peak.map_or("n/a".into(), number),
        verdict(peak.map(|p| p <= 1000.0)),
    ));
    md.push_str(&format!(
        "| commit throughput, fsync, 64 clients (median) | ≥ 5,000 writes/s | 2,201 writes/s | {} writes/s | {} |\n",
        tput.map_or("n/a".into(), number),
        verdict(tput.map(|t| t >= 5000.0)),
    ));
    md.push_str(&format!(
        "| commit throughput, fsync, 1 client (median) | | 536 writes/s | {} writes/s | |\n",
        get(
            before,
            "3-server commit throughput, fsync, 1 client",
            Figure::median
        ),
    ));
    md.push_str(&format!(
        "| change visible on all 1000 streams, small catalog (median) | | 9 ms | {} ms | |\n",
        get(
            before,
            "intention write visible on all of 1000",
            Figure::median
        ),
    ));
    md.push_str(&format!(
        "| leader failover, small catalog (median) | | 1.4 s | {} ms | |\n",
        get(before, "leader failover", Figure::median),
    ));
    md.push_str(&format!(
        "| leader failover, {i} instances (one run) | | | {} ms | |\n",
        get(at, "catalog at size: leader failover", Figure::max),
    ));
    md.push_str(&format!(
        "| registration: {} nodes / {i} instances, {} clients | | | {} s ({} writes/s) / {} s ({} writes/s) | |\n",
        size.nodes,
        size.clients,
        get(at, NODES, Figure::max),
        get(at, &format!("{NODES}: {}, {} clients, rate", size.nodes, size.clients), Figure::max),
        get(at, INSTANCES, Figure::max),
        get(at, &format!("{INSTANCES}: {i}, {} clients, rate", size.clients), Figure::max),
    ));
    md.push_str(&format!(
        "| server disk at the end (largest of 3) | | | {} MB | |\n",
        get(
            at,
            "catalog at size: server disk (data dir) at the end",
            Figure::max
        ),
    ));
    md.push_str(
        "\n\"before\": bench/README.md (node.md at c873dbb). The simulated agents send no \
         heartbeats (the cluster runs with `--node-timeout=1h`); registrations go to the \
         leader; the streams take their snapshots a few at a time (see the figure names).\n",
    );
    Section::new("Control plane at size (issue 13)", md)
}
