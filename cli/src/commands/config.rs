//! `weft config write FILE | read KIND NAME | list [KIND] | delete KIND NAME`.
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;
use weft_api::config_entry::parse_entry_file;
use weft_api::file_format::FileFormat;
use weft_api::proto::config_client::ConfigClient;
use weft_api::proto::{
    ConfigEntry, ConfigRef, ListConfigRequest, ReadConfigRequest, WriteConfigRequest,
};
use weft_api::service_intentions;

use super::written;
use crate::client::{request, Ctx};
use crate::{output, Outcome};

#[derive(Subcommand)]
pub enum ConfigCmd {
    /// Write an entry from a TOML or JSON file.
    Write { file: PathBuf },
    /// One entry, as JSON.
    Read { kind: String, name: String },
    /// Every entry, or those of one kind.
    List { kind: Option<String> },
    /// Remove an entry.
    Delete { kind: String, name: String },
}

fn entry_json(e: &ConfigEntry) -> serde_json::Value {
    let body: serde_json::Value = serde_json::from_str(&e.json).unwrap_or_default();
    json!({ "entry": body, "create_index": e.create_index, "modify_index": e.modify_index })
}

/// A config file as the JSON document the servers take, checked here
/// first (a `service-intentions` entry, or one of the other kinds), with
/// its kind and name.
fn entry_document(text: &str, format: FileFormat) -> anyhow::Result<(String, String, String)> {
    let doc: serde_json::Value =
        weft_api::file_format::parse_document(text, format).map_err(|e| anyhow::anyhow!("{e}"))?;
    if service_intentions::is_service_intentions(&doc) {
        let entry = service_intentions::from_document(doc)?;
        entry.to_intentions()?;
        let json = serde_json::to_string(&entry)?;
        return Ok((service_intentions::KIND.into(), entry.name, json));
    }
    let entry = parse_entry_file(text, format)?;
    let json = serde_json::to_string(&entry)?;
    Ok((entry.kind().as_str().into(), entry.name().into(), json))
}

pub async fn run(ctx: &Ctx, cmd: ConfigCmd) -> anyhow::Result<Outcome> {
    match cmd {
        ConfigCmd::Write { file } => {
            let text =
                std::fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?;
            let format = FileFormat::from_path(&file).unwrap_or_else(|| FileFormat::sniff(&text));
            let (kind, name, json) = entry_document(&text, format)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let req = WriteConfigRequest { json };
            let index = ctx
                .call(|ch| {
                    let req = req.clone();
                    async move { ConfigClient::new(ch).write(request(ctx, req)).await }
                })
                .await?
                .into_inner()
                .index;
            written(ctx, &format!("{kind} {name} written"), index);
        }
        ConfigCmd::Read { kind, name } => {
            let req = ReadConfigRequest {
                r#ref: Some(ConfigRef { kind, name }),
                read: ctx.read_options(),
            };
            let e = ctx
                .call(|ch| {
                    let req = req.clone();
                    async move { ConfigClient::new(ch).read(request(ctx, req)).await }
                })
                .await?
                .into_inner();
            // An entry is a document: both formats print it as JSON.
            println!("{}", serde_json::to_string_pretty(&entry_json(&e))?);
        }
        ConfigCmd::List { kind } => {
            let req = ListConfigRequest {
                kind: kind.unwrap_or_default(),
                read: ctx.read_options(),
            };
            let list = ctx
                .call(|ch| {
                    let req = req.clone();
                    async move { ConfigClient::new(ch).list(request(ctx, req)).await }
                })
                .await?
                .into_inner();
            let rows = list
                .entries
                .iter()
                .map(|e| vec![e.kind.clone(), e.name.clone(), e.modify_index.to_string()])
                .collect();
            let json = json!(list.entries.iter().map(entry_json).collect::<Vec<_>>());
            output::print(ctx, &["KIND", "NAME", "INDEX"], rows, json);
        }
        ConfigCmd::Delete { kind, name } => {
            let req = ConfigRef {
                kind: kind.clone(),
                name: name.clone(),
            };
            let index = ctx
                .call(|ch| {
                    let req = req.clone();
                    async move { ConfigClient::new(ch).delete(request(ctx, req)).await }
                })
                .await?
                .into_inner()
                .index;
            written(ctx, &format!("{kind} {name} deleted"), index);
        }
    }
    Ok(Outcome::Ok)
}
