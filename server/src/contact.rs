//! Whether this server is in contact with its cluster: a leader whose
//! leadership a quorum confirmed lately, or a follower that heard from its
//! leader lately. A server cut off from the majority (a partition, a
//! stalled peer link) still answers its clients, but what it holds no
//! longer moves: a watch stream from it would stay open and silent while
//! the others take changes, an intention set to deny among them. Watch
//! streams therefore end, and new ones are refused, while a server is out
//! of contact (`grpc::watch`); the agents resume from another server.
//!
//! The judgement ([`judge`]) is pure. A subscription is judged when it
//! comes; [`run`] judges every [`CHECK_EVERY`] and publishes the result
//! for open streams to follow.
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::node::ServerNode;

/// How long without a confirmation (a leader) or without hearing the
/// leader (any other server) ends this server's contact: well above an
/// election's usual length (the leader lease of 800 ms, a pre-vote round
/// and the vote), so that an ordinary election ends no stream.
pub const CONTACT_LIMIT: Duration = Duration::from_secs(3);
/// How often contact is judged for the open streams.
pub const CHECK_EVERY: Duration = Duration::from_millis(500);

/// What this server knows of its place in the cluster at one check.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Seen {
    /// It leads; a quorum last confirmed that `confirmed_ago` ago (winning
    /// the election counts).
    Leading { confirmed_ago: Duration },
    /// It follows (or stands, or learns); `knows_leader` whether it has a
    /// leader at all, which it last heard `silence` ago.
    Following {
        knows_leader: bool,
        silence: Duration,
    },
}

/// Whether a server that sees `seen` is in contact with its cluster.
pub fn judge(seen: Seen, limit: Duration) -> bool {
    match seen {
        Seen::Leading { confirmed_ago } => confirmed_ago < limit,
        Seen::Following {
            knows_leader,
            silence,
        } => knows_leader && silence < limit,
    }
}

/// This server's contact, as [`run`] last judged it (true until its
/// first judgement).
pub struct Contact {
    tx: watch::Sender<bool>,
}

impl Default for Contact {
    fn default() -> Self {
        Self {
            tx: watch::channel(true).0,
        }
    }
}

impl Contact {
    /// Whether `node` (whose contact this is) is in contact at this moment.
    pub fn in_contact(&self, node: &ServerNode) -> bool {
        judge(self.seen(node), CONTACT_LIMIT)
    }

    fn seen(&self, node: &ServerNode) -> Seen {
        let metrics = node.raft.metrics();
        let metrics = metrics.borrow();
        if metrics.current_leader == Some(node.id) {
            Seen::Leading {
                // openraft's own count, kept as the leader's appends and
                // heartbeats are acknowledged; none yet: it has just won
                // its election, a quorum's confirmation.
                confirmed_ago: Duration::from_millis(metrics.millis_since_quorum_ack.unwrap_or(0)),
            }
        } else {
            Seen::Following {
                knows_leader: metrics.current_leader.is_some(),
                silence: node.leader_contact.silence(),
            }
        }
    }

    /// Completes when [`run`] judges `node` (whose contact this is) out of
    /// contact and it still is: a stream that started in contact just
    /// before [`run`] saw it so is not ended by [`run`]'s older judgement.
    pub async fn lost(&self, node: &ServerNode) {
        let mut rx = self.tx.subscribe();
        loop {
            if !*rx.borrow_and_update() && !self.in_contact(node) {
                return;
            }
            if rx.changed().await.is_err() {
                // No judge any more (the server is stopping).
                return std::future::pending().await;
            }
        }
    }

    fn set(&self, in_contact: bool) {
        self.tx.send_if_modified(|now| {
            let changed = *now != in_contact;
            *now = in_contact;
            changed
        });
    }
}

/// Checks `node`'s contact every [`CHECK_EVERY`] and publishes it in
/// `node.contact`, logging each change. Runs until the server stops.
pub async fn run(node: Arc<ServerNode>) {
    let contact = &node.contact;
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let seen = contact.seen(&node);
        let now = judge(seen, CONTACT_LIMIT);
        if now != *contact.tx.borrow() {
            if now {
                tracing::info!("in contact with the cluster: watch streams are served");
            } else {
                tracing::warn!(
                    ?seen,
                    "out of contact with the cluster's leader for {CONTACT_LIMIT:?}: \
                     watch streams end and new ones are refused until contact is back"
                );
            }
        }
        contact.set(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(3);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_leader_is_in_contact_while_a_quorum_confirms_it() {
        let leading = |confirmed_ago| Seen::Leading { confirmed_ago };
        assert!(judge(leading(ms(0)), LIMIT));
        assert!(judge(leading(ms(2_999)), LIMIT));
        // Cut off: it still thinks it leads, no quorum answers.
        assert!(!judge(leading(ms(3_000)), LIMIT));
    }

    #[test]
    fn a_follower_is_in_contact_while_it_hears_its_leader() {
        let following = |knows_leader, silence| Seen::Following {
            knows_leader,
            silence,
        };
        assert!(judge(following(true, ms(100)), LIMIT));
        assert!(judge(following(true, ms(2_999)), LIMIT));
        // Cut off: pre-vote keeps its term and its leader, not its contact.
        assert!(!judge(following(true, ms(3_000)), LIMIT));
        assert!(!judge(following(true, Duration::from_secs(600)), LIMIT));
        // A server that never had a leader (a cluster forming) holds
        // nothing current, however recently it started.
        assert!(!judge(following(false, ms(0)), LIMIT));
    }
}
