//! A thread for the agent's background work, apart from the runtime that
//! serves connections: following the servers' watch stream (applying
//! events, building each published view's indexes), bringing the eBPF
//! maps in step with the view, dialling and driving the connections to the
//! servers, health and traffic reports, certificate renewals and the admin
//! endpoint. A large snapshot being applied, or a map sync's thousands of
//! syscalls, never holds up an accept or a request. The thread runs a
//! single-threaded tokio runtime of its own until the [`Background`] is
//! dropped, which ends its tasks, at a lower priority than the
//! connections' thread ([`NICE`]): when the node's cores are busy, a watch
//! event waits for a request, not a request for a watch event. It is still
//! scheduled under load (a nice value, not `SCHED_IDLE`), at about a tenth
//! of a normal thread's share of a contended core.
use std::future::Future;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// How much nicer the background thread is than the agent: at nice 10
/// against 0, about a tenth of a thread's share of a busy core.
pub const NICE: i32 = 10;

pub struct Background {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    /// Starts the thread and its runtime.
    pub fn start() -> std::io::Result<Background> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("weft-background".into())
            // Applying a large snapshot to the view's persistent maps runs
            // deep: room as the main thread has.
            .stack_size(8 << 20)
            .spawn(move || {
                lower_priority();
                // Until told to stop (or the sender is dropped).
                let _ = runtime.block_on(stopped);
                // Dropping the runtime here cancels its tasks.
            })?;
        Ok(Background {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The background thread's runtime.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Runs `task` on the background thread; the handle may be awaited or
    /// aborted from anywhere.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(task)
    }
}

/// Raises the calling thread's nice value by [`NICE`], to 19 at most
/// (Linux's get- and setpriority take a thread id); a failure is logged and
/// the thread runs as it is.
fn lower_priority() {
    let tid = nix::unistd::gettid().as_raw() as libc::id_t;
    // SAFETY: get- and setpriority take plain integers and touch no memory.
    // getpriority cannot fail for the calling thread: what it returns is
    // the nice value (-1 included).
    let now = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
    let set = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, (now + NICE).min(19)) };
    if set != 0 {
        tracing::warn!(
            "background thread at normal priority: setpriority: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_run_on_their_own_thread_and_end_with_it() {
        let background = Background::start().unwrap();
        let here = std::thread::current().id();
        let there = background
            .spawn(async { std::thread::current().id() })
            .await
            .unwrap();
        assert_ne!(here, there);
        // Niced: this thread's value is untouched, the background's raised.
        let nice = |tid: i32| {
            let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            after.split(' ').nth(16).unwrap().parse::<i32>().unwrap()
        };
        let mine = nix::unistd::gettid().as_raw();
        let theirs = background
            .spawn(async { nix::unistd::gettid().as_raw() })
            .await
            .unwrap();
        assert_eq!(nice(theirs), (nice(mine) + NICE).min(19));
        let (_keep, never) = oneshot::channel::<()>();
        let forever = background.spawn(async move {
            let _ = never.await;
        });
        drop(background);
        let ended = forever.await.unwrap_err();
        assert!(ended.is_cancelled(), "{ended}");
    }
}
