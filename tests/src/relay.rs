//! A TCP relay on loopback that a test can cut and mend: how a test cuts one
//! server off from the others without firewall rules. Cutting closes every
//! connection it carries and refuses new ones until mended. The relay's
//! threads end when it is dropped.
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Default)]
struct Shared {
    cut: AtomicBool,
    stop: AtomicBool,
    /// Both ends of every connection carried, to close them on a cut.
    open: Mutex<Vec<TcpStream>>,
}

impl Shared {
    fn close_all(&self) {
        for stream in self.open.lock().expect("relay lock").drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// How the relay reaches its target: from this process's namespace, or
/// from a thread that has entered another (see [`Relay::start_into`]).
type Connect = Arc<dyn Fn() -> io::Result<TcpStream> + Send + Sync>;

pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accepting: Option<JoinHandle<()>>,
}

impl Relay {
    /// Relays connections made to a new port on 127.0.0.1 to `to`.
    pub fn start(to: SocketAddr) -> io::Result<Relay> {
        Self::start_with(Arc::new(move || {
            TcpStream::connect_timeout(&to, Duration::from_secs(1))
        }))
    }

    /// Relays connections made to a new port on this process's 127.0.0.1
    /// to `to` inside network namespace `netns` (its own loopback, say),
    /// which nothing outside it can otherwise reach.
    pub fn start_into(netns: &crate::netns::Netns, to: SocketAddr) -> io::Result<Relay> {
        let path = netns.path();
        Self::start_with(Arc::new(move || {
            let ns = std::fs::File::open(&path)?;
            std::thread::spawn(move || {
                use std::os::fd::AsRawFd;
                // SAFETY: a valid namespace fd; only this new thread moves.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                TcpStream::connect_timeout(&to, Duration::from_secs(1))
            })
            .join()
            .map_err(|_| io::Error::other("netns thread panicked"))?
        }))
    }

    fn start_with(connect: Connect) -> io::Result<Relay> {
        // A port found free can be taken before it is bound again (by a
        // process of another test): another one is tried, a few times.
        let mut attempt = 0;
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", crate::servers::free_port())) {
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempt < 10 => attempt += 1,
                other => break other?,
            }
        };
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let accepting = {
            let shared = shared.clone();
            std::thread::spawn(move || accept(listener, connect, shared))
        };
        Ok(Relay {
            addr,
            shared,
            accepting: Some(accepting),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every connection and refuses new ones until [`Relay::mend`].
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        self.shared.close_all();
    }

    pub fn mend(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.close_all();
        // Wakes the accepting thread, which then sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.accepting.take() {
            let _ = thread.join();
        }
    }
}

fn accept(listener: TcpListener, connect: Connect, shared: Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        if shared.cut.load(Ordering::SeqCst) {
            continue; // dropped: closed at once
        }
        let Ok(server) = connect() else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        ) else {
            continue;
        };
        shared.open.lock().expect("relay lock").extend([c3, s3]);
        if shared.cut.load(Ordering::SeqCst) {
            shared.close_all(); // cut while this one was being made
        }
        std::thread::spawn(move || pipe(client, server));
        std::thread::spawn(move || pipe(s2, c2));
    }
}

/// Copies `from` to `to` until either ends, then closes both.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn carries_until_cut_and_again_once_mended() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut s in echo.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let relay = Relay::start(to).unwrap();
        let roundtrip = |s: &mut TcpStream| -> io::Result<Vec<u8>> {
            s.write_all(b"ping")?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf)?;
            Ok(buf.to_vec())
        };
        let mut held = TcpStream::connect(relay.addr()).unwrap();
        held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(roundtrip(&mut held).unwrap(), b"ping");

        relay.cut();
        assert!(
            roundtrip(&mut held).is_err(),
            "a cut closes what it carried"
        );
        let mut new = TcpStream::connect(relay.addr()).unwrap();
        new.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(
            roundtrip(&mut new).is_err(),
            "a cut refuses new connections"
        );

        relay.mend();
        let mut again = TcpStream::connect(relay.addr()).unwrap();
        again
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(roundtrip(&mut again).unwrap(), b"ping");
    }
}
