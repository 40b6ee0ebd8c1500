//! Every server port speaks TLS 1.3 and nothing else: Debian's `sslscan`
//! (installed by `cargo xtask setup`) against the gRPC, HTTP and Raft ports
//! of a running server finds SSLv2 to TLS 1.2 disabled and only TLS 1.3
//! suites accepted; plaintext HTTP gets no answer. The HTTP port serves
//! Consul's status endpoints.
use std::process::Command;

use anyhow::Context;
use weft_tests::servers::Cluster;

fn sslscan(addr: &str) -> anyhow::Result<String> {
    let out = Command::new("sslscan")
        .args(["--no-colour", addr])
        .output()
        .context("running sslscan: is it installed? (`cargo xtask setup` installs it)")?;
    anyhow::ensure!(out.status.success(), "sslscan {addr}: {:?}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn assert_tls13_only(port: &str, scan: &str) {
    for old in ["SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1", "TLSv1.2"] {
        let line = scan
            .lines()
            .find(|l| l.starts_with(old))
            .unwrap_or_else(|| panic!("{port}: sslscan did not test {old}:\n{scan}"));
        assert!(line.contains("disabled"), "{port}: {line}\n{scan}");
    }
    assert!(
        scan.lines()
            .any(|l| l.starts_with("TLSv1.3") && l.contains("enabled")),
        "{port}: TLS 1.3 is not enabled:\n{scan}"
    );
    let suites: Vec<&str> = scan
        .lines()
        .filter(|l| l.starts_with("Accepted") || l.starts_with("Preferred"))
        .collect();
    assert!(!suites.is_empty(), "{port}: no cipher suite found:\n{scan}");
    for s in suites {
        assert!(s.contains("TLSv1.3"), "{port}: {s}");
    }
}

#[test]
fn every_server_port_speaks_tls13_only() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &[])?;
    let server = &cluster.servers[0];
    for (port, addr) in [
        ("gRPC", &server.grpc_addr),
        ("HTTP", &server.http_addr),
        ("Raft", &server.raft_addr),
    ] {
        assert_tls13_only(port, &sslscan(addr)?);
    }
    Ok(())
}

#[test]
fn the_http_port_answers_status_over_tls_only() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &[])?;
    let server = &cluster.servers[0];
    let port = server.http_addr.rsplit(':').next().context("port")?;
    let resolve = format!("server.dc1.weft:{port}:127.0.0.1");
    let curl = |path: &str| {
        Command::new("curl")
            .args(["-sS", "-m", "5", "--cacert"])
            .arg(&cluster.ca_file)
            .args(["--resolve", &resolve])
            .arg(format!("https://server.dc1.weft:{port}{path}"))
            .output()
    };
    let leader = curl("/v1/status/leader")?;
    assert!(leader.status.success(), "{leader:?}");
    let leader: String = serde_json::from_slice(&leader.stdout)?;
    assert_eq!(leader, server.raft_addr);
    let peers: Vec<String> = serde_json::from_slice(&curl("/v1/status/peers")?.stdout)?;
    assert_eq!(peers, vec![server.raft_addr.clone()]);
    // The rest of the API needs a token; an unknown path is not found.
    let other = curl("/v1/kv/anything")?;
    assert!(String::from_utf8_lossy(&other.stdout).contains("no ACL token"));
    let nothing = curl("/v1/nothing")?;
    assert!(String::from_utf8_lossy(&nothing.stdout).contains("not found"));

    let plain = Command::new("curl")
        .args(["-sS", "-m", "5"])
        .arg(format!("http://{}/v1/status/leader", server.http_addr))
        .output()?;
    assert!(
        !plain.status.success(),
        "plaintext HTTP answered: {}",
        String::from_utf8_lossy(&plain.stdout)
    );
    Ok(())
}

/// A TLS connection held open by `openssl s_client` (killed on drop).
struct Held(std::process::Child);

impl Held {
    /// Connects and waits for the handshake to complete.
    fn open(addr: &str, ca: &std::path::Path) -> anyhow::Result<Held> {
        use std::io::BufRead;
        let mut child = Command::new("openssl")
            .args(["s_client", "-brief", "-alpn", "h2", "-connect", addr])
            .args(["-servername", "server.dc1.weft", "-CAfile"])
            .arg(ca)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("CONNECTION ESTABLISHED") {
                    let _ = tx.send(());
                }
            }
        });
        let held = Held(child);
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .context("a held connection's TLS handshake did not complete")?;
        Ok(held)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One client address holds at most `--max-conns-per-client` connections
/// per port: idle sockets from one host cannot starve the server of file
/// descriptors; closing them gives the places back.
#[test]
fn a_client_holds_at_most_max_conns_per_client() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &["--max-conns-per-client", "5"])?;
    let addr = cluster.grpc_addr(1).to_string();
    assert!(cluster.cli(&["kv", "put", "k", "v"]).is_ok());
    // Five connections that finish their TLS handshake and stay: an idle
    // socket that never starts one would be closed after the handshake
    // timeout (10 s), giving its place back in the middle of the test.
    let held: Vec<Held> = (0..5)
        .map(|_| Held::open(&addr, &cluster.ca_file))
        .collect::<anyhow::Result<_>>()?;
    // Once the server has counted the five, a sixth socket is closed at
    // once: wait for that (a probe the server still admits holds a place
    // only until it is dropped).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut probe = std::net::TcpStream::connect(&addr)?;
        probe.set_read_timeout(Some(std::time::Duration::from_millis(500)))?;
        let mut buf = [0u8; 1];
        match std::io::Read::read(&mut probe, &mut buf) {
            Ok(0) => break,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            _ => {}
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the server never refused a sixth connection"
        );
    }
    let refused = cluster.cli_at(&addr, &["kv", "get", "k"]);
    assert!(
        !refused.status.success(),
        "a sixth connection was served: {}",
        String::from_utf8_lossy(&refused.stdout)
    );
    drop(held);
    // The server notices the closed sockets when it next reads them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = cluster.cli_at(&addr, &["kv", "get", "k"]);
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "v");
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "still refused after the held connections closed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(cluster.log(1).contains("max-conns-per-client"));
    Ok(())
}
