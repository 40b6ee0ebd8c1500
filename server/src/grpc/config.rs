//! `weft.v1.Config`: config entries, as JSON documents with Consul's fields.
//!
//! Every kind weft has is about one service, named by the entry: writing
//! needs `service:write` on it (and `service:read` on every service its
//! routes, splits, redirect or failover send traffic to), reading
//! `service:read`; lists are filtered. The `service-intentions` kind is a
//! view of the intentions of one destination ([`super::config_intentions`]).
use std::sync::Arc;

use tonic::{Request, Response, Status};
use weft_api::acl::{Access, Resource, ResourceKind};
use weft_api::config_entry::{check_entry_paths, parse_entry_file, EntryKind, StoredEntry};
use weft_api::file_format::FileFormat;
use weft_api::proto::{self, config_server::Config};
use weft_api::service_intentions::{self as si, is_service_intentions};

use super::auth::{caller, Caller};
use super::config_intentions;
use super::{invalid, read, write};
use crate::node::ServerNode;
use crate::state::Command;

pub struct ConfigApi(pub Arc<ServerNode>);

/// A stored entry as its protobuf message (the entry as JSON).
pub fn entry_to_proto(e: &StoredEntry) -> proto::ConfigEntry {
    proto::ConfigEntry {
        kind: e.entry.kind().as_str().to_string(),
        name: e.entry.name().to_string(),
        json: serde_json::to_string(&e.entry).unwrap_or_default(),
        create_index: e.create_index,
        modify_index: e.modify_index,
    }
}

/// What an entry of `kind` named `name` is guarded by: the mesh for
/// proxy-defaults (Consul's `mesh` rule), else the service it is about.
fn entry_resource<'a>(kind: &str, name: &'a str) -> Resource<'a> {
    if kind == EntryKind::ProxyDefaults.as_str() {
        Resource::Mesh
    } else {
        Resource::Service(name)
    }
}

/// Whether `caller` may read an entry of `kind` named `name`. proxy-defaults
/// shapes every service's traffic and holds no secret: read on the mesh or
/// on any service will do (Consul lets any token read it), so that every
/// agent sees it. Another entry takes read on its service.
pub(super) fn may_read_entry(caller: &Caller, kind: &str, name: &str) -> bool {
    match entry_resource(kind, name) {
        Resource::Mesh => {
            caller.can(Resource::Mesh, Access::Read) || caller.can_read_any(ResourceKind::Service)
        }
        resource => caller.can(resource, Access::Read),
    }
}

fn check_kind(kind: &str) -> Result<(), Status> {
    kind.parse::<EntryKind>().map(|_| ()).map_err(invalid)
}

/// A written document as first read: a `service-intentions` entry (kept,
/// to be judged as intentions), or another's kind and name as it spells
/// them (empty when it has none, or is not JSON).
enum Document {
    Intentions(serde_json::Value),
    Other { kind: String, name: String },
}

impl Document {
    fn read(json: &str) -> Self {
        let doc = serde_json::from_str::<serde_json::Value>(json).ok();
        match doc {
            Some(doc) if is_service_intentions(&doc) => Document::Intentions(doc),
            doc => {
                let field = |f: fn(&serde_json::Value) -> Option<&str>| {
                    doc.as_ref().and_then(f).unwrap_or_default().to_string()
                };
                Document::Other {
                    kind: field(weft_api::config_entry::document_kind),
                    name: field(weft_api::config_entry::document_name),
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Config for ConfigApi {
    async fn write(
        &self,
        req: Request<proto::WriteConfigRequest>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let caller = caller(&self.0, &req).await?;
        let json = req.into_inner().json;
        self.0.limits.check_entry_size(json.len())?;
        let (json, doc) = super::off_workers(move || {
            let doc = Document::read(&json);
            (json, doc)
        })
        .await?;
        let (kind, name) = match doc {
            Document::Intentions(doc) => {
                let done = config_intentions::write(&self.0, &caller, doc).await?;
                return Ok(Response::new(done));
            }
            Document::Other { kind, name } => (kind, name),
        };
        // The name is checked before the document is judged, so that a
        // caller without the right learns nothing from validation errors.
        caller.require(entry_resource(&kind, &name), Access::Write)?;
        let entry = super::off_workers(move || parse_entry_file(&json, FileFormat::Json))
            .await?
            .map_err(invalid)?;
        check_entry_paths(&entry).map_err(invalid)?;
        self.0.limits.check_entry(&entry)?;
        // And the entry as parsed, whatever the document's spelling; as in
        // Consul, sending traffic to a service needs read on it.
        caller.require(
            entry_resource(entry.kind().as_str(), entry.name()),
            Access::Write,
        )?;
        for other in entry.referenced_services() {
            caller.require(Resource::Service(other), Access::Read)?;
        }
        let what = format!("config {}/{}", entry.kind().as_str(), entry.name());
        let cmd = Command::WriteConfig(entry);
        Ok(Response::new(write(&self.0, &caller, &what, cmd).await?))
    }

    async fn read(
        &self,
        req: Request<proto::ReadConfigRequest>,
    ) -> Result<Response<proto::ConfigEntry>, Status> {
        let caller = caller(&self.0, &req).await?;
        let r = req.into_inner();
        let key = r.r#ref.unwrap_or_default();
        if key.kind == si::KIND {
            super::intentions::require(&caller, &key.name, Access::Read)?;
            let found = read(&self.0, r.read, |s| config_intentions::entry(s, &key.name)).await?;
            return found.map(Response::new).ok_or_else(|| {
                Status::not_found(format!("no config entry {}/{}", key.kind, key.name))
            });
        }
        if !may_read_entry(&caller, &key.kind, &key.name) {
            caller.require(entry_resource(&key.kind, &key.name), Access::Read)?;
        }
        check_kind(&key.kind)?;
        let found = read(&self.0, r.read, |s| {
            s.config
                .get(&key.kind)
                .and_then(|m| m.get(&key.name))
                .map(entry_to_proto)
        })
        .await?;
        found
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no config entry {}/{}", key.kind, key.name)))
    }

    async fn list(
        &self,
        req: Request<proto::ListConfigRequest>,
    ) -> Result<Response<proto::ConfigList>, Status> {
        let caller = caller(&self.0, &req).await?;
        caller.require_any_read(ResourceKind::Service)?;
        let r = req.into_inner();
        if !r.kind.is_empty() && r.kind != si::KIND {
            check_kind(&r.kind)?;
        }
        let list = read(&self.0, r.read, |s| {
            let mut entries: Vec<proto::ConfigEntry> = s
                .config
                .iter()
                .filter(|(kind, _)| r.kind.is_empty() || **kind == r.kind)
                .flat_map(|(_, m)| m.values())
                .filter(|e| may_read_entry(&caller, e.entry.kind().as_str(), e.entry.name()))
                .map(entry_to_proto)
                .collect();
            if r.kind.is_empty() || r.kind == si::KIND {
                entries.extend(config_intentions::entries(s, &caller));
            }
            proto::ConfigList {
                entries,
                index: s.index,
            }
        })
        .await?;
        Ok(Response::new(list))
    }

    async fn delete(
        &self,
        req: Request<proto::ConfigRef>,
    ) -> Result<Response<proto::WriteResult>, Status> {
        let caller = caller(&self.0, &req).await?;
        let r = req.into_inner();
        if r.kind == si::KIND {
            let done = config_intentions::delete(&self.0, &caller, r.name).await?;
            return Ok(Response::new(done));
        }
        caller.require(entry_resource(&r.kind, &r.name), Access::Write)?;
        check_kind(&r.kind)?;
        let what = format!("delete config {}/{}", r.kind, r.name);
        let cmd = Command::DeleteConfig {
            kind: r.kind,
            name: r.name,
        };
        Ok(Response::new(write(&self.0, &caller, &what, cmd).await?))
    }
}
