//! A thread for the agent's background work, apart from the runtime that
//! serves connections: following the servers' watch stream (applying
//! events, building each published view's indexes), bringing the eBPF
//! maps in step with the view, the calls to the servers (heartbeats,
//! health, traffic reports, certificates) and the admin endpoint. A large snapshot being applied, or a map
//! sync's thousands of syscalls, never holds up an accept or a request.
//! The thread runs a single-threaded tokio runtime of its own until the
//! [`Background`] is dropped, which ends its tasks.
use std::future::Future;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

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
        let (_keep, never) = oneshot::channel::<()>();
        let forever = background.spawn(async move {
            let _ = never.await;
        });
        drop(background);
        let ended = forever.await.unwrap_err();
        assert!(ended.is_cancelled(), "{ended}");
    }
}
