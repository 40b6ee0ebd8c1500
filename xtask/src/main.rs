//! `cargo xtask`: weft's developer commands.
//!
//! * `setup`      makes this machine able to build and test weft (idempotent)
//! * `build-ebpf` builds the eBPF programs that the agent embeds
//! * `test`       format check, clippy, unit tests, privileged integration tests
//! * `demo`       shows weft working, in network namespaces, and cleans up
//! * `bench`      measures weft's per-node overhead and its control plane (root)
//! * `fuzz`       runs the fuzz targets of every parser of untrusted bytes
//!
//! Every command that needs the toolchain runs `setup` first.
use clap::{Parser, Subcommand};

mod bench;
mod build;
mod demo;
mod fuzz;
mod run;
mod setup;
mod test;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "weft's developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check and install what building and testing weft needs.
    Setup,
    /// Build the eBPF programs (through the agent, which embeds them).
    BuildEbpf {
        /// Build the agent in release mode too.
        #[arg(long)]
        release: bool,
    },
    /// fmt, clippy, unit tests and the privileged integration tests (root).
    Test,
    /// Run the demo in network namespaces, then clean up (root).
    Demo {
        /// Two datacenters federated through mesh gateways, and a failover
        /// between them.
        #[arg(long)]
        datacenters: bool,
    },
    /// Per-node overhead and control-plane benchmarks; results in bench/results/ (root).
    Bench {
        /// Fewer and shorter runs (under five minutes).
        #[arg(long)]
        quick: bool,
    },
    /// Run the cargo-fuzz targets (nightly), each for --seconds.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Setup => setup::run(),
        Command::BuildEbpf { release } => {
            setup::run()?;
            build::ebpf(release)
        }
        Command::Test => {
            setup::run()?;
            test::run()
        }
        Command::Demo { datacenters } => {
            setup::run()?;
            demo::run(datacenters)
        }
        Command::Bench { quick } => {
            setup::run()?;
            bench::run(quick)
        }
        Command::Fuzz { seconds, targets } => {
            setup::run()?;
            fuzz::run(seconds, &targets)
        }
    }
}
