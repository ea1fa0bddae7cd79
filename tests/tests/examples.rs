//! The annotated configs in `config-examples/` are real: every option the config parser
//! knows is shown in them, and the two files, with test certificates and loopback addresses
//! substituted for the production ones, start a pair that forwards in both directions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use hybridge::config::Config;
use hybridge::node::Node;
use hybridge_tests::*;
use tokio_util::sync::CancellationToken;

fn example(name: &str) -> String {
    std::fs::read_to_string(repo_root().join("config-examples").join(name)).unwrap()
}

/// Names of the fields of every `Deserialize` struct in a Rust source file (serde renames
/// applied): what a user can write in the config.
fn deserialized_fields(source: &str) -> BTreeSet<String> {
    let mut fields = BTreeSet::new();
    let mut in_struct = false;
    let mut deserialize = false;
    let mut rename: Option<String> = None;
    for line in source.lines() {
        // Whatever its visibility, a field or struct is read the same way.
        let t = line.trim();
        let t = t
            .strip_prefix("pub(crate) ")
            .or_else(|| t.strip_prefix("pub "))
            .unwrap_or(t);
        if t.starts_with("#[derive(") {
            deserialize = t.contains("Deserialize");
        } else if t.starts_with("struct ") {
            in_struct = deserialize && t.ends_with('{');
            deserialize = false;
        } else if in_struct && t == "}" {
            in_struct = false;
        } else if in_struct && t.starts_with("#[serde(") {
            rename = t
                .split("rename = \"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .map(str::to_owned);
        } else if in_struct && !t.starts_with("//") && t.contains(": ") && t.ends_with(',') {
            let name = t.split(':').next().unwrap().trim();
            fields.insert(rename.take().unwrap_or_else(|| name.to_owned()));
        }
    }
    fields
}

#[test]
fn every_config_option_is_shown_in_an_example() {
    let mut known = deserialized_fields(
        &std::fs::read_to_string(repo_root().join("bridge/src/config.rs")).unwrap(),
    );
    known.extend(deserialized_fields(
        &std::fs::read_to_string(repo_root().join("bridge/src/upstream/settings.rs")).unwrap(),
    ));
    // Exports are parsed as a free table whose `name` is taken out before the rest becomes
    // `UpstreamSettings`; the raw field is not a struct field.
    known.insert("name".into());
    for expected in [
        "node", "tls", "tunnel", "peer", "admin", "limits", "export", "import",
    ] {
        assert!(
            known.contains(expected),
            "field scan missed `{expected}`: {known:?}"
        );
    }
    assert!(known.contains("max_ejection_percent"), "{known:?}");
    assert!(known.contains("suffix"), "{known:?}");

    let text = example("cloud.toml") + &example("onprem.toml");
    let shown: BTreeSet<String> = text
        .lines()
        .map(|l| l.trim().trim_start_matches('#').trim())
        .filter_map(|l| {
            if let Some(table) = l.strip_prefix('[') {
                let table = table.trim_matches(|c| c == '[' || c == ']');
                return Some(table.rsplit('.').next().unwrap().to_owned());
            }
            let (key, _) = l.split_once(" = ")?;
            (!key.contains(' ')).then(|| key.to_owned())
        })
        .collect();
    let missing: Vec<&String> = known.difference(&shown).collect();
    assert!(
        missing.is_empty(),
        "options not shown in config-examples: {missing:?}"
    );
}

/// Writes `text` with each production value replaced by its test value, after checking
/// that every value to replace is really in the example.
fn substitute(text: &str, pairs: &[(&str, String)], out: &Path) -> PathBuf {
    let mut text = text.to_owned();
    for (from, to) in pairs {
        assert!(
            text.contains(from),
            "the example no longer contains `{from}`"
        );
        text = text.replace(from, to);
    }
    let settings: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    for leftover in [
        "/etc/hybridge",
        "/var/lib/hybridge",
        "/run/hybridge",
        "\"10.",
        "corp.example:",
    ] {
        assert!(
            !settings.contains(leftover),
            "unsubstituted `{leftover}` in {}:\n{text}",
            out.display()
        );
    }
    std::fs::write(out, text).unwrap();
    out.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_configs_start_a_working_pair() {
    let pki = Pki::with_trust_domain("corp.example");
    let cancel = CancellationToken::new();
    let cloud_files = pki.node("aws", "cloud-1");
    let onprem_files = pki.node("dc1", "dc1-a");
    let crl = pki.path("crl.pem");
    std::fs::write(&crl, pki.ca.crl_pem().unwrap()).unwrap();

    let mut upstreams = Vec::new();
    for name in [
        "recommendations",
        "recommendations",
        "catalog",
        "billing",
        "billing",
        "billing",
    ] {
        upstreams.push(demo_upstream(name, &cancel).await);
    }
    let up = |i: usize| -> String { upstreams[i].local_addr().to_string() };
    let base = free_port_block();
    let port = |i: u16| -> String { format!("127.0.0.1:{}", base + i) };
    let tunnel = port(0);
    let q = |p: &Path| p.display().to_string();

    let cloud = substitute(
        &example("cloud.toml"),
        &[
            ("/etc/hybridge/ca.pem", q(&cloud_files.ca)),
            ("/etc/hybridge/node.pem", q(&cloud_files.cert)),
            ("/etc/hybridge/node.key", q(&cloud_files.key)),
            ("/etc/hybridge/crl.pem", q(&crl)),
            ("/var/lib/hybridge", q(&pki.path("data-cloud"))),
            ("/run/hybridge/admin.sock", q(&pki.path("cloud-admin.sock"))),
            ("0.0.0.0:7443", tunnel.clone()),
            ("127.0.0.1:7180", "127.0.0.1:0".into()),
            ("0.0.0.0:7181", "127.0.0.1:0".into()),
            ("10.20.1.10:50051", up(0)),
            ("10.20.2.10:50051", up(1)),
            ("10.20.1.20:8080", up(2)),
            ("127.0.0.1:8081", port(1)),
            ("127.0.0.1:8080", port(2)),
        ],
        &pki.path("cloud.toml"),
    );
    let onprem = substitute(
        &example("onprem.toml"),
        &[
            ("/etc/hybridge/ca.pem", q(&onprem_files.ca)),
            ("/etc/hybridge/node.pem", q(&onprem_files.cert)),
            ("/etc/hybridge/node.key", q(&onprem_files.key)),
            ("/etc/hybridge/crl.pem", q(&crl)),
            ("/var/lib/hybridge", q(&pki.path("data-onprem"))),
            (
                "/run/hybridge/admin.sock",
                q(&pki.path("onprem-admin.sock")),
            ),
            ("hybridge-tunnel.aws.corp.example:7443", tunnel.clone()),
            ("\"10.20.0.0/16\"", "\"127.0.0.0/8\"".into()),
            ("127.0.0.1:7180", "127.0.0.1:0".into()),
            ("10.1.4.21:8080", up(3)),
            ("10.1.4.22:8080", up(4)),
            ("10.1.4.23:8080", up(5)),
            ("127.0.0.1:9090", port(3)),
            ("127.0.0.1:9091", port(4)),
            ("127.0.0.1:8080", port(5)),
        ],
        &pki.path("onprem.toml"),
    );

    // `hybridge check-config` accepts both as they are.
    for site in [&cloud, &onprem] {
        let (code, stdout, stderr) =
            hybridge_cli(&["check-config", "--config", site.to_str().unwrap()]);
        assert_eq!(code, 0, "check-config {}: {stdout}{stderr}", site.display());
    }

    let cloud = Node::start(Config::load(&cloud).unwrap()).await.unwrap();
    let onprem = Node::start(Config::load(&onprem).unwrap()).await.unwrap();
    for node in [&cloud, &onprem] {
        allow(node, "web", "recommendations");
        allow(node, "checkout", "billing");
    }
    for (node, service) in [
        (&onprem, "recommendations"),
        (&onprem, "catalog"),
        (&cloud, "billing"),
    ] {
        assert!(
            node.wait_for_route(service, WAIT).await,
            "{service} never became routable"
        );
    }

    // on-prem `web` → cloud recommendations (an h2c upstream), through the import listener.
    let recommendations: SocketAddr = port(3).parse().unwrap();
    let answer = http1(recommendations, "GET", "/echo?from=web", &[], Bytes::new()).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.header("x-demo-upstream"), Some("recommendations"));

    // cloud `checkout` → on-prem billing (three health-checked replicas).
    let billing: SocketAddr = port(1).parse().unwrap();
    for _ in 0..6 {
        let answer = http1(
            billing,
            "POST",
            "/echo",
            &[],
            Bytes::from_static(b"invoice"),
        )
        .await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        assert_eq!(answer.header("x-demo-upstream"), Some("billing"));
    }

    // The on-prem gateway routes by Host; no rule lets `web` reach catalog: default deny.
    let gateway: SocketAddr = port(5).parse().unwrap();
    let host = format!("catalog.hybridge:{}", gateway.port());
    let answer = http1(gateway, "GET", "/echo", &[("host", &host)], Bytes::new()).await;
    assert_eq!(answer.status, 403, "{:?}", answer.body);
    assert_eq!(answer.header("x-hybridge-error"), Some("acl-denied"));
    allow(&onprem, "web", "catalog");
    allow(&cloud, "web", "catalog");
    let answer = http1(gateway, "GET", "/echo", &[("host", &host)], Bytes::new()).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.header("x-demo-upstream"), Some("catalog"));

    // The load balancer's health listener answers readiness and nothing else.
    let health = cloud.addresses().health.unwrap();
    let answer = http1(health, "GET", "/readyz", &[], Bytes::new()).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    for path in ["/metrics", "/v1/status", "/v1/acl/rules"] {
        let answer = http1(health, "GET", path, &[], Bytes::new()).await;
        assert_eq!(answer.status, 404, "{path} on the health listener");
    }

    // The policy is read (and changed) through the admin socket, never the TCP listener.
    let rules = admin_socket_client(&cloud)
        .get("/v1/acl/rules")
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&rules).contains("checkout-to-billing"),
        "{rules:?}"
    );
    let refused = http1(
        cloud.addresses().admin,
        "GET",
        "/v1/acl/rules",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.header("x-hybridge-error"), Some("not-authorised"));

    // Every metric the Grafana dashboard queries is exported, with every label it groups by.
    let mut exported = String::new();
    for node in [&cloud, &onprem] {
        let answer = http1(node.addresses().admin, "GET", "/metrics", &[], Bytes::new()).await;
        assert_eq!(answer.status, 200);
        exported += std::str::from_utf8(&answer.body).unwrap();
    }
    check_dashboard(&exported);

    onprem.shutdown().await;
    cloud.shutdown().await;
    cancel.cancel();
}

/// Label keys seen on each metric name in Prometheus text; a family announced by `# TYPE`
/// with no samples yet (no disconnect has happened) maps to no keys.
fn label_keys(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            out.entry(rest.split(' ').next().unwrap().to_owned())
                .or_default();
        }
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap();
        let keys = out.entry(line[..name_end].to_owned()).or_default();
        if line[name_end..].starts_with('{') {
            let labels = &line[name_end + 1..line.rfind('}').unwrap()];
            for pair in labels.split("\",") {
                if let Some((key, _)) = pair.split_once('=') {
                    keys.insert(key.trim_start_matches(',').to_owned());
                }
            }
        }
    }
    out
}

fn check_dashboard(exported: &str) {
    let exported = label_keys(exported);
    let dashboard: serde_json::Value =
        serde_json::from_str(&example("grafana-dashboard.json")).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(query) = variable["query"]["query"].as_str() {
            exprs.push(query.to_owned());
        }
    }
    assert!(
        exprs.len() >= 20,
        "dashboard has only {} queries",
        exprs.len()
    );
    let mut queried = BTreeSet::new();
    for expr in &exprs {
        let metrics: Vec<&str> = expr
            .match_indices("hybridge_")
            .map(|(at, _)| {
                let rest = &expr[at..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .collect();
        assert!(
            !metrics.is_empty(),
            "query names no hybridge metric: {expr}"
        );
        // Labels the query groups or filters by, except those Prometheus adds itself.
        let mut labels = BTreeSet::new();
        for clause in expr.split("by (").skip(1) {
            let list = clause.split(')').next().unwrap();
            labels.extend(list.split(',').map(|l| l.trim().to_owned()));
        }
        for matcher in expr.split('{').skip(1) {
            let list = matcher.split('}').next().unwrap();
            labels.extend(
                list.split(',')
                    .filter_map(|m| m.split(['=', '!']).next())
                    .map(|l| l.trim().to_owned())
                    .filter(|l| !l.is_empty() && !l.contains(' ')),
            );
        }
        for label in ["le", "instance"] {
            labels.remove(label);
        }
        for metric in metrics {
            let keys = exported
                .get(metric)
                .unwrap_or_else(|| panic!("dashboard queries `{metric}`, which /metrics lacks"));
            for label in labels.iter().filter(|_| !keys.is_empty()) {
                assert!(
                    keys.contains(label) || !expr_uses_label_on(expr, metric, label),
                    "dashboard groups `{metric}` by `{label}`, which it does not carry ({keys:?}): {expr}"
                );
            }
            queried.insert(metric.to_owned());
        }
    }
    // And the dashboard covers the families issue 6 asks for.
    for family in [
        "hybridge_requests_total",
        "hybridge_request_duration_seconds_bucket",
        "hybridge_tunnel_rtt_seconds",
        "hybridge_tunnel_lost_packets_total",
        "hybridge_acl_decisions_total",
        "hybridge_upstream_endpoint_healthy",
        "hybridge_upstream_circuit_breaker_trips_total",
        "hybridge_tunnel_handshake_failures_total",
    ] {
        assert!(queried.contains(family), "dashboard lacks {family}");
    }
}

/// Whether `label` is used in the same aggregation as `metric` in `expr` (queries with two
/// metrics, such as a ratio, group each side by its own labels).
fn expr_uses_label_on(expr: &str, metric: &str, label: &str) -> bool {
    expr.split(" / ")
        .filter(|part| part.contains(metric))
        .any(|part| {
            part.contains(&format!("({label}"))
                || part.contains(&format!(", {label}"))
                || part.contains(&format!("{label}="))
        })
}
