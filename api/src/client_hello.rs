//! Reads the server name (SNI) out of the first bytes a TLS client sends,
//! without terminating TLS: what a mesh gateway routes on.
//!
//! The input is the start of a TCP stream: TLS records (RFC 8446 §5.1)
//! carrying one ClientHello handshake message (§4.1.2), which may be split
//! across several records. [`parse`] says whether it has seen the whole
//! message yet ([`Parsed::NeedMore`]), and once it has, the `server_name`
//! extension's host name (RFC 6066 §3), lowercased. Anything that is not a
//! well-formed ClientHello is an error naming what is wrong; the caller
//! closes the connection. Bytes are never changed: a gateway forwards what
//! it read, as it read it.

/// A ClientHello larger than this is refused (rustls' largest, with a
/// post-quantum key share, is about 1.8 KiB; TLS allows 16 MiB).
pub const MAX_HELLO: usize = 16 * 1024;
/// A ClientHello in more records than this is refused (clients send it in
/// one; a gateway re-reads the records as they come).
pub const MAX_RECORDS: usize = 16;

const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXTENSION_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("not a TLS handshake record (content type {0})")]
    NotHandshake(u8),
    #[error("TLS record version {0:#06x} is not TLS")]
    RecordVersion(u16),
    #[error("empty TLS record")]
    EmptyRecord,
    #[error("handshake message type {0} is not a ClientHello")]
    NotClientHello(u8),
    #[error("ClientHello of {0} bytes is larger than {MAX_HELLO}")]
    TooLarge(usize),
    #[error("ClientHello in more than {MAX_RECORDS} records")]
    TooManyRecords,
    #[error("ClientHello truncated in {0}")]
    Truncated(&'static str),
    #[error("ClientHello has {0} bytes after its extensions")]
    Trailing(usize),
    #[error("server_name extension: {0}")]
    ServerName(&'static str),
    #[error("extension {0} appears twice")]
    DuplicateExtension(u16),
}

/// What [`parse`] found in the bytes so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The ClientHello is not complete yet: read more and call again.
    NeedMore,
    /// A complete ClientHello, its server name (if it sent one), and how
    /// many bytes of the input its records took.
    Hello {
        server_name: Option<String>,
        consumed: usize,
    },
}

/// Parses the ClientHello at the start of `input` (see the module doc).
pub fn parse(input: &[u8]) -> Result<Parsed, HelloError> {
    // Reassemble the handshake bytes from as many records as it takes.
    let mut handshake = Vec::new();
    let mut at = 0;
    for _ in 0..MAX_RECORDS {
        let Some(header) = input.get(at..at + RECORD_HEADER) else {
            return Ok(Parsed::NeedMore);
        };
        if header[0] != CONTENT_HANDSHAKE {
            return Err(HelloError::NotHandshake(header[0]));
        }
        let version = u16::from_be_bytes([header[1], header[2]]);
        if version >> 8 != 3 {
            return Err(HelloError::RecordVersion(version));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 {
            return Err(HelloError::EmptyRecord);
        }
        if handshake.len() + len > MAX_HELLO + 4 {
            return Err(HelloError::TooLarge(handshake.len() + len));
        }
        let Some(fragment) = input.get(at + RECORD_HEADER..at + RECORD_HEADER + len) else {
            return Ok(Parsed::NeedMore);
        };
        handshake.extend_from_slice(fragment);
        at += RECORD_HEADER + len;
        if handshake[0] != HANDSHAKE_CLIENT_HELLO {
            return Err(HelloError::NotClientHello(handshake[0]));
        }
        if handshake.len() < 4 {
            continue;
        }
        let body_len = usize::from(handshake[1]) << 16
            | usize::from(handshake[2]) << 8
            | usize::from(handshake[3]);
        if body_len > MAX_HELLO {
            return Err(HelloError::TooLarge(body_len));
        }
        if handshake.len() < 4 + body_len {
            continue;
        }
        // Bytes past the ClientHello in its last record would be another
        // handshake message, which a client does not send before the
        // server's answer.
        if handshake.len() > 4 + body_len {
            return Err(HelloError::Trailing(handshake.len() - 4 - body_len));
        }
        let server_name = server_name(&handshake[4..])?;
        return Ok(Parsed::Hello {
            server_name,
            consumed: at,
        });
    }
    Err(HelloError::TooManyRecords)
}

/// A cursor over a ClientHello body that names the field it ran out in.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.rest.len() < n {
            return Err(HelloError::Truncated(what));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    /// A vector with a one- or two-byte length prefix.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u8(what)?;
        self.take(usize::from(n), what)
    }
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }
}

/// The host name of the `server_name` extension of a ClientHello body.
fn server_name(body: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader { rest: body };
    r.take(2, "legacy_version")?;
    r.take(32, "random")?;
    r.vec8("legacy_session_id")?;
    r.vec16("cipher_suites")?;
    r.vec8("legacy_compression_methods")?;
    if r.rest.is_empty() {
        // TLS 1.2 allows a ClientHello without extensions.
        return Ok(None);
    }
    let extensions = r.vec16("extensions")?;
    if !r.rest.is_empty() {
        return Err(HelloError::Trailing(r.rest.len()));
    }
    let mut r = Reader { rest: extensions };
    let mut seen = std::collections::HashSet::new();
    let mut found = None;
    while !r.rest.is_empty() {
        let kind = r.u16("extension type")?;
        let data = r.vec16("extension data")?;
        if !seen.insert(kind) {
            return Err(HelloError::DuplicateExtension(kind));
        }
        if kind == EXTENSION_SERVER_NAME {
            found = Some(host_name(data)?);
        }
    }
    Ok(found)
}

/// The one `host_name` entry of a `server_name` extension, checked to be a
/// DNS name (letters, digits, `-` and `.`) and lowercased.
fn host_name(data: &[u8]) -> Result<String, HelloError> {
    let mut r = Reader { rest: data };
    let list = r.vec16("server_name list")?;
    if !r.rest.is_empty() {
        return Err(HelloError::ServerName("bytes after the name list"));
    }
    let mut r = Reader { rest: list };
    if r.u8("server_name type")? != NAME_TYPE_HOST {
        return Err(HelloError::ServerName("not a host_name"));
    }
    let name = r.vec16("host_name")?;
    if !r.rest.is_empty() {
        return Err(HelloError::ServerName("more than one name"));
    }
    if name.is_empty() || name.len() > 253 {
        return Err(HelloError::ServerName("host_name empty or longer than 253"));
    }
    if !name
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'.')
    {
        return Err(HelloError::ServerName(
            "host_name has characters outside a-z, 0-9, '-' and '.'",
        ));
    }
    Ok(String::from_utf8_lossy(name).to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello body with the given extensions (type, data).
    fn body(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut b = vec![3, 3];
        b.extend([7u8; 32]);
        b.push(32);
        b.extend([1u8; 32]);
        b.extend([0, 2, 0x13, 0x01]);
        b.extend([1, 0]);
        let mut ext = Vec::new();
        for (kind, data) in extensions {
            ext.extend(kind.to_be_bytes());
            ext.extend((data.len() as u16).to_be_bytes());
            ext.extend(data);
        }
        b.extend((ext.len() as u16).to_be_bytes());
        b.extend(ext);
        b
    }

    fn sni(name: &[u8]) -> (u16, Vec<u8>) {
        let mut entry = vec![NAME_TYPE_HOST];
        entry.extend((name.len() as u16).to_be_bytes());
        entry.extend(name);
        let mut data = (entry.len() as u16).to_be_bytes().to_vec();
        data.extend(entry);
        (EXTENSION_SERVER_NAME, data)
    }

    fn handshake(body: &[u8]) -> Vec<u8> {
        let mut h = vec![HANDSHAKE_CLIENT_HELLO];
        h.extend(&(body.len() as u32).to_be_bytes()[1..]);
        h.extend(body);
        h
    }

    /// The handshake in records of at most `size` bytes each.
    fn records(handshake: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in handshake.chunks(size) {
            out.extend([CONTENT_HANDSHAKE, 3, 1]);
            out.extend((chunk.len() as u16).to_be_bytes());
            out.extend(chunk);
        }
        out
    }

    fn hello(name: &[u8]) -> Vec<u8> {
        records(
            &handshake(&body(&[(10, vec![0, 2, 0, 29]), sni(name)])),
            16384,
        )
    }

    #[test]
    fn finds_the_server_name_lowercased() {
        let bytes = hello(b"Node-B.dc1.node.example.weft");
        assert_eq!(
            parse(&bytes),
            Ok(Parsed::Hello {
                server_name: Some("node-b.dc1.node.example.weft".into()),
                consumed: bytes.len(),
            })
        );
    }

    #[test]
    fn every_prefix_needs_more_and_nothing_past_the_hello_is_taken() {
        let mut bytes = hello(b"server.dc2.weft");
        let whole = bytes.len();
        for n in 0..whole {
            assert_eq!(parse(&bytes[..n]), Ok(Parsed::NeedMore), "prefix {n}");
        }
        // Application data after the hello (a client does not send it, but
        // a gateway must not count it as the hello's).
        bytes.extend([23, 3, 3, 0, 1, 0]);
        assert!(matches!(parse(&bytes), Ok(Parsed::Hello { consumed, .. }) if consumed == whole));
    }

    #[test]
    fn a_hello_split_across_records_is_reassembled() {
        let h = handshake(&body(&[sni(b"a.b.node.td")]));
        for size in [40, 100, 300] {
            let bytes = records(&h, size);
            assert_eq!(
                parse(&bytes),
                Ok(Parsed::Hello {
                    server_name: Some("a.b.node.td".into()),
                    consumed: bytes.len()
                }),
                "records of {size}"
            );
        }
    }

    #[test]
    fn no_extension_or_no_sni_is_a_hello_without_a_name() {
        let mut b = body(&[]);
        b.truncate(b.len() - 2);
        let bytes = records(&handshake(&b), 16384);
        assert!(matches!(
            parse(&bytes),
            Ok(Parsed::Hello {
                server_name: None,
                ..
            })
        ));
        let bytes = records(&handshake(&body(&[(10, vec![0, 0])])), 16384);
        assert!(matches!(
            parse(&bytes),
            Ok(Parsed::Hello {
                server_name: None,
                ..
            })
        ));
    }

    #[test]
    fn what_is_not_a_client_hello_is_refused_by_name() {
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n"),
            Err(HelloError::NotHandshake(b'G'))
        );
        assert_eq!(
            parse(&[22, 9, 9, 0, 4, 1, 0, 0, 0]),
            Err(HelloError::RecordVersion(0x0909))
        );
        assert_eq!(parse(&[22, 3, 1, 0, 0]), Err(HelloError::EmptyRecord));
        assert_eq!(
            parse(&[22, 3, 1, 0, 4, 2, 0, 0, 0]),
            Err(HelloError::NotClientHello(2))
        );
        assert_eq!(
            parse(&records(&handshake(&[3, 3, 0]), 100)),
            Err(HelloError::Truncated("random"))
        );
    }

    #[test]
    fn oversized_hellos_are_refused_before_they_are_read() {
        // Claims 16 MiB: refused on the length alone.
        assert_eq!(
            parse(&[22, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff]),
            Err(HelloError::TooLarge(0xff_ffff))
        );
        // Many records that never complete a hello stop at the limit.
        let mut bytes = Vec::new();
        let mut h = vec![1, 0, 0x40, 0x10];
        h.extend(vec![0u8; MAX_HELLO + 100]);
        bytes.extend(records(&h, 1000));
        assert!(matches!(parse(&bytes), Err(HelloError::TooLarge(_))));
        // A hello in tiny records is refused past MAX_RECORDS.
        let tiny = records(&handshake(&body(&[sni(b"a.b.node.td")])), 1);
        assert_eq!(parse(&tiny), Err(HelloError::TooManyRecords));
    }

    #[test]
    fn bad_server_names_are_refused() {
        for (name, why) in [
            (&b"a b"[..], "characters"),
            (b"a\0b", "characters"),
            (b"", "empty"),
            (&[b'a'; 254][..], "longer"),
        ] {
            let bytes = records(&handshake(&body(&[sni(name)])), 16384);
            match parse(&bytes) {
                Err(HelloError::ServerName(m)) => assert!(m.contains(why), "{m}"),
                other => panic!("{name:?}: {other:?}"),
            }
        }
        let twice = records(&handshake(&body(&[sni(b"a"), sni(b"b")])), 16384);
        assert_eq!(parse(&twice), Err(HelloError::DuplicateExtension(0)));
    }

    #[test]
    fn trailing_bytes_in_the_handshake_are_refused() {
        let mut h = handshake(&body(&[sni(b"a")]));
        h.extend([0, 0, 0, 0]);
        assert!(matches!(
            parse(&records(&h, 16384)),
            Err(HelloError::Trailing(4))
        ));
    }
}
