//! A Jepsen-style check of exactly-once writes: clients increment one KV
//! counter with check-and-set while the leader is killed again and again.
//!
//! Each increment reads the counter (linearizable), then writes value + 1
//! with `cas` = the index it read, under one request id that it keeps for
//! every retry of that write (any server, any failure). A retry of a write
//! that took effect must get its first answer back, never "check-and-set
//! failed" (which a client would take for a lost race while it holds the
//! increment). At the end the counter must equal the increments the
//! clients were told succeeded, and no two successful increments may share
//! the index they were based on. Prints acked, indeterminate and lost.
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;
use weft_api::proto::kv_client::KvClient;
use weft_api::proto::{KvGetRequest, KvPutRequest, ReadOptions};
use weft_tests::servers::{grpc_channel, Bearer, Cluster};

const KEY: &str = "jepsen/counter";
const CLIENTS: usize = 4;
/// Leader kills (each followed by a restart of the killed server).
const KILLS: usize = 8;
/// How long one write may keep retrying before it counts as indeterminate.
const RETRY_LIMIT: Duration = Duration::from_secs(30);
/// The whole run at most.
const RUN_LIMIT: Duration = Duration::from_secs(120);

#[derive(Default)]
struct Tally {
    acked: u64,
    indeterminate: u64,
    /// The index each acked increment was based on.
    bases: Vec<u64>,
}

/// Where clients connect: every server in turn.
#[derive(Clone)]
struct Target {
    addrs: Vec<String>,
    ca_pem: String,
    token: String,
}

impl Target {
    async fn kv(
        &self,
        attempt: usize,
    ) -> anyhow::Result<KvClient<InterceptedService<Channel, Bearer>>> {
        let addr = &self.addrs[attempt % self.addrs.len()];
        Ok(KvClient::new(
            grpc_channel(addr, &self.ca_pem, Some(&self.token)).await?,
        ))
    }
}

/// The counter's value and modify index (0, 0 when absent), linearizably.
async fn read(target: &Target, attempt: &mut usize) -> anyhow::Result<(u64, u64)> {
    let deadline = Instant::now() + RETRY_LIMIT;
    loop {
        *attempt += 1;
        let got = async {
            let mut kv = target.kv(*attempt).await?;
            let mut req = tonic::Request::new(KvGetRequest {
                key: KEY.into(),
                read: Some(ReadOptions::default()),
            });
            req.set_timeout(Duration::from_secs(5));
            Ok::<_, anyhow::Error>(kv.get(req).await)
        }
        .await;
        match got {
            Ok(Ok(entry)) => {
                let e = entry.into_inner();
                let value = std::str::from_utf8(&e.value)?.parse()?;
                return Ok((value, e.modify_index));
            }
            Ok(Err(status)) if status.code() == Code::NotFound => return Ok((0, 0)),
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok(Err(status)) => anyhow::bail!("reading the counter: {status}"),
            Err(e) => return Err(e),
        }
    }
}

/// One write of `value` based on `base`, retried under one request id:
/// Some(true) acked, Some(false) lost the race (CAS refused), None unknown.
async fn write(target: &Target, attempt: &mut usize, value: u64, base: u64) -> Option<bool> {
    let id = uuid::Uuid::new_v4().to_string();
    let deadline = Instant::now() + RETRY_LIMIT;
    while Instant::now() < deadline {
        *attempt += 1;
        let result = async {
            let mut kv = target.kv(*attempt).await?;
            let mut req = tonic::Request::new(KvPutRequest {
                key: KEY.into(),
                value: value.to_string().into_bytes(),
                cas: Some(base),
                ..Default::default()
            });
            req.set_timeout(Duration::from_secs(5));
            req.metadata_mut()
                .insert("x-weft-request-id", id.parse().expect("ascii id"));
            Ok::<_, anyhow::Error>(kv.put(req).await)
        }
        .await;
        match result {
            Ok(Ok(_)) => return Some(true),
            Ok(Err(status)) if status.code() == Code::FailedPrecondition => return Some(false),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    None
}

async fn client(
    target: Target,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
) -> anyhow::Result<()> {
    let mut attempt = rand_start();
    while !stop.load(Ordering::Relaxed) {
        let (value, base) = read(&target, &mut attempt).await?;
        match write(&target, &mut attempt, value + 1, base).await {
            Some(true) => {
                let mut t = tally.lock().expect("tally lock");
                t.acked += 1;
                t.bases.push(base);
            }
            Some(false) => {}
            None => tally.lock().expect("tally lock").indeterminate += 1,
        }
    }
    Ok(())
}

fn rand_start() -> usize {
    (std::process::id() as usize).wrapping_add(Instant::now().elapsed().subsec_nanos() as usize)
}

#[test]
fn cas_increments_across_leader_kills_are_applied_exactly_once() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, &[])?;
    cluster.wait_for_leader(Duration::from_secs(20))?;
    let target = Target {
        addrs: (1..=3)
            .map(|id| cluster.grpc_addr(id).to_string())
            .collect(),
        ca_pem: cluster.tls_ca.cert_pem.clone(),
        token: cluster.token.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| rt.spawn(client(target.clone(), stop.clone(), tally.clone())))
        .collect();

    // Kill the leader, restart it, again: writes in flight at each kill are
    // the ones whose outcome the client cannot know without a retry.
    let started = Instant::now();
    for round in 0..KILLS {
        let acked_before = tally.lock().expect("tally lock").acked;
        let wait = Instant::now() + Duration::from_secs(20);
        while tally.lock().expect("tally lock").acked < acked_before + 5 {
            ensure!(Instant::now() < wait, "no progress before kill {round}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let leader = cluster.wait_for_leader(Duration::from_secs(20))?;
        cluster.kill(leader);
        eprintln!("kill {round}: server {leader} at {:?}", started.elapsed());
        cluster.wait_for_leader(Duration::from_secs(20))?;
        cluster.start_server(leader)?;
        ensure!(started.elapsed() < RUN_LIMIT, "the run took too long");
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        rt.block_on(c).context("client task")??;
    }
    let mut attempt = 0;
    let (value, _) = rt.block_on(read(&target, &mut attempt))?;
    let t = tally.lock().expect("tally lock");
    let lost = t.acked.saturating_sub(value);
    eprintln!(
        "acked {}, indeterminate {}, lost {lost}; counter {value} after {KILLS} leader kills in {:?}",
        t.acked,
        t.indeterminate,
        started.elapsed()
    );
    ensure!(
        t.indeterminate == 0,
        "{} writes never got an answer",
        t.indeterminate
    );
    ensure!(
        value == t.acked,
        "the counter is {value} but {} increments were acknowledged",
        t.acked
    );
    let unique: BTreeSet<u64> = t.bases.iter().copied().collect();
    ensure!(
        unique.len() == t.bases.len(),
        "two acknowledged increments were based on the same index"
    );
    Ok(())
}
