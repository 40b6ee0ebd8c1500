//! The agent's certificates: one for the node (presented on the inbound
//! port) and one per local service (presented when that service calls out).
//! Keys are made here and never leave the agent; the servers' CA signs CSRs.
//! Each certificate is renewed at about half its lifetime, with jitter so
//! that agents do not all renew at once. A renewal that fails (no server
//! answers) keeps the certificate in use and is retried with backoff (up to
//! [`RETRY_CAP`]), logged when the failures start and when they end.
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair};

use crate::backoff::{Backoff, Streak};
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
    #[error("fixed certificates: no CA to sign one for {0:?}")]
    Fixed(String),
}

/// The longest wait between attempts to renew a certificate.
pub const RETRY_CAP: Duration = Duration::from_secs(10);

/// A certificate and when to renew it.
struct Held {
    identity: Arc<Identity>,
    renew_at: tokio::time::Instant,
}

/// Failed renewals of one certificate, until one succeeds.
struct Retry {
    backoff: Backoff,
    streak: Streak,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            backoff: Backoff::new(Duration::from_secs(1), RETRY_CAP),
            streak: Streak::default(),
        }
    }
}

/// The node's and the local services' certificates.
pub struct Identities {
    /// Where certificates are signed; none for fixed ones.
    control: Option<Arc<Control>>,
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
            control: Some(control),
            node: RwLock::new(None),
            services: RwLock::new(BTreeMap::new()),
        }
    }

    /// Certificates made elsewhere (two agents in one test process, with a
    /// test CA): never renewed, and no others to be had.
    pub fn fixed(node: Identity, services: impl IntoIterator<Item = (String, Identity)>) -> Self {
        // Due in a year: a test process ends long before.
        let never = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let held = |identity: Identity| Held {
            identity: Arc::new(identity),
            renew_at: never,
        };
        Self {
            control: None,
            node: RwLock::new(Some(held(node))),
            services: RwLock::new(services.into_iter().map(|(n, i)| (n, held(i))).collect()),
        }
    }

    async fn obtain(&self, service: Option<&str>) -> Result<Held, IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IdentityError::Csr(e.to_string()))?;
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(|e| IdentityError::Csr(e.to_string()))?;
        let control = (self.control.as_ref())
            .ok_or_else(|| IdentityError::Fixed(service.unwrap_or("the node").to_string()))?;
        let leaf = control.sign(csr, service).await?;
        let chain = format!("{}{}", leaf.cert_pem, leaf.chain_pem);
        let key_pem = key.serialize_pem();
        let identity = Identity::from_pem(&chain, &key_pem)?;
        if service.is_none() {
            // The node certificate also authenticates the agent to the servers.
            control.present_node_certificate(&chain, &key_pem);
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
        self.add_services(services).await
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
        // By service name; `None`: the node's.
        let mut retries: BTreeMap<Option<String>, Retry> = BTreeMap::new();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = tokio::time::Instant::now();
            let mut due: Vec<Option<String>> = self
                .services
                .read()
                .expect("identity lock")
                .iter()
                .filter(|(_, h)| h.renew_at <= now)
                .map(|(n, _)| Some(n.clone()))
                .collect();
            let node_due = self
                .node
                .read()
                .expect("identity lock")
                .as_ref()
                .is_some_and(|h| h.renew_at <= now);
            if node_due {
                due.push(None);
            }
            for which in due {
                let result = self.renew(which.as_deref()).await;
                let retry = retries.entry(which.clone()).or_default();
                let what = which.as_deref().unwrap_or("the node");
                match result {
                    Ok(()) => {
                        if let Some((lasted, failures)) = retry.streak.succeeded() {
                            tracing::info!(
                                "certificate of {what} renewed after {failures} failed attempts over {:.1}s",
                                lasted.as_secs_f64()
                            );
                        }
                        retries.remove(&which);
                    }
                    Err(e) => {
                        // The certificate in use stays until a renewal succeeds.
                        let wait = retry.backoff.next_wait();
                        if retry.streak.failed() {
                            tracing::warn!("renewing the certificate of {what} failed, keeping the current one and retrying with backoff: {e}");
                        } else {
                            tracing::debug!(
                                attempt = retry.streak.failures(),
                                "renewing the certificate of {what}: {e}"
                            );
                        }
                        self.postpone(which.as_deref(), now + wait);
                    }
                }
            }
        }
    }

    /// Gets a new certificate for `service` (None: the node) and uses it.
    async fn renew(&self, service: Option<&str>) -> Result<(), IdentityError> {
        let held = self.obtain(service).await?;
        match service {
            Some(name) => {
                self.services
                    .write()
                    .expect("identity lock")
                    .insert(name.to_string(), held);
            }
            None => *self.node.write().expect("identity lock") = Some(held),
        }
        Ok(())
    }

    /// Next attempt to renew `service`'s certificate (None: the node's) at `at`.
    fn postpone(&self, service: Option<&str>, at: tokio::time::Instant) {
        match service {
            Some(name) => {
                if let Some(h) = self.services.write().expect("identity lock").get_mut(name) {
                    h.renew_at = at;
                }
            }
            None => {
                if let Some(h) = self.node.write().expect("identity lock").as_mut() {
                    h.renew_at = at;
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
