//! What a misbehaving caller cannot do to a running pair: get a healthy upstream ejected by
//! abandoning uploads, or leave requests counted as active forever.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use hybridge::demo::DemoUpstream;
use hybridge::node::Node;
use hybridge_tests::*;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// Waits (at most `WAIT`) until `condition` holds, checking it every few milliseconds; the
/// condition is state the nodes expose, not time.
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(WAIT, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting until {what}");
}

fn metric(node: &Node, line_prefix: &str) -> u64 {
    let mut text = String::new();
    node.state.metrics.render(&mut text);
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_abandon_uploads_do_not_get_a_healthy_upstream_ejected() {
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let inventory = DemoUpstream::start(
        "inventory",
        "127.0.0.1:0".parse().unwrap(),
        cancel.child_token(),
    )
    .await
    .unwrap();
    let mut cloud = NodeOptions::cloud(&pki, "cloud-1");
    cloud
        .exports
        .push(ExportSpec::http1("inventory", &[inventory.local_addr()]));
    let cloud = cloud.start().await;
    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[cloud.addresses().tunnel.unwrap()]);
    onprem.imports.push(("inventory".into(), "web".into()));
    let onprem = onprem.start().await;
    let policy = "[[rule]]\nsource = \"web\"\nsource_site = \"onprem\"\ndestination = \"inventory\"\naction = \"allow\"\n";
    for node in [&cloud, &onprem] {
        let policy = hybridge::acl::parse_acl_file(Path::new("policy.toml"), policy).unwrap();
        node.state.acl.apply(policy, "test", false).unwrap();
    }
    assert!(onprem.wait_for_route("inventory", WAIT).await);
    let import = import_addr(&onprem, "inventory");

    const ABANDONED: u64 = 20;
    let chunk = vec![b'x'; 1024 * 1024];
    for i in 0..ABANDONED {
        // Announce 10 MiB, send 1 MiB, hang up once the upstream is reading the body.
        let mut caller = tokio::net::TcpStream::connect(import).await.unwrap();
        caller
            .write_all(
                b"POST /sha256 HTTP/1.1\r\nhost: inventory\r\ncontent-length: 10485760\r\n\r\n",
            )
            .await
            .unwrap();
        caller.write_all(&chunk).await.unwrap();
        wait_until("the upstream received the request head", || {
            inventory.hits() == i + 1
        })
        .await;
        drop(caller);
    }
    let export_aborted = "hybridge_bridge_errors_total{side=\"export\",service=\"inventory\",reason=\"client-aborted\"}";
    // The caller that hung up gets (nobody gets) the export's 499 through the import.
    let import_aborted =
        "hybridge_requests_total{side=\"import\",service=\"inventory\",class=\"4xx\"}";
    wait_until("every abandoned upload was counted on both nodes", || {
        metric(&cloud, export_aborted) == ABANDONED && metric(&onprem, import_aborted) == ABANDONED
    })
    .await;
    wait_until("no request is counted as active", || {
        metric(
            &cloud,
            "hybridge_active_requests{side=\"export\",service=\"inventory\"}",
        ) == 0
            && metric(
                &onprem,
                "hybridge_active_requests{side=\"import\",service=\"inventory\"}",
            ) == 0
    })
    .await;

    let upstream = cloud.state.export.services.load()["inventory"].clone();
    let endpoint = &upstream.stats().endpoints[0];
    assert!(
        endpoint.healthy && !endpoint.ejected,
        "the endpoint was judged on its callers: {endpoint:?}"
    );
    assert_eq!(endpoint.failures, 0, "{endpoint:?}");
    let answer = http1(import, "GET", "/echo/after", &[], Bytes::new()).await;
    assert_eq!(answer.status, 200);

    // An HTTP/2 caller that cancels its request (RST_STREAM) while the upstream works on it:
    // hyper drops the request's handler, which still leaves an access-log line and a
    // `client-aborted` count, and gives its active-request count back.
    let mut h2 = h2c(import).await;
    let hits = inventory.hits();
    let request = http::Request::get("/slow?ms=60000")
        .header("host", "inventory")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let pending = tokio::spawn(async move { h2.send_request(request).await.map(|_| ()) });
    wait_until("the upstream received the slow request", || {
        inventory.hits() == hits + 1
    })
    .await;
    pending.abort();
    let import_cancelled = "hybridge_bridge_errors_total{side=\"import\",service=\"inventory\",reason=\"client-aborted\"}";
    // The export node stops waiting on the upstream for a caller that is gone.
    wait_until("the cancelled request was counted and released", || {
        metric(&onprem, import_cancelled) == 1
            && metric(&cloud, export_aborted) == ABANDONED + 1
            && metric(
                &onprem,
                "hybridge_active_requests{side=\"import\",service=\"inventory\"}",
            ) == 0
    })
    .await;

    onprem.shutdown().await;
    cloud.shutdown().await;
    cancel.cancel();
}
