//! Splicing two byte streams: both directions copied until each side has
//! half-closed, as `tokio::io::copy_bidirectional` does, with buffers that
//! exist only while data flows.
//!
//! A direction starts with no heap buffer at all: a read goes into an
//! 8 KiB scratch area on the stack, and what the writer takes at once
//! never touches the heap (request/response traffic usually allocates
//! nothing). Only bytes the writer could not take yet are kept on the heap.
//! Each read that fills its whole buffer doubles the next one, up to
//! 256 KiB, so a bulk transfer soon moves in large reads, writes and HTTP/2
//! frames; a run of reads that fill less than half of it halves it again.
//! When a direction has read nothing for [`Sizes::idle`] its buffer is
//! freed and it starts small again: an idle tunnel holds no buffer, only
//! the few words of state below.
//!
//! Half-closes are carried as by `copy_bidirectional`: when one side's reads
//! end, everything read is written and flushed and the other side's write
//! half is shut down; the other direction keeps going until its own end.
//! The first error of either direction ends the splice with that error.
//! A splice may bound how long a half-closed connection stays silent
//! ([`Splice::half_closed_limit`]): the gateway's, whose clients need no
//! credentials, so that a client that never closes cannot hold a
//! connection whose other side is gone.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The most an in-memory pipe between a tunnel and the L7 proxy buffers per
/// direction (`tokio::io::duplex`; it grows to it only while data waits).
pub const SPLICE_BUFFER: usize = 128 * 1024;

/// The stack scratch area a direction without a heap buffer reads into.
const SCRATCH: usize = 8 * 1024;

/// Reads that fill less than half of the buffer, one after another, before
/// it is halved.
const SMALL_READS_TO_SHRINK: u32 = 8;

/// At most this many reads per direction in one poll; then the task yields
/// so that one busy connection cannot hold the thread.
const ROUNDS_PER_POLL: usize = 32;

/// A direction's buffer sizes and how soon an idle one is freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// The first read's size (on the stack; at most 8 KiB).
    pub initial: usize,
    /// The largest buffer a direction grows to.
    pub max: usize,
    /// A direction that read nothing for this long (at most twice this)
    /// frees its buffer.
    pub idle: Duration,
}

impl Sizes {
    /// 8 KiB growing to 256 KiB, freed after 1 s without data.
    pub const DEFAULT: Sizes = Sizes {
        initial: SCRATCH,
        max: 256 * 1024,
        idle: Duration::from_secs(1),
    };

    /// These sizes as a splice uses them: the first read between 1 byte
    /// and the 8 KiB stack scratch area, the largest not below it.
    fn bounded(self) -> Sizes {
        let initial = self.initial.clamp(1, SCRATCH);
        Sizes {
            initial,
            max: self.max.max(initial),
            idle: self.idle,
        }
    }
}

impl Default for Sizes {
    fn default() -> Self {
        Sizes::DEFAULT
    }
}

/// Copies `a` to `b` and `b` to `a` until both directions are done; returns
/// the bytes carried `a -> b` and `b -> a`.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    Splice::new(a, b, Sizes::DEFAULT, None).await
}

/// What the buffers of a splice hold, for tests and measurements: per
/// direction (`0`: `a -> b`, `1`: `b -> a`) the heap bytes held now and at
/// most, and how many times an idle buffer was freed.
#[derive(Debug, Default)]
pub struct BufferProbe {
    held: [AtomicUsize; 2],
    peak: [AtomicUsize; 2],
    idle_releases: AtomicUsize,
}

impl BufferProbe {
    /// Heap bytes direction `dir` holds now.
    pub fn held(&self, dir: usize) -> usize {
        self.held[dir].load(Ordering::Relaxed)
    }
    /// The largest heap buffer direction `dir` has held.
    pub fn peak(&self, dir: usize) -> usize {
        self.peak[dir].load(Ordering::Relaxed)
    }
    /// How many times a buffer was freed because its direction was idle.
    pub fn idle_releases(&self) -> usize {
        self.idle_releases.load(Ordering::Relaxed)
    }

    /// Direction `dir` holds `bytes` now.
    fn hold(&self, dir: usize, bytes: usize) {
        self.held[dir].store(bytes, Ordering::Relaxed);
        self.peak[dir].fetch_max(bytes, Ordering::Relaxed);
    }

    /// A direction freed its buffer for being idle.
    fn idle_release(&self) {
        self.idle_releases.fetch_add(1, Ordering::Relaxed);
    }
}

/// The future of [`splice`], with its sizes and an optional probe.
pub struct Splice<'a, A: ?Sized, B: ?Sized> {
    a: &'a mut A,
    b: &'a mut B,
    sizes: Sizes,
    a_to_b: Direction,
    b_to_a: Direction,
    half_closed: Option<HalfClosed>,
}

/// How long the direction left may go without carrying a byte once the
/// other has ended; the timer, and the bytes carried when it was armed.
struct HalfClosed {
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    carried: u64,
}

impl<'a, A, B> Splice<'a, A, B>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    /// A splice of `a` and `b`; `sizes.initial` is capped at 8 KiB.
    pub fn new(a: &'a mut A, b: &'a mut B, sizes: Sizes, probe: Option<Arc<BufferProbe>>) -> Self {
        let sizes = sizes.bounded();
        Splice {
            a,
            b,
            sizes,
            a_to_b: Direction::new(sizes.initial, probe.clone().map(|p| (p, 0))),
            b_to_a: Direction::new(sizes.initial, probe.map(|p| (p, 1))),
            half_closed: None,
        }
    }

    /// Once one direction has ended, the other may go on while it carries
    /// data; `limit` without a byte ends the splice with a `TimedOut`
    /// error.
    pub fn half_closed_limit(mut self, limit: Duration) -> Self {
        self.half_closed = Some(HalfClosed {
            limit,
            timer: None,
            carried: 0,
        });
        self
    }
}

impl<A, B> Future for Splice<'_, A, B>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    type Output = io::Result<(u64, u64)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let sizes = this.sizes;
        let a_to_b =
            this.a_to_b
                .poll_copy(cx, &sizes, Pin::new(&mut *this.a), Pin::new(&mut *this.b))?;
        let b_to_a =
            this.b_to_a
                .poll_copy(cx, &sizes, Pin::new(&mut *this.b), Pin::new(&mut *this.a))?;
        if let Some(half) = &mut this.half_closed {
            if a_to_b.is_ready() != b_to_a.is_ready() {
                let limit = half.limit;
                let carried = this.a_to_b.carried + this.b_to_a.carried;
                if carried != half.carried {
                    // Data still moves: the silence starts again.
                    half.carried = carried;
                    half.timer = None;
                }
                let timer = (half.timer).get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("one side closed and the other carried nothing for {limit:?}"),
                    )));
                }
            }
        }
        let a_to_b = ready!(a_to_b);
        let b_to_a = ready!(b_to_a);
        Poll::Ready(Ok((a_to_b, b_to_a)))
    }
}

/// How large a direction's next read is: doubled after a read that filled
/// it (up to [`Sizes::max`]), halved after a run of reads that filled less
/// than half of it.
#[derive(Debug)]
struct Growth {
    size: usize,
    /// Reads in a row that filled less than half of `size`.
    small_reads: u32,
}

impl Growth {
    fn new(initial: usize) -> Self {
        Growth {
            size: initial,
            small_reads: 0,
        }
    }

    /// Grows the next read after a full one; shrinks it after a run of
    /// small ones.
    fn note(&mut self, n: usize, sizes: &Sizes) {
        let size = self.size;
        if n == size {
            self.small_reads = 0;
            self.size = (size * 2).min(sizes.max);
        } else if n < size / 2 {
            self.small_reads += 1;
            if self.small_reads >= SMALL_READS_TO_SHRINK {
                self.small_reads = 0;
                self.size = (size / 2).max(sizes.initial);
            }
        } else {
            self.small_reads = 0;
        }
    }

    fn reset(&mut self, sizes: &Sizes) {
        self.size = sizes.initial;
        self.small_reads = 0;
    }
}

/// Tells when a direction has read nothing for [`Sizes::idle`] (at most
/// twice that), so that it frees its buffer.
#[derive(Default)]
struct Idle {
    timer: Option<Pin<Box<Sleep>>>,
    /// Some read completed since the timer was (re)armed.
    read_since_armed: bool,
}

impl Idle {
    fn read(&mut self) {
        self.read_since_armed = true;
    }

    fn disarm(&mut self) {
        self.timer = None;
    }

    /// Called when the direction has nothing to read and nothing buffered:
    /// arms the timer, and is true once a whole idle period passed without
    /// a read (the timer is then disarmed).
    fn poll_expired(&mut self, cx: &mut Context<'_>, sizes: &Sizes) -> bool {
        let timer = match &mut self.timer {
            Some(timer) => timer,
            None => {
                self.read_since_armed = false;
                self.timer.insert(Box::pin(tokio::time::sleep(sizes.idle)))
            }
        };
        // At most: the timer fired, is re-armed, and is pending again.
        for _ in 0..2 {
            if timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            if self.read_since_armed {
                self.read_since_armed = false;
                timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + sizes.idle);
                continue;
            }
            self.timer = None;
            return true;
        }
        false
    }
}

/// One direction: a reader's bytes to a writer.
struct Direction {
    /// The heap buffer (empty: none); `buf[pos..end]` waits to be written.
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    growth: Growth,
    idle: Idle,
    read_done: bool,
    need_flush: bool,
    done: bool,
    carried: u64,
    probe: Option<(Arc<BufferProbe>, usize)>,
}

impl Direction {
    fn new(initial: usize, probe: Option<(Arc<BufferProbe>, usize)>) -> Self {
        Direction {
            buf: Box::default(),
            pos: 0,
            end: 0,
            growth: Growth::new(initial),
            idle: Idle::default(),
            read_done: false,
            need_flush: false,
            done: false,
            carried: 0,
            probe,
        }
    }

    /// Replaces the heap buffer (an empty one frees it).
    fn set_buffer(&mut self, buf: Box<[u8]>) {
        self.buf = buf;
        if let Some((probe, dir)) = &self.probe {
            probe.hold(*dir, self.buf.len());
        }
    }

    /// Copies until the reader ends and the writer is shut down: the bytes
    /// carried.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        sizes: &Sizes,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(self.carried));
        }
        for _ in 0..ROUNDS_PER_POLL {
            while self.pos < self.end {
                let n = ready!(writer
                    .as_mut()
                    .poll_write(cx, &self.buf[self.pos..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(write_zero()));
                }
                self.pos += n;
                self.carried += n as u64;
                self.need_flush = true;
            }
            self.pos = 0;
            self.end = 0;
            if self.read_done {
                if self.need_flush {
                    ready!(writer.as_mut().poll_flush(cx))?;
                    self.need_flush = false;
                }
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.set_buffer(Box::default());
                self.idle.disarm();
                self.done = true;
                return Poll::Ready(Ok(self.carried));
            }
            match self.poll_read_some(cx, sizes, reader.as_mut(), writer.as_mut()) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing to read and nothing buffered: flush what was
                    // written, and free the buffer if this lasts.
                    if self.need_flush {
                        ready!(writer.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    self.poll_idle(cx, sizes);
                    return Poll::Pending;
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// One read, into the stack scratch area or the heap buffer (the buffer
    /// is empty when this is called). Pending when the reader has nothing.
    fn poll_read_some<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        sizes: &Sizes,
        reader: Pin<&mut R>,
        writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        let size = self.growth.size;
        if size <= sizes.initial {
            if !self.buf.is_empty() {
                self.set_buffer(Box::default());
            }
            return self.poll_read_scratch(cx, sizes, reader, writer);
        }
        if self.buf.len() != size {
            self.set_buffer(vec![0; size].into_boxed_slice());
        }
        let mut read = ReadBuf::new(&mut self.buf[..size]);
        ready!(reader.poll_read(cx, &mut read))?;
        let n = read.filled().len();
        if n == 0 {
            self.read_done = true;
        } else {
            self.end = n;
            self.note_read(n, sizes);
        }
        Poll::Ready(Ok(()))
    }

    /// A read into the stack: written on at once, and only what the writer
    /// does not take is copied to the heap.
    fn poll_read_scratch<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        sizes: &Sizes,
        reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        let mut scratch = [MaybeUninit::<u8>::uninit(); SCRATCH];
        let mut read = ReadBuf::uninit(&mut scratch[..self.growth.size]);
        ready!(reader.poll_read(cx, &mut read))?;
        let data = read.filled();
        if data.is_empty() {
            self.read_done = true;
            return Poll::Ready(Ok(()));
        }
        self.note_read(data.len(), sizes);
        let mut written = 0;
        while written < data.len() {
            match writer.as_mut().poll_write(cx, &data[written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(write_zero())),
                Poll::Ready(Ok(n)) => {
                    written += n;
                    self.carried += n as u64;
                    self.need_flush = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        let rest = data.len() - written;
        if rest > 0 {
            // The writer is full: keep the rest (its waker is registered),
            // in a buffer the next read can use if it is to be larger.
            let len = if self.growth.size > sizes.initial {
                self.growth.size
            } else {
                rest
            };
            let mut buf = vec![0; len].into_boxed_slice();
            buf[..rest].copy_from_slice(&data[written..]);
            self.set_buffer(buf);
            self.pos = 0;
            self.end = rest;
        }
        Poll::Ready(Ok(()))
    }

    fn note_read(&mut self, n: usize, sizes: &Sizes) {
        self.idle.read();
        self.growth.note(n, sizes);
    }

    /// The reader has nothing and nothing is buffered: a direction holding
    /// more than the initial size arms its idle timer, and frees its buffer
    /// when a whole idle period passed without a read.
    fn poll_idle(&mut self, cx: &mut Context<'_>, sizes: &Sizes) {
        if self.buf.is_empty() && self.growth.size <= sizes.initial {
            self.idle.disarm();
            return;
        }
        if self.idle.poll_expired(cx, sizes) {
            self.growth.reset(sizes);
            self.set_buffer(Box::default());
            if let Some((probe, _)) = &self.probe {
                probe.idle_release();
            }
        }
    }
}

fn write_zero() -> io::Error {
    io::Error::new(io::ErrorKind::WriteZero, "write zero bytes into writer")
}

pub mod tunnel;

#[cfg(test)]
mod tests;
