//! Control-plane benchmark: a 3-server cluster on loopback, release builds,
//! every Raft append fsynced by sled, TLS on every port and ACLs on (the
//! clients hold the management token).
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::{mpsc, Semaphore};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use weft_api::proto::intentions_client::IntentionsClient;
use weft_api::proto::kv_client::KvClient;
use weft_api::proto::watch_client::WatchClient;
use weft_api::proto::{
    change, watch_event, Intention, KvPutRequest, UpsertIntentionRequest, WatchRequest,
};
use weft_tests::servers::{grpc_channel, Bearer, Cluster};

use crate::report::{Figure, Section};
use crate::{catalog, usage};

/// What the benchmark's clients connect with: the servers' CA (PEM) and
/// the management token.
#[derive(Clone)]
pub struct Creds {
    ca_pem: String,
    token: String,
}

impl Creds {
    pub fn of(cluster: &Cluster) -> Self {
        Creds {
            ca_pem: cluster.tls_ca.cert_pem.clone(),
            token: cluster.token.clone(),
        }
    }
}

pub async fn channel(
    creds: &Creds,
    addr: &str,
) -> anyhow::Result<InterceptedService<Channel, Bearer>> {
    grpc_channel(addr, &creds.ca_pem, Some(&creds.token)).await
}

/// `writes` KV puts from `concurrency` clients to `addr`: writes per second.
async fn throughput(
    creds: &Creds,
    addr: &str,
    writes: usize,
    concurrency: usize,
    round: usize,
) -> anyhow::Result<f64> {
    let ch = channel(creds, addr).await?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let mut client = KvClient::new(ch.clone());
        let count = writes / concurrency;
        tasks.push(tokio::spawn(async move {
            for i in 0..count {
                let req = KvPutRequest {
                    key: format!("bench/{round}/{c}/{i}"),
                    value: b"0123456789abcdef".to_vec(),
                    cas: None,
                    ..Default::default()
                };
                client.put(req).await?;
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((writes / concurrency * concurrency) as f64 / start.elapsed().as_secs_f64())
}

/// Kills the leader and measures until a write succeeds on a survivor (ms).
pub async fn failover(cluster: &mut Cluster, round: usize) -> anyhow::Result<f64> {
    let leader = cluster.wait_for_leader(Duration::from_secs(10))?;
    let survivors: Vec<String> = (1..=3)
        .filter(|id| *id != leader)
        .map(|id| cluster.grpc_addr(id).to_string())
        .collect();
    cluster.kill(leader);
    let creds = Creds::of(cluster);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(30);
    'outer: loop {
        for addr in &survivors {
            let Ok(ch) = channel(&creds, addr).await else {
                continue;
            };
            let req = KvPutRequest {
                key: format!("failover/{round}"),
                value: b"x".to_vec(),
                cas: None,
                ..Default::default()
            };
            if KvClient::new(ch).put(req).await.is_ok() {
                break 'outer;
            }
        }
        if Instant::now() > deadline {
            bail!("no write succeeded within 30 s of killing the leader");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = start.elapsed().as_secs_f64() * 1000.0;
    cluster.start_server(leader)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(took)
}

/// How a fan-out measurement runs: streams, changes, and bounds.
pub struct FanoutPlan<'a> {
    /// Watch streams, spread over the servers, about 100 per connection.
    pub streams: usize,
    /// Intention writes made one at a time, each timed until every stream
    /// has it.
    pub changes: usize,
    /// Streams taking their snapshot at once (the others wait their turn).
    pub opening: usize,
    /// How long every stream may take to have its snapshot.
    pub open_limit: Duration,
    /// Names the intentions written (sources `bench-{label}-{n}`).
    pub label: &'a str,
}

/// What [`fanout`] measured.
pub struct Fanout {
    /// Seconds from the first subscribe until every stream had its snapshot.
    pub open_secs: f64,
    /// The first stream's snapshot: its parts and their encoded bytes.
    pub snapshot_parts: usize,
    pub snapshot_bytes: usize,
    /// Each server's VmRSS (MB) with every stream open.
    pub rss_open: Vec<f64>,
    /// Per change, ms from the write until the last stream had it.
    pub samples: Vec<f64>,
}

/// Opens watch streams spread over the servers (each ready once the last
/// part of its snapshot is in), then writes intentions and measures, for
/// each, the time until every stream has it.
pub async fn fanout(cluster: &Cluster, plan: &FanoutPlan<'_>) -> anyhow::Result<Fanout> {
    use prost::Message;
    let n = plan.streams;
    let addrs: Vec<String> = (1..=3)
        .map(|id| cluster.grpc_addr(id).to_string())
        .collect();
    let creds = Creds::of(cluster);
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(String, Instant)>();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let opening = Arc::new(Semaphore::new(plan.opening.max(1)));
    let first_snapshot = Arc::new(Mutex::new((0usize, 0usize)));
    let mut channels = Vec::new();
    for addr in &addrs {
        // About 100 streams per connection.
        for _ in 0..n.div_ceil(300).max(1) {
            channels.push(channel(&creds, addr).await?);
        }
    }
    let opened = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..n {
        let ch = channels[s % channels.len()].clone();
        let (seen_tx, ready_tx) = (seen_tx.clone(), ready_tx.clone());
        let (opening, first_snapshot) = (opening.clone(), first_snapshot.clone());
        tasks.push(tokio::spawn(async move {
            let watch = async {
                // Held until the snapshot is in.
                let mut permit = Some(opening.acquire_owned().await);
                let mut stream = WatchClient::new(ch)
                    .subscribe(WatchRequest {
                        from_index: 0,
                        include_kv: false,
                    })
                    .await?
                    .into_inner();
                let (mut parts, mut bytes) = (0, 0);
                while let Some(event) = stream.message().await? {
                    match event.event {
                        Some(watch_event::Event::Snapshot(snap)) => {
                            parts += 1;
                            bytes += snap.encoded_len();
                            // Ready once the snapshot's last part is in.
                            if !snap.more && permit.take().is_some() {
                                if s == 0 {
                                    *first_snapshot.lock().expect("lock") = (parts, bytes);
                                }
                                let _ = ready_tx.send(Ok(()));
                            }
                        }
                        Some(watch_event::Event::Changes(set)) => {
                            for c in set.changes {
                                if let Some(change::Change::IntentionUpsert(i)) = c.change {
                                    let _ = seen_tx.send((i.source, Instant::now()));
                                }
                            }
                        }
                        None => {}
                    }
                }
                Ok::<_, tonic::Status>(())
            };
            let end = match watch.await {
                Ok(()) => format!("watch stream {s} ended"),
                Err(e) => format!("watch stream {s}: {e}"),
            };
            let _ = ready_tx.send(Err(end));
        }));
    }
    let measured = async {
        let deadline = tokio::time::Instant::now() + plan.open_limit;
        for got in 0..n {
            tokio::time::timeout_at(deadline, ready_rx.recv())
                .await
                .with_context(|| {
                    format!(
                        "only {got} of {n} watch streams had their snapshot within {:?}",
                        plan.open_limit
                    )
                })?
                .context("watchers ended")?
                .map_err(anyhow::Error::msg)?;
        }
        let open_secs = opened.elapsed().as_secs_f64();
        let rss_open = usage::rss_mb(cluster);
        let leader = cluster.wait_for_leader(Duration::from_secs(10))?;
        let mut client = IntentionsClient::new(channel(&creds, cluster.grpc_addr(leader)).await?);
        let mut samples = Vec::new();
        for w in 0..plan.changes {
            let source = format!("bench-{}-{w}", plan.label);
            let start = Instant::now();
            let write = client.upsert(UpsertIntentionRequest {
                intention: Some(Intention {
                    source: source.clone(),
                    destination: "api".into(),
                    action: "allow".into(),
                    ..Default::default()
                }),
            });
            tokio::time::timeout(Duration::from_secs(30), write)
                .await
                .context("an intention write took over 30 s")??;
            let mut got = 0;
            let mut last = start;
            while got < n {
                let (s, at) = tokio::time::timeout(Duration::from_secs(30), seen_rx.recv())
                    .await
                    .context("watch streams did not all see the write within 30 s")?
                    .context("watchers ended")?;
                if s == source {
                    got += 1;
                    last = last.max(at);
                }
            }
            samples.push((last - start).as_secs_f64() * 1000.0);
        }
        let (snapshot_parts, snapshot_bytes) = *first_snapshot.lock().expect("lock");
        Ok::<_, anyhow::Error>(Fanout {
            open_secs,
            snapshot_parts,
            snapshot_bytes,
            rss_open,
            samples,
        })
    }
    .await;
    for t in tasks {
        t.abort();
    }
    measured
}

/// The figures of a run, and a headline section when the catalog-at-size
/// phase ran.
pub struct Run {
    pub figures: Vec<Figure>,
    pub sections: Vec<Section>,
}

/// Throughput, fan-out on a small catalog and failover; with `at_size`,
/// then the catalog at size ([`catalog`]) on the same cluster.
pub fn run(quick: bool, at_size: bool) -> anyhow::Result<Run> {
    let runtime = tokio::runtime::Runtime::new()?;
    // The benchmark's simulated agents send no heartbeats: a node timeout of
    // an hour keeps the leader from marking every registered node critical
    // (a write per node) in the middle of the measurements.
    let mut cluster = Cluster::start(3, &["--node-timeout=1h"])?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10))?;
    let leader_addr = cluster.grpc_addr(leader).to_string();
    let creds = Creds::of(&cluster);
    let rounds = if quick { 2 } else { 5 };
    let writes = if quick { 1000 } else { 4000 };
    let mut figures = Vec::new();

    let mut tput = Vec::new();
    for round in 0..rounds {
        tput.push(runtime.block_on(throughput(&creds, &leader_addr, writes, 64, round))?);
    }
    figures.push(Figure::new(
        "3-server commit throughput, fsync, 64 clients",
        "writes/s",
        tput,
    ));
    let mut serial = Vec::new();
    for round in 0..rounds {
        serial.push(runtime.block_on(throughput(
            &creds,
            &leader_addr,
            writes / 10,
            1,
            100 + round,
        ))?);
    }
    figures.push(Figure::new(
        "3-server commit throughput, fsync, 1 client",
        "writes/s",
        serial,
    ));

    for n in [1usize, 100, 1000] {
        let plan = FanoutPlan {
            streams: n,
            changes: rounds,
            opening: n,
            open_limit: Duration::from_secs(60),
            label: &format!("small-{n}"),
        };
        let fan = runtime.block_on(fanout(&cluster, &plan))?;
        figures.push(Figure::new(
            format!("intention write visible on all of {n} watch streams"),
            "ms",
            fan.samples,
        ));
    }

    let mut fo = Vec::new();
    for round in 0..rounds.min(3) {
        fo.push(runtime.block_on(failover(&mut cluster, round))?);
    }
    figures.push(Figure::new(
        "leader failover: kill -9 to first acknowledged write",
        "ms",
        fo,
    ));

    let mut sections = Vec::new();
    if at_size {
        let size = if quick {
            catalog::Size::quick()
        } else {
            catalog::Size::full()
        };
        let at = catalog::run(&runtime, &mut cluster, &size)?;
        sections.push(catalog::headline(&size, &figures, &at));
        figures.extend(at);
    }
    Ok(Run { figures, sections })
}
