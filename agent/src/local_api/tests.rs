//! Local API tests: real health checks, a fixed table of token rights as the
//! judge (the servers' edge), requests answered by [`handle`] and, once, by a
//! served socket.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures::future::BoxFuture;
use http::Method;
use http_body_util::Empty;
use tokio::sync::mpsc;

use super::*;
use crate::config::{CheckConfig, CheckKind};
use crate::health::HealthUpdate;
use crate::running::RegistrationError;

/// Token rights by token: `resource:access:segment` each; unknown tokens
/// are "ACL not found".
#[derive(Default)]
struct Table {
    rights: HashMap<&'static str, Vec<&'static str>>,
    unreachable: AtomicBool,
    calls: AtomicUsize,
    /// The most rights asked in one call.
    largest: AtomicUsize,
}

impl Judge for Table {
    fn authorize<'a>(
        &'a self,
        token: &'a str,
        rights: &'a [Right],
    ) -> BoxFuture<'a, Result<Vec<bool>, JudgeError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.largest.fetch_max(rights.len(), Ordering::SeqCst);
        let answer = if self.unreachable.load(Ordering::SeqCst) {
            Err(JudgeError::Unreachable("10.0.0.1:8502: refused".into()))
        } else if let Some(has) = self.rights.get(token) {
            Ok(rights
                .iter()
                .map(|r| {
                    has.contains(&format!("{}:{}:{}", r.resource, r.access, r.segment).as_str())
                })
                .collect())
        } else {
            Err(JudgeError::UnknownToken)
        };
        Box::pin(async move { answer })
    }
}

struct Fixture {
    state: LocalApiState,
    table: Arc<Table>,
    updates: mpsc::UnboundedReceiver<HealthUpdate>,
}

fn check(id: &str, kind: CheckKind) -> CheckConfig {
    CheckConfig {
        id: id.into(),
        kind,
        interval: Duration::from_secs(60),
        timeout: Duration::from_secs(1),
        deregister_critical_service_after: None,
        name: None,
        notes: None,
        status: None,
        through_api: false,
    }
}

/// Service `api` (id `api-1`) with TTL check `service:api-1:1`, `web` with
/// TTL check `service:web`, `db` with TCP check `db-tcp`. Token `api-w` may
/// write api, `web-w` web, `db-w` db.
async fn fixture() -> Fixture {
    let (tx, mut updates) = mpsc::unbounded_channel();
    let checks = HealthChecks::new(tx);
    let ttl = CheckKind::Ttl {
        ttl: Duration::from_secs(60),
    };
    checks.add("api-1", "api", vec![check("service:api-1:1", ttl.clone())]);
    checks.add("web", "web", vec![check("service:web", ttl)]);
    let tcp = CheckKind::Tcp {
        addr: "127.0.0.1:1".into(),
    };
    checks.add("db", "db", vec![check("db-tcp", tcp)]);
    // All start critical.
    for _ in 0..3 {
        let u = next(&mut updates).await;
        assert_eq!(u.status, HealthStatus::Critical);
    }
    let table = Arc::new(Table {
        rights: HashMap::from([
            ("api-w", vec!["service:write:api"]),
            ("web-w", vec!["service:write:web"]),
            ("db-w", vec!["service:write:db"]),
        ]),
        ..Table::default()
    });
    Fixture {
        state: LocalApiState::new(checks, table.clone()),
        table,
        updates,
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<HealthUpdate>) -> HealthUpdate {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("an update within 5s")
        .expect("channel open")
}

/// Asserts that no health change follows (the check is unchanged).
async fn unchanged(rx: &mut mpsc::UnboundedReceiver<HealthUpdate>) {
    if let Ok(u) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
        panic!("unexpected update {u:?}");
    }
}

async fn put(
    state: &LocalApiState,
    uri: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, String) {
    let mut req = Request::builder().method(Method::PUT).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = handle(
        state,
        req.body(Full::new(Bytes::from(body.to_string()))).unwrap(),
    )
    .await;
    let status = resp.status();
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(b.to_vec()).unwrap())
}

const API_TTL: &str = "/v1/agent/check/pass/service:api-1:1";

#[tokio::test]
async fn pass_warn_fail_and_update_with_a_writer_token() {
    let mut f = fixture().await;
    let auth = [("x-consul-token", "api-w")];
    let (s, b) = put(&f.state, &format!("{API_TTL}?note=all+good"), &auth, "").await;
    assert_eq!((s, b.as_str()), (StatusCode::OK, ""));
    let u = next(&mut f.updates).await;
    assert_eq!(
        (u.service_id.as_str(), u.status, u.output.as_str()),
        ("api-1", HealthStatus::Passing, "all good")
    );

    let bearer = [("authorization", "Bearer api-w")];
    let uri = "/v1/agent/check/warn/service:api-1:1?note=slow";
    assert_eq!(put(&f.state, uri, &bearer, "").await.0, StatusCode::OK);
    assert_eq!(next(&mut f.updates).await.status, HealthStatus::Warning);

    let uri = "/v1/agent/check/fail/service%3Aapi-1%3A1?token=api-w";
    assert_eq!(put(&f.state, uri, &[], "").await.0, StatusCode::OK);
    let u = next(&mut f.updates).await;
    assert_eq!((u.status, u.output.as_str()), (HealthStatus::Critical, ""));

    let body = r#"{"Status":"passing","Output":"back"}"#;
    let uri = "/v1/agent/check/update/service:api-1:1";
    assert_eq!(put(&f.state, uri, &auth, body).await.0, StatusCode::OK);
    let u = next(&mut f.updates).await;
    assert_eq!(
        (u.status, u.output.as_str()),
        (HealthStatus::Passing, "back")
    );

    // The positive answer was remembered: one call to the servers.
    assert_eq!(f.table.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn requests_a_web_page_makes_are_refused_before_anything_is_asked() {
    let mut f = fixture().await;
    let uri = format!("{API_TTL}?token=api-w");
    for headers in [
        // DNS rebinding: the page's own name, now resolving to 127.0.0.1.
        &[("host", "rebound.attacker.example:8500")][..],
        // A cross-site form or fetch to the agent's address.
        &[
            ("host", "127.0.0.1:8500"),
            ("origin", "https://attacker.example"),
        ],
        &[("host", "127.0.0.1:8500"), ("sec-fetch-site", "cross-site")],
    ] {
        let (status, body) = put(&f.state, &uri, headers, "").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{headers:?}: {body}");
        unchanged(&mut f.updates).await;
    }
    assert_eq!(f.table.calls.load(Ordering::SeqCst), 0, "no token judged");
    // The same request from a client addressing the agent is served.
    let headers = [("host", "127.0.0.1:8500")];
    assert_eq!(put(&f.state, &uri, &headers, "").await.0, StatusCode::OK);
    assert_eq!(next(&mut f.updates).await.status, HealthStatus::Passing);
}

#[tokio::test]
async fn refused_attempts_change_nothing() {
    let mut f = fixture().await;
    let fail = "/v1/agent/check/fail/service:web?note=owned";
    // Make web passing first, so that a refused "fail" would show.
    let (s, _) = put(
        &f.state,
        "/v1/agent/check/pass/service:web",
        &[("x-consul-token", "web-w")],
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(next(&mut f.updates).await.status, HealthStatus::Passing);

    let (s, b) = put(&f.state, fail, &[], "").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(b.starts_with("Permission denied: no ACL token"), "{b}");

    let (s, b) = put(&f.state, fail, &[("x-consul-token", "api-w")], "").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(
        b,
        "Permission denied: the token lacks service:write on \"web\" (check \"service:web\")\n"
    );

    let (s, b) = put(&f.state, fail, &[("x-consul-token", "made-up")], "").await;
    assert_eq!((s, b.as_str()), (StatusCode::FORBIDDEN, "ACL not found\n"));
    let (s, _) = put(&f.state, fail, &[("x-consul-token", "bad token")], "").await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // Denials are not remembered: each one asked the servers.
    let calls = f.table.calls.load(Ordering::SeqCst);
    put(&f.state, fail, &[("x-consul-token", "api-w")], "").await;
    assert_eq!(f.table.calls.load(Ordering::SeqCst), calls + 1);

    f.table.unreachable.store(true, Ordering::SeqCst);
    let (s, b) = put(&f.state, fail, &[("x-consul-token", "api-w")], "").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(b.contains("check \"service:web\" unchanged"), "{b}");
    unchanged(&mut f.updates).await;
}

#[tokio::test]
async fn unknown_and_non_ttl_checks_and_bad_requests() {
    let mut f = fixture().await;
    let auth = [("x-consul-token", "api-w")];
    let (s, b) = put(&f.state, "/v1/agent/check/pass/nope", &auth, "").await;
    assert_eq!(
        (s, b.as_str()),
        (StatusCode::NOT_FOUND, "Unknown check ID \"nope\"\n")
    );

    let tcp = "/v1/agent/check/pass/db-tcp";
    let (s, b) = put(&f.state, tcp, &[("x-consul-token", "db-w")], "").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        b,
        "check \"db-tcp\" is a tcp check: only ttl checks take updates\n"
    );
    // Without the right, the kind is not even told.
    let (s, _) = put(&f.state, tcp, &auth, "").await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    let uri = "/v1/agent/check/update/service:api-1:1";
    let (s, b) = put(&f.state, uri, &auth, r#"{"Status":"fine"}"#).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(b.contains("Status \"fine\""), "{b}");
    let big = format!(
        r#"{{"Status":"passing","Output":"{}"}}"#,
        "x".repeat(MAX_BODY_BYTES)
    );
    let (s, _) = put(&f.state, uri, &auth, &big).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    let long = format!("{API_TTL}?note={}", "n".repeat(MAX_URI_BYTES));
    assert_eq!(
        put(&f.state, &long, &auth, "").await.0,
        StatusCode::URI_TOO_LONG
    );

    let req = Request::get(API_TTL).body(Empty::<Bytes>::new()).unwrap();
    let resp = handle(&f.state, req).await;
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(resp.headers()[header::ALLOW], "PUT");
    assert_eq!(
        put(&f.state, "/v1/agent/services", &auth, "").await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    unchanged(&mut f.updates).await;

    // A note longer than Consul's 4 KiB output limit is cut.
    let note = "n".repeat(5000);
    let (s, _) = put(&f.state, &format!("{API_TTL}?note={note}"), &auth, "").await;
    assert_eq!(s, StatusCode::OK);
    let u = next(&mut f.updates).await;
    assert_eq!(u.output.len(), crate::health::MAX_OUTPUT_BYTES);
}

/// `state` served on a socket of its own: its address, what stops it, and
/// its task.
async fn serving(
    state: LocalApiState,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let server = LocalApi::bind("127.0.0.1:0".parse().unwrap(), state)
        .await
        .unwrap();
    let addr = server.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(async {
        let _ = stop_rx.await;
    }));
    (addr, stop_tx, task)
}

#[tokio::test]
async fn serves_on_a_socket_and_stops() {
    let mut f = fixture().await;
    let (addr, stop_tx, task) = serving(f.state.clone()).await;
    let mut sender = crate::test_http::connect(addr).await;
    let req = Request::put(format!("{API_TTL}?note=up"))
        .header(header::HOST, addr.to_string())
        .header("x-consul-token", "api-w")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(
        sender.send_request(req).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(next(&mut f.updates).await.status, HealthStatus::Passing);

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("server stops")
        .unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// Connections held open and idle (kept alive, or on purpose) by one
/// local process take every slot; a new client still gets its answer: the
/// one idle longest is closed for it. Before, the newcomer was closed.
#[tokio::test]
async fn idle_connections_make_room_for_a_new_client() {
    let f = fixture().await;
    let (addr, stop_tx, task) = serving(f.state.clone()).await;
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let mut sender = crate::test_http::connect(addr).await;
    let req = crate::test_http::get(addr, "/v1/agent/self");
    // Answered (this fixture has no configuration to show: 503), not
    // closed.
    let answered = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .expect("answered within 5 s")
        .expect("not closed");
    assert_eq!(answered.status(), StatusCode::SERVICE_UNAVAILABLE);
    // The first held connection (idle longest) was the one closed.
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut held[0], &mut byte),
    )
    .await
    .expect("closed within 5 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    stop_tx.send(()).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
}

#[tokio::test]
async fn bind_error_names_the_field() {
    let f = fixture().await;
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let e = LocalApi::bind(addr, f.state).await.unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("http_addr {addr}: cannot listen")),
        "{e}"
    );
}

// ---------------------------------------------------------------------------
// Agent read endpoints.

const CONFIG: &str = r#"
node_name = "node-a"
datacenter = "dc1"
servers = ["127.0.0.2:8502", "127.0.0.1:8502"]
advertise_addr = "10.77.0.2"
data_dir = "/var/lib/weft-agent"
ebpf = false
token = "agent-secret"
node_meta = { rack = "r1" }

[[service]]
id = "api-1"
name = "api"
port = 9001
tags = ["v1"]
meta = { version = "1" }

[[service]]
name = "web"
port = 9000

[[service]]
name = "db"
port = 5432
"#;

fn config_with(extra: &str) -> Arc<RwLock<Arc<AgentConfig>>> {
    let text = format!("{extra}{CONFIG}");
    Arc::new(RwLock::new(Arc::new(
        AgentConfig::parse(&text, "agent.toml").unwrap(),
    )))
}

/// The fixture with the configuration above; token `reader` reads api and
/// node-a, `all` reads every service.
async fn read_fixture() -> Fixture {
    let mut f = fixture().await;
    let table = Arc::new(Table {
        rights: HashMap::from([
            ("api-w", vec!["service:write:api"]),
            ("reader", vec!["service:read:api", "node:read:node-a"]),
            (
                "all",
                vec!["service:read:api", "service:read:web", "service:read:db"],
            ),
        ]),
        ..Table::default()
    });
    f.state =
        LocalApiState::new(f.state.checks.clone(), table.clone()).with_config(config_with(""));
    f.table = table;
    f
}

async fn get(state: &LocalApiState, uri: &str, token: Option<&str>) -> (StatusCode, String) {
    let mut req = Request::get(uri);
    if let Some(token) = token {
        req = req.header("x-consul-token", token);
    }
    let resp = handle(state, req.body(Empty::<Bytes>::new()).unwrap()).await;
    let status = resp.status();
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(b.to_vec()).unwrap())
}

fn parse_json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test]
async fn agent_self_needs_node_read() {
    let f = read_fixture().await;
    let (s, b) = get(&f.state, "/v1/agent/self", Some("reader")).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let v = parse_json(&b);
    assert_eq!(v["Config"]["Datacenter"], "dc1");
    assert_eq!(v["Config"]["NodeName"], "node-a");
    assert_eq!(v["Config"]["Server"], false);
    assert_eq!(v["Config"]["NodeID"].as_str().unwrap().len(), 36);
    assert_eq!(v["Member"]["Name"], "node-a");
    assert_eq!(v["Member"]["Addr"], "10.77.0.2");
    assert_eq!(v["Member"]["Status"], 1);
    assert_eq!(v["Meta"]["rack"], "r1");

    let (s, b) = get(&f.state, "/v1/agent/self", Some("api-w")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(
        b,
        "Permission denied: the token lacks node:read on \"node-a\"\n"
    );
    assert_eq!(
        get(&f.state, "/v1/agent/self", None).await.0,
        StatusCode::FORBIDDEN
    );
    let (s, b) = get(&f.state, "/v1/agent/self", Some("made-up")).await;
    assert_eq!((s, b.as_str()), (StatusCode::FORBIDDEN, "ACL not found\n"));
    f.table.unreachable.store(true, Ordering::SeqCst);
    // "reader" was remembered; another token cannot be asked.
    assert_eq!(
        get(&f.state, "/v1/agent/self", Some("reader")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        get(&f.state, "/v1/agent/self", Some("all")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn agent_services_are_filtered_by_service_read() {
    let f = read_fixture().await;
    let (s, b) = get(&f.state, "/v1/agent/services", Some("reader")).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let v = parse_json(&b);
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
    let api = &v["api-1"];
    assert_eq!(api["ID"], "api-1");
    assert_eq!(api["Service"], "api");
    assert_eq!(api["Tags"], serde_json::json!(["v1"]));
    assert_eq!(api["Meta"]["version"], "1");
    assert_eq!(api["Port"], 9001);
    assert_eq!(api["Datacenter"], "dc1");
    assert_eq!(
        api["Weights"],
        serde_json::json!({"Passing": 1, "Warning": 1})
    );
    assert_eq!(api["EnableTagOverride"], false);

    let (_, b) = get(&f.state, "/v1/agent/services", Some("all")).await;
    let mut ids: Vec<String> = parse_json(&b)
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    ids.sort();
    assert_eq!(ids, ["api-1", "db", "web"]);
    // A token without reads sees nothing, one call for all three services.
    let calls = f.table.calls.load(Ordering::SeqCst);
    let (s, b) = get(&f.state, "/v1/agent/services", Some("api-w")).await;
    assert_eq!((s, b.as_str()), (StatusCode::OK, "{}"));
    assert_eq!(f.table.calls.load(Ordering::SeqCst), calls + 1);
    assert_eq!(
        get(&f.state, "/v1/agent/services", None).await.0,
        StatusCode::FORBIDDEN
    );

    let (s, b) = get(&f.state, "/v1/agent/service/api-1", Some("reader")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(parse_json(&b)["Service"], "api");
    let (s, b) = get(&f.state, "/v1/agent/service/web", Some("reader")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(b.contains("service:read on \"web\""), "{b}");
    assert_eq!(
        get(&f.state, "/v1/agent/service/nope", Some("reader"))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn agent_checks_show_latest_results() {
    let mut f = read_fixture().await;
    let (s, b) = get(&f.state, "/v1/agent/checks", Some("reader")).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let v = parse_json(&b);
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
    let c = &v["service:api-1:1"];
    assert_eq!(c["Node"], "node-a");
    assert_eq!(c["CheckID"], "service:api-1:1");
    assert_eq!(c["Status"], "critical");
    assert_eq!(c["ServiceID"], "api-1");
    assert_eq!(c["ServiceName"], "api");
    assert_eq!(c["ServiceTags"], serde_json::json!(["v1"]));
    assert_eq!(c["Type"], "ttl");

    let auth = [("x-consul-token", "api-w")];
    let (s, _) = put(&f.state, &format!("{API_TTL}?note=fine"), &auth, "").await;
    assert_eq!(s, StatusCode::OK);
    next(&mut f.updates).await;
    let (_, b) = get(&f.state, "/v1/agent/checks", Some("reader")).await;
    let c = &parse_json(&b)["service:api-1:1"];
    assert_eq!(
        (c["Status"].as_str(), c["Output"].as_str()),
        (Some("passing"), Some("fine"))
    );

    let (_, b) = get(&f.state, "/v1/agent/checks", Some("all")).await;
    let v = parse_json(&b);
    assert_eq!(v.as_object().unwrap().len(), 3, "{v}");
    assert_eq!(v["db-tcp"]["Type"], "tcp");
}

#[tokio::test]
async fn other_agent_endpoints_and_paths() {
    let f = read_fixture().await;
    for path in [
        "/v1/agent/connect/ca/roots",
        "/v1/agent/join/10.0.0.1",
        "/v1/agent/metrics",
    ] {
        let (s, b) = get(&f.state, path, Some("reader")).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
        assert!(b.contains("not supported by weft yet"), "{b}");
    }
    assert_eq!(
        get(&f.state, "/metrics", None).await.0,
        StatusCode::NOT_FOUND
    );
    // Without a forwarder, nothing is forwarded.
    assert_eq!(
        get(&f.state, "/v1/catalog/nodes", Some("reader")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn many_rights_are_asked_in_batches_the_servers_take() {
    let f = read_fixture().await;
    let names: Vec<String> = (0..130).map(|i| format!("svc-{i}")).collect();
    let mut rights: Vec<Right> = names.iter().map(|n| Right::service_read(n)).collect();
    rights.push(Right::service_read("api"));
    let answers = f.state.rights("reader", &rights).await.unwrap();
    assert_eq!(answers.len(), 131);
    assert_eq!(answers.iter().filter(|a| **a).count(), 1);
    assert!(answers[130]);
    assert_eq!(f.table.calls.load(Ordering::SeqCst), 3);
    assert_eq!(
        f.table.largest.load(Ordering::SeqCst),
        authz::MAX_RIGHTS_PER_CALL
    );
    // The "yes" was remembered; only the rest is asked again.
    let answers = f.state.rights("reader", &rights).await.unwrap();
    assert!(answers[130]);
    assert_eq!(
        f.table.largest.load(Ordering::SeqCst),
        authz::MAX_RIGHTS_PER_CALL
    );
    assert_eq!(f.table.calls.load(Ordering::SeqCst), 6);
}

/// Signs with a self-signed certificate for token `db-w` and service `db`;
/// refuses other tokens as the servers would. Records the tokens it saw.
#[derive(Default)]
struct Signer {
    seen: Mutex<Vec<String>>,
}

impl leaf::LeafSigner for Signer {
    fn sign_as<'a>(
        &'a self,
        token: &'a str,
        _csr_pem: String,
        service: &'a str,
    ) -> leaf::SignFuture<'a> {
        self.seen.lock().unwrap().push(token.to_string());
        let answer = match (token, service) {
            ("db-w", "db") => {
                let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
                let cert = rcgen::CertificateParams::default()
                    .self_signed(&key)
                    .unwrap();
                Ok(weft_api::proto::SignedLeaf {
                    spiffe_id: "spiffe://t.weft/ns/default/dc/dc1/svc/db".into(),
                    cert_pem: cert.pem(),
                    ..Default::default()
                })
            }
            ("db-w" | "web-w", _) => Err(crate::control::ControlError::Refused {
                what: "a certificate".into(),
                status: tonic::Status::permission_denied("no service:write"),
            }),
            _ => Err(crate::control::ControlError::Refused {
                what: "a certificate".into(),
                status: tonic::Status::unauthenticated("ACL token not found"),
            }),
        };
        Box::pin(async move { answer })
    }
}

#[tokio::test]
async fn leaves_are_signed_with_the_callers_token() {
    let f = fixture().await;
    let signer = Arc::new(Signer::default());
    let state = f.state.clone().with_signer(signer.clone());
    let (s, b) = get(&state, "/v1/agent/connect/ca/leaf/db", Some("db-w")).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let v = parse_json(&b);
    assert_eq!(v["Service"], "db");
    assert_eq!(v["ServiceURI"], "spiffe://t.weft/ns/default/dc/dc1/svc/db");
    assert!(v["PrivateKeyPEM"]
        .as_str()
        .is_some_and(|k| k.contains("PRIVATE KEY")));
    for (token, want) in [
        (Some("web-w"), StatusCode::FORBIDDEN),
        (Some("stranger"), StatusCode::FORBIDDEN),
        (None, StatusCode::FORBIDDEN),
    ] {
        let (s, b) = get(&state, "/v1/agent/connect/ca/leaf/db", token).await;
        assert_eq!(s, want, "{token:?}: {b}");
    }
    for uri in [
        "/v1/agent/connect/ca/leaf/db?index=3",
        "/v1/agent/connect/ca/leaf/db?cached",
        "/v1/agent/connect/ca/leaf/db?nonsense=1",
        "/v1/agent/connect/ca/leaf/Not_A_Name",
    ] {
        let (s, b) = get(&state, uri, Some("db-w")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {b}");
    }
    // Only the caller's tokens reached the signer, and none of the refused
    // requests above it.
    assert_eq!(*signer.seen.lock().unwrap(), ["db-w", "web-w", "stranger"]);
    // Without a signer: 503.
    let (s, _) = get(&f.state, "/v1/agent/connect/ca/leaf/db", Some("db-w")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
}

/// Keeps registrations in memory.
#[derive(Default)]
struct Registrations(Mutex<Vec<RegisteredService>>);

impl Registrar for Registrations {
    fn register(
        &self,
        service: RegisteredService,
        replacing: Option<String>,
    ) -> RegistrarFuture<'_> {
        let mut all = self.0.lock().unwrap();
        let current = all.iter().find(|r| r.id() == service.id());
        if current.map(|r| &r.name) != replacing.as_ref() {
            let changed = RegistrationError::Changed(service.id().to_string());
            return Box::pin(async { Err(changed) });
        }
        all.retain(|r| r.id() != service.id());
        all.push(service);
        Box::pin(async { Ok("registered".to_string()) })
    }
    fn deregister(&self, id: String, name: String) -> RegistrarFuture<'_> {
        let mut all = self.0.lock().unwrap();
        let before = all.len();
        all.retain(|r| r.id() != id || r.name != name);
        let answer = match all.len() < before {
            true => Ok("deregistered".to_string()),
            false => Err(RegistrationError::Changed(id)),
        };
        Box::pin(async { answer })
    }
    fn not_registered(&self, id: &str) -> RegistrationError {
        RegistrationError::NotFound(id.to_string())
    }
    fn registered_name(&self, id: &str) -> Option<String> {
        self.registration(id).map(|r| r.name)
    }
    fn registration(&self, id: &str) -> Option<RegisteredService> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|r| r.id() == id)
            .cloned()
    }
    fn api_checks(&self, _service_id: &str) -> Vec<crate::registered::RegisteredCheck> {
        Vec::new()
    }
    fn register_check(
        &self,
        _service_id: String,
        _check: crate::registered::RegisteredCheck,
    ) -> RegistrarFuture<'_> {
        Box::pin(async { Err(crate::running::RegistrationError::Invalid("no file".into())) })
    }
    fn deregister_check(&self, check_id: String) -> RegistrarFuture<'_> {
        Box::pin(async { Err(crate::running::RegistrationError::CheckNotFound(check_id)) })
    }
}

#[tokio::test]
async fn checks_join_their_services_registration_up_to_the_limit() {
    let f = fixture().await;
    let registrations = Arc::new(Registrations::default());
    registrations
        .register(
            RegisteredService::from_json(br#"{"ID":"db-1","Name":"db","Port":5432}"#).unwrap(),
            None,
        )
        .await
        .unwrap();
    let state = f.state.clone().with_registrar(registrations.clone());
    let register = "/v1/agent/check/register";
    let db_w = [("x-consul-token", "db-w")];
    let ttl = r#"{"Name":"beat","ServiceID":"db-1","TTL":"30s"}"#;
    let (s, b) = put(&state, register, &[("x-consul-token", "web-w")], ttl).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, b) = put(&state, register, &[], ttl).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let ghost = r#"{"Name":"beat","ServiceID":"ghost","TTL":"30s"}"#;
    let (s, b) = put(&state, register, &db_w, ghost).await;
    assert!(
        s == StatusCode::BAD_REQUEST && b.contains("does not exist"),
        "{b}"
    );
    assert!(registrations
        .registration("db-1")
        .unwrap()
        .checks
        .is_empty());

    let (s, b) = put(&state, register, &db_w, ttl).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    // Registered again under its id: replaced, not added.
    let (s, b) = put(&state, register, &db_w, ttl).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let checks = registrations.registration("db-1").unwrap().checks;
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0].check_id.as_deref(), Some("beat"));
    assert_eq!(checks[0].ttl.as_deref(), Some("30s"));

    for n in 1..crate::config::MAX_CHECKS_PER_SERVICE {
        let c = format!(r#"{{"Name":"c{n}","ServiceID":"db-1","TTL":"30s"}}"#);
        let (s, b) = put(&state, register, &db_w, &c).await;
        assert_eq!(s, StatusCode::OK, "{n}: {b}");
    }
    let c = r#"{"Name":"one-more","ServiceID":"db-1","TTL":"30s"}"#;
    let (s, b) = put(&state, register, &db_w, c).await;
    assert!(
        s == StatusCode::BAD_REQUEST && b.contains("at most 32 per service"),
        "{s}: {b}"
    );
    let huge = format!(
        r#"{{"Name":"n","ServiceID":"db-1","TTL":"30s","Notes":"{}"}}"#,
        "x".repeat(MAX_BODY_BYTES)
    );
    let (s, _) = put(&state, register, &db_w, &huge).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
}

/// One service's token cannot take over or remove another service's
/// instance: registering `db-1` again as web takes the right to write db
/// too; a deregistration is authorized before anything changes (an id
/// registered nowhere, asked with a made-up token, changes nothing and
/// reaches no registrar); and a registration is replaced or removed only
/// while it is of the service the caller was allowed.
#[tokio::test]
async fn a_registration_changes_only_with_the_right_to_write_its_service() {
    let f = fixture().await;
    let registrations = Arc::new(Registrations::default());
    let state = f.state.clone().with_registrar(registrations.clone());
    let register = "/v1/agent/service/register";
    let as_token = |t: &'static str| [("x-consul-token", t)];
    let db = r#"{"ID":"db-1","Name":"db","Port":5432}"#;
    let (s, b) = put(&state, register, &as_token("db-w"), db).await;
    assert_eq!(s, StatusCode::OK, "{b}");

    let as_web = r#"{"ID":"db-1","Name":"web","Port":8080}"#;
    let (s, b) = put(&state, register, &as_token("web-w"), as_web).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert_eq!(registrations.registered_name("db-1").as_deref(), Some("db"));

    let deregister = "/v1/agent/service/deregister/db-1";
    let (s, b) = put(&state, deregister, &as_token("web-w"), "").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, b) = put(
        &state,
        "/v1/agent/service/deregister/web-9",
        &as_token("x"),
        "",
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert_eq!(registrations.registered_name("db-1").as_deref(), Some("db"));

    // Re-registered under another name between the check and the change:
    // refused, and the new registration stays.
    let changed = registrations.deregister("db-1".into(), "web".into()).await;
    assert!(
        matches!(changed, Err(RegistrationError::Changed(_))),
        "{changed:?}"
    );
    let replaced = (registrations.register(
        RegisteredService::from_json(as_web.as_bytes()).unwrap(),
        None,
    ))
    .await;
    assert!(
        matches!(replaced, Err(RegistrationError::Changed(_))),
        "{replaced:?}"
    );

    let (s, b) = put(&state, deregister, &as_token("db-w"), "").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(registrations.registered_name("db-1"), None);
}
