//! Connections per client address on the server's ports, as Consul's
//! `limits.rpc_max_conns_per_client`: a client (an IP address) holds at most
//! `--max-conns-per-client` connections at once, counted from accept to
//! close, so that one host cannot take every file descriptor of a server.
//! A connection over the limit is closed at once, before its handshake.
//!
//! The same count, by any key and weight, bounds what one token holds:
//! its watch streams (`grpc::watch`), its share of the HTTP body budget
//! (`http`).
use std::collections::HashMap;
use std::hash::Hash;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The default connections a client may hold per port.
pub const DEFAULT_MAX_CONNS_PER_CLIENT: usize = 100;

/// What each key (a client address by default) holds now, against `max`.
pub struct ClientLimits<K: Eq + Hash + Clone = IpAddr> {
    max: usize,
    open: Mutex<HashMap<K, usize>>,
}

impl<K: Eq + Hash + Clone> ClientLimits<K> {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more connection from `key`, or None at the limit.
    pub fn admit(self: &Arc<Self>, key: K) -> Option<Slot<K>> {
        self.admit_weighing(key, 1)
    }

    /// A slot weighing `weight` for `key`, or None when it would take
    /// `key` past the limit.
    pub fn admit_weighing(self: &Arc<Self>, key: K, weight: usize) -> Option<Slot<K>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key.clone()).or_insert(0);
        if *n + weight > self.max {
            if *n == 0 {
                open.remove(&key);
            }
            return None;
        }
        *n += weight;
        Some(Slot {
            limits: self.clone(),
            key,
            weight,
        })
    }

    /// What `key` holds now.
    pub fn open(&self, key: &K) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(key).copied().unwrap_or(0)
    }
}

/// One admitted connection (or what a slot weighs); dropping it gives the
/// place back.
pub struct Slot<K: Eq + Hash + Clone = IpAddr> {
    limits: Arc<ClientLimits<K>>,
    key: K,
    weight: usize,
}

impl<K: Eq + Hash + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(self.weight);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// A connection that holds its slot until it is dropped.
pub struct Limited<S> {
    inner: S,
    _slot: Slot,
}

impl<S> Limited<S> {
    pub fn new(inner: S, slot: Slot) -> Self {
        Self { inner, _slot: slot }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Limited<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Logs a warning at most once per second for each place that calls it.
pub struct Throttled(Mutex<Option<Instant>>);

impl Throttled {
    pub const fn new() -> Self {
        Self(Mutex::new(None))
    }

    /// Whether a warning may be logged now.
    pub fn ready(&self) -> bool {
        let mut last = self.0.lock().expect("throttle lock");
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            return false;
        }
        *last = Some(now);
        true
    }
}

impl Default for Throttled {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_holds_at_most_max_and_closing_frees_a_place() {
        let limits = ClientLimits::new(2);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let first = limits.admit(a).expect("first");
        let _second = limits.admit(a).expect("second");
        assert!(limits.admit(a).is_none(), "a third is over the limit");
        assert!(limits.admit(b).is_some(), "another client is not affected");
        drop(first);
        assert_eq!(limits.open(&a), 1);
        assert!(
            limits.admit(a).is_some(),
            "a closed connection frees its place"
        );
    }

    #[test]
    fn throttled_warnings_come_at_most_once_a_second() {
        let t = Throttled::new();
        assert!(t.ready());
        assert!(!t.ready());
    }
}
