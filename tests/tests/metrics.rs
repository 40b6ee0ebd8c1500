//! What Prometheus scrapes: the server's `/metrics` on its HTTP port (TLS,
//! a token with `operator:read`), in Prometheus text 0.0.4 unless the
//! scraper asks for OpenMetrics, clean for `promtool check metrics`. And
//! what log shippers read: no terminal colours in a log file, JSON lines
//! with `--log-format json`.
use std::process::{Command, Output};

use anyhow::Context;
use weft_tests::servers::Cluster;

/// GET `path` on server 1's HTTP port with `headers`: (status, content type, body).
fn get(cluster: &Cluster, path: &str, headers: &[String]) -> anyhow::Result<(u16, String, String)> {
    let server = &cluster.servers[0];
    let port = server.http_addr.rsplit(':').next().context("port")?;
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-m", "5", "--cacert"])
        .arg(&cluster.ca_file)
        .args(["--resolve", &format!("server.dc1.weft:{port}:127.0.0.1")])
        .args(["-w", "\n%{http_code} %{content_type}"]);
    // From 0600 files: the tokens are not on curl's command line.
    let dir = cluster
        .ca_file
        .parent()
        .context("the cluster's directory")?;
    for h in headers {
        cmd.args(["-H", &weft_tests::mesh::header_file_in(dir, h)?]);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = cmd
        .arg(format!("https://server.dc1.weft:{port}{path}"))
        .output()?;
    anyhow::ensure!(
        status.success(),
        "curl: {}",
        String::from_utf8_lossy(&stderr)
    );
    let out = String::from_utf8(stdout)?;
    let (body, last) = out.rsplit_once('\n').context("curl -w line")?;
    let (code, ctype) = last.split_once(' ').context("code and type")?;
    Ok((code.parse()?, ctype.to_string(), body.to_string()))
}

#[test]
fn server_metrics_need_operator_read_and_pass_promtool() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &[])?;
    cluster.cli(&["kv", "put", "k", "v"])?;

    // No token, or a token without operator:read: refused.
    let (code, _, body) = get(&cluster, "/metrics", &[])?;
    assert_eq!(code, 403, "{body}");
    let reader = cluster.token_with_rules("kv-reader", r#"key_prefix "" { policy = "read" }"#)?;
    let (code, _, body) = get(&cluster, "/metrics", &[format!("X-Consul-Token: {reader}")])?;
    assert_eq!(code, 403, "{body}");
    assert!(!body.contains("weft_server"), "{body}");

    let operator = cluster.token_with_rules("metrics", r#"operator = "read""#)?;
    let (code, ctype, text) = get(
        &cluster,
        "/metrics",
        &[format!("X-Consul-Token: {operator}")],
    )?;
    assert_eq!(code, 200, "{text}");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    for want in [
        "weft_server_raft_leader 1",
        "# TYPE weft_server_writes_total counter",
        "# TYPE weft_server_raft_commit_seconds histogram",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let applied: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("weft_server_writes_total{outcome=\"applied\"} "))
        .context("applied writes")?
        .parse()?;
    assert!(applied >= 1.0, "{text}");
    weft_tests::promtool_check(&text)?;
    // API calls are timed by method and code (the kv put above, and the
    // CLI's own calls).
    assert!(
        text.contains("weft_server_rpc_seconds_count{method=\"/weft.v1.Kv/Put\",code=\"Ok\"}"),
        "{text}"
    );
    // What docs/ gives operators: the dashboard's server metrics exist,
    // its queries parse, and the scrape configuration is valid.
    let (names, exprs) = weft_tests::dashboard_queries()?;
    for name in names.iter().filter(|n| n.starts_with("weft_server_")) {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "the dashboard queries {name}, which the server does not expose"
        );
    }
    weft_tests::promtool_check_queries(&exprs)?;
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/prometheus.yml");
    let checked = std::process::Command::new("promtool")
        .args(["check", "config", "--syntax-only", config])
        .output()?;
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stdout)
    );

    let (code, ctype, om) = get(
        &cluster,
        "/metrics",
        &[
            format!("Authorization: Bearer {}", cluster.token),
            "Accept: application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3".into(),
        ],
    )?;
    assert_eq!(code, 200);
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(om.trim_end().ends_with("# EOF"), "{om}");
    Ok(())
}

#[test]
fn logs_carry_no_colours_into_files_and_json_is_one_object_a_line() -> anyhow::Result<()> {
    let text = Cluster::start(1, &[])?;
    text.cli(&["kv", "put", "k", "v"])?;
    let log = text.log(1);
    assert!(log.contains("cluster initialized"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a log file:\n{log}"
    );

    let json = Cluster::start(1, &["--log-format", "json"])?;
    json.cli(&["kv", "put", "k", "v"])?;
    let log = json.log(1);
    let mut events = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not a JSON line: {line:?}"))?;
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        events += 1;
    }
    assert!(events > 0 && log.contains("cluster initialized"), "{log}");

    let bad = std::process::Command::new(weft_tests::servers::bin("weft-server"))
        .args(["--dev", "--log-format", "yaml"])
        .output()?;
    assert!(!bad.status.success());
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(
        said.contains("yaml") && said.contains("text or json"),
        "{said}"
    );
    Ok(())
}

/// Traffic reports: an agent (its node's identity) reports pairs with one
/// of its own services at an end, and no others; `weft top` merges what
/// every server was sent, counting a connection seen at both ends once,
/// and shows only pairs whose services the token may read.
#[test]
fn traffic_reports_reach_weft_top_from_every_server() -> anyhow::Result<()> {
    use weft_api::proto::{self, catalog_client::CatalogClient, telemetry_client::TelemetryClient};
    let cluster = Cluster::start(3, &[])?;
    let node_a = cluster.token_with(&["--node-identity", "node-a:dc1"])?;
    let node_b = cluster.token_with(&["--node-identity", "node-b:dc1"])?;
    let rt = tokio::runtime::Runtime::new()?;
    let pair = |source: &str, destination: &str, side: &str, connections: u64, requests: u64| {
        let mut p = weft_api::traffic::pair(source, destination);
        p.side = side.into();
        p.connections = connections;
        for _ in 0..requests {
            weft_api::traffic::add_request(&mut p, 3.0, false);
        }
        p
    };
    rt.block_on(async {
        let mut admin = CatalogClient::new(cluster.channel(1).await?);
        for (node, service, port) in [("node-a", "web", 8080u32), ("node-b", "api", 8081)] {
            admin
                .register_node(proto::RegisterNodeRequest {
                    node: Some(proto::Node {
                        name: node.into(),
                        address: format!("10.0.0.{}", port - 8070),
                        datacenter: "dc1".into(),
                        ..Default::default()
                    }),
                })
                .await?;
            admin
                .register_service(proto::RegisterServiceRequest {
                    instance: Some(proto::ServiceInstance {
                        id: service.into(),
                        service: service.into(),
                        node: node.into(),
                        address: format!("10.0.0.{}", port - 8070),
                        port,
                        ..Default::default()
                    }),
                })
                .await?;
        }
        // web's agent reports to server 2, api's to server 3: both ends of
        // the same 7 connections, and api's end timed 40 requests.
        let report = |node: &str, pairs| proto::TrafficReport {
            node: node.into(),
            pairs,
        };
        let mut as_a = TelemetryClient::new(cluster.channel_as(2, Some(&node_a)).await?);
        as_a.report(report("node-a", vec![pair("web", "api", "outbound", 7, 0)]))
            .await?;
        let mut as_b = TelemetryClient::new(cluster.channel_as(3, Some(&node_b)).await?);
        as_b.report(report("node-b", vec![pair("web", "api", "inbound", 7, 40)]))
            .await?;

        // The attacks: another node's traffic, a node it is not, a bad side.
        let lie = as_a
            .report(report("node-a", vec![pair("db", "api", "outbound", 1, 0)]))
            .await
            .expect_err("node-a reported a pair of none of its services");
        assert_eq!(lie.code(), tonic::Code::PermissionDenied, "{lie:?}");
        let other = as_a
            .report(report("node-b", vec![pair("web", "api", "inbound", 1, 0)]))
            .await
            .expect_err("node-a reported as node-b");
        assert_eq!(other.code(), tonic::Code::PermissionDenied, "{other:?}");
        let side = as_a
            .report(report("node-a", vec![pair("web", "api", "sideways", 1, 0)]))
            .await
            .expect_err("an unknown side");
        assert_eq!(side.code(), tonic::Code::InvalidArgument, "{side:?}");
        // api's end of the pair is node-b's to report, and made-up pairs
        // (to fill the store) are refused.
        for (lie, code) in [
            (
                pair("web", "api", "inbound", 1, 0),
                tonic::Code::PermissionDenied,
            ),
            (
                pair("web", "ghost", "outbound", 1, 0),
                tonic::Code::PermissionDenied,
            ),
        ] {
            let e = as_a
                .report(report("node-a", vec![lie.clone()]))
                .await
                .expect_err("refused");
            assert_eq!(e.code(), code, "{lie:?}: {e:?}");
        }
        // A bad pair next to a good one costs itself alone: the answer
        // names it, the good one is kept (2 more connections).
        let mixed = as_a
            .report(report(
                "node-a",
                vec![
                    pair("web", "api", "outbound", 2, 0),
                    pair("web", "ghost", "outbound", 1, 0),
                ],
            ))
            .await
            .expect_err("a made-up pair in the report");
        assert_eq!(mixed.code(), tonic::Code::PermissionDenied, "{mixed:?}");
        assert!(
            mixed.message().starts_with("1 pairs refused, 1 kept"),
            "{mixed:?}"
        );
        // Figures that cannot be real (and would overflow sums).
        let mut huge = pair("web", "api", "outbound", 1, 0);
        huge.bytes_sent = u64::MAX;
        let mut more_errors = pair("web", "api", "outbound", 1, 2);
        more_errors.errors = 3;
        let mut untimed = pair("web", "api", "outbound", 1, 2);
        untimed.requests = 5;
        for bad in [huge, more_errors, untimed] {
            let e = as_a
                .report(report("node-a", vec![bad.clone()]))
                .await
                .expect_err("refused");
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}: {e:?}");
        }
        Ok::<_, anyhow::Error>(())
    })?;

    // Asked on server 1, which was sent nothing itself.
    let out = cluster.cli_at(
        cluster.grpc_addr(1),
        &["--format", "json", "top", "--once", "--window", "1m"],
    );
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let top: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let pairs = top["pairs"].as_array().context("pairs")?;
    assert_eq!(pairs.len(), 1, "{top}");
    let p = &pairs[0];
    assert_eq!(
        (p["source"].as_str(), p["destination"].as_str()),
        (Some("web"), Some("api"))
    );
    // 7 connections (9 at web's end, with the 2 kept from the mixed
    // report: the larger end counts) and 40 requests over the seconds
    // covered (a minute and the part of a slot before it), counted once.
    let covered = top["window_secs"].as_f64().context("window")?;
    assert!((60.0..=70.0).contains(&covered), "{top}");
    let total = |f: &str| p[f].as_f64().unwrap_or(-1.0) * covered;
    assert!((total("connections_per_sec") - 9.0).abs() < 1e-6, "{top}");
    assert!((total("requests_per_sec") - 40.0).abs() < 1e-6, "{top}");
    assert_eq!(p["p50_ms"].as_f64(), Some(5.0), "{top}");

    // A token that may read web but not api sees no pair.
    let web_only =
        cluster.token_with_rules("web-reader", r#"service "web" { policy = "read" }"#)?;
    let out = cluster.cli_as(
        cluster.grpc_addr(1),
        &web_only,
        &["--format", "json", "top", "--once"],
    );
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let top: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(top["pairs"].as_array().map(Vec::len), Some(0), "{top}");

    // The web UI's views of the same traffic, over HTTP on server 1: the
    // graph's edge, and api's incoming traffic over time (both merged from
    // servers 2 and 3).
    let token = Some(cluster.token.as_str());
    let topo = cluster
        .http(1, "GET", "/v1/internal/ui/topology?window=60", token, None)?
        .json()?;
    let covered = topo["WindowSecs"].as_f64().context("WindowSecs")?;
    let edges = topo["Edges"].as_array().context("Edges")?;
    assert_eq!(edges.len(), 1, "{topo}");
    let e = &edges[0];
    assert_eq!(
        (e["Source"].as_str(), e["Destination"].as_str()),
        (Some("web"), Some("api"))
    );
    assert!(
        (e["RequestsPerSec"].as_f64().unwrap_or(-1.0) * covered - 40.0).abs() < 1e-6,
        "{topo}"
    );
    assert!(e["Allowed"].is_boolean(), "{topo}");
    let reason = e["Reason"].as_str().unwrap_or("");
    assert!(
        reason.ends_with("by the default (allow): no intention matched")
            || reason.ends_with("by the default (deny): no intention matched"),
        "{topo}"
    );
    let names: Vec<_> = topo["Services"]
        .as_array()
        .context("Services")?
        .iter()
        .filter_map(|s| s["Name"].as_str())
        .collect();
    assert_eq!(names, ["api", "web"], "{topo}");

    let series = cluster
        .http(
            1,
            "GET",
            "/v1/internal/ui/traffic/api?window=600&step=60",
            token,
            None,
        )?
        .json()?;
    assert_eq!(series["StepSecs"], 60, "{series}");
    let points = series["Points"].as_array().context("Points")?;
    assert_eq!(points.len(), 10, "{series}");
    let sum = |f: &str| points.iter().filter_map(|p| p[f].as_u64()).sum::<u64>();
    assert_eq!((sum("Requests"), sum("Connections")), (40, 9), "{series}");
    let starts: Vec<u64> = points.iter().filter_map(|p| p["Start"].as_u64()).collect();
    assert!(starts.windows(2).all(|w| w[1] == w[0] + 60), "{series}");
    // The token that reads web only may not read api's traffic.
    let refused = cluster.http(
        1,
        "GET",
        "/v1/internal/ui/traffic/api",
        Some(&web_only),
        None,
    )?;
    assert_eq!(refused.status, 403, "{}", refused.body);
    let refused = cluster.http(1, "GET", "/v1/internal/ui/traffic/api?step=7", token, None)?;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(refused.body.contains("step_secs 7"), "{}", refused.body);
    Ok(())
}

/// Every agent metric the Grafana dashboard in docs/ queries is one the
/// agent has (each family given a sample, as a busy agent would).
#[test]
fn the_dashboard_queries_metrics_the_agent_has() -> anyhow::Result<()> {
    use std::time::Duration;
    use weft_agent::metrics::{AgentMetrics, Direction, EbpfCounter, Side};
    let m = AgentMetrics::new();
    m.conn_opened(Side::Outbound, "web", "api");
    m.conn_closed("web", "api", Duration::from_millis(5));
    m.bytes(Side::Outbound, "web", "api", Direction::Sent, 1);
    m.denied(Side::Inbound, "web", "db");
    m.http_request(Side::Inbound, "web", "api", 200, Duration::from_millis(2));
    m.ejected("web", "10.0.0.2:8080".parse()?);
    m.tls_failure(Side::Inbound, "unknown_ca");
    m.set_ebpf_counter(EbpfCounter::Redirected, 1);
    m.registrations().inc();
    let text = weft_api::exposition::to_text_004(&m.encode());
    weft_tests::promtool_check(&text)?;
    let (names, _) = weft_tests::dashboard_queries()?;
    let agent: Vec<_> = names
        .iter()
        .filter(|n| n.starts_with("weft_agent_"))
        .collect();
    assert!(agent.len() >= 5, "{names:?}");
    for name in agent {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "the dashboard queries {name}, which the agent does not have:\n{text}"
        );
    }
    Ok(())
}
