//! Client load for lifecycle tests, against an echo server (`weft-holder`).
//! Bounded in count and time; prints one JSON summary line and exits 0 once
//! the run is over, whatever happened (the test judges the figures).
//!
//! * `weft-load churn ADDR RATE SECONDS`: opens RATE new connections a
//!   second for SECONDS; each sends one byte, waits for it back and closes.
//!   Summary: `{"sent", "ok", "failed", "errors"}` (the first few errors).
//! * `weft-load hold ADDR SECONDS`: one connection for SECONDS, a byte there
//!   and back every 100 ms. Summary: `{"exchanges", "held_ms", "error"}`,
//!   `error` null when the connection lasted the whole time.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// No single connect or exchange takes longer.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(5);
/// Errors kept for the summary.
const KEPT_ERRORS: usize = 10;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [kind, addr, rest @ ..] => addr
            .parse::<SocketAddr>()
            .ok()
            .map(|a| (kind.as_str(), a, rest)),
        _ => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let summary = match parsed {
        Some(("churn", addr, [rate, secs])) => match (rate.parse(), secs.parse()) {
            (Ok(rate), Ok(secs)) if rate > 0 && rate <= 2000 && secs <= 600 => {
                rt.block_on(churn(addr, rate, secs))
            }
            _ => usage(),
        },
        Some(("hold", addr, [secs])) => match secs.parse() {
            Ok(secs) if secs <= 600 => rt.block_on(hold(addr, secs)),
            _ => usage(),
        },
        _ => usage(),
    };
    println!("{summary}");
}

fn usage() -> ! {
    eprintln!("usage: weft-load churn ADDR RATE SECONDS | hold ADDR SECONDS");
    std::process::exit(2);
}

/// One short connection: connect, one byte there and back, close.
async fn one(addr: SocketAddr, byte: u8) -> Result<(), String> {
    tokio::time::timeout(EXCHANGE_LIMIT, async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        exchange(&mut stream, byte).await
    })
    .await
    .map_err(|_| format!("no echo within {EXCHANGE_LIMIT:?}"))?
}

async fn exchange(stream: &mut TcpStream, byte: u8) -> Result<(), String> {
    stream
        .write_all(&[byte])
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut back = [0u8; 1];
    match stream.read(&mut back).await {
        Ok(1) if back[0] == byte => Ok(()),
        Ok(0) => Err("closed by the peer".into()),
        Ok(_) => Err(format!("sent {byte}, got {} back", back[0])),
        Err(e) => Err(format!("read: {e}")),
    }
}

async fn churn(addr: SocketAddr, rate: u64, secs: u64) -> serde_json::Value {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let total = rate * secs;
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        tokio::time::sleep_until(start + Duration::from_micros(i * 1_000_000 / rate)).await;
        let (ok, failed, errors) = (ok.clone(), failed.clone(), errors.clone());
        let started = start.elapsed();
        tasks.spawn(async move {
            match one(addr, (i % 251) as u8).await {
                Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    let mut kept = errors.lock().expect("errors lock");
                    if kept.len() < KEPT_ERRORS {
                        kept.push(format!("at {:.2}s: {e}", started.as_secs_f64()));
                    }
                    failed.fetch_add(1, Ordering::Relaxed)
                }
            }
        });
        // Reap finished ones so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let errors = errors.lock().expect("errors lock").clone();
    serde_json::json!({
        "sent": total,
        "ok": ok.load(Ordering::Relaxed),
        "failed": failed.load(Ordering::Relaxed),
        "errors": errors,
    })
}

async fn hold(addr: SocketAddr, secs: u64) -> serde_json::Value {
    let start = Instant::now();
    let mut exchanges = 0u64;
    let result: Result<(), String> = async {
        let mut stream = tokio::time::timeout(EXCHANGE_LIMIT, TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let end = start + Duration::from_secs(secs);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while Instant::now() < end {
            tick.tick().await;
            tokio::time::timeout(
                EXCHANGE_LIMIT,
                exchange(&mut stream, (exchanges % 251) as u8),
            )
            .await
            .map_err(|_| format!("no echo within {EXCHANGE_LIMIT:?}"))??;
            exchanges += 1;
        }
        Ok(())
    }
    .await;
    serde_json::json!({
        "exchanges": exchanges,
        "held_ms": start.elapsed().as_millis() as u64,
        "error": result.err(),
    })
}
