//! A minimal TCP client for tests.
//!
//! * `weft-probe connect ADDR [TEXT]` connects, sends TEXT (default "ping"),
//!   closes its sending side, prints what it receives until the peer closes,
//!   and exits 1 with the error on failure.
//! * `weft-probe connect-many ADDR N` makes N short connections one after
//!   another (each waits for the peer to close first, so no TIME_WAIT piles
//!   up on this side) and prints how many succeeded.
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let (Some("connect-many"), Some(addr), Some(n)) =
        (args.first().map(String::as_str), args.get(1), args.get(2))
    {
        let n: u64 = n.parse().unwrap_or(0);
        let ok = (0..n).filter(|_| short_connection(addr).is_ok()).count();
        println!("{ok}");
        std::process::exit(if ok as u64 == n { 0 } else { 1 });
    }
    let (Some("connect"), Some(addr)) = (args.first().map(String::as_str), args.get(1)) else {
        eprintln!("usage: weft-probe connect ADDR [TEXT] | connect-many ADDR N");
        std::process::exit(2);
    };
    let text = args.get(2).map(String::as_str).unwrap_or("ping");
    match exchange(addr, text) {
        Ok(reply) => print!("{reply}"),
        Err(e) => {
            eprintln!("weft-probe: {addr}: {e}");
            std::process::exit(1);
        }
    }
}

fn exchange(addr: &str, text: &str) -> std::io::Result<String> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(text.as_bytes())?;
    stream.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply)
}

/// Connects and waits for the peer to close.
fn short_connection(addr: &str) -> std::io::Result<()> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut sink = Vec::new();
    stream.read_to_end(&mut sink)?;
    Ok(())
}
