//! `weft`: the operator CLI. A gRPC client of the weft servers: members,
//! catalog, intentions, config entries, KV and snapshots. Tables by default,
//! `--format json` for scripts; one-line errors on stderr. `weft check`
//! talks to the local agent's HTTP API instead.
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

mod client;
mod commands;
mod output;

#[derive(Parser)]
#[command(name = "weft", version, about = "Operate a weft service mesh")]
pub struct Cli {
    /// Server gRPC addresses, tried in order when one is down.
    #[arg(
        long,
        env = "WEFT_ADDR",
        default_value = "127.0.0.1:8502",
        value_delimiter = ',',
        global = true
    )]
    addr: Vec<String>,
    /// ACL token sent to the servers (every local user sees a command
    /// line: prefer WEFT_TOKEN or --token-file).
    #[arg(long, env = "WEFT_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// File holding the ACL token: taken over WEFT_TOKEN, but not over a
    /// --token given on the command line.
    #[arg(long, env = "WEFT_TOKEN_FILE", global = true)]
    token_file: Option<std::path::PathBuf>,
    /// PEM file of the CA that signed the servers' TLS certificates.
    #[arg(long, env = "WEFT_CACERT", global = true)]
    ca_file: Option<std::path::PathBuf>,
    /// The name the servers' certificates must carry.
    #[arg(
        long,
        env = "WEFT_TLS_SERVER_NAME",
        default_value = "server.dc1.weft",
        global = true
    )]
    tls_server_name: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table, global = true)]
    format: Format,
    /// Read from the contacted server's state without a linearizable barrier.
    #[arg(long, global = true)]
    stale: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// The servers: id, address, role, indexes; with --wan, the
    /// datacenters of the federation and their gateways.
    Members {
        #[arg(long)]
        wan: bool,
    },
    /// Nodes, services and instances.
    #[command(subcommand)]
    Catalog(commands::catalog::CatalogCmd),
    /// Who may talk to whom.
    #[command(subcommand)]
    Intention(commands::intention::IntentionCmd),
    /// Config entries (service-defaults, -router, -splitter, -resolver).
    #[command(subcommand)]
    Config(commands::config::ConfigCmd),
    /// The key/value store.
    #[command(subcommand)]
    Kv(commands::kv::KvCmd),
    /// The certificate authority: trust bundle, leaves, rotation.
    #[command(subcommand)]
    Ca(commands::ca::CaCmd),
    /// Save or restore the whole state.
    #[command(subcommand)]
    Snapshot(commands::snapshot::SnapshotCmd),
    /// ACLs: bootstrap, policies and tokens.
    #[command(subcommand)]
    Acl(commands::acl::AclCmd),
    /// The servers' TLS: make a CA and server/client certificates (locally).
    #[command(subcommand)]
    Tls(commands::tls::TlsCmd),
    /// Live traffic between services: rates, success, latency, refusals.
    Top(commands::top::TopArgs),
    /// Update a TTL check through the local agent (pass, warn, fail).
    #[command(subcommand)]
    Check(commands::check::CheckCmd),
}

/// What a command ended with: success, or a "no" that is not an error
/// (`intention check` on a denied pair).
pub enum Outcome {
    Ok,
    No,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let token_given = matches.value_source("token") == Some(clap::parser::ValueSource::CommandLine);
    if let (Some(path), false) = (cli.token_file.take(), token_given) {
        match std::fs::read_to_string(&path) {
            Ok(token) => cli.token = Some(token.trim().to_string()),
            Err(e) => {
                eprintln!("error: --token-file {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    // Local commands: no server context, no network.
    if let Command::Tls(c) = cli.command {
        return exit_code(commands::tls::run(c, cli.format), false);
    }
    // The local agent's HTTP API, not the servers.
    if let Command::Check(c) = cli.command {
        let result = match commands::check::validate(&c) {
            Ok(()) => commands::check::run(c, cli.token.as_deref(), cli.format).await,
            Err(e) => Err(e),
        };
        return exit_code(result.map(|()| Outcome::Ok), false);
    }
    let is_check = matches!(
        cli.command,
        Command::Intention(commands::intention::IntentionCmd::Check { .. })
    );
    let ctx = client::Ctx::new(&cli);
    let result = match cli.command {
        Command::Tls(_) | Command::Check(_) => unreachable!("handled above"),
        Command::Members { wan: false } => commands::members::run(&ctx).await,
        Command::Members { wan: true } => commands::members::wan(&ctx).await,
        Command::Catalog(c) => commands::catalog::run(&ctx, c).await,
        Command::Intention(c) => commands::intention::run(&ctx, c).await,
        Command::Config(c) => commands::config::run(&ctx, c).await,
        Command::Kv(c) => commands::kv::run(&ctx, c).await,
        Command::Snapshot(c) => commands::snapshot::run(&ctx, c).await,
        Command::Ca(c) => commands::ca::run(&ctx, c).await,
        Command::Acl(c) => commands::acl::run(&ctx, c).await,
        Command::Top(args) => commands::top::run(&ctx, args).await,
    };
    exit_code(result, is_check)
}

/// The exit code for a command's result, printing its error: 0 on success, 1
/// on a "no" or an error, 2 on an error of `intention check` (`is_check`).
fn exit_code(result: anyhow::Result<Outcome>, is_check: bool) -> ExitCode {
    match result {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::No) => ExitCode::from(1),
        Err(e) => {
            eprintln!("weft: {}", one_line(&e));
            ExitCode::from(if is_check { 2 } else { 1 })
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text the
/// message already contains.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}
