//! Test support: HTTP/1 requests to the agent's own servers (admin port,
//! local API) over fresh connections.
use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, Request};
use http_body_util::Empty;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// A client connection to `addr`, driven in the background.
pub async fn connect(addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// `GET path` as a client of `addr` sends it.
pub fn get(addr: SocketAddr, path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header(header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap()
}
