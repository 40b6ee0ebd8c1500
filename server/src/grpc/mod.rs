//! The public gRPC API (`weft.v1`) of a server: catalog, intentions, config
//! entries, KV, operator commands and watch streams. Each service checks its
//! input, turns writes into Raft commands (`ServerNode::write`) and serves
//! reads from the replicated state after the read barrier.

pub mod acl;
pub mod auth;
pub mod ca;
pub mod catalog;
pub mod config;
mod config_intentions;
pub mod intentions;
pub mod known_token;
pub mod kv;
pub mod operator;
pub mod rpc_metrics;
pub mod session;
pub mod telemetry;
pub mod watch;

use std::sync::Arc;

use tonic::Status;
use weft_api::proto;

use crate::node::ServerNode;
use crate::state::{Command, State, STANDING_CHANGED};
use crate::write_error::WriteError;

use auth::Caller;

/// Refuses bad input with the message naming what is wrong.
pub(crate) fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

/// Waits for the read barrier (unless stale) and runs `f` on the state.
pub(crate) async fn read<T>(
    node: &ServerNode,
    options: Option<proto::ReadOptions>,
    f: impl FnOnce(&State) -> T,
) -> Result<T, Status> {
    let stale = options.is_some_and(|o| o.stale);
    node.read_barrier(stale).await.map_err(Status::from)?;
    let state = node.shared.state.read().expect("state lock");
    Ok(f(&state))
}

/// Runs `f`, work proportional to a request's size (parsing and judging a
/// config entry of up to 2 MiB: tens of milliseconds, a second in a debug
/// build), on tokio's blocking pool: on a worker thread it held up the
/// tasks queued behind it there, Raft's heartbeats among them, and the
/// followers of a leader reading a large entry stood for election. One
/// such job runs at a time ([`JUDGING`]), so that many large requests at
/// once cannot take every core from the workers either.
pub(crate) async fn off_workers<T, F>(f: F) -> Result<T, Status>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let _turn = tokio::time::timeout(JUDGING_WAIT, JUDGING.acquire())
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(|| {
            Status::resource_exhausted(
                "the server is busy judging other large requests: retry shortly",
            )
        })?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("judging the request: {e}")))
}

/// Jobs of [`off_workers`] at once, all callers together; more wait their
/// turn, up to [`JUDGING_WAIT`].
static JUDGING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
const JUDGING_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Applies a write for `caller`, logging the accessor that made it.
pub(crate) async fn write(
    node: &ServerNode,
    caller: &Caller,
    what: &str,
    cmd: Command,
) -> Result<proto::WriteResult, Status> {
    if cmd.is_policy() && node.primary_datacenter != node.datacenter {
        return Err(Status::failed_precondition(format!(
            "intentions and config entries are written in the primary datacenter, {}, and replicated to {}",
            node.primary_datacenter, node.datacenter
        )));
    }
    // Applied once, however often it is retried: by the client with its
    // request id, or by this server (forwarding, elections) with one made
    // here.
    let cmd = Command::Once {
        client: caller.accessor.clone(),
        request: caller
            .request
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        cmd: Box::new(cmd),
        standing: Some(caller.standing.clone()),
    };
    let index = node.write(cmd).await.map_err(|e| {
        tracing::info!(accessor = %caller.accessor, what, "write refused: {e}");
        match e {
            // A conflict to retry, not a condition of the state.
            WriteError::Refused(why) if why == STANDING_CHANGED => Status::aborted(why),
            e => Status::from(e),
        }
    })?;
    tracing::info!(accessor = %caller.accessor, what, index, "write");
    Ok(proto::WriteResult { index })
}

/// A service whose requests without any credential are refused from their
/// headers ([`auth::Credentialed`]).
pub type Credentialed<S> = tonic::service::interceptor::InterceptedService<S, auth::Credentialed>;

/// Every API service of one server, ready to be added to a tonic router.
/// All but ACL (whose bootstrap takes no token) refuse a request without a
/// credential before reading its message.
pub struct ApiServices {
    pub catalog: Credentialed<proto::catalog_server::CatalogServer<catalog::CatalogApi>>,
    pub intentions:
        Credentialed<proto::intentions_server::IntentionsServer<intentions::IntentionsApi>>,
    pub config: Credentialed<proto::config_server::ConfigServer<config::ConfigApi>>,
    pub kv: Credentialed<proto::kv_server::KvServer<kv::KvApi>>,
    pub session: Credentialed<proto::session_server::SessionServer<session::SessionApi>>,
    /// Snapshots are large: unknown tokens are refused from the headers,
    /// before a message is read.
    pub operator: tonic::service::interceptor::InterceptedService<
        proto::operator_server::OperatorServer<operator::OperatorApi>,
        auth::KnownToken,
    >,
    pub watch: Credentialed<proto::watch_server::WatchServer<watch::WatchApi>>,
    pub ca: Credentialed<proto::ca_server::CaServer<ca::CaApi>>,
    pub acl: proto::acl_server::AclServer<acl::AclApi>,
    pub telemetry: Credentialed<proto::telemetry_server::TelemetryServer<telemetry::TelemetryApi>>,
}

pub fn services(node: Arc<ServerNode>) -> ApiServices {
    let checked = || auth::Credentialed(node.clone());
    ApiServices {
        catalog: Credentialed::new(
            proto::catalog_server::CatalogServer::new(catalog::CatalogApi(node.clone())),
            checked(),
        ),
        intentions: Credentialed::new(
            proto::intentions_server::IntentionsServer::new(intentions::IntentionsApi(
                node.clone(),
            )),
            checked(),
        ),
        config: Credentialed::new(
            proto::config_server::ConfigServer::new(config::ConfigApi(node.clone())),
            checked(),
        ),
        kv: Credentialed::new(
            proto::kv_server::KvServer::new(kv::KvApi(node.clone())),
            checked(),
        ),
        session: Credentialed::new(
            proto::session_server::SessionServer::new(session::SessionApi(node.clone())),
            checked(),
        ),
        operator: tonic::service::interceptor::InterceptedService::new(
            proto::operator_server::OperatorServer::new(operator::OperatorApi(node.clone()))
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            auth::KnownToken(node.clone()),
        ),
        watch: Credentialed::new(
            proto::watch_server::WatchServer::new(watch::WatchApi::new(node.clone())),
            checked(),
        ),
        ca: Credentialed::new(
            proto::ca_server::CaServer::new(ca::CaApi(node.clone())),
            checked(),
        ),
        acl: proto::acl_server::AclServer::new(acl::AclApi(node.clone())),
        telemetry: Credentialed::new(
            proto::telemetry_server::TelemetryServer::new(telemetry::TelemetryApi(node.clone())),
            checked(),
        ),
    }
}
