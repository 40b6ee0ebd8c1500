//! Whether the thread that serves connections still runs. The admin
//! endpoint runs on the background thread, so its answering says nothing
//! of the serving thread: a task on the serving runtime beats every
//! [`BEAT`], and `/healthz` answers 503 once the last beat is older than
//! [`STALE`] (a hung or starved serving thread, an accept loop that never
//! yields; with `worker_threads` above one, when none of them runs). The node's heartbeats to the servers are sent from the serving
//! thread too, so that the servers mark the node critical when it hangs.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// How often the serving thread beats.
pub const BEAT: Duration = Duration::from_millis(500);
/// How old the last beat may be before the serving thread counts as hung.
pub const STALE: Duration = Duration::from_secs(5);

/// The serving thread's last beat, readable from any thread.
pub struct Pulse {
    start: Instant,
    /// Milliseconds from `start` to the last beat.
    last: AtomicU64,
}

impl Default for Pulse {
    fn default() -> Self {
        Pulse {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }
}

impl Pulse {
    /// Records a beat now.
    pub fn beat(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// How long ago the last beat was (since creation if none yet).
    pub fn age(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// Whether the serving thread has not beaten for longer than [`STALE`].
    pub fn is_stale(&self) -> bool {
        self.age() > STALE
    }
}

/// Beats `pulse` every [`BEAT`] for as long as its runtime runs it.
pub async fn beat_forever(pulse: std::sync::Arc<Pulse>) {
    let mut tick = tokio::time::interval(BEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        pulse.beat();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_pulse_goes_stale_when_its_thread_stops_beating() {
        let pulse = std::sync::Arc::new(Pulse::default());
        let beating = tokio::spawn(beat_forever(pulse.clone()));
        tokio::time::sleep(STALE * 3).await;
        assert!(!pulse.is_stale(), "beating: {:?}", pulse.age());
        assert!(pulse.age() <= BEAT, "{:?}", pulse.age());

        // The last beat was at most BEAT before the stop.
        beating.abort();
        tokio::time::sleep(STALE - BEAT).await;
        assert!(!pulse.is_stale(), "within the limit: {:?}", pulse.age());
        tokio::time::sleep(BEAT * 2).await;
        assert!(pulse.is_stale(), "{:?}", pulse.age());
    }
}
