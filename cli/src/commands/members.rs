//! `weft members`: the servers of the cluster.
use serde_json::json;
use weft_api::proto::operator_client::OperatorClient;
use weft_api::proto::Empty;

use crate::client::{request, Ctx};
use crate::{output, Outcome};

pub async fn run(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let list = ctx
        .call(|ch| async move {
            OperatorClient::new(ch)
                .members(request(ctx, Empty {}))
                .await
        })
        .await?
        .into_inner();
    let rows = list
        .members
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.raft_addr.clone(),
                m.role.clone(),
                m.term.to_string(),
                m.last_log_index.to_string(),
                m.last_applied.to_string(),
            ]
        })
        .collect();
    let json = json!({
        "leader_id": list.leader_id,
        "members": list.members.iter().map(|m| json!({
            "id": m.id, "raft_addr": m.raft_addr, "role": m.role, "term": m.term,
            "last_log_index": m.last_log_index, "last_applied": m.last_applied,
        })).collect::<Vec<_>>(),
    });
    output::print(
        ctx,
        &["ID", "ADDRESS", "ROLE", "TERM", "LAST LOG", "APPLIED"],
        rows,
        json,
    );
    Ok(Outcome::Ok)
}

/// `weft members --wan`: the datacenters of the federation, which is the
/// primary, their gateways and when those last changed (`never`: known
/// only from `--primary-gateway`).
pub async fn wan(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let list = ctx
        .call(|ch| async move {
            OperatorClient::new(ch)
                .datacenters(request(ctx, Empty {}))
                .await
        })
        .await?
        .into_inner();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let age = |ms: i64| {
        if ms == 0 {
            "never".to_string()
        } else {
            format!("{}s ago", (now_ms - ms).max(0) / 1000)
        }
    };
    let rows = list
        .datacenters
        .iter()
        .map(|d| {
            let role = match (d.primary, d.local) {
                (true, true) => "primary (here)",
                (true, false) => "primary",
                (false, true) => "secondary (here)",
                (false, false) => "secondary",
            };
            vec![
                d.name.clone(),
                role.to_string(),
                d.gateways.join(","),
                age(d.updated_ms),
                if d.local {
                    "-".to_string()
                } else {
                    d.instances.to_string()
                },
            ]
        })
        .collect();
    let json = json!({
        "datacenters": list.datacenters.iter().map(|d| json!({
            "name": d.name, "primary": d.primary, "local": d.local,
            "gateways": d.gateways, "updated_ms": d.updated_ms, "instances": d.instances,
        })).collect::<Vec<_>>(),
    });
    output::print(
        ctx,
        &["DATACENTER", "ROLE", "GATEWAYS", "CHANGED", "INSTANCES"],
        rows,
        json,
    );
    Ok(Outcome::Ok)
}
