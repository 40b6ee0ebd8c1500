//! Splicing a socket and an HBONE tunnel without copying in user space.
//!
//! [`super::splice`] moves bytes through its own buffer, so on their way
//! through an agent they were copied twice more than the kernel and TLS
//! copy them: on the sending agent from the splice buffer into a fresh
//! buffer for HTTP/2, and on the receiving agent out of HTTP/2's frames
//! into the splice buffer. Here the socket is read into a buffer that is
//! then handed to HTTP/2 as it is (frozen, not copied), and the tunnel's
//! DATA frames are written to the socket as they came, several in one
//! vectored write.
//!
//! The buffer the socket is read into grows, shrinks and is freed when idle
//! as [`super::splice`]'s does (the same [`Sizes`]). Reads of the initial
//! size go to the stack and are copied out (request/response traffic holds
//! no buffer), and so is a read that fills less than half of the buffer: a
//! part handed to HTTP/2 keeps its whole buffer alive until it is sent, and
//! a run of small reads queued on a slow tunnel must not each hold one.
//! Half-closes are carried as by [`super::splice`]; when the tunnel fails
//! while sending, what it received before is still written to the socket
//! before the error ends the splice.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{write_zero, BufferProbe, Growth, Idle, Sizes, ROUNDS_PER_POLL, SCRATCH};
use crate::hbone::HboneStream;

/// At most this many received frames go into one write to the socket.
const GATHER_FRAMES: usize = 16;

/// Frames are gathered for one write until they hold this many bytes.
const GATHER_BYTES: usize = 256 * 1024;

/// Copies `socket` to `tunnel` and `tunnel` to `socket` until both
/// directions are done; returns the bytes carried socket -> tunnel and
/// tunnel -> socket.
pub async fn splice_tunnel<S>(socket: &mut S, tunnel: &mut HboneStream) -> io::Result<(u64, u64)>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    SpliceTunnel::new(socket, tunnel, Sizes::DEFAULT, None).await
}

/// The future of [`splice_tunnel`], with its sizes and an optional probe
/// (direction `0`: socket -> tunnel, the read buffer; `1`: tunnel ->
/// socket, the frames waiting to be written).
pub struct SpliceTunnel<'a, S: ?Sized> {
    socket: &'a mut S,
    tunnel: &'a mut HboneStream,
    sizes: Sizes,
    up: Upload,
    down: Download,
    /// The tunnel failed while sending: returned once the other direction
    /// has written what was received before and ended.
    send_failed: Option<io::Error>,
}

impl<'a, S> SpliceTunnel<'a, S>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    /// A splice of `socket` and `tunnel`; `sizes.initial` is capped at
    /// 8 KiB, as [`super::Splice`]'s.
    pub fn new(
        socket: &'a mut S,
        tunnel: &'a mut HboneStream,
        sizes: Sizes,
        probe: Option<Arc<BufferProbe>>,
    ) -> Self {
        let sizes = sizes.bounded();
        SpliceTunnel {
            socket,
            tunnel,
            sizes,
            up: Upload::new(sizes.initial, probe.clone()),
            down: Download::new(probe),
            send_failed: None,
        }
    }
}

impl<S> Future for SpliceTunnel<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    type Output = io::Result<(u64, u64)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let sizes = this.sizes;
        let up = if this.send_failed.is_some() {
            Poll::Pending
        } else {
            match this
                .up
                .poll_copy(cx, &sizes, Pin::new(&mut *this.socket), this.tunnel)
            {
                Poll::Ready(Err(UploadError::Socket(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(Err(UploadError::Tunnel(e))) => {
                    this.send_failed = Some(e);
                    Poll::Pending
                }
                Poll::Ready(Ok(n)) => Poll::Ready(n),
                Poll::Pending => Poll::Pending,
            }
        };
        let down = this
            .down
            .poll_copy(cx, this.tunnel, Pin::new(&mut *this.socket))?;
        let down = ready!(down);
        if let Some(e) = this.send_failed.take() {
            return Poll::Ready(Err(e));
        }
        let up = ready!(up);
        Poll::Ready(Ok((up, down)))
    }
}

/// Where an upload failed: reading the socket or sending on the tunnel.
enum UploadError {
    Socket(io::Error),
    Tunnel(io::Error),
}

/// Socket -> tunnel: reads into `buf`'s free space, and sends what was read
/// as a part of that same buffer (or a copy, for small reads).
struct Upload {
    /// Free space for the next read (no capacity: no buffer). Parts read
    /// before live on, shared, until HTTP/2 has written them.
    buf: BytesMut,
    /// Read, not yet taken by the tunnel.
    chunk: Bytes,
    growth: Growth,
    idle: Idle,
    read_done: bool,
    done: bool,
    carried: u64,
    probe: Option<Arc<BufferProbe>>,
}

impl Upload {
    fn new(initial: usize, probe: Option<Arc<BufferProbe>>) -> Self {
        Upload {
            buf: BytesMut::new(),
            chunk: Bytes::new(),
            growth: Growth::new(initial),
            idle: Idle::default(),
            read_done: false,
            done: false,
            carried: 0,
            probe,
        }
    }

    fn set_buffer(&mut self, buf: BytesMut) {
        self.buf = buf;
        if let Some(probe) = &self.probe {
            probe.hold(0, self.buf.capacity());
        }
    }

    fn poll_copy<S>(
        &mut self,
        cx: &mut Context<'_>,
        sizes: &Sizes,
        mut socket: Pin<&mut S>,
        tunnel: &mut HboneStream,
    ) -> Poll<Result<u64, UploadError>>
    where
        S: AsyncRead + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(self.carried));
        }
        for _ in 0..ROUNDS_PER_POLL {
            while !self.chunk.is_empty() {
                let sent = ready!(tunnel.poll_send_chunk(cx, &mut self.chunk));
                self.carried += sent.map_err(UploadError::Tunnel)? as u64;
            }
            if self.read_done {
                let shut = ready!(Pin::new(&mut *tunnel).poll_shutdown(cx));
                shut.map_err(UploadError::Tunnel)?;
                self.set_buffer(BytesMut::new());
                self.idle.disarm();
                self.done = true;
                return Poll::Ready(Ok(self.carried));
            }
            match self.poll_read_chunk(cx, sizes, socket.as_mut()) {
                Poll::Ready(Ok(Some(chunk))) => {
                    self.idle.read();
                    self.growth.note(chunk.len(), sizes);
                    self.chunk = chunk;
                }
                Poll::Ready(Ok(None)) => self.read_done = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(UploadError::Socket(e))),
                Poll::Pending => {
                    self.poll_idle(cx, sizes);
                    return Poll::Pending;
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// One read of the socket: what was read (`None` at its end). At the
    /// initial size it goes to the stack and is copied out, with no heap
    /// buffer held between reads; above it, into the buffer, handed on as
    /// a part of it if it filled at least half of the space it was read
    /// into (a part keeps the whole buffer alive), else copied out.
    fn poll_read_chunk<S>(
        &mut self,
        cx: &mut Context<'_>,
        sizes: &Sizes,
        socket: Pin<&mut S>,
    ) -> Poll<io::Result<Option<Bytes>>>
    where
        S: AsyncRead + ?Sized,
    {
        let size = self.growth.size;
        if size <= sizes.initial {
            if self.buf.capacity() > 0 {
                self.set_buffer(BytesMut::new());
            }
            let mut scratch = [MaybeUninit::<u8>::uninit(); SCRATCH];
            let mut read = ReadBuf::uninit(&mut scratch[..size]);
            ready!(socket.poll_read(cx, &mut read))?;
            let data = read.filled();
            return Poll::Ready(Ok((!data.is_empty()).then(|| Bytes::copy_from_slice(data))));
        }
        if self.buf.capacity() < size {
            self.set_buffer(BytesMut::with_capacity(size));
        }
        let space = self.buf.capacity().min(size);
        let n = ready!(tokio_util::io::poll_read_buf(
            socket,
            cx,
            &mut (&mut self.buf).limit(size)
        ))?;
        if n == 0 {
            return Poll::Ready(Ok(None));
        }
        if 2 * n >= space {
            return Poll::Ready(Ok(Some(self.buf.split_to(n).freeze())));
        }
        let copy = Bytes::copy_from_slice(&self.buf[..n]);
        self.buf.clear();
        Poll::Ready(Ok(Some(copy)))
    }

    /// Nothing to read and nothing to send: frees the buffer once the
    /// direction has been idle for `sizes.idle`.
    fn poll_idle(&mut self, cx: &mut Context<'_>, sizes: &Sizes) {
        if self.buf.capacity() == 0 && self.growth.size <= sizes.initial {
            self.idle.disarm();
            return;
        }
        if self.idle.poll_expired(cx, sizes) {
            self.growth.reset(sizes);
            self.set_buffer(BytesMut::new());
            if let Some(probe) = &self.probe {
                probe.idle_release();
            }
        }
    }
}

/// Tunnel -> socket: the DATA frames received, written as they are.
struct Download {
    frames: VecDeque<Bytes>,
    /// Bytes in `frames`.
    queued: usize,
    /// The tunnel's error, returned once the frames before it are written.
    error: Option<io::Error>,
    read_done: bool,
    need_flush: bool,
    done: bool,
    carried: u64,
    probe: Option<Arc<BufferProbe>>,
}

impl Download {
    fn new(probe: Option<Arc<BufferProbe>>) -> Self {
        Download {
            frames: VecDeque::new(),
            queued: 0,
            error: None,
            read_done: false,
            need_flush: false,
            done: false,
            carried: 0,
            probe,
        }
    }

    fn note_queued(&self) {
        if let Some(probe) = &self.probe {
            probe.hold(1, self.queued);
        }
    }

    fn poll_copy<S>(
        &mut self,
        cx: &mut Context<'_>,
        tunnel: &mut HboneStream,
        mut socket: Pin<&mut S>,
    ) -> Poll<io::Result<u64>>
    where
        S: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(self.carried));
        }
        for _ in 0..ROUNDS_PER_POLL {
            // Take what has arrived, up to one write's worth.
            while !self.read_done
                && self.error.is_none()
                && self.frames.len() < GATHER_FRAMES
                && self.queued < GATHER_BYTES
            {
                match tunnel.poll_recv_chunk(cx) {
                    Poll::Ready(Ok(Some(frame))) => {
                        self.queued += frame.len();
                        self.frames.push_back(frame);
                    }
                    Poll::Ready(Ok(None)) => self.read_done = true,
                    Poll::Ready(Err(e)) => self.error = Some(e),
                    Poll::Pending => break,
                }
            }
            self.note_queued();
            if self.frames.is_empty() {
                if let Some(e) = self.error.take() {
                    return Poll::Ready(Err(e));
                }
                if self.need_flush {
                    ready!(socket.as_mut().poll_flush(cx))?;
                    self.need_flush = false;
                }
                if !self.read_done {
                    return Poll::Pending;
                }
                ready!(socket.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(self.carried));
            }
            let mut slices = [IoSlice::new(&[]); GATHER_FRAMES];
            for (slice, frame) in slices.iter_mut().zip(&self.frames) {
                *slice = IoSlice::new(frame);
            }
            let count = self.frames.len().min(GATHER_FRAMES);
            let n = ready!(socket.as_mut().poll_write_vectored(cx, &slices[..count]))?;
            if n == 0 {
                return Poll::Ready(Err(write_zero()));
            }
            self.consume(n);
            self.carried += n as u64;
            self.need_flush = true;
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Drops the first `n` bytes of the frames (written).
    fn consume(&mut self, mut n: usize) {
        self.queued -= n;
        while n > 0 {
            let front = self.frames.front_mut().expect("written bytes were queued");
            if front.len() <= n {
                n -= front.len();
                self.frames.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
        self.note_queued();
    }
}

#[cfg(test)]
mod tests;
