//! What a misbehaving caller cannot do to a running pair: get a healthy upstream ejected by
//! abandoning uploads, or leave requests counted as active forever.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use hybridge::node::Node;
use hybridge_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    let text = hybridge::admin::status::metrics_text(&node.state);
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_abandon_uploads_do_not_get_a_healthy_upstream_ejected() {
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let (inventory, cloud) = inventory_cloud(&pki, &cancel).await;
    let cloud = cloud.start().await;
    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[cloud.addresses().tunnel.unwrap()]);
    onprem.imports.push(("inventory".into(), "web".into()));
    let onprem = onprem.start().await;
    let policy = "[[rule]]\nsource = \"web\"\nsource_site = \"onprem\"\ndestination = \"inventory\"\naction = \"allow\"\n";
    for node in [&cloud, &onprem] {
        apply_policy(node, policy);
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

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// One line of `/metrics` from a node's read-only admin listener.
async fn process_metric(admin: std::net::SocketAddr, line_prefix: &str) -> u64 {
    let answer = http1(admin, "GET", "/metrics", &[], Bytes::new()).await;
    String::from_utf8_lossy(&answer.body)
        .lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_excess_connections_cannot_crowd_out_a_well_behaved_client() {
    const MAX_CONNECTIONS: usize = 2_000;
    const IDLE: usize = 5_000;
    const STALLED_PREFACES: usize = 500;
    const GOOD_REQUESTS: usize = 1_000;
    // The node's resident memory under the attack stays under this (idle it is ~15 MiB).
    const RSS_BOUND_KIB: u64 = 64 * 1024;

    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let (_inventory, cloud) = inventory_cloud(&pki, &cancel).await;
    let cloud = cloud.start().await;
    hybridge_tests::allow(&cloud, "web", "inventory");

    // The on-prem node runs as its own process, so its memory and descriptors are its own.
    let base = free_port_block();
    let import = std::net::SocketAddr::from(([127, 0, 0, 1], base));
    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[cloud.addresses().tunnel.unwrap()]);
    onprem.admin = std::net::SocketAddr::from(([127, 0, 0, 1], base + 1));
    preallow(&onprem.data_dir, "web", "inventory");
    let config = onprem.write();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text += &format!(
        "\n[[import]]\nservice = \"inventory\"\nlisten = \"{import}\"\ncaller = \"web\"\n\n[limits]\nmax_connections = {MAX_CONNECTIONS}\nidle_timeout = \"3s\"\n"
    );
    std::fs::write(&config, text).unwrap();
    let process = run_daemon(&config);
    let pid = process.child.id();
    let admin = onprem.admin;
    wait_until_async("the on-prem node's tunnel is up", || async {
        http1(admin, "GET", "/readyz", &[], Bytes::new())
            .await
            .status
            == 200
    })
    .await;
    let good = tokio::spawn(async move {
        // A well-behaved client: one keep-alive connection, opened before the attack.
        let mut sender = http1_conn::<http_body_util::Full<Bytes>>(import).await;
        let mut failures = 0;
        for i in 0..GOOD_REQUESTS {
            let request = http::Request::get(format!("/echo/{i}"))
                .header("host", "inventory")
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap();
            match sender.send_request(request).await {
                Ok(response) if response.status() == 200 => {
                    let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                }
                Ok(response) => {
                    eprintln!(
                        "good request {i}: {} {:?}",
                        response.status(),
                        response.headers().get("x-hybridge-error")
                    );
                    failures += 1
                }
                Err(e) => {
                    eprintln!("good request {i}: {e}");
                    failures += 1
                }
            }
        }
        failures
    });
    // Wait until the good client holds its connection, then attack.
    wait_until_async("the well-behaved client is connected", || async {
        process_metric(
            admin,
            &format!("hybridge_listener_connections{{listener=\"import:inventory@{import}\"}}"),
        )
        .await
            >= 1
    })
    .await;
    let mut attackers = Vec::with_capacity(IDLE + STALLED_PREFACES);
    for i in 0..IDLE + STALLED_PREFACES {
        let Ok(mut stream) = tokio::net::TcpStream::connect(import).await else {
            continue;
        };
        if i >= IDLE {
            // Half an HTTP/2 preface, then nothing.
            let _ = stream.write_all(b"PRI * HTTP/2.0\r\n").await;
        }
        attackers.push(stream);
    }
    let peak_rss = rss_kib(pid);
    let listener = format!("{{listener=\"import:inventory@{import}\"}}");
    let open = process_metric(admin, &format!("hybridge_listener_connections{listener}")).await;
    assert!(
        open as usize <= MAX_CONNECTIONS,
        "{open} connections open over a cap of {MAX_CONNECTIONS}"
    );
    let failures = good.await.unwrap();
    assert_eq!(failures, 0, "the well-behaved client's requests failed");

    // Every connection over the cap is refused once the node has taken it from the backlog.
    // On a loaded machine the attack can outlast the idle timeout: an idle connection closed
    // meanwhile freed its place for a later one. (Closes are read before refusals, so the
    // bound is never loosened by a close that came after.)
    let over_cap = attackers.len() + 1 - MAX_CONNECTIONS;
    let (refused_total, idle_closed_total) = (
        format!("hybridge_listener_connections_refused_total{listener}"),
        format!("hybridge_listener_idle_closed_total{listener}"),
    );
    wait_until_async("every connection over the cap was refused", || async {
        let idle_closed = process_metric(admin, &idle_closed_total).await as usize;
        let refused = process_metric(admin, &refused_total).await as usize;
        refused + idle_closed >= over_cap
    })
    .await;
    // Every attacking connection is closed: refused at once, or idle after the timeout.
    let closed = tokio::time::timeout(WAIT, async {
        for stream in &mut attackers {
            let mut byte = [0u8; 1];
            let _ = stream.read(&mut byte).await;
        }
    })
    .await;
    assert!(closed.is_ok(), "attacking connections were left open");
    let idle_closed = process_metric(admin, &idle_closed_total).await;
    assert!(
        idle_closed as usize >= MAX_CONNECTIONS - 1,
        "{idle_closed} idle connections closed"
    );
    assert!(
        peak_rss < RSS_BOUND_KIB,
        "the node used {peak_rss} KiB under the attack"
    );
    eprintln!(
        "peak RSS under {} open connections: {peak_rss} KiB",
        MAX_CONNECTIONS
    );
    // The listener takes new connections again.
    let answer = http1(import, "GET", "/echo/after", &[], Bytes::new()).await;
    assert_eq!(answer.status, 200);
    drop(process);
    cloud.shutdown().await;
    cancel.cancel();
}

/// [`wait_until`] for a condition that has to be fetched.
async fn wait_until_async<F: std::future::Future<Output = bool>>(
    what: &str,
    mut condition: impl FnMut() -> F,
) {
    let waited = tokio::time::timeout(WAIT, async {
        while !condition().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting until {what}");
}

/// An admin listener holds at most 64 connections; ones that send nothing are closed after
/// the admin idle timeout (10 s), so a load balancer's health check gets through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_hold_an_admin_listener() {
    let pki = Pki::new();
    let cloud = NodeOptions::cloud(&pki, "cloud-1").start().await;
    let admin = cloud.addresses().admin;
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(tokio::net::TcpStream::connect(admin).await.unwrap());
    }
    let health = tokio::time::timeout(
        Duration::from_secs(40),
        http1(admin, "GET", "/healthz", &[], Bytes::new()),
    )
    .await
    .expect("the health check never got a connection");
    assert_eq!(health.status, 200);
    for mut stream in idle {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(WAIT, stream.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "an idle admin connection was kept: {read:?}"
        );
    }
    cloud.shutdown().await;
}
