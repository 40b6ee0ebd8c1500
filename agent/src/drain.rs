//! Draining: counting the connections the agent serves, telling them that
//! the agent is going away, and waiting for them to end.
//!
//! Every served connection (a workload's, an explicit upstream's, an
//! inbound HBONE connection) holds a [`Tracked`] for as long as it lives.
//! When the agent stops (SIGTERM) or hands over to a successor (upgrade) it
//! calls [`Drain::start`]: HBONE connections then send GOAWAY, so that their
//! peers open new tunnels elsewhere while the open ones run to their end,
//! and [`Drain::wait_idle`] waits for the count to reach zero, up to a limit.
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::task::{task_tracker::TaskTrackerToken, TaskTracker};

/// The connections being served (tokio-util's task tracker counts them),
/// and whether the agent is draining.
#[derive(Debug)]
pub struct Drain {
    connections: TaskTracker,
    draining: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            connections: TaskTracker::new(),
            draining: watch::channel(false).0,
        }
    }
}

/// One served connection, counted until dropped.
#[derive(Debug)]
pub struct Tracked {
    _token: TaskTrackerToken,
}

impl Drain {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts one more connection for as long as the result lives.
    pub fn track(self: &Arc<Self>) -> Tracked {
        Tracked {
            _token: self.connections.token(),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.connections.len()
    }

    /// Tells every connection that watches [`Drain::signal`] to wind down.
    pub fn start(&self) {
        self.draining.send_replace(true);
    }

    /// Becomes `true` when draining starts.
    pub fn signal(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// Waits until no connection is open, or `limit`; the connections still
    /// open then. Connections tracked meanwhile are waited for too.
    pub async fn wait_idle(&self, limit: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        // A closed tracker's `wait` ends when its count reaches zero; a
        // connection tracked between that and this task running is waited
        // for in the next turn.
        self.connections.close();
        while self.open() > 0 {
            if tokio::time::timeout_at(deadline, self.connections.wait())
                .await
                .is_err()
            {
                break;
            }
        }
        self.open()
    }
}

/// Resolves once `signal` says draining started (never if its sender is gone
/// without that).
pub async fn started(mut signal: watch::Receiver<bool>) {
    if signal.wait_for(|d| *d).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_the_last_connection_or_the_limit() {
        let drain = Drain::new();
        assert_eq!(drain.wait_idle(Duration::from_millis(10)).await, 0);
        let a = drain.track();
        let b = drain.track();
        assert_eq!(drain.open(), 2);
        assert_eq!(drain.wait_idle(Duration::from_millis(20)).await, 2);
        let waiter = {
            let drain = drain.clone();
            tokio::spawn(async move { drain.wait_idle(Duration::from_secs(30)).await })
        };
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(b);
        assert_eq!(waiter.await.unwrap(), 0);
    }

    #[tokio::test]
    async fn the_signal_reaches_watchers_started_before_and_after() {
        let drain = Drain::new();
        let early = tokio::spawn(started(drain.signal()));
        drain.start();
        early.await.unwrap();
        started(drain.signal()).await;
    }
}
