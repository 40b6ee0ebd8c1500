//! `weft-holder LISTEN_ADDR`: an echo server that holds many connections at
//! once (tokio, one thread), standing in for a workload in capacity tests.
//! Every byte received is sent back; a connection is closed once its client
//! has half-closed and everything was echoed. It raises its open-files
//! limit to the hard limit, and prints `listening on ADDR` to stdout once it
//! accepts connections.
use std::io::Write;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn main() {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: weft-holder LISTEN_ADDR");
        std::process::exit(2);
    };
    if let Err(e) = weft_agent::limits::raise_nofile() {
        eprintln!("weft-holder: raising the open files limit: {e}");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let listener = match TcpListener::bind(&addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("weft-holder: binding {addr}: {e}");
                std::process::exit(1);
            }
        };
        println!(
            "listening on {}",
            listener.local_addr().expect("local addr")
        );
        let _ = std::io::stdout().flush();
        let mut failed_accepts = 0u64;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(echo(stream));
                }
                Err(e) => {
                    // Out of descriptors, most likely: say so, wait, go on.
                    failed_accepts += 1;
                    if failed_accepts.is_power_of_two() {
                        eprintln!("weft-holder: accept failed ({failed_accepts} so far): {e}");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    });
}

/// Echoes until the client half-closes, then closes.
async fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = stream.shutdown().await;
}
