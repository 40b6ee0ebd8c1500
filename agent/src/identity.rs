//! The agent's certificates: one for the node (presented on the inbound
//! port) and one per local service (presented when that service calls out).
//! Keys are made here and never leave the agent; the servers' CA signs CSRs.
//! Each certificate is renewed at about half its lifetime, with jitter so
//! that agents do not all renew at once.
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair};

use crate::control::{Control, ControlError};
use crate::hbone::{Identity, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("making a key or CSR: {0}")]
    Csr(String),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("the signed certificate is unusable: {0}")]
    Tls(#[from] TlsError),
    #[error("no certificate for service {0:?}")]
    Unknown(String),
}

/// A certificate and when to renew it.
struct Held {
    identity: Arc<Identity>,
    renew_at: tokio::time::Instant,
}

/// The node's and the local services' certificates.
pub struct Identities {
    control: Arc<Control>,
    node: RwLock<Option<Held>>,
    services: RwLock<BTreeMap<String, Held>>,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// When to renew a certificate valid for `lifetime_secs` more seconds:
/// half-way, plus or minus 10 %, `jitter` in [0, 1).
pub fn renewal_delay(lifetime_secs: i64, jitter: f64) -> Duration {
    let half = lifetime_secs.max(2) as f64 / 2.0;
    let spread = half * 0.2 * (jitter - 0.5);
    Duration::from_secs_f64((half + spread).max(1.0))
}

impl Identities {
    pub fn new(control: Arc<Control>) -> Self {
        Self {
            control,
            node: RwLock::new(None),
            services: RwLock::new(BTreeMap::new()),
        }
    }

    async fn obtain(&self, service: Option<&str>) -> Result<Held, IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IdentityError::Csr(e.to_string()))?;
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(|e| IdentityError::Csr(e.to_string()))?;
        let leaf = self.control.sign(csr, service).await?;
        let chain = format!("{}{}", leaf.cert_pem, leaf.chain_pem);
        let key_pem = key.serialize_pem();
        let identity = Identity::from_pem(&chain, &key_pem)?;
        if service.is_none() {
            // The node certificate also authenticates the agent to the servers.
            self.control.present_node_certificate(&chain, &key_pem);
        }
        let delay = renewal_delay(leaf.not_after - unix_now(), rand::random::<f64>());
        tracing::info!(spiffe_id = %leaf.spiffe_id, renew_in_secs = delay.as_secs(), "certificate issued");
        Ok(Held {
            identity: Arc::new(identity),
            renew_at: tokio::time::Instant::now() + delay,
        })
    }

    /// Gets the node's certificate and one for each of `services`.
    pub async fn init(&self, services: &[String]) -> Result<(), IdentityError> {
        let node = self.obtain(None).await?;
        *self.node.write().expect("identity lock") = Some(node);
        for name in services {
            let held = self.obtain(Some(name)).await?;
            self.services
                .write()
                .expect("identity lock")
                .insert(name.clone(), held);
        }
        Ok(())
    }

    /// Gets a certificate for each of `services` not held yet (a reload
    /// added them).
    pub async fn add_services(&self, services: &[String]) -> Result<(), IdentityError> {
        for name in services {
            if self.service(name).is_ok() {
                continue;
            }
            let held = self.obtain(Some(name)).await?;
            self.services
                .write()
                .expect("identity lock")
                .insert(name.clone(), held);
        }
        Ok(())
    }

    /// Drops the certificates of services not in `services` (a reload
    /// removed them): no new connection presents them.
    pub fn retain_services(&self, services: &[String]) {
        self.services
            .write()
            .expect("identity lock")
            .retain(|name, _| services.contains(name));
    }

    pub fn node(&self) -> Option<Arc<Identity>> {
        self.node
            .read()
            .expect("identity lock")
            .as_ref()
            .map(|h| h.identity.clone())
    }

    pub fn service(&self, name: &str) -> Result<Arc<Identity>, IdentityError> {
        self.services
            .read()
            .expect("identity lock")
            .get(name)
            .map(|h| h.identity.clone())
            .ok_or_else(|| IdentityError::Unknown(name.to_string()))
    }

    /// Renews certificates that are due; runs until dropped.
    pub async fn renew_forever(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = tokio::time::Instant::now();
            let due: Vec<String> = self
                .services
                .read()
                .expect("identity lock")
                .iter()
                .filter(|(_, h)| h.renew_at <= now)
                .map(|(n, _)| n.clone())
                .collect();
            for name in due {
                match self.obtain(Some(&name)).await {
                    Ok(held) => {
                        self.services
                            .write()
                            .expect("identity lock")
                            .insert(name, held);
                    }
                    Err(e) => tracing::warn!(service = %name, "renewal failed, retrying soon: {e}"),
                }
            }
            let node_due = self
                .node
                .read()
                .expect("identity lock")
                .as_ref()
                .is_some_and(|h| h.renew_at <= now);
            if node_due {
                match self.obtain(None).await {
                    Ok(held) => *self.node.write().expect("identity lock") = Some(held),
                    Err(e) => tracing::warn!("node certificate renewal failed, retrying soon: {e}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_about_half_way_with_jitter() {
        let lifetime = 72 * 3600;
        let low = renewal_delay(lifetime, 0.0).as_secs();
        let high = renewal_delay(lifetime, 0.999).as_secs();
        assert!(
            low >= (lifetime as f64 * 0.44) as u64 && low < (lifetime / 2) as u64,
            "{low}"
        );
        assert!(
            high > (lifetime / 2) as u64 && high <= (lifetime as f64 * 0.56) as u64,
            "{high}"
        );
    }

    #[test]
    fn an_expired_certificate_is_renewed_soon() {
        assert_eq!(renewal_delay(-100, 0.5), Duration::from_secs(1));
    }
}
