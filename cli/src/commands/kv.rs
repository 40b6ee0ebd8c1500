//! `weft kv put KEY VALUE [--cas INDEX] | get KEY | list PREFIX | delete KEY`.
use clap::Subcommand;
use serde_json::json;
use weft_api::proto::kv_client::KvClient;
use weft_api::proto::{KvDeleteRequest, KvGetRequest, KvListRequest, KvPutRequest};

use super::written;
use crate::client::{request, Ctx};
use crate::{output, Outcome};

#[derive(Subcommand)]
pub enum KvCmd {
    /// Set KEY to VALUE (`-` reads the value from stdin).
    Put {
        key: String,
        value: String,
        /// Write only if the key's modify index is this (0: only if absent).
        #[arg(long)]
        cas: Option<u64>,
    },
    /// Print a key's value.
    Get { key: String },
    /// Keys under a prefix.
    List {
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Remove a key.
    Delete {
        key: String,
        #[arg(long)]
        cas: Option<u64>,
    },
}

pub async fn run(ctx: &Ctx, cmd: KvCmd) -> anyhow::Result<Outcome> {
    match cmd {
        KvCmd::Put { key, value, cas } => {
            let value = if value == "-" {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
                buf
            } else {
                value.into_bytes()
            };
            let req = KvPutRequest {
                key: key.clone(),
                value,
                cas,
            };
            let index = ctx
                .call(|ch| {
                    let req = req.clone();
                    async move { KvClient::new(ch).put(request(ctx, req)).await }
                })
                .await?
                .into_inner()
                .index;
            written(ctx, &format!("{key} written"), index);
        }
        KvCmd::Get { key } => {
            let req = KvGetRequest {
                key,
                read: ctx.read_options(),
            };
            let e = ctx
                .call(|ch| {
                    let req = req.clone();
                    async move { KvClient::new(ch).get(request(ctx, req)).await }
                })
                .await?
                .into_inner();
            match ctx.format {
                crate::Format::Table => println!("{}", String::from_utf8_lossy(&e.value)),
                crate::Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "key": e.key, "value": String::from_utf8_lossy(&e.value),
                        "create_index": e.create_index, "modify_index": e.modify_index,
                    }))?
                ),
            }
        }
        KvCmd::List { prefix } => {
            // Page after page: a large store never comes in one message.
            let mut list = weft_api::proto::KvList::default();
            loop {
                let req = KvListRequest {
                    prefix: prefix.clone(),
                    read: ctx.read_options(),
                    after: list
                        .entries
                        .last()
                        .map(|e| e.key.clone())
                        .unwrap_or_default(),
                    limit: 0,
                };
                let page = ctx
                    .call(|ch| {
                        let req = req.clone();
                        async move { KvClient::new(ch).list(request(ctx, req)).await }
                    })
                    .await?
                    .into_inner();
                list.entries.extend(page.entries);
                list.index = page.index;
                if page.next.is_empty() {
                    break;
                }
            }
            let rows = list
                .entries
                .iter()
                .map(|e| {
                    vec![
                        e.key.clone(),
                        e.value.len().to_string(),
                        e.modify_index.to_string(),
                    ]
                })
                .collect();
            let json = json!(list
                .entries
                .iter()
                .map(|e| json!({
                    "key": e.key, "value": String::from_utf8_lossy(&e.value),
                    "create_index": e.create_index, "modify_index": e.modify_index,
                }))
                .collect::<Vec<_>>());
            output::print(ctx, &["KEY", "BYTES", "INDEX"], rows, json);
        }
        KvCmd::Delete { key, cas } => {
            let req = KvDeleteRequest {
                key: key.clone(),
                cas,
            };
            let index = ctx
                .call(|ch| {
                    let req = req.clone();
                    async move { KvClient::new(ch).delete(request(ctx, req)).await }
                })
                .await?
                .into_inner()
                .index;
            written(ctx, &format!("{key} deleted"), index);
        }
    }
    Ok(Outcome::Ok)
}
