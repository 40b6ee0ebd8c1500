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
//! newer one instead of the newer one being refused; when every place of
//! the listener is taken, the oldest unproven connection of any source
//! does, if it has been at it for longer than a handshake takes
//! ([`CROSS_SOURCE_GRACE`]: many peers reconnecting at once to a nearly
//! full listener then wait for places rather than cut each other off). A process sharing a node's address (any local user on that node),
//! or a few hosts together, that open connections they never complete thus
//! cannot keep an agent from the places the view gives its node: the
//! agent's connection, at the back of the queue, would have to be
//! displaced within its handshake, a millisecond or two, by as many
//! connections as there are places. Once proven ([`Place::prove`]), a place
//! is the connection's until it ends.
//!
//! Sources are counted by address, IPv6 ones too: a whole subnet often
//! shares one /64 (a cloud subnet is one), and counted by /64 every node
//! in it would share one source's places. A host with many IPv6 addresses
//! of its own is bounded by the total instead. A v4-mapped IPv6 address is
//! counted as the IPv4 one. [`Places::admit_as`] counts by any other key
//! (an address and a peer's identity, say).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How long a connection must have been in its handshake before another
/// source's connection may take its place on a full listener.
pub const CROSS_SOURCE_GRACE: Duration = Duration::from_secs(1);

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

/// One source's places: how many it holds, and its unproven ones' ids,
/// oldest first.
#[derive(Debug, Default)]
struct Source {
    held: usize,
    unproven: VecDeque<u64>,
}

/// Every place taken, by source, and the unproven ones, oldest first (ids
/// grow), each with the signal that displaces it.
#[derive(Debug)]
struct Book<K> {
    held: usize,
    by_source: HashMap<K, Source>,
    unproven: BTreeMap<u64, (K, Instant, Arc<Notify>)>,
    next_id: u64,
}

impl<K: Hash + Eq + Clone> Book<K> {
    /// Signals unproven place `id` to give way, and stops counting it as
    /// unproven (it stays held until its connection drops it).
    fn displace(&mut self, id: u64) {
        if let Some((source, _, signal)) = self.unproven.remove(&id) {
            if let Some(s) = self.by_source.get_mut(&source) {
                s.unproven.retain(|u| *u != id);
            }
            signal.notify_one();
        }
    }
}

/// The places of one listener (or one stage of it, such as handshakes).
#[derive(Debug)]
pub struct Places<K = IpAddr> {
    total: usize,
    grace: Duration,
    book: Arc<Mutex<Book<K>>>,
}

impl<K> Clone for Places<K> {
    fn clone(&self) -> Self {
        Places {
            total: self.total,
            grace: self.grace,
            book: self.book.clone(),
        }
    }
}

/// A connection's place, given back when dropped.
#[derive(Debug)]
pub struct Place<K: Hash + Eq + Clone = IpAddr> {
    book: Arc<Mutex<Book<K>>>,
    source: K,
    id: u64,
    /// Signalled when a newer connection took this place; None for a place
    /// taken with [`Places::admit`], which never gives way.
    displaced: Option<Arc<Notify>>,
}

impl Places<IpAddr> {
    /// A place for a connection from `peer`, unless every place is taken
    /// or its source holds `per_source` already.
    pub fn admit(&self, peer: IpAddr, per_source: usize) -> Result<Place, Refused> {
        self.take(source_of(peer), per_source, false)
    }

    /// [`admit`](Self::admit) for a connection yet to prove who it is:
    /// where its source holds `per_source` places and one of them is
    /// unproven, the oldest such gives its place up (its
    /// [`Place::displaced`] resolves) and this connection gets one; where
    /// every place is taken, the oldest unproven one of any source does.
    /// Refused when the places that would have to give way are all proven.
    pub fn admit_unproven(&self, peer: IpAddr, per_source: usize) -> Result<Place, Refused> {
        self.take(source_of(peer), per_source, true)
    }
}

impl<K: Hash + Eq + Clone> Places<K> {
    /// Places for `total` connections at once.
    pub fn new(total: usize) -> Self {
        Places {
            total,
            grace: CROSS_SOURCE_GRACE,
            book: Arc::new(Mutex::new(Book {
                held: 0,
                by_source: HashMap::new(),
                unproven: BTreeMap::new(),
                next_id: 0,
            })),
        }
    }

    /// [`admit`](Places::admit) counted under `key` as it is.
    pub fn admit_as(&self, key: K, per_source: usize) -> Result<Place<K>, Refused> {
        self.take(key, per_source, false)
    }

    fn take(&self, key: K, per_source: usize, unproven: bool) -> Result<Place<K>, Refused> {
        let mut book = self.book.lock().expect("places lock");
        let source_held = book.by_source.get(&key).map_or(0, |s| s.held);
        // The displaced connection gives its place back when its task sees
        // the signal, so the count runs one over for that long.
        if source_held >= per_source {
            let oldest = (book.by_source.get(&key))
                .and_then(|s| s.unproven.front().copied())
                .filter(|_| unproven);
            match oldest {
                Some(id) => book.displace(id),
                None => return Err(Refused::SourceLimit),
            }
        } else if book.held >= self.total {
            let oldest = (book.unproven.iter().next())
                .filter(|(_, (_, since, _))| unproven && since.elapsed() >= self.grace)
                .map(|(id, _)| *id);
            match oldest {
                Some(id) => book.displace(id),
                None => return Err(Refused::Busy),
            }
        }
        book.held += 1;
        let id = book.next_id;
        book.next_id += 1;
        let displaced = unproven.then(|| {
            let signal = Arc::new(Notify::new());
            (book.unproven).insert(id, (key.clone(), Instant::now(), signal.clone()));
            signal
        });
        let source = book.by_source.entry(key.clone()).or_default();
        source.held += 1;
        if unproven {
            source.unproven.push_back(id);
        }
        Ok(Place {
            book: self.book.clone(),
            source: key,
            id,
            displaced,
        })
    }

    /// These places, where another source's connection takes the place of
    /// one that has been in its handshake for `grace` (tests).
    #[cfg(test)]
    fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Places taken now by `key`.
    #[cfg(test)]
    fn taken_as(&self, key: &K) -> usize {
        let book = self.book.lock().expect("places lock");
        book.by_source.get(key).map_or(0, |s| s.held)
    }
}

#[cfg(test)]
impl Places<IpAddr> {
    fn taken(&self, peer: IpAddr) -> usize {
        self.taken_as(&source_of(peer))
    }
}

impl<K: Hash + Eq + Clone> Place<K> {
    /// The connection proved who it is (its TLS handshake is done): its
    /// place is no longer given up to a newer connection. False when a
    /// newer one took it meanwhile (its handshake ended as it was
    /// displaced): the connection must end all the same, or its source
    /// would hold one more than its share. Call once.
    pub fn prove(&self) -> bool {
        if self.displaced.is_none() {
            return true;
        }
        let mut book = self.book.lock().expect("places lock");
        if book.unproven.remove(&self.id).is_none() {
            return false;
        }
        if let Some(source) = book.by_source.get_mut(&self.source) {
            source.unproven.retain(|id| *id != self.id);
        }
        true
    }

    /// Resolves when a newer connection took this unproven place: the
    /// connection must end. Never for a proven place, or one taken with
    /// [`Places::admit`].
    pub async fn displaced(&self) {
        match &self.displaced {
            Some(signal) => signal.notified().await,
            None => std::future::pending().await,
        }
    }
}

impl<K: Hash + Eq + Clone> Drop for Place<K> {
    fn drop(&mut self) {
        let mut book = self.book.lock().expect("places lock");
        book.held -= 1;
        if self.displaced.is_some() {
            book.unproven.remove(&self.id);
        }
        if let Some(source) = book.by_source.get_mut(&self.source) {
            source.held -= 1;
            if self.displaced.is_some() {
                source.unproven.retain(|id| *id != self.id);
            }
            if source.held == 0 {
                book.by_source.remove(&self.source);
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

    /// A few hosts holding every place of the listener with handshakes
    /// they never finish do not keep others out: the oldest unproven place
    /// of any source gives way. Proven places never do.
    #[test]
    fn a_full_listener_displaces_the_oldest_unproven_place_of_any_source() {
        let places = Places::new(2).with_grace(Duration::ZERO);
        let a = ip("10.0.0.1");
        let first = places.admit_unproven(a, 2).unwrap();
        let second = places.admit_unproven(ip("10.0.0.2"), 2).unwrap();
        let third = places.admit_unproven(ip("10.0.0.3"), 2).unwrap();
        assert!(was_displaced(&first), "the oldest of all gives way");
        assert!(!was_displaced(&second) && !was_displaced(&third));
        assert!(!first.prove(), "displaced, then proven");
        drop(first);
        assert_eq!(places.taken(a), 0);
        assert!(second.prove() && third.prove());
        assert_eq!(places.admit_unproven(a, 2).unwrap_err(), Refused::Busy);
        assert_eq!(places.admit(a, 2).unwrap_err(), Refused::Busy);
        drop(second);
        assert!(places.admit_unproven(a, 2).is_ok());
    }

    /// Peers reconnecting together to a nearly full listener: a handshake
    /// just begun is not cut off by another source's newer connection (it
    /// would be refused instead), only one at it for longer.
    #[test]
    fn another_sources_connection_takes_only_a_place_held_past_the_grace() {
        let places = Places::new(1).with_grace(Duration::from_millis(50));
        let first = places.admit_unproven(ip("10.0.0.1"), 2).unwrap();
        assert_eq!(
            places.admit_unproven(ip("10.0.0.2"), 2).unwrap_err(),
            Refused::Busy
        );
        assert!(!was_displaced(&first));
        std::thread::sleep(Duration::from_millis(60));
        let _second = places.admit_unproven(ip("10.0.0.2"), 2).unwrap();
        assert!(was_displaced(&first));
    }

    #[test]
    fn any_key_counts() {
        let places: Places<(IpAddr, &str)> = Places::new(10);
        let a = ip("10.0.0.1");
        let _web = places.admit_as((a, "web"), 1).unwrap();
        assert_eq!(
            places.admit_as((a, "web"), 1).unwrap_err(),
            Refused::SourceLimit
        );
        let api = places.admit_as((a, "api"), 1).unwrap();
        drop(api);
        assert_eq!(places.taken_as(&(a, "api")), 0);
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
