//! Running it for real: rolling restarts drop nothing, SIGHUP swaps certificates without
//! dropping tunnels or requests and refuses bad input, `/metrics` parses and counts exactly,
//! the admin API answers precisely, `check-config` names the broken file and check, and
//! `hybridge status` prints what an operator needs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use hybridge_tests::*;
use tokio_util::sync::CancellationToken;

/// Blocks on a child's output without starving the runtime the in-process nodes run on.
fn wait_line(child: &mut ChildGuard, predicate: impl Fn(&str) -> bool) -> String {
    tokio::task::block_in_place(|| child.wait_for_line(WAIT, predicate))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_a_cloud_node_fails_no_request() {
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let upstream = demo_upstream("inventory", &cancel).await;
    let base = free_port_block();
    let one = NodeOptions::cloud_process(&pki, "cloud-1", base, upstream.local_addr());
    let two = NodeOptions::cloud_process(&pki, "cloud-2", base + 2, upstream.local_addr());
    let mut cloud_one = run_daemon(&one.write());
    let _cloud_two = run_daemon(&two.write());

    let mut onprem = NodeOptions::onprem(
        &pki,
        "onprem-1",
        &[one.tunnel_listen.unwrap(), two.tunnel_listen.unwrap()],
    );
    onprem.imports.push(("inventory".into(), "web".into()));
    let onprem = onprem.start().await;
    allow(&onprem, "web", "inventory");
    tokio::time::timeout(
        WAIT,
        onprem.state.peers.wait_until(|links| links.len() == 2),
    )
    .await
    .expect("both tunnels up");
    let import = import_addr(&onprem, "inventory");

    // 2,000 requests from 4 concurrent clients; cloud-1 gets SIGTERM once 500 are done.
    const TOTAL: usize = 2000;
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (halfway_tx, halfway_rx) = tokio::sync::oneshot::channel::<()>();
    let halfway_tx = Arc::new(std::sync::Mutex::new(Some(halfway_tx)));
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..4 {
        let (done, failures, halfway_tx) = (done.clone(), failures.clone(), halfway_tx.clone());
        clients.spawn(async move {
            for i in 0..TOTAL / 4 {
                let path = format!("/echo/{client}/{i}");
                let answer = http1(import, "GET", &path, &[], Bytes::new()).await;
                if answer.status != 200 {
                    failures.lock().unwrap().push(format!(
                        "{path}: {} {:?}",
                        answer.status,
                        answer.header("x-hybridge-error")
                    ));
                }
                if done.fetch_add(1, Ordering::SeqCst) + 1 == 500
                    && let Some(tx) = halfway_tx.lock().unwrap().take()
                {
                    let _ = tx.send(());
                }
            }
        });
    }
    halfway_rx.await.unwrap();
    cloud_one.signal(libc::SIGTERM);
    while let Some(result) = clients.join_next().await {
        result.unwrap();
    }
    let exit = tokio::task::block_in_place(|| cloud_one.wait_exit(Duration::from_secs(30)));
    assert_eq!(done.load(Ordering::SeqCst), TOTAL);
    assert_eq!(*failures.lock().unwrap(), Vec::<String>::new());
    let output = cloud_one.drain().join("\n");
    assert_eq!(exit, Some(0), "{output}");
    assert!(output.contains("draining"), "{output}");
    onprem.shutdown().await;
    cancel.cancel();
}

/// Serial (lowercase hex) of the first certificate in a PEM file.
fn serial_of(path: &std::path::Path) -> String {
    hybridge_ca::inspect::summarize(&std::fs::read(path).unwrap())
        .unwrap()
        .serial_hex
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_certificate_without_dropping_anything_and_refuses_bad_input() {
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let upstream = demo_upstream("inventory", &cancel).await;
    let base = free_port_block();
    let cloud = NodeOptions::cloud_process(&pki, "cloud-1", base, upstream.local_addr());
    let config = cloud.write();
    let old_serial = serial_of(&cloud.files.cert);
    let mut daemon = run_daemon(&config);

    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[cloud.tunnel_listen.unwrap()]);
    onprem.imports.push(("inventory".into(), "web".into()));
    let onprem = onprem.start().await;
    allow(&onprem, "web", "inventory");
    assert!(onprem.wait_for_route("inventory", WAIT).await);
    let import = import_addr(&onprem, "inventory");
    let link_before = onprem.state.peers.links()[0].id();

    // A long download in flight across the reload: first bytes read before SIGHUP.
    const LONG: u64 = 64 << 20;
    let mut sender = http1_conn(import).await;
    let response = sender
        .send_request(
            http::Request::get(format!("/bytes/{LONG}"))
                .header("host", "inventory")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut long_body = response.into_body().into_data_stream();
    let mut long_read = long_body.next().await.unwrap().unwrap().len() as u64;

    // A steady request loop across all the reloads below.
    let stop = CancellationToken::new();
    let loop_failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let loop_count = Arc::new(AtomicUsize::new(0));
    let looper = {
        let (stop, failures, count) = (stop.clone(), loop_failures.clone(), loop_count.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let a = http1(import, "GET", "/echo/loop", &[], Bytes::new()).await;
                if a.status != 200 {
                    failures.lock().unwrap().push(a.status);
                }
                count.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    // 1. A new certificate (same name, new serial), then SIGHUP.
    let renewed = pki.node("cloud", "cloud-1");
    assert_eq!(renewed.cert, cloud.files.cert);
    let new_serial = serial_of(&renewed.cert);
    assert_ne!(new_serial, old_serial);
    daemon.signal(libc::SIGHUP);
    wait_line(&mut daemon, |l| l.contains("configuration reloaded"));

    // The long download finishes intact on the old tunnel.
    while let Some(chunk) = long_body.next().await {
        long_read += chunk.unwrap().len() as u64;
    }
    assert_eq!(long_read, LONG);
    let links = onprem.state.peers.links();
    assert_eq!(links.len(), 1);
    assert_eq!(links[0].id(), link_before, "the existing tunnel was kept");
    assert_eq!(
        links[0].connection.peer_certificate().unwrap().0,
        old_serial
    );

    // A new handshake presents the new certificate.
    let mut second = NodeOptions::onprem(&pki, "onprem-2", &[cloud.tunnel_listen.unwrap()]);
    second.imports.push(("inventory".into(), "web".into()));
    let second = second.start().await;
    tokio::time::timeout(WAIT, second.state.peers.wait_until(|l| !l.is_empty()))
        .await
        .unwrap();
    assert_eq!(
        second.state.peers.links()[0]
            .connection
            .peer_certificate()
            .unwrap()
            .0,
        new_serial
    );
    second.shutdown().await;

    // 2. Bad input: each refused with the reason logged, the running config keeps serving.
    let good_config = std::fs::read_to_string(&config).unwrap();
    let good_cert = std::fs::read(&cloud.files.cert).unwrap();
    let good_key = std::fs::read(&cloud.files.key).unwrap();
    let other_key = std::fs::read(pki.node("cloud", "cloud-other").key).unwrap();
    type Breakage = (&'static str, Box<dyn Fn()>, Box<dyn Fn(&str) -> bool>);
    let (config_path, cert_path, key_path) = (
        config.clone(),
        cloud.files.cert.clone(),
        cloud.files.key.clone(),
    );
    let cases: Vec<Breakage> = vec![
        (
            "broken config",
            Box::new({
                let (p, g) = (config_path.clone(), good_config.clone());
                move || {
                    std::fs::write(&p, g.replace("[admin]", "[admin]\nlisten_typo = 1")).unwrap()
                }
            }),
            Box::new(|l: &str| l.contains("listen_typo") && l.contains(".toml:")),
        ),
        (
            "unreadable certificate",
            Box::new({
                let p = cert_path.clone();
                move || std::fs::write(&p, "not a certificate\n").unwrap()
            }),
            Box::new(|l: &str| l.contains("cloud-cloud-1.pem")),
        ),
        (
            "key not matching the certificate",
            Box::new({
                let (p, k) = (key_path.clone(), other_key.clone());
                move || std::fs::write(&p, &k).unwrap()
            }),
            Box::new(|l: &str| l.contains("key") && l.contains("match")),
        ),
    ];
    for (what, break_it, names_it) in cases {
        break_it();
        daemon.signal(libc::SIGHUP);
        let line = wait_line(&mut daemon, |l| l.contains("reload refused"));
        assert!(names_it(&line), "{what}: {line}");
        let a = http1(import, "GET", "/echo/still-serving", &[], Bytes::new()).await;
        assert_eq!(a.status, 200, "{what}");
        std::fs::write(&config, &good_config).unwrap();
        std::fs::write(&cloud.files.cert, &good_cert).unwrap();
        std::fs::write(&cloud.files.key, &good_key).unwrap();
    }

    stop.cancel();
    looper.await.unwrap();
    assert!(loop_count.load(Ordering::SeqCst) > 0);
    assert_eq!(*loop_failures.lock().unwrap(), Vec::<u16>::new());
    onprem.shutdown().await;
    daemon.signal(libc::SIGTERM);
    let exit = tokio::task::block_in_place(|| daemon.wait_exit(Duration::from_secs(30)));
    assert_eq!(exit, Some(0));
    cancel.cancel();
}

/// GETs `path` from an admin listener.
async fn admin_get(admin: SocketAddr, path: &str) -> Answer {
    http1(admin, "GET", path, &[], Bytes::new()).await
}

/// Parses Prometheus text with a real parser, after checking every sample line has the
/// exposition shape and every family is announced with HELP and TYPE.
fn parse_metrics(text: &str) -> prometheus_parse::Scrape {
    let mut announced = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            announced.insert(rest.split_whitespace().next().unwrap().to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| announced.contains(*f)))
                .unwrap_or(&name);
            assert!(announced.contains(family), "sample before its TYPE: {line}");
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "bad value in: {line}");
        }
    }
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_exactly_what_was_sent() {
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let upstream = demo_upstream("inventory", &cancel).await;
    // A port nothing listens on: the `dead` service's only endpoint.
    let dead: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut cloud = NodeOptions::cloud(&pki, "cloud-1");
    cloud
        .exports
        .push(ExportSpec::http1("inventory", &[upstream.local_addr()]));
    cloud.exports.push(ExportSpec::http1("dead", &[dead]));
    let cloud = cloud.start().await;
    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[cloud.addresses().tunnel.unwrap()]);
    onprem.imports.push(("inventory".into(), "web".into()));
    onprem.imports.push(("dead".into(), "web".into()));
    onprem.imports.push(("inventory".into(), "intruder".into()));
    let onprem = onprem.start().await;
    for node in [&cloud, &onprem] {
        allow(node, "web", "inventory");
        allow(node, "web", "dead");
    }
    assert!(onprem.wait_for_route("inventory", WAIT).await);
    let imports = &onprem.addresses().imports;
    let (web_inventory, web_dead, intruder) = (imports[0].1, imports[1].1, imports[2].1);

    const ALLOWED: usize = 7;
    const DENIED: usize = 3;
    const DEAD: usize = 2;
    for i in 0..ALLOWED {
        let a = http1(
            web_inventory,
            "POST",
            &format!("/echo/{i}"),
            &[],
            Bytes::from_static(b"12345"),
        )
        .await;
        assert_eq!(a.status, 200);
    }
    for _ in 0..DENIED {
        assert_eq!(
            http1(intruder, "GET", "/echo", &[], Bytes::new())
                .await
                .status,
            403
        );
    }
    for _ in 0..DEAD {
        let a = http1(web_dead, "GET", "/", &[], Bytes::new()).await;
        assert!(matches!(a.status, 502 | 503), "{}", a.status);
    }

    let onprem_text = admin_get(onprem.addresses().admin, "/metrics").await;
    assert_eq!(onprem_text.status, 200);
    assert!(
        onprem_text
            .header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let onprem_metrics = parse_metrics(std::str::from_utf8(&onprem_text.body).unwrap());
    let cloud_text = admin_get(cloud.addresses().admin, "/metrics").await;
    let cloud_metrics = parse_metrics(std::str::from_utf8(&cloud_text.body).unwrap());

    let requests = "hybridge_requests_total";
    let import = |service, class| [("side", "import"), ("service", service), ("class", class)];
    let export = |service, class| [("side", "export"), ("service", service), ("class", class)];
    assert_eq!(
        scrape_sample(&onprem_metrics, requests, &import("inventory", "2xx")),
        ALLOWED as f64
    );
    assert_eq!(
        scrape_sample(&onprem_metrics, requests, &import("inventory", "4xx")),
        DENIED as f64
    );
    assert_eq!(
        scrape_sample(&onprem_metrics, requests, &import("dead", "5xx")),
        DEAD as f64
    );
    assert_eq!(
        scrape_sample(&cloud_metrics, requests, &export("inventory", "2xx")),
        ALLOWED as f64
    );
    assert_eq!(
        scrape_sample(&cloud_metrics, requests, &export("inventory", "4xx")),
        0.0
    );
    assert_eq!(
        scrape_sample(&cloud_metrics, requests, &export("dead", "5xx")),
        DEAD as f64
    );
    assert_eq!(
        scrape_sample(
            &onprem_metrics,
            "hybridge_request_duration_seconds_count",
            &[("side", "import"), ("service", "inventory")]
        ),
        (ALLOWED + DENIED) as f64
    );
    assert_eq!(
        scrape_sample(
            &onprem_metrics,
            "hybridge_request_bytes_total",
            &[("side", "import"), ("service", "inventory")]
        ),
        (ALLOWED * 5) as f64
    );
    let decisions = "hybridge_acl_decisions_total";
    assert_eq!(
        scrape_sample(
            &onprem_metrics,
            decisions,
            &[("destination", "inventory"), ("action", "deny")]
        ),
        DENIED as f64
    );
    assert_eq!(
        scrape_sample(
            &onprem_metrics,
            decisions,
            &[("destination", "inventory"), ("action", "allow")]
        ),
        ALLOWED as f64
    );
    assert_eq!(
        scrape_sample(
            &cloud_metrics,
            decisions,
            &[("destination", "inventory"), ("action", "allow")]
        ),
        ALLOWED as f64
    );
    assert_eq!(
        scrape_sample(
            &onprem_metrics,
            "hybridge_bridge_errors_total",
            &[
                ("side", "import"),
                ("service", "inventory"),
                ("reason", "acl-denied")
            ]
        ),
        DENIED as f64
    );
    assert_eq!(
        scrape_sample(&onprem_metrics, "hybridge_tunnels_up", &[]),
        1.0
    );
    assert_eq!(
        scrape_sample(
            &cloud_metrics,
            "hybridge_upstream_endpoint_healthy",
            &[("service", "inventory")]
        ),
        1.0
    );
    assert_eq!(
        scrape_sample(
            &cloud_metrics,
            "hybridge_upstream_endpoint_requests_total",
            &[("service", "inventory")]
        ),
        ALLOWED as f64
    );
    assert_eq!(
        scrape_sample(
            &cloud_metrics,
            "hybridge_upstream_circuit_breaker_trips_total",
            &[("service", "inventory")]
        ),
        0.0
    );

    // The admin API's edges.
    let admin = onprem.addresses().admin;
    assert_eq!(admin_get(admin, "/healthz").await.status, 200);
    assert_eq!(admin_get(admin, "/readyz").await.status, 200);
    let missing = admin_get(admin, "/nope").await;
    assert_eq!(missing.status, 404);
    // An oversized body is refused from its Content-Length, before it is read. The request
    // goes out head first and the answer is read before any body byte, as a client that
    // honours early responses does: a client still writing 17 MiB when the refusal closes the
    // connection would see EPIPE instead of the 413, by timing alone.
    let head = format!(
        "POST /v1/acl/apply HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/toml\r\ncontent-length: {}\r\n\r\n",
        17 << 20
    );
    let mut stream = tokio::net::UnixStream::connect(&onprem.addresses().admin_socket)
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 1024];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::io::AsyncReadExt::read(&mut stream, &mut buf)
                .await
                .unwrap();
            assert!(n > 0, "connection closed before the response head");
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("no response head to an oversized body");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    // The TCP listener is read-only: the same write is refused before its body matters.
    let refused = http1(
        admin,
        "POST",
        "/v1/acl/apply",
        &[("content-type", "application/toml")],
        Bytes::new(),
    )
    .await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.header("x-hybridge-error"), Some("not-authorised"));
    let status = admin_get(admin, "/v1/status").await.json();
    assert_eq!(
        status["peers"][0]["peer"],
        "spiffe://test.hybridge/site/cloud/node/cloud-1"
    );
    // Path-MTU discovery runs in the background: anywhere from QUIC's minimum to our bound.
    let mtu = status["peers"][0]["path_mtu"].as_u64().unwrap();
    assert!(
        (1200..=u64::from(hybridge::tunnel::quic::MAX_UDP_PAYLOAD)).contains(&mtu),
        "{status}"
    );

    onprem.shutdown().await;
    cloud.shutdown().await;
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_until_a_tunnel_is_up() {
    let pki = Pki::new();
    // Dials a port where nothing listens: no tunnel ever comes up.
    let nowhere: SocketAddr = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let lonely = NodeOptions::onprem(&pki, "onprem-1", &[nowhere])
        .start()
        .await;
    let admin = lonely.addresses().admin;
    assert_eq!(admin_get(admin, "/healthz").await.status, 200);
    let not_ready = admin_get(admin, "/readyz").await;
    assert_eq!(not_ready.status, 503);
    lonely.abort().await;
}

#[test]
fn check_config_names_the_file_and_the_failed_check() {
    let pki = Pki::new();
    let options = NodeOptions::cloud(&pki, "cloud-1");
    let config = options.write();
    let config_arg = config.to_str().unwrap();
    let (code, stdout, stderr) = hybridge_cli(&["check-config", "--config", config_arg]);
    assert_eq!(code, 0, "{stdout}{stderr}");

    let write_with = |cert: &std::path::Path, key: &std::path::Path| {
        let text = options
            .to_toml()
            .replace(
                &format!("cert = {:?}", options.files.cert.display().to_string()),
                &format!("cert = {:?}", cert.display().to_string()),
            )
            .replace(
                &format!("key = {:?}", options.files.key.display().to_string()),
                &format!("key = {:?}", key.display().to_string()),
            );
        std::fs::write(&config, text).unwrap();
    };

    // A missing certificate file.
    let missing = pki.path("missing.pem");
    write_with(&missing, &options.files.key);
    let (code, _, stderr) = hybridge_cli(&["check-config", "--config", config_arg]);
    assert_ne!(code, 0);
    assert!(stderr.contains("missing.pem"), "{stderr}");

    // A key that does not match the certificate.
    let other = pki.node("cloud", "cloud-other");
    write_with(&options.files.cert, &other.key);
    let (code, _, stderr) = hybridge_cli(&["check-config", "--config", config_arg]);
    assert_ne!(code, 0);
    assert!(stderr.contains("match"), "{stderr}");

    // A certificate from another CA.
    let foreign = Pki::new();
    let stranger = foreign.node("cloud", "cloud-1");
    write_with(&stranger.cert, &stranger.key);
    let (code, _, stderr) = hybridge_cli(&["check-config", "--config", config_arg]);
    assert_ne!(code, 0);
    assert!(stderr.contains("CA"), "{stderr}");

    // A certificate that expires within 14 days: a warning, and still 0 (cloud-init gates the
    // unit on check-config, so an error would stop replacements booting while it is renewed).
    let short = pki
        .ca
        .issue_node(
            "cloud",
            "cloud-1",
            &[],
            &["127.0.0.1".parse().unwrap()],
            Duration::from_secs(3 * 86_400),
        )
        .unwrap();
    let (cert, key) = short.write(&pki.path("short")).unwrap();
    write_with(&cert, &key);
    let (code, stdout, stderr) = hybridge_cli(&["check-config", "--config", config_arg]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stderr.starts_with("warning: node certificate ")
            && stderr.contains("short.pem")
            && stderr.contains("expires"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_a_table_and_the_access_log_is_one_json_line_per_request() {
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let upstream = demo_upstream("inventory", &cancel).await;
    let base = free_port_block();
    let cloud = NodeOptions::cloud_process(&pki, "cloud-1", base, upstream.local_addr());
    let mut daemon = run_daemon(&cloud.write());
    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[cloud.tunnel_listen.unwrap()]);
    onprem.imports.push(("inventory".into(), "web".into()));
    let onprem = onprem.start().await;
    allow(&onprem, "web", "inventory");
    assert!(onprem.wait_for_route("inventory", WAIT).await);
    let import = import_addr(&onprem, "inventory");
    let a = http1(
        import,
        "PUT",
        "/echo/logged?x=1",
        &[("x-request-id", "req-42")],
        Bytes::from_static(b"hello"),
    )
    .await;
    assert_eq!(a.status, 200);

    // The cloud daemon's stderr is a pipe, so it logs JSON lines; find the access line.
    let line = wait_line(&mut daemon, |l| l.contains("req-42"));
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["target"], "hybridge::access", "{entry}");
    assert_eq!(entry["request_id"], "req-42", "{entry}");
    assert_eq!(entry["caller"], "web", "{entry}");
    assert_eq!(entry["service"], "inventory", "{entry}");
    assert_eq!(entry["method"], "PUT", "{entry}");
    assert_eq!(entry["path"], "/echo/logged?x=1", "{entry}");
    assert_eq!(entry["status"], 200, "{entry}");
    assert_eq!(entry["bytes_in"], 5, "{entry}");
    assert!(entry["bytes_out"].as_u64().unwrap() > 0, "{entry}");
    assert!(entry["duration_us"].is_number(), "{entry}");
    assert_eq!(
        entry["upstream"],
        upstream.local_addr().to_string(),
        "{entry}"
    );
    assert_eq!(entry["acl_rule"], "web-to-inventory", "{entry}");

    let admin = format!("http://{}", cloud.admin);
    let (code, stdout, stderr) =
        tokio::task::block_in_place(|| hybridge_cli(&["status", "--admin", &admin]));
    assert_eq!(code, 0, "{stderr}");
    for needle in [
        "spiffe://test.hybridge/site/cloud/node/cloud-1",
        "spiffe://test.hybridge/site/onprem/node/onprem-1",
        "inventory",
        "policy version",
        "uptime",
        "rtt",
    ] {
        assert!(
            stdout.to_lowercase().contains(&needle.to_lowercase()),
            "{needle} missing in:\n{stdout}"
        );
    }

    onprem.shutdown().await;
    cancel.cancel();
}
