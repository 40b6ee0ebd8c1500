//! Mutual TLS for HBONE: workload identities, the rotating trust bundle and the
//! rustls configurations built from them.
//!
//! Every agent-to-agent connection is TLS 1.3 with certificates on both sides.
//! Certificates name workloads with a SPIFFE URI SAN
//! (`spiffe://<trust-domain>/ns/<ns>/dc/<dc>/svc/<service>`), not with DNS
//! names, so the client side does not check a hostname: it verifies the chain
//! against the [`TrustBundle`] and that the peer's SPIFFE id belongs to the
//! bundle's trust domain. The server side requires a client certificate and
//! verifies it the same way.
//!
//! Roots rotate. Both verifiers read the bundle's current roots at handshake
//! time, so [`TrustBundle::replace_pem`] takes effect for the next handshake
//! without rebuilding configs and without touching established connections.
//!
//! Only the `ring` provider is used, always passed explicitly: the process
//! default provider is never installed or consulted.

use std::fmt;
use std::sync::{Arc, OnceLock, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

/// ALPN protocol id that HBONE connections negotiate.
pub const ALPN_H2: &[u8] = b"h2";

/// Errors of identities, bundles and TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid PEM in {what}: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("no certificate found in {0}")]
    NoCertificate(&'static str),
    #[error("trust bundle root rejected: {0}")]
    BadRoot(String),
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error("certificate has no spiffe:// URI SAN")]
    NoSpiffeId,
    #[error("certificate has {0} spiffe:// URI SANs, exactly one is required")]
    MultipleSpiffeIds(usize),
    #[error("invalid SPIFFE id {id:?}: {reason}")]
    InvalidSpiffeId { id: String, reason: &'static str },
    #[error("peer SPIFFE id {id:?} is not in trust domain {expected:?}")]
    WrongTrustDomain { id: String, expected: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// The crypto provider of every HBONE config: ring, never the process default.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = rustls::crypto::ring::default_provider();
            // Both ends are weft agents: prefer AES-128-GCM, the cheapest
            // suite per byte with AES-NI (AES-256-GCM and ChaCha20 stay allowed).
            provider
                .cipher_suites
                .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
            Arc::new(provider)
        })
        .clone()
}

/// A workload SPIFFE id in weft's form,
/// `spiffe://<trust-domain>/ns/<ns>/dc/<dc>/svc/<service>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub datacenter: String,
    pub service: String,
}

impl SpiffeId {
    /// Parses the full weft workload form; anything else is an error.
    pub fn parse(id: &str) -> Result<Self, TlsError> {
        let bad = |reason| TlsError::InvalidSpiffeId {
            id: id.to_string(),
            reason,
        };
        let trust_domain = trust_domain_of(id)?;
        let path = &id["spiffe://".len() + trust_domain.len()..];
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["", "ns", ns, "dc", dc, "svc", svc] => {
                if ns.is_empty() || dc.is_empty() || svc.is_empty() {
                    return Err(bad("empty path segment"));
                }
                Ok(SpiffeId {
                    trust_domain: trust_domain.to_string(),
                    namespace: ns.to_string(),
                    datacenter: dc.to_string(),
                    service: svc.to_string(),
                })
            }
            _ => Err(bad("path is not /ns/<ns>/dc/<dc>/svc/<service>")),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/dc/{}/svc/{}",
            self.trust_domain, self.namespace, self.datacenter, self.service
        )
    }
}

/// The trust domain of any `spiffe://` URI (the authority part).
pub fn trust_domain_of(id: &str) -> Result<&str, TlsError> {
    let bad = |reason| TlsError::InvalidSpiffeId {
        id: id.to_string(),
        reason,
    };
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or_else(|| bad("does not start with spiffe://"))?;
    let td = rest.split('/').next().unwrap_or_default();
    if td.is_empty() {
        return Err(bad("empty trust domain"));
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
    {
        return Err(bad("trust domain has characters other than [a-z0-9-._]"));
    }
    Ok(td)
}

/// The SPIFFE id of the leaf (first) certificate of a peer's chain: its one
/// `spiffe://` URI SAN. Zero or several such SANs are errors.
/// When a certificate stops being valid (its notAfter); None if it cannot
/// be parsed (then it could not have passed verification either).
pub fn not_after(cert: &CertificateDer<'_>) -> Option<std::time::SystemTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let secs = u64::try_from(parsed.validity().not_after.timestamp()).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// How long a mutual-TLS connection may be used for new tunnels: until the
/// first of the two leaf certificates it was authenticated with expires.
/// Streams already open are not cut.
pub fn session_deadline(
    local: Option<&CertificateDer<'_>>,
    peer: Option<&CertificateDer<'_>>,
) -> Option<std::time::SystemTime> {
    [local, peer]
        .into_iter()
        .flatten()
        .filter_map(not_after)
        .min()
}

pub fn peer_spiffe_id(certs: &[CertificateDer<'_>]) -> Result<String, TlsError> {
    let leaf = certs.first().ok_or(TlsError::NoPeerCertificate)?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?
        .ok_or(TlsError::NoSpiffeId)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .filter(|uri| uri.starts_with("spiffe://"))
        .collect();
    match uris.as_slice() {
        [] => Err(TlsError::NoSpiffeId),
        [one] => {
            trust_domain_of(one)?;
            Ok(one.to_string())
        }
        many => Err(TlsError::MultipleSpiffeIds(many.len())),
    }
}

/// Checks that the leaf certificate's SPIFFE id is in `trust_domain`.
fn check_trust_domain(leaf: &CertificateDer<'_>, trust_domain: &str) -> Result<String, TlsError> {
    let id = peer_spiffe_id(std::slice::from_ref(leaf))?;
    if trust_domain_of(&id)? != trust_domain {
        return Err(TlsError::WrongTrustDomain {
            id,
            expected: trust_domain.to_string(),
        });
    }
    Ok(id)
}

/// A leaf signed through another datacenter's intermediate must be of
/// that datacenter ([`weft_api::spiffe::check_issuer_scope`]).
fn check_scope(id: &str, intermediates: &[CertificateDer<'_>]) -> Result<(), rustls::Error> {
    let ders: Vec<&[u8]> = intermediates.iter().map(|c| c.as_ref()).collect();
    weft_api::spiffe::check_issuer_scope(id, &ders).map_err(rustls::Error::General)
}

fn to_rustls_error(e: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// A workload's certificate chain (leaf first), private key and SPIFFE id,
/// with the signing key rustls presents (loaded once).
#[derive(Debug)]
pub struct Identity {
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub spiffe_id: String,
    certified: Arc<CertifiedKey>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
            spiffe_id: self.spiffe_id.clone(),
            certified: self.certified.clone(),
        }
    }
}

/// Where the inbound server's certificate comes from: asked at every
/// handshake, so that a renewed certificate is presented from then on.
pub type CurrentIdentity = Arc<dyn Fn() -> Option<Arc<Identity>> + Send + Sync>;

/// Resolves the server certificate to the current identity's.
struct CurrentCert(CurrentIdentity);

impl fmt::Debug for CurrentCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CurrentCert")
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        (self.0)().map(|identity| identity.certified.clone())
    }
}

impl Identity {
    /// Loads a chain (leaf first, then intermediates) and a PKCS#8, SEC1 or
    /// PKCS#1 key from PEM; the SPIFFE id is read from the leaf.
    pub fn from_pem(cert_chain_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let cert_chain = certs_from_pem(cert_chain_pem, "certificate chain")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsError::Pem {
            what: "private key",
            reason: e.to_string(),
        })?;
        let spiffe_id = peer_spiffe_id(&cert_chain)?;
        let signing = provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| TlsError::Pem {
                what: "private key",
                reason: e.to_string(),
            })?;
        let certified = Arc::new(CertifiedKey::new(cert_chain.clone(), signing));
        Ok(Identity {
            cert_chain,
            key,
            spiffe_id,
            certified,
        })
    }
}

fn certs_from_pem(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what));
    }
    Ok(certs)
}

/// One generation of the bundle: the roots and the webpki client verifier
/// built from them.
struct BundleState {
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

impl BundleState {
    fn from_pem(pem: &str) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in certs_from_pem(pem, "trust bundle")? {
            roots
                .add(cert)
                .map_err(|e| TlsError::BadRoot(e.to_string()))?;
        }
        let roots = Arc::new(roots);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
        Ok(BundleState {
            roots,
            client_verifier,
        })
    }
}

/// The roots that peers' chains must lead to, for one trust domain. Cloning
/// shares the bundle: a [`replace_pem`](Self::replace_pem) is seen by every
/// config built from any clone, at its next handshake.
#[derive(Clone)]
pub struct TrustBundle {
    trust_domain: Arc<str>,
    state: Arc<RwLock<Arc<BundleState>>>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.current().roots.len())
            .finish()
    }
}

impl TrustBundle {
    /// A bundle of one or more PEM root certificates for `trust_domain`.
    pub fn from_pem(trust_domain: &str, roots_pem: &str) -> Result<Self, TlsError> {
        let probe = format!("spiffe://{trust_domain}");
        if trust_domain_of(&probe)? != trust_domain {
            return Err(TlsError::InvalidSpiffeId {
                id: probe,
                reason: "trust domain contains '/'",
            });
        }
        Ok(TrustBundle {
            trust_domain: Arc::from(trust_domain),
            state: Arc::new(RwLock::new(Arc::new(BundleState::from_pem(roots_pem)?))),
        })
    }

    /// Replaces the roots. New handshakes use them; open connections stay.
    /// On error the current roots are kept.
    pub fn replace_pem(&self, roots_pem: &str) -> Result<(), TlsError> {
        let next = Arc::new(BundleState::from_pem(roots_pem)?);
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    /// The trust domain every peer's SPIFFE id must belong to.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The current roots.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.current().roots.clone()
    }

    fn current(&self) -> Arc<BundleState> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Verifies client certificates against the bundle's current roots, then
/// checks the client's SPIFFE trust domain.
#[derive(Debug)]
struct BundleClientVerifier {
    bundle: TrustBundle,
}

impl ClientCertVerifier for BundleClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The hints would borrow from a bundle generation that may be replaced;
        // weft clients always present their one certificate anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let state = self.bundle.current();
        state
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        let id =
            check_trust_domain(end_entity, self.bundle.trust_domain()).map_err(to_rustls_error)?;
        check_scope(&id, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signature::tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signature::tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signature::schemes()
    }
}

/// Handshake signature checks with the ring provider, shared by both
/// verifiers.
mod signature {
    use rustls::pki_types::CertificateDer;
    use rustls::{client::danger::HandshakeSignatureValid, DigitallySignedStruct, SignatureScheme};

    use super::provider;

    pub(super) fn tls12(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    pub(super) fn tls13(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    pub(super) fn schemes() -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What a source's handshake error says when the destination presented
/// a valid certificate of another identity than the node meant.
pub const WRONG_NODE: &str = "not the node meant";

/// Verifies a server's chain against the bundle's current roots without a
/// hostname check, then checks the server's SPIFFE trust domain and, when
/// one is expected, that its SPIFFE id is exactly that one.
#[derive(Debug)]
struct SpiffeServerVerifier {
    bundle: TrustBundle,
    expected: Option<String>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        let roots = self.bundle.roots();
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &roots,
            intermediates,
            now,
            provider().signature_verification_algorithms.all,
        )?;
        let id =
            check_trust_domain(end_entity, self.bundle.trust_domain()).map_err(to_rustls_error)?;
        check_scope(&id, intermediates)?;
        if let Some(expected) = &self.expected {
            if id != *expected {
                return Err(rustls::Error::General(format!(
                    "the peer is {id}, {WRONG_NODE} ({expected})"
                )));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signature::tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signature::tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signature::schemes()
    }
}

/// The inbound (`:15008`) config: TLS 1.3 only, ALPN `h2`, presents the
/// certificate `current` gives at each handshake (the renewed one once
/// renewed), requires a client certificate chaining to `bundle`.
pub fn server_config(
    current: CurrentIdentity,
    bundle: &TrustBundle,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(BundleClientVerifier {
            bundle: bundle.clone(),
        }))
        .with_cert_resolver(Arc::new(CurrentCert(current)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The outbound config for one source identity towards one node: TLS 1.3
/// only, ALPN `h2`, presents `identity`, verifies the server chain against
/// `bundle` and that the server is `expected_node` (its SPIFFE id; no
/// hostname check).
pub fn client_config(
    identity: &Identity,
    bundle: &TrustBundle,
    expected_node: &str,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
            bundle: bundle.clone(),
            expected: Some(expected_node.to_string()),
        }))
        .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// A client config that presents no certificate (tests of the server's
/// refusal).
#[cfg(test)]
pub(crate) fn client_config_without_cert(
    bundle: &TrustBundle,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
            bundle: bundle.clone(),
            expected: None,
        }))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_weft_spiffe_ids() {
        let id = SpiffeId::parse("spiffe://test.weft/ns/default/dc/dc1/svc/web").unwrap();
        assert_eq!(id.trust_domain, "test.weft");
        assert_eq!(id.namespace, "default");
        assert_eq!(id.datacenter, "dc1");
        assert_eq!(id.service, "web");
        assert_eq!(
            id.to_string(),
            "spiffe://test.weft/ns/default/dc/dc1/svc/web"
        );
    }

    #[test]
    fn rejects_malformed_spiffe_ids() {
        for bad in [
            "http://test.weft/ns/default/dc/dc1/svc/web",
            "spiffe:///ns/default/dc/dc1/svc/web",
            "spiffe://Test.weft/ns/default/dc/dc1/svc/web",
            "spiffe://test.weft/ns/default/dc/dc1",
            "spiffe://test.weft/ns//dc/dc1/svc/web",
            "spiffe://test.weft/ns/default/dc/dc1/svc/web/extra",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn trust_domain_of_generic_ids() {
        assert_eq!(trust_domain_of("spiffe://a.b/x").unwrap(), "a.b");
        assert_eq!(trust_domain_of("spiffe://a.b").unwrap(), "a.b");
        assert!(trust_domain_of("spiffe://").is_err());
    }

    #[test]
    fn bundle_rejects_garbage() {
        assert!(matches!(
            TrustBundle::from_pem("test.weft", "not pem"),
            Err(TlsError::NoCertificate(_))
        ));
        assert!(TrustBundle::from_pem("a/b", "").is_err());
    }

    #[test]
    fn peer_id_needs_a_certificate() {
        assert!(matches!(
            peer_spiffe_id(&[]),
            Err(TlsError::NoPeerCertificate)
        ));
        assert!(matches!(
            peer_spiffe_id(&[CertificateDer::from(vec![1, 2, 3])]),
            Err(TlsError::BadCertificate(_))
        ));
    }
}
