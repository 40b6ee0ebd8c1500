//! Hop-by-hop headers (RFC 9110 §7.6.1) of the requests and answers the
//! agent forwards: what `Connection` names, and `Connection`, `Keep-Alive`,
//! `Proxy-Connection`, `TE` (but `trailers`), `Upgrade` and
//! `HTTP2-Settings` themselves, belong to the connection a message came
//! on, not to the one the agent sends it on. They are removed from a
//! request before it is judged, so that the intentions and the instance
//! see the same headers, and from an answer before it goes back.
//!
//! The one upgrade carried is WebSocket's, as Consul's proxies carry it:
//! once the instance answers 101, the agent copies bytes both ways without
//! reading them. Any other `Upgrade` (`h2c` above all, which would turn an
//! allowed HTTP/1.1 request into an HTTP/2 connection whose requests no
//! intention judges) is removed, and the request goes on as the plain
//! HTTP/1.1 request it also is (a server may ignore an upgrade it is
//! offered).
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, TE, UPGRADE};

/// Headers about the connection whatever `Connection` says.
const ALWAYS: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "http2-settings",
];

/// Headers `Connection` may not remove: the request's own framing and
/// target, which hyper reads and writes itself.
const KEPT: [&str; 3] = ["host", "content-length", "transfer-encoding"];

/// Removes `headers`' hop-by-hop headers; true when the request asks for a
/// WebSocket upgrade, whose `Connection: upgrade` and `Upgrade: websocket`
/// are then all that is kept of them.
pub fn strip(headers: &mut HeaderMap) -> bool {
    let named = connection_tokens(headers);
    let websocket = named.iter().any(|t| t == "upgrade") && {
        let mut offered = headers.get_all(UPGRADE).iter();
        let first = offered.next();
        offered.next().is_none()
            && first.is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"))
    };
    remove_named(headers, &named);
    // TE is hop-by-hop too; `trailers` alone says the client takes
    // trailers, which gRPC requires on every hop.
    let trailers_only = (headers.get_all(TE).iter()).all(|v| v.as_bytes() == b"trailers");
    if !trailers_only {
        headers.remove(TE);
    }
    if websocket {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    }
    websocket
}

/// Removes the hop-by-hop headers of an instance's answer (but a 101's,
/// which the upgrade needs): they are about the agent's connection to the
/// instance, not the client's (an instance's `Connection: close` must not
/// close the client's kept connection).
pub fn strip_response(headers: &mut HeaderMap) {
    remove_named(headers, &connection_tokens(headers));
}

/// The header names `Connection` lists, lower-cased.
fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    (headers.get_all(CONNECTION).iter())
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|token| String::from_utf8_lossy(token).trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty())
        .collect()
}

/// Removes the headers `named` (but [`KEPT`] ones) and [`ALWAYS`].
fn remove_named(headers: &mut HeaderMap, named: &[String]) {
    for name in named.iter().map(String::as_str).chain(ALWAYS) {
        if KEPT.contains(&name) {
            continue;
        }
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<String> {
        let mut names: Vec<String> = h.keys().map(|n| n.to_string()).collect();
        names.sort();
        names
    }

    #[test]
    fn an_h2c_upgrade_becomes_a_plain_request() {
        let mut h = headers(&[
            ("host", "api"),
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
            ("x-user", "alice"),
        ]);
        assert!(!strip(&mut h));
        assert_eq!(names(&h), ["host", "x-user"]);
    }

    #[test]
    fn a_websocket_upgrade_is_kept_and_nothing_else_of_the_connection() {
        let mut h = headers(&[
            ("connection", "keep-alive, Upgrade, x-secret"),
            ("upgrade", " WebSocket "),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        assert!(strip(&mut h));
        assert_eq!(
            names(&h),
            ["connection", "sec-websocket-key", "upgrade"],
            "{h:?}"
        );
        assert_eq!(h[CONNECTION], "upgrade");
        assert_eq!(h[UPGRADE], "websocket");
    }

    #[test]
    fn only_websocket_alone_is_an_upgrade() {
        for (connection, upgrades) in [
            ("upgrade", &["websocket, h2c"][..]),
            ("upgrade", &["h2c", "websocket"][..]),
            ("upgrade", &["echo"][..]),
            ("keep-alive", &["websocket"][..]),
            ("", &["websocket"][..]),
        ] {
            let mut h = headers(&[("connection", connection)]);
            for u in upgrades {
                h.append(UPGRADE, u.parse().unwrap());
            }
            assert!(!strip(&mut h), "{connection:?} {upgrades:?}");
            assert!(names(&h).is_empty(), "{connection:?} {upgrades:?}: {h:?}");
        }
    }

    #[test]
    fn connection_cannot_remove_the_framing_or_the_host() {
        let mut h = headers(&[
            (
                "connection",
                "host, content-length, transfer-encoding, close",
            ),
            ("host", "api"),
            ("content-length", "3"),
        ]);
        assert!(!strip(&mut h));
        assert_eq!(names(&h), ["content-length", "host"]);
    }

    #[test]
    fn an_answers_connection_headers_stay_with_its_connection() {
        let mut h = headers(&[
            ("connection", "close, x-hop"),
            ("keep-alive", "timeout=5"),
            ("x-hop", "1"),
            ("content-length", "3"),
            ("x-kept", "1"),
        ]);
        strip_response(&mut h);
        assert_eq!(names(&h), ["content-length", "x-kept"]);
    }

    #[test]
    fn te_stays_only_as_trailers() {
        let mut h = headers(&[("te", "trailers")]);
        strip(&mut h);
        assert_eq!(h[TE], "trailers");
        let mut h = headers(&[("te", "trailers"), ("te", "gzip")]);
        strip(&mut h);
        assert!(h.get(TE).is_none());
        let mut h = headers(&[("connection", "te"), ("te", "trailers")]);
        strip(&mut h);
        assert!(h.get(TE).is_none(), "Connection named it");
    }
}
