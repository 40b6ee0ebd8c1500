//! The agent's resolver for `weft-agent exec`: the command runs in a
//! private mount namespace where a `resolv.conf` naming the agent's DNS is
//! bound over `/etc/resolv.conf`, so plain names (`api.service.weft`, and
//! with `recursors` every other name) resolve through the agent. Resolvers
//! ask port 53 only, so this needs `dns_addr` there; the host's own
//! `/etc/resolv.conf` is not touched.

use std::ffi::CString;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The `resolv.conf` that names the agent's DNS at `dns_addr`, or None when
/// it is not on port 53. An unspecified address is asked on loopback.
pub fn resolv_conf(dns_addr: SocketAddr) -> Option<String> {
    if dns_addr.port() != 53 {
        return None;
    }
    let ip = match dns_addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Some(format!(
        "# weft-agent exec: names resolve through the node's weft agent\nnameserver {ip}\n"
    ))
}

/// Writes `text` to `exec-resolv.conf` in `data_dir` and binds it over
/// `/etc/resolv.conf` in a new private mount namespace of this process (the
/// command `exec` becomes inherits it; nothing else sees it).
pub fn use_resolver(data_dir: &Path, text: &str) -> io::Result<()> {
    std::fs::create_dir_all(data_dir)?;
    let file = data_dir.join("exec-resolv.conf");
    std::fs::write(&file, text)?;
    // SAFETY: unshare and mount take no pointers we do not own; the CStrings
    // outlive the calls.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(io::Error::last_os_error());
        }
        let root = CString::new("/").expect("no NUL");
        let private = libc::MS_REC | libc::MS_PRIVATE;
        let none = std::ptr::null();
        if libc::mount(none, root.as_ptr(), none, private, std::ptr::null()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let source = CString::new(file.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in data_dir"))?;
        let target = CString::new("/etc/resolv.conf").expect("no NUL");
        let bind = libc::MS_BIND;
        if libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            none,
            bind,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_address_on_port_53_names_the_resolver() {
        let conf = |a: &str| resolv_conf(a.parse().unwrap());
        assert!(conf("127.0.0.1:53")
            .unwrap()
            .contains("\nnameserver 127.0.0.1\n"));
        assert!(conf("0.0.0.0:53")
            .unwrap()
            .contains("\nnameserver 127.0.0.1\n"));
        assert!(conf("[::]:53").unwrap().contains("\nnameserver ::1\n"));
        assert!(conf("10.1.2.3:53")
            .unwrap()
            .contains("\nnameserver 10.1.2.3\n"));
        assert_eq!(conf("127.0.0.1:8600"), None, "resolvers ask port 53 only");
    }
}
