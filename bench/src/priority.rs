//! The control plane at idle priority while the data path is measured.
//!
//! In a deployment weft's servers, and the clients that write to them, run
//! on machines of their own; here they share the benchmark's two vCPUs with
//! the agents, the load generators and the workloads. Each write costs the
//! server about 1.3 ms of CPU (Raft log append and flush, apply, the watch
//! fan-out, in bursts of up to 1.8 ms): at the large mesh's ten changes a
//! second per mesh, requests that needed a core during a burst waited for
//! it, and the large mesh's 1000 rps p99 measured the servers, not the
//! agents (bench/README.md, "The large mesh's tail is the servers").
//!
//! Under `SCHED_IDLE` a thread runs only when no other wants the core; the
//! kernel still gives it a sliver of a busy machine, so heartbeats and
//! watches keep flowing. Threads created later inherit their creator's
//! policy.
use std::os::unix::process::CommandExt;

use anyhow::{bail, Context};

fn set_idle(tid: libc::pid_t) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a plain syscall on a thread id with a valid parameter.
    if unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn is_idle(tid: libc::pid_t) -> bool {
    // SAFETY: a plain syscall on a thread id.
    unsafe { libc::sched_getscheduler(tid) == libc::SCHED_IDLE }
}

/// Puts every thread of process `pid` at `SCHED_IDLE`, passing over its
/// threads until a pass finds none left to change (a thread started during
/// a pass by one not yet changed is caught by the next). Returns how many
/// threads it changed.
pub fn make_idle(pid: u32) -> anyhow::Result<usize> {
    let mut changed = 0;
    for _ in 0..5 {
        let mut this_pass = 0;
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .with_context(|| format!("the threads of process {pid}"))?;
        for task in tasks {
            let Some(tid) = task?
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            if is_idle(tid) {
                continue;
            }
            match set_idle(tid) {
                Ok(()) => this_pass += 1,
                // The thread ended since the listing.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("SCHED_IDLE for thread {tid} of {pid}"))
                }
            }
        }
        if this_pass == 0 {
            return Ok(changed);
        }
        changed += this_pass;
    }
    bail!("process {pid} kept starting threads: not all of them are at SCHED_IDLE")
}

/// Starts `cmd`'s process at `SCHED_IDLE` (all its threads inherit it).
pub fn start_idle(cmd: &mut std::process::Command) {
    // SAFETY: only an async-signal-safe syscall between fork and exec.
    unsafe {
        cmd.pre_exec(|| set_idle(0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_process_goes_idle_once() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id();
        let changed = make_idle(pid).expect("make_idle");
        assert!(changed >= 1, "nothing changed");
        assert!(is_idle(pid as libc::pid_t));
        assert_eq!(
            make_idle(pid).expect("again"),
            0,
            "a second pass changes nothing"
        );
        child.kill().ok();
        child.wait().ok();
    }

    #[test]
    fn a_command_started_idle_runs_idle() {
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30");
        start_idle(&mut cmd);
        let mut child = cmd.spawn().expect("sleep");
        let idle = is_idle(child.id() as libc::pid_t);
        child.kill().ok();
        child.wait().ok();
        assert!(idle, "the child runs at another policy");
    }
}
