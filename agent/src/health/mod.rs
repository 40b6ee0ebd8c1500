//! Health checks of the local service instances: HTTP, TCP, gRPC health protocol and
//! TTL checks as configured in `[[service.check]]`, combined per instance (the worst
//! check wins) and reported to the agent only when an instance's status changes, so
//! that the agent writes health to the servers only then.
//!
//! - [`status`]: pure decisions — probe outcome to status, TTL expiry, combining
//!   checks, change detection, output truncation.
//! - [`probe`]: the network probes (hyper 1 HTTP/1.1 client over plain TCP, TCP
//!   connect, tonic-health client).
//! - [`runner`]: [`CheckRunner`] runs one instance's checks on their intervals;
//!   [`HealthChecks`] keeps one runner per service id and routes TTL refreshes.

pub mod probe;
pub mod runner;
pub mod status;

pub use runner::{CheckRunner, HealthChecks, HealthUpdate};
pub use status::{CheckResult, MAX_OUTPUT_BYTES};
pub use weft_api::catalog::HealthStatus;

/// Health-check errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthError {
    /// `refresh_ttl` for a service id that has no checks registered.
    #[error("service {0:?}: no health checks registered under this id")]
    UnknownService(String),
    /// `refresh_ttl` for a service without a `ttl` check.
    #[error("service {0:?}: has no ttl check to refresh")]
    NoTtlCheck(String),
    /// The runner has stopped (the agent is shutting down).
    #[error("service {0:?}: health checks have stopped")]
    Stopped(String),
}
