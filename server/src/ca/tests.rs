use std::process::Command;

use rcgen::{CertificateParams, KeyPair, SanType};
use x509_parser::prelude::*;

use super::*;

const NOW: i64 = 1_790_000_000;
const TD: &str = "c0ffee.weft";

fn ca() -> CaState {
    CaState::init(TD, DEFAULT_LEAF_TTL_SECS, NOW).unwrap()
}

fn csr(spiffe: Option<&str>) -> String {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    if let Some(id) = spiffe {
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
    }
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn der_of(pem_text: &str) -> Vec<u8> {
    ::pem::parse(pem_text).unwrap().contents().to_vec()
}

/// Runs `openssl verify` on `leaf` with `bundle` as trust anchors and
/// `untrusted` as intermediates; true when it says OK.
fn openssl_verifies(bundle: &str, untrusted: &str, leaf: &str, at: i64) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let (b, l) = (write("bundle.pem", bundle), write("leaf.pem", leaf));
    let mut cmd = Command::new("openssl");
    cmd.arg("verify")
        .arg("-attime")
        .arg(at.to_string())
        .arg("-CAfile")
        .arg(&b);
    if !untrusted.is_empty() {
        cmd.arg("-untrusted").arg(write("chain.pem", untrusted));
    }
    let out = cmd
        .arg(&l)
        .output()
        .expect("openssl is installed by `cargo xtask setup`");
    out.status.success()
}

#[test]
fn leaf_has_the_spiffe_id_usages_and_validity() {
    let ca = ca();
    let id = ca.service_id("dc1", "web");
    assert_eq!(id, "spiffe://c0ffee.weft/ns/default/dc/dc1/svc/web");
    let leaf = ca.sign_csr(&csr(Some(&id)), &id, "web", NOW).unwrap();
    let der = der_of(&leaf.cert_pem);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();

    let san = cert.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec![id.as_str()]);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment());
    assert!(!ku.key_cert_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!cert.is_ca());
    let validity = cert.validity();
    assert_eq!(validity.not_after.timestamp(), NOW + 72 * 3600);
    assert!(validity.not_before.timestamp() <= NOW);
    assert_eq!(leaf.not_after, NOW + 72 * 3600);
    assert!(
        leaf.chain_pem.is_empty(),
        "no rotation yet, no intermediate"
    );
}

#[test]
fn system_openssl_verifies_the_leaf_against_the_bundle() {
    let ca = ca();
    let id = ca.service_id("dc1", "api");
    let leaf = ca.sign_csr(&csr(None), &id, "api", NOW).unwrap();
    assert!(openssl_verifies(&ca.bundle_pem(), "", &leaf.cert_pem, NOW));
    let other = CaState::init("other.weft", DEFAULT_LEAF_TTL_SECS, NOW).unwrap();
    assert!(!openssl_verifies(
        &other.bundle_pem(),
        "",
        &leaf.cert_pem,
        NOW
    ));
    assert!(
        !openssl_verifies(&ca.bundle_pem(), "", &leaf.cert_pem, NOW + 73 * 3600),
        "an expired leaf must not verify"
    );
}

#[test]
fn across_a_rotation_old_and_new_leaves_both_verify() {
    let ca = ca();
    let id = ca.service_id("dc1", "web");
    let old_leaf = ca.sign_csr(&csr(None), &id, "web", NOW).unwrap();

    let later = NOW + 3600;
    let rotated = ca.rotated(ca.next_root(later).unwrap(), later);
    assert_eq!(rotated.roots.len(), 2);
    let new_leaf = rotated.sign_csr(&csr(None), &id, "web", later).unwrap();
    assert!(
        !new_leaf.chain_pem.is_empty(),
        "new leaves carry the cross-signed root"
    );

    let bundle = rotated.bundle_pem();
    assert!(openssl_verifies(&bundle, "", &old_leaf.cert_pem, later));
    assert!(openssl_verifies(&bundle, "", &new_leaf.cert_pem, later));
    // A peer that still trusts only the old root accepts the new leaf through
    // the cross-signed intermediate.
    assert!(openssl_verifies(
        &ca.bundle_pem(),
        &new_leaf.chain_pem,
        &new_leaf.cert_pem,
        later
    ));
    // Without the intermediate it cannot.
    assert!(!openssl_verifies(
        &ca.bundle_pem(),
        "",
        &new_leaf.cert_pem,
        later
    ));

    // The old root leaves the bundle once its last leaf has expired.
    let mut pruned = rotated.clone();
    pruned.prune(later + 1);
    assert_eq!(pruned.roots.len(), 2, "old leaves are still valid");
    let after = later + DEFAULT_LEAF_TTL_SECS as i64 + 120;
    assert!(rotated.has_expired_roots(after));
    pruned.prune(after);
    assert_eq!(pruned.roots.len(), 1);
    assert_eq!(pruned.roots[0].serial, 2);
}

#[test]
fn a_tampered_csr_is_refused() {
    let ca = ca();
    let id = ca.service_id("dc1", "web");
    let good = csr(Some(&id));
    let mut der = der_of(&good);
    // Flip a bit inside the signed part (the SAN near the end of the info).
    let at = der.len() / 2;
    der[at] ^= 0x01;
    let tampered = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", der));
    assert!(matches!(
        ca.sign_csr(&tampered, &id, "web", NOW),
        Err(CaError::BadCsr(_))
    ));
    assert!(matches!(
        ca.sign_csr("not a csr", &id, "web", NOW),
        Err(CaError::BadCsr(_))
    ));
}

#[test]
fn a_csr_for_another_name_is_refused() {
    let ca = ca();
    let asked = ca.service_id("dc1", "db");
    let expected = ca.service_id("dc1", "web");
    let err = ca
        .sign_csr(&csr(Some(&asked)), &expected, "web", NOW)
        .unwrap_err();
    assert_eq!(err, CaError::NameMismatch { asked, expected });
}

#[test]
fn operator_leaf_comes_with_its_key_and_no_key_is_in_debug_output() {
    let ca = ca();
    let id = ca.service_id("dc1", "web");
    let (leaf, key) = ca.issue_leaf(&id, "web", NOW).unwrap();
    assert!(key.expose().contains("PRIVATE KEY"));
    assert!(openssl_verifies(&ca.bundle_pem(), "", &leaf.cert_pem, NOW));
    let debug = format!("{ca:?}");
    assert!(!debug.contains("PRIVATE KEY"), "{debug}");
}

/// Consul's CVE-2022-40716: a CSR with the requested SPIFFE id plus a second
/// SAN (here the same id twice, and the id with a DNS name) is refused.
#[test]
fn a_csr_with_more_than_one_san_is_refused() {
    let ca = ca();
    let id = ca.service_id("dc1", "web");
    let other = ca.service_id("dc1", "api");
    for extra in [
        SanType::URI(id.clone().try_into().unwrap()),
        SanType::URI(other.try_into().unwrap()),
        SanType::DnsName("api.service.weft".try_into().unwrap()),
    ] {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.clone().try_into().unwrap()), extra];
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        let err = ca.sign_csr(&pem, &id, "web", NOW).unwrap_err();
        assert!(
            matches!(&err, CaError::BadCsr(m) if m.contains("2 subject alternative names")),
            "{err}"
        );
    }
}

#[test]
fn a_secondary_signs_with_an_intermediate_the_primary_signed() {
    let primary = ca();
    let (csr_pem, key) = intermediate_request(TD, "dc2").unwrap();
    let (cert_pem, not_after) = primary.sign_intermediate(&csr_pem, "dc2", NOW).unwrap();
    assert_eq!(not_after, NOW + INTERMEDIATE_VALIDITY_SECS);
    let secondary = CaState {
        trust_domain: TD.into(),
        leaf_ttl_secs: DEFAULT_LEAF_TTL_SECS,
        roots: primary.public_roots(),
        intermediate: Some(Intermediate {
            cert_pem,
            key,
            not_after,
            root_serial: primary.active_serial(),
            issued_at: NOW,
        }),
    };
    assert!(secondary.roots.iter().all(|r| r.key.expose().is_empty()));
    let id = secondary.service_id("dc2", "api");
    let leaf = secondary
        .sign_csr(&csr(Some(&id)), &id, "api", NOW)
        .unwrap();
    // The leaf verifies against the primary's roots with the intermediate
    // sent along, and not without it.
    assert!(openssl_verifies(
        &primary.bundle_pem(),
        &leaf.chain_pem,
        &leaf.cert_pem,
        NOW
    ));
    assert!(!openssl_verifies(
        &primary.bundle_pem(),
        "",
        &leaf.cert_pem,
        NOW
    ));
    // A secondary holds no root key: it cannot sign intermediates.
    let (other, _) = intermediate_request(TD, "dc3").unwrap();
    assert_eq!(
        secondary.sign_intermediate(&other, "dc3", NOW),
        Err(CaError::NotPrimary)
    );
    assert!(!secondary.needs_intermediate(primary.active_serial(), NOW));
    assert!(secondary.needs_intermediate(primary.active_serial() + 1, NOW));
    assert!(secondary.needs_intermediate(
        primary.active_serial(),
        NOW + INTERMEDIATE_VALIDITY_SECS / 2
    ));
    // Near the root's end the intermediate is shorter, and renewed at half
    // of what it has, not at every check.
    let short = Intermediate {
        not_after: NOW + 1000,
        ..secondary.intermediate.clone().unwrap()
    };
    let near_end = CaState {
        intermediate: Some(short),
        ..secondary.clone()
    };
    assert!(!near_end.needs_intermediate(primary.active_serial(), NOW + 499));
    assert!(near_end.needs_intermediate(primary.active_serial(), NOW + 500));
    // Its leaves are dc2's: one it signs for dc1 is refused by the scope
    // check every verifier makes.
    let chain = der_of(&leaf.chain_pem);
    assert_eq!(weft_api::spiffe::check_issuer_scope(&id, &[&chain]), Ok(()));
    let dc1_node = secondary.node_id("dc1", "node-a");
    let forged = secondary
        .sign_csr(&csr(Some(&dc1_node)), &dc1_node, "node-a", NOW)
        .unwrap();
    assert!(openssl_verifies(
        &primary.bundle_pem(),
        &forged.chain_pem,
        &forged.cert_pem,
        NOW
    ));
    let e = weft_api::spiffe::check_issuer_scope(&dc1_node, &[&chain]).unwrap_err();
    assert!(e.contains("vouches for nothing else"), "{e}");
    // A root (or a cross-signed root) vouches for any id.
    let root = der_of(&primary.roots[0].cert_pem);
    assert_eq!(
        weft_api::spiffe::check_issuer_scope(&dc1_node, &[&root]),
        Ok(())
    );
}

#[test]
fn an_intermediate_is_signed_only_for_the_datacenter_that_asks() {
    let primary = ca();
    // dc2's server asking for dc1's (or any other) prefix is refused.
    let (csr_pem, _) = intermediate_request(TD, "dc1").unwrap();
    assert!(matches!(
        primary.sign_intermediate(&csr_pem, "dc2", NOW),
        Err(CaError::NameMismatch { .. })
    ));
    // A CSR for another trust domain too.
    let (csr_pem, _) = intermediate_request("other.weft", "dc2").unwrap();
    assert!(matches!(
        primary.sign_intermediate(&csr_pem, "dc2", NOW),
        Err(CaError::NameMismatch { .. })
    ));
    assert!(matches!(
        primary.sign_intermediate("not a csr", "dc2", NOW),
        Err(CaError::BadCsr(_))
    ));
}
