//! Running checks: [`CheckRunner`] runs the checks of one service instance on their
//! intervals and sends a [`HealthUpdate`] when the instance's combined status changes;
//! [`HealthChecks`] holds the runners of all local instances by service id.
//!
//! Each HTTP/TCP/gRPC check has its own task probing on its interval (the first probe
//! at once). One aggregating task per instance collects their results and TTL
//! updates, expires TTLs, and decides with [`Aggregate`] whether to report.
//!
//! TTL checks are updated one at a time, by check id ([`HealthChecks::update_ttl`]):
//! each update sets the check's status and output and restarts its TTL.

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
    /// An update of the TTL check at this index.
    Ttl(usize, HealthStatus, String),
}

/// What callers may know about one check of a local instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckInfo {
    pub check_id: String,
    pub service_id: String,
    /// The service's name: ACL rules (`service:write`) name it.
    pub service_name: String,
    /// `http`, `tcp`, `grpc` or `ttl`.
    pub kind: &'static str,
}

impl CheckInfo {
    pub fn is_ttl(&self) -> bool {
        self.kind == "ttl"
    }
}

/// One check of a local instance with its latest result (Consul's
/// `/v1/agent/checks`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckState {
    pub info: CheckInfo,
    /// `None`: not run yet (a TTL check without update reads critical).
    pub result: Option<CheckResult>,
}

/// Each check's latest result, by index, as the aggregating task last saw.
type Latest = Arc<Mutex<Vec<Option<CheckResult>>>>;

/// The last update of each TTL check, by index: when, and what it said.
type Refreshed = Arc<Mutex<HashMap<usize, (std::time::Instant, CheckResult)>>>;

/// TTL updates a new runner takes over from the one it replaces, by check
/// id: the TTL, when the last update came, and what it said.
pub type CarriedTtls = HashMap<String, (Duration, std::time::Instant, CheckResult)>;

/// Runs the checks of one service instance until stopped or dropped.
#[derive(Debug)]
pub struct CheckRunner {
    service_id: String,
    service_name: String,
    /// Id and kind of each check, by index.
    checks: Vec<(String, &'static str)>,
    /// The TTL of each TTL check, by index.
    ttl_of: Vec<Option<Duration>>,
    latest: Latest,
    refreshed: Refreshed,
    events: mpsc::UnboundedSender<Event>,
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Result(i, r) => write!(f, "Result({i}, {r:?})"),
            Event::Ttl(i, s, o) => write!(f, "Ttl({i}, {s}, {o:?})"),
        }
    }
}

impl CheckRunner {
    /// Starts the checks of `service_id` (must be called inside a tokio runtime).
    /// The first update comes once every check has a result (TTL checks start
    /// critical); after that, one update per change of the combined status.
    pub fn start(
        service_id: impl Into<String>,
        service_name: impl Into<String>,
        checks: Vec<CheckConfig>,
        updates: mpsc::UnboundedSender<HealthUpdate>,
    ) -> CheckRunner {
        Self::start_carrying(
            service_id,
            service_name,
            checks,
            updates,
            &CarriedTtls::new(),
        )
    }

    /// [`Self::start`], with the last updates of TTL checks that a
    /// replaced runner had under the same id and TTL: they go on from
    /// there (and expire when they would have) rather than start critical.
    pub fn start_carrying(
        service_id: impl Into<String>,
        service_name: impl Into<String>,
        checks: Vec<CheckConfig>,
        updates: mpsc::UnboundedSender<HealthUpdate>,
        carried: &CarriedTtls,
    ) -> CheckRunner {
        let service_id = service_id.into();
        let ids = checks
            .iter()
            .map(|c| (c.id.clone(), c.kind.name()))
            .collect();
        let (events, rx) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        let mut ttls = HashMap::new();
        let mut refreshed = HashMap::new();
        let mut ttl_of = vec![None; checks.len()];
        for (i, check) in checks.iter().enumerate() {
            match &check.kind {
                CheckKind::Ttl { ttl } => {
                    ttl_of[i] = Some(*ttl);
                    let mut state = TtlState::new(*ttl);
                    let last = match carried.get(&check.id) {
                        Some((was, at, result)) if was == ttl => Some((*at, result.clone())),
                        // Consul's initial status: the TTL runs from now.
                        _ => check.status.map(|status| {
                            (
                                Instant::now().into_std(),
                                CheckResult::new(status, "initial status"),
                            )
                        }),
                    };
                    if let Some((at, result)) = last {
                        state.refresh(at, result.status, result.output.clone());
                        refreshed.insert(i, (at, result));
                    }
                    ttls.insert(i, state);
                }
                kind => {
                    // A check the workload added probes as the workload.
                    let asked_by = check.through_api.then(|| service_id.clone());
                    tasks.spawn(probe_loop(
                        i,
                        (kind.clone(), asked_by),
                        check.interval,
                        check.timeout,
                        events.clone(),
                    ));
                }
            }
        }
        let latest: Latest = Arc::new(Mutex::new(vec![None; checks.len()]));
        let refreshed: Refreshed = Arc::new(Mutex::new(refreshed));
        tasks.spawn(aggregate_loop(
            service_id.clone(),
            Aggregate::new(checks.len()),
            ttls,
            rx,
            (updates, latest.clone(), refreshed.clone()),
        ));
        CheckRunner {
            service_id,
            service_name: service_name.into(),
            checks: ids,
            ttl_of,
            latest,
            refreshed,
            events,
            tasks,
        }
    }

    /// Every check of this instance with its latest result.
    pub fn states(&self) -> Vec<CheckState> {
        let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        self.checks
            .iter()
            .enumerate()
            .map(|(i, (id, kind))| CheckState {
                info: CheckInfo {
                    check_id: id.clone(),
                    service_id: self.service_id.clone(),
                    service_name: self.service_name.clone(),
                    kind,
                },
                result: latest.get(i).cloned().flatten(),
            })
            .collect()
    }

    /// The last update of each TTL check that had one, by check id, for
    /// a runner that replaces this one.
    pub fn carried_ttls(&self) -> CarriedTtls {
        let refreshed = self.refreshed.lock().unwrap_or_else(|p| p.into_inner());
        refreshed
            .iter()
            .filter_map(|(i, (at, result))| {
                let (id, _) = self.checks.get(*i)?;
                let ttl = self.ttl_of.get(*i).copied().flatten()?;
                Some((id.clone(), (ttl, *at, result.clone())))
            })
            .collect()
    }

    /// The instance's service id.
    pub fn service_id(&self) -> &str {
        &self.service_id
    }

    /// The check with id `check_id`, if this instance has it.
    pub fn check(&self, check_id: &str) -> Option<CheckInfo> {
        self.checks
            .iter()
            .find(|(id, _)| id == check_id)
            .map(|(id, kind)| CheckInfo {
                check_id: id.clone(),
                service_id: self.service_id.clone(),
                service_name: self.service_name.clone(),
                kind,
            })
    }

    /// Updates TTL check `check_id` with `status` and `output`, restarting its TTL.
    pub fn update_ttl(
        &self,
        check_id: &str,
        status: HealthStatus,
        output: impl Into<String>,
    ) -> Result<(), HealthError> {
        let index = self
            .checks
            .iter()
            .position(|(id, _)| id == check_id)
            .ok_or_else(|| HealthError::UnknownCheck(check_id.to_string()))?;
        let kind = self.checks[index].1;
        if kind != "ttl" {
            return Err(HealthError::NotTtl {
                check: check_id.to_string(),
                kind,
            });
        }
        self.events
            .send(Event::Ttl(index, status, output.into()))
            .map_err(|_| HealthError::Stopped(check_id.to_string()))
    }

    /// Stops all checks (also done on drop).
    pub fn stop(mut self) {
        self.tasks.abort_all();
    }
}

/// Probes check `index` (`kind`, added through the local API by the
/// workload of service `asked_by` when set) every `interval`.
async fn probe_loop(
    index: usize,
    (kind, asked_by): (CheckKind, Option<String>),
    interval: Duration,
    timeout: Duration,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // Read at each probe: the workload's id may come after the check.
        let mark = match &asked_by {
            Some(service_id) => crate::mark::of_workload(service_id),
            None => crate::mark::get(),
        };
        let Some(result) = probe(&kind, timeout, mark).await else {
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
    (updates, latest, refreshed): (mpsc::UnboundedSender<HealthUpdate>, Latest, Refreshed),
) {
    let keep = |aggregate: &Aggregate| {
        latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone_from_slice(aggregate.results());
    };
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
    keep(&aggregate);
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
                Some(Event::Ttl(i, status, output)) => {
                    let now = Instant::now().into_std();
                    match ttls.get_mut(&i) {
                        Some(ttl) => {
                            refreshed
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(i, (now, CheckResult::new(status, output.clone())));
                            ttl.refresh(now, status, output);
                            aggregate.set(i, ttl.result_at(now))
                        }
                        None => None,
                    }
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
        keep(&aggregate);
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

    /// Starts the checks of `service_id` (an instance of `service_name`),
    /// replacing (and stopping) any it had: a TTL check it keeps (same id
    /// and TTL) goes on from its last update.
    pub fn add(&self, service_id: &str, service_name: &str, checks: Vec<CheckConfig>) {
        let mut runners = self.lock();
        let carried = runners
            .get(service_id)
            .map(CheckRunner::carried_ttls)
            .unwrap_or_default();
        let runner = CheckRunner::start_carrying(
            service_id,
            service_name,
            checks,
            self.updates.clone(),
            &carried,
        );
        if let Some(old) = runners.insert(service_id.to_string(), runner) {
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

    /// Every check of every local instance with its latest result, by
    /// service id and then in configured order.
    pub fn states(&self) -> Vec<CheckState> {
        let runners = self.lock();
        let mut ids: Vec<&String> = runners.keys().collect();
        ids.sort();
        ids.into_iter()
            .flat_map(|id| runners[id].states())
            .collect()
    }

    /// The check with id `check_id`, of whichever local instance has it.
    pub fn check(&self, check_id: &str) -> Option<CheckInfo> {
        self.lock().values().find_map(|r| r.check(check_id))
    }

    /// Updates TTL check `check_id` (of whichever local instance has it) with
    /// `status` and `output`, restarting its TTL.
    pub fn update_ttl(
        &self,
        check_id: &str,
        status: HealthStatus,
        output: impl Into<String>,
    ) -> Result<(), HealthError> {
        let runners = self.lock();
        let runner = runners
            .values()
            .find(|r| r.checks.iter().any(|(id, _)| id == check_id))
            .ok_or_else(|| HealthError::UnknownCheck(check_id.to_string()))?;
        runner.update_ttl(check_id, status, output)
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
