//! SPIFFE ids of mesh services, `spiffe://<trust-domain>/ns/<ns>/dc/<dc>/svc/<service>`:
//! building, printing and strictly parsing them (the identity a leaf certificate
//! carries and the inbound proxy checks).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::names::{validate_name, NameError};

/// The namespace every id uses today.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Longest trust domain, in bytes (SPIFFE spec).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
const SCHEME: &str = "spiffe://";

/// The identity of a service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub datacenter: String,
    pub service: String,
}

/// What part of a SPIFFE id is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("SPIFFE id {id:?}: must start with \"spiffe://\"")]
    Scheme { id: String },
    #[error("SPIFFE id {id:?}: trust domain {reason}")]
    TrustDomain { id: String, reason: String },
    #[error(
        "SPIFFE id {id:?}: path must be /ns/<namespace>/dc/<datacenter>/svc/<service>, {reason}"
    )]
    Path { id: String, reason: String },
    #[error("SPIFFE id {id:?}: {part}: {source}")]
    Part {
        id: String,
        part: &'static str,
        #[source]
        source: NameError,
    },
}

impl SpiffeId {
    /// An id in the default namespace. Checks every part.
    pub fn new(
        trust_domain: impl Into<String>,
        datacenter: impl Into<String>,
        service: impl Into<String>,
    ) -> Result<Self, SpiffeError> {
        let id = SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: DEFAULT_NAMESPACE.to_string(),
            datacenter: datacenter.into(),
            service: service.into(),
        };
        id.to_string().parse()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/dc/{}/svc/{}",
            self.trust_domain, self.namespace, self.datacenter, self.service
        )
    }
}

/// The SPIFFE id of a node's agent, which its node certificate carries and
/// which the agents tunnelling to it check:
/// `spiffe://<trust-domain>/ns/default/dc/<dc>/node/<node>`.
pub fn node_id(trust_domain: &str, datacenter: &str, node: &str) -> String {
    format!("{SCHEME}{trust_domain}/ns/{DEFAULT_NAMESPACE}/dc/{datacenter}/node/{node}")
}

/// Checks a trust domain: 1 to 255 bytes of lowercase letters, digits, `.`, `-`, `_`.
pub fn validate_trust_domain(td: &str) -> Result<(), String> {
    if td.is_empty() {
        return Err("is empty".into());
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(format!(
            "is too long ({} > {MAX_TRUST_DOMAIN_LEN} bytes)",
            td.len()
        ));
    }
    if let Some((i, ch)) = td.chars().enumerate().find(|(_, c)| {
        !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
    }) {
        return Err(format!(
            "{td:?} has bad character {ch:?} at position {} (allowed: a-z, 0-9, '.', '-', '_')",
            i + 1
        ));
    }
    Ok(())
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(id: &str) -> Result<Self, SpiffeError> {
        let rest = id
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeError::Scheme { id: id.into() })?;
        let path_err = |reason: String| SpiffeError::Path {
            id: id.into(),
            reason,
        };
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        validate_trust_domain(td).map_err(|reason| SpiffeError::TrustDomain {
            id: id.into(),
            reason,
        })?;
        if let Some(c) = path.chars().find(|c| matches!(c, '?' | '#')) {
            return Err(path_err(format!("without {c:?}")));
        }
        if path.is_empty() {
            return Err(path_err("but it is missing".into()));
        }
        let segments: Vec<&str> = path[1..].split('/').collect();
        let expected = ["ns", "", "dc", "", "svc", ""];
        if segments.len() != expected.len() {
            return Err(path_err(format!(
                "but it has {} segments instead of 6",
                segments.len()
            )));
        }
        for (i, label) in [(0, "ns"), (2, "dc"), (4, "svc")] {
            if segments[i] != label {
                return Err(path_err(format!(
                    "but segment {} is {:?} instead of {label:?}",
                    i + 1,
                    segments[i]
                )));
            }
        }
        for (i, part) in [(1, "namespace"), (3, "datacenter"), (5, "service")] {
            validate_name(segments[i]).map_err(|source| SpiffeError::Part {
                id: id.into(),
                part,
                source,
            })?;
        }
        Ok(SpiffeId {
            trust_domain: td.into(),
            namespace: segments[1].into(),
            datacenter: segments[3].into(),
            service: segments[5].into(),
        })
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeError;
    fn try_from(id: String) -> Result<Self, SpiffeError> {
        id.parse()
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.to_string()
    }
}

/// The URI SAN of the intermediate CA that signs datacenter `dc`'s leaves
/// in a secondary datacenter: every id it signs starts with it and `/`.
pub fn intermediate_scope(trust_domain: &str, datacenter: &str) -> String {
    format!("{SCHEME}{trust_domain}/ns/{DEFAULT_NAMESPACE}/dc/{datacenter}")
}

/// Checks that a leaf's SPIFFE id `leaf_id` lies within the scope of every
/// intermediate CA presented with it (DER): an intermediate whose URI SAN
/// names a datacenter (`spiffe://<td>/ns/default/dc/<dc>`) vouches only for
/// that datacenter's ids. So a secondary datacenter's CA, whose key its
/// servers hold, cannot speak for another datacenter's nodes or services.
/// Roots and cross-signed roots (URI `spiffe://<td>`) vouch for any id.
pub fn check_issuer_scope(leaf_id: &str, intermediates: &[&[u8]]) -> Result<(), String> {
    for der in intermediates {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("an intermediate certificate cannot be read: {e}"))?;
        let Ok(Some(san)) = cert.subject_alternative_name() else {
            continue;
        };
        for name in &san.value.general_names {
            let x509_parser::extensions::GeneralName::URI(uri) = name else {
                continue;
            };
            // Only scoped URIs (with a path) limit what they sign.
            let Some(rest) = uri.strip_prefix(SCHEME) else {
                continue;
            };
            if !rest.contains('/') {
                continue;
            }
            if !leaf_id
                .strip_prefix(*uri)
                .is_some_and(|tail| tail.starts_with('/'))
            {
                return Err(format!(
                    "{leaf_id} is signed by an intermediate for {uri}, which vouches for nothing else"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "spiffe://weft.local/ns/default/dc/dc1/svc/api";

    #[test]
    fn round_trips() {
        let id: SpiffeId = GOOD.parse().unwrap();
        assert_eq!(
            id,
            SpiffeId {
                trust_domain: "weft.local".into(),
                namespace: "default".into(),
                datacenter: "dc1".into(),
                service: "api".into(),
            }
        );
        assert_eq!(id.to_string(), GOOD);
        assert_eq!(SpiffeId::new("weft.local", "dc1", "api").unwrap(), id);
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{GOOD}\""));
        assert_eq!(
            serde_json::from_str::<SpiffeId>(&format!("\"{GOOD}\"")).unwrap(),
            id
        );
        let td: SpiffeId = "spiffe://a1b2c3d4-e5f6.consul/ns/default/dc/dc1/svc/web"
            .parse()
            .unwrap();
        assert_eq!(td.trust_domain, "a1b2c3d4-e5f6.consul");
    }

    fn e(s: &str) -> String {
        s.parse::<SpiffeId>().unwrap_err().to_string()
    }

    #[test]
    fn errors_say_which_part() {
        assert!(matches!(
            "http://x/ns/default/dc/dc1/svc/api".parse::<SpiffeId>(),
            Err(SpiffeError::Scheme { .. })
        ));
        assert!(matches!(
            "SPIFFE://x/ns/default/dc/dc1/svc/api".parse::<SpiffeId>(),
            Err(SpiffeError::Scheme { .. })
        ));
        assert!(e("spiffe:///ns/default/dc/dc1/svc/api").ends_with("trust domain is empty"));
        assert!(e("spiffe://Weft/ns/default/dc/dc1/svc/api")
            .contains("bad character 'W' at position 1"));
        assert!(e("spiffe://weft:8443/ns/default/dc/dc1/svc/api").contains("bad character ':'"));
        assert!(e(&format!(
            "spiffe://{}/ns/default/dc/dc1/svc/api",
            "a".repeat(256)
        ))
        .contains("too long (256 > 255"));
        assert!(e("spiffe://weft").ends_with("but it is missing"));
        assert!(e("spiffe://weft/ns/default/dc/dc1/svc/api/")
            .ends_with("but it has 7 segments instead of 6"));
        assert!(
            e("spiffe://weft/ns/default/dc/dc1").ends_with("but it has 4 segments instead of 6")
        );
        assert!(e("spiffe://weft/ns/default/datacenter/dc1/svc/api")
            .ends_with("but segment 3 is \"datacenter\" instead of \"dc\""));
        assert!(e("spiffe://weft/ns/default/dc/dc1/service/api")
            .ends_with("segment 5 is \"service\" instead of \"svc\""));
        assert!(e("spiffe://weft/ns/default/dc/dc1/svc/api?x=1").ends_with("without '?'"));
        assert!(e("spiffe://weft/ns/default/dc/dc1/svc/api#f").ends_with("without '#'"));
        assert!(e("spiffe://weft/ns/default/dc/dc1/svc/API").ends_with("service: bad character 'A' at position 1 (allowed: lowercase letters a-z, digits 0-9 and '-')"));
        assert!(
            e("spiffe://weft/ns/default/dc//svc/api").ends_with("datacenter: must not be empty")
        );
        assert!(
            e("spiffe://weft/ns/Default/dc/dc1/svc/api").contains("namespace: bad character 'D'")
        );
        assert!(SpiffeId::new("weft", "dc1", "api-").is_err());
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://x\"").is_err());
    }
}
