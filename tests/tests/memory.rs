//! Backpressure, measured where it matters: a 1 GiB upload and a 1 GiB download through two
//! real `hybridge run` processes must not grow either process's peak resident memory by more
//! than a few flow-control windows. A bridge that buffered bodies would grow by the body size.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hybridge::demo::pattern_byte;
use hybridge_tests::*;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

const GIB: u64 = 1 << 30;
const CHUNK: usize = 1 << 20;
/// Allowed growth of peak RSS after warm-up. Quinn's per-stream window is 4 MiB; this leaves
/// room for allocator slack while catching any buffering proportional to the body.
const ALLOWED_GROWTH_KIB: u64 = 48 * 1024;

/// Peak resident set size of a process, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The 1 MiB chunk of the demo pattern starting at each phase (the pattern repeats every
/// 251 bytes): zero-copy slices of one buffer of CHUNK + 251 pattern bytes.
fn pattern_chunks() -> Vec<Bytes> {
    let window: Bytes = (0..(CHUNK as u64 + 251))
        .map(pattern_byte)
        .collect::<Vec<u8>>()
        .into();
    (0..251).map(|p| window.slice(p..p + CHUNK)).collect()
}

/// Uploads `len` bytes of the pattern to `/sha256` and checks the upstream saw them all, intact.
async fn upload(import: std::net::SocketAddr, len: u64) {
    let phases = pattern_chunks();
    let chunks = len / CHUNK as u64;
    let mut expected = Sha256::new();
    for i in 0..chunks {
        expected.update(&phases[((i * CHUNK as u64) % 251) as usize]);
    }
    let expected = hex(&expected.finalize());
    let body = StreamBody::new(futures_util::stream::iter((0..chunks).map(move |i| {
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
            phases[((i * CHUNK as u64) % 251) as usize].clone(),
        ))
    })));
    let mut sender = http1_conn(import).await;
    let request = http::Request::post("/sha256")
        .header("host", "inventory")
        .header("content-length", len.to_string())
        .body(body)
        .unwrap();
    let answer = collect(sender.send_request(request).await.unwrap()).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let json = answer.json();
    assert_eq!(json["len"], len);
    assert_eq!(json["sha256"], expected.as_str());
}

/// Downloads `len` bytes from `/bytes/LEN` and checks every byte against the pattern.
async fn download(import: std::net::SocketAddr, len: u64) {
    let mut sender = http1_conn(import).await;
    let request = http::Request::get(format!("/bytes/{len}"))
        .header("host", "inventory")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body().into_data_stream();
    let mut offset = 0u64;
    while let Some(data) = body.next().await {
        let data = data.unwrap();
        // Spot-check the first and last byte of every frame; the 100 MiB test in
        // forwarding.rs hashes whole bodies.
        if let (Some(first), Some(last)) = (data.first(), data.last()) {
            assert_eq!(*first, pattern_byte(offset));
            assert_eq!(*last, pattern_byte(offset + data.len() as u64 - 1));
        }
        offset += data.len() as u64;
    }
    assert_eq!(offset, len);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_does_not_grow_either_node() {
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let upstream = demo_upstream("inventory", &cancel).await;
    let base = free_port_block();

    let cloud = NodeOptions::cloud_process(&pki, "cloud-1", base, upstream.local_addr());
    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[cloud.tunnel_listen.unwrap()]);
    onprem.admin = format!("127.0.0.1:{}", base + 2).parse().unwrap();
    onprem.imports.push(("inventory".into(), "web".into()));
    let onprem_config = onprem.write();
    let import: std::net::SocketAddr = format!("127.0.0.1:{}", base + 3).parse().unwrap();
    std::fs::write(
        &onprem_config,
        std::fs::read_to_string(&onprem_config).unwrap().replace(
            "listen = \"127.0.0.1:0\"\ncaller",
            &format!("listen = \"{import}\"\ncaller"),
        ),
    )
    .unwrap();
    // Policy goes into each node's database before its process opens it.
    preallow(&onprem.data_dir, "web", "inventory");
    let cloud_process = run_daemon(&cloud.write());
    let mut onprem_process = run_daemon(&onprem_config);
    onprem_process.wait_for_line(WAIT, |l| l.contains("tunnel up"));

    // Warm up: pools, windows and allocator arenas reach their working size.
    upload(import, 16 * CHUNK as u64).await;
    download(import, 16 * CHUNK as u64).await;
    let pids = [cloud_process.child.id(), onprem_process.child.id()];
    let before: Vec<u64> = pids.iter().map(|p| peak_rss_kib(*p)).collect();

    upload(import, GIB).await;
    download(import, GIB).await;

    for (i, pid) in pids.iter().enumerate() {
        let after = peak_rss_kib(*pid);
        let name = ["cloud", "onprem"][i];
        eprintln!(
            "{name}: peak RSS {} KiB before, {after} KiB after 1 GiB each way",
            before[i]
        );
        assert!(
            after <= before[i] + ALLOWED_GROWTH_KIB,
            "{name} grew from {} KiB to {after} KiB while streaming 1 GiB",
            before[i]
        );
    }
    cancel.cancel();
}
