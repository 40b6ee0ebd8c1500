//! The two-node harness itself, without agents: the server answers the CLI
//! inside node A, node A reaches a workload on node B across the veth, nothing
//! routes anywhere else, and dropping the mesh removes its namespaces and
//! processes, also when a signal ends the process.
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use weft_tests::mesh::{wait_until, Mesh, MeshSpec, NodeA, NodeB, Service};
use weft_tests::require_root;

#[test]
fn two_nodes_server_workload_and_cleanup() -> anyhow::Result<()> {
    require_root();
    let mut mesh = Mesh::start(MeshSpec::new("allow").without_agents())?;
    let ns_names = [
        mesh.netns(NodeA).name().to_string(),
        mesh.netns(NodeB).name().to_string(),
    ];

    // The CLI reaches the server from node A.
    let members = mesh.weft_json(&["members"])?;
    assert_eq!(members["leader_id"].as_u64(), Some(1), "{members}");
    assert_eq!(mesh.catalog_nodes()?, Vec::<String>::new());

    // A workload on node B answers node A across the veth.
    let b = mesh.ip(NodeB);
    mesh.workload(NodeB, "api-1", &format!("{b}:8080"))?;
    let body = mesh.curl(NodeA, &format!("http://{b}:8080/"))?;
    assert_eq!(body, "instance api-1\n");
    // Its health check can be made to fail, and to pass again.
    mesh.curl(NodeB, &format!("http://{b}:8080/fail"))?;
    assert!(mesh
        .curl(NodeB, &format!("http://{b}:8080/healthz"))
        .is_err());
    mesh.curl(NodeB, &format!("http://{b}:8080/recover"))?;
    mesh.curl(NodeB, &format!("http://{b}:8080/healthz"))?;

    // No default route: nothing outside 10.77.X.0/24 is reachable.
    let out = mesh.curl_raw(NodeA, &["-sS", "-m", "2", "http://10.1.2.3:80/"])?;
    assert!(!out.success());
    assert!(
        out.stderr.contains("unreachable") || out.stderr.contains("Couldn't connect"),
        "{}",
        out.stderr
    );

    // A capture on node A's veth sees the traffic.
    let capture = mesh.capture(NodeA)?;
    mesh.curl(NodeA, &format!("http://{b}:8080/harness-marker"))?;
    let file = capture.finish()?;
    assert!(
        file.contains(b"harness-marker"),
        "{} bytes, {} packets",
        file.bytes.len(),
        file.count("")?
    );
    assert!(file.count("tcp port 8080")? > 0);

    drop(mesh);
    std::thread::sleep(Duration::from_millis(100));
    for name in ns_names {
        assert!(
            !std::path::Path::new("/run/netns").join(&name).exists(),
            "namespace {name} left behind"
        );
    }
    Ok(())
}

/// Set for the process [`a_signal_removes_what_the_process_made`] starts.
const HOLDER: &str = "WEFT_TEST_HOLD_A_MESH";

/// Not a test of its own: the process that
/// [`a_signal_removes_what_the_process_made`] starts and then signals. It
/// holds a transparent mesh (agents, their eBPF pins, a workload in its
/// cgroup) and a child of its own that nothing else would end (no parent
/// death signal, in no cgroup), and says where all of them are.
#[test]
#[ignore = "run by a_signal_removes_what_the_process_made"]
fn holds_a_mesh_until_signalled() -> anyhow::Result<()> {
    if std::env::var_os(HOLDER).is_none() {
        return Ok(());
    }
    let mut mesh = Mesh::start(
        MeshSpec::new("allow")
            .ebpf()
            .node_a(Service::new("web", 8000).cgroup("web")),
    )?;
    mesh.spawn_as(NodeA, "web", &["sleep", "120"], "sleep.log")?;
    let mut plain = Command::new("sleep").arg("120").spawn()?;
    let root = mesh.cgroup_root(NodeA).context("a transparent mesh")?;
    let pins = weft_agent::ebpf::pins::default_dir(&root);
    wait_until(Duration::from_secs(20), "the agent's pins", || {
        Ok(pins.exists().then_some(()))
    })?;
    let things = [
        format!("/run/netns/{}", mesh.netns(NodeA).name()),
        format!("/run/netns/{}", mesh.netns(NodeB).name()),
        mesh.path("").display().to_string(),
        root.parent()
            .context("the mesh's cgroup")?
            .display()
            .to_string(),
        pins.display().to_string(),
    ];
    let agent = mesh.agent_pid(NodeA).context("agent A runs")?;
    println!("HOLDING {agent} {} {}", plain.id(), things.join(" "));
    std::thread::sleep(Duration::from_secs(120));
    let _ = plain.kill();
    let _ = plain.wait();
    anyhow::bail!("not signalled within 120 s")
}

/// Whether process `pid` runs (a zombie does not).
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// Sends SIGTERM to the holder unless it was reaped, and waits (bounded)
/// for it: a test that stops early leaves no mesh behind either.
struct Holder(std::process::Child);

impl Drop for Holder {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = wait_until(Duration::from_secs(30), "the holder to exit", || {
                Ok(self.0.try_wait()?)
            });
        }
    }
}

/// A test or benchmark ended by a signal (Ctrl-C, SIGTERM) drops nothing:
/// without the leftovers watcher its namespaces, cgroups, eBPF pins and
/// directories (which hold the mesh's tokens and keys) would stay behind,
/// and so would a child process that nothing else ends.
#[test]
fn a_signal_removes_what_the_process_made() -> anyhow::Result<()> {
    require_root();
    let mut holder = Holder(
        Command::new(std::env::current_exe()?)
            .args(["--exact", "holds_a_mesh_until_signalled", "--ignored"])
            .args(["--nocapture", "--test-threads=1"])
            .env(HOLDER, "1")
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let stdout = holder.0.stdout.take().context("holder's stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // The harness prints `test NAME ... ` before the test's output.
            if let Some((_, rest)) = line.split_once("HOLDING ") {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    let held = rx
        .recv_timeout(Duration::from_secs(90))
        .context("the holder did not report its mesh")?;
    let mut words = held.split_whitespace();
    let processes = [
        words.next().context("agent pid")?.to_string(),
        words.next().context("plain child's pid")?.to_string(),
    ];
    let things: Vec<PathBuf> = words.map(PathBuf::from).collect();
    assert_eq!(things.len(), 5, "{held}");
    for thing in &things {
        assert!(thing.exists(), "{} missing while held", thing.display());
    }
    for pid in &processes {
        assert!(alive(pid), "process {pid} not running while held");
    }

    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(holder.0.id() as i32, libc::SIGTERM) };
    let status = wait_until(Duration::from_secs(30), "the holder to exit", || {
        Ok(holder.0.try_wait()?)
    })?;
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status}");
    for thing in &things {
        assert!(!thing.exists(), "{} left behind", thing.display());
    }
    for pid in &processes {
        wait_until(Duration::from_secs(5), "the held processes to end", || {
            Ok((!alive(pid)).then_some(()))
        })?;
    }
    Ok(())
}
