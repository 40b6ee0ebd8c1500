//! `weft-workload LISTEN_ADDR NAME`: a tiny HTTP/1.1 server standing in for a
//! mesh workload in tests and benchmarks (std only, a thread per connection,
//! keep-alive).
//!
//! - `GET /healthz`: 200 `ok`, or 503 `failing` after `/fail`;
//! - `GET /fail`, `GET /recover`: make `/healthz` fail, or pass again;
//! - `/echo/...`: 200 with `instance NAME got PATH` (the path and query it
//!   received, to see rewrites);
//! - `/flaky`: 503 (a 192 KiB body) and 200 `ok`, in turn (one count per
//!   process);
//! - `/headers`: 200 with `instance NAME` and then each `x-` header it
//!   received as `name: value`, in arrival order (to see header changes);
//! - `/upgrade` with an `Upgrade` header: 101 to the protocol it names
//!   (with the `Sec-WebSocket-Accept` of a `Sec-WebSocket-Key` it was
//!   sent), then every byte comes back; without one, as anything else;
//! - anything else: 200 with the body `instance NAME\n`.
//!
//! It prints `listening on ADDR` to stdout once it accepts connections.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(addr), Some(name)) = (args.first(), args.get(1)) else {
        eprintln!("usage: weft-workload LISTEN_ADDR NAME");
        std::process::exit(2);
    };
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("weft-workload: binding {addr}: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "listening on {}",
        listener.local_addr().expect("local addr")
    );
    let _ = std::io::stdout().flush();
    let failing = Arc::new(AtomicBool::new(false));
    let flaky = Arc::new(AtomicU64::new(0));
    let name: Arc<str> = Arc::from(name.as_str());
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (failing, flaky) = (failing.clone(), flaky.clone());
        let name = name.clone();
        std::thread::spawn(move || {
            let _ = serve(stream, &name, &failing, &flaky);
        });
    }
}

fn serve(
    stream: TcpStream,
    name: &str,
    failing: &AtomicBool,
    flaky: &AtomicU64,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("/").to_string();
        let version = parts.next().unwrap_or("HTTP/1.1").to_string();
        let mut content_length = 0usize;
        let mut close = version == "HTTP/1.0";
        let mut x_headers = String::new();
        let mut upgrade = None;
        let mut websocket_key: Option<String> = None;
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
                if k.trim().to_ascii_lowercase().starts_with("x-") {
                    x_headers.push_str(&format!(
                        "{}: {}\n",
                        k.trim().to_ascii_lowercase(),
                        v.trim()
                    ));
                }
                if k.trim().eq_ignore_ascii_case("sec-websocket-key") {
                    websocket_key = Some(v.trim().to_string());
                }
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
                if k == "content-length" {
                    content_length = v.parse().unwrap_or(0);
                } else if k == "connection" {
                    close = v == "close";
                } else if k == "upgrade" {
                    upgrade = Some(v);
                }
            }
        }
        if content_length > 0 {
            std::io::copy(
                &mut (&mut reader).take(content_length as u64),
                &mut std::io::sink(),
            )?;
        }
        let route = path.split('?').next().unwrap_or("/");
        if let (Some(protocol), "/upgrade") = (&upgrade, route) {
            // Switches to whatever was asked, as an echo: every byte after
            // the 101 comes back, until the client closes. With a
            // `Sec-WebSocket-Key`, the 101 completes RFC 6455's handshake.
            let accept = websocket_key
                .as_deref()
                .map(|key| format!("sec-websocket-accept: {}\r\n", websocket_accept(key)))
                .unwrap_or_default();
            writer.write_all(
                format!("HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {protocol}\r\n{accept}\r\n")
                    .as_bytes(),
            )?;
            let mut buf = [0u8; 4096];
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                writer.write_all(&buf[..n])?;
            }
        }
        let (status, body) = match route {
            "/healthz" if failing.load(Ordering::SeqCst) => {
                ("503 Service Unavailable", "failing\n".to_string())
            }
            "/healthz" => ("200 OK", "ok\n".to_string()),
            "/fail" => {
                failing.store(true, Ordering::SeqCst);
                ("200 OK", "failing now\n".to_string())
            }
            "/recover" => {
                failing.store(false, Ordering::SeqCst);
                ("200 OK", "passing now\n".to_string())
            }
            "/flaky" if flaky.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) => {
                // A body larger than one read: a client that drops the
                // response unread cannot reuse the connection.
                ("503 Service Unavailable", "flaky\n".repeat(32 * 1024))
            }
            "/flaky" => ("200 OK", "ok\n".to_string()),
            "/headers" => ("200 OK", format!("instance {name}\n{x_headers}")),
            echo if echo.starts_with("/echo/") => {
                ("200 OK", format!("instance {name} got {path}\n"))
            }
            _ => ("200 OK", format!("instance {name}\n")),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n",
            body.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        let mut out = head.into_bytes();
        if method != "HEAD" {
            out.extend_from_slice(body.as_bytes());
        }
        writer.write_all(&out)?;
        if close {
            return Ok(());
        }
    }
}

/// RFC 6455's `Sec-WebSocket-Accept` for `key`: the base64 SHA-1 of the key
/// and the protocol's GUID.
fn websocket_accept(key: &str) -> String {
    use base64::Engine;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    hash.update(key.as_bytes());
    hash.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(hash.finish())
}
