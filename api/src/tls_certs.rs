//! Certificates for the servers' own TLS (gRPC and Raft), made by the operator
//! with `weft tls ca create` and `weft tls cert create`, like Consul's
//! `consul tls ca create` / `consul tls cert create -server`.
//!
//! This CA is separate from the mesh's SPIFFE CA (which the servers run
//! themselves): it is an operator's CA, ECDSA P-256, whose key stays with the
//! operator. A server certificate carries the DNS SAN `server.<dc>.weft` (see
//! [`server_name`]) and clients check that name whatever address they dialed
//! (Consul's `verify_server_hostname`), so a client certificate from the same
//! CA, which carries `client.<dc>.weft` and only the clientAuth usage, cannot
//! pose as a server.
//!
//! These functions do no file I/O, but they read the clock (validity starts
//! now, backdated a minute for clock skew) and generate fresh keys and random
//! serial numbers.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::names::{validate_name, NameError};

/// The most days a certificate may be valid (ten years).
pub const MAX_DAYS: u32 = 3650;
/// Validity starts this much in the past, for clock skew between machines.
const BACKDATE: Duration = Duration::minutes(1);
/// The longest common name X.509 allows (ub-common-name).
const MAX_COMMON_NAME_LEN: usize = 64;

/// What went wrong making a certificate. Each error names what it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsCertError {
    #[error("datacenter {name:?}: {source}")]
    Datacenter {
        name: String,
        #[source]
        source: NameError,
    },
    #[error("days: must be from 1 to {MAX_DAYS}, not {0}")]
    Days(u32),
    #[error("common name {0:?}: must be 1 to {MAX_COMMON_NAME_LEN} characters")]
    CommonName(String),
    #[error("DNS name {name:?}: {reason}")]
    DnsName { name: String, reason: String },
    #[error("CA certificate: {0}")]
    CaCert(String),
    #[error("CA key: {0}")]
    CaKey(String),
    #[error("CA key: does not match the CA certificate's public key")]
    KeyMismatch,
    #[error("making the certificate: {0}")]
    Crypto(String),
}

/// A certificate and its private key, both PEM. `Debug` does not show the key.
#[derive(Clone, PartialEq, Eq)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertPair")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// The DNS name in every server certificate of `datacenter`, which clients
/// verify: `server.<dc>.weft`.
pub fn server_name(datacenter: &str) -> String {
    format!("server.{datacenter}.weft")
}

/// The DNS name in client certificates of `datacenter`: `client.<dc>.weft`.
pub fn client_name(datacenter: &str) -> String {
    format!("client.{datacenter}.weft")
}

/// A new self-signed CA valid for `days`: ECDSA P-256, basicConstraints CA
/// with path length 0 (it signs only leaves), key usages keyCertSign, cRLSign
/// and digitalSignature, a random serial.
pub fn create_ca(common_name: &str, days: u32) -> Result<CertPair, TlsCertError> {
    let cn_len = common_name.chars().count();
    if common_name.trim().is_empty() || cn_len > MAX_COMMON_NAME_LEN {
        return Err(TlsCertError::CommonName(common_name.to_string()));
    }
    let mut params = base_params(common_name, days)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = new_key()?;
    let cert = params.self_signed(&key).map_err(crypto)?;
    Ok(CertPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A server certificate for `datacenter`, signed by `ca`, valid for `days`.
/// Common name `server.<dc>.weft`; SANs DNS `server.<dc>.weft`, DNS
/// `localhost`, IP 127.0.0.1 and ::1, then `extra_dns` and `extra_ips`
/// (duplicates left out); extended key usages serverAuth and clientAuth
/// (servers are clients of each other for Raft); not a CA.
pub fn create_server_cert(
    ca: &CertPair,
    datacenter: &str,
    extra_dns: &[String],
    extra_ips: &[IpAddr],
    days: u32,
) -> Result<CertPair, TlsCertError> {
    check_datacenter(datacenter)?;
    let name = server_name(datacenter);
    let mut dns = vec![name.clone(), "localhost".to_string()];
    for extra in extra_dns {
        check_dns_name(extra)?;
        if !dns.iter().any(|d| d.eq_ignore_ascii_case(extra)) {
            dns.push(extra.clone());
        }
    }
    let mut ips = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    for ip in extra_ips {
        if !ips.contains(ip) {
            ips.push(*ip);
        }
    }
    let eku = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf(ca, &name, &dns, &ips, eku, days)
}

/// A client certificate for `datacenter`, signed by `ca`, valid for `days`:
/// common name and only SAN DNS `client.<dc>.weft`, extended key usage
/// clientAuth only (it is not accepted as a server's).
pub fn create_client_cert(
    ca: &CertPair,
    datacenter: &str,
    days: u32,
) -> Result<CertPair, TlsCertError> {
    check_datacenter(datacenter)?;
    let name = client_name(datacenter);
    let dns = [name.clone()];
    leaf(
        ca,
        &name,
        &dns,
        &[],
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        days,
    )
}

fn crypto(e: impl std::fmt::Display) -> TlsCertError {
    TlsCertError::Crypto(e.to_string())
}

fn new_key() -> Result<KeyPair, TlsCertError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(crypto)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and 16 bytes long: no leading zero byte to drop
    SerialNumber::from_slice(&bytes)
}

fn check_datacenter(datacenter: &str) -> Result<(), TlsCertError> {
    validate_name(datacenter).map_err(|source| TlsCertError::Datacenter {
        name: datacenter.to_string(),
        source,
    })
}

/// A host name: dot-separated labels of ASCII letters, digits and `-` (not
/// at either end of a label), at most 253 characters; the first label may be
/// the wildcard `*`.
fn check_dns_name(name: &str) -> Result<(), TlsCertError> {
    let bad = |reason: &str| TlsCertError::DnsName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() {
        return Err(bad("must not be empty"));
    }
    if name.len() > 253 {
        return Err(bad("longer than 253 characters"));
    }
    for (i, label) in name.split('.').enumerate() {
        if i == 0 && label == "*" {
            continue;
        }
        if label.is_empty() {
            return Err(bad("empty label (two dots, or a dot at either end)"));
        }
        if label.len() > 63 {
            return Err(bad("a label is longer than 63 characters"));
        }
        if let Some(ch) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(bad(&format!(
                "bad character {ch:?} (allowed: letters, digits, '-', '.' and a leading '*.')"
            )));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a label starts or ends with '-'"));
        }
    }
    Ok(())
}

/// Parameters shared by the CA and leaves: common name, validity, serial.
fn base_params(common_name: &str, days: u32) -> Result<CertificateParams, TlsCertError> {
    if !(1..=MAX_DAYS).contains(&days) {
        return Err(TlsCertError::Days(days));
    }
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(i64::from(days));
    params.serial_number = Some(random_serial());
    Ok(params)
}

fn leaf(
    ca: &CertPair,
    common_name: &str,
    dns: &[String],
    ips: &[IpAddr],
    eku: Vec<ExtendedKeyUsagePurpose>,
    days: u32,
) -> Result<CertPair, TlsCertError> {
    let mut params = base_params(common_name, days)?;
    let issuer = ca_issuer(ca)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = eku;
    params.use_authority_key_identifier_extension = true;
    let mut sans = Vec::with_capacity(dns.len() + ips.len());
    for name in dns {
        let ia5 = name.clone().try_into().map_err(|e| TlsCertError::DnsName {
            name: name.clone(),
            reason: format!("{e}"),
        })?;
        sans.push(SanType::DnsName(ia5));
    }
    sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.subject_alt_names = sans;
    let key = new_key()?;
    let cert = params.signed_by(&key, &issuer).map_err(crypto)?;
    Ok(CertPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The CA as an issuer, after checking that its certificate is a CA that may
/// sign certificates and that its key is the certificate's.
fn ca_issuer(ca: &CertPair) -> Result<Issuer<'static, KeyPair>, TlsCertError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(ca.cert_pem.as_bytes())
        .map_err(|e| TlsCertError::CaCert(format!("not a PEM certificate ({e})")))?;
    if pem.label != "CERTIFICATE" {
        return Err(TlsCertError::CaCert(format!(
            "PEM block is {:?}, not \"CERTIFICATE\"",
            pem.label
        )));
    }
    let (_, cert) = X509Certificate::from_der(&pem.contents)
        .map_err(|e| TlsCertError::CaCert(format!("not a valid X.509 certificate ({e})")))?;
    if !cert.is_ca() {
        return Err(TlsCertError::CaCert(
            "not a CA certificate (no basicConstraints CA:TRUE)".to_string(),
        ));
    }
    if let Ok(Some(ku)) = cert.key_usage() {
        if !ku.value.key_cert_sign() {
            return Err(TlsCertError::CaCert(
                "its key usage does not allow signing certificates (keyCertSign)".to_string(),
            ));
        }
    }
    let key = KeyPair::from_pem(&ca.key_pem)
        .map_err(|e| TlsCertError::CaKey(format!("not a PEM private key ({e})")))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(TlsCertError::KeyMismatch);
    }
    Issuer::from_ca_cert_der(&pem.contents.as_slice().into(), key)
        .map_err(|e| TlsCertError::CaCert(e.to_string()))
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    use webpki::{anchor_from_trusted_cert, EndEntityCert, KeyUsage};
    use x509_parser::prelude::*;

    use super::*;

    fn der(pem_text: &str) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem_text.as_bytes()).unwrap();
        assert_eq!(pem.label, "CERTIFICATE");
        pem.contents
    }

    fn with_cert<T>(pem_text: &str, f: impl FnOnce(&X509Certificate<'_>) -> T) -> T {
        let der = der(pem_text);
        let (rest, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(rest.is_empty());
        f(&cert)
    }

    fn sans(cert: &X509Certificate<'_>) -> (Vec<String>, Vec<IpAddr>) {
        let mut dns = Vec::new();
        let mut ips = Vec::new();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(b) => ips.push(match b.len() {
                    4 => IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()),
                    16 => IpAddr::from(<[u8; 16]>::try_from(*b).unwrap()),
                    n => panic!("IP SAN of {n} bytes"),
                }),
                other => panic!("unexpected SAN {other:?}"),
            }
        }
        (dns, ips)
    }

    fn common_name(name: &X509Name<'_>) -> String {
        name.iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Verifies `leaf` against the single trust anchor `ca` for `usage` and,
    /// if given, the DNS name `name`.
    fn verifies(ca: &CertPair, leaf: &CertPair, usage: KeyUsage, name: Option<&str>) -> bool {
        let ca_der = CertificateDer::from(der(&ca.cert_pem));
        let anchors = [anchor_from_trusted_cert(&ca_der).unwrap()];
        let leaf_der = CertificateDer::from(der(&leaf.cert_pem));
        let ee = EndEntityCert::try_from(&leaf_der).unwrap();
        let path = ee.verify_for_usage(
            &[webpki::ring::ECDSA_P256_SHA256],
            &anchors,
            &[],
            UnixTime::now(),
            usage,
            None,
            None,
        );
        if path.is_err() {
            return false;
        }
        match name {
            Some(n) => {
                let server_name = ServerName::try_from(n).unwrap();
                ee.verify_is_valid_for_subject_name(&server_name).is_ok()
            }
            None => true,
        }
    }

    fn ca() -> CertPair {
        create_ca("weft CA", 1825).unwrap()
    }

    #[test]
    fn names() {
        assert_eq!(server_name("dc1"), "server.dc1.weft");
        assert_eq!(client_name("east-2"), "client.east-2.weft");
    }

    #[test]
    fn ca_is_a_self_signed_p256_ca_with_path_length_zero() {
        let ca = ca();
        assert!(ca.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        with_cert(&ca.cert_pem, |cert| {
            assert!(cert.is_ca());
            let bc = cert.basic_constraints().unwrap().unwrap();
            assert!(bc.critical);
            assert_eq!(bc.value.path_len_constraint, Some(0));
            let ku = cert.key_usage().unwrap().unwrap().value;
            assert!(ku.key_cert_sign() && ku.crl_sign() && ku.digital_signature());
            assert!(!ku.key_encipherment());
            assert_eq!(common_name(cert.subject()), "weft CA");
            assert_eq!(cert.issuer().as_raw(), cert.subject().as_raw());
            assert_eq!(
                cert.public_key().algorithm.algorithm,
                x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
            );
            let v = cert.validity();
            let secs = v.not_after.timestamp() - v.not_before.timestamp();
            assert_eq!(secs, 1825 * 86_400 + 60);
            let now = OffsetDateTime::now_utc().unix_timestamp();
            assert!((v.not_before.timestamp() - (now - 60)).abs() < 10);
        });
    }

    #[test]
    fn serials_are_random_and_positive() {
        let serial = |p: &CertPair| with_cert(&p.cert_pem, |c| c.raw_serial().to_vec());
        let (a, b) = (serial(&ca()), serial(&ca()));
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a[0] < 0x80);
    }

    #[test]
    fn server_cert_has_names_usages_and_issuer() {
        let ca = ca();
        let extra_dns = vec!["weft.example.com".to_string(), "localhost".to_string()];
        let extra_ips: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "::1".parse().unwrap()];
        let server = create_server_cert(&ca, "dc1", &extra_dns, &extra_ips, 365).unwrap();
        let ca_subject = with_cert(&ca.cert_pem, |c| c.subject().as_raw().to_vec());
        with_cert(&server.cert_pem, |cert| {
            let (dns, ips) = sans(cert);
            assert_eq!(dns, ["server.dc1.weft", "localhost", "weft.example.com"]);
            let want: Vec<IpAddr> = ["127.0.0.1", "::1", "10.0.0.5"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect();
            assert_eq!(ips, want);
            let eku = cert.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.server_auth && eku.client_auth);
            assert!(eku.other.is_empty() && !eku.any);
            assert!(!cert.is_ca());
            let ku = cert.key_usage().unwrap().unwrap().value;
            assert!(ku.digital_signature() && !ku.key_cert_sign());
            assert_eq!(common_name(cert.subject()), "server.dc1.weft");
            assert_eq!(cert.issuer().as_raw(), &ca_subject[..]);
            assert!(cert.extensions().iter().any(|e| matches!(
                e.parsed_extension(),
                ParsedExtension::AuthorityKeyIdentifier(_)
            )));
            let v = cert.validity();
            assert_eq!(
                v.not_after.timestamp() - v.not_before.timestamp(),
                365 * 86_400 + 60
            );
        });
    }

    #[test]
    fn server_cert_verifies_for_its_datacenter_only() {
        let ca = ca();
        let server = create_server_cert(&ca, "dc1", &[], &[], 365).unwrap();
        let server_auth = KeyUsage::server_auth;
        assert!(verifies(
            &ca,
            &server,
            server_auth(),
            Some("server.dc1.weft")
        ));
        assert!(verifies(&ca, &server, server_auth(), Some("localhost")));
        assert!(!verifies(
            &ca,
            &server,
            server_auth(),
            Some("server.dc2.weft")
        ));
        assert!(!verifies(
            &ca,
            &server,
            server_auth(),
            Some("client.dc1.weft")
        ));
        // Raft: servers present their certificate as clients too.
        assert!(verifies(&ca, &server, KeyUsage::client_auth(), None));
        // And never against another CA.
        assert!(!verifies(
            &create_ca("other", 30).unwrap(),
            &server,
            server_auth(),
            None
        ));
        // IP SANs.
        let leaf_der = CertificateDer::from(der(&server.cert_pem));
        let ee = EndEntityCert::try_from(&leaf_der).unwrap();
        for ip in ["127.0.0.1", "::1"] {
            let name = ServerName::try_from(ip).unwrap();
            assert!(ee.verify_is_valid_for_subject_name(&name).is_ok(), "{ip}");
        }
    }

    #[test]
    fn client_cert_is_a_client_only() {
        let ca = ca();
        let client = create_client_cert(&ca, "dc1", 365).unwrap();
        with_cert(&client.cert_pem, |cert| {
            let (dns, ips) = sans(cert);
            assert_eq!(dns, ["client.dc1.weft"]);
            assert!(ips.is_empty());
            let eku = cert.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.client_auth && !eku.server_auth);
            assert!(!cert.is_ca());
            assert_eq!(common_name(cert.subject()), "client.dc1.weft");
        });
        assert!(verifies(&ca, &client, KeyUsage::client_auth(), None));
        // Not as a server: neither for the server name nor for its own name,
        // because it lacks serverAuth.
        let server_auth = KeyUsage::server_auth;
        assert!(!verifies(
            &ca,
            &client,
            server_auth(),
            Some("server.dc1.weft")
        ));
        assert!(!verifies(&ca, &client, server_auth(), None));
    }

    #[test]
    fn leaves_do_not_sign() {
        // A server certificate and key are no CA.
        let ca = ca();
        let server = create_server_cert(&ca, "dc1", &[], &[], 365).unwrap();
        let err = create_client_cert(&server, "dc1", 30).unwrap_err();
        assert!(matches!(err, TlsCertError::CaCert(_)), "{err}");
    }

    #[test]
    fn bad_inputs_are_named() {
        let ca = ca();
        let err = create_server_cert(&ca, "DC1", &[], &[], 365).unwrap_err();
        assert!(matches!(err, TlsCertError::Datacenter { .. }));
        assert!(err
            .to_string()
            .starts_with("datacenter \"DC1\": bad character"));
        let err = create_client_cert(&ca, "", 365).unwrap_err();
        assert!(err.to_string().starts_with("datacenter \"\""), "{err}");
        for days in [0, MAX_DAYS + 1] {
            assert_eq!(create_ca("x", days).unwrap_err(), TlsCertError::Days(days));
            let err = create_server_cert(&ca, "dc1", &[], &[], days).unwrap_err();
            assert_eq!(err, TlsCertError::Days(days));
            assert!(err.to_string().starts_with("days:"));
        }
        assert!(create_ca("x", MAX_DAYS).is_ok());
        assert!(matches!(
            create_ca(" ", 1),
            Err(TlsCertError::CommonName(_))
        ));
        assert!(matches!(
            create_ca(&"x".repeat(65), 1),
            Err(TlsCertError::CommonName(_))
        ));
        for bad in ["", "a..b", "-a.b", "a b", "é.com", ".a", "a.*", "a."] {
            let err = create_server_cert(&ca, "dc1", &[bad.to_string()], &[], 1).unwrap_err();
            assert!(matches!(err, TlsCertError::DnsName { .. }), "{bad}: {err}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        let ok = ["*.weft.example", "Server-1.Example.COM", "a1"].map(String::from);
        assert!(create_server_cert(&ca, "dc1", &ok, &[], 1).is_ok());
    }

    #[test]
    fn ca_files_are_checked() {
        let ca = ca();
        let other = create_ca("other", 1).unwrap();
        let mismatched = CertPair {
            cert_pem: ca.cert_pem.clone(),
            key_pem: other.key_pem.clone(),
        };
        assert_eq!(
            create_server_cert(&mismatched, "dc1", &[], &[], 1).unwrap_err(),
            TlsCertError::KeyMismatch
        );
        let swapped = CertPair {
            cert_pem: ca.key_pem.clone(),
            key_pem: ca.cert_pem.clone(),
        };
        let err = create_client_cert(&swapped, "dc1", 1).unwrap_err();
        assert!(matches!(err, TlsCertError::CaCert(_)), "{err}");
        let garbage = CertPair {
            cert_pem: "hello".into(),
            key_pem: ca.key_pem.clone(),
        };
        let err = create_client_cert(&garbage, "dc1", 1).unwrap_err();
        assert!(matches!(err, TlsCertError::CaCert(_)), "{err}");
        let bad_key = CertPair {
            cert_pem: ca.cert_pem.clone(),
            key_pem: "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into(),
        };
        let err = create_client_cert(&bad_key, "dc1", 1).unwrap_err();
        assert!(matches!(err, TlsCertError::CaKey(_)), "{err}");
    }

    #[test]
    fn debug_hides_the_key() {
        let ca = ca();
        let text = format!("{ca:?}");
        assert!(text.contains("<redacted>"));
        assert!(!text.contains("PRIVATE KEY"));
        assert!(text.contains("BEGIN CERTIFICATE"));
    }
}
