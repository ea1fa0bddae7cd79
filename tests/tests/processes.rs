//! Real `hybridge` processes: `hybridge dev` and its printed curl commands, and an on-prem
//! node reconnecting by itself after the cloud node is killed and started again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use hybridge_tests::*;
use tokio_util::sync::CancellationToken;

#[test]
fn hybridge_dev_starts_and_its_printed_curl_commands_succeed() {
    dev_demo_works(None);
}

/// `--worker-threads 1` runs the whole node on a current-thread runtime (not a one-worker
/// multi-thread one): the same demo must work there, including the ACL API's redb calls.
#[test]
fn hybridge_dev_works_on_one_worker_thread() {
    dev_demo_works(Some("1"));
}

fn dev_demo_works(worker_threads: Option<&str>) {
    let base = free_port_block();
    let mut command = Command::new(binary("hybridge"));
    command
        .args(["dev", "--base-port", &base.to_string()])
        .env("HYBRIDGE_LOG", "warn")
        // As an installed binary runs: not under `cargo run` (which sets this for its child).
        .env_remove("CARGO_MANIFEST_DIR");
    if let Some(threads) = worker_threads {
        command.args(["--worker-threads", threads]);
    }
    let mut dev = ChildGuard::spawn(command);
    dev.wait_for_line(Duration::from_secs(60), |l| l == "hybridge dev ready");
    let curls: Vec<String> = dev
        .seen
        .iter()
        .filter(|l| l.starts_with("curl "))
        .cloned()
        .collect();
    assert!(
        curls.len() >= 5,
        "dev printed too few commands: {:?}",
        dev.seen
    );
    for curl in &curls {
        let output = Command::new("sh")
            .args(["-c", curl])
            .output()
            .expect("curl is installed by .ci/run");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{curl} failed: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        );
        if curl.contains("-X POST") {
            assert!(stdout.starts_with("HTTP/1.1 403"), "{curl}: {stdout}");
            assert!(
                stdout.contains("x-hybridge-error: acl-denied"),
                "{curl}: {stdout}"
            );
        } else if curl.contains("size_download") {
            assert_eq!(stdout.trim(), "10485760 bytes 200", "{curl}");
        } else if curl.contains("/metrics") {
            assert!(
                stdout.contains("hybridge_requests_total{side=\"import\""),
                "{curl}: {stdout}"
            );
        } else {
            assert!(
                stdout.starts_with("HTTP/1.1 200") || stdout.starts_with("HTTP/2 200"),
                "{curl}: {stdout}"
            );
            assert!(stdout.contains("x-demo-upstream: "), "{curl}: {stdout}");
        }
    }
    // The printed `hybridge` commands name the running binary and reach the nodes through
    // their admin sockets, pasted into a shell as they are.
    let prefix = format!("{} ", binary("hybridge").display());
    let hybridge_commands: Vec<(String, Vec<String>)> = dev
        .seen
        .iter()
        .filter_map(|l| {
            let args = l.strip_prefix(&prefix)?;
            Some((
                l.clone(),
                args.split_whitespace().map(str::to_owned).collect(),
            ))
        })
        .collect();
    assert!(
        hybridge_commands.len() >= 3,
        "dev printed too few hybridge commands: {:?}",
        dev.seen
    );
    let mut sockets = Vec::new();
    for (line, args) in &hybridge_commands {
        let admin = args.iter().skip_while(|a| *a != "--admin").nth(1).unwrap();
        assert!(admin.starts_with("unix:/"), "{args:?}");
        sockets.push(std::path::PathBuf::from(&admin["unix:".len()..]));
        let output = Command::new("sh").args(["-c", line]).output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "hybridge {args:?} failed: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let expected = match args[0].as_str() {
            "status" => "spiffe://dev.hybridge/site/onprem/node/onprem-1",
            _ if args[1] == "list" => "web-to-inventory",
            _ => "by hybridge dev",
        };
        assert!(stdout.contains(expected), "hybridge {args:?}: {stdout}");
    }
    // Ctrl-C stops everything cleanly.
    dev.signal(libc::SIGINT);
    assert_eq!(
        dev.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{:?}",
        dev.drain()
    );
    for socket in sockets {
        assert!(!socket.exists(), "{} left behind", socket.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_onprem_node_reconnects_by_itself_when_the_cloud_node_comes_back() {
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let upstream = demo_upstream("inventory", &cancel).await;
    let base = free_port_block();
    // Policy lives in the cloud node's redb file, written before the process opens it.
    let cloud = NodeOptions::cloud_process(&pki, "cloud-1", base, upstream.local_addr());
    let cloud_config = cloud.write();
    let start_cloud = || run_daemon(&cloud_config);
    let mut cloud_process = start_cloud();

    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[cloud.tunnel_listen.unwrap()]);
    onprem.imports.push(("inventory".into(), "web".into()));
    // A 3 s idle timeout (default 10 s) bounds how long requests wait on the dead connection
    // before the on-prem node gives up on it; keepalives (1 s) keep a healthy one open.
    let config = onprem.write();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("[tunnel]\n", "[tunnel]\nidle_timeout = \"3s\"\n"),
    )
    .unwrap();
    let onprem = hybridge::node::Node::start(hybridge::config::Config::load(&config).unwrap())
        .await
        .unwrap();
    allow(&onprem, "web", "inventory");
    assert!(onprem.wait_for_route("inventory", WAIT).await);
    let import = import_addr(&onprem, "inventory");
    assert_eq!(
        http1(import, "GET", "/echo/before", &[], Bytes::new())
            .await
            .status,
        200
    );

    // SIGKILL: no GOAWAY, no close; the on-prem node only sees silence.
    cloud_process.child.kill().unwrap();
    cloud_process.child.wait().unwrap();
    let down = http1(import, "GET", "/echo/while-down", &[], Bytes::new()).await;
    assert!(matches!(down.status, 502 | 503), "status {}", down.status);

    let restarted = std::time::Instant::now();
    cloud_process = start_cloud();
    // The restarted node answers the old connection with a stateless reset (same key, derived
    // from its private key), so the on-prem node reconnects without waiting for idle timeout.
    let back = tokio::time::timeout(Duration::from_secs(5), async {
        onprem
            .state
            .peers
            .wait_until(|links| links.iter().any(|l| l.established > restarted))
            .await;
    })
    .await;
    assert!(back.is_ok(), "no new tunnel within 5 s of the restart");
    let after = http1(import, "GET", "/echo/after", &[], Bytes::new()).await;
    assert_eq!(
        after.status,
        200,
        "{}",
        String::from_utf8_lossy(&after.body)
    );
    assert!(
        restarted.elapsed() < Duration::from_secs(5),
        "requests succeed again within 5 s"
    );

    onprem.shutdown().await;
    cloud_process.signal(libc::SIGTERM);
    assert_eq!(cloud_process.wait_exit(Duration::from_secs(30)), Some(0));
    cancel.cancel();
}
