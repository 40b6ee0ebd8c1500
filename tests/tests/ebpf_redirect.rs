//! The eBPF redirect, end to end: the agent's loader attaches connect4 and
//! sockops to a cgroup subtree; a client in a workload cgroup inside a network
//! namespace connects to a destination that is taken over and lands on the
//! agent's listener, which learns the original destination and the client's
//! cgroup; a client outside the workload cgroup reaches the real destination.
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_agent::ebpf::Redirector;
use weft_tests::cgroup::TestCgroup;
use weft_tests::logs::LogCapture;
use weft_tests::netns::Netns;
use weft_tests::{require_root, unique_name};

const REAL_DEST: &str = "10.99.0.1:8080";

/// Starts `weft-probe connect addr hello` in `netns` and `cgroup`.
fn probe(netns: &Netns, cgroup: &TestCgroup, addr: &str) -> anyhow::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_weft-probe"));
    cmd.args(["connect", addr, "hello"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    netns.spawn(&mut cmd, Some(cgroup.path()))
}

/// Accepts one connection on `listener`.
async fn accept_one(listener: &tokio::net::TcpListener) -> anyhow::Result<tokio::net::TcpStream> {
    let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .context("no connection arrived")??;
    Ok(stream)
}

/// Reads the client's text and answers `reply:TEXT`, then closes.
async fn answer(mut stream: tokio::net::TcpStream, reply: &str) -> anyhow::Result<()> {
    let mut got = String::new();
    stream.read_to_string(&mut got).await?;
    stream
        .write_all(format!("{reply}:{got}").as_bytes())
        .await?;
    stream.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect4_redirects_workload_and_records_original_destination() -> anyhow::Result<()> {
    require_root();
    let logs = LogCapture::global();
    let netns = Netns::new(&unique_name("redir"))?;
    netns.ip(&["addr", "add", "10.99.0.1/32", "dev", "lo"])?;
    let root = TestCgroup::under_root(&unique_name("redir"))?;
    let workload = root.child("web")?;
    let outsider = root.child("other")?;

    let proxy = netns.listen_as_agent("127.0.0.1:0".parse()?)?;
    let proxy_addr = proxy.local_addr()?;
    let real = netns.listen(REAL_DEST.parse()?)?;
    // Where the agent's port would be if a process without its mark had
    // taken it.
    let unmarked = netns.listen("127.0.0.1:0".parse()?)?;

    let mut redirector = Redirector::load(weft_agent::ebpf::Pins::open(
        &weft_agent::ebpf::pins::default_dir(root.path()),
    )?)?;
    redirector.add_workload(workload.id()?, 7)?;
    redirector.add_destination(Ipv4Addr::new(10, 99, 0, 1).into(), Some(8080), proxy_addr)?;
    redirector.add_destination(
        Ipv4Addr::new(10, 99, 0, 1).into(),
        Some(8081),
        unmarked.local_addr()?,
    )?;
    redirector.attach(root.path())?;
    // The test stands in for the agent: it configures and holds the lease.
    redirector.configure(
        weft_agent::ebpf::Egress::Allow,
        weft_agent::config::DEFAULT_SOCKET_MARK,
    )?;
    redirector.renew_lease(Duration::from_secs(600))?;

    // A workload's connection lands on the proxy, which learns where it was going.
    let client = probe(&netns, &workload, REAL_DEST)?;
    let accepted = accept_one(&proxy).await?;
    let orig = redirector
        .original_dst(&accepted, accepted.peer_addr()?, accepted.local_addr()?)?
        .context("the accepted connection has no record")?;
    assert_eq!(orig.addr, REAL_DEST.parse::<SocketAddr>()?);
    assert_eq!(orig.cgroup_id, workload.id()?);
    assert_eq!(orig.workload_id, 7);
    answer(accepted, "proxy").await?;
    let out = client.wait_with_output().await?;
    assert!(
        out.status.success(),
        "probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "proxy:hello");

    // An IPv6 socket reaching the same destination through its v4-mapped
    // address (connect6) is taken over the same way.
    let client = probe(&netns, &workload, "[::ffff:10.99.0.1]:8080")?;
    let accepted = accept_one(&proxy).await?;
    let orig = redirector
        .original_dst(&accepted, accepted.peer_addr()?, accepted.local_addr()?)?
        .context("the v4-mapped connection has no record")?;
    assert_eq!(orig.addr, REAL_DEST.parse::<SocketAddr>()?);
    assert_eq!(orig.cgroup_id, workload.id()?);
    answer(accepted, "proxy6").await?;
    let out = client.wait_with_output().await?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "proxy6:hello");

    // A process in a cgroup that is not a mesh workload is left alone.
    let client = probe(&netns, &outsider, REAL_DEST)?;
    let direct = accept_one(&real).await?;
    assert_eq!(
        redirector.original_dst(&direct, direct.peer_addr()?, direct.local_addr()?)?,
        None,
        "a direct connection must have no redirect record"
    );
    answer(direct, "real").await?;
    let out = client.wait_with_output().await?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "real:hello");

    // A taken-over destination whose redirect target's listener lacks the
    // agent's mark: the connect is refused, and that listener gets nothing.
    let out = probe(&netns, &workload, "10.99.0.1:8081")?
        .wait_with_output()
        .await?;
    assert!(
        !out.status.success(),
        "a connection was redirected to an unmarked listener: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), unmarked.accept())
            .await
            .is_err(),
        "the unmarked listener accepted a connection"
    );

    let counters = redirector.counters()?;
    assert_eq!(counters.no_agent, 1, "{counters:?}");
    assert_eq!(counters.redirected, 2, "{counters:?}");
    assert_eq!(counters.rekeyed, 2, "{counters:?}");

    // Both ends have closed: the record went with the connection.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while redirector.records_held() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connection records left behind: {}",
            redirector.records_held()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(redirector.counters()?.closed, 2);

    // The program's aya-log line reaches the agent's tracing output.
    let wanted = format!("redirect cgroup {} port 8080", workload.id()?);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !logs.contents().contains(&wanted) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no eBPF log line `{wanted}` in the agent's logs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
