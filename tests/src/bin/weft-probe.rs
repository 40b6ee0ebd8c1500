//! A minimal TCP client for tests.
//!
//! * `weft-probe connect ADDR [TEXT]` connects, sends TEXT (default "ping"),
//!   closes its sending side, prints what it receives until the peer closes,
//!   and exits 1 with the error on failure.
//! * `weft-probe connect-many ADDR N` makes N short connections one after
//!   another (each waits for the peer to close first, so no TIME_WAIT piles
//!   up on this side) and prints how many succeeded.
//! * `weft-probe connect-reuse FIRST SECOND [CGROUP_PROCS]` connects to
//!   FIRST, dissolves the connection with `connect(AF_UNSPEC)`, then (moved
//!   into the cgroup whose `cgroup.procs` is given, as a socket handed to
//!   another process would be) connects the same socket to SECOND, sends an
//!   HTTP/1.0 GET and prints the answer: whatever the socket kept from the
//!   first connect goes with it.
//! * `weft-probe connect-collide FIRST SECOND [CGROUP_PROCS]`: connects one
//!   socket to FIRST, then a second socket bound to the same local port
//!   (`SO_REUSEADDR` on both) to FIRST too, which fails (the same 4-tuple);
//!   then (moved into the cgroup whose `cgroup.procs` is given) connects
//!   that second socket to SECOND, sends an HTTP/1.0 GET and prints the
//!   answer: whatever the failed connect left on the socket goes with it.
//! * `weft-probe connect-dstopts IPV6 IFNAME PORT` connects over IPv6 with a
//!   Destination Options extension header on every packet (root only), sends
//!   an HTTP/1.0 GET and prints the answer: a SYN a header parser might miss.
//! * `weft-probe listen-in-place ADDR SECONDS` (an attacker waiting for a
//!   port): binds ADDR as soon as it is free (retrying while it is taken),
//!   listens, prints `listening` and, if a connection comes within SECONDS,
//!   prints `accepted:` and the first line it sent; exits 1 when none came.
//! * `weft-probe udp-in-place ADDR SECONDS`: the same for UDP: binds ADDR
//!   as soon as it is free, prints `listening` and, if a datagram comes
//!   within SECONDS, prints `received:` and its size; exits 1 when none came.
//! * `weft-probe send-udp ADDR connected|unconnected`: sends one datagram to
//!   ADDR, from a socket connected to it (as glibc's resolver sends) or with
//!   `sendto` (as musl's does), and exits 1 with the error if it is refused.
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
    if let (Some("connect-reuse"), Some(first), Some(second)) =
        (args.first().map(String::as_str), args.get(1), args.get(2))
    {
        match connect_reuse(first, second, args.get(3).map(String::as_str)) {
            Ok(reply) => print!("{reply}"),
            Err(e) => {
                eprintln!("weft-probe: {first} then {second}: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    if let (Some("connect-collide"), Some(first), Some(second)) =
        (args.first().map(String::as_str), args.get(1), args.get(2))
    {
        match connect_collide(first, second, args.get(3).map(String::as_str)) {
            Ok(reply) => print!("{reply}"),
            Err(e) => {
                eprintln!("weft-probe: {first}, collided, then {second}: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    if let (Some("connect-dstopts"), Some(ip), Some(ifname), Some(port)) = (
        args.first().map(String::as_str),
        args.get(1),
        args.get(2),
        args.get(3),
    ) {
        match connect_dstopts(ip, ifname, port) {
            Ok(reply) => print!("{reply}"),
            Err(e) => {
                eprintln!("weft-probe: [{ip}%{ifname}]:{port}: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    if let (Some("udp-in-place"), Some(addr), Some(seconds)) =
        (args.first().map(String::as_str), args.get(1), args.get(2))
    {
        let seconds: u64 = seconds.parse().unwrap_or(0);
        match udp_in_place(addr, Duration::from_secs(seconds)) {
            Ok(size) => println!("received: {size} bytes"),
            Err(e) => {
                eprintln!("weft-probe: UDP on {addr}: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    if let (Some("send-udp"), Some(addr), Some(how)) =
        (args.first().map(String::as_str), args.get(1), args.get(2))
    {
        match send_udp(addr, how == "connected") {
            Ok(()) => println!("sent"),
            Err(e) => {
                eprintln!("weft-probe: UDP to {addr} ({how}): {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    if let (Some("listen-in-place"), Some(addr), Some(seconds)) =
        (args.first().map(String::as_str), args.get(1), args.get(2))
    {
        let seconds: u64 = seconds.parse().unwrap_or(0);
        match listen_in_place(addr, Duration::from_secs(seconds)) {
            Ok(first_bytes) => println!("accepted: {first_bytes}"),
            Err(e) => {
                eprintln!("weft-probe: listening on {addr}: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let (Some("connect"), Some(addr)) = (args.first().map(String::as_str), args.get(1)) else {
        eprintln!(
            "usage: weft-probe connect ADDR [TEXT] | connect-many ADDR N | \
             connect-reuse FIRST SECOND [CGROUP_PROCS] | connect-dstopts IPV6 IFNAME PORT | \
             listen-in-place ADDR SECONDS | udp-in-place ADDR SECONDS | \
             send-udp ADDR connected|unconnected"
        );
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

/// An IPv6 connection whose packets carry a Destination Options header
/// (PadN only), bounded by a 2 s connect and read timeout.
fn connect_dstopts(ip: &str, ifname: &str, port: &str) -> std::io::Result<String> {
    use std::os::fd::FromRawFd;
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let ip: std::net::Ipv6Addr = ip.parse().map_err(|e| invalid(format!("{e}")))?;
    let port: u16 = port.parse().map_err(|e| invalid(format!("{e}")))?;
    let name = std::ffi::CString::new(ifname).map_err(|e| invalid(format!("{e}")))?;
    // SAFETY: a valid C string.
    let scope = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if scope == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: plain socket creation; the fd is owned by the TcpStream below.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    // Next header (filled in by the kernel), length 0 (8 bytes), PadN of 4.
    let dstopts: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
    // SAFETY: valid fd and buffer of the advertised length.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_DSTOPTS,
            dstopts.as_ptr().cast(),
            dstopts.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // connect() honours the send timeout.
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let addr = libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: port.to_be(),
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr {
            s6_addr: ip.octets(),
        },
        sin6_scope_id: scope,
    };
    // SAFETY: a valid sockaddr_in6 of the advertised length.
    let rc = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut stream = stream;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply)
}

fn sockaddr_in(addr: std::net::SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// `connect()` on a raw fd; EINPROGRESS/EISCONN count as started.
fn raw_connect(fd: libc::c_int, addr: &libc::sockaddr_in) -> std::io::Result<()> {
    // SAFETY: a valid sockaddr_in of the advertised length.
    let rc = unsafe {
        libc::connect(
            fd,
            (addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    Ok(())
}

/// An IPv4 TCP socket with `SO_REUSEADDR`, bound to `0.0.0.0:port`.
fn reusable_socket(port: u16) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket creation; the fd is owned by the TcpStream below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: a valid fd and an int of the advertised size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let local = sockaddr_in(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::UNSPECIFIED,
        port,
    ));
    // SAFETY: a valid sockaddr_in of the advertised length.
    let rc = unsafe {
        libc::bind(
            fd,
            (&local as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(stream)
}

/// See `connect-collide` in the module doc; 2 s limits.
fn connect_collide(first: &str, second: &str, move_to: Option<&str>) -> std::io::Result<String> {
    use std::os::fd::AsRawFd;
    let parse = |a: &str| -> std::io::Result<std::net::SocketAddrV4> {
        a.parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{a}: {e}")))
    };
    let (first, second) = (parse(first)?, parse(second)?);
    let one = reusable_socket(0)?;
    raw_connect(one.as_raw_fd(), &sockaddr_in(first))?;
    let port = match one.local_addr()? {
        SocketAddr::V4(v4) => v4.port(),
        SocketAddr::V6(v6) => v6.port(),
    };
    let mut two = reusable_socket(port)?;
    match raw_connect(two.as_raw_fd(), &sockaddr_in(first)) {
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
        other => {
            return Err(std::io::Error::other(format!(
                "the second connect to {first} did not collide: {other:?}"
            )))
        }
    }
    if let Some(procs) = move_to {
        let mut file = std::fs::OpenOptions::new().write(true).open(procs)?;
        file.write_all(std::process::id().to_string().as_bytes())?;
    }
    raw_connect(two.as_raw_fd(), &sockaddr_in(second))?;
    two.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut reply = String::new();
    two.read_to_string(&mut reply)?;
    drop(one);
    Ok(reply)
}

/// `connect(AF_UNSPEC)`: dissolves `fd`'s association, keeping the socket.
fn dissolve(fd: libc::c_int) -> std::io::Result<()> {
    let unspec = libc::sockaddr {
        sa_family: libc::AF_UNSPEC as libc::sa_family_t,
        sa_data: [0; 14],
    };
    // SAFETY: a valid sockaddr of the advertised length.
    let rc = unsafe {
        libc::connect(
            fd,
            &unspec,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// An IPv4 socket bound to `addr` (retried until `limit` while it is in
/// use), listening; the first line of the first connection within `limit`.
fn listen_in_place(addr: &str, limit: Duration) -> std::io::Result<String> {
    use std::os::fd::FromRawFd;
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let deadline = std::time::Instant::now() + limit;
    if let Ok(v6) = addr.parse::<std::net::SocketAddrV6>() {
        // An IPv6 address nobody holds: bound at once.
        let listener = std::net::TcpListener::bind(v6)?;
        println!("listening");
        std::io::stdout().flush()?;
        return first_line(listener, deadline);
    }
    let addr: std::net::SocketAddrV4 = addr.parse().map_err(|e| invalid(format!("{e}")))?;
    // SAFETY: plain socket creation; the fd is owned by the listener below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    let sockaddr = sockaddr_in(addr);
    loop {
        // SAFETY: a valid sockaddr_in of the advertised length.
        let rc = unsafe {
            libc::bind(
                fd,
                (&sockaddr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EADDRINUSE) || std::time::Instant::now() >= deadline {
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: a bound socket.
    if unsafe { libc::listen(fd, 16) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    println!("listening");
    std::io::stdout().flush()?;
    first_line(listener, deadline)
}

/// The first line of the first connection `listener` accepts before
/// `deadline`.
fn first_line(
    listener: std::net::TcpListener,
    deadline: std::time::Instant,
) -> std::io::Result<String> {
    listener.set_nonblocking(true)?;
    let (mut stream, _) = loop {
        match listener.accept() {
            Ok(accepted) => break accepted,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() >= deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "nothing accepted",
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 256];
    let n = stream.read(&mut buf).unwrap_or(0);
    Ok(String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string())
}

/// A UDP socket bound to `addr` (retried until `limit` while it is in
/// use); the size of the first datagram within `limit`.
fn udp_in_place(addr: &str, limit: Duration) -> std::io::Result<usize> {
    let deadline = std::time::Instant::now() + limit;
    let socket = loop {
        match std::net::UdpSocket::bind(addr) {
            Ok(socket) => break socket,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                if std::time::Instant::now() >= deadline {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    };
    println!("listening");
    std::io::stdout().flush()?;
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    socket.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
    let mut buf = [0u8; 2048];
    let (n, _) = socket.recv_from(&mut buf)?;
    Ok(n)
}

/// One datagram to `addr`, from a connected socket or with `sendto` (an
/// IPv6 socket for an IPv6 address, v4-mapped ones included).
fn send_udp(addr: &str, connected: bool) -> std::io::Result<()> {
    let target: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let local = if target.is_ipv6() {
        "[::]:0"
    } else {
        "127.0.0.1:0"
    };
    let socket = std::net::UdpSocket::bind(local)?;
    if connected {
        socket.connect(addr)?;
        socket.send(b"weft-probe")?;
    } else {
        socket.send_to(b"weft-probe", addr)?;
    }
    Ok(())
}

/// One IPv4 socket: connected to `first` (and that connection waited for),
/// dissolved with `connect(AF_UNSPEC)`, connected to `second` (from the
/// cgroup of `move_to`, a `cgroup.procs` file, when given); 2 s limits.
fn connect_reuse(first: &str, second: &str, move_to: Option<&str>) -> std::io::Result<String> {
    use std::os::fd::FromRawFd;
    let parse = |a: &str| -> std::io::Result<std::net::SocketAddrV4> {
        a.parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{a}: {e}")))
    };
    let (first, second) = (parse(first)?, parse(second)?);
    // SAFETY: plain socket creation; the fd is owned by the TcpStream below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let mut stream = unsafe { TcpStream::from_raw_fd(fd) };
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    raw_connect(fd, &sockaddr_in(first))?;
    dissolve(fd)?;
    if let Some(procs) = move_to {
        // Never created: a path that is no cgroup file is an error.
        let mut file = std::fs::OpenOptions::new().write(true).open(procs)?;
        file.write_all(std::process::id().to_string().as_bytes())?;
    }
    raw_connect(fd, &sockaddr_in(second))?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply)
}
