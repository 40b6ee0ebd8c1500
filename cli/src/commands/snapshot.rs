//! `weft snapshot save FILE | restore FILE`: the whole replicated state.
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use weft_api::proto::operator_client::OperatorClient;
use weft_api::proto::{Empty, SnapshotData};

use super::written;
use crate::client::{request, Ctx};
use crate::Outcome;

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Write the state to FILE (mode 0600). Needs a management token; the
    /// CA is not in it (a restore keeps the cluster's CA).
    Save { file: PathBuf },
    /// Replace the state with the one in FILE.
    Restore { file: PathBuf },
}

const LIMIT: usize = 64 << 20;

pub async fn run(ctx: &Ctx, cmd: SnapshotCmd) -> anyhow::Result<Outcome> {
    match cmd {
        SnapshotCmd::Save { file } => {
            let data = ctx
                .call(|ch| async move {
                    OperatorClient::new(ch)
                        .max_decoding_message_size(LIMIT)
                        .snapshot_save(request(ctx, Empty {}))
                        .await
                })
                .await?
                .into_inner();
            write_private(&file, &data.state).with_context(|| format!("{}", file.display()))?;
            written(
                ctx,
                &format!("state saved to {}", file.display()),
                data.index,
            );
        }
        SnapshotCmd::Restore { file } => {
            let state = std::fs::read(&file).with_context(|| format!("{}", file.display()))?;
            serde_json::from_slice::<serde_json::Value>(&state)
                .with_context(|| format!("{}: not a weft snapshot (JSON)", file.display()))?;
            let req = SnapshotData { state, index: 0 };
            let index = ctx
                .call(|ch| {
                    let req = req.clone();
                    async move {
                        OperatorClient::new(ch)
                            .max_encoding_message_size(LIMIT)
                            .snapshot_restore(request(ctx, req))
                            .await
                    }
                })
                .await?
                .into_inner()
                .index;
            written(
                ctx,
                &format!("state restored from {}", file.display()),
                index,
            );
        }
    }
    Ok(Outcome::Ok)
}

/// Writes `data` to `path`, readable by its owner only, also when the file
/// existed with wider permissions.
fn write_private(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(data)?;
    file.sync_all()
}
