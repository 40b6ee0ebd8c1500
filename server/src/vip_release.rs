//! The leader gives back the virtual IPs nothing has held for
//! `--vip-release-after` (a minute by default): a service whose last
//! instance went, another datacenter's service it no longer lists (what
//! holds one: `State::unused_vips`). The wait keeps a service that is
//! redeployed by replacing every instance from changing its address back
//! and forth in every agent; one that comes back later gets its own address
//! again anyway (`state/vips.rs`).
//!
//! The clock is the leader's own and starts again with each new leader: a
//! key is given back only after one leader saw it unused for the whole wait.
//! What the write does is decided where it is applied, on the state then:
//! a key held again meanwhile keeps its address.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::node::ServerNode;
use crate::state::{Command, MAX_RELEASE_BATCH};

/// How long a virtual IP nothing holds is kept, unless configured.
pub const DEFAULT_RELEASE_AFTER: Duration = Duration::from_secs(60);

/// Since when this leader has seen each key unused.
#[derive(Debug, Default)]
pub struct UnusedSince {
    since: HashMap<String, Instant>,
}

impl UnusedSince {
    /// Takes the keys unused `now` (a key missing from them is held again:
    /// its clock starts anew when it is next unused) and answers those
    /// unused for at least `after`, at most [`MAX_RELEASE_BATCH`], in the
    /// order given.
    pub fn due(&mut self, unused: Vec<String>, now: Instant, after: Duration) -> Vec<String> {
        let mut since = HashMap::with_capacity(unused.len());
        let mut due = Vec::new();
        for key in unused {
            let first = self.since.get(&key).copied().unwrap_or(now);
            if now.saturating_duration_since(first) >= after && due.len() < MAX_RELEASE_BATCH {
                due.push(key.clone());
            }
            since.insert(key, first);
        }
        self.since = since;
        due
    }
}

/// Runs on every server; acts while it leads.
pub async fn run(node: Arc<ServerNode>) {
    let after = node.vip_release_after;
    let period = (after / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
    let mut unused = UnusedSince::default();
    loop {
        tokio::time::sleep(period).await;
        if node.raft.current_leader().await != Some(node.id) {
            unused = UnusedSince::default();
            continue;
        }
        let now_unused = node.shared.state.read().expect("state lock").unused_vips();
        let due = unused.due(now_unused, Instant::now(), after);
        if due.is_empty() {
            continue;
        }
        if !node.every_server_says(|s| s.releases_vips).await {
            tracing::debug!(
                waiting = due.len(),
                "a server does not yet give virtual IPs back: they are kept"
            );
            continue;
        }
        let count = due.len();
        match node.write(Command::ReleaseVips { keys: due }).await {
            Ok(index) => tracing::info!(index, count, "virtual IPs nothing held were given back"),
            Err(e) => tracing::debug!("giving virtual IPs back: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_key_is_due_once_unused_for_the_whole_wait() {
        let after = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut unused = UnusedSince::default();
        assert!(unused.due(keys(&["a", "b"]), t0, after).is_empty());
        let t1 = t0 + Duration::from_secs(30);
        assert!(unused.due(keys(&["a", "b", "c"]), t1, after).is_empty());
        // b held again at t2: its clock starts over when next unused.
        let t2 = t0 + Duration::from_secs(45);
        assert!(unused.due(keys(&["a", "c"]), t2, after).is_empty());
        let t3 = t0 + Duration::from_secs(61);
        assert_eq!(unused.due(keys(&["a", "b", "c"]), t3, after), keys(&["a"]));
        let t4 = t0 + Duration::from_secs(91);
        assert_eq!(
            unused.due(keys(&["a", "b", "c"]), t4, after),
            keys(&["a", "c"])
        );
        let t5 = t3 + Duration::from_secs(60);
        assert_eq!(
            unused.due(keys(&["a", "b", "c"]), t5, after),
            keys(&["a", "b", "c"])
        );
    }

    #[test]
    fn at_most_one_batch_is_due_at_once() {
        let after = Duration::from_secs(1);
        let t0 = Instant::now();
        let many: Vec<String> = (0..MAX_RELEASE_BATCH + 10)
            .map(|n| format!("s{n}"))
            .collect();
        let mut unused = UnusedSince::default();
        assert!(unused.due(many.clone(), t0, after).is_empty());
        let due = unused.due(many.clone(), t0 + after, after);
        assert_eq!(due.len(), MAX_RELEASE_BATCH);
        assert_eq!(due[..], many[..MAX_RELEASE_BATCH]);
    }
}
