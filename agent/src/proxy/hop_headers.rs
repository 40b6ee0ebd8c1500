//! Hop-by-hop headers (RFC 9110 §7.6.1) of the requests and answers the
//! agent forwards: what `Connection` names, and `Connection`, `Keep-Alive`,
//! `Proxy-Connection`, `TE` (but `trailers`), `Upgrade` and
//! `HTTP2-Settings` themselves, belong to the connection a message came
//! on, not to the one the agent sends it on. They are removed from a
//! request before it is judged, so that the intentions and the instance
//! see the same headers, and from an answer before it goes back.
//!
//! The one upgrade carried is WebSocket's, as Consul's proxies carry it:
//! once the instance completes the handshake, the agent copies bytes both
//! ways without reading them. A request offers it only with a
//! `Sec-WebSocket-Key` (16 bytes in base64) and `Sec-WebSocket-Version: 13`,
//! and the instance completes it only with a 101 that says `Upgrade:
//! websocket`, `Connection: upgrade` and the `Sec-WebSocket-Accept` of the
//! key (RFC 6455 4.2.2, [`completes_websocket`]). The key the instance gets
//! is a fresh one of the agent's ([`strip`] returns both), and the client
//! gets the accept value of its own: a bare 101 is no handshake, and an
//! instance that answers one for a path that echoes a status (or a handler
//! that writes 101 and keeps speaking HTTP, or a mock that answers with
//! the headers a request names, the client's accept value among them)
//! would otherwise turn an allowed request into a raw connection whose
//! next requests no intention judges.
//! Any other `Upgrade` (`h2c` above all, which would turn an
//! allowed HTTP/1.1 request into an HTTP/2 connection whose requests no
//! intention judges) is removed, and the request goes on as the plain
//! HTTP/1.1 request it also is (a server may ignore an upgrade it is
//! offered).
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
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

/// The GUID RFC 6455 appends to a key to make its accept value.
const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The keys of a WebSocket upgrade the agent carries.
#[derive(Debug, Clone)]
pub struct WebSocketKeys {
    /// The client's `Sec-WebSocket-Key`: its answer carries the accept
    /// value of this one.
    pub client: HeaderValue,
    /// The agent's own, sent on in its place: the instance's 101 must
    /// carry the accept value of this one.
    pub upstream: HeaderValue,
}

/// Removes `headers`' hop-by-hop headers; the keys when the request offers
/// a WebSocket upgrade (see the module doc), whose `Connection: upgrade`
/// and `Upgrade: websocket` are then all that is kept of them, and whose
/// key is replaced with the agent's.
pub fn strip(headers: &mut HeaderMap) -> Option<WebSocketKeys> {
    let named = connection_tokens(headers);
    let websocket = named.iter().any(|t| t == "upgrade") && says_websocket(headers);
    remove_named(headers, &named);
    // After the removal: a key `Connection` named is no key.
    let key = websocket.then(|| websocket_key(headers)).flatten();
    // TE is hop-by-hop too; `trailers` alone says the client takes
    // trailers, which gRPC requires on every hop.
    let trailers_only = (headers.get_all(TE).iter()).all(|v| v.as_bytes() == b"trailers");
    if !trailers_only {
        headers.remove(TE);
    }
    let client = key?;
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    let upstream = HeaderValue::from_str(&STANDARD.encode(rand::random::<[u8; 16]>()))
        .expect("base64 is a header value");
    headers.insert("sec-websocket-key", upstream.clone());
    Some(WebSocketKeys { client, upstream })
}

/// RFC 6455's `Sec-WebSocket-Accept` for `key`: the base64 SHA-1 of the key
/// and the protocol's GUID.
pub fn websocket_accept(key: &HeaderValue) -> HeaderValue {
    let mut hash = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    hash.update(key.as_bytes().trim_ascii());
    hash.update(WEBSOCKET_GUID);
    HeaderValue::from_str(&STANDARD.encode(hash.finish())).expect("base64 is a header value")
}

/// The request's one `Sec-WebSocket-Key`, when it is 16 bytes in base64
/// and the request's one `Sec-WebSocket-Version` is 13.
fn websocket_key(headers: &HeaderMap) -> Option<HeaderValue> {
    let version = only_value(headers, "sec-websocket-version")?;
    let key = only_value(headers, "sec-websocket-key")?;
    let decoded = STANDARD.decode(key.as_bytes().trim_ascii()).ok()?;
    (version.as_bytes().trim_ascii() == b"13" && decoded.len() == 16).then(|| key.clone())
}

/// Whether an instance's 101 `answer` completes the WebSocket handshake of
/// the request that sent `key`: `Upgrade: websocket`, `Connection` naming
/// `upgrade`, and `Sec-WebSocket-Accept` the base64 SHA-1 of the key and
/// RFC 6455's GUID.
pub fn completes_websocket(key: &HeaderValue, answer: &HeaderMap) -> bool {
    let connection = connection_tokens(answer).iter().any(|t| t == "upgrade");
    let expected = websocket_accept(key);
    let accepted = only_value(answer, "sec-websocket-accept")
        .is_some_and(|v| v.as_bytes().trim_ascii() == expected.as_bytes());
    says_websocket(answer) && connection && accepted
}

/// Whether `headers` has one `Upgrade`, and it is `websocket`.
fn says_websocket(headers: &HeaderMap) -> bool {
    only_value(headers, UPGRADE.as_str())
        .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"))
}

/// The value of header `name` when it is given once (None: absent, or
/// given more than once).
fn only_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    values.next().is_none().then_some(first).flatten()
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
        assert!(strip(&mut h).is_none());
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
            ("sec-websocket-version", "13"),
        ]);
        let keys = strip(&mut h).unwrap();
        assert_eq!(keys.client, "dGhlIHNhbXBsZSBub25jZQ==");
        // The instance gets a key of the agent's, 16 random bytes.
        assert_ne!(keys.upstream, keys.client);
        assert_eq!(h["sec-websocket-key"], keys.upstream);
        assert_eq!(STANDARD.decode(keys.upstream.as_bytes()).unwrap().len(), 16);
        let again = headers(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ]);
        assert_ne!(strip(&mut again.clone()).unwrap().upstream, keys.upstream);
        assert_eq!(
            names(&h),
            [
                "connection",
                "sec-websocket-key",
                "sec-websocket-version",
                "upgrade"
            ],
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
            assert!(strip(&mut h).is_none(), "{connection:?} {upgrades:?}");
            assert!(names(&h).is_empty(), "{connection:?} {upgrades:?}: {h:?}");
        }
    }

    #[test]
    fn a_websocket_upgrade_needs_a_key_and_version_13() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        for extra in [
            &[("sec-websocket-version", "13")][..],
            &[("sec-websocket-key", key)][..],
            &[("sec-websocket-key", key), ("sec-websocket-version", "8")][..],
            &[
                ("sec-websocket-key", "c2hvcnQ="),
                ("sec-websocket-version", "13"),
            ][..],
            &[
                ("sec-websocket-key", "not base64!"),
                ("sec-websocket-version", "13"),
            ][..],
            &[
                ("sec-websocket-key", key),
                ("sec-websocket-key", key),
                ("sec-websocket-version", "13"),
            ][..],
        ] {
            let mut h = headers(&[("connection", "upgrade"), ("upgrade", "websocket")]);
            for (name, value) in extra {
                h.append(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    value.parse().unwrap(),
                );
            }
            assert!(strip(&mut h).is_none(), "{extra:?}");
            assert!(h.get(UPGRADE).is_none(), "{extra:?}: not offered on");
        }
    }

    #[test]
    fn only_a_completed_handshake_is_a_websocket() {
        // RFC 6455 1.3's example.
        let key = HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ==");
        let accept = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
        let done = headers(&[
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-accept", accept),
        ]);
        assert!(completes_websocket(&key, &done));
        assert_eq!(websocket_accept(&key), accept);
        // A key `Connection` names is removed: no key, no upgrade.
        let mut named = headers(&[
            ("connection", "upgrade, sec-websocket-key"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ]);
        assert!(strip(&mut named).is_none());
        for answer in [
            // A bare 101, as a status echo answers.
            &[][..],
            &[("upgrade", "websocket"), ("connection", "upgrade")][..],
            &[("connection", "upgrade"), ("sec-websocket-accept", accept)][..],
            &[("upgrade", "websocket"), ("sec-websocket-accept", accept)][..],
            &[
                ("upgrade", "h2c"),
                ("connection", "upgrade"),
                ("sec-websocket-accept", accept),
            ][..],
            &[
                ("upgrade", "websocket"),
                ("connection", "upgrade"),
                ("sec-websocket-accept", "AAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            ][..],
        ] {
            assert!(!completes_websocket(&key, &headers(answer)), "{answer:?}");
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
        assert!(strip(&mut h).is_none());
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
