//! Clients of echo workloads (`weft-holder`, [`crate::mesh::Mesh::holder`])
//! for tests that hold many or long-lived connections: sockets are made
//! inside a node's namespace and then driven by the test's own tokio
//! runtime.
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::netns::Netns;

/// No single exchange (connect, or one byte there and back) takes longer.
pub const EXCHANGE_LIMIT: Duration = Duration::from_secs(10);

/// `n` IPv4 TCP sockets made inside `netns`, not yet connected.
pub fn sockets_in(netns: &Netns, n: usize) -> anyhow::Result<Vec<TcpSocket>> {
    netns
        .run(move || {
            (0..n)
                .map(|_| TcpSocket::new_v4())
                .collect::<std::io::Result<Vec<_>>>()
        })?
        .with_context(|| format!("making sockets in {}", netns.name()))
}

/// Sends `byte` on `stream` and waits for it to come back.
pub async fn echo_byte(stream: &mut TcpStream, byte: u8) -> anyhow::Result<()> {
    tokio::time::timeout(EXCHANGE_LIMIT, async {
        stream.write_all(&[byte]).await?;
        let mut back = [0u8; 1];
        stream.read_exact(&mut back).await?;
        ensure!(back[0] == byte, "sent {byte}, got {} back", back[0]);
        Ok(())
    })
    .await
    .context("no echo in time")?
}

/// Connects `socket` to `addr` and exchanges `byte` there and back.
pub async fn open_echo(socket: TcpSocket, addr: SocketAddr, byte: u8) -> anyhow::Result<TcpStream> {
    let mut stream = tokio::time::timeout(EXCHANGE_LIMIT, socket.connect(addr))
        .await
        .context("connect timed out")??;
    echo_byte(&mut stream, byte).await?;
    Ok(stream)
}
