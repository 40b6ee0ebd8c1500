//! `weft.v1.Ca`: the trust bundle, signing agents' CSRs, operator leaves,
//! and root rotation.
//!
//! Signing a node identity needs `node:write` on the node; a service
//! identity needs `service:write` on the service (Consul's rule for a
//! leaf, which agents ask with a workload's token), which must also be
//! registered on the node named: a node's token gets certificates for that
//! node's services and nothing else. Operator leaves need `service:write`, rotation
//! `operator:write`; the trust bundle is for tokens that read a service.
use std::sync::Arc;

use tonic::{Request, Response, Status};
use weft_api::acl::{Access, Resource, ResourceKind};
use weft_api::names::validate_name;
use weft_api::proto::{self, ca_server::Ca};

use super::auth::caller;
use super::{invalid, read, write};
use crate::ca::{CaError, CaState, Leaf};
use crate::node::ServerNode;
use crate::state::Command;

pub struct CaApi(pub Arc<ServerNode>);

pub fn unix_now() -> i64 {
    unix_now_ms() / 1000
}

/// This server's clock in unix milliseconds, for commands that carry a time.
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn ca_status(e: CaError) -> Status {
    match e {
        CaError::NotInitialized => Status::unavailable(e.to_string()),
        CaError::Crypto(_) => Status::internal(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

fn signed(ca: &CaState, spiffe_id: String, leaf: Leaf, key_pem: String) -> proto::SignedLeaf {
    proto::SignedLeaf {
        spiffe_id,
        cert_pem: leaf.cert_pem,
        chain_pem: leaf.chain_pem,
        bundle_pem: ca.bundle_pem(),
        not_after: leaf.not_after,
        key_pem,
    }
}

#[tonic::async_trait]
impl Ca for CaApi {
    async fn roots(
        &self,
        req: Request<proto::ReadOptions>,
    ) -> Result<Response<proto::CaRoots>, Status> {
        let caller = caller(&self.0, &req).await?;
        caller.require_any_read(ResourceKind::Service)?;
        let ca = read(&self.0, Some(req.into_inner()), |s| s.ca.clone()).await?;
        let ca = ca.ok_or_else(|| ca_status(CaError::NotInitialized))?;
        let active = ca.roots.last().map(|r| r.serial);
        Ok(Response::new(proto::CaRoots {
            trust_domain: ca.trust_domain.clone(),
            bundle_pem: ca.bundle_pem(),
            roots: ca
                .roots
                .iter()
                .map(|r| proto::CaRootInfo {
                    serial: r.serial,
                    not_after: r.not_after,
                    active: Some(r.serial) == active,
                    retire_after: r.retire_after.unwrap_or(0),
                })
                .collect(),
        }))
    }

    async fn sign(
        &self,
        req: Request<proto::SignRequest>,
    ) -> Result<Response<proto::SignedLeaf>, Status> {
        let caller = caller(&self.0, &req).await?;
        let secret = super::auth::secret_of(&req).map(str::to_owned);
        let r = req.into_inner();
        if caller.by_certificate() {
            // A certificate that renewed itself would outlive the token an
            // operator revokes: certificates come for tokens only.
            return Err(Status::permission_denied(
                "a node certificate does not get certificates: sign with the node's token",
            ));
        }
        let rights = |caller: &super::auth::Caller| {
            if r.service.is_empty() {
                caller.require(Resource::Node(&r.node), Access::Write)
            } else {
                // A service identity is the service's, wherever it runs:
                // service:write on it is what Consul asks and what IssueLeaf
                // asks; the service must still be on the node named.
                caller.require(Resource::Service(&r.service), Access::Write)
            }
        };
        rights(&caller)?;
        validate_name(&r.node).map_err(|e| invalid(format!("node: {e}")))?;
        if !r.service.is_empty() {
            validate_name(&r.service).map_err(|e| invalid(format!("service: {e}")))?;
        }
        let found = read(&self.0, None, |s| {
            let node = s.nodes.get(&r.node)?;
            let on_node = r.service.is_empty()
                || s.instances
                    .get(&r.node)
                    .is_some_and(|m| m.values().any(|i| i.service == r.service));
            let external = weft_api::catalog_register::is_external(node);
            Some((s.ca.clone(), node.datacenter.clone(), on_node, external))
        })
        .await?;
        // The read barrier brought this server up to the leader: the token
        // is judged again as it is now.
        let caller = super::auth::again(&self.0, secret.as_deref(), caller)?;
        rights(&caller)?;
        let Some((ca, dc, on_node, external)) = found else {
            return Err(Status::permission_denied(format!(
                "node {:?} is not registered",
                r.node
            )));
        };
        if external && r.service.is_empty() {
            // No agent runs it: a node identity would be an agent's.
            return Err(Status::permission_denied(format!(
                "node {:?} is external (registered through the catalog API): no node certificate",
                r.node
            )));
        }
        if !on_node {
            return Err(Status::permission_denied(format!(
                "service {:?} is not registered on node {:?}: no certificate for it",
                r.service, r.node
            )));
        }
        let ca = ca.ok_or_else(|| ca_status(CaError::NotInitialized))?;
        let (spiffe_id, cn) = if r.service.is_empty() {
            (ca.node_id(&dc, &r.node), r.node.clone())
        } else {
            (ca.service_id(&dc, &r.service), r.service.clone())
        };
        let leaf = ca
            .sign_csr(&r.csr_pem, &spiffe_id, &cn, unix_now())
            .map_err(ca_status)?;
        tracing::info!(accessor = %caller.accessor, node = %r.node, %spiffe_id, "signed a leaf certificate");
        Ok(Response::new(signed(&ca, spiffe_id, leaf, String::new())))
    }

    async fn issue_leaf(
        &self,
        req: Request<proto::IssueLeafRequest>,
    ) -> Result<Response<proto::SignedLeaf>, Status> {
        let caller = caller(&self.0, &req).await?;
        let secret = super::auth::secret_of(&req).map(str::to_owned);
        let r = req.into_inner();
        caller.require(Resource::Service(&r.service), Access::Write)?;
        validate_name(&r.service).map_err(|e| invalid(format!("service: {e}")))?;
        let dc = if r.datacenter.is_empty() {
            self.0.datacenter.clone()
        } else {
            r.datacenter
        };
        if dc != self.0.datacenter {
            return Err(invalid(format!(
                "datacenter: {dc:?} is not this cluster's ({:?})",
                self.0.datacenter
            )));
        }
        let ca = read(&self.0, None, |s| s.ca.clone())
            .await?
            .ok_or_else(|| ca_status(CaError::NotInitialized))?;
        // Judged again after the read barrier, as Sign does.
        let caller = super::auth::again(&self.0, secret.as_deref(), caller)?;
        caller.require(Resource::Service(&r.service), Access::Write)?;
        let spiffe_id = ca.service_id(&dc, &r.service);
        let (leaf, key) = ca
            .issue_leaf(&spiffe_id, &r.service, unix_now())
            .map_err(ca_status)?;
        tracing::info!(accessor = %caller.accessor, %spiffe_id, "issued an operator leaf certificate");
        Ok(Response::new(signed(
            &ca,
            spiffe_id,
            leaf,
            key.expose().to_string(),
        )))
    }

    async fn rotate(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let caller = caller(&self.0, &req).await?;
        caller.require(Resource::Operator, Access::Write)?;
        if self.0.primary_datacenter != self.0.datacenter {
            return Err(Status::failed_precondition(format!(
                "datacenter {} signs with an intermediate of the primary's root: rotate in the primary datacenter, {}",
                self.0.datacenter, self.0.primary_datacenter
            )));
        }
        let ca = read(&self.0, None, |s| s.ca.clone())
            .await?
            .ok_or_else(|| ca_status(CaError::NotInitialized))?;
        let now = unix_now();
        let root = ca.next_root(now).map_err(ca_status)?;
        let serial = root.serial;
        let what = format!("CA rotation to root {serial}");
        let cmd = Command::CaRotate { root, now };
        Ok(Response::new(write(&self.0, &caller, &what, cmd).await?))
    }
}

/// Runs on every server: whichever leads creates the CA when there is none,
/// gives it its `--leaf-ttl` when that differs, and drops retired roots
/// from the bundle.
pub async fn maintain(node: Arc<ServerNode>) {
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        if node.raft.current_leader().await != Some(node.id) {
            continue;
        }
        let (has_ca, expired, ttl) = {
            let state = node.shared.state.read().expect("state lock");
            let now = unix_now();
            (
                state.ca.is_some(),
                state.ca.as_ref().is_some_and(|c| c.has_expired_roots(now)),
                state.ca.as_ref().map(|c| c.leaf_ttl_secs),
            )
        };
        // An operator's new `--leaf-ttl` (a shorter one after a leak, say)
        // holds from the next signing on, not only for a new CA.
        // A secondary's CA comes from the primary (crate::federation).
        let secondary = node.primary_datacenter != node.datacenter;
        let new_ttl = match node.leaf_ttl_secs {
            Some(wanted) if !secondary && ttl.is_some_and(|t| t != wanted) => {
                // A server of an earlier version, in a rolling upgrade,
                // would fail on the command.
                let all = node.every_server_says(|s| s.applies_leaf_ttl).await;
                if !all {
                    tracing::debug!(
                        "a server does not yet apply leaf-lifetime changes: --leaf-ttl waits"
                    );
                }
                all.then_some(wanted)
            }
            _ => None,
        };
        let cmd = if !has_ca && secondary {
            continue;
        } else if !has_ca {
            let cluster_id = format!("{:08x}", rand::random::<u32>());
            match CaState::init(
                &format!("{cluster_id}.weft"),
                node.leaf_ttl_secs
                    .unwrap_or(crate::ca::DEFAULT_LEAF_TTL_SECS),
                unix_now(),
            ) {
                Ok(ca) => Command::CaInit(ca),
                Err(e) => {
                    tracing::error!("creating the CA failed: {e}");
                    continue;
                }
            }
        } else if let Some(secs) = new_ttl {
            Command::CaLeafTtl { secs }
        } else if expired {
            Command::CaPrune { now: unix_now() }
        } else {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            continue;
        };
        match node.write(cmd).await {
            Ok(index) if !has_ca => tracing::info!(index, "certificate authority created"),
            Ok(_) if new_ttl.is_some() => tracing::info!(
                leaf_ttl_secs = new_ttl,
                "leaves are signed with this server's --leaf-ttl from now on"
            ),
            Ok(_) => tracing::info!("retired CA roots removed from the bundle"),
            Err(e) => tracing::debug!("CA maintenance: {e}"),
        }
    }
}
