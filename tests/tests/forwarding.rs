//! End to end through real nodes on loopback: import → QUIC tunnel → export → upstream and
//! back, in both directions, with real HTTP/1.1 and HTTP/2 clients and demo upstreams.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hybridge::demo::{DemoUpstream, pattern_byte};
use hybridge::workers::Workers;
use hybridge_tests::*;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

struct Pair {
    _pki: Pki,
    cloud: hybridge::node::Node,
    onprem: hybridge::node::Node,
    inventory: DemoUpstream,
    _ledger: DemoUpstream,
    cancel: CancellationToken,
}

/// cloud exports `inventory` (imported on-prem for caller `web`); on-prem exports
/// `ledger` (imported in the cloud for caller `reporting`).
async fn pair() -> Pair {
    pair_on(None, None, Carrier::Quic).await
}

/// The tunnel carrier the on-prem node dials.
#[derive(Clone, Copy, Debug)]
enum Carrier {
    Quic,
    Tcp,
}

/// [`pair`] with each node's data plane on the given workers, or on the test's runtime,
/// dialling `carrier`.
async fn pair_on(
    cloud_on: Option<&Arc<Workers>>,
    onprem_on: Option<&Arc<Workers>>,
    carrier: Carrier,
) -> Pair {
    let start = |options: NodeOptions, workers: Option<&Arc<Workers>>| {
        let workers = workers.cloned();
        async move {
            match workers {
                Some(workers) => options.start_on(&workers).await,
                None => options.start().await,
            }
        }
    };
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
    cloud
        .exports
        .push(ExportSpec::http1("inventory", &[inventory.local_addr()]));
    cloud.imports.push(("ledger".into(), "reporting".into()));
    let cloud = start(cloud, cloud_on).await;
    let addresses = cloud.addresses();
    let target = match carrier {
        Carrier::Quic => addresses.tunnel,
        Carrier::Tcp => addresses.tunnel_tcp,
    };
    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[target.unwrap()]);
    if let Carrier::Tcp = carrier {
        onprem.tunnel_extra = "transport = \"tcp\"\n".into();
    }
    onprem
        .exports
        .push(ExportSpec::h2c("ledger", &[ledger.local_addr()]));
    onprem.imports.push(("inventory".into(), "web".into()));
    onprem.gateway = true;
    let onprem = start(onprem, onprem_on).await;
    for node in [&cloud, &onprem] {
        allow(node, "web", "inventory");
        allow(node, "reporting", "ledger");
    }
    assert!(
        onprem.wait_for_route("inventory", WAIT).await,
        "tunnel did not come up"
    );
    assert!(
        cloud.wait_for_route("ledger", WAIT).await,
        "tunnel did not come up"
    );
    Pair {
        _pki: pki,
        cloud,
        onprem,
        inventory,
        _ledger: ledger,
        cancel,
    }
}

impl Pair {
    async fn stop(self) {
        self.onprem.shutdown().await;
        self.cloud.shutdown().await;
        self.cancel.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cross_the_tunnel_in_both_directions_with_headers_intact() {
    let p = pair().await;
    let inventory = import_addr(&p.onprem, "inventory");
    let body = Bytes::from_static(b"{\"sku\":42}");
    let a = http1(
        inventory,
        "POST",
        "/echo/items?sku=42",
        &[
            ("content-type", "application/json"),
            ("x-custom", "kept"),
            ("x-hybridge-caller", "admin"),
            ("connection", "x-drop"),
            ("x-drop", "1"),
        ],
        body.clone(),
    )
    .await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.header("x-demo-upstream"), Some("inventory"));
    let echo = a.json();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/echo/items");
    assert_eq!(echo["query"], "sku=42");
    assert_eq!(echo["body_len"], 10);
    assert_eq!(echo["body_sha256"], hex::encode(Sha256::digest(&body)));
    let headers = &echo["headers"];
    assert_eq!(headers["x-custom"][0], "kept");
    assert_eq!(headers["content-type"][0], "application/json");
    assert!(
        headers.get("x-hybridge-caller").is_none(),
        "callers cannot assert identity: {headers}"
    );
    assert!(
        headers.get("x-drop").is_none(),
        "headers named in Connection are hop-by-hop"
    );
    assert_eq!(headers["x-forwarded-for"][0], "127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"][0], "http");
    let request_id = headers["x-request-id"][0].as_str().unwrap();
    assert_eq!(request_id.len(), 36);

    // The other direction: the cloud caller reaches the on-prem ledger over the on-prem
    // node's outbound connection, and the upstream speaks h2c.
    let ledger = import_addr(&p.cloud, "ledger");
    let b = http1(
        ledger,
        "GET",
        "/echo/balance",
        &[("x-request-id", "trace-me-1")],
        Bytes::new(),
    )
    .await;
    assert_eq!(b.status, 200);
    assert_eq!(b.header("x-demo-upstream"), Some("ledger"));
    assert_eq!(b.json()["version"], "HTTP/2.0");
    assert_eq!(b.json()["headers"]["x-request-id"][0], "trace-me-1");

    // HTTP/2 caller, with the gateway routing by Host.
    let gateway = p.onprem.addresses().gateway.unwrap();
    let mut h2 = h2c(gateway).await;
    let request = http::Request::builder()
        .uri(format!(
            "http://inventory.hybridge:{}/echo/h2",
            gateway.port()
        ))
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let c = collect(h2.send_request(request).await.unwrap()).await;
    assert_eq!(c.status, 200);
    assert_eq!(c.json()["path"], "/echo/h2");
    assert_eq!(
        c.json()["headers"]["host"][0],
        format!("inventory.hybridge:{}", gateway.port())
    );
    p.stop().await;
}

/// A completed exchange ends both directions of its tunnel stream with FIN, read by the other
/// side: a stream dropped one step short of its FIN is stopped (STOP_SENDING), which costs a
/// packet and an ACK on every request (it tripled the datagrams per small request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_exchanges_end_their_streams_without_stopping_them() {
    const EACH: usize = 40;
    let p = pair().await;
    let inventory = import_addr(&p.onprem, "inventory");
    let mut conn = http1_conn::<http_body_util::Full<Bytes>>(inventory).await;
    for i in 0..EACH * 2 {
        // Bodiless GETs (the request's FIN trails its head) and small POSTs, all answered
        // with a body of declared length (which hyper stops reading at that length).
        let (method, body) = if i % 2 == 0 {
            ("GET", Bytes::new())
        } else {
            ("POST", Bytes::from_static(b"{\"sku\":42}"))
        };
        let request = http::Request::builder()
            .method(method)
            .uri("/echo/small")
            .header("host", "inventory")
            .body(http_body_util::Full::new(body))
            .unwrap();
        conn.ready().await.unwrap();
        let answer = collect(conn.send_request(request).await.unwrap()).await;
        assert_eq!(answer.status, 200);
    }
    let mut stopped = Vec::new();
    let mut reset = Vec::new();
    for node in [&p.onprem, &p.cloud] {
        let admin = node.addresses().admin;
        let status = http1(admin, "GET", "/v1/status", &[], Bytes::new())
            .await
            .json();
        for peer in status["peers"].as_array().unwrap() {
            stopped.push(peer["streams_stopped"].as_u64().unwrap());
            reset.push(peer["streams_reset"].as_u64().unwrap());
        }
    }
    // Every stream used to be stopped by both sides (2 per request). The FIN usually shares
    // the last frame's packet; on a multi-thread runtime the connection driver can, rarely,
    // send the two apart, so a few stops are tolerated. QUIC answers a STOP_SENDING for a
    // stream not yet wholly acknowledged with a RESET_STREAM (RFC 9000 §3.5), so each stop
    // may cost one reset on the other side, and no reset may come from anything else.
    let total: u64 = stopped.iter().sum();
    assert!(
        total <= (EACH / 4) as u64,
        "STOP_SENDING sent per connection: {stopped:?}"
    );
    assert!(
        reset.iter().sum::<u64>() <= total,
        "RESET_STREAM sent per connection: {reset:?}, beyond the {stopped:?} stops it answers"
    );
    p.stop().await;
}

/// Each request's on-prem tunnel streams per worker (worker number → streams).
fn streams_per_worker(node: &hybridge::node::Node) -> BTreeMap<usize, u64> {
    let mut per_worker = BTreeMap::new();
    for link in node.state.peers.links().iter() {
        *per_worker.entry(link.worker).or_default() += link.total_streams();
    }
    per_worker
}

/// A node spread over worker threads, as `hybridge run` is on a multi-CPU host: every
/// worker dials tunnels of its own, the peer's workers get one each, the kernel spreads callers' connections over the
/// workers' listeners, and a request goes out over a tunnel of the worker that accepted
/// its connection, so it never waits for another thread. Then both nodes drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_have_their_own_tunnels_and_keep_each_request_on_its_thread() {
    workers_keep_requests_on_their_threads(Carrier::Quic).await;
}

/// The same over the TLS/TCP carrier, whose listening node moves an accepted tunnel to the
/// worker holding the fewest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_have_their_own_tls_tcp_tunnels_and_keep_each_request_on_its_thread() {
    workers_keep_requests_on_their_threads(Carrier::Tcp).await;
}

async fn workers_keep_requests_on_their_threads(carrier: Carrier) {
    let workers = Arc::new(Workers::spawn(2).unwrap());
    let p = pair_on(Some(&workers), Some(&workers), carrier).await;
    // The configured one connection to the peer, per worker.
    tokio::time::timeout(WAIT, p.onprem.state.peers.wait_until(|l| l.len() == 2))
        .await
        .expect("every worker dials its tunnels");
    let status = http1(
        p.onprem.addresses().admin,
        "GET",
        "/v1/status",
        &[],
        Bytes::new(),
    )
    .await
    .json();
    assert_eq!(status["workers"], 2, "{status}");
    let mut links_per_worker = BTreeMap::new();
    for peer in status["peers"].as_array().unwrap() {
        *links_per_worker
            .entry(peer["worker"].as_u64().unwrap())
            .or_insert(0) += 1;
    }
    assert_eq!(
        links_per_worker,
        BTreeMap::from([(1, 1), (2, 1)]),
        "{status}"
    );
    // The node accepting them gives each worker one (left to the kernel's hash of the
    // addresses, both would share one worker half of the time).
    tokio::time::timeout(WAIT, p.cloud.state.peers.wait_until(|l| l.len() == 2))
        .await
        .expect("the cloud node accepts both tunnels");
    let mut accepted_per_worker = BTreeMap::new();
    for link in p.cloud.state.peers.links().iter() {
        *accepted_per_worker.entry(link.worker).or_insert(0) += 1;
    }
    assert_eq!(accepted_per_worker, BTreeMap::from([(1, 1), (2, 1)]));

    let inventory = import_addr(&p.onprem, "inventory");
    let get = || {
        http::Request::builder()
            .uri("/echo/w")
            .header("host", "inventory")
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap()
    };
    // One caller connection: all of its requests use the tunnels of one worker (random
    // routing over both workers' tunnels would split 20 requests with certainty ~1 - 2^-19).
    let mut conn = http1_conn(inventory).await;
    for _ in 0..20 {
        conn.ready().await.unwrap();
        assert_eq!(
            collect(conn.send_request(get()).await.unwrap())
                .await
                .status,
            200
        );
    }
    let first = streams_per_worker(&p.onprem);
    let used: Vec<u64> = first.values().copied().collect();
    assert!(
        used == [20, 0] || used == [0, 20],
        "streams per worker: {used:?}"
    );

    // 32 more callers: the listeners' shared port spreads them over both workers.
    let mut callers = Vec::new();
    for _ in 0..32 {
        callers.push(tokio::spawn(async move {
            let mut conn = http1_conn(inventory).await;
            for _ in 0..4 {
                conn.ready().await.unwrap();
                let answer = collect(conn.send_request(get()).await.unwrap()).await;
                assert_eq!(answer.status, 200);
            }
        }));
    }
    for caller in callers {
        caller.await.unwrap();
    }
    let then = streams_per_worker(&p.onprem);
    assert_eq!(then.values().sum::<u64>(), 20 + 32 * 4, "{then:?}");
    // Each worker served some of them (all 32 on one: 2 in 2^32).
    assert!(
        then.iter().all(|(worker, n)| *n > first[worker]),
        "streams per worker before {first:?}, after {then:?}"
    );
    p.stop().await;
    workers.stop();
}

fn link_ids(node: &hybridge::node::Node) -> Vec<usize> {
    node.state.peers.links().iter().map(|l| l.id()).collect()
}

/// A peer whose address changes (a NAT rebinding) keeps its tunnel to a node whose workers
/// share the listen port. The kernel may give the new address to another worker's socket;
/// that socket hands the datagrams to the worker whose connection they are for, and the
/// connection migrates. Without the hand-off, that worker's endpoint would not know the
/// connection and would reset it (each round crosses to the other worker half the time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_changes_address_keeps_its_tunnel_to_a_node_with_workers() {
    let workers = Arc::new(Workers::spawn(2).unwrap());
    let p = pair_on(Some(&workers), None, Carrier::Quic).await;
    let inventory = import_addr(&p.onprem, "inventory");
    let tunnel = link_ids(&p.onprem);
    assert_eq!(tunnel.len(), 1);
    let mut conn = http1_conn(inventory).await;
    for round in 0..10 {
        p.onprem.rebind_tunnels().unwrap();
        let request = http::Request::builder()
            .uri("/echo/moved")
            .header("host", "inventory")
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        conn.ready().await.unwrap();
        let answer = collect(conn.send_request(request).await.unwrap()).await;
        assert_eq!(answer.status, 200, "round {round}: {:?}", answer.body);
        assert_eq!(
            link_ids(&p.onprem),
            tunnel,
            "round {round}: the tunnel was replaced"
        );
    }
    p.stop().await;
    workers.stop();
}

/// What curl does for larger uploads: send the head with `Expect: 100-continue`, wait for
/// `100 Continue`, then send the body. The import listener must answer the 100 itself (the
/// body has not arrived, so it cannot go out with the head) and then stream the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_gets_its_interim_response_then_the_body_crosses() {
    use tokio::io::AsyncWriteExt;
    let p = pair().await;
    let inventory = import_addr(&p.onprem, "inventory");
    let body = vec![b'z'; 3000];
    let mut conn = tokio::net::TcpStream::connect(inventory).await.unwrap();
    let head = format!(
        "POST /echo/upload HTTP/1.1\r\nhost: inventory\r\ncontent-length: {}\r\n\
         expect: 100-continue\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let interim = read_response(&mut conn).await;
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n"),
        "{interim}"
    );
    conn.write_all(&body).await.unwrap();
    let text = read_response(&mut conn).await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    let echo: serde_json::Value =
        serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(echo["body_len"], 3000);
    assert_eq!(echo["body_sha256"], hex::encode(Sha256::digest(&body)));
    assert!(
        echo["headers"].get("expect").is_none(),
        "the expectation was met hop by hop, not forwarded: {}",
        echo["headers"]
    );
    p.stop().await;
}

/// Reads one HTTP/1.1 response (head, and a body of its content-length) from a raw socket.
async fn read_response(conn: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        loop {
            let n = conn
                .read(&mut buf)
                .await
                .expect("connection reset under the client");
            assert!(n > 0, "closed before a whole response");
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer);
            if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.parse().unwrap());
                if rest.len() >= len {
                    return text.into_owned();
                }
            }
        }
    })
    .await
    .expect("no whole response in time")
}

/// A client that writes its whole body before reading must still read a refusal, and keep
/// its connection: the listener drains a refused body (up to 1 MiB) instead of closing on
/// unread bytes, which would reset the connection under the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_body_is_drained_so_the_client_reads_the_answer() {
    use tokio::io::AsyncWriteExt;
    let p = pair().await;
    let gateway = p.onprem.addresses().gateway.unwrap();
    let mut conn = tokio::net::TcpStream::connect(gateway).await.unwrap();
    let body = vec![b'q'; 512 * 1024];
    for round in 0..2 {
        // `web` may not call ledger: 403 before any byte of the body is needed.
        let head = format!(
            "POST /upload HTTP/1.1\r\nhost: ledger.hybridge\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let mut request = head.into_bytes();
        request.extend_from_slice(&body);
        conn.write_all(&request).await.unwrap();
        let text = read_response(&mut conn).await;
        assert!(text.starts_with("HTTP/1.1 403 "), "round {round}: {text}");
        assert!(text.contains("x-hybridge-error: acl-denied"), "{text}");
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_codes_and_trailers_pass_through() {
    let p = pair().await;
    let inventory = import_addr(&p.onprem, "inventory");
    for code in [201u16, 204, 404, 503] {
        let a = http1(
            inventory,
            "GET",
            &format!("/status/{code}"),
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(a.status, code);
        assert!(
            a.header("x-hybridge-error").is_none(),
            "upstream statuses are not bridge errors"
        );
    }
    let mut h2 = h2c(inventory).await;
    let request = http::Request::builder()
        .uri("/trailers")
        .header("te", "trailers")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let t = collect(h2.send_request(request).await.unwrap()).await;
    assert_eq!(t.status, 200);
    let expected = hex::encode(Sha256::digest(&t.body));
    assert_eq!(t.trailers.unwrap()["x-checksum"], expected.as_str());
    p.stop().await;
}

/// `GET /bytes/{size}` from the demo upstream over a fresh HTTP/1.1 connection: the
/// response with its head read (200) and its body not yet.
async fn download(addr: std::net::SocketAddr, size: u64) -> http::Response<hyper::body::Incoming> {
    let mut sender = http1_conn(addr).await;
    let request = http::Request::builder()
        .uri(format!("/bytes/{size}"))
        .header("host", "x")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_upload_and_download_arrive_byte_identical() {
    const SIZE: u64 = 100 * 1024 * 1024;
    let p = pair().await;
    let inventory = import_addr(&p.onprem, "inventory");
    let mut expected = Sha256::new();
    let chunk: Vec<u8> = (0..65536u64).map(pattern_byte).collect();
    // 65536 is not a multiple of 251, so generate the pattern continuously.
    let mut offset = 0u64;
    while offset < SIZE {
        let n = (SIZE - offset).min(65536);
        let piece: Vec<u8> = (offset..offset + n).map(pattern_byte).collect();
        expected.update(&piece);
        offset += n;
    }
    let expected = hex::encode(expected.finalize());
    drop(chunk);

    // Download: stream and hash without holding it.
    let mut body = download(inventory, SIZE).await.into_body();
    let (mut hasher, mut received) = (Sha256::new(), 0u64);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len() as u64;
            hasher.update(&data);
        }
    }
    assert_eq!(received, SIZE);
    assert_eq!(hex::encode(hasher.finalize()), expected);

    // Upload: a streamed body of unknown length (chunked), hashed by the upstream.
    let mut sender = http1_conn(inventory).await;
    let chunks = futures_util::stream::iter((0..SIZE).step_by(65536)).map(|start| {
        let piece: Vec<u8> = (start..(start + 65536).min(SIZE))
            .map(pattern_byte)
            .collect();
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(piece)))
    });
    let request = http::Request::builder()
        .method("POST")
        .uri("/sha256")
        .header("host", "x")
        .body(StreamBody::new(chunks))
        .unwrap();
    let a = collect(sender.send_request(request).await.unwrap()).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["len"], SIZE);
    assert_eq!(a.json()["sha256"], expected.as_str());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_errors_are_explicit() {
    let p = pair().await;
    let inventory = import_addr(&p.onprem, "inventory");
    // ACL: `web` may call inventory, but the on-prem ledger import in the cloud is for
    // `reporting`; a rule removed on both sides turns into 403 with the reason.
    let gateway = p.onprem.addresses().gateway.unwrap();
    let denied = http1(
        gateway,
        "GET",
        "/",
        &[("host", "ledger.hybridge")],
        Bytes::new(),
    )
    .await;
    // The gateway's caller is `web`, which no rule allows to reach ledger.
    assert_eq!(denied.status, 403);
    assert_eq!(denied.header("x-hybridge-error"), Some("acl-denied"));
    assert_eq!(
        denied.header("x-hybridge-acl-rule"),
        None,
        "rule ids stay internal"
    );

    let unknown = http1(
        gateway,
        "GET",
        "/",
        &[("host", "example.com")],
        Bytes::new(),
    )
    .await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.header("x-hybridge-error"), Some("unknown-host"));

    // Nobody exports `nothing`: allowed by policy, but there is no route.
    allow(&p.onprem, "web", "nothing");
    let no_route = http1(
        gateway,
        "GET",
        "/",
        &[("host", "nothing.hybridge")],
        Bytes::new(),
    )
    .await;
    assert_eq!(no_route.status, 503);
    assert_eq!(no_route.header("x-hybridge-error"), Some("no-route"));

    // Oversized request headers: 431 from the import listener, nothing crosses.
    let big = "a".repeat(70 * 1024);
    let too_big = http1(inventory, "GET", "/echo", &[("x-big", &big)], Bytes::new()).await;
    assert_eq!(too_big.status, 431);

    // A dead upstream: the export side answers 502/503 with the reason.
    p.inventory_stop().await;
    let dead = http1(inventory, "GET", "/echo", &[], Bytes::new()).await;
    assert!(matches!(dead.status, 502 | 503), "status {}", dead.status);
    let reason = dead.header("x-hybridge-error").unwrap();
    assert!(
        ["upstream-connect-failed", "no-healthy-upstream"].contains(&reason),
        "{reason}"
    );
    p.stop().await;
}

impl Pair {
    async fn inventory_stop(&self) {
        self.cancel.cancel();
        self.inventory.closed().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_udp_port_harms_nobody() {
    let p = pair().await;
    let tunnel = p.cloud.addresses().tunnel.unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        let len = 1 + (i as usize * 37) % 1400;
        let junk: Vec<u8> = (0..len)
            .map(|j| (j as u32 ^ i.wrapping_mul(2654435761)) as u8)
            .collect();
        socket.send_to(&junk, tunnel).unwrap();
    }
    let inventory = import_addr(&p.onprem, "inventory");
    let a = http1(inventory, "GET", "/echo/after-garbage", &[], Bytes::new()).await;
    assert_eq!(a.status, 200);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_with_a_foreign_ca_the_wrong_site_or_a_revoked_certificate_are_refused() {
    let pki = Pki::new();
    // A node certificate revoked before the cloud node starts, and the CA's CRL in its config.
    // (NodeOptions issues the node's certificate, so build it before revoking.)
    let revoked_options = NodeOptions::onprem(&pki, "onprem-r", &[]);
    let revoked_count = pki
        .ca
        .revoke_spiffe(
            &hybridge_ca::SpiffeId::node(TRUST_DOMAIN, "onprem", "onprem-r").unwrap(),
            hybridge_ca::registry::RevocationReason::KeyCompromise,
        )
        .unwrap();
    assert_eq!(revoked_count, 1);
    let crl = pki.path("ca.crl");
    std::fs::write(&crl, pki.ca.crl_pem().unwrap()).unwrap();
    let cloud_options = NodeOptions::cloud(&pki, "cloud-1");
    let config = cloud_options.write();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(
            "[tls]\n",
            &format!("[tls]\ncrl = {:?}\n", crl.display().to_string()),
        ),
    )
    .unwrap();
    let cloud = hybridge::node::Node::start(hybridge::config::Config::load(&config).unwrap())
        .await
        .unwrap();
    let tunnel = cloud.addresses().tunnel.unwrap();

    // Same trust domain name, different CA.
    let foreign = Pki::new();
    let mut stranger = NodeOptions::onprem(&foreign, "onprem-x", &[tunnel]);
    stranger.data_dir = foreign.path("data");
    let stranger = stranger.start().await;
    // A node of our CA, but of a site the cloud node does not accept.
    let mut wrong_site = NodeOptions::onprem(&pki, "lab-1", &[tunnel]);
    wrong_site.site = "lab".into();
    wrong_site.files = pki.node("lab", "lab-1");
    let wrong_site = wrong_site.start().await;
    let mut revoked = revoked_options;
    revoked.peers = vec![(tunnel, "cloud".into(), 1)];
    let revoked = revoked.start().await;

    // Wait on each refusal being counted (by reason), not on time; refused dialers retry, so
    // the total alone says nothing about which peers were seen. Each is counted under the
    // check that failed, never under text from the certificate. The stranger refuses the
    // cloud node first (our CA is foreign to it): the cloud node sees its peer close the
    // handshake and does not take the peer's word for why; the stranger counts why.
    use hybridge::tunnel::outcome::HandshakeFailure;
    async fn counted(node: &hybridge::node::Node, reasons: &[HandshakeFailure]) -> String {
        let metrics = &node.state.metrics;
        let mut failures = metrics.watch_handshake_failures();
        let all_seen = || reasons.iter().all(|r| metrics.handshake_failures(*r) > 0);
        let seen = tokio::time::timeout(WAIT, async {
            while !all_seen() {
                failures.changed().await.unwrap();
            }
        })
        .await;
        let text = hybridge::admin::status::metrics_text(&node.state);
        assert!(seen.is_ok(), "not every refusal was counted: {text}");
        text
    }
    let text = counted(
        &cloud,
        &[
            HandshakeFailure::RefusedByPeer,
            HandshakeFailure::WrongSite,
            HandshakeFailure::Revoked,
        ],
    )
    .await;
    let stranger_text = counted(&stranger, &[HandshakeFailure::UnknownCa]).await;
    // The serial of a refused certificate stays in the log.
    assert!(!text.contains("serial"), "{text}");
    assert!(!stranger_text.contains("serial"), "{stranger_text}");
    assert!(cloud.state.peers.links().is_empty());
    stranger.abort().await;
    wrong_site.abort().await;
    revoked.abort().await;
    cloud.shutdown().await;
}

/// A node tells a draining peer it is done with it (DrainAck) only once the requests it
/// sent over that tunnel have finished: the peer closes the connection right after, and
/// before this a request routed just ahead of the GOAWAY could open its stream after the
/// acknowledgement and be cut (502 `tunnel-stream-failed` during a rolling restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_peer_is_acknowledged_only_after_the_requests_sent_to_it_finish() {
    use hybridge::tunnel::control::ControlMessage;
    const SIZE: u64 = 64 * 1024 * 1024;
    let Pair {
        cloud,
        onprem,
        cancel,
        ..
    } = pair().await;
    let inventory = import_addr(&onprem, "inventory");

    // In flight: a download whose head has arrived and whose body we do not read yet.
    let response = download(inventory, SIZE).await;
    let link = onprem.state.peers.links()[0].clone();
    assert_eq!(link.active_streams(), 1);

    let cloud_state = cloud.state.clone();
    let draining = tokio::spawn(cloud.shutdown());
    tokio::time::timeout(
        WAIT,
        onprem
            .state
            .peers
            .wait_until(|links| links.iter().all(|l| l.is_draining())),
    )
    .await
    .expect("the GOAWAY arrives");
    assert_eq!(
        http1(inventory, "GET", "/health", &[], Bytes::new())
            .await
            .header("x-hybridge-error"),
        Some("no-route"),
        "nothing new goes to a draining peer"
    );
    // The control stream is ordered: once the cloud has read a message sent after the
    // GOAWAY was handled, it has read any acknowledgement sent before it.
    link.send_control(ControlMessage::Exports {
        exports: vec!["marker".into()],
        policy_version: 0,
        policy_digest: String::new(),
        members: Vec::new(),
    });
    tokio::time::timeout(
        WAIT,
        cloud_state
            .peers
            .wait_until(|links| links.iter().all(|l| l.exports().contains("marker"))),
    )
    .await
    .expect("the marker arrives");
    assert!(
        !cloud_state.peers.links()[0].drain_acknowledged(),
        "acknowledged while a request to the draining node was in flight"
    );

    // The request finishes whole; then the acknowledgement lets the cloud stop.
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len() as u64;
        }
    }
    assert_eq!(received, SIZE);
    // The import lets go of the stream just after the last byte reaches the caller (hyper
    // drops the body once it has sent the declared length); wait for that, not for time.
    tokio::time::timeout(WAIT, link.streams_finished())
        .await
        .expect("the finished download releases its tunnel stream");
    assert_eq!(link.active_streams(), 0);
    tokio::time::timeout(WAIT, draining)
        .await
        .expect("the cloud stops once acknowledged")
        .unwrap();
    onprem.shutdown().await;
    cancel.cancel();
}
