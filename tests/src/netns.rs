//! Network namespaces for tests: created with `ip netns add`, removed on drop.
//! Code can run inside one on a dedicated thread ([`Netns::run`]), and child
//! processes can be started inside one and, optionally, inside a cgroup
//! ([`Netns::spawn`]).
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::leftovers::{self, Leftover, Registration};

pub struct Netns {
    name: String,
    _leftover: Registration,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    /// Creates namespace `name` (replacing a leftover of the same name) with
    /// its loopback up and no other interface or route.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let leftover = leftovers::register(Leftover::Netns(name.to_string()));
        let _ = delete(name);
        ip(&["netns", "add", name])?;
        let ns = Self {
            name: name.to_string(),
            _leftover: leftover,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `ip -n NAME ARGS…`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs `f` on a new thread that has entered this namespace. Sockets made
    /// there stay in the namespace wherever they are used afterwards.
    pub fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> anyhow::Result<R> {
        let file = std::fs::File::open(self.path()).context("opening netns")?;
        let handle = std::thread::spawn(move || {
            // SAFETY: valid namespace fd; only this thread changes namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f())
        });
        let result = handle
            .join()
            .map_err(|_| anyhow::anyhow!("netns thread panicked"))?;
        result.context("setns")
    }

    /// A tokio listener bound to `addr` inside this namespace.
    pub fn listen(&self, addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
        let listener = self.run(move || std::net::TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        Ok(tokio::net::TcpListener::from_std(listener)?)
    }

    /// A listener standing in for the agent's: it carries the agent's
    /// default socket mark, since the programs redirect only to a socket
    /// that does.
    pub fn listen_as_agent(
        &self,
        addr: std::net::SocketAddr,
    ) -> anyhow::Result<tokio::net::TcpListener> {
        let listener = self.listen(addr)?;
        weft_agent::mark::set(weft_agent::config::DEFAULT_SOCKET_MARK);
        weft_agent::mark::listener(&listener)?;
        Ok(listener)
    }

    /// Starts `cmd` inside this namespace and, when given, inside the cgroup-v2
    /// directory `cgroup`. The child is killed if its handle is dropped.
    pub fn spawn(
        &self,
        cmd: &mut tokio::process::Command,
        cgroup: Option<&Path>,
    ) -> anyhow::Result<tokio::process::Child> {
        let netns = std::fs::File::open(self.path()).context("opening netns")?;
        let procs = cgroup
            .map(|dir| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))
                    .with_context(|| format!("opening {}/cgroup.procs", dir.display()))
            })
            .transpose()?;
        let netns_fd = netns.as_raw_fd();
        let procs_fd = procs.as_ref().map(|f| f.as_raw_fd());
        // SAFETY: the closure only makes async-signal-safe system calls on
        // fds that stay open until spawn returns.
        unsafe {
            cmd.as_std_mut().pre_exec(move || {
                if let Some(fd) = procs_fd {
                    // "0" moves the writing process itself.
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .kill_on_drop(true)
            .spawn()
            .context("spawning in netns")?;
        drop((netns, procs));
        Ok(child)
    }
}

/// Deletes namespace `name` (`ip netns del`).
pub fn delete(name: &str) -> anyhow::Result<()> {
    ip(&["netns", "del", name])
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = delete(&self.name) {
            eprintln!("cleanup: {e}");
        }
    }
}
