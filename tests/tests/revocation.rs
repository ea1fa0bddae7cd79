//! Revocation and expiry reach live connections: after a CRL reload a revoked node loses the
//! tunnel it already had and a revoked service loses its open mTLS connection, while every
//! other peer keeps working; a node certificate that expires during a session loses its
//! tunnel when it expires.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hybridge::node::Node;
use hybridge_ca::SpiffeId;
use hybridge_ca::registry::RevocationReason;
use hybridge_ca::tls::{PeerExpectation, TlsMaterial};
use hybridge_tests::*;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

const POLICY: &str = "[[rule]]\nsource = \"web\"\nsource_site = \"onprem\"\ndestination = \"inventory\"\naction = \"allow\"\n";

/// Starts `options` with `crl` in its `[tls]` section; returns the node and its config path
/// (for reloads).
async fn start_with_crl(options: &NodeOptions, crl: &Path) -> (Node, PathBuf) {
    let path = options.write();
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replace(
        "[tls]\n",
        &format!("[tls]\ncrl = {:?}\n", crl.display().to_string()),
    );
    std::fs::write(&path, text).unwrap();
    let node = Node::start(hybridge::config::Config::load(&path).unwrap())
        .await
        .unwrap();
    let policy = hybridge::acl::parse_acl_file(Path::new("policy.toml"), POLICY).unwrap();
    node.state.acl.apply(policy, "test", false).unwrap();
    (node, path)
}

fn has_link_to(node: &Node, peer: &SpiffeId) -> bool {
    node.state.peers.links().iter().any(|l| &l.peer == peer)
}

/// An HTTP/1.1 connection over mTLS with a service certificate, its driver spawned; the
/// returned handle finishes when the connection closes.
async fn mtls_connection(
    pki: &Pki,
    cert: &Path,
    key: &Path,
    addr: SocketAddr,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
        tokio::task::JoinHandle<()>,
    ),
    String,
> {
    let material = TlsMaterial::load(&pki.path("ca.pem"), cert, key, None).unwrap();
    let expect = PeerExpectation::NodeOfSites {
        trust_domain: TRUST_DOMAIN.into(),
        sites: vec!["onprem".into()],
    };
    let config = hybridge_ca::tls::client_config(&material, expect, &[b"http/1.1"]).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((sender, driver))
}

async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
) -> Result<u16, String> {
    let request = http::Request::get("/echo/mtls")
        .header("host", "localhost")
        .body(Empty::new())
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_reload_closes_the_revoked_peers_live_connections_and_nothing_else() {
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let (_inventory, cloud) = inventory_cloud(&pki, &cancel).await;
    let crl = pki.path("ca.crl");
    std::fs::write(&crl, pki.ca.crl_pem().unwrap()).unwrap();
    let (cloud, _) = start_with_crl(&cloud, &crl).await;
    let tunnel = cloud.addresses().tunnel.unwrap();
    // onprem-a will be revoked; onprem-b keeps serving, and has an mTLS import.
    let mut a = NodeOptions::onprem(&pki, "onprem-a", &[tunnel]);
    a.imports.push(("inventory".into(), "web".into()));
    let (a, _) = start_with_crl(&a, &crl).await;
    let mut b = NodeOptions::onprem(&pki, "onprem-b", &[tunnel]);
    b.imports.push(("inventory".into(), "web".into()));
    b.extra =
        "\n[[import]]\nservice = \"inventory\"\nlisten = \"127.0.0.1:0\"\nmtls = true\n".into();
    let (b, _) = start_with_crl(&b, &crl).await;
    assert!(a.wait_for_route("inventory", WAIT).await);
    assert!(b.wait_for_route("inventory", WAIT).await);
    let a_id = SpiffeId::node(TRUST_DOMAIN, "onprem", "onprem-a").unwrap();
    let b_id = SpiffeId::node(TRUST_DOMAIN, "onprem", "onprem-b").unwrap();
    assert!(has_link_to(&cloud, &a_id) && has_link_to(&cloud, &b_id));

    // A service with an open mTLS keep-alive connection through onprem-b.
    let (web_cert, web_key) = pki.service("web");
    // The `extra` import comes first in the config, the plain one (caller `web`) after it.
    let imports = &b.addresses().imports;
    let (mtls_import, plain_b) = (imports[0].1, imports[1].1);
    let (mut web, web_closed) = mtls_connection(&pki, &web_cert, &web_key, mtls_import)
        .await
        .unwrap();
    assert_eq!(get(&mut web).await, Ok(200));

    // Steady traffic through onprem-b's plain import for the whole revocation.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
        tokio::spawn(async move {
            for i in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let answer = http1(plain_b, "GET", &format!("/echo/{i}"), &[], Bytes::new()).await;
                sent.fetch_add(1, Ordering::Relaxed);
                if answer.status != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    // Revoke onprem-a's node certificate and web's service certificate, publish the CRL,
    // reload the nodes that check them.
    pki.ca
        .revoke_spiffe(&a_id, RevocationReason::KeyCompromise)
        .unwrap();
    pki.ca
        .revoke_spiffe(
            &SpiffeId::service(TRUST_DOMAIN, "web").unwrap(),
            RevocationReason::KeyCompromise,
        )
        .unwrap();
    std::fs::write(&crl, pki.ca.crl_pem().unwrap()).unwrap();
    cloud.reload("test").await.unwrap();
    b.reload("test").await.unwrap();

    // The revoked node's open tunnel is closed (and its redials are refused).
    let closed = tokio::time::timeout(
        Duration::from_secs(5),
        cloud
            .state
            .peers
            .wait_until(|links| !links.iter().any(|l| l.peer == a_id)),
    )
    .await;
    assert!(closed.is_ok(), "the revoked node kept its tunnel");
    // The revoked service's open connection is closed, and a new handshake is refused.
    assert!(
        tokio::time::timeout(Duration::from_secs(5), web_closed)
            .await
            .is_ok(),
        "the revoked service kept its mTLS connection"
    );
    assert!(get(&mut web).await.is_err());
    let again = mtls_connection(&pki, &web_cert, &web_key, mtls_import).await;
    let refused = match again {
        Err(_) => true,
        Ok((mut sender, _)) => get(&mut sender).await.is_err(),
    };
    assert!(
        refused,
        "a revoked service certificate completed a new handshake"
    );

    // onprem-b carried on throughout.
    let before = sent.load(Ordering::Relaxed);
    for i in 0..20 {
        let answer = http1(plain_b, "GET", &format!("/after/{i}"), &[], Bytes::new()).await;
        assert_eq!(answer.status, 200);
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(before > 0, "no request was sent during the revocation");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests through the other node failed during the revocation ({} sent)",
        sent.load(Ordering::Relaxed)
    );
    assert!(has_link_to(&cloud, &b_id));
    let metrics = hybridge::admin::status::metrics_text(&cloud.state);
    assert!(
        metrics
            .contains("hybridge_tunnel_disconnects_total{site=\"onprem\",reason=\"untrusted\"} 1"),
        "{metrics}"
    );

    a.abort().await;
    b.shutdown().await;
    cloud.shutdown().await;
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_that_expires_during_a_session_loses_its_tunnel() {
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let (_inventory, cloud) = inventory_cloud(&pki, &cancel).await;
    let cloud = cloud.start().await;
    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[cloud.addresses().tunnel.unwrap()]);
    // Issued for 12 s: valid when the node starts, expired while its tunnel is up.
    let issued = pki
        .ca
        .issue_node(
            "onprem",
            "onprem-1",
            &["localhost".into()],
            &["127.0.0.1".parse().unwrap()],
            Duration::from_secs(12),
        )
        .unwrap();
    let (cert, key) = issued.write(&pki.path("short-lived")).unwrap();
    onprem.files.cert = cert;
    onprem.files.key = key;
    let onprem = onprem.start().await;
    assert!(onprem.wait_for_route("inventory", WAIT).await);
    let id = SpiffeId::node(TRUST_DOMAIN, "onprem", "onprem-1").unwrap();
    assert!(has_link_to(&cloud, &id));

    let closed = tokio::time::timeout(
        Duration::from_secs(30),
        cloud
            .state
            .peers
            .wait_until(|links| !links.iter().any(|l| l.peer == id)),
    )
    .await;
    assert!(closed.is_ok(), "the tunnel outlived its node certificate");
    let metrics = hybridge::admin::status::metrics_text(&cloud.state);
    assert!(
        metrics
            .contains("hybridge_tunnel_disconnects_total{site=\"onprem\",reason=\"untrusted\"} 1"),
        "{metrics}"
    );
    onprem.abort().await;
    cloud.shutdown().await;
    cancel.cancel();
}
