//! The agent's resolver for `weft-agent exec`: the command runs in a
//! private mount namespace where a `resolv.conf` naming the agent's DNS is
//! bound over `/etc/resolv.conf`, so plain names (`api.service.weft`, and
//! with `recursors` every other name) resolve through the agent. Resolvers
//! ask port 53 only, so this needs `dns_addr` there. The file is made new
//! in the agent's data directory (never one that is there already, never
//! through a link), bound by its open descriptor (so no path can be swapped
//! under it) and unlinked at once: the mount keeps it, nothing else sees
//! it, and the host's `/etc/resolv.conf` is not touched.

use std::ffi::CString;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
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

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Binds `text` over `/etc/resolv.conf` in a new mount namespace of this
/// process (the command `exec` becomes inherits it; nothing else sees it),
/// from a file made new in `dir`. Mounts of the host made later still reach
/// it (the namespace is the host's slave, not cut off).
pub fn use_resolver(dir: &Path, text: &str) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let root = CString::new("/").expect("no NUL");
    let none = std::ptr::null();
    // SAFETY: unshare and mount get C strings that outlive the calls.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            none,
            root.as_ptr(),
            none,
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        ))?;
    }
    // Opened in the new namespace: a bind takes its source from there.
    let path = dir.join(format!("exec-resolv-{:016x}.conf", rand::random::<u64>()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)?;
    let bound = write_and_bind(&mut file, text);
    // Unlinked whatever happened: a bound file lives on in the mount.
    let _ = std::fs::remove_file(&path);
    bound
}

fn write_and_bind(file: &mut std::fs::File, text: &str) -> io::Result<()> {
    file.write_all(text.as_bytes())?;
    let source = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).expect("no NUL");
    let target = CString::new("/etc/resolv.conf").expect("no NUL");
    let none = std::ptr::null();
    // SAFETY: mount gets C strings that outlive the call.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            none,
            libc::MS_BIND,
            std::ptr::null(),
        )
    })
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
