//! `/metrics` under attack: whatever rogue clients and peers send (self-signed certificates by
//! the thousand, made-up service and caller names with quotes and newlines), the series a
//! node exports stay the same set: labels come from closed sets or from the node's own
//! configuration. And the README's table of errors is the code's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use hybridge::http::error::Reason;
use hybridge::tunnel::outcome::HandshakeFailure;
use hybridge_tests::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_util::sync::CancellationToken;

/// Accepts any server certificate: the rogue client wants the node to judge its certificate,
/// and does not care who the node is.
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A QUIC client config presenting a fresh self-signed client certificate with a random
/// serial, valid only in 2020 when `expired`.
fn rogue_client(expired: bool) -> quinn::ClientConfig {
    let mut params = rcgen::CertificateParams::new(vec!["rogue.example".to_owned()]).unwrap();
    let mut serial: [u8; 16] = rand::random();
    serial[0] = (serial[0] & 0x7f) | 0x01;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 12, 31);
    }
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
        .with_client_auth_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    tls.alpn_protocols = vec![hybridge::tunnel::quic::ALPN.to_vec()];
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_rogue_handshakes_add_no_series() {
    const HANDSHAKES: usize = 1_000;
    const AT_ONCE: usize = 16;
    let expired = |i: usize| i.is_multiple_of(3);
    let pki = Pki::new();
    let cloud = NodeOptions::cloud(&pki, "cloud-1").start().await;
    let tunnel = cloud.addresses().tunnel.unwrap();
    let before = scrape(&cloud).await;
    let mut failures = cloud.state.metrics.watch_handshake_failures();

    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let handshakes: Vec<usize> = (0..HANDSHAKES).collect();
    for batch in handshakes.chunks(AT_ONCE) {
        futures_util::future::join_all(batch.iter().map(|&i| {
            let connecting = endpoint
                .connect_with(rogue_client(expired(i)), tunnel, "localhost")
                .unwrap();
            async move {
                match tokio::time::timeout(WAIT, connecting).await {
                    // TLS 1.3: our side may finish before the node has judged our certificate;
                    // it closes the connection once it has.
                    Ok(Ok(connection)) => {
                        tokio::time::timeout(WAIT, connection.closed())
                            .await
                            .unwrap_or_else(|_| panic!("handshake {i}: the node kept a rogue"));
                    }
                    Ok(Err(_)) => {}
                    Err(_) => panic!("handshake {i} got no answer"),
                }
            }
        }))
        .await;
    }
    tokio::time::timeout(
        Duration::from_secs(60),
        failures.wait_for(|n| *n >= HANDSHAKES as u64),
    )
    .await
    .expect("every rogue handshake is counted")
    .unwrap();

    let after = scrape(&cloud).await;
    assert_eq!(
        series(&before),
        series(&after),
        "rogue handshakes changed the set of series"
    );
    let n_expired = (0..HANDSHAKES).filter(|&i| expired(i)).count();
    let failures = |reason: &str| {
        sample_value(
            &after,
            "hybridge_tunnel_handshake_failures_total",
            &[("reason", reason)],
        )
    };
    // An expired certificate is expired whoever issued it (its dates are checked first); a
    // current one from an unknown CA is `unknown-ca`, never `expired`.
    assert_eq!(failures("expired"), n_expired as f64);
    assert_eq!(failures("unknown-ca"), (HANDSHAKES - n_expired) as f64);
    for reason in HandshakeFailure::ALL {
        if !matches!(
            reason,
            HandshakeFailure::Expired | HandshakeFailure::UnknownCa
        ) {
            assert_eq!(failures(reason.as_str()), 0.0, "{reason}");
        }
    }
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_service_and_caller_names_share_the_unknown_series() {
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let inventory = demo_upstream("inventory", &cancel).await;
    let mut cloud = NodeOptions::cloud(&pki, "cloud-1");
    cloud
        .exports
        .push(ExportSpec::http1("inventory", &[inventory.local_addr()]));
    let cloud = cloud.start().await;
    allow(&cloud, "web", "inventory");
    let peer = RawPeer::connect(&pki, "onprem", "rogue", cloud.addresses().tunnel.unwrap()).await;

    // One of each outcome first, so every series the attack can touch already exists.
    assert_eq!(peer.get("inventory", "web", "/echo/ok").await.0, 200);
    let denied = (403, Some("acl-denied".to_owned()));
    let (status, error, _) = peer.get("inventory", "c\"d", "/").await;
    assert_eq!((status, error), denied);
    let (status, error, _) = peer.get("a\"b", "web", "/").await;
    assert_eq!((status, error), denied);
    let first = scrape(&cloud).await;

    let mut names: Vec<String> = vec![
        "a\"b".into(),
        "x\ny".into(),
        "back\\slash".into(),
        "}{=,\"".into(),
        "q".repeat(200),
    ];
    names.extend((0..300).map(|_| {
        let bytes: [u8; 12] = rand::random();
        format!("svc-{}", hex::encode(bytes))
    }));
    let callers = ["c\"d", "evil\nline", "*", "", "web"];
    let mut counted_decisions = 1; // the `a"b` request above, from a valid caller
    for (i, name) in names.iter().enumerate() {
        let caller = callers[i % callers.len()];
        // An invalid caller is refused before any decision is made (and counted).
        counted_decisions += usize::from(caller == "web");
        let (status, error, _) = peer.get(name, caller, "/").await;
        assert_eq!((status, error), denied, "{name:?} as {caller:?}");
    }
    for caller in ["c\"d", "evil\nline", &"w".repeat(200)] {
        let (status, error, _) = peer.get("inventory", caller, "/").await;
        assert_eq!((status, error), denied, "{caller:?}");
    }

    let last = scrape(&cloud).await;
    assert_eq!(series(&first), series(&last), "hostile names added series");
    for trace in ["a\\\"b", "x\\ny", "back\\\\slash", &"q".repeat(200), "svc-"] {
        assert!(!last.contains(trace), "{trace:?} reached /metrics");
    }
    let unknown = [("side", "export"), ("service", "unknown")];
    let with = |extra: (&'static str, &'static str)| {
        let mut labels = unknown.to_vec();
        labels.push(extra);
        labels
    };
    assert_eq!(
        sample_value(&last, "hybridge_requests_total", &with(("class", "4xx"))),
        (1 + names.len()) as f64
    );
    assert_eq!(
        sample_value(
            &last,
            "hybridge_bridge_errors_total",
            &with(("reason", "acl-denied"))
        ),
        (1 + names.len()) as f64
    );
    assert_eq!(
        sample_value(
            &last,
            "hybridge_acl_decisions_total",
            &[("destination", "unknown"), ("action", "deny")]
        ),
        counted_decisions as f64
    );
    // The configured service keeps its own series.
    assert_eq!(
        sample_value(
            &last,
            "hybridge_bridge_errors_total",
            &[
                ("side", "export"),
                ("service", "inventory"),
                ("reason", "acl-denied")
            ]
        ),
        4.0
    );
    assert_eq!(inventory.hits(), 1);
    peer.close();
    cloud.state.peers.wait_until(|links| links.is_empty()).await;
    let closed = scrape(&cloud).await;
    assert_eq!(
        sample_value(
            &closed,
            "hybridge_tunnel_disconnects_total",
            &[("site", "onprem"), ("reason", "peer-closed")]
        ),
        1.0
    );
    assert_eq!(
        sample_value(
            &closed,
            "hybridge_tunnel_connects_total",
            &[("site", "onprem")]
        ),
        1.0
    );
    cloud.shutdown().await;
    cancel.cancel();
}

/// The README's "Errors you will see" table, row by row: (reason, status, gRPC name, number).
fn readme_reasons() -> Vec<(String, u16, String, u16)> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let section = readme
        .split("### Errors you will see")
        .nth(1)
        .expect("README has an \"Errors you will see\" section");
    let section = section.split("\n#").next().unwrap();
    section
        .lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let reason = cells[1].trim_matches('`').to_owned();
            let status: u16 = cells[2].parse().unwrap_or_else(|_| panic!("{line}"));
            let (name, number) = cells[3]
                .split_once(" (")
                .unwrap_or_else(|| panic!("gRPC cell is not `NAME (N)`: {line}"));
            let number: u16 = number.trim_end_matches(')').parse().unwrap();
            (reason, status, name.to_owned(), number)
        })
        .collect()
}

#[test]
fn the_readme_error_table_is_the_reason_enum() {
    let documented = readme_reasons();
    let code: Vec<(String, u16, String, u16)> = Reason::ALL
        .iter()
        .map(|r| {
            (
                r.as_str().to_owned(),
                r.status().as_u16(),
                r.grpc_code().name().to_owned(),
                r.grpc_code().number(),
            )
        })
        .collect();
    assert_eq!(documented, code);
}
