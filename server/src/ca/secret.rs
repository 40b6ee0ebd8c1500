//! A private key in PEM that never shows itself in logs or debug output.
use serde::{Deserialize, Serialize};

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretPem(String);

impl SecretPem {
    pub fn new(pem: String) -> Self {
        Self(pem)
    }

    /// The PEM text, for signing or for handing to its owner.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretPem(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn debug_output_hides_the_key() {
        let s = super::SecretPem::new("-----BEGIN PRIVATE KEY-----\nabc\n".into());
        assert_eq!(format!("{s:?}"), "SecretPem(<redacted>)");
    }
}
