//! The `service-intentions` kind of `weft.v1.Config`: a view of the
//! intentions of one destination (see `weft_api::service_intentions`).
//! Writing, reading and deleting one need `intentions:write` / `:read` on
//! its destination, as the intentions themselves do.
use tonic::Status;
use weft_api::acl::Access;
use weft_api::intention::{check_intention_paths, Intention};
use weft_api::proto;
use weft_api::service_intentions::{self as si, ServiceIntentions};

use super::auth::Caller;
use super::intentions::require;
use super::invalid;
use crate::node::ServerNode;
use crate::state::{Command, State};

/// The entry of `destination` as stored intentions make it, if any.
pub fn entry(state: &State, destination: &str) -> Option<proto::ConfigEntry> {
    let of: Vec<&Intention> = state
        .all_intentions()
        .filter(|i| i.destination == destination)
        .collect();
    (!of.is_empty()).then(|| entry_of(destination, &of))
}

/// The entry `of` (the intentions of `destination`, at least one) make.
fn entry_of(destination: &str, of: &[&Intention]) -> proto::ConfigEntry {
    let view = ServiceIntentions::from_intentions(destination, of);
    proto::ConfigEntry {
        kind: si::KIND.into(),
        name: destination.into(),
        json: serde_json::to_string(&view).unwrap_or_default(),
        create_index: of.iter().map(|i| i.create_index).min().unwrap_or(0),
        modify_index: of.iter().map(|i| i.modify_index).max().unwrap_or(0),
    }
}

/// Every destination's entry the caller may read, grouped in one pass.
pub fn entries(state: &State, caller: &Caller) -> Vec<proto::ConfigEntry> {
    let mut by_destination: std::collections::BTreeMap<&str, Vec<&Intention>> =
        std::collections::BTreeMap::new();
    for i in state.all_intentions() {
        by_destination.entry(&i.destination).or_default().push(i);
    }
    by_destination
        .into_iter()
        .filter(|(d, _)| require(caller, d, Access::Read).is_ok())
        .map(|(d, of)| entry_of(d, &of))
        .collect()
}

/// The write of a `service-intentions` document: the destination's
/// intentions become its sources.
pub async fn write(
    node: &ServerNode,
    caller: &Caller,
    doc: serde_json::Value,
) -> Result<proto::WriteResult, Status> {
    // Rights on the document's destination before it is judged, and on
    // the parsed one after.
    let named = weft_api::config_entry::document_name(&doc)
        .unwrap_or_default()
        .to_string();
    require(caller, &named, Access::Write)?;
    let entry = super::off_workers(move || si::from_document(doc))
        .await?
        .map_err(invalid)?;
    require(caller, &entry.name, Access::Write)?;
    let (entry, intentions) = super::off_workers(move || {
        let intentions = entry.to_intentions();
        (entry, intentions)
    })
    .await?;
    let intentions = intentions.map_err(invalid)?;
    for intention in &intentions {
        check_intention_paths(intention)
            .map_err(|e| invalid(format!("Sources (Name {:?}): {e}", intention.source)))?;
    }
    {
        let state = node.shared.state.read().expect("state lock");
        (node.limits).check_intentions(&state, &entry.name, intentions.len())?;
    }
    let what = format!("config {}/{}", si::KIND, entry.name);
    let cmd = Command::ReplaceIntentions {
        destination: entry.name,
        intentions,
    };
    super::write(node, caller, &what, cmd).await
}

/// The delete of a `service-intentions` entry: every intention of
/// `destination`.
pub async fn delete(
    node: &ServerNode,
    caller: &Caller,
    destination: String,
) -> Result<proto::WriteResult, Status> {
    require(caller, &destination, Access::Write)?;
    let exists = node
        .shared
        .state
        .read()
        .expect("state lock")
        .all_intentions()
        .any(|i| i.destination == destination);
    if !exists {
        return Err(Status::not_found(format!(
            "no config entry {}/{destination}",
            si::KIND
        )));
    }
    let what = format!("delete config {}/{destination}", si::KIND);
    let cmd = Command::ReplaceIntentions {
        destination,
        intentions: Vec::new(),
    };
    super::write(node, caller, &what, cmd).await
}
