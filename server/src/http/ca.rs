//! `/v1/connect/ca/roots`: the mesh CA's roots as Consul shows them (the
//! certificates only: a root's key never leaves the state), for any token
//! that reads a service, as `Ca.Roots`.
use hyper::Method;
use serde_json::json;
use weft_api::acl::ResourceKind;

use super::{json_at, only, Answer, Call, HttpError};
use crate::node::ServerNode;

pub async fn roots(node: &ServerNode, call: &Call) -> Answer {
    only(call, Method::GET)?;
    call.only_params(&[])?;
    let caller = call.caller(node).await?;
    caller.require_any_read(ResourceKind::Service)?;
    let (ca, index) = crate::grpc::read(node, call.read(), |s| (s.ca.clone(), s.index)).await?;
    let ca = ca.ok_or_else(|| {
        HttpError::new(
            hyper::StatusCode::SERVICE_UNAVAILABLE,
            "the mesh CA is not initialized yet",
        )
    })?;
    let active = ca.roots.last().map(|r| r.serial);
    let roots: Vec<_> = ca
        .roots
        .iter()
        .map(|r| {
            json!({
                "ID": r.serial.to_string(),
                "Name": format!("weft CA root {}", r.serial),
                "SerialNumber": r.serial,
                "RootCert": r.cert_pem,
                "NotAfter": r.not_after,
                "Active": Some(r.serial) == active,
            })
        })
        .collect();
    Ok(json_at(
        index,
        &json!({
            "ActiveRootID": active.map(|s| s.to_string()).unwrap_or_default(),
            "TrustDomain": ca.trust_domain,
            "Roots": roots,
        }),
    ))
}
