//! `weft-probe connect ADDR [TEXT]`: a minimal TCP client for tests. It
//! connects, sends TEXT (default "ping"), closes its sending side, prints what
//! it receives until the peer closes, and exits 1 with the error on failure.
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some("connect"), Some(addr)) = (args.first().map(String::as_str), args.get(1)) else {
        eprintln!("usage: weft-probe connect ADDR [TEXT]");
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
