//! [`HboneStream`]: one HTTP/2 CONNECT tunnel as a byte stream.
//!
//! Wraps an h2 `SendStream`/`RecvStream` pair in tokio's `AsyncRead` and
//! `AsyncWrite`, so that a tunnel can be spliced to a TCP socket with
//! [`crate::splice::splice`]. Writes wait for HTTP/2 flow-control
//! capacity; received data is handed back to the peer's window as it is
//! read. `shutdown` sends END_STREAM (a TCP half-close) and reading returns
//! EOF when the peer's END_STREAM arrives. [`HboneStream::poll_send_chunk`]
//! and [`HboneStream::poll_recv_chunk`] move data as `Bytes`, uncopied, for
//! [`crate::splice::tunnel`].

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest single DATA write requested at once (bytes). Each write is
/// copied into a fresh buffer; glibc serves 128 KiB and more with mmap, and
/// the page faults of a new mapping per write cost more than the copy.
const MAX_WRITE: usize = 64 * 1024;

/// An established HBONE tunnel, readable and writable like a TCP stream.
#[derive(Debug)]
pub struct HboneStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Data received but not yet read.
    pending: Bytes,
    /// END_STREAM has been received (reads return EOF).
    read_closed: bool,
    /// A receive error not yet returned (data read before it went first).
    read_error: Option<io::Error>,
    /// END_STREAM has been sent.
    write_closed: bool,
    /// The tunnel's place on its pooled connection, if it has one.
    _place: Option<StreamPlace>,
}

impl HboneStream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        HboneStream {
            send,
            recv,
            pending: Bytes::new(),
            read_closed: false,
            read_error: None,
            write_closed: false,
            _place: None,
        }
    }

    /// Holds `place` on the pooled connection until the stream is dropped.
    pub(crate) fn holding(mut self, place: StreamPlace) -> Self {
        self._place = Some(place);
        self
    }

    /// Bytes received and not yet read (a test's view of the window).
    #[cfg(test)]
    pub(crate) fn buffered(&mut self) -> usize {
        self.pending.len() + self.recv.flow_control().used_capacity()
    }

    /// The next data received, as the DATA frame it came in (its window is
    /// given back now); `None` once the peer's END_STREAM arrived. Data
    /// received before an error comes before it.
    pub(crate) fn poll_recv_chunk(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<Bytes>>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.pending))));
        }
        if let Some(e) = self.read_error.take() {
            return Poll::Ready(Err(e));
        }
        loop {
            if self.read_closed {
                return Poll::Ready(Ok(None));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    if !data.is_empty() {
                        return Poll::Ready(Ok(Some(data)));
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => self.read_closed = true,
            }
        }
    }

    /// Sends the front of `chunk` as it is (no copy), as much as the
    /// stream's flow-control window takes now: the bytes sent, which are
    /// gone from `chunk`.
    pub(crate) fn poll_send_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        let n = ready!(self.poll_send_capacity(cx, chunk.len()))?;
        self.send
            .send_data(chunk.split_to(n), false)
            .map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    /// Waits until the stream may send: how many of `want` (> 0) bytes it
    /// may send now (at least one).
    fn poll_send_capacity(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        self.send.reserve_capacity(want);
        loop {
            let capacity = self.send.capacity();
            if capacity > 0 {
                return Poll::Ready(Ok(capacity.min(want)));
            }
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => {
                    // The stream can no longer send: report why if the peer reset it.
                    return Poll::Ready(Err(match self.send.poll_reset(cx) {
                        Poll::Ready(Ok(reason)) => io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            format!("stream reset by peer: {reason}"),
                        ),
                        Poll::Ready(Err(e)) => h2_to_io(e),
                        Poll::Pending => io::ErrorKind::BrokenPipe.into(),
                    }));
                }
            }
        }
    }
}

/// Maps an h2 error to an io error of the kind a TCP socket would give.
pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 io error"));
    }
    let kind = if e.is_reset() || e.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

impl AsyncRead for HboneStream {
    /// Fills `buf` with as many received frames as are ready, so that a
    /// burst of small frames becomes one write on the other side.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut filled = false;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                filled |= n > 0;
            }
            if buf.remaining() == 0 || this.read_closed {
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = this.read_error.take() {
                return Poll::Ready(Err(e));
            }
            match this.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    // Give the window back now: at most one frame is held here.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.pending = data;
                }
                Poll::Ready(Some(Err(e))) => {
                    // Hand out what was read first; the error comes next.
                    this.read_error = Some(h2_to_io(e));
                    if filled {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(None) => this.read_closed = true,
                Poll::Pending if filled => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() && !this.write_closed {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(this.poll_send_capacity(cx, buf.len().min(MAX_WRITE)))?;
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The h2 connection task writes frames out as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        this.write_closed = true;
        this.send.reserve_capacity(0);
        this.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        Poll::Ready(Ok(()))
    }
}

/// A tunnel's place on its connection, given back when the tunnel (or the
/// attempt to open it) ends.
#[derive(Debug)]
pub(crate) struct StreamPlace(Arc<AtomicUsize>, Gauge);

impl StreamPlace {
    /// A place already counted in `count` (the connection's tunnels) and
    /// `gauge` (the pool's); both go down by one when it is dropped.
    pub(crate) fn new(count: Arc<AtomicUsize>, gauge: Gauge) -> Self {
        StreamPlace(count, gauge)
    }
}

impl Drop for StreamPlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        self.1.dec();
    }
}
