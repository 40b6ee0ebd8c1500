//! Two datacenters federated through mesh gateways ([`weft_tests::federation`]):
//! dc1 the primary, dc2 a secondary that knows only the WAN address of
//! dc1's gateway. No namespace routes between the LANs (checked), so
//! whatever crosses goes through the gateways.
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use weft_tests::browser::Browser;
use weft_tests::federation::{DcSpec, Federation, Place, DCS};
use weft_tests::mesh::{run_bounded, wait_until};
use weft_tests::require_root;
use weft_tests::servers::bin;

/// Whether a TCP connection from `ns` to `addr` fails at once for want of
/// a route (curl's exit 7), rather than reaching anything.
fn unreachable_from(
    fed: &Federation,
    ns: &weft_tests::netns::Netns,
    addr: &str,
) -> anyhow::Result<bool> {
    let out = fed.run_in(
        ns,
        "curl",
        &["-s", "-m", "3", &format!("http://{addr}/")],
        Duration::from_secs(10),
    )?;
    Ok(out.code() == Some(7))
}

/// What `openssl s_client` from dc k's LAN, through its first gateway with
/// SNI `name`, is shown: the leaf's names and the certificates sent after
/// it (PEM), if a handshake got that far. The leaf is left in `leaf.pem`.
fn presented(fed: &Federation, k: usize, name: &str) -> anyhow::Result<Option<(String, String)>> {
    let out = fed.run_in(
        fed.lan(k),
        "openssl",
        &[
            "s_client",
            "-connect",
            &fed.gateway_lan(k, 0),
            "-servername",
            name,
            "-alpn",
            "h2",
            "-showcerts",
        ],
        Duration::from_secs(15),
    )?;
    let (begin, end) = ("-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----");
    let mut pems = Vec::new();
    let mut rest = out.stdout.as_str();
    while let (Some(from), Some(to)) = (rest.find(begin), rest.find(end)) {
        pems.push(format!("{}\n", &rest[from..to + end.len()]));
        rest = &rest[to + end.len()..];
    }
    let Some(leaf) = pems.first() else {
        return Ok(None);
    };
    let pem = fed.path("leaf.pem");
    std::fs::write(&pem, leaf)?;
    let text = run_bounded(
        std::process::Command::new("openssl").args([
            "x509",
            "-in",
            &pem.display().to_string(),
            "-noout",
            "-ext",
            "subjectAltName",
        ]),
        Duration::from_secs(10),
    )?;
    Ok(Some((text.stdout, pems[1..].concat())))
}

#[test]
fn two_datacenters_federate_through_their_gateways_only() -> anyhow::Result<()> {
    require_root();
    let one_gateway = DcSpec {
        gateways: 1,
        ..Default::default()
    };
    let mut fed = Federation::start([one_gateway.clone(), one_gateway])?;

    // The LANs do not reach each other or the WAN; a gateway does not
    // reach the other LAN.
    let dc2_server = format!("{}:8502", fed.server_ip(1));
    ensure!(
        unreachable_from(&fed, fed.lan(0), &dc2_server)?,
        "dc1's LAN reaches dc2's server"
    );
    ensure!(
        unreachable_from(&fed, fed.lan(0), &fed.gateway_wan(1, 0))?,
        "dc1's LAN reaches dc2's gateway's WAN address"
    );
    ensure!(
        unreachable_from(&fed, fed.gateway(0, 0), &dc2_server)?,
        "dc1's gateway reaches dc2's LAN"
    );

    // From dc1's LAN, through the gateways, a TLS client naming dc2's
    // servers meets their certificate (the gateways did not terminate
    // TLS), and without a server certificate of its own gets nowhere.
    let (seen, _) = presented(&fed, 0, "server.dc2.weft")?
        .context("no certificate came back from dc2's servers")?;
    ensure!(
        seen.contains("DNS:server.dc2.weft"),
        "dc2's servers presented: {seen}"
    );
    let out = fed.run_in(
        fed.lan(0),
        bin("weft"),
        &[
            &format!("--addr={}", fed.gateway_lan(0, 0)),
            &format!("--ca-file={}", fed.path("ca.pem").display()),
            "--tls-server-name=server.dc2.weft",
            "catalog",
            "services",
        ],
        Duration::from_secs(15),
    )?;
    ensure!(
        !out.success(),
        "a client without a server certificate used dc2's servers through the gateways: {}",
        out.describe()
    );

    // One trust domain: dc2's node, reached from dc1's LAN by its name,
    // presents a dc2 certificate that chains to dc1's roots through the
    // intermediate it sends.
    let view = fed.agent_view(0, fed.lan(0))?;
    let td = view["trust_domain"]
        .as_str()
        .context("no trust domain")?
        .to_string();
    let roots: String = view["roots_pem"]
        .as_array()
        .context("no roots")?
        .iter()
        .filter_map(|r| r.as_str())
        .collect();
    let node_b = format!("spiffe://{td}/ns/default/dc/dc2/node/node-b");
    let (names, chain) = wait_until(Duration::from_secs(30), "node-b's certificate", || {
        Ok(presented(&fed, 0, &format!("node-b.dc2.node.{td}"))?
            .filter(|(names, _)| names.contains(&node_b)))
    })?;
    ensure!(!chain.is_empty(), "node-b sent no intermediate: {names}");
    std::fs::write(fed.path("roots.pem"), &roots)?;
    std::fs::write(fed.path("chain.pem"), &chain)?;
    let verify = run_bounded(
        std::process::Command::new("openssl").args([
            "verify",
            "-CAfile",
            &fed.path("roots.pem").display().to_string(),
            "-untrusted",
            &fed.path("chain.pem").display().to_string(),
            &fed.path("leaf.pem").display().to_string(),
        ]),
        Duration::from_secs(10),
    )?;
    ensure!(
        verify.success(),
        "node-b's certificate does not chain to dc1's roots: {}",
        verify.describe()
    );

    // ACLs: a policy and token made in the primary work in dc2 once
    // replicated; dc2 cannot change them, and its own tokens stay. A
    // policy of dc2's own with a name the primary also uses ("clash")
    // keeps the primary's out.
    let policy = |at: usize, name: &str| {
        fed.weft(
            at,
            &[
                "acl",
                "policy",
                "create",
                "--name",
                name,
                "--rules",
                r#"service_prefix "" { policy = "read" }"#,
            ],
        )
    };
    // dc2's first: the primary's, replicated first, would take the name.
    policy(1, "clash")?;
    policy(0, "catalog-reader")?;
    policy(0, "clash")?;
    let created: serde_json::Value = serde_json::from_str(&fed.weft(
        0,
        &[
            "--format",
            "json",
            "acl",
            "token",
            "create",
            "--policy",
            "catalog-reader",
            "--policy",
            "clash",
        ],
    )?)?;
    let global = created["secret_id"]
        .as_str()
        .context("no secret")?
        .to_string();
    wait_until(Duration::from_secs(15), "dc2 to take dc1's token", || {
        Ok(fed
            .weft_as(1, &global, &["catalog", "services"])?
            .success()
            .then_some(()))
    })?;
    // The copy is written once, not every exchange (2 s): a token linking
    // a policy left out differed from its copy every round, and each
    // rewrite made every watch in dc2 start over.
    let accessor = created["accessor_id"].as_str().context("no accessor")?;
    let written = |fed: &Federation| -> anyhow::Result<serde_json::Value> {
        let out = fed.weft(1, &["--format", "json", "acl", "token", "read", accessor])?;
        Ok(serde_json::from_str::<serde_json::Value>(&out)?["modify_index"].clone())
    };
    let first = written(&fed)?;
    // Three exchange rounds: long enough to see a rewrite each round.
    std::thread::sleep(Duration::from_secs(7));
    ensure!(
        written(&fed)? == first,
        "dc2 rewrote its copy of the token (modify_index {first} before)"
    );
    let refused = fed.weft_out(1, &["acl", "policy", "delete", "catalog-reader"])?;
    ensure!(
        !refused.success() && refused.stderr.contains("primary datacenter's"),
        "dc2 deleted a replicated policy: {}",
        refused.describe()
    );
    ensure!(
        fed.weft_out(1, &["catalog", "services"])?.success(),
        "dc2's own management token stopped working"
    );
    // Deleted in the primary, it stops working in dc2 too.
    fed.weft(0, &["acl", "token", "delete", accessor])?;
    wait_until(
        Duration::from_secs(15),
        "dc2 to drop dc1's deleted token",
        || Ok((!fed.weft_as(1, &global, &["catalog", "services"])?.success()).then_some(())),
    )?;
    fed.passed = true;
    Ok(())
}

/// `api` on a node's own address, checked over HTTP every second.
fn api_service() -> String {
    "[[service]]\nname = \"api\"\nport = 8080\naddress = \"NODE\"\n\
     [[service.check]]\nhttp = \"http://NODE:8080/healthz\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n"
        .to_string()
}

/// What one request through dc1's `web` upstream at `port` got: the
/// answering instance's name, or `None` when it failed.
fn ask(fed: &Federation, port: u16, path: &str) -> anyhow::Result<Option<String>> {
    let out = fed.curl(
        0,
        &["-s", "-m", "3", &format!("http://127.0.0.1:{port}{path}")],
    )?;
    Ok(out
        .success()
        .then(|| out.stdout.trim().to_string())
        .filter(|s| s.starts_with("instance ")))
}

/// Requests through `port` one after another (each its own connection)
/// until `done` says so of an answer, at most `limit`: how many failed on
/// the way, and how long it took.
fn until_answer(
    fed: &Federation,
    port: u16,
    limit: Duration,
    done: impl Fn(&str) -> bool,
) -> anyhow::Result<(usize, Duration)> {
    let start = Instant::now();
    let mut failed = 0;
    while start.elapsed() < limit {
        match ask(fed, port, "/")? {
            Some(answer) if done(&answer) => return Ok((failed, start.elapsed())),
            Some(_) => {}
            None => failed += 1,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("no answer as wanted through {port} within {limit:?} ({failed} failed)")
}

/// `n` requests through `port`, 100 ms apart, while `during` runs once
/// after the first: how many failed.
fn failures_across(
    fed: &Federation,
    port: u16,
    n: usize,
    during: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    let mut failed = usize::from(ask(fed, port, "/")?.is_none());
    during()?;
    for _ in 1..n {
        failed += usize::from(ask(fed, port, "/")?.is_none());
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(failed)
}

#[test]
fn dc1_reaches_dc2_through_gateways_fails_over_and_keeps_flowing() -> anyhow::Result<()> {
    require_root();
    let web = "[[service]]\nname = \"web\"\nport = 8000\n\
               [[service.upstream]]\nname = \"api\"\nlocal_port = 9191\n\
               [[service.upstream]]\nname = \"api\"\nlocal_port = 9192\ndatacenter = \"dc2\"\n";
    // dc1: web on node-a, api on node-c; dc2: api on node-b, two gateways.
    let dc1 = DcSpec {
        gateways: 1,
        services: web.to_string(),
        service_names: vec!["web".into()],
        ebpf: false,
        second_node: Some((api_service(), vec!["api".into()])),
    };
    let dc2 = DcSpec {
        gateways: 2,
        services: api_service(),
        service_names: vec!["api".into()],
        ebpf: false,
        second_node: None,
    };
    let mut fed = Federation::start([dc1, dc2])?;
    let (api1, api2) = (
        format!("{}:8080", fed.lan_ip(0, 100)),
        format!("{}:8080", fed.lan_ip(1, 1)),
    );
    fed.workload_in(0, Place::Second, "api-dc1", &api1)?;
    fed.workload(1, "api-dc2", &api2)?;
    wait_until(
        Duration::from_secs(30),
        "dc1 to see dc2's api passing",
        || {
            let view = fed.agent_view(0, fed.lan(0))?;
            let passing = view["remote"]["dc2"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|i| i["service"] == "api" && i["health"] == "passing")
            });
            Ok(passing.then_some(()))
        },
    )?;

    // dc2's api through the upstream that names dc2; the WAN between the
    // gateways carries only TLS: the request's path never shows.
    let capture = fed.capture(fed.wan(), "d0g0", "wan.pcap")?;
    let marker = "/echo/payload-7f3a9c-never-on-the-wan";
    let answer = wait_until(Duration::from_secs(20), "an answer from dc2", || {
        ask(&fed, 9192, marker)
    })?;
    ensure!(answer.contains("instance api-dc2"), "answer: {answer}");
    let pcap = capture.finish()?;
    ensure!(
        pcap.count("tcp port 8443")? > 0,
        "nothing crossed dc1's gateway's WAN link"
    );
    ensure!(
        !pcap.contains(b"payload-7f3a9c"),
        "the request's path crossed the WAN in clear ({})",
        pcap.path.display()
    );
    // And dc1's own api through the plain upstream.
    ensure!(ask(&fed, 9191, "/")?.as_deref() == Some("instance api-dc1"));

    // dc1 knows dc2: `weft members --wan`, `/v1/catalog/datacenters`, and
    // dc2's catalog and health by `--dc` and `?dc=` (from dc1's copy).
    let wan: serde_json::Value =
        serde_json::from_str(&fed.weft(0, &["--format", "json", "members", "--wan"])?)?;
    let dcs = wan["datacenters"].as_array().context("no datacenters")?;
    ensure!(dcs.len() == 2, "members --wan: {wan}");
    ensure!(
        dcs[0]["name"] == "dc1" && dcs[0]["primary"] == true && dcs[0]["local"] == true,
        "{wan}"
    );
    ensure!(
        dcs[1]["name"] == "dc2" && dcs[1]["gateways"].as_array().map(Vec::len) == Some(2),
        "{wan}"
    );
    let (status, body) = fed.http_get(0, "/v1/catalog/datacenters")?;
    ensure!(
        status == 200 && body.trim() == r#"["dc1","dc2"]"#,
        "{status} {body}"
    );
    let (status, body) = fed.http_get(0, "/v1/health/service/api?dc=dc2&passing")?;
    let health: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("{status} {body}"))?;
    ensure!(
        status == 200
            && health.as_array().map(Vec::len) == Some(1)
            && health[0]["Node"]["Datacenter"] == "dc2"
            && health[0]["Node"]["Node"] == "node-b",
        "{status} {body}"
    );
    // Without a token, or with one that reads no service, nothing of dc2.
    for path in [
        "/v1/catalog/datacenters",
        "/v1/health/service/api?dc=dc2",
        "/v1/catalog/services?dc=dc2",
    ] {
        let (status, body) = fed.http_get_as(0, "", path)?;
        ensure!(status == 403, "{path} without a token: {status} {body}");
    }
    let kv_only = fed.weft(
        0,
        &[
            "acl",
            "policy",
            "create",
            "--name",
            "kv-only",
            "--rules",
            r#"key_prefix "" { policy = "read" }"#,
        ],
    );
    kv_only?;
    let created: serde_json::Value = serde_json::from_str(&fed.weft(
        0,
        &[
            "--format", "json", "acl", "token", "create", "--policy", "kv-only",
        ],
    )?)?;
    let kv_token = created["secret_id"].as_str().context("no secret")?;
    let (status, body) = fed.http_get_as(0, kv_token, "/v1/health/service/api?dc=dc2")?;
    ensure!(
        status == 403,
        "dc2's api with a KV-only token: {status} {body}"
    );
    // A token that reads api but no node sees none of api's instances
    // there, as here (their node names, addresses and tags are the nodes').
    fed.weft(
        0,
        &[
            "acl",
            "policy",
            "create",
            "--name",
            "api-only",
            "--rules",
            r#"service "api" { policy = "read" }"#,
        ],
    )?;
    let created: serde_json::Value = serde_json::from_str(&fed.weft(
        0,
        &[
            "--format", "json", "acl", "token", "create", "--policy", "api-only",
        ],
    )?)?;
    let api_only = created["secret_id"].as_str().context("no secret")?;
    for path in [
        "/v1/health/service/api?dc=dc2",
        "/v1/catalog/service/api?dc=dc2",
    ] {
        let (status, body) = fed.http_get_as(0, api_only, path)?;
        ensure!(
            status == 200 && body.trim() == "[]",
            "{path} with a token reading no node: {status} {body}"
        );
    }
    let (status, body) = fed.http_get_as(0, api_only, "/v1/catalog/services?dc=dc2")?;
    ensure!(
        status == 200
            && serde_json::from_str::<serde_json::Value>(&body)?["api"] == serde_json::json!([]),
        "dc2's services with a token reading no node: {status} {body}"
    );
    // Other endpoints are forwarded to dc2's servers, with the caller's
    // token (the primary's, replicated there): a key written in dc2 from
    // dc1 is dc2's, not dc1's.
    let token = fed.token(0).to_string();
    let (status, body) =
        fed.http_as(0, &token, ("PUT", "/v1/kv/from-dc1?dc=dc2"), Some("hello"))?;
    ensure!(status == 200 && body.trim() == "true", "{status} {body}");
    let (status, body) = fed.http_get(1, "/v1/kv/from-dc1?raw")?;
    ensure!(
        status == 200 && body == "hello",
        "dc2's own read: {status} {body}"
    );
    let (status, body) = fed.http_get(0, "/v1/kv/from-dc1?raw&dc=dc2")?;
    ensure!(status == 200 && body == "hello", "{status} {body}");
    let (status, body) = fed.http_get(0, "/v1/kv/from-dc1")?;
    ensure!(status == 404, "dc1 has dc2's key: {status} {body}");
    // Refused there as here: no token, a KV-only token writing, dc2's
    // snapshot (each datacenter's own).
    let (status, body) = fed.http_get_as(0, "", "/v1/kv/from-dc1?dc=dc2")?;
    ensure!(status == 403, "no token: {status} {body}");
    let (status, body) = fed.http_as(0, kv_token, ("PUT", "/v1/kv/x?dc=dc2"), Some("x"))?;
    ensure!(
        status == 403,
        "a read-only token wrote in dc2: {status} {body}"
    );
    let (status, body) = fed.http_get(0, "/v1/snapshot?dc=dc2")?;
    ensure!(
        status == 400 && body.contains("each datacenter's own"),
        "{status} {body}"
    );
    let (status, body) = fed.http_get(0, "/v1/catalog/services?dc=dc9")?;
    ensure!(
        status == 400 && body.contains("not a datacenter of this federation"),
        "{status} {body}"
    );
    // A secondary's own token (dc2's bootstrap token here) works nowhere
    // else: dc2's servers do not send its secret to dc1.
    let (status, body) = fed.http_get(1, "/v1/kv/from-dc1?dc=dc1")?;
    ensure!(
        status == 403 && body.contains("datacenter dc2's own"),
        "dc2's own token sent to dc1: {status} {body}"
    );
    // Blocking queries forwarded at once hold at most MAX_FORWARDS (64) of
    // the server's connections through its gateway (256 places a source),
    // and one token at most 16 of those: the rest are told 429, not queued,
    // and the server's own federation calls keep their places.
    let mut tokens = vec![kv_token.to_string()];
    for _ in 0..9 {
        let created: serde_json::Value = serde_json::from_str(&fed.weft(
            0,
            &[
                "--format", "json", "acl", "token", "create", "--policy", "kv-only",
            ],
        )?)?;
        tokens.push(
            created["secret_id"]
                .as_str()
                .context("no secret")?
                .to_string(),
        );
    }
    for token in &tokens {
        wait_until(Duration::from_secs(20), "the token copied to dc2", || {
            let (status, _) = fed.http_get_as(0, token, "/v1/kv/from-dc1?dc=dc2")?;
            Ok((status == 200).then_some(()))
        })?;
    }
    // Each waits 15 s: long enough that all of them are open at once.
    let blocking = "/v1/kv/from-dc1?dc=dc2&index=999999999&wait=15s";
    let shared = &fed;
    let ask_all = |asks: Vec<&str>| -> anyhow::Result<Vec<u16>> {
        std::thread::scope(|scope| {
            let running: Vec<_> = (asks.into_iter())
                .map(|token| {
                    scope.spawn(move || shared.http_get_within(0, token, blocking, 25).map(|a| a.0))
                })
                .collect();
            running
                .into_iter()
                .map(|a| a.join().expect("a forwarding thread"))
                .collect()
        })
    };
    let count = |answers: &[u16], status: u16| answers.iter().filter(|s| **s == status).count();
    // Ten tokens, eight queries each: at most 64 forwarded, the rest
    // refused (fewer at once, if the machine was slow to open them all).
    let answers = ask_all(tokens.iter().flat_map(|t| [t.as_str(); 8]).collect())?;
    ensure!(
        count(&answers, 200) <= 64 && count(&answers, 200) + count(&answers, 429) == 80,
        "80 blocking queries of ten tokens: {answers:?}"
    );
    // One token, thirty queries: at most sixteen forwarded.
    let answers = ask_all(vec![tokens[0].as_str(); 30])?;
    ensure!(
        count(&answers, 200) <= 16 && count(&answers, 200) + count(&answers, 429) == 30,
        "30 blocking queries of one token: {answers:?}"
    );
    let (status, body) = fed.http_get(0, "/v1/kv/from-dc1?raw&dc=dc2")?;
    ensure!(
        status == 200 && body == "hello",
        "after them: {status} {body}"
    );
    let service = fed.weft(0, &["catalog", "service", "api", "--dc", "dc2"])?;
    ensure!(
        service.contains("node-b") && service.contains("passing"),
        "{service}"
    );

    // Intentions and config entries are the primary's: a secondary refuses
    // to write them, and takes the primary's.
    let refused = fed.weft_out(1, &["intention", "create", "web", "api", "--deny"])?;
    ensure!(
        !refused.success() && refused.stderr.contains("primary datacenter, dc1"),
        "dc2 took an intention: {}",
        refused.describe()
    );

    // Failover: when dc1's api fails its check, its resolver sends api to
    // dc2, and back once it passes; once by `Datacenters`, once by Consul's
    // `Targets`.
    let resolver = fed.path("api-resolver.hcl");
    for failover in [
        "Datacenters = [\"dc2\"]",
        "Targets = [{ Service = \"api\", Datacenter = \"dc2\" }]",
    ] {
        std::fs::write(
            &resolver,
            format!(
                "Kind = \"service-resolver\"\nName = \"api\"\nFailover = {{ \"*\" = {{ {failover} }} }}\n"
            ),
        )?;
        fed.weft(0, &["config", "write", &resolver.display().to_string()])?;
        let fail = fed.curl(0, &["-s", "-m", "3", &format!("http://{api1}/fail")])?;
        ensure!(fail.success(), "failing api-dc1: {}", fail.describe());
        let (to_dc2, took) = until_answer(&fed, 9191, Duration::from_secs(20), |a| {
            a.contains("api-dc2")
        })?;
        let recover = fed.curl(0, &["-s", "-m", "3", &format!("http://{api1}/recover")])?;
        ensure!(
            recover.success(),
            "recovering api-dc1: {}",
            recover.describe()
        );
        let (to_dc1, back) = until_answer(&fed, 9191, Duration::from_secs(20), |a| {
            a.contains("api-dc1")
        })?;
        eprintln!(
            "failover ({failover}) to dc2: {to_dc2} failed, {took:?}; back to dc1: {to_dc1} failed, {back:?}"
        );
    }

    // Intentions judge the caller's datacenter too: a deny of dc2's web
    // leaves dc1's web alone, once both datacenters' agents hold it...
    fed.weft(0, &["intention", "create", "web@dc2", "api", "--deny"])?;
    for k in 0..2 {
        wait_until(
            Duration::from_secs(10),
            "the agents to hold web@dc2",
            || {
                let view = fed.agent_view(k, fed.lan(k))?;
                Ok(view["intentions"]
                    .to_string()
                    .contains("web@dc2")
                    .then_some(()))
            },
        )?;
    }
    ensure!(
        ask(&fed, 9192, "/")?.is_some(),
        "a deny of web@dc2 stopped dc1's web"
    );
    fed.weft(0, &["intention", "delete", "web@dc2", "api"])?;
    // ...and a deny written in the primary for dc1's web stops web -> api
    // in dc2 within 2 s; deleting it lets it through again.
    fed.weft(0, &["intention", "create", "web@dc1", "api", "--deny"])?;
    let denied_at = Instant::now();
    wait_until(
        Duration::from_secs(2),
        "the deny to stop dc1 -> dc2",
        || Ok(ask(&fed, 9192, "/")?.is_none().then_some(())),
    )?;
    eprintln!("deny took effect in {:?}", denied_at.elapsed());
    // ...and dc2 has it too (its agents enforce it as well).
    wait_until(Duration::from_secs(10), "dc2 to replicate the deny", || {
        let list = fed.weft(1, &["intention", "list"])?;
        Ok((list.contains("web") && list.contains("deny")).then_some(()))
    })?;
    fed.weft(0, &["intention", "delete", "web@dc1", "api"])?;
    wait_until(Duration::from_secs(10), "dc1 -> dc2 again", || {
        ask(&fed, 9192, "/")
    })?;

    // The UI's reads: cross-datacenter edges in both datacenters' topology
    // (dc1 counts web -> api@dc2 at the source, dc2 web@dc1 -> api at the
    // destination), dc2's services on dc1's Datacenters page.
    for (k, source, destination) in [(0, "web", "api@dc2"), (1, "web@dc1", "api")] {
        wait_until(Duration::from_secs(20), "a cross-datacenter edge", || {
            let (status, body) = fed.http_get(k, "/v1/internal/ui/topology?window=300")?;
            ensure!(status == 200, "{status} {body}");
            let topology: serde_json::Value = serde_json::from_str(&body)?;
            let edge = topology["Edges"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["Source"] == source && e["Destination"] == destination);
            let remote = if k == 0 { destination } else { source };
            let node = topology["Services"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["Name"] == remote);
            Ok(match (edge, node) {
                (Some(e), Some(n)) if e["Allowed"] == true && n["ChecksPassing"] == 1 => Some(()),
                _ => None,
            })
        })?;
    }
    // The same in dc1's UI, in Chromium.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(ui_shows_dc2(&fed))?;
    let (status, body) = fed.http_get(0, "/v1/internal/ui/datacenters")?;
    let dcs: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("{status} {body}"))?;
    ensure!(
        dcs[1]["Name"] == "dc2"
            && dcs[1]["Gateways"].as_array().map(Vec::len) == Some(2)
            && dcs[1]["Services"].to_string().contains("\"Name\":\"api\""),
        "{dcs}"
    );

    // A root rotation in the primary reaches dc2; traffic to dc2 keeps
    // flowing across it.
    let roots_before = fed.agent_view(1, fed.lan(1))?["roots_pem"].clone();
    let failed = failures_across(&fed, 9192, 60, || {
        fed.weft(0, &["ca", "rotate"])?;
        wait_until(Duration::from_secs(20), "dc2 to take the new root", || {
            let v = fed.agent_view(1, fed.lan(1))?;
            Ok((v["roots_pem"] != roots_before
                && v["roots_pem"].as_array().is_some_and(|r| r.len() == 2))
            .then_some(()))
        })?;
        Ok(())
    })?;
    eprintln!("failed across the root rotation: {failed} of 60");
    ensure!(
        failed == 0,
        "{failed} requests failed across the root rotation"
    );

    // One of dc2's two gateways killed: traffic goes on through the other.
    let failed = failures_across(&fed, 9192, 40, || fed.kill(&Federation::gateway_name(1, 0)))?;
    eprintln!("failed across a gateway's death: {failed} of 40");
    ensure!(
        failed <= 2,
        "{failed} of 40 requests failed after a gateway died"
    );
    let after = until_answer(&fed, 9192, Duration::from_secs(10), |a| {
        a.contains("api-dc2")
    })?;
    eprintln!("after: {after:?} ({})", DCS[1]);
    fed.passed = true;
    Ok(())
}

/// dc1's web UI: dc2's api drawn as another datacenter's service with
/// web's edge to it, and dc2 with its passing api on the Datacenters page.
async fn ui_shows_dc2(fed: &Federation) -> anyhow::Result<()> {
    let browser = Browser::start(Some(fed.lan(0)), &fed.path("chromedriver.log")).await?;
    let shown = async {
        let ui = format!("https://{}:8500/ui/", fed.server_ip(0));
        browser.goto(&ui).await?;
        browser.log_in(fed.token(0)).await?;
        browser.client.goto(&format!("{ui}#/topology")).await?;
        let edge = browser
            .wait_for(
                Duration::from_secs(20),
                "web -> api@dc2 and a dashed api · dc2 on the topology",
                r#"const e = document.querySelector('g.edge[data-source="web"][data-destination="api@dc2"]');
                   const n = document.querySelector('g.node.remote[data-service="api@dc2"]');
                   return e && n && n.textContent.includes('api · dc2') ? e.getAttribute('class') : null;"#,
            )
            .await?;
        ensure!(edge.to_string().contains("edge-ok"), "{edge}");
        browser.screenshot("topology-datacenters").await?;
        browser.client.goto(&format!("{ui}#/datacenters")).await?;
        browser
            .wait_for(
                Duration::from_secs(10),
                "dc2's api passing on the Datacenters page",
                r#"const s = document.querySelector('div[data-datacenter="dc2"] tr[data-service="api"] td.status');
                   return s && s.textContent.includes('passing') ? true : null;"#,
            )
            .await?;
        browser.screenshot("datacenters").await?;
        anyhow::Ok(())
    }
    .await;
    if shown.is_err() {
        let _ = browser.screenshot("datacenters-failure").await;
    }
    browser.close().await?;
    shown
}

/// Transparent mode: a workload of dc1 calls `api.service.dc2.weft` by
/// name, as it would a local service; the agent's DNS answers a virtual IP
/// dc1 gave dc2's api, its eBPF programs bring the connection to the agent,
/// and the agent carries it through the gateways to dc2's instance.
#[test]
fn a_workload_calls_another_datacenters_service_by_name() -> anyhow::Result<()> {
    require_root();
    let dc1 = DcSpec {
        gateways: 1,
        services: "[[service]]\nname = \"web\"\nport = 8000\ncgroup = \"web\"\n".into(),
        service_names: vec!["web".into()],
        ebpf: true,
        second_node: None,
    };
    let dc2 = DcSpec {
        gateways: 1,
        services: api_service(),
        service_names: vec!["api".into()],
        ebpf: false,
        second_node: None,
    };
    let mut fed = Federation::start([dc1, dc2])?;
    fed.workload(1, "api-dc2", &format!("{}:8080", fed.lan_ip(1, 1)))?;
    let vip = wait_until(
        Duration::from_secs(30),
        "dc1 to give dc2's api a virtual IP",
        || {
            let view = fed.agent_view(0, fed.lan(0))?;
            Ok(view["vips"]["api.dc2"].as_str().map(String::from))
        },
    )?;
    let dig = fed.run_in(
        fed.lan(0),
        "dig",
        &["@127.0.0.1", "+short", "api.service.dc2.weft"],
        Duration::from_secs(10),
    )?;
    ensure!(
        dig.stdout.trim() == vip,
        "api.service.dc2.weft is {:?}, not {vip}",
        dig.stdout
    );
    let answer = wait_until(
        Duration::from_secs(30),
        "web to reach dc2's api by name",
        || {
            let out = fed.exec_as(
                0,
                "web",
                &["curl", "-s", "-m", "3", "http://api.service.dc2.weft:8080/"],
            )?;
            Ok(out
                .success()
                .then(|| out.stdout.trim().to_string())
                .filter(|s| !s.is_empty()))
        },
    )?;
    ensure!(answer == "instance api-dc2", "answer: {answer}");
    fed.passed = true;
    Ok(())
}
