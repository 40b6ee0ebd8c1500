//! Forwarding against a real HTTPS server on loopback: a tiny hyper server
//! with a certificate from a test CA (the one the forwarder trusts), which
//! records every request it gets.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::authz::{Judge, JudgeError, Right};
use super::forward::{Forwarder, MAX_FORWARD_BODY_BYTES};
use super::{handle, LocalApiState};
use crate::config::AgentConfig;
use crate::health::HealthChecks;

/// What the test server got.
#[derive(Debug)]
struct Seen {
    method: Method,
    target: String,
    headers: http::HeaderMap,
    body: Bytes,
    /// Which TLS connection it came on (counted from 0).
    conn: usize,
}

/// Allows nothing: forwarding never asks the judge.
struct NoOne;

impl Judge for NoOne {
    fn authorize<'a>(
        &'a self,
        _token: &'a str,
        rights: &'a [Right],
    ) -> BoxFuture<'a, Result<Vec<bool>, JudgeError>> {
        let n = rights.len();
        Box::pin(async move { Ok(vec![false; n]) })
    }
}

/// An HTTPS server on 127.0.0.1 with a `server.dc1.weft` certificate from a
/// new CA; the CA's PEM, the port, and what the server got.
async fn server() -> (String, u16, mpsc::UnboundedReceiver<Seen>) {
    let ca = weft_api::tls_certs::create_ca("test CA", 1).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let rx = serve(&ca, listener, "true");
    (ca.cert_pem, port, rx)
}

/// Serves HTTPS on `listener` with a `server.dc1.weft` certificate from
/// `ca`, answering with `X-Consul-KnownLeader: known_leader`; what it got.
fn serve(
    ca: &weft_api::tls_certs::CertPair,
    listener: TcpListener,
    known_leader: &'static str,
) -> mpsc::UnboundedReceiver<Seen> {
    let leaf = weft_api::tls_certs::create_server_cert(ca, "dc1", &[], &[], 1).unwrap();
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for conn in 0.. {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        let target = parts.uri.to_string();
                        let answer = match parts.uri.path() {
                            "/v1/catalog/nodes" => {
                                r#"[{"Node":"node-a","Address":"10.77.0.2","Datacenter":"dc1"},{"Node":"node-b","Address":"10.77.0.3","Datacenter":"dc1"}]"#
                            }
                            "/v1/health/state/critical" => {
                                r#"[{"Node":"node-b","CheckID":"serfHealth","Status":"critical"}]"#
                            }
                            _ => r#"{"ok":true}"#,
                        };
                        let _ = tx.send(Seen {
                            method: parts.method,
                            target,
                            headers: parts.headers,
                            body,
                            conn,
                        });
                        let resp = Response::builder()
                            .status(StatusCode::OK)
                            .header("content-type", "application/json")
                            .header("x-consul-index", "42")
                            .header("x-consul-knownleader", known_leader)
                            .body(Full::new(Bytes::from_static(answer.as_bytes())))
                            .unwrap();
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    rx
}

/// A port nothing listens on.
async fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// A state forwarding to `servers` at `port`, built from a configuration
/// with the agent's own token `agent-secret`.
fn state(ca_pem: &str, servers: &[&str], port: u16) -> (LocalApiState, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let servers: Vec<String> = servers.iter().map(|s| format!("{s:?}")).collect();
    let text = format!(
        r#"
node_name = "node-a"
datacenter = "dc1"
servers = [{}]
server_http_port = {port}
advertise_addr = "10.77.0.2"
data_dir = "/var/lib/weft-agent"
ebpf = false
token = "agent-secret"
ca_file = {:?}
"#,
        servers.join(", "),
        ca_file.display().to_string()
    );
    let config = AgentConfig::parse(&text, "agent.toml").unwrap();
    let forwarder = Arc::new(Forwarder::from_config(&config).unwrap());
    let (tx, _rx) = mpsc::unbounded_channel();
    let state = LocalApiState::new(HealthChecks::new(tx), Arc::new(NoOne))
        .with_config(Arc::new(RwLock::new(Arc::new(config))))
        .with_forwarder(forwarder);
    (state, dir)
}

async fn send(
    state: &LocalApiState,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (StatusCode, http::HeaderMap, String) {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = handle(state, req.body(Full::new(Bytes::from(body))).unwrap()).await;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn has_agent_token(headers: &http::HeaderMap) -> bool {
    headers
        .values()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("agent-secret")))
}

#[tokio::test]
async fn forwards_with_the_callers_token_only() {
    let (ca, port, mut seen) = server().await;
    // The first server's host is not listening: it is skipped.
    let (state, _dir) = state(&ca, &["127.0.0.2:8502", "127.0.0.1:8502"], port);

    let (s, h, b) = send(
        &state,
        Method::PUT,
        "http://127.0.0.1:8500/v1/kv/app/config?cas=0&flags=3",
        &[
            ("x-consul-token", "caller-tok"),
            ("content-type", "application/octet-stream"),
            ("connection", "keep-alive"),
        ],
        b"hello".to_vec(),
    )
    .await;
    assert_eq!((s, b.as_str()), (StatusCode::OK, r#"{"ok":true}"#));
    assert_eq!(h["x-consul-index"], "42");
    assert_eq!(h["x-consul-knownleader"], "true");
    assert_eq!(h["content-type"], "application/json");
    let got = seen.recv().await.unwrap();
    assert_eq!(got.method, Method::PUT);
    assert_eq!(got.target, "/v1/kv/app/config?cas=0&flags=3");
    assert_eq!(got.body, "hello");
    assert_eq!(got.headers["x-consul-token"], "caller-tok");
    assert_eq!(got.headers["content-type"], "application/octet-stream");
    assert!(!got.headers.contains_key("authorization"));
    assert!(!has_agent_token(&got.headers), "{:?}", got.headers.keys());

    // No token: none sent. The connection is reused.
    let first_conn = got.conn;
    let (s, _, _) = send(&state, Method::GET, "/v1/status/leader", &[], vec![]).await;
    assert_eq!(s, StatusCode::OK);
    let got = seen.recv().await.unwrap();
    assert_eq!(got.conn, first_conn);
    assert!(!got.headers.contains_key("x-consul-token"));
    assert!(!got.headers.contains_key("authorization"));
    assert!(!has_agent_token(&got.headers));

    // A query token travels as the header, never in the URL.
    let (s, _, _) = send(
        &state,
        Method::GET,
        "/v1/health/service/web?passing&token=q-tok&index=7&wait=1s",
        &[],
        vec![],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let got = seen.recv().await.unwrap();
    assert_eq!(got.target, "/v1/health/service/web?passing&index=7&wait=1s");
    assert_eq!(got.headers["x-consul-token"], "q-tok");

    // Over 1 MiB: 413, and nothing reaches the server.
    let big = vec![b'x'; MAX_FORWARD_BODY_BYTES + 1];
    let (s, _, _) = send(
        &state,
        Method::PUT,
        "/v1/kv/big",
        &[("x-consul-token", "caller-tok")],
        big,
    )
    .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    // Exactly 1 MiB passes.
    let (s, _, _) = send(
        &state,
        Method::PUT,
        "/v1/kv/big",
        &[("x-consul-token", "caller-tok")],
        vec![b'x'; MAX_FORWARD_BODY_BYTES],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let got = seen.recv().await.unwrap();
    assert_eq!(got.body.len(), MAX_FORWARD_BODY_BYTES);
    assert!(seen.try_recv().is_err());
}

#[tokio::test]
async fn members_from_the_catalog() {
    let (ca, port, mut seen) = server().await;
    let (state, _dir) = state(&ca, &["127.0.0.1:8502"], port);
    let (s, _, b) = send(
        &state,
        Method::GET,
        "/v1/agent/members",
        &[("authorization", "Bearer caller-tok")],
        vec![],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    let status: HashMap<&str, u64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["Name"].as_str().unwrap(), m["Status"].as_u64().unwrap()))
        .collect();
    assert_eq!(status, HashMap::from([("node-a", 1), ("node-b", 4)]));
    for _ in 0..2 {
        let got = seen.recv().await.unwrap();
        assert_eq!(got.headers["x-consul-token"], "caller-tok");
    }
}

#[tokio::test]
async fn unreachable_servers_are_503() {
    let (ca, _port, _seen) = server().await;
    let port = dead_port().await;
    let (state, _dir) = state(&ca, &["127.0.0.1:8502", "127.0.0.2:8502"], port);
    let (s, _, b) = send(
        &state,
        Method::GET,
        "/v1/catalog/services",
        &[("x-consul-token", "caller-tok")],
        vec![],
    )
    .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        b.starts_with("cannot reach the servers' HTTP API: 127.0.0.1:"),
        "{b}"
    );
    assert_eq!(b.lines().count(), 1, "{b}");
    assert!(!b.contains("caller-tok"));
}

#[tokio::test]
async fn a_server_with_another_name_is_refused() {
    let (ca, port, mut seen) = server().await;
    let (state, _dir) = state(&ca, &["127.0.0.1:8502"], port);
    // Same CA, another expected name.
    let other = Forwarder::new(
        vec![format!("127.0.0.1:{port}")],
        ca.as_bytes(),
        "server.dc2.weft",
    )
    .unwrap();
    let state = state.with_forwarder(Arc::new(other));
    let (s, _, b) = send(&state, Method::GET, "/v1/catalog/nodes", &[], vec![]).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    assert!(b.contains("TLS"), "{b}");
    assert!(seen.try_recv().is_err());
}

#[tokio::test]
async fn forwards_on_a_served_socket() {
    let (ca, port, mut seen) = server().await;
    let (state, _dir) = state(&ca, &["127.0.0.1:8502"], port);
    let api = super::LocalApi::bind("127.0.0.1:0".parse().unwrap(), state)
        .await
        .unwrap();
    let addr = api.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(api.serve(async {
        let _ = stop_rx.await;
    }));
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    // Two requests on one kept-alive connection.
    for key in ["a", "b"] {
        let req = Request::get(format!("/v1/kv/{key}?index=3&wait=2s"))
            .header(http::header::HOST, addr.to_string())
            .header("x-consul-token", "caller-tok")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-consul-index"], "42");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, r#"{"ok":true}"#);
        let got = seen.recv().await.unwrap();
        assert_eq!(got.target, format!("/v1/kv/{key}?index=3&wait=2s"));
    }
    stop_tx.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), task)
        .await
        .expect("server stops")
        .unwrap();
}

#[tokio::test]
async fn after_a_server_out_of_contact_requests_go_to_another() {
    let ca = weft_api::tls_certs::create_ca("test CA", 1).unwrap();
    // Two servers at one port on two loopback addresses, as servers on two
    // hosts: the first says it is out of contact with its cluster.
    let cut_off = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = cut_off.local_addr().unwrap().port();
    let in_contact = TcpListener::bind(("127.0.0.2", port)).await.unwrap();
    let mut at_cut_off = serve(&ca, cut_off, "false");
    let mut at_in_contact = serve(&ca, in_contact, "true");
    let (state, _dir) = state(&ca.cert_pem, &["127.0.0.1:8502", "127.0.0.2:8502"], port);
    let get = || {
        send(
            &state,
            Method::GET,
            "/v1/catalog/services?stale",
            &[],
            vec![],
        )
    };
    // Another datacenter's answer (`?dc=`) says nothing of this one's
    // servers: it moves nothing.
    let (s, _, _) = send(&state, Method::GET, "/v1/status/leader?dc=dc2", &[], vec![]).await;
    assert_eq!(s, StatusCode::OK);
    assert!(at_cut_off.recv().await.is_some());
    // The first request reaches the first server and its answer, saying
    // so, goes back as it came (a request is sent once).
    let (s, h, _) = get().await;
    assert_eq!(
        (s, h["x-consul-knownleader"].to_str().unwrap()),
        (StatusCode::OK, "false")
    );
    assert!(at_cut_off.recv().await.is_some());
    // The next ones go to the other, and stay there.
    for _ in 0..3 {
        let (s, h, _) = get().await;
        assert_eq!(
            (s, h["x-consul-knownleader"].to_str().unwrap()),
            (StatusCode::OK, "true")
        );
        assert!(at_in_contact.recv().await.is_some());
    }
    assert!(
        at_cut_off.try_recv().is_err(),
        "the cut-off server got more"
    );
}
