//! The TLS/TCP carrier and the automatic choice between carriers, on real nodes over
//! loopback: requests both ways on TCP (more streams opened by the listener than the
//! dialler keeps offered), bodies byte-identical, and `auto` falling back to TCP when UDP
//! is dropped, then moving back to QUIC without failing a request once UDP passes again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use hybridge::demo::{DemoUpstream, pattern_byte};
use hybridge::tunnel::connection::Carrier;
use hybridge::tunnel::outcome::DisconnectReason;
use hybridge_tests::*;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// A UDP forwarder in front of the cloud node's QUIC port that can drop everything: what an
/// enterprise firewall that blocks outbound UDP does to the on-prem node.
struct UdpGate {
    front: Arc<tokio::net::UdpSocket>,
    blocked: Arc<AtomicBool>,
    cancel: CancellationToken,
}

impl UdpGate {
    /// Binds the gate's port on 127.0.0.2, at a number whose TCP port on that address is
    /// free too: the cloud's TLS/TCP listener takes it, so that the on-prem node dials one
    /// address for both carriers. Other tests' sockets are on 127.0.0.1, so nothing takes the
    /// number before the cloud node binds it. Nothing passes until [`UdpGate::forward_to`].
    async fn bind(blocked: bool) -> UdpGate {
        for _ in 0..100 {
            let front = tokio::net::UdpSocket::bind("127.0.0.2:0").await.unwrap();
            let port = front.local_addr().unwrap().port();
            if std::net::TcpListener::bind(("127.0.0.2", port)).is_ok() {
                return UdpGate {
                    front: Arc::new(front),
                    blocked: Arc::new(AtomicBool::new(blocked)),
                    cancel: CancellationToken::new(),
                };
            }
        }
        panic!("no port on 127.0.0.2 was free for both UDP and TCP in 100 tries");
    }

    fn address(&self) -> SocketAddr {
        self.front.local_addr().unwrap()
    }

    /// Forwards datagrams to `target` while not blocked, each client address (each QUIC
    /// endpoint of the on-prem node) through a socket of its own, as a NAT keeps one mapping
    /// per flow: the answers to one connection never go to another.
    async fn forward_to(&self, target: SocketAddr) {
        let (front, blocked, cancel) = (
            self.front.clone(),
            self.blocked.clone(),
            self.cancel.clone(),
        );
        tokio::spawn(async move {
            let mut flows: HashMap<SocketAddr, Arc<tokio::net::UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let (n, from) = tokio::select! {
                    r = front.recv_from(&mut buf) => match r { Ok(r) => r, Err(_) => continue },
                    () = cancel.cancelled() => return,
                };
                if blocked.load(Ordering::SeqCst) {
                    continue;
                }
                let back = match flows.get(&from) {
                    Some(back) => back.clone(),
                    None => {
                        let back =
                            Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
                        back.connect(target).await.unwrap();
                        tokio::spawn(answer(
                            back.clone(),
                            front.clone(),
                            from,
                            blocked.clone(),
                            cancel.clone(),
                        ));
                        flows.insert(from, back.clone());
                        back
                    }
                };
                let _ = back.send(&buf[..n]).await;
            }
        });
    }

    fn set_blocked(&self, blocked: bool) {
        self.blocked.store(blocked, Ordering::SeqCst);
    }
}

/// Sends what the target answers on `back` to `client` through the gate's `front`, while
/// the gate is not blocked.
async fn answer(
    back: Arc<tokio::net::UdpSocket>,
    front: Arc<tokio::net::UdpSocket>,
    client: SocketAddr,
    blocked: Arc<AtomicBool>,
    cancel: CancellationToken,
) {
    let mut buf = vec![0u8; 65536];
    loop {
        let n = tokio::select! {
            r = back.recv(&mut buf) => match r { Ok(n) => n, Err(_) => continue },
            () = cancel.cancelled() => return,
        };
        if !blocked.load(Ordering::SeqCst) {
            let _ = front.send_to(&buf[..n], client).await;
        }
    }
}

impl Drop for UdpGate {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

struct Pair {
    _pki: Pki,
    cloud: hybridge::node::Node,
    onprem: hybridge::node::Node,
    cancel: CancellationToken,
}

impl Pair {
    async fn stop(self) {
        self.onprem.shutdown().await;
        self.cloud.shutdown().await;
        self.cancel.cancel();
    }
}

/// cloud exports `inventory` (imported on-prem for `web`); on-prem exports `ledger` (h2c,
/// imported in the cloud for `reporting`). `dial` picks the address the on-prem node dials
/// from the cloud node's UDP and TCP tunnel addresses; `cloud_tunnel` and `onprem_tunnel`
/// are extra `[tunnel]` lines.
async fn pair(
    cloud_tunnel: &str,
    onprem_tunnel: &str,
    dial: impl FnOnce(SocketAddr, SocketAddr) -> SocketAddr,
) -> (Pair, Vec<DemoUpstream>) {
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let loopback = "127.0.0.1:0".parse().unwrap();
    let inventory = DemoUpstream::start("inventory", loopback, cancel.child_token())
        .await
        .unwrap();
    let ledger = DemoUpstream::start("ledger", loopback, cancel.child_token())
        .await
        .unwrap();
    let mut cloud = NodeOptions::cloud(&pki, "cloud-1");
    cloud.tunnel_extra = cloud_tunnel.into();
    cloud
        .exports
        .push(ExportSpec::http1("inventory", &[inventory.local_addr()]));
    cloud.imports.push(("ledger".into(), "reporting".into()));
    let cloud = cloud.start().await;
    let addresses = cloud.addresses();
    let target = dial(
        addresses.tunnel.unwrap(),
        addresses
            .tunnel_tcp
            .expect("the cloud node listens for TLS/TCP tunnels"),
    );
    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[target]);
    onprem.tunnel_extra = onprem_tunnel.into();
    onprem
        .exports
        .push(ExportSpec::h2c("ledger", &[ledger.local_addr()]));
    onprem.imports.push(("inventory".into(), "web".into()));
    let onprem = onprem.start().await;
    for node in [&cloud, &onprem] {
        allow(node, "web", "inventory");
        allow(node, "reporting", "ledger");
    }
    let pair = Pair {
        _pki: pki,
        cloud,
        onprem,
        cancel,
    };
    (pair, vec![inventory, ledger])
}

async fn routes_up(p: &Pair) {
    assert!(
        p.onprem.wait_for_route("inventory", WAIT).await,
        "tunnel did not come up"
    );
    assert!(
        p.cloud.wait_for_route("ledger", WAIT).await,
        "tunnel did not come up"
    );
}

/// Waits until `node` has exactly one link, on `carrier`.
async fn one_link_on(node: &hybridge::node::Node, carrier: Carrier, otherwise: &str) {
    tokio::time::timeout(
        WAIT,
        node.state
            .peers
            .wait_until(|links| links.len() == 1 && links[0].connection.carrier() == carrier),
    )
    .await
    .expect(otherwise);
}

/// The carriers of the node's live links.
fn carriers(node: &hybridge::node::Node) -> Vec<Carrier> {
    node.state
        .peers
        .links()
        .iter()
        .map(|l| l.connection.carrier())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tcp_carrier_forwards_both_ways_with_bodies_intact() {
    const SIZE: u64 = 24 * 1024 * 1024;
    let (p, _upstreams) = pair("", "transport = \"tcp\"\n", |_, tcp| tcp).await;
    routes_up(&p).await;
    assert_eq!(carriers(&p.onprem), vec![Carrier::Tcp]);
    assert_eq!(carriers(&p.cloud), vec![Carrier::Tcp]);
    let status = hybridge_cli(&[
        "status",
        "--json",
        "--admin",
        &format!("http://{}", p.onprem.addresses().admin),
    ]);
    assert_eq!(status.0, 0, "{}{}", status.1, status.2);
    let status: serde_json::Value = serde_json::from_str(&status.1).unwrap();
    assert_eq!(status["peers"][0]["carrier"], "tcp", "{status}");

    // On-prem caller to the cloud's inventory (streams the dialler opens).
    let inventory = import_addr(&p.onprem, "inventory");
    let a = http1(
        inventory,
        "POST",
        "/echo/items",
        &[("x-custom", "kept")],
        Bytes::from_static(b"{\"sku\":42}"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["headers"]["x-custom"][0], "kept");

    // Cloud callers to the on-prem ledger: streams the listener opens, on the dialler's
    // offers. 96 at once is three times what is kept offered.
    let ledger = import_addr(&p.cloud, "ledger");
    let mut h2 = h2c(ledger).await;
    let requests = (0..96).map(|i| {
        let request = http::Request::builder()
            .uri(format!("http://ledger/echo/n{i}"))
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        let response = h2.send_request(request);
        async move { (i, collect(response.await.unwrap()).await) }
    });
    for (i, answer) in futures_util::future::join_all(requests).await {
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(answer.json()["path"], format!("/echo/n{i}"));
        assert_eq!(answer.json()["version"], "HTTP/2.0");
    }

    // A download and an upload, byte for byte, through flow control both ways.
    let mut expected = Sha256::new();
    let mut offset = 0u64;
    while offset < SIZE {
        let n = (SIZE - offset).min(65536);
        let piece: Vec<u8> = (offset..offset + n).map(pattern_byte).collect();
        expected.update(&piece);
        offset += n;
    }
    let expected = hex::encode(expected.finalize());
    let mut sender = http1_conn(inventory).await;
    let request = http::Request::builder()
        .uri(format!("/bytes/{SIZE}"))
        .header("host", "x")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let mut body = sender.send_request(request).await.unwrap().into_body();
    let (mut hasher, mut received) = (Sha256::new(), 0u64);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len() as u64;
            hasher.update(&data);
        }
    }
    assert_eq!(received, SIZE);
    assert_eq!(hex::encode(hasher.finalize()), expected);
    let chunks = futures_util::stream::iter((0..SIZE).step_by(65536)).map(|start| {
        let piece: Vec<u8> = (start..(start + 65536).min(SIZE))
            .map(pattern_byte)
            .collect();
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(piece)))
    });
    let mut sender = http1_conn(inventory).await;
    let request = http::Request::builder()
        .method("POST")
        .uri("/sha256")
        .header("host", "x")
        .body(http_body_util::StreamBody::new(chunks))
        .unwrap();
    let a = collect(sender.send_request(request).await.unwrap()).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["len"], SIZE);
    assert_eq!(a.json()["sha256"], expected.as_str());

    let metrics = scrape(&p.onprem).await;
    assert_eq!(
        sample_value(
            &metrics,
            "hybridge_tunnel_dials_total",
            &[("carrier", "tcp")]
        ),
        1.0,
        "{metrics}"
    );
    p.stop().await;
}

/// Requests from both sides in a loop until stopped: successes and failures (with the
/// first few failures' texts).
struct Load {
    stop: CancellationToken,
    ok: Arc<tokio::sync::watch::Sender<u64>>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(targets: &[SocketAddr], per_target: usize) -> Load {
        let load = Load {
            stop: CancellationToken::new(),
            ok: Arc::new(tokio::sync::watch::channel(0).0),
            failed: Arc::default(),
            tasks: Vec::new(),
        };
        let mut tasks = Vec::new();
        for &target in targets {
            for client in 0..per_target {
                let (stop, ok, failed) = (load.stop.clone(), load.ok.clone(), load.failed.clone());
                tasks.push(tokio::spawn(async move {
                    let mut sender = http1_conn(target).await;
                    let mut n = 0u64;
                    while !stop.is_cancelled() {
                        n += 1;
                        let request = http::Request::builder()
                            .uri(format!("/echo/c{client}/{n}"))
                            .header("host", "x")
                            .body(http_body_util::Full::new(Bytes::new()))
                            .unwrap();
                        match sender.send_request(request).await {
                            Ok(response) => {
                                let answer = collect(response).await;
                                if answer.status == 200 {
                                    ok.send_modify(|n| *n += 1);
                                } else {
                                    failed.lock().unwrap().push(format!(
                                        "{target}: {} {}",
                                        answer.status,
                                        String::from_utf8_lossy(&answer.body)
                                    ));
                                }
                            }
                            Err(e) => {
                                failed.lock().unwrap().push(format!("{target}: {e}"));
                                sender = http1_conn(target).await;
                            }
                        }
                    }
                }));
            }
        }
        Load { tasks, ..load }
    }

    /// Waits (bounded) until `more` further requests have succeeded.
    async fn wait_for(&self, more: u64) {
        let goal = *self.ok.borrow() + more;
        let mut ok = self.ok.subscribe();
        tokio::time::timeout(WAIT, ok.wait_for(|n| *n >= goal))
            .await
            .expect("the load stopped making progress")
            .unwrap();
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.cancel();
        for task in self.tasks {
            task.await.unwrap();
        }
        let failed = self.failed.lock().unwrap().clone();
        let ok = *self.ok.borrow();
        (ok, failed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_tcp_when_udp_is_blocked_and_moves_back_to_quic_without_failing_a_request()
 {
    // UDP to the cloud node passes a gate that drops it; the cloud's TCP listener has the
    // gate's port number, so the on-prem node dials one address for both carriers.
    let gate = UdpGate::bind(true).await;
    let port = gate.address().port();
    let started = Instant::now();
    let (p, _upstreams) = pair(
        &format!("listen_tcp = \"127.0.0.2:{port}\"\n"),
        "tcp_fallback_after = \"300ms\"\nquic_reprobe_interval = \"2s\"\nidle_timeout = \"3s\"\n",
        |_, _| gate.address(),
    )
    .await;
    gate.forward_to(p.cloud.addresses().tunnel.unwrap()).await;
    routes_up(&p).await;
    let first = started.elapsed();
    assert!(
        first < Duration::from_secs(5),
        "a blocked UDP path must cost seconds, not more: route after {first:?}"
    );
    assert_eq!(carriers(&p.onprem), vec![Carrier::Tcp]);
    let metrics = scrape(&p.onprem).await;
    assert_eq!(
        sample_value(
            &metrics,
            "hybridge_tunnel_dials_total",
            &[("carrier", "tcp")]
        ),
        1.0
    );
    assert_eq!(
        sample_value(
            &metrics,
            "hybridge_tunnel_dials_total",
            &[("carrier", "quic")]
        ),
        0.0
    );

    // Under continuous load both ways, UDP comes back: within a re-probe interval new
    // requests run on QUIC and the TCP link drains; no request fails.
    let load = Load::start(
        &[
            import_addr(&p.onprem, "inventory"),
            import_addr(&p.cloud, "ledger"),
        ],
        3,
    );
    load.wait_for(50).await;
    gate.set_blocked(false);
    one_link_on(&p.onprem, Carrier::Quic, "the link did not move to QUIC").await;
    one_link_on(&p.cloud, Carrier::Quic, "the cloud node kept its TCP link").await;
    load.wait_for(100).await;
    let (ok, failed) = load.finish().await;
    assert!(
        failed.is_empty(),
        "{} of {ok} requests failed during the switch: {failed:?}",
        failed.len()
    );
    let metrics = scrape(&p.onprem).await;
    assert_eq!(
        sample_value(
            &metrics,
            "hybridge_tunnel_carrier_switches_total",
            &[("carrier", "quic")]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        sample_value(
            &metrics,
            "hybridge_tunnel_disconnects_total",
            &[
                ("site", "cloud"),
                ("reason", DisconnectReason::Replaced.as_str())
            ]
        ),
        1.0
    );

    // And back: UDP blocked on a live QUIC link. The link goes when nothing arrives for the
    // idle timeout; the redial finds QUIC unanswered and comes up on TCP.
    gate.set_blocked(true);
    one_link_on(
        &p.onprem,
        Carrier::Tcp,
        "the node did not fall back to TCP again",
    )
    .await;
    routes_up(&p).await;
    let a = http1(
        import_addr(&p.onprem, "inventory"),
        "GET",
        "/echo/again",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(a.status, 200);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_a_configured_peer_that_is_down_with_its_last_error_and_next_retry() {
    let pki = Pki::new();
    // Nothing listens there, for TCP or UDP.
    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = nobody.local_addr().unwrap();
    drop(nobody);
    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[address]);
    onprem.tunnel_extra = "transport = \"tcp\"\n".into();
    let onprem = onprem.start().await;
    let mut failures = onprem.state.metrics.watch_handshake_failures();
    tokio::time::timeout(WAIT, failures.wait_for(|n| *n >= 1))
        .await
        .expect("the dial never failed")
        .unwrap();
    let (code, out, err) = hybridge_cli(&[
        "status",
        "--json",
        "--admin",
        &format!("http://{}", onprem.addresses().admin),
    ]);
    assert_eq!(code, 3, "not ready: {out}{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["peers"], serde_json::json!([]), "{status}");
    let slot = &status["dialing"][0];
    assert_eq!(slot["address"], address.to_string(), "{status}");
    assert_eq!(slot["site"], "cloud");
    assert_eq!(slot["state"], "failed", "{status}");
    assert!(
        slot["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("Connection refused")),
        "{status}"
    );
    assert!(slot["next_retry_ms"].as_u64().is_some(), "{status}");
    // The same in the table a person reads, and in the readiness reason.
    let (_, table, _) = hybridge_cli(&[
        "status",
        "--admin",
        &format!("http://{}", onprem.addresses().admin),
    ]);
    let row = table
        .lines()
        .find(|l| l.starts_with(&format!("{address} (cloud)")))
        .unwrap_or_else(|| panic!("no dialing row: {table}"));
    assert!(row.contains("failed") && row.contains("retry in"), "{row}");
    assert!(
        status["not_ready_reasons"][0]
            .as_str()
            .is_some_and(|r| r.contains("last attempt: TCP connect")),
        "{status}"
    );
    onprem.abort().await;
}
