//! `weft.v1.Intentions`: who may talk to whom, and checks against the rules.
//!
//! Intentions belong to their destination: writing one needs `intentions`
//! write on the destination service (`service "api" { policy = "write"
//! intentions = "write" }`; as in Consul, `service:write` alone gives only
//! intentions read), reading one needs read there; the `*` destination
//! needs the right on every service. Lists are filtered by that rule.
use std::sync::Arc;

use tonic::{Request, Response, Status};
use weft_api::acl::{Access, Resource, ResourceKind};
use weft_api::convert::{intention_from_proto, intention_to_proto};
use weft_api::intention::{
    check_intention_paths, evaluate, validate_intention, DecidedBy, Intention, IntentionAction,
    Request as HttpRequest,
};
use weft_api::names::validate_name_or_wildcard;
use weft_api::proto::{self, intentions_server::Intentions};

use super::auth::{caller, Caller};
use super::{invalid, read, write};
use crate::node::ServerNode;
use crate::state::Command;

pub struct IntentionsApi(pub Arc<ServerNode>);

fn check_ref(r: &proto::IntentionRef) -> Result<(), Status> {
    weft_api::intention::validate_source(&r.source).map_err(|e| invalid(e.to_string()))?;
    validate_name_or_wildcard(&r.destination).map_err(|e| invalid(format!("destination: {e}")))
}

/// Whether `caller` has `want` on the intentions of `destination`.
pub(crate) fn may_access(caller: &Caller, destination: &str, want: Access) -> bool {
    if destination == weft_api::names::WILDCARD {
        caller.authz.allows_all(ResourceKind::Intentions, want)
    } else {
        caller.can(Resource::Intentions(destination), want)
    }
}

pub(crate) fn require(caller: &Caller, destination: &str, want: Access) -> Result<(), Status> {
    if destination == weft_api::names::WILDCARD {
        caller.require_all(ResourceKind::Intentions, want)
    } else {
        caller.require(Resource::Intentions(destination), want)
    }
}

#[tonic::async_trait]
impl Intentions for IntentionsApi {
    async fn upsert(
        &self,
        req: Request<proto::UpsertIntentionRequest>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let caller = caller(&self.0, &req).await?;
        let intention = req.into_inner().intention.unwrap_or_default();
        require(&caller, &intention.destination, Access::Write)?;
        let intention = intention_from_proto(intention).map_err(invalid)?;
        validate_intention(&intention).map_err(invalid)?;
        check_intention_paths(&intention).map_err(invalid)?;
        {
            let state = self.0.shared.state.read().expect("state lock");
            (self.0.limits).check_intention_upsert(
                &state,
                &intention.source,
                &intention.destination,
            )?;
        }
        let what = format!(
            "intention {} => {}",
            intention.source, intention.destination
        );
        let cmd = Command::UpsertIntention(intention);
        Ok(Response::new(write(&self.0, &caller, &what, cmd).await?))
    }

    async fn delete(
        &self,
        req: Request<proto::IntentionRef>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let caller = caller(&self.0, &req).await?;
        let r = req.into_inner();
        require(&caller, &r.destination, Access::Write)?;
        check_ref(&r)?;
        let what = format!("delete intention {} => {}", r.source, r.destination);
        let cmd = Command::DeleteIntention {
            source: r.source,
            destination: r.destination,
        };
        Ok(Response::new(write(&self.0, &caller, &what, cmd).await?))
    }

    async fn get(
        &self,
        req: Request<proto::GetIntentionRequest>,
    ) -> Result<Response<proto::Intention>, Status> {
        let caller = caller(&self.0, &req).await?;
        let r = req.into_inner();
        let key = r.r#ref.unwrap_or_default();
        require(&caller, &key.destination, Access::Read)?;
        check_ref(&key)?;
        let found = read(&self.0, r.read, |s| {
            s.intentions
                .get(&key.source)
                .and_then(|m| m.get(&key.destination))
                .map(intention_to_proto)
        })
        .await?;
        found.map(Response::new).ok_or_else(|| {
            Status::not_found(format!(
                "no intention {} => {}",
                key.source, key.destination
            ))
        })
    }

    async fn list(
        &self,
        req: Request<proto::ReadOptions>,
    ) -> Result<Response<proto::IntentionList>, Status> {
        let caller = caller(&self.0, &req).await?;
        caller.require_any_read(ResourceKind::Intentions)?;
        let list = read(&self.0, Some(req.into_inner()), |s| proto::IntentionList {
            intentions: s
                .all_intentions()
                .filter(|i| may_access(&caller, &i.destination, Access::Read))
                .map(intention_to_proto)
                .collect(),
            index: s.index,
        })
        .await?;
        Ok(Response::new(list))
    }

    async fn check(
        &self,
        req: Request<proto::CheckRequest>,
    ) -> Result<Response<proto::CheckResponse>, Status> {
        let caller = caller(&self.0, &req).await?;
        let r = req.into_inner();
        require(&caller, &r.destination, Access::Read)?;
        // `web`, or `web@dc2` for a caller of another datacenter.
        let (source, source_dc) = weft_api::intention::split_source(&r.source);
        weft_api::names::validate_name(source).map_err(|e| invalid(format!("source: {e}")))?;
        if let Some(dc) = source_dc {
            weft_api::names::validate_name(dc)
                .map_err(|e| invalid(format!("source datacenter: {e}")))?;
        }
        weft_api::names::validate_name(&r.destination)
            .map_err(|e| invalid(format!("destination: {e}")))?;
        let request = (!r.method.is_empty()).then(|| HttpRequest {
            method: r.method.to_ascii_uppercase(),
            path: if r.path.is_empty() {
                "/".into()
            } else {
                r.path.clone()
            },
            headers: r.headers.clone().into_iter().collect(),
            // Intentions do not match query parameters.
            query: Vec::new(),
        });
        let default = if self.0.default_allow {
            IntentionAction::Allow
        } else {
            IntentionAction::Deny
        };
        let intentions: Vec<Intention> =
            read(&self.0, r.read, |s| s.all_intentions().cloned().collect()).await?;
        let decision = evaluate(
            &intentions,
            weft_api::intention::Caller::new(source, source_dc.unwrap_or(&self.0.datacenter)),
            &r.destination,
            request.as_ref(),
            default,
        );
        let (decided_by, permission_index, reason) = explain(&decision, default);
        Ok(Response::new(proto::CheckResponse {
            allowed: decision.allowed,
            decided_by,
            permission_index,
            reason,
        }))
    }
}

/// What decided, as `weft intention check` and the UI explain it: the
/// deciding intention, its permission and a sentence.
pub fn explain(
    decision: &weft_api::intention::Decision,
    default: IntentionAction,
) -> (Option<proto::IntentionRef>, Option<u32>, String) {
    let verdict = if decision.allowed {
        "allowed"
    } else {
        "denied"
    };
    match decision.by.clone() {
        DecidedBy::Intention {
            source,
            destination,
            permission_index,
        } => {
            let reason = match permission_index {
                Some(p) => {
                    format!("{verdict} by intention {source} => {destination}, permission {p}")
                }
                None => format!("{verdict} by intention {source} => {destination}"),
            };
            (
                Some(proto::IntentionRef {
                    source,
                    destination,
                }),
                permission_index.map(|p| p as u32),
                reason,
            )
        }
        DecidedBy::NoPermissionMatched {
            source,
            destination,
        } => {
            let reason = format!(
                "{verdict} by the default ({default}): no permission of intention {source} => {destination} matched"
            );
            (
                Some(proto::IntentionRef {
                    source,
                    destination,
                }),
                None,
                reason,
            )
        }
        DecidedBy::Default => (
            None,
            None,
            format!("{verdict} by the default ({default}): no intention matched"),
        ),
    }
}
