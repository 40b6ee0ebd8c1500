//! `GET /v1/agent/connect/ca/leaf/:service`: a leaf certificate for a
//! service registered on this node, in Consul's JSON (`SerialNumber`,
//! `CertPEM`, `PrivateKeyPEM`, `Service`, `ServiceURI`, `ValidAfter`,
//! `ValidBefore`, `CreateIndex`, `ModifyIndex`).
//!
//! The key is made here, for this answer, and never logged or kept; the
//! servers' CA signs its CSR through the signing RPC the agent uses for its
//! own leaves, called with the caller's token: the servers decide that the
//! token has `service:write` on the service (Consul's rule) and that the
//! service is registered on this node. The agent's own token is never used
//! for a caller. Each call signs a new certificate: Consul's blocking query
//! (`?index=`, `?wait=`) and `?cached` are refused as not supported yet.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{header, request::Parts, Response, StatusCode};
use http_body_util::Full;
use rcgen::{CertificateParams, KeyPair};
use weft_api::proto;

use super::{route, route_error, text, token_of, LocalApiState};
use crate::control::{Control, ControlError};

/// A future [`LeafSigner::sign_as`] returns.
pub type SignFuture<'a> =
    Pin<Box<dyn Future<Output = Result<proto::SignedLeaf, ControlError>> + Send + 'a>>;

/// Who has the servers sign a CSR with a caller's token (the running
/// agent's [`Control`]; unit tests put a fake here).
pub trait LeafSigner: Send + Sync {
    fn sign_as<'a>(&'a self, token: &'a str, csr_pem: String, service: &'a str) -> SignFuture<'a>;
}

impl LeafSigner for Control {
    fn sign_as<'a>(&'a self, token: &'a str, csr_pem: String, service: &'a str) -> SignFuture<'a> {
        Box::pin(Control::sign_as(self, token, csr_pem, service))
    }
}

/// The index of the next leaf served (Consul's `CreateIndex`/`ModifyIndex`;
/// weft signs anew on every call, so every answer has a fresh one).
static NEXT_INDEX: AtomicU64 = AtomicU64::new(1);

/// Query parameters the endpoint takes; `index`, `wait`, `cached` are
/// named as not supported, anything else is refused.
const PARAMS: &[&str] = &["token", "dc"];

/// Why a signed leaf could not be described.
#[derive(Debug, thiserror::Error)]
pub enum LeafError {
    #[error("the signed certificate is not PEM X.509: {0}")]
    Parse(String),
}

/// `unix` seconds as RFC 3339 UTC (`2026-12-02T16:00:00Z`).
pub fn rfc3339(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Consul's JSON for `signed` with `key_pem`, at `index`.
pub fn leaf_json(
    signed: &proto::SignedLeaf,
    key_pem: &str,
    service: &str,
    index: u64,
) -> Result<serde_json::Value, LeafError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(signed.cert_pem.as_bytes())
        .map_err(|e| LeafError::Parse(e.to_string()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| LeafError::Parse(e.to_string()))?;
    let serial = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let validity = cert.validity();
    Ok(serde_json::json!({
        "SerialNumber": serial,
        "CertPEM": format!("{}{}", signed.cert_pem, signed.chain_pem),
        "PrivateKeyPEM": key_pem,
        "Service": service,
        "ServiceURI": signed.spiffe_id,
        "ValidAfter": rfc3339(validity.not_before.timestamp()),
        "ValidBefore": rfc3339(validity.not_after.timestamp()),
        "CreateIndex": index,
        "ModifyIndex": index,
    }))
}

/// The answer for a refused signing.
fn sign_error(service: &str, e: ControlError) -> Response<Full<Bytes>> {
    use tonic::Code;
    let (status, why) = match &e {
        ControlError::Unreachable(m) | ControlError::Credentials(m) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no server answered: {m}"),
        ),
        ControlError::Refused { status, .. } => match status.code() {
            Code::Unauthenticated => (StatusCode::FORBIDDEN, "ACL not found".to_string()),
            Code::PermissionDenied => (
                StatusCode::FORBIDDEN,
                format!("Permission denied: {}", status.message()),
            ),
            Code::InvalidArgument => (StatusCode::BAD_REQUEST, status.message().to_string()),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => (
                StatusCode::SERVICE_UNAVAILABLE,
                status.message().to_string(),
            ),
            _ => (StatusCode::BAD_GATEWAY, status.message().to_string()),
        },
    };
    tracing::info!(%service, status = status.as_u16(), "leaf certificate refused: {why}");
    text(status, why)
}

type Answer = Result<Response<Full<Bytes>>, Response<Full<Bytes>>>;

/// `GET /v1/agent/connect/ca/leaf/:service`.
pub(super) async fn leaf(state: &LocalApiState, parts: &Parts, service: &str) -> Answer {
    let Some(signer) = &state.signer else {
        return Err(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "leaf certificates are not served by this agent",
        ));
    };
    let query = parts.uri.query();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        match key {
            "index" | "wait" | "cached" => {
                return Err(text(
                    StatusCode::BAD_REQUEST,
                    format!("?{key}: blocking and cached queries on the leaf endpoint are not supported by weft yet (each call signs a new certificate)"),
                ))
            }
            k if PARAMS.contains(&k) => {}
            k => {
                return Err(text(
                    StatusCode::BAD_REQUEST,
                    format!("?{k}: unknown parameter"),
                ))
            }
        }
    }
    if let (Some(dc), Some(config)) = (
        route::query_param(query, "dc").map_err(route_error)?,
        state.current_config(),
    ) {
        if !dc.is_empty() && dc != config.datacenter {
            return Err(text(
                StatusCode::BAD_REQUEST,
                format!("?dc={dc}: another datacenter is not supported by weft yet"),
            ));
        }
    }
    let token = token_of(parts, "a leaf certificate")?;
    weft_api::names::validate_name(service)
        .map_err(|e| text(StatusCode::BAD_REQUEST, format!("service {service:?}: {e}")))?;
    let internal = |e: &dyn std::fmt::Display| {
        text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("making a key or CSR: {e}"),
        )
    };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| internal(&e))?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| internal(&e))?;
    let signed = signer
        .sign_as(&token, csr, service)
        .await
        .map_err(|e| sign_error(service, e))?;
    let index = NEXT_INDEX.fetch_add(1, Ordering::Relaxed);
    let body = leaf_json(&signed, &key.serialize_pem(), service, index)
        .map_err(|e| text(StatusCode::BAD_GATEWAY, e.to_string()))?;
    tracing::info!(%service, spiffe_id = %signed.spiffe_id, "leaf certificate issued to a caller");
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    headers.insert("x-consul-index", header::HeaderValue::from(index));
    // The answer holds a private key: no cache keeps it.
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_169_600 + 3_661), "2026-12-02T01:01:01Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn consuls_json_from_a_signed_leaf() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.serial_number = Some(rcgen::SerialNumber::from(vec![0x01, 0xab]));
        params.not_before = rcgen::date_time_ymd(2026, 1, 2);
        params.not_after = rcgen::date_time_ymd(2026, 1, 5);
        let cert = params.self_signed(&key).unwrap();
        let signed = proto::SignedLeaf {
            spiffe_id: "spiffe://x.weft/ns/default/dc/dc1/svc/web".into(),
            cert_pem: cert.pem(),
            ..Default::default()
        };
        let j = leaf_json(&signed, "KEY", "web", 7).unwrap();
        assert_eq!(j["SerialNumber"], "01:ab");
        assert_eq!(j["ServiceURI"], "spiffe://x.weft/ns/default/dc/dc1/svc/web");
        assert_eq!(j["ValidAfter"], "2026-01-02T00:00:00Z");
        assert_eq!(j["ValidBefore"], "2026-01-05T00:00:00Z");
        assert_eq!(
            (j["CreateIndex"].as_u64(), j["ModifyIndex"].as_u64()),
            (Some(7), Some(7))
        );
        assert_eq!(j["PrivateKeyPEM"], "KEY");
        let garbage = proto::SignedLeaf {
            cert_pem: "nope".into(),
            ..Default::default()
        };
        assert!(leaf_json(&garbage, "KEY", "web", 1).is_err());
    }
}
