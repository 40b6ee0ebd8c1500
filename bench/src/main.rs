//! `weft-bench`: measures weft and records the results under bench/results/.
//!
//! `weft-bench control-plane`: a 3-server cluster on loopback (release
//! binaries, data on disk, every append fsynced): commit throughput, leader
//! failover time, and how long a write takes to reach 1, 100 and 1000 watch
//! streams. Every figure is measured several times and reported as
//! min / median / max. Then the catalog at size (issue 13): 10,000 nodes
//! and 100,000 instances registered, 1,000 watch streams, the time for one
//! change to reach them all, server memory and disk (`--quick`: 1,000 and
//! 10,000).
//!
//! `weft-bench ui`: the web UI and the traffic summaries with 1,000
//! services (see `ui.rs`).
//!
//! `weft-bench view`: what one change costs the agent's view at the large
//! mesh's size, in process (see `view_cost.rs`).
//!
//! `weft-bench node`: per-node overhead (issue 7; see bench/README.md), and
//! the control-plane figures, in bench/results/node.{md,json}.
use clap::{Parser, Subcommand};

mod catalog;
mod control_plane;
mod haproxy;
mod large_mesh;
mod load;
mod node;
mod priority;
mod quiet;
mod report;
mod tunnel;
mod ui;
mod usage;
mod view_cost;

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
        /// Fewer repetitions and writes, and a catalog a tenth the size.
        #[arg(long)]
        quick: bool,
        /// Leave out the catalog at size.
        #[arg(long)]
        small: bool,
    },
    /// Per-node overhead: direct, weft explicit, weft eBPF and an HAProxy mTLS
    /// baseline in the two-node harness, then the control plane; writes
    /// bench/results/node.{md,json}.
    Node {
        /// Fewer and shorter rounds (the whole run in under five minutes).
        #[arg(long)]
        quick: bool,
        /// Measure only these configurations (comma-separated names as in
        /// the table, e.g. "direct,weft explicit"; "control plane" too), for
        /// profiling; the results go to bench/results/node-partial.{md,json},
        /// which git ignores.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// The web UI and the traffic summaries with 1,000 services: summary
    /// memory for an hour, the topology answer, page loads in headless
    /// Chromium; writes bench/results/ui.{md,json}.
    Ui {
        /// Two rounds instead of five.
        #[arg(long)]
        quick: bool,
    },
    /// What one change costs the agent's view with 10,000 instances (in
    /// process, no root); writes bench/results/view.{md,json}.
    View {
        /// A fifth of the changes.
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
        Command::ControlPlane { quick, small } => {
            let run = control_plane::run(quick, !small)?;
            report::write_doc(
                "control-plane",
                &run.figures,
                &run.sections,
                serde_json::Value::Null,
            )
        }
        Command::Node { quick, only } => {
            let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
            let node = node::run(quick, &wanted)?;
            let mut figures = node.figures;
            let mut extra = node.extra;
            let control_plane = if wanted("control plane") {
                control_plane::run(quick, false).map(|run| run.figures)
            } else {
                Ok(Vec::new())
            };
            match control_plane {
                Ok(cp) => figures.extend(cp.into_iter().map(|mut f| {
                    f.name = format!("control plane: {}", f.name);
                    f
                })),
                Err(e) => {
                    eprintln!("control plane: {e:#}");
                    extra["control_plane_error"] = format!("{e:#}").into();
                }
            }
            let name = if only.is_empty() {
                "node"
            } else {
                "node-partial"
            };
            report::write_doc(name, &figures, &node.sections, extra)
        }
        Command::Ui { quick } => {
            let run = ui::run(quick)?;
            report::write_doc("ui", &run.figures, &run.sections, serde_json::Value::Null)
        }
        Command::View { quick } => {
            let run = view_cost::run(quick)?;
            report::write_doc("view", &run.figures, &run.sections, run.extra)
        }
        Command::Tunnel { quick } => report::write("tunnel", &tunnel::run(quick)?),
    }
}
