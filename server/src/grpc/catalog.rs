//! `weft.v1.Catalog`: nodes, service instances and their health.
//!
//! As in Consul: registering or deregistering a node needs `node:write` on
//! it; registering an instance needs `service:write` on its service (on a
//! node that is registered already); deregistering an instance or writing
//! its health needs `node:write` on its node or `service:write` on its
//! service. So a node's token (its node identity) writes only that node,
//! and a service's token only that service. Lists are filtered to what the
//! token may read (instances need read on their service and on their node).
use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use weft_api::acl::{Access, Resource, ResourceKind};
use weft_api::catalog::{
    validate_node, validate_service_instance, HealthStatus, ServiceInstance, NODE_MAINTENANCE,
};
use weft_api::convert::{
    health_from_proto, instance_from_proto, instance_to_proto, node_from_proto, node_to_proto,
};
use weft_api::names::validate_name;
use weft_api::proto::{self, catalog_server::Catalog};

use super::auth::{caller, Caller};
use super::{invalid, read, write};
use crate::node::ServerNode;
use crate::state::{Command, State};

pub struct CatalogApi(pub Arc<ServerNode>);

/// Whether `caller` may see `instance`.
pub(crate) fn may_read_instance(caller: &Caller, instance: &ServiceInstance) -> bool {
    caller.can(Resource::Service(&instance.service), Access::Read)
        && caller.can(Resource::Node(&instance.node), Access::Read)
}

/// What changes a node's instances (their health, their removal):
/// `node:write` on the node, as for Consul's catalog. A service's token
/// alone is not enough: it would report the health of, or remove, its
/// service's instances on every other node, which their agents would not
/// notice until their own checks changed.
fn require_instance_write(caller: &Caller, node_name: &str) -> Result<(), Status> {
    caller.require(Resource::Node(node_name), Access::Write)
}

/// An instance's health as clients see it: critical, whatever its own
/// checks said, while its node is critical (its agent is not heard from).
pub(crate) fn effective_health(state: &State, instance: &ServiceInstance) -> HealthStatus {
    match state.nodes.get(&instance.node) {
        Some(n) if n.health == HealthStatus::Critical => HealthStatus::Critical,
        _ => instance.health,
    }
}

/// [`instance_to_proto`] with the node's health folded in.
fn effective_instance(state: &State, instance: &ServiceInstance) -> proto::ServiceInstance {
    let mut p = instance_to_proto(instance);
    if let Some(n) = state.nodes.get(&instance.node) {
        if n.health == HealthStatus::Critical {
            p.health = proto::Health::Critical as i32;
            p.check_output = format!("node {} is critical: {}", n.name, n.health_output);
        }
    }
    p
}

#[tonic::async_trait]
impl Catalog for CatalogApi {
    /// An agent's sign of life for its node: `node:write` on it. Answers how
    /// often to send the next.
    async fn heartbeat(
        &self,
        req: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatReply>, Status> {
        let caller = caller(&self.0, &req).await?;
        let node = req.into_inner().node;
        caller.require(Resource::Node(&node), Access::Write)?;
        validate_name(&node).map_err(|e| invalid(format!("node: {e}")))?;
        self.0.heartbeat(&node).await.map_err(Status::from)?;
        Ok(Response::new(proto::HeartbeatReply {
            interval_ms: self.0.liveness.interval().as_millis() as u64,
        }))
    }

    async fn set_node_maintenance(
        &self,
        req: Request<proto::NodeMaintenanceRequest>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let caller = caller(&self.0, &req).await?;
        let r = req.into_inner();
        caller.require(Resource::Node(&r.node), Access::Write)?;
        validate_name(&r.node).map_err(|e| invalid(format!("node: {e}")))?;
        let current = {
            let state = self.0.shared.state.read().expect("state lock");
            state
                .nodes
                .get(&r.node)
                .map(|n| (n.health, n.health_output.clone()))
        };
        let Some((health, output)) = current else {
            return Err(Status::not_found(format!(
                "node {} is not registered",
                r.node
            )));
        };
        let in_maintenance =
            health == HealthStatus::Critical && output.starts_with(NODE_MAINTENANCE);
        let (health, output) = match (r.enable, in_maintenance) {
            (true, _) => {
                let reason = if r.reason.trim().is_empty() {
                    "no reason given".to_string()
                } else {
                    r.reason.trim().to_string()
                };
                (
                    HealthStatus::Critical,
                    format!("{NODE_MAINTENANCE}: {reason}"),
                )
            }
            (false, true) => (HealthStatus::Passing, String::new()),
            // Off, and not in maintenance: whatever else made the node
            // critical (a silent agent) is not lifted here.
            (false, false) => {
                let index = self.0.shared.state.read().expect("state lock").index;
                return Ok(Response::new(proto::WriteResult { index }));
            }
        };
        let what = format!(
            "maintenance {} on node {}",
            if r.enable { "on" } else { "off" },
            r.node
        );
        let cmd = Command::SetNodeHealth {
            node: r.node,
            health,
            output,
            now_ms: super::ca::unix_now_ms(),
        };
        Ok(Response::new(write(&self.0, &caller, &what, cmd).await?))
    }

    async fn register_node(
        &self,
        req: Request<proto::RegisterNodeRequest>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let caller = caller(&self.0, &req).await?;
        let node = req.into_inner().node.unwrap_or_default();
        caller.require(Resource::Node(&node.name), Access::Write)?;
        let node = node_from_proto(node);
        validate_node(&node).map_err(invalid)?;
        if node.datacenter != self.0.datacenter {
            return Err(invalid(format!(
                "datacenter: {:?} is not this cluster's ({:?})",
                node.datacenter, self.0.datacenter
            )));
        }
        let what = format!("register node {}", node.name);
        Ok(Response::new(
            write(&self.0, &caller, &what, Command::RegisterNode(node)).await?,
        ))
    }

    async fn deregister_node(
        &self,
        req: Request<proto::DeregisterNodeRequest>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let caller = caller(&self.0, &req).await?;
        let name = req.into_inner().name;
        caller.require(Resource::Node(&name), Access::Write)?;
        validate_name(&name).map_err(|e| invalid(format!("name: {e}")))?;
        let what = format!("deregister node {name}");
        Ok(Response::new(
            write(
                &self.0,
                &caller,
                &what,
                Command::DeregisterNode {
                    name,
                    now_ms: super::ca::unix_now_ms(),
                },
            )
            .await?,
        ))
    }

    async fn register_service(
        &self,
        req: Request<proto::RegisterServiceRequest>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let caller = caller(&self.0, &req).await?;
        let instance = req.into_inner().instance.unwrap_or_default();
        // Both, as Consul's catalog asks: `node:write` because an instance
        // placed on a node is taken over by that node's agent for its
        // workloads and reached by the tunnels its peers open there (a
        // service's token alone put its instances on any node, at any
        // address: the metadata service's, a database's, the node's own
        // loopback ports), and `service:write` for the name.
        caller.require(Resource::Node(&instance.node), Access::Write)?;
        caller.require(Resource::Service(&instance.service), Access::Write)?;
        require_replaced_service(
            &self.0,
            &caller,
            &instance.node,
            &instance.id,
            &instance.service,
        )
        .await?;
        let instance = instance_from_proto(instance).map_err(invalid)?;
        validate_service_instance(&instance).map_err(invalid)?;
        let what = format!(
            "register service {} ({}) on node {}",
            instance.service, instance.id, instance.node
        );
        Ok(Response::new(
            write(&self.0, &caller, &what, Command::RegisterService(instance)).await?,
        ))
    }

    async fn deregister_service(
        &self,
        req: Request<proto::DeregisterServiceRequest>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let caller = caller(&self.0, &req).await?;
        let r = req.into_inner();
        require_instance_write(&caller, &r.node)?;
        let what = format!("deregister instance {} on node {}", r.id, r.node);
        let cmd = Command::DeregisterService {
            node: r.node,
            id: r.id,
        };
        Ok(Response::new(write(&self.0, &caller, &what, cmd).await?))
    }

    async fn update_health(
        &self,
        req: Request<proto::UpdateHealthRequest>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let caller = caller(&self.0, &req).await?;
        let r = req.into_inner();
        require_instance_write(&caller, &r.node)?;
        let health = health_from_proto(r.health).map_err(invalid)?;
        let what = format!("health of {} on node {}", r.id, r.node);
        let cmd = Command::UpdateHealth {
            node: r.node,
            id: r.id,
            health,
            output: r.output,
        };
        Ok(Response::new(write(&self.0, &caller, &what, cmd).await?))
    }

    async fn list_nodes(
        &self,
        req: Request<proto::ReadOptions>,
    ) -> Result<Response<proto::NodeList>, Status> {
        let caller = caller(&self.0, &req).await?;
        caller.require_any_read(ResourceKind::Node)?;
        let list = read(&self.0, Some(req.into_inner()), |s| proto::NodeList {
            nodes: s
                .nodes
                .values()
                .filter(|n| caller.can(Resource::Node(&n.name), Access::Read))
                .map(node_to_proto)
                .collect(),
            index: s.index,
        })
        .await?;
        Ok(Response::new(list))
    }

    async fn list_services(
        &self,
        req: Request<proto::ReadOptions>,
    ) -> Result<Response<proto::ServiceList>, Status> {
        let caller = caller(&self.0, &req).await?;
        caller.require_any_read(ResourceKind::Service)?;
        let options = req.into_inner();
        if let Some(dc) = remote_dc(&self.0, &options)? {
            let list = read(&self.0, Some(options), |s| {
                let mut by_name: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
                // As this datacenter's: service and node read (node rules
                // name nodes of every datacenter).
                for i in s.remote.get(&dc).into_iter().flatten() {
                    if may_read_instance(&caller, i) {
                        let e = by_name.entry(i.service.as_str()).or_default();
                        e.0 += 1;
                        e.1 += u32::from(i.health == HealthStatus::Passing);
                    }
                }
                proto::ServiceList {
                    services: by_name
                        .into_iter()
                        .map(|(name, (instances, passing))| proto::ServiceSummary {
                            vip: s
                                .vips
                                .get(&weft_api::vip::remote_key(name, &dc))
                                .map(|v| v.to_string())
                                .unwrap_or_default(),
                            name: name.to_string(),
                            instances,
                            passing,
                        })
                        .collect(),
                    index: s.index,
                }
            })
            .await?;
            return Ok(Response::new(list));
        }
        let list = read(&self.0, Some(options), |s| proto::ServiceList {
            services: s
                .service_names()
                .into_iter()
                .filter(|name| caller.can(Resource::Service(name), Access::Read))
                .map(|name| {
                    let instances: Vec<_> = s
                        .instances_of(&name)
                        .filter(|i| may_read_instance(&caller, i))
                        .collect();
                    proto::ServiceSummary {
                        vip: s.vips.get(&name).map(|v| v.to_string()).unwrap_or_default(),
                        instances: instances.len() as u32,
                        passing: instances
                            .iter()
                            .filter(|i| effective_health(s, i) == HealthStatus::Passing)
                            .count() as u32,
                        name,
                    }
                })
                .collect(),
            index: s.index,
        })
        .await?;
        Ok(Response::new(list))
    }

    async fn get_service(
        &self,
        req: Request<proto::GetServiceRequest>,
    ) -> Result<Response<proto::Service>, Status> {
        let caller = caller(&self.0, &req).await?;
        let r = req.into_inner();
        let name = r.name;
        caller.require(Resource::Service(&name), Access::Read)?;
        if let Some(dc) = r
            .read
            .as_ref()
            .map(|o| remote_dc(&self.0, o))
            .transpose()?
            .flatten()
        {
            let service = read(&self.0, r.read, |s| {
                let instances: Vec<_> = s
                    .remote
                    .get(&dc)
                    .into_iter()
                    .flatten()
                    .filter(|i| i.service == name && may_read_instance(&caller, i))
                    .map(instance_to_proto)
                    .collect();
                (!instances.is_empty()).then(|| proto::Service {
                    name: name.clone(),
                    vip: s
                        .vips
                        .get(&weft_api::vip::remote_key(&name, &dc))
                        .map(|v| v.to_string())
                        .unwrap_or_default(),
                    instances,
                })
            })
            .await?;
            return service.map(Response::new).ok_or_else(|| {
                Status::not_found(format!("service {name:?} has no instance in {dc}"))
            });
        }
        let service = read(&self.0, r.read, |s| {
            let vip = s.vips.get(&name)?;
            Some(proto::Service {
                name: name.clone(),
                vip: vip.to_string(),
                instances: s
                    .instances_of(&name)
                    .filter(|i| may_read_instance(&caller, i))
                    .map(|i| effective_instance(s, i))
                    .collect(),
            })
        })
        .await?;
        service
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("service {name:?} is not registered")))
    }
}

/// The other datacenter a read asks for, if any: it must be one of the
/// federation.
fn remote_dc(node: &ServerNode, options: &proto::ReadOptions) -> Result<Option<String>, Status> {
    let dc = options.datacenter.as_str();
    if dc.is_empty() || dc == node.datacenter {
        return Ok(None);
    }
    let known = node
        .shared
        .state
        .read()
        .expect("state lock")
        .federation
        .contains_key(dc);
    if !known {
        return Err(Status::invalid_argument(format!(
            "datacenter {dc:?} is not a datacenter of this federation"
        )));
    }
    Ok(Some(dc.to_string()))
}

/// As in Consul: replacing an instance that is another service's needs
/// write on that service too (else one service's writer could take over
/// another's instance by its id).
pub(crate) async fn require_replaced_service(
    node: &Arc<ServerNode>,
    caller: &Caller,
    on: &str,
    id: &str,
    service: &str,
) -> Result<(), Status> {
    let (on, id) = (on.to_string(), id.to_string());
    let existing = read(node, None, move |s| {
        s.instances
            .get(&on)
            .and_then(|m| m.get(&id))
            .map(|i| i.service.clone())
    })
    .await?;
    match existing {
        Some(old) if old != service => caller.require(Resource::Service(&old), Access::Write),
        _ => Ok(()),
    }
}
