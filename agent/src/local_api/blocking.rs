//! Places for the blocking queries the local API forwards: at most
//! [`MAX_BLOCKING`] at once for the whole node, and at most
//! [`MAX_BLOCKING_PER_TOKEN`] for one token. A blocking query holds its
//! place for up to ten minutes; without the second bound one workload's
//! token (or any token a process on the node holds) could take every
//! place, and the other workloads' watches would get 429 until those
//! queries ended. Tokens are counted by their SHA-256, never kept.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Blocking queries forwarded at once, at most: half the local API's
/// connections.
pub const MAX_BLOCKING: usize = super::MAX_CONNECTIONS / 2;
/// Blocking queries of one token (or of requests without one) at once.
pub const MAX_BLOCKING_PER_TOKEN: usize = MAX_BLOCKING / 4;

/// Why a blocking query got no place (429).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Full {
    #[error("{MAX_BLOCKING} blocking queries are open through this agent already; retry later")]
    Node,
    #[error("{MAX_BLOCKING_PER_TOKEN} blocking queries of this token are open through this agent already; retry later")]
    Token,
}

type Counts = Arc<Mutex<HashMap<[u8; 32], usize>>>;

/// The node's places.
#[derive(Debug, Clone)]
pub struct BlockingPlaces {
    all: Arc<Semaphore>,
    by_token: Counts,
}

/// One blocking query's place, given back when dropped.
#[derive(Debug)]
pub struct BlockingPlace {
    _all: OwnedSemaphorePermit,
    by_token: Counts,
    token: [u8; 32],
}

impl Default for BlockingPlaces {
    fn default() -> Self {
        BlockingPlaces {
            all: Arc::new(Semaphore::new(MAX_BLOCKING)),
            by_token: Arc::default(),
        }
    }
}

impl BlockingPlaces {
    /// A place for a blocking query sent with `token` (None: without one).
    pub fn take(&self, token: Option<&str>) -> Result<BlockingPlace, Full> {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.unwrap_or("").as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        let mut counts = self.by_token.lock().expect("blocking places lock");
        if counts
            .get(&key)
            .is_some_and(|held| *held >= MAX_BLOCKING_PER_TOKEN)
        {
            return Err(Full::Token);
        }
        let all = self
            .all
            .clone()
            .try_acquire_owned()
            .map_err(|_| Full::Node)?;
        *counts.entry(key).or_insert(0) += 1;
        Ok(BlockingPlace {
            _all: all,
            by_token: self.by_token.clone(),
            token: key,
        })
    }
}

impl Drop for BlockingPlace {
    fn drop(&mut self) {
        let mut counts = self.by_token.lock().expect("blocking places lock");
        if let Some(held) = counts.get_mut(&self.token) {
            *held -= 1;
            if *held == 0 {
                counts.remove(&self.token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_token_holds_a_share_and_the_node_the_whole() {
        let places = BlockingPlaces::default();
        let mut a: Vec<BlockingPlace> = (0..MAX_BLOCKING_PER_TOKEN)
            .map(|_| places.take(Some("token-a")).unwrap())
            .collect();
        assert_eq!(places.take(Some("token-a")).unwrap_err(), Full::Token);
        // Another token, and requests without one, still get places.
        let b = places.take(Some("token-b")).unwrap();
        let none = places.take(None).unwrap();
        // One of a's ends: a gets that place again, and no more.
        drop(a.pop());
        a.push(places.take(Some("token-a")).unwrap());
        assert_eq!(places.take(Some("token-a")).unwrap_err(), Full::Token);
        // The node's bound holds whatever the tokens.
        let mut others: Vec<BlockingPlace> = Vec::new();
        for n in 0..MAX_BLOCKING {
            match places.take(Some(&format!("token-{n}"))) {
                Ok(p) => others.push(p),
                Err(e) => {
                    assert_eq!(e, Full::Node);
                    break;
                }
            }
        }
        assert_eq!(a.len() + 2 + others.len(), MAX_BLOCKING);
        // Every place given back leaves nothing counted.
        drop((a, b, none, others));
        assert!(places.by_token.lock().unwrap().is_empty());
        assert_eq!(places.all.available_permits(), MAX_BLOCKING);
    }
}
