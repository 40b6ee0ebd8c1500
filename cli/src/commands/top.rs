//! `weft top`: live traffic between services, as `linkerd viz top`: per
//! pair, requests and connections per second, success rate, p50 and p99
//! latency, bytes and refusals, from the agents' reports the servers keep
//! (no Prometheus needed). Pairs whose two services the token may read.
use std::io::IsTerminal;
use std::time::Duration;

use serde_json::json;
use weft_api::proto::telemetry_client::TelemetryClient;
use weft_api::proto::{PairSummary, TopRequest};

use crate::client::{request, Ctx};
use crate::{output, Outcome};

#[derive(clap::Args)]
pub struct TopArgs {
    /// How far back each line sums: 10s, 1m, … at most 1h.
    #[arg(long, default_value = "10s", value_parser = parse_window)]
    window: u32,
    /// Print once and exit (otherwise refresh every 2 s until interrupted).
    #[arg(long)]
    once: bool,
}

fn parse_window(text: &str) -> Result<u32, String> {
    let d = weft_api::duration::parse_duration(text).map_err(|e| e.to_string())?;
    match d.as_secs() {
        s @ 1..=3600 => Ok(s as u32),
        _ => Err(format!("{text}: between 1s and 1h")),
    }
}

pub async fn run(ctx: &Ctx, args: TopArgs) -> anyhow::Result<Outcome> {
    let clear = !args.once && std::io::stdout().is_terminal();
    loop {
        let reply = ctx
            .call(|ch| async move {
                TelemetryClient::new(ch)
                    .top(request(
                        ctx,
                        TopRequest {
                            window_secs: args.window,
                        },
                    ))
                    .await
            })
            .await?
            .into_inner();
        if clear {
            print!("\x1b[2J\x1b[H");
        }
        show(ctx, reply.window_secs, reply.pairs);
        if args.once {
            return Ok(Outcome::Ok);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(Outcome::Ok),
        }
    }
}

fn show(ctx: &Ctx, window_secs: u32, mut pairs: Vec<PairSummary>) {
    pairs.sort_by(|a, b| {
        (b.requests_per_sec + b.connections_per_sec)
            .total_cmp(&(a.requests_per_sec + a.connections_per_sec))
            .then_with(|| (&a.source, &a.destination).cmp(&(&b.source, &b.destination)))
    });
    let rows = pairs
        .iter()
        .map(|p| {
            let answered = p.requests_per_sec > 0.0;
            vec![
                p.source.clone(),
                p.destination.clone(),
                format!("{:.1}", p.requests_per_sec),
                format!("{:.1}", p.connections_per_sec),
                if answered {
                    format!("{:.1}%", 100.0 * (1.0 - p.error_rate))
                } else {
                    "-".into()
                },
                if answered {
                    format!("≤{} ms", p.p50_ms)
                } else {
                    "-".into()
                },
                if answered {
                    format!("≤{} ms", p.p99_ms)
                } else {
                    "-".into()
                },
                p.bytes_sent.to_string(),
                p.bytes_received.to_string(),
                p.denied.to_string(),
            ]
        })
        .collect();
    let json = json!({
        "window_secs": window_secs,
        "pairs": pairs.iter().map(|p| json!({
            "source": p.source, "destination": p.destination,
            "requests_per_sec": p.requests_per_sec,
            "connections_per_sec": p.connections_per_sec,
            "error_rate": p.error_rate, "p50_ms": p.p50_ms, "p99_ms": p.p99_ms,
            "bytes_sent": p.bytes_sent, "bytes_received": p.bytes_received,
            "denied": p.denied,
        })).collect::<Vec<_>>(),
    });
    output::print(
        ctx,
        &[
            "SOURCE",
            "DESTINATION",
            "RPS",
            "CONN/S",
            "SUCCESS",
            "P50",
            "P99",
            "SENT",
            "RECEIVED",
            "DENIED",
        ],
        rows,
        json,
    );
}
