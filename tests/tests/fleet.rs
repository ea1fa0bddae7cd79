//! Several nodes, one policy: every node computes the same digest for the same policy
//! whatever order it was written in, tells its peers, and a node changed by hand shows up as
//! disagreeing in its peers' `status` and `/metrics`. Five `hybridge run` processes behind a
//! flow-hashing balancer show the same for a fleet, and that every cloud node reaches every
//! connected site.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use hybridge::node::Node;
use hybridge_tests::impair::{Balancer, BalancerOptions};
use hybridge_tests::*;
use tokio_util::sync::CancellationToken;

const POLICY: &str = r#"
[[export]]
service = "inventory"
sites = "cloud"

[[rule]]
id = "web-to-inventory"
source = "web"
source_site = "onprem"
destination = "inventory"
action = "allow"

[[rule]]
id = "no-admin"
source = "*"
destination = "inventory-admin"
action = "deny"
"#;

/// The same rules and declaration, written in another order.
const SAME_POLICY_REORDERED: &str = r#"
[[rule]]
id = "no-admin"
source = "*"
destination = "inventory-admin"
action = "deny"

[[rule]]
id = "web-to-inventory"
source = "web"
source_site = "onprem"
destination = "inventory"
action = "allow"

[[export]]
service = "inventory"
sites = "cloud"
"#;

/// Waits until every link of `node` shows the digest `expected` for its peer.
async fn peers_show(node: &Node, expected: &str) {
    let seen = tokio::time::timeout(
        WAIT,
        node.state.peers.wait_until(|links| {
            !links.is_empty() && links.iter().all(|l| *l.policy_digest() == expected)
        }),
    )
    .await;
    assert!(seen.is_ok(), "peers never announced digest {expected}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_one_policy_agree_and_a_changed_node_is_shown_disagreeing() {
    let pki = Pki::new();
    let cloud = NodeOptions::cloud(&pki, "cloud-1").start().await;
    let tunnel = cloud.addresses().tunnel.unwrap();
    let a = NodeOptions::onprem(&pki, "onprem-a", &[tunnel])
        .start()
        .await;
    let b = NodeOptions::onprem(&pki, "onprem-b", &[tunnel])
        .start()
        .await;
    tokio::time::timeout(WAIT, cloud.state.peers.wait_until(|links| links.len() == 2))
        .await
        .unwrap();

    apply_policy(&cloud, POLICY);
    apply_policy(&a, SAME_POLICY_REORDERED);
    apply_policy(&b, POLICY);
    let digest = cloud.state.acl.digest();
    assert_eq!(digest.len(), 64);
    assert_eq!(a.state.acl.digest(), digest, "same policy, another order");
    assert_eq!(b.state.acl.digest(), digest);
    // The local revision is not the identity: a node that applied twice counts higher.
    apply_policy(&b, "");
    apply_policy(&b, POLICY);
    assert_ne!(b.state.acl.version(), cloud.state.acl.version());
    assert_eq!(b.state.acl.digest(), digest);

    // Every node is told the others' digests over the control stream.
    peers_show(&cloud, &digest).await;
    peers_show(&a, &digest).await;
    let status = hybridge::admin::status::status_json(&cloud.state);
    assert_eq!(status["policy_digest"], digest.as_str());
    assert_eq!(status["peers_disagreeing"], 0);
    assert!(
        status["peers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["policy_agrees"] == true),
        "{status}"
    );

    // onprem-b is changed by hand: its peer shows it disagreeing, in status and metrics.
    let mut changed = POLICY.to_owned();
    changed.push_str(
        "\n[[rule]]\nsource = \"cron\"\ndestination = \"inventory\"\naction = \"allow\"\n",
    );
    apply_policy(&b, &changed);
    let b_digest = b.state.acl.digest();
    assert_ne!(b_digest, digest);
    tokio::time::timeout(
        WAIT,
        cloud
            .state
            .peers
            .wait_until(|links| links.iter().any(|l| *l.policy_digest() == b_digest)),
    )
    .await
    .expect("the changed node announces its new digest");
    assert_eq!(cloud.state.peers_disagreeing(), 1);
    let status = hybridge::admin::status::status_document(&cloud.state);
    let rendered = hybridge::admin::client::render_status(&status);
    assert!(rendered.contains("1 peer(s) DISAGREE"), "{rendered}");
    assert!(
        rendered.contains(&format!("{} DIFFERS", &b_digest[..12])),
        "{rendered}"
    );
    assert!(
        rendered.contains(&format!("{} agrees", &digest[..12])),
        "{rendered}"
    );
    let metrics = hybridge::admin::status::metrics_text(&cloud.state);
    assert!(
        metrics.contains("hybridge_policy_peers_disagreeing 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("hybridge_policy_info{{digest=\"{digest}\"}} 1")),
        "{metrics}"
    );

    // Applied again, it agrees again.
    apply_policy(&b, POLICY);
    peers_show(&cloud, &digest).await;
    assert_eq!(cloud.state.peers_disagreeing(), 0);

    a.shutdown().await;
    b.shutdown().await;
    tokio::time::timeout(WAIT, cloud.state.peers.wait_until(|links| links.is_empty()))
        .await
        .unwrap();
    cloud.shutdown().await;
}

/// `hybridge status` tells a script whether the node is ready: 0 ready, 3 answering but not
/// ready, 1 unreachable. A listening node is ready without a tunnel; a dialling one once its
/// peer site has a tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_exits_non_zero_when_the_node_is_not_ready_or_unreachable() {
    let pki = Pki::new();
    let cloud = NodeOptions::cloud(&pki, "cloud-1").start().await;
    let cloud_admin = format!("http://{}", cloud.addresses().admin);
    let (code, stdout, stderr) =
        tokio::task::block_in_place(|| hybridge_cli(&["status", "--admin", &cloud_admin]));
    assert_eq!(
        code, 0,
        "a listening node is ready at once: {stdout}{stderr}"
    );
    let onprem = NodeOptions::onprem(&pki, "onprem-1", &[cloud.addresses().tunnel.unwrap()])
        .start()
        .await;
    let admin = format!("http://{}", onprem.addresses().admin);
    tokio::time::timeout(
        WAIT,
        onprem.state.peers.wait_until(|links| !links.is_empty()),
    )
    .await
    .unwrap();
    let (code, stdout, stderr) =
        tokio::task::block_in_place(|| hybridge_cli(&["status", "--admin", &admin, "--json"]));
    assert_eq!(code, 0, "ready: {stdout}{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["ready"], true);
    cloud.shutdown().await;
    tokio::time::timeout(
        WAIT,
        onprem.state.peers.wait_until(|links| links.is_empty()),
    )
    .await
    .unwrap();
    let (code, stdout, stderr) =
        tokio::task::block_in_place(|| hybridge_cli(&["status", "--admin", &admin]));
    assert_eq!(code, 3, "no tunnel to site cloud: {stdout}{stderr}");
    assert!(
        stdout.contains("not ready: waiting for a tunnel to site cloud"),
        "{stdout}"
    );
    onprem.shutdown().await;
    let (code, _, stderr) =
        tokio::task::block_in_place(|| hybridge_cli(&["status", "--admin", &admin]));
    assert_eq!(code, 1, "unreachable: {stderr}");
}

/// The policy the five-node fleet runs: each side exports one service to the other.
const FLEET_POLICY: &str = r#"
[[export]]
service = "inventory"
sites = "cloud"

[[export]]
service = "ledger"
sites = "onprem"

[[rule]]
id = "web-to-inventory"
source = "web"
source_site = "onprem"
destination = "inventory"
action = "allow"

[[rule]]
id = "billing-to-ledger"
source = "billing"
source_site = "cloud"
destination = "ledger"
action = "allow"
"#;

/// One `hybridge run` process of the fleet and where to reach it.
struct FleetNode {
    name: &'static str,
    config: std::path::PathBuf,
    admin: std::net::SocketAddr,
    socket: String,
    process: ChildGuard,
}

impl FleetNode {
    fn start(name: &'static str, options: &NodeOptions) -> FleetNode {
        let config = options.write();
        FleetNode {
            name,
            process: run_daemon(&config),
            config,
            admin: options.admin,
            socket: unix_admin(&options.admin_socket),
        }
    }

    async fn status(&self) -> serde_json::Value {
        http1(self.admin, "GET", "/v1/status", &[], Bytes::new())
            .await
            .json()
    }

    /// Polls `/v1/status` (bounded by `WAIT`) until `condition` holds; returns that status.
    async fn wait_status(
        &self,
        what: &str,
        condition: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            tick.tick().await;
            let status = self.status().await;
            if condition(&status) {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: {what} not seen within {WAIT:?}; status: {status:#}",
                self.name
            );
        }
    }

    /// The address of this node's import listener for `service`.
    async fn import(&self, service: &str) -> std::net::SocketAddr {
        let status = self.status().await;
        let imports = status["imports"].as_array().unwrap();
        let import = imports.iter().find(|i| i["service"] == service).unwrap();
        import["listen"].as_str().unwrap().parse().unwrap()
    }
}

/// The node names (`…/node/NAME`) of the live, non-draining links in a status document.
fn linked_nodes(status: &serde_json::Value) -> std::collections::BTreeSet<String> {
    status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["draining"] == false)
        .map(|p| {
            p["peer"]
                .as_str()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect()
}

fn names(list: &[&str]) -> std::collections::BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// Whether every peer in a status document agrees with its node's policy digest.
fn all_agree(status: &serde_json::Value) -> bool {
    status["peers_disagreeing"] == 0
        && status["peers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["policy_agrees"] == true)
}

/// Two on-prem and three cloud nodes, each a `hybridge run` process, with a flow-hashing
/// balancer (the NLB) in front of the cloud nodes. The cloud nodes announce their own
/// addresses, so each on-prem node keeps a link to every cloud node whichever way the hash
/// fell: one policy applied to all five in one command agrees everywhere, a node changed by
/// hand is shown disagreeing by its peers, requests from both on-prem nodes reach all three
/// cloud nodes, callers on each cloud node reach the on-prem export, and a cloud node
/// restarted rejoins and agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_five_agrees_and_every_cloud_node_reaches_every_site() {
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let base = free_port_block();
    let cloud_names = ["cloud-1", "cloud-2", "cloud-3"];
    let onprem_names = ["onprem-a", "onprem-b"];
    let tunnels: Vec<std::net::SocketAddr> = (0..3u16)
        .map(|i| std::net::SocketAddr::from(([127, 0, 0, 1], base + 2 * i)))
        .collect();
    let announce: Vec<String> = tunnels.iter().map(|t| format!("\"{t}\"")).collect();
    let mut upstreams = Vec::new();
    let mut clouds = Vec::new();
    for (i, name) in cloud_names.into_iter().enumerate() {
        // Every node's upstream is named after it, so an answer tells who served it.
        let upstream = demo_upstream(name, &cancel).await;
        let mut options =
            NodeOptions::cloud_process(&pki, name, base + 2 * i as u16, upstream.local_addr());
        options.tunnel_extra = format!("announce = [{}]\n", announce.join(", "));
        options.imports.push(("ledger".into(), "billing".into()));
        clouds.push(FleetNode::start(name, &options));
        upstreams.push(upstream);
    }
    let balancer = Balancer::start(BalancerOptions::new(
        "127.0.0.1:0".parse().unwrap(),
        &tunnels,
    ))
    .unwrap();
    let mut onprems = Vec::new();
    for (j, name) in onprem_names.into_iter().enumerate() {
        let upstream = demo_upstream(name, &cancel).await;
        let mut options = NodeOptions::onprem(&pki, name, &[balancer.local_addr()]);
        options.peers[0].2 = 2;
        options.peer_extra = "member_networks = [\"127.0.0.0/8\"]\n".into();
        options.tunnel_extra = "reconnect_max_backoff = \"1s\"\n".into();
        options.admin = std::net::SocketAddr::from(([127, 0, 0, 1], base + 10 + j as u16));
        options
            .exports
            .push(ExportSpec::http1("ledger", &[upstream.local_addr()]));
        options.imports.push(("inventory".into(), "web".into()));
        onprems.push(FleetNode::start(name, &options));
        upstreams.push(upstream);
    }

    // Each on-prem node links to every cloud node, and so every cloud node to both.
    for node in &onprems {
        node.wait_status("links to all three cloud nodes", |s| {
            linked_nodes(s) == names(&cloud_names)
        })
        .await;
    }
    for node in &clouds {
        node.wait_status("links from both on-prem nodes", |s| {
            linked_nodes(s) == names(&onprem_names)
        })
        .await;
    }

    // One policy, five nodes, one command.
    let policy = pki.path("fleet-policy.toml");
    std::fs::write(&policy, FLEET_POLICY).unwrap();
    let mut apply = vec![
        "acl".to_owned(),
        "apply".into(),
        "-f".into(),
        policy.display().to_string(),
    ];
    for node in clouds.iter().chain(&onprems) {
        apply.extend(["--admin".into(), node.socket.clone()]);
    }
    let apply: Vec<&str> = apply.iter().map(String::as_str).collect();
    let (code, stdout, stderr) = hybridge_cli(&apply);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let digest = clouds[0].status().await["policy_digest"]
        .as_str()
        .unwrap()
        .to_owned();
    for node in clouds.iter().chain(&onprems) {
        let status = node
            .wait_status("agreement with every peer", |s| {
                s["policy_digest"] == digest.as_str() && all_agree(s)
            })
            .await;
        assert!(!status["peers"].as_array().unwrap().is_empty());
    }

    // Requests from both on-prem nodes reach all three cloud nodes.
    for node in &onprems {
        let import = node.import("inventory").await;
        let mut served = std::collections::BTreeSet::new();
        for n in 0..300 {
            let answer = http1(import, "GET", &format!("/echo/{n}"), &[], Bytes::new()).await;
            assert_eq!(
                answer.status,
                200,
                "{}",
                String::from_utf8_lossy(&answer.body)
            );
            served.insert(answer.header("x-demo-upstream").unwrap().to_owned());
            if served.len() == cloud_names.len() {
                break;
            }
        }
        assert_eq!(
            served,
            names(&cloud_names),
            "{} reached only {served:?}",
            node.name
        );
    }
    // Callers on every cloud node reach the on-prem export: no 503 no-route anywhere.
    let mut served = std::collections::BTreeSet::new();
    for node in &clouds {
        let import = node.import("ledger").await;
        for n in 0..20 {
            let answer = http1(import, "GET", &format!("/echo/{n}"), &[], Bytes::new()).await;
            assert_eq!(
                answer.status,
                200,
                "via {}: {}",
                node.name,
                String::from_utf8_lossy(&answer.body)
            );
            served.insert(answer.header("x-demo-upstream").unwrap().to_owned());
        }
    }
    assert_eq!(served, names(&onprem_names));

    // cloud-2 changed by hand: both its peers show it disagreeing.
    let (code, stdout, stderr) = hybridge_cli(&[
        "acl",
        "add",
        "--source",
        "cron",
        "--destination",
        "inventory",
        "--allow",
        "--admin",
        &clouds[1].socket,
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let changed = clouds[1].status().await["policy_digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(changed, digest);
    for node in &onprems {
        node.wait_status("cloud-2 shown disagreeing", |s| {
            let peers = s["peers"].as_array().unwrap();
            s["peers_disagreeing"].as_u64() >= Some(1)
                && peers.iter().all(|p| {
                    let is_cloud_2 = p["peer"].as_str().unwrap().ends_with("/cloud-2");
                    p["policy_agrees"] == !is_cloud_2
                        && (!is_cloud_2 || p["policy_digest"] == changed.as_str())
                })
        })
        .await;
        let (code, text, _) = hybridge_cli(&["status", "--admin", &node.socket]);
        assert_eq!(code, 0, "{text}");
        assert!(text.contains("DISAGREE"), "{text}");
        // The announced members are dialled and shown as such.
        for tunnel in &tunnels {
            assert!(
                text.contains(&format!("{tunnel} (cloud, announced)")),
                "{text}"
            );
        }
        assert!(
            text.contains(&format!("{} DIFFERS", &changed[..12])),
            "{text}"
        );
    }
    let (code, stdout, stderr) = hybridge_cli(&[
        "acl",
        "apply",
        "-f",
        &policy.display().to_string(),
        "--admin",
        &clouds[1].socket,
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    for node in &onprems {
        node.wait_status("agreement again", all_agree).await;
    }

    // cloud-3 stopped and started again: it rejoins with the policy it kept, and agrees.
    clouds[2].process.signal(libc::SIGTERM);
    assert_eq!(clouds[2].process.wait_exit(WAIT), Some(0));
    for node in &onprems {
        node.wait_status("cloud-3 gone", |s| !linked_nodes(s).contains("cloud-3"))
            .await;
    }
    clouds[2].process = run_daemon(&clouds[2].config);
    clouds[2]
        .wait_status("rejoined both on-prem nodes, agreeing", |s| {
            linked_nodes(s) == names(&onprem_names)
                && s["policy_digest"] == digest.as_str()
                && all_agree(s)
        })
        .await;
    for node in &onprems {
        node.wait_status("cloud-3 back and agreeing", |s| {
            linked_nodes(s) == names(&cloud_names) && all_agree(s)
        })
        .await;
    }
    let import = clouds[2].import("ledger").await;
    let answer = http1(import, "GET", "/echo/after-restart", &[], Bytes::new()).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );

    for node in clouds.iter_mut().chain(onprems.iter_mut()) {
        node.process.signal(libc::SIGTERM);
        assert_eq!(
            node.process.wait_exit(WAIT),
            Some(0),
            "{} did not stop",
            node.name
        );
    }
    cancel.cancel();
}
