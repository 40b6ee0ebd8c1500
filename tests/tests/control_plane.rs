//! The control plane as real processes: weft-server clusters on loopback with
//! their data on disk, driven through the `weft` CLI and the watch API.
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use weft_api::proto::watch_client::WatchClient;
use weft_api::proto::{change, watch_event, WatchRequest};
use weft_tests::servers::Cluster;

/// Keys listed by `weft kv list` on server `id` alone, from its own state.
fn keys_on(cluster: &Cluster, id: u64) -> BTreeSet<String> {
    let out = cluster.cli_at(
        cluster.grpc_addr(id),
        &["--stale", "--format", "json", "kv", "list"],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["key"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until server `id` holds every key in `want`.
fn wait_for_keys(
    cluster: &Cluster,
    id: u64,
    want: &BTreeSet<String>,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let have = keys_on(cluster, id);
        if want.is_subset(&have) {
            return Ok(());
        }
        if Instant::now() > deadline {
            let missing: Vec<_> = want.difference(&have).take(5).collect();
            bail!(
                "server {id} is missing {} keys, e.g. {missing:?}",
                want.len() - want.intersection(&have).count()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Writes `key` through the CLI, retrying while the cluster has no leader.
fn put_retrying(cluster: &Cluster, key: &str, limit: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        match cluster.cli(&["kv", "put", key, "v"]) {
            Ok(_) => return Ok(start.elapsed()),
            Err(e) if start.elapsed() < limit => {
                eprintln!("retrying {key}: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    }
}

#[test]
fn three_servers_survive_a_leader_kill_and_lose_no_acknowledged_write() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, &[])?;
    let mut acked = BTreeSet::new();
    for i in 0..10 {
        let key = format!("before/{i}");
        cluster.cli(&["kv", "put", &key, "v"])?;
        acked.insert(key);
    }

    let leader = cluster.wait_for_leader(Duration::from_secs(10))?;
    cluster.kill(leader);
    let took = put_retrying(&cluster, "after/0", Duration::from_secs(20))?;
    eprintln!("first write after killing leader {leader} succeeded after {took:?}");
    acked.insert("after/0".into());
    let new_leader = cluster.wait_for_leader(Duration::from_secs(10))?;
    assert_ne!(new_leader, leader, "the killed server cannot lead");
    for i in 1..10 {
        let key = format!("after/{i}");
        cluster.cli(&["kv", "put", &key, "v"])?;
        acked.insert(key);
    }

    cluster.start_server(leader)?;
    for id in 1..=3 {
        wait_for_keys(&cluster, id, &acked, Duration::from_secs(30))
            .with_context(|| format!("server {id}:\n{}", cluster.log(id)))?;
    }
    // The restarted server is a member again, with the same log.
    let members = cluster.cli(&["members"])?;
    assert_eq!(
        members
            .lines()
            .filter(|l| l.contains("leader") || l.contains("follower"))
            .count(),
        3,
        "{members}"
    );
    Ok(())
}

#[test]
fn a_wiped_server_catches_up_through_a_snapshot() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(
        3,
        &["--snapshot-threshold", "10", "--raft-trailing-logs", "5"],
    )?;
    let mut acked = BTreeSet::new();
    for i in 0..40 {
        let key = format!("k/{i}");
        cluster.cli(&["kv", "put", &key, "v"])?;
        acked.insert(key);
    }
    let leader = cluster.wait_for_leader(Duration::from_secs(10))?;
    let victim = (1..=3).find(|id| *id != leader).expect("a follower");
    cluster.kill(victim);
    cluster.wipe(victim)?;
    for i in 40..50 {
        let key = format!("k/{i}");
        cluster.cli(&["kv", "put", &key, "v"])?;
        acked.insert(key);
    }
    cluster.start_server(victim)?;
    wait_for_keys(&cluster, victim, &acked, Duration::from_secs(30))
        .with_context(|| cluster.log(victim))?;
    assert!(
        cluster.log(victim).contains("snapshot installed"),
        "the wiped server should have caught up through a snapshot:\n{}",
        cluster.log(victim)
    );
    Ok(())
}

/// What a watcher has seen: keys, and the index of every event in order.
#[derive(Default)]
struct Seen {
    keys: BTreeSet<String>,
    indexes: Vec<u64>,
}

/// Follows the watch stream of the servers at `addrs` (the first one first),
/// moving to the next one when a stream breaks and resuming from the last
/// index seen, until `want` keys have been seen or `limit` passes.
async fn watch_until(
    addrs: Vec<String>,
    (ca_pem, token): (String, String),
    want: usize,
    limit: Duration,
) -> anyhow::Result<(Seen, usize)> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut seen = Seen::default();
    let mut last = 0u64;
    let mut reconnects = 0;
    for addr in addrs.iter().cycle() {
        if tokio::time::Instant::now() > deadline {
            bail!("saw {} of {want} keys before the deadline", seen.keys.len());
        }
        let Ok(channel) = weft_tests::servers::grpc_channel(addr, &ca_pem, Some(&token)).await
        else {
            continue;
        };
        let mut client = WatchClient::new(channel);
        let Ok(stream) = client
            .subscribe(WatchRequest {
                from_index: last,
                include_kv: true,
            })
            .await
        else {
            continue;
        };
        let mut stream = stream.into_inner();
        loop {
            let next = tokio::time::timeout_at(deadline, stream.message()).await;
            let event = match next {
                Ok(Ok(Some(event))) => event,
                Ok(_) => break, // stream broke: the server went away
                Err(_) => bail!("saw {} of {want} keys before the deadline", seen.keys.len()),
            };
            assert!(
                event.index >= last,
                "event {} after {last}: out of order",
                event.index
            );
            last = event.index;
            seen.indexes.push(event.index);
            match event.event {
                Some(watch_event::Event::Snapshot(s)) => {
                    seen.keys.extend(s.kv.into_iter().map(|e| e.key))
                }
                Some(watch_event::Event::Changes(c)) => {
                    for ch in c.changes {
                        if let Some(change::Change::KvUpsert(e)) = ch.change {
                            assert!(seen.keys.insert(e.key.clone()), "{} delivered twice", e.key);
                        }
                    }
                }
                None => {}
            }
            if seen.keys.len() >= want {
                return Ok((seen, reconnects));
            }
        }
        reconnects += 1;
    }
    unreachable!("cycle never ends")
}

#[test]
fn a_watcher_sees_every_change_in_order_and_resumes_after_its_server_dies() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, &[])?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10))?;
    let watched = (1..=3).find(|id| *id != leader).expect("a follower");
    let mut addrs = vec![cluster.grpc_addr(watched).to_string()];
    addrs.extend(
        (1..=3)
            .filter(|id| *id != watched)
            .map(|id| cluster.grpc_addr(id).to_string()),
    );

    let runtime = tokio::runtime::Runtime::new()?;
    let credentials = (cluster.tls_ca.cert_pem.clone(), cluster.token.clone());
    let watcher = runtime.spawn(watch_until(addrs, credentials, 30, Duration::from_secs(60)));
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..30 {
        if i == 15 {
            cluster.kill(watched);
        }
        put_retrying(&cluster, &format!("w/{i:02}"), Duration::from_secs(20))?;
    }
    let (seen, reconnects) = runtime.block_on(watcher)??;
    assert!(
        reconnects >= 1,
        "the watcher should have moved to another server"
    );
    let expected: BTreeSet<String> = (0..30).map(|i| format!("w/{i:02}")).collect();
    assert_eq!(seen.keys, expected);
    assert!(
        seen.indexes.windows(2).all(|w| w[0] <= w[1]),
        "{:?}",
        seen.indexes
    );
    Ok(())
}

/// Runs the CLI expecting a refusal; returns its one-line error.
fn refused(cluster: &Cluster, args: &[&str]) -> String {
    let out = cluster.cli_at(&cluster.addrs(), args);
    assert!(
        !out.status.success(),
        "weft {} should have been refused",
        args.join(" ")
    );
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "one-line errors: {err}");
    err
}

#[test]
fn bad_input_is_refused_by_name_and_changes_nothing() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &[])?;
    cluster.cli(&["kv", "put", "app/a", "1"])?;
    let dir = tempfile::tempdir()?;
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("writing a test file");
        path.display().to_string()
    };

    let e = refused(&cluster, &["kv", "put", "/app/b", "x"]);
    assert!(e.contains("must not start with '/'"), "{e}");
    let e = refused(&cluster, &["kv", "put", "app/a", "2", "--cas", "999"]);
    assert!(e.contains("check-and-set failed"), "{e}");
    // 600 KiB through stdin (`-`): more than the 512 KiB a value may hold.
    let mut put = std::process::Command::new(weft_tests::servers::bin("weft"))
        .args([
            &format!("--addr={}", cluster.addrs()),
            &format!("--ca-file={}", cluster.ca_file.display()),
            "kv",
            "put",
            "app/big",
            "-",
        ])
        .env("WEFT_TOKEN", &cluster.token)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(
        &mut put.stdin.take().context("stdin")?,
        &vec![b'x'; 600 * 1024],
    )?;
    let out = put.wait_with_output()?;
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("limit"), "{e}");
    let e = refused(&cluster, &["intention", "create", "Web!", "api", "--allow"]);
    assert!(e.contains("bad character 'W'"), "{e}");
    let e = refused(
        &cluster,
        &["intention", "create", &"a".repeat(64), "api", "--allow"],
    );
    assert!(e.to_lowercase().contains("long"), "{e}");

    // A splitter needs an HTTP service; then its weights must sum to 100.
    let split = file(
        "split.toml",
        "Kind = \"service-splitter\"\nName = \"api\"\n[[Splits]]\nWeight = 90\n[[Splits]]\nWeight = 20\nService = \"api-v2\"\n",
    );
    let e = refused(&cluster, &["config", "write", &split]);
    assert!(e.contains("protocol is tcp"), "{e}");
    let defaults = file(
        "defaults.toml",
        "Kind = \"service-defaults\"\nName = \"api\"\nProtocol = \"http\"\n",
    );
    cluster.cli(&["config", "write", &defaults])?;
    cluster
        .cli(&["config", "write", &defaults.replace(".toml", "")])
        .err()
        .context("a missing file is an error")?;
    let v2 = file(
        "v2.toml",
        "Kind = \"service-defaults\"\nName = \"api-v2\"\nProtocol = \"http\"\n",
    );
    cluster.cli(&["config", "write", &v2])?;
    let e = refused(&cluster, &["config", "write", &split]);
    assert!(e.contains("Splits") && e.contains("100"), "{e}");
    let unknown = file("unknown.toml", "Kind = \"service-mesh\"\nName = \"api\"\n");
    let e = refused(&cluster, &["config", "write", &unknown]);
    assert!(e.contains("service-mesh"), "{e}");
    let broken = file(
        "broken.toml",
        "Kind = \"service-defaults\"\nName = \"api\nProtocol = 1\n",
    );
    let e = refused(&cluster, &["config", "write", &broken]);
    assert!(e.contains("line"), "{e}");
    let garbage = file("state.json", "{\"nodes\": 7}");
    let e = refused(&cluster, &["snapshot", "restore", &garbage]);
    assert!(e.contains("snapshot"), "{e}");

    // Nothing of the above was applied.
    let kv: serde_json::Value =
        serde_json::from_str(&cluster.cli(&["--format", "json", "kv", "list", "app/"])?)?;
    assert_eq!(kv.as_array().map(Vec::len), Some(1), "{kv}");
    assert_eq!(kv[0]["value"], "1");
    assert_eq!(
        cluster
            .cli(&["intention", "list", "--format", "json"])?
            .trim(),
        "[]"
    );
    let entries: serde_json::Value =
        serde_json::from_str(&cluster.cli(&["config", "list", "--format", "json"])?)?;
    assert_eq!(
        entries.as_array().map(Vec::len),
        Some(2),
        "only the two service-defaults: {entries}"
    );
    Ok(())
}

#[test]
fn a_saved_snapshot_restores_the_state() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &[])?;
    cluster.cli(&["kv", "put", "keep", "me"])?;
    cluster.cli(&["intention", "create", "web", "api", "--deny"])?;
    let dir = tempfile::tempdir()?;
    let saved = dir.path().join("state.json").display().to_string();
    cluster.cli(&["snapshot", "save", &saved])?;

    cluster.cli(&["kv", "delete", "keep"])?;
    cluster.cli(&["kv", "put", "later", "x"])?;
    cluster.cli(&["intention", "delete", "web", "api"])?;
    cluster.cli(&["snapshot", "restore", &saved])?;

    assert_eq!(cluster.cli(&["kv", "get", "keep"])?.trim(), "me");
    let later = cluster.cli_at(&cluster.addrs(), &["kv", "get", "later"]);
    assert!(
        !later.status.success(),
        "a key written after the save is gone"
    );
    let check = cluster.cli_at(&cluster.addrs(), &["intention", "check", "web", "api"]);
    assert_eq!(check.status.code(), Some(1), "the saved deny is back");
    Ok(())
}

/// Consul's HCL examples (tests/fixtures/consul/) written with `weft config
/// write`, as a team moving from Consul would, and read back.
#[test]
fn consuls_hcl_config_entries_are_written_as_they_are() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &[])?;
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/consul");
    for file in [
        "service-defaults.hcl",
        "service-resolver.hcl",
        "service-splitter.hcl",
        "service-intentions.hcl",
    ] {
        cluster.cli(&["config", "write", &format!("{fixtures}/{file}")])?;
    }
    // service-intentions: the destination's intentions, one per source.
    let intentions: serde_json::Value = serde_json::from_str(&cluster.cli(&[
        "--format",
        "json",
        "config",
        "read",
        "service-intentions",
        "web",
    ])?)?;
    let sources: Vec<&str> = intentions["entry"]["Sources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["Name"].as_str())
        .collect();
    assert_eq!(
        sources,
        ["admin-dashboard", "frontend", "*"],
        "{intentions}"
    );
    let frontend = &intentions["entry"]["Sources"][1]["Permissions"];
    assert_eq!(frontend[0]["HTTP"]["PathPrefix"], "/api", "{intentions}");
    let split: serde_json::Value = serde_json::from_str(&cluster.cli(&[
        "--format",
        "json",
        "config",
        "read",
        "service-splitter",
        "web",
    ])?)?;
    let splits = &split["entry"]["Splits"];
    assert_eq!(splits[0]["Weight"], 90.0, "{split}");
    assert_eq!(splits[1]["ServiceSubset"], "v2", "{split}");
    // The ring hash example (once refused as not supported) is taken.
    cluster.cli(&[
        "config",
        "write",
        &format!("{fixtures}/service-resolver-load-balancer.hcl"),
    ])?;
    let resolver: serde_json::Value = serde_json::from_str(&cluster.cli(&[
        "--format",
        "json",
        "config",
        "read",
        "service-resolver",
        "web",
    ])?)?;
    let lb = &resolver["entry"]["LoadBalancer"];
    assert_eq!(lb["Policy"], "ring_hash", "{resolver}");
    assert_eq!(lb["RingHashConfig"]["MinimumRingSize"], 1024, "{resolver}");
    Ok(())
}

/// KV values are bytes: what `--base64` puts, `get` gives back unchanged
/// (and in base64 on request, and in JSON without a lossy copy).
#[test]
fn kv_values_are_bytes_in_the_cli() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &[])?;
    // 00 ff 00 0a: not UTF-8.
    cluster.cli(&["kv", "put", "bin", "AP8ACg==", "--base64"])?;
    let raw = cluster.cli_at(&cluster.addrs(), &["kv", "get", "bin"]);
    assert!(
        raw.status.success(),
        "{}",
        String::from_utf8_lossy(&raw.stderr)
    );
    assert_eq!(
        raw.stdout,
        [0x00, 0xff, 0x00, 0x0a, b'\n'],
        "the bytes, then a newline"
    );
    assert_eq!(
        cluster.cli(&["kv", "get", "bin", "--base64"])?.trim(),
        "AP8ACg=="
    );
    let json: serde_json::Value =
        serde_json::from_str(&cluster.cli(&["--format", "json", "kv", "get", "bin"])?)?;
    assert_eq!(json["value_base64"], "AP8ACg==", "{json}");
    assert!(json.get("value").is_none(), "no lossy text: {json}");
    let text: serde_json::Value = serde_json::from_str(
        &cluster
            .cli(&["--format", "json", "kv", "put", "t", "hi"])
            .and_then(|_| cluster.cli(&["--format", "json", "kv", "get", "t"]))?,
    )?;
    assert_eq!(text["value"], "hi", "{text}");
    let bad = cluster.cli_at(
        &cluster.addrs(),
        &["kv", "put", "x", "not base64!", "--base64"],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not base64"));
    Ok(())
}

#[test]
fn writes_past_a_limit_are_refused_naming_it() -> anyhow::Result<()> {
    let cluster = Cluster::start(
        1,
        &[
            "--max-kv-keys",
            "3",
            "--max-kv-bytes",
            "100",
            "--max-config-entry-bytes",
            "300",
            "--max-routes-per-router",
            "1",
            "--max-intentions",
            "2",
        ],
    )?;
    cluster.cli(&["intention", "create", "web", "api", "--allow"])?;
    cluster.cli(&["intention", "create", "web", "db", "--deny"])?;
    let err = refused(
        &cluster,
        &["intention", "create", "admin", "api", "--allow"],
    );
    assert!(err.contains("--max-intentions"), "{err}");
    // Changing one that is there is not a new one.
    cluster.cli(&["intention", "create", "web", "api", "--deny"])?;
    for key in ["a", "b", "c"] {
        cluster.cli(&["kv", "put", key, "x"])?;
    }
    let err = refused(&cluster, &["kv", "put", "d", "x"]);
    assert!(err.contains("--max-kv-keys"), "{err}");
    // Overwriting is not a new key; but the bytes are bounded too.
    cluster.cli(&["kv", "put", "a", &"y".repeat(90)])?;
    let err = refused(&cluster, &["kv", "put", "b", &"z".repeat(20)]);
    assert!(err.contains("--max-kv-bytes"), "{err}");
    assert_eq!(
        cluster.cli(&["kv", "get", "b"])?.trim(),
        "x",
        "a refused write changed nothing"
    );

    let dir = tempfile::tempdir()?;
    let router = |routes: usize| -> anyhow::Result<String> {
        let routes: Vec<String> = (0..routes)
            .map(|i| format!(r#"{{"Match":{{"HTTP":{{"PathPrefix":"/{i}"}}}},"Destination":{{"Service":"api"}}}}"#))
            .collect();
        let path = dir.path().join(format!("router-{}.json", routes.len()));
        std::fs::write(
            &path,
            format!(
                r#"{{"Kind":"service-router","Name":"api","Routes":[{}]}}"#,
                routes.join(",")
            ),
        )?;
        Ok(path.display().to_string())
    };
    let defaults = dir.path().join("defaults.json");
    std::fs::write(
        &defaults,
        r#"{"Kind":"service-defaults","Name":"api","Protocol":"http"}"#,
    )?;
    cluster.cli(&["config", "write", &defaults.display().to_string()])?;
    cluster.cli(&["config", "write", &router(1)?])?;
    let err = refused(&cluster, &["config", "write", &router(2)?]);
    assert!(err.contains("--max-routes-per-router"), "{err}");
    let err = refused(&cluster, &["config", "write", &router(5)?]);
    assert!(err.contains("--max-config-entry-bytes"), "{err}");
    Ok(())
}

/// The first event of a watch stream from `from_index` on server 1, within
/// `limit`: its index.
fn first_event(cluster: &Cluster, from_index: u64, limit: Duration) -> anyhow::Result<u64> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let channel = cluster.channel(1).await?;
        let mut stream = WatchClient::new(channel)
            .subscribe(WatchRequest {
                from_index,
                include_kv: true,
            })
            .await?
            .into_inner();
        let event = tokio::time::timeout(limit, stream.message())
            .await
            .context("no event")??
            .context("stream ended")?;
        Ok(event.index)
    })
}

#[test]
fn a_watcher_resumes_on_a_server_restarted_with_its_data() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(1, &[])?;
    put_retrying(&cluster, "before", Duration::from_secs(10))?;
    let last = first_event(&cluster, 0, Duration::from_secs(5))?;
    cluster.kill(1);
    cluster.start_server(1)?;
    // Resuming from the last index as soon as the server takes it (as
    // agents do): the next write arrives.
    let watcher = {
        let (ca, token, addr) = (
            cluster.tls_ca.cert_pem.clone(),
            cluster.token.clone(),
            cluster.grpc_addr(1).to_string(),
        );
        std::thread::spawn(move || -> anyhow::Result<u64> {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                let mut stream = loop {
                    let Ok(channel) =
                        weft_tests::servers::grpc_channel(&addr, &ca, Some(&token)).await
                    else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    match WatchClient::new(channel)
                        .subscribe(WatchRequest {
                            from_index: last,
                            include_kv: true,
                        })
                        .await
                    {
                        Ok(stream) => break stream.into_inner(),
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                };
                let event = tokio::time::timeout(Duration::from_secs(15), stream.message())
                    .await
                    .context("no event within 15 s of resuming")??
                    .context("stream ended")?;
                Ok(event.index)
            })
        })
    };
    cluster.wait_for_leader(Duration::from_secs(20))?;
    put_retrying(&cluster, "after", Duration::from_secs(10))?;
    let index = watcher.join().expect("watcher thread")?;
    anyhow::ensure!(index > last, "resumed at {last}, got {index}");
    Ok(())
}

/// A member as `weft members` shows it: id, role and term.
type Member = (u64, String, u64);

/// What server `at` says: the leader's id and every member.
fn members_at(cluster: &Cluster, at: u64) -> anyhow::Result<(u64, Vec<Member>)> {
    let out = cluster.cli_at(
        cluster.grpc_addr(at),
        &["--stale", "--format", "json", "members"],
    );
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let members = v["members"]
        .as_array()
        .context("members")?
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().unwrap_or(0),
                m["role"].as_str().unwrap_or("").to_string(),
                m["term"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    Ok((v["leader_id"].as_u64().unwrap_or(0), members))
}

/// Pre-vote: a follower cut off from the others for many election timeouts
/// asks for votes, hears no majority and keeps its term; when it comes
/// back it follows the leader instead of deposing it with a higher term.
#[test]
fn an_isolated_follower_returns_without_deposing_the_leader() -> anyhow::Result<()> {
    let cluster = Cluster::start_linked(3, &[])?;
    let leader = cluster.wait_for_leader(Duration::from_secs(15))?;
    let (_, before) = members_at(&cluster, leader)?;
    let term = before.iter().find(|m| m.0 == leader).context("leader")?.2;
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    // The follower answers with the token only once it holds it (a read
    // barrier otherwise): cut off before, it could never learn it, and
    // would refuse the token it is asked with below.
    members_at(&cluster, follower)?;

    cluster.isolate(follower);
    // Ten election timeouts and more cut off, while the other two go on
    // taking writes that the follower misses.
    let cut_off = Instant::now();
    let mut acked = BTreeSet::new();
    while cut_off.elapsed() < Duration::from_secs(6) {
        let key = format!("while-cut/{}", acked.len());
        let out = cluster.cli_at(cluster.grpc_addr(leader), &["kv", "put", &key, "v"]);
        anyhow::ensure!(
            out.status.success(),
            "the leader should take writes with one follower cut off: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        acked.insert(key);
    }
    let (_, seen_alone) = members_at(&cluster, follower)?;
    let alone = seen_alone
        .iter()
        .find(|m| m.0 == follower)
        .context("self")?;
    assert_eq!(
        alone.2,
        term,
        "the cut-off follower must not raise its term: {seen_alone:?}\n{}",
        cluster.log(follower)
    );

    cluster.rejoin(follower);
    wait_for_keys(&cluster, follower, &acked, Duration::from_secs(30))
        .with_context(|| cluster.log(follower))?;
    let (leader_after, after) = members_at(&cluster, leader)?;
    assert_eq!(
        leader_after, leader,
        "the returning follower deposed the leader: {after:?}"
    );
    for (id, role, t) in &after {
        assert_eq!(
            *t, term,
            "server {id} ({role}) is at term {t}, not {term}: {after:?}"
        );
    }
    eprintln!(
        "cut off for {:?}: {} writes meanwhile, leader {leader} kept term {term}",
        cut_off.elapsed(),
        acked.len()
    );
    Ok(())
}

/// What a `?stale` read from server `id` says of it, by Consul's headers:
/// whether it knows a leader, and its last contact in milliseconds.
fn currency(cluster: &Cluster, id: u64) -> anyhow::Result<(bool, u64)> {
    let reply = cluster.http(
        id,
        "GET",
        "/v1/catalog/nodes?stale",
        Some(&cluster.token),
        None,
    )?;
    anyhow::ensure!(reply.status == 200, "{}: {}", reply.status, reply.body);
    let known = reply
        .header("x-consul-knownleader")
        .context("X-Consul-KnownLeader")?;
    let last = reply
        .header("x-consul-lastcontact")
        .context("X-Consul-LastContact")?;
    Ok((known == "true", last.parse()?))
}

/// A watch stream from server `id` with the management token, past its
/// first event (the snapshot), or the status it was refused with.
async fn subscribed(
    cluster: &Cluster,
    id: u64,
) -> anyhow::Result<Result<tonic::Streaming<weft_api::proto::WatchEvent>, tonic::Status>> {
    let channel = cluster.channel(id).await?;
    let request = WatchRequest {
        from_index: 0,
        include_kv: true,
    };
    let mut stream = match WatchClient::new(channel).subscribe(request).await {
        Ok(stream) => stream.into_inner(),
        Err(status) => return Ok(Err(status)),
    };
    match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
        Ok(Ok(Some(_snapshot))) => Ok(Ok(stream)),
        Ok(Ok(None)) => bail!("server {id}'s stream ended before its snapshot"),
        Ok(Err(status)) => Ok(Err(status)),
        Err(_) => bail!("no snapshot from server {id} within 10 s"),
    }
}

/// How the watch stream `stream` ends within `limit`: the status it ends
/// with. Fails if it goes on, or delivers `key`.
async fn stream_end(
    stream: &mut tonic::Streaming<weft_api::proto::WatchEvent>,
    key: &str,
    limit: Duration,
) -> anyhow::Result<tonic::Status> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => bail!("the stream was still open after {limit:?}"),
            Ok(Ok(None)) => bail!("the stream ended without a status"),
            Ok(Err(status)) => return Ok(status),
            Ok(Ok(Some(event))) => {
                if let Some(watch_event::Event::Changes(c)) = &event.event {
                    let delivered = c.changes.iter().any(|ch| {
                        matches!(&ch.change, Some(change::Change::KvUpsert(e)) if e.key == key)
                    });
                    anyhow::ensure!(!delivered, "a cut-off server delivered {key}");
                }
            }
        }
    }
}

/// A server cut off from the others holds a state that no longer moves,
/// yet its watch streams would stay open and silent: a subscriber would
/// miss every later change (an intention set to deny among them). A cut-off
/// follower, and later a cut-off leader, end their streams with
/// UNAVAILABLE and refuse new ones, so that subscribers move to a server
/// that takes changes; back in contact, they serve again.
#[test]
fn a_cut_off_server_ends_its_watch_streams_and_refuses_new_ones() -> anyhow::Result<()> {
    let cluster = Cluster::start_linked(3, &[])?;
    let leader = cluster.wait_for_leader(Duration::from_secs(15))?;
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    let runtime = tokio::runtime::Runtime::new()?;
    let limit = Duration::from_secs(10);
    // What this test proves happens within `limit`, contact being judged
    // every 0.5 s and lost after 3 s.
    let cut_off = |id: u64, key: &str| -> anyhow::Result<()> {
        // Every server is confirmed within a moment of its leader's election.
        let mut stream = weft_tests::mesh::wait_until(
            Duration::from_secs(10),
            &format!("a watch from server {id}"),
            || Ok(runtime.block_on(subscribed(&cluster, id))?.ok()),
        )?;
        let (known, last) = currency(&cluster, id)?;
        assert!(known && last < 3_000, "in contact: {known}, {last} ms");
        // A caller without a token is refused and told nothing of it.
        let anonymous = cluster.http(id, "GET", "/v1/catalog/nodes?stale", None, None)?;
        assert_eq!(anonymous.status, 403, "{}", anonymous.body);
        assert_eq!(anonymous.header("x-consul-knownleader"), None);
        assert_eq!(anonymous.header("x-consul-lastcontact"), None);
        // Nor on what anyone may read, or with a token the servers do not know.
        for token in [None, Some("not-a-token")] {
            let status = cluster.http(id, "GET", "/v1/status/leader", token, None)?;
            assert_eq!(status.header("x-consul-knownleader"), None, "{token:?}");
            assert_eq!(status.header("x-consul-lastcontact"), None, "{token:?}");
        }
        cluster.isolate(id);
        let started = Instant::now();
        // The majority goes on taking writes the cut-off server never sees
        // (written through one of the majority: a cut-off leader takes
        // writes it cannot commit).
        let other = (1..=3).find(|other| *other != id).expect("another server");
        weft_tests::mesh::wait_until(Duration::from_secs(20), "a write by the majority", || {
            Ok(cluster.cli_on(other, &["kv", "put", key, "v"]).ok())
        })?;
        let status = runtime
            .block_on(stream_end(&mut stream, key, limit))
            .with_context(|| format!("server {id}, cut off:\n{}", cluster.log(id)))?;
        let ended = started.elapsed();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("out of contact"),
            "the status should say why: {status:?}"
        );
        // A new subscription is refused while it is cut off.
        let refused = runtime.block_on(subscribed(&cluster, id))?;
        match refused {
            Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
            Ok(_) => bail!("server {id}, cut off, took a new watch"),
        }
        // A `?stale` read is answered, saying how stale (Consul's headers).
        let (known, last) = currency(&cluster, id)?;
        assert!(!known && last >= 3_000, "cut off: {known}, {last} ms");
        eprintln!("server {id} cut off: its watch stream ended after {ended:?}");
        cluster.rejoin(id);
        // Back in contact, it serves the writes it missed.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if runtime.block_on(subscribed(&cluster, id))?.is_ok() {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "server {id} refused watches 30 s after it rejoined:\n{}",
                cluster.log(id)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        wait_for_keys(
            &cluster,
            id,
            &BTreeSet::from([key.to_string()]),
            Duration::from_secs(30),
        )
    };
    cut_off(follower, "while-follower-cut")?;
    let leader = cluster.wait_for_leader(Duration::from_secs(15))?;
    cut_off(leader, "while-leader-cut")?;
    Ok(())
}

/// An agent whose server is cut off from the cluster moves to another: an
/// intention denying a pair, made by the majority meanwhile, reaches the
/// agent's view, and its node stays passing. (Before, the cut-off server
/// kept the watch stream open and silent, so the agent kept allowing the
/// pair; and a cut-off leader took the agent's heartbeats, so the leader
/// the others elected never heard them and marked the node critical.)
#[test]
fn an_agent_follows_the_cluster_when_its_server_is_cut_off() -> anyhow::Result<()> {
    // Above what a cut-off leader takes to refuse heartbeats (3 s without
    // a quorum) and the agent to send its next one elsewhere.
    let node_timeout = Duration::from_secs(6);
    let timeout_arg = format!("--node-timeout={}s", node_timeout.as_secs());
    let cluster = Cluster::start_linked(3, &[&timeout_arg])?;
    cluster.wait_for_leader(Duration::from_secs(15))?;
    let agent = cluster.start_agent("node-1")?;
    let watched = weft_tests::mesh::wait_until(
        Duration::from_secs(10),
        "the server serving the agent's watch",
        || {
            let mut serving = Vec::new();
            for id in 1..=3 {
                if cluster.metric(id, "weft_server_watch_streams")? >= 1.0 {
                    serving.push(id);
                }
            }
            Ok((serving.len() == 1).then(|| serving[0]))
        },
    )?;
    cluster.isolate(watched);
    let cut = Instant::now();
    let other = (1..=3).find(|id| *id != watched).expect("another server");
    weft_tests::mesh::wait_until(Duration::from_secs(20), "a write by the majority", || {
        Ok(cluster
            .cli_on(other, &["intention", "create", "web", "db", "--deny"])
            .ok())
    })?;
    weft_tests::mesh::wait_until(
        Duration::from_secs(20),
        "the agent's view has the intention made while its server was cut off",
        || {
            let dump = agent.config_dump()?;
            let seen = dump["view"]["intentions"].as_array().is_some_and(|all| {
                all.iter().any(|i| {
                    i["Source"] == "web" && i["Destination"] == "db" && i["Action"] == "deny"
                })
            });
            Ok(seen.then_some(()))
        },
    )
    .with_context(|| format!("agent log:\n{}", agent.log()))?;
    eprintln!(
        "server {watched} cut off: the agent had the new intention {:?} later",
        cut.elapsed()
    );
    // The servers judge silence after a node timeout (a new leader gives
    // every node one, from its election): over two from the cut, the
    // majority hears the agent.
    while cut.elapsed() < 2 * node_timeout {
        let health = node_health(&cluster, other, "node-1")?;
        anyhow::ensure!(
            health == "passing",
            "node-1 went {health} {:?} after its server was cut off:\n{}",
            cut.elapsed(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    cluster.rejoin(watched);
    Ok(())
}

/// Node `node`'s health as server `at` has it.
fn node_health(cluster: &Cluster, at: u64, node: &str) -> anyhow::Result<String> {
    let out = cluster.cli_on(at, &["--format", "json", "catalog", "nodes"])?;
    let nodes: serde_json::Value = serde_json::from_str(&out)?;
    let found = nodes
        .as_array()
        .and_then(|all| all.iter().find(|n| n["name"] == node))
        .with_context(|| format!("{node} in the catalog"))?;
    Ok(found["health"].as_str().unwrap_or_default().to_string())
}

/// Five servers split two against three, the leader and a follower on the
/// small side: the follower still hears its leader, whom the majority
/// replaces. Its watch stream ends all the same: contact is what a quorum
/// confirms, not whom a server hears.
#[test]
fn a_follower_cut_off_with_its_leader_ends_its_watch_streams() -> anyhow::Result<()> {
    let cluster = Cluster::start_linked(5, &[])?;
    let leader = cluster.wait_for_leader(Duration::from_secs(15))?;
    let follower = (1..=5).find(|id| *id != leader).expect("a follower");
    let runtime = tokio::runtime::Runtime::new()?;
    // Every server is confirmed within a moment of the leader's election.
    let mut stream =
        weft_tests::mesh::wait_until(Duration::from_secs(10), "a watch from the follower", || {
            Ok(runtime.block_on(subscribed(&cluster, follower))?.ok())
        })?;
    cluster.partition(&[leader, follower]);
    let cut = Instant::now();
    let status = runtime
        .block_on(stream_end(&mut stream, "-", Duration::from_secs(10)))
        .with_context(|| format!("server {follower}:\n{}", cluster.log(follower)))?;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    eprintln!(
        "server {follower}, cut off with its leader {leader}: its watch ended after {:?}",
        cut.elapsed()
    );
    for id in [leader, follower] {
        cluster.rejoin(id);
    }
    Ok(())
}

/// A leader whose quorum stops answering for longer than the node timeout
/// takes no heartbeats meanwhile (it cannot commit what they would decide).
/// When its quorum returns and follows it again, it gives every node a full
/// timeout rather than judge the silence it imposed: the agent's node stays
/// passing. (One follower is gone for good, the other stopped and resumed:
/// alone, the resumed one cannot win a pre-vote against a leader that
/// answers, so the leader stays.)
#[test]
fn a_leader_back_in_contact_judges_no_node_by_the_silence_it_imposed() -> anyhow::Result<()> {
    // Room for the agent's next heartbeat once contact is back (it may
    // first dial the stopped follower, 2 s).
    let node_timeout = Duration::from_secs(5);
    let timeout_arg = format!("--node-timeout={}s", node_timeout.as_secs());
    let mut cluster = Cluster::start(3, &[&timeout_arg])?;
    let leader = cluster.wait_for_leader(Duration::from_secs(15))?;
    let agent = cluster.start_agent("node-1")?;
    weft_tests::mesh::wait_until(Duration::from_secs(10), "node-1 passing", || {
        Ok((node_health(&cluster, leader, "node-1")? == "passing").then_some(()))
    })?;
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    cluster.kill(followers[0]);
    let pid = cluster.pid(followers[1]).context("a follower's pid")?;
    let signal = |sig| {
        // SAFETY: kill(2) on a child process of this test.
        anyhow::ensure!(unsafe { libc::kill(pid as i32, sig) } == 0, "kill {pid}");
        Ok::<_, anyhow::Error>(())
    };
    signal(libc::SIGSTOP)?;
    let stopped = Instant::now();
    let result = weft_tests::mesh::wait_until(
        2 * node_timeout + Duration::from_secs(5),
        "the leader out of contact for two node timeouts",
        || {
            let out = cluster.metric(leader, "weft_server_in_contact")?;
            Ok((out == 0.0 && stopped.elapsed() > 2 * node_timeout).then_some(()))
        },
    );
    signal(libc::SIGCONT)?;
    result?;
    weft_tests::mesh::wait_until(
        Duration::from_secs(15),
        "the leader in contact again",
        || Ok((cluster.metric(leader, "weft_server_in_contact")? == 1.0).then_some(())),
    )?;
    anyhow::ensure!(
        cluster.leader() == Some(leader),
        "another leader was elected; this test needs the same one"
    );
    let back = Instant::now();
    while back.elapsed() < 2 * node_timeout {
        let health = node_health(&cluster, leader, "node-1")?;
        anyhow::ensure!(
            health == "passing",
            "node-1 went {health} {:?} after the leader's contact returned:\n{}",
            back.elapsed(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

/// One token (not a management one) holds at most 16 watch streams open on
/// a server: each costs a snapshot of what the token may read, held while
/// its client does not read. The 17th is refused; a stream whose client
/// goes gives its place back; the management token is not limited.
#[test]
fn a_token_holds_a_bounded_number_of_watch_streams() -> anyhow::Result<()> {
    const LIMIT: usize = 16;
    let cluster = Cluster::start(1, &[])?;
    let rules = r#"service_prefix "" { policy = "read" }"#;
    cluster.cli(&[
        "acl", "policy", "create", "--name", "reader", "--rules", rules,
    ])?;
    let out = cluster.cli(&[
        "--format", "json", "acl", "token", "create", "--policy", "reader",
    ])?;
    let token: serde_json::Value = serde_json::from_str(&out)?;
    let token = token["secret_id"]
        .as_str()
        .context("secret_id")?
        .to_string();
    let request = || WatchRequest {
        from_index: 0,
        include_kv: false,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let channel = cluster.channel_as(1, Some(&token)).await?;
        let mut open = Vec::new();
        for _ in 0..LIMIT {
            open.push(
                WatchClient::new(channel.clone())
                    .subscribe(request())
                    .await?,
            );
        }
        let refused = WatchClient::new(channel.clone())
            .subscribe(request())
            .await
            .err()
            .context("a 17th watch stream of one token was opened")?;
        anyhow::ensure!(
            refused.code() == tonic::Code::ResourceExhausted,
            "{refused:?}"
        );
        drop(open.pop());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match WatchClient::new(channel.clone()).subscribe(request()).await {
                Ok(stream) => break open.push(stream),
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => bail!("a closed stream's place did not come back: {e:?}"),
            }
        }
        let management = cluster.channel(1).await?;
        let mut operator = Vec::new();
        for _ in 0..=LIMIT {
            operator.push(
                WatchClient::new(management.clone())
                    .subscribe(request())
                    .await?,
            );
        }
        Ok(())
    })
}

/// A call with a made-up token is refused from its headers, before its
/// message is read: the message announced here (4 MiB) never comes, and
/// the refusal comes all the same. (tonic reads a whole message before a
/// handler runs: anyone could otherwise make a server hold 4 MiB per
/// stream without any credential.)
#[test]
fn a_made_up_token_is_refused_before_its_message_is_read() -> anyhow::Result<()> {
    use tower::{Service, ServiceExt};
    let cluster = Cluster::start(1, &[])?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let mut channel = cluster.channel_as(1, None).await?;
        // A gRPC message prefix announcing 4 MiB - 1 bytes, and nothing more.
        let (tx, rx) = tokio::sync::mpsc::channel::<
            Result<hyper::body::Frame<bytes::Bytes>, tonic::Status>,
        >(1);
        tx.send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(&[
            0, 0, 0x3f, 0xff, 0xff,
        ]))))
        .await?;
        let body = tonic::body::Body::new(http_body_util::StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ));
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("https://{}/weft.v1.Kv/Put", cluster.grpc_addr(1)))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", "Bearer made-up")
            .body(body)?;
        let call = channel.ready().await?.call(request);
        let response = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .context("no answer while the message was still to come")??;
        let status = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .context("no grpc-status in the answer's headers")?;
        anyhow::ensure!(
            status == (tonic::Code::Unauthenticated as i32).to_string(),
            "grpc-status {status}"
        );
        drop(tx);
        Ok(())
    })
}
