//! `fleet-bench` (`bench/fleet`): what it costs for every cloud node to reach every on-prem
//! site behind a flow-hashing load balancer, measured two ways in one run.
//!
//! 1. Coverage: three cloud nodes behind the harness's balancer, two on-prem nodes with two
//!    links each, started afresh for every trial — with only the balancer address, and with
//!    the cloud nodes' announced addresses (`member_networks`). Counts the cloud nodes left
//!    with no link to the on-prem site (their callers get 503 `no-route`).
//! 2. Cost of the announced-member links: an on-prem `hybridge run` process's RSS and idle
//!    datagrams per link, with and without them.
//! 3. Cost of the alternative, a cloud node relaying to a sibling: a request that crosses two
//!    tunnel hops (the pair twice, an upper bound on a relay that splices streams) against
//!    one, sequential small requests on one connection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use hybridge::node::Node;
use hybridge_tests::impair::{Balancer, BalancerOptions};
use hybridge_tests::*;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(about = "Fleet coverage and the cost of member links against relaying")]
struct Cli {
    /// Fresh on-prem pairs started per configuration for the coverage count.
    #[arg(long, default_value_t = 30)]
    trials: usize,
    /// Sequential requests per path for the relay latency.
    #[arg(long, default_value_t = 3000)]
    requests: usize,
    /// How long the idle datagram count runs.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    idle: Duration,
}

const MEMBERS: &str = "member_networks = [\"127.0.0.0/8\"]\n";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let upstream = demo_upstream("inventory", &cancel).await;
    let base = free_port_block();
    let tunnels: Vec<SocketAddr> = (0..3u16)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], base + i)))
        .collect();
    let announce: Vec<String> = tunnels.iter().map(|t| format!("\"{t}\"")).collect();
    let mut clouds = Vec::new();
    for (i, tunnel) in tunnels.iter().enumerate() {
        let mut options = NodeOptions::cloud(&pki, &format!("cloud-{}", i + 1));
        options.tunnel_listen = Some(*tunnel);
        options.tunnel_extra = format!("announce = [{}]\n", announce.join(", "));
        options
            .exports
            .push(ExportSpec::http1("inventory", &[upstream.local_addr()]));
        clouds.push(options.start().await);
    }
    let balancer = Balancer::start(BalancerOptions::new("127.0.0.1:0".parse()?, &tunnels))?;

    let mut coverage = serde_json::Map::new();
    for (label, extra) in [("balancer_only", ""), ("announced_members", MEMBERS)] {
        let mut unlinked = 0;
        let mut trials_with_gap = 0;
        for _ in 0..cli.trials {
            let nodes = onprem_pair(&pki, &balancer, extra).await;
            let linked = linked_clouds(&clouds);
            unlinked += clouds.len() - linked;
            trials_with_gap += usize::from(linked < clouds.len());
            for node in nodes {
                node.shutdown().await;
            }
            for cloud in &clouds {
                cloud.state.peers.wait_until(|links| links.is_empty()).await;
            }
        }
        coverage.insert(
            label.into(),
            json!({
                "trials": cli.trials,
                "trials_with_a_cloud_node_unlinked": trials_with_gap,
                "cloud_nodes_unlinked_share": unlinked as f64 / (cli.trials * clouds.len()) as f64,
            }),
        );
    }

    let mut link_cost = serde_json::Map::new();
    for (label, extra) in [("balancer_only", ""), ("announced_members", MEMBERS)] {
        link_cost.insert(
            label.into(),
            idle_process(&pki, &balancer, extra, base + 10, cli.idle).await?,
        );
    }

    let relay = relay_latency(&pki, &upstream, base + 20, cli.requests).await;
    println!(
        "{:#}",
        json!({ "coverage": coverage, "link_cost": link_cost, "relay": relay })
    );
    for cloud in clouds {
        cloud.shutdown().await;
    }
    cancel.cancel();
    Ok(())
}

/// Two in-process on-prem nodes, two links each through the balancer, once their links are
/// up (every announced member too, with `extra` = [`MEMBERS`]).
async fn onprem_pair(pki: &Pki, balancer: &Balancer, extra: &str) -> Vec<Node> {
    let mut nodes = Vec::new();
    for name in ["onprem-a", "onprem-b"] {
        let mut options = NodeOptions::onprem(pki, name, &[balancer.local_addr()]);
        options.peers[0].2 = 2;
        options.peer_extra = extra.into();
        let node = options.start().await;
        let want = if extra.is_empty() { 1 } else { 3 };
        tokio::time::timeout(
            WAIT,
            node.state.peers.wait_until(|links| {
                links.len() >= 2 && distinct_peers(links.iter().map(|l| l.peer.to_string())) >= want
            }),
        )
        .await
        .expect("on-prem links came up");
        nodes.push(node);
    }
    nodes
}

fn distinct_peers(peers: impl Iterator<Item = String>) -> usize {
    peers.collect::<BTreeSet<_>>().len()
}

/// How many cloud nodes hold at least one link to the on-prem site.
fn linked_clouds(clouds: &[Node]) -> usize {
    clouds
        .iter()
        .filter(|c| !c.state.peers.links().is_empty())
        .count()
}

/// An on-prem `hybridge run` process left idle with its links up: its RSS and the
/// datagrams its links send per second.
async fn idle_process(
    pki: &Pki,
    balancer: &Balancer,
    extra: &str,
    admin_port: u16,
    idle: Duration,
) -> anyhow::Result<serde_json::Value> {
    let mut options = NodeOptions::onprem(pki, "onprem-idle", &[balancer.local_addr()]);
    options.peers[0].2 = 2;
    options.peer_extra = extra.into();
    options.admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
    options.data_dir = pki.path(&format!("data-idle-{}", extra.len()));
    options.admin_socket = options.data_dir.join("admin.sock");
    let mut process = run_daemon(&options.write());
    let want = if extra.is_empty() { 2 } else { 5 };
    let admin = options.admin;
    let status = || async move {
        http1(admin, "GET", "/v1/status", &[], Bytes::new())
            .await
            .json()
    };
    let deadline = Instant::now() + WAIT;
    let links = loop {
        let s = status().await;
        let links = s["peers"].as_array().map_or(0, Vec::len);
        if links >= want {
            break links;
        }
        anyhow::ensure!(Instant::now() < deadline, "links never came up: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let sent = |s: &serde_json::Value| -> u64 {
        s["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["sent_packets"].as_u64())
            .sum()
    };
    let before = sent(&status().await);
    tokio::time::sleep(idle).await;
    let after = sent(&status().await);
    let rss_kib = rss_kib(process.child.id())?;
    process.signal(libc::SIGTERM);
    process.wait_exit(WAIT);
    Ok(json!({
        "links": links,
        "rss_mib": rss_kib as f64 / 1024.0,
        "idle_datagrams_per_link_per_s": (after - before) as f64 / idle.as_secs_f64() / links as f64,
    }))
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS"))
}

/// Sequential small requests over one connection: through one pair, and through the pair
/// twice (on-prem → cloud → on-prem → cloud), which stands in for a relay's second hop.
async fn relay_latency(
    pki: &Pki,
    upstream: &hybridge::demo::DemoUpstream,
    port: u16,
    requests: usize,
) -> serde_json::Value {
    let hop_import = SocketAddr::from(([127, 0, 0, 1], port));
    let mut cloud = NodeOptions::cloud(pki, "relay-cloud");
    cloud
        .exports
        .push(ExportSpec::http1("inventory", &[upstream.local_addr()]));
    cloud.exports.push(ExportSpec::http1("hop", &[hop_import]));
    let cloud = cloud.start().await;
    allow(&cloud, "web", "inventory");
    allow(&cloud, "web", "hop");
    let mut onprem = NodeOptions::onprem(pki, "relay-onprem", &[cloud.addresses().tunnel.unwrap()]);
    onprem.imports.push(("hop".into(), "web".into()));
    // The second pass enters on a fixed port, the address `hop` is exported at.
    onprem.extra = format!(
        "\n[[import]]\nservice = \"inventory\"\nlisten = \"{hop_import}\"\ncaller = \"web\"\n"
    );
    let onprem = onprem.start().await;
    allow(&onprem, "web", "inventory");
    allow(&onprem, "web", "hop");
    assert!(onprem.wait_for_route("inventory", WAIT).await);
    assert!(onprem.wait_for_route("hop", WAIT).await);
    let mut result = serde_json::Map::new();
    for (label, address) in [
        ("one_hop", hop_import),
        ("two_hops", import_addr(&onprem, "hop")),
    ] {
        let mut conn = http1_conn::<http_body_util::Full<Bytes>>(address).await;
        let mut waits = Vec::with_capacity(requests);
        for n in 0..requests + requests / 10 {
            let request = http::Request::builder()
                .uri(format!("/echo/{n}"))
                .header("host", "inventory")
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap();
            conn.ready().await.unwrap();
            let started = Instant::now();
            let answer = collect(conn.send_request(request).await.unwrap()).await;
            assert_eq!(answer.status, 200);
            // The first tenth warms connections and pools up.
            if n >= requests / 10 {
                waits.push(started.elapsed());
            }
        }
        waits.sort_unstable();
        let at = |q: f64| waits[((waits.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
        result.insert(
            label.into(),
            json!({ "p50_us": at(0.5), "p99_us": at(0.99) }),
        );
    }
    onprem.shutdown().await;
    cloud.shutdown().await;
    serde_json::Value::Object(result)
}
