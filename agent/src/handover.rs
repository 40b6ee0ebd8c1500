//! The agent's control socket: in-place upgrades (a successor takes over the
//! listening sockets) and `weft-agent reload`.
//!
//! A running agent listens on `<data_dir>/agent.sock`, a unix
//! `SOCK_SEQPACKET` socket (one message per datagram, file descriptors
//! passed with `SCM_RIGHTS`). The directory is made 0700 and the socket
//! 0600, and both ends check the other's credentials (`SO_PEERCRED`): only
//! a process of the agent's own user may talk to it, since whoever gets the
//! listeners gets the node's traffic.
//!
//! An upgrade, as Envoy's hot restart does it:
//! 1. The successor (`weft-agent --config agent.toml`, the new binary) finds
//!    the socket answering and sends `Hello` with its node name. The
//!    predecessor answers with the health it last reported, so that the
//!    successor registers the node's instances as they are, not critical.
//! 2. The successor starts everything but its listeners: registration,
//!    watch, certificates. Then it asks for the listeners and receives the
//!    very sockets (inbound, outbound, permissive, upstreams, admin, DNS):
//!    connections waiting in their accept queues are not lost.
//! 3. It serves them and says `Serving`. Only then does the predecessor stop
//!    accepting: until that moment a failed successor changes nothing. The
//!    predecessor then drains (its HBONE connections send GOAWAY, open
//!    connections run to their end or `upgrade_drain_timeout`) and exits
//!    without deregistering the node or ending the eBPF lease, which the
//!    successor now renews.
//!
//! The conversation runs on plain threads with blocking sockets and read
//! timeouts: it is a handful of messages, once per upgrade.
use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use serde::{Deserialize, Serialize};
use weft_api::catalog::HealthStatus;

/// The control socket's file name in the data directory.
pub const SOCKET_NAME: &str = "agent.sock";
/// Version of the conversation; a successor speaking another is refused.
const VERSION: u32 = 1;
/// The largest message (JSON) either side sends or takes.
const MAX_MESSAGE: usize = 256 * 1024;
/// The most descriptors one message carries.
const MAX_FDS: usize = 64;
/// The most descriptors the kernel passes in one message (`SCM_MAX_FD`):
/// room is made for all of them, since those that do not fit would be
/// installed in this process and then lost (MSG_CTRUNC), leaking them.
const SCM_MAX_FD: usize = 253;
/// How long either side waits for the other's next message. The successor's
/// start-up (registration, watch, certificates) happens between two
/// messages, so this is generous.
const REPLY_LIMIT: Duration = Duration::from_secs(90);
/// How long `weft-agent reload` is answered within. A reload waits on the
/// servers (registration, certificates); one that takes longer goes on by
/// itself, so that a stuck server never holds the control socket (and with
/// it every later reload and upgrade).
#[cfg(not(test))]
const RELOAD_ANSWER: Duration = Duration::from_secs(60);
#[cfg(test)]
const RELOAD_ANSWER: Duration = Duration::from_millis(300);

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket: {0}")]
    Socket(#[from] nix::Error),
    #[error("the peer on the control socket runs as uid {peer}, not {own}: refused")]
    Credentials { peer: u32, own: u32 },
    #[error("bad message on the control socket: {0}")]
    Message(String),
    #[error("the running agent refused: {0}")]
    Refused(String),
    #[error("the control socket closed mid-conversation")]
    Closed,
}

/// What the two processes say to each other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    /// Successor → predecessor: "I will take over".
    Hello { version: u32, node: String },
    /// Predecessor → successor: its pid, and the last health reported per
    /// instance id.
    State {
        pid: u32,
        health: BTreeMap<String, (HealthStatus, String)>,
        /// Workload id by service id (the eBPF programs' numbering).
        workloads: BTreeMap<String, u32>,
    },
    /// Successor → predecessor: ready, send the listeners.
    SendListeners,
    /// Predecessor → successor: one name per descriptor attached.
    Listeners { names: Vec<String> },
    /// Successor → predecessor: serving them; stop accepting and drain.
    Serving,
    /// `weft-agent reload` → agent: re-read the configuration file.
    Reload,
    /// Agent → `weft-agent reload`: what the reload did, or why not.
    Reloaded { result: Result<String, String> },
    /// Either side: no.
    Refused { reason: String },
}

/// The control socket path of an agent whose data directory is `data_dir`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Refuses a peer of another user.
fn check_peer(fd: &OwnedFd) -> Result<(), HandoverError> {
    let creds = socket::getsockopt(fd, sockopt::PeerCredentials)?;
    let (peer, own) = (creds.uid(), own_uid());
    if peer != own {
        return Err(HandoverError::Credentials { peer, own });
    }
    Ok(())
}

fn set_timeout(fd: &OwnedFd, limit: Duration) -> Result<(), HandoverError> {
    let tv = nix::sys::time::TimeVal::new(limit.as_secs() as _, limit.subsec_micros() as _);
    socket::setsockopt(fd, sockopt::ReceiveTimeout, &tv)?;
    socket::setsockopt(fd, sockopt::SendTimeout, &tv)?;
    Ok(())
}

/// Sends `message` with `fds` attached.
pub fn send(fd: &OwnedFd, message: &Message, fds: &[RawFd]) -> Result<(), HandoverError> {
    let body = serde_json::to_vec(message).map_err(|e| HandoverError::Message(e.to_string()))?;
    if body.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
        return Err(HandoverError::Message(format!(
            "message of {} bytes and {} descriptors is too large",
            body.len(),
            fds.len()
        )));
    }
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    socket::sendmsg::<()>(
        fd.as_raw_fd(),
        &[IoSlice::new(&body)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// Receives one message and the descriptors attached to it.
pub fn receive(fd: &OwnedFd) -> Result<(Message, Vec<OwnedFd>), HandoverError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = socket::recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this
            // process for us; nothing else owns them.
            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    let (bytes, truncated) = (msg.bytes, msg.flags.contains(MsgFlags::MSG_TRUNC));
    if fds.len() > MAX_FDS {
        // Closed as they are dropped.
        return Err(HandoverError::Message(format!(
            "{} descriptors attached, {MAX_FDS} at most",
            fds.len()
        )));
    }
    if bytes == 0 {
        return Err(HandoverError::Closed);
    }
    if truncated {
        return Err(HandoverError::Message("message too large".into()));
    }
    let message =
        serde_json::from_slice(&buf[..bytes]).map_err(|e| HandoverError::Message(e.to_string()))?;
    Ok((message, fds))
}

fn seqpacket() -> Result<OwnedFd, HandoverError> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// Connects to the agent whose control socket is `path`: `None` when no
/// agent answers there (no file, or a stale one).
pub fn connect(path: &Path) -> Result<Option<OwnedFd>, HandoverError> {
    let fd = seqpacket()?;
    let addr = UnixAddr::new(path)?;
    match socket::connect(fd.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(nix::Error::ENOENT | nix::Error::ECONNREFUSED) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    check_peer(&fd)?;
    set_timeout(&fd, REPLY_LIMIT)?;
    Ok(Some(fd))
}

/// Sends `message` and waits for the answer.
fn ask(fd: &OwnedFd, message: &Message) -> Result<(Message, Vec<OwnedFd>), HandoverError> {
    send(fd, message, &[])?;
    match receive(fd)? {
        (Message::Refused { reason }, _) => Err(HandoverError::Refused(reason)),
        answer => Ok(answer),
    }
}

/// `weft-agent reload`: asks the agent at `path` to re-read its file.
pub fn request_reload(path: &Path) -> Result<String, HandoverError> {
    let fd = connect(path)?.ok_or_else(|| HandoverError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no agent answers on this control socket (is it running with this configuration?)",
        ),
    })?;
    match ask(&fd, &Message::Reload)? {
        (Message::Reloaded { result: Ok(what) }, _) => Ok(what),
        (Message::Reloaded { result: Err(why) }, _) => Err(HandoverError::Refused(why)),
        (other, _) => Err(HandoverError::Message(format!("unexpected {other:?}"))),
    }
}

/// The running agent a successor takes over from.
#[derive(Debug)]
pub struct Predecessor {
    fd: OwnedFd,
    pid: u32,
    /// The health it last reported per instance id.
    pub health: BTreeMap<String, (HealthStatus, String)>,
    /// Its workload ids by service id.
    pub workloads: BTreeMap<String, u32>,
}

/// Listening sockets received from the predecessor, by name.
#[derive(Debug, Default)]
pub struct Inherited(BTreeMap<String, OwnedFd>);

impl Inherited {
    /// The TCP listener named `name`, if it was handed over.
    pub fn tcp(&mut self, name: &str) -> Option<std::net::TcpListener> {
        self.0.remove(name).map(std::net::TcpListener::from)
    }

    /// The UDP socket named `name`, if it was handed over.
    pub fn udp(&mut self, name: &str) -> Option<std::net::UdpSocket> {
        self.0.remove(name).map(std::net::UdpSocket::from)
    }

    /// Names of what was handed over and not taken (closed when dropped).
    pub fn unused(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

impl Predecessor {
    /// Says hello to the agent at `path`, if one runs there, and gets the
    /// state the successor starts from.
    pub fn find(path: &Path, node: &str) -> Result<Option<Self>, HandoverError> {
        let Some(fd) = connect(path)? else {
            return Ok(None);
        };
        let hello = Message::Hello {
            version: VERSION,
            node: node.to_string(),
        };
        match ask(&fd, &hello)? {
            (
                Message::State {
                    pid,
                    health,
                    workloads,
                },
                _,
            ) => Ok(Some(Self {
                fd,
                pid,
                health,
                workloads,
            })),
            (other, _) => Err(HandoverError::Message(format!("unexpected {other:?}"))),
        }
    }

    /// The predecessor's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Receives the predecessor's listening sockets. It keeps accepting on
    /// them until [`Predecessor::serving`].
    pub fn take_listeners(&self) -> Result<Inherited, HandoverError> {
        match ask(&self.fd, &Message::SendListeners)? {
            (Message::Listeners { names }, fds) if names.len() == fds.len() => {
                Ok(Inherited(names.into_iter().zip(fds).collect()))
            }
            (other, fds) => Err(HandoverError::Message(format!(
                "unexpected {other:?} with {} descriptors",
                fds.len()
            ))),
        }
    }

    /// Tells the predecessor that this agent serves: it stops and drains.
    pub fn serving(self) -> Result<(), HandoverError> {
        send(&self.fd, &Message::Serving, &[])
    }
}

/// What a running agent offers on its control socket.
pub trait Host: Send + Sync + 'static {
    fn node_name(&self) -> String;
    /// The health last reported per instance id.
    fn health(&self) -> BTreeMap<String, (HealthStatus, String)>;
    /// The eBPF workload id of each service id (empty without eBPF).
    fn workload_ids(&self) -> BTreeMap<String, u32>;
    /// Duplicates of the listening sockets, by name, or why not (the agent
    /// is stopping).
    fn listeners(&self) -> Result<Vec<(String, OwnedFd)>, String>;
    /// The successor serves: stop accepting and drain.
    fn handed_over(&self);
    /// The successor that got the listeners went away before serving.
    fn handover_abandoned(&self);
    /// Re-reads the configuration file: what changed, or why not.
    fn reload(&self) -> Result<String, String>;
}

/// Refuses a data directory that another user owns (or reaches through a
/// symbolic link of theirs): they could swap the socket for a link before
/// it is made 0600, or make the agent chmod a directory of their choosing.
fn check_owned(data_dir: &Path) -> Result<(), HandoverError> {
    use std::os::unix::fs::MetadataExt;
    let own = own_uid();
    let io = |source| HandoverError::Io {
        path: data_dir.to_path_buf(),
        source,
    };
    let link = std::fs::symlink_metadata(data_dir).map_err(io)?;
    let dir = std::fs::metadata(data_dir).map_err(io)?;
    for (what, meta) in [("symbolic link", &link), ("directory", &dir)] {
        if meta.uid() != own {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "the data {what} belongs to uid {}, not this agent's {own}: refused",
                    meta.uid()
                ),
            )));
        }
    }
    if !dir.is_dir() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a directory",
        )));
    }
    Ok(())
}

/// Where a running agent stands with respect to handing over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Serving; a successor may take over.
    Idle,
    /// The listeners went to a successor, which has not said `Serving` yet.
    Sent,
    /// Handed over.
    Done,
    /// Stopping (SIGTERM): no successor may take over any more.
    Stopping,
}

/// Keeps a stopping agent and a handover apart. An agent stopping on
/// SIGTERM deregisters its node, ends the eBPF lease and removes the
/// control socket: a successor that took over meanwhile would be left
/// serving a node the servers no longer know, behind a lease nobody asked
/// to end, unreachable for the next upgrade. So once stopping, no handover
/// starts, and one under way is waited for: if it completes, the agent
/// leaves as after a handover.
#[derive(Debug)]
pub struct Gate(tokio::sync::watch::Sender<Phase>);

impl Default for Gate {
    fn default() -> Self {
        Self(tokio::sync::watch::channel(Phase::Idle).0)
    }
}

impl Gate {
    /// The listeners are about to go to a successor: `false` if stopping.
    pub fn sending(&self) -> bool {
        let mut may = false;
        self.0.send_modify(|p| {
            if *p == Phase::Idle {
                *p = Phase::Sent;
                may = true;
            }
        });
        may
    }

    /// The successor went away before serving.
    pub fn abandoned(&self) {
        self.0.send_if_modified(|p| {
            let was_sent = *p == Phase::Sent;
            if was_sent {
                *p = Phase::Idle;
            }
            was_sent
        });
    }

    /// The successor serves.
    pub fn done(&self) {
        self.0.send_replace(Phase::Done);
    }

    /// Resolves once handed over.
    pub async fn handed_over(&self) {
        let _ = self.0.subscribe().wait_for(|p| *p == Phase::Done).await;
    }

    /// The agent stops: no handover from now on. One under way is waited
    /// for (the conversation bounds it); `true` if it completed.
    pub async fn stop(&self) -> bool {
        let mut phases = self.0.subscribe();
        loop {
            let mut now = Phase::Idle;
            self.0.send_modify(|p| {
                if *p == Phase::Idle {
                    *p = Phase::Stopping;
                }
                now = *p;
            });
            match now {
                Phase::Done => return true,
                Phase::Stopping | Phase::Idle => return false,
                Phase::Sent => {
                    tracing::info!("stopping during a handover: waiting for the successor");
                    if phases.wait_for(|p| *p != Phase::Sent).await.is_err() {
                        return false;
                    }
                }
            }
        }
    }
}

/// The listening control socket of a running agent.
pub struct ControlSocket {
    fd: OwnedFd,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds `<data_dir>/agent.sock` (the directory made 0700, a stale
    /// socket replaced, the socket 0600). Call only when no agent answers
    /// there (see [`connect`]) or after taking over from it.
    pub fn bind(data_dir: &Path) -> Result<Self, HandoverError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| HandoverError::Io { path, source }
        };
        std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
        check_owned(data_dir)?;
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(data_dir))?;
        let path = socket_path(data_dir);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
        let fd = seqpacket()?;
        socket::bind(fd.as_raw_fd(), &UnixAddr::new(&path)?)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(io(&path))?;
        socket::listen(&fd, Backlog::new(4)?)?;
        Ok(Self { fd, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves conversations one at a time on a thread of its own, for as
    /// long as the process lives. After a handover it stops listening (the
    /// successor binds the path anew).
    pub fn serve(self, host: std::sync::Arc<dyn Host>) {
        std::thread::Builder::new()
            .name("weft-control".into())
            .spawn(move || loop {
                let conn = match socket::accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                    // SAFETY: accept4 returned a new descriptor we own.
                    Ok(raw) => unsafe { OwnedFd::from_raw_fd(raw) },
                    Err(nix::Error::EINTR) => continue,
                    Err(e) => {
                        tracing::error!("control socket {}: accept: {e}", self.path.display());
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                };
                match converse(&conn, &host) {
                    Ok(true) => return,
                    Ok(false) => {}
                    Err(e) => tracing::warn!("control socket: {e}"),
                }
            })
            .expect("spawning the control socket thread");
    }
}

/// One conversation; `true` once the agent has handed over.
fn converse(fd: &OwnedFd, host: &std::sync::Arc<dyn Host>) -> Result<bool, HandoverError> {
    if let Err(e) = check_peer(fd) {
        let _ = send(
            fd,
            &Message::Refused {
                reason: e.to_string(),
            },
            &[],
        );
        return Err(e);
    }
    set_timeout(fd, REPLY_LIMIT)?;
    let (first, _) = receive(fd)?;
    match first {
        Message::Reload => {
            let (tx, rx) = std::sync::mpsc::channel();
            let reloading = host.clone();
            std::thread::Builder::new()
                .name("weft-reload".into())
                .spawn(move || {
                    let result = reloading.reload();
                    if tx.send(result.clone()).is_err() {
                        // Answered already: its outcome goes to the log.
                        match result {
                            Ok(what) => tracing::info!("late reload done: {what}"),
                            Err(why) => tracing::error!("late reload refused: {why}"),
                        }
                    }
                })
                .map_err(|source| HandoverError::Io {
                    path: PathBuf::from("weft-reload thread"),
                    source,
                })?;
            let result = rx.recv_timeout(RELOAD_ANSWER).unwrap_or_else(|_| {
                Err(format!(
                    "still reloading after {RELOAD_ANSWER:?} (are the servers answering?); \
                     it goes on, and the agent's log tells how it ends"
                ))
            });
            send(fd, &Message::Reloaded { result }, &[])?;
            Ok(false)
        }
        Message::Hello { version, node } => {
            let own = host.node_name();
            if version != VERSION || node != own {
                let reason = format!(
                    "this agent runs node {own:?} (control protocol {VERSION}); \
                     the successor is for node {node:?} (protocol {version})"
                );
                send(
                    fd,
                    &Message::Refused {
                        reason: reason.clone(),
                    },
                    &[],
                )?;
                return Err(HandoverError::Refused(reason));
            }
            tracing::info!("a successor agent is starting: handing over once it is ready");
            let state = Message::State {
                pid: std::process::id(),
                health: host.health(),
                workloads: host.workload_ids(),
            };
            send(fd, &state, &[])?;
            match receive(fd)? {
                (Message::SendListeners, _) => {}
                (other, _) => return Err(HandoverError::Message(format!("unexpected {other:?}"))),
            }
            let listeners = match host.listeners() {
                Ok(listeners) => listeners,
                Err(reason) => {
                    send(
                        fd,
                        &Message::Refused {
                            reason: reason.clone(),
                        },
                        &[],
                    )?;
                    return Err(HandoverError::Refused(reason));
                }
            };
            let names = listeners.iter().map(|(n, _)| n.clone()).collect();
            let raw: Vec<RawFd> = listeners
                .iter()
                .map(|(_, fd)| fd.as_fd().as_raw_fd())
                .collect();
            let sent = send(fd, &Message::Listeners { names }, &raw);
            drop(listeners);
            if let Err(e) = sent {
                host.handover_abandoned();
                return Err(e);
            }
            match receive(fd) {
                Ok((Message::Serving, _)) => {
                    tracing::info!("the successor serves: no longer accepting, draining");
                    host.handed_over();
                    Ok(true)
                }
                Ok((other, _)) => {
                    host.handover_abandoned();
                    Err(HandoverError::Message(format!("unexpected {other:?}")))
                }
                Err(e) => {
                    tracing::warn!("the successor went away before serving ({e}); still serving");
                    host.handover_abandoned();
                    Ok(false)
                }
            }
        }
        other => {
            send(
                fd,
                &Message::Refused {
                    reason: format!("unexpected first message {other:?}"),
                },
                &[],
            )?;
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    struct FakeHost {
        listener: std::net::TcpListener,
        handed_over: AtomicBool,
        /// The reload hangs (a server that never answers).
        reload_hangs: AtomicBool,
        gate: Gate,
    }

    impl Host for FakeHost {
        fn node_name(&self) -> String {
            "node-a".into()
        }
        fn health(&self) -> BTreeMap<String, (HealthStatus, String)> {
            [(
                "api-1".to_string(),
                (HealthStatus::Passing, "ok".to_string()),
            )]
            .into()
        }
        fn workload_ids(&self) -> BTreeMap<String, u32> {
            [("web-1".to_string(), 7)].into()
        }
        fn listeners(&self) -> Result<Vec<(String, OwnedFd)>, String> {
            if !self.gate.sending() {
                return Err("this agent is stopping".into());
            }
            Ok(vec![(
                "inbound".into(),
                self.listener.as_fd().try_clone_to_owned().unwrap(),
            )])
        }
        fn handed_over(&self) {
            self.gate.done();
            self.handed_over.store(true, Ordering::SeqCst);
        }
        fn handover_abandoned(&self) {
            self.gate.abandoned();
        }
        fn reload(&self) -> Result<String, String> {
            if self.reload_hangs.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_secs(3600));
            }
            Err("agent.toml:3: nope".into())
        }
    }

    fn host() -> Arc<FakeHost> {
        Arc::new(FakeHost {
            listener: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
            handed_over: AtomicBool::new(false),
            reload_hangs: AtomicBool::new(false),
            gate: Gate::default(),
        })
    }

    #[test]
    fn a_successor_gets_the_state_and_the_very_listening_socket() {
        let dir = tempfile::tempdir().unwrap();
        let host = host();
        let addr = host.listener.local_addr().unwrap();
        let control = ControlSocket::bind(dir.path()).unwrap();
        let path = control.path().to_path_buf();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        control.serve(host.clone());

        let pred = Predecessor::find(&path, "node-a").unwrap().unwrap();
        assert_eq!(pred.health["api-1"].0, HealthStatus::Passing);
        assert_eq!(pred.workloads["web-1"], 7);
        let mut inherited = pred.take_listeners().unwrap();
        let listener = inherited.tcp("inbound").unwrap();
        assert_eq!(listener.local_addr().unwrap(), addr);
        assert!(inherited.unused().is_empty());
        // A connection made now is accepted through the inherited socket.
        let _client = std::net::TcpStream::connect(addr).unwrap();
        listener.accept().unwrap();
        assert!(!host.handed_over.load(Ordering::SeqCst));
        pred.serving().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !host.handed_over.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "never handed over");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_successor_for_another_node_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let control = ControlSocket::bind(dir.path()).unwrap();
        let path = control.path().to_path_buf();
        let host = host();
        control.serve(host.clone());
        let err = Predecessor::find(&path, "node-b").unwrap_err();
        assert!(err.to_string().contains("node-b"), "{err}");
        // Still serving: a reload is answered (with the host's refusal).
        let err = request_reload(&path).unwrap_err();
        assert!(err.to_string().contains("agent.toml:3: nope"), "{err}");
        assert!(!host.handed_over.load(Ordering::SeqCst));
    }

    #[test]
    fn a_hanging_reload_does_not_hold_the_control_socket() {
        let dir = tempfile::tempdir().unwrap();
        let control = ControlSocket::bind(dir.path()).unwrap();
        let path = control.path().to_path_buf();
        let host = host();
        host.reload_hangs.store(true, Ordering::SeqCst);
        control.serve(host.clone());
        let err = request_reload(&path).unwrap_err();
        assert!(err.to_string().contains("still reloading"), "{err}");
        // The next conversation is served at once: an upgrade goes ahead.
        let pred = Predecessor::find(&path, "node-a").unwrap().unwrap();
        assert_eq!(pred.workloads["web-1"], 7);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_stopping_agent_waits_for_a_handover_under_way_and_starts_none() {
        let dir = tempfile::tempdir().unwrap();
        let control = ControlSocket::bind(dir.path()).unwrap();
        let path = control.path().to_path_buf();
        let host = host();
        control.serve(host.clone());
        let blocking = |path: PathBuf| {
            tokio::task::spawn_blocking(move || {
                let pred = Predecessor::find(&path, "node-a")?.unwrap();
                let listeners = pred.take_listeners()?;
                Ok::<_, HandoverError>((pred, listeners))
            })
        };

        // A successor has the listeners; SIGTERM now waits for it, and its
        // serving makes this a handover.
        let (pred, _listeners) = blocking(path.clone()).await.unwrap().unwrap();
        let stopping = tokio::spawn({
            let host = host.clone();
            async move { host.gate.stop().await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!stopping.is_finished(), "stopped under a handover");
        tokio::task::spawn_blocking(move || pred.serving().unwrap())
            .await
            .unwrap();
        assert!(stopping.await.unwrap(), "not counted as handed over");

        // A successor that goes away: the stop goes ahead as a stop.
        let host = super::tests::host();
        let dir = tempfile::tempdir().unwrap();
        let control = ControlSocket::bind(dir.path()).unwrap();
        let path = control.path().to_path_buf();
        control.serve(host.clone());
        let (pred, _listeners) = blocking(path.clone()).await.unwrap().unwrap();
        drop(pred);
        assert!(!host.gate.stop().await);
        // Stopping: the next successor is refused before any listener.
        let err = blocking(path).await.unwrap().unwrap_err();
        assert!(err.to_string().contains("stopping"), "{err}");
        assert!(!host.handed_over.load(Ordering::SeqCst));
    }

    #[test]
    fn no_agent_is_none_and_a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        assert!(connect(&path).unwrap().is_none());
        drop(ControlSocket::bind(dir.path()).unwrap());
        assert!(path.exists());
        assert!(connect(&path).unwrap().is_none());
        let again = ControlSocket::bind(dir.path()).unwrap();
        assert!(connect(again.path()).unwrap().is_some());
    }

    #[test]
    fn a_flood_of_descriptors_is_refused_and_none_is_kept() {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let many = vec![w.as_raw_fd(); 200];
        let body = serde_json::to_vec(&Message::Serving).unwrap();
        socket::sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(&body)],
            &[ControlMessage::ScmRights(&many)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        drop(w);
        let err = receive(&b).unwrap_err();
        assert!(err.to_string().contains("200 descriptors"), "{err}");
        // Every copy of the write end is closed: the pipe reads end-of-file
        // (a leaked copy would leave it open, and the read would block).
        let reader = std::fs::File::from(r);
        nix::fcntl::fcntl(
            &reader,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &reader, &mut byte).unwrap(), 0);
    }

    #[test]
    fn a_data_directory_of_another_user_is_refused() {
        use std::os::unix::fs::{chown, lchown, symlink};
        if own_uid() != 0 {
            return; // chown to another user takes root
        }
        let dir = tempfile::tempdir().unwrap();
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        chown(&theirs, Some(65534), None).unwrap();
        let err = ControlSocket::bind(&theirs).err().unwrap();
        assert!(err.to_string().contains("uid 65534"), "{err}");
        assert!(!socket_path(&theirs).exists());
        // A link of theirs to a directory of ours is refused too, and the
        // directory it names is not touched.
        let ours = dir.path().join("ours");
        std::fs::create_dir(&ours).unwrap();
        std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = dir.path().join("link");
        symlink(&ours, &link).unwrap();
        lchown(&link, Some(65534), None).unwrap();
        assert!(ControlSocket::bind(&link).is_err());
        assert_eq!(
            std::fs::metadata(&ours).unwrap().permissions().mode() & 0o777,
            0o755
        );
        // Ours is fine.
        ControlSocket::bind(&ours).unwrap();
    }

    #[test]
    fn messages_keep_their_boundaries_and_descriptors() {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let file = tempfile::tempfile().unwrap();
        send(&a, &Message::Serving, &[]).unwrap();
        send(
            &a,
            &Message::Listeners {
                names: vec!["x".into()],
            },
            &[file.as_raw_fd()],
        )
        .unwrap();
        assert_eq!(receive(&b).unwrap().0, Message::Serving);
        let (m, fds) = receive(&b).unwrap();
        assert_eq!(
            m,
            Message::Listeners {
                names: vec!["x".into()]
            }
        );
        assert_eq!(fds.len(), 1);
        drop(a);
        assert!(matches!(receive(&b), Err(HandoverError::Closed)));
    }
}
