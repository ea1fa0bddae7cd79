//! The wire-format decision benchmark: our length-prefixed tunnel frames against HTTP/3 (`h3`).
//!
//! Both candidates run in one process on loopback, over the same quinn transport settings
//! (`TransportTuning::default()`) and TLS 1.3 with mutual authentication by one self-signed
//! rcgen certificate, one bidirectional stream per request. The custom candidate uses the real
//! `tunnel::frame` codec and `tunnel::stream` halves; the h3 candidate carries the stream header
//! (service, caller, deadline) as extra request headers, since HTTP/3 has no place for it.
//!
//! Run with `cargo bench -p hybridge --bench wire_format`. It runs every workload for a fixed
//! count, [`ROUNDS`] times alternating the candidates, and prints the median of each cell as a
//! markdown table. The decision it fed is written down in `BENCHMARKS.md`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Buf, Bytes};
use hybridge::tunnel::frame::{self, Frame, HeaderPair, RequestHead, ResponseHead};
use hybridge::tunnel::quic::TransportTuning;
use hybridge::tunnel::stream::{RecvHalf, SendHalf, encoded};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::task::JoinSet;

/// Times each workload runs per candidate; cells report the median.
const ROUNDS: usize = 3;
/// Body size of a small request and of its response.
const SMALL_BODY: usize = 64;
const SEQUENTIAL_WARMUP: usize = 300;
const SEQUENTIAL_REQUESTS: usize = 3_000;
const CONCURRENT_STREAMS: usize = 64;
/// Requests of the concurrent workload; its CPU time is reported per 10k requests.
const CONCURRENT_REQUESTS: usize = 10_000;
const BULK_BYTES: usize = 64 * 1024 * 1024;
/// Size of each body chunk the bulk responder hands to the stream, like a hyper body would.
const BULK_CHUNK: usize = 64 * 1024;
const BULK_PATH: &str = "/bulk";
const SMALL_PATH: &str = "/api/v1/items?page=2";
const AUTHORITY: &str = "billing.hybridge";

fn main() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(run())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Candidate {
    Custom,
    H3,
}

impl Candidate {
    fn alpn(self) -> &'static [u8] {
        match self {
            Self::Custom => hybridge::tunnel::quic::ALPN,
            Self::H3 => b"h3",
        }
    }
}

/// One round's numbers for one candidate.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    p50_us: f64,
    p99_us: f64,
    sequential_rps: f64,
    concurrent_rps: f64,
    cpu_ms_per_10k: f64,
    bulk_mb_s: f64,
}

async fn run() -> Result<()> {
    let tls = TlsPair::new()?;
    let templates = Arc::new(Templates::new()?);
    let mut samples: Vec<(Candidate, Sample)> = Vec::new();
    for round in 1..=ROUNDS {
        for candidate in [Candidate::Custom, Candidate::H3] {
            let sample = run_candidate(candidate, &tls, &templates)
                .await
                .with_context(|| format!("{candidate:?} round {round}"))?;
            eprintln!("round {round} {candidate:?}: {sample:?}");
            samples.push((candidate, sample));
        }
    }
    print_table(&samples);
    Ok(())
}

async fn run_candidate(
    candidate: Candidate,
    tls: &TlsPair,
    templates: &Arc<Templates>,
) -> Result<Sample> {
    let link = Link::connect(candidate, tls, templates.clone()).await?;
    let client = link.client.clone();
    let mut sample = Sample::default();

    // 1) sequential small requests
    for _ in 0..SEQUENTIAL_WARMUP {
        client.clone().request(templates, false).await?;
    }
    let mut latencies = Vec::with_capacity(SEQUENTIAL_REQUESTS);
    let mut sequential = client.clone();
    let started = Instant::now();
    for _ in 0..SEQUENTIAL_REQUESTS {
        let t = Instant::now();
        let got = sequential.request(templates, false).await?;
        latencies.push(t.elapsed());
        check_len(got, SMALL_BODY)?;
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    sample.p50_us = percentile(&latencies, 0.50);
    sample.p99_us = percentile(&latencies, 0.99);
    sample.sequential_rps = SEQUENTIAL_REQUESTS as f64 / elapsed.as_secs_f64();

    // 2) + 4) concurrent small requests, with the process CPU they cost (both ends)
    let cpu_before = process_cpu_time();
    let started = Instant::now();
    let mut workers = JoinSet::new();
    let per_worker = CONCURRENT_REQUESTS / CONCURRENT_STREAMS;
    for worker in 0..CONCURRENT_STREAMS {
        let mut client = client.clone();
        let templates = templates.clone();
        // Spread the remainder so exactly CONCURRENT_REQUESTS are made.
        let count = per_worker + usize::from(worker < CONCURRENT_REQUESTS % CONCURRENT_STREAMS);
        workers.spawn(async move {
            for _ in 0..count {
                check_len(client.request(&templates, false).await?, SMALL_BODY)?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    let elapsed = started.elapsed();
    let cpu = process_cpu_time().saturating_sub(cpu_before);
    sample.concurrent_rps = CONCURRENT_REQUESTS as f64 / elapsed.as_secs_f64();
    sample.cpu_ms_per_10k = cpu.as_secs_f64() * 1e3 * 10_000.0 / CONCURRENT_REQUESTS as f64;

    // 3) one large streamed response
    let started = Instant::now();
    let got = client.clone().request(templates, true).await?;
    let elapsed = started.elapsed();
    check_len(got, BULK_BYTES)?;
    sample.bulk_mb_s = BULK_BYTES as f64 / 1e6 / elapsed.as_secs_f64();

    link.close().await;
    Ok(sample)
}

fn check_len(got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        bail!("response body of {got} bytes, expected {want}")
    }
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(index).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

/// User plus system CPU time of the whole process (client and server ends together).
fn process_cpu_time() -> Duration {
    // /proc/self/stat fields 14 and 15 (utime, stime) in clock ticks; avoids unsafe getrusage.
    // The comm field may hold spaces, so split after its closing parenthesis.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so utime (14) is index 11 and stime (15) index 12.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // USER_HZ is 100 on every Linux architecture we deploy to: 10 ms resolution, about 1% of
    // what a 10k-request run costs.
    Duration::from_millis(ticks * 10)
}

/// Request and response templates shared by both candidates, so each sends the same fields.
struct Templates {
    small_body: Bytes,
    bulk_chunk: Bytes,
    /// Ten headers of a typical proxied API call (the request id is added per request).
    request_headers: Vec<HeaderPair>,
    response_headers: Vec<HeaderPair>,
    h3_request_headers: http::HeaderMap,
    h3_response_headers: http::HeaderMap,
    next_id: AtomicU64,
}

impl Templates {
    fn new() -> Result<Self> {
        let pairs = |list: &[(&'static str, &'static str)]| -> Vec<HeaderPair> {
            list.iter()
                .map(|(n, v)| {
                    (
                        Bytes::from_static(n.as_bytes()),
                        Bytes::from_static(v.as_bytes()),
                    )
                })
                .collect()
        };
        let request_headers = pairs(&[
            ("content-type", "application/json"),
            ("content-length", "64"),
            ("accept", "application/json"),
            ("accept-encoding", "gzip, br"),
            ("user-agent", "billing-client/2.3.1 (linux; rust)"),
            (
                "authorization",
                "Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ3ZWIifQ.c2lnbmF0dXJl",
            ),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("x-forwarded-for", "10.20.30.40"),
            ("x-forwarded-proto", "https"),
        ]);
        let response_headers = pairs(&[
            ("content-type", "application/json"),
            ("content-length", "64"),
            ("date", "Mon, 23 Nov 2026 03:00:00 GMT"),
            ("cache-control", "no-store"),
        ]);
        Ok(Self {
            small_body: Bytes::from(vec![b'x'; SMALL_BODY]),
            bulk_chunk: Bytes::from(vec![b'y'; BULK_CHUNK]),
            h3_request_headers: header_map(&request_headers)?,
            h3_response_headers: header_map(&response_headers)?,
            request_headers,
            response_headers,
            next_id: AtomicU64::new(1),
        })
    }

    fn request_id(&self) -> String {
        format!("req-{:016x}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn custom_request(&self, bulk: bool) -> RequestHead {
        let mut headers = self.request_headers.clone();
        let request_id = self.request_id();
        headers.push((
            Bytes::from_static(b"x-request-id"),
            Bytes::from(request_id.clone()),
        ));
        RequestHead {
            service: "billing".into(),
            caller: "spiffe://corp.example/svc/web".into(),
            request_id,
            deadline_ms: 30_000,
            method: if bulk { "GET" } else { "POST" }.into(),
            authority: AUTHORITY.into(),
            path: if bulk { BULK_PATH } else { SMALL_PATH }.into(),
            version: 11,
            end_stream: bulk,
            headers,
        }
    }

    /// The same request for h3: the stream header has to ride along as headers.
    fn h3_request(&self, bulk: bool) -> Result<http::Request<()>> {
        let path = if bulk { BULK_PATH } else { SMALL_PATH };
        let mut request = http::Request::builder()
            .method(if bulk { "GET" } else { "POST" })
            .uri(format!("https://{AUTHORITY}{path}"))
            .body(())?;
        let headers = request.headers_mut();
        headers.clone_from(&self.h3_request_headers);
        headers.insert(
            "x-request-id",
            http::HeaderValue::try_from(self.request_id())?,
        );
        headers.insert(
            "x-hybridge-service",
            http::HeaderValue::from_static("billing"),
        );
        headers.insert(
            "x-hybridge-caller",
            http::HeaderValue::from_static("spiffe://corp.example/svc/web"),
        );
        headers.insert(
            "x-hybridge-deadline-ms",
            http::HeaderValue::from_static("30000"),
        );
        Ok(request)
    }

    fn h3_response(&self) -> Result<http::Response<()>> {
        let mut response = http::Response::builder().status(200).body(())?;
        response.headers_mut().clone_from(&self.h3_response_headers);
        Ok(response)
    }
}

fn header_map(pairs: &[HeaderPair]) -> Result<http::HeaderMap> {
    let mut map = http::HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            http::HeaderName::from_bytes(name)?,
            http::HeaderValue::from_bytes(value)?,
        );
    }
    Ok(map)
}

/// TLS 1.3 configs for both ends: one self-signed certificate, used by the server and as the
/// client certificate, so the handshake is mutual like the tunnel's.
struct TlsPair {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl TlsPair {
    fn new() -> Result<Self> {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
        Ok(Self {
            cert: certified.cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()),
        })
    }

    fn roots(&self) -> Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone())?;
        Ok(roots)
    }

    fn server(&self, alpn: &[u8]) -> Result<quinn::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            provider.clone(),
        )
        .build()?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![self.cert.clone()],
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )?;
        tls.alpn_protocols = vec![alpn.to_vec()];
        let mut config =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(Arc::new(tls))?));
        config.transport_config(transport_config());
        Ok(config)
    }

    fn client(&self, alpn: &[u8]) -> Result<quinn::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(
                vec![self.cert.clone()],
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )?;
        tls.alpn_protocols = vec![alpn.to_vec()];
        let mut config =
            quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(Arc::new(tls))?));
        config.transport_config(transport_config());
        Ok(config)
    }
}

/// The tunnel's transport settings (as `tunnel::quic` builds them from
/// `TransportTuning::default()`), except that a few unidirectional streams are allowed:
/// HTTP/3 needs three per side (control, QPACK encoder and decoder). Both candidates get the
/// same config; the custom one never opens a unidirectional stream.
fn transport_config() -> Arc<quinn::TransportConfig> {
    let t = TransportTuning::default();
    let mut c = quinn::TransportConfig::default();
    c.keep_alive_interval(Some(t.keepalive));
    c.max_idle_timeout(quinn::IdleTimeout::try_from(t.idle_timeout).ok());
    c.max_concurrent_bidi_streams(quinn::VarInt::from_u32(t.max_streams));
    c.max_concurrent_uni_streams(quinn::VarInt::from_u32(8));
    c.stream_receive_window(quinn::VarInt::from_u32(t.stream_window));
    c.receive_window(quinn::VarInt::from_u32(t.connection_window));
    c.send_window(u64::from(t.connection_window));
    Arc::new(c)
}

/// One client connection and the serving task on the other end.
struct Link {
    client: Client,
    client_endpoint: quinn::Endpoint,
    server_endpoint: quinn::Endpoint,
    server: tokio::task::JoinHandle<Result<()>>,
    h3_driver: Option<tokio::task::JoinHandle<()>>,
}

impl Link {
    async fn connect(
        candidate: Candidate,
        tls: &TlsPair,
        templates: Arc<Templates>,
    ) -> Result<Self> {
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let server_endpoint = quinn::Endpoint::server(tls.server(candidate.alpn())?, loopback)?;
        let server_addr = server_endpoint.local_addr()?;
        let mut client_endpoint = quinn::Endpoint::client(loopback)?;
        client_endpoint.set_default_client_config(tls.client(candidate.alpn())?);

        let accepting = server_endpoint.clone();
        let server = tokio::spawn(async move {
            let incoming = accepting
                .accept()
                .await
                .ok_or_else(|| anyhow!("server endpoint closed"))?;
            let connection = incoming.await?;
            match candidate {
                Candidate::Custom => serve_custom(connection, templates).await,
                Candidate::H3 => serve_h3(connection, templates).await,
            }
        });
        let connection = client_endpoint.connect(server_addr, "localhost")?.await?;
        let (client, h3_driver) = match candidate {
            Candidate::Custom => (Client::Custom(connection), None),
            Candidate::H3 => {
                let (mut driver, send_request) =
                    h3::client::new(h3_quinn::Connection::new(connection)).await?;
                let driver = tokio::spawn(async move {
                    let _closed = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
                });
                (Client::H3(send_request), Some(driver))
            }
        };
        Ok(Self {
            client,
            client_endpoint,
            server_endpoint,
            server,
            h3_driver,
        })
    }

    async fn close(self) {
        drop(self.client);
        self.client_endpoint
            .close(quinn::VarInt::from_u32(0), b"done");
        self.server_endpoint
            .close(quinn::VarInt::from_u32(0), b"done");
        let _ = self.server.await;
        if let Some(driver) = self.h3_driver {
            driver.abort();
            let _ = driver.await;
        }
        self.client_endpoint.wait_idle().await;
    }
}

#[derive(Clone)]
enum Client {
    Custom(quinn::Connection),
    H3(h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>),
}

impl Client {
    /// Makes one request (small POST, or GET of the bulk body) and returns the response body size.
    async fn request(&mut self, templates: &Templates, bulk: bool) -> Result<usize> {
        match self {
            Self::Custom(connection) => custom_request(connection, templates, bulk).await,
            Self::H3(send_request) => h3_request(send_request, templates, bulk).await,
        }
    }
}

async fn custom_request(
    connection: &quinn::Connection,
    templates: &Templates,
    bulk: bool,
) -> Result<usize> {
    let (send, recv) = connection.open_bi().await?;
    let (mut send, mut recv) = (SendHalf::Quic(send), RecvHalf::quic(recv));
    let head = templates.custom_request(bulk);
    send.write_encoded(encoded(|out| frame::encode_request(&head, out))?)
        .await?;
    if !bulk {
        send.write_data(templates.small_body.clone()).await?;
    }
    send.finish();
    let mut status = None;
    let mut received = 0;
    while let Some(frame) = recv.read_frame().await? {
        match frame {
            Frame::Response(head) => status = Some(head.status),
            Frame::Data(data) => received += data.len(),
            Frame::Trailers(_) => {}
            other => bail!("unexpected frame {other:?}"),
        }
    }
    if status != Some(200) {
        bail!("response status {status:?}");
    }
    Ok(received)
}

async fn serve_custom(connection: quinn::Connection, templates: Arc<Templates>) -> Result<()> {
    let mut streams = JoinSet::new();
    // Ends when the client closes the connection.
    while let Ok((send, recv)) = connection.accept_bi().await {
        let templates = templates.clone();
        streams.spawn(async move {
            let (mut send, mut recv) = (SendHalf::Quic(send), RecvHalf::quic(recv));
            let head = match recv.read_frame().await? {
                Some(Frame::Request(head)) => head,
                other => bail!("expected a REQUEST frame, got {other:?}"),
            };
            while let Some(frame) = recv.read_frame().await? {
                if !matches!(frame, Frame::Data(_) | Frame::Trailers(_)) {
                    bail!("unexpected frame {frame:?}");
                }
            }
            let response = ResponseHead {
                status: 200,
                end_stream: false,
                headers: templates.response_headers.clone(),
            };
            send.write_encoded(encoded(|out| frame::encode_response(&response, out))?)
                .await?;
            if head.path == BULK_PATH {
                for _ in 0..BULK_BYTES / BULK_CHUNK {
                    send.write_data(templates.bulk_chunk.clone()).await?;
                }
            } else {
                send.write_data(templates.small_body.clone()).await?;
            }
            send.finish();
            anyhow::Ok(())
        });
        while let Some(done) = streams.try_join_next() {
            done??;
        }
    }
    streams.abort_all();
    Ok(())
}

async fn h3_request(
    send_request: &mut h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    templates: &Templates,
    bulk: bool,
) -> Result<usize> {
    let mut stream = send_request
        .send_request(templates.h3_request(bulk)?)
        .await?;
    if !bulk {
        stream.send_data(templates.small_body.clone()).await?;
    }
    stream.finish().await?;
    let response = stream.recv_response().await?;
    if response.status() != http::StatusCode::OK {
        bail!("response status {}", response.status());
    }
    let mut received = 0;
    while let Some(mut data) = stream.recv_data().await? {
        received += data.remaining();
        data.advance(data.remaining());
    }
    Ok(received)
}

async fn serve_h3(connection: quinn::Connection, templates: Arc<Templates>) -> Result<()> {
    let mut h3_connection: h3::server::Connection<h3_quinn::Connection, Bytes> =
        h3::server::Connection::new(h3_quinn::Connection::new(connection)).await?;
    let mut streams = JoinSet::new();
    // Ends (Ok(None) or an error) when the client closes the connection.
    while let Ok(Some(resolver)) = h3_connection.accept().await {
        let templates = templates.clone();
        streams.spawn(async move {
            let (request, mut stream) = resolver.resolve_request().await?;
            while let Some(mut data) = stream.recv_data().await? {
                data.advance(data.remaining());
            }
            stream.send_response(templates.h3_response()?).await?;
            if request.uri().path() == BULK_PATH {
                for _ in 0..BULK_BYTES / BULK_CHUNK {
                    stream.send_data(templates.bulk_chunk.clone()).await?;
                }
            } else {
                stream.send_data(templates.small_body.clone()).await?;
            }
            stream.finish().await?;
            anyhow::Ok(())
        });
        while let Some(done) = streams.try_join_next() {
            done??;
        }
    }
    streams.abort_all();
    Ok(())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Selects one figure of a sample.
type Pick = fn(&Sample) -> f64;

fn print_table(samples: &[(Candidate, Sample)]) {
    let cell = |candidate: Candidate, pick: Pick| {
        median(
            samples
                .iter()
                .filter(|(c, _)| *c == candidate)
                .map(|(_, s)| pick(s))
                .collect(),
        )
    };
    let rows: [(&str, Pick); 6] = [
        (
            "1. sequential 64 B req/resp: p50 latency (µs, lower is better)",
            |s| s.p50_us,
        ),
        (
            "1. sequential 64 B req/resp: p99 latency (µs, lower is better)",
            |s| s.p99_us,
        ),
        ("1. sequential 64 B req/resp: req/s", |s| s.sequential_rps),
        ("2. 64 concurrent streams, 64 B req/resp: req/s", |s| {
            s.concurrent_rps
        }),
        ("3. one 64 MiB response body: MB/s", |s| s.bulk_mb_s),
        (
            "4. process CPU per 10k small requests (ms, both ends, lower is better)",
            |s| s.cpu_ms_per_10k,
        ),
    ];
    println!();
    println!("median of {ROUNDS} rounds; h3/custom > 1 means h3 is larger");
    println!();
    println!("| workload | custom frames | h3 (h3 0.0.8 + h3-quinn 0.0.10) | h3 / custom |");
    println!("|---|---:|---:|---:|");
    for (name, pick) in rows {
        let custom = cell(Candidate::Custom, pick);
        let h3 = cell(Candidate::H3, pick);
        let ratio = if custom > 0.0 { h3 / custom } else { 0.0 };
        println!("| {name} | {custom:.0} | {h3:.0} | {ratio:.2} |");
    }
}
