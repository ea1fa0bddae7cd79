//! Real TLS 1.3 handshakes over loopback TCP with tokio-rustls, using the configs from
//! `hybridge_ca::tls`: who is accepted, who is rejected, and what the error says.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use hybridge_ca::authority::RevocationReason;
use hybridge_ca::tls::{
    CrlStale, PeerExpectation, PeerRole, TlsMaterial, client_config, peer_spiffe_id, server_config,
    verify_peer_chain,
};
use hybridge_ca::{CertificateAuthority, IssuedCertificate, SpiffeId};
use rustls::pki_types::{ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const ALPN: &[u8] = b"hybridge/1";

fn material(ca: &CertificateAuthority, leaf: &IssuedCertificate, crl: Option<&str>) -> TlsMaterial {
    TlsMaterial::from_pem(&ca.ca_cert_pem(), &leaf.cert_chain_pem, &leaf.key_pem, crl).unwrap()
}

fn nodes_of(td: &str, site: &str) -> PeerExpectation {
    PeerExpectation::NodeOfSites {
        trust_domain: td.into(),
        sites: vec![site.into()],
    }
}

/// What each side saw: Ok(peer id) or the error text.
struct Outcome {
    server: Result<SpiffeId, String>,
    client: Result<SpiffeId, String>,
}

async fn handshake(server: rustls::ServerConfig, client: rustls::ClientConfig) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let (_, conn) = tls.get_ref();
        assert_eq!(conn.alpn_protocol(), Some(ALPN));
        let id =
            peer_spiffe_id(&conn.peer_certificates().unwrap()[0]).map_err(|e| e.to_string())?;
        tls.write_all(b"hello").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(id)
    });

    let connector = TlsConnector::from(Arc::new(client));
    let client = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        // The name is irrelevant: identity is the SPIFFE URI SAN, not a host name.
        let name = ServerName::try_from("not-checked.invalid").unwrap();
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let id = {
            let (_, conn) = tls.get_ref();
            peer_spiffe_id(&conn.peer_certificates().unwrap()[0]).map_err(|e| e.to_string())?
        };
        // In TLS 1.3 the server judges our certificate after we finish; reading shows its verdict.
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(buf, b"hello");
        Ok::<_, String>(id)
    }
    .await;
    let server = tokio::time::timeout(Duration::from_secs(10), server_task)
        .await
        .expect("server finished")
        .unwrap();
    Outcome { server, client }
}

fn hour() -> Duration {
    Duration::from_secs(3600)
}

#[tokio::test]
async fn nodes_of_the_right_sites_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::new_ca(dir.path(), "corp.example");
    let onprem = ca.issue_node("onprem", "a", &[], &[], hour()).unwrap();
    let cloud = ca.issue_node("cloud", "b", &[], &[], hour()).unwrap();

    let server = server_config(
        &material(&ca, &cloud, None),
        nodes_of("corp.example", "onprem"),
        &[ALPN],
        true,
    )
    .unwrap();
    let client = client_config(
        &material(&ca, &onprem, None),
        nodes_of("corp.example", "cloud"),
        &[ALPN],
    )
    .unwrap();
    let outcome = handshake(server, client).await;
    assert_eq!(outcome.server.unwrap(), onprem.spiffe_id);
    assert_eq!(outcome.client.unwrap(), cloud.spiffe_id);
}

#[tokio::test]
async fn service_and_exact_expectations_accept() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::new_ca(dir.path(), "td");
    let node = ca.issue_node("cloud", "n", &[], &[], hour()).unwrap();
    let svc = ca.issue_service("billing", &[], hour()).unwrap();
    let server = server_config(
        &material(&ca, &node, None),
        PeerExpectation::AnyService {
            trust_domain: "td".into(),
        },
        &[ALPN],
        false,
    )
    .unwrap();
    let client = client_config(
        &material(&ca, &svc, None),
        PeerExpectation::Exact(node.spiffe_id.clone()),
        &[ALPN],
    )
    .unwrap();
    let outcome = handshake(server, client).await;
    assert_eq!(outcome.server.unwrap().to_uri(), "spiffe://td/svc/billing");
    assert_eq!(outcome.client.unwrap(), node.spiffe_id);
}

#[tokio::test]
async fn client_from_another_ca_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::new_ca(dir.path(), "td");
    let other_dir = tempfile::tempdir().unwrap();
    // Same trust domain, different key: only the chain check can tell them apart.
    let other = common::new_ca(other_dir.path(), "td");
    let server_leaf = ca.issue_node("cloud", "s", &[], &[], hour()).unwrap();
    let intruder = other.issue_node("onprem", "x", &[], &[], hour()).unwrap();

    let server = server_config(
        &material(&ca, &server_leaf, None),
        nodes_of("td", "onprem"),
        &[ALPN],
        true,
    )
    .unwrap();
    // The intruder trusts our CA so that only the server's check can fail.
    let intruder_material = TlsMaterial {
        ca_certs: material(&ca, &server_leaf, None).ca_certs,
        ..material(&other, &intruder, None)
    };
    let client = client_config(&intruder_material, nodes_of("td", "cloud"), &[ALPN]).unwrap();
    let outcome = handshake(server, client).await;
    let err = outcome.server.unwrap_err();
    assert!(
        err.contains("certificate not issued by the hybridge CA"),
        "{err}"
    );
    assert!(outcome.client.is_err());
}

#[tokio::test]
async fn server_from_another_ca_is_rejected_by_client() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::new_ca(dir.path(), "td");
    let other_dir = tempfile::tempdir().unwrap();
    // A CA with a different name: webpki finds no issuer at all (UnknownIssuer).
    let other = common::new_ca(other_dir.path(), "elsewhere");
    let impostor = other.issue_node("cloud", "s", &[], &[], hour()).unwrap();
    let client_leaf = ca.issue_node("onprem", "c", &[], &[], hour()).unwrap();

    let server = server_config(
        &material(&other, &impostor, None),
        nodes_of("td", "onprem"),
        &[ALPN],
        true,
    )
    .unwrap();
    let client = client_config(
        &material(&ca, &client_leaf, None),
        nodes_of("td", "cloud"),
        &[ALPN],
    )
    .unwrap();
    let outcome = handshake(server, client).await;
    let err = outcome.client.unwrap_err();
    assert!(
        err.contains("certificate not issued by the hybridge CA"),
        "{err}"
    );
}

#[tokio::test]
async fn node_of_the_wrong_site_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::new_ca(dir.path(), "td");
    let server_leaf = ca.issue_node("onprem", "s", &[], &[], hour()).unwrap();
    let wrong = ca.issue_node("lab", "c", &[], &[], hour()).unwrap();
    let server = server_config(
        &material(&ca, &server_leaf, None),
        nodes_of("td", "cloud"),
        &[ALPN],
        true,
    )
    .unwrap();
    let client = client_config(
        &material(&ca, &wrong, None),
        nodes_of("td", "onprem"),
        &[ALPN],
    )
    .unwrap();
    let outcome = handshake(server, client).await;
    let err = outcome.server.unwrap_err();
    assert!(
        err.contains("peer is spiffe://td/site/lab/node/c but expected a node of site cloud"),
        "{err}"
    );
}

/// The remote admin listener's expectation: administrators of the trust domain, not revoked;
/// a node or service certificate from the same CA is refused, naming the check.
#[tokio::test]
async fn only_unrevoked_administrators_pass_the_admin_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::new_ca(dir.path(), "td");
    let node = ca.issue_node("cloud", "n", &[], &[], hour()).unwrap();
    let alice = ca.issue_admin("alice", hour()).unwrap();
    let bob = ca.issue_admin("bob", hour()).unwrap();
    let svc = ca.issue_service("web", &[], hour()).unwrap();
    let onprem = ca.issue_node("onprem", "o", &[], &[], hour()).unwrap();
    ca.revoke_serial(&bob.serial_hex, RevocationReason::PrivilegeWithdrawn)
        .unwrap();
    let crl = ca.crl_pem().unwrap();
    let admins = || {
        server_config(
            &material(&ca, &node, Some(&crl)),
            PeerExpectation::AnyAdmin {
                trust_domain: "td".into(),
            },
            &[ALPN],
            true,
        )
        .unwrap()
    };
    let client = |leaf: &IssuedCertificate| {
        client_config(
            &material(&ca, leaf, None),
            PeerExpectation::Exact(node.spiffe_id.clone()),
            &[ALPN],
        )
        .unwrap()
    };
    let outcome = handshake(admins(), client(&alice)).await;
    assert_eq!(outcome.server.unwrap().to_uri(), "spiffe://td/admin/alice");
    assert_eq!(outcome.client.unwrap(), node.spiffe_id);

    for (leaf, expected) in [
        (
            &svc,
            "peer is spiffe://td/svc/web but expected an administrator (spiffe://td/admin/NAME)"
                .to_string(),
        ),
        (
            &onprem,
            "peer is spiffe://td/site/onprem/node/o but expected an administrator".to_string(),
        ),
        (
            &bob,
            format!("certificate revoked (serial {})", bob.serial_hex),
        ),
    ] {
        let outcome = handshake(admins(), client(leaf)).await;
        let err = outcome.server.unwrap_err();
        assert!(err.contains(&expected), "{err}");
        assert!(outcome.client.is_err());
    }

    // An administrator certificate carries clientAuth only: it cannot pose as a server.
    let chain = [rustls::pki_types::CertificateDer::from(
        pem::parse(&alice.cert_chain_pem).unwrap().into_contents(),
    )];
    let err = verify_peer_chain(
        &material(&ca, &node, None),
        PeerExpectation::AnyAdmin {
            trust_domain: "td".into(),
        },
        &chain,
        UnixTime::now(),
        PeerRole::Server,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("certificate lacks the serverAuth extended key usage"),
        "{err}"
    );
}

#[tokio::test]
async fn revoked_client_is_rejected_after_crl_reload() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::new_ca(dir.path(), "td");
    let server_leaf = ca.issue_node("cloud", "s", &[], &[], hour()).unwrap();
    let client_leaf = ca.issue_node("onprem", "c", &[], &[], hour()).unwrap();
    let (server_pem, server_key) = server_leaf.write(&dir.path().join("server")).unwrap();
    let ca_pem = dir.path().join("ca/ca.pem");
    let crl_path = dir.path().join("crl.pem");

    // Before revocation, with an (empty) CRL loaded from disk: accepted.
    std::fs::write(&crl_path, ca.crl_pem().unwrap()).unwrap();
    let server_material =
        TlsMaterial::load(&ca_pem, &server_pem, &server_key, Some(&crl_path)).unwrap();
    assert_eq!(server_material.crls.len(), 1);
    let client = || {
        client_config(
            &material(&ca, &client_leaf, None),
            nodes_of("td", "cloud"),
            &[ALPN],
        )
        .unwrap()
    };
    let server = server_config(&server_material, nodes_of("td", "onprem"), &[ALPN], true).unwrap();
    assert_eq!(
        handshake(server, client()).await.server.unwrap(),
        client_leaf.spiffe_id
    );

    // Revoke, regenerate the CRL, reload: rejected, and openssl sees the serial too.
    ca.revoke_serial(&client_leaf.serial_hex, RevocationReason::KeyCompromise)
        .unwrap();
    std::fs::write(&crl_path, ca.crl_pem().unwrap()).unwrap();
    let server_material =
        TlsMaterial::load(&ca_pem, &server_pem, &server_key, Some(&crl_path)).unwrap();
    let server = server_config(&server_material, nodes_of("td", "onprem"), &[ALPN], true).unwrap();
    let outcome = handshake(server, client()).await;
    let err = outcome.server.unwrap_err();
    assert!(
        err.contains(&format!(
            "certificate revoked (serial {})",
            client_leaf.serial_hex
        )),
        "{err}"
    );
    let text = common::openssl_ok(&["crl", "-in", common::path_str(&crl_path), "-noout", "-text"]);
    assert!(
        text.contains(&format!(
            "Serial Number: {}",
            client_leaf.serial_hex.to_uppercase()
        )),
        "{text}"
    );
}

#[test]
fn outdated_crl_still_applies_and_expiry_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::new_ca(dir.path(), "td");
    let verifier_leaf = ca.issue_node("cloud", "s", &[], &[], hour()).unwrap();
    let peer = ca
        .issue_node("onprem", "p", &[], &[], Duration::from_secs(30 * 86_400))
        .unwrap();
    ca.revoke_serial(&peer.serial_hex, RevocationReason::Superseded)
        .unwrap();
    let crl = ca.crl_pem_valid_for(Duration::from_secs(60)).unwrap();
    let m = material(&ca, &verifier_leaf, Some(&crl));
    let peer_chain = material(&ca, &peer, None).chain;

    // Two days later the CRL is past nextUpdate but the peer certificate is still in date.
    let later =
        UnixTime::since_unix_epoch(Duration::from_secs(UnixTime::now().as_secs() + 2 * 86_400));
    let err = verify_peer_chain(
        &m,
        nodes_of("td", "onprem"),
        &peer_chain,
        later,
        PeerRole::Client,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("certificate revoked"), "{err}");

    // Far in the future the certificate itself has expired.
    let m = material(&ca, &verifier_leaf, None);
    let much_later =
        UnixTime::since_unix_epoch(Duration::from_secs(UnixTime::now().as_secs() + 60 * 86_400));
    let err = verify_peer_chain(
        &m,
        nodes_of("td", "onprem"),
        &peer_chain,
        much_later,
        PeerRole::Client,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("certificate expired"), "{err}");

    // Right now, without a CRL, it passes.
    let id = verify_peer_chain(
        &m,
        nodes_of("td", "onprem"),
        &peer_chain,
        UnixTime::now(),
        PeerRole::Server,
    )
    .unwrap();
    assert_eq!(id, peer.spiffe_id);
}

#[test]
fn a_stale_crl_refuses_every_peer_only_under_the_refuse_policy() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::new_ca(dir.path(), "td");
    let verifier_leaf = ca.issue_node("cloud", "s", &[], &[], hour()).unwrap();
    let peer = ca.issue_node("onprem", "p", &[], &[], hour()).unwrap();
    let crl = ca.crl_pem_valid_for(Duration::from_secs(60)).unwrap();
    let mut m = material(&ca, &verifier_leaf, Some(&crl));
    assert_eq!(
        m.crl_stale,
        CrlStale::Warn,
        "material loads with the fail-open default"
    );
    let peer_chain = material(&ca, &peer, None).chain;
    let at = |from_now: u64| {
        UnixTime::since_unix_epoch(Duration::from_secs(UnixTime::now().as_secs() + from_now))
    };
    let check = |m: &TlsMaterial, when| {
        verify_peer_chain(
            m,
            nodes_of("td", "onprem"),
            &peer_chain,
            when,
            PeerRole::Client,
        )
        .map_err(|e| e.to_string())
    };
    // Warn: a peer the stale CRL does not list still passes.
    assert_eq!(check(&m, at(120)), Ok(peer.spiffe_id.clone()));
    // Refuse: passes while the CRL is current, refused once it is stale, naming why.
    m.crl_stale = CrlStale::Refuse;
    assert_eq!(check(&m, at(0)), Ok(peer.spiffe_id.clone()));
    let err = check(&m, at(120)).unwrap_err();
    assert!(
        err.contains("past its nextUpdate") && err.contains("tls.crl_stale = \"refuse\""),
        "{err}"
    );
    // Without a CRL there is nothing to go stale.
    let mut without = material(&ca, &verifier_leaf, None);
    without.crl_stale = CrlStale::Refuse;
    assert_eq!(check(&without, at(120)), Ok(peer.spiffe_id));
}

#[test]
fn load_errors_name_file_and_step() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::new_ca(dir.path(), "td");
    let a = ca.issue_node("cloud", "a", &[], &[], hour()).unwrap();
    let b = ca.issue_node("cloud", "b", &[], &[], hour()).unwrap();
    let (a_pem, a_key) = a.write(&dir.path().join("a")).unwrap();
    let (_, b_key) = b.write(&dir.path().join("b")).unwrap();
    let ca_pem = dir.path().join("ca/ca.pem");

    let missing_crl = dir.path().join("missing-crl.pem");
    let err = TlsMaterial::load(&ca_pem, &a_pem, &a_key, Some(&missing_crl))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("reading CRL {}: ", missing_crl.display())),
        "{err}"
    );

    let err = TlsMaterial::load(&ca_pem, &a_pem, &b_key, None)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "checking private key against certificate {}: key does not match the certificate",
            b_key.display()
        )
    );

    let other_dir = tempfile::tempdir().unwrap();
    common::new_ca(other_dir.path(), "td");
    let other_ca = other_dir.path().join("ca/ca.pem");
    let err = TlsMaterial::load(&other_ca, &a_pem, &a_key, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!(
            "checking certificate against CA bundle and CRL {}: ",
            a_pem.display()
        )) && err.contains("certificate not issued by the hybridge CA"),
        "{err}"
    );

    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "hello").unwrap();
    let err = TlsMaterial::load(&garbage, &a_pem, &a_key, None)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "parsing CA bundle {}: no CERTIFICATE PEM block found",
            garbage.display()
        )
    );

    let m = TlsMaterial::load(&ca_pem, &a_pem, &a_key, None).unwrap();
    assert_eq!(m.own_id, a.spiffe_id);
    assert_eq!(m.chain.len(), 2);
}
