//! Connection slots that an idle client cannot hold against a new one: a
//! listener with a fixed number of slots keeps, for each open connection,
//! since when it waits for its client's next request; when every slot is
//! taken, the connection waiting longest is asked to close and the newcomer
//! takes its slot. Clients that open connections and leave them idle
//! (keep-alive, or on purpose) no longer lock the others out; only as many
//! clients as there are slots, all busy at once, can.
//!
//! Used by the agent's DNS server (TCP) and its local HTTP API.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// How long a new connection waits for an evicted one to give up its slot.
pub const EVICTION_WAIT: Duration = Duration::from_secs(1);
/// How long an evicted connection may take to close (an answer the client
/// does not read, a half-sent request) before it is dropped.
pub const EVICTED_GRACE: Duration = Duration::from_millis(500);

/// The open connections of one listener and since when each waits for its
/// client.
#[derive(Clone, Default)]
pub struct IdleConns(Arc<Mutex<IdleState>>);

#[derive(Default)]
struct IdleState {
    next: u64,
    /// id -> (waiting for its client since, if it is and was not asked to
    /// close yet; how to close it)
    conns: HashMap<u64, (Option<tokio::time::Instant>, Arc<Notify>)>,
    /// Connections asked to close: never chosen again.
    evicted: std::collections::HashSet<u64>,
}

/// One connection's place in [`IdleConns`]; leaves it when dropped.
pub struct IdleConn {
    id: u64,
    evict: Arc<Notify>,
    all: IdleConns,
}

impl IdleConns {
    /// A slot of `slots` for a new connection: a free one, else the one of
    /// the connection waiting longest for its client, once it has closed
    /// (at most [`EVICTION_WAIT`]); None when every connection is busy.
    pub async fn take_slot(&self, slots: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
        match slots.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) if self.evict_oldest() => {
                tokio::time::timeout(EVICTION_WAIT, slots.clone().acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            Err(_) => None,
        }
    }

    /// A place for a new connection, busy until it says it waits.
    pub fn register(&self) -> IdleConn {
        let mut state = self.0.lock().expect("idle conns lock");
        state.next += 1;
        let id = state.next;
        let evict = Arc::new(Notify::new());
        state.conns.insert(id, (None, evict.clone()));
        IdleConn {
            id,
            evict,
            all: self.clone(),
        }
    }

    /// Asks the connection waiting longest for its client to close; false
    /// if none is waiting (all are busy).
    fn evict_oldest(&self) -> bool {
        let mut state = self.0.lock().expect("idle conns lock");
        let oldest = (state.conns.iter())
            .filter_map(|(id, (since, _))| since.map(|s| (s, *id)))
            .min_by_key(|(since, _)| *since)
            .map(|(_, id)| id);
        let Some(id) = oldest else {
            return false;
        };
        state.evicted.insert(id);
        if let Some((since, evict)) = state.conns.get_mut(&id) {
            *since = None;
            evict.notify_one();
        }
        true
    }
}

impl IdleConn {
    /// Whether the connection now waits for its client (true) or serves
    /// it (false): only a waiting one is evicted.
    pub fn set_waiting(&self, waiting: bool) {
        let mut state = self.all.0.lock().expect("idle conns lock");
        if state.evicted.contains(&self.id) {
            return;
        }
        if let Some(entry) = state.conns.get_mut(&self.id) {
            entry.0 = waiting.then(tokio::time::Instant::now);
        }
    }

    /// Completes when the connection is asked to close for a newcomer.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }
}

impl Drop for IdleConn {
    fn drop(&mut self) {
        let mut state = self.all.0.lock().expect("idle conns lock");
        state.conns.remove(&self.id);
        state.evicted.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_connection_waiting_longest_makes_room_and_a_busy_one_does_not() {
        let idle = IdleConns::default();
        let slots = Arc::new(Semaphore::new(2));
        let first = (idle.take_slot(&slots).await.unwrap(), idle.register());
        let second = (idle.take_slot(&slots).await.unwrap(), idle.register());
        // Both busy: none is asked to close, and there is no room.
        assert!(!idle.evict_oldest());
        assert!(idle.take_slot(&slots).await.is_none());
        first.1.set_waiting(true);
        tokio::time::advance(Duration::from_millis(10)).await;
        second.1.set_waiting(true);
        // The first waited longest: asked to close; its slot goes to the
        // newcomer once it has.
        let (first_slot, first_conn) = first;
        let closing = tokio::spawn(async move {
            first_conn.evicted().await;
            drop((first_slot, first_conn));
        });
        let third = idle.take_slot(&slots).await;
        assert!(third.is_some());
        closing.await.unwrap();
        // The second is still there, waiting; a busy connection is never
        // evicted.
        second.1.set_waiting(false);
        let _third = (third, idle.register());
        assert!(idle.take_slot(&slots).await.is_none());
    }

    /// A connection asked to close that has not (an answer its client does
    /// not read) is not chosen again: every later newcomer would wait on it.
    #[tokio::test(start_paused = true)]
    async fn a_connection_asked_to_close_is_not_asked_again() {
        let idle = IdleConns::default();
        let (a, b) = (idle.register(), idle.register());
        a.set_waiting(true);
        tokio::time::advance(Duration::from_millis(10)).await;
        b.set_waiting(true);
        let asked = |conn: &IdleConn| futures::FutureExt::now_or_never(conn.evicted()).is_some();
        assert!(idle.evict_oldest());
        assert!(asked(&a) && !asked(&b), "the one waiting longest first");
        // It says it waits again, and waited longer: b is asked all the same.
        a.set_waiting(true);
        assert!(idle.evict_oldest());
        assert!(asked(&b));
        assert!(!idle.evict_oldest(), "both asked once, none left");
    }
}
