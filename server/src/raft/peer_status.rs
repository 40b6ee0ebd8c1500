//! What a server tells its peers about itself (the `Status` RPC): its
//! role, term, log and how long it has not heard from a leader, which
//! pre-vote and cluster formation read. A module of its own so that the
//! node (which asks peers) and the Raft service (which answers) both use
//! it without depending on each other.
use serde::{Deserialize, Serialize};

/// What `Status` answers: this server's view of Raft.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub id: u64,
    pub initialized: bool,
    pub leader: Option<u64>,
    /// "leader", "follower", "candidate", "learner" or "shutdown".
    pub role: String,
    pub term: u64,
    pub last_log_index: u64,
    pub last_applied: u64,
    /// The term of the last log entry (for pre-vote).
    #[serde(default)]
    pub last_log_term: u64,
    /// Milliseconds since this server last heard from a leader (zero when it
    /// leads), for pre-vote. An earlier version that does not say grants
    /// nothing.
    #[serde(default)]
    pub leader_silence_ms: u64,
    /// Whether this server applies `Command::Batch` entries: the leader
    /// batches writes only once every server says so (a server of an earlier
    /// version would fail on one).
    #[serde(default)]
    pub applies_batches: bool,
    /// Whether this server applies `Command::CaLeafTtl`: the leader writes
    /// one only once every server says so.
    #[serde(default)]
    pub applies_leaf_ttl: bool,
    /// Whether this server refuses a `Command::Once` whose caller's
    /// standing changed: the leader keeps the standing in the commands it
    /// writes only once every server says so (a server of an earlier version
    /// would apply what the others refuse).
    #[serde(default)]
    pub checks_standing: bool,
    /// Whether this server applies `Command::ReleaseVips`: the leader gives
    /// virtual IPs back only once every server says so (a server of an
    /// earlier version would fail on one, and allocate new ones otherwise).
    #[serde(default)]
    pub releases_vips: bool,
}

impl PeerStatus {
    /// What pre-vote needs of it.
    pub fn view(&self) -> super::prevote::PeerView {
        super::prevote::PeerView {
            leader_silence: std::time::Duration::from_millis(self.leader_silence_ms),
            last_log: (self.last_log_term, self.last_log_index),
        }
    }
}
