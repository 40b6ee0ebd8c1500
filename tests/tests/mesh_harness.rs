//! The two-node harness itself, without agents: the server answers the CLI
//! inside node A, node A reaches a workload on node B across the veth, nothing
//! routes anywhere else, and dropping the mesh removes its namespaces and
//! processes.
use std::time::Duration;

use weft_tests::mesh::{Mesh, MeshSpec, NodeA, NodeB};
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
