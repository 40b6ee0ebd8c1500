//! Whether this server is in contact with its cluster: whether what it
//! holds is as new as what a quorum committed a moment ago. A server cut
//! off from the majority (a partition, a stalled peer link) still answers
//! its clients, but what it holds no longer moves: a watch stream from it
//! would stay open and silent while the others take changes, an intention
//! set to deny among them, and a leader cut off with it (openraft deposes
//! a leader only when it hears of a newer term) would take writes it
//! cannot commit and heartbeats the elected leader never hears.
//!
//! So every [`CHECK_EVERY`] each server asks for a read index, as a
//! linearizable read does: the leader has a quorum confirm it, a follower
//! asks its leader over the Raft port (which does the same). Once the
//! server has applied up to that index, what it holds was current when it
//! asked: that moment is its last confirmation. It is in contact while that
//! is under [`CONTACT_LIMIT`] ago ([`judge`]). Leader or follower, cut off
//! or deposed or far behind in applying, it stops being confirmed; an
//! election in between costs nothing while the last confirmation is recent.
//!
//! Out of contact, a server ends its watch streams and refuses new ones
//! (`grpc::watch`), and a leader refuses writes and heartbeats
//! (`node::ServerNode::leads_in_contact`); the agents go to another server.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::node::ServerNode;

/// How long after its last confirmation a server is still in contact: well
/// above an election's usual length (the leader lease of 800 ms, a
/// pre-vote round and the vote), and well under the servers' node timeout
/// (10 s by default), so that an agent whose heartbeats a cut-off leader
/// refuses reaches the elected one in time.
pub const CONTACT_LIMIT: Duration = Duration::from_secs(3);
/// How often a read index is asked for, and contact judged for the open
/// streams.
pub const CHECK_EVERY: Duration = Duration::from_millis(500);
/// The staleness reported by a server never confirmed: huge, and still
/// within what Go's clients can hold in nanoseconds (i64).
pub const NEVER: Duration = Duration::from_secs(1 << 32);
/// How long one read index may take.
const ASK_LIMIT: Duration = Duration::from_secs(1);

/// Whether a server whose last confirmation was `confirmed_ago` ago (None:
/// never since it started) is in contact.
pub fn judge(confirmed_ago: Option<Duration>, limit: Duration) -> bool {
    confirmed_ago.is_some_and(|ago| ago < limit)
}

/// A read index asked for at `asked`, which the server must apply up to for
/// `asked` to count as a confirmation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pending {
    pub index: u64,
    pub asked: Instant,
}

/// How many read indexes may wait to be applied: one per check over
/// [`CONTACT_LIMIT`], so that a server behind confirms at the pace it
/// applies, as long as it stays under the limit.
const MAX_PENDING: usize = 6;

/// Takes the `answer` to the read index just asked (if any) into `pending`
/// (in the order asked) and returns the newest moment whose index the
/// server, having applied up to `applied`, now holds: its confirmation.
/// An answer lower than a pending index (a new leader's) drops the higher
/// ones, which would otherwise hold back the confirmations after them.
pub fn confirm(
    applied: u64,
    pending: &mut VecDeque<Pending>,
    answer: Option<Pending>,
) -> Option<Instant> {
    if let Some(answer) = answer {
        pending.retain(|p| p.index <= answer.index);
        if pending.len() < MAX_PENDING {
            pending.push_back(answer);
        }
    }
    let mut confirmed = None;
    while let Some(first) = pending.front().filter(|p| p.index <= applied) {
        confirmed = Some(first.asked);
        pending.pop_front();
    }
    confirmed
}

/// This server's contact: its last confirmation, and the last published
/// judgement of it.
pub struct Contact {
    confirmed: Mutex<Option<Instant>>,
    tx: watch::Sender<bool>,
}

impl Default for Contact {
    /// Not in contact until first confirmed.
    fn default() -> Self {
        Self {
            confirmed: Mutex::new(None),
            tx: watch::channel(false).0,
        }
    }
}

impl Contact {
    /// Whether this server is in contact at this moment.
    pub fn in_contact(&self) -> bool {
        judge(self.confirmed_ago(), CONTACT_LIMIT)
    }

    /// Whether this server is in contact, and how old at most what it
    /// holds is (Consul's `X-Consul-KnownLeader` and
    /// `X-Consul-LastContact`), read once so that they agree: since the
    /// last confirmation, or [`NEVER`] if there was none (a server
    /// restarted on old data knows nothing of how old it is).
    pub fn currency(&self) -> (bool, Duration) {
        let ago = self.confirmed_ago();
        (judge(ago, CONTACT_LIMIT), ago.unwrap_or(NEVER))
    }

    /// How long ago this server was last confirmed, if ever.
    pub fn confirmed_ago(&self) -> Option<Duration> {
        self.confirmed
            .lock()
            .expect("contact lock")
            .map(|at| at.elapsed())
    }

    /// Completes when [`run`] has judged this server out of contact and it
    /// still is: a stream that began in contact just before [`run`] saw it
    /// so is not ended by [`run`]'s older judgement.
    pub async fn lost(&self) {
        let mut rx = self.tx.subscribe();
        loop {
            if !*rx.borrow_and_update() && !self.in_contact() {
                return;
            }
            if rx.changed().await.is_err() {
                // No judge any more (the server is stopping).
                return std::future::pending().await;
            }
        }
    }

    fn confirmed_at(&self, at: Instant) {
        let mut confirmed = self.confirmed.lock().expect("contact lock");
        *confirmed = Some(confirmed.map_or(at, |before| before.max(at)));
    }

    /// Publishes a judgement: every one while out of contact (so that a
    /// stream begun between two of them is told again), a change only
    /// while in contact (so that open streams are not woken for nothing).
    fn publish(&self, in_contact: bool) {
        if in_contact {
            self.tx
                .send_if_modified(|now| !std::mem::replace(now, true));
        } else {
            self.tx.send_replace(false);
        }
    }
}

/// A read index ([`ServerNode::read_index`]), tried again within
/// [`ASK_LIMIT`] (openraft gives a quorum round only its heartbeat
/// interval, which a follower busy storing a large append can miss).
async fn read_index(node: &ServerNode) -> Option<u64> {
    let deadline = tokio::time::Instant::now() + ASK_LIMIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match node.read_index(left).await {
            Ok(index) => return Some(index),
            Err(_) if tokio::time::Instant::now() + RETRY_AFTER < deadline => {
                tokio::time::sleep(RETRY_AFTER).await;
            }
            Err(_) => return None,
        }
    }
}

/// How long after a failed read index the next is asked, within one check.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// Asks for a read index every [`CHECK_EVERY`], records confirmations in
/// `node.contact`, and publishes the judgement before each ask and after
/// (logging each change, and setting `weft_server_in_contact`): a stream
/// ends at most [`CHECK_EVERY`] after contact ran out. Runs until the
/// server stops.
pub async fn run(node: Arc<ServerNode>) {
    let contact = &node.contact;
    let mut pending = VecDeque::new();
    let mut was = false;
    let judge_now = |was: &mut bool| {
        let now = contact.in_contact();
        if now != *was {
            if now {
                tracing::info!("in contact with the cluster: watch streams are served");
            } else {
                tracing::warn!(
                    last_confirmed = ?contact.confirmed_ago(),
                    "out of contact with the cluster for {CONTACT_LIMIT:?}: watch streams end, \
                     new ones are refused, and as leader writes and heartbeats are refused"
                );
            }
            *was = now;
        }
        node.metrics.in_contact.set(i64::from(now));
        contact.publish(now);
    };
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        judge_now(&mut was);
        let asked = Instant::now();
        let answer = read_index(&node)
            .await
            .map(|index| Pending { index, asked });
        let applied = node
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |id| id.index);
        if let Some(at) = confirm(applied, &mut pending, answer) {
            contact.confirmed_at(at);
        }
        judge_now(&mut was);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(3);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A read index `index` asked `after` ms past `t0`.
    fn read(t0: Instant, index: u64, after: u64) -> Pending {
        Pending {
            index,
            asked: t0 + ms(after),
        }
    }

    #[test]
    fn in_contact_while_the_last_confirmation_is_recent() {
        assert!(judge(Some(ms(0)), LIMIT));
        assert!(judge(Some(ms(2_999)), LIMIT));
        assert!(!judge(Some(ms(3_000)), LIMIT));
        assert!(!judge(Some(Duration::from_secs(600)), LIMIT));
        // A server that was never confirmed (started cut off, or a cluster
        // forming) holds nothing current, however recently it started.
        assert!(!judge(None, LIMIT));
    }

    #[test]
    fn a_read_index_confirms_once_applied() {
        let t0 = Instant::now();
        let read = |index, after| read(t0, index, after);
        let mut pending = VecDeque::new();
        // Applied already: confirmed at the moment it was asked.
        assert_eq!(confirm(10, &mut pending, Some(read(10, 0))), Some(t0));
        assert!(pending.is_empty());
        // Not applied yet: pending, nothing confirmed; no answer (cut off):
        // nothing new.
        assert_eq!(confirm(9, &mut pending, Some(read(12, 0))), None);
        assert_eq!(confirm(9, &mut pending, None), None);
        assert_eq!(confirm(11, &mut pending, Some(read(14, 500))), None);
        // Applied later, each in turn: the newest applied one confirms.
        assert_eq!(confirm(12, &mut pending, None), Some(t0));
        assert_eq!(
            confirm(20, &mut pending, Some(read(16, 1_000))),
            Some(t0 + ms(1_000))
        );
        assert!(pending.is_empty());
    }

    #[test]
    fn a_server_behind_confirms_at_the_pace_it_applies() {
        // Every answer is 30 entries ahead; the server applies 20 per check
        // and is 1.5 s behind: it is confirmed 1.5 s late, every check.
        let t0 = Instant::now();
        let mut pending = VecDeque::new();
        let mut last = None;
        for k in 0..20u64 {
            let asked = t0 + ms(500 * k);
            let applied = 20 * k;
            let answer = Pending {
                index: 20 * k + 60,
                asked,
            };
            if let Some(at) = confirm(applied, &mut pending, Some(answer)) {
                last = Some((asked, at));
            }
        }
        let (now, confirmed) = last.expect("confirmed along the way");
        assert_eq!(now - confirmed, ms(1_500));
        assert!(judge(Some(now - confirmed), LIMIT));
    }

    #[test]
    fn a_new_leaders_lower_index_drops_the_higher_pending_ones() {
        let t0 = Instant::now();
        let read = |index, after| read(t0, index, after);
        let mut pending = VecDeque::from([read(100, 0), read(105, 500)]);
        assert_eq!(confirm(90, &mut pending, Some(read(95, 1_000))), None);
        assert_eq!(pending, [read(95, 1_000)]);
        assert_eq!(confirm(95, &mut pending, None), Some(t0 + ms(1_000)));
    }

    #[test]
    fn pending_read_indexes_are_bounded() {
        let t0 = Instant::now();
        let mut pending = VecDeque::new();
        for k in 0..20 {
            let answer = Pending {
                index: 100 + k,
                asked: t0 + ms(k),
            };
            assert_eq!(confirm(0, &mut pending, Some(answer)), None);
        }
        assert_eq!(pending.len(), MAX_PENDING);
        // The oldest are kept: they confirm first.
        assert_eq!(pending.front().map(|p| p.index), Some(100));
    }

    #[test]
    fn a_confirmation_never_goes_back() {
        let contact = Contact::default();
        assert!(!contact.in_contact());
        let now = Instant::now();
        contact.confirmed_at(now);
        contact.confirmed_at(now - Duration::from_secs(10));
        assert!(contact.in_contact());
    }

    #[tokio::test]
    async fn lost_completes_once_judged_out_and_still_out() {
        let contact = Contact::default();
        contact.confirmed_at(Instant::now());
        contact.publish(true);
        let lost = contact.lost();
        tokio::pin!(lost);
        assert!(futures::poll!(&mut lost).is_pending());
        // An older judgement while the confirmation is recent ends nothing.
        contact.publish(false);
        assert!(futures::poll!(&mut lost).is_pending());
        // Out: the confirmation is gone.
        *contact.confirmed.lock().unwrap() = None;
        contact.publish(false);
        tokio::time::timeout(Duration::from_secs(1), lost)
            .await
            .expect("lost() completes once out of contact");
    }
}
