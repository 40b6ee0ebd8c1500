//! Tests of [`super::splice`] over in-memory pipes: bulk both ways,
//! half-closes, errors, and the buffers' growth, shrinking and release.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{
    duplex, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf,
};

use super::{splice, BufferProbe, Sizes, Splice};

/// No test waits longer than this for anything.
pub(super) const LIMIT: Duration = Duration::from_secs(20);

/// A deterministic byte pattern, different per `seed`.
pub(super) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// A running splice's result.
type Task = tokio::task::JoinHandle<io::Result<(u64, u64)>>;

/// `client <-> a`, splice(a, b), `b <-> server`; the splice runs on its own
/// task and reports its result, with `probe` watching its buffers.
fn spliced(pipe: usize, sizes: Sizes) -> (DuplexStream, DuplexStream, Arc<BufferProbe>, Task) {
    let (client, mut a) = duplex(pipe);
    let (mut b, server) = duplex(pipe);
    let probe = Arc::new(BufferProbe::default());
    let watched = probe.clone();
    let task = tokio::spawn(async move { Splice::new(&mut a, &mut b, sizes, Some(watched)).await });
    (client, server, probe, task)
}

pub(super) async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("not within the limit")
}

/// Writes `data` and half-closes, while reading the other way to the end.
pub(super) async fn exchange<S>(mut end: S, data: Vec<u8>) -> io::Result<Vec<u8>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(&mut end);
    let write = async {
        wr.write_all(&data).await?;
        wr.shutdown().await
    };
    let read = async {
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await?;
        Ok::<_, io::Error>(got)
    };
    let (w, r) = tokio::join!(write, read);
    w?;
    r
}

#[tokio::test]
async fn bulk_both_ways_arrives_whole_and_counted() {
    let (client, server, probe, task) = spliced(64 * 1024, Sizes::DEFAULT);
    let up = pattern(5 * 1024 * 1024 + 17, 1);
    let down = pattern(3 * 1024 * 1024 + 5, 2);
    let (at_server, at_client) = bounded(async {
        tokio::join!(exchange(server, down.clone()), exchange(client, up.clone()))
    })
    .await;
    assert!(at_server.unwrap() == up, "a -> b corrupted");
    assert!(at_client.unwrap() == down, "b -> a corrupted");
    let (ab, ba) = bounded(task).await.unwrap().unwrap();
    assert_eq!((ab, ba), (up.len() as u64, down.len() as u64));
    // Done: nothing held.
    assert_eq!((probe.held(0), probe.held(1)), (0, 0));
}

#[tokio::test]
async fn a_half_close_is_carried_and_the_other_way_stays_open() {
    let (mut client, mut server, _probe, task) = spliced(1024, Sizes::DEFAULT);
    bounded(async {
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        // After the EOF the server still answers, and the client reads it.
        server.write_all(b"pong").await.unwrap();
        let mut four = [0; 4];
        client.read_exact(&mut four).await.unwrap();
        assert_eq!(&four, b"pong");
        // The splice is not done until the second direction ends too.
        tokio::task::yield_now().await;
        assert!(
            !task.is_finished(),
            "the splice ended at the first half-close"
        );
        server.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    })
    .await;
    assert_eq!(bounded(task).await.unwrap().unwrap(), (4, 4));
}

#[tokio::test]
async fn the_same_results_as_copy_bidirectional() {
    // One direction empty and closed at once, the other carrying data.
    for (up_len, down_len) in [(0, 0), (0, 100_000), (100_000, 0), (1, 1)] {
        let (client, server, _probe, task) = spliced(4096, Sizes::DEFAULT);
        let up = pattern(up_len, 3);
        let down = pattern(down_len, 4);
        let (s, c) = bounded(async {
            tokio::join!(exchange(server, down.clone()), exchange(client, up.clone()))
        })
        .await;
        assert_eq!(s.unwrap(), up);
        assert_eq!(c.unwrap(), down);
        let ours = bounded(task).await.unwrap().unwrap();

        let (client, mut a) = duplex(4096);
        let (mut b, server) = duplex(4096);
        let theirs =
            tokio::spawn(async move { tokio::io::copy_bidirectional(&mut a, &mut b).await });
        let (s, c) = bounded(async {
            tokio::join!(exchange(server, down.clone()), exchange(client, up.clone()))
        })
        .await;
        assert_eq!((s.unwrap(), c.unwrap()), (up.clone(), down.clone()));
        assert_eq!(ours, bounded(theirs).await.unwrap().unwrap());
    }
}

#[tokio::test]
async fn small_messages_never_touch_the_heap() {
    let (mut client, mut server, probe, task) = spliced(64 * 1024, Sizes::DEFAULT);
    bounded(async {
        for i in 0..200u32 {
            let request = format!("request {i}");
            client.write_all(request.as_bytes()).await.unwrap();
            let mut got = vec![0; request.len()];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, request.as_bytes());
            server.write_all(b"ok").await.unwrap();
            let mut ok = [0; 2];
            client.read_exact(&mut ok).await.unwrap();
        }
    })
    .await;
    assert_eq!(
        (probe.peak(0), probe.peak(1)),
        (0, 0),
        "request/response traffic allocated a buffer"
    );
    drop((client, server));
    let _ = bounded(task).await;
}

#[tokio::test]
async fn a_bulk_transfer_grows_the_buffer_to_the_maximum_only() {
    // A pipe larger than the maximum, so reads can fill every size.
    let (mut client, mut server, probe, task) = spliced(1024 * 1024, Sizes::DEFAULT);
    let data = pattern(4 * 1024 * 1024, 5);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        client.write_all(&sent).await.unwrap();
        client.shutdown().await.unwrap();
        client
    });
    let mut got = Vec::new();
    bounded(server.read_to_end(&mut got)).await.unwrap();
    assert!(got == data);
    assert_eq!(
        probe.peak(0),
        Sizes::DEFAULT.max,
        "a -> b did not grow to the maximum"
    );
    assert_eq!(probe.peak(1), 0, "the silent direction allocated");
    let client = bounded(writer).await.unwrap();
    drop((client, server));
    bounded(task).await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_idle_direction_frees_its_buffer_and_works_again() {
    let sizes = Sizes::DEFAULT;
    let (mut client, mut server, probe, task) = spliced(1024 * 1024, sizes);
    let burst = pattern(1024 * 1024, 6);
    client.write_all(&burst).await.unwrap();
    let mut got = vec![0; burst.len()];
    bounded(server.read_exact(&mut got)).await.unwrap();
    assert!(got == burst);
    assert!(
        probe.held(0) > sizes.initial,
        "the burst did not grow the buffer"
    );

    // Idle now (connection open): the buffer goes within two idle periods.
    // Time is paused: sleeping only advances the runtime's clock.
    let mut freed = false;
    for _ in 0..40 {
        if probe.held(0) == 0 {
            freed = true;
            break;
        }
        tokio::time::sleep(sizes.idle / 10).await;
    }
    assert!(freed, "still {} bytes held while idle", probe.held(0));
    assert_eq!(probe.idle_releases(), 1);

    // And the connection carries data again, from a small buffer up.
    let again = pattern(300_000, 7);
    client.write_all(&again).await.unwrap();
    let mut got = vec![0; again.len()];
    bounded(server.read_exact(&mut got)).await.unwrap();
    assert!(got == again);
    drop((client, server));
    let _ = bounded(task).await;
}

#[tokio::test(start_paused = true)]
async fn a_busy_direction_keeps_its_buffer() {
    let sizes = Sizes::DEFAULT;
    let (mut client, mut server, probe, task) = spliced(1024 * 1024, sizes);
    // Full reads more often than the idle period, for five periods.
    let chunk = pattern(512 * 1024, 8);
    for _ in 0..25 {
        client.write_all(&chunk).await.unwrap();
        let mut got = vec![0; chunk.len()];
        bounded(server.read_exact(&mut got)).await.unwrap();
        tokio::time::sleep(sizes.idle / 5).await;
    }
    assert_eq!(
        probe.idle_releases(),
        0,
        "a busy direction's buffer was freed"
    );
    drop((client, server));
    let _ = bounded(task).await;
}

#[tokio::test]
async fn small_reads_after_a_burst_shrink_the_buffer() {
    let sizes = Sizes::DEFAULT;
    let (mut client, mut server, probe, task) = spliced(1024 * 1024, sizes);
    let burst = pattern(1024 * 1024, 9);
    client.write_all(&burst).await.unwrap();
    let mut got = vec![0; burst.len()];
    bounded(server.read_exact(&mut got)).await.unwrap();
    assert_eq!(probe.held(0), sizes.max);
    // A trickle: one small read at a time, well within the idle period.
    for i in 0..200u32 {
        client.write_all(&i.to_le_bytes()).await.unwrap();
        let mut four = [0; 4];
        bounded(server.read_exact(&mut four)).await.unwrap();
        assert_eq!(u32::from_le_bytes(four), i);
    }
    assert_eq!(probe.held(0), 0, "the trickle kept {} bytes", probe.held(0));
    assert_eq!(probe.idle_releases(), 0);
    drop((client, server));
    let _ = bounded(task).await;
}

/// A reader that gives `data` and then fails with `kind`.
struct Failing {
    data: Vec<u8>,
    kind: io::ErrorKind,
}

impl AsyncRead for Failing {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.data.is_empty() {
            return Poll::Ready(Err(self.kind.into()));
        }
        let n = self.data.len().min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data.drain(..n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Failing {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A writer that accepts nothing.
struct Stuck;

impl AsyncRead for Stuck {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

impl AsyncWrite for Stuck {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(0))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn a_read_error_ends_the_splice_with_it_after_the_data_read() {
    let mut failing = Failing {
        data: pattern(100_000, 10),
        kind: io::ErrorKind::ConnectionReset,
    };
    let (mut b, mut server) = duplex(1024 * 1024);
    let e = bounded(splice(&mut failing, &mut b)).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    drop(b);
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.unwrap();
    assert!(
        got == pattern(100_000, 10),
        "data read before the error was lost"
    );
}

#[tokio::test]
async fn a_write_error_ends_the_splice_with_it() {
    let (mut client, mut a) = duplex(64 * 1024);
    let (mut b, server) = duplex(64 * 1024);
    drop(server); // writes to b now fail
    let task = tokio::spawn(async move { splice(&mut a, &mut b).await });
    client.write_all(b"into a closed pipe").await.unwrap();
    let e = bounded(task).await.unwrap().unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
}

#[tokio::test]
async fn a_writer_taking_nothing_is_an_error() {
    let mut source = Failing {
        data: b"something".to_vec(),
        kind: io::ErrorKind::UnexpectedEof,
    };
    let e = bounded(splice(&mut source, &mut Stuck)).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WriteZero);
}

#[tokio::test]
async fn many_idle_splices_hold_no_buffers() {
    let mut ends = Vec::new();
    let mut probes = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..500u32 {
        let (mut client, mut server, probe, task) = spliced(4096, Sizes::DEFAULT);
        client.write_all(&i.to_le_bytes()).await.unwrap();
        let mut four = [0; 4];
        bounded(server.read_exact(&mut four)).await.unwrap();
        server.write_all(&four).await.unwrap();
        bounded(client.read_exact(&mut four)).await.unwrap();
        assert_eq!(u32::from_le_bytes(four), i);
        ends.push((client, server));
        probes.push(probe);
        tasks.push(task);
    }
    let held: usize = probes.iter().map(|p| p.held(0) + p.held(1)).sum();
    assert_eq!(held, 0);
    drop(ends);
    for task in tasks {
        bounded(task).await.unwrap().unwrap();
    }
}

/// With a half-closed limit, a connection whose one side closed and whose
/// other side stays open and silent ends once the limit passes (a gateway's
/// client holding a connection its upstream left); one whose other side
/// still sends goes on; a half-close that is answered in time ends as
/// always; without a limit it is kept.
#[tokio::test(start_paused = true)]
async fn a_half_closed_limit_ends_a_connection_the_other_side_keeps_open() {
    let run = |limit: Option<Duration>| {
        let (client, mut a) = duplex(1024);
        let (mut b, server) = duplex(1024);
        let task = tokio::spawn(async move {
            let splice = Splice::new(&mut a, &mut b, Sizes::DEFAULT, None);
            match limit {
                Some(limit) => splice.half_closed_limit(limit).await,
                None => splice.await,
            }
        });
        (client, server, task)
    };
    let limit = LIMIT / 4;
    // The upstream closes; the client stays silent.
    let (client, server, task) = run(Some(limit));
    drop(server);
    let started = tokio::time::Instant::now();
    let ended = bounded(task).await.unwrap().unwrap_err();
    assert_eq!(ended.kind(), io::ErrorKind::TimedOut, "{ended}");
    assert!(started.elapsed() >= limit, "{:?}", started.elapsed());
    drop(client);

    // The upstream closes; the client goes on sending for three limits,
    // then stops: the splice ends a limit after its last byte.
    let (mut client, mut server, task) = run(Some(limit));
    server.shutdown().await.unwrap();
    let started = tokio::time::Instant::now();
    while started.elapsed() < limit * 3 {
        client.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        server.read_exact(&mut byte).await.unwrap();
        tokio::time::sleep(limit / 2).await;
    }
    assert!(!task.is_finished(), "cut while data moved");
    let ended = bounded(task).await.unwrap().unwrap_err();
    assert_eq!(ended.kind(), io::ErrorKind::TimedOut, "{ended}");
    drop((client, server));

    // Both close within the limit: the splice ends as it always does.
    let (mut client, mut server, task) = run(Some(limit));
    client.write_all(b"bye").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"bye");
    tokio::time::sleep(limit / 2).await;
    server.shutdown().await.unwrap();
    assert_eq!(bounded(task).await.unwrap().unwrap(), (3, 0));

    // No limit: the half-closed connection is kept.
    let (_client, server, task) = run(None);
    drop(server);
    tokio::time::sleep(limit * 4).await;
    assert!(!task.is_finished());
    task.abort();
}
