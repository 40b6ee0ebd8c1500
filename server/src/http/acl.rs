//! `/v1/acl/token/self`: the calling token as Consul shows it, without
//! `SecretID` (servers keep only its hash). The UI's login asks this.
use hyper::Method;
use serde_json::json;
use weft_api::proto::acl_server::Acl;

use super::{json_at, only, Answer, Call};
use crate::grpc::acl::AclApi;
use crate::node::ServerNode;

pub async fn token_self(node: &std::sync::Arc<ServerNode>, call: &Call) -> Answer {
    only(call, Method::GET)?;
    call.only_params(&[])?;
    let t = AclApi(node.clone())
        .token_self(call.grpc(weft_api::proto::Empty {}))
        .await?
        .into_inner();
    let policies: Vec<_> = t.policies.iter().map(|p| json!({ "Name": p })).collect();
    let services: Vec<_> = t
        .service_identities
        .iter()
        .map(|s| json!({ "ServiceName": s }))
        .collect();
    let nodes: Vec<_> = t
        .node_identities
        .iter()
        .map(|n| json!({ "NodeName": n.node_name, "Datacenter": n.datacenter }))
        .collect();
    Ok(json_at(
        t.modify_index,
        &json!({
            "AccessorID": t.accessor_id,
            "Description": t.description,
            "Policies": policies,
            "ServiceIdentities": services,
            "NodeIdentities": nodes,
            "CreateIndex": t.create_index,
            "ModifyIndex": t.modify_index,
        }),
    ))
}
