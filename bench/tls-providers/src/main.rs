//! Bulk cost of rustls' two crypto providers, ring (what weft uses) and
//! aws-lc-rs, for TLS 1.3 AES-128-GCM and AES-256-GCM: one client and one
//! server connection in memory, 64 KiB writes sealed by one and opened by
//! the other, as an HBONE tunnel carries bulk data. Prints GB/s of
//! plaintext through seal + open on one core (no sockets, no HTTP/2).
//! Bounded: each measurement moves `TOTAL` bytes.
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Instant;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

const CHUNK: usize = 64 * 1024;
const TOTAL: usize = 4 << 30;
const ROUNDS: usize = 3;

fn pair(provider: &Arc<CryptoProvider>) -> (ClientConnection, ServerConnection) {
    let cert = rcgen::generate_simple_self_signed(vec!["bench.weft".into()]).unwrap();
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(der.clone()).unwrap();
    let client = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der], key)
        .unwrap();
    let mut c = ClientConnection::new(
        Arc::new(client),
        ServerName::try_from("bench.weft").unwrap(),
    )
    .unwrap();
    let mut s = ServerConnection::new(Arc::new(server)).unwrap();
    let mut wire = Vec::new();
    while c.is_handshaking() || s.is_handshaking() {
        wire.clear();
        c.write_tls(&mut wire).unwrap();
        s.read_tls(&mut &wire[..]).unwrap();
        s.process_new_packets().unwrap();
        wire.clear();
        s.write_tls(&mut wire).unwrap();
        c.read_tls(&mut &wire[..]).unwrap();
        c.process_new_packets().unwrap();
    }
    (c, s)
}

/// GB/s of plaintext sealed by the client and opened by the server.
fn measure(provider: &Arc<CryptoProvider>) -> f64 {
    let (mut c, mut s) = pair(provider);
    let data = vec![0x5a_u8; CHUNK];
    let mut out = vec![0_u8; CHUNK];
    let mut wire = Vec::with_capacity(2 * CHUNK);
    let start = Instant::now();
    let mut moved = 0;
    while moved < TOTAL {
        c.writer().write_all(&data).unwrap();
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let mut rest = &wire[..];
        let mut got = 0;
        while !rest.is_empty() {
            s.read_tls(&mut rest).unwrap();
            s.process_new_packets().unwrap();
            loop {
                match s.reader().read(&mut out) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
        }
        assert_eq!(got, CHUNK);
        moved += CHUNK;
    }
    moved as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn only(mut provider: CryptoProvider, suite: rustls::CipherSuite) -> Arc<CryptoProvider> {
    provider.cipher_suites.retain(|s| s.suite() == suite);
    Arc::new(provider)
}

fn main() {
    println!("| provider | suite | GB/s seal + open, one core (best of {ROUNDS}) |");
    println!("|---|---|---|");
    for suite in [
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
    ] {
        for (name, provider) in [
            ("ring", rustls::crypto::ring::default_provider()),
            ("aws-lc-rs", rustls::crypto::aws_lc_rs::default_provider()),
        ] {
            let provider = only(provider, suite);
            let best = (0..ROUNDS)
                .map(|_| measure(&provider))
                .fold(0.0_f64, f64::max);
            println!("| {name} | {suite:?} | {best:.2} |");
        }
    }
}
