//! Forwards the eBPF programs' aya-log records into the agent's logs.
//!
//! aya-log writes records to a ring buffer; this task waits for the buffer to
//! become readable and hands each record to the `log` crate, which the agent
//! bridges into `tracing` (see `telemetry`).
use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;

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
