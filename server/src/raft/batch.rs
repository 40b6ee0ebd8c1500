//! Writes on the leader go to Raft in groups: commands that arrive while
//! earlier groups are being committed are written together as one entry
//! (`Command::Batch`), so that many concurrent writes share one append, one
//! fsync on each server and one replication round trip, as etcd batches
//! proposals. A lone write still goes at once, as its own entry.
//!
//! Each command of a group keeps its own index and result (see
//! `State::apply_entry`); a group fails as a whole only when Raft does (no
//! longer leader, shutting down), and then every writer gets that error.
//!
//! A leader groups writes only once every server has said it applies
//! batches ([`enable_when_all_apply`]): during a rolling upgrade a server of
//! an earlier version would fail on a `Command::Batch` entry. Likewise it
//! keeps a write's standing (`Command::Once`) only once every server checks
//! it: one of an earlier version would ignore it and apply a write the
//! others refuse.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::peer_status::PeerStatus;
use super::{Member, Raft};
use crate::state::{Command, CommandResult};
use crate::write_error::WriteError;

/// Groups being committed at once: more arrive meanwhile and wait to form
/// the next group.
const IN_FLIGHT: usize = 2;
/// At most this many commands in a group...
const MAX_COMMANDS: usize = 512;
/// ...and this many bytes (encoded); a larger command goes alone.
const MAX_BYTES: usize = 1 << 20;

struct Pending {
    cmd: Command,
    bytes: usize,
    reply: oneshot::Sender<Result<CommandResult, WriteError>>,
}

/// The way into the grouping task (one per server).
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<Pending>,
    /// Every voter applies batches (until then each write is its own entry).
    enabled: Arc<AtomicBool>,
    /// Every voter checks standings (until then writes go without one).
    standing: Arc<AtomicBool>,
}

impl Batcher {
    /// Starts the grouping task for `raft` (inside a tokio runtime).
    /// Each group's time to commit and apply goes into `commit_seconds`.
    pub fn start(raft: Raft, commit_seconds: Histogram) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let enabled = Arc::new(AtomicBool::new(false));
        let standing = Arc::new(AtomicBool::new(false));
        tokio::spawn(run(raft, rx, enabled.clone(), commit_seconds));
        Self {
            tx,
            enabled,
            standing,
        }
    }

    /// Whether writes are grouped yet.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Whether writes keep their standing yet.
    pub fn checks_standing(&self) -> bool {
        self.standing.load(Ordering::Relaxed)
    }

    /// Writes `cmd` (this server must lead) and returns its own result.
    pub async fn write(&self, mut cmd: Command) -> Result<CommandResult, WriteError> {
        if !self.checks_standing() {
            if let Command::Once { standing, .. } = &mut cmd {
                *standing = None;
            }
        }
        if matches!(cmd, Command::Batch(_)) {
            // Only the batcher makes batches: one handed in (a forwarded
            // write) would be answered as a single write.
            return Err(WriteError::Refused("a batch is not a write".into()));
        }
        let (reply, result) = oneshot::channel();
        let bytes = super::codec::encoded_len(&cmd);
        self.tx
            .send(Pending { cmd, bytes, reply })
            .map_err(|_| WriteError::Raft("the write batcher has stopped".into()))?;
        result
            .await
            .map_err(|_| WriteError::Unknown("the write batcher dropped the write".into()))?
    }
}

/// Enables grouping in `batcher` (this server's) once every server, asked
/// while `node` leads, says it applies batches. Asks every 500 ms until
/// then; once enabled it stays so (servers are upgraded, not downgraded,
/// past this version).
pub async fn enable_when_all_apply<M: Member>(node: Arc<M>, batcher: Batcher) {
    while !(batcher.enabled() && batcher.checks_standing()) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let metrics = node.raft().metrics().borrow().clone();
        if metrics.state != openraft::ServerState::Leader {
            continue;
        }
        // Learners too: they apply the same log.
        let voters: Vec<_> = (metrics.membership_config.membership().nodes())
            .map(|(id, _)| *id)
            .collect();
        let asked = voters.iter().map(|id| node.peer_status(*id));
        let statuses = futures::future::join_all(asked).await;
        let every = |says: fn(&PeerStatus) -> bool| {
            (statuses.iter().zip(&voters))
                .all(|(s, id)| s.as_ref().is_some_and(|s| s.id == *id && says(s)))
        };
        if !batcher.enabled() && every(|s| s.applies_batches) {
            tracing::info!(
                servers = voters.len(),
                "every server applies batches: grouping writes"
            );
            batcher.enabled.store(true, Ordering::Relaxed);
        }
        if !batcher.checks_standing() && every(|s| s.checks_standing) {
            tracing::info!(
                servers = voters.len(),
                "every server checks what a write was judged on"
            );
            batcher.standing.store(true, Ordering::Relaxed);
        }
    }
}

async fn run(
    raft: Raft,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    enabled: Arc<AtomicBool>,
    commit_seconds: Histogram,
) {
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut carried: Option<Pending> = None;
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut bytes = first.bytes;
        let mut group = vec![first];
        let most = if enabled.load(Ordering::Relaxed) {
            MAX_COMMANDS
        } else {
            1
        };
        while group.len() < most {
            let Ok(next) = rx.try_recv() else { break };
            if bytes + next.bytes > MAX_BYTES {
                carried = Some(next);
                break;
            }
            bytes += next.bytes;
            group.push(next);
        }
        let (raft, commit_seconds) = (raft.clone(), commit_seconds.clone());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            commit(&raft, group).await;
            commit_seconds.observe(started.elapsed().as_secs_f64());
            drop(permit);
        });
    }
}

/// Writes `group` as one entry and hands each writer its result.
async fn commit(raft: &Raft, mut group: Vec<Pending>) {
    if group.len() == 1 {
        let Pending { cmd, reply, .. } = group.remove(0);
        let _ = reply.send(client_write(raft, cmd).await);
        return;
    }
    let (cmds, replies): (Vec<_>, Vec<_>) = group.into_iter().map(|p| (p.cmd, p.reply)).unzip();
    let count = cmds.len();
    match client_write(raft, Command::Batch(cmds)).await {
        Ok(CommandResult::Batch(results)) if results.len() == count => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
        }
        Ok(other) => {
            let e = WriteError::Raft(format!("a batch of {count} was answered {other:?}"));
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

async fn client_write(raft: &Raft, cmd: Command) -> Result<CommandResult, WriteError> {
    match raft.client_write(cmd).await {
        Ok(resp) => Ok(resp.data),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(
            WriteError::NoLeader(format!("not the leader (leader: {:?})", f.leader_id)),
        ),
        Err(e) => Err(WriteError::Raft(e.to_string())),
    }
}
