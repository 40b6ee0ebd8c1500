//! `weft.v1.Catalog`: nodes, service instances and their health.
use std::sync::Arc;

use tonic::{Request, Response, Status};
use weft_api::catalog::{validate_node, validate_service_instance};
use weft_api::convert::{
    health_from_proto, instance_from_proto, instance_to_proto, node_from_proto, node_to_proto,
};
use weft_api::names::validate_name;
use weft_api::proto::{self, catalog_server::Catalog};

use super::{invalid, read};
use crate::node::ServerNode;
use crate::state::Command;

pub struct CatalogApi(pub Arc<ServerNode>);

fn written(index: u64) -> Response<proto::WriteResult> {
    Response::new(proto::WriteResult { index })
}

#[tonic::async_trait]
impl Catalog for CatalogApi {
    async fn register_node(
        &self,
        req: Request<proto::RegisterNodeRequest>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let node = req
            .into_inner()
            .node
            .ok_or_else(|| invalid("node: missing"))?;
        let node = node_from_proto(node);
        validate_node(&node).map_err(invalid)?;
        Ok(written(self.0.write(Command::RegisterNode(node)).await?))
    }

    async fn deregister_node(
        &self,
        req: Request<proto::DeregisterNodeRequest>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let name = req.into_inner().name;
        validate_name(&name).map_err(|e| invalid(format!("name: {e}")))?;
        Ok(written(
            self.0.write(Command::DeregisterNode { name }).await?,
        ))
    }

    async fn register_service(
        &self,
        req: Request<proto::RegisterServiceRequest>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let instance = req
            .into_inner()
            .instance
            .ok_or_else(|| invalid("instance: missing"))?;
        let instance = instance_from_proto(instance).map_err(invalid)?;
        validate_service_instance(&instance).map_err(invalid)?;
        Ok(written(
            self.0.write(Command::RegisterService(instance)).await?,
        ))
    }

    async fn deregister_service(
        &self,
        req: Request<proto::DeregisterServiceRequest>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let r = req.into_inner();
        Ok(written(
            self.0
                .write(Command::DeregisterService {
                    node: r.node,
                    id: r.id,
                })
                .await?,
        ))
    }

    async fn update_health(
        &self,
        req: Request<proto::UpdateHealthRequest>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let r = req.into_inner();
        let health = health_from_proto(r.health).map_err(invalid)?;
        let cmd = Command::UpdateHealth {
            node: r.node,
            id: r.id,
            health,
            output: r.output,
        };
        Ok(written(self.0.write(cmd).await?))
    }

    async fn list_nodes(
        &self,
        req: Request<proto::ReadOptions>,
    ) -> Result<Response<proto::NodeList>, Status> {
        let list = read(&self.0, Some(req.into_inner()), |s| proto::NodeList {
            nodes: s.nodes.values().map(node_to_proto).collect(),
            index: s.index,
        })
        .await?;
        Ok(Response::new(list))
    }

    async fn list_services(
        &self,
        req: Request<proto::ReadOptions>,
    ) -> Result<Response<proto::ServiceList>, Status> {
        let list = read(&self.0, Some(req.into_inner()), |s| proto::ServiceList {
            services: s
                .service_names()
                .into_iter()
                .map(|name| {
                    let instances: Vec<_> = s.instances_of(&name).collect();
                    proto::ServiceSummary {
                        vip: s.vips.get(&name).map(|v| v.to_string()).unwrap_or_default(),
                        instances: instances.len() as u32,
                        passing: instances
                            .iter()
                            .filter(|i| i.health == weft_api::catalog::HealthStatus::Passing)
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
        let r = req.into_inner();
        let name = r.name;
        let service = read(&self.0, r.read, |s| {
            let vip = s.vips.get(&name)?;
            Some(proto::Service {
                name: name.clone(),
                vip: vip.to_string(),
                instances: s.instances_of(&name).map(instance_to_proto).collect(),
            })
        })
        .await?;
        service
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("service {name:?} is not registered")))
    }
}
