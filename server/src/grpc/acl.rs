//! `weft.v1.Acl`: bootstrap, policies and tokens.
//!
//! Bootstrap needs no token and works once: it makes the first management
//! token. Everything else needs `acl:read` or `acl:write`, except reading
//! the calling token itself and asking what it may do (`Authorize`, which
//! agents use to judge the tokens workloads present to their local API). A token's secret is made here, hashed into the
//! Raft command, and shown only in the answer that created it.
use std::sync::Arc;

use tonic::{Request, Response, Status};
use weft_api::acl::{Access, Resource};
use weft_api::proto::{self, acl_server::Acl};

use super::auth::{caller, secret_of, Caller};
use super::{read, write};
use crate::acl::{
    new_id, AclPolicy, AclState, AclToken, NodeIdentity, Secret, GLOBAL_MANAGEMENT_ID,
};
use crate::node::{ServerNode, WriteError};
use crate::state::Command;

pub struct AclApi(pub Arc<ServerNode>);

fn policy_to_proto(p: &AclPolicy) -> proto::AclPolicy {
    proto::AclPolicy {
        id: p.id.clone(),
        name: p.name.clone(),
        description: p.description.clone(),
        rules: p.rules.clone(),
        create_index: p.create_index,
        modify_index: p.modify_index,
    }
}

/// A token as answers show it: never the secret (`secret` is set only when
/// the token was just made); linked policies by name.
fn token_to_proto(acl: &AclState, t: &AclToken, secret: Option<String>) -> proto::AclToken {
    proto::AclToken {
        accessor_id: t.accessor_id.clone(),
        secret_id: secret.unwrap_or_default(),
        description: t.description.clone(),
        policies: t
            .policies
            .iter()
            .map(|id| acl.policies.get(id).map_or(id.clone(), |p| p.name.clone()))
            .collect(),
        service_identities: t.service_identities.clone(),
        node_identities: t
            .node_identities
            .iter()
            .map(|n| proto::AclNodeIdentity {
                node_name: n.node_name.clone(),
                datacenter: n.datacenter.clone(),
            })
            .collect(),
        create_index: t.create_index,
        modify_index: t.modify_index,
    }
}

impl AclApi {
    fn acl(&self) -> std::sync::RwLockReadGuard<'_, crate::state::State> {
        self.0.shared.state.read().expect("state lock")
    }

    /// The written token, read back after the write.
    async fn token_answer(
        &self,
        accessor: &str,
        secret: Option<String>,
    ) -> Result<Response<proto::AclToken>, Status> {
        let token = read(&self.0, None, |s| {
            s.acl
                .tokens
                .get(accessor)
                .map(|t| token_to_proto(&s.acl, t, secret))
        })
        .await?;
        token
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("token {accessor} not found")))
    }

    fn require(caller: &Caller, want: Access) -> Result<(), Status> {
        caller.require(Resource::Acl, want)
    }
}

/// Most questions one `Authorize` request may ask (Consul's limit).
pub const MAX_AUTHORIZE_CHECKS: usize = 64;

/// One `Authorize` question as a resource and an access, or why it is not one.
pub fn question(c: &proto::AuthorizeCheck) -> Result<(Resource<'_>, Access), String> {
    let access = match c.access.as_str() {
        "read" => Access::Read,
        "write" => Access::Write,
        other => return Err(format!("access {other:?}: want \"read\" or \"write\"")),
    };
    let segment = c.segment.as_str();
    let (resource, needs_segment) = match c.resource.as_str() {
        "service" => (Resource::Service(segment), Some(true)),
        "intentions" => (Resource::Intentions(segment), Some(true)),
        "node" => (Resource::Node(segment), Some(true)),
        // Key rules are prefixes: the empty key is a key.
        "key" => (Resource::Key(segment), None),
        "operator" => (Resource::Operator, Some(false)),
        "acl" => (Resource::Acl, Some(false)),
        "mesh" => (Resource::Mesh, Some(false)),
        other => {
            return Err(format!(
                "resource {other:?}: want service, intentions, node, key, operator, acl or mesh"
            ))
        }
    };
    match needs_segment {
        Some(true) if segment.is_empty() => {
            return Err(format!(
                "resource {:?} needs a segment (a name)",
                c.resource
            ))
        }
        Some(false) if !segment.is_empty() => {
            return Err(format!("resource {:?} takes no segment", c.resource))
        }
        _ => {}
    }
    Ok((resource, access))
}

/// The answers to `checks` for `caller`, in order; the first bad question
/// refuses the whole request.
pub fn authorize(
    caller: &Caller,
    checks: Vec<proto::AuthorizeCheck>,
) -> Result<proto::AuthorizeResponse, Status> {
    if checks.len() > MAX_AUTHORIZE_CHECKS {
        return Err(Status::invalid_argument(format!(
            "{} checks: at most {MAX_AUTHORIZE_CHECKS} per request",
            checks.len()
        )));
    }
    let mut results = Vec::with_capacity(checks.len());
    for (i, check) in checks.into_iter().enumerate() {
        let (resource, access) =
            question(&check).map_err(|e| Status::invalid_argument(format!("checks[{i}]: {e}")))?;
        let allowed = caller.can(resource, access);
        results.push(proto::AuthorizeResult {
            check: Some(check),
            allowed,
        });
    }
    Ok(proto::AuthorizeResponse { results })
}

/// Creates the first management token, once per cluster: its accessor id
/// and its secret.
pub async fn bootstrap(node: &ServerNode) -> Result<(String, Secret), Status> {
    let refused =
        |m: &str| Status::permission_denied(format!("ACL bootstrap no longer allowed: {m}"));
    if node
        .shared
        .state
        .read()
        .expect("state lock")
        .acl
        .bootstrapped
    {
        return Err(refused("the cluster is bootstrapped"));
    }
    let secret = Secret::generate();
    let token = AclToken {
        accessor_id: new_id(),
        secret_hash: secret.hash(),
        description: "Bootstrap Token (Global Management)".into(),
        policies: vec![GLOBAL_MANAGEMENT_ID.into()],
        service_identities: vec![],
        node_identities: vec![],
        create_index: 0,
        modify_index: 0,
        replicated: false,
    };
    let accessor = token.accessor_id.clone();
    node.write(Command::AclBootstrap(token))
        .await
        .map_err(|e| match e {
            WriteError::Refused(m) => refused(&m),
            other => Status::from(other),
        })?;
    tracing::info!(%accessor, "ACLs bootstrapped: management token created");
    Ok((accessor, secret))
}

#[tonic::async_trait]
impl Acl for AclApi {
    async fn bootstrap(
        &self,
        _req: Request<proto::Empty>,
    ) -> Result<Response<proto::AclToken>, Status> {
        let (accessor, secret) = bootstrap(&self.0).await?;
        self.token_answer(&accessor, Some(secret.expose().to_string()))
            .await
    }

    async fn policy_upsert(
        &self,
        req: Request<proto::AclPolicy>,
    ) -> Result<Response<proto::AclPolicy>, Status> {
        let caller = caller(&self.0, &req).await?;
        Self::require(&caller, Access::Write)?;
        let p = req.into_inner();
        // Ids are the servers' to give: an update names an existing policy.
        let id = if p.id.is_empty() {
            new_id()
        } else if self.acl().acl.policies.contains_key(&p.id) {
            p.id
        } else {
            return Err(Status::not_found(format!(
                "policy {:?} not found (leave the id empty to create one)",
                p.id
            )));
        };
        let policy = AclPolicy {
            id: id.clone(),
            name: p.name,
            description: p.description,
            rules: p.rules,
            create_index: 0,
            modify_index: 0,
            replicated: false,
        };
        let what = format!("acl policy {}", policy.name);
        write(&self.0, &caller, &what, Command::AclPolicyUpsert(policy)).await?;
        let written = read(&self.0, None, |s| {
            s.acl.policies.get(&id).map(policy_to_proto)
        })
        .await?;
        written
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("policy {id} not found")))
    }

    async fn policy_read(
        &self,
        req: Request<proto::AclRef>,
    ) -> Result<Response<proto::AclPolicy>, Status> {
        let caller = caller(&self.0, &req).await?;
        Self::require(&caller, Access::Read)?;
        let id = req.into_inner().id;
        let found = read(&self.0, None, |s| s.acl.policy(&id).map(policy_to_proto)).await?;
        found
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("policy {id:?} not found")))
    }

    async fn policy_list(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::AclPolicyList>, Status> {
        let caller = caller(&self.0, &req).await?;
        Self::require(&caller, Access::Read)?;
        let policies = read(&self.0, None, |s| {
            s.acl.policies.values().map(policy_to_proto).collect()
        })
        .await?;
        Ok(Response::new(proto::AclPolicyList { policies }))
    }

    async fn policy_delete(
        &self,
        req: Request<proto::AclRef>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let caller = caller(&self.0, &req).await?;
        Self::require(&caller, Access::Write)?;
        let r = req.into_inner();
        let id = self
            .acl()
            .acl
            .policy(&r.id)
            .map_or(r.id.clone(), |p| p.id.clone());
        let what = format!("delete acl policy {}", r.id);
        let cmd = Command::AclPolicyDelete { id };
        Ok(Response::new(write(&self.0, &caller, &what, cmd).await?))
    }

    async fn token_upsert(
        &self,
        req: Request<proto::AclToken>,
    ) -> Result<Response<proto::AclToken>, Status> {
        let caller = caller(&self.0, &req).await?;
        Self::require(&caller, Access::Write)?;
        let t = req.into_inner();
        if !t.secret_id.is_empty() {
            return Err(Status::invalid_argument(
                "secret_id: servers make secrets; leave it empty",
            ));
        }
        let (policies, existing_hash) = {
            let state = self.acl();
            let mut ids = Vec::new();
            for p in &t.policies {
                let policy = state
                    .acl
                    .policy(p)
                    .ok_or_else(|| Status::invalid_argument(format!("policy {p:?} not found")))?;
                ids.push(policy.id.clone());
            }
            let existing = if t.accessor_id.is_empty() {
                None
            } else {
                let old = state.acl.tokens.get(&t.accessor_id).ok_or_else(|| {
                    Status::not_found(format!("token {} not found", t.accessor_id))
                })?;
                Some((old.secret_hash.clone(), old.create_index))
            };
            (ids, existing)
        };
        // An update names the token it read (its creation index): applied
        // only if that token is still there, so that an update racing a
        // delete cannot bring the deleted secret back.
        let (accessor, secret, secret_hash, created) = match existing_hash {
            Some((hash, created)) => (t.accessor_id.clone(), None, hash, created),
            None => {
                let secret = Secret::generate();
                let hash = secret.hash();
                (new_id(), Some(secret.expose().to_string()), hash, 0)
            }
        };
        let token = AclToken {
            accessor_id: accessor.clone(),
            secret_hash,
            description: t.description,
            policies,
            service_identities: t.service_identities,
            node_identities: t
                .node_identities
                .into_iter()
                .map(|n| NodeIdentity {
                    node_name: n.node_name,
                    datacenter: n.datacenter,
                })
                .collect(),
            create_index: created,
            modify_index: 0,
            replicated: false,
        };
        let what = format!("acl token {accessor}");
        write(&self.0, &caller, &what, Command::AclTokenUpsert(token)).await?;
        self.token_answer(&accessor, secret).await
    }

    async fn token_read(
        &self,
        req: Request<proto::AclRef>,
    ) -> Result<Response<proto::AclToken>, Status> {
        let caller = caller(&self.0, &req).await?;
        Self::require(&caller, Access::Read)?;
        let id = req.into_inner().id;
        self.token_answer(&id, None).await
    }

    async fn token_list(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::AclTokenList>, Status> {
        let caller = caller(&self.0, &req).await?;
        Self::require(&caller, Access::Read)?;
        let tokens = read(&self.0, None, |s| {
            s.acl
                .tokens
                .values()
                .map(|t| token_to_proto(&s.acl, t, None))
                .collect()
        })
        .await?;
        Ok(Response::new(proto::AclTokenList { tokens }))
    }

    async fn token_delete(
        &self,
        req: Request<proto::AclRef>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let caller = caller(&self.0, &req).await?;
        Self::require(&caller, Access::Write)?;
        let accessor = req.into_inner().id;
        if accessor == caller.accessor {
            return Err(Status::failed_precondition(
                "a token cannot delete itself: use another acl:write token",
            ));
        }
        let what = format!("delete acl token {accessor}");
        let cmd = Command::AclTokenDelete { accessor };
        Ok(Response::new(write(&self.0, &caller, &what, cmd).await?))
    }

    async fn token_self(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::AclToken>, Status> {
        let caller = caller(&self.0, &req).await?;
        self.token_answer(&caller.accessor, None).await
    }

    async fn authorize(
        &self,
        req: Request<proto::AuthorizeRequest>,
    ) -> Result<Response<proto::AuthorizeResponse>, Status> {
        // The token's own answer only: a node certificate without a token
        // (an agent asking on a workload's behalf without its token) does
        // not count.
        if secret_of(&req).is_none() {
            return Err(Status::unauthenticated(
                "no ACL token: Authorize answers for the calling token",
            ));
        }
        let caller = caller(&self.0, &req).await?;
        authorize(&caller, req.into_inner().checks).map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::acl::Authorizer;

    fn ask(resource: &str, segment: &str, access: &str) -> proto::AuthorizeCheck {
        proto::AuthorizeCheck {
            resource: resource.into(),
            segment: segment.into(),
            access: access.into(),
        }
    }

    fn caller_with(rules: &str) -> Caller {
        let policy = weft_api::acl::parse_rules(rules).unwrap();
        Caller {
            accessor: "a1".into(),
            authz: Authorizer::from_rules([&policy]),
            request: None,
            standing: crate::state::Standing::Token {
                accessor: "a1".into(),
                epoch: 0,
            },
            valid_until: None,
        }
    }

    #[test]
    fn questions_parse() {
        assert_eq!(
            question(&ask("service", "api", "write")).unwrap(),
            (Resource::Service("api"), Access::Write)
        );
        assert_eq!(
            question(&ask("operator", "", "read")).unwrap(),
            (Resource::Operator, Access::Read)
        );
        assert_eq!(
            question(&ask("key", "", "read")).unwrap(),
            (Resource::Key(""), Access::Read)
        );
        for (r, s, a, want) in [
            ("service", "", "write", "needs a segment"),
            ("acl", "x", "read", "takes no segment"),
            ("service", "api", "admin", "access \"admin\""),
            ("services", "api", "read", "resource \"services\""),
        ] {
            let e = question(&ask(r, s, a)).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn answers_per_question_in_order() {
        let caller = caller_with(r#"service "api" { policy = "write" }"#);
        let answer = authorize(
            &caller,
            vec![
                ask("service", "api", "write"),
                ask("service", "web", "write"),
                ask("service", "api", "read"),
                ask("acl", "", "read"),
            ],
        )
        .unwrap();
        let allowed: Vec<bool> = answer.results.iter().map(|r| r.allowed).collect();
        assert_eq!(allowed, [true, false, true, false]);
        assert_eq!(answer.results[1].check.as_ref().unwrap().segment, "web");

        let e = authorize(
            &caller,
            vec![ask("service", "api", "write"), ask("x", "", "read")],
        )
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("checks[1]: "), "{}", e.message());
        let many = vec![ask("service", "api", "read"); MAX_AUTHORIZE_CHECKS + 1];
        assert_eq!(
            authorize(&caller, many).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
