//! `weft-agent`: the node agent binary.
use anyhow::Context;
use clap::{Parser, Subcommand};

mod redirect_cmd;

#[derive(Parser)]
#[command(name = "weft-agent", version, about = "weft's node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    match cli.command {
        Command::Redirect(args) => redirect_cmd::run(args).await.context("weft-agent redirect"),
    }
}
