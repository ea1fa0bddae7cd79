//! Issued certificates and CRLs checked by the real openssl binary (not by our own code).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{new_ca, openssl_ok, path_str};
use hybridge_ca::authority::RevocationReason;
use hybridge_ca::{CertificateAuthority, InitOptions, KeyType};

#[test]
fn node_and_service_certs_verify_with_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path(), "corp.example");
    let ca_pem = dir.path().join("ca/ca.pem");

    let node = ca
        .issue_node(
            "onprem",
            "edge-1",
            &["edge-1.corp.example".into()],
            &["10.0.0.7".parse().unwrap()],
            Duration::from_secs(90 * 86_400),
        )
        .unwrap();
    let (node_pem, _) = node.write(&dir.path().join("edge-1")).unwrap();
    let out = openssl_ok(&["verify", "-CAfile", path_str(&ca_pem), path_str(&node_pem)]);
    assert_eq!(out.trim(), format!("{}: OK", node_pem.display()));
    // Both purposes the tunnel needs.
    for purpose in ["sslserver", "sslclient"] {
        openssl_ok(&[
            "verify",
            "-purpose",
            purpose,
            "-CAfile",
            path_str(&ca_pem),
            path_str(&node_pem),
        ]);
    }
    let text = openssl_ok(&["x509", "-in", path_str(&node_pem), "-noout", "-text"]);
    assert!(
        text.contains("URI:spiffe://corp.example/site/onprem/node/edge-1"),
        "{text}"
    );
    assert!(text.contains("DNS:edge-1.corp.example"), "{text}");
    assert!(text.contains("IP Address:10.0.0.7"), "{text}");
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );

    let svc = ca
        .issue_service("billing", &[], Duration::from_secs(30 * 86_400))
        .unwrap();
    let (svc_pem, _) = svc.write(&dir.path().join("billing")).unwrap();
    let out = openssl_ok(&["verify", "-CAfile", path_str(&ca_pem), path_str(&svc_pem)]);
    assert_eq!(out.trim(), format!("{}: OK", svc_pem.display()));
    let text = openssl_ok(&["x509", "-in", path_str(&svc_pem), "-noout", "-text"]);
    assert!(
        text.contains("URI:spiffe://corp.example/svc/billing"),
        "{text}"
    );

    // The CA itself is a CA with the trust-domain URI.
    let text = openssl_ok(&["x509", "-in", path_str(&ca_pem), "-noout", "-text"]);
    assert!(text.contains("CA:TRUE"), "{text}");
    assert!(text.contains("URI:spiffe://corp.example"), "{text}");
}

#[test]
fn ed25519_ca_verifies_with_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let opts = InitOptions {
        key_type: KeyType::Ed25519,
        ..InitOptions::default()
    };
    let ca = CertificateAuthority::init(&dir.path().join("ca"), "td", opts).unwrap();
    let leaf = ca
        .issue_service("svc", &[], Duration::from_secs(3600))
        .unwrap();
    let (pem, _) = leaf.write(&dir.path().join("svc")).unwrap();
    let ca_pem = dir.path().join("ca/ca.pem");
    openssl_ok(&["verify", "-CAfile", path_str(&ca_pem), path_str(&pem)]);
    let text = openssl_ok(&["x509", "-in", path_str(&ca_pem), "-noout", "-text"]);
    assert!(text.contains("ED25519"), "{text}");
}

#[test]
fn crl_lists_revoked_serials_and_numbers_increase() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path(), "td");
    let ca_pem = dir.path().join("ca/ca.pem");
    let keep = ca
        .issue_service("keep", &[], Duration::from_secs(3600))
        .unwrap();
    let gone = ca
        .issue_service("gone", &[], Duration::from_secs(3600))
        .unwrap();
    ca.revoke_serial(&gone.serial_hex, RevocationReason::KeyCompromise)
        .unwrap();

    let crl1 = dir.path().join("crl1.pem");
    std::fs::write(&crl1, ca.crl_pem().unwrap()).unwrap();
    let crl2 = dir.path().join("crl2.pem");
    std::fs::write(&crl2, ca.crl_pem().unwrap()).unwrap();

    // Signature checked by openssl against the CA.
    let out = openssl(&[
        "crl",
        "-in",
        path_str(&crl1),
        "-CAfile",
        path_str(&ca_pem),
        "-noout",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("verify OK"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = openssl_ok(&["crl", "-in", path_str(&crl1), "-noout", "-text"]);
    assert!(
        text.contains(&format!(
            "Serial Number: {}",
            gone.serial_hex.to_uppercase()
        )),
        "{text}"
    );
    assert!(!text.contains(&keep.serial_hex.to_uppercase()), "{text}");
    assert!(text.contains("Key Compromise"), "{text}");

    let number = |path: &std::path::Path| -> u64 {
        let text = openssl_ok(&["crl", "-in", path_str(path), "-noout", "-crlnumber"]);
        // "crlNumber=0x01" (OpenSSL 3) or "crlNumber=01" (1.1)
        let hex = text
            .trim()
            .trim_start_matches("crlNumber=")
            .trim_start_matches("0x");
        u64::from_str_radix(hex, 16).unwrap()
    };
    let (n1, n2) = (number(&crl1), number(&crl2));
    assert_eq!(n1, 1);
    assert_eq!(n2, 2);
}

fn openssl(args: &[&str]) -> std::process::Output {
    common::openssl(args)
}
