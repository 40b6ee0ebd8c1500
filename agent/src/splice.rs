//! Splicing two byte streams: both directions copied until each side has
//! half-closed, with buffers large enough that bulk transfers move in few
//! reads, writes and HTTP/2 frames (tokio's default is 8 KiB a direction).

use std::io;

use tokio::io::{AsyncRead, AsyncWrite};

/// Bytes buffered per direction of a spliced connection.
pub const SPLICE_BUFFER: usize = 128 * 1024;

/// Copies `a` to `b` and `b` to `a` until both directions are done; returns
/// the bytes carried `a -> b` and `b -> a`.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, SPLICE_BUFFER, SPLICE_BUFFER).await
}
