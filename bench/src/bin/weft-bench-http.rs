//! `weft-bench-http LISTEN_ADDR BODY_BYTES`: the benchmark's HTTP/1.1
//! workload (std only, a thread per connection, keep-alive): every `GET`
//! answers 200 with a body of BODY_BYTES bytes (`/healthz` too, so it serves
//! as the agent's health check). `Connection: close` is honoured.
//!
//! It prints `listening on ADDR` once it accepts connections.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(addr), Some(size)) = (args.first(), args.get(1).and_then(|s| s.parse().ok())) else {
        eprintln!("usage: weft-bench-http LISTEN_ADDR BODY_BYTES");
        std::process::exit(2);
    };
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("weft-bench-http: binding {addr}: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "listening on {}",
        listener.local_addr().expect("local addr")
    );
    let _ = std::io::stdout().flush();
    let body: Arc<Vec<u8>> = Arc::new(vec![b'x'; size]);
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let body = body.clone();
        std::thread::spawn(move || {
            let _ = serve(stream, &body);
        });
    }
}

fn serve(stream: TcpStream, body: &[u8]) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut response = Vec::with_capacity(body.len() + 128);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut close = request_line.trim_end().ends_with("HTTP/1.0");
        let mut content_length = 0u64;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                let (k, v) = (k.trim(), v.trim());
                if k.eq_ignore_ascii_case("content-length") {
                    content_length = v.parse().unwrap_or(0);
                } else if k.eq_ignore_ascii_case("connection") {
                    close = v.eq_ignore_ascii_case("close");
                }
            }
        }
        if content_length > 0 {
            std::io::copy(
                &mut (&mut reader).take(content_length),
                &mut std::io::sink(),
            )?;
        }
        response.clear();
        response.extend_from_slice(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n",
                body.len(),
                if close { "connection: close\r\n" } else { "" }
            )
            .as_bytes(),
        );
        response.extend_from_slice(body);
        writer.write_all(&response)?;
        if close {
            return Ok(());
        }
    }
}
