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

/// Token rights by (token, service); unknown tokens are "ACL not found".
#[derive(Default)]
struct Table {
    rights: HashMap<(&'static str, &'static str), bool>,
    unreachable: AtomicBool,
    calls: AtomicUsize,
}

impl Judge for Table {
    fn may_write_service<'a>(
        &'a self,
        token: &'a str,
        service: &'a str,
    ) -> BoxFuture<'a, Result<bool, JudgeError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let answer = if self.unreachable.load(Ordering::SeqCst) {
            Err(JudgeError::Unreachable("10.0.0.1:8502: refused".into()))
        } else if !self.rights.keys().any(|(t, _)| *t == token) {
            Err(JudgeError::UnknownToken)
        } else {
            Ok(self.rights.get(&(token, service)).copied().unwrap_or(false))
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
            (("api-w", "api"), true),
            (("web-w", "web"), true),
            (("db-w", "db"), true),
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
        StatusCode::NOT_FOUND
    );
    unchanged(&mut f.updates).await;

    // A note longer than Consul's 4 KiB output limit is cut.
    let note = "n".repeat(5000);
    let (s, _) = put(&f.state, &format!("{API_TTL}?note={note}"), &auth, "").await;
    assert_eq!(s, StatusCode::OK);
    let u = next(&mut f.updates).await;
    assert_eq!(u.output.len(), crate::health::MAX_OUTPUT_BYTES);
}

#[tokio::test]
async fn serves_on_a_socket_and_stops() {
    let mut f = fixture().await;
    let server = LocalApi::bind("127.0.0.1:0".parse().unwrap(), f.state.clone())
        .await
        .unwrap();
    let addr = server.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(async {
        let _ = stop_rx.await;
    }));

    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
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
