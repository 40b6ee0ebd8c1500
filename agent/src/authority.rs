//! `host[:port]` as HTTP writes it (a `Host` header, a request target's
//! authority): split, with the IPv6 literal in brackets read and the port
//! checked. Pure; the L7 proxy and the local API judge the host it gives.

/// The host part of a `host[:port]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host<'a> {
    /// `[…]`: an IPv6 literal.
    V6(std::net::Ipv6Addr),
    /// Anything else, as written (a name or an IPv4 address).
    Name(&'a str),
}

/// `value` split into its host and its port, if any; why not, when its
/// literal is not IPv6, its port not a number from 0 to 65535 (1 to 5
/// digits), or it has no host.
pub fn split(value: &str) -> Result<(Host<'_>, Option<u16>), &'static str> {
    let (host, port) = match value.strip_prefix('[') {
        Some(rest) => {
            let (literal, after) = rest
                .split_once(']')
                .ok_or("an IP literal without its ']'")?;
            let v6 = literal.parse().map_err(|_| "not an IPv6 literal")?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or("the port is not a number")?),
            };
            (Host::V6(v6), port)
        }
        None => match value.split_once(':') {
            Some((host, port)) => (Host::Name(host), Some(port)),
            None => (Host::Name(value), None),
        },
    };
    if host == Host::Name("") {
        return Err("no host");
    }
    let port = port
        .map(
            |p| match p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) {
                true => p.parse::<u16>().map_err(|_| "the port is not a number"),
                false => Err("the port is not a number"),
            },
        )
        .transpose()?;
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_ports() {
        assert_eq!(split("api"), Ok((Host::Name("api"), None)));
        assert_eq!(split("10.0.0.1:80"), Ok((Host::Name("10.0.0.1"), Some(80))));
        assert_eq!(
            split("[::1]:8443"),
            Ok((Host::V6(std::net::Ipv6Addr::LOCALHOST), Some(8443)))
        );
        assert_eq!(
            split("[::1]"),
            Ok((Host::V6(std::net::Ipv6Addr::LOCALHOST), None))
        );
        for bad in [
            "", ":80", "a:", "a:x", "a:123456", "a:99999", "a:1:2", "[::1", "[x]", "[::1]x",
            "[::1]:",
        ] {
            assert!(split(bad).is_err(), "{bad}");
        }
    }
}
