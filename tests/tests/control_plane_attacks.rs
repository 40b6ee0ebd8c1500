//! The impersonation chain found against an earlier weft, replayed from a
//! process in node B's namespace that holds no credentials (only the
//! servers' CA certificate, which is public): every step now fails first
//! time. A stolen agent token of node A gets nothing of node B's or of
//! another service's; a mesh leaf certificate cannot join Raft.
use std::time::Duration;

use anyhow::Context;
use weft_tests::mesh::{wait_until, Mesh, MeshSpec, NodeA, NodeB, Service};
use weft_tests::require_root;
use weft_tests::servers::bin;

fn refused(out: weft_tests::mesh::Output, what: &str) -> String {
    assert!(!out.success(), "{what} was allowed: {}", out.stdout);
    out.stderr
}

#[test]
fn an_outsider_cannot_mint_register_or_snapshot_its_way_in() -> anyhow::Result<()> {
    require_root();
    let mesh = Mesh::start(
        MeshSpec::new("deny")
            .node_a(Service::new("web", 8000).upstream("api", 9191))
            .node_b(Service::new("api", 8080).id("api-1")),
    )?;
    let web_token = std::fs::read_to_string(mesh.path("agent-a.token"))?;

    // 1. A leaf for api: no token, a made-up token, web's agent token.
    for (who, token) in [
        ("no token", None),
        (
            "a made-up token",
            Some("9b5a3c1e-0000-4000-8000-000000000000"),
        ),
        ("web's agent token", Some(web_token.trim())),
    ] {
        let e = refused(mesh.weft_as(NodeB, token, &["ca", "leaf", "api"])?, who);
        assert!(
            e.contains("unauthenticated") || e.contains("permission denied"),
            "{who}: {e}"
        );
    }

    // 2. A rogue agent registering api at its own address.
    let rogue = mesh.path("rogue.toml");
    weft_tests::federation::write_private(
        &rogue,
        &format!(
            "node_name = \"rogue\"\ndatacenter = \"dc1\"\nservers = [\"{}\"]\n\
             advertise_addr = \"{}\"\ndata_dir = {:?}\nebpf = false\n\
             inbound_addr = \"0.0.0.0:25008\"\noutbound_addr = \"127.0.0.1:25001\"\n\
             admin_addr = \"127.0.0.1:25020\"\ndns_addr = \"127.0.0.1:25600\"\nhttp_addr = \"127.0.0.1:25500\"\n\
             token = \"9b5a3c1e-0000-4000-8000-000000000000\"\nca_file = {:?}\n\
             [[service]]\nname = \"api\"\nport = 9999\naddress = \"{}\"\n",
            mesh.server_addr(),
            mesh.ip(NodeB),
            mesh.path("rogue-data").display().to_string(),
            mesh.path("ca.pem").display().to_string(),
            mesh.ip(NodeB),
        ),
    )?;
    let mut cmd = std::process::Command::new(bin("weft-agent"));
    cmd.arg("--config").arg(&rogue);
    let _rogue = mesh.spawn(NodeB, &mut cmd, "rogue.log")?;
    wait_until(Duration::from_secs(20), "the rogue agent refused", || {
        Ok(mesh
            .log("rogue.log")
            .contains("ACL token not found")
            .then_some(()))
    })
    .map_err(|e| e.context(mesh.log("rogue.log")))?;
    assert!(!mesh.catalog_nodes()?.contains(&"rogue".to_string()));
    let api = mesh.catalog_instances("api")?;
    assert_eq!(api.len(), 1, "{api:?}");
    assert_eq!(api[0].1, "node-b");

    // 3. The whole state, CA keys included: a snapshot.
    let e = refused(
        mesh.weft_as(
            NodeB,
            Some(web_token.trim()),
            &["snapshot", "save", "/dev/null"],
        )?,
        "a snapshot with web's token",
    );
    assert!(e.contains("management"), "{e}");
    let e = refused(
        mesh.weft_as(NodeB, None, &["snapshot", "save", "/dev/null"])?,
        "a snapshot without a token",
    );
    assert!(e.contains("unauthenticated"), "{e}");

    // 4. Plaintext gets nothing from the gRPC or the Raft port.
    let server_ip = mesh.ip(NodeA);
    for port in [8502, 8300] {
        let url = format!("http://{server_ip}:{port}/weft.v1.Kv/List");
        let out = mesh.run(
            NodeB,
            "curl",
            &[
                "-sS",
                "-m",
                "5",
                "--http2-prior-knowledge",
                "-X",
                "POST",
                &url,
            ],
            Duration::from_secs(10),
        )?;
        assert!(
            !out.success(),
            "plaintext on {port} answered: {}",
            out.stdout
        );
    }

    // 5. Raft without a server certificate: no TLS client certificate, then
    //    web's own mesh leaf (a real certificate, of the mesh CA).
    let term_before = term(&mesh)?;
    let leaf_dir = tempfile::tempdir()?;
    let leaf = mesh.weft_json(&["ca", "leaf", "web"])?;
    let cert = leaf_dir.path().join("web.pem");
    let key = leaf_dir.path().join("web-key.pem");
    std::fs::write(&cert, leaf["cert_pem"].as_str().context("cert_pem")?)?;
    std::fs::write(&key, leaf["key_pem"].as_str().context("key_pem")?)?;
    let resolve = format!("server.dc1.weft:8300:{server_ip}");
    let ca = mesh.path("ca.pem").display().to_string();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let base = [
        "-sS",
        "-m",
        "5",
        "--http2",
        "-X",
        "POST",
        "--cacert",
        &ca,
        "--resolve",
        &resolve,
        "-H",
        "content-type: application/grpc",
        "--data-binary",
        "forged",
    ];
    for extra in [vec![], vec!["--cert", cert.as_str(), "--key", key.as_str()]] {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(extra.iter().copied());
        args.push("https://server.dc1.weft:8300/weft.v1.Raft/AppendEntries");
        let out = mesh.run(NodeB, "curl", &args, Duration::from_secs(10))?;
        assert!(
            !out.success(),
            "a forged AppendEntries got an answer ({extra:?}): {}",
            out.stdout
        );
    }
    assert_eq!(term(&mesh)?, term_before, "the forged appends moved Raft");
    Ok(())
}

fn term(mesh: &Mesh) -> anyhow::Result<u64> {
    let v = mesh.weft_json(&["members"])?;
    v["members"][0]["term"]
        .as_u64()
        .context("members without term")
}
