//! Retrying while the servers are away: exponential backoff with jitter, so
//! that agents that lost the servers together do not come back in step, and
//! a failure streak, so that a retry loop logs once when the failures start
//! and once when they end rather than at every attempt.
use std::time::{Duration, Instant};

/// Waits that double from `base` up to `cap`; each wait is drawn uniformly
/// from the upper half of the current step ("equal jitter").
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            step: base,
        }
    }

    /// The next wait, in `[step / 2, step]`; the step doubles up to the cap.
    pub fn next_wait(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.cap);
        step.mul_f64(0.5 + 0.5 * rand::random::<f64>())
    }

    /// Back to the first step (after a success).
    pub fn reset(&mut self) {
        self.step = self.base;
    }
}

/// A run of consecutive failures of one retry loop.
#[derive(Debug, Default)]
pub struct Streak {
    /// When the run started and how many attempts failed in it.
    current: Option<(Instant, u32)>,
}

impl Streak {
    /// Counts a failure; true when it starts a streak (log that one).
    pub fn failed(&mut self) -> bool {
        match &mut self.current {
            Some((_, n)) => {
                *n += 1;
                false
            }
            None => {
                self.current = Some((Instant::now(), 1));
                true
            }
        }
    }

    /// Counts a success; when it ends a streak, how long the streak lasted
    /// and how many attempts failed in it (log that).
    pub fn succeeded(&mut self) -> Option<(Duration, u32)> {
        self.current
            .take()
            .map(|(since, failures)| (since.elapsed(), failures))
    }

    /// Failed attempts in the current streak (0: none).
    pub fn failures(&self) -> u32 {
        self.current.map_or(0, |(_, n)| n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_with_jitter_in_the_upper_half() {
        let (base, cap) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut b = Backoff::new(base, cap);
        let mut step = base;
        for _ in 0..20 {
            let wait = b.next_wait();
            assert!(
                wait >= step / 2 && wait <= step,
                "{wait:?} for step {step:?}"
            );
            step = (step * 2).min(cap);
        }
        // Capped: never above 2 s, however long it fails.
        assert!(b.next_wait() <= cap);
        b.reset();
        assert!(b.next_wait() <= base);
    }

    #[test]
    fn a_streak_is_reported_once_when_it_starts_and_once_when_it_ends() {
        let mut s = Streak::default();
        assert_eq!(s.succeeded(), None);
        assert!(s.failed());
        assert!(!s.failed());
        assert!(!s.failed());
        assert_eq!(s.failures(), 3);
        let (_, failures) = s.succeeded().expect("a streak ended");
        assert_eq!(failures, 3);
        assert_eq!(s.succeeded(), None);
        assert!(s.failed());
    }
}
