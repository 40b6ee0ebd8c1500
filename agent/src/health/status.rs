//! Pure health decisions: what a probe's outcome means, when a TTL check expires,
//! how several checks combine, and whether a combined status is a change worth
//! reporting. No I/O and no clocks: callers pass `Instant`s in.

use std::time::{Duration, Instant};

use http::StatusCode;
use weft_api::catalog::HealthStatus;

/// Check output longer than this is cut (at a character boundary) and marked.
pub const MAX_OUTPUT_BYTES: usize = 4096;

/// One check's (or an instance's combined) status and the text explaining it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub status: HealthStatus,
    pub output: String,
}

impl CheckResult {
    /// A result with its output truncated to [`MAX_OUTPUT_BYTES`].
    pub fn new(status: HealthStatus, output: impl Into<String>) -> CheckResult {
        CheckResult {
            status,
            output: truncate_output(output.into()),
        }
    }
}

/// Cuts `output` to at most [`MAX_OUTPUT_BYTES`] bytes, ending with `…` when cut.
pub fn truncate_output(mut output: String) -> String {
    if output.len() <= MAX_OUTPUT_BYTES {
        return output;
    }
    const MARK: &str = "…";
    let mut cut = MAX_OUTPUT_BYTES - MARK.len();
    while !output.is_char_boundary(cut) {
        cut -= 1;
    }
    output.truncate(cut);
    output.push_str(MARK);
    output
}

/// An HTTP response code as a status: 2xx passing, 429 warning, else critical.
pub fn http_status(code: StatusCode) -> HealthStatus {
    if code.is_success() {
        HealthStatus::Passing
    } else if code == StatusCode::TOO_MANY_REQUESTS {
        HealthStatus::Warning
    } else {
        HealthStatus::Critical
    }
}

/// The result of `GET url`: a response code, or why there was none.
pub fn http_result(url: &str, outcome: Result<StatusCode, String>) -> CheckResult {
    match outcome {
        Ok(code) => CheckResult::new(
            http_status(code),
            format!(
                "HTTP GET {url}: {} {}",
                code.as_u16(),
                code.canonical_reason().unwrap_or("")
            )
            .trim_end()
            .to_string(),
        ),
        Err(e) => CheckResult::new(HealthStatus::Critical, format!("HTTP GET {url}: {e}")),
    }
}

/// The result of a TCP connect to `addr`.
pub fn tcp_result(addr: &str, outcome: Result<(), String>) -> CheckResult {
    match outcome {
        Ok(()) => CheckResult::new(
            HealthStatus::Passing,
            format!("TCP connect {addr}: success"),
        ),
        Err(e) => CheckResult::new(HealthStatus::Critical, format!("TCP connect {addr}: {e}")),
    }
}

/// The result of a gRPC `grpc.health.v1.Health/Check` on `target`: the serving
/// status name (`SERVING`, `NOT_SERVING`, `UNKNOWN`, …) or why there was none.
/// Only `SERVING` passes.
pub fn grpc_result(target: &str, outcome: Result<&str, String>) -> CheckResult {
    match outcome {
        Ok("SERVING") => CheckResult::new(
            HealthStatus::Passing,
            format!("gRPC health {target}: SERVING"),
        ),
        Ok(other) => CheckResult::new(
            HealthStatus::Critical,
            format!("gRPC health {target}: {other}"),
        ),
        Err(e) => CheckResult::new(HealthStatus::Critical, format!("gRPC health {target}: {e}")),
    }
}

/// A probe that did not finish in time.
pub fn timeout_result(what: &str, timeout: Duration) -> CheckResult {
    CheckResult::new(
        HealthStatus::Critical,
        format!("{what}: timed out after {timeout:?}"),
    )
}

/// A TTL check: passing (or whatever the last refresh said) until `ttl` after the
/// last refresh, critical before the first refresh and after expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TtlState {
    ttl: Duration,
    last: Option<(Instant, CheckResult)>,
}

impl TtlState {
    /// A TTL check that has not been refreshed yet.
    pub fn new(ttl: Duration) -> TtlState {
        TtlState { ttl, last: None }
    }

    /// Records a refresh at `now`.
    pub fn refresh(&mut self, now: Instant, status: HealthStatus, output: impl Into<String>) {
        self.last = Some((now, CheckResult::new(status, output)));
    }

    /// When the last refresh stops counting; `None` before the first refresh.
    pub fn expires_at(&self) -> Option<Instant> {
        self.last.as_ref().map(|(at, _)| *at + self.ttl)
    }

    /// The check's result at `now`.
    pub fn result_at(&self, now: Instant) -> CheckResult {
        match &self.last {
            None => CheckResult::new(
                HealthStatus::Critical,
                format!("TTL check ({:?}): no refresh received yet", self.ttl),
            ),
            Some((at, result)) if now < *at + self.ttl => result.clone(),
            Some((at, _)) => CheckResult::new(
                HealthStatus::Critical,
                format!(
                    "TTL expired: no update for {:.1?} (ttl {:?})",
                    now.duration_since(*at),
                    self.ttl
                ),
            ),
        }
    }
}

/// Combines check results: the worst status wins (critical > warning > passing), and
/// the output lists the outputs of the checks at that status, one a line. No checks
/// at all is passing.
pub fn combine(results: &[CheckResult]) -> CheckResult {
    let worst = results
        .iter()
        .map(|r| r.status)
        .fold(HealthStatus::Passing, HealthStatus::worst);
    if results.is_empty() {
        return CheckResult::new(worst, "no health checks defined");
    }
    let output = results
        .iter()
        .filter(|r| r.status == worst)
        .map(|r| r.output.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    CheckResult::new(worst, output)
}

/// The latest result of each check of one instance, and the status last reported.
/// [`Aggregate::set`] says when the combined status changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    results: Vec<Option<CheckResult>>,
    reported: Option<HealthStatus>,
}

impl Aggregate {
    /// An instance with `checks` checks, none run yet.
    pub fn new(checks: usize) -> Aggregate {
        Aggregate {
            results: vec![None; checks],
            reported: None,
        }
    }

    /// Each check's latest result, by index (`None`: not run yet).
    pub fn results(&self) -> &[Option<CheckResult>] {
        &self.results
    }

    /// The combined result once every check has a result.
    pub fn combined(&self) -> Option<CheckResult> {
        let all: Option<Vec<CheckResult>> = self.results.iter().cloned().collect();
        all.map(|r| combine(&r))
    }

    /// Records check `index`'s result. Returns the combined result when it should be
    /// reported: the first time every check has a result, and then whenever the
    /// combined status differs from the last one reported.
    pub fn set(&mut self, index: usize, result: CheckResult) -> Option<CheckResult> {
        if let Some(slot) = self.results.get_mut(index) {
            *slot = Some(result);
        }
        self.changed()
    }

    /// For an instance without checks (or to re-evaluate): the combined result when
    /// it is a change.
    pub fn changed(&mut self) -> Option<CheckResult> {
        let combined = self.combined()?;
        if self.reported == Some(combined.status) {
            return None;
        }
        self.reported = Some(combined.status);
        Some(combined)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use HealthStatus::*;

    #[test]
    fn http_codes() {
        for code in [200, 201, 204, 299] {
            assert_eq!(http_status(StatusCode::from_u16(code).unwrap()), Passing);
        }
        assert_eq!(http_status(StatusCode::TOO_MANY_REQUESTS), Warning);
        for code in [100, 301, 304, 400, 404, 428, 430, 500, 503] {
            assert_eq!(
                http_status(StatusCode::from_u16(code).unwrap()),
                Critical,
                "{code}"
            );
        }
    }

    #[test]
    fn http_outputs() {
        let url = "http://127.0.0.1:8080/healthz";
        assert_eq!(
            http_result(url, Ok(StatusCode::OK)),
            CheckResult::new(Passing, "HTTP GET http://127.0.0.1:8080/healthz: 200 OK")
        );
        let r = http_result(url, Ok(StatusCode::TOO_MANY_REQUESTS));
        assert_eq!(r.status, Warning);
        assert!(r.output.ends_with(": 429 Too Many Requests"));
        let r = http_result(url, Ok(StatusCode::from_u16(599).unwrap()));
        assert_eq!(
            (r.status, r.output.as_str()),
            (Critical, "HTTP GET http://127.0.0.1:8080/healthz: 599")
        );
        let r = http_result(url, Err("connection refused".into()));
        assert_eq!(r.status, Critical);
        assert!(r.output.ends_with(": connection refused"));
    }

    #[test]
    fn tcp_and_grpc() {
        assert_eq!(tcp_result("h:1", Ok(())).status, Passing);
        assert_eq!(tcp_result("h:1", Err("refused".into())).status, Critical);
        assert_eq!(
            grpc_result("h:1/svc", Ok("SERVING")),
            CheckResult::new(Passing, "gRPC health h:1/svc: SERVING")
        );
        for s in ["NOT_SERVING", "UNKNOWN", "SERVICE_UNKNOWN"] {
            assert_eq!(grpc_result("h:1", Ok(s)).status, Critical);
        }
        assert_eq!(grpc_result("h:1", Err("x".into())).status, Critical);
        let r = timeout_result("TCP connect h:1", Duration::from_secs(2));
        assert_eq!(
            (r.status, r.output.as_str()),
            (Critical, "TCP connect h:1: timed out after 2s")
        );
    }

    #[test]
    fn output_truncated_at_char_boundary() {
        let short = "a".repeat(MAX_OUTPUT_BYTES);
        assert_eq!(truncate_output(short.clone()), short);
        let long = "é".repeat(MAX_OUTPUT_BYTES);
        let cut = truncate_output(long);
        assert!(cut.len() <= MAX_OUTPUT_BYTES);
        assert!(cut.ends_with('…'));
        assert_eq!(
            CheckResult::new(Passing, "x".repeat(10_000)).output.len(),
            MAX_OUTPUT_BYTES
        );
    }

    #[test]
    fn ttl_lifecycle() {
        let t0 = Instant::now();
        let mut ttl = TtlState::new(Duration::from_secs(30));
        assert_eq!(ttl.result_at(t0).status, Critical);
        assert!(ttl.result_at(t0).output.contains("no refresh"));
        assert_eq!(ttl.expires_at(), None);
        ttl.refresh(t0, Passing, "all good");
        assert_eq!(ttl.result_at(t0), CheckResult::new(Passing, "all good"));
        assert_eq!(ttl.result_at(t0 + Duration::from_secs(29)).status, Passing);
        assert_eq!(ttl.expires_at(), Some(t0 + Duration::from_secs(30)));
        let expired = ttl.result_at(t0 + Duration::from_secs(30));
        assert_eq!(expired.status, Critical);
        assert_eq!(expired.output, "TTL expired: no update for 30.0s (ttl 30s)");
        // An update restarts the TTL, whatever its status.
        let t1 = t0 + Duration::from_secs(31);
        ttl.refresh(t1, Warning, "slow");
        assert_eq!(ttl.result_at(t1 + Duration::from_secs(29)).status, Warning);
        assert_eq!(ttl.expires_at(), Some(t1 + Duration::from_secs(30)));
        ttl.refresh(t1 + Duration::from_secs(29), Critical, "broken");
        let r = ttl.result_at(t1 + Duration::from_secs(40));
        assert_eq!((r.status, r.output.as_str()), (Critical, "broken"));
        assert!(ttl
            .result_at(t1 + Duration::from_secs(59))
            .output
            .starts_with("TTL expired"));
        // Long notes are cut like any output.
        ttl.refresh(t1, Passing, "n".repeat(10_000));
        assert_eq!(ttl.result_at(t1).output.len(), MAX_OUTPUT_BYTES);
    }

    #[test]
    fn worst_wins() {
        let p = CheckResult::new(Passing, "p");
        let w = CheckResult::new(Warning, "w");
        let c = CheckResult::new(Critical, "c");
        let c2 = CheckResult::new(Critical, "c2");
        assert_eq!(combine(&[]).status, Passing);
        assert_eq!(combine(std::slice::from_ref(&p)), p);
        assert_eq!(combine(&[p.clone(), w.clone()]), w);
        assert_eq!(combine(&[w.clone(), c.clone(), p.clone()]), c);
        assert_eq!(combine(&[c, p, c2]).output, "c\nc2");
    }

    #[test]
    fn aggregate_reports_changes_only() {
        let mut a = Aggregate::new(2);
        assert_eq!(a.set(0, CheckResult::new(Passing, "a ok")), None);
        assert_eq!(a.combined(), None);
        let first = a.set(1, CheckResult::new(Passing, "b ok")).unwrap();
        assert_eq!(first.status, Passing);
        assert_eq!(first.output, "a ok\nb ok");
        // Same status with new output: not a change.
        assert_eq!(a.set(0, CheckResult::new(Passing, "a ok again")), None);
        let w = a.set(1, CheckResult::new(Warning, "b slow")).unwrap();
        assert_eq!((w.status, w.output.as_str()), (Warning, "b slow"));
        assert_eq!(a.set(1, CheckResult::new(Warning, "b slow")), None);
        assert_eq!(
            a.set(0, CheckResult::new(Critical, "a down"))
                .unwrap()
                .status,
            Critical
        );
        assert_eq!(a.set(1, CheckResult::new(Passing, "b ok")), None);
        assert_eq!(
            a.set(0, CheckResult::new(Passing, "a ok")).unwrap().status,
            Passing
        );
        // Out-of-range index is ignored.
        assert_eq!(a.set(7, CheckResult::new(Critical, "?")), None);
    }

    #[test]
    fn aggregate_without_checks_is_passing_once() {
        let mut a = Aggregate::new(0);
        assert_eq!(a.changed().unwrap().status, Passing);
        assert_eq!(a.changed(), None);
    }
}
