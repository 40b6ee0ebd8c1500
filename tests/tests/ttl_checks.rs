//! TTL checks reported by workloads through the agent's local HTTP API
//! (`PUT /v1/agent/check/{pass,warn,fail}/:id` on `127.0.0.1:8500` of the
//! node) and through `weft check`, judged by the servers (`Acl.Authorize`):
//! the catalog follows pass, warn and fail; a TTL not renewed in time goes
//! critical; refused attempts (no token, unknown token, another service's
//! token, a non-TTL check, an unknown check) change nothing, and with the
//! servers down an update that cannot be judged is refused (503).
//!
//! One server and two agents in explicit mode; node A runs `api` (TTL check
//! of [`TTL`], default id `service:api`), `web` (TTL check of a minute, id
//! `web-ttl`) and `db` (an HTTP check, id `service:db`).
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use weft_tests::mesh::{wait_until, Mesh, MeshSpec, NodeA, Service, AGENT_HTTP};
use weft_tests::require_root;
use weft_tests::servers::bin;

const TTL: Duration = Duration::from_secs(3);
/// Long enough for every step between two updates, short of the TTL.
const STEP: Duration = Duration::from_secs(20);

/// `(health, check_output)` of the only instance of `service`.
fn health(mesh: &Mesh, service: &str) -> anyhow::Result<(String, String)> {
    let v = mesh.weft_json(&["catalog", "service", service])?;
    let i = &v["instances"][0];
    let s = |k: &str| i[k].as_str().map(String::from);
    Ok((
        s("health").with_context(|| format!("no instance of {service}: {v}"))?,
        s("check_output").unwrap_or_default(),
    ))
}

/// Waits until `service` is `want` with an output containing `output`.
fn wait_health(mesh: &Mesh, service: &str, want: &str, output: &str) -> anyhow::Result<()> {
    wait_until(STEP, &format!("{service} {want} ({output:?})"), || {
        let (h, o) = health(mesh, service)?;
        Ok((h == want && o.contains(output)).then_some(()))
    })
    .map_err(|e| e.context(format!("agent log:\n{}", mesh.agent_log_tail(NodeA, 30))))
}

/// `PUT http://127.0.0.1:8500{path}` in node A with curl: code and body.
fn put(mesh: &Mesh, path: &str, headers: &[&str]) -> anyhow::Result<(u16, String)> {
    put_with(mesh, path, headers, None)
}

/// [`put`] with `body` sent, if any.
fn put_with(
    mesh: &Mesh,
    path: &str,
    headers: &[&str],
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let url = format!("http://{AGENT_HTTP}{path}");
    let mut args = vec!["-sS", "-m", "15", "-X", "PUT", "-w", "\n%{http_code}"];
    if let Some(body) = body {
        args.extend(["--data-binary", body]);
    }
    // From 0600 files: the tokens are not on curl's command line.
    let files = (headers.iter())
        .map(|h| mesh.header_arg(h))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for h in &files {
        args.extend(["-H", h]);
    }
    args.push(&url);
    let out = mesh.curl_raw(NodeA, &args)?;
    ensure!(out.success(), "curl {url}: {}", out.describe());
    let (body, code) = out
        .stdout
        .rsplit_once('\n')
        .with_context(|| format!("curl output {:?}", out.stdout))?;
    Ok((code.trim().parse()?, body.to_string()))
}

/// `weft [--token T] check ARGS…` in node A (agent at its default address).
fn weft_check(
    mesh: &Mesh,
    token: Option<&str>,
    args: &[&str],
) -> anyhow::Result<weft_tests::mesh::Output> {
    // The token in the CLI's environment, not on its command line.
    let mut full = vec!["check"];
    full.extend_from_slice(args);
    mesh.weft_as(NodeA, token, &full)
}

#[test]
fn ttl_checks_follow_pass_warn_fail_and_expire_and_refuse_strangers() -> anyhow::Result<()> {
    require_root();
    let ttl = format!("{}s", TTL.as_secs());
    let mesh = Mesh::start(
        MeshSpec::new("allow")
            .node_a(Service::new("api", 8080).ttl_check(&ttl, None))
            .node_a(Service::new("web", 8000).ttl_check("1m", Some("web-ttl")))
            .node_a(Service::new("db", 5432).healthz_check("1s")),
    )?;
    let api_token = mesh.service_token(&["api"])?;
    let web_token = mesh.service_token(&["web"])?;
    let db_token = mesh.service_token(&["db"])?;
    let api_auth = format!("X-Consul-Token: {api_token}");

    // Critical until the first update.
    wait_health(&mesh, "api", "critical", "no refresh received yet")?;

    // pass, warn, fail through the HTTP API (each restarts the TTL).
    let (code, body) = put(
        &mesh,
        "/v1/agent/check/pass/service:api?note=all+good",
        &[&api_auth],
    )?;
    ensure!(code == 200, "pass: {code} {body}");
    wait_health(&mesh, "api", "passing", "all good")?;
    let bearer = format!("Authorization: Bearer {api_token}");
    let (code, body) = put(
        &mesh,
        "/v1/agent/check/warn/service:api?note=slow",
        &[&bearer],
    )?;
    ensure!(code == 200, "warn: {code} {body}");
    wait_health(&mesh, "api", "warning", "slow")?;
    let path = format!("/v1/agent/check/fail/service%3Aapi?note=broken&token={api_token}");
    let (code, body) = put(&mesh, &path, &[])?;
    ensure!(code == 200, "fail: {code} {body}");
    wait_health(&mesh, "api", "critical", "broken")?;

    // pass through the CLI.
    let out = weft_check(
        &mesh,
        Some(&api_token),
        &["pass", "service:api", "--note", "via cli"],
    )?;
    ensure!(out.success(), "weft check pass: {}", out.describe());
    ensure!(
        out.stdout.trim() == "check service:api: passing",
        "{}",
        out.describe()
    );
    let passed = Instant::now();
    wait_health(&mesh, "api", "passing", "via cli")?;

    // No renewal: critical once the TTL has run out.
    wait_health(&mesh, "api", "critical", "TTL expired")?;
    ensure!(
        passed.elapsed() >= TTL - Duration::from_millis(500),
        "expired after {:?}, before the TTL of {TTL:?}",
        passed.elapsed()
    );

    // Attacks on web's check, made passing first so that a change shows.
    let web_auth = format!("X-Consul-Token: {web_token}");
    let (code, body) = put(
        &mesh,
        "/v1/agent/check/pass/web-ttl?note=baseline",
        &[&web_auth],
    )?;
    ensure!(code == 200, "web pass: {code} {body}");
    wait_health(&mesh, "web", "passing", "baseline")?;
    let unchanged = |what: &str| -> anyhow::Result<()> {
        let now = health(&mesh, "web")?;
        ensure!(
            now == ("passing".to_string(), "baseline".to_string()),
            "after {what}: web is {now:?}"
        );
        Ok(())
    };
    let fail_web = "/v1/agent/check/fail/web-ttl?note=owned";

    let (code, body) = put(&mesh, fail_web, &[])?;
    ensure!(
        code == 403 && body.contains("Permission denied"),
        "no token: {code} {body}"
    );
    unchanged("no token")?;

    let (code, body) = put(&mesh, fail_web, &[&api_auth])?;
    ensure!(
        code == 403 && body.contains("lacks service:write on \"web\""),
        "api's token on web: {code} {body}"
    );
    unchanged("another service's token")?;

    let made_up = "X-Consul-Token: 5b8fa3a6-0000-4000-8000-000000000000";
    let (code, body) = put(&mesh, fail_web, &[made_up])?;
    ensure!(
        code == 403 && body.contains("ACL not found"),
        "unknown token: {code} {body}"
    );
    unchanged("an unknown token")?;

    let db_auth = format!("X-Consul-Token: {db_token}");
    let (code, body) = put(&mesh, "/v1/agent/check/pass/service:db", &[&db_auth])?;
    ensure!(
        code == 400 && body.contains("\"service:db\" is a http check"),
        "non-TTL check: {code} {body}"
    );
    let (code, body) = put(&mesh, "/v1/agent/check/pass/service:db", &[&api_auth])?;
    ensure!(code == 403, "non-TTL check, no right: {code} {body}");

    let (code, body) = put(&mesh, "/v1/agent/check/fail/nope", &[&web_auth])?;
    ensure!(
        code == 404 && body.contains("Unknown check ID \"nope\""),
        "unknown check: {code} {body}"
    );
    unchanged("an unknown check")?;

    // The CLI is refused the same way, with a clear error and exit 1.
    for (token, args, want) in [
        (
            Some(api_token.as_str()),
            vec!["fail", "web-ttl"],
            "permission denied",
        ),
        (None, vec!["fail", "web-ttl"], "--token"),
        (Some(web_token.as_str()), vec!["fail", "nope"], "not found"),
        (
            Some(web_token.as_str()),
            vec!["fail", "web-ttl", "--agent-addr", "127.0.0.1:1"],
            "cannot reach the agent",
        ),
    ] {
        let out = weft_check(&mesh, token, &args)?;
        ensure!(
            out.code() == Some(1) && out.stderr.contains(want),
            "weft check {args:?}: want exit 1 and {want:?}: {}",
            out.describe()
        );
        unchanged(&format!("weft check {args:?}"))?;
    }

    // A barrier: an accepted update after all refused ones shows in the
    // catalog, and web is still as it was.
    let (code, body) = put(
        &mesh,
        "/v1/agent/check/pass/service:api?note=barrier",
        &[&api_auth],
    )?;
    ensure!(code == 200, "barrier: {code} {body}");
    wait_health(&mesh, "api", "passing", "barrier")?;
    unchanged("every refused attempt")?;

    // Wrong method: 405.
    let out = mesh.curl_raw(
        NodeA,
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{AGENT_HTTP}/v1/agent/check/pass/web-ttl"),
        ],
    )?;
    ensure!(out.stdout.trim() == "405", "GET: {}", out.describe());

    // Servers unreachable: a token the agent has not seen allowed cannot be
    // judged, so nothing changes (503), also through the CLI.
    let fresh = mesh.service_token(&["web"])?;
    mesh.kill_server();
    let (code, body) = put(&mesh, fail_web, &[&format!("X-Consul-Token: {fresh}")])?;
    ensure!(
        code == 503 && body.contains("cannot reach the servers") && body.contains("unchanged"),
        "servers down: {code} {body}"
    );
    let out = weft_check(&mesh, Some(&fresh), &["fail", "web-ttl"])?;
    ensure!(
        out.code() == Some(1) && out.stderr.contains("unavailable"),
        "weft check with the servers down: {}",
        out.describe()
    );
    Ok(())
}

/// `PUT http://127.0.0.1:8500{path}` with a JSON `body` and `token`.
fn put_json(
    mesh: &Mesh,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let header = token.map(|t| format!("X-Consul-Token: {t}"));
    let mut headers = vec!["Content-Type: application/json"];
    headers.extend(header.as_deref());
    put_with(mesh, path, &headers, Some(body))
}

#[test]
fn services_register_and_deregister_through_the_local_api() -> anyhow::Result<()> {
    require_root();
    let mut mesh = Mesh::start(MeshSpec::new("allow").node_a(Service::new("web", 8000)))?;
    // The operator lets node A's agent carry db (it registers it and gets
    // its certificate); workloads prove their own right with their token.
    mesh.grant_agent_services(NodeA, &["db"])?;
    let db_token = mesh.service_token(&["db"])?;
    let web_token = mesh.service_token(&["web"])?;
    let db = r#"{"ID":"db-1","Name":"db","Port":5432,"Tags":["primary"],"Check":{"TTL":"30s"}}"#;
    let registered = |mesh: &Mesh| -> anyhow::Result<Vec<(String, String, String)>> {
        mesh.catalog_instances("db").or_else(|_| Ok(Vec::new()))
    };

    // Refused: no token, a token of another service, an unknown field.
    let (code, body) = put_json(&mesh, "/v1/agent/service/register", None, db)?;
    ensure!(code == 403, "no token: {code} {body}");
    let (code, body) = put_json(&mesh, "/v1/agent/service/register", Some(&web_token), db)?;
    ensure!(
        code == 403 && body.contains("service:write"),
        "web's token: {code} {body}"
    );
    let connect = r#"{"Name":"db","Port":5432,"Connect":{"SidecarService":{}}}"#;
    let (code, body) = put_json(
        &mesh,
        "/v1/agent/service/register",
        Some(&db_token),
        connect,
    )?;
    ensure!(
        code == 400 && body.contains("Connect"),
        "unknown field: {code} {body}"
    );
    // The attack: claiming an address, which transparent mode takes over
    // for the node's workloads. The agent's own API port (workloads would
    // send their tokens to db's instances), the cloud metadata address,
    // another host's address: refused, naming why.
    for (claim, why) in [
        (r#""Port":8500"#, "the agent's own ports"),
        (
            r#""Port":15020,"Address":"127.0.0.1""#,
            "the agent's own ports",
        ),
        (
            r#""Port":80,"Address":"169.254.169.254""#,
            "this node's instances",
        ),
        (
            r#""Port":5432,"Address":"10.99.0.7""#,
            "this node's instances",
        ),
    ] {
        let body = format!(r#"{{"ID":"db-claim","Name":"db",{claim}}}"#);
        let (code, answer) = put_json(&mesh, "/v1/agent/service/register", Some(&db_token), &body)?;
        ensure!(
            code == 400 && answer.contains(why),
            "claiming {claim}: {code} {answer}"
        );
    }
    ensure!(
        registered(&mesh)?.is_empty(),
        "a refused registration left {:?}",
        registered(&mesh)?
    );

    // Registered, with its TTL check reachable through the API.
    let (code, body) = put_json(&mesh, "/v1/agent/service/register", Some(&db_token), db)?;
    ensure!(code == 200, "register: {code} {body}");
    ensure!(
        registered(&mesh)?
            .iter()
            .any(|(id, node, _)| id == "db-1" && node == "node-a"),
        "db-1 not in the catalog: {:?}",
        registered(&mesh)?
    );
    let (code, body) = put(
        &mesh,
        "/v1/agent/check/pass/service:db-1?note=up",
        &[&format!("X-Consul-Token: {db_token}")],
    )?;
    ensure!(code == 200, "pass: {code} {body}");
    wait_health(&mesh, "db", "passing", "up")?;

    // Kept across a restart of the agent; a kept registration the rules
    // above refuse (as one kept by an agent of before them) is dropped at
    // start, saying why, and not kept again.
    mesh.stop_agent(NodeA)?;
    let kept_file = mesh.agent_data_dir(NodeA).join("services.json");
    let mut kept: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(&kept_file)?)?;
    let mut claim = kept.first().context("db-1 kept")?.clone();
    claim["ID"] = "db-claim".into();
    claim["Port"] = 8500.into();
    kept.push(claim);
    std::fs::write(&kept_file, serde_json::to_vec(&kept)?)?;
    mesh.start_agent(NodeA)?;
    mesh.wait_agent_ready(NodeA, STEP)?;
    wait_until(STEP, "db-1 registered again after the restart", || {
        Ok(registered(&mesh)?
            .iter()
            .any(|(id, _, _)| id == "db-1")
            .then_some(()))
    })?;
    ensure!(
        !registered(&mesh)?.iter().any(|(id, _, _)| id == "db-claim"),
        "the claim was registered: {:?}",
        registered(&mesh)?
    );
    let log = mesh.agent_log(NodeA);
    ensure!(
        log.contains("a registration kept from before is dropped: service db-claim")
            && log.contains("the agent's own ports"),
        "no word of the dropped claim:\n{}",
        mesh.agent_log_tail(NodeA, 20)
    );
    ensure!(
        !std::fs::read_to_string(&kept_file)?.contains("db-claim"),
        "the claim is still kept"
    );

    // A file service is not the API's to remove; a stranger may not remove db.
    let (code, body) = put_json(
        &mesh,
        "/v1/agent/service/deregister/web",
        Some(&web_token),
        "",
    )?;
    ensure!(
        code == 400 && body.contains("configuration file"),
        "web: {code} {body}"
    );
    let (code, body) = put_json(
        &mesh,
        "/v1/agent/service/deregister/db-1",
        Some(&web_token),
        "",
    )?;
    ensure!(code == 403, "web's token removing db: {code} {body}");
    let (code, body) = put_json(
        &mesh,
        "/v1/agent/service/deregister/db-1",
        Some(&db_token),
        "",
    )?;
    ensure!(code == 200, "deregister: {code} {body}");
    ensure!(
        registered(&mesh)?.is_empty(),
        "db-1 still registered: {:?}",
        registered(&mesh)?
    );
    Ok(())
}

/// The operator's file wins over a registration through the local API of
/// the same id, as with Consul's agent: a workload registers db-1, then the
/// operator writes db-1 into agent.toml. The reload takes the file's db-1
/// (before, it was refused for the duplicate id, and the agent would not
/// start again with that file), and so does a restart.
#[test]
fn a_file_service_takes_the_place_of_an_api_registration_of_its_id() -> anyhow::Result<()> {
    require_root();
    let mut mesh = Mesh::start(MeshSpec::new("allow").node_a(Service::new("web", 8000)))?;
    mesh.grant_agent_services(NodeA, &["db"])?;
    let db_token = mesh.service_token(&["db"])?;
    let port_of_db_1 = |mesh: &Mesh| -> anyhow::Result<Option<u64>> {
        let v = mesh.weft_json(&["catalog", "service", "db"])?;
        Ok(v["instances"].as_array().and_then(|a| {
            a.iter()
                .find(|i| i["id"] == "db-1")
                .and_then(|i| i["port"].as_u64())
        }))
    };
    let db = r#"{"ID":"db-1","Name":"db","Port":5432}"#;
    let (code, body) = put_json(&mesh, "/v1/agent/service/register", Some(&db_token), db)?;
    ensure!(code == 200, "register: {code} {body}");
    wait_until(STEP, "the API's db-1 in the catalog", || {
        Ok((port_of_db_1(&mesh)? == Some(5432)).then_some(()))
    })?;

    let config = mesh.agent_config(NodeA);
    let mut text = std::fs::read_to_string(&config)?;
    text += "\n[[service]]\nid = \"db-1\"\nname = \"db\"\nport = 6432\n";
    std::fs::write(&config, text)?;
    let out = mesh.run(
        NodeA,
        bin("weft-agent"),
        &[
            "reload",
            "--config",
            config.to_str().context("config path")?,
        ],
        Duration::from_secs(30),
    )?;
    ensure!(out.success(), "reload: {}", out.describe());
    wait_until(STEP, "the file's db-1 in the catalog", || {
        Ok((port_of_db_1(&mesh)? == Some(6432)).then_some(()))
    })?;
    // It is the file's now: not the API's to remove.
    let (code, body) = put_json(
        &mesh,
        "/v1/agent/service/deregister/db-1",
        Some(&db_token),
        "",
    )?;
    ensure!(
        code == 400 && body.contains("configuration file"),
        "deregistering the file's db-1: {code} {body}"
    );

    mesh.restart_agent(NodeA)?;
    wait_until(STEP, "the file's db-1 after a restart", || {
        Ok((port_of_db_1(&mesh)? == Some(6432)).then_some(()))
    })?;
    Ok(())
}
