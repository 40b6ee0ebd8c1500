//! `Telemetry`: agents' traffic reports in, `weft top`'s summaries out.
//!
//! - `Report` needs `node:write` on the reporting node, and every pair must
//!   have a service of that node at one end: an agent reports what its own
//!   workloads sent or received, never other nodes' traffic.
//! - `Top` merges this server's reports with every peer's and shows the
//!   pairs whose two services the caller may read.
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::{Request, Response, Status};
use weft_api::acl::{Access, Resource};
use weft_api::names::validate_name;
use weft_api::proto::{self, telemetry_server::Telemetry};
use weft_api::traffic;

use super::auth::caller;
use super::invalid;
use crate::node::ServerNode;

/// Pairs one report may carry.
const MAX_REPORT_PAIRS: usize = 1024;
/// Latency buckets one pair may carry (this version uses 13).
const MAX_BUCKETS: usize = 64;
/// The widest window `Top` sums.
const MAX_WINDOW_SECS: u32 = crate::traffic::KEEP_SECS as u32;

pub struct TelemetryApi(pub Arc<ServerNode>);

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The window a request asks for: 0 is 10 s; more than an hour is refused.
pub fn window(req: &proto::TopRequest) -> Result<u32, Status> {
    match req.window_secs {
        0 => Ok(10),
        w if w <= MAX_WINDOW_SECS => Ok(w),
        w => Err(invalid(format!(
            "window_secs {w}: at most {MAX_WINDOW_SECS} (reports are kept an hour)"
        ))),
    }
}

#[tonic::async_trait]
impl Telemetry for TelemetryApi {
    async fn report(
        &self,
        req: Request<proto::TrafficReport>,
    ) -> Result<Response<proto::Empty>, Status> {
        let caller = caller(&self.0, &req).await?;
        let report = req.into_inner();
        caller.require(Resource::Node(&report.node), Access::Write)?;
        if report.pairs.len() > MAX_REPORT_PAIRS {
            return Err(invalid(format!(
                "{} pairs in one report: at most {MAX_REPORT_PAIRS}",
                report.pairs.len()
            )));
        }
        {
            let state = self.0.shared.state.read().expect("state lock");
            let local = |service: &str| {
                state
                    .instances
                    .get(&report.node)
                    .is_some_and(|on| on.values().any(|i| i.service == service))
            };
            for p in &report.pairs {
                for name in [&p.source, &p.destination] {
                    // The agent names sources it cannot identify so.
                    if name != "unauthenticated" {
                        validate_name(name).map_err(|e| invalid(format!("pair {name:?}: {e}")))?;
                    }
                }
                if !matches!(p.side.as_str(), "outbound" | "inbound") {
                    return Err(invalid(format!(
                        "{} -> {}: side {:?}, not outbound or inbound",
                        p.source, p.destination, p.side
                    )));
                }
                if p.latency_buckets.len() > MAX_BUCKETS {
                    return Err(invalid(format!(
                        "{} -> {}: {} latency buckets, at most {MAX_BUCKETS}",
                        p.source,
                        p.destination,
                        p.latency_buckets.len()
                    )));
                }
                if !local(&p.source) && !local(&p.destination) {
                    return Err(Status::permission_denied(format!(
                        "{} -> {}: neither service has an instance on node {:?}",
                        p.source, p.destination, report.node
                    )));
                }
            }
        }
        self.0.traffic.record(now_secs(), &report.pairs);
        Ok(Response::new(proto::Empty {}))
    }

    async fn top(
        &self,
        req: Request<proto::TopRequest>,
    ) -> Result<Response<proto::TopReply>, Status> {
        let caller = caller(&self.0, &req).await?;
        let window_secs = window(req.get_ref())?;
        let mut reports = self.0.traffic.window(now_secs(), u64::from(window_secs));
        let peers = self.0.peers.keys().filter(|id| **id != self.0.id);
        let asked = peers.map(|id| {
            self.0
                .peer_traffic(*id, window_secs, Duration::from_secs(2))
        });
        for answer in futures::future::join_all(asked).await {
            reports.extend(answer.into_iter().flatten());
        }
        let pairs = traffic::combine_sides(reports)
            .into_iter()
            .filter(|p| {
                caller
                    .authz
                    .allows(Resource::Service(&p.source), Access::Read)
                    && caller
                        .authz
                        .allows(Resource::Service(&p.destination), Access::Read)
            })
            .map(|p| traffic::summarize(&p, window_secs))
            .collect();
        Ok(Response::new(proto::TopReply { window_secs, pairs }))
    }
}
