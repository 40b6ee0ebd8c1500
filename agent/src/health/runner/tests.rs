//! Runner tests against real listeners on 127.0.0.1: a tiny hyper server with a
//! switchable response code, closed and opened TCP ports, a tonic-health server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic_health::ServingStatus;

use super::*;

static NEXT_ID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

fn check(kind: CheckKind, interval_ms: u64, timeout_ms: u64) -> CheckConfig {
    CheckConfig {
        id: format!("check-{}", NEXT_ID.fetch_add(1, Ordering::SeqCst)),
        kind,
        interval: Duration::from_millis(interval_ms),
        timeout: Duration::from_millis(timeout_ms),
        deregister_critical_service_after: None,
        name: None,
        notes: None,
        status: None,
        through_api: false,
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<HealthUpdate>) -> HealthUpdate {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an update within 10s")
        .expect("channel open")
}

/// Asserts that no update arrives for `ms` milliseconds.
async fn quiet(rx: &mut mpsc::UnboundedReceiver<HealthUpdate>, ms: u64) {
    if let Ok(u) = tokio::time::timeout(Duration::from_millis(ms), rx.recv()).await {
        panic!("unexpected update {u:?}");
    }
}

/// An HTTP server answering every request with the code in `code`.
async fn http_server(code: Arc<AtomicU16>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let code = code.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let status = code.load(Ordering::SeqCst);
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from_static(b"body")))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn http_check_reports_each_change_once() {
    let code = Arc::new(AtomicU16::new(200));
    let addr = http_server(code.clone()).await;
    let url = format!("http://{addr}/healthz");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _runner = CheckRunner::start(
        "api",
        "svc",
        vec![check(CheckKind::Http { url: url.clone() }, 25, 1000)],
        tx,
    );

    let u = next(&mut rx).await;
    assert_eq!(
        u,
        HealthUpdate {
            service_id: "api".into(),
            status: HealthStatus::Passing,
            output: format!("HTTP GET {url}: 200 OK"),
        }
    );
    quiet(&mut rx, 200).await;

    code.store(429, Ordering::SeqCst);
    let u = next(&mut rx).await;
    assert_eq!(u.status, HealthStatus::Warning);
    assert_eq!(u.output, format!("HTTP GET {url}: 429 Too Many Requests"));
    quiet(&mut rx, 200).await;

    code.store(500, Ordering::SeqCst);
    let u = next(&mut rx).await;
    assert_eq!(u.status, HealthStatus::Critical);
    assert_eq!(
        u.output,
        format!("HTTP GET {url}: 500 Internal Server Error")
    );
    code.store(503, Ordering::SeqCst); // still critical: no update
    quiet(&mut rx, 200).await;

    code.store(204, Ordering::SeqCst);
    assert_eq!(next(&mut rx).await.status, HealthStatus::Passing);
    quiet(&mut rx, 150).await;
}

#[tokio::test]
async fn http_check_times_out() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let url = format!("http://{addr}/");
    let _runner = CheckRunner::start(
        "api",
        "svc",
        vec![check(CheckKind::Http { url: url.clone() }, 1000, 100)],
        tx,
    );
    let u = next(&mut rx).await;
    assert_eq!(u.status, HealthStatus::Critical);
    assert_eq!(u.output, format!("HTTP GET {url}: timed out after 100ms"));
}

#[tokio::test]
async fn http_check_connection_refused_is_critical() {
    let addr = free_addr().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let url = format!("http://{addr}/healthz");
    let _runner = CheckRunner::start(
        "api",
        "svc",
        vec![check(CheckKind::Http { url: url.clone() }, 1000, 1000)],
        tx,
    );
    let u = next(&mut rx).await;
    assert_eq!(u.status, HealthStatus::Critical);
    assert!(
        u.output.starts_with(&format!("HTTP GET {url}: connect: ")),
        "{}",
        u.output
    );
}

#[tokio::test]
async fn tcp_check_follows_the_port() {
    let addr = free_addr().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _runner = CheckRunner::start(
        "db",
        "svc",
        vec![check(
            CheckKind::Tcp {
                addr: addr.to_string(),
            },
            25,
            500,
        )],
        tx,
    );
    let u = next(&mut rx).await;
    assert_eq!(u.status, HealthStatus::Critical);
    assert!(
        u.output.starts_with(&format!("TCP connect {addr}: ")),
        "{}",
        u.output
    );
    quiet(&mut rx, 150).await;

    let listener = TcpListener::bind(addr).await.unwrap();
    let u = next(&mut rx).await;
    assert_eq!(
        (u.status, u.output.as_str()),
        (
            HealthStatus::Passing,
            format!("TCP connect {addr}: success").as_str()
        )
    );
    quiet(&mut rx, 150).await;

    drop(listener);
    assert_eq!(next(&mut rx).await.status, HealthStatus::Critical);
}

#[tokio::test]
async fn grpc_check_uses_the_health_protocol() {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("web", ServingStatus::NotServing)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let (tx, mut rx) = mpsc::unbounded_channel();
    let grpc = |service: &str| {
        check(
            CheckKind::Grpc {
                addr: addr.to_string(),
                service: service.into(),
            },
            25,
            1000,
        )
    };
    let _web = CheckRunner::start("web", "svc", vec![grpc("web")], tx.clone());
    let u = next(&mut rx).await;
    assert_eq!(
        (u.status, u.output.as_str()),
        (
            HealthStatus::Critical,
            format!("gRPC health {addr}/web: NOT_SERVING").as_str()
        )
    );
    quiet(&mut rx, 150).await;
    reporter
        .set_service_status("web", ServingStatus::Serving)
        .await;
    let u = next(&mut rx).await;
    assert_eq!(
        (u.status, u.output.as_str()),
        (
            HealthStatus::Passing,
            format!("gRPC health {addr}/web: SERVING").as_str()
        )
    );
    quiet(&mut rx, 150).await;
    drop(_web);

    let _other = CheckRunner::start("other", "svc", vec![grpc("nope")], tx);
    let u = next(&mut rx).await;
    assert_eq!(u.service_id, "other");
    assert_eq!(u.status, HealthStatus::Critical);
    assert!(
        u.output
            .starts_with(&format!("gRPC health {addr}/nope: NotFound")),
        "{}",
        u.output
    );
}

#[tokio::test]
async fn grpc_check_unreachable_is_critical() {
    let addr = free_addr().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _r = CheckRunner::start(
        "web",
        "svc",
        vec![check(
            CheckKind::Grpc {
                addr: addr.to_string(),
                service: String::new(),
            },
            1000,
            1000,
        )],
        tx,
    );
    let u = next(&mut rx).await;
    assert_eq!(u.status, HealthStatus::Critical);
    assert!(
        u.output.starts_with(&format!("gRPC health {addr}: ")),
        "{}",
        u.output
    );
}

fn ttl_check(id: &str, ttl_ms: u64) -> CheckConfig {
    CheckConfig {
        id: id.into(),
        ..check(
            CheckKind::Ttl {
                ttl: Duration::from_millis(ttl_ms),
            },
            10_000,
            2_000,
        )
    }
}

#[tokio::test]
async fn ttl_check_with_an_initial_status_starts_there_and_expires() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let checks = HealthChecks::new(tx);
    let ttl = CheckConfig {
        status: Some(HealthStatus::Passing),
        ..ttl_check("service:worker-2", 300)
    };
    checks.add("worker-2", "worker", vec![ttl]);
    let u = next(&mut rx).await;
    assert_eq!(
        (u.status, u.output.as_str()),
        (HealthStatus::Passing, "initial status")
    );
    let u = next(&mut rx).await;
    assert_eq!(u.status, HealthStatus::Critical);
    assert!(u.output.starts_with("TTL expired"), "{}", u.output);
}

#[tokio::test]
async fn replacing_checks_keeps_the_last_update_of_ttl_checks_kept() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let checks = HealthChecks::new(tx);
    checks.add("jobs-1", "jobs", vec![ttl_check("beat", 60_000)]);
    assert_eq!(next(&mut rx).await.status, HealthStatus::Critical);
    checks
        .update_ttl("beat", HealthStatus::Passing, "beating")
        .unwrap();
    assert_eq!(next(&mut rx).await.status, HealthStatus::Passing);

    // A check added: "beat" goes on passing.
    checks.add(
        "jobs-1",
        "jobs",
        vec![ttl_check("beat", 60_000), ttl_check("other", 60_000)],
    );
    let u = next(&mut rx).await;
    assert_eq!(u.status, HealthStatus::Critical);
    assert!(!u.output.contains("beating"), "{}", u.output);
    let states = checks.states();
    let beat = states.iter().find(|s| s.info.check_id == "beat").unwrap();
    assert_eq!(
        beat.result,
        Some(CheckResult::new(HealthStatus::Passing, "beating"))
    );

    // "other" removed, "beat" given another TTL: it starts over.
    checks.add("jobs-1", "jobs", vec![ttl_check("beat", 30_000)]);
    let u = next(&mut rx).await;
    assert_eq!(u.status, HealthStatus::Critical);
    assert!(u.output.contains("no refresh received yet"), "{}", u.output);
}

#[tokio::test]
async fn ttl_check_starts_critical_takes_updates_and_expires() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let checks = HealthChecks::new(tx);
    checks.add(
        "worker-1",
        "worker",
        vec![ttl_check("service:worker-1", 300)],
    );
    let u = next(&mut rx).await;
    assert_eq!(u.status, HealthStatus::Critical);
    assert!(u.output.contains("no refresh received yet"), "{}", u.output);

    checks
        .update_ttl("service:worker-1", HealthStatus::Passing, "working")
        .unwrap();
    let u = next(&mut rx).await;
    assert_eq!(
        (u.status, u.output.as_str()),
        (HealthStatus::Passing, "working")
    );
    // Updates that keep the status are not reported.
    checks
        .update_ttl("service:worker-1", HealthStatus::Passing, "still working")
        .unwrap();
    quiet(&mut rx, 100).await;

    let started = std::time::Instant::now();
    let u = next(&mut rx).await;
    assert_eq!(u.status, HealthStatus::Critical);
    assert!(u.output.starts_with("TTL expired"), "{}", u.output);
    assert!(started.elapsed() >= Duration::from_millis(150));

    checks
        .update_ttl("service:worker-1", HealthStatus::Warning, "backlog")
        .unwrap();
    assert_eq!(next(&mut rx).await.status, HealthStatus::Warning);
    checks
        .update_ttl("service:worker-1", HealthStatus::Critical, "down")
        .unwrap();
    let u = next(&mut rx).await;
    assert_eq!(
        (u.status, u.output.as_str()),
        (HealthStatus::Critical, "down")
    );
}

#[tokio::test]
async fn ttl_updates_reach_only_the_check_they_name() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let checks = HealthChecks::new(tx);
    checks.add(
        "api",
        "api",
        vec![
            ttl_check("service:api:1", 60_000),
            ttl_check("api-2", 60_000),
        ],
    );
    assert_eq!(next(&mut rx).await.status, HealthStatus::Critical);
    checks
        .update_ttl("service:api:1", HealthStatus::Passing, "one")
        .unwrap();
    // The other check has had no update: still critical.
    quiet(&mut rx, 100).await;
    checks
        .update_ttl("api-2", HealthStatus::Warning, "two")
        .unwrap();
    let u = next(&mut rx).await;
    assert_eq!(
        (u.status, u.output.as_str()),
        (HealthStatus::Warning, "two")
    );
}

#[tokio::test]
async fn worst_check_wins() {
    let code = Arc::new(AtomicU16::new(200));
    let http_addr = http_server(code.clone()).await;
    let tcp_addr = free_addr().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _runner = CheckRunner::start(
        "api",
        "svc",
        vec![
            check(
                CheckKind::Http {
                    url: format!("http://{http_addr}/"),
                },
                25,
                1000,
            ),
            check(
                CheckKind::Tcp {
                    addr: tcp_addr.to_string(),
                },
                25,
                1000,
            ),
        ],
        tx,
    );
    let u = next(&mut rx).await;
    assert_eq!(u.status, HealthStatus::Critical);
    assert!(u.output.starts_with("TCP connect"), "{}", u.output);
    assert!(!u.output.contains("HTTP"), "{}", u.output);

    let _listener = TcpListener::bind(tcp_addr).await.unwrap();
    let u = next(&mut rx).await;
    assert_eq!(u.status, HealthStatus::Passing);
    assert_eq!(u.output.lines().count(), 2, "{}", u.output);

    code.store(429, Ordering::SeqCst);
    assert_eq!(next(&mut rx).await.status, HealthStatus::Warning);
    quiet(&mut rx, 150).await;
}

#[tokio::test]
async fn no_checks_is_passing_once() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _runner = CheckRunner::start("plain", "svc", vec![], tx);
    let u = next(&mut rx).await;
    assert_eq!(u.status, HealthStatus::Passing);
    quiet(&mut rx, 100).await;
}

#[tokio::test]
async fn health_checks_registry_errors() {
    let (tx, _rx) = mpsc::unbounded_channel();
    let checks = HealthChecks::new(tx);
    assert_eq!(
        checks.update_ttl("ghost", HealthStatus::Passing, ""),
        Err(HealthError::UnknownCheck("ghost".into()))
    );
    assert_eq!(checks.check("ghost"), None);
    let addr = free_addr().await;
    let tcp = CheckConfig {
        id: "service:db-1:1".into(),
        ..check(
            CheckKind::Tcp {
                addr: addr.to_string(),
            },
            1000,
            1000,
        )
    };
    checks.add("db-1", "db", vec![tcp, ttl_check("service:db-1:2", 60_000)]);
    assert_eq!(
        checks.update_ttl("service:db-1:1", HealthStatus::Passing, ""),
        Err(HealthError::NotTtl {
            check: "service:db-1:1".into(),
            kind: "tcp"
        })
    );
    assert_eq!(
        HealthError::NotTtl {
            check: "service:db-1:1".into(),
            kind: "tcp"
        }
        .to_string(),
        "check \"service:db-1:1\" is a tcp check: only ttl checks take updates"
    );
    assert_eq!(
        checks.check("service:db-1:2"),
        Some(CheckInfo {
            check_id: "service:db-1:2".into(),
            service_id: "db-1".into(),
            service_name: "db".into(),
            kind: "ttl",
        })
    );
    assert!(!checks.check("service:db-1:1").unwrap().is_ttl());
    assert_eq!(checks.service_ids(), vec!["db-1".to_string()]);
    assert!(checks.remove("db-1"));
    assert!(!checks.remove("db-1"));
    assert!(checks.service_ids().is_empty());
    assert_eq!(
        checks.update_ttl("service:db-1:2", HealthStatus::Passing, ""),
        Err(HealthError::UnknownCheck("service:db-1:2".into()))
    );
}
