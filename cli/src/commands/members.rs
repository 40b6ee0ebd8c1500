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
