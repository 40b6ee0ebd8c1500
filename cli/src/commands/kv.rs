//! `weft kv put KEY VALUE [--cas INDEX] [--base64] | get KEY [--base64] |
//! list PREFIX | delete KEY`. Values are bytes: `get` writes them to stdout
//! as they are (then a newline, as Consul's CLI does), or in base64; JSON
//! output carries `value_base64` always and `value` when the bytes are
//! UTF-8.
use std::io::Write;

use base64::Engine;
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
        /// VALUE (or stdin) is base64: the bytes it encodes are written.
        #[arg(long)]
        base64: bool,
    },
    /// Print a key's value (its bytes as they are).
    Get {
        key: String,
        /// Print the value in base64.
        #[arg(long)]
        base64: bool,
    },
    /// Keys under a prefix.
    List {
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Remove a key, or with --recurse every key that starts with KEY
    /// (which needs write on all of them).
    Delete {
        key: String,
        #[arg(long, conflicts_with = "recurse")]
        cas: Option<u64>,
        #[arg(long)]
        recurse: bool,
    },
}

const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// An entry as JSON: `value` only when the bytes are UTF-8 (never a lossy
/// copy), `value_base64` always.
fn entry_json(e: &weft_api::proto::KvEntry) -> serde_json::Value {
    let mut v = json!({
        "key": e.key,
        "value_base64": BASE64.encode(&e.value),
        "create_index": e.create_index,
        "modify_index": e.modify_index,
    });
    if let Ok(text) = std::str::from_utf8(&e.value) {
        v["value"] = text.into();
    }
    v
}

pub async fn run(ctx: &Ctx, cmd: KvCmd) -> anyhow::Result<Outcome> {
    match cmd {
        KvCmd::Put {
            key,
            value,
            cas,
            base64,
        } => {
            let value = if value == "-" {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
                buf
            } else {
                value.into_bytes()
            };
            let value = if base64 {
                // Without the line breaks `base64` puts every 76 characters.
                let text: String = String::from_utf8_lossy(&value)
                    .chars()
                    .filter(|c| !c.is_ascii_whitespace())
                    .collect();
                BASE64
                    .decode(text)
                    .map_err(|e| anyhow::anyhow!("--base64: the value is not base64: {e}"))?
            } else {
                value
            };
            let req = KvPutRequest {
                key: key.clone(),
                value,
                cas,
                ..Default::default()
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
        KvCmd::Get { key, base64 } => {
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
                crate::Format::Table if base64 => println!("{}", BASE64.encode(&e.value)),
                crate::Format::Table => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&e.value)?;
                    out.write_all(b"\n")?;
                    out.flush()?;
                }
                crate::Format::Json => {
                    println!("{}", serde_json::to_string_pretty(&entry_json(&e))?)
                }
            }
        }
        KvCmd::List { prefix } => {
            // Page after page: a large store never comes in one message.
            // The next page starts where the last one says.
            let mut list = weft_api::proto::KvList::default();
            let mut after = String::new();
            loop {
                let req = KvListRequest {
                    prefix: prefix.clone(),
                    read: ctx.read_options(),
                    after: after.clone(),
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
                after = page.next;
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
            let json = json!(list.entries.iter().map(entry_json).collect::<Vec<_>>());
            output::print(ctx, &["KEY", "BYTES", "INDEX"], rows, json);
        }
        KvCmd::Delete { key, cas, recurse } => {
            let req = KvDeleteRequest {
                key: key.clone(),
                cas,
                recurse,
            };
            let index = ctx
                .call(|ch| {
                    let req = req.clone();
                    async move { KvClient::new(ch).delete(request(ctx, req)).await }
                })
                .await?
                .into_inner()
                .index;
            let what = if recurse {
                format!("keys under {key:?} deleted")
            } else {
                format!("{key} deleted")
            };
            written(ctx, &what, index);
        }
    }
    Ok(Outcome::Ok)
}
