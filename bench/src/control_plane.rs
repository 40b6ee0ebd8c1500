//! Control-plane benchmark: a 3-server cluster on loopback, release builds,
//! every Raft append fsynced by sled, TLS on every port and ACLs on (the
//! clients hold the management token).
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use weft_api::proto::intentions_client::IntentionsClient;
use weft_api::proto::kv_client::KvClient;
use weft_api::proto::watch_client::WatchClient;
use weft_api::proto::{
    change, watch_event, Intention, KvPutRequest, UpsertIntentionRequest, WatchRequest,
};
use weft_tests::servers::{grpc_channel, Bearer, Cluster};

use crate::report::Figure;

/// What the benchmark's clients connect with: the servers' CA (PEM) and
/// the management token.
#[derive(Clone)]
struct Creds {
    ca_pem: String,
    token: String,
}

impl Creds {
    fn of(cluster: &Cluster) -> Self {
        Creds {
            ca_pem: cluster.tls_ca.cert_pem.clone(),
            token: cluster.token.clone(),
        }
    }
}

async fn channel(creds: &Creds, addr: &str) -> anyhow::Result<InterceptedService<Channel, Bearer>> {
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
async fn failover(cluster: &mut Cluster, round: usize) -> anyhow::Result<f64> {
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

/// Opens `n` watch streams spread over the servers, then writes intentions
/// and measures, for each, the time until every stream has it (ms).
async fn propagation(cluster: &Cluster, n: usize, writes: usize) -> anyhow::Result<Vec<f64>> {
    let addrs: Vec<String> = (1..=3)
        .map(|id| cluster.grpc_addr(id).to_string())
        .collect();
    let creds = Creds::of(cluster);
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(String, Instant)>();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
    let mut channels = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        // About 100 streams per connection.
        for _ in 0..n.div_ceil(300).max(1) {
            channels.push((i, channel(&creds, addr).await?));
        }
    }
    let mut tasks = Vec::new();
    for s in 0..n {
        let ch = channels[s % channels.len()].1.clone();
        let (seen_tx, ready_tx) = (seen_tx.clone(), ready_tx.clone());
        tasks.push(tokio::spawn(async move {
            let mut stream = WatchClient::new(ch)
                .subscribe(WatchRequest {
                    from_index: 0,
                    include_kv: false,
                })
                .await?
                .into_inner();
            while let Some(event) = stream.message().await? {
                match event.event {
                    // Ready once the snapshot's last part is in.
                    Some(watch_event::Event::Snapshot(s)) if !s.more => {
                        let _ = ready_tx.send(());
                    }
                    Some(watch_event::Event::Snapshot(_)) => {}
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
        }));
    }
    for _ in 0..n {
        ready_rx
            .recv()
            .await
            .context("a watch stream ended early")?;
    }
    let leader = cluster.wait_for_leader(Duration::from_secs(10))?;
    let mut client = IntentionsClient::new(channel(&creds, cluster.grpc_addr(leader)).await?);
    let mut samples = Vec::new();
    for w in 0..writes {
        let source = format!("bench-{n}-{w}");
        let start = Instant::now();
        client
            .upsert(UpsertIntentionRequest {
                intention: Some(Intention {
                    source: source.clone(),
                    destination: "api".into(),
                    action: "allow".into(),
                    ..Default::default()
                }),
            })
            .await?;
        let mut got = 0;
        let mut last = start;
        while got < n {
            let (s, at) = tokio::time::timeout(Duration::from_secs(30), seen_rx.recv())
                .await
                .context("watch streams did not all see the write")?
                .context("watchers ended")?;
            if s == source {
                got += 1;
                last = last.max(at);
            }
        }
        samples.push((last - start).as_secs_f64() * 1000.0);
    }
    for t in tasks {
        t.abort();
    }
    Ok(samples)
}

pub fn run(quick: bool) -> anyhow::Result<Vec<Figure>> {
    let runtime = tokio::runtime::Runtime::new()?;
    let mut cluster = Cluster::start(3, &[])?;
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
        let samples = runtime.block_on(propagation(&cluster, n, rounds))?;
        figures.push(Figure::new(
            format!("intention write visible on all of {n} watch streams"),
            "ms",
            samples,
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
    Ok(figures)
}
