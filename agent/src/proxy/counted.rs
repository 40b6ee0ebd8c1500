//! A stream that counts the bytes through it and reports them, with the
//! connection's close, to the agent's metrics when it is dropped. It wraps
//! the connection to an instance of this node (inbound side), or a source
//! workload's connection served per request (outbound side).
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::{AgentMetrics, Direction, Side};

pub struct Counted<S> {
    inner: S,
    metrics: Arc<AgentMetrics>,
    /// Inbound: `inner` is the connection to the instance (written = sent
    /// to it). Outbound: `inner` is the client's (read = sent onwards).
    side: Side,
    source: String,
    destination: String,
    written: u64,
    read: u64,
    opened: std::time::Instant,
}

impl<S> Counted<S> {
    /// Wraps `inner` (the connection to the destination) and counts it open.
    pub fn new(inner: S, metrics: Arc<AgentMetrics>, source: &str, destination: &str) -> Self {
        Self::on(Side::Inbound, inner, metrics, source, destination)
    }

    /// Wraps `inner`, a source workload's connection, at the source's agent.
    pub fn client(inner: S, metrics: Arc<AgentMetrics>, source: &str, destination: &str) -> Self {
        Self::on(Side::Outbound, inner, metrics, source, destination)
    }

    fn on(
        side: Side,
        inner: S,
        metrics: Arc<AgentMetrics>,
        source: &str,
        destination: &str,
    ) -> Self {
        metrics.conn_opened(side, source, destination);
        Self {
            inner,
            metrics,
            side,
            source: source.to_string(),
            destination: destination.to_string(),
            written: 0,
            read: 0,
            opened: std::time::Instant::now(),
        }
    }
}

impl<S> Drop for Counted<S> {
    fn drop(&mut self) {
        let (m, s, d) = (&self.metrics, &self.source, &self.destination);
        // Sent means towards the destination, whichever end `inner` is.
        let (sent, received) = match self.side {
            Side::Inbound => (self.written, self.read),
            Side::Outbound => (self.read, self.written),
        };
        m.bytes(self.side, s, d, Direction::Sent, sent);
        m.bytes(self.side, s, d, Direction::Received, received);
        m.conn_closed(s, d, self.opened.elapsed());
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = result {
            self.written += n as u64;
        }
        result
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
