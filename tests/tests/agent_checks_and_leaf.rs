//! Consul's `PUT /v1/agent/check/register`, `/check/deregister/:id` and
//! `GET /v1/agent/connect/ca/leaf/:service` on the agent's local API
//! (`127.0.0.1:8500` in node A), with curl and openssl:
//!
//! - TTL, HTTP and TCP checks registered on `db-1` (a service registered
//!   through the same API) run, reach the servers' `/v1/health/checks/db`
//!   as the instance's health, follow pass and fail, and leave when
//!   deregistered; at most 32 checks per service.
//! - A leaf for `db` with a token that has `service:write` on it: its URI
//!   SAN is db's SPIFFE id, it verifies against `/v1/connect/ca/roots`, and
//!   the private key returned is the certificate's.
//! - A check added to a service of agent.toml is kept across a restart;
//!   the file's own checks are not the API's to remove.
//! - Refused: no token, a token with only `service:read`, another
//!   service's token, a check for a service not on the agent, a
//!   node-level check, a field weft cannot honour, an oversized body, a
//!   blocking leaf query.
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};
use serde_json::Value;
use weft_tests::mesh::{wait_until, Mesh, MeshSpec, NodeA, Service};
use weft_tests::require_root;

const STEP: Duration = Duration::from_secs(20);

/// `METHOD http://127.0.0.1:8500{path}` in node A with curl: code and body.
fn call(
    mesh: &Mesh,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    mesh.local_api(NodeA, (method, path), token, body)
}

fn put(mesh: &Mesh, path: &str, token: Option<&str>, body: &str) -> anyhow::Result<(u16, String)> {
    call(mesh, "PUT", path, token, Some(body))
}

/// db-1's `service:db-1` check on the servers (`/v1/health/checks/db`,
/// forwarded by the agent): status and output.
fn server_check(mesh: &Mesh, token: &str) -> anyhow::Result<Option<(String, String)>> {
    let (code, body) = call(mesh, "GET", "/v1/health/checks/db", Some(token), None)?;
    ensure!(code == 200, "health checks: {code} {body}");
    let checks: Value = serde_json::from_str(&body)?;
    Ok(checks.as_array().and_then(|a| {
        a.iter().find(|c| c["CheckID"] == "service:db-1").map(|c| {
            (
                c["Status"].as_str().unwrap_or_default().to_string(),
                c["Output"].as_str().unwrap_or_default().to_string(),
            )
        })
    }))
}

/// Waits until the servers show db-1 `status` with an output containing `output`.
fn wait_server(mesh: &Mesh, token: &str, status: &str, output: &str) -> anyhow::Result<()> {
    wait_until(
        STEP,
        &format!("db-1 {status} ({output:?}) on the servers"),
        || {
            Ok(server_check(mesh, token)?
                .filter(|(s, o)| s == status && o.contains(output))
                .map(|_| ()))
        },
    )
    .map_err(|e| e.context(format!("agent log:\n{}", mesh.agent_log_tail(NodeA, 30))))
}

/// The agent's `/v1/agent/checks` for `token`.
fn agent_checks(mesh: &Mesh, token: &str) -> anyhow::Result<Value> {
    let (code, body) = call(mesh, "GET", "/v1/agent/checks", Some(token), None)?;
    ensure!(code == 200, "agent checks: {code} {body}");
    Ok(serde_json::from_str(&body)?)
}

/// A token whose only right is `service:read` on db.
fn read_only_token(mesh: &Mesh) -> anyhow::Result<String> {
    let rules = r#"service "db" { policy = "read" }"#;
    mesh.weft(&[
        "acl", "policy", "create", "--name", "db-read", "--rules", rules,
    ])?;
    let v = mesh.weft_json(&["acl", "token", "create", "--policy", "db-read"])?;
    v["secret_id"]
        .as_str()
        .map(String::from)
        .context("token create printed no secret_id")
}

fn openssl(args: &[&str], dir: &Path) -> anyhow::Result<String> {
    let out = weft_tests::mesh::run_bounded(
        Command::new("openssl").args(args).current_dir(dir),
        Duration::from_secs(15),
    )?;
    ensure!(out.success(), "openssl {args:?}: {}", out.describe());
    Ok(out.stdout)
}

#[test]
fn checks_register_run_and_deregister_through_the_agent() -> anyhow::Result<()> {
    require_root();
    let mesh = Mesh::start(MeshSpec::new("allow").node_a(Service::new("web", 8000)))?;
    mesh.grant_agent_services(NodeA, &["db"])?;
    let db_token = mesh.service_token(&["db"])?;
    let web_token = mesh.service_token(&["web"])?;
    let reader = read_only_token(&mesh)?;
    let db = r#"{"ID":"db-1","Name":"db","Port":5432}"#;
    let (code, body) = put(&mesh, "/v1/agent/service/register", Some(&db_token), db)?;
    ensure!(code == 200, "register db-1: {code} {body}");
    wait_server(&mesh, &db_token, "passing", "")?;

    // Refused, and nothing registered: who may not, where it may not go,
    // what weft cannot honour, too much.
    let ttl = r#"{"Name":"db heartbeat","CheckID":"db-ttl","ServiceID":"db-1","TTL":"5m","Notes":"the worker's beat"}"#;
    let register = "/v1/agent/check/register";
    let (code, body) = put(&mesh, register, None, ttl)?;
    ensure!(
        code == 403 && body.contains("Permission denied"),
        "no token: {code} {body}"
    );
    let (code, body) = put(&mesh, register, Some(&reader), ttl)?;
    ensure!(
        code == 403 && body.contains("service:write"),
        "read-only token: {code} {body}"
    );
    let (code, body) = put(&mesh, register, Some(&web_token), ttl)?;
    ensure!(
        code == 403 && body.contains("\"db\""),
        "web's token: {code} {body}"
    );
    let ghost = r#"{"Name":"x","ServiceID":"ghost-1","TTL":"5m"}"#;
    let (code, body) = put(&mesh, register, Some(&db_token), ghost)?;
    ensure!(
        code == 400 && body.contains("does not exist"),
        "no such service: {code} {body}"
    );
    let node_level = r#"{"Name":"disk","TTL":"5m"}"#;
    let (code, body) = put(&mesh, register, Some(&db_token), node_level)?;
    ensure!(
        code == 400 && body.contains("node-level") && body.contains("not supported by weft yet"),
        "node-level check: {code} {body}"
    );
    let header = r#"{"Name":"h","ServiceID":"db-1","HTTP":"http://127.0.0.1:15020/healthz","Header":{"X-A":["b"]}}"#;
    let (code, body) = put(&mesh, register, Some(&db_token), header)?;
    ensure!(
        code == 400 && body.starts_with("Header: not supported by weft yet"),
        "Header: {code} {body}"
    );
    let huge = format!(
        r#"{{"Name":"big","ServiceID":"db-1","TTL":"5m","Notes":"{}"}}"#,
        "x".repeat(70_000)
    );
    let (code, body) = put(&mesh, register, Some(&db_token), &huge)?;
    ensure!(code == 413, "oversized body: {code} {body}");
    ensure!(
        agent_checks(&mesh, &db_token)?
            .as_object()
            .is_some_and(|m| m.is_empty()),
        "a refused registration left a check: {}",
        agent_checks(&mesh, &db_token)?
    );

    // A TTL check: critical until reported, then as reported.
    let (code, body) = put(&mesh, register, Some(&db_token), ttl)?;
    ensure!(code == 200, "register the TTL check: {code} {body}");
    wait_server(&mesh, &db_token, "critical", "no refresh received yet")?;
    let listed = agent_checks(&mesh, &db_token)?;
    let mine = &listed["db-ttl"];
    ensure!(
        mine["Name"] == "db heartbeat"
            && mine["Notes"] == "the worker's beat"
            && mine["Type"] == "ttl"
            && mine["ServiceID"] == "db-1",
        "agent checks: {listed}"
    );
    let pass = "/v1/agent/check/pass/db-ttl?note=beating";
    let (code, body) = put(&mesh, pass, Some(&db_token), "")?;
    ensure!(code == 200, "pass: {code} {body}");
    wait_server(&mesh, &db_token, "passing", "beating")?;
    let (code, body) = put(
        &mesh,
        "/v1/agent/check/fail/db-ttl?note=stuck",
        Some(&db_token),
        "",
    )?;
    ensure!(code == 200, "fail: {code} {body}");
    wait_server(&mesh, &db_token, "critical", "stuck")?;

    let (code, body) = put(&mesh, pass, Some(&db_token), "")?;
    ensure!(code == 200, "pass again: {code} {body}");
    wait_server(&mesh, &db_token, "passing", "beating")?;

    // An HTTP check on the agent's admin port (passing) and a TCP check on
    // a closed port (critical); the TTL check goes on passing.
    let http = r#"{"name":"admin","service_id":"db-1","http":"http://127.0.0.1:15020/healthz","interval":"1s","timeout":"1s"}"#;
    let (code, body) = put(&mesh, register, Some(&db_token), http)?;
    ensure!(code == 200, "register the HTTP check: {code} {body}");
    wait_server(
        &mesh,
        &db_token,
        "passing",
        "HTTP GET http://127.0.0.1:15020/healthz: 200",
    )?;
    let (status, output) = server_check(&mesh, &db_token)?.context("db-1's check")?;
    ensure!(
        status == "passing" && output.contains("beating"),
        "{status} {output}"
    );
    let tcp = r#"{"Name":"closed","ID":"db-tcp","ServiceID":"db-1","TCP":"127.0.0.1:1","Interval":"1s","DeregisterCriticalServiceAfter":"10m"}"#;
    let (code, body) = put(&mesh, register, Some(&db_token), tcp)?;
    ensure!(code == 200, "register the TCP check: {code} {body}");
    wait_server(&mesh, &db_token, "critical", "127.0.0.1:1")?;
    let listed = agent_checks(&mesh, &db_token)?;
    ensure!(
        listed["admin"]["Status"] == "passing" && listed["admin"]["Type"] == "http",
        "the HTTP check: {listed}"
    );
    ensure!(
        listed["db-tcp"]["Status"] == "critical",
        "the TCP check: {listed}"
    );
    ensure!(
        listed["db-ttl"]["Status"] == "passing" && listed["db-ttl"]["Output"] == "beating",
        "the TTL check: {listed}"
    );

    // Deregistered: gone from the agent, and the instance passes again.
    let deregister = |id: &str, token: &str| {
        put(
            &mesh,
            &format!("/v1/agent/check/deregister/{id}"),
            Some(token),
            "",
        )
    };
    let (code, body) = deregister("db-tcp", &web_token)?;
    ensure!(
        code == 403,
        "web's token removing db's check: {code} {body}"
    );
    let (code, body) = deregister("nope", &db_token)?;
    ensure!(
        code == 404 && body.contains("Unknown check ID"),
        "unknown check: {code} {body}"
    );
    let (code, body) = deregister("db-tcp", &db_token)?;
    ensure!(code == 200, "deregister db-tcp: {code} {body}");
    wait_server(&mesh, &db_token, "passing", "beating")?;
    for id in ["admin", "db-ttl"] {
        let (code, body) = deregister(id, &db_token)?;
        ensure!(code == 200, "deregister {id}: {code} {body}");
    }
    ensure!(
        agent_checks(&mesh, &db_token)?
            .as_object()
            .is_some_and(|m| m.is_empty()),
        "checks left: {}",
        agent_checks(&mesh, &db_token)?
    );
    let (code, body) = put(&mesh, "/v1/agent/check/pass/db-ttl", Some(&db_token), "")?;
    ensure!(code == 404, "pass on a deregistered check: {code} {body}");

    // Bounded: 32 checks a service, the 33rd refused with the limit named.
    for n in 0..32 {
        let check =
            format!(r#"{{"Name":"c{n}","ServiceID":"db-1","TTL":"5m","Status":"passing"}}"#);
        let (code, body) = put(&mesh, register, Some(&db_token), &check)?;
        ensure!(code == 200, "check {n}: {code} {body}");
    }
    let check = r#"{"Name":"c32","ServiceID":"db-1","TTL":"5m"}"#;
    let (code, body) = put(&mesh, register, Some(&db_token), check)?;
    ensure!(
        code == 400 && body.contains("at most 32 per service"),
        "the 33rd check: {code} {body}"
    );
    wait_server(&mesh, &db_token, "passing", "initial status")?;

    let (code, body) = put(
        &mesh,
        "/v1/agent/service/deregister/db-1",
        Some(&db_token),
        "",
    )?;
    ensure!(code == 200, "deregister db-1: {code} {body}");
    Ok(())
}

#[test]
fn checks_on_services_of_the_agents_file_are_kept_apart() -> anyhow::Result<()> {
    require_root();
    let mut mesh = Mesh::start(
        MeshSpec::new("allow")
            .node_a(Service::new("web", 8000).ttl_check("10m", Some("web-file")))
            .node_a(Service::new("db", 8001)),
    )?;
    let web_token = mesh.service_token(&["web"])?;
    let db_token = mesh.service_token(&["db"])?;
    let register = "/v1/agent/check/register";
    let beat = r#"{"Name":"web beat","CheckID":"web-beat","ServiceID":"web","TTL":"10m","Status":"passing"}"#;
    let (code, body) = put(&mesh, register, Some(&db_token), beat)?;
    ensure!(code == 403, "db's token on web: {code} {body}");
    let (code, body) = put(&mesh, register, Some(&web_token), beat)?;
    ensure!(code == 200, "register on web: {code} {body}");
    let ids = |mesh: &Mesh| -> anyhow::Result<Vec<String>> {
        let mut ids: Vec<String> = agent_checks(mesh, &web_token)?
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        ids.sort();
        Ok(ids)
    };
    ensure!(ids(&mesh)? == ["web-beat", "web-file"], "{:?}", ids(&mesh)?);
    // db's owner cannot take web's check over by registering its id on db,
    // nor the ids the agent gives services' own checks.
    let takeover = r#"{"Name":"mine","CheckID":"web-beat","ServiceID":"db","TTL":"10m"}"#;
    let (code, body) = put(&mesh, register, Some(&db_token), takeover)?;
    ensure!(
        code == 409 && body.contains("belongs to service"),
        "takeover: {code} {body}"
    );
    let own = r#"{"Name":"mine","CheckID":"service:web:2","ServiceID":"db","TTL":"10m"}"#;
    let (code, body) = put(&mesh, register, Some(&db_token), own)?;
    ensure!(
        code == 400 && body.contains("the agent's own"),
        "agent's id: {code} {body}"
    );
    ensure!(ids(&mesh)? == ["web-beat", "web-file"], "{:?}", ids(&mesh)?);

    // Kept across a restart of the agent (checks.json), with the file's.
    mesh.restart_agent(NodeA)?;
    ensure!(
        ids(&mesh)? == ["web-beat", "web-file"],
        "after a restart: {:?}",
        ids(&mesh)?
    );

    // The file's check is the file's; the added one goes.
    let (code, body) = put(
        &mesh,
        "/v1/agent/check/deregister/web-file",
        Some(&web_token),
        "",
    )?;
    ensure!(
        code == 400 && body.contains("configuration file"),
        "the file's check: {code} {body}"
    );
    let (code, body) = put(
        &mesh,
        "/v1/agent/check/deregister/web-beat",
        Some(&db_token),
        "",
    )?;
    ensure!(
        code == 403,
        "db's token removing web's check: {code} {body}"
    );
    let (code, body) = put(
        &mesh,
        "/v1/agent/check/deregister/web-beat",
        Some(&web_token),
        "",
    )?;
    ensure!(code == 200, "deregister web-beat: {code} {body}");
    ensure!(ids(&mesh)? == ["web-file"], "{:?}", ids(&mesh)?);
    Ok(())
}

#[test]
fn leaf_certificates_for_callers_with_service_write() -> anyhow::Result<()> {
    require_root();
    let mesh = Mesh::start(MeshSpec::new("allow").node_a(Service::new("web", 8000)))?;
    mesh.grant_agent_services(NodeA, &["db"])?;
    let db_token = mesh.service_token(&["db"])?;
    let web_token = mesh.service_token(&["web"])?;
    let api_token = mesh.service_token(&["api"])?;
    let reader = read_only_token(&mesh)?;
    let (code, body) = put(
        &mesh,
        "/v1/agent/service/register",
        Some(&db_token),
        r#"{"ID":"db-1","Name":"db","Port":5432}"#,
    )?;
    ensure!(code == 200, "register db-1: {code} {body}");

    let leaf = "/v1/agent/connect/ca/leaf/db";
    let (code, body) = call(&mesh, "GET", leaf, Some(&db_token), None)?;
    ensure!(code == 200, "leaf: {code} {body}");
    let v: Value = serde_json::from_str(&body)?;
    let field = |k: &str| {
        v[k].as_str()
            .map(String::from)
            .with_context(|| format!("{k} in {v}"))
    };
    let uri = field("ServiceURI")?;
    ensure!(
        uri.starts_with("spiffe://") && uri.ends_with("/ns/default/dc/dc1/svc/db"),
        "{uri}"
    );
    ensure!(field("Service")? == "db", "{v}");
    for k in ["SerialNumber", "ValidAfter", "ValidBefore"] {
        ensure!(!field(k)?.is_empty(), "{k} in {v}");
    }
    ensure!(
        v["CreateIndex"].as_u64().is_some() && v["ModifyIndex"] == v["CreateIndex"],
        "{v}"
    );

    // openssl: the SAN, the chain to the roots, the key.
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("cert.pem"), field("CertPEM")?)?;
    std::fs::write(dir.path().join("key.pem"), field("PrivateKeyPEM")?)?;
    let (code, body) = call(&mesh, "GET", "/v1/connect/ca/roots", Some(&db_token), None)?;
    ensure!(code == 200, "roots: {code} {body}");
    let roots: Value = serde_json::from_str(&body)?;
    let bundle: String = roots["Roots"]
        .as_array()
        .context("Roots")?
        .iter()
        .filter_map(|r| r["RootCert"].as_str())
        .collect();
    std::fs::write(dir.path().join("roots.pem"), bundle)?;
    let text = openssl(&["x509", "-in", "cert.pem", "-noout", "-text"], dir.path())?;
    ensure!(
        text.contains(&format!("URI:{uri}")),
        "no URI SAN {uri}:\n{text}"
    );
    let serial = openssl(
        &["x509", "-in", "cert.pem", "-noout", "-serial"],
        dir.path(),
    )?;
    ensure!(
        serial
            .trim()
            .trim_start_matches("serial=")
            .eq_ignore_ascii_case(&field("SerialNumber")?.replace(':', "")),
        "serial {serial} vs {v}"
    );
    let verified = openssl(&["verify", "-CAfile", "roots.pem", "cert.pem"], dir.path())?;
    ensure!(verified.contains("cert.pem: OK"), "{verified}");
    let cert_key = openssl(
        &["x509", "-in", "cert.pem", "-noout", "-pubkey"],
        dir.path(),
    )?;
    let key_pub = openssl(&["pkey", "-in", "key.pem", "-pubout"], dir.path())?;
    ensure!(cert_key == key_pub, "the key is not the certificate's");
    // The key is the caller's alone: not in the agent's log.
    let key_line = field("PrivateKeyPEM")?
        .lines()
        .nth(1)
        .context("key body")?
        .to_string();
    ensure!(
        !mesh.agent_log(NodeA).contains(&key_line),
        "the private key was logged"
    );

    // Refused.
    let (code, body) = call(&mesh, "GET", leaf, None, None)?;
    ensure!(
        code == 403 && body.contains("Permission denied"),
        "no token: {code} {body}"
    );
    let (code, body) = call(&mesh, "GET", leaf, Some(&reader), None)?;
    ensure!(code == 403, "read-only token: {code} {body}");
    let (code, body) = call(&mesh, "GET", leaf, Some(&web_token), None)?;
    ensure!(code == 403, "web's token for db: {code} {body}");
    let made_up = "5b8fa3a6-0000-4000-8000-000000000000";
    let (code, body) = call(&mesh, "GET", leaf, Some(made_up), None)?;
    ensure!(
        code == 403 && body.contains("ACL not found"),
        "unknown token: {code} {body}"
    );
    let (code, body) = call(
        &mesh,
        "GET",
        "/v1/agent/connect/ca/leaf/api",
        Some(&api_token),
        None,
    )?;
    ensure!(
        code == 403 && body.contains("not registered on node"),
        "a service not on this node: {code} {body}"
    );
    let (code, body) = call(
        &mesh,
        "GET",
        &format!("{leaf}?index=5"),
        Some(&db_token),
        None,
    )?;
    ensure!(
        code == 400 && body.contains("not supported by weft yet"),
        "blocking query: {code} {body}"
    );
    let (code, body) = call(
        &mesh,
        "GET",
        "/v1/agent/connect/ca/leaf/Not_A_Name",
        Some(&db_token),
        None,
    )?;
    ensure!(code == 400, "bad service name: {code} {body}");

    // web's own leaf with web's token (a service of agent.toml).
    let (code, body) = call(
        &mesh,
        "GET",
        "/v1/agent/connect/ca/leaf/web",
        Some(&web_token),
        None,
    )?;
    ensure!(
        code == 200 && body.contains("/svc/web"),
        "web's leaf: {code} {body}"
    );

    let (code, body) = put(
        &mesh,
        "/v1/agent/service/deregister/db-1",
        Some(&db_token),
        "",
    )?;
    ensure!(code == 200, "deregister db-1: {code} {body}");
    Ok(())
}
