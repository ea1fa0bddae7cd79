//! Attacks on a running pair through the tunnel itself: a peer holding a valid node
//! certificate that claims callers its site does not own, and a node of another site that
//! announces a service it may not serve. The attacker is a raw QUIC client (`RawPeer` in the
//! test library: our frame codec over quinn, no hybridge node logic), so nothing in the node
//! under attack can be relied on to behave.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use hybridge::demo::DemoUpstream;
use hybridge_tests::*;
use tokio_util::sync::CancellationToken;

async fn demo(name: &str, cancel: &CancellationToken) -> DemoUpstream {
    DemoUpstream::start(name, "127.0.0.1:0".parse().unwrap(), cancel.child_token())
        .await
        .unwrap()
}

/// A node of site `site` that dials `cloud`, with its own certificate.
fn site_node(pki: &Pki, site: &str, name: &str, cloud: SocketAddr) -> NodeOptions {
    let mut options = NodeOptions::onprem(pki, name, &[cloud]);
    options.site = site.into();
    options.files = pki.node(site, name);
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_claim_callers_its_site_does_not_own() {
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let inventory = demo("inventory", &cancel).await;
    let mut cloud = NodeOptions::cloud(&pki, "cloud-1");
    cloud.allowed_sites = vec!["onprem".into(), "partner".into()];
    cloud
        .exports
        .push(ExportSpec::http1("inventory", &[inventory.local_addr()]));
    let cloud = cloud.start().await;
    apply_policy(
        &cloud,
        r#"
[[rule]]
source = "web"
source_site = "onprem"
destination = "inventory"
action = "allow"

[[rule]]
source = "partner-app"
source_site = "partner"
destination = "inventory"
action = "allow"
"#,
    );
    let tunnel = cloud.addresses().tunnel.unwrap();

    // A rogue process holding a valid on-prem node certificate.
    let onprem = RawPeer::connect(&pki, "onprem", "rogue", tunnel).await;
    let (status, _, body) = onprem.get("inventory", "web", "/echo/ok").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(inventory.hits(), 1);
    for caller in ["spoofme", "partner-app", "*", "", "Web", "web@partner"] {
        let (status, error, body) = onprem.get("inventory", caller, "/echo/x").await;
        assert_eq!(
            (status, error.as_deref()),
            (403, Some("acl-denied")),
            "caller {caller:?}: {}",
            String::from_utf8_lossy(&body)
        );
        assert!(
            !String::from_utf8_lossy(&body).contains("partner-app-"),
            "a refusal must not name internal rule ids"
        );
    }
    assert_eq!(inventory.hits(), 1, "a claimed caller reached the upstream");

    // The partner site owns partner-app and not web, whatever its frames say.
    let partner = RawPeer::connect(&pki, "partner", "p-1", tunnel).await;
    assert_eq!(partner.get("inventory", "partner-app", "/").await.0, 200);
    let (status, error, _) = partner.get("inventory", "web", "/").await;
    assert_eq!((status, error.as_deref()), (403, Some("acl-denied")));
    assert_eq!(inventory.hits(), 2);

    // The export edge cleans what a peer sends too: identity, override and bridge headers
    // from a (compromised) node never reach the upstream.
    let (status, _, body) = onprem
        .get_with(
            "inventory",
            "web",
            "/echo/peer-headers",
            &[
                (
                    "x-forwarded-client-cert",
                    "URI=spiffe://test.hybridge/svc/admin",
                ),
                ("x-real-ip", "10.0.0.1"),
                ("x-http-method-override", "DELETE"),
                ("x-original-url", "/admin"),
                ("x-hybridge-caller", "admin"),
                ("connection", "x-secret"),
                ("x-secret", "1"),
            ],
        )
        .await;
    assert_eq!(status, 200);
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    for removed in [
        "x-forwarded-client-cert",
        "x-real-ip",
        "x-http-method-override",
        "x-original-url",
        "x-hybridge-caller",
        "x-secret",
    ] {
        assert!(
            echo["headers"].get(removed).is_none(),
            "{removed} from a peer reached the upstream: {echo}"
        );
    }

    // acl check takes the site and says why the other site's rule did not apply.
    let explanation =
        cloud
            .state
            .acl
            .explain(Some("partner"), "web", "inventory", Some("GET"), Some("/"));
    assert!(explanation.default_deny, "{explanation:?}");
    onprem.close();
    partner.close();
    cloud.state.peers.wait_until(|links| links.is_empty()).await;
    cloud.shutdown().await;
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_site_never_serves_a_declared_export() {
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let ledger = demo("ledger", &cancel).await;
    let impostor = demo("impostor", &cancel).await;
    let mut cloud = NodeOptions::cloud(&pki, "cloud-1");
    cloud.allowed_sites = vec!["dc1".into(), "dc2".into()];
    cloud.imports.push(("ledger".into(), "reporting".into()));
    let cloud = cloud.start().await;
    let tunnel = cloud.addresses().tunnel.unwrap();
    let policy = r#"
[[rule]]
source = "reporting"
source_site = "cloud"
destination = "ledger"
action = "allow"

[[export]]
service = "ledger"
sites = "dc1"
"#;
    apply_policy(&cloud, policy);

    let mut dc1 = site_node(&pki, "dc1", "dc1-a", tunnel);
    dc1.exports
        .push(ExportSpec::http1("ledger", &[ledger.local_addr()]));
    let dc1 = dc1.start().await;
    apply_policy(&dc1, policy);
    // A real node of the other site that exports `ledger` too, and would answer.
    let mut dc2 = site_node(&pki, "dc2", "dc2-a", tunnel);
    dc2.exports
        .push(ExportSpec::http1("ledger", &[impostor.local_addr()]));
    let dc2 = dc2.start().await;
    apply_policy(&dc2, policy);
    // And a raw peer of dc2 announcing it as well.
    let raw = RawPeer::announcing(&pki, "dc2", "dc2-raw", tunnel, vec!["ledger".into()]).await;

    // Both dc2 announcements were seen (and refused) once every link is up.
    cloud.state.peers.wait_until(|links| links.len() == 3).await;
    assert!(cloud.wait_for_route("ledger", WAIT).await);
    assert_eq!(cloud.state.metrics.exports_refused(), 2);
    let import = import_addr(&cloud, "ledger");
    for i in 0..40 {
        let answer = http1(import, "GET", &format!("/echo/{i}"), &[], Bytes::new()).await;
        assert_eq!(answer.status, 200, "request {i}");
        assert_eq!(answer.header("x-demo-upstream"), Some("ledger"));
    }
    assert_eq!(
        impostor.hits(),
        0,
        "the other site's node received requests"
    );
    assert_eq!(ledger.hits(), 40);
    let metrics = hybridge::admin::status::metrics_text(&cloud.state);
    assert!(
        metrics.contains("hybridge_tunnel_exports_refused_total 2"),
        "{metrics}"
    );

    // Without a declaration a listener that accepts two sites cannot tell which should
    // serve `ledger`: it routes to neither rather than to whichever connected.
    let undeclared = policy.replace("[[export]]\nservice = \"ledger\"\nsites = \"dc1\"\n", "");
    apply_policy(&cloud, &undeclared);
    let answer = http1(import, "GET", "/echo/x", &[], Bytes::new()).await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.header("x-hybridge-error"), Some("no-route"));
    assert_eq!(impostor.hits(), 0);

    raw.close();
    dc1.shutdown().await;
    dc2.shutdown().await;
    cloud.state.peers.wait_until(|links| links.is_empty()).await;
    cloud.shutdown().await;
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_supplied_trust_headers_never_reach_the_upstream() {
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let inventory = demo("inventory", &cancel).await;
    let mut cloud = NodeOptions::cloud(&pki, "cloud-1");
    cloud
        .exports
        .push(ExportSpec::http1("inventory", &[inventory.local_addr()]));
    let cloud = cloud.start().await;
    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[cloud.addresses().tunnel.unwrap()]);
    onprem.imports.push(("inventory".into(), "web".into()));
    onprem.gateway = true;
    let onprem = onprem.start().await;
    let policy = "[[rule]]\nsource = \"web\"\nsource_site = \"onprem\"\ndestination = \"inventory\"\naction = \"allow\"\n";
    apply_policy(&cloud, policy);
    apply_policy(&onprem, policy);
    assert!(onprem.wait_for_route("inventory", WAIT).await);
    // The policy database and the dir holding it are the owner's alone.
    {
        use std::os::unix::fs::PermissionsExt;
        let config = onprem.state.config.load();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&config.node.data_dir), 0o700);
        assert_eq!(mode(&config.database_path()), 0o600);
    }

    let import = import_addr(&onprem, "inventory");
    let answer = http1(
        import,
        "GET",
        "/echo/x",
        &[
            (
                "x-forwarded-client-cert",
                "By=spiffe://test.hybridge/svc/inventory;URI=spiffe://test.hybridge/svc/admin",
            ),
            ("forwarded", "for=10.9.9.9;proto=https"),
            ("x-real-ip", "10.9.9.9"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-for", "10.1.1.1"),
            ("x-hybridge-caller", "admin"),
            ("x-http-method-override", "DELETE"),
            ("x-original-url", "/api/internal/x"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(answer.status, 200);
    let headers = &answer.json()["headers"];
    for removed in [
        "x-forwarded-client-cert",
        "forwarded",
        "x-real-ip",
        "x-hybridge-caller",
        "x-http-method-override",
        "x-original-url",
    ] {
        assert!(
            headers.get(removed).is_none(),
            "{removed} reached the upstream: {headers}"
        );
    }
    assert_eq!(headers["x-forwarded-proto"], serde_json::json!(["http"]));
    assert_eq!(
        headers["x-forwarded-for"],
        serde_json::json!(["10.1.1.1, 127.0.0.1"])
    );
    // The gateway routes and forwards one host: two Host headers are refused, and an
    // absolute-form target's host replaces the Host header it came with.
    let gateway = onprem.addresses().gateway.unwrap();
    let raw_get = |target: &'static str, hosts: &'static [&'static str]| async move {
        let mut raw = tokio::net::TcpStream::connect(gateway).await.unwrap();
        let mut request = format!("GET {target} HTTP/1.1\r\n");
        for host in hosts {
            request += &format!("host: {host}\r\n");
        }
        request += "connection: close\r\n\r\n";
        tokio::io::AsyncWriteExt::write_all(&mut raw, request.as_bytes())
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut answer)
            .await
            .unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    };
    let two = raw_get("/echo/x", &["inventory.hybridge", "ledger.hybridge"]).await;
    assert!(two.starts_with("HTTP/1.1 400"), "{two}");
    assert!(two.contains("x-hybridge-error: bad-request"), "{two}");
    let absolute = raw_get("http://inventory.hybridge/echo/abs", &["ledger.hybridge"]).await;
    assert!(absolute.starts_with("HTTP/1.1 200"), "{absolute}");
    assert!(
        absolute.contains(r#""host":["inventory.hybridge"]"#),
        "the upstream saw another host than the one routed on: {absolute}"
    );

    // A denied answer names the reason, not the rule that decided it.
    apply_policy(&cloud, "");
    let denied = http1(import, "GET", "/echo/x", &[], Bytes::new()).await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.header("x-hybridge-error"), Some("acl-denied"));
    assert_eq!(denied.header("x-hybridge-acl-rule"), None);
    assert!(
        String::from_utf8_lossy(&denied.body).contains("web@onprem may not call inventory"),
        "{}",
        String::from_utf8_lossy(&denied.body)
    );
    onprem.shutdown().await;
    cloud.shutdown().await;
    cancel.cancel();
}
