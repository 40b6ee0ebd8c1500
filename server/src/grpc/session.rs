//! `weft.v1.Session`: Consul's sessions, which KV locks belong to.
//!
//! Creating or destroying a session needs `session:write` on its node;
//! reading needs `session:read` (lists show only the nodes the token may
//! read). Renewal is a write (it restarts a TTL session's clock through
//! Raft, so a new leader knows every deadline); the leader's reaper
//! ([`reap`]) invalidates TTL sessions past their deadline.
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use weft_api::acl::{Access, Resource, ResourceKind};
use weft_api::proto::{self, session_server};
use weft_api::session::{parse_create, Session};

use super::auth::{caller, Caller};
use super::ca::unix_now_ms;
use super::{invalid, read, write};
use crate::node::ServerNode;
use crate::state::{Command, State};

pub struct SessionApi(pub Arc<ServerNode>);

/// A stored session in the API's shape.
pub fn session_to_proto(s: &Session) -> proto::SessionEntry {
    proto::SessionEntry {
        id: s.id.clone(),
        name: s.name.clone(),
        node: s.node.clone(),
        lock_delay_ms: s.lock_delay_ms,
        behavior: s.behavior.as_str().into(),
        ttl_secs: s.ttl_secs.unwrap_or(0),
        node_checks: s.node_checks,
        create_index: s.create_index,
        modify_index: s.modify_index,
    }
}

/// A session id as the API takes it: a UUID (anything else cannot name a
/// session, and is not echoed back at length).
pub(crate) fn check_id(id: &str) -> Result<(), Status> {
    uuid::Uuid::parse_str(id)
        .map(|_| ())
        .map_err(|_| invalid(format!("session id {:?}: not a UUID", truncate(id))))
}

fn truncate(s: &str) -> &str {
    let end = (0..=s.len().min(64))
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    &s[..end]
}

fn node_of(node: &ServerNode, id: &str) -> Option<String> {
    let state = node.shared.state.read().expect("state lock");
    state.lock_sessions.get(id).map(|s| s.node.clone())
}

fn not_found(id: &str) -> Status {
    Status::not_found(format!("session {id:?} not found"))
}

impl SessionApi {
    /// The caller of a call on one session, and the session's id, once the
    /// caller may write that session's node (rights before input).
    async fn writer(&self, req: Request<proto::SessionRef>) -> Result<(Caller, String), Status> {
        let caller = caller(&self.0, &req).await?;
        caller.require_any_read(ResourceKind::Session)?;
        let id = req.into_inner().id;
        check_id(&id)?;
        let node = node_of(&self.0, &id).ok_or_else(|| not_found(&id))?;
        caller.require(Resource::Session(&node), Access::Write)?;
        Ok((caller, id))
    }
}

#[tonic::async_trait]
impl session_server::Session for SessionApi {
    async fn create(
        &self,
        req: Request<proto::SessionCreateRequest>,
    ) -> Result<Response<proto::SessionCreated>, Status> {
        let caller = caller(&self.0, &req).await?;
        // Rights before input: a caller with no session rule at all learns
        // nothing from validation.
        caller.require_any_read(ResourceKind::Session)?;
        let r = parse_create(&req.into_inner().body).map_err(invalid)?;
        let Some(node) = r.node else {
            return Err(invalid(
                "Node: required (an agent's local API fills in its own node)",
            ));
        };
        caller.require(Resource::Session(&node), Access::Write)?;
        let now_ms = unix_now_ms();
        let mut session = Session {
            id: uuid::Uuid::new_v4().to_string(),
            name: r.name,
            node,
            lock_delay_ms: r.lock_delay.as_millis() as u64,
            behavior: r.behavior,
            ttl_secs: r.ttl.map(|t| t.as_secs()),
            node_checks: r.node_checks,
            create_index: 0,
            modify_index: 0,
            expires_at_ms: None,
        };
        session.expires_at_ms = session.deadline(now_ms);
        let id = session.id.clone();
        let what = format!("session create on node {}", session.node);
        let done = write(&self.0, &caller, &what, Command::SessionCreate(session)).await?;
        Ok(Response::new(proto::SessionCreated {
            id,
            index: done.index,
        }))
    }

    async fn destroy(
        &self,
        req: Request<proto::SessionRef>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let (caller, id) = self.writer(req).await?;
        let cmd = Command::SessionDestroy {
            id: id.clone(),
            now_ms: unix_now_ms(),
        };
        let what = format!("session destroy {id}");
        Ok(Response::new(write(&self.0, &caller, &what, cmd).await?))
    }

    async fn renew(
        &self,
        req: Request<proto::SessionRef>,
    ) -> Result<Response<proto::SessionEntry>, Status> {
        let (caller, id) = self.writer(req).await?;
        let cmd = Command::SessionRenew {
            id: id.clone(),
            now_ms: unix_now_ms(),
        };
        let what = format!("session renew {id}");
        write(&self.0, &caller, &what, cmd).await?;
        let state = self.0.shared.state.read().expect("state lock");
        state
            .lock_sessions
            .get(&id)
            .map(|s| Response::new(session_to_proto(s)))
            .ok_or_else(|| not_found(&id))
    }

    async fn get(
        &self,
        req: Request<proto::SessionGetRequest>,
    ) -> Result<Response<proto::SessionEntry>, Status> {
        let caller = caller(&self.0, &req).await?;
        caller.require_any_read(ResourceKind::Session)?;
        let r = req.into_inner();
        check_id(&r.id)?;
        let found = read(&self.0, r.read, |s| {
            s.lock_sessions
                .get(&r.id)
                .map(|x| (x.node.clone(), session_to_proto(x)))
        })
        .await?;
        let (node, entry) = found.ok_or_else(|| not_found(&r.id))?;
        caller.require(Resource::Session(&node), Access::Read)?;
        Ok(Response::new(entry))
    }

    async fn list(
        &self,
        req: Request<proto::SessionListRequest>,
    ) -> Result<Response<proto::SessionList>, Status> {
        let caller = caller(&self.0, &req).await?;
        let r = req.into_inner();
        if r.node.is_empty() {
            caller.require_any_read(ResourceKind::Session)?;
        } else {
            caller.require(Resource::Session(&r.node), Access::Read)?;
        }
        let list = read(&self.0, r.read, |s| proto::SessionList {
            sessions: s
                .lock_sessions
                .values()
                .filter(|x| r.node.is_empty() || x.node == r.node)
                .filter(|x| caller.can(Resource::Session(&x.node), Access::Read))
                .map(session_to_proto)
                .collect(),
            index: s.index,
        })
        .await?;
        Ok(Response::new(list))
    }
}

/// The TTL sessions past their deadline at `now_ms`.
pub fn expired(state: &State, now_ms: i64) -> Vec<String> {
    state
        .lock_sessions
        .values()
        .filter(|s| s.expired(now_ms))
        .map(|s| s.id.clone())
        .collect()
}

/// How often the leader looks for expired sessions.
pub const REAP_INTERVAL: Duration = Duration::from_secs(1);

/// Runs on every server for as long as it lives: while it leads,
/// invalidates TTL sessions past their deadline (`SessionExpire`, which
/// the state refuses if a renewal came first).
pub async fn reap(node: Arc<ServerNode>) {
    let mut interval = tokio::time::interval(REAP_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if node.raft.current_leader().await != Some(node.id) {
            continue;
        }
        let now_ms = unix_now_ms();
        let due = expired(&node.shared.state.read().expect("state lock"), now_ms);
        for id in due {
            tracing::info!(session = %id, "session TTL expired: invalidating");
            let cmd = Command::SessionExpire {
                id: id.clone(),
                now_ms,
            };
            if let Err(e) = node.write_as_leader(cmd).await {
                tracing::info!(session = %id, "expiring the session: {e}");
            }
        }
    }
}
