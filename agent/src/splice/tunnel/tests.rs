//! Tests of [`super::splice_tunnel`] with a real HTTP/2 stream (h2 over an
//! in-memory pipe, no TLS): bulk both ways, half-closes, several frames in
//! one write, the read buffer's release, and a reset tunnel.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{duplex, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::super::tests::{bounded, exchange, pattern};
use super::{BufferProbe, Sizes, SpliceTunnel};
use crate::hbone::HboneStream;

/// The two ends of one HTTP/2 stream: (client's, server's).
async fn tunnel_pair() -> (HboneStream, HboneStream) {
    let (a, b) = duplex(1 << 20);
    let server = tokio::spawn(async move {
        let mut conn = h2::server::handshake(b).await.expect("server handshake");
        let (request, mut respond) = conn.accept().await.expect("a stream").expect("a request");
        let send = respond
            .send_response(http::Response::new(()), false)
            .expect("response");
        // Accepting drives the connection.
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
        HboneStream::new(send, request.into_body())
    });
    let (client, conn) = h2::client::handshake(a).await.expect("client handshake");
    tokio::spawn(conn);
    let mut client = client.ready().await.expect("ready");
    let request = http::Request::post("http://tunnel/")
        .body(())
        .expect("request");
    let (response, send) = client.send_request(request, false).expect("send request");
    let server_end = server.await.expect("server task");
    let recv = response.await.expect("response").into_body();
    (HboneStream::new(send, recv), server_end)
}

type Task = tokio::task::JoinHandle<io::Result<(u64, u64)>>;

/// `socket <-> inner`, splice_tunnel(inner, tunnel's near end); gives the
/// socket's outer end, the tunnel's far end, the probe and the splice.
async fn spliced(sizes: Sizes) -> (tokio::io::DuplexStream, HboneStream, Arc<BufferProbe>, Task) {
    let (outer, mut inner) = duplex(256 * 1024);
    let (mut near, far) = tunnel_pair().await;
    let probe = Arc::new(BufferProbe::default());
    let watched = probe.clone();
    let task = tokio::spawn(async move {
        SpliceTunnel::new(&mut inner, &mut near, sizes, Some(watched)).await
    });
    (outer, far, probe, task)
}

#[tokio::test]
async fn bulk_crosses_both_ways_intact() {
    let (outer, far, _, task) = spliced(Sizes::DEFAULT).await;
    let up = pattern(5 << 20, 1);
    let down = pattern(3 << 20, 2);
    let (at_far, at_outer) =
        bounded(async { tokio::join!(exchange(far, down.clone()), exchange(outer, up.clone())) })
            .await;
    assert!(
        at_far.expect("far end") == up,
        "socket -> tunnel bytes differ"
    );
    assert!(
        at_outer.expect("socket end") == down,
        "tunnel -> socket bytes differ"
    );
    let carried = bounded(task).await.expect("task").expect("splice");
    assert_eq!(carried, (up.len() as u64, down.len() as u64));
}

#[tokio::test]
async fn a_half_close_leaves_the_other_direction_open() {
    let (mut outer, mut far, _, task) = spliced(Sizes::DEFAULT).await;
    outer.write_all(b"request").await.unwrap();
    outer.shutdown().await.unwrap();
    let mut got = Vec::new();
    bounded(far.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"request");
    // The socket stopped sending; the tunnel still answers through it.
    let answer = pattern(300_000, 3);
    far.write_all(&answer).await.unwrap();
    far.shutdown().await.unwrap();
    let mut back = Vec::new();
    bounded(outer.read_to_end(&mut back)).await.unwrap();
    assert!(back == answer);
    let carried = bounded(task).await.unwrap().unwrap();
    assert_eq!(carried, (7, answer.len() as u64));
}

/// A socket that records the size of each write it takes (vectored ones as
/// one) and keeps the bytes.
#[derive(Clone, Default)]
struct Recorder {
    writes: Arc<Mutex<Vec<usize>>>,
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Recorder {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Never sends anything: this direction waits.
        Poll::Pending
    }
}

impl AsyncWrite for Recorder {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.writes.lock().unwrap().push(buf.len());
        self.bytes.lock().unwrap().extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = bufs.iter().map(|b| b.len()).sum();
        self.writes.lock().unwrap().push(n);
        for b in bufs {
            self.bytes.lock().unwrap().extend_from_slice(b);
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn frames_that_arrived_together_go_out_in_one_write() {
    let (mut near, mut far) = tunnel_pair().await;
    let messages: Vec<Vec<u8>> = (0..8).map(|i| pattern(1000, i)).collect();
    for m in &messages {
        far.write_all(m).await.unwrap();
    }
    // Until all eight frames are held by the near end, unread.
    bounded(async {
        while near.buffered() < 8000 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let recorder = Recorder::default();
    let mut socket = recorder.clone();
    let splice = tokio::spawn(async move {
        SpliceTunnel::new(&mut socket, &mut near, Sizes::DEFAULT, None).await
    });
    bounded(async {
        while recorder.bytes.lock().unwrap().len() < 8000 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(
        *recorder.writes.lock().unwrap(),
        vec![8000],
        "one write of all eight"
    );
    assert!(*recorder.bytes.lock().unwrap() == messages.concat());
    splice.abort();
}

#[tokio::test]
async fn an_idle_socket_side_frees_its_read_buffer() {
    let sizes = Sizes {
        idle: Duration::from_millis(50),
        ..Sizes::DEFAULT
    };
    let (mut outer, mut far, probe, task) = spliced(sizes).await;
    let data = pattern(2 << 20, 4);
    let reader = tokio::spawn(async move {
        let mut got = vec![0; 2 << 20];
        far.read_exact(&mut got).await.map(|_| (got, far))
    });
    outer.write_all(&data).await.unwrap();
    let (got, mut far) = bounded(reader).await.unwrap().unwrap();
    assert!(got == data);
    assert!(
        probe.peak(0) > 8 * 1024,
        "the buffer grew: {}",
        probe.peak(0)
    );
    bounded(async {
        while probe.idle_releases() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(probe.held(0), 0, "an idle direction holds no buffer");
    // And it starts again, small.
    outer.write_all(b"again").await.unwrap();
    let mut five = [0; 5];
    bounded(far.read_exact(&mut five)).await.unwrap();
    assert_eq!(&five, b"again");
    drop(outer);
    drop(far);
    let _ = bounded(task).await;
}

#[tokio::test]
async fn requests_and_responses_hold_no_read_buffer() {
    let (mut outer, mut far, probe, task) = spliced(Sizes::DEFAULT).await;
    for i in 0..50u8 {
        let request = pattern(100, i);
        outer.write_all(&request).await.unwrap();
        let mut got = [0; 100];
        bounded(far.read_exact(&mut got)).await.unwrap();
        assert!(got[..] == request[..]);
        far.write_all(&pattern(200, i)).await.unwrap();
        let mut back = [0; 200];
        bounded(outer.read_exact(&mut back)).await.unwrap();
    }
    assert_eq!(probe.peak(0), 0, "a small read took a heap buffer");
    drop(outer);
    drop(far);
    let _ = bounded(task).await;
}

#[tokio::test]
async fn a_reset_tunnel_ends_the_splice_with_an_error() {
    let (_outer, far, _, task) = spliced(Sizes::DEFAULT).await;
    // Dropped without END_STREAM: h2 resets the stream.
    drop(far);
    let result = bounded(task).await.expect("task");
    let e = result.expect_err("a reset tunnel is an error");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
}
