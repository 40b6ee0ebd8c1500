//! Tunnel latency: the two-node mesh of the tests (network namespaces joined
//! by a veth, release binaries), `web` on node A calling `api` on node B.
//! One HTTP/1.1 keep-alive connection, requests one after another, timed one
//! by one by a hyper client on a thread inside node A:
//!
//! - direct: straight to the api workload at `10.77.X.3:8080`;
//! - weft: through web's upstream port `127.0.0.1:9191` (explicit mode), the
//!   agent on A carrying it over HBONE (HTTP/2 CONNECT in mutual TLS) to the
//!   agent on B, which checks intentions and connects to the workload.
//!
//! Each round runs both, direct first; a round reports the median and the 99th
//! percentile of each and their differences (weft − direct).
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use weft_tests::mesh::{wait_until, Mesh, MeshSpec, NodeA, NodeB, Service};

use crate::report::Figure;

/// No measurement of one path may take longer than this.
const ROUND_LIMIT: Duration = Duration::from_secs(60);
const WARMUP: usize = 100;

/// `n` sequential `GET /` on one keep-alive connection to `addr`, from inside
/// node A: each request's latency in microseconds.
fn measure(mesh: &Mesh, addr: SocketAddr, n: usize) -> anyhow::Result<Vec<f64>> {
    mesh.netns(NodeA).run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let stream =
                tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
                    .await
                    .context("connect timed out")?
                    .with_context(|| format!("connecting to {addr}"))?;
            stream.set_nodelay(true)?;
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let start = Instant::now();
            let mut samples = Vec::with_capacity(n);
            for i in 0..WARMUP + n {
                if start.elapsed() > ROUND_LIMIT {
                    bail!("{addr}: {i} requests took more than {ROUND_LIMIT:?}");
                }
                let req = hyper::Request::get("/")
                    .header("host", "api")
                    .body(Empty::<Bytes>::new())?;
                let t = Instant::now();
                let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
                    .await
                    .context("request timed out")??;
                let status = resp.status();
                let body = resp.into_body().collect().await?.to_bytes();
                let took = t.elapsed();
                if !status.is_success() || !body.starts_with(b"instance ") {
                    bail!("{addr}: request {i}: {status} {body:?}");
                }
                if i >= WARMUP {
                    samples.push(took.as_secs_f64() * 1e6);
                }
            }
            Ok(samples)
        })
    })?
}

fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let idx = ((s.len() as f64 * p).ceil() as usize).clamp(1, s.len()) - 1;
    s[idx]
}

pub fn run(quick: bool) -> anyhow::Result<Vec<Figure>> {
    let (requests, rounds) = if quick { (500, 2) } else { (2000, 5) };
    let mut mesh = Mesh::start(
        MeshSpec::new("allow")
            .agent_log(crate::node::AGENT_LOG)
            .node_a(Service::new("web", 8000).upstream("api", 9191))
            .node_b(
                Service::new("api", 8080)
                    .address(MeshSpec::NODE_ADDR)
                    .healthz_check("1s"),
            ),
    )?;
    let direct_addr: SocketAddr = format!("{}:8080", mesh.ip(NodeB)).parse()?;
    mesh.workload(NodeB, "api-1", &direct_addr.to_string())?;
    wait_until(Duration::from_secs(30), "web -> api through 9191", || {
        Ok(mesh
            .curl_with(NodeA, "http://127.0.0.1:9191/", &["-m", "2"])
            .ok()
            .map(|_| ()))
    })?;
    let weft_addr: SocketAddr = "127.0.0.1:9191".parse()?;

    let fig = |name: &str| Figure::new(name, "µs", Vec::new());
    let mut direct_p50 = fig("direct p50");
    let mut direct_p99 = fig("direct p99");
    let mut weft_p50 = fig("weft p50");
    let mut weft_p99 = fig("weft p99");
    let mut added_p50 = fig("added p50 (weft − direct)");
    let mut added_p99 = fig("added p99 (weft − direct)");
    for round in 0..rounds {
        let direct = measure(&mesh, direct_addr, requests).context("direct")?;
        let weft = measure(&mesh, weft_addr, requests).context("through weft")?;
        let (d50, d99) = (percentile(&direct, 0.5), percentile(&direct, 0.99));
        let (w50, w99) = (percentile(&weft, 0.5), percentile(&weft, 0.99));
        eprintln!(
            "round {round}: {requests} requests each: direct p50 {d50:.0} µs p99 {d99:.0} µs; \
             weft p50 {w50:.0} µs p99 {w99:.0} µs"
        );
        direct_p50.samples.push(d50);
        direct_p99.samples.push(d99);
        weft_p50.samples.push(w50);
        weft_p99.samples.push(w99);
        added_p50.samples.push(w50 - d50);
        added_p99.samples.push(w99 - d99);
    }
    let opened = mesh.metric(NodeA, "weft_agent_connections_opened_total")?;
    eprintln!("node A's agent opened {opened} connections in all");
    Ok(vec![
        direct_p50, direct_p99, weft_p50, weft_p99, added_p50, added_p99,
    ])
}
