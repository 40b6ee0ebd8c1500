//! What a test or benchmark process puts on the machine outside its own
//! memory (network namespaces, cgroups with their agents' eBPF pins, the
//! temporary directories of meshes, clusters and agents, which hold keys
//! and tokens) is removed when the value that made it drops. A signal
//! (Ctrl-C, SIGTERM, SIGHUP) ends the process before anything drops, so
//! each of those things is also registered here, from just before it is
//! made until it is removed.
//!
//! The first registration installs handlers for those signals (not for one
//! the process was started ignoring, as `nohup` does SIGHUP) and starts a
//! thread that waits for them. On the first signal it stops further
//! registrations, ends this process's children (SIGTERM, so that a child
//! holding a mesh of its own removes it, then SIGKILL to them and their
//! process groups), removes everything registered (cgroups, then
//! namespaces, then directories) and exits with 128 + the signal. A second
//! signal during that exits at once. `WEFT_KEEP_MESH` keeps the
//! directories, as it does on drop.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, PoisonError};
use std::time::{Duration, Instant};

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
                    say(&format!("cleanup: {e:#}"));
                }
            }
            Leftover::Dir(path) => {
                if let Err(e) = std::fs::remove_dir_all(path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        say(&format!("cleanup: removing {}: {e}", path.display()));
                    }
                }
            }
        }
    }
}

static REGISTERED: Mutex<BTreeMap<u64, Leftover>> = Mutex::new(BTreeMap::new());
static NEXT: AtomicU64 = AtomicU64::new(0);
static WATCH: Once = Once::new();
/// Set by the first signal: nothing more is registered (or made).
static ENDING: AtomicBool = AtomicBool::new(false);

fn registered() -> MutexGuard<'static, BTreeMap<u64, Leftover>> {
    REGISTERED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Writes a line to stderr; a closed stderr (a `tee` ended by the same
/// Ctrl-C) must not stop the cleanup.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
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

/// Registers `what` for removal should a signal end the process. Call it
/// before making the thing (removing what is not there is harmless). Once
/// a signal has come, the calling thread waits here for the process to
/// exit, so that nothing is made that the cleanup no longer sees.
pub fn register(what: Leftover) -> Registration {
    WATCH.call_once(watch_signals);
    let mut all = registered();
    if ENDING.load(Ordering::SeqCst) {
        drop(all);
        loop {
            std::thread::park();
        }
    }
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    all.insert(id, what);
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
        // Made before it is registered: its name is only known once made.
        // A signal in between leaves at most this empty directory.
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
#[cfg(test)]
fn is_registered(what: &Leftover) -> bool {
    registered().values().any(|w| w == what)
}

/// Whether the process was started with `signal` ignored.
fn is_ignored(signal: i32) -> bool {
    // SAFETY: a null new action only reads the current one into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Installs the handlers (on the calling thread, so that they are in place
/// when the first registration returns) and starts the thread that acts on
/// them. If the handlers or the thread cannot be had, every signal ends the
/// process at once, as it would without this module.
fn watch_signals() {
    let wanted: Vec<i32> = [SIGINT, SIGTERM, SIGHUP]
        .into_iter()
        .filter(|&s| !is_ignored(s))
        .collect();
    // Armed by the first signal (or a failure below): then a signal exits
    // at once.
    let at_once = Arc::new(AtomicBool::new(false));
    for &signal in &wanted {
        let armed = Arc::clone(&at_once);
        if let Err(e) =
            signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, armed)
        {
            say(&format!("cleanup: signal {signal}: {e}"));
        }
    }
    let mut signals = match signal_hook::iterator::Signals::new(&wanted) {
        Ok(signals) => signals,
        Err(e) => {
            at_once.store(true, Ordering::SeqCst);
            say(&format!(
                "cleanup: cannot watch for signals ({e}): a signal will leave \
                 namespaces, cgroups and directories behind"
            ));
            return;
        }
    };
    let armed = Arc::clone(&at_once);
    let spawned = std::thread::Builder::new()
        .name("leftovers".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                armed.store(true, Ordering::SeqCst);
                ENDING.store(true, Ordering::SeqCst);
                say(&format!(
                    "signal {signal}: ending this process's children and removing its \
                     namespaces, cgroups and directories (a second signal exits at once)"
                ));
                let _ = std::panic::catch_unwind(end_children);
                remove_all();
                std::process::exit(128 + signal);
            }
        });
    if let Err(e) = spawned {
        at_once.store(true, Ordering::SeqCst);
        say(&format!("cleanup: cannot start the signal watcher: {e}"));
    }
}

/// This process's children (of every thread), from `/proc`.
fn children() -> Vec<libc::pid_t> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Reaps children that have exited; true when none is left.
fn reap() -> bool {
    loop {
        // SAFETY: waitpid with a null status pointer only reaps.
        match unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } {
            0 => return false,
            -1 => return true, // ECHILD: no children
            _ => continue,
        }
    }
}

/// Ends this process's children: SIGTERM first (a child that holds a mesh,
/// as a test's helper process does, removes it), SIGKILL to those left
/// after 5 s and to their process groups (chromedriver starts Chromium in
/// a group of its own), then waits (at most 2 s more) until they are gone,
/// so that none writes into a directory being removed.
fn end_children() {
    let signal_all = |signal: i32| {
        for pid in children() {
            // SAFETY: kill has no memory preconditions; -pid names the
            // child's process group, which fails harmlessly unless it leads one.
            unsafe {
                libc::kill(pid, signal);
                if signal == libc::SIGKILL {
                    libc::kill(-pid, signal);
                }
            }
        }
    };
    let wait_gone = |limit: Duration| {
        let deadline = Instant::now() + limit;
        while !reap() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    signal_all(libc::SIGTERM);
    wait_gone(Duration::from_secs(5));
    signal_all(libc::SIGKILL);
    wait_gone(Duration::from_secs(2));
}

/// Removes everything registered, in [`Leftover::rank`] order; with
/// `WEFT_KEEP_MESH` set, the directories stay.
fn remove_all() {
    let keep_dirs = std::env::var_os("WEFT_KEEP_MESH").is_some();
    let mut all: Vec<Leftover> = std::mem::take(&mut *registered()).into_values().collect();
    all.sort_by_key(Leftover::rank);
    for what in &all {
        match what {
            Leftover::Dir(path) if keep_dirs => say(&format!("kept {}", path.display())),
            // One that fails (a panic on a closed stderr in the helpers it
            // calls) does not keep the others from going.
            _ => {
                let _ = std::panic::catch_unwind(|| what.remove());
            }
        }
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
