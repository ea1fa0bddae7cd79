//! Canonical paths through real nodes (issue 15): path variants that reached a denied upstream
//! path (`/api//internal/x`, `/api/%69nternal/x`, `/api/internal%2fx`, absolute-form targets,
//! …) are sent byte for byte over raw HTTP/1.1 (no client normalises them) and over HTTP/2;
//! each gets exactly its expected answer, and no answer of 200 ever shows the upstream a path
//! under the denied prefix. The export decides authoritatively: a path the import let through
//! under `escaped_slashes = "keep"` is refused by an export that rejects escaped slashes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use hybridge::config::Config;
use hybridge::demo::DemoUpstream;
use hybridge::node::Node;
use hybridge_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// allow web → inventory `/api/` (GET, POST), deny web → inventory `/api/internal/`, allow
/// web → inventory `/pub`; web → files is allowed whole (its paths keep escaped slashes).
const POLICY: &str = r#"
[[rule]]
id = "api"
source = "web"
destination = "inventory"
action = "allow"
methods = ["GET", "POST"]
path_prefix = "/api/"

[[rule]]
id = "internal"
source = "web"
destination = "inventory"
action = "deny"
path_prefix = "/api/internal/"

[[rule]]
id = "pub"
source = "web"
destination = "inventory"
action = "allow"
path_prefix = "/pub"

[[rule]]
id = "files"
source = "web"
destination = "files"
action = "allow"
"#;

/// The import listeners written after the fixture's default one: `inventory` again and
/// `files`, both keeping escaped slashes.
const KEEPING_IMPORTS: &str = r#"
[[import]]
service = "inventory"
listen = "127.0.0.1:0"
caller = "web"
escaped_slashes = "keep"

[[import]]
service = "files"
listen = "127.0.0.1:0"
caller = "web"
escaped_slashes = "keep"
"#;

struct Pair {
    _pki: Pki,
    cloud: Node,
    onprem: Node,
    inventory: DemoUpstream,
    files: DemoUpstream,
    cancel: CancellationToken,
}

/// The cloud node exports `inventory` (escaped slashes refused, the default) and `files`
/// (kept); the on-prem node imports `inventory` for `web` with the default, `inventory`
/// again and `files` keeping escaped slashes. Both nodes hold [`POLICY`].
async fn pair() -> Pair {
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let inventory = demo_upstream("inventory", &cancel).await;
    let files = demo_upstream("files", &cancel).await;
    let mut cloud = NodeOptions::cloud(&pki, "cloud-1");
    cloud
        .exports
        .push(ExportSpec::http1("inventory", &[inventory.local_addr()]));
    let mut files_export = ExportSpec::http1("files", &[files.local_addr()]);
    files_export.extra = "escaped_slashes = \"keep\"".into();
    cloud.exports.push(files_export);
    let cloud = cloud.start().await;
    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[cloud.addresses().tunnel.unwrap()]);
    onprem.imports.push(("inventory".into(), "web".into()));
    let config = pki.path("onprem-1.toml");
    std::fs::write(&config, onprem.to_toml() + KEEPING_IMPORTS).unwrap();
    let onprem = Node::start(Config::load(&config).unwrap()).await.unwrap();
    for node in [&cloud, &onprem] {
        let policy = hybridge::acl::parse_acl_file(Path::new("paths.toml"), POLICY).unwrap();
        node.state.acl.apply(policy, "test", false).unwrap();
    }
    for service in ["inventory", "files"] {
        assert!(
            onprem.wait_for_route(service, WAIT).await,
            "tunnel did not come up"
        );
    }
    Pair {
        _pki: pki,
        cloud,
        onprem,
        inventory,
        files,
        cancel,
    }
}

impl Pair {
    /// The on-prem import listener for `inventory` that refuses escaped slashes.
    fn inventory(&self) -> SocketAddr {
        self.import(0, "inventory")
    }

    /// The on-prem import listener for `inventory` that keeps escaped slashes.
    fn inventory_keeping(&self) -> SocketAddr {
        self.import(1, "inventory")
    }

    /// The on-prem import listener for `files` (keeps escaped slashes, as the export does).
    fn files(&self) -> SocketAddr {
        self.import(2, "files")
    }

    fn import(&self, index: usize, service: &str) -> SocketAddr {
        let (name, addr) = &self.onprem.addresses().imports[index];
        assert_eq!(name, service, "import listeners are in config order");
        *addr
    }

    async fn stop(self) {
        self.onprem.shutdown().await;
        self.cloud.shutdown().await;
        self.cancel.cancel();
    }
}

/// A response read off the wire.
#[derive(Debug)]
struct RawAnswer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawAnswer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Writes `METHOD TARGET HTTP/1.1` with the target byte for byte (curl and hyper's client
/// would normalise or refuse some of them), reads the answer to the end of the connection.
async fn raw_request(addr: SocketAddr, method: &str, target: &[u8]) -> RawAnswer {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = Vec::new();
    request.extend_from_slice(method.as_bytes());
    request.push(b' ');
    request.extend_from_slice(target);
    request.extend_from_slice(b" HTTP/1.1\r\nhost: inventory\r\nconnection: close\r\n");
    if method == "POST" {
        request.extend_from_slice(b"content-length: 2\r\n\r\n{}");
    } else {
        request.extend_from_slice(b"\r\n");
    }
    stream.write_all(&request).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut bytes))
        .await
        .expect("the answer did not end")
        .unwrap();
    parse_answer(&bytes)
}

fn parse_answer(bytes: &[u8]) -> RawAnswer {
    let split = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(bytes)));
    let head = String::from_utf8_lossy(&bytes[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = bytes[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    RawAnswer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut chunked: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = chunked.windows(2).position(|w| w == b"\r\n").unwrap();
        let size_text = String::from_utf8_lossy(&chunked[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        chunked = &chunked[line_end + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&chunked[..size]);
        chunked = &chunked[size + 2..];
    }
}

/// What a request must get.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// 200 from the inventory upstream, which saw exactly this path and query.
    Upstream { path: String, query: Option<String> },
    /// 403 `acl-denied`, decided by this rule (callers are not told the rule: the test asks
    /// the node's `acl check` for the decision on the canonical path).
    Denied(&'static str),
    /// 400 `invalid-path`, the body naming this reason.
    Invalid(&'static str),
    /// 400 from the HTTP/1.1 parser before any bridge code runs: a raw control byte or
    /// invalid UTF-8 is not a request line. No `x-hybridge-error`: the bridge never saw it.
    Unparsable,
}

fn upstream(path: &str) -> Expect {
    Expect::Upstream {
        path: path.into(),
        query: None,
    }
}

fn upstream_with_query(path: &str, query: &str) -> Expect {
    Expect::Upstream {
        path: path.into(),
        query: Some(query.into()),
    }
}

/// What went wrong with one answer, or `None` when it is exactly as expected.
fn mismatch(expect: &Expect, answer: &RawAnswer) -> Option<String> {
    let error = answer.header("x-hybridge-error");
    let ok = match expect {
        Expect::Upstream { path, query } => {
            answer.status == 200
                && error.is_none()
                && answer.header("x-demo-upstream") == Some("inventory")
                && serde_json::from_slice::<serde_json::Value>(&answer.body).is_ok_and(|echo| {
                    echo["path"].as_str() == Some(path.as_str())
                        && echo["query"].as_str() == query.as_deref()
                })
        }
        Expect::Denied(_) => {
            answer.status == 403
                && error == Some("acl-denied")
                && answer.header("x-hybridge-acl-rule").is_none()
        }
        Expect::Invalid(reason) => {
            answer.status == 400
                && error == Some("invalid-path")
                && answer
                    .text()
                    .starts_with(&format!("hybridge: invalid-path: {reason}"))
        }
        Expect::Unparsable => answer.status == 400 && error.is_none(),
    };
    (!ok).then(|| {
        format!(
            "expected {expect:?}, got {} {:?} {}",
            answer.status,
            answer.headers,
            answer.text()
        )
    })
}

fn cases() -> Vec<(&'static str, Vec<u8>, Expect)> {
    use Expect::{Denied, Invalid, Unparsable};
    const SLASH: &str = "escaped slash `";
    let mut cases: Vec<(&'static str, Vec<u8>, Expect)> = vec![
        // Plain requests.
        ("GET", b"/api/x".to_vec(), upstream("/api/x")),
        ("POST", b"/api//x".to_vec(), upstream("/api/x")),
        ("GET", b"/api/internal/x".to_vec(), Denied("internal")),
        ("GET", b"/api/internal/".to_vec(), Denied("internal")),
        ("DELETE", b"/api/x".to_vec(), Denied("default-deny")),
        // A prefix ending in `/` covers what is below it, not the bare name: `/api/internal`
        // is the allowed `/api/` rule's, as the policy says.
        ("GET", b"/api/internal".to_vec(), upstream("/api/internal")),
        ("GET", b"/api".to_vec(), Denied("default-deny")),
        ("GET", b"/apiary".to_vec(), Denied("default-deny")),
        // Repeated slashes.
        ("GET", b"/api//internal/x".to_vec(), Denied("internal")),
        ("GET", b"/api///internal//x".to_vec(), Denied("internal")),
        ("GET", b"//api/internal/x".to_vec(), Denied("internal")),
        ("GET", b"/api//x//y//".to_vec(), upstream("/api/x/y/")),
        // Dot-segments, raw and escaped in either case.
        ("GET", b"/api/./internal/x".to_vec(), Denied("internal")),
        ("GET", b"/api/x/../internal/x".to_vec(), Denied("internal")),
        (
            "GET",
            b"/api/public/../internal/x".to_vec(),
            Denied("internal"),
        ),
        (
            "GET",
            b"/api/%2e%2e/api/internal/x".to_vec(),
            Denied("internal"),
        ),
        (
            "GET",
            b"/api/%2E%2E/api/internal/x".to_vec(),
            Denied("internal"),
        ),
        (
            "GET",
            b"/api/.%2e/api/internal/x".to_vec(),
            Denied("internal"),
        ),
        ("GET", b"/api/%2e/internal/x".to_vec(), Denied("internal")),
        (
            "GET",
            b"/pub/../api/internal/x".to_vec(),
            Denied("internal"),
        ),
        (
            "GET",
            b"/pub/%2e%2e/api/internal/x".to_vec(),
            Denied("internal"),
        ),
        ("GET", b"/api/x/..".to_vec(), upstream("/api/")),
        ("GET", b"/api/..".to_vec(), Denied("default-deny")),
        ("GET", b"/api/.../x".to_vec(), upstream("/api/.../x")),
        // Escaped unreserved characters are decoded; other escapes stay, hex upper-cased.
        ("GET", b"/api/%69nternal/x".to_vec(), Denied("internal")),
        ("GET", b"/api/%7Euser".to_vec(), upstream("/api/~user")),
        ("GET", b"/api/%7euser".to_vec(), upstream("/api/~user")),
        ("GET", b"/api/%41%62c".to_vec(), upstream("/api/Abc")),
        ("GET", b"/api/a%3fb".to_vec(), upstream("/api/a%3Fb")),
        ("GET", b"/api/a%3Fb".to_vec(), upstream("/api/a%3Fb")),
        (
            "GET",
            b"/api/a%40b%2bc".to_vec(),
            upstream("/api/a%40b%2Bc"),
        ),
        (
            "GET",
            b"/api/caf%c3%a9".to_vec(),
            upstream("/api/caf%C3%A9"),
        ),
        (
            "GET",
            "/api/caf\u{e9}".as_bytes().to_vec(),
            upstream("/api/caf%C3%A9"),
        ),
        ("GET", b"/api/a%25b".to_vec(), upstream("/api/a%25b")),
        // An escaped escape: decoded twice (some frameworks do) it is /api/internal/x.
        (
            "GET",
            b"/api/%2569nternal/x".to_vec(),
            Invalid("doubly escaped `%2569`"),
        ),
        // Escaped slashes and backslashes: refused (the default).
        ("GET", b"/api/internal%2fx".to_vec(), Invalid(SLASH)),
        ("GET", b"/api/internal%2Fx".to_vec(), Invalid(SLASH)),
        ("GET", b"/api%2finternal/x".to_vec(), Invalid(SLASH)),
        ("GET", b"/api/internal%5cx".to_vec(), Invalid(SLASH)),
        ("GET", b"/api/internal%5Cx".to_vec(), Invalid(SLASH)),
        (
            "GET",
            b"/pub%2f..%2fapi/internal/x".to_vec(),
            Invalid(SLASH),
        ),
        ("GET", b"/api\\internal\\x".to_vec(), Invalid("backslash")),
        // Control bytes: escaped ones reach the bridge and are refused; raw ones do not
        // even parse.
        (
            "GET",
            b"/api/%00".to_vec(),
            Invalid("escaped control byte `%00`"),
        ),
        (
            "GET",
            b"/api/x%0d%0a".to_vec(),
            Invalid("escaped control byte `%0d`"),
        ),
        (
            "GET",
            b"/api/%7f".to_vec(),
            Invalid("escaped control byte `%7f`"),
        ),
        ("GET", b"/api/\0x".to_vec(), Unparsable),
        ("GET", b"/api/\x01x".to_vec(), Unparsable),
        ("GET", b"/api/\xffx".to_vec(), Unparsable),
        // Malformed escapes.
        (
            "GET",
            b"/api/%zz".to_vec(),
            Invalid("malformed percent-escape `%zz`"),
        ),
        (
            "GET",
            b"/api/%4".to_vec(),
            Invalid("malformed percent-escape `%4`"),
        ),
        // Path parameters, raw or escaped.
        (
            "GET",
            b"/api/internal;x=1/y".to_vec(),
            Invalid("path parameter `;`"),
        ),
        (
            "GET",
            b"/api/..;/internal/x".to_vec(),
            Invalid("path parameter `;`"),
        ),
        (
            "GET",
            b"/api/internal%3bx/y".to_vec(),
            Invalid("path parameter `%3B`"),
        ),
        // Absolute-form targets: their path is what counts.
        (
            "GET",
            b"http://any/api/../api/internal/x".to_vec(),
            Denied("internal"),
        ),
        (
            "GET",
            b"http://any/api//x?q=1".to_vec(),
            upstream_with_query("/api/x", "q=1"),
        ),
        // Not paths at all.
        (
            "OPTIONS",
            b"*".to_vec(),
            Invalid("request target `*` (asterisk-form)"),
        ),
        (
            "CONNECT",
            b"inventory:443".to_vec(),
            Invalid("request target is in authority-form"),
        ),
        // Segment-boundary prefixes.
        ("GET", b"/pub".to_vec(), upstream("/pub")),
        ("GET", b"/pub/x".to_vec(), upstream("/pub/x")),
        ("GET", b"/pub/".to_vec(), upstream("/pub/")),
        ("GET", b"/pubx".to_vec(), Denied("default-deny")),
        // A query is not a path: nothing in it is normalised or refused.
        (
            "GET",
            b"/api/x?next=../internal/y&p=%2F%2f%5c;q".to_vec(),
            upstream_with_query("/api/x", "next=../internal/y&p=%2F%2f%5c;q"),
        ),
        (
            "GET",
            b"/api//x/./y?a=/api/internal/%2e%2e".to_vec(),
            upstream_with_query("/api/x/y", "a=/api/internal/%2e%2e"),
        ),
        ("GET", b"/api/internal/x?q=1".to_vec(), Denied("internal")),
    ];
    // Long paths: one canonical, one that climbs back into the denied prefix.
    let long = format!("/api/{}end", "segment/".repeat(1000));
    cases.push(("GET", long.clone().into_bytes(), upstream(&long)));
    let climbing = format!("/api/{}internal/x", "a/../".repeat(1000));
    cases.push(("GET", climbing.into_bytes(), Denied("internal")));
    cases
}

/// The rule that decides `method target` for `web` at the on-prem site, by the node's own
/// explanation of the canonical path (what `hybridge acl check` prints).
fn decided_by(node: &Node, method: &str, target: &[u8]) -> String {
    let typed = String::from_utf8_lossy(target);
    let path = typed.split('?').next().unwrap_or_default();
    let path = path
        .strip_prefix("http://inventory")
        .or_else(|| path.strip_prefix("http://any"))
        .unwrap_or(path);
    let canonical = hybridge::http::path::decision_path(path).unwrap();
    node.state
        .acl
        .explain(
            Some("onprem"),
            "web",
            "inventory",
            Some(method),
            Some(&canonical),
        )
        .rule
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_variants_reach_the_upstream_only_in_their_canonical_form() {
    let p = pair().await;
    let cases = cases();
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    let mut forwarded = 0;
    for (method, target, expect) in &cases {
        let answer = raw_request(p.inventory(), method, target).await;
        if let Some(problem) = mismatch(expect, &answer) {
            failures.push(format!(
                "{method} {}: {problem}",
                String::from_utf8_lossy(target)
            ));
        }
        if let Expect::Denied(rule) = expect {
            let decided = decided_by(&p.onprem, method, target);
            if decided != *rule {
                failures.push(format!(
                    "{method} {}: denied by {decided}, expected {rule}",
                    String::from_utf8_lossy(target)
                ));
            }
        }
        if answer.status == 200 {
            forwarded += 1;
            let echo: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
            let seen = echo["path"].as_str().unwrap_or_default();
            assert!(
                !seen.starts_with("/api/internal/"),
                "{method} {} reached the denied path {seen}",
                String::from_utf8_lossy(target)
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let expected_forwarded = cases
        .iter()
        .filter(|(_, _, e)| matches!(e, Expect::Upstream { .. }))
        .count();
    assert_eq!(forwarded, expected_forwarded);
    assert_eq!(
        p.inventory.hits(),
        expected_forwarded as u64,
        "a refused or denied request reached the upstream"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_grpc_requests_are_decided_on_the_canonical_path() {
    let p = pair().await;
    let mut h2 = h2c(p.inventory()).await;
    let send = |uri: &str, grpc: bool| {
        let mut request = http::Request::builder().method("POST").uri(uri);
        if grpc {
            request = request.header("content-type", "application/grpc");
        }
        request
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap()
    };

    let denied = collect(
        h2.send_request(send("http://inventory/api/%2e%2e/api/internal/x", false))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.header("x-hybridge-error"), Some("acl-denied"));
    assert_eq!(denied.header("x-hybridge-acl-rule"), None);
    assert_eq!(
        decided_by(&p.onprem, "POST", b"/api/%2e%2e/api/internal/x"),
        "internal"
    );

    let allowed = collect(
        h2.send_request(send("http://inventory/api//x/./y?q=%2F", false))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(allowed.status, 200);
    assert_eq!(allowed.json()["path"], "/api/x/y");
    assert_eq!(allowed.json()["query"], "q=%2F");
    assert_eq!(allowed.json()["version"], "HTTP/1.1");

    let refused = collect(
        h2.send_request(send("http://inventory/api/a%2fb", false))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(refused.status, 400);
    assert_eq!(refused.header("x-hybridge-error"), Some("invalid-path"));

    // A gRPC caller gets a gRPC error: INVALID_ARGUMENT, with the reason.
    let refused = collect(
        h2.send_request(send("http://inventory/pkg.Svc/Do;x", true))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(refused.status, 200);
    assert_eq!(refused.header("grpc-status"), Some("3"));
    assert_eq!(refused.header("x-hybridge-error"), Some("invalid-path"));
    assert!(
        refused
            .header("grpc-message")
            .is_some_and(|m| m.starts_with("hybridge: invalid-path: path parameter `;`")),
        "{:?}",
        refused.headers
    );
    // A canonical gRPC path passes unchanged (and is denied here only by the policy).
    let grpc = collect(
        h2.send_request(send("http://inventory/pkg.Svc/Do", true))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(grpc.header("grpc-status"), Some("7"));
    assert_eq!(
        decided_by(&p.onprem, "POST", b"/pkg.Svc/Do"),
        "default-deny"
    );
    assert_eq!(p.inventory.hits(), 1);
    p.stop().await;
}

/// One line of a node's `/metrics`, or `None`.
fn metric(node: &Node, line_start: &str) -> Option<String> {
    let mut out = String::new();
    node.state.metrics.render(&mut out);
    out.lines()
        .find(|l| l.starts_with(line_start))
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_refuses_a_path_the_import_let_through() {
    let p = pair().await;
    let export_refusals =
        r#"hybridge_bridge_errors_total{side="export",service="inventory",reason="invalid-path"}"#;
    let import_refusals =
        r#"hybridge_bridge_errors_total{side="import",service="inventory",reason="invalid-path"}"#;

    // The default import listener refuses the escaped slash itself.
    let answer = raw_request(p.inventory(), "GET", b"/api/internal%2Fx").await;
    assert_eq!(
        mismatch(&Expect::Invalid("escaped slash `%2F`"), &answer),
        None
    );
    assert_eq!(
        metric(&p.onprem, import_refusals),
        Some(format!("{import_refusals} 1"))
    );
    assert_eq!(metric(&p.cloud, export_refusals), None);

    // An import keeping escaped slashes lets it through: for the pre-check `internal%2Fx` is
    // one segment, under the allowed `/api/`. The export, which rejects escaped slashes, decides
    // on its own canonical path and refuses it: the request never reaches the upstream.
    let answer = raw_request(p.inventory_keeping(), "GET", b"/api/internal%2fx").await;
    assert_eq!(
        mismatch(&Expect::Invalid("escaped slash `%2F`"), &answer),
        None
    );
    assert_eq!(
        metric(&p.onprem, import_refusals),
        Some(format!("{import_refusals} 1"))
    );
    assert_eq!(
        metric(&p.cloud, export_refusals),
        Some(format!("{export_refusals} 1"))
    );
    assert_eq!(p.inventory.hits(), 0);

    // What both sides accept still flows through the keeping listener.
    let answer = raw_request(p.inventory_keeping(), "GET", b"/api//x").await;
    assert_eq!(mismatch(&upstream("/api/x"), &answer), None);
    assert_eq!(p.inventory.hits(), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaped_slashes_cross_unchanged_when_both_sides_keep_them() {
    let p = pair().await;
    for (target, expected) in [
        (&b"/docs/a%2fb/c"[..], "/docs/a%2Fb/c"),
        (b"/docs/a%5Cb", "/docs/a%5Cb"),
        // Kept escapes are data inside their segment: `..%2F..%2Fetc` is no dot-segment.
        (b"/docs/..%2F..%2Fetc", "/docs/..%2F..%2Fetc"),
        // Everything else is still made canonical.
        (b"/docs//x/../y%2f%7e", "/docs/y%2F~"),
    ] {
        let answer = raw_request(p.files(), "GET", target).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.header("x-demo-upstream"), Some("files"));
        let echo: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(
            echo["path"],
            expected,
            "{}",
            String::from_utf8_lossy(target)
        );
    }
    // Keeping escaped slashes keeps nothing else.
    for (target, reason) in [
        (&b"/docs\\x"[..], "backslash"),
        (b"/docs/a;b", "path parameter `;`"),
        (b"/docs/%00", "escaped control byte `%00`"),
    ] {
        let answer = raw_request(p.files(), "GET", target).await;
        let expect = Expect::Invalid(reason);
        assert_eq!(mismatch(&expect, &answer), None);
    }
    assert_eq!(p.files.hits(), 4);
    p.stop().await;
}
