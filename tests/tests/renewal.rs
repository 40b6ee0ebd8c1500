//! Certificate renewals under traffic. The server signs leaves for 10 s
//! (`--leaf-ttl=10s`, the least it accepts), so the agents renew their
//! service and node certificates about every 5 s. Explicit mode: `web` on
//! node A reaches `api` on node B (`weft-holder`, an echo server) through
//! its upstream port 127.0.0.1:9191; the client is this test's tokio
//! runtime, with sockets made inside node A.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use weft_tests::echo::{echo_byte, open_echo, sockets_in};
use weft_tests::mesh::{wait_until, Mesh, MeshSpec, NodeA, NodeB, Service, INBOUND_PORT};
use weft_tests::require_root;

/// Renewals of every certificate to see, after the long-lived connection
/// opened.
const RENEWALS: usize = 3;
/// The renewals must all have happened within this (about 5 s apart).
const RENEWALS_LIMIT: Duration = Duration::from_secs(45);
/// At most this many rounds of probes while waiting for them.
const ROUNDS: usize = 600;
/// Between two rounds of probes.
const PACE: Duration = Duration::from_millis(100);

/// How many certificates each agent has logged as issued, for each of the
/// four identities: web's and node-a's (agent A), api's and node-b's
/// (agent B).
fn issued(mesh: &Mesh) -> [usize; 4] {
    let count = |log: &str, id: &str| {
        log.lines()
            .filter(|l| l.contains("certificate issued") && l.contains(id))
            .count()
    };
    let (a, b) = (mesh.agent_log(NodeA), mesh.agent_log(NodeB));
    [
        count(&a, "/svc/web"),
        count(&a, "/node/node-a"),
        count(&b, "/svc/api"),
        count(&b, "/node/node-b"),
    ]
}

/// The certificate node B's agent presents on :15008 now (PEM), as seen by
/// `openssl s_client` from node A. The handshake itself fails, as the
/// client presents no certificate; the server's comes first.
fn presented_node_certificate(mesh: &Mesh) -> anyhow::Result<String> {
    let connect = format!("{}:{INBOUND_PORT}", mesh.ip(NodeB));
    let out = mesh.run(
        NodeA,
        "openssl",
        &["s_client", "-connect", &connect, "-alpn", "h2", "-tls1_3"],
        Duration::from_secs(10),
    )?;
    let begin = "-----BEGIN CERTIFICATE-----";
    let end = "-----END CERTIFICATE-----";
    let (Some(from), Some(to)) = (out.stdout.find(begin), out.stdout.find(end)) else {
        bail!(
            "openssl s_client showed no certificate:\n{}\n{}",
            out.stdout,
            out.stderr
        );
    };
    Ok(format!("{}\n", &out.stdout[from..to + end.len()]))
}

/// `openssl x509 ARGS` on `pem` (written to a file in the mesh's directory).
fn x509(mesh: &Mesh, pem: &str, args: &[&str]) -> anyhow::Result<weft_tests::mesh::Output> {
    let file = mesh.path("presented.pem");
    std::fs::write(&file, pem)?;
    let path = file.display().to_string();
    let mut all = vec!["x509", "-noout", "-in", path.as_str()];
    all.extend_from_slice(args);
    mesh.run(NodeA, "openssl", &all, Duration::from_secs(10))
}

#[test]
fn traffic_flows_across_three_renewals_of_service_and_node_certificates() -> anyhow::Result<()> {
    require_root();
    let started = Instant::now();
    let mut mesh = Mesh::start(
        MeshSpec::new("allow")
            .node_a(Service::new("web", 8000).upstream("api", 9191))
            .node_b(Service::new("api", 8080).address(MeshSpec::NODE_ADDR))
            .server_arg("--leaf-ttl=10s"),
    )?;
    let b = mesh.ip(NodeB);
    mesh.holder(NodeB, &format!("{b}:8080"))?;
    let upstream: SocketAddr = "127.0.0.1:9191".parse()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let new_connection = |byte: u8| -> anyhow::Result<()> {
        let socket = sockets_in(mesh.netns(NodeA), 1)?
            .pop()
            .context("no socket")?;
        let mut stream = rt.block_on(open_echo(socket, upstream, byte))?;
        rt.block_on(tokio::io::AsyncWriteExt::shutdown(&mut stream))?;
        Ok(())
    };
    wait_until(Duration::from_secs(30), "web -> api echoes", || {
        new_connection(1).map(Some)
    })?;

    // The long-lived connection, and node B's certificate at that time.
    let first_certificate = presented_node_certificate(&mesh)?;
    let socket = sockets_in(mesh.netns(NodeA), 1)?
        .pop()
        .context("no socket")?;
    let mut long_lived = rt.block_on(open_echo(socket, upstream, 2))?;
    let at_open = issued(&mesh);
    ensure!(
        at_open.iter().all(|n| *n >= 1),
        "not every certificate was issued yet: {at_open:?}"
    );
    let wanted = at_open.map(|n| n + RENEWALS);
    eprintln!("certificates issued when the long-lived connection opened: {at_open:?}");

    // Until every certificate was renewed three more times: each round,
    // the long-lived connection carries a byte both ways and a new
    // connection does too.
    let waiting = Instant::now();
    let mut rounds = 0;
    let mut done = false;
    for round in 0..ROUNDS {
        if issued(&mesh).iter().zip(wanted).all(|(n, w)| *n >= w) {
            done = true;
            break;
        }
        ensure!(
            waiting.elapsed() < RENEWALS_LIMIT,
            "after {RENEWALS_LIMIT:?}, issued {:?}, waiting for {wanted:?}",
            issued(&mesh)
        );
        let byte = round as u8;
        rt.block_on(echo_byte(&mut long_lived, byte))
            .with_context(|| format!("the long-lived connection, round {round}"))?;
        new_connection(byte).with_context(|| {
            format!(
                "a new connection in round {round} (issued so far {:?})",
                issued(&mesh)
            )
        })?;
        rounds += 1;
        rt.block_on(async { tokio::time::sleep(PACE).await });
    }
    ensure!(done, "not {RENEWALS} renewals within {ROUNDS} rounds");
    let renewed_in = waiting.elapsed();

    // After the third renewal: the long-lived connection still carries
    // data, new ones still open.
    for byte in [0xa0u8, 0xa1, 0xa2] {
        rt.block_on(echo_byte(&mut long_lived, byte))
            .context("the long-lived connection after the renewals")?;
        new_connection(byte).context("a new connection after the renewals")?;
    }

    // Node B presents a renewed certificate: another one than at the start,
    // valid now, naming node-b; the first one has expired by now.
    let current = presented_node_certificate(&mesh)?;
    ensure!(
        current != first_certificate,
        "node B still presents the certificate of the start"
    );
    let san = x509(&mesh, &current, &["-ext", "subjectAltName"])?;
    ensure!(
        san.stdout.contains("/node/node-b"),
        "the presented certificate does not name node-b: {}",
        san.stdout
    );
    ensure!(
        x509(&mesh, &current, &["-checkend", "0"])?.success(),
        "node B presents an expired certificate"
    );
    ensure!(
        !x509(&mesh, &first_certificate, &["-checkend", "0"])?.success(),
        "the first certificate has not expired yet: the test proved less than it should"
    );
    for node in [NodeA, NodeB] {
        let log = mesh.agent_log(node);
        ensure!(
            !log.contains("expired"),
            "agent {node:?} met an expired certificate:\n{}",
            mesh.agent_log_tail(node, 30)
        );
    }

    // Agent A opens a new TLS connection for new tunnels once web's
    // certificate is renewed; older ones carry the tunnels already on them.
    // Cut them all (`ss -K`; the long-lived connection goes with
    // it): the next connection needs a new handshake, with web's renewed
    // certificate on one side and node-b's on the other.
    let dials = |mesh: &Mesh| {
        mesh.agent_log(NodeA)
            .matches("hbone connection established")
            .count()
    };
    let dials_before = dials(&mesh);
    ensure!(
        dials_before >= 4,
        "agent A opened {dials_before} HBONE connections across three renewals of web's \
         certificate: new tunnels must not ride a connection made with an old one"
    );
    let hbone = format!("dst {}:{INBOUND_PORT}", mesh.ip(NodeB));
    let cut = mesh.run(
        NodeA,
        "ss",
        &["-K", "-Htn", &hbone],
        Duration::from_secs(10),
    )?;
    ensure!(cut.success(), "ss -K: {}", cut.stderr.trim());
    drop(long_lived);
    wait_until(
        Duration::from_secs(10),
        "a new connection over a new HBONE connection",
        || {
            new_connection(0xb0)?;
            Ok((dials(&mesh) > dials_before).then_some(()))
        },
    )?;
    eprintln!(
        "{RENEWALS} renewals of each certificate in {renewed_in:?} ({rounds} rounds of a byte on \
         the long-lived connection and a new connection); issued now {:?}; HBONE connections \
         dialed by agent A: {dials_before} before the cut, {} in all; whole test {:?}",
        issued(&mesh),
        dials(&mesh),
        started.elapsed()
    );
    Ok(())
}
