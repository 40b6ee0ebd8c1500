//! Who owns a TCP socket of this network namespace, by the user ids the
//! kernel lists in `/proc/net/tcp` and `/proc/net/tcp6`.
//!
//! The local API asks it before it takes a registration at a port of this
//! node: transparent mode takes the address of every instance of this node
//! over for the node's workloads, so a workload allowed to register its own
//! service could otherwise register it at a port another user's process
//! listens on (a node-local database, a secrets agent) and be handed the
//! other workloads' connections to it. A port may be claimed by the user
//! whose process listens there, by root, or while nothing listens yet (a
//! service registered before it starts).
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// `TCP_ESTABLISHED` and `TCP_LISTEN` in the kernel's `st` column.
const ESTABLISHED: u8 = 0x01;
const LISTEN: u8 = 0x0A;

/// One line of `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
    pub uid: u32,
}

/// Why a port may not be claimed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClaimError {
    #[error("the calling connection was not found among this node's sockets")]
    UnknownCaller,
    #[error(
        "{0} is listened on by another user's process: register a port your service listens on"
    )]
    AnotherUsers(SocketAddr),
    #[error("reading this node's sockets: {0}")]
    Read(String),
}

/// Parses the text of `/proc/net/tcp` or `/proc/net/tcp6`; lines it cannot
/// read are left out.
pub fn parse(text: &str) -> Vec<TcpSocket> {
    text.lines().skip(1).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<TcpSocket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    // sl local remote st tx:rx tr:when retrnsmt uid ...
    let local = address(fields.get(1)?)?;
    let remote = address(fields.get(2)?)?;
    let state = u8::from_str_radix(fields.get(3)?, 16).ok()?;
    let uid = fields.get(7)?.parse().ok()?;
    Some(TcpSocket {
        local,
        remote,
        state,
        uid,
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): each 32-bit
/// word of the address printed as the host reads it from memory.
fn address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // A word's bytes as they lie in memory: the address's, in order.
    let word = |hex: &str| Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes());
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut octets = [0u8; 16];
            for (i, chunk) in octets.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip.to_canonical(), port))
}

/// Pure: whether the caller of user `caller` (None: its connection was not
/// found) may claim `target`, given the node's sockets.
pub fn may_claim(
    caller: Option<u32>,
    target: SocketAddr,
    sockets: &[TcpSocket],
) -> Result<(), ClaimError> {
    let caller = caller.ok_or(ClaimError::UnknownCaller)?;
    let target_ip = target.ip().to_canonical();
    // A loopback target is every loopback address's: a client told
    // `localhost` may try ::1 first, and 127.0.0.1 after.
    let covers = |ip: IpAddr| {
        ip == target_ip || ip.is_unspecified() || (target_ip.is_loopback() && ip.is_loopback())
    };
    let listeners = (sockets.iter())
        .filter(|s| s.state == LISTEN && s.local.port() == target.port() && covers(s.local.ip()));
    for listener in listeners {
        if caller != 0 && listener.uid != caller {
            return Err(ClaimError::AnotherUsers(target));
        }
    }
    Ok(())
}

/// The user of the established socket connected from `peer` to `local`
/// (the far end of a connection this process accepted at `local`). A
/// socket its owner has closed is listed as root's: not taken.
pub fn caller_uid(sockets: &[TcpSocket], peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let (peer, local) = (canonical(peer), canonical(local));
    sockets
        .iter()
        .find(|s| s.local == peer && s.remote == local && s.state == ESTABLISHED)
        .map(|s| s.uid)
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// This network namespace's TCP sockets, IPv4 and IPv6.
pub fn read() -> Result<Vec<TcpSocket>, ClaimError> {
    let mut all = Vec::new();
    for path in ["/proc/net/tcp", "/proc/net/tcp6"] {
        match std::fs::read_to_string(path) {
            Ok(text) => all.extend(parse(&text)),
            // No IPv6 on this host: no such sockets.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ClaimError::Read(format!("{path}: {e}"))),
        }
    }
    Ok(all)
}

/// Whether the caller connected from `peer` to the local API at `local` may
/// register an instance at `target` (see the module's doc). The files are
/// read on the blocking pool (a busy node lists many sockets).
pub async fn check_claim(
    peer: SocketAddr,
    local: SocketAddr,
    target: SocketAddr,
) -> Result<(), ClaimError> {
    let sockets = tokio::task::spawn_blocking(read)
        .await
        .map_err(|e| ClaimError::Read(e.to_string()))??;
    may_claim(caller_uid(&sockets, peer, local), target, &sockets)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   997        0 1204 1 0 100 0 0 10 0
   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1205 1 0 100 0 0 10 0
   2: 0100007F:2134 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 1206 1 0 20 4 30 10 -1
   3: 0100007F:D431 0100007F:2134 01 00000000:00000000 00:00000000 00000000 65534        0 1207 1 0 20 4 30 10 -1
   4: 0100007F:D432 0100007F:2134 05 00000000:00000000 00:00000000 00000000     0        0 0 1 0 20 4 30 10 -1
   bad line
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1A0B 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 2001 1 0 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:1B58 0000000000000000FFFF00000100007F:0000 0A 00000000:00000000 00:00000000 00000000   998        0 2002 1 0 100 0 0 10 0
   2: 00000000000000000000000001000000:1F41 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000   996        0 2003 1 0 100 0 0 10 0
";

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn sockets() -> Vec<TcpSocket> {
        let mut all = parse(TCP);
        all.extend(parse(TCP6));
        all
    }

    #[test]
    fn reads_the_kernels_lines_in_host_byte_order() {
        let all = sockets();
        assert_eq!(all.len(), 8, "the bad line left out: {all:?}");
        assert_eq!(all[0].local, a("127.0.0.1:6379"));
        assert_eq!((all[0].state, all[0].uid), (LISTEN, 997));
        assert_eq!(all[1].local, a("0.0.0.0:8080"));
        assert_eq!(all[3].remote, a("127.0.0.1:8500"));
        assert_eq!(all[5].local, a("[::]:6667"));
        // A v4-mapped address reads as the IPv4 one.
        assert_eq!(all[6].local, a("127.0.0.1:7000"));
        assert_eq!(all[7].local, a("[::1]:8001"));
    }

    #[test]
    fn the_caller_is_the_user_at_the_far_end_of_its_connection() {
        let all = sockets();
        let (peer, api) = (a("127.0.0.1:54321"), a("127.0.0.1:8500"));
        assert_eq!(caller_uid(&all, peer, api), Some(65534));
        assert_eq!(caller_uid(&all, a("127.0.0.1:1"), api), None);
        assert_eq!(
            caller_uid(&all, a("[::ffff:127.0.0.1]:54321"), api),
            Some(65534)
        );
        // Closed by its owner (FIN_WAIT2, listed as root's): unknown.
        assert_eq!(caller_uid(&all, a("127.0.0.1:54322"), api), None);
    }

    #[test]
    fn a_port_another_user_listens_on_is_not_claimed() {
        let all = sockets();
        let nobody = Some(65534);
        // 127.0.0.1:6379 is user 997's (a node-local database).
        assert_eq!(
            may_claim(nobody, a("127.0.0.1:6379"), &all),
            Err(ClaimError::AnotherUsers(a("127.0.0.1:6379")))
        );
        // Its own listener, and one nobody listens on yet.
        assert_eq!(may_claim(Some(997), a("127.0.0.1:6379"), &all), Ok(()));
        assert_eq!(may_claim(nobody, a("127.0.0.1:9999"), &all), Ok(()));
        // Listeners on every address hold the port on each: root's on
        // 0.0.0.0:8080, user 1000's on [::]:6667.
        assert!(may_claim(nobody, a("10.0.0.3:8080"), &all).is_err());
        assert!(may_claim(nobody, a("127.0.0.1:6667"), &all).is_err());
        assert_eq!(may_claim(Some(1000), a("127.0.0.1:6667"), &all), Ok(()));
        // A v4-mapped listener on 127.0.0.1:7000 (user 998).
        assert!(may_claim(nobody, a("127.0.0.1:7000"), &all).is_err());
        // A loopback port is every loopback address's: 127.0.0.1:6379's
        // owner holds [::1]:6379 too, and [::1]:8001's 127.0.0.1:8001;
        // not the node's own address.
        assert!(may_claim(nobody, a("[::1]:6379"), &all).is_err());
        assert!(may_claim(nobody, a("127.0.0.1:8001"), &all).is_err());
        assert_eq!(may_claim(nobody, a("10.0.0.3:6379"), &all), Ok(()));
        // Root may claim any; an unknown caller none.
        assert_eq!(may_claim(Some(0), a("127.0.0.1:6379"), &all), Ok(()));
        assert_eq!(
            may_claim(None, a("127.0.0.1:9999"), &all),
            Err(ClaimError::UnknownCaller)
        );
    }
}
