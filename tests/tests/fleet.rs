//! Several nodes, one policy: every node computes the same digest for the same policy
//! whatever order it was written in, tells its peers, and a node changed by hand shows up as
//! disagreeing in its peers' `status` and `/metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use hybridge::node::Node;
use hybridge_tests::*;

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
    let status = hybridge::admin::status::status_json(&cloud.state);
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
