//! Forwards the eBPF programs' aya-log records into the agent's logs.
//!
//! aya-log writes records to a ring buffer; this task waits for the buffer to
//! become readable and hands each record to the `log` crate, which the agent
//! bridges into `tracing` (see `telemetry`).
use aya::Ebpf;
use aya_log::{EbpfLogger, Level};
use tokio::io::unix::AsyncFd;

/// The target aya-log gives the programs' records: the eBPF crate's name.
const TARGET: &str = "weft_agent_ebpf";

/// The programs' `AYA_LOG_LEVEL`: the most detailed level of their records
/// that the agent's subscriber keeps (0: none). The programs skip a record
/// above it before writing anything, so at the default `info` a redirected
/// connection writes no record to the ring buffer (its two `debug` lines
/// used to wake this forwarder on every connection, to be thrown away by the
/// subscriber). Read once at load: the agent's filter is fixed at start.
pub(crate) fn kernel_level() -> u8 {
    most_detailed(|level| match level {
        Level::Trace => tracing::enabled!(target: TARGET, tracing::Level::TRACE),
        Level::Debug => tracing::enabled!(target: TARGET, tracing::Level::DEBUG),
        Level::Info => tracing::enabled!(target: TARGET, tracing::Level::INFO),
        Level::Warn => tracing::enabled!(target: TARGET, tracing::Level::WARN),
        Level::Error => tracing::enabled!(target: TARGET, tracing::Level::ERROR),
    })
}

/// The most detailed level `enabled` takes, as aya-log numbers it; 0 if none.
fn most_detailed(enabled: impl Fn(Level) -> bool) -> u8 {
    [
        Level::Trace,
        Level::Debug,
        Level::Info,
        Level::Warn,
        Level::Error,
    ]
    .into_iter()
    .find(|level| enabled(*level))
    .map_or(0, u8::from)
}

/// Starts forwarding if the object has log statements and a tokio runtime is
/// running. Returns the task so that the caller can stop it.
pub(crate) fn spawn_forwarder(ebpf: &mut Ebpf) -> Option<tokio::task::JoinHandle<()>> {
    let logger = match EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(e) => {
            tracing::warn!("eBPF log forwarding is off: {e}");
            return None;
        }
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!("eBPF log forwarding is off: no tokio runtime");
        return None;
    };
    // SAFETY: the logger owns its ring buffer's fd, which stays open and the
    // same for as long as the logger lives, and the AsyncFd owns the logger.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("eBPF log forwarding is off: {e}");
            return None;
        }
    };
    Some(runtime.spawn(async move {
        loop {
            let mut guard = match fd.readable_mut().await {
                Ok(guard) => guard,
                Err(e) => {
                    tracing::warn!("eBPF log forwarding stopped: {e}");
                    return;
                }
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::{fmt, EnvFilter};

    use super::*;

    fn level_under(filter: &str) -> u8 {
        let subscriber = fmt()
            .with_env_filter(EnvFilter::new(filter))
            .with_writer(std::io::sink)
            .finish();
        tracing::subscriber::with_default(subscriber, kernel_level)
    }

    #[test]
    fn the_programs_log_only_what_the_subscriber_keeps() {
        assert_eq!(level_under("info"), Level::Info as u8);
        assert_eq!(level_under("warn"), Level::Warn as u8);
        assert_eq!(
            level_under("info,weft_agent_ebpf=debug"),
            Level::Debug as u8
        );
        assert_eq!(level_under("info,weft_agent=trace"), Level::Trace as u8);
        assert_eq!(
            level_under("debug,weft_agent_ebpf=error"),
            Level::Error as u8
        );
        assert_eq!(level_under("off"), 0);
    }

    #[test]
    fn the_most_detailed_enabled_level_wins() {
        assert_eq!(most_detailed(|_| true), Level::Trace as u8);
        assert_eq!(most_detailed(|_| false), 0);
        assert_eq!(
            most_detailed(|l| matches!(l, Level::Error | Level::Warn)),
            Level::Warn as u8
        );
    }
}
