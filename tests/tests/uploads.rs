//! Slow and stalled uploads through real nodes: the response deadlines (the export's
//! `request_timeout`, the import listener's `request_timeout`) start once the whole request
//! has been sent, so an upload that keeps trickling succeeds however long it takes, and one
//! that stops sending fails after `request_body_idle_timeout` with its own reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::StreamBody;
use hybridge::demo::DemoUpstream;
use hybridge_tests::*;
use tokio_util::sync::CancellationToken;

struct Pair {
    _pki: Pki,
    cloud: hybridge::node::Node,
    onprem: hybridge::node::Node,
    _upstream: DemoUpstream,
    cancel: CancellationToken,
}

/// The cloud exports `inventory` with a 1 s response deadline and a 1 s body idle limit; the
/// on-prem node imports it for `web` with a 1 s listener deadline too.
async fn pair() -> Pair {
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let upstream = demo_upstream("inventory", &cancel).await;
    let mut cloud = NodeOptions::cloud(&pki, "cloud-1");
    let mut export = ExportSpec::http1("inventory", &[upstream.local_addr()]);
    export.extra = "request_timeout = \"1s\"\nrequest_body_idle_timeout = \"1s\"\n".into();
    cloud.exports.push(export);
    let cloud = cloud.start().await;
    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[cloud.addresses().tunnel.unwrap()]);
    onprem.extra = "\n[[import]]\nservice = \"inventory\"\nlisten = \"127.0.0.1:0\"\ncaller = \"web\"\nrequest_timeout = \"1s\"\n".into();
    let onprem = onprem.start().await;
    for node in [&cloud, &onprem] {
        allow(node, "web", "inventory");
    }
    assert!(onprem.wait_for_route("inventory", WAIT).await);
    Pair {
        _pki: pki,
        cloud,
        onprem,
        _upstream: upstream,
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

/// A chunked POST to `/sha256` whose body chunks the test sends on the returned channel;
/// the body ends when the sender is dropped.
async fn upload(
    p: &Pair,
) -> (
    tokio::sync::mpsc::Sender<Bytes>,
    tokio::task::JoinHandle<Answer>,
) {
    let (chunks, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(chunk)),
            rx,
        ))
    }));
    let mut sender = http1_conn(import_addr(&p.onprem, "inventory")).await;
    let request = http::Request::builder()
        .method("POST")
        .uri("/sha256")
        .header("host", "inventory")
        .body(body)
        .unwrap();
    let answer =
        tokio::spawn(async move { collect(sender.send_request(request).await.unwrap()).await });
    (chunks, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_slower_than_the_request_timeouts_succeeds_while_it_keeps_sending() {
    let p = pair().await;
    let (chunks, answer) = upload(&p).await;
    let started = Instant::now();
    // 3 s of body, a chunk every 100 ms: three times every response deadline on the way, each
    // gap well under the body idle limit. The pacing is the test's subject, not a wait.
    for i in 0..30u8 {
        chunks.send(Bytes::from(vec![i; 1000])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(chunks);
    let answer = tokio::time::timeout(WAIT, answer).await.unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert_eq!(
        answer.status,
        200,
        "{:?} {}",
        answer.header("x-hybridge-error"),
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["len"], 30_000);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_stops_sending_fails_after_the_body_idle_timeout() {
    let p = pair().await;
    let (chunks, answer) = upload(&p).await;
    chunks
        .send(Bytes::from_static(b"first bytes"))
        .await
        .unwrap();
    // Nothing more is sent, and the body never ends: the export gives up after 1 s.
    let answer = tokio::time::timeout(WAIT, answer)
        .await
        .expect("a stalled upload got no answer")
        .unwrap();
    assert_eq!(
        answer.status,
        408,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(
        answer.header("x-hybridge-error"),
        Some("request-body-timeout")
    );
    assert!(
        String::from_utf8_lossy(&answer.body).contains("no bytes arrived for 1s"),
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    drop(chunks);
    // The caller's stall is not the upstream's failure.
    let stats = p.cloud.state.export.services.load()["inventory"].stats();
    assert_eq!(stats.endpoints[0].failures, 0, "{stats:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_request_still_times_out_on_a_slow_upstream() {
    let p = pair().await;
    // The demo upstream's /slow holds the response head for ?ms=.
    let answer = http1(
        import_addr(&p.onprem, "inventory"),
        "POST",
        "/slow?ms=5000",
        &[],
        Bytes::from_static(b"a small body"),
    )
    .await;
    assert_eq!(
        answer.status,
        504,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert!(
        matches!(
            answer.header("x-hybridge-error"),
            Some("timeout" | "upstream-timeout")
        ),
        "{:?}",
        answer.header("x-hybridge-error")
    );
    p.stop().await;
}
