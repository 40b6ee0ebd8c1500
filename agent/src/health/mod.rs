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
//!   [`HealthChecks`] keeps one runner per service id and routes TTL updates
//!   (pass/warn/fail from the local API) to the check they name by id.

pub mod probe;
pub mod runner;
pub mod status;

pub use runner::{CheckInfo, CheckRunner, CheckState, HealthChecks, HealthUpdate};
pub use status::{CheckResult, MAX_OUTPUT_BYTES};
pub use weft_api::catalog::HealthStatus;

/// Health-check errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthError {
    /// A TTL update for a check id that no local service has.
    #[error("check {0:?}: no such check on this agent")]
    UnknownCheck(String),
    /// A TTL update for a check of another kind (Consul refuses it too).
    #[error("check {check:?} is a {kind} check: only ttl checks take updates")]
    NotTtl { check: String, kind: &'static str },
    /// The runner has stopped (the agent is shutting down).
    #[error("check {0:?}: health checks have stopped")]
    Stopped(String),
}
