//! What every accept loop of the agent does when `accept` fails (usually
//! EMFILE or ENFILE: out of file descriptors): wait a little instead of
//! spinning on the error, and warn at most once a second per listener, so
//! that a descriptor shortage neither burns a core nor floods the log.
use std::time::{Duration, Instant};

/// How long a loop waits after a failed accept.
const BACKOFF: Duration = Duration::from_millis(100);

/// One listener's accept failures.
pub struct AcceptErrors {
    what: &'static str,
    last_warning: Option<Instant>,
    suppressed: u64,
}

impl AcceptErrors {
    /// `what` names the listener in the warning.
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            last_warning: None,
            suppressed: 0,
        }
    }

    /// Accepts the next connection on `listener`, backing off and warning
    /// through [`Self::failed`] on every failure until one succeeds.
    pub async fn accept(
        &mut self,
        listener: &tokio::net::TcpListener,
    ) -> (tokio::net::TcpStream, std::net::SocketAddr) {
        loop {
            match listener.accept().await {
                Ok(accepted) => return accepted,
                Err(e) => self.failed(&e).await,
            }
        }
    }

    /// Notes a failed accept: warns if none was logged in the last second
    /// (with the count of those not logged), then waits before the loop
    /// accepts again.
    pub async fn failed(&mut self, error: &std::io::Error) {
        if self.should_warn(Instant::now()) {
            tracing::warn!(
                listener = self.what,
                suppressed = self.suppressed,
                "accept failed: {error}; backing off"
            );
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        tokio::time::sleep(BACKOFF).await;
    }

    fn should_warn(&mut self, now: Instant) -> bool {
        if self
            .last_warning
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return false;
        }
        self.last_warning = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_one_warning_a_second() {
        let mut errors = AcceptErrors::new("test");
        let start = Instant::now();
        assert!(errors.should_warn(start));
        assert!(!errors.should_warn(start + Duration::from_millis(500)));
        assert!(!errors.should_warn(start + Duration::from_millis(999)));
        assert!(errors.should_warn(start + Duration::from_millis(1000)));
    }

    #[tokio::test]
    async fn a_failure_waits_before_the_next_accept() {
        let mut errors = AcceptErrors::new("test");
        let before = tokio::time::Instant::now();
        errors
            .failed(&std::io::Error::from_raw_os_error(libc::EMFILE))
            .await;
        assert!(tokio::time::Instant::now() - before >= BACKOFF);
        assert_eq!(errors.suppressed, 0);
        errors
            .failed(&std::io::Error::from_raw_os_error(libc::EMFILE))
            .await;
        assert_eq!(
            errors.suppressed, 1,
            "the second warning within a second is not logged"
        );
    }
}
