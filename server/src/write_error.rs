//! Why a write through Raft did not happen (or may not have): what the
//! node, its write batcher and a leader answering a forwarded write say,
//! and the gRPC status each becomes. A module of its own so that the Raft
//! helpers and the node use it without depending on each other.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize, PartialEq)]
pub enum WriteError {
    /// The state machine refused the command; nothing changed.
    #[error("{0}")]
    Refused(String),
    #[error("no leader: {0}")]
    NoLeader(String),
    /// Forwarded to the leader, but no answer came back: it may or may not
    /// have been applied. Retrying the same request (its request id) is
    /// safe: a write is applied once.
    #[error("outcome unknown: {0}")]
    Unknown(String),
    #[error("raft: {0}")]
    Raft(String),
}

/// The outcome of a write forwarded to the leader: its index, or why not.
pub type ForwardedResult = Result<u64, WriteError>;

impl From<WriteError> for tonic::Status {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Refused(m) => tonic::Status::failed_precondition(m),
            WriteError::NoLeader(m) => tonic::Status::unavailable(format!("no leader: {m}")),
            WriteError::Unknown(m) => tonic::Status::unavailable(format!(
                "outcome unknown ({m}); retrying with the same request id is safe"
            )),
            WriteError::Raft(m) => tonic::Status::internal(m),
        }
    }
}
