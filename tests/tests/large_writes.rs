//! Large writes through Raft: a 512 KiB value and a 2 MB config entry (each
//! near the largest allowed) commit and reach every server, and a follower
//! that was down while 100 MB were written catches up, all without a leader
//! change (no election: same leader, same term). Times are printed, not
//! asserted. In a debug build the config entry takes about a second to
//! parse and longer than openraft waits for an append (100 ms) to carry and
//! store: the leader's heartbeats must go on meanwhile.
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use weft_api::proto::config_client::ConfigClient;
use weft_api::proto::kv_client::KvClient;
use weft_api::proto::{KvGetRequest, KvPutRequest, ReadOptions, WriteConfigRequest};
use weft_tests::servers::{grpc_channel, Bearer, Cluster};

const VALUE: usize = 512 * 1024;
/// 200 values of 512 KiB.
const CATCH_UP_VALUES: usize = 200;

async fn channel(
    cluster: &Cluster,
    id: u64,
) -> anyhow::Result<InterceptedService<Channel, Bearer>> {
    grpc_channel(
        cluster.grpc_addr(id),
        &cluster.tls_ca.cert_pem,
        Some(&cluster.token),
    )
    .await
}

/// (leader id, its term) as `weft members` shows them.
fn leader_and_term(cluster: &Cluster) -> anyhow::Result<(u64, u64)> {
    let v: serde_json::Value =
        serde_json::from_str(&cluster.cli(&["--format", "json", "members"])?)?;
    let leader = v["leader_id"].as_u64().context("no leader")?;
    let term = v["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["id"] == leader))
        .and_then(|m| m["term"].as_u64())
        .context("no term")?;
    Ok((leader, term))
}

/// The length of `key`'s value on server `id`, from its own state.
async fn len_on(cluster: &Cluster, id: u64, key: &str) -> Option<usize> {
    let mut kv = KvClient::new(channel(cluster, id).await.ok()?);
    let entry = kv
        .get(KvGetRequest {
            key: key.into(),
            read: Some(ReadOptions {
                stale: true,
                ..Default::default()
            }),
        })
        .await
        .ok()?;
    Some(entry.into_inner().value.len())
}

async fn wait_on_every_server(cluster: &Cluster, key: &str, len: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in 1..=3 {
        while len_on(cluster, id, key).await != Some(len) {
            ensure!(Instant::now() < deadline, "{key} never reached server {id}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

#[test]
fn large_values_and_entries_commit_and_a_far_behind_follower_catches_up() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, &["--max-routes-per-router", "10000"])?;
    cluster.wait_for_leader(Duration::from_secs(20))?;
    let (leader, term) = leader_and_term(&cluster)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    // One value of the largest size.
    let start = Instant::now();
    rt.block_on(async {
        KvClient::new(channel(&cluster, leader).await?)
            .put(KvPutRequest {
                key: "big/one".into(),
                value: vec![b'v'; VALUE],
                cas: None,
                ..Default::default()
            })
            .await?;
        anyhow::Ok(())
    })?;
    let committed = start.elapsed();
    rt.block_on(wait_on_every_server(&cluster, "big/one", VALUE))?;
    eprintln!(
        "512 KiB value: committed in {committed:?}, on every server in {:?}",
        start.elapsed()
    );

    // A 2 MB service-router, under the 2 MiB limit.
    let routes: Vec<String> = (0..9800)
        .map(|i| {
            format!(
                r#"{{"Match":{{"HTTP":{{"PathPrefix":"/route/{i:05}/{}"}}}},"Destination":{{"Service":"api"}}}}"#,
                "p".repeat(130)
            )
        })
        .collect();
    let router = format!(
        r#"{{"Kind":"service-router","Name":"api","Routes":[{}]}}"#,
        routes.join(",")
    );
    ensure!(
        (2_000_000..2 << 20).contains(&router.len()),
        "{} bytes",
        router.len()
    );
    let start = Instant::now();
    rt.block_on(async {
        let mut config = ConfigClient::new(channel(&cluster, leader).await?);
        config
            .write(WriteConfigRequest {
                json: r#"{"Kind":"service-defaults","Name":"api","Protocol":"http"}"#.into(),
            })
            .await?;
        config
            .write(WriteConfigRequest {
                json: router.clone(),
            })
            .await?;
        anyhow::Ok(())
    })?;
    eprintln!(
        "{} byte service-router committed in {:?}",
        router.len(),
        start.elapsed()
    );

    // A follower down while 100 MB are written, then back.
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    cluster.kill(follower);
    let start = Instant::now();
    rt.block_on(async {
        let mut kv = KvClient::new(channel(&cluster, leader).await?);
        for i in 0..CATCH_UP_VALUES {
            kv.put(KvPutRequest {
                key: format!("bulk/{i:03}"),
                value: vec![b'b'; VALUE],
                cas: None,
                ..Default::default()
            })
            .await?;
        }
        anyhow::Ok(())
    })?;
    eprintln!(
        "{} MB written with one follower down in {:?}",
        CATCH_UP_VALUES * VALUE / 1_000_000,
        start.elapsed()
    );
    cluster.start_server(follower)?;
    let start = Instant::now();
    let last = format!("bulk/{:03}", CATCH_UP_VALUES - 1);
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(120);
        while len_on(&cluster, follower, &last).await != Some(VALUE) {
            ensure!(
                Instant::now() < deadline,
                "server {follower} never caught up"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok(())
    })?;
    eprintln!("server {follower} caught up in {:?}", start.elapsed());
    let (leader_after, term_after) = leader_and_term(&cluster)?;
    ensure!(
        (leader_after, term_after) == (leader, term),
        "leader {leader} term {term} became leader {leader_after} term {term_after}: an election\n{}",
        cluster.log_tails()
    );
    Ok(())
}
