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
    /// How to log to stderr: `text` (colours only on a terminal) or `json`
    /// (one object per line).
    #[arg(long, global = true, default_value = "text")]
    log_format: weft_api::logging::LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the redirect programs to a cgroup subtree and report every
    /// connection they bring to a listener (a look at the data path).
    Redirect(redirect_cmd::RedirectArgs),
    /// Run a command inside a service's cgroup, so that the agent treats it
    /// as that service's workload, resolving names through the agent's DNS
    /// when `dns_addr` is on port 53 (in a private mount namespace, the
    /// agent's resolver over /etc/resolv.conf): `weft-agent exec --config
    /// agent.toml --service web -- curl http://api.service.weft/`.
    Exec {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        service: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Remove the eBPF programs and maps the agent pinned (they outlive the
    /// agent so that the mesh fails closed). Afterwards mesh workloads'
    /// connections are no longer redirected, checked or refused: run it only
    /// to take weft off the node, with the agent stopped.
    Uninstall {
        #[arg(long)]
        config: PathBuf,
    },
    /// Make the agent running with this configuration re-read it (as
    /// SIGHUP does) and print what changed, or why nothing did: services,
    /// their checks and upstreams may change; a broken file is refused and
    /// the running configuration keeps serving.
    Reload {
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    weft_agent::allocator::tune();
    let cli = Cli::parse();
    weft_agent::telemetry::init(cli.log_format);
    match (cli.command, cli.config) {
        (Some(Command::Redirect(args)), _) => runtime(1)?
            .block_on(redirect_cmd::run(args))
            .context("weft-agent redirect"),
        (
            Some(Command::Exec {
                config,
                service,
                command,
            }),
            _,
        ) => exec(&config, &service, &command),
        (Some(Command::Uninstall { config }), _) => {
            let config = weft_agent::config::AgentConfig::load(&config)?;
            let dir = weft_agent::intercept::pin_dir(&config)?;
            if weft_agent::intercept::uninstall(&config)? {
                println!(
                    "removed the eBPF pins in {}: the programs are detached",
                    dir.display()
                );
            } else {
                println!("nothing pinned in {}", dir.display());
            }
            Ok(())
        }
        (Some(Command::Reload { config }), _) => {
            let loaded = weft_agent::config::AgentConfig::load(&config)?;
            let socket = weft_agent::handover::socket_path(&loaded.data_dir);
            let what = weft_agent::handover::request_reload(&socket)
                .with_context(|| format!("reloading {}", config.display()))?;
            println!("reloaded {}: {what}", config.display());
            Ok(())
        }
        (None, Some(path)) => {
            match weft_agent::limits::raise_nofile() {
                Ok(l) => tracing::info!(
                    before = l.before,
                    soft = l.soft,
                    hard = l.hard,
                    "open files limit: soft limit set to the hard limit"
                ),
                Err(e) => tracing::warn!("raising the open files limit: {e}"),
            }
            let config = weft_agent::config::AgentConfig::load(&path)?;
            // Services and checks registered through the local API before a
            // restart, but for those the file now defines.
            let (registered, gone) =
                weft_agent::registered::load_all(&config.data_dir)?.yielding_to(&config);
            if !gone.is_empty() {
                tracing::warn!(
                    ids = ?gone,
                    "the configuration file now defines these: their registrations through the local API are dropped"
                );
            }
            // Held to the local API's rules of today, which may be stricter
            // than those they were registered under.
            let (registered, refused) = registered.admitted_by(&config);
            for why in &refused {
                tracing::warn!("a registration kept from before is dropped: {why}");
            }
            if !gone.is_empty() || !refused.is_empty() {
                weft_agent::registered::save(&config.data_dir, &registered.services)?;
                weft_agent::registered::save_checks(&config.data_dir, &registered.checks)?;
            }
            let config = if registered == Default::default() {
                config
            } else {
                weft_agent::config::AgentConfig::load_with_registered(&path, &registered)?
            };
            runtime(config.worker_threads)?.block_on(weft_agent::run::run(
                config,
                registered,
                path,
                shutdown_signal(),
            ))?;
            Ok(())
        }
        (None, None) => unreachable!("clap requires --config without a subcommand"),
    }
}

/// The tokio runtime: one thread, or `threads` work-stealing workers.
fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    Ok(builder.enable_all().build()?)
}

/// Moves this process into the service's cgroup, gives it the agent's
/// resolver, then becomes `command`.
fn exec(config: &std::path::Path, service: &str, command: &[String]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let config = weft_agent::config::AgentConfig::load(config)?;
    match weft_agent::exec_dns::resolv_conf(config.dns_addr) {
        Some(text) => weft_agent::exec_dns::use_resolver(&config.data_dir, &text)
            .context("giving the command the agent's resolver")?,
        None => eprintln!(
            "weft-agent exec: dns_addr {} is not on port 53, which resolvers ask; \
             names resolve as the host resolves them",
            config.dns_addr
        ),
    }
    let cgroup = weft_agent::intercept::service_cgroup(&config, service)?;
    std::fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    let procs = cgroup.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("joining {}", procs.display()))?;
    let (program, args) = command.split_first().context("no command given")?;
    // The agent's token, if it came from the environment, is not the
    // workload's.
    let err = std::process::Command::new(program)
        .args(args)
        .env_remove("WEFT_TOKEN")
        .exec();
    Err(anyhow::anyhow!("running {program}: {err}"))
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
