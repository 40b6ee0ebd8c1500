//! End-to-end tests of HBONE on loopback: real TLS with rcgen-made CAs and
//! leaves, a real HboneServer in front of an echo server, the real pool.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::*;
use crate::test_ca::TestCa;
const WEB: &str = "spiffe://test.weft/ns/default/dc/dc1/svc/web";
const API: &str = "spiffe://test.weft/ns/default/dc/dc1/svc/api";
const NODE_B: &str = "spiffe://test.weft/ns/default/dc/dc1/node/node-b";
const NODE_C: &str = "spiffe://test.weft/ns/default/dc/dc1/node/node-c";
const TIMEOUT: Duration = Duration::from_secs(5);

/// Echoes every byte back; half-closes its write side after reading EOF.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Port that the test handler refuses with 403.
const DENIED_PORT: u16 = 9;

struct Node {
    addr: SocketAddr,
    bundle: TrustBundle,
    echo: SocketAddr,
    accepted: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<TlsFailure>>>,
    peers: Arc<Mutex<Vec<String>>>,
    /// Why connections were closed at accept.
    refused: Arc<Mutex<Vec<&'static str>>>,
    task: JoinHandle<()>,
}

impl Node {
    /// node-b as a tunnel's peer.
    fn peer(&self) -> NodePeer {
        NodePeer {
            addr: self.addr,
            spiffe_id: NODE_B.into(),
            sni: "node-b.dc1.node.test.weft".into(),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_node(ca: &TestCa) -> Node {
    start_node_with(ca, InboundLimits::default(), |_| true).await
}

/// A node with `limits`, taking the sources `known` says as known.
async fn start_node_with(
    ca: &TestCa,
    limits: InboundLimits,
    known: impl Fn(std::net::IpAddr) -> bool + Send + Sync + 'static,
) -> Node {
    start_node_checking(ca, limits, known, |_| {
        Ok(server::PeerOrigin::ThisDatacenter)
    })
    .await
}

/// [`start_node_with`], taking tunnels only from the peers `takes` takes.
async fn start_node_checking(
    ca: &TestCa,
    limits: InboundLimits,
    known: impl Fn(std::net::IpAddr) -> bool + Send + Sync + 'static,
    takes: impl Fn(&str) -> Result<server::PeerOrigin, String> + Send + Sync + 'static,
) -> Node {
    let echo = echo_server().await;
    let bundle = ca.bundle();
    let accepted = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let peers = Arc::new(Mutex::new(Vec::new()));
    let seen = peers.clone();
    let handler = move |req: ConnectRequest| {
        seen.lock().unwrap().push(req.peer_id.clone());
        async move {
            if req.target.port() == DENIED_PORT {
                return Err(Refusal::forbidden(format!(
                    "intention denies {} -> {}",
                    req.peer_id, req.target
                )));
            }
            TcpStream::connect(req.target)
                .await
                .map_err(|e| Refusal::unavailable(e.to_string()))
        }
    };
    let refused = Arc::new(Mutex::new(Vec::new()));
    let (acc, fail, refuse) = (accepted.clone(), failures.clone(), refused.clone());
    let server = HboneServer::new(&ca.identity(NODE_B), &bundle, handler)
        .unwrap()
        .limits(limits)
        .known_sources(known)
        .peers(takes)
        .on_tls_accept(move |_| {
            acc.fetch_add(1, Ordering::SeqCst);
        })
        .on_tls_failure(move |f| fail.lock().unwrap().push(f.clone()))
        .on_refused(move |reason| refuse.lock().unwrap().push(reason));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(server.serve(listener));
    Node {
        addr,
        bundle,
        echo,
        accepted,
        failures,
        peers,
        refused,
        task,
    }
}

async fn round_trip(stream: &mut HboneStream, data: &[u8]) -> Vec<u8> {
    stream.write_all(data).await.unwrap();
    let mut back = vec![0; data.len()];
    stream.read_exact(&mut back).await.unwrap();
    back
}

/// Waits (briefly) until `cond` holds: server-side hooks run on other tasks.
async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[test]
fn peer_spiffe_id_requires_exactly_one_spiffe_uri() {
    let ca = TestCa::new("ca");
    let der = |pem: &str| Identity::from_pem(pem, &ca.leaf_with_uris(&[WEB]).1);
    let (one, _) = ca.leaf_with_uris(&[WEB, "https://example.com/x"]);
    assert_eq!(der(&one).unwrap().spiffe_id, WEB);
    let (none, _) = ca.leaf_with_uris(&["https://example.com/x"]);
    assert!(matches!(der(&none), Err(TlsError::NoSpiffeId)));
    let (two, _) = ca.leaf_with_uris(&[WEB, API]);
    assert!(matches!(der(&two), Err(TlsError::MultipleSpiffeIds(2))));
    let (no_san, _) = ca.leaf_with_uris(&[]);
    assert!(matches!(der(&no_san), Err(TlsError::NoSpiffeId)));
}

#[tokio::test]
async fn tunnel_echoes_bytes() {
    let ca = TestCa::new("ca");
    let node = start_node(&ca).await;
    let pool = HbonePool::new(ca.bundle());
    let web = ca.identity(WEB);
    let mut stream = pool
        .connect(&web, &node.peer(), node.echo, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        round_trip(&mut stream, b"hello hbone").await,
        b"hello hbone"
    );
    // More than one stream window's worth, so flow control must turn over.
    let big: Vec<u8> = (0..3 * INITIAL_STREAM_WINDOW).map(|i| i as u8).collect();
    let (mut r, mut w) = tokio::io::split(stream);
    let sent = big.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), big.len());
    assert!(back == big);
}

#[tokio::test]
async fn server_sees_client_spiffe_id() {
    let ca = TestCa::new("ca");
    let node = start_node(&ca).await;
    let pool = HbonePool::new(ca.bundle());
    let mut stream = pool
        .connect(&ca.identity(API), &node.peer(), node.echo, TIMEOUT)
        .await
        .unwrap();
    round_trip(&mut stream, b"x").await;
    assert_eq!(*node.peers.lock().unwrap(), vec![API.to_string()]);
}

#[tokio::test]
async fn fifty_concurrent_streams_share_one_tls_connection() {
    let ca = TestCa::new("ca");
    let node = start_node(&ca).await;
    let pool = HbonePool::new(ca.bundle());
    let web = Arc::new(ca.identity(WEB));
    let mut tasks = Vec::new();
    for i in 0..50u32 {
        let (pool, web, peer, echo) = (pool.clone(), web.clone(), node.peer(), node.echo);
        tasks.push(tokio::spawn(async move {
            let mut stream = pool.connect(&web, &peer, echo, TIMEOUT).await.unwrap();
            let msg = format!("stream {i}").into_bytes();
            assert_eq!(round_trip(&mut stream, &msg).await, msg);
            stream
        }));
    }
    let mut open = Vec::new();
    for task in tasks {
        open.push(task.await.unwrap());
    }
    assert_eq!(open.len(), 50);
    assert_eq!(node.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(pool.dials(), 1);
    // Another identity to the same node gets its own connection.
    let mut other = pool
        .connect(&ca.identity(API), &node.peer(), node.echo, TIMEOUT)
        .await
        .unwrap();
    round_trip(&mut other, b"y").await;
    assert_eq!(node.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn handler_refusal_arrives_as_refused_403() {
    let ca = TestCa::new("ca");
    let node = start_node(&ca).await;
    let pool = HbonePool::new(ca.bundle());
    let target: SocketAddr = ([127, 0, 0, 1], DENIED_PORT).into();
    let web = ca.identity(WEB);
    let err = pool
        .connect(&web, &node.peer(), target, TIMEOUT)
        .await
        .unwrap_err();
    match err {
        HboneError::Refused { status, reason } => {
            assert_eq!(status, 403);
            assert_eq!(reason, format!("intention denies {WEB} -> {target}"));
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    // The connection survives a refused stream.
    let mut ok = pool
        .connect(&web, &node.peer(), node.echo, TIMEOUT)
        .await
        .unwrap();
    round_trip(&mut ok, b"still here").await;
    assert_eq!(pool.dials(), 1);
}

#[tokio::test]
async fn client_from_another_ca_fails_handshake() {
    let ca = TestCa::new("ca");
    let node = start_node(&ca).await;
    let rogue = TestCa::new("rogue");
    // The client trusts the real CA (it would accept the server) but presents
    // a certificate from another CA.
    let pool = HbonePool::new(ca.bundle());
    let err = pool
        .connect(&rogue.identity(WEB), &node.peer(), node.echo, TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(err, HboneError::Handshake { .. } | HboneError::H2 { .. }),
        "{err:?}"
    );
    assert!(eventually(|| node.failures.lock().unwrap().len() == 1).await);
    assert_eq!(node.accepted.load(Ordering::SeqCst), 0);
    assert!(node.peers.lock().unwrap().is_empty());
}

#[tokio::test]
async fn client_without_certificate_fails_handshake() {
    let ca = TestCa::new("ca");
    let node = start_node(&ca).await;
    let config = tls::client_config_without_cert(&ca.bundle()).unwrap();
    let tcp = TcpStream::connect(node.addr).await.unwrap();
    let result = async {
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::IpAddress(node.addr.ip().into()), tcp)
            .await?;
        // TLS 1.3: the server's verdict on the client arrives after the
        // client finished; a read surfaces it.
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut buf = [0u8; 1];
        tls.read(&mut buf).await
    }
    .await;
    assert!(!matches!(result, Ok(n) if n > 0), "{result:?}");
    assert!(eventually(|| node.failures.lock().unwrap().len() == 1).await);
    let failure = node.failures.lock().unwrap()[0].clone();
    assert!(failure.reason.contains("handshake"), "{failure:?}");
    assert_eq!(node.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn client_in_another_trust_domain_is_rejected() {
    let ca = TestCa::new("ca");
    let node = start_node(&ca).await;
    let pool = HbonePool::new(ca.bundle());
    let stranger = ca.identity("spiffe://other.weft/ns/default/dc/dc1/svc/web");
    assert!(pool
        .connect(&stranger, &node.peer(), node.echo, TIMEOUT)
        .await
        .is_err());
    assert!(eventually(|| node.failures.lock().unwrap().len() == 1).await);
    assert_eq!(node.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn client_rejects_server_outside_its_bundle() {
    let ca = TestCa::new("ca");
    let node = start_node(&ca).await;
    let other = TestCa::new("other");
    let pool = HbonePool::new(other.bundle());
    let err = pool
        .connect(&other.identity(WEB), &node.peer(), node.echo, TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, HboneError::Handshake { .. }), "{err:?}");
}

#[tokio::test]
async fn rotated_bundle_rejects_old_ca_and_keeps_open_tunnels() {
    let old = TestCa::new("old");
    let node = start_node(&old).await;
    let pool = HbonePool::new(old.bundle());
    let web = old.identity(WEB);
    let mut open = pool
        .connect(&web, &node.peer(), node.echo, TIMEOUT)
        .await
        .unwrap();
    round_trip(&mut open, b"before").await;

    let new = TestCa::new("new");
    node.bundle.replace_pem(&new.pem).unwrap();
    assert!(node.bundle.replace_pem("garbage").is_err());

    // A new handshake with an old-CA certificate now fails...
    let fresh_pool = HbonePool::new(old.bundle());
    assert!(fresh_pool
        .connect(&web, &node.peer(), node.echo, TIMEOUT)
        .await
        .is_err());
    assert!(eventually(|| node.failures.lock().unwrap().len() == 1).await);
    // ...while the tunnel opened before keeps working, and so does its
    // connection for new streams.
    assert_eq!(round_trip(&mut open, b"after").await, b"after");
    let mut again = pool
        .connect(&web, &node.peer(), node.echo, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(round_trip(&mut again, b"again").await, b"again");
    assert_eq!(node.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn half_close_keeps_the_read_side_open() {
    let ca = TestCa::new("ca");
    let node = start_node(&ca).await;
    let pool = HbonePool::new(ca.bundle());
    let mut stream = pool
        .connect(&ca.identity(WEB), &node.peer(), node.echo, TIMEOUT)
        .await
        .unwrap();
    stream.write_all(b"request body").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"request body");
}

#[tokio::test]
async fn non_connect_methods_get_405() {
    let ca = TestCa::new("ca");
    let node = start_node(&ca).await;
    let config = tls::client_config(&ca.identity(WEB), &ca.bundle(), NODE_B).unwrap();
    let tcp = TcpStream::connect(node.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::IpAddress(node.addr.ip().into()), tcp)
        .await
        .unwrap();
    let (mut send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let request = http::Request::get("https://node-b/").body(()).unwrap();
    let (response, _) = send.send_request(request, true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 405);
    assert!(response.headers().contains_key(REASON_HEADER));
}

/// A TCP relay in front of a node whose live connections can be cut.
async fn relay(to: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<JoinHandle<()>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(Mutex::new(Vec::new()));
    let tracked = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut down, _)) = listener.accept().await {
            let task = tokio::spawn(async move {
                if let Ok(mut up) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
            });
            tracked.lock().unwrap().push(task);
        }
    });
    (addr, conns)
}

#[tokio::test]
async fn broken_connection_is_evicted_and_redialed() {
    let ca = TestCa::new("ca");
    let node = start_node(&ca).await;
    let (via, conns) = relay(node.addr).await;
    let pool = HbonePool::new(ca.bundle());
    let web = ca.identity(WEB);
    let via = NodePeer {
        addr: via,
        spiffe_id: NODE_B.into(),
        sni: "node-b.dc1.node.test.weft".into(),
    };
    let mut first = pool.connect(&web, &via, node.echo, TIMEOUT).await.unwrap();
    round_trip(&mut first, b"one").await;
    for task in conns.lock().unwrap().drain(..) {
        task.abort();
    }
    // The open tunnel breaks with the connection...
    let mut buf = [0u8; 1];
    assert!(!matches!(first.read(&mut buf).await, Ok(1)));
    // ...and the next tunnel gets a new connection.
    let mut second = pool.connect(&web, &via, node.echo, TIMEOUT).await.unwrap();
    assert_eq!(round_trip(&mut second, b"two").await, b"two");
    assert_eq!(pool.dials(), 2);
    assert_eq!(node.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn connect_times_out_against_a_silent_node() {
    let ca = TestCa::new("ca");
    // Accepts TCP, never speaks TLS.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent = listener.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let pool = HbonePool::new(ca.bundle());
    let timeout = Duration::from_millis(200);
    let err = pool
        .connect(
            &ca.identity(WEB),
            &NodePeer {
                addr: silent,
                spiffe_id: NODE_B.into(),
                sni: "node-b.dc1.node.test.weft".into(),
            },
            silent,
            timeout,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, HboneError::Timeout(t) if t == timeout),
        "{err:?}"
    );
}

/// A server that sends `chunks` pieces of `size` bytes, pausing between them
/// so that each crosses the tunnel as its own HTTP/2 DATA frame.
async fn trickle_server(chunks: usize, size: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        for i in 0..chunks {
            tcp.write_all(&vec![i as u8; size]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tcp.shutdown().await.unwrap();
    });
    addr
}

#[tokio::test]
async fn frames_that_arrived_together_are_read_in_one_call() {
    let ca = TestCa::new("ca");
    let node = start_node(&ca).await;
    let pool = HbonePool::new(ca.bundle());
    let target = trickle_server(10, 100).await;
    let mut stream = pool
        .connect(&ca.identity(WEB), &node.peer(), target, TIMEOUT)
        .await
        .unwrap();
    // Let every frame and the end of the stream arrive before reading.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut buf = vec![0; 64 * 1024];
    let n = stream.read(&mut buf).await.unwrap();
    assert_eq!(n, 1000, "one read returns all ten frames");
    let expected: Vec<u8> = (0..10u8).flat_map(|i| vec![i; 100]).collect();
    assert_eq!(&buf[..n], &expected[..]);
    assert_eq!(stream.read(&mut buf).await.unwrap(), 0, "then EOF");
}

/// A node presenting another node's certificate (valid, of the same trust
/// domain) is refused by the source: the tunnel meant for node-c must not
/// end at node-b.
#[tokio::test]
async fn a_node_presenting_another_nodes_certificate_is_refused() {
    let ca = TestCa::new("ca");
    let node = start_node(&ca).await;
    let pool = HbonePool::new(ca.bundle());
    let meant_c = NodePeer {
        addr: node.addr,
        spiffe_id: NODE_C.into(),
        sni: "node-c.dc1.node.test.weft".into(),
    };
    let Err(err) = pool
        .connect(&ca.identity(WEB), &meant_c, node.echo, TIMEOUT)
        .await
    else {
        panic!("the tunnel was opened to the wrong node");
    };
    let text = format!("{err}: {:?}", std::error::Error::source(&err));
    assert!(text.contains("not the node meant"), "{text}");
    assert_eq!(err.handshake_failure(), Some("wrong_node"));
    // The same node, asked for by its own id, answers.
    let mut ok = pool
        .connect(&ca.identity(WEB), &node.peer(), node.echo, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(round_trip(&mut ok, b"hi").await, b"hi");
}

/// A connection full of tunnels gets a sibling: 25 tunnels held open at a
/// limit of 10 per connection take 3 connections, all tunnels work, and a
/// place freed by a closed tunnel is used again before dialing more.
#[tokio::test]
async fn a_full_connection_gets_a_sibling_instead_of_a_queue() {
    let ca = TestCa::new("ca");
    let node = start_node(&ca).await;
    let pool = HbonePool::with_streams_per_connection(ca.bundle(), 10);
    let web = ca.identity(WEB);
    let mut open = Vec::new();
    for i in 0..25u32 {
        let mut stream = pool
            .connect(&web, &node.peer(), node.echo, TIMEOUT)
            .await
            .unwrap();
        let msg = format!("tunnel {i}").into_bytes();
        assert_eq!(round_trip(&mut stream, &msg).await, msg);
        open.push(stream);
    }
    assert_eq!(pool.dials(), 3);
    drop(open.pop());
    let mut again = pool
        .connect(&web, &node.peer(), node.echo, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(round_trip(&mut again, b"again").await, b"again");
    assert_eq!(pool.dials(), 3, "the freed place was used");
}

#[tokio::test]
async fn a_renewed_certificate_gets_a_new_connection_and_old_tunnels_run_on() {
    let ca = TestCa::new("ca");
    let node = start_node(&ca).await;
    let pool = HbonePool::new(ca.bundle());
    let first = ca.identity(WEB);
    let mut old = pool
        .connect(&first, &node.peer(), node.echo, TIMEOUT)
        .await
        .unwrap();
    let mut again = pool
        .connect(&first, &node.peer(), node.echo, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        pool.dials(),
        1,
        "the same certificate shares its connection"
    );
    // The renewed certificate: same identity, new leaf. New tunnels must
    // present it, so they cannot ride the connection made with the old one.
    let renewed = ca.identity(WEB);
    let mut new = pool
        .connect(&renewed, &node.peer(), node.echo, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(pool.dials(), 2, "a renewed certificate dials anew");
    assert_eq!(node.accepted.load(Ordering::SeqCst), 2);
    for stream in [&mut old, &mut again, &mut new] {
        assert_eq!(round_trip(stream, b"still here").await, b"still here");
    }
}

#[test]
fn a_session_lasts_until_the_first_of_its_certificates_expires() {
    let ca = TestCa::new("ca");
    let leaf = ca.identity(WEB).cert_chain[0].clone();
    let expires = tls::not_after(&leaf).expect("a parsable leaf");
    assert!(expires > std::time::SystemTime::now());
    assert_eq!(tls::session_deadline(Some(&leaf), None), Some(expires));
    assert_eq!(
        tls::session_deadline(Some(&leaf), Some(&leaf)),
        Some(expires)
    );
    let garbage = rustls::pki_types::CertificateDer::from(vec![1u8, 2, 3]);
    assert_eq!(tls::not_after(&garbage), None);
    assert_eq!(tls::session_deadline(Some(&garbage), None), None);
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Whether the server closed `tcp` (it sent nothing, so a read ends).
async fn closed_by_server(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(
        tokio::time::timeout(TIMEOUT, tcp.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// The attack: TCP connections to the inbound port that never start their
/// handshake, which anyone who reaches the port can open. Each held a task
/// and a descriptor for the handshake timeout, without limit: enough of
/// them took every descriptor the agent may open. Now a source outside the
/// view holds its share of the places for unknown sources, all of them
/// together hold those places and no more, and a node the view knows still
/// gets in while they are all taken. Closed, they give their places back.
#[tokio::test]
async fn connections_that_never_handshake_hold_their_share_and_no_more() {
    let ca = TestCa::new("ca");
    let limits = InboundLimits {
        known: 100,
        known_per_source: 100,
        unknown: 4,
        unknown_per_source: 3,
        ..InboundLimits::default()
    };
    let known: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let node = start_node_with(&ca, limits, move |ip| ip == known).await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(connect_from("127.0.0.1", node.addr).await);
    }
    // The accept loop takes connections in order: a fourth from the same
    // source finds its share taken, and the oldest of the three, still in
    // its handshake, gives its place up to it.
    let fourth = connect_from("127.0.0.1", node.addr).await;
    assert!(closed_by_server(&mut silent[0]).await, "the oldest held on");
    assert_eq!(*node.refused.lock().unwrap(), ["displaced"]);
    silent[0] = fourth;
    // Another unknown source takes the last place; a third finds none
    // while the others' handshakes are young, and takes the place of the
    // oldest still in its handshake, whatever its source, once that one
    // has been at it for longer than a handshake takes.
    silent.push(connect_from("127.0.0.3", node.addr).await);
    let mut over = connect_from("127.0.0.4", node.addr).await;
    assert!(closed_by_server(&mut over).await, "held, not closed");
    assert_eq!(*node.refused.lock().unwrap(), ["displaced", "unknown_busy"]);
    tokio::time::sleep(crate::admission::CROSS_SOURCE_GRACE).await;
    let over = connect_from("127.0.0.4", node.addr).await;
    assert!(closed_by_server(&mut silent[1]).await, "the oldest held on");
    assert_eq!(
        *node.refused.lock().unwrap(),
        ["displaced", "unknown_busy", "displaced"]
    );
    silent[1] = over;

    // A node the view knows completes its handshake meanwhile.
    let config = tls::client_config(&ca.identity(WEB), &node.bundle, NODE_B).unwrap();
    let name = ServerName::try_from("node-b.dc1.node.test.weft").unwrap();
    let tcp = connect_from("127.0.0.2", node.addr).await;
    let _peer = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("a known source's handshake");
    assert!(eventually(|| node.accepted.load(Ordering::SeqCst) == 1).await);

    // Closed, the silent connections give their places back: a peer from
    // the first source gets its tunnel.
    drop(silent);
    let pool = HbonePool::new(ca.bundle());
    let mut tunnel = tunnel_once_freed(&pool, &ca.identity(WEB), &node).await;
    assert_eq!(round_trip(&mut tunnel, b"back").await, b"back");
}

/// The attack: a local user on a node (whose connections leave from the
/// node's address) opens connections to a peer's inbound port and never
/// completes them, holding every place the peer gives that node: the
/// node's agent found none for its tunnels. Now the oldest connection still
/// in its handshake gives its place up to a newer one: the agent's gets in,
/// and, proven, keeps its place however many more the user opens.
#[tokio::test]
async fn a_local_user_on_a_node_cannot_keep_its_agent_out() {
    let ca = TestCa::new("ca");
    let limits = InboundLimits {
        known_per_source: 4,
        ..InboundLimits::default()
    };
    let node = start_node_with(&ca, limits, |_| true).await;
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(connect_from("127.0.0.1", node.addr).await);
    }
    let pool = HbonePool::new(ca.bundle());
    let web = ca.identity(WEB);
    let mut tunnel = pool
        .connect(&web, &node.peer(), node.echo, TIMEOUT)
        .await
        .expect("the node's agent gets a place");
    assert_eq!(round_trip(&mut tunnel, b"in").await, b"in");
    assert!(closed_by_server(&mut silent[0]).await, "the oldest held on");
    assert_eq!(*node.refused.lock().unwrap(), ["displaced"]);
    for _ in 0..8 {
        silent.push(connect_from("127.0.0.1", node.addr).await);
    }
    assert!(
        eventually(|| node.refused.lock().unwrap().len() == 9).await,
        "{:?}",
        node.refused.lock().unwrap()
    );
    assert_eq!(round_trip(&mut tunnel, b"still").await, b"still");
    let mut second = pool
        .connect(&web, &node.peer(), node.echo, TIMEOUT)
        .await
        .expect("another tunnel on the proven connection");
    assert_eq!(round_trip(&mut second, b"two").await, b"two");
}

/// A peer that completes TLS and then sends nothing (no HTTP/2 preface)
/// is let go after the handshake timeout, its place with it.
#[tokio::test]
async fn a_peer_silent_after_tls_is_let_go() {
    let ca = TestCa::new("ca");
    let limits = InboundLimits {
        unknown: 1,
        unknown_per_source: 1,
        ..InboundLimits::default()
    };
    let echo = echo_server().await;
    let bundle = ca.bundle();
    let server = HboneServer::new(
        &ca.identity(NODE_B),
        &bundle,
        move |_req: ConnectRequest| async move {
            TcpStream::connect(echo)
                .await
                .map_err(|e| Refusal::unavailable(e.to_string()))
        },
    )
    .unwrap()
    .limits(limits)
    .handshake_timeout(Duration::from_millis(300));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _task = AbortOnDrop(tokio::spawn(server.serve(listener)));
    let config = tls::client_config(&ca.identity(WEB), &bundle, NODE_B).unwrap();
    let name = ServerName::try_from("node-b.dc1.node.test.weft").unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut quiet = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("TLS");
    // The server's HTTP/2 SETTINGS arrive, then, with no preface from us,
    // the connection ends.
    let mut sink = Vec::new();
    let ended = tokio::time::timeout(TIMEOUT, quiet.read_to_end(&mut sink)).await;
    assert!(ended.is_ok(), "still open after the handshake timeout");
    // Its one place is free again: a real peer gets a tunnel.
    let pool = HbonePool::new(ca.bundle());
    let peer = NodePeer {
        addr,
        spiffe_id: NODE_B.into(),
        sni: "node-b.dc1.node.test.weft".into(),
    };
    let mut tunnel = pool
        .connect(&ca.identity(WEB), &peer, echo, TIMEOUT)
        .await
        .expect("a tunnel on the freed place");
    assert_eq!(round_trip(&mut tunnel, b"back").await, b"back");
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A source holds at most `tunnels_per_source` tunnels at once, over all
/// its connections (each costs the agent a connection to a workload): the
/// next is refused with 503, and one closing makes room.
#[tokio::test]
async fn a_source_holds_at_most_its_tunnels() {
    let ca = TestCa::new("ca");
    let limits = InboundLimits {
        tunnels_per_source: 2,
        ..InboundLimits::default()
    };
    let node = start_node_with(&ca, limits, |_| true).await;
    // One tunnel a connection: the limit holds across connections.
    let pool = HbonePool::with_streams_per_connection(ca.bundle(), 1);
    let web = ca.identity(WEB);
    let mut first = pool
        .connect(&web, &node.peer(), node.echo, TIMEOUT)
        .await
        .unwrap();
    let mut second = pool
        .connect(&web, &node.peer(), node.echo, TIMEOUT)
        .await
        .unwrap();
    round_trip(&mut first, b"one").await;
    round_trip(&mut second, b"two").await;
    match pool.connect(&web, &node.peer(), node.echo, TIMEOUT).await {
        Err(HboneError::Refused {
            status: 503,
            reason,
        }) => {
            assert!(reason.contains("2 tunnels open"), "{reason}");
        }
        other => panic!("a third tunnel: {other:?}"),
    }
    assert_eq!(*node.refused.lock().unwrap(), ["tunnel_limit"]);
    drop(first);
    let mut third = tunnel_once_freed(&pool, &web, &node).await;
    round_trip(&mut third, b"three").await;
}

/// Tunnel connections leave from the node's registered address where the
/// host has it (a peer gives the view's nodes places of their own, by
/// source address), and from the kernel's choice where it does not (NAT).
#[tokio::test]
async fn connections_leave_from_the_nodes_address_where_the_host_has_it() {
    let ca = TestCa::new("ca");
    let node = start_node(&ca).await;
    let web = ca.identity(WEB);
    for (from, seen) in [("127.0.0.2", "127.0.0.2"), ("192.0.2.1", "127.0.0.1")] {
        let pool = HbonePool::new(ca.bundle()).leaving_from(from.parse().unwrap());
        // A plain listener stands for the peer: what it accepts shows the
        // connection's source (the dial then fails its TLS, as it may).
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = tokio::spawn(async move { listener.accept().await.map(|(_, p)| p) });
        let _ = pool
            .connect(
                &web,
                &NodePeer {
                    addr,
                    spiffe_id: NODE_B.into(),
                    sni: "node-b.dc1.node.test.weft".into(),
                },
                node.echo,
                Duration::from_millis(300),
            )
            .await;
        let peer = accepted.await.unwrap().unwrap();
        assert_eq!(peer.ip().to_string(), seen, "leaving from {from}");
    }
}

/// A tunnel to `node`'s echo server, tried up to 100 times 20 ms apart: the
/// server gives a place back once it sees the connection or tunnel that
/// held it close.
async fn tunnel_once_freed(pool: &HbonePool, source: &Identity, node: &Node) -> HboneStream {
    for _ in 0..100 {
        if let Ok(tunnel) = pool.connect(source, &node.peer(), node.echo, TIMEOUT).await {
            return tunnel;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no tunnel in 100 tries once the place was freed");
}

/// A node whose `peers` check takes tunnels only from service identities
/// (as the agent's does), with `limits`.
async fn start_node_taking_services(ca: &TestCa, limits: InboundLimits) -> Node {
    let services = |peer_id: &str| match peer_id.contains("/svc/") {
        true => Ok(server::PeerOrigin::ThisDatacenter),
        false => Err("a node's identity".into()),
    };
    start_node_checking(ca, limits, |_| true, services).await
}

/// The attack: a certificate no tunnel is taken from (a node's own) held
/// connections, and their places, for as long as it liked; refused only
/// per stream. Now it is let go as its handshake ends.
#[tokio::test]
async fn a_certificate_no_tunnel_is_taken_from_holds_no_connection() {
    let ca = TestCa::new("ca");
    let node = start_node_taking_services(&ca, InboundLimits::default()).await;
    let config = tls::client_config(&ca.identity(NODE_C), &node.bundle, NODE_B).unwrap();
    let name = ServerName::try_from("node-b.dc1.node.test.weft").unwrap();
    let tcp = TcpStream::connect(node.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("TLS itself completes");
    let mut sink = Vec::new();
    let ended = tokio::time::timeout(TIMEOUT, tls.read_to_end(&mut sink)).await;
    assert!(ended.is_ok(), "a node's certificate kept its connection");
    assert_eq!(*node.refused.lock().unwrap(), ["identity"]);
    // A service's certificate gets its tunnel.
    let pool = HbonePool::new(ca.bundle());
    let mut tunnel = pool
        .connect(&ca.identity(WEB), &node.peer(), node.echo, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(round_trip(&mut tunnel, b"in").await, b"in");
}

/// The attack: a compromised workload, with its own leaf, opening
/// connections and tunnels from its node's address took every place the
/// peer gives that node, and its agent's tunnels for other services were
/// refused. Now one identity holds its share of its source's places and
/// tunnels; another identity from the same source still gets in.
#[tokio::test]
async fn one_identity_holds_only_its_share_of_its_sources_places() {
    let ca = TestCa::new("ca");
    let limits = InboundLimits {
        per_identity: 2,
        tunnels_per_identity: 3,
        ..InboundLimits::default()
    };
    let node = start_node_taking_services(&ca, limits).await;
    let web = ca.identity(WEB);
    let api = ca.identity(API);
    // Tunnels: on web's connection at most three; api's still get in.
    let shared = HbonePool::new(ca.bundle());
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        let tunnel = shared.connect(&web, &node.peer(), node.echo, TIMEOUT).await;
        tunnels.push(tunnel.expect("within web's tunnels"));
    }
    match shared.connect(&web, &node.peer(), node.echo, TIMEOUT).await {
        Err(HboneError::Refused {
            status: 503,
            reason,
        }) => assert!(reason.contains("this identity has 3 tunnels"), "{reason}"),
        other => panic!("a fourth tunnel of web's: {other:?}"),
    }
    let mut theirs = shared
        .connect(&api, &node.peer(), node.echo, TIMEOUT)
        .await
        .expect("api's tunnel");
    assert_eq!(round_trip(&mut theirs, b"api").await, b"api");
    drop(tunnels);

    // Connections: web holds one (the shared pool's); with one tunnel a
    // connection, its second is within its share and its third is not.
    let one_each = HbonePool::with_streams_per_connection(ca.bundle(), 1);
    let _second = tunnel_once_freed(&one_each, &web, &node).await;
    let over = one_each
        .connect(&web, &node.peer(), node.echo, TIMEOUT)
        .await;
    assert!(over.is_err(), "a third connection of web's");
    assert!(eventually(|| node.refused.lock().unwrap().contains(&"identity_limit")).await);
    // api, from the same address, is not held back by web.
    let mut more = one_each
        .connect(&api, &node.peer(), node.echo, TIMEOUT)
        .await
        .expect("api's second connection");
    assert_eq!(round_trip(&mut more, b"api").await, b"api");
}

/// A connection with no tunnel for the idle time is told to go away (the
/// peer's pool dials again when it needs one); one with a tunnel open is
/// not, however long the tunnel lasts.
#[tokio::test]
async fn a_connection_without_tunnels_is_let_go() {
    let ca = TestCa::new("ca");
    let limits = InboundLimits {
        idle: Duration::from_millis(300),
        ..InboundLimits::default()
    };
    let node = start_node_taking_services(&ca, limits).await;
    let pool = HbonePool::new(ca.bundle());
    let web = ca.identity(WEB);
    let mut long = pool
        .connect(&web, &node.peer(), node.echo, TIMEOUT)
        .await
        .unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(round_trip(&mut long, b"on").await, b"on");
    }
    assert_eq!(pool.dials(), 1);
    drop(long);
    // Idle now: the connection is let go, and the next tunnel dials anew.
    let mut next = None;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let tunnel = pool
            .connect(&web, &node.peer(), node.echo, TIMEOUT)
            .await
            .unwrap();
        if pool.dials() == 2 {
            next = Some(tunnel);
            break;
        }
    }
    let mut next = next.expect("the idle connection was never let go");
    assert_eq!(round_trip(&mut next, b"again").await, b"again");
}

/// A peer's pool retires a connection at each certificate renewal and its
/// long tunnels run on there: such a connection, taking no new tunnel for
/// the idle time, stops counting against its identity's share, so that
/// renewals do not use the share up. Taking a new tunnel again needs a
/// place of the share.
#[tokio::test]
async fn a_connection_that_takes_no_new_tunnels_gives_its_identitys_place_back() {
    let ca = TestCa::new("ca");
    let limits = InboundLimits {
        per_identity: 1,
        idle: Duration::from_millis(300),
        ..InboundLimits::default()
    };
    let node = start_node_taking_services(&ca, limits).await;
    let web = ca.identity(WEB);
    // The retired connection: a tunnel kept open, nothing new on it.
    let retired = HbonePool::new(ca.bundle());
    let mut long = retired
        .connect(&web, &node.peer(), node.echo, TIMEOUT)
        .await
        .unwrap();
    // The renewed one: while the first is in use, one connection is web's
    // share; once the first has taken nothing new for the idle time, the
    // second gets its place.
    let renewed = HbonePool::new(ca.bundle());
    let early = renewed
        .connect(&web, &node.peer(), node.echo, TIMEOUT)
        .await;
    assert!(
        early.is_err(),
        "a second connection within the share of one"
    );
    let mut fresh = tunnel_once_freed(&renewed, &web, &node).await;
    assert_eq!(round_trip(&mut fresh, b"new").await, b"new");
    assert_eq!(
        round_trip(&mut long, b"old").await,
        b"old",
        "the old tunnel runs on"
    );
    // A new tunnel on the retired connection needs the share's place again.
    match retired
        .connect(&web, &node.peer(), node.echo, TIMEOUT)
        .await
    {
        Err(HboneError::Refused {
            status: 503,
            reason,
        }) => {
            assert!(
                reason.contains("connections from this source in use"),
                "{reason}"
            )
        }
        other => panic!("a new tunnel on the retired connection: {other:?}"),
    }
}
