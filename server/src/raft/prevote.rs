//! Pre-vote (Raft thesis §9.6): a server starts an election only when a
//! majority of the voters, itself counted, would vote for it: they have not
//! heard from a leader for an election timeout either, and its log is at
//! least as up to date as theirs.
//!
//! openraft 0.9 has no pre-vote, so its election timer is switched off
//! (`enable_elect = false`) and [`run`] decides when to call
//! `trigger().elect()`. A server cut off from the others asks, hears no
//! majority and keeps its term; when it comes back it follows the leader it
//! finds instead of deposing it with a higher term.
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use super::{Member, NodeId};

/// When this server last heard from a leader it accepts: an append or a
/// snapshot that openraft took, or a vote it granted (which, as in Raft,
/// restarts its wait).
pub struct LeaderContact {
    last: Mutex<Instant>,
}

impl Default for LeaderContact {
    /// Starts as if a leader had just been heard: a server that starts
    /// waits an election timeout before it asks.
    fn default() -> Self {
        Self {
            last: Mutex::new(Instant::now()),
        }
    }
}

impl LeaderContact {
    pub fn heard(&self) {
        *self.last.lock().expect("leader contact lock") = Instant::now();
    }

    pub fn silence(&self) -> Duration {
        self.last.lock().expect("leader contact lock").elapsed()
    }
}

/// What a peer says when asked (part of its status).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerView {
    /// How long it has not heard from a leader (zero if it leads).
    pub leader_silence: Duration,
    /// Its last log entry: (term, index).
    pub last_log: (u64, u64),
}

/// Whether a server whose last log entry is `own_log` would win an election
/// among `voters` voters (itself one of them), given the answers of the
/// peers that answered. A peer grants when it too has heard no leader for
/// `timeout` (the leader lease) and `own_log` is at least as up to date as its own (term
/// first, then index: Raft's rule). Peers that did not answer grant nothing.
pub fn would_win(
    voters: usize,
    own_log: (u64, u64),
    answers: &[PeerView],
    timeout: Duration,
) -> bool {
    let grants = answers
        .iter()
        .filter(|peer| peer.leader_silence >= timeout && own_log >= peer.last_log)
        .count();
    2 * (1 + grants) > voters
}

/// Election timing, as openraft's: wait a random time in `min..max` between
/// checks; a leader silent for `max` (openraft's leader lease, during which
/// it refuses to vote) is presumed gone.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub min: Duration,
    pub max: Duration,
}

/// Asks the peers, after every randomized election timeout without a
/// leader, whether they would vote for this server, and starts an election
/// when a majority would. Runs until the server stops.
/// `elections` counts the elections it starts.
pub async fn run<M: Member>(node: std::sync::Arc<M>, timing: Timing, elections: Counter) {
    let me = node.id();
    loop {
        let spread = timing.max.saturating_sub(timing.min).as_millis() as u64;
        let wait = timing.min + Duration::from_millis(rand::random::<u64>() % spread.max(1));
        tokio::time::sleep(wait).await;
        // openraft refuses votes for a lease of `max` after it last heard a
        // leader; asking sooner would win a pre-vote and lose the vote.
        if node.leader_contact().silence() < timing.max {
            continue;
        }
        let metrics = node.raft().metrics().borrow().clone();
        if metrics.state == openraft::ServerState::Leader {
            continue;
        }
        let membership = metrics.membership_config.membership().clone();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        if !voters.contains(&me) {
            continue;
        }
        let own_log = node
            .raft()
            .data_metrics()
            .borrow()
            .last_log
            .map_or((0, 0), |id| (id.leader_id.term, id.index));
        let peers: Vec<NodeId> = voters.iter().copied().filter(|id| *id != me).collect();
        let asked = peers.iter().map(|id| node.peer_status(*id));
        let answers: Vec<PeerView> = futures::future::join_all(asked)
            .await
            .into_iter()
            .zip(&peers)
            // An answer from another server than the one asked (a wrong
            // --peer address) counts for nothing.
            .filter_map(|(status, id)| status.filter(|s| s.id == *id))
            .map(|status| status.view())
            .collect();
        if would_win(voters.len(), own_log, &answers, timing.max) {
            tracing::info!(
                term = metrics.current_term,
                answers = answers.len(),
                "no leader heard for an election timeout and a majority agrees: starting an election"
            );
            elections.inc();
            if let Err(e) = node.raft().trigger().elect().await {
                tracing::warn!("starting an election: {e}");
                return;
            }
        } else {
            tracing::debug!(
                answers = answers.len(),
                "no leader heard, but no majority would vote: not starting an election"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(400);

    fn peer(silence_ms: u64, term: u64, index: u64) -> PeerView {
        PeerView {
            leader_silence: Duration::from_millis(silence_ms),
            last_log: (term, index),
        }
    }

    #[test]
    fn an_isolated_server_hears_no_majority() {
        // Nobody answered: one vote of three.
        assert!(!would_win(3, (5, 100), &[], TIMEOUT));
        // One of five is not a majority either, nor two of five.
        assert!(!would_win(5, (5, 100), &[peer(900, 5, 100)], TIMEOUT));
    }

    #[test]
    fn peers_that_hear_a_leader_refuse() {
        // Both peers still hear the leader: the returning server's silence
        // is its own, not the cluster's.
        let answers = [peer(50, 5, 120), peer(0, 5, 120)];
        assert!(!would_win(3, (5, 100), &answers, TIMEOUT));
    }

    #[test]
    fn a_majority_without_a_leader_grants() {
        let answers = [peer(500, 5, 100), peer(30, 5, 100)];
        assert!(would_win(3, (5, 100), &answers, TIMEOUT));
        // A single server cluster elects itself.
        assert!(would_win(1, (0, 0), &[], TIMEOUT));
    }

    #[test]
    fn a_less_up_to_date_log_is_refused_term_first() {
        // The peer's last entry has a newer term: a longer log of an older
        // term does not win it.
        assert!(!would_win(3, (4, 200), &[peer(900, 5, 100)], TIMEOUT));
        // Same term, shorter log: refused; same log: granted.
        assert!(!would_win(3, (5, 99), &[peer(900, 5, 100)], TIMEOUT));
        assert!(would_win(3, (5, 100), &[peer(900, 5, 100)], TIMEOUT));
        // A newer term wins over a longer log of an older one.
        assert!(would_win(3, (6, 10), &[peer(900, 5, 100)], TIMEOUT));
    }
}
