//! `weft-bench ui`: the web UI and the traffic summaries with 1,000
//! services (issue 14).
//!
//! 1. The summaries' memory for a full hour: the server's own
//!    `TrafficStore`, in this process, fed an hour of 10-second reports for
//!    1,500 pairs of 1,000 services from both sides (3,000 kept series), as
//!    250 agents would send them; the figure is this process's RSS growth.
//!    (A real server cannot be given an hour of past reports: it places a
//!    report by when it arrives.)
//! 2. A real release server with 250 nodes, 1,000 services, 50 deny
//!    intentions and those 1,500 pairs reported: the topology answer's time
//!    over HTTPS, the server's memory, and the UI in headless Chromium: from
//!    a page load (reload of `/ui/#/topology` and `/ui/#/services`) to the
//!    graph or the list drawn, as the page itself records it
//!    (`data-drawn-at`, milliseconds since navigation began).
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use serde_json::Value;
use weft_api::proto::{self, catalog_client::CatalogClient, telemetry_client::TelemetryClient};
use weft_api::traffic;
use weft_server::traffic::TrafficStore;
use weft_tests::browser::Browser;
use weft_tests::servers::Cluster;

use crate::control_plane::{channel, Creds};
use crate::report::{Figure, Section};

const SERVICES: usize = 1000;
const NODES: usize = 250;

pub struct Run {
    pub figures: Vec<Figure>,
    pub sections: Vec<Section>,
}

/// The call graph: every service calls the next one, every even one also
/// the one 7 further on (1,500 pairs).
fn pairs() -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for i in 0..SERVICES {
        out.push((i, (i + 1) % SERVICES));
        if i % 2 == 0 {
            out.push((i, (i + 7) % SERVICES));
        }
    }
    out
}

fn service(i: usize) -> String {
    format!("svc-{i:04}")
}

fn node_of(service: usize) -> usize {
    service / (SERVICES / NODES)
}

/// What node `n`'s agent reports in one interval: its services' outbound
/// and inbound sides of every pair.
fn report_of(n: usize, requests: u64) -> Vec<proto::PairTraffic> {
    let mut out = Vec::new();
    for (s, d) in pairs() {
        for (side, local) in [("outbound", s), ("inbound", d)] {
            if node_of(local) != n {
                continue;
            }
            let mut p = traffic::pair(&service(s), &service(d));
            p.side = side.into();
            p.connections = 2;
            p.bytes_sent = 4096;
            p.bytes_received = 65536;
            for k in 0..requests {
                traffic::add_request(&mut p, 1.0 + (k % 40) as f64, k % 50 == 0);
            }
            out.push(p);
        }
    }
    out
}

fn self_rss_mb() -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmRSS")?
        .parse()?;
    Ok(kb / 1000.0)
}

/// Part 1: an hour of reports in a `TrafficStore`, and what summing it costs.
fn store_memory(figures: &mut Vec<Figure>) -> anyhow::Result<String> {
    let reports: Vec<Vec<proto::PairTraffic>> = (0..NODES).map(|n| report_of(n, 50)).collect();
    let before = self_rss_mb()?;
    let store = TrafficStore::default();
    let t0 = 1_800_000_000;
    let slots = weft_server::traffic::KEEP_SECS / weft_server::traffic::SLOT_SECS;
    for slot in 0..slots {
        for (n, report) in reports.iter().enumerate() {
            store.record(t0 + slot * 10, &format!("node-{n}"), report);
        }
    }
    let after = self_rss_mb()?;
    let (kept, slots_kept, dropped) = store.size();
    ensure!(dropped == 0, "{dropped} pair reports dropped");
    let now = t0 + slots * 10 - 1;
    let mut sums = Vec::new();
    for window in [60, 3600] {
        let mut samples = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            let (pairs, _) = store.window(now, window);
            let combined = traffic::combine_sides(pairs);
            samples.push(start.elapsed().as_secs_f64() * 1000.0);
            ensure!(combined.len() == 1500, "{} pairs", combined.len());
        }
        sums.push(Figure::new(
            format!("summing every pair over {window} s (in process)"),
            "ms",
            samples,
        ));
    }
    figures.push(Figure::new(
        "traffic summaries, 1 h of 1,500 pairs from both sides: memory",
        "MB",
        vec![after - before],
    ));
    figures.extend(sums);
    Ok(format!(
        "{kept} series (pair and side) × {slots_kept} slots in all; RSS {before:.0} → {after:.0} MB."
    ))
}

/// Part 2: a real server, the HTTP answer and the UI in Chromium.
fn real_server(figures: &mut Vec<Figure>, rounds: usize) -> anyhow::Result<String> {
    let cluster = Cluster::start(1, &["--node-timeout=10m"])?;
    let creds = Creds::of(&cluster);
    let addr = cluster.grpc_addr(1).to_string();
    let rt = tokio::runtime::Runtime::new()?;
    let registered = Instant::now();
    rt.block_on(async {
        let ch = channel(&creds, &addr).await?;
        let mut catalog = CatalogClient::new(ch.clone());
        for n in 0..NODES {
            catalog
                .register_node(proto::RegisterNodeRequest {
                    node: Some(proto::Node {
                        name: format!("node-{n}"),
                        address: format!("10.1.{}.{}", n / 200, n % 200 + 1),
                        datacenter: "dc1".into(),
                        ..Default::default()
                    }),
                })
                .await?;
        }
        for i in 0..SERVICES {
            let n = node_of(i);
            catalog
                .register_service(proto::RegisterServiceRequest {
                    instance: Some(proto::ServiceInstance {
                        id: format!("{}-1", service(i)),
                        service: service(i),
                        node: format!("node-{n}"),
                        address: format!("10.1.{}.{}", n / 200, n % 200 + 1),
                        port: 8000 + (i % 1000) as u32,
                        health: if i % 97 == 0 {
                            proto::Health::Critical
                        } else {
                            proto::Health::Passing
                        } as i32,
                        ..Default::default()
                    }),
                })
                .await?;
        }
        let mut intentions = proto::intentions_client::IntentionsClient::new(ch.clone());
        for i in (0..SERVICES).step_by(20) {
            intentions
                .upsert(proto::UpsertIntentionRequest {
                    intention: Some(proto::Intention {
                        source: service(i),
                        destination: service((i + 1) % SERVICES),
                        action: "deny".into(),
                        ..Default::default()
                    }),
                })
                .await?;
        }
        let mut telemetry = TelemetryClient::new(ch);
        for n in 0..NODES {
            telemetry
                .report(proto::TrafficReport {
                    node: format!("node-{n}"),
                    pairs: report_of(n, 50),
                })
                .await?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let setup = registered.elapsed();
    let token = Some(cluster.token.as_str());
    let mut answer = Vec::new();
    let mut answer_bytes = 0;
    for _ in 0..rounds {
        let start = Instant::now();
        let reply = cluster.http(1, "GET", "/v1/internal/ui/topology?window=60", token, None)?;
        answer.push(start.elapsed().as_secs_f64() * 1000.0);
        ensure!(reply.status == 200, "{}", reply.body);
        let topo = reply.json()?;
        ensure!(
            topo["Edges"].as_array().map(Vec::len) == Some(1500),
            "edges: {}",
            topo["Edges"].as_array().map_or(0, Vec::len)
        );
        answer_bytes = reply.body.len();
    }
    figures.push(Figure::new(
        "topology answer over HTTPS, 1,000 services and 1,500 edges (curl, whole request)",
        "ms",
        answer,
    ));
    let pid = cluster.pid(1).context("server pid")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .context("server VmRSS")?
        / 1000.0;
    figures.push(Figure::new(
        "server RSS with 1,000 services and their summaries",
        "MB",
        vec![rss],
    ));

    let log = std::env::temp_dir().join(format!(
        "weft-bench-chromedriver-{}.log",
        std::process::id()
    ));
    let ui = format!(
        "https://127.0.0.1:{}/ui/",
        cluster.servers[0]
            .http_addr
            .rsplit(':')
            .next()
            .unwrap_or("")
    );
    let (topology, services) = rt.block_on(async {
        let browser = Browser::start(None, &log).await?;
        let measured = browse(&browser, &ui, &cluster.token, rounds).await;
        browser.close().await?;
        measured
    })?;
    figures.push(Figure::new(
        "UI: page load to the topology graph drawn (1,000 services, 1,500 edges)",
        "ms",
        topology,
    ));
    figures.push(Figure::new(
        "UI: page load to the services list drawn (1,000 services)",
        "ms",
        services,
    ));
    Ok(format!(
        "Setup (250 nodes, 1,000 services, 50 intentions, 250 reports) took {:.1} s; the topology answer is {} KB of JSON.",
        setup.as_secs_f64(),
        answer_bytes / 1000
    ))
}

/// Waits until `script` returns a number and returns it.
async fn number(browser: &Browser, what: &str, script: &str) -> anyhow::Result<f64> {
    let v = browser
        .wait_for(Duration::from_secs(30), what, script)
        .await?;
    v.as_f64().with_context(|| format!("{what}: {v}"))
}

async fn browse(
    browser: &Browser,
    ui: &str,
    token: &str,
    rounds: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let c = &browser.client;
    browser.goto(ui).await?;
    browser
        .wait_for(
            Duration::from_secs(20),
            "the login form",
            "return !!document.querySelector('#login-token');",
        )
        .await?;
    browser
        .eval(
            "document.querySelector('#login-token').value = arguments[0]; document.querySelector('#login-submit').click(); return true;",
            vec![Value::String(token.to_string())],
        )
        .await?;
    browser
        .wait_for(Duration::from_secs(20), "logged in", "const w = document.querySelector('#whoami'); return w && w.textContent.trim() ? true : null;")
        .await?;
    let drawn = |selector: &str, count: &str| {
        format!(
            "const g = document.querySelector('{selector}'); \
             if (!g || !g.hasAttribute('data-drawn-at')) return null; \
             return document.querySelectorAll('{count}').length >= 1000 ? Number(g.getAttribute('data-drawn-at')) : null;"
        )
    };
    let mut topology = Vec::new();
    let mut services = Vec::new();
    for _ in 0..rounds {
        for (route, selector, count, into) in [
            ("#/topology", "#topology-graph", "g.node", &mut topology),
            (
                "#/services",
                "#services-table",
                "tr[data-service]",
                &mut services,
            ),
        ] {
            // A new page load each time (the session keeps the token).
            c.goto(&format!("{ui}{route}")).await?;
            browser
                .eval("document.documentElement.setAttribute('data-old', ''); location.reload(); return true;", vec![])
                .await?;
            // The old page's DOM carries the mark until the new one loads.
            let script = format!(
                "if (document.documentElement.hasAttribute('data-old')) return null; {}",
                drawn(selector, count)
            );
            into.push(number(browser, route, &script).await?);
        }
    }
    Ok((topology, services))
}

pub fn run(quick: bool) -> anyhow::Result<Run> {
    let mut figures = Vec::new();
    let store = store_memory(&mut figures)?;
    let server = real_server(&mut figures, if quick { 2 } else { 5 })?;
    Ok(Run {
        figures,
        sections: vec![Section::new(
            "What was measured",
            format!(
                "Traffic store: {store}\n\nServer and UI: {server} The UI figures are from the page's own clock \
                 (`performance.now()` when the graph or list is in the DOM), in Debian's Chromium, headless, \
                 on the same 2-core machine as the server."
            ),
        )],
    })
}
