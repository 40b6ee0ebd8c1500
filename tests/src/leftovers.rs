//! What a test or benchmark process puts on the machine outside its own
//! memory (network namespaces, cgroups with their agents' eBPF pins,
//! temporary directories that hold keys and tokens) is removed when the
//! value that made it drops. A signal (Ctrl-C, SIGTERM, SIGHUP) ends the
//! process before anything drops, so each of those things is also
//! registered here while it exists: the first registration starts a thread
//! that waits for those signals, kills this process's children, removes
//! everything registered and exits with 128 + the signal.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, Once, PoisonError};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// Something outside the process that must not outlive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leftover {
    /// A cgroup subtree: the eBPF pins made for it, every process in it,
    /// its directories.
    Cgroup(PathBuf),
    /// A network namespace made with `ip netns add`.
    Netns(String),
    /// A directory and everything in it.
    Dir(PathBuf),
}

impl Leftover {
    /// Removal order: cgroups first (that kills their processes), then
    /// namespaces, then the directories the processes wrote to.
    fn rank(&self) -> u8 {
        match self {
            Leftover::Cgroup(_) => 0,
            Leftover::Netns(_) => 1,
            Leftover::Dir(_) => 2,
        }
    }

    fn remove(&self) {
        match self {
            Leftover::Cgroup(path) => {
                crate::cgroup::remove_pins(path);
                crate::cgroup::remove_tree(path);
            }
            Leftover::Netns(name) => {
                if let Err(e) = crate::netns::delete(name) {
                    eprintln!("cleanup: {e:#}");
                }
            }
            Leftover::Dir(path) => {
                if let Err(e) = std::fs::remove_dir_all(path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        eprintln!("cleanup: removing {}: {e}", path.display());
                    }
                }
            }
        }
    }
}

static REGISTERED: Mutex<BTreeMap<u64, Leftover>> = Mutex::new(BTreeMap::new());
static NEXT: AtomicU64 = AtomicU64::new(0);
static WATCH: Once = Once::new();

fn registered() -> MutexGuard<'static, BTreeMap<u64, Leftover>> {
    REGISTERED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keeps a [`Leftover`] registered until it drops; the owner removes the
/// thing itself, as before, and drops this with it.
#[must_use = "the leftover is unregistered when this drops"]
#[derive(Debug)]
pub struct Registration(u64);

impl Drop for Registration {
    fn drop(&mut self) {
        registered().remove(&self.0);
    }
}

/// Registers `what` for removal should a signal end the process.
pub fn register(what: Leftover) -> Registration {
    WATCH.call_once(watch_signals);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    registered().insert(id, what);
    Registration(id)
}

/// A temporary directory (`/tmp/PREFIXxxxxxx`, or under `TMPDIR`), removed
/// when it drops and when a signal ends the process.
#[derive(Debug)]
pub struct ScratchDir {
    dir: tempfile::TempDir,
    _leftover: Registration,
}

impl ScratchDir {
    pub fn new(prefix: &str) -> std::io::Result<Self> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let leftover = register(Leftover::Dir(dir.path().to_path_buf()));
        Ok(Self {
            dir,
            _leftover: leftover,
        })
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Keeps the directory past the end of the process (for a look after a
    /// failure); it is no longer removed on a signal either.
    pub fn keep(self) -> PathBuf {
        self.dir.keep()
    }
}

/// Whether `what` is registered now.
pub fn is_registered(what: &Leftover) -> bool {
    registered().values().any(|w| w == what)
}

fn watch_signals() {
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!(
                "cleanup: cannot watch for signals ({e}): a signal would leave \
                 namespaces, cgroups and directories behind"
            );
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("leftovers".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                eprintln!(
                    "signal {signal}: killing this process's children and removing \
                     its namespaces, cgroups and directories"
                );
                kill_children();
                remove_all();
                std::process::exit(128 + signal);
            }
        });
    if let Err(e) = spawned {
        eprintln!("cleanup: cannot start the signal watcher: {e}");
    }
}

/// SIGKILLs every child of every thread of this process (agents, servers,
/// load generators), so that none writes into a directory being removed.
fn kill_children() {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for task in tasks.flatten() {
        let Ok(children) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        for pid in children.split_whitespace().filter_map(|p| p.parse().ok()) {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Removes everything registered, in [`Leftover::rank`] order.
fn remove_all() {
    let mut all: Vec<Leftover> = std::mem::take(&mut *registered()).into_values().collect();
    all.sort_by_key(Leftover::rank);
    for what in &all {
        what.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registration_lasts_until_it_drops() {
        let what = Leftover::Dir(PathBuf::from("/nonexistent/weft-leftovers-unit"));
        let registration = register(what.clone());
        assert!(is_registered(&what));
        drop(registration);
        assert!(!is_registered(&what));
    }

    #[test]
    fn cgroups_go_before_namespaces_before_directories() {
        let mut all = [
            Leftover::Dir("/d".into()),
            Leftover::Netns("n".into()),
            Leftover::Cgroup("/c".into()),
        ];
        all.sort_by_key(Leftover::rank);
        assert_eq!(
            all.map(|w| w.rank()),
            [0, 1, 2],
            "processes must die before their namespace and files go"
        );
    }
}
