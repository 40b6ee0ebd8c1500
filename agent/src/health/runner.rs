//! Running checks: [`CheckRunner`] runs the checks of one service instance on their
//! intervals and sends a [`HealthUpdate`] when the instance's combined status changes;
//! [`HealthChecks`] holds the runners of all local instances by service id.
//!
//! Each HTTP/TCP/gRPC check has its own task probing on its interval (the first probe
//! at once). One aggregating task per instance collects their results and TTL
//! refreshes, expires TTLs, and decides with [`Aggregate`] whether to report.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use weft_api::catalog::HealthStatus;

use super::probe::probe;
use super::status::{Aggregate, CheckResult, TtlState};
use super::HealthError;
use crate::config::{CheckConfig, CheckKind};

/// A change of a service instance's combined health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthUpdate {
    pub service_id: String,
    pub status: HealthStatus,
    /// Why: the outputs of the checks at this status, at most 4 KiB.
    pub output: String,
}

enum Event {
    Result(usize, CheckResult),
    Ttl(HealthStatus, String),
}

/// Runs the checks of one service instance until stopped or dropped.
#[derive(Debug)]
pub struct CheckRunner {
    service_id: String,
    has_ttl: bool,
    events: mpsc::UnboundedSender<Event>,
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Result(i, r) => write!(f, "Result({i}, {r:?})"),
            Event::Ttl(s, o) => write!(f, "Ttl({s}, {o:?})"),
        }
    }
}

impl CheckRunner {
    /// Starts the checks of `service_id` (must be called inside a tokio runtime).
    /// The first update comes once every check has a result (TTL checks start
    /// critical); after that, one update per change of the combined status.
    pub fn start(
        service_id: impl Into<String>,
        checks: Vec<CheckConfig>,
        updates: mpsc::UnboundedSender<HealthUpdate>,
    ) -> CheckRunner {
        let service_id = service_id.into();
        let (events, rx) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        let mut ttls = HashMap::new();
        for (i, check) in checks.iter().enumerate() {
            match &check.kind {
                CheckKind::Ttl { ttl } => {
                    ttls.insert(i, TtlState::new(*ttl));
                }
                kind => {
                    tasks.spawn(probe_loop(
                        i,
                        kind.clone(),
                        check.interval,
                        check.timeout,
                        events.clone(),
                    ));
                }
            }
        }
        let has_ttl = !ttls.is_empty();
        tasks.spawn(aggregate_loop(
            service_id.clone(),
            Aggregate::new(checks.len()),
            ttls,
            rx,
            updates,
        ));
        CheckRunner {
            service_id,
            has_ttl,
            events,
            tasks,
        }
    }

    /// The instance's service id.
    pub fn service_id(&self) -> &str {
        &self.service_id
    }

    /// Refreshes the instance's TTL check(s) with `status` and `output`.
    pub fn refresh_ttl(
        &self,
        status: HealthStatus,
        output: impl Into<String>,
    ) -> Result<(), HealthError> {
        if !self.has_ttl {
            return Err(HealthError::NoTtlCheck(self.service_id.clone()));
        }
        self.events
            .send(Event::Ttl(status, output.into()))
            .map_err(|_| HealthError::Stopped(self.service_id.clone()))
    }

    /// Stops all checks (also done on drop).
    pub fn stop(mut self) {
        self.tasks.abort_all();
    }
}

async fn probe_loop(
    index: usize,
    kind: CheckKind,
    interval: Duration,
    timeout: Duration,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(result) = probe(&kind, timeout).await else {
            return;
        };
        if events.send(Event::Result(index, result)).is_err() {
            return;
        }
    }
}

async fn aggregate_loop(
    service_id: String,
    mut aggregate: Aggregate,
    mut ttls: HashMap<usize, TtlState>,
    mut events: mpsc::UnboundedReceiver<Event>,
    updates: mpsc::UnboundedSender<HealthUpdate>,
) {
    let report = |change: Option<CheckResult>| -> bool {
        match change {
            Some(r) => updates
                .send(HealthUpdate {
                    service_id: service_id.clone(),
                    status: r.status,
                    output: r.output,
                })
                .is_ok(),
            None => true,
        }
    };
    let now = Instant::now().into_std();
    let mut change = aggregate.changed();
    for (i, ttl) in &ttls {
        change = aggregate.set(*i, ttl.result_at(now)).or(change);
    }
    if !report(change) {
        return;
    }
    loop {
        // The earliest TTL that is passing or warning now and will expire.
        let next_expiry = ttls
            .values()
            .filter_map(TtlState::expires_at)
            .filter(|at| *at > Instant::now().into_std())
            .min();
        let expiry = async {
            match next_expiry {
                Some(at) => tokio::time::sleep_until(Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        let change = tokio::select! {
            event = events.recv() => match event {
                None => return,
                Some(Event::Result(i, r)) => aggregate.set(i, r),
                Some(Event::Ttl(status, output)) => {
                    let now = Instant::now().into_std();
                    let mut change = None;
                    for (i, ttl) in ttls.iter_mut() {
                        ttl.refresh(now, status, output.clone());
                        change = aggregate.set(*i, ttl.result_at(now)).or(change);
                    }
                    change
                }
            },
            () = expiry => {
                let now = Instant::now().into_std();
                let mut change = None;
                for (i, ttl) in &ttls {
                    change = aggregate.set(*i, ttl.result_at(now)).or(change);
                }
                change
            }
        };
        if !report(change) {
            return;
        }
    }
}

/// The check runners of all local instances, by service id. Cheap to clone.
#[derive(Debug, Clone)]
pub struct HealthChecks {
    runners: Arc<Mutex<HashMap<String, CheckRunner>>>,
    updates: mpsc::UnboundedSender<HealthUpdate>,
}

impl HealthChecks {
    /// A set of runners that all report to `updates`.
    pub fn new(updates: mpsc::UnboundedSender<HealthUpdate>) -> HealthChecks {
        HealthChecks {
            runners: Arc::default(),
            updates,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CheckRunner>> {
        // A panic while holding the lock cannot leave the map half-updated.
        self.runners.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the checks of `service_id`, replacing (and stopping) any it had.
    pub fn add(&self, service_id: &str, checks: Vec<CheckConfig>) {
        let runner = CheckRunner::start(service_id, checks, self.updates.clone());
        if let Some(old) = self.lock().insert(service_id.to_string(), runner) {
            old.stop();
        }
    }

    /// Stops the checks of `service_id`; `false` when it had none.
    pub fn remove(&self, service_id: &str) -> bool {
        self.lock()
            .remove(service_id)
            .map(CheckRunner::stop)
            .is_some()
    }

    /// Service ids with running checks, sorted.
    pub fn service_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Refreshes the TTL check of `service_id`.
    pub fn refresh_ttl(
        &self,
        service_id: &str,
        status: HealthStatus,
        output: impl Into<String>,
    ) -> Result<(), HealthError> {
        match self.lock().get(service_id) {
            Some(runner) => runner.refresh_ttl(status, output),
            None => Err(HealthError::UnknownService(service_id.to_string())),
        }
    }

    /// Stops every runner.
    pub fn stop_all(&self) {
        for (_, runner) in self.lock().drain() {
            runner.stop();
        }
    }
}

#[cfg(test)]
mod tests;
