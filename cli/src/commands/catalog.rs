//! `weft catalog nodes | services | service NAME | maintenance NODE`.
use clap::Subcommand;
use serde_json::json;
use weft_api::proto::catalog_client::CatalogClient;
use weft_api::proto::{GetServiceRequest, Health, ReadOptions};

use crate::client::{request, Ctx};
use crate::{output, Outcome};

#[derive(Subcommand)]
pub enum CatalogCmd {
    /// The registered nodes.
    Nodes,
    /// The services, their virtual IPs and instance counts.
    Services {
        /// Another datacenter of the federation (as this one last fetched
        /// it, through the gateways).
        #[arg(long)]
        dc: Option<String>,
    },
    /// One service's instances.
    Service {
        name: String,
        /// Another datacenter of the federation.
        #[arg(long)]
        dc: Option<String>,
    },
    /// Put a node in maintenance mode (critical: agents stop choosing its
    /// instances) or take it out (Consul's `maint`). Needs node:write.
    Maintenance {
        node: String,
        /// On (default) or off.
        #[arg(long, conflicts_with = "reason")]
        disable: bool,
        /// Shown as the node's health output.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

fn health_name(h: i32) -> &'static str {
    match Health::try_from(h) {
        Ok(Health::Passing) => "passing",
        Ok(Health::Warning) => "warning",
        Ok(Health::Critical) => "critical",
        _ => "unknown",
    }
}

fn pairs(map: &std::collections::HashMap<String, String>) -> String {
    let mut v: Vec<String> = map.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.sort();
    v.join(",")
}

/// A node's node-level check, by name (unspecified reads as passing).
fn node_health(n: &weft_api::proto::Node) -> &'static str {
    weft_api::convert::health_from_proto(n.health)
        .unwrap_or_default()
        .as_str()
}

pub async fn run(ctx: &Ctx, cmd: CatalogCmd) -> anyhow::Result<Outcome> {
    let read = ctx.read_options().unwrap_or_default();
    match cmd {
        CatalogCmd::Maintenance {
            node,
            disable,
            reason,
        } => {
            let req = weft_api::proto::NodeMaintenanceRequest {
                node: node.clone(),
                enable: !disable,
                reason,
            };
            let index = ctx
                .call(|ch| {
                    let req = req.clone();
                    async move {
                        CatalogClient::new(ch)
                            .set_node_maintenance(request(ctx, req))
                            .await
                    }
                })
                .await?
                .into_inner()
                .index;
            let what = if disable { "out of" } else { "in" };
            crate::commands::written(ctx, &format!("node {node} {what} maintenance"), index);
        }
        CatalogCmd::Nodes => {
            let list = ctx
                .call(|ch| {
                    let read = read.clone();
                    async move { CatalogClient::new(ch).list_nodes(request(ctx, read)).await }
                })
                .await?
                .into_inner();
            let rows = list
                .nodes
                .iter()
                .map(|n| {
                    vec![
                        n.name.clone(),
                        n.address.clone(),
                        n.datacenter.clone(),
                        node_health(n).to_string(),
                        pairs(&n.meta),
                    ]
                })
                .collect();
            let json = json!(list.nodes.iter().map(|n| json!({
                "name": n.name, "address": n.address, "datacenter": n.datacenter, "meta": n.meta,
                "health": node_health(n), "health_output": n.health_output,
                "create_index": n.create_index, "modify_index": n.modify_index,
            })).collect::<Vec<_>>());
            output::print(
                ctx,
                &["NODE", "ADDRESS", "DC", "HEALTH", "META"],
                rows,
                json,
            );
        }
        CatalogCmd::Services { dc } => {
            let read = ReadOptions {
                datacenter: dc.unwrap_or_default(),
                ..read
            };
            let list = ctx
                .call(|ch| {
                    let read = read.clone();
                    async move {
                        CatalogClient::new(ch)
                            .list_services(request(ctx, read))
                            .await
                    }
                })
                .await?
                .into_inner();
            let rows = list
                .services
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.vip.clone(),
                        s.instances.to_string(),
                        s.passing.to_string(),
                    ]
                })
                .collect();
            let json =
                json!(list.services.iter().map(|s| json!({
                "name": s.name, "vip": s.vip, "instances": s.instances, "passing": s.passing,
            })).collect::<Vec<_>>());
            output::print(ctx, &["SERVICE", "VIP", "INSTANCES", "PASSING"], rows, json);
        }
        CatalogCmd::Service { name, dc } => {
            let req = GetServiceRequest {
                name,
                read: ctx.read_options().map(|r| ReadOptions {
                    datacenter: dc.unwrap_or_default(),
                    ..r
                }),
            };
            let svc = ctx
                .call(|ch| {
                    let req = req.clone();
                    async move { CatalogClient::new(ch).get_service(request(ctx, req)).await }
                })
                .await?
                .into_inner();
            let rows = svc
                .instances
                .iter()
                .map(|i| {
                    vec![
                        i.id.clone(),
                        i.node.clone(),
                        format!("{}:{}", i.address, i.port),
                        health_name(i.health).to_string(),
                        i.tags.join(","),
                        pairs(&i.meta),
                    ]
                })
                .collect();
            let json = json!({
                "name": svc.name, "vip": svc.vip,
                "instances": svc.instances.iter().map(|i| json!({
                    "id": i.id, "node": i.node, "address": i.address, "port": i.port,
                    "health": health_name(i.health), "check_output": i.check_output,
                    "tags": i.tags, "meta": i.meta,
                    "create_index": i.create_index, "modify_index": i.modify_index,
                })).collect::<Vec<_>>(),
            });
            if ctx.format == crate::Format::Table {
                println!("service {} (vip {})", svc.name, svc.vip);
            }
            output::print(
                ctx,
                &["ID", "NODE", "ADDRESS", "HEALTH", "TAGS", "META"],
                rows,
                json,
            );
        }
    }
    Ok(Outcome::Ok)
}
