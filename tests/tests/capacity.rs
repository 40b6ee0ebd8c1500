//! Capacity: many connections held through the mesh at once. Explicit mode:
//! `web` on node A reaches `api` on node B through its upstream port
//! 127.0.0.1:9191; `api` is `weft-holder`, an echo server that holds every
//! connection until its client closes. The client is this test's own tokio
//! runtime, with sockets made inside node A.
//!
//! The agents' resident memory (VmRSS) is printed at 0 connections, while
//! they are held and after they closed: figures for reading, not asserted.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use weft_tests::echo::{open_echo, sockets_in};
use weft_tests::mesh::{wait_until, Mesh, MeshSpec, NodeA, NodeB, Service, ADMIN, INBOUND_PORT};
use weft_tests::require_root;

/// Connections held at once.
const CONNECTIONS: usize = 10_000;
/// Connections being opened at any moment.
const IN_FLIGHT: usize = 200;
/// New connections probed while the others are held.
const PROBES: usize = 20;
/// The whole opening (or any other phase over all connections) at most.
const PHASE_LIMIT: Duration = Duration::from_secs(45);
/// Open files each process needs at least: the client's sockets in this
/// process, one per connection in agent A and the holder, one per
/// connection in agent B, plus their own few.
const OPEN_FILES: libc::rlim_t = CONNECTIONS as libc::rlim_t + 1024;

/// Raises this process's open-files soft limit to the hard limit, and the
/// hard limit to `min` if it is lower and the process may (the agents and
/// the holder inherit both); the soft limit now.
fn raise_open_files(min: libc::rlim_t) -> anyhow::Result<libc::rlim_t> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    ensure!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0,
        "getrlimit: {}",
        std::io::Error::last_os_error()
    );
    let hard = limit.rlim_max.max(min);
    let raised = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct we pass.
    ensure!(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0,
        "the open-files limit is {} (hard {}) and could not be raised to {hard}: {}; \
         this test needs {min} per process",
        limit.rlim_cur,
        limit.rlim_max,
        std::io::Error::last_os_error()
    );
    Ok(hard)
}

/// A process's resident set (VmRSS), in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// A process's minor page faults so far (`/proc/PID/stat`, field 10).
fn minor_faults(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit_once(") ").context("no ) in stat")?.1;
    after_name
        .split_whitespace()
        .nth(7)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no minflt in /proc/{pid}/stat"))
}

/// A process's soft open-files limit, from /proc/PID/limits.
fn open_files_limit(pid: u32) -> anyhow::Result<String> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no open-files line")?;
    Ok(line.split_whitespace().nth(3).unwrap_or("?").to_string())
}

/// `text` without its terminal color sequences (`ESC [ … m`).
fn without_colors(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_escape = false;
    for c in text.chars() {
        match (in_escape, c) {
            (false, '\x1b') => in_escape = true,
            (false, c) => out.push(c),
            (true, 'm') => in_escape = false,
            (true, _) => {}
        }
    }
    out
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Opens every socket to `addr`, `IN_FLIGHT` at a time, each carrying a
/// byte both ways; all of them, or the first error.
async fn open_all(sockets: Vec<TcpSocket>, addr: SocketAddr) -> anyhow::Result<Vec<TcpStream>> {
    let started = Instant::now();
    let total = sockets.len();
    let mut streams = Vec::with_capacity(total);
    let mut pending = tokio::task::JoinSet::new();
    let mut sockets = sockets.into_iter().enumerate();
    // Each pass starts one connection or collects one: bounded by 2 per socket.
    for _ in 0..2 * total + 1 {
        if streams.len() == total {
            break;
        }
        ensure!(
            started.elapsed() < PHASE_LIMIT,
            "{} of {total} connections open after {PHASE_LIMIT:?}",
            streams.len()
        );
        if pending.len() < IN_FLIGHT {
            if let Some((i, socket)) = sockets.next() {
                pending.spawn(async move {
                    open_echo(socket, addr, i as u8)
                        .await
                        .with_context(|| format!("connection {i}"))
                });
                continue;
            }
        }
        match pending.join_next().await {
            Some(opened) => streams.push(opened??),
            None => bail!("no connection left to wait for"),
        }
    }
    ensure!(
        streams.len() == total,
        "only {} connections opened",
        streams.len()
    );
    Ok(streams)
}

/// One more byte both ways on every held connection: all writes first,
/// then all reads, so the exchanges overlap.
async fn echo_on_all(streams: &mut [TcpStream], byte: u8) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PHASE_LIMIT;
    for (i, s) in streams.iter_mut().enumerate() {
        tokio::time::timeout_at(deadline, s.write_all(&[byte]))
            .await
            .with_context(|| format!("writing to connection {i}: out of time"))?
            .with_context(|| format!("writing to connection {i}"))?;
    }
    for (i, s) in streams.iter_mut().enumerate() {
        let mut back = [0u8; 1];
        tokio::time::timeout_at(deadline, s.read_exact(&mut back))
            .await
            .with_context(|| format!("reading connection {i}: out of time"))?
            .with_context(|| format!("reading connection {i}"))?;
        ensure!(
            back[0] == byte,
            "connection {i}: sent {byte}, got {}",
            back[0]
        );
    }
    Ok(())
}

/// HBONE connections from node A to node B's agent (`ss`), if `ss` runs.
fn hbone_connections(mesh: &Mesh) -> Option<usize> {
    let dst = format!("dst {}:{INBOUND_PORT}", mesh.ip(NodeB));
    let out = mesh
        .run(
            NodeA,
            "ss",
            &["-Htn", "state", "established", &dst],
            Duration::from_secs(10),
        )
        .ok()?;
    out.success()
        .then(|| out.stdout.lines().filter(|l| !l.trim().is_empty()).count())
}

/// Both agents' active connections (web -> api), summed per agent.
fn active(mesh: &Mesh) -> anyhow::Result<(f64, f64)> {
    Ok((
        mesh.metric(NodeA, "weft_agent_connections_active")?,
        mesh.metric(NodeB, "weft_agent_connections_active")?,
    ))
}

#[test]
fn ten_thousand_connections_are_held_and_new_ones_still_answered() -> anyhow::Result<()> {
    require_root();
    let test_started = Instant::now();
    let limit = raise_open_files(OPEN_FILES)?;
    let mut mesh = Mesh::start(
        MeshSpec::new("allow")
            .node_a(Service::new("web", 8000).upstream("api", 9191))
            .node_b(Service::new("api", 8080).address(MeshSpec::NODE_ADDR)),
    )?;
    let b = mesh.ip(NodeB);
    let holder_pid = mesh.holder(NodeB, &format!("{b}:8080"))?;
    let upstream: SocketAddr = "127.0.0.1:9191".parse()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    wait_until(Duration::from_secs(30), "web -> api echoes", || {
        let socket = sockets_in(mesh.netns(NodeA), 1)?
            .pop()
            .context("no socket")?;
        rt.block_on(open_echo(socket, upstream, 7))?;
        Ok(Some(()))
    })
    .map_err(|e| e.context(format!("agent A log:\n{}", mesh.agent_log_tail(NodeA, 20))))?;

    let pids = [
        mesh.agent_pid(NodeA).context("agent A pid")?,
        mesh.agent_pid(NodeB).context("agent B pid")?,
    ];
    eprintln!(
        "open files: this test {limit}, agent A {}, agent B {}, holder {}",
        open_files_limit(pids[0])?,
        open_files_limit(pids[1])?,
        open_files_limit(holder_pid)?
    );
    for node in [NodeA, NodeB] {
        let log = mesh.agent_log(node);
        let line = log
            .lines()
            .find(|l| l.contains("open files limit"))
            .context("the agent did not log its open files limit")?;
        let said = line.find("open files limit").map_or(line, |at| &line[at..]);
        eprintln!("agent {node:?}: {}", without_colors(said));
    }
    let rss_idle = [rss_kib(pids[0])?, rss_kib(pids[1])?];

    // Open and hold them all.
    let sockets = sockets_in(mesh.netns(NodeA), CONNECTIONS)?;
    let faults_idle = [minor_faults(pids[0])?, minor_faults(pids[1])?];
    let opening = Instant::now();
    let mut streams = rt.block_on(open_all(sockets, upstream)).map_err(|e| {
        e.context(format!(
            "agent A log:\n{}\nagent B log:\n{}",
            mesh.agent_log_tail(NodeA, 20),
            mesh.agent_log_tail(NodeB, 20)
        ))
    })?;
    let opened_in = opening.elapsed();
    let faults_opened = [minor_faults(pids[0])?, minor_faults(pids[1])?];
    // All held at once: each carries one more byte both ways.
    let echoing = Instant::now();
    rt.block_on(echo_on_all(&mut streams, 0xa5))?;
    let echoed_in = echoing.elapsed();
    let faults_echoed = [minor_faults(pids[0])?, minor_faults(pids[1])?];
    let (active_a, active_b) = active(&mesh)?;
    ensure!(
        active_a >= CONNECTIONS as f64 && active_b >= CONNECTIONS as f64,
        "agents count {active_a} (A) and {active_b} (B) active connections, not {CONNECTIONS}"
    );
    let tunnels = hbone_connections(&mesh);
    if let Some(n) = tunnels {
        ensure!(
            n >= CONNECTIONS / 1000,
            "{n} HBONE connections carry {CONNECTIONS} tunnels: more than 1,000 streams each"
        );
    }
    let rss_held = [rss_kib(pids[0])?, rss_kib(pids[1])?];
    let holder_rss = rss_kib(holder_pid)?;

    // New connections still get through while the others are held.
    let probe_sockets = sockets_in(mesh.netns(NodeA), PROBES)?;
    let mut probe_times = Vec::with_capacity(PROBES);
    for (i, socket) in probe_sockets.into_iter().enumerate() {
        let t = Instant::now();
        let mut probe = rt
            .block_on(open_echo(socket, upstream, i as u8))
            .with_context(|| format!("probe {i} with {CONNECTIONS} connections held"))?;
        probe_times.push(t.elapsed());
        rt.block_on(probe.shutdown())?;
    }
    probe_times.sort();
    // The held ones still work after the probes.
    rt.block_on(echo_on_all(&mut streams, 0x5a))?;

    // Close them all; the agents must see every one end.
    let trims = |node| mesh.agent_log(node).matches("heap trimmed").count();
    let trims_held = [trims(NodeA), trims(NodeB)];
    let closing = Instant::now();
    drop(streams);
    wait_until(
        Duration::from_secs(30),
        "both agents count no active connection",
        || Ok((active(&mesh)? == (0.0, 0.0)).then_some(())),
    )?;
    let closed_in = closing.elapsed();
    let rss_closed = [rss_kib(pids[0])?, rss_kib(pids[1])?];
    // The freed heap goes back to the kernel at the agents' trims: at least
    // one since closing began (the agents look every 5 s)...
    wait_until(
        Duration::from_secs(15),
        "both agents trim their heap after the connections closed",
        || Ok((trims(NodeA) > trims_held[0] && trims(NodeB) > trims_held[1]).then_some(())),
    )?;
    // ... and, for the figures, one after the last close if more was freed
    // after the one during the closing (none is due otherwise).
    let trims_closed = [trims(NodeA), trims(NodeB)];
    let trimmed_after = wait_until(
        Duration::from_secs(12),
        "a heap trim after every connection closed",
        || Ok((trims(NodeA) > trims_closed[0] && trims(NodeB) > trims_closed[1]).then_some(())),
    );
    if let Err(e) = trimmed_after {
        eprintln!("(figures below without a further trim: {e:#})");
    }
    let rss_after = [rss_kib(pids[0])?, rss_kib(pids[1])?];
    for node in [NodeA, NodeB] {
        let health = mesh.curl(node, &format!("http://{ADMIN}/healthz"))?;
        eprintln!("agent {node:?} /healthz after closing: {}", health.trim());
    }
    let socket = sockets_in(mesh.netns(NodeA), 1)?
        .pop()
        .context("no socket")?;
    rt.block_on(open_echo(socket, upstream, 9))
        .context("a connection after closing them all")?;

    eprintln!(
        "{CONNECTIONS} connections opened in {opened_in:?} ({IN_FLIGHT} at a time), \
         one more byte on each in {echoed_in:?}, all closed in {closed_in:?}; \
         HBONE connections A -> B: {}",
        tunnels.map_or("unknown (no ss)".to_string(), |n| n.to_string())
    );
    eprintln!(
        "new connections while held: min {:?}, median {:?}, max {:?}",
        probe_times[0],
        probe_times[PROBES / 2],
        probe_times[PROBES - 1]
    );
    for (i, node) in ["A", "B"].iter().enumerate() {
        eprintln!(
            "agent {node} VmRSS: {} at 0 connections, {} with {CONNECTIONS} held \
             ({:.1} KiB per connection), {} once closed, {} after the heap trim",
            mib(rss_idle[i]),
            mib(rss_held[i]),
            (rss_held[i].saturating_sub(rss_idle[i])) as f64 / CONNECTIONS as f64,
            mib(rss_closed[i]),
            mib(rss_after[i]),
        );
    }
    for (i, node) in ["A", "B"].iter().enumerate() {
        let per = |from: u64, to: u64| to.saturating_sub(from) as f64 / CONNECTIONS as f64;
        eprintln!(
            "agent {node} minor page faults per connection: {:.2} opening it, {:.2} for one \
             more byte both ways on all held",
            per(faults_idle[i], faults_opened[i]),
            per(faults_opened[i], faults_echoed[i]),
        );
    }
    eprintln!("holder VmRSS with {CONNECTIONS} held: {}", mib(holder_rss));
    eprintln!("whole test: {:?}", test_started.elapsed());
    Ok(())
}
