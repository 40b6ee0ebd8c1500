//! Places for connections from other hosts, taken at accept and given back
//! when the connection ends: at most so many at once in all, and so many
//! from one source. A connection that finds no place is closed before any
//! work is done for it, so that one host cannot hold every descriptor of
//! the agent, nor a few hosts every place.
//!
//! A place taken with [`Places::admit_unproven`] is for a connection that
//! has not yet proven who it is (a TLS handshake in progress): when its
//! source holds every place it may and opens another, the oldest of its
//! unproven connections gives up its place ([`Place::displaced`]) to the
//! newer one instead of the newer one being refused. A process sharing a
//! node's address (any local user on that node) that opens connections it
//! never completes thus cannot keep that node's agent from the places the
//! view gives the node: the agent's connection, at the back of the queue,
//! would have to be displaced within its handshake, a millisecond or two,
//! by as many connections as the source's share. Once proven
//! ([`Place::prove`]), a place is the connection's until it ends.
//!
//! Sources are counted by address, IPv6 ones too: a whole subnet often
//! shares one /64 (a cloud subnet is one), and counted by /64 every node
//! in it would share one source's places. A host with many IPv6 addresses
//! of its own is bounded by the total instead. A v4-mapped IPv6 address is
//! counted as the IPv4 one.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Why a connection found no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("every place is taken")]
    Busy,
    #[error("its source holds every place it may")]
    SourceLimit,
}

impl Refused {
    /// A short label for refusal counters.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Busy => "busy",
            Refused::SourceLimit => "client_limit",
        }
    }
}

/// One source's places: how many it holds, and its unproven ones, oldest
/// first, each with the signal that displaces it.
#[derive(Debug, Default)]
struct Source {
    held: usize,
    unproven: VecDeque<(u64, Arc<Notify>)>,
}

type BySource = Arc<Mutex<HashMap<IpAddr, Source>>>;

/// The places of one listener (or one stage of it, such as handshakes).
#[derive(Debug, Clone)]
pub struct Places {
    all: Arc<Semaphore>,
    by_source: BySource,
    next_id: Arc<AtomicU64>,
}

/// A connection's place, given back when dropped.
#[derive(Debug)]
pub struct Place {
    _all: OwnedSemaphorePermit,
    by_source: BySource,
    source: IpAddr,
    id: u64,
    /// Signalled when a newer connection of the source took this place;
    /// None for a place taken with [`Places::admit`], which never gives way.
    displaced: Option<Arc<Notify>>,
}

impl Places {
    /// Places for `total` connections at once.
    pub fn new(total: usize) -> Self {
        Places {
            all: Arc::new(Semaphore::new(total)),
            by_source: Arc::default(),
            next_id: Arc::default(),
        }
    }

    /// A place for a connection from `peer`, unless every place is taken
    /// or its source holds `per_source` already.
    pub fn admit(&self, peer: IpAddr, per_source: usize) -> Result<Place, Refused> {
        self.take(peer, per_source, false)
    }

    /// [`admit`](Self::admit) for a connection yet to prove who it is:
    /// where its source holds `per_source` places and one of them is
    /// unproven, the oldest such gives its place up (its
    /// [`Place::displaced`] resolves) and this connection gets one. Refused
    /// when every place is taken, or the source's are all proven.
    pub fn admit_unproven(&self, peer: IpAddr, per_source: usize) -> Result<Place, Refused> {
        self.take(peer, per_source, true)
    }

    fn take(&self, peer: IpAddr, per_source: usize, unproven: bool) -> Result<Place, Refused> {
        let source = source_of(peer);
        let all = self
            .all
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Busy)?;
        let mut by_source = self.by_source.lock().expect("places lock");
        let entry = by_source.entry(source).or_default();
        if entry.held >= per_source {
            // The displaced connection gives its place back when its task
            // sees the signal, so the source holds one more for that long.
            let oldest = unproven.then(|| entry.unproven.pop_front()).flatten();
            match oldest {
                Some((_, displaced)) => displaced.notify_one(),
                None => {
                    if entry.held == 0 {
                        by_source.remove(&source);
                    }
                    return Err(Refused::SourceLimit);
                }
            }
        }
        entry.held += 1;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let displaced = unproven.then(|| {
            let signal = Arc::new(Notify::new());
            entry.unproven.push_back((id, signal.clone()));
            signal
        });
        Ok(Place {
            _all: all,
            by_source: self.by_source.clone(),
            source,
            id,
            displaced,
        })
    }

    /// Places taken now.
    #[cfg(test)]
    fn taken(&self, peer: IpAddr) -> usize {
        let by_source = self.by_source.lock().expect("places lock");
        by_source.get(&source_of(peer)).map_or(0, |s| s.held)
    }
}

impl Place {
    /// The connection proved who it is (its TLS handshake is done): its
    /// place is no longer given up to a newer connection of its source.
    /// False when a newer one took it meanwhile (its handshake ended as it
    /// was displaced): the connection must end all the same, or the source
    /// would hold one more than its share. Call once.
    pub fn prove(&self) -> bool {
        if self.displaced.is_none() {
            return true;
        }
        let mut by_source = self.by_source.lock().expect("places lock");
        let Some(source) = by_source.get_mut(&self.source) else {
            return false;
        };
        let before = source.unproven.len();
        source.unproven.retain(|(id, _)| *id != self.id);
        source.unproven.len() < before
    }

    /// Resolves when a newer connection of the same source took this
    /// unproven place: the connection must end. Never for a proven place,
    /// or one taken with [`Places::admit`].
    pub async fn displaced(&self) {
        match &self.displaced {
            Some(signal) => signal.notified().await,
            None => std::future::pending().await,
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut by_source = self.by_source.lock().expect("places lock");
        if let Some(source) = by_source.get_mut(&self.source) {
            source.held -= 1;
            if self.displaced.is_some() {
                source.unproven.retain(|(id, _)| *id != self.id);
            }
            if source.held == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

/// What a peer's places are counted under: its address (a v4-mapped one
/// as IPv4).
fn source_of(peer: IpAddr) -> IpAddr {
    peer.to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_holds_at_most_its_share_and_gets_it_back() {
        let places = Places::new(10);
        let a = ip("10.0.0.1");
        let held: Vec<Place> = (0..3).map(|_| places.admit(a, 3).unwrap()).collect();
        assert_eq!(places.admit(a, 3).unwrap_err(), Refused::SourceLimit);
        // Another source still gets in.
        let b = places.admit(ip("10.0.0.2"), 3).unwrap();
        drop(held);
        assert_eq!(places.taken(a), 0);
        assert!(places.admit(a, 3).is_ok());
        drop(b);
    }

    #[test]
    fn every_source_together_holds_at_most_the_total() {
        let places = Places::new(4);
        let held: Vec<Place> = (1..=4)
            .map(|i| places.admit(ip(&format!("10.0.0.{i}")), 3).unwrap())
            .collect();
        assert_eq!(places.admit(ip("10.0.0.9"), 3).unwrap_err(), Refused::Busy);
        // A refused source is not left counted.
        assert_eq!(places.taken(ip("10.0.0.9")), 0);
        drop(held);
        assert!(places.admit(ip("10.0.0.9"), 3).is_ok());
    }

    #[test]
    fn a_refusal_for_the_source_keeps_no_place_in_the_total() {
        let places = Places::new(2);
        let a = ip("10.0.0.1");
        let _one = places.admit(a, 1).unwrap();
        for _ in 0..5 {
            assert_eq!(places.admit(a, 1).unwrap_err(), Refused::SourceLimit);
        }
        assert!(places.admit(ip("10.0.0.2"), 1).is_ok());
    }

    /// Whether `place` was displaced (without waiting).
    fn was_displaced(place: &Place) -> bool {
        use std::future::Future;
        let fut = std::pin::pin!(place.displaced());
        let waker = std::task::Waker::noop();
        fut.poll(&mut std::task::Context::from_waker(waker))
            .is_ready()
    }

    #[test]
    fn the_oldest_unproven_place_of_a_source_gives_way_to_a_newer_one() {
        let places = Places::new(10);
        let a = ip("10.0.0.1");
        let first = places.admit_unproven(a, 2).unwrap();
        let second = places.admit_unproven(a, 2).unwrap();
        let third = places.admit_unproven(a, 2).unwrap();
        assert!(was_displaced(&first), "the oldest gives way");
        assert!(!was_displaced(&second) && !was_displaced(&third));
        drop(first);
        assert_eq!(places.taken(a), 2);
        // Proven places do not give way: with both proven the source is
        // refused as before.
        assert!(second.prove() && third.prove());
        assert_eq!(
            places.admit_unproven(a, 2).unwrap_err(),
            Refused::SourceLimit
        );
        // One unproven among proven ones is the one that gives way.
        drop(second);
        let fourth = places.admit_unproven(a, 2).unwrap();
        let fifth = places.admit_unproven(a, 2).unwrap();
        assert!(was_displaced(&fourth) && !was_displaced(&third) && !was_displaced(&fifth));
        // Another source's places are never taken.
        let b = places.admit_unproven(ip("10.0.0.2"), 2).unwrap();
        drop(fourth);
        let _sixth = places.admit_unproven(a, 2).unwrap();
        assert!(!was_displaced(&b));
        // A place displaced as its handshake ended cannot be proven.
        let d = ip("10.0.0.4");
        let racing = places.admit_unproven(d, 1).unwrap();
        let _newer = places.admit_unproven(d, 1).unwrap();
        assert!(!racing.prove(), "displaced, then proven");
        // Places taken with `admit` never give way.
        let c = ip("10.0.0.3");
        let held = places.admit(c, 1).unwrap();
        assert_eq!(
            places.admit_unproven(c, 1).unwrap_err(),
            Refused::SourceLimit
        );
        assert!(!was_displaced(&held));
    }

    #[test]
    fn a_full_listener_displaces_nothing() {
        let places = Places::new(2);
        let a = ip("10.0.0.1");
        let first = places.admit_unproven(a, 2).unwrap();
        let _other = places.admit_unproven(ip("10.0.0.2"), 2).unwrap();
        assert_eq!(places.admit_unproven(a, 2).unwrap_err(), Refused::Busy);
        assert!(!was_displaced(&first));
    }

    #[test]
    fn ipv6_sources_are_counted_by_address_and_a_mapped_v4_as_v4() {
        let places = Places::new(10);
        // Two nodes of one /64 (a cloud subnet) are two sources.
        let _one = places.admit(ip("2001:db8:1:2::1"), 1).unwrap();
        let _two = places.admit(ip("2001:db8:1:2::2"), 1).unwrap();
        assert_eq!(
            places.admit(ip("2001:db8:1:2::1"), 1).unwrap_err(),
            Refused::SourceLimit
        );
        let _v4 = places.admit(ip("10.0.0.1"), 1).unwrap();
        assert_eq!(
            places.admit(ip("::ffff:10.0.0.1"), 1).unwrap_err(),
            Refused::SourceLimit
        );
    }
}
