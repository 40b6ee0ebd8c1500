//! Logging set-up: `tracing` for the agent's own events (see
//! `weft_api::logging`), with the `log` crate (which aya-log writes the eBPF
//! programs' messages to) bridged into it.

/// Installs the global subscriber writing to stderr in `format`, filtered
/// by `RUST_LOG` (default `info`), and routes `log` records into it.
pub fn init(format: weft_api::logging::LogFormat) {
    let _ = tracing_log::LogTracer::init();
    weft_api::logging::init(format, "info");
}
