//! `weft ca roots | leaf SERVICE | rotate`.
use clap::Subcommand;
use serde_json::json;
use weft_api::proto::ca_client::CaClient;
use weft_api::proto::{Empty, IssueLeafRequest};

use super::written;
use crate::client::{request, Ctx};
use crate::{Format, Outcome};

#[derive(Subcommand)]
pub enum CaCmd {
    /// The trust bundle (PEM).
    Roots,
    /// Issue a leaf certificate and key for SERVICE (operator use, debugging).
    Leaf {
        service: String,
        #[arg(long, default_value = "dc1")]
        datacenter: String,
    },
    /// Create a new root, cross-signed by the current one.
    Rotate,
}

pub async fn run(ctx: &Ctx, cmd: CaCmd) -> anyhow::Result<Outcome> {
    match cmd {
        CaCmd::Roots => {
            let read = ctx.read_options().unwrap_or_default();
            let roots = ctx
                .call(|ch| {
                    let read = read.clone();
                    async move { CaClient::new(ch).roots(request(ctx, read)).await }
                })
                .await?
                .into_inner();
            match ctx.format {
                Format::Table => print!("{}", roots.bundle_pem),
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "trust_domain": roots.trust_domain,
                        "bundle_pem": roots.bundle_pem,
                        "roots": roots.roots.iter().map(|r| json!({
                            "serial": r.serial, "not_after": r.not_after, "active": r.active,
                            "retire_after": r.retire_after,
                        })).collect::<Vec<_>>(),
                    }))?
                ),
            }
        }
        CaCmd::Leaf {
            service,
            datacenter,
        } => {
            let req = IssueLeafRequest {
                service,
                datacenter,
            };
            let leaf = ctx
                .call(|ch| {
                    let req = req.clone();
                    async move { CaClient::new(ch).issue_leaf(request(ctx, req)).await }
                })
                .await?
                .into_inner();
            match ctx.format {
                Format::Table => print!("{}{}{}", leaf.cert_pem, leaf.chain_pem, leaf.key_pem),
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "spiffe_id": leaf.spiffe_id, "cert_pem": leaf.cert_pem,
                        "chain_pem": leaf.chain_pem, "key_pem": leaf.key_pem,
                        "not_after": leaf.not_after,
                    }))?
                ),
            }
        }
        CaCmd::Rotate => {
            let index = ctx
                .call(|ch| async move { CaClient::new(ch).rotate(request(ctx, Empty {})).await })
                .await?
                .into_inner()
                .index;
            written(ctx, "CA root rotated", index);
        }
    }
    Ok(Outcome::Ok)
}
