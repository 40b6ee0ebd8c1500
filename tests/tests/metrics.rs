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
    for h in headers {
        cmd.args(["-H", h]);
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
