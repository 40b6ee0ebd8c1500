//! `weft intention create | list | get | delete | check`.
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;
use serde_json::json;
use weft_api::convert::{intention_from_proto, intention_to_proto};
use weft_api::file_format::FileFormat;
use weft_api::intention::{parse_permissions_file, validate_intention, Intention, IntentionAction};
use weft_api::proto::intentions_client::IntentionsClient;
use weft_api::proto::{CheckRequest, GetIntentionRequest, IntentionRef, UpsertIntentionRequest};

use super::written;
use crate::client::{request, Ctx};
use crate::{output, Outcome};

#[derive(Subcommand)]
pub enum IntentionCmd {
    /// Create or replace the intention SRC => DST.
    Create {
        source: String,
        destination: String,
        #[arg(long, conflicts_with_all = ["deny", "file"])]
        allow: bool,
        #[arg(long, conflicts_with = "file")]
        deny: bool,
        #[arg(long, default_value = "")]
        description: String,
        /// L7 permissions (TOML or JSON with `Permissions = [...]`).
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Every intention.
    List,
    /// One intention.
    Get { source: String, destination: String },
    /// Remove the intention SRC => DST.
    Delete { source: String, destination: String },
    /// Would SRC reach DST? Exit 0 allowed, 1 denied, 2 error.
    Check {
        source: String,
        destination: String,
        #[arg(long)]
        method: Option<String>,
        #[arg(long)]
        path: Option<String>,
        /// A request header NAME=VALUE (repeatable).
        #[arg(long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
    },
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("`{s}`: a header is NAME=VALUE"))
}

fn action_text(i: &Intention) -> String {
    match i.action {
        Some(a) => a.to_string(),
        None => format!("L7 ({} permissions)", i.permissions.len()),
    }
}

fn intention_json(i: &Intention) -> serde_json::Value {
    serde_json::to_value(i).unwrap_or_default()
}

pub async fn run(ctx: &Ctx, cmd: IntentionCmd) -> anyhow::Result<Outcome> {
    match cmd {
        IntentionCmd::Create {
            source,
            destination,
            allow,
            deny,
            description,
            file,
        } => {
            let (action, permissions) = match (&file, allow, deny) {
                (Some(path), _, _) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("{}", path.display()))?;
                    let format =
                        FileFormat::from_path(path).unwrap_or_else(|| FileFormat::sniff(&text));
                    let perms = parse_permissions_file(&text, format)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                    (None, perms)
                }
                (None, true, false) => (Some(IntentionAction::Allow), Vec::new()),
                (None, false, true) => (Some(IntentionAction::Deny), Vec::new()),
                _ => bail!("say --allow, --deny or --file L7.toml"),
            };
            let intention = Intention {
                source,
                destination,
                action,
                permissions,
                description,
                create_index: 0,
                modify_index: 0,
            };
            validate_intention(&intention)?;
            let req = UpsertIntentionRequest {
                intention: Some(intention_to_proto(&intention)),
            };
            let index = ctx
                .call(|ch| {
                    let req = req.clone();
                    async move { IntentionsClient::new(ch).upsert(request(ctx, req)).await }
                })
                .await?
                .into_inner()
                .index;
            written(
                ctx,
                &format!(
                    "intention {} => {} written",
                    intention.source, intention.destination
                ),
                index,
            );
        }
        IntentionCmd::List => {
            let read = ctx.read_options().unwrap_or_default();
            let list = ctx
                .call(|ch| {
                    let read = read.clone();
                    async move { IntentionsClient::new(ch).list(request(ctx, read)).await }
                })
                .await?
                .into_inner();
            let mut intentions = list
                .intentions
                .into_iter()
                .map(intention_from_proto)
                .collect::<Result<Vec<_>, _>>()?;
            weft_api::intention::sort_by_precedence(&mut intentions);
            let rows = intentions
                .iter()
                .map(|i| {
                    vec![
                        i.source.clone(),
                        i.destination.clone(),
                        action_text(i),
                        i.precedence().to_string(),
                        i.description.clone(),
                    ]
                })
                .collect();
            let json = json!(intentions.iter().map(intention_json).collect::<Vec<_>>());
            output::print(
                ctx,
                &[
                    "SOURCE",
                    "DESTINATION",
                    "ACTION",
                    "PRECEDENCE",
                    "DESCRIPTION",
                ],
                rows,
                json,
            );
        }
        IntentionCmd::Get {
            source,
            destination,
        } => {
            let req = GetIntentionRequest {
                r#ref: Some(IntentionRef {
                    source,
                    destination,
                }),
                read: ctx.read_options(),
            };
            let got = ctx
                .call(|ch| {
                    let req = req.clone();
                    async move { IntentionsClient::new(ch).get(request(ctx, req)).await }
                })
                .await?
                .into_inner();
            let i = intention_from_proto(got)?;
            let rows = vec![vec![
                i.source.clone(),
                i.destination.clone(),
                action_text(&i),
                i.description.clone(),
                i.modify_index.to_string(),
            ]];
            output::print(
                ctx,
                &["SOURCE", "DESTINATION", "ACTION", "DESCRIPTION", "INDEX"],
                rows,
                intention_json(&i),
            );
            if ctx.format == crate::Format::Table {
                for (n, p) in i.permissions.iter().enumerate() {
                    println!(
                        "  permission {n}: {} {}",
                        p.action,
                        serde_json::to_string(&p.http).unwrap_or_default()
                    );
                }
            }
        }
        IntentionCmd::Delete {
            source,
            destination,
        } => {
            let req = IntentionRef {
                source: source.clone(),
                destination: destination.clone(),
            };
            let index = ctx
                .call(|ch| {
                    let req = req.clone();
                    async move { IntentionsClient::new(ch).delete(request(ctx, req)).await }
                })
                .await?
                .into_inner()
                .index;
            written(
                ctx,
                &format!("intention {source} => {destination} deleted"),
                index,
            );
        }
        IntentionCmd::Check {
            source,
            destination,
            method,
            path,
            headers,
        } => {
            if method.is_none() && (path.is_some() || !headers.is_empty()) {
                bail!("--path and --header describe an HTTP request: give --method too");
            }
            let req = CheckRequest {
                source,
                destination,
                method: method.unwrap_or_default(),
                path: path.unwrap_or_default(),
                headers: headers.into_iter().collect(),
                read: ctx.read_options(),
            };
            let answer = ctx
                .call(|ch| {
                    let req = req.clone();
                    async move { IntentionsClient::new(ch).check(request(ctx, req)).await }
                })
                .await?
                .into_inner();
            let json = json!({
                "allowed": answer.allowed,
                "reason": answer.reason,
                "decided_by": answer.decided_by.as_ref().map(|r| json!({"source": r.source, "destination": r.destination})),
                "permission_index": answer.permission_index,
            });
            output::message(ctx, &answer.reason, json);
            return Ok(if answer.allowed {
                Outcome::Ok
            } else {
                Outcome::No
            });
        }
    }
    Ok(Outcome::Ok)
}
