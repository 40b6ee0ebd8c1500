//! Requests a web page made: refused before anything else is read.
//!
//! The local API is plain HTTP on the node (Consul's agent port), for the
//! node's workloads and their Consul clients, none of which is a browser.
//! A page in a browser on the node can still send it requests: with a
//! cross-site form or `fetch` (the browser adds `Origin` or
//! `Sec-Fetch-Site`), or, through DNS rebinding, as a same-origin request
//! to a name of the attacker's that now resolves to 127.0.0.1 (the browser
//! sends that name as `Host`). Such a page has no token, but it could still
//! read what answers without one, probe check ids, or take the API's
//! connection slots from the node's workloads.
//!
//! So a request is refused when it names a host that is neither an IP
//! address nor `localhost`, or comes from a page (`Origin`, or a
//! `Sec-Fetch-Site` other than `none`, which a browser sends for an address
//! typed by its user). Pure: unit-tested on headers.

use http::{header, HeaderMap};

/// Why a request is refused, to answer it with (403).
pub fn refusal(headers: &HeaderMap) -> Option<String> {
    if let Some(host) = headers.get(header::HOST) {
        let host = host.to_str().unwrap_or_default();
        if !is_address_or_localhost(host) {
            return Some(format!(
                "Host {host:?}: the agent's API answers requests addressed to an IP address or localhost"
            ));
        }
    }
    if headers.contains_key(header::ORIGIN) {
        return Some(
            "a request from a web page (Origin): the agent's API is not for browsers".into(),
        );
    }
    let site = headers.get("sec-fetch-site").map(|v| v.as_bytes());
    if site.is_some_and(|s| s != b"none") {
        return Some(
            "a request from a web page (Sec-Fetch-Site): the agent's API is not for browsers"
                .into(),
        );
    }
    None
}

/// `host[:port]` where host is an IPv4 address, a bracketed IPv6 address or
/// `localhost` (any case, with or without a final dot).
fn is_address_or_localhost(value: &str) -> bool {
    match crate::authority::split(value) {
        Ok((crate::authority::Host::V6(_), _)) => true,
        Ok((crate::authority::Host::Name(host), _)) => {
            host.parse::<std::net::Ipv4Addr>().is_ok()
                || host.eq_ignore_ascii_case("localhost")
                || host.eq_ignore_ascii_case("localhost.")
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        h
    }

    #[test]
    fn clients_addressing_the_agent_by_address_or_localhost_are_served() {
        for host in [
            "127.0.0.1:8500",
            "127.0.0.1",
            "10.0.0.7:8500",
            "[::1]:8500",
            "[::1]",
            "localhost:8500",
            "LOCALHOST",
            "localhost.:8500",
        ] {
            assert_eq!(refusal(&with(&[("host", host)])), None, "{host}");
        }
        // HTTP/1.0 without Host, and a user typing the address in a browser.
        assert_eq!(refusal(&HeaderMap::new()), None);
        let typed = with(&[("host", "127.0.0.1:8500"), ("sec-fetch-site", "none")]);
        assert_eq!(refusal(&typed), None);
    }

    #[test]
    fn a_rebound_name_is_refused() {
        for host in [
            "attacker.example:8500",
            "attacker.example",
            "localhost.attacker.example",
            "127.0.0.1.nip.io:8500",
            "127.0.0.1:8500:1",
            "127.0.0.1:",
            "127.0.0.1:99999",
            "[::1",
            "[not-v6]:8500",
            "[::1]x",
            "",
        ] {
            let why = refusal(&with(&[("host", host)]));
            assert!(why.is_some_and(|w| w.starts_with("Host")), "{host}");
        }
    }

    #[test]
    fn a_page_of_another_site_is_refused() {
        for (name, value) in [
            ("origin", "https://attacker.example"),
            ("origin", "null"),
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-site", "same-site"),
            ("sec-fetch-site", "same-origin"),
        ] {
            let h = with(&[("host", "127.0.0.1:8500"), (name, value)]);
            assert!(
                refusal(&h).is_some_and(|w| w.contains("web page")),
                "{name}: {value}"
            );
        }
    }
}
