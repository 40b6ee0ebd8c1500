//! `weft-agent`: the node agent binary. `weft-agent --config agent.toml`
//! runs a mesh node; `weft-agent redirect …` shows the eBPF redirect alone.
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod redirect_cmd;

#[derive(Parser)]
#[command(
    name = "weft-agent",
    version,
    about = "weft's node agent",
    subcommand_negates_reqs = true
)]
struct Cli {
    /// The agent's configuration file.
    #[arg(long, required = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the redirect programs to a cgroup subtree and report every
    /// connection they bring to a listener (a look at the data path).
    Redirect(redirect_cmd::RedirectArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    weft_agent::telemetry::init();
    let cli = Cli::parse();
    match (cli.command, cli.config) {
        (Some(Command::Redirect(args)), _) => {
            redirect_cmd::run(args).await.context("weft-agent redirect")
        }
        (None, Some(path)) => {
            let config = weft_agent::config::AgentConfig::load(&path)?;
            weft_agent::run::run(config, shutdown_signal()).await?;
            Ok(())
        }
        (None, None) => unreachable!("clap requires --config without a subcommand"),
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
