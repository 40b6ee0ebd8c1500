//! `weft acl …`: bootstrap, policies and tokens (Consul's ACL model).
//!
//! `weft acl bootstrap` prints the first management token's secret once;
//! `token create` prints a new token's secret once. Servers keep only
//! hashes of secrets, so a lost secret is replaced, not recovered.
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;
use serde_json::json;
use weft_api::proto::acl_client::AclClient;
use weft_api::proto::{AclNodeIdentity, AclPolicy, AclRef, AclToken, Empty};

use super::written;
use crate::client::{request, Ctx};
use crate::{output, Outcome};

#[derive(Subcommand)]
pub enum AclCmd {
    /// Create the first management token (once per cluster).
    Bootstrap,
    /// ACL policies: named rules in Consul's rule language (HCL or JSON).
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// ACL tokens: linked policies and node or service identities.
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Create a policy.
    Create {
        #[arg(long)]
        name: String,
        /// The rules, or @FILE to read them from a file.
        #[arg(long)]
        rules: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Replace a policy's rules (and description) by id or name.
    Update {
        id_or_name: String,
        #[arg(long)]
        rules: String,
        #[arg(long)]
        description: Option<String>,
    },
    List,
    Read {
        id_or_name: String,
    },
    Delete {
        id_or_name: String,
    },
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a token; prints its secret once.
    Create {
        /// A policy to link, by name or id (repeat).
        #[arg(long = "policy")]
        policies: Vec<String>,
        /// A node identity NODE:DATACENTER (repeat).
        #[arg(long = "node-identity", value_parser = parse_node_identity)]
        node_identities: Vec<AclNodeIdentity>,
        /// A service identity, SERVICE (repeat).
        #[arg(long = "service-identity")]
        service_identities: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Replace a token's links, by accessor id (its secret stays).
    Update {
        accessor_id: String,
        #[arg(long = "policy")]
        policies: Vec<String>,
        #[arg(long = "node-identity", value_parser = parse_node_identity)]
        node_identities: Vec<AclNodeIdentity>,
        #[arg(long = "service-identity")]
        service_identities: Vec<String>,
        #[arg(long)]
        description: Option<String>,
    },
    List,
    Read {
        accessor_id: String,
    },
    /// The token this command runs with.
    #[command(name = "self")]
    Myself,
    Delete {
        accessor_id: String,
    },
}

fn parse_node_identity(s: &str) -> Result<AclNodeIdentity, String> {
    let (node, dc) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}`: a node identity is NODE:DATACENTER"))?;
    Ok(AclNodeIdentity {
        node_name: node.to_string(),
        datacenter: dc.to_string(),
    })
}

/// `--rules TEXT` or `--rules @FILE`.
fn rules_text(arg: &str) -> anyhow::Result<String> {
    match arg.strip_prefix('@') {
        Some(path) => {
            let path = PathBuf::from(path);
            std::fs::read_to_string(&path).with_context(|| format!("--rules: {}", path.display()))
        }
        None => Ok(arg.to_string()),
    }
}

fn print_policy(ctx: &Ctx, p: &AclPolicy) {
    output::message(
        ctx,
        &format!(
            "ID:          {}\nName:        {}\nDescription: {}\nRules:\n{}",
            p.id, p.name, p.description, p.rules
        ),
        json!({ "id": p.id, "name": p.name, "description": p.description, "rules": p.rules,
                "create_index": p.create_index, "modify_index": p.modify_index }),
    );
}

fn token_json(t: &AclToken) -> serde_json::Value {
    let mut v = json!({
        "accessor_id": t.accessor_id,
        "description": t.description,
        "policies": t.policies,
        "service_identities": t.service_identities,
        "node_identities": t.node_identities.iter()
            .map(|n| json!({"node_name": n.node_name, "datacenter": n.datacenter}))
            .collect::<Vec<_>>(),
        "create_index": t.create_index,
        "modify_index": t.modify_index,
    });
    if !t.secret_id.is_empty() {
        v["secret_id"] = json!(t.secret_id);
    }
    v
}

fn print_token(ctx: &Ctx, t: &AclToken) {
    let mut text = format!("AccessorID:  {}\n", t.accessor_id);
    if !t.secret_id.is_empty() {
        text.push_str(&format!("SecretID:    {}\n", t.secret_id));
    }
    text.push_str(&format!("Description: {}\n", t.description));
    text.push_str(&format!("Policies:    {}\n", t.policies.join(", ")));
    if !t.service_identities.is_empty() {
        text.push_str(&format!(
            "Service identities: {}\n",
            t.service_identities.join(", ")
        ));
    }
    if !t.node_identities.is_empty() {
        let nodes: Vec<String> = t
            .node_identities
            .iter()
            .map(|n| format!("{}:{}", n.node_name, n.datacenter))
            .collect();
        text.push_str(&format!("Node identities: {}\n", nodes.join(", ")));
    }
    output::message(ctx, text.trim_end(), token_json(t));
}

pub async fn run(ctx: &Ctx, cmd: AclCmd) -> anyhow::Result<Outcome> {
    match cmd {
        AclCmd::Bootstrap => {
            let token = ctx
                .call(
                    |ch| async move { AclClient::new(ch).bootstrap(request(ctx, Empty {})).await },
                )
                .await?
                .into_inner();
            print_token(ctx, &token);
        }
        AclCmd::Policy(cmd) => policy(ctx, cmd).await?,
        AclCmd::Token(cmd) => token(ctx, cmd).await?,
    }
    Ok(Outcome::Ok)
}

async fn upsert_policy(ctx: &Ctx, p: AclPolicy) -> anyhow::Result<AclPolicy> {
    Ok(ctx
        .call(|ch| {
            let p = p.clone();
            async move { AclClient::new(ch).policy_upsert(request(ctx, p)).await }
        })
        .await?
        .into_inner())
}

async fn read_policy(ctx: &Ctx, id: &str) -> anyhow::Result<AclPolicy> {
    let r = AclRef { id: id.to_string() };
    Ok(ctx
        .call(|ch| {
            let r = r.clone();
            async move { AclClient::new(ch).policy_read(request(ctx, r)).await }
        })
        .await?
        .into_inner())
}

async fn policy(ctx: &Ctx, cmd: PolicyCmd) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Create {
            name,
            rules,
            description,
        } => {
            let p = AclPolicy {
                name,
                description,
                rules: rules_text(&rules)?,
                ..Default::default()
            };
            print_policy(ctx, &upsert_policy(ctx, p).await?);
        }
        PolicyCmd::Update {
            id_or_name,
            rules,
            description,
        } => {
            let mut p = read_policy(ctx, &id_or_name).await?;
            p.rules = rules_text(&rules)?;
            if let Some(d) = description {
                p.description = d;
            }
            print_policy(ctx, &upsert_policy(ctx, p).await?);
        }
        PolicyCmd::Read { id_or_name } => print_policy(ctx, &read_policy(ctx, &id_or_name).await?),
        PolicyCmd::List => {
            let list =
                ctx.call(|ch| async move {
                    AclClient::new(ch).policy_list(request(ctx, Empty {})).await
                })
                .await?
                .into_inner();
            let rows = list
                .policies
                .iter()
                .map(|p| vec![p.id.clone(), p.name.clone(), p.description.clone()])
                .collect();
            let json = list
                .policies
                .iter()
                .map(|p| json!({"id": p.id, "name": p.name, "description": p.description, "rules": p.rules}))
                .collect();
            output::print(ctx, &["ID", "NAME", "DESCRIPTION"], rows, json);
        }
        PolicyCmd::Delete { id_or_name } => {
            let r = AclRef {
                id: id_or_name.clone(),
            };
            let index = ctx
                .call(|ch| {
                    let r = r.clone();
                    async move { AclClient::new(ch).policy_delete(request(ctx, r)).await }
                })
                .await?
                .into_inner()
                .index;
            written(ctx, &format!("policy {id_or_name} deleted"), index);
        }
    }
    Ok(())
}

async fn upsert_token(ctx: &Ctx, t: AclToken) -> anyhow::Result<AclToken> {
    Ok(ctx
        .call(|ch| {
            let t = t.clone();
            async move { AclClient::new(ch).token_upsert(request(ctx, t)).await }
        })
        .await?
        .into_inner())
}

async fn token(ctx: &Ctx, cmd: TokenCmd) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create {
            policies,
            node_identities,
            service_identities,
            description,
        } => {
            if policies.is_empty() && node_identities.is_empty() && service_identities.is_empty() {
                bail!("a token needs --policy, --node-identity or --service-identity");
            }
            let t = AclToken {
                policies,
                node_identities,
                service_identities,
                description,
                ..Default::default()
            };
            print_token(ctx, &upsert_token(ctx, t).await?);
        }
        TokenCmd::Update {
            accessor_id,
            policies,
            node_identities,
            service_identities,
            description,
        } => {
            let old = read_token(ctx, &accessor_id).await?;
            let t = AclToken {
                accessor_id,
                policies,
                node_identities,
                service_identities,
                description: description.unwrap_or(old.description),
                ..Default::default()
            };
            print_token(ctx, &upsert_token(ctx, t).await?);
        }
        TokenCmd::Read { accessor_id } => print_token(ctx, &read_token(ctx, &accessor_id).await?),
        TokenCmd::Myself => {
            let t = ctx
                .call(
                    |ch| async move { AclClient::new(ch).token_self(request(ctx, Empty {})).await },
                )
                .await?
                .into_inner();
            print_token(ctx, &t);
        }
        TokenCmd::List => {
            let list = ctx
                .call(
                    |ch| async move { AclClient::new(ch).token_list(request(ctx, Empty {})).await },
                )
                .await?
                .into_inner();
            let rows = list
                .tokens
                .iter()
                .map(|t| {
                    vec![
                        t.accessor_id.clone(),
                        t.description.clone(),
                        t.policies.join(","),
                    ]
                })
                .collect();
            let json = list.tokens.iter().map(token_json).collect();
            output::print(ctx, &["ACCESSOR", "DESCRIPTION", "POLICIES"], rows, json);
        }
        TokenCmd::Delete { accessor_id } => {
            let r = AclRef {
                id: accessor_id.clone(),
            };
            let index = ctx
                .call(|ch| {
                    let r = r.clone();
                    async move { AclClient::new(ch).token_delete(request(ctx, r)).await }
                })
                .await?
                .into_inner()
                .index;
            written(ctx, &format!("token {accessor_id} deleted"), index);
        }
    }
    Ok(())
}

async fn read_token(ctx: &Ctx, accessor: &str) -> anyhow::Result<AclToken> {
    let r = AclRef {
        id: accessor.to_string(),
    };
    Ok(ctx
        .call(|ch| {
            let r = r.clone();
            async move { AclClient::new(ch).token_read(request(ctx, r)).await }
        })
        .await?
        .into_inner())
}
