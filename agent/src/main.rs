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
    /// agent.toml --service web --user web -- curl http://api.service.weft/`.
    Exec {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        service: String,
        /// Run the command as this user (a name or a numeric id), with its
        /// groups and no capabilities. Without it the command runs as
        /// whoever runs `exec` (root), which can set the agent's mark,
        /// leave the mesh's cgroups and remove the pinned programs.
        #[arg(long)]
        user: Option<String>,
        /// With --user: this group instead of the user's own.
        #[arg(long)]
        group: Option<String>,
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
                user,
                group,
                command,
            }),
            _,
        ) => exec(
            &config,
            &service,
            (user.as_deref(), group.as_deref()),
            &command,
        ),
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
            // Read once: registrations through the local API run with this
            // text until a reload reads the file again.
            let file_text = weft_agent::config::AgentConfig::read_file(&path)?;
            let config = weft_agent::config::AgentConfig::from_file_text(
                &file_text,
                &path,
                &Default::default(),
            )?;
            // What is in it (registrations, the control socket) is read and
            // trusted below: only if it is this user's (or root's) alone.
            weft_api::private_dir::create_private_dir(&config.data_dir)
                .context("data_dir: it holds the registrations and the control socket")?;
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
                weft_agent::config::AgentConfig::from_file_text(&file_text, &path, &registered)?
            };
            runtime(config.worker_threads)?.block_on(weft_agent::run::run(
                config,
                registered,
                (path, file_text),
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
/// resolver, then becomes `command`, run as `user` (and `group`) when
/// given.
fn exec(
    config: &std::path::Path,
    service: &str,
    (user, group): (Option<&str>, Option<&str>),
    command: &[String],
) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    use weft_agent::exec_user;
    // Looked up before anything is changed: a name that is wrong is said
    // before the command is in any cgroup.
    let run_as = match (user, group) {
        (Some(user), group) => Some(exec_user::resolve(user, group)?),
        (None, Some(_)) => return Err(exec_user::ExecUserError::GroupWithoutUser.into()),
        (None, None) => None,
    };
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
    match &run_as {
        Some(run_as) => exec_user::become_user(run_as)?,
        None if nix::unistd::Uid::effective().is_root() => eprintln!(
            "weft-agent exec: {program} runs as root, which can set the agent's socket mark, \
             leave the mesh's cgroups and remove its programs: give it --user"
        ),
        None => {}
    }
    // The agent's token, if it came from the environment, is not the
    // workload's.
    let environment = run_as.as_ref().map(|r| r.environment()).unwrap_or_default();
    let err = std::process::Command::new(program)
        .args(args)
        .env_remove("WEFT_TOKEN")
        .envs(environment)
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
