//! Logging set-up: `tracing` for the agent's own events, with the `log` crate
//! (which aya-log writes the eBPF programs' messages to) bridged into it.
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber writing to stderr, filtered by `RUST_LOG`
/// (default `info`), and routes `log` records into it.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_log::LogTracer::init();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
