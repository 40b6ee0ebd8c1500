//! `weft-bench`: measures weft and records the results under bench/results/.
//!
//! `weft-bench control-plane`: a 3-server cluster on loopback (release
//! binaries, data on disk, every append fsynced): commit throughput, leader
//! failover time, and how long a write takes to reach 1, 100 and 1000 watch
//! streams. Every figure is measured several times and reported as
//! min / median / max.
use clap::{Parser, Subcommand};

mod control_plane;
mod report;
mod tunnel;

#[derive(Parser)]
#[command(name = "weft-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Raft commit throughput, failover time, watch propagation.
    ControlPlane {
        /// Fewer repetitions and writes.
        #[arg(long)]
        quick: bool,
    },
    /// Request latency web -> api through weft's HBONE tunnel vs direct (two nodes as netns).
    Tunnel {
        /// Fewer rounds and requests.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::ControlPlane { quick } => {
            let results = control_plane::run(quick)?;
            report::write("control-plane", &results)
        }
        Command::Tunnel { quick } => report::write("tunnel", &tunnel::run(quick)?),
    }
}
