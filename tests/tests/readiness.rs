//! Readiness per role, as `/readyz`, `hybridge status` and systemd's READY=1 report it: a
//! listening node is ready as soon as it can accept tunnels (so a load balancer's health check
//! passes before anyone dials it), a dialling node once every peer site has a tunnel up, and a
//! draining node is not ready. Real nodes, real processes, a real notify socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hybridge_tests::*;

async fn readyz(admin: SocketAddr) -> (u16, String) {
    let answer = http1(admin, "GET", "/readyz", &[], Bytes::new()).await;
    (
        answer.status,
        String::from_utf8_lossy(&answer.body).into_owned(),
    )
}

/// `hybridge status --admin ADMIN`: (exit code, stdout + stderr).
fn status(admin: &str) -> (i32, String) {
    let (code, stdout, stderr) = hybridge_cli(&["status", "--admin", admin]);
    (code, format!("{stdout}{stderr}"))
}

/// [`status`] from a test on the tokio runtime.
fn status_from_async(admin: &str) -> (i32, String) {
    tokio::task::block_in_place(|| status(admin))
}

/// An on-prem node dialling `cloud` quickly again after a failed dial, so a test waits for
/// the tunnel in well under a second once the cloud node is up.
fn onprem_dialling(pki: &Pki, cloud: SocketAddr) -> NodeOptions {
    let mut onprem = NodeOptions::onprem(pki, "onprem-1", &[cloud]);
    onprem.extra = "\n[limits]\nready_timeout = \"1s\"\n".into();
    onprem
}

fn with_fast_redial(config: &Path) {
    let text = std::fs::read_to_string(config).unwrap();
    std::fs::write(
        config,
        text.replace(
            "[tunnel]\n",
            "[tunnel]\nreconnect_max_backoff = \"500ms\"\nidle_timeout = \"2s\"\nkeepalive = \"500ms\"\n",
        ),
    )
    .unwrap();
}

/// Starts a node in-process from `options`, with quick redials.
async fn start_fast(options: &NodeOptions) -> hybridge::node::Node {
    let path = options.write();
    with_fast_redial(&path);
    hybridge::node::Node::start(hybridge::config::Config::load(&path).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listening_node_nobody_has_dialled_is_ready() {
    let pki = Pki::new();
    let mut options = NodeOptions::cloud(&pki, "cloud-1");
    options.admin_extra = "health_listen = \"127.0.0.1:0\"\n".into();
    let cloud = options.start().await;
    assert!(cloud.state.peers.links().is_empty());
    // The load balancer's health check: on the health listener and the admin listener.
    for admin in [cloud.addresses().health.unwrap(), cloud.addresses().admin] {
        assert_eq!(readyz(admin).await, (200, "ready\n".to_owned()));
    }
    let (code, output) = status_from_async(&format!("http://{}", cloud.addresses().admin));
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("state     ready "), "{output}");
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialling_node_is_ready_once_every_peer_site_has_a_tunnel() {
    let pki = Pki::new();
    let base = free_port_block();
    let tunnel = SocketAddr::from(([127, 0, 0, 1], base));
    let onprem = start_fast(&onprem_dialling(&pki, tunnel)).await;
    let admin = onprem.addresses().admin;

    // Nothing listens at the peer's address yet.
    let (code, body) = readyz(admin).await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.starts_with(&format!(
            "not ready: waiting for a tunnel to site cloud (peer {tunnel}: "
        )),
        "{body}"
    );
    let (code, output) = status_from_async(&unix_admin(&onprem.addresses().admin_socket));
    assert_eq!(code, 3, "{output}");
    assert!(
        output.contains("not ready: waiting for a tunnel to site cloud"),
        "{output}"
    );

    // The cloud node comes up where the on-prem node dials: ready, within a bound.
    let mut cloud = NodeOptions::cloud(&pki, "cloud-1");
    cloud.tunnel_listen = Some(tunnel);
    let cloud = start_fast(&cloud).await;
    let state = onprem.state.clone();
    tokio::time::timeout(WAIT, state.peers.wait_until(|_| state.is_ready()))
        .await
        .expect("the on-prem node did not become ready once the cloud node was up");
    assert_eq!(readyz(admin).await, (200, "ready\n".to_owned()));
    let (code, output) = status_from_async(&unix_admin(&onprem.addresses().admin_socket));
    assert_eq!(code, 0, "{output}");

    // The cloud node goes away: not ready again, saying what happened to the last tunnel.
    cloud.shutdown().await;
    tokio::time::timeout(WAIT, state.peers.wait_until(|links| links.is_empty()))
        .await
        .expect("the tunnel did not go down with the cloud node");
    let (code, body) = readyz(admin).await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("waiting for a tunnel to site cloud")
            && body.contains("last tunnel down")
            && body.contains("peer-closed"),
        "{body}"
    );
    onprem.abort().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_is_not_ready() {
    let pki = Pki::new();
    let cloud = NodeOptions::cloud(&pki, "cloud-1").start().await;
    let admin = cloud.addresses().admin;
    // A peer that never acknowledges the drain holds the node in it until the peer closes.
    let peer = RawPeer::connect(
        &pki,
        "onprem",
        "onprem-1",
        cloud.addresses().tunnel.unwrap(),
    )
    .await;
    let state = cloud.state.clone();
    tokio::time::timeout(WAIT, state.peers.wait_until(|links| links.len() == 1))
        .await
        .unwrap();
    assert_eq!(readyz(admin).await.0, 200);
    let draining = tokio::spawn(cloud.shutdown());
    tokio::time::timeout(WAIT, async {
        // The drain flag has no change signal of its own; the admin answer is the one to read.
        loop {
            let (code, body) = readyz(admin).await;
            if code == 503 {
                return body;
            }
            assert_eq!(code, 200);
            tokio::task::yield_now().await;
        }
    })
    .await
    .map(|body| assert_eq!(body, "not ready: draining\n"))
    .expect("the draining node stayed ready");
    let (code, output) = status_from_async(&format!("http://{admin}"));
    assert_eq!(code, 3, "{output}");
    assert!(output.contains("not ready: draining"), "{output}");
    peer.close();
    tokio::time::timeout(WAIT, draining).await.unwrap().unwrap();
}

/// A `NOTIFY_SOCKET` as systemd gives a `Type=notify` service: each datagram is one
/// notification, newline-separated `KEY=VALUE` lines.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
}

impl NotifySocket {
    fn bind(path: std::path::PathBuf) -> NotifySocket {
        let socket = UnixDatagram::bind(&path).unwrap();
        NotifySocket { socket, path }
    }

    /// The next notification, waiting at most `limit`.
    fn next(&self, limit: Duration) -> Vec<String> {
        self.socket.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self
            .socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification within {limit:?}: {e}"));
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// `hybridge run --config CONFIG` with `NOTIFY_SOCKET` set.
fn run_notifying(config: &Path, notify: &NotifySocket) -> ChildGuard {
    let mut command = std::process::Command::new(binary("hybridge"));
    command
        .args(["run", "--config"])
        .arg(config)
        .env("HYBRIDGE_LOG", "info")
        .env("NOTIFY_SOCKET", &notify.path);
    ChildGuard::spawn(command)
}

fn status_line(notification: &[String]) -> &str {
    notification
        .iter()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_default()
}

#[test]
fn a_listening_node_tells_systemd_ready_once_its_listeners_are_bound() {
    let pki = Pki::new();
    let notify = NotifySocket::bind(pki.path("notify.sock"));
    let cloud = NodeOptions::cloud(&pki, "cloud-1").write();
    let mut process = run_notifying(&cloud, &notify);
    let first = notify.next(WAIT);
    assert!(first.contains(&"READY=1".to_owned()), "{first:?}");
    assert_eq!(status_line(&first), "running, ready");
    process.signal(libc::SIGTERM);
    assert_eq!(notify.next(WAIT), ["STOPPING=1"]);
    assert_eq!(process.wait_exit(WAIT), Some(0), "{:?}", process.drain());
}

#[test]
fn a_dialling_node_tells_systemd_ready_once_its_tunnel_is_up() {
    let pki = Pki::new();
    let notify = NotifySocket::bind(pki.path("notify.sock"));
    let base = free_port_block();
    let tunnel = SocketAddr::from(([127, 0, 0, 1], base));
    // A bound long enough that only the tunnel can end the wait.
    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[tunnel]);
    onprem.admin = SocketAddr::from(([127, 0, 0, 1], base + 2));
    onprem.extra = "\n[limits]\nready_timeout = \"5m\"\n".into();
    let onprem = onprem.write();
    with_fast_redial(&onprem);
    let mut onprem_process = run_notifying(&onprem, &notify);
    let waiting = notify.next(WAIT);
    assert!(!waiting.contains(&"READY=1".to_owned()), "{waiting:?}");
    assert!(
        status_line(&waiting).starts_with(&format!(
            "starting, not ready: waiting for a tunnel to site cloud (peer {tunnel}: "
        )),
        "{waiting:?}"
    );

    let mut cloud = NodeOptions::cloud(&pki, "cloud-1");
    cloud.tunnel_listen = Some(tunnel);
    cloud.admin = SocketAddr::from(([127, 0, 0, 1], base + 1));
    let cloud = cloud.write();
    let mut cloud_process = run_daemon(&cloud);
    let ready = notify.next(WAIT);
    assert!(ready.contains(&"READY=1".to_owned()), "{ready:?}");
    assert_eq!(status_line(&ready), "running, ready");
    // READY=1 meant what /readyz means.
    let (code, output) = status(&format!("http://127.0.0.1:{}", base + 2));
    assert_eq!(code, 0, "{output}");

    onprem_process.signal(libc::SIGTERM);
    assert_eq!(
        onprem_process.wait_exit(WAIT),
        Some(0),
        "{:?}",
        onprem_process.drain()
    );
    cloud_process.signal(libc::SIGTERM);
    assert_eq!(
        cloud_process.wait_exit(WAIT),
        Some(0),
        "{:?}",
        cloud_process.drain()
    );
}

#[test]
fn a_dialling_node_without_its_tunnel_tells_systemd_ready_after_its_bound_saying_why() {
    let pki = Pki::new();
    let notify = NotifySocket::bind(pki.path("notify.sock"));
    let base = free_port_block();
    let tunnel = SocketAddr::from(([127, 0, 0, 1], base));
    let onprem = onprem_dialling(&pki, tunnel).write();
    with_fast_redial(&onprem);
    let started = Instant::now();
    let mut onprem_process = run_notifying(&onprem, &notify);
    let waiting = notify.next(WAIT);
    assert!(!waiting.contains(&"READY=1".to_owned()), "{waiting:?}");
    // A WAN outage at boot: READY=1 after limits.ready_timeout (1 s), so systemd neither
    // times the start out nor restarts the service, and STATUS= says what is missing.
    let ready = notify.next(WAIT);
    assert!(ready.contains(&"READY=1".to_owned()), "{ready:?}");
    assert!(
        status_line(&ready).starts_with("running, not ready: waiting for a tunnel to site cloud"),
        "{ready:?}"
    );
    assert!(started.elapsed() >= Duration::from_secs(1));

    // The tunnel comes up later: systemd's status follows.
    let mut cloud = NodeOptions::cloud(&pki, "cloud-1");
    cloud.tunnel_listen = Some(tunnel);
    cloud.admin = SocketAddr::from(([127, 0, 0, 1], base + 1));
    let mut cloud_process = run_daemon(&cloud.write());
    let later = notify.next(WAIT);
    assert_eq!(later, ["STATUS=running, ready"]);

    onprem_process.signal(libc::SIGTERM);
    assert_eq!(
        onprem_process.wait_exit(WAIT),
        Some(0),
        "{:?}",
        onprem_process.drain()
    );
    cloud_process.signal(libc::SIGTERM);
    assert_eq!(
        cloud_process.wait_exit(WAIT),
        Some(0),
        "{:?}",
        cloud_process.drain()
    );
}
