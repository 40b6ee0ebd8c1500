//! The web UI in a real headless Chromium (Debian's, through chromedriver)
//! against a running mesh with traffic: web on node A calls api on node B
//! through the agents, the browser runs in node A and loads the UI from
//! the server there. It logs in with a token, sees web → api on the live
//! topology with requests per second, creates a deny intention in the UI
//! and sees the edge turn refused within 5 s (and the refusals counted),
//! then sees api's instance critical on the service page once its check
//! fails. Screenshots go to `target/ui-screenshots/`.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use serde_json::Value;
use weft_tests::browser::Browser;
use weft_tests::mesh::{wait_until, Mesh, MeshSpec, NodeA, NodeB, Service};
use weft_tests::require_root;

const UPSTREAM: &str = "http://127.0.0.1:9191/";
/// How long the traffic loop may run at most.
const TRAFFIC_LIMIT: Duration = Duration::from_secs(240);

/// `weft check VERB service:api-1` in node B with `token` (in the CLI's
/// environment), against its agent.
fn api_check(mesh: &Mesh, token: &str, verb: &str, note: &str) -> anyhow::Result<()> {
    let args = ["check", verb, "service:api-1", "--note", note];
    let out = mesh.weft_as(NodeB, Some(token), &args)?;
    ensure!(out.success(), "weft check {verb}: {}", out.describe());
    Ok(())
}

/// Requests web → api every 100 ms until `stop` (bounded in count and
/// time); failures (refusals) are expected once the intention denies.
fn traffic(mesh: Arc<Mesh>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u32, u32)> {
    std::thread::spawn(move || {
        let (mut ok, mut failed) = (0, 0);
        let start = Instant::now();
        for _ in 0..2400 {
            if stop.load(Ordering::SeqCst) || start.elapsed() > TRAFFIC_LIMIT {
                break;
            }
            match mesh.curl_with(NodeA, UPSTREAM, &["-m", "2"]) {
                Ok(_) => ok += 1,
                Err(_) => failed += 1,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        (ok, failed)
    })
}

#[test]
fn an_operator_sees_traffic_denies_it_and_sees_health_in_the_ui() -> anyhow::Result<()> {
    require_root();
    weft_tests::browser::installed()?;
    let mut mesh = Mesh::start(
        MeshSpec::new("allow")
            .node_a(Service::new("web", 8000).upstream("api", 9191))
            .node_b(
                Service::new("api", 8080)
                    .id("api-1")
                    .address(MeshSpec::NODE_ADDR)
                    .ttl_check("10m", None),
            ),
    )?;
    // api speaks HTTP: the agents count its requests and their latency.
    let defaults = mesh.path("api-defaults.json");
    std::fs::write(
        &defaults,
        r#"{"Kind":"service-defaults","Name":"api","Protocol":"http"}"#,
    )?;
    mesh.weft(&["config", "write", &defaults.display().to_string()])?;
    // web may GET api: judged per request, so the agents see each one.
    let perms = mesh.path("web-api.json");
    std::fs::write(
        &perms,
        r#"{"Permissions":[{"Action":"allow","HTTP":{"PathPrefix":"/","Methods":["GET"]}}]}"#,
    )?;
    let perms = perms.display().to_string();
    mesh.weft(&["intention", "create", "web", "api", "--file", &perms])?;
    let b = mesh.ip(NodeB);
    mesh.workload(NodeB, "api-1", &format!("{b}:8080"))?;
    let api_token = mesh.service_token(&["api"])?;
    api_check(&mesh, &api_token, "pass", "serving")?;
    wait_until(Duration::from_secs(30), "web -> api answers", || {
        Ok(mesh
            .curl_with(NodeA, UPSTREAM, &["-m", "2"])
            .ok()
            .map(|_| ()))
    })?;
    let mesh = Arc::new(mesh);
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(mesh.clone(), stop.clone());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(drive(&mesh));
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = load.join().map_err(|_| anyhow::anyhow!("traffic thread"))?;
    eprintln!("traffic: {ok} requests answered, {failed} failed");
    result?;
    ensure!(ok > 0, "no request got through before the deny");
    ensure!(failed > 0, "no request was refused after the deny");
    Ok(())
}

async fn drive(mesh: &Mesh) -> anyhow::Result<()> {
    let browser = Browser::start(Some(mesh.netns(NodeA)), &mesh.path("chromedriver.log")).await?;
    let result = steps(mesh, &browser).await;
    if result.is_err() {
        let _ = browser.screenshot("failure").await;
    }
    browser.close().await?;
    result
}

async fn steps(mesh: &Mesh, browser: &Browser) -> anyhow::Result<()> {
    let ui = format!("https://{}:8500/ui/", mesh.ip(NodeA));
    let c = &browser.client;
    let started = Instant::now();
    browser.goto(&ui).await?;

    // Log in with a token; a wrong one is refused first.
    let token_input = c
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(fantoccini::Locator::Css("#login-token"))
        .await?;
    token_input
        .send_keys("00000000-0000-4000-8000-000000000000")
        .await?;
    c.find(fantoccini::Locator::Css("#login-submit"))
        .await?
        .click()
        .await?;
    let refused = browser
        .wait_for(
            Duration::from_secs(10),
            "the login refusing a made-up token",
            "const e = document.querySelector('#login-error'); return e && e.textContent.trim() ? e.textContent : null;",
        )
        .await?;
    eprintln!("bogus token: {refused}");
    browser.log_in(&mesh.token).await?;
    let token_in_url = browser.eval("return location.href;", vec![]).await?;
    ensure!(
        !token_in_url.to_string().contains(&mesh.token),
        "the token is in the URL: {token_in_url}"
    );

    // The live topology: web -> api with requests per second.
    c.goto(&format!("{ui}#/topology")).await?;
    let edge = browser
        .wait_for(
            Duration::from_secs(30),
            "web -> api with non-zero rps on the topology",
            &format!("{EDGE_FN} const s = edge(); return s && s[1] > 0 ? s : null;"),
        )
        .await?;
    eprintln!(
        "topology after {:.1} s: web -> api {edge}",
        started.elapsed().as_secs_f64()
    );
    ensure!(
        edge[0].as_str().is_some_and(|c| c.contains("edge-ok"))
            && edge[2].to_string().contains("rps"),
        "{edge}"
    );
    browser.screenshot("topology").await?;

    // Deny web -> api in the UI: the L7 intention becomes an L4 deny.
    c.goto(&format!("{ui}#/intentions")).await?;
    let form = |id: &'static str| {
        c.wait()
            .at_most(Duration::from_secs(10))
            .for_element(fantoccini::Locator::Id(id))
    };
    form("intention-source").await?.send_keys("web").await?;
    form("intention-destination")
        .await?
        .send_keys("api")
        .await?;
    form("intention-action")
        .await?
        .select_by_value("deny")
        .await?;
    form("intention-description")
        .await?
        .send_keys("stopped from the UI")
        .await?;
    form("intention-save").await?.click().await?;
    let saved = Instant::now();
    browser
        .wait_for(
            Duration::from_secs(10),
            "the new intention listed",
            r#"return document.querySelector('tr[data-intention="web => api"]') ? true : null;"#,
        )
        .await?;
    let check = mesh.weft_raw(&["intention", "check", "web", "api"])?;
    ensure!(
        check.stdout.contains("denied"),
        "weft intention check: {}",
        check.describe()
    );

    // The edge turns refused within 5 s.
    c.goto(&format!("{ui}#/topology")).await?;
    let refused = browser
        .wait_for(
            Duration::from_secs(5).saturating_sub(saved.elapsed()),
            "web -> api drawn refused within 5 s of the deny",
            &format!(
                "{EDGE_FN} const s = edge(); return s && s[0].includes('edge-refused') ? s : null;"
            ),
        )
        .await?;
    eprintln!(
        "refused {:.1} s after the deny: {refused}",
        saved.elapsed().as_secs_f64()
    );
    // And the agents' refusals reach the graph's label.
    let counted = browser
        .wait_for(
            Duration::from_secs(20),
            "denied attempts counted on the edge",
            &format!("{EDGE_FN} const s = edge(); return s && /[1-9][0-9]* denied/.test(s[2]) ? s : null;"),
        )
        .await?;
    eprintln!("counted: {counted}");
    browser.screenshot("topology-refused").await?;

    // The instance's check fails: critical on the service page.
    let api_token = mesh.service_token(&["api"])?;
    api_check(mesh, &api_token, "fail", "disk full")?;
    c.goto(&format!("{ui}#/services/api")).await?;
    let status = browser
        .wait_for(
            Duration::from_secs(20),
            "api-1 critical on the service page",
            r#"const s = document.querySelector('tr[data-instance="api-1"] td.status');
               return s && s.textContent.includes('critical') ? s.textContent : null;"#,
        )
        .await?;
    eprintln!("api-1: {status}");
    let page: Value = browser
        .eval("return document.body.innerText;", vec![])
        .await?;
    let text = page.as_str().context("page text")?;
    ensure!(
        text.contains("disk full"),
        "the check's output is not shown:\n{text}"
    );
    ensure!(
        !text.contains(&mesh.token),
        "the token is shown on the page"
    );
    browser.screenshot("service-api").await?;

    // The services list agrees.
    c.goto(&format!("{ui}#/services")).await?;
    browser
        .wait_for(
            Duration::from_secs(10),
            "api critical in the services list",
            r#"const s = document.querySelector('tr[data-service="api"] td.health');
               return s && s.textContent.includes('critical') ? true : null;"#,
        )
        .await?;
    Ok(())
}

/// The web -> api edge's state in the page, as a function the checks call:
/// [class, data-rps, label], or null.
const EDGE_FN: &str = concat!(
    "function edge() {",
    "\n",
    r#"
    const e = document.querySelector('g.edge[data-source="web"][data-destination="api"]');
    if (!e) return null;
    const label = e.querySelector('.edge-label');
    return [e.getAttribute('class'), Number(e.getAttribute('data-rps')), label ? label.textContent : ''];
"#,
    "}\n"
);
