//! Places for connections from other hosts, taken at accept and given back
//! when the connection ends: at most so many at once in all, and so many
//! from one source. A connection that finds no place is closed before any
//! work is done for it, so that one host cannot hold every descriptor of
//! the agent, nor a few hosts every place.
//!
//! Sources are counted by address, IPv6 ones too: a whole subnet often
//! shares one /64 (a cloud subnet is one), and counted by /64 every node
//! in it would share one source's places. A host with many IPv6 addresses
//! of its own is bounded by the total instead. A v4-mapped IPv6 address is
//! counted as the IPv4 one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

type BySource = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// The places of one listener (or one stage of it, such as handshakes).
#[derive(Debug, Clone)]
pub struct Places {
    all: Arc<Semaphore>,
    by_source: BySource,
}

/// A connection's place, given back when dropped.
#[derive(Debug)]
pub struct Place {
    _all: OwnedSemaphorePermit,
    by_source: BySource,
    source: IpAddr,
}

impl Places {
    /// Places for `total` connections at once.
    pub fn new(total: usize) -> Self {
        Places {
            all: Arc::new(Semaphore::new(total)),
            by_source: Arc::default(),
        }
    }

    /// A place for a connection from `peer`, unless every place is taken
    /// or its source holds `per_source` already.
    pub fn admit(&self, peer: IpAddr, per_source: usize) -> Result<Place, Refused> {
        let source = source_of(peer);
        let all = self
            .all
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Busy)?;
        let mut by_source = self.by_source.lock().expect("places lock");
        let held = by_source.entry(source).or_insert(0);
        if *held >= per_source {
            if *held == 0 {
                by_source.remove(&source);
            }
            return Err(Refused::SourceLimit);
        }
        *held += 1;
        Ok(Place {
            _all: all,
            by_source: self.by_source.clone(),
            source,
        })
    }

    /// Places taken now.
    #[cfg(test)]
    fn taken(&self, peer: IpAddr) -> usize {
        let by_source = self.by_source.lock().expect("places lock");
        by_source.get(&source_of(peer)).copied().unwrap_or(0)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut by_source = self.by_source.lock().expect("places lock");
        if let Some(held) = by_source.get_mut(&self.source) {
            *held -= 1;
            if *held == 0 {
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
