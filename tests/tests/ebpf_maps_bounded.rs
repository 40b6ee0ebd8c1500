//! The eBPF programs' connection records are bounded: each goes when its
//! connection closes, so many short connections leave the maps as they were.
//! (A test binary of its own: its 100,000 connections would otherwise fill
//! the log capture of the other eBPF tests.)
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use weft_agent::ebpf::Redirector;
use weft_tests::cgroup::TestCgroup;
use weft_tests::netns::Netns;
use weft_tests::{require_root, unique_name};

/// 100,000 short redirected connections leave the programs' record maps at
/// their steady size: each record goes when its connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_do_not_outlive_their_connections() -> anyhow::Result<()> {
    const CONNECTIONS: u64 = 100_000;
    require_root();
    let netns = Netns::new(&unique_name("bound"))?;
    let root = TestCgroup::under_root(&unique_name("bound"))?;
    let workload = root.child("web")?;
    let proxy = netns.listen_as_agent("127.0.0.1:0".parse()?)?;
    let proxy_addr = proxy.local_addr()?;

    let mut redirector = Redirector::load(weft_agent::ebpf::Pins::open(
        &weft_agent::ebpf::pins::default_dir(root.path()),
    )?)?;
    redirector.add_workload(workload.id()?, 1)?;
    redirector.add_destination(Ipv4Addr::new(10, 99, 0, 9).into(), None, proxy_addr)?;
    redirector.attach(root.path())?;
    // The test stands in for the agent: it configures and holds the lease.
    redirector.configure(
        weft_agent::ebpf::Egress::Allow,
        weft_agent::config::DEFAULT_SOCKET_MARK,
    )?;
    redirector.renew_lease(Duration::from_secs(600))?;

    // The listener closes every connection at once.
    let acceptor = tokio::spawn(async move {
        let mut accepted = 0u64;
        while accepted < CONNECTIONS {
            match tokio::time::timeout(Duration::from_secs(30), proxy.accept()).await {
                Ok(Ok((stream, _))) => {
                    drop(stream);
                    accepted += 1;
                }
                _ => break,
            }
        }
        accepted
    });
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_weft-probe"));
    cmd.args(["connect-many", "10.99.0.9:80", &CONNECTIONS.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        netns
            .spawn(&mut cmd, Some(workload.path()))?
            .wait_with_output(),
    )
    .await
    .context("100k connections took more than 5 minutes")??;
    assert!(
        out.status.success(),
        "connections failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(acceptor.await?, CONNECTIONS);

    let counters = redirector.counters()?;
    assert_eq!(counters.redirected, CONNECTIONS, "{counters:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while redirector.records_held() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} records left after every connection closed ({counters:?})",
            redirector.records_held()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(redirector.counters()?.closed, CONNECTIONS);
    Ok(())
}

/// A view that wants more destinations than the map holds (a mesh past
/// 65,536 addresses, or a token that may register instances making it so):
/// the agent takes over what fits, says how many it left out, refuses
/// egress meanwhile (a destination left out is not checked), and keeps its
/// lease, so the node's workloads go on reaching the rest. Before, the sync
/// failed, the agent ended its lease, and the programs refused every mesh
/// workload's connection on the node, again after every change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_destinations_map_leaves_out_the_rest_and_keeps_the_lease() -> anyhow::Result<()> {
    use weft_agent::ebpf::Egress;
    use weft_agent::intercept::{Interception, VIEW_DESTINATIONS};
    use weft_api::proto::{self, watch_event::Event};
    const OVER: u32 = 100;
    require_root();
    let root = TestCgroup::under_root(&unique_name("full"))?;
    // Parsed only: nothing reads the data directory, token or CA here.
    let text = format!(
        "node_name = \"n\"\ndatacenter = \"dc1\"\nservers = [\"127.0.0.1:1\"]\n\
         advertise_addr = \"127.0.0.1\"\ndata_dir = \"/nonexistent\"\n\
         ebpf = true\ncgroup_root = {:?}\n",
        root.path().display().to_string()
    );
    let config = weft_agent::config::AgentConfig::parse(&text, "test.toml")?;
    let interception = Interception::start(&config, None)?;

    // One virtual IP per service, as many as the map takes of the view's
    // and OVER more.
    let capacity = VIEW_DESTINATIONS as u32;
    let view_of = |services: u32| {
        let mut view = weft_agent::view::View::default();
        let vips = (0..services)
            .map(|n| proto::ServiceVip {
                service: format!("s{n}"),
                vip: Ipv4Addr::from(u32::from(Ipv4Addr::new(240, 0, 0, 1)) + n).to_string(),
            })
            .collect();
        let snapshot = proto::StateSnapshot {
            vips,
            ..Default::default()
        };
        view.apply(proto::WatchEvent {
            index: 1,
            event: Some(Event::Snapshot(snapshot)),
        })
        .map(|()| view)
    };
    interception.sync(&view_of(capacity + OVER)?)?;
    assert_eq!(interception.destinations_left_out(), OVER as usize);
    interception.renew_lease()?;
    assert_eq!(interception.programs_state()?, (true, Egress::Deny));

    // A successor taking over (an upgrade in place) leaves the hold as it
    // finds it until its own first sync, which keeps it.
    let successor = Interception::start(&config, Some(&interception.workload_ids()))?;
    assert_eq!(successor.programs_state()?, (true, Egress::Deny));
    successor.sync(&view_of(capacity + OVER)?)?;
    assert_eq!(successor.destinations_left_out(), OVER as usize);
    assert_eq!(successor.programs_state()?, (true, Egress::Deny));
    drop(successor);

    // Fewer wanted: the removals make room, nothing is left out, and the
    // configured egress (allow) holds again.
    interception.sync(&view_of(capacity - 1)?)?;
    assert_eq!(interception.destinations_left_out(), 0);
    interception.renew_lease()?;
    assert_eq!(interception.programs_state()?, (true, Egress::Allow));
    interception.end_lease()?;
    assert!(!interception.programs_state()?.0);
    Ok(())
}
