//! Whether a workload's token has a right ([`Right`]: `service:write` on the
//! check's service, `service:read` on a listed service, `node:read` on this
//! node): the agent cannot judge tokens (ACLs live on the servers), so it asks
//! them (`Acl.Authorize`, with the workload's token as the call's own), as
//! Consul's agent requires.
//!
//! Fail closed: only an explicit "allowed" lets a request through; no token,
//! an unknown token or a denial is 403, servers that cannot be asked are 503.
//! A positive answer is remembered for [`ALLOW_CACHE_TTL`], keyed by the
//! SHA-256 of the token (never the token itself), so a revoked token keeps
//! working on this agent for at most that long. Denials are not remembered:
//! a token granted the right a moment ago works at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::sync::Semaphore;
use weft_api::proto;

use crate::control::{Control, ControlError};

/// How long a positive answer is reused.
pub const ALLOW_CACHE_TTL: Duration = Duration::from_secs(30);
/// Most remembered answers; beyond, expired ones go, then all.
pub const ALLOW_CACHE_ENTRIES: usize = 4096;
/// Most `Authorize` calls in flight at once from this agent.
pub const MAX_CONCURRENT_AUTHORIZE: usize = 8;
/// Most rights asked in one `Authorize` call (the servers' limit).
pub const MAX_RIGHTS_PER_CALL: usize = 64;

/// Why the servers gave no "allowed".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JudgeError {
    /// The servers do not know the token (Consul: "ACL not found").
    #[error("ACL not found")]
    UnknownToken,
    /// No server could be asked: nothing changes, the caller may retry.
    #[error("cannot reach the servers to check the token: {0}")]
    Unreachable(String),
    /// The servers answered with an error.
    #[error("the servers could not check the token: {0}")]
    Failed(String),
}

/// One right a token may have: Consul's `resource:access` on a segment
/// (a service or node name), e.g. `service:write` on `web`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Right {
    /// `service` or `node`.
    pub resource: &'static str,
    pub segment: String,
    /// `read` or `write`.
    pub access: &'static str,
}

impl Right {
    pub fn service_write(service: &str) -> Right {
        Right {
            resource: "service",
            segment: service.to_string(),
            access: "write",
        }
    }
    pub fn service_read(service: &str) -> Right {
        Right {
            resource: "service",
            segment: service.to_string(),
            access: "read",
        }
    }
    /// `operator:read` (a global right: no segment).
    pub fn operator_read() -> Right {
        Right {
            resource: "operator",
            segment: String::new(),
            access: "read",
        }
    }
    pub fn node_read(node: &str) -> Right {
        Right {
            resource: "node",
            segment: node.to_string(),
            access: "read",
        }
    }
}

impl std::fmt::Display for Right {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{} on {:?}", self.resource, self.access, self.segment)
    }
}

/// Asks whether a token has rights. The agent's implementation asks the
/// servers ([`ServerJudge`]); unit tests put a fixed table here.
pub trait Judge: Send + Sync {
    /// One answer per right, in order: `true` when `token` has it. At most
    /// [`MAX_RIGHTS_PER_CALL`] rights are asked at once.
    fn authorize<'a>(
        &'a self,
        token: &'a str,
        rights: &'a [Right],
    ) -> BoxFuture<'a, Result<Vec<bool>, JudgeError>>;
}

/// [`Judge`] by the servers' `Acl.Authorize`, at most
/// [`MAX_CONCURRENT_AUTHORIZE`] calls at once.
pub struct ServerJudge {
    control: Arc<Control>,
    in_flight: Semaphore,
}

impl ServerJudge {
    pub fn new(control: Arc<Control>) -> ServerJudge {
        ServerJudge {
            control,
            in_flight: Semaphore::new(MAX_CONCURRENT_AUTHORIZE),
        }
    }
}

/// A failed `Authorize` call as a [`JudgeError`], or `Ok(false)` for a denial.
pub fn judge_error(e: ControlError) -> Result<bool, JudgeError> {
    use tonic::Code;
    match e {
        ControlError::Unreachable(m) | ControlError::Credentials(m) => {
            Err(JudgeError::Unreachable(m))
        }
        ControlError::Refused { status, .. } => match status.code() {
            Code::Unauthenticated => Err(JudgeError::UnknownToken),
            Code::PermissionDenied => Ok(false),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                Err(JudgeError::Unreachable(status.message().to_string()))
            }
            _ => Err(JudgeError::Failed(status.message().to_string())),
        },
    }
}

impl Judge for ServerJudge {
    fn authorize<'a>(
        &'a self,
        token: &'a str,
        rights: &'a [Right],
    ) -> BoxFuture<'a, Result<Vec<bool>, JudgeError>> {
        Box::pin(async move {
            if rights.is_empty() {
                return Ok(Vec::new());
            }
            let _permit = self
                .in_flight
                .acquire()
                .await
                .map_err(|_| JudgeError::Unreachable("shutting down".into()))?;
            let asks = rights
                .iter()
                .map(|r| proto::AuthorizeCheck {
                    resource: r.resource.into(),
                    segment: r.segment.clone(),
                    access: r.access.into(),
                })
                .collect();
            match self.control.authorize(token, asks).await {
                Ok(answers) => Ok(answers),
                // A denial of the whole call denies every right asked.
                Err(e) => judge_error(e).map(|allowed| vec![allowed; rights.len()]),
            }
        })
    }
}

/// The SHA-256 of a token: what the cache keys on.
pub fn token_hash(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Positive answers by (token hash, right), each until it expires.
#[derive(Debug, Default)]
pub struct AllowCache {
    until: HashMap<([u8; 32], Right), Instant>,
}

impl AllowCache {
    /// Whether `token` was found to have `right` within the TTL before `now`.
    pub fn allowed(&self, now: Instant, token: &str, right: &Right) -> bool {
        self.until
            .get(&(token_hash(token), right.clone()))
            .is_some_and(|until| now < *until)
    }

    /// Remembers that `token` has `right`, from `now`.
    pub fn remember(&mut self, now: Instant, token: &str, right: &Right) {
        if self.until.len() >= ALLOW_CACHE_ENTRIES {
            self.until.retain(|_, until| now < *until);
            if self.until.len() >= ALLOW_CACHE_ENTRIES {
                self.until.clear();
            }
        }
        self.until
            .insert((token_hash(token), right.clone()), now + ALLOW_CACHE_TTL);
    }

    pub fn len(&self) -> usize {
        self.until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_remembers_per_token_and_service_until_expiry() {
        let t0 = Instant::now();
        let mut c = AllowCache::default();
        let api = Right::service_write("api");
        assert!(!c.allowed(t0, "tok", &api));
        c.remember(t0, "tok", &api);
        assert!(c.allowed(t0, "tok", &api));
        assert!(c.allowed(t0 + ALLOW_CACHE_TTL - Duration::from_millis(1), "tok", &api));
        assert!(!c.allowed(t0 + ALLOW_CACHE_TTL, "tok", &api));
        assert!(!c.allowed(t0, "tok", &Right::service_write("web")));
        assert!(!c.allowed(t0, "tok", &Right::service_read("api")));
        assert!(!c.allowed(t0, "tok2", &api));
        assert_eq!(api.to_string(), "service:write on \"api\"");
        // Keys are hashes, never the token.
        let dump = format!("{c:?}");
        assert!(!dump.contains("tok"), "{dump}");
    }

    #[test]
    fn cache_is_bounded() {
        let t0 = Instant::now();
        let mut c = AllowCache::default();
        let api = Right::service_write("api");
        for i in 0..ALLOW_CACHE_ENTRIES {
            c.remember(t0, &format!("t{i}"), &api);
        }
        assert_eq!(c.len(), ALLOW_CACHE_ENTRIES);
        // Full of live entries: cleared, then the new one.
        c.remember(t0, "new", &api);
        assert_eq!(c.len(), 1);
        assert!(c.allowed(t0, "new", &api));
        // Expired entries go first.
        for i in 0..ALLOW_CACHE_ENTRIES - 1 {
            c.remember(t0, &format!("t{i}"), &api);
        }
        let later = t0 + ALLOW_CACHE_TTL + Duration::from_secs(1);
        c.remember(later, "newer", &api);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn hash_is_sha256() {
        assert_eq!(
            token_hash("abc")[..4],
            [0xba, 0x78, 0x16, 0xbf],
            "SHA-256(\"abc\") starts ba7816bf"
        );
    }

    #[test]
    fn server_errors_fail_closed() {
        let refused = |status| ControlError::Refused {
            what: "x".into(),
            status,
        };
        assert_eq!(
            judge_error(refused(tonic::Status::unauthenticated(
                "ACL token not found"
            ))),
            Err(JudgeError::UnknownToken)
        );
        assert_eq!(
            judge_error(refused(tonic::Status::permission_denied("no"))),
            Ok(false)
        );
        assert!(matches!(
            judge_error(refused(tonic::Status::unavailable("no leader"))),
            Err(JudgeError::Unreachable(_))
        ));
        assert!(matches!(
            judge_error(ControlError::Unreachable("10.0.0.1:8502: refused".into())),
            Err(JudgeError::Unreachable(_))
        ));
        assert!(matches!(
            judge_error(refused(tonic::Status::invalid_argument("bad"))),
            Err(JudgeError::Failed(_))
        ));
    }
}
