//! Upstreams that move: an export whose endpoint is a host name follows the name's addresses
//! without a restart, keeps what it knows about an address that stays, and keeps the last
//! addresses (warning once, counting every failure) when the name stops resolving.
//!
//! A real `hybridge run` process runs in its own mount namespace where `/etc/hosts` and
//! `/etc/nsswitch.conf` (`hosts: files`) are the test's files, so the test moves the name by
//! rewriting its hosts file, as a DNS change would, without touching the machine's resolver.
//! glibc reads the hosts file on every lookup. Needs root (CAP_SYS_ADMIN for the namespace),
//! as CI runs; without it the test fails saying so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use hybridge::demo::DemoUpstream;
use hybridge_tests::*;
use tokio_util::sync::CancellationToken;

const NAME: &str = "inventory.hybridge.test";
/// Every version of the hosts file has this length: it is rewritten in place (the bind
/// mount pins its inode), and a rewrite that never shortens it never shows a reader an
/// empty or truncated file.
const HOSTS_FILE_LENGTH: usize = 512;

/// The test's `/etc/hosts`, as the namespaced daemon sees it.
struct HostsFile(PathBuf);

impl HostsFile {
    /// Makes `NAME` resolve to `addresses` (none: it does not resolve).
    fn point(&self, addresses: &[IpAddr]) {
        let mut text = String::from("127.0.0.1 localhost\n");
        for address in addresses {
            text += &format!("{address} {NAME}\n");
        }
        assert!(text.len() < HOSTS_FILE_LENGTH);
        text += "#";
        text += &" ".repeat(HOSTS_FILE_LENGTH - text.len() - 1);
        text += "\n";
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.0)
            .unwrap();
        file.write_all(text.as_bytes()).unwrap();
    }
}

fn check_privileges() {
    const CAP_SYS_ADMIN: u32 = 21;
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    assert!(
        effective & (1 << CAP_SYS_ADMIN) != 0,
        "this test needs root (CAP_SYS_ADMIN) to give the daemon its own /etc/hosts in a \
         mount namespace; run it as root (CI does)"
    );
}

/// `hybridge run --config CONFIG` in a new mount namespace whose `/etc/hosts` is `hosts` and
/// whose name service looks host names up in files only.
fn run_daemon_with_hosts(config: &Path, hosts: &Path, nsswitch: &Path) -> ChildGuard {
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "mount --bind \"$1\" /etc/hosts && mount --bind \"$2\" /etc/nsswitch.conf \
             && exec \"$3\" run --config \"$4\"",
        )
        .arg("sh")
        .args([hosts, nsswitch, &binary("hybridge"), config])
        // Debug for the upstream: every failed lookup after the warning is a line to wait on.
        .env("HYBRIDGE_LOG", "info,hybridge::upstream=debug");
    let mut child = ChildGuard::spawn(command);
    child.wait_for_line(WAIT, |l| l.contains("hybridge running"));
    child
}

/// Two demo upstreams on one port: `a` on 127.0.0.2, `b` on 127.0.0.3.
async fn upstream_pair(cancel: &CancellationToken) -> (DemoUpstream, DemoUpstream) {
    for _ in 0..20 {
        let a_token = cancel.child_token();
        let a = DemoUpstream::start("a", SocketAddr::from(([127, 0, 0, 2], 0)), a_token.clone())
            .await
            .unwrap();
        let b_addr = SocketAddr::from(([127, 0, 0, 3], a.local_addr().port()));
        match DemoUpstream::start("b", b_addr, cancel.child_token()).await {
            Ok(b) => return (a, b),
            // Taken on 127.0.0.3: try another port.
            Err(_) => a_token.cancel(),
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

/// Waits for the daemon's log line saying the name's addresses became `after`.
fn wait_for_addresses(daemon: &mut ChildGuard, after: &[SocketAddr]) {
    let expected = format!("{after:?}");
    daemon.wait_for_line(WAIT, |line| {
        serde_json::from_str::<serde_json::Value>(line).is_ok_and(|event| {
            event["message"] == "upstream endpoint addresses changed"
                && event["endpoint"] == format!("{NAME}:{}", after[0].port()).as_str()
                && event["after"] == expected.as_str()
        })
    });
}

async fn status(admin: SocketAddr) -> serde_json::Value {
    let answer = http1(admin, "GET", "/v1/status", &[], Bytes::new()).await;
    assert_eq!(answer.status, 200);
    let doc = answer.json();
    doc["exports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["service"] == "inventory")
        .unwrap()["upstream"]
        .clone()
}

/// The status entry of the endpoint at `addr`.
fn endpoint(upstream: &serde_json::Value, addr: SocketAddr) -> serde_json::Value {
    upstream["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["addr"] == addr.to_string().as_str())
        .unwrap_or_else(|| panic!("{addr} is not an endpoint: {upstream}"))
        .clone()
}

fn addresses(upstream: &serde_json::Value) -> Vec<String> {
    upstream["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["addr"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_follows_its_endpoint_name_without_a_restart() {
    check_privileges();
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let (a, b) = upstream_pair(&cancel).await;
    let (a_addr, b_addr) = (a.local_addr(), b.local_addr());
    let (a_ip, b_ip) = (
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)),
    );
    let hosts = HostsFile(pki.path("hosts"));
    hosts.point(&[a_ip]);
    let nsswitch = pki.path("nsswitch.conf");
    std::fs::write(&nsswitch, "hosts: files\n").unwrap();

    let base = free_port_block();
    let mut cloud = NodeOptions::cloud_process(&pki, "cloud-1", base, a_addr);
    let name = format!("{NAME}:{}", a_addr.port());
    cloud.exports[0].endpoints = vec![name.clone()];
    cloud.exports[0].extra = "dns_refresh = \"100ms\"\n".into();
    let config = cloud.write();
    let mut daemon = run_daemon_with_hosts(&config, &hosts.0, &nsswitch);
    let admin = cloud.admin;
    let peer = RawPeer::connect(&pki, "onprem", "onprem-1", cloud.tunnel_listen.unwrap()).await;

    // The name resolves to `a` alone: two answers and two failures (5xx) there.
    let upstream = status(admin).await;
    assert_eq!(addresses(&upstream), [a_addr.to_string()]);
    assert_eq!(upstream["names"][0]["name"], name.as_str());
    assert_eq!(upstream["names"][0]["refreshed"], true);
    for path in ["/", "/", "/status/500", "/status/500"] {
        let (status, _, _) = peer.get("inventory", "web", path).await;
        assert!(status == 200 || status == 500, "{path}: {status}");
    }
    assert_eq!(a.hits(), 4);

    // It gains `b`: `a` keeps its counters (and its passive-health streak), `b` starts fresh,
    // both take requests. No restart: the same process answers throughout.
    hosts.point(&[a_ip, b_ip]);
    wait_for_addresses(&mut daemon, &[a_addr, b_addr]);
    let upstream = status(admin).await;
    assert_eq!(
        addresses(&upstream),
        [a_addr.to_string(), b_addr.to_string()]
    );
    let kept = endpoint(&upstream, a_addr);
    assert_eq!(
        (kept["total_requests"].as_u64(), kept["failures"].as_u64()),
        (Some(4), Some(2))
    );
    assert_eq!(kept["name"], name.as_str());
    assert_eq!(endpoint(&upstream, b_addr)["total_requests"], 0);
    for _ in 0..40 {
        let (status, error, _) = peer.get("inventory", "web", "/").await;
        assert_eq!((status, error), (200, None));
    }
    assert!(
        a.hits() > 4 && b.hits() > 0,
        "a {} b {}",
        a.hits(),
        b.hits()
    );
    assert_eq!(a.hits() + b.hits(), 44);

    // It moves to `b` alone: `a` gets nothing more, and the name's totals keep what it served.
    hosts.point(&[b_ip]);
    wait_for_addresses(&mut daemon, &[b_addr]);
    let a_hits = a.hits();
    for _ in 0..10 {
        let (status, _, _) = peer.get("inventory", "web", "/").await;
        assert_eq!(status, 200);
    }
    assert_eq!(a.hits(), a_hits);
    let upstream = status(admin).await;
    assert_eq!(addresses(&upstream), [b_addr.to_string()]);
    assert_eq!(upstream["names"][0]["total_requests"], 54);
    assert_eq!(upstream["names"][0]["failures"], 2);

    // It stops resolving: `b` stays and keeps answering; the failure is warned once and
    // counted every time.
    hosts.point(&[]);
    let warning = daemon.wait_for_line(WAIT, |line| {
        line.contains("upstream endpoint name did not resolve; keeping its last addresses")
    });
    assert!(warning.contains("WARN"), "{warning}");
    for _ in 0..2 {
        daemon.wait_for_line(WAIT, |line| {
            line.contains("upstream endpoint name still does not resolve")
        });
    }
    let upstream = status(admin).await;
    assert!(
        upstream["names"][0]["dns_failures"].as_u64() >= Some(3),
        "{upstream}"
    );
    assert!(upstream["names"][0]["dns_error"].is_string(), "{upstream}");
    assert_eq!(addresses(&upstream), [b_addr.to_string()]);
    let b_hits = b.hits();
    for _ in 0..5 {
        let (status, error, _) = peer.get("inventory", "web", "/").await;
        assert_eq!((status, error), (200, None));
    }
    assert_eq!(b.hits(), b_hits + 5);
    let warnings = daemon
        .drain()
        .iter()
        .filter(|line| line.contains("upstream endpoint name did not resolve"))
        .count();
    assert_eq!(warnings, 1, "the warning is rate-limited");

    // Metrics: one series per configured endpoint, however many addresses it had.
    let metrics = http1(admin, "GET", "/metrics", &[], Bytes::new()).await;
    let metrics = String::from_utf8(metrics.body.to_vec()).unwrap();
    let labels = [("service", "inventory"), ("endpoint", name.as_str())];
    assert!(sample_value(&metrics, "hybridge_upstream_dns_failures_total", &labels) >= 3.0);
    assert_eq!(
        sample_value(&metrics, "hybridge_upstream_endpoint_addresses", &labels),
        1.0
    );
    assert_eq!(
        sample_value(
            &metrics,
            "hybridge_upstream_endpoint_requests_total",
            &labels
        ),
        59.0
    );
    assert!(
        !metrics.contains(&a_addr.to_string()),
        "no series is labelled by address"
    );

    // `hybridge status` shows the name and its address, and that the name fails.
    let socket = unix_admin(&cloud.admin_socket);
    let (code, stdout, stderr) = hybridge_cli(&["status", "--admin", &socket]);
    assert_eq!(code, 0, "{stderr}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("inventory ") && l.contains(&b_addr.to_string()))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(row.contains(&name), "{row}");
    assert!(
        stdout.contains(&format!("{name}: DNS lookup failing")),
        "{stdout}"
    );

    // It resolves again: said once, and the error clears.
    hosts.point(&[b_ip]);
    daemon.wait_for_line(WAIT, |line| {
        line.contains("upstream endpoint name resolves again")
    });
    assert!(status(admin).await["names"][0]["dns_error"].is_null());

    peer.close();
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit(WAIT), Some(0));
    cancel.cancel();
}
