//! TLS on the server's ports. Every port speaks TLS 1.3 only (rustls with
//! the ring provider): the gRPC API and the HTTP port present the server
//! certificate to any client; the Raft port also requires a client certificate from the same
//! CA that names the server role, `server.<datacenter>.weft`, so a process
//! without a server certificate cannot complete a handshake there, let
//! alone vote, append or forward a write.
//!
//! The certificates come from the operator (`weft tls ca create`, `weft tls
//! cert create --server`), or, for `--dev`, are made at start
//! ([`dev_files`]).
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use weft_api::tls_certs::server_name;

use crate::conn_limit::{ClientLimits, Limited, Throttled};

/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[error("tls: {0}")]
    Config(String),
}

/// Where the server's TLS material is.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The server's TLS configurations, built once at start.
pub struct ServerTls {
    /// The gRPC API: server certificate; a client certificate of the mesh
    /// CA (an agent's node certificate) is accepted, not required.
    pub api: Arc<rustls::ServerConfig>,
    /// Raft: mutual TLS, the client must hold a server certificate.
    pub raft: Arc<rustls::ServerConfig>,
    /// The HTTP port: as the API, speaking HTTP/1.1.
    pub http: Arc<rustls::ServerConfig>,
    /// What this server presents and expects when it calls its peers.
    pub peer_client: tonic::transport::ClientTlsConfig,
    /// The federation port: mutual TLS, the client must hold a server
    /// certificate of some datacenter (`server.<dc>.weft`).
    pub federation: Arc<rustls::ServerConfig>,
    /// What this server presents when it calls another datacenter's
    /// servers; the name to check is added per call (`server.<dc>.weft`).
    pub federation_client: tonic::transport::ClientTlsConfig,
}

/// The datacenter a server certificate names (`server.<dc>.weft`, a DNS
/// SAN), if it names exactly one.
pub fn server_datacenter(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let mut dcs = cert
        .subject_alternative_name()
        .ok()??
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(name) => name
                .strip_prefix("server.")
                .and_then(|r| r.strip_suffix(".weft"))
                .filter(|dc| weft_api::names::validate_name(dc).is_ok())
                .map(str::to_string),
            _ => None,
        });
    let dc = dcs.next()?;
    dcs.next().is_none().then_some(dc)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            what: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

/// Accepts only client certificates that chain to the CA *and* name the
/// server role: of this datacenter (`Some`, the Raft port), or of exactly
/// one datacenter, any (`None`, the federation port).
#[derive(Debug)]
struct ServerRoleVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    role: Option<ServerName<'static>>,
}

impl ClientCertVerifier for ServerRoleVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let Some(role) = &self.role else {
            if server_datacenter(end_entity).is_none() {
                return Err(rustls::Error::General(
                    "client certificate names no server.<dc>.weft: only servers may connect".into(),
                ));
            }
            return Ok(ClientCertVerified::assertion());
        };
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("client certificate: {e}")))?;
        cert.verify_is_valid_for_subject_name(role).map_err(|_| {
            rustls::Error::General(format!(
                "client certificate does not name {:?}: only servers may connect",
                role.to_str()
            ))
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The mesh CA's current roots, for agents' node certificates.
pub type MeshRoots = Arc<dyn Fn() -> Vec<CertificateDer<'static>> + Send + Sync>;

/// Asks API clients for a certificate without requiring one; one that is
/// given must chain to the mesh CA's current roots (agents present their
/// node certificate; what it may do is `grpc::auth`'s business).
struct MeshClientVerifier {
    roots: MeshRoots,
    /// The verifier built for the roots last seen: rebuilt only when the
    /// roots change (a rotation), not per handshake.
    built: std::sync::Mutex<Option<BuiltVerifier>>,
}

/// Roots, and the verifier built from them.
type BuiltVerifier = (Vec<CertificateDer<'static>>, Arc<dyn ClientCertVerifier>);

impl MeshClientVerifier {
    fn new(roots: MeshRoots) -> Self {
        Self {
            roots,
            built: std::sync::Mutex::new(None),
        }
    }

    /// A verifier for the current roots.
    fn current(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let roots = (self.roots)();
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seen, verifier)) = built.as_ref() {
            if *seen == roots {
                return Ok(verifier.clone());
            }
        }
        let mut store = RootCertStore::empty();
        for root in &roots {
            let _ = store.add(root.clone());
        }
        if store.is_empty() {
            return Err(rustls::Error::General("no mesh CA yet".into()));
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        *built = Some((roots, verifier.clone()));
        Ok(verifier)
    }
}

impl std::fmt::Debug for MeshClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MeshClientVerifier")
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()?
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
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

    fn verify_tls13_signature(
        &self,
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

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerTls {
    /// Loads the files and builds every configuration; errors name the file.
    /// `mesh_roots` gives the mesh CA's roots at each API handshake.
    pub fn load(
        files: &TlsFiles,
        datacenter: &str,
        mesh_roots: MeshRoots,
    ) -> Result<Self, TlsError> {
        let ca_pem = read(&files.ca)?;
        let cert_pem = read(&files.cert)?;
        let key_pem = read(&files.key)?;
        let ca = certs(&files.ca, &ca_pem)?;
        let chain = certs(&files.cert, &cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
            path: files.key.clone(),
            what: format!("not a PEM private key: {e}"),
        })?;
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(|e| TlsError::Pem {
                path: files.ca.clone(),
                what: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let roots = Arc::new(roots);
        let role = ServerName::try_from(server_name(datacenter)).map_err(config)?;
        // The server's own certificate must name the role its peers check.
        let leaf = webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| TlsError::Pem {
            path: files.cert.clone(),
            what: format!("not a usable certificate: {e}"),
        })?;
        leaf.verify_is_valid_for_subject_name(&role)
            .map_err(|_| TlsError::Pem {
                path: files.cert.clone(),
                what: format!(
                    "does not name {:?}: make it with `weft tls cert create --server --dc {datacenter}`",
                    role.to_str()
                ),
            })?;

        let builder = || {
            rustls::ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(config)
        };
        let mut http = builder()?
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| TlsError::Pem {
                path: files.key.clone(),
                what: format!("does not go with {}: {e}", files.cert.display()),
            })?;
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut api = builder()?
            .with_client_cert_verifier(Arc::new(MeshClientVerifier::new(mesh_roots)))
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config)?;
        api.alpn_protocols = vec![b"h2".to_vec()];

        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(config)?;
        let verifier = Arc::new(ServerRoleVerifier {
            inner: inner.clone(),
            role: Some(role),
        });
        let mut raft = builder()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config)?;
        raft.alpn_protocols = vec![b"h2".to_vec()];
        let mut federation = builder()?
            .with_client_cert_verifier(Arc::new(ServerRoleVerifier { inner, role: None }))
            .with_single_cert(chain, key)
            .map_err(config)?;
        federation.alpn_protocols = vec![b"h2".to_vec()];
        let federation_client = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&ca_pem))
            .identity(tonic::transport::Identity::from_pem(&cert_pem, &key_pem));

        let peer_client = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&ca_pem))
            .identity(tonic::transport::Identity::from_pem(&cert_pem, &key_pem))
            .domain_name(server_name(datacenter));
        Ok(ServerTls {
            api: Arc::new(api),
            raft: Arc::new(raft),
            http: Arc::new(http),
            peer_client,
            federation: Arc::new(federation),
            federation_client,
        })
    }
}

/// TLS connections accepted on `listener`, at most `limits` at once per
/// client address, each counted in `accepted` once its handshake is done. Handshakes run on their own tasks (bounded by a
/// timeout), so a slow or silent client holds up no one; failed handshakes
/// are logged at debug and dropped. Accept errors (EMFILE and the like) back
/// off and warn at most once a second.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    limits: Arc<ClientLimits>,
    accepted: Counter,
) -> ReceiverStream<Result<Limited<TlsStream<TcpStream>>, io::Error>> {
    let acceptor = TlsAcceptor::from(config);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let accept_errors = Throttled::new();
        let over_limit = Throttled::new();
        loop {
            let (tcp, peer): (TcpStream, SocketAddr) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    if accept_errors.ready() {
                        tracing::warn!("accept: {e}; backing off");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(slot) = limits.admit(peer.ip()) else {
                if over_limit.ready() {
                    tracing::warn!(client = %peer.ip(), "connection refused: the client holds the most connections allowed (--max-conns-per-client)");
                }
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let conn_tx = tx.clone();
            let accepted = accepted.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        accepted.inc();
                        let _ = conn_tx.send(Ok(Limited::new(tls, slot))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, "tls handshake refused: {e}"),
                    Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Dev mode: a CA and a server certificate made at start in `dir` (the
/// dev server's private temporary directory), keys written 0600.
pub fn dev_files(dir: &Path, datacenter: &str) -> Result<TlsFiles, TlsError> {
    use weft_api::tls_certs::{create_ca, create_server_cert};
    let ca = create_ca("weft dev CA", 30).map_err(config)?;
    let server = create_server_cert(&ca, datacenter, &[], &[], 30).map_err(config)?;
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
    };
    write_file(&files.ca, ca.cert_pem.as_bytes(), 0o644)?;
    write_file(&files.cert, server.cert_pem.as_bytes(), 0o644)?;
    write_file(&files.key, server.key_pem.as_bytes(), 0o600)?;
    Ok(files)
}

/// Creates `path` with `mode` from the start (never briefly readable by others).
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(contents).map(|_| f))
        .map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    file.flush().map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}
