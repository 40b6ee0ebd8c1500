//! Failure detection: the node-level check (Consul's `serfHealth`).
//!
//! Every agent sends a heartbeat for its node (`Catalog.Heartbeat`, every
//! `timeout / 5`); a follower hands it to the leader. The leader remembers
//! when it last heard of each node, and [`monitor`] writes the node's
//! health through Raft when that changes: critical once a registered node
//! has been silent for longer than the node timeout (`--node-timeout`, 10 s
//! by default), passing again when its heartbeats come back. Agents see the
//! change on their watch stream and stop choosing instances on a critical
//! node. A partition that cuts one node off marks that node only; a leader
//! that has just been elected gives every node a full timeout before
//! judging it, since it has not heard heartbeats sent to its predecessor.
//!
//! Heartbeats live in the leader's memory only: writing each through Raft
//! would cost a replicated write per node every few seconds.
//!
//! The same monitor deregisters instances registered with Consul's
//! `DeregisterCriticalServiceAfter` once they have been critical (by their
//! own checks, or because their node is) for that long, as the leader saw
//! it: a new leader starts those clocks anew.
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weft_api::catalog::{HealthStatus, Node, ServiceInstance};

use crate::node::ServerNode;
use crate::state::Command;

/// The start of the node-level check's output when the liveness monitor
/// set it: only such a critical state is lifted by heartbeats.
pub const SILENT: &str = "agent not heard from";

/// What the leader knows of agents' heartbeats.
pub struct Liveness {
    timeout: Duration,
    seen: Mutex<HashMap<String, Instant>>,
    /// Since when this server leads (None: it does not).
    leading_since: Mutex<Option<Instant>>,
    /// (node, instance id) -> since when the leader has seen it critical.
    critical_since: Mutex<HashMap<(String, String), Instant>>,
}

impl Liveness {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            seen: Mutex::new(HashMap::new()),
            leading_since: Mutex::new(None),
            critical_since: Mutex::new(HashMap::new()),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How often agents should send heartbeats: five per timeout.
    pub fn interval(&self) -> Duration {
        (self.timeout / 5).max(Duration::from_millis(200))
    }

    /// Records a heartbeat of `node`.
    pub fn heard(&self, node: &str, now: Instant) {
        self.seen
            .lock()
            .expect("liveness lock")
            .insert(node.to_string(), now);
    }

    /// The changes of node health due now, given the registered `nodes`;
    /// forgets heartbeats of nodes that are not registered. Empty when this
    /// server does not lead.
    fn due<'a, I>(&self, nodes: I, now: Instant) -> Vec<(String, HealthStatus, String)>
    where
        I: IntoIterator<Item = &'a Node> + Clone,
    {
        let Some(since) = *self.leading_since.lock().expect("liveness lock") else {
            return Vec::new();
        };
        let registered: HashSet<&str> = (nodes.clone().into_iter())
            .map(|n| n.name.as_str())
            .collect();
        let mut seen = self.seen.lock().expect("liveness lock");
        seen.retain(|name, _| registered.contains(name.as_str()));
        verdicts(nodes, &seen, since, now, self.timeout)
    }

    /// Moves every clock (heartbeats, the start of leading, instances
    /// critical) forward by `gap`, a time this leader could take no
    /// heartbeats in: nothing is judged by it.
    pub fn resumed_after(&self, gap: Duration) {
        for t in self.seen.lock().expect("liveness lock").values_mut() {
            *t += gap;
        }
        if let Some(t) = self.leading_since.lock().expect("liveness lock").as_mut() {
            *t += gap;
        }
        for t in self
            .critical_since
            .lock()
            .expect("liveness lock")
            .values_mut()
        {
            *t += gap;
        }
    }

    /// This server leads from `now` on (or no longer does, `None`); a new
    /// leader forgets what it knew and gives every node a full timeout.
    fn set_leading(&self, now: Option<Instant>) {
        let mut since = self.leading_since.lock().expect("liveness lock");
        match (*since, now) {
            (None, Some(now)) => {
                self.seen.lock().expect("liveness lock").clear();
                self.critical_since.lock().expect("liveness lock").clear();
                *since = Some(now);
            }
            (Some(_), None) => *since = None,
            _ => {}
        }
    }
}

impl Liveness {
    /// The instances due for deregistration: critical for longer than their
    /// `deregister_critical_after_ms`, as this leader saw them.
    fn expired<'a>(
        &self,
        nodes: impl IntoIterator<Item = &'a Node>,
        instances: impl IntoIterator<Item = &'a ServiceInstance>,
        now: Instant,
    ) -> Vec<(String, String)> {
        if self.leading_since.lock().expect("liveness lock").is_none() {
            return Vec::new();
        }
        let mut since = self.critical_since.lock().expect("liveness lock");
        expired(nodes, instances, &mut since, now)
    }
}

/// Pure: the (node, id) of instances that have been critical — their own
/// health, or their node's — for at least their deregistration delay,
/// counted from when first seen critical in `since`, which this keeps (an
/// instance seen passing again starts over).
pub fn expired<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    instances: impl IntoIterator<Item = &'a ServiceInstance>,
    since: &mut HashMap<(String, String), Instant>,
    now: Instant,
) -> Vec<(String, String)> {
    let critical_nodes: HashSet<&str> = nodes
        .into_iter()
        .filter(|n| n.health == HealthStatus::Critical)
        .map(|n| n.name.as_str())
        .collect();
    let node_critical = |name: &str| critical_nodes.contains(name);
    let mut due = Vec::new();
    let mut watched = HashSet::new();
    for i in instances
        .into_iter()
        .filter(|i| i.deregister_critical_after_ms > 0)
    {
        let key = (i.node.clone(), i.id.clone());
        if i.health != HealthStatus::Critical && !node_critical(&i.node) {
            continue;
        }
        let first = *since.entry(key.clone()).or_insert(now);
        if now.saturating_duration_since(first)
            >= Duration::from_millis(i.deregister_critical_after_ms)
        {
            due.push(key.clone());
        }
        watched.insert(key);
    }
    since.retain(|k, _| watched.contains(k));
    due
}

/// Pure: the node-level health each registered node should change to. A
/// node silent for longer than `timeout` (counted from its last heartbeat,
/// or from `leading_since` if later) goes critical; a node that the monitor
/// made critical goes back to passing once heard from within `timeout`.
pub fn verdicts<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    seen: &HashMap<String, Instant>,
    leading_since: Instant,
    now: Instant,
    timeout: Duration,
) -> Vec<(String, HealthStatus, String)> {
    let mut due = Vec::new();
    // External nodes (registered through the catalog API) have no agent to
    // send heartbeats: their health is what their registrations say.
    for node in nodes
        .into_iter()
        .filter(|n| !weft_api::catalog_register::is_external(n))
    {
        let last = seen
            .get(&node.name)
            .copied()
            .map_or(leading_since, |t| t.max(leading_since));
        let silent = now.saturating_duration_since(last);
        if silent > timeout {
            if node.health != HealthStatus::Critical {
                due.push((
                    node.name.clone(),
                    HealthStatus::Critical,
                    format!(
                        "{SILENT} for {:.1}s (node timeout {:.1}s)",
                        silent.as_secs_f64(),
                        timeout.as_secs_f64()
                    ),
                ));
            }
        } else if node.health == HealthStatus::Critical
            && node.health_output.starts_with(SILENT)
            && seen.contains_key(&node.name)
        {
            due.push((node.name.clone(), HealthStatus::Passing, String::new()));
        }
    }
    due
}

/// Runs the liveness monitor on this server for as long as it lives: while
/// it leads, writes node health changes as they fall due.
pub async fn monitor(node: Arc<ServerNode>) {
    let tick = (node.liveness.timeout() / 10).max(Duration::from_millis(100));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out_of_contact: Option<Instant> = None;
    loop {
        interval.tick().await;
        let leading = node.raft.current_leader().await == Some(node.id);
        let now = Instant::now();
        node.liveness.set_leading(leading.then_some(now));
        if !leading {
            out_of_contact = None;
            continue;
        }
        // A leader out of contact takes no heartbeats (`leads_in_contact`)
        // and could not write a verdict: it judges nothing meanwhile, and
        // back in contact counts the time it was out as if every node had
        // been heard, rather than judge a silence it imposed (nor forgets
        // what it knew: a leader that kept losing contact briefly would
        // then never judge anyone).
        if !node.contact.in_contact() {
            out_of_contact.get_or_insert(now);
            continue;
        }
        if let Some(since) = out_of_contact.take() {
            node.liveness
                .resumed_after(now.saturating_duration_since(since));
        }
        // Decided under the state's read lock from what it holds, nothing
        // copied: a tick costs a pass over the catalog, not a copy of it.
        let (expired, due) = {
            let state = node.shared.state.read().expect("state lock");
            let here = (state.nodes.values()).filter(|n| n.datacenter == node.datacenter);
            let instances = state.instances.values().flat_map(|m| m.values());
            (
                node.liveness.expired(here.clone(), instances, now),
                node.liveness.due(here, now),
            )
        };
        for (name, id) in expired {
            tracing::warn!(node = %name, %id, "instance critical past its DeregisterCriticalServiceAfter: deregistering");
            let cmd = Command::DeregisterService {
                node: name.clone(),
                id: id.clone(),
            };
            if let Err(e) = node.write_as_leader(cmd).await {
                tracing::warn!(node = %name, %id, "deregistering failed: {e}");
            }
        }
        for (name, health, output) in due {
            match health {
                HealthStatus::Critical => tracing::warn!(node = %name, "node critical: {output}"),
                _ => tracing::info!(node = %name, "node heard from again: passing"),
            }
            let cmd = Command::SetNodeHealth {
                node: name.clone(),
                health,
                output,
                now_ms: crate::grpc::ca::unix_now_ms(),
            };
            if let Err(e) = node.write_as_leader(cmd).await {
                tracing::warn!(node = %name, "writing node health failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn node(name: &str, health: HealthStatus, output: &str) -> Node {
        Node {
            name: name.into(),
            address: "10.0.0.1".into(),
            datacenter: "dc1".into(),
            health,
            health_output: output.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_silent_node_goes_critical_after_the_timeout_and_only_it() {
        let t0 = Instant::now();
        let nodes = [
            node("a", HealthStatus::Passing, ""),
            node("b", HealthStatus::Passing, ""),
        ];
        let mut seen = HashMap::new();
        seen.insert("a".to_string(), t0 + Duration::from_secs(9));
        seen.insert("b".to_string(), t0 + Duration::from_secs(1));
        // At 10 s nobody is late yet.
        assert!(verdicts(&nodes, &seen, t0, t0 + TIMEOUT, TIMEOUT).is_empty());
        // At 11.5 s, b (last heard at 1 s) is; a (at 9 s) is not.
        let due = verdicts(
            &nodes,
            &seen,
            t0,
            t0 + Duration::from_millis(11_500),
            TIMEOUT,
        );
        assert_eq!(due.len(), 1, "{due:?}");
        assert_eq!((due[0].0.as_str(), due[0].1), ("b", HealthStatus::Critical));
        assert!(due[0].2.starts_with(SILENT), "{}", due[0].2);
    }

    #[test]
    fn a_time_out_of_contact_counts_for_no_node() {
        let t0 = Instant::now();
        let liveness = Liveness::new(TIMEOUT);
        liveness.set_leading(Some(t0));
        liveness.heard("a", t0 + Duration::from_secs(1));
        let nodes = [
            node("a", HealthStatus::Passing, ""),
            node("never-heard", HealthStatus::Passing, ""),
        ];
        // 20 s out of contact, then 4 s back: silent 24 s by the clock,
        // 4 s (a) and 5 s (never heard, since the election) by what the
        // leader could hear.
        let back = t0 + Duration::from_secs(25);
        assert_eq!(liveness.due(&nodes, back).len(), 2, "without the gap");
        liveness.resumed_after(Duration::from_secs(20));
        assert!(liveness.due(&nodes, back).is_empty());
        // Then silence counts again.
        let late = t0 + Duration::from_secs(32);
        let due = liveness.due(&nodes, late);
        assert_eq!(due.len(), 2, "{due:?}");
    }

    #[test]
    fn an_external_node_never_goes_critical_for_silence() {
        let t0 = Instant::now();
        let mut external = node("db-host", HealthStatus::Passing, "");
        external.meta.insert(
            weft_api::catalog_register::EXTERNAL_NODE_META.into(),
            "true".into(),
        );
        let nodes = [external, node("a", HealthStatus::Passing, "")];
        let due = verdicts(
            &nodes,
            &HashMap::new(),
            t0,
            t0 + Duration::from_secs(60),
            TIMEOUT,
        );
        let names: Vec<&str> = due.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, ["a"], "only the agent's node is late");
    }

    #[test]
    fn a_new_leader_gives_every_node_a_full_timeout() {
        let t0 = Instant::now();
        let nodes = [node("a", HealthStatus::Passing, "")];
        let leading_since = t0 + Duration::from_secs(100);
        // Never heard of (by this leader): judged from its election on.
        let empty = HashMap::new();
        let at = |s| leading_since + Duration::from_secs(s);
        assert!(verdicts(&nodes, &empty, leading_since, at(9), TIMEOUT).is_empty());
        assert_eq!(
            verdicts(&nodes, &empty, leading_since, at(11), TIMEOUT).len(),
            1
        );
        // A heartbeat from before the election counts from the election.
        let mut old = HashMap::new();
        old.insert("a".to_string(), t0);
        assert!(verdicts(&nodes, &old, leading_since, at(9), TIMEOUT).is_empty());
    }

    #[test]
    fn heartbeats_lift_only_the_monitors_own_verdict() {
        let t0 = Instant::now();
        let mut seen = HashMap::new();
        seen.insert("a".to_string(), t0 + Duration::from_secs(20));
        seen.insert("b".to_string(), t0 + Duration::from_secs(20));
        let nodes = [
            node("a", HealthStatus::Critical, &format!("{SILENT} for 12.0s")),
            node("b", HealthStatus::Critical, "set by an operator"),
            node("c", HealthStatus::Critical, &format!("{SILENT} for 12.0s")),
        ];
        let due = verdicts(&nodes, &seen, t0, t0 + Duration::from_secs(21), TIMEOUT);
        // a is back; b's critical is not the monitor's; c is still silent
        // (and critical already: nothing to write).
        assert_eq!(
            due,
            vec![("a".to_string(), HealthStatus::Passing, String::new())]
        );
    }

    fn instance(id: &str, node: &str, health: HealthStatus, after_ms: u64) -> ServiceInstance {
        ServiceInstance {
            id: id.into(),
            service: "api".into(),
            node: node.into(),
            address: "10.0.0.1".into(),
            port: 8080,
            health,
            deregister_critical_after_ms: after_ms,
            ..Default::default()
        }
    }

    #[test]
    fn an_instance_critical_past_its_delay_is_deregistered_and_only_it() {
        let t0 = Instant::now();
        let nodes = [
            node("a", HealthStatus::Passing, ""),
            node("b", HealthStatus::Critical, SILENT),
        ];
        let instances = [
            instance("sick", "a", HealthStatus::Critical, 5_000),
            instance("on-dead-node", "b", HealthStatus::Passing, 5_000),
            instance("no-delay", "a", HealthStatus::Critical, 0),
            instance("well", "a", HealthStatus::Passing, 5_000),
        ];
        let mut since = HashMap::new();
        assert!(expired(&nodes, &instances, &mut since, t0).is_empty());
        assert_eq!(since.len(), 2, "{since:?}");
        let mut due = expired(&nodes, &instances, &mut since, t0 + Duration::from_secs(5));
        due.sort();
        assert_eq!(
            due,
            vec![
                ("a".to_string(), "sick".to_string()),
                ("b".to_string(), "on-dead-node".to_string()),
            ]
        );
    }

    #[test]
    fn passing_again_starts_the_clock_over() {
        let t0 = Instant::now();
        let nodes = [node("a", HealthStatus::Passing, "")];
        let mut since = HashMap::new();
        let sick = [instance("x", "a", HealthStatus::Critical, 5_000)];
        let well = [instance("x", "a", HealthStatus::Passing, 5_000)];
        expired(&nodes, &sick, &mut since, t0);
        expired(&nodes, &well, &mut since, t0 + Duration::from_secs(4));
        assert!(since.is_empty());
        assert!(expired(&nodes, &sick, &mut since, t0 + Duration::from_secs(6)).is_empty());
        assert_eq!(
            expired(&nodes, &sick, &mut since, t0 + Duration::from_secs(11)).len(),
            1
        );
    }

    #[test]
    fn the_monitor_judges_only_while_leading_and_forgets_unregistered_nodes() {
        let l = Liveness::new(TIMEOUT);
        let t0 = Instant::now();
        let nodes = [node("a", HealthStatus::Passing, "")];
        assert!(l.due(&nodes, t0 + Duration::from_secs(60)).is_empty());
        l.set_leading(Some(t0));
        l.heard("a", t0);
        l.heard("gone", t0);
        assert_eq!(l.due(&nodes, t0 + Duration::from_secs(11)).len(), 1);
        assert!(!l.seen.lock().unwrap().contains_key("gone"));
        l.set_leading(None);
        assert!(l.due(&nodes, t0 + Duration::from_secs(60)).is_empty());
    }
}
