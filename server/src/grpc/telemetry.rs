//! `Telemetry`: agents' traffic reports in, `weft top`'s summaries out.
//!
//! - `Report` needs `node:write` on the reporting node, and every pair must
//!   have a service of that node at the end of its side (the source for
//!   `outbound`, the destination for `inbound`) and a registered service (or
//!   the permissive `unauthenticated` source) at the other, which may be
//!   another datacenter's (`web@dc1`, a service of its instances this
//!   datacenter holds a copy of): an agent reports
//!   what its own workloads sent or received, never other nodes' traffic or
//!   made-up pairs. Figures past [`MAX_COUNT`], more errors than requests or
//!   latency buckets that do not add up to the requests are refused: each
//!   such pair alone (the answer names them), the rest of the report is
//!   kept.
//! - `Top` merges this server's reports with every peer's and shows the
//!   pairs whose two services the caller may read.
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::{Request, Response, Status};
use weft_api::acl::{Access, Resource};
use weft_api::intention::split_source;
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
/// The largest figure one report may carry (a trillion; an agent reports
/// every 5 s).
pub const MAX_COUNT: u64 = 1 << 40;
/// The name agents give sources they cannot identify (permissive mode).
pub const UNAUTHENTICATED: &str = "unauthenticated";
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

/// Whether node `node` may report `p` (see the module's doc).
fn check_pair(
    p: &proto::PairTraffic,
    node: &str,
    on_node: impl Fn(&str) -> bool,
    registered: impl Fn(&str) -> bool,
) -> Result<(), Status> {
    let what = format!("{} -> {} ({})", p.source, p.destination, p.side);
    for name in [&p.source, &p.destination] {
        if name != UNAUTHENTICATED {
            let (service, datacenter) = split_source(name);
            validate_name(service).map_err(|e| invalid(format!("{what}: {name:?}: {e}")))?;
            if let Some(dc) = datacenter {
                validate_name(dc).map_err(|e| invalid(format!("{what}: {name:?}: {e}")))?;
            }
        }
    }
    let (local, other) = match p.side.as_str() {
        "outbound" => (&p.source, &p.destination),
        "inbound" => (&p.destination, &p.source),
        side => {
            return Err(invalid(format!(
                "{what}: side {side:?}, not outbound or inbound"
            )))
        }
    };
    if !on_node(local) {
        return Err(Status::permission_denied(format!(
            "{what}: {local} has no instance on node {node:?}"
        )));
    }
    let anonymous = other == UNAUTHENTICATED && p.side == "inbound";
    if !anonymous && !registered(other) {
        return Err(Status::permission_denied(format!(
            "{what}: {other} is not a registered service"
        )));
    }
    if p.latency_buckets.len() > MAX_BUCKETS {
        return Err(invalid(format!(
            "{what}: {} latency buckets, at most {MAX_BUCKETS}",
            p.latency_buckets.len()
        )));
    }
    let figures = [
        p.requests,
        p.errors,
        p.denied,
        p.connections,
        p.bytes_sent,
        p.bytes_received,
    ];
    if figures
        .iter()
        .chain(&p.latency_buckets)
        .any(|n| *n > MAX_COUNT)
    {
        return Err(invalid(format!("{what}: a figure over {MAX_COUNT}")));
    }
    let timed: u64 = p.latency_buckets.iter().sum();
    if p.errors > p.requests || timed != p.requests {
        return Err(invalid(format!(
            "{what}: {} requests, {} errors, {timed} timed: they do not add up",
            p.requests, p.errors
        )));
    }
    Ok(())
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
        let (kept, refused) = {
            let state = self.0.shared.state.read().expect("state lock");
            let on_node = |service: &str| {
                state
                    .instances
                    .get(&report.node)
                    .is_some_and(|on| on.values().any(|i| i.service == service))
            };
            let registered = |name: &str| match split_source(name) {
                (service, None) => state
                    .instances
                    .values()
                    .any(|on| on.values().any(|i| i.service == service)),
                (service, Some(dc)) => {
                    dc != self.0.datacenter
                        && state
                            .remote
                            .get(dc)
                            .is_some_and(|all| all.iter().any(|i| i.service == service))
                }
            };
            let mut kept = Vec::with_capacity(report.pairs.len());
            let mut refused: Option<(usize, Status)> = None;
            for p in report.pairs {
                match check_pair(&p, &report.node, on_node, registered) {
                    Ok(()) => kept.push(p),
                    Err(e) => {
                        let (n, _) = refused.get_or_insert((0, e));
                        *n += 1;
                    }
                }
            }
            (kept, refused)
        };
        // One bad pair (a service deregistered a moment ago, a forged one)
        // costs that pair, not the node's whole report.
        self.0.traffic.record(now_secs(), &report.node, &kept);
        match refused {
            None => Ok(Response::new(proto::Empty {})),
            Some((n, first)) => Err(Status::new(
                first.code(),
                format!(
                    "{n} pairs refused, {} kept; the first: {}",
                    kept.len(),
                    first.message()
                ),
            )),
        }
    }

    async fn top(
        &self,
        req: Request<proto::TopRequest>,
    ) -> Result<Response<proto::TopReply>, Status> {
        let caller = caller(&self.0, &req).await?;
        let window_secs = window(req.get_ref())?;
        let _turn = turn().await?;
        let (pairs, covered) = merged(&self.0, window_secs).await;
        let pairs = pairs
            .into_iter()
            .filter(|p| may_see(&caller, p))
            .map(|p| traffic::summarize(&p, covered))
            .collect();
        Ok(Response::new(proto::TopReply {
            window_secs: covered,
            pairs,
        }))
    }

    async fn series(
        &self,
        req: Request<proto::SeriesRequest>,
    ) -> Result<Response<proto::SeriesReply>, Status> {
        let caller = caller(&self.0, &req).await?;
        let r = req.into_inner();
        caller.require(Resource::Service(&r.service), Access::Read)?;
        validate_name(&r.service).map_err(|e| invalid(format!("service: {e}")))?;
        let (window_secs, step_secs) = series_shape(&r)?;
        let _turn = turn().await?;
        let now = now_secs();
        let mut slots = self
            .0
            .traffic
            .slots_into(now, u64::from(window_secs), &r.service);
        let peers = self.0.peers.keys().filter(|id| **id != self.0.id);
        let asked = peers.map(|id| self.0.peer_traffic_series(*id, r.clone(), PEER_LIMIT));
        for answer in futures::future::join_all(asked).await {
            slots.extend(answer.into_iter().flatten());
        }
        // Sources the caller may not read stay out, as in Top.
        for slot in &mut slots {
            slot.pairs.retain(|p| may_see(&caller, p));
        }
        // Points end with the step holding now.
        let step = u64::from(step_secs);
        let count = u64::from(window_secs).div_ceil(step);
        let from = (now / step + 1).saturating_sub(count) * step;
        Ok(Response::new(proto::SeriesReply {
            step_secs,
            points: crate::traffic::series(slots, from, step, count as usize),
        }))
    }
}

/// Reads of the traffic summaries at once, all callers together (`Top`,
/// `Series`, the UI's graph views): each merges every server's, so more
/// wait their turn, and are refused after [`TURN_WAIT`].
static AT_ONCE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);
const TURN_WAIT: Duration = Duration::from_secs(10);

/// A turn to read the traffic summaries (see [`AT_ONCE`]).
pub async fn turn() -> Result<tokio::sync::SemaphorePermit<'static>, Status> {
    match tokio::time::timeout(TURN_WAIT, AT_ONCE.acquire()).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => Err(Status::resource_exhausted(
            "the server is busy with other traffic reads: retry shortly",
        )),
    }
}

/// How long a peer has to answer for `Top` and `Series`.
const PEER_LIMIT: Duration = Duration::from_secs(2);

/// Whether `caller` may see pair `p`: read on both services (anonymous,
/// permissive sources are the destination's to see; another datacenter's
/// service, `web@dc1`, is read as `web`, as its intentions are).
pub fn may_see(caller: &super::auth::Caller, p: &proto::PairTraffic) -> bool {
    let may_read = |s: &str| {
        let service = split_source(s).0;
        caller
            .authz
            .allows(Resource::Service(service), Access::Read)
    };
    (p.source == UNAUTHENTICATED || may_read(&p.source)) && may_read(&p.destination)
}

/// Every pair's traffic over `window_secs`, this server's reports and every
/// peer's merged, both sides combined; and the seconds they cover.
pub async fn merged(node: &ServerNode, window_secs: u32) -> (Vec<proto::PairTraffic>, u32) {
    let (mut reports, covered) = node.traffic.window(now_secs(), u64::from(window_secs));
    let peers = node.peers.keys().filter(|id| **id != node.id);
    let asked = peers.map(|id| node.peer_traffic(*id, window_secs, PEER_LIMIT));
    for answer in futures::future::join_all(asked).await {
        reports.extend(answer.into_iter().flatten());
    }
    (traffic::combine_sides(reports), covered as u32)
}

/// The window and step a series request asks for (see `SeriesRequest`).
pub fn series_shape(r: &proto::SeriesRequest) -> Result<(u32, u32), Status> {
    let slot = crate::traffic::SLOT_SECS as u32;
    let window_secs = match r.window_secs {
        0 => MAX_WINDOW_SECS,
        w if (slot..=MAX_WINDOW_SECS).contains(&w) => w,
        w => {
            return Err(invalid(format!(
                "window_secs {w}: from {slot} to {MAX_WINDOW_SECS}"
            )))
        }
    };
    let step_secs = match r.step_secs {
        0 => 60,
        s if s % slot == 0 && s <= window_secs => s,
        s => {
            return Err(invalid(format!(
                "step_secs {s}: a multiple of {slot} s, at most the window ({window_secs} s)"
            )))
        }
    };
    if window_secs.div_ceil(step_secs) > MAX_POINTS {
        return Err(invalid(format!(
            "{window_secs} s in steps of {step_secs} s is more than {MAX_POINTS} points"
        )));
    }
    Ok((window_secs, step_secs))
}

/// Points one series may have.
const MAX_POINTS: u32 = 360;

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(source: &str, destination: &str, side: &str) -> proto::PairTraffic {
        let mut p = traffic::pair(source, destination);
        p.side = side.into();
        p.connections = 1;
        p
    }

    /// Node `n1` runs web; api is registered here; dc2 (a copy) has api.
    fn check(p: &proto::PairTraffic) -> Result<(), Status> {
        let on_node = |s: &str| s == "web";
        let registered = |name: &str| {
            matches!(
                split_source(name),
                ("api" | "web", None) | ("api", Some("dc2"))
            )
        };
        check_pair(p, "n1", on_node, registered)
    }

    #[test]
    fn another_datacenters_service_is_reported_at_the_far_end_only() {
        assert!(check(&pair("web", "api", "outbound")).is_ok());
        assert!(check(&pair("web", "api@dc2", "outbound")).is_ok());
        assert!(check(&pair("api@dc2", "web", "inbound")).is_ok());
        // Not a service that datacenter has, nor a name.
        let e = check(&pair("web", "db@dc2", "outbound")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let e = check(&pair("web", "api@DC2", "outbound")).unwrap_err();
        assert!(e.message().contains("bad character"), "{}", e.message());
        // The reporting node's own end is always a local service.
        let e = check(&pair("web@dc2", "api", "outbound")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let e = check(&pair("web", "web@dc2", "inbound")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }
}
