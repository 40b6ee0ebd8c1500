//! HBONE: weft's node-to-node transport, HTTP/2 CONNECT tunnels over mutual
//! TLS (as Istio's ztunnel does it).
//!
//! - [`tls`]: identities, the rotating trust bundle, rustls configs, SPIFFE ids.
//! - [`server`]: the inbound `:15008` server handing CONNECT streams to a handler.
//! - [`client`]: the outbound connection pool opening tunnels.
//! - [`stream`]: [`HboneStream`], a tunnel as `AsyncRead + AsyncWrite`.

pub mod client;
pub mod server;
pub mod stream;
pub mod tls;

#[cfg(test)]
mod tests;

pub use client::{HboneError, HbonePool, NodePeer};
pub use server::{
    classify, Classified, ConnectHandler, ConnectRequest, HboneServer, InboundLimits, Refusal,
    ServerError, TlsFailure,
};
pub use stream::HboneStream;
pub use tls::{peer_spiffe_id, Identity, SpiffeId, TlsError, TrustBundle};

/// Response header carrying why a tunnel was refused.
pub const REASON_HEADER: &str = "x-weft-reason";

/// HTTP/2 stream window: how much one tunnel may have in flight, and so
/// the most a receiving agent holds for a workload that does not read.
/// A sender runs ahead of the receiving agent by at most this: at 1 GB/s,
/// 4 MiB lasts 4 ms, longer than a receiving agent waits for a core on a
/// busy node. At 1 MiB the sending agent slept about a fifth of a
/// one-stream transfer, waiting for window (bench/README.md, "The HTTP/2
/// windows, and the sending agent's waits").
pub(crate) const INITIAL_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// HTTP/2 connection window, shared by all tunnels of a connection: four
/// streams' windows.
pub(crate) const INITIAL_CONNECTION_WINDOW: u32 = 4 * INITIAL_STREAM_WINDOW;
/// Concurrent tunnels one inbound connection may carry.
pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 1000;
/// The largest HTTP/2 frame either end takes (the protocol's default is
/// 16 KiB): a tunnel's 64 KiB writes go as one DATA frame each.
pub(crate) const MAX_FRAME_SIZE: u32 = 64 * 1024;
/// How much a tunnel connection's TLS seals before it writes to the socket
/// (rustls' own limit is 64 KiB). A 64 KiB DATA frame then goes out as two
/// writes of two 16 KiB records each: the receiving agent starts opening
/// the first half while the sender seals the second, on another core. One
/// stream carried 1.19x and eight 1.06x as much as with 64 KiB writes; 16
/// KiB writes (one record each) carried less than 32 KiB ones, and one
/// write a frame (128 KiB) was slower than all (bench/README.md, "The
/// HTTP/2 windows, and the sending agent's waits").
pub(crate) const TLS_WRITE: usize = 32 * 1024;
/// What one read from a tunnel connection's socket may take. rustls reads
/// its records 4 KiB at a time; below it, one read takes what the socket
/// holds (several records), so a 16 KiB record costs one syscall, not four.
const READ_AHEAD: usize = 64 * 1024;

/// A tunnel connection's socket, as TLS reads and writes it.
pub(crate) type Wire = tokio::io::BufReader<tokio::net::TcpStream>;

/// `tcp` with [`READ_AHEAD`] under TLS.
pub(crate) fn wire(tcp: tokio::net::TcpStream) -> Wire {
    tokio::io::BufReader::with_capacity(READ_AHEAD, tcp)
}
