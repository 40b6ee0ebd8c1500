//! Two agents in one process, on loopback and without root: certificates
//! from a test CA (fixed [`Identities`]), real TLS and HBONE between the
//! agents, the real outbound and inbound proxies deciding from their own
//! views. Node a (127.0.0.1) carries web's calls to api, whose instance
//! listens on node b (127.0.0.2).
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use weft_api::proto::{self, watch_event::Event};

use super::{inbound, outbound, ProxyContext};
use crate::hbone::{HbonePool, HboneServer};
use crate::identity::Identities;
use crate::metrics::AgentMetrics;
use crate::shared_view::SharedView;
use crate::test_ca::{TestCa, TD};
use crate::view::View;

const LIMIT: Duration = Duration::from_secs(10);

fn spiffe(kind: &str, name: &str) -> String {
    format!("spiffe://{TD}/ns/default/dc/dc1/{kind}/{name}")
}

/// The view both agents start from: nodes a and b, api's instance at
/// `api` on b, and web -> api `action` (default deny).
fn view(ca: &TestCa, api: SocketAddr, action: &str) -> View {
    view_with(ca, api, action, Vec::new())
}

/// [`view`] with config `entries`.
fn view_with(ca: &TestCa, api: SocketAddr, action: &str, entries: Vec<proto::ConfigEntry>) -> View {
    let intention = proto::Intention {
        source: "web".into(),
        destination: "api".into(),
        action: action.into(),
        ..Default::default()
    };
    view_of(ca, api, intention, entries)
}

/// [`view_with`] with web -> api's `intention` as given.
fn view_of(
    ca: &TestCa,
    api: SocketAddr,
    intention: proto::Intention,
    entries: Vec<proto::ConfigEntry>,
) -> View {
    let node = |name: &str, address: &str| proto::Node {
        name: name.into(),
        address: address.into(),
        datacenter: "dc1".into(),
        ..Default::default()
    };
    let snapshot = proto::StateSnapshot {
        nodes: vec![node("a", "127.0.0.1"), node("b", "127.0.0.2")],
        instances: vec![proto::ServiceInstance {
            id: "api-1".into(),
            service: "api".into(),
            node: "b".into(),
            address: api.ip().to_string(),
            port: api.port().into(),
            health: proto::Health::Passing as i32,
            ..Default::default()
        }],
        intentions: vec![intention],
        ca: Some(proto::CaBundle {
            trust_domain: TD.into(),
            roots_pem: vec![ca.pem.clone()],
        }),
        config_entries: entries,
        ..Default::default()
    };
    let mut v = View::default();
    v.apply(proto::WatchEvent {
        index: 1,
        event: Some(Event::Snapshot(snapshot)),
    })
    .unwrap();
    v
}

/// One agent's proxy, its tasks stopped when it is dropped.
struct Agent {
    ctx: Arc<ProxyContext>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn agent(ca: &TestCa, node: &str, inbound_port: u16, view: View, services: &[&str]) -> Agent {
    let identities = Identities::fixed(
        ca.identity(&spiffe("node", node)),
        services
            .iter()
            .map(|s| (s.to_string(), ca.identity(&spiffe("svc", s)))),
    );
    let metrics = Arc::new(AgentMetrics::new());
    let ctx = Arc::new(ProxyContext {
        node_name: node.into(),
        datacenter: "dc1".into(),
        inbound_port,
        view: Arc::new(SharedView::new(view)),
        own: Default::default(),
        identities: Arc::new(identities),
        pool: HbonePool::with_metrics(ca.bundle(), metrics.tunnel()),
        metrics,
        in_flight: Mutex::new(HashMap::new()),
        outliers: Default::default(),
        balancer: Default::default(),
        breakers: Default::default(),
        drain: crate::drain::Drain::new(),
    });
    Agent {
        ctx,
        tasks: Vec::new(),
    }
}

/// Echoes every byte back, at 127.0.0.2 (node b's workload).
async fn echo_on_b() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, task)
}

/// Node b's agent: its inbound port (HBONE) at 127.0.0.2, judging tunnels
/// by `view`; and the SPIFFE ids of the peers it accepted.
async fn node_b(ca: &TestCa, view: View) -> (Agent, SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut b = agent(ca, "b", addr.port(), view, &[]);
    let ctx = b.ctx.clone();
    let peers = Arc::new(Mutex::new(Vec::new()));
    let seen = peers.clone();
    let identity = b.ctx.identities.node().unwrap();
    let server = HboneServer::new(&identity, &ca.bundle(), move |req| {
        inbound::accept(ctx.clone(), req)
    })
    .unwrap()
    .on_tls_accept(move |peer| seen.lock().unwrap().push(peer.to_string()));
    b.tasks.push(tokio::spawn(server.serve(listener)));
    (b, addr, peers)
}

/// Node a's agent: web's explicit upstream for api on 127.0.0.1.
async fn node_a(ca: &TestCa, b_inbound: SocketAddr, view: View) -> (Agent, SocketAddr) {
    let mut a = agent(ca, "a", b_inbound.port(), view, &["web"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = ("api".to_string(), None);
    let serve = outbound::serve_upstream(a.ctx.clone(), listener, "web".into(), dest, None);
    a.tasks.push(tokio::spawn(serve));
    (a, addr)
}

/// Sends `data` through web's upstream and reads what comes back, until
/// the connection ends.
async fn call(upstream: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let exchange = async {
        let mut tcp = TcpStream::connect(upstream).await?;
        tcp.write_all(data).await?;
        let mut back = vec![0; data.len()];
        tcp.read_exact(&mut back).await?;
        Ok(back)
    };
    tokio::time::timeout(LIMIT, exchange).await?
}

#[tokio::test]
async fn a_call_crosses_two_agents_over_mutual_tls() {
    let ca = TestCa::new("test CA");
    let (api, echo) = echo_on_b().await;
    let (b, b_inbound, peers) = node_b(&ca, view(&ca, api, "allow")).await;
    let (a, upstream) = node_a(&ca, b_inbound, view(&ca, api, "allow")).await;

    let back = call(upstream, b"hello through two agents").await.unwrap();
    assert_eq!(back, b"hello through two agents");
    // Node b saw web's certificate: the tunnel, not a direct connection.
    assert_eq!(*peers.lock().unwrap(), vec![spiffe("svc", "web")]);
    // Both sides counted it, under the same pair.
    let counted = |agent: &Agent| agent.ctx.metrics.encode();
    assert!(counted(&a).contains("source=\"web\""), "{}", counted(&a));
    assert!(counted(&b).contains("source=\"web\""), "{}", counted(&b));
    echo.abort();
}

#[tokio::test]
async fn the_destinations_agent_refuses_what_its_view_denies() {
    let ca = TestCa::new("test CA");
    let (api, echo) = echo_on_b().await;
    // Node a's view allows web -> api; node b's denies it: b decides.
    let (_b, b_inbound, peers) = node_b(&ca, view(&ca, api, "deny")).await;
    let (a, upstream) = node_a(&ca, b_inbound, view(&ca, api, "allow")).await;
    let refused = call(upstream, b"let me in").await;
    assert!(refused.is_err(), "node b let a denied call through");
    // The handshake happened (b knows who asked) and was refused after it.
    assert_eq!(*peers.lock().unwrap(), vec![spiffe("svc", "web")]);
    // Node a's own deny refuses before any tunnel.
    a.ctx.view.publish(&mut view(&ca, api, "deny"));
    assert!(call(upstream, b"again").await.is_err());
    assert_eq!(peers.lock().unwrap().len(), 1, "a denied call left node a");
    echo.abort();
}

/// The attack: an instance in the catalog at one of node b's agent's own
/// ports (its local API, admin, an upstream listener), which a tunnel then
/// reached from the agent itself: the admin's loopback-only `/config`, or
/// the listener's service carrying the caller. Refused, whatever the
/// catalog says, and the ports follow the agent's configuration.
#[tokio::test]
async fn a_tunnel_never_reaches_the_agents_own_ports() {
    let ca = TestCa::new("test CA");
    let (api, echo) = echo_on_b().await;
    let (b, b_inbound, peers) = node_b(&ca, view(&ca, api, "allow")).await;
    let (_a, upstream) = node_a(&ca, b_inbound, view(&ca, api, "allow")).await;
    b.ctx.own.store(Arc::new(vec![api]));
    assert!(
        call(upstream, b"to the agent").await.is_err(),
        "a tunnel reached the agent's own port"
    );
    assert_eq!(
        peers.lock().unwrap().len(),
        1,
        "refused after the handshake"
    );
    // Given up (a reload moved the port), the instance there is reached.
    b.ctx.own.store(Arc::new(Vec::new()));
    let back = call(upstream, b"to api").await.unwrap();
    assert_eq!(back, b"to api");
    echo.abort();
}

/// api as an HTTP service (`service-defaults`).
fn api_is_http() -> Vec<proto::ConfigEntry> {
    let json = r#"{"Kind":"service-defaults","Name":"api","Protocol":"http"}"#;
    vec![proto::ConfigEntry {
        kind: "service-defaults".into(),
        name: "api".into(),
        json: json.into(),
        ..Default::default()
    }]
}

/// An HTTP/1.1 server at 127.0.0.2 answering every request on a kept-alive
/// connection with 200 `ok`.
async fn http_on_b() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 1024];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
                        if tcp.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, task)
}

/// Sends one GET on `tcp` and reads its answer's status line (the body is
/// at most the 3 bytes `ok\n` or a short refusal, read with the head).
async fn get(tcp: &mut TcpStream) -> String {
    let exchange = async {
        tcp.write_all(b"GET /x HTTP/1.1\r\nHost: api\r\n\r\n")
            .await?;
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tcp.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        std::io::Result::Ok(
            String::from_utf8_lossy(&got)
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
        )
    };
    tokio::time::timeout(LIMIT, exchange)
        .await
        .unwrap()
        .unwrap()
}

/// A deny written while an HTTP connection is open applies to its next
/// request: the connection opened under an L4 allow, which needs no
/// per-request rule, but the source's agent judges every request against
/// the view of its moment.
#[tokio::test]
async fn a_deny_applies_to_the_next_request_on_an_open_http_connection() {
    let ca = TestCa::new("test CA");
    let (api, server) = http_on_b().await;
    let (_b, b_inbound, _) = node_b(&ca, view_with(&ca, api, "allow", api_is_http())).await;
    let (a, upstream) = node_a(&ca, b_inbound, view_with(&ca, api, "allow", api_is_http())).await;
    let mut tcp = TcpStream::connect(upstream).await.unwrap();
    assert_eq!(get(&mut tcp).await, "HTTP/1.1 200 OK");
    a.ctx
        .view
        .publish(&mut view_with(&ca, api, "deny", api_is_http()));
    assert_eq!(get(&mut tcp).await, "HTTP/1.1 403 Forbidden");
    server.abort();
}

/// api's instance for the upgrade attack: a server that answers `101`
/// without switching (a status echo, like httpbin's `/status/101`, or a
/// mock answering with the headers the caller names: here the accept value
/// of the key the client sent, which the client knows) to the request for
/// `/status/101` and 200 to any other, reading on as HTTP all the while;
/// the paths it was asked for.
async fn status_echo_on_b() -> (SocketAddr, JoinHandle<()>, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let paths = Arc::new(Mutex::new(Vec::new()));
    let seen = paths.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&got[..end]).to_string();
                        got.drain(..end + 4);
                        let path = head.split(' ').nth(1).unwrap_or("").to_string();
                        seen.lock().unwrap().push(path.clone());
                        let answer: &[u8] = if path == "/status/101" {
                            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                              Connection: Upgrade\r\n\
                              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
                        } else {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n"
                        };
                        if tcp.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, task, paths)
}

/// web may GET api's `/status/` paths and nothing else.
fn only_status(ca: &TestCa, api: SocketAddr) -> View {
    let intention = proto::Intention {
        source: "web".into(),
        destination: "api".into(),
        permissions: vec![proto::Permission {
            action: "allow".into(),
            http: Some(proto::HttpMatch {
                path_prefix: Some("/status/".into()),
                methods: vec!["GET".into()],
                ..Default::default()
            }),
        }],
        ..Default::default()
    };
    view_of(ca, api, intention, api_is_http())
}

/// The upgrade attack: an allowed request answered with a 101 that is no
/// handshake must not turn web's connection into a raw one to the
/// instance, over which a request the intention refuses would reach it
/// unjudged.
#[tokio::test]
async fn a_101_that_is_no_handshake_opens_no_raw_connection_past_the_intentions() {
    let ca = TestCa::new("test CA");
    let (api, server, paths) = status_echo_on_b().await;
    let (_b, b_inbound, _) = node_b(&ca, only_status(&ca, api)).await;
    let (_a, upstream) = node_a(&ca, b_inbound, only_status(&ca, api)).await;
    let mut tcp = TcpStream::connect(upstream).await.unwrap();
    let attack = async {
        tcp.write_all(
            b"GET /status/101 HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\n\
              Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n",
        )
        .await?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tcp.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
        // What the attacker sends next, were the connection raw.
        let _ = tcp
            .write_all(b"DELETE /admin/users/1 HTTP/1.1\r\nHost: api\r\n\r\n")
            .await;
        // Its answer: a refusal, or the connection closed.
        let mut next = Vec::new();
        while !next.windows(4).any(|w| w == b"\r\n\r\n") {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => next.extend_from_slice(&buf[..n]),
            }
        }
        std::io::Result::Ok((
            String::from_utf8_lossy(&answer).to_string(),
            String::from_utf8_lossy(&next).to_string(),
        ))
    };
    let (answer, next) = tokio::time::timeout(LIMIT, attack).await.unwrap().unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 502"),
        "the bare 101 was passed on: {answer:?}"
    );
    assert!(
        next.is_empty() || next.starts_with("HTTP/1.1 403"),
        "the next request: {next:?}"
    );
    let asked = paths.lock().unwrap().clone();
    assert_eq!(asked, ["/status/101"], "the instance was asked {asked:?}");
    server.abort();
}
