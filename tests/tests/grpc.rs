//! gRPC through the bridge with real grpcio clients and servers (tests/grpc): unary and
//! bidirectional streaming calls, non-OK statuses, ACL denial as PERMISSION_DENIED, and
//! per-request load balancing of one long-lived channel over three endpoints.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use hybridge_tests::*;

async fn client(target: SocketAddr, args: &[&str]) -> (i32, serde_json::Value) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        grpc_client(target, &refs)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_cross_the_bridge_and_one_channel_is_spread_over_all_endpoints() {
    let servers: Vec<(ChildGuard, SocketAddr)> = ["echo-a", "echo-b", "echo-c"]
        .iter()
        .map(|id| grpc_server(id))
        .collect();
    let endpoints: Vec<SocketAddr> = servers.iter().map(|(_, a)| *a).collect();

    let pki = Pki::new();
    let mut cloud = NodeOptions::cloud(&pki, "cloud-1");
    cloud.exports.push(ExportSpec::h2c("echo", &endpoints));
    let cloud = cloud.start().await;
    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[cloud.addresses().tunnel.unwrap()]);
    onprem.imports.push(("echo".into(), "web".into()));
    onprem.imports.push(("echo".into(), "intruder".into()));
    let onprem = onprem.start().await;
    for node in [&cloud, &onprem] {
        allow(node, "web", "echo");
    }
    assert!(onprem.wait_for_route("echo", WAIT).await);
    let imports = &onprem.addresses().imports;
    let (web, intruder) = (imports[0].1, imports[1].1);

    // Unary over one channel: 300 calls, every endpoint gets at least 20%.
    let (code, out) = client(web, &["unary", "--count", "300"]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["ok"], 300);
    for id in ["echo-a", "echo-b", "echo-c"] {
        let n = out["servers"][id].as_u64().unwrap_or(0);
        assert!(n >= 60, "{id} got {n} of 300 calls: {out}");
    }

    // Bidirectional streaming, ping-pong: nothing may be buffered by the bridge.
    let (code, out) = client(web, &["bidi", "--messages", "20"]).await;
    assert_eq!(code, 0, "{out}");
    let expected: Vec<String> = (0..20).map(|i| format!("hello-{i}")).collect();
    assert_eq!(out["messages"], serde_json::json!(expected));

    // Non-OK statuses from the server arrive intact (trailers end to end).
    for (code_number, name) in [
        ("7", "PERMISSION_DENIED"),
        ("5", "NOT_FOUND"),
        ("14", "UNAVAILABLE"),
    ] {
        let (code, out) = client(web, &["fail", "--code", code_number]).await;
        assert_eq!(code, 0, "{out}");
        assert_eq!(out["code"], name);
        assert_eq!(out["details"], "failing as asked");
    }

    // A caller the policy does not allow sees a gRPC PERMISSION_DENIED from the bridge.
    let (code, out) = client(intruder, &["unary", "--count", "1"]).await;
    assert_eq!(code, 1, "{out}");
    assert_eq!(out["error"]["code"], "PERMISSION_DENIED");
    let details = out["error"]["details"].as_str().unwrap();
    assert!(
        details.contains("acl-denied") && details.contains("intruder@onprem"),
        "{details}"
    );

    onprem.shutdown().await;
    cloud.shutdown().await;
    drop(servers);
}
