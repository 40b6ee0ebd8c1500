//! `weft-agent redirect`: the data path on its own. It attaches the redirect
//! programs to a cgroup subtree, takes over the given destinations for the
//! given workload cgroups, and answers every connection it receives with what
//! the programs recorded about it. The demo uses it to show the redirect.
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_agent::ebpf::{cgroup_id, Egress, Pins, Redirector};

/// The liveness lease this command holds while it runs.
const LEASE: std::time::Duration = std::time::Duration::from_secs(2);

/// Removes the command's pins when it ends: its programs detach.
struct Unpin(PathBuf);

impl Drop for Unpin {
    fn drop(&mut self) {
        if let Err(e) = Pins::uninstall(&self.0) {
            tracing::warn!("removing the pins at {}: {e}", self.0.display());
        }
    }
}

#[derive(clap::Args)]
pub struct RedirectArgs {
    /// cgroup-v2 directory to attach the programs to.
    #[arg(long)]
    cgroup_root: PathBuf,
    /// A workload's cgroup-v2 directory (repeat for several); workload ids
    /// count from 1 in the order given.
    #[arg(long = "workload-cgroup", required = true)]
    workload_cgroups: Vec<PathBuf>,
    /// A destination to take over, `IP` (any port) or `IP:PORT` (repeatable).
    #[arg(long = "take-over", required = true, value_parser = parse_destination)]
    destinations: Vec<(IpAddr, Option<u16>)>,
    /// Where taken-over connections go (this command listens there).
    #[arg(long, default_value = "127.0.0.1:15001")]
    listen: SocketAddr,
    /// Exit after this many connections (default: run until interrupted).
    #[arg(long)]
    count: Option<u64>,
    /// Where to pin the programs while the command runs (removed at exit).
    #[arg(long)]
    pin_dir: Option<PathBuf>,
}

fn parse_destination(s: &str) -> Result<(IpAddr, Option<u16>), String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok((addr.ip(), Some(addr.port())));
    }
    s.parse::<IpAddr>()
        .map(|ip| (ip, None))
        .map_err(|_| format!("`{s}` is neither IP nor IP:PORT"))
}

pub async fn run(args: RedirectArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let pin_dir = args
        .pin_dir
        .clone()
        .unwrap_or_else(|| weft_agent::ebpf::pins::default_dir(&args.cgroup_root));
    let _unpin = Unpin(pin_dir.clone());
    let mut redirector = Redirector::load(Pins::open(&pin_dir)?)?;
    let mark = weft_agent::config::DEFAULT_SOCKET_MARK;
    redirector.configure(Egress::Allow, mark)?;
    // The programs redirect only to a listener with the mark.
    weft_agent::mark::set(mark);
    weft_agent::mark::listener(&listener).context("marking the listener")?;
    for (i, dir) in args.workload_cgroups.iter().enumerate() {
        let id = cgroup_id(dir)?;
        redirector.add_workload(id, i as u32 + 1)?;
        tracing::info!(cgroup = %dir.display(), cgroup_id = id, workload = i + 1, "workload");
    }
    for (ip, port) in &args.destinations {
        redirector.add_destination(*ip, *port, args.listen)?;
    }
    redirector.attach(&args.cgroup_root)?;
    redirector.renew_lease(LEASE)?;
    let mut renew = tokio::time::interval(LEASE / 4);
    println!(
        "listening on {}; redirect attached to {}",
        args.listen,
        args.cgroup_root.display()
    );

    let mut served = 0u64;
    loop {
        if args.count.is_some_and(|n| served >= n) {
            return Ok(());
        }
        let (mut stream, peer) = tokio::select! {
            r = listener.accept() => r.context("accept")?,
            _ = renew.tick() => {
                redirector.renew_lease(LEASE)?;
                continue;
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        served += 1;
        let local = stream.local_addr()?;
        let reply = match redirector.original_dst(&stream, peer, local)? {
            Some(orig) => format!(
                "redirected: {peer} asked for {} (cgroup {}, workload {})\n",
                orig.addr, orig.cgroup_id, orig.workload_id
            ),
            None => format!("direct: {peer} connected to {local} itself\n"),
        };
        print!("{reply}");
        if let Err(e) = answer(&mut stream, &reply).await {
            tracing::warn!(%peer, "reply failed: {e}");
        }
    }
}

/// Reads what the client sends (until it closes its side, 2 s at most), then
/// answers and closes, so that the client sees the answer rather than a reset.
async fn answer(stream: &mut tokio::net::TcpStream, reply: &str) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut limited = (&mut *stream).take(64 * 1024);
    let read = limited.read_to_end(&mut request);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), read).await;
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}
