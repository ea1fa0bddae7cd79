//! mTLS import and gateway listeners with the TLS stacks callers really use: curl (OpenSSL),
//! Python's `ssl` (OpenSSL through CPython) and rustls. Each presents a service certificate
//! from our CA and is identified by its SPIFFE id: `web` is allowed, `intruder` is not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use hybridge_ca::tls::{PeerExpectation, TlsMaterial};
use hybridge_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

struct Client {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

/// `curl --cert`: returns the HTTP status and the body.
fn curl(client: &Client, url: &str, host: Option<&str>) -> (u16, String) {
    let mut command = std::process::Command::new("curl");
    command
        .args(["--silent", "--show-error", "--max-time", "10"])
        .args(["--write-out", "\n%{http_code}"])
        .arg("--cert")
        .arg(&client.cert)
        .arg("--key")
        .arg(&client.key)
        .arg("--cacert")
        .arg(&client.ca);
    if let Some(host) = host {
        command.args(["--header", &format!("Host: {host}")]);
    }
    let out = command
        .arg(url)
        .output()
        .expect("curl is installed by .ci/run");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (body, status) = stdout.rsplit_once('\n').unwrap();
    (status.trim().parse().unwrap(), body.to_owned())
}

const PYTHON_CLIENT: &str = r#"
import socket, ssl, sys
host, port, ca, cert, key, path, vhost = sys.argv[1:8]
context = ssl.create_default_context(cafile=ca)
context.load_cert_chain(cert, key)
with socket.create_connection((host, int(port)), timeout=10) as raw:
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {vhost}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
print(data.split(b"\r\n", 1)[0].split(b" ")[1].decode())
"#;

/// Python's `ssl` module: returns the HTTP status.
fn python_ssl(client: &Client, addr: SocketAddr, path: &str, host: &str) -> u16 {
    let out = std::process::Command::new(python())
        .arg("-c")
        .arg(PYTHON_CLIENT)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(&client.ca)
        .arg(&client.cert)
        .arg(&client.key)
        .arg(path)
        .arg(host)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python ssl client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// A rustls client with the service certificate: returns the HTTP status.
async fn rustls_client(client: &Client, addr: SocketAddr, path: &str, host: &str) -> u16 {
    let material = TlsMaterial::load(&client.ca, &client.cert, &client.key, None).unwrap();
    let expect = PeerExpectation::NodeOfSites {
        trust_domain: TRUST_DOMAIN.into(),
        sites: vec!["onprem".into()],
    };
    let config = hybridge_ca::tls::client_config(&material, expect, &[b"http/1.1"]).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response);
    text.split(' ').nth(1).unwrap().parse().unwrap()
}

fn client(pki: &Pki, service: &str) -> Client {
    let (cert, key) = pki.service(service);
    Client {
        cert,
        key,
        ca: pki.path("ca.pem"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_python_and_rustls_clients_complete_mtls_and_are_identified() {
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let (inventory, cloud) = inventory_cloud(&pki, &cancel).await;
    let cloud = cloud.start().await;
    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[cloud.addresses().tunnel.unwrap()]);
    onprem.extra = "\n[[import]]\nservice = \"inventory\"\nlisten = \"127.0.0.1:0\"\nmtls = true\n\n[gateway]\nlisten = \"127.0.0.1:0\"\nsuffix = \"hybridge\"\nmtls = true\n".into();
    let onprem = onprem.start().await;
    let policy = "[[rule]]\nsource = \"web\"\nsource_site = \"onprem\"\ndestination = \"inventory\"\naction = \"allow\"\n";
    for node in [&cloud, &onprem] {
        apply_policy(node, policy);
    }
    assert!(onprem.wait_for_route("inventory", WAIT).await);
    let import = import_addr(&onprem, "inventory");
    let gateway = onprem.addresses().gateway.unwrap();
    let web = client(&pki, "web");
    let intruder = client(&pki, "intruder");

    for (addr, host) in [
        (import, "localhost".to_owned()),
        (gateway, "inventory.hybridge".to_owned()),
    ] {
        let url = format!("https://localhost:{}/echo/curl", addr.port());
        let (status, body) = curl(&web, &url, Some(&host));
        assert_eq!(status, 200, "curl as web via {addr}: {body}");
        let (status, body) = curl(&intruder, &url, Some(&host));
        assert_eq!(status, 403, "curl as intruder via {addr}: {body}");
        assert!(
            body.contains("intruder@onprem may not call inventory"),
            "{body}"
        );

        assert_eq!(python_ssl(&web, addr, "/echo/python", &host), 200);
        assert_eq!(python_ssl(&intruder, addr, "/echo/python", &host), 403);

        assert_eq!(rustls_client(&web, addr, "/echo/rustls", &host).await, 200);
        assert_eq!(
            rustls_client(&intruder, addr, "/echo/rustls", &host).await,
            403
        );
    }
    assert_eq!(
        inventory.hits(),
        6,
        "only web's requests reached the upstream"
    );

    // openssl s_client reads the CA names of the CertificateRequest (the check that failed
    // with `parse_ca_names: ASN1 lib` when they were not DER names).
    let out = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &import.to_string(),
            "-servername",
            "localhost",
        ])
        .arg("-CAfile")
        .arg(pki.path("ca.pem"))
        .arg("-cert")
        .arg(&web.cert)
        .arg("-key")
        .arg(&web.key)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Acceptable client certificate CA names") && text.contains("hybridge"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    onprem.shutdown().await;
    cloud.shutdown().await;
    cancel.cancel();
}
