//! Who may administer a node, as an operator meets it: a `hybridge run` daemon with its admin
//! socket, read-only TCP listener and remote mTLS listener, driven by the real `hybridge` CLI
//! as root, as an unprivileged user and as a member of the socket's group (`setpriv`), and with
//! administrator, service, node and revoked certificates; browser-style requests (Origin,
//! foreign Host, text/plain writes) refused on every listener, each refusal logged once with
//! its offender; and a 10,000-rule policy applied through the socket in under 5 s as one
//! audit entry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hybridge_ca::tls::{PeerExpectation, TlsMaterial};
use hybridge_tests::*;
use hyper_util::rt::TokioIo;

/// A `hybridge run` daemon with all three admin doors on fixed loopback addresses.
struct AdminNode {
    daemon: ChildGuard,
    socket: PathBuf,
    /// The read-only TCP listener.
    admin: SocketAddr,
    /// The remote mTLS listener.
    remote: SocketAddr,
    crl: PathBuf,
    /// World-traversable (0755), so the socket's own mode is what keeps others out.
    run_dir: tempfile::TempDir,
}

fn start_node(pki: &Pki) -> AdminNode {
    let base = free_port_block();
    let run_dir = tempfile::Builder::new()
        .prefix("hybridge-admin-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(run_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut options = NodeOptions::cloud(pki, "cloud-1");
    options.tunnel_listen = Some(SocketAddr::from(([127, 0, 0, 1], base)));
    options.admin = SocketAddr::from(([127, 0, 0, 1], base + 1));
    let remote = SocketAddr::from(([127, 0, 0, 1], base + 2));
    options.admin_socket = run_dir.path().join("admin.sock");
    options.admin_extra = format!("\n[admin.remote]\nlisten = \"{remote}\"\n");
    let config = options.write();
    // An (empty) CRL from the start, so a revocation is one SIGHUP away.
    let crl = pki.path("crl.pem");
    std::fs::write(&crl, pki.ca.crl_pem().unwrap()).unwrap();
    let key_line = format!("key = {:?}\n", options.files.key.display().to_string());
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains(&key_line), "{text}");
    std::fs::write(
        &config,
        text.replace(
            &key_line,
            &format!("{key_line}crl = {:?}\n", crl.display().to_string()),
        ),
    )
    .unwrap();
    let daemon = run_daemon(&config);
    AdminNode {
        daemon,
        socket: options.admin_socket,
        admin: options.admin,
        remote,
        crl,
        run_dir,
    }
}

impl AdminNode {
    fn unix(&self) -> String {
        unix_admin(&self.socket)
    }

    fn http(&self) -> String {
        format!("http://{}", self.admin)
    }

    fn https(&self) -> String {
        format!("https://{}", self.remote)
    }

    /// Waits for the daemon's next log line containing `needle`.
    fn log_line(&mut self, needle: &str) -> String {
        let needle = needle.to_owned();
        tokio::task::block_in_place(|| self.daemon.wait_for_line(WAIT, |l| l.contains(&needle)))
    }
}

/// Runs `program ARGS` off the runtime (the CLI blocks on its own request).
async fn run(program: Command) -> Output {
    let mut program = program;
    tokio::task::spawn_blocking(move || program.output().unwrap())
        .await
        .unwrap()
}

async fn hybridge(args: &[&str]) -> Output {
    let mut command = Command::new(binary("hybridge"));
    command.args(args).env_remove("HYBRIDGE_ADMIN");
    run(command).await
}

/// `hybridge ARGS` as uid/gid 65534 (nobody), with `groups` as its only supplementary groups.
async fn hybridge_as_nobody(binary: &Path, groups: Option<u32>, args: &[&str]) -> Output {
    let mut command = Command::new("setpriv");
    command.args(["--reuid=65534", "--regid=65534"]);
    match groups {
        None => command.arg("--clear-groups"),
        Some(gid) => command.arg(format!("--groups={gid}")),
    };
    command.arg(binary).args(args).env_remove("HYBRIDGE_ADMIN");
    run(command).await
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn succeeded(output: &Output, what: &str) -> String {
    let (stdout, stderr) = text(output);
    assert!(output.status.success(), "{what}: {stdout}{stderr}");
    stdout
}

fn failed(output: &Output, what: &str) -> String {
    let (stdout, stderr) = text(output);
    assert!(!output.status.success(), "{what} succeeded: {stdout}");
    assert_eq!(stderr.lines().count(), 1, "{what}: {stderr}");
    stderr
}

fn am_root() -> bool {
    std::fs::metadata("/proc/self").unwrap().uid() == 0
}

fn setpriv_available() -> bool {
    Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// An HTTP/1.1 connection over TLS with a client certificate, its driver spawned.
async fn https_connection(
    addr: SocketAddr,
    (cert, key): &(PathBuf, PathBuf),
    ca: &Path,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>> {
    let material = TlsMaterial::load(ca, cert, key, None).unwrap();
    let expect = PeerExpectation::NodeOfSites {
        trust_domain: TRUST_DOMAIN.into(),
        sites: Vec::new(),
    };
    let config = hybridge_ca::tls::client_config(&material, expect, &[b"http/1.1"]).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

/// A request to `addr` (`Host` is its address unless `headers` name one).
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> http::Request<http_body_util::Full<Bytes>> {
    let mut builder = http::Request::builder().method(method).uri(path);
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        builder = builder.header("host", addr.to_string());
    }
    for (n, v) in headers {
        builder = builder.header(*n, *v);
    }
    builder
        .body(http_body_util::Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

/// One HTTP/1.1 request over TLS with a client certificate.
async fn https_request(
    addr: SocketAddr,
    identity: &(PathBuf, PathBuf),
    ca: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut sender = https_connection(addr, identity, ca).await;
    let request = request(addr, method, path, headers, body);
    collect(sender.send_request(request).await.unwrap()).await
}

fn rule_ids(listed: &str) -> Vec<String> {
    let listed: serde_json::Value = serde_json::from_str(listed).unwrap();
    listed["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_socket_its_group_and_administrator_certificates_change_policy() {
    let pki = Pki::new();
    let mut node = start_node(&pki);
    let (unix, http, https) = (node.unix(), node.http(), node.https());
    let ca = pki.path("ca.pem");
    let socket_meta = std::fs::metadata(&node.socket).unwrap();
    assert_eq!(socket_meta.permissions().mode() & 0o7777, 0o660);
    // Every refused request is logged once; this counts them for the check at the end.
    let mut refusals = 0;

    // (b) The local administrator: writes through the socket, audited by uid.
    let add = [
        "acl",
        "add",
        "--from",
        "web",
        "--to",
        "inventory",
        "--allow",
    ];
    let out = hybridge(&[&add[..], &["--admin", &unix]].concat()).await;
    succeeded(&out, "acl add through the socket");
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    let log = succeeded(
        &hybridge(&["acl", "log", "--admin", &unix]).await,
        "acl log",
    );
    let me = if am_root() {
        "uid:0(root)".to_string()
    } else {
        format!("uid:{uid}")
    };
    assert!(log.contains("add    web-to-inventory"), "{log}");
    assert!(log.contains(&format!("by {me}")), "{log}");

    // (a) An unprivileged local user.
    if !am_root() {
        eprintln!("skipped the unprivileged-user part: not running as root (setpriv needs it)");
    } else if !setpriv_available() {
        eprintln!("skipped the unprivileged-user part: setpriv is not installed");
    } else {
        // A copy of the binary nobody can run whatever the permissions of the build tree.
        let bin = node.run_dir.path().join("hybridge");
        std::fs::copy(binary("hybridge"), &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let everything = [
            "acl", "add", "--from", "*", "--to", "*", "--allow", "--id", "pwned",
        ];

        // The socket's mode keeps it out before a byte is sent.
        let out =
            hybridge_as_nobody(&bin, None, &[&everything[..], &["--admin", &unix]].concat()).await;
        let err = failed(&out, "nobody writing through the socket");
        assert!(
            err.contains(&format!(
                "permission denied on the admin socket {}",
                node.socket.display()
            )),
            "{err}"
        );

        // The TCP listener answers, read-only: status yes, rules and writes no.
        let out = hybridge_as_nobody(&bin, None, &["status", "--admin", &http]).await;
        // Answered; a listening node is ready without a tunnel, so `status` exits 0.
        assert_eq!(out.status.code(), Some(0), "nobody reading status over TCP");
        let status = text(&out).0;
        assert!(status.contains("spiffe://test.hybridge/site/cloud/node/cloud-1"));
        let out =
            hybridge_as_nobody(&bin, None, &[&everything[..], &["--admin", &http]].concat()).await;
        let err = failed(&out, "nobody writing over TCP");
        assert!(
            err.contains("the TCP admin listener does not serve the ACL API")
                && err.contains(&format!(
                    "use the admin socket (hybridge acl --admin {unix})"
                ))
                && err.contains("or https:// with an administrator certificate")
                && err.contains("403 Forbidden, not-authorised"),
            "{err}"
        );
        refusals += 1;
        let line = node.log_line("admin request refused");
        assert!(
            line.contains("\"caller\":\"tcp:127.0.0.1:") && line.contains("/v1/acl/rules"),
            "{line}"
        );
        for args in [&["acl", "rm", "web-to-inventory"][..], &["acl", "ls"][..]] {
            let out = hybridge_as_nobody(&bin, None, &[args, &["--admin", &http]].concat()).await;
            failed(&out, "nobody over TCP");
            refusals += 1;
        }
        let deleted = http1(
            node.admin,
            "DELETE",
            "/v1/status",
            &[("content-type", "application/json")],
            Bytes::new(),
        )
        .await;
        assert_eq!(deleted.status, 403);
        assert_eq!(deleted.header("x-hybridge-error"), Some("not-authorised"));
        refusals += 1;
        let posted = http1(
            node.admin,
            "POST",
            "/healthz",
            &[("content-type", "application/json")],
            Bytes::new(),
        )
        .await;
        assert_eq!(posted.status, 403, "{:?}", posted.body);
        refusals += 1;

        // A member of the socket's group administers like root, audited as itself.
        let group = socket_meta.gid();
        let out = hybridge_as_nobody(
            &bin,
            Some(group),
            &[
                "acl",
                "add",
                "--from",
                "reporting",
                "--to",
                "inventory",
                "--allow",
                "--admin",
                &unix,
            ],
        )
        .await;
        succeeded(&out, "a member of the socket's group writing");
        let log = succeeded(
            &hybridge(&["acl", "log", "--limit", "1", "--admin", &unix]).await,
            "acl log",
        );
        assert!(
            log.contains("add    reporting-to-inventory") && log.contains("by uid:65534(nobody)"),
            "{log}"
        );
    }

    // (c) Remote administration with an administrator certificate.
    let alice = pki.admin("alice");
    let with = |(cert, key): &(PathBuf, PathBuf)| -> Vec<String> {
        vec![
            "--admin".into(),
            https.clone(),
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
            "--ca".into(),
            ca.display().to_string(),
        ]
    };
    let args = |base: &[&str], identity: &(PathBuf, PathBuf)| -> Vec<String> {
        base.iter()
            .map(|s| (*s).to_owned())
            .chain(with(identity))
            .collect()
    };
    let run_with = |base: &[&str], identity: &(PathBuf, PathBuf)| {
        let args = args(base, identity);
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            hybridge(&refs).await
        }
    };
    let out = run_with(
        &[
            "acl",
            "add",
            "--from",
            "batch",
            "--to",
            "inventory",
            "--deny",
        ],
        &alice,
    )
    .await;
    succeeded(&out, "alice adding a rule remotely");
    let log = succeeded(
        &run_with(&["acl", "log", "--limit", "1"], &alice).await,
        "alice reading the log",
    );
    assert!(
        log.contains("add    batch-to-inventory")
            && log.contains("by spiffe://test.hybridge/admin/alice"),
        "{log}"
    );
    // Answered over mTLS; a listening node is ready without a tunnel, so `status` exits 0.
    let out = run_with(&["status"], &alice).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "alice: status: {:?}",
        text(&out)
    );
    let status = text(&out).0;
    assert!(status.contains("policy version"), "{status}");

    // A service and a node certificate of the same CA are refused in the handshake, each
    // logged with the check that failed.
    let service = pki.service("web");
    let onprem = pki.node("onprem", "onprem-1");
    for (identity, id) in [
        (service, "spiffe://test.hybridge/svc/web"),
        (
            (onprem.cert, onprem.key),
            "spiffe://test.hybridge/site/onprem/node/onprem-1",
        ),
    ] {
        let out = run_with(&["acl", "rm", "web-to-inventory"], &identity).await;
        let err = failed(&out, id);
        assert!(
            err.contains(&format!(
                "the remote admin listener at {https} refused this client"
            )) && err.contains(
                "it accepts only administrator certificates (spiffe://test.hybridge/admin/NAME)"
            ) && err.contains(&format!("this one is {id}")),
            "{err}"
        );
        let line = node.log_line("admin TLS handshake refused");
        assert!(
            line.contains(&format!(
                "peer is {id} but expected an administrator (spiffe://test.hybridge/admin/NAME)"
            )),
            "{line}"
        );
    }

    // Revoked administrators are refused once the node has the new CRL (SIGHUP): bob at his
    // next handshake, carol on the connection she holds open.
    let bob = pki.admin("bob");
    succeeded(
        &run_with(&["acl", "ls"], &bob).await,
        "bob before revocation",
    );
    let carol = pki.admin("carol");
    let mut carol_connection = https_connection(node.remote, &carol, &ca).await;
    let answer = collect(
        carol_connection
            .send_request(request(node.remote, "GET", "/v1/acl/rules", &[], ""))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 200);
    for name in ["bob", "carol"] {
        pki.ca
            .revoke_spiffe(
                &hybridge_ca::SpiffeId::admin(TRUST_DOMAIN, name).unwrap(),
                hybridge_ca::authority::RevocationReason::PrivilegeWithdrawn,
            )
            .unwrap();
    }
    std::fs::write(&node.crl, pki.ca.crl_pem().unwrap()).unwrap();
    node.daemon.signal(libc::SIGHUP);
    // The reload and the connection it ends log in either order.
    let (closing, reloaded) = (
        "closing a remote admin connection",
        "configuration reloaded",
    );
    let mut lines = Vec::new();
    for _ in 0..2 {
        lines.push(tokio::task::block_in_place(|| {
            node.daemon
                .wait_for_line(WAIT, |l| l.contains(closing) || l.contains(reloaded))
        }));
    }
    assert!(lines.iter().any(|l| l.contains(reloaded)), "{lines:?}");
    let line = lines.iter().find(|l| l.contains(closing)).unwrap();
    assert!(
        line.contains("spiffe://test.hybridge/admin/carol") && line.contains("certificate revoked"),
        "{line}"
    );
    let after = carol_connection
        .send_request(request(node.remote, "GET", "/v1/acl/rules", &[], ""))
        .await;
    assert!(after.is_err(), "carol's connection still answers");
    let err = failed(&run_with(&["acl", "ls"], &bob).await, "revoked bob");
    assert!(
        err.contains("this one is spiffe://test.hybridge/admin/bob"),
        "{err}"
    );
    let line = node.log_line("admin TLS handshake refused");
    assert!(line.contains("certificate revoked (serial "), "{line}");
    succeeded(
        &run_with(&["acl", "ls"], &alice).await,
        "alice after the reload",
    );

    // (d) What a browser sends is refused on every listener, and changes nothing.
    let before = rule_ids(&succeeded(
        &hybridge(&["acl", "ls", "--json", "--admin", &unix]).await,
        "ls",
    ));
    let everything = r#"{"source":"*","destination":"*","action":"allow","id":"csrf"}"#;
    let host = node.admin.to_string();
    let rebound = format!("rebound.example:{}", node.admin.port());
    for (headers, reason) in [
        (
            vec![("origin", "http://evil.example"), ("host", host.as_str())],
            "Origin header",
        ),
        (
            vec![("host", "evil.example:7180")],
            "Host \\\"evil.example:7180\\\"",
        ),
        (
            vec![("host", rebound.as_str())],
            "does not name this listener",
        ),
    ] {
        let answer = http1(node.admin, "GET", "/v1/status", &headers, Bytes::new()).await;
        assert_eq!(answer.status, 403, "{headers:?}");
        assert_eq!(answer.header("x-hybridge-error"), Some("not-authorised"));
        refusals += 1;
        let line = node.log_line("admin request refused");
        assert!(line.contains(reason), "{line}");
    }
    assert_eq!(
        http1(node.admin, "GET", "/v1/status", &[], Bytes::new())
            .await
            .status,
        200
    );
    for headers in [
        vec![("content-type", "text/plain")],
        vec![("content-type", "application/x-www-form-urlencoded")],
        vec![
            ("content-type", "application/json"),
            ("origin", "http://evil.example"),
        ],
        vec![
            ("content-type", "application/json"),
            ("host", "evil.example"),
        ],
    ] {
        let answer = unix_http1(
            &node.socket,
            "POST",
            "/v1/acl/rules",
            &headers,
            Bytes::from_static(everything.as_bytes()),
        )
        .await;
        assert_eq!(answer.status, 403, "{headers:?}: {:?}", answer.body);
        assert_eq!(answer.header("x-hybridge-error"), Some("not-authorised"));
        assert!(answer.json()["error"].is_string());
        refusals += 1;
        let line = node.log_line("admin request refused");
        assert!(line.contains(&format!("uid:{uid}")), "{line}");
    }
    for headers in [
        vec![("content-type", "text/plain")],
        vec![
            ("content-type", "application/json"),
            ("origin", "https://evil.example"),
        ],
        vec![
            ("content-type", "application/json"),
            ("host", "evil.example:443"),
        ],
    ] {
        let answer = https_request(
            node.remote,
            &alice,
            &ca,
            "POST",
            "/v1/acl/rules",
            &headers,
            everything,
        )
        .await;
        assert_eq!(answer.status, 403, "{headers:?}: {:?}", answer.body);
        refusals += 1;
        let line = node.log_line("admin request refused");
        assert!(
            line.contains("spiffe://test.hybridge/admin/alice"),
            "{line}"
        );
    }
    // The same request, as the CLI sends it, goes through.
    let answer = https_request(
        node.remote,
        &alice,
        &ca,
        "POST",
        "/v1/acl/rules",
        &[("content-type", "application/json")],
        r#"{"source":"cron","destination":"inventory","action":"deny"}"#,
    )
    .await;
    assert_eq!(answer.status, 201, "{:?}", answer.body);
    let after = rule_ids(&succeeded(
        &hybridge(&["acl", "ls", "--json", "--admin", &unix]).await,
        "ls",
    ));
    assert!(
        !after.iter().any(|id| id == "csrf" || id == "pwned"),
        "{after:?}"
    );
    assert_eq!(after.len(), before.len() + 1, "{before:?} → {after:?}");

    // Each refusal was logged exactly once: a last one marks the end of the log so far.
    let marker = http1(node.admin, "GET", "/v1/acl/end-of-test", &[], Bytes::new()).await;
    assert_eq!(marker.status, 403);
    refusals += 1;
    node.log_line("/v1/acl/end-of-test");
    let logged = node
        .daemon
        .drain()
        .iter()
        .filter(|l| l.contains("admin request refused"))
        .count();
    assert_eq!(logged, refusals);

    // Stopping removes the socket.
    node.daemon.signal(libc::SIGTERM);
    let exit = tokio::task::block_in_place(|| node.daemon.wait_exit(Duration::from_secs(30)));
    assert_eq!(exit, Some(0));
    assert!(!node.socket.exists(), "socket left behind");
}

/// A generated policy of `n` rules (~150 bytes of TOML each), `variant` changing some.
fn big_policy(n: usize, changed_every: Option<usize>) -> String {
    let mut text = String::with_capacity(n * 180);
    for i in 0..n {
        let action = match changed_every {
            Some(every) if i % every == 0 => "deny",
            _ => "allow",
        };
        text += &format!(
            "[[rule]]\nid = \"rule-{i:05}\"\nsource = \"svc-{i:05}\"\ndestination = \"backend-{:03}\"\naction = \"{action}\"\nmethods = [\"GET\", \"POST\"]\npath_prefix = \"/api/v1/items\"\ndescription = \"generated rule {i}\"\n\n",
            i % 500
        );
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_thousand_rule_policy_applies_through_the_socket_in_under_five_seconds() {
    let pki = Pki::new();
    let node = NodeOptions::cloud(&pki, "cloud-1").start().await;
    let unix = unix_admin(&node.addresses().admin_socket);
    let file = pki.path("big.toml");
    let policy = big_policy(10_000, None);
    assert!(policy.len() > 1_300_000, "{} bytes", policy.len());
    std::fs::write(&file, &policy).unwrap();
    // Build the CLI first so that the timing is the apply's alone.
    binary("hybridge");

    let started = Instant::now();
    let out = hybridge(&[
        "acl",
        "apply",
        "-f",
        file.to_str().unwrap(),
        "--admin",
        &unix,
    ])
    .await;
    let elapsed = started.elapsed();
    let stdout = succeeded(&out, "applying 10,000 rules");
    eprintln!(
        "applied {} rules ({} bytes) through the admin socket in {elapsed:?}",
        10_000,
        policy.len()
    );
    assert!(
        stdout.contains("applied: 10000 added, 0 changed, 0 removed (policy version 0 -> 1)"),
        "{}",
        &stdout[stdout.len().saturating_sub(300)..]
    );
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert_eq!(node.state.acl.list().len(), 10_000);

    // One audit entry for the whole apply, with its counts and (bounded) ids.
    let audit = node.state.acl.audit(10).unwrap();
    assert_eq!(audit.len(), 1);
    let summary = audit[0].summary.clone().unwrap();
    assert_eq!(
        (summary.added, summary.changed, summary.removed),
        (10_000, 0, 0)
    );
    assert_eq!(
        summary.added_ids.len(),
        hybridge::acl::store::AUDIT_IDS_PER_KIND
    );
    let log = succeeded(
        &hybridge(&["acl", "log", "--admin", &unix]).await,
        "acl log",
    );
    assert_eq!(log.lines().count(), 2, "{log}");
    assert!(log.contains("v1  apply  +10000 ~0 -0"), "{log}");
    assert!(
        log.contains("+ rule-00000, rule-00001,") && log.contains("… and 9990 more"),
        "{log}"
    );

    // Changing one rule in a hundred is as quick, and again one entry.
    std::fs::write(&file, big_policy(10_000, Some(100))).unwrap();
    let started = Instant::now();
    let out = hybridge(&[
        "acl",
        "apply",
        "-f",
        file.to_str().unwrap(),
        "--admin",
        &unix,
    ])
    .await;
    let elapsed = started.elapsed();
    let stdout = succeeded(&out, "changing 100 of 10,000 rules");
    eprintln!("re-applied 10,000 rules (100 changed) in {elapsed:?}");
    assert!(
        stdout.contains("applied: 0 added, 100 changed, 0 removed (policy version 1 -> 2)"),
        "{}",
        &stdout[stdout.len().saturating_sub(300)..]
    );
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    let audit = node.state.acl.audit(10).unwrap();
    assert_eq!(audit.len(), 2);
    assert_eq!(
        audit[0].summary.as_ref().map(|s| s.changed),
        Some(100),
        "{:?}",
        audit[0]
    );
    node.shutdown().await;
}
