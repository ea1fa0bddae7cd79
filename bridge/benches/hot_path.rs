//! Hot-path micro-benchmarks: what every request pays besides the network.
//!
//! - `frame/*`: encoding and decoding a REQUEST head (a realistic 12-header browser-ish
//!   request), a RESPONSE head, and a 16 KiB DATA frame header;
//! - `headers/*`: the import side's header rewriting (hop-by-hop removal, x-forwarded-*,
//!   request id) and the conversions between `HeaderMap` and frame pairs on both sides;
//! - `path/*`: making a request target canonical, as both edges do for every request: an
//!   already canonical one (the common case, and what the export side always gets) and one
//!   with escapes, dot-segments and repeated slashes.
//!
//! Run with `cargo bench -p hybridge --bench hot_path`; results are in BENCHMARKS.md.
#![allow(clippy::expect_used, clippy::panic)] // a benchmark whose setup fails should stop loudly

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue};
use hybridge::http::headers;
use hybridge::http::path::{EscapedSlashes, canonical_target};
use hybridge::tunnel::frame::{
    self, FRAME_HEADER_LEN, Frame, FrameType, HeaderPair, RequestHead, ResponseHead,
};

const REQUEST_HEADERS: &[(&str, &str)] = &[
    ("host", "billing.hybridge:8080"),
    ("user-agent", "checkout/4.2.1 (hyper)"),
    ("accept", "application/json"),
    ("accept-encoding", "gzip, br"),
    ("content-type", "application/json"),
    ("content-length", "64"),
    ("connection", "keep-alive"),
    ("keep-alive", "timeout=5"),
    (
        "authorization",
        "Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJjaGVja291dCJ9.c2lnbmF0dXJl",
    ),
    (
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ),
    ("x-forwarded-for", "10.1.2.3"),
    ("x-hybridge-caller", "spoofed-admin"),
];

fn header_map() -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in REQUEST_HEADERS {
        map.append(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    map
}

fn pairs(list: &[(&'static str, &'static str)]) -> Vec<HeaderPair> {
    list.iter()
        .map(|(n, v)| {
            (
                Bytes::from_static(n.as_bytes()),
                Bytes::from_static(v.as_bytes()),
            )
        })
        .collect()
}

fn request_head() -> RequestHead {
    RequestHead {
        service: "billing".into(),
        caller: "checkout".into(),
        request_id: "6f1c2b7e-5d0a-4f8e-9b3c-2a1d0e9f8c7b".into(),
        deadline_ms: 30_000,
        method: "POST".into(),
        authority: "billing.hybridge:8080".into(),
        path: "/api/v1/invoices?customer=42".into(),
        version: 11,
        end_stream: false,
        headers: pairs(REQUEST_HEADERS),
    }
}

fn response_head() -> ResponseHead {
    ResponseHead {
        status: 200,
        end_stream: false,
        headers: pairs(&[
            ("content-type", "application/json"),
            ("content-length", "64"),
            ("date", "Mon, 23 Nov 2026 07:00:00 GMT"),
            ("server", "billing"),
            ("x-request-id", "6f1c2b7e-5d0a-4f8e-9b3c-2a1d0e9f8c7b"),
        ]),
    }
}

/// Splits an encoded frame into its type and payload, as `tunnel::stream` does.
fn split(encoded: &[u8]) -> (FrameType, Bytes) {
    let mut head = [0u8; FRAME_HEADER_LEN];
    head.copy_from_slice(&encoded[..FRAME_HEADER_LEN]);
    let head = frame::decode_frame_head(head).expect("valid frame head");
    (
        head.kind,
        Bytes::copy_from_slice(&encoded[FRAME_HEADER_LEN..FRAME_HEADER_LEN + head.len]),
    )
}

fn frames(c: &mut Criterion) {
    let request = request_head();
    let response = response_head();
    let mut out = BytesMut::with_capacity(4096);
    c.bench_function("frame/encode_request", |b| {
        b.iter(|| {
            out.clear();
            frame::encode_request(black_box(&request), &mut out).expect("encodes");
            black_box(out.len())
        });
    });
    let mut encoded = BytesMut::new();
    frame::encode_request(&request, &mut encoded).expect("encodes");
    let (kind, payload) = split(&encoded);
    c.bench_function("frame/decode_request", |b| {
        b.iter(
            || match frame::decode_payload(kind, black_box(payload.clone())) {
                Ok(Frame::Request(head)) => black_box(head.headers.len()),
                other => panic!("decoded {other:?}"),
            },
        );
    });
    c.bench_function("frame/encode_response", |b| {
        b.iter(|| {
            out.clear();
            frame::encode_response(black_box(&response), &mut out).expect("encodes");
            black_box(out.len())
        });
    });
    let mut encoded = BytesMut::new();
    frame::encode_response(&response, &mut encoded).expect("encodes");
    let (kind, payload) = split(&encoded);
    c.bench_function("frame/decode_response", |b| {
        b.iter(
            || match frame::decode_payload(kind, black_box(payload.clone())) {
                Ok(Frame::Response(head)) => black_box(head.status),
                other => panic!("decoded {other:?}"),
            },
        );
    });
    c.bench_function("frame/data_head_roundtrip", |b| {
        b.iter(|| {
            let head = frame::encode_frame_head(FrameType::Data, black_box(16 * 1024));
            frame::decode_frame_head(black_box(head))
                .expect("valid")
                .len
        });
    });
}

fn header_rewriting(c: &mut Criterion) {
    let caller_ip = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
    let template = header_map();
    c.bench_function("headers/prepare_request", |b| {
        b.iter_batched(
            || template.clone(),
            |mut map| {
                let id = headers::prepare_request(&mut map, caller_ip, "http");
                black_box((map.len(), id))
            },
            criterion::BatchSize::SmallInput,
        );
    });
    let mut prepared = template.clone();
    headers::prepare_request(&mut prepared, caller_ip, "http");
    c.bench_function("headers/to_pairs", |b| {
        b.iter(|| black_box(headers::to_pairs(black_box(&prepared))).len());
    });
    let wire = headers::to_pairs(&prepared);
    c.bench_function("headers/from_pairs", |b| {
        b.iter(|| {
            headers::from_pairs(black_box(wire.clone()))
                .expect("valid")
                .len()
        });
    });
}

fn paths(c: &mut Criterion) {
    let mut group = c.benchmark_group("path");
    for (name, target) in [
        (
            "canonical",
            "/api/v1/invoices/2024-06/items?customer=42&page=3",
        ),
        ("grpc", "/payments.v1.Payments/Authorize"),
        (
            "rewritten",
            "/api//v1/./invoices/%32024-06/x/../items%3f?customer=42&page=3",
        ),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                canonical_target(black_box(target), EscapedSlashes::Reject).map(|t| t.path().len())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, frames, header_rewriting, paths);
criterion_main!(benches);
