//! The certificate authority, as pure functions over the CA's replicated
//! state: generating roots, cross-signing a new root with the old one,
//! signing workload CSRs and issuing operator leaves. Time comes in as an
//! argument, so every server computes the same thing and tests control it.
//!
//! Roots are ECDSA P-256, valid ten years, for trust domain
//! `<cluster-id>.weft`. Leaves carry one URI SAN, the SPIFFE id
//! `spiffe://<trust-domain>/ns/default/dc/<dc>/svc/<service>` (agents:
//! `.../node/<node>`), key usage digitalSignature + keyEncipherment, extended
//! key usage serverAuth + clientAuth, and a short validity (72 h by default).
//! After a rotation, new leaves are issued by the new root and come with the
//! new root cross-signed by the old one, so that peers that still trust only
//! the old root verify them too.

mod secret;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub use secret::SecretPem;

/// Default leaf lifetime.
pub const DEFAULT_LEAF_TTL_SECS: u64 = 72 * 3600;
const ROOT_VALIDITY_SECS: i64 = 10 * 365 * 24 * 3600;
/// Leaves start this much in the past, for clock skew between machines.
const BACKDATE_SECS: i64 = 60;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CaError {
    #[error("certificate authority: {0}")]
    Crypto(String),
    #[error("csr: not a valid, signed certificate request: {0}")]
    BadCsr(String),
    #[error("csr: its public key does not match the request: {0}")]
    KeyMismatch(String),
    #[error("csr: asks for {asked:?}, but the request is for {expected:?}")]
    NameMismatch { asked: String, expected: String },
    #[error("the certificate authority is not initialized yet")]
    NotInitialized,
    #[error("only the primary datacenter's CA holds its roots' keys")]
    NotPrimary,
}

fn crypto(e: impl std::fmt::Display) -> CaError {
    CaError::Crypto(e.to_string())
}

/// One root of the CA.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaRoot {
    /// Sequence number of the root within the cluster, from 1.
    pub serial: u64,
    pub cert_pem: String,
    pub key: SecretPem,
    pub not_after: i64,
    /// This root's certificate signed by the root it replaced (rotation).
    pub cross_signed_pem: Option<String>,
    /// Unix time after which no leaf of this root is valid: it leaves the
    /// bundle then. None while it is the active root.
    pub retire_after: Option<i64>,
}

/// The CA's replicated state: the trust domain and the roots, the last one
/// active.
///
/// In a secondary datacenter the roots are the primary's, without their
/// keys, and leaves are signed by `intermediate`, a CA the primary's active
/// root signed for this datacenter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaState {
    pub trust_domain: String,
    pub leaf_ttl_secs: u64,
    pub roots: Vec<CaRoot>,
    #[serde(default)]
    pub intermediate: Option<Intermediate>,
}

/// A secondary datacenter's signing CA.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Intermediate {
    pub cert_pem: String,
    pub key: SecretPem,
    pub not_after: i64,
    /// The serial of the primary's root that signed it.
    pub root_serial: u64,
    /// When it was signed (unix seconds): it is replaced at half of its
    /// lifetime from then.
    #[serde(default)]
    pub issued_at: i64,
}

/// How long an intermediate is valid (it is replaced at half of it, and
/// whenever the primary's active root changes).
pub const INTERMEDIATE_VALIDITY_SECS: i64 = 365 * 24 * 3600;

/// The URI SAN of datacenter `dc`'s intermediate: the prefix of every
/// SPIFFE id it may sign, which peers check (see the agents' verifiers).
pub fn intermediate_uri(trust_domain: &str, dc: &str) -> String {
    weft_api::spiffe::intermediate_scope(trust_domain, dc)
}

/// A new key and a CSR for an intermediate of `dc` (made by a secondary's
/// leader; the key never leaves its datacenter).
pub fn intermediate_request(trust_domain: &str, dc: &str) -> Result<(String, SecretPem), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(crypto)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        intermediate_uri(trust_domain, dc)
            .try_into()
            .map_err(crypto)?,
    )];
    let csr = params.serialize_request(&key).map_err(crypto)?;
    Ok((
        csr.pem().map_err(crypto)?,
        SecretPem::new(key.serialize_pem()),
    ))
}

/// A signed leaf: the certificate and the chain that goes with it.
#[derive(Clone, Debug, PartialEq)]
pub struct Leaf {
    pub cert_pem: String,
    /// Intermediates to send after the leaf (the cross-signed active root
    /// during a rotation), PEM, possibly empty.
    pub chain_pem: String,
    pub not_after: i64,
}

fn at(unix: i64) -> Result<OffsetDateTime, CaError> {
    OffsetDateTime::from_unix_timestamp(unix).map_err(crypto)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

fn root_params(trust_domain: &str, serial: u64, now: i64) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, format!("weft root {serial}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let uri = format!("spiffe://{trust_domain}");
    params.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(crypto)?)];
    params.not_before = at(now - BACKDATE_SECS)?;
    params.not_after = at(now + ROOT_VALIDITY_SECS)?;
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// A new self-signed root.
pub fn generate_root(trust_domain: &str, serial: u64, now: i64) -> Result<CaRoot, CaError> {
    Ok(new_root(trust_domain, serial, now)?.0)
}

/// A new self-signed root with the parameters and key it was made from.
fn new_root(
    trust_domain: &str,
    serial: u64,
    now: i64,
) -> Result<(CaRoot, CertificateParams, KeyPair), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(crypto)?;
    let params = root_params(trust_domain, serial, now)?;
    let cert = params.self_signed(&key).map_err(crypto)?;
    let root = CaRoot {
        serial,
        cert_pem: cert.pem(),
        key: SecretPem::new(key.serialize_pem()),
        not_after: now + ROOT_VALIDITY_SECS,
        cross_signed_pem: None,
        retire_after: None,
    };
    Ok((root, params, key))
}

impl CaState {
    /// A new CA with one root.
    pub fn init(trust_domain: &str, leaf_ttl_secs: u64, now: i64) -> Result<Self, CaError> {
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            leaf_ttl_secs,
            roots: vec![generate_root(trust_domain, 1, now)?],
            intermediate: None,
        })
    }

    /// The serial of the active root.
    pub fn active_serial(&self) -> u64 {
        self.roots.last().map_or(0, |r| r.serial)
    }

    /// Signs, with the active root, an intermediate CA for datacenter `dc`
    /// from its CSR: the CSR must verify and ask for exactly `dc`'s URI;
    /// the certificate's other fields are the CA's. Only a CA that holds
    /// its roots' keys (the primary's) can.
    pub fn sign_intermediate(
        &self,
        csr_pem: &str,
        dc: &str,
        now: i64,
    ) -> Result<(String, i64), CaError> {
        let root = self.active()?;
        if root.key.expose().is_empty() {
            return Err(CaError::NotPrimary);
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let uri = intermediate_uri(&self.trust_domain, dc);
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(u) => u.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if asked != [uri.clone()] {
            return Err(CaError::NameMismatch {
                asked: asked.join(", "),
                expected: uri,
            });
        }
        let not_after = (now + INTERMEDIATE_VALIDITY_SECS).min(root.not_after);
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, &self.trust_domain);
        dn.push(
            DnType::CommonName,
            format!("weft {dc} intermediate {}", root.serial),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(crypto)?)];
        params.not_before = at(now - BACKDATE_SECS)?;
        params.not_after = at(not_after)?;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::from_pem(root.key.expose()).map_err(crypto)?;
        let issuer = Issuer::from_ca_cert_pem(&root.cert_pem, key).map_err(crypto)?;
        let cert = params.signed_by(&csr.public_key, &issuer).map_err(crypto)?;
        Ok((cert.pem(), not_after))
    }

    /// The roots as a secondary keeps them: without their keys.
    pub fn public_roots(&self) -> Vec<CaRoot> {
        self.roots
            .iter()
            .map(|r| CaRoot {
                key: SecretPem::new(String::new()),
                ..r.clone()
            })
            .collect()
    }

    /// Whether a secondary holding this state needs a new intermediate:
    /// none yet, signed by a root that is no longer the active one, or past
    /// half of its life.
    pub fn needs_intermediate(&self, primary_active: u64, now: i64) -> bool {
        match &self.intermediate {
            None => true,
            Some(i) => {
                let half = i.issued_at + (i.not_after - i.issued_at) / 2;
                i.root_serial != primary_active || now >= half
            }
        }
    }

    fn active(&self) -> Result<&CaRoot, CaError> {
        self.roots.last().ok_or(CaError::NotInitialized)
    }

    /// The trust bundle: every root still in use, PEM, oldest first.
    pub fn bundle_pem(&self) -> String {
        self.roots.iter().map(|r| r.cert_pem.as_str()).collect()
    }

    /// A new root, cross-signed by the active one. Apply it with
    /// [`CaState::rotated`].
    pub fn next_root(&self, now: i64) -> Result<CaRoot, CaError> {
        let old = self.active()?;
        let (mut new, new_params, new_key) = new_root(&self.trust_domain, old.serial + 1, now)?;
        let old_key = KeyPair::from_pem(old.key.expose()).map_err(crypto)?;
        let old_issuer = Issuer::from_ca_cert_pem(&old.cert_pem, old_key).map_err(crypto)?;
        let cross = new_params
            .signed_by(&new_key, &old_issuer)
            .map_err(crypto)?;
        new.cross_signed_pem = Some(cross.pem());
        Ok(new)
    }

    /// This CA after `new` became the active root at `now`: the old roots
    /// stay in the bundle until their last leaf has expired.
    pub fn rotated(&self, new: CaRoot, now: i64) -> Self {
        let mut next = self.clone();
        let retire = now + self.leaf_ttl_secs as i64 + BACKDATE_SECS;
        for root in &mut next.roots {
            root.retire_after.get_or_insert(retire);
        }
        next.roots.push(new);
        next
    }

    /// Whether `prune(now)` would remove a root.
    pub fn has_expired_roots(&self, now: i64) -> bool {
        self.roots
            .iter()
            .any(|r| r.retire_after.is_some_and(|t| t <= now))
    }

    /// Removes roots whose last leaf has expired (never the active one).
    pub fn prune(&mut self, now: i64) {
        let active = self.roots.len().saturating_sub(1);
        let mut i = 0;
        self.roots.retain(|r| {
            let keep = i == active || r.retire_after.is_none_or(|t| t > now);
            i += 1;
            keep
        });
    }

    /// The SPIFFE id of a service in datacenter `dc`.
    pub fn service_id(&self, dc: &str, service: &str) -> String {
        format!(
            "spiffe://{}/ns/default/dc/{dc}/svc/{service}",
            self.trust_domain
        )
    }

    /// The SPIFFE id of a node's agent.
    pub fn node_id(&self, dc: &str, node: &str) -> String {
        format!(
            "spiffe://{}/ns/default/dc/{dc}/node/{node}",
            self.trust_domain
        )
    }

    fn leaf_params(
        &self,
        spiffe_id: &str,
        common_name: &str,
        now: i64,
    ) -> Result<CertificateParams, CaError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = vec![SanType::URI(
            spiffe_id.to_string().try_into().map_err(crypto)?,
        )];
        params.not_before = at(now - BACKDATE_SECS)?;
        params.not_after = at(now + self.leaf_ttl_secs as i64)?;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    fn sign(
        &self,
        params: &CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
        now: i64,
    ) -> Result<Leaf, CaError> {
        if let Some(i) = &self.intermediate {
            let key = KeyPair::from_pem(i.key.expose()).map_err(crypto)?;
            let issuer = Issuer::from_ca_cert_pem(&i.cert_pem, key).map_err(crypto)?;
            let cert = params.signed_by(public_key, &issuer).map_err(crypto)?;
            return Ok(Leaf {
                cert_pem: cert.pem(),
                chain_pem: i.cert_pem.clone(),
                not_after: (now + self.leaf_ttl_secs as i64).min(i.not_after),
            });
        }
        let root = self.active()?;
        if root.key.expose().is_empty() {
            return Err(CaError::NotInitialized);
        }
        let key = KeyPair::from_pem(root.key.expose()).map_err(crypto)?;
        let issuer = Issuer::from_ca_cert_pem(&root.cert_pem, key).map_err(crypto)?;
        let cert = params.signed_by(public_key, &issuer).map_err(crypto)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            chain_pem: root.cross_signed_pem.clone().unwrap_or_default(),
            not_after: now + self.leaf_ttl_secs as i64,
        })
    }

    /// Signs a CSR for `spiffe_id`. The CSR's signature must verify (a
    /// tampered request fails), and it may name at most one SAN, which must
    /// be exactly `spiffe_id`. The certificate's fields come from the CA, not
    /// from the request.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        spiffe_id: &str,
        common_name: &str,
        now: i64,
    ) -> Result<Leaf, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        // One identity per certificate: a CSR naming more than one SAN is
        // refused outright (Consul's CVE-2022-40716 was a second URI SAN).
        if csr.params.subject_alt_names.len() > 1 {
            return Err(CaError::BadCsr(format!(
                "asks for {} subject alternative names; a leaf carries exactly one, {spiffe_id:?}",
                csr.params.subject_alt_names.len()
            )));
        }
        for san in &csr.params.subject_alt_names {
            let asked = match san {
                SanType::URI(uri) => uri.as_str().to_string(),
                other => format!("{other:?}"),
            };
            if asked != spiffe_id {
                return Err(CaError::NameMismatch {
                    asked,
                    expected: spiffe_id.to_string(),
                });
            }
        }
        let params = self.leaf_params(spiffe_id, common_name, now)?;
        self.sign(&params, &csr.public_key, now)
    }

    /// Issues a leaf and its new private key (operator use): (leaf, key PEM).
    pub fn issue_leaf(
        &self,
        spiffe_id: &str,
        common_name: &str,
        now: i64,
    ) -> Result<(Leaf, SecretPem), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(crypto)?;
        let params = self.leaf_params(spiffe_id, common_name, now)?;
        let leaf = self.sign(&params, &key, now)?;
        Ok((leaf, SecretPem::new(key.serialize_pem())))
    }
}

#[cfg(test)]
mod tests;
