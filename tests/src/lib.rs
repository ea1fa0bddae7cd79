//! Fixtures for end-to-end tests: a real CA, node configs, nodes started in-process or as
//! `hybridge` processes, demo upstreams, real HTTP clients, and readiness waits.
//!
//! Everything listens on 127.0.0.1 with port 0 unless a test needs a fixed port; every
//! process is killed when its guard drops. Waits are on signals (a route appearing, a log
//! line, a LISTENING line), bounded by a timeout, never on sleeps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod impair;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hybridge::config::Config;
use hybridge::node::Node;
use hybridge::tunnel::connection::TunnelConnection;
use hybridge::tunnel::control::{self, ControlMessage};
use hybridge::tunnel::frame::{self, Frame, RequestHead};
use hybridge::tunnel::quic::{self, TransportTuning};
use hybridge::tunnel::stream::{RecvHalf, SendHalf};
use hybridge::workers::Workers;
use hybridge_ca::authority::{CertificateAuthority, InitOptions};
use hybridge_ca::tls::{PeerExpectation, TlsMaterial};
use hyper_util::rt::{TokioExecutor, TokioIo};

pub const TRUST_DOMAIN: &str = "test.hybridge";
pub const WAIT: Duration = Duration::from_secs(15);

/// The repository's top folder (for config-examples/, terraform/, systemd/...).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lies inside the repository")
        .to_owned()
}

/// A CA in a temp dir, issuing into the same dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: CertificateAuthority,
}

/// Paths of one node's TLS files.
#[derive(Clone, Debug)]
pub struct NodeFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn new() -> Self {
        Self::with_trust_domain(TRUST_DOMAIN)
    }

    pub fn with_trust_domain(trust_domain: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("hybridge-test-")
            .tempdir()
            .unwrap();
        let ca = CertificateAuthority::init(
            &dir.path().join("ca"),
            trust_domain,
            InitOptions::default(),
        )
        .unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.ca_cert_pem()).unwrap();
        Self { dir, ca }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Issues a node certificate `site/name` and returns its files.
    pub fn node(&self, site: &str, name: &str) -> NodeFiles {
        let prefix = self.path(&format!("{site}-{name}"));
        let issued = self
            .ca
            .issue_node(
                site,
                name,
                &["localhost".into()],
                &["127.0.0.1".parse().unwrap()],
                Duration::from_secs(90 * 86_400),
            )
            .unwrap();
        let (cert, key) = issued.write(&prefix).unwrap();
        NodeFiles {
            ca: self.path("ca.pem"),
            cert,
            key,
        }
    }

    /// Issues an administrator certificate (`spiffe://TD/admin/NAME`) and returns (chain pem
    /// path, key path).
    pub fn admin(&self, name: &str) -> (PathBuf, PathBuf) {
        let issued = self
            .ca
            .issue_admin(name, Duration::from_secs(86_400))
            .unwrap();
        issued.write(&self.path(&format!("admin-{name}"))).unwrap()
    }

    /// Issues a service certificate and returns (chain pem path, key path).
    pub fn service(&self, name: &str) -> (PathBuf, PathBuf) {
        let issued = self
            .ca
            .issue_service(name, &[], Duration::from_secs(90 * 86_400))
            .unwrap();
        issued.write(&self.path(&format!("svc-{name}"))).unwrap()
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// One export in a node config.
#[derive(Clone, Debug)]
pub struct ExportSpec {
    pub name: String,
    /// `host:port` entries: addresses, or host names.
    pub endpoints: Vec<String>,
    pub protocol: &'static str,
    /// Extra TOML lines inside the `[[export]]` table.
    pub extra: String,
}

impl ExportSpec {
    pub fn http1(name: &str, endpoints: &[SocketAddr]) -> Self {
        Self {
            name: name.into(),
            endpoints: endpoints.iter().map(ToString::to_string).collect(),
            protocol: "http1",
            extra: String::new(),
        }
    }

    pub fn h2c(name: &str, endpoints: &[SocketAddr]) -> Self {
        Self {
            name: name.into(),
            endpoints: endpoints.iter().map(ToString::to_string).collect(),
            protocol: "h2c",
            extra: String::new(),
        }
    }
}

/// Everything that varies between test node configs.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub name: String,
    pub site: String,
    pub files: NodeFiles,
    pub data_dir: PathBuf,
    pub tunnel_listen: Option<SocketAddr>,
    pub allowed_sites: Vec<String>,
    /// (address, site, connections)
    pub peers: Vec<(SocketAddr, String, u8)>,
    pub exports: Vec<ExportSpec>,
    /// (service, caller)
    pub imports: Vec<(String, String)>,
    pub gateway: bool,
    /// The read-only admin listener.
    pub admin: SocketAddr,
    /// The admin socket (in the node's data dir, so concurrent nodes never share one).
    pub admin_socket: PathBuf,
    /// Extra TOML lines inside the `[admin]` table (before any `extra`).
    pub admin_extra: String,
    /// Extra TOML lines inside the `[tunnel]` table.
    pub tunnel_extra: String,
    /// Extra TOML lines inside every `[[peer]]` table.
    pub peer_extra: String,
    pub extra: String,
}

impl NodeOptions {
    /// A cloud-side node that accepts tunnels from `onprem` nodes.
    pub fn cloud(pki: &Pki, name: &str) -> Self {
        let data_dir = pki.path(&format!("data-{name}"));
        Self {
            name: name.into(),
            site: "cloud".into(),
            files: pki.node("cloud", name),
            admin_socket: data_dir.join("admin.sock"),
            admin_extra: String::new(),
            tunnel_extra: String::new(),
            peer_extra: String::new(),
            data_dir,
            tunnel_listen: Some("127.0.0.1:0".parse().unwrap()),
            allowed_sites: vec!["onprem".into()],
            peers: vec![],
            exports: vec![],
            imports: vec![],
            gateway: false,
            admin: "127.0.0.1:0".parse().unwrap(),
            extra: String::new(),
        }
    }

    /// A cloud node for a `hybridge run` process: tunnel on `base`, admin on `base + 1` (fixed,
    /// so a restarted process comes back on the same address), exporting `inventory` at
    /// `upstream`, with `web → inventory` allowed in its database before the process opens it.
    pub fn cloud_process(pki: &Pki, name: &str, base: u16, upstream: SocketAddr) -> Self {
        let mut cloud = Self::cloud(pki, name);
        cloud.tunnel_listen = Some(SocketAddr::from(([127, 0, 0, 1], base)));
        cloud.admin = SocketAddr::from(([127, 0, 0, 1], base + 1));
        cloud
            .exports
            .push(ExportSpec::http1("inventory", &[upstream]));
        preallow(&cloud.data_dir, "web", "inventory");
        cloud
    }

    /// An on-prem node that dials the given cloud tunnel addresses.
    pub fn onprem(pki: &Pki, name: &str, cloud: &[SocketAddr]) -> Self {
        let data_dir = pki.path(&format!("data-{name}"));
        Self {
            name: name.into(),
            site: "onprem".into(),
            files: pki.node("onprem", name),
            admin_socket: data_dir.join("admin.sock"),
            admin_extra: String::new(),
            tunnel_extra: String::new(),
            peer_extra: String::new(),
            data_dir,
            tunnel_listen: None,
            allowed_sites: vec![],
            peers: cloud.iter().map(|a| (*a, "cloud".to_owned(), 1)).collect(),
            exports: vec![],
            imports: vec![],
            gateway: false,
            admin: "127.0.0.1:0".parse().unwrap(),
            extra: String::new(),
        }
    }

    pub fn to_toml(&self) -> String {
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        let mut t = format!(
            "[node]\nname = \"{}\"\nsite = \"{}\"\ntrust_domain = \"{TRUST_DOMAIN}\"\ndata_dir = {}\n\n[tls]\nca = {}\ncert = {}\nkey = {}\n\n[tunnel]\nbind = \"127.0.0.1:0\"\n",
            self.name,
            self.site,
            q(&self.data_dir),
            q(&self.files.ca),
            q(&self.files.cert),
            q(&self.files.key)
        );
        if let Some(listen) = self.tunnel_listen {
            let sites: Vec<String> = self
                .allowed_sites
                .iter()
                .map(|s| format!("\"{s}\""))
                .collect();
            t += &format!(
                "listen = \"{listen}\"\nallowed_sites = [{}]\n",
                sites.join(", ")
            );
        }
        t += &self.tunnel_extra;
        t += &format!(
            "\n[admin]\nlisten = \"{}\"\nsocket = {}\n",
            self.admin,
            q(&self.admin_socket)
        );
        t += &self.admin_extra;
        t += &self.extra;
        for (address, site, connections) in &self.peers {
            t += &format!(
                "\n[[peer]]\naddress = \"{address}\"\nsite = \"{site}\"\nconnections = {connections}\n{}",
                self.peer_extra
            );
        }
        for e in &self.exports {
            let endpoints: Vec<String> = e.endpoints.iter().map(|a| format!("{a:?}")).collect();
            t += &format!(
                "\n[[export]]\nname = \"{}\"\nendpoints = [{}]\nprotocol = \"{}\"\n{}\n",
                e.name,
                endpoints.join(", "),
                e.protocol,
                e.extra
            );
        }
        for (service, caller) in &self.imports {
            t += &format!(
                "\n[[import]]\nservice = \"{service}\"\nlisten = \"127.0.0.1:0\"\ncaller = \"{caller}\"\n"
            );
        }
        if self.gateway {
            t += "\n[gateway]\nlisten = \"127.0.0.1:0\"\ncaller = \"web\"\n";
        }
        t
    }

    /// Writes the config next to the certificates and returns its path.
    pub fn write(&self) -> PathBuf {
        let path = self
            .files
            .cert
            .with_file_name(format!("{}.toml", self.name));
        std::fs::write(&path, self.to_toml()).unwrap();
        path
    }

    /// Starts this node in-process.
    pub async fn start(&self) -> Node {
        log_to_test_output();
        let path = self.write();
        Node::start(Config::load(&path).unwrap()).await.unwrap()
    }

    /// Starts this node in-process with its data plane on `workers`.
    pub async fn start_on(&self, workers: &Arc<Workers>) -> Node {
        log_to_test_output();
        let path = self.write();
        Node::start_on(Config::load(&path).unwrap(), workers.clone())
            .await
            .unwrap()
    }
}

/// Sends what in-process nodes log to the output of the test that started them, which the
/// test harness shows only when that test fails: a failure in a soak run comes with the
/// nodes' own account of it. `HYBRIDGE_TEST_LOG` (an `EnvFilter`) chooses what is logged;
/// by default the nodes' info lines without the access log.
pub fn log_to_test_output() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("HYBRIDGE_TEST_LOG")
            .unwrap_or_else(|_| "hybridge=info,hybridge::access=warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// A client of a node's admin socket (the whole API, as root or the socket's group).
pub fn admin_socket_client(node: &Node) -> hybridge::admin::client::AdminClient {
    hybridge::admin::client::AdminClient::plain(hybridge::admin::client::AdminEndpoint::Unix(
        node.addresses().admin_socket.clone(),
    ))
    .unwrap()
}

/// `unix:PATH` of an admin socket, for `hybridge … --admin`.
pub fn unix_admin(socket: &Path) -> String {
    format!("unix:{}", socket.display())
}

/// Allows `source → destination` on a node (ACLs are default-deny).
pub fn allow(node: &Node, source: &str, destination: &str) {
    let text = format!(
        "[[rule]]\nsource = \"{source}\"\ndestination = \"{destination}\"\naction = \"allow\"\n"
    );
    for rule in hybridge::acl::parse_acl_file(Path::new("test.toml"), &text)
        .unwrap()
        .rules
    {
        node.state.acl.add(rule, "test").unwrap();
    }
}

/// The address of a node's import listener for `service`.
pub fn import_addr(node: &Node, service: &str) -> SocketAddr {
    node.addresses()
        .imports
        .iter()
        .find(|(s, _)| s == service)
        .map(|(_, a)| *a)
        .unwrap()
}

/// A response with its body collected.
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub trailers: Option<http::HeaderMap>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Sends one HTTP/1.1 request on a fresh connection and collects the answer.
pub async fn http1(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Answer {
    let mut sender = http1_conn(addr).await;
    let mut builder = http::Request::builder().method(method).uri(path);
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        builder = builder.header("host", addr.to_string());
    }
    for (n, v) in headers {
        builder = builder.header(*n, *v);
    }
    collect(
        sender
            .send_request(builder.body(Full::new(body)).unwrap())
            .await
            .unwrap(),
    )
    .await
}

/// Sends one HTTP/1.1 request over a Unix socket (an admin socket) and collects the answer;
/// `Host: localhost` unless `headers` name one.
pub async fn unix_http1(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Answer {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut builder = http::Request::builder().method(method).uri(path);
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        builder = builder.header("host", "localhost");
    }
    for (n, v) in headers {
        builder = builder.header(*n, *v);
    }
    collect(
        sender
            .send_request(builder.body(Full::new(body)).unwrap())
            .await
            .unwrap(),
    )
    .await
}

/// An HTTP/1.1 client connection to `addr`, its driver spawned, for requests with any body
/// type (streamed uploads, empty bodies).
pub async fn http1_conn<B>(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

/// An HTTP/2 (prior knowledge) client connection.
pub async fn h2c(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

/// Collects a response's body and trailers.
pub async fn collect(response: http::Response<hyper::body::Incoming>) -> Answer {
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

/// Path of a workspace binary, freshly built: `cargo test -p hybridge-tests` alone does not
/// rebuild other packages' binaries, so the first call per binary in a test process runs
/// `cargo build --bin NAME` for the same profile (a no-op when `cargo test --workspace` has
/// just built it) instead of silently testing a stale executable.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let exe = std::env::current_exe().unwrap();
    // A test runs from `PROFILE/deps/`, a binary of this crate (`bench/fleet`) from `PROFILE/`.
    let exe_dir = exe.parent().unwrap();
    let profile_dir = if exe_dir.file_name().is_some_and(|n| n == "deps") {
        exe_dir.parent().unwrap()
    } else {
        exe_dir
    };
    let path = profile_dir.join(name);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if !built.iter().any(|b| b == name) {
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_owned(),
            Some(other) => other.to_owned(),
        };
        let mut command = Command::new(env!("CARGO"));
        command
            // `--tests` selects the feature set `cargo test --workspace` builds with
            // (dev-dependency features unified in), so right after it this is a no-op.
            .args([
                "build",
                "--quiet",
                "--workspace",
                "--tests",
                "--profile",
                &profile,
                "--bin",
                name,
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        // Cargo sets per-package variables (CARGO_PKG_*, CARGO_MANIFEST_DIR, ...) for the test
        // process; build scripts that watch them would otherwise see a "changed" environment
        // and rebuild on every run. Keep only cargo's own configuration.
        for (key, _) in std::env::vars_os() {
            if let Some(key) = key.to_str()
                && (key.starts_with("CARGO_") || key == "OUT_DIR")
                && key != "CARGO_HOME"
                && key != "CARGO_TARGET_DIR"
                && !key.starts_with("CARGO_BUILD_")
                && !key.starts_with("CARGO_PROFILE_")
                && !key.starts_with("CARGO_REGISTRIES_")
                && !key.starts_with("CARGO_NET_")
            {
                command.env_remove(key);
            }
        }
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "building {name} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        built.push(name.to_owned());
    }
    path
}

/// A child process killed (SIGKILL) and reaped when dropped, with its output lines
/// available as a channel for readiness waits.
pub struct ChildGuard {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl ChildGuard {
    /// Spawns `command` with stdout and stderr captured line by line (stdin piped, open).
    pub fn spawn(mut command: Command) -> Self {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {command:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        for reader in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for an output line matching `predicate`; returns it. Panics after `limit`,
    /// showing what the process printed.
    pub fn wait_for_line(&mut self, limit: Duration, predicate: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = predicate(&line);
                    self.seen.push(line.clone());
                    if hit {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no matching line within {limit:?}; the process printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Lines printed so far (drains what is queued without waiting).
    pub fn drain(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        &self.seen
    }

    pub fn signal(&self, signal: i32) {
        #[allow(unsafe_code)]
        // SAFETY: kill(2) on our own child's pid has no memory-safety implications.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    /// Waits for the process to exit (bounded) and returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            // Reaping has no readiness signal we can wait on without a pidfd; drain output meanwhile.
            let _ = self
                .lines
                .recv_timeout(Duration::from_millis(20))
                .map(|l| self.seen.push(l));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The python interpreter with grpcio installed by `.ci/install-test-deps`.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("HYBRIDGE_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let venv = std::env::var("HYBRIDGE_PYENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(&home).join(".cache/hybridge-pyenv"));
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `.ci/install-test-deps` (as .ci/run does) to install grpcio",
        python.display()
    );
    python
}

/// The `tests/grpc` folder.
pub fn grpc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("grpc")
}

/// Starts `tests/grpc/server.py --id ID` and returns it with its port.
pub fn grpc_server(id: &str) -> (ChildGuard, SocketAddr) {
    let mut command = Command::new(python());
    command
        .arg(grpc_dir().join("server.py"))
        .args(["--port", "0", "--id", id]);
    let mut guard = ChildGuard::spawn(command);
    let line = guard.wait_for_line(Duration::from_secs(60), |l| l.starts_with("LISTENING "));
    let port: u16 = line["LISTENING ".len()..].trim().parse().unwrap();
    (guard, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Runs `tests/grpc/client.py` and returns (exit code, parsed JSON output).
pub fn grpc_client(target: SocketAddr, args: &[&str]) -> (i32, serde_json::Value) {
    let output = Command::new(python())
        .arg(grpc_dir().join("client.py"))
        .args(["--target", &target.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "client.py printed no JSON ({e}): stdout {stdout} stderr {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code().unwrap_or(-1), json)
}

/// A block of 32 consecutive ports that is free right now (TCP and UDP), for tests that need
/// fixed ports (a process restarted on the same address, `hybridge dev --base-port`). Blocks lie
/// below Linux's ephemeral range so port-0 binds elsewhere cannot take them, and each call in a
/// process starts from a different block so concurrent tests never pick the same one.
pub fn free_port_block() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    for _ in 0..200u32 {
        let call = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = 10_000 + ((std::process::id() * 7 + call * 37) % 220) as u16 * 100;
        let free = (0..32).all(|i| {
            std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()
                && std::net::UdpSocket::bind(("127.0.0.1", base + i)).is_ok()
        });
        if free {
            return base;
        }
    }
    panic!("no free block of 32 ports on 127.0.0.1");
}

/// A demo upstream (echo, status, stream endpoints) named `name` on a loopback port.
pub async fn demo_upstream(
    name: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> hybridge::demo::DemoUpstream {
    hybridge::demo::DemoUpstream::start(name, "127.0.0.1:0".parse().unwrap(), cancel.child_token())
        .await
        .unwrap()
}

/// Runs `hybridge ARGS` to completion; returns (exit code, stdout, stderr).
pub fn hybridge_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary("hybridge"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `hybridge run --config CONFIG` as a real process and returns once it logs that it
/// is running (tunnel, listeners and admin API bound).
pub fn run_daemon(config: &Path) -> ChildGuard {
    let mut command = Command::new(binary("hybridge"));
    command
        .args(["run", "--config"])
        .arg(config)
        .env("HYBRIDGE_LOG", "info");
    let mut child = ChildGuard::spawn(command);
    child.wait_for_line(WAIT, |l| l.contains("hybridge running"));
    child
}

/// Writes an allow rule into the policy database in `data_dir` before a `hybridge run`
/// process opens it (the daemon holds the file while it runs).
pub fn preallow(data_dir: &Path, source: &str, destination: &str) {
    std::fs::create_dir_all(data_dir).unwrap();
    let acl = hybridge::acl::AclService::open(&data_dir.join("hybridge.redb")).unwrap();
    let text = format!(
        "[[rule]]\nsource = \"{source}\"\ndestination = \"{destination}\"\naction = \"allow\"\n"
    );
    for rule in hybridge::acl::parse_acl_file(Path::new("preallow.toml"), &text)
        .unwrap()
        .rules
    {
        acl.add(rule, "test").unwrap();
    }
}

/// Renders `terraform/templates/TEMPLATE` with `vars`, as Terraform's `templatefile` does.
pub fn render_terraform_template(template: &str, vars: &serde_json::Value) -> String {
    use hcl::eval::{Context, Evaluate};
    use std::str::FromStr;
    let path = repo_root().join("terraform/templates").join(template);
    let text = std::fs::read_to_string(&path).unwrap();
    let template_ast = hcl::Template::from_str(&text)
        .unwrap_or_else(|e| panic!("{template} is not a valid Terraform template: {e}"));
    let mut ctx = Context::new();
    for (k, v) in vars.as_object().unwrap() {
        ctx.declare_var(k.as_str(), hcl::to_value(v).unwrap());
    }
    template_ast
        .evaluate(&ctx)
        .unwrap_or_else(|e| panic!("rendering {template}: {e}"))
}

/// A stand-in for the `aws` command the cloud-init set-up script calls: it answers
/// `secretsmanager get-secret-value --secret-id ARN` with the file `$STUB_SECRETS/NAME`
/// (NAME from [`stub_secret_name`]; the folder defaults to /run/hybridge-test-secrets) and
/// fails, as Secrets Manager does, for a secret it does not have.
pub const AWS_SECRETS_STUB: &str = r#"#!/bin/sh
id=""
while [ $# -gt 0 ]; do
  case "$1" in --secret-id) id="$2"; shift ;; esac
  shift
done
f="${STUB_SECRETS:-/run/hybridge-test-secrets}/$(printf %s "$id" | tr -c 'A-Za-z0-9-' _)"
if [ -f "$f" ]; then cat "$f"; exit 0; fi
echo "An error occurred (ResourceNotFoundException) when calling the GetSecretValue operation: Secrets Manager can't find the specified secret." >&2
exit 254
"#;

/// The file name [`AWS_SECRETS_STUB`] looks the secret `arn` up under.
pub fn stub_secret_name(arn: &str) -> String {
    arn.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Runs `command` to success and returns its output; panics with what it printed otherwise.
pub fn run_checked(command: &mut Command) -> std::process::Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e} (installed by .ci/run)"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Builds the hybridge .deb with `cargo deb` into `out` from the binaries of this test build
/// (same profile, so nothing is recompiled) and returns its path.
pub fn build_deb(out: &Path) -> PathBuf {
    let hybridge = binary("hybridge");
    binary("hybridge-ca");
    let profile = match hybridge
        .parent()
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
    {
        Some("debug") | None => "dev".to_owned(),
        Some(other) => other.to_owned(),
    };
    let mut command = Command::new("cargo");
    command
        .current_dir(repo_root())
        .args([
            "deb",
            "-p",
            "hybridge",
            "--no-build",
            "--fast",
            "--profile",
            &profile,
            "-o",
        ])
        .arg(out);
    // Cargo's per-package variables for this test would make cargo-deb see another package;
    // where the build output lives (CARGO_TARGET_DIR, a shared cache) must stay.
    for (key, _) in std::env::vars() {
        if key.starts_with("CARGO_")
            && key != "CARGO_HOME"
            && key != "CARGO_TARGET_DIR"
            && !key.starts_with("CARGO_BUILD_")
        {
            command.env_remove(key);
        }
    }
    let output = run_checked(&mut command);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let deb = PathBuf::from(stdout.lines().last().unwrap().trim());
    assert!(
        deb.extension().is_some_and(|e| e == "deb"),
        "cargo deb printed {stdout}"
    );
    deb
}

/// A tunnel peer under the test's control: it completes the mTLS handshake with a real node
/// certificate and the control hello, then sends whatever frames the test writes.
pub struct RawPeer {
    _endpoint: quinn::Endpoint,
    connection: TunnelConnection,
    /// The control stream stays open for as long as the peer lives.
    _control: (SendHalf, RecvHalf),
}

impl RawPeer {
    pub async fn connect(pki: &Pki, site: &str, name: &str, cloud: SocketAddr) -> RawPeer {
        Self::announcing(pki, site, name, cloud, Vec::new()).await
    }

    pub async fn announcing(
        pki: &Pki,
        site: &str,
        name: &str,
        cloud: SocketAddr,
        exports: Vec<String>,
    ) -> RawPeer {
        let files = pki.node(site, name);
        let material = TlsMaterial::load(&files.ca, &files.cert, &files.key, None).unwrap();
        let expect = PeerExpectation::NodeOfSites {
            trust_domain: TRUST_DOMAIN.into(),
            sites: vec!["cloud".into()],
        };
        let client = quic::client_config(&material, expect, &TransportTuning::default()).unwrap();
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connection = endpoint
            .connect_with(client, cloud, "localhost")
            .unwrap()
            .await
            .unwrap();
        let connection = TunnelConnection::Quic(connection);
        let (mut send, mut recv) = connection.open_stream().await.unwrap();
        let id = format!("spiffe://{TRUST_DOMAIN}/site/{site}/node/{name}");
        let announcement = control::PeerAnnouncement {
            exports,
            ..Default::default()
        };
        control::send(&mut send, &ControlMessage::hello(&id, announcement))
            .await
            .unwrap();
        let theirs = control::receive(&mut recv).await.unwrap();
        assert!(
            matches!(theirs, Some(ControlMessage::Hello { .. })),
            "{theirs:?}"
        );
        RawPeer {
            _endpoint: endpoint,
            connection,
            _control: (send, recv),
        }
    }

    /// Closes the connection (the peer never acknowledges a drain, so a node shutting down
    /// would otherwise wait out its drain deadline for it).
    pub fn close(&self) {
        self.connection.close(0, "test finished");
    }

    /// Sends one bodiless GET for `service` as `caller`; returns the status, the
    /// `x-hybridge-error` header and the body.
    pub async fn get(
        &self,
        service: &str,
        caller: &str,
        path: &str,
    ) -> (u16, Option<String>, Bytes) {
        self.get_with(service, caller, path, &[]).await
    }

    /// [`RawPeer::get`] with request headers of the peer's choosing.
    pub async fn get_with(
        &self,
        service: &str,
        caller: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, Option<String>, Bytes) {
        let (mut send, mut recv) = self.connection.open_stream().await.unwrap();
        let head = RequestHead {
            service: service.into(),
            caller: caller.into(),
            request_id: "raw-peer".into(),
            deadline_ms: 10_000,
            method: "GET".into(),
            authority: "raw".into(),
            path: path.into(),
            version: 11,
            end_stream: true,
            headers: headers
                .iter()
                .map(|(n, v)| {
                    (
                        Bytes::copy_from_slice(n.as_bytes()),
                        Bytes::copy_from_slice(v.as_bytes()),
                    )
                })
                .collect(),
        };
        let mut encoded = BytesMut::new();
        frame::encode_request(&head, &mut encoded).unwrap();
        send.write_encoded(encoded.freeze()).await.unwrap();
        send.finish();
        let Some(Frame::Response(response)) = recv.read_frame().await.unwrap() else {
            panic!("the node did not answer with a RESPONSE frame");
        };
        let error = response
            .headers
            .iter()
            .find(|(n, _)| n.as_ref() == b"x-hybridge-error")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
        let mut body = BytesMut::new();
        if !response.end_stream {
            while let Some(frame) = recv.read_frame().await.unwrap() {
                if let Frame::Data(data) = frame {
                    body.extend_from_slice(&data);
                }
            }
        }
        (response.status, error, body.freeze())
    }
}

/// Fetches `/metrics` from a node's read-only admin listener.
pub async fn scrape(node: &Node) -> String {
    let answer = http1(node.addresses().admin, "GET", "/metrics", &[], Bytes::new()).await;
    assert_eq!(answer.status, 200);
    String::from_utf8(answer.body.to_vec()).unwrap()
}

/// Every series in Prometheus text, parsed by `prometheus-parse` (a histogram is one series
/// per label set), as `name{k="v",…}` with sorted labels.
pub fn series(text: &str) -> std::collections::BTreeSet<String> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("/metrics does not parse ({e}):\n{text}"));
    scrape
        .samples
        .iter()
        .map(|s| {
            let mut labels: Vec<String> =
                s.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            labels.sort();
            format!("{}{{{}}}", s.metric, labels.join(","))
        })
        .collect()
}

/// The value of the one sample of `metric` whose labels include `labels`.
pub fn sample_value(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    scrape_sample(&scrape, metric, labels)
}

/// The value of the one sample of `metric` in a parsed scrape whose labels include all of
/// `labels`.
pub fn scrape_sample(
    scrape: &prometheus_parse::Scrape,
    metric: &str,
    labels: &[(&str, &str)],
) -> f64 {
    let matching: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{metric} is not a plain sample: {other:?}"),
        })
        .collect();
    assert_eq!(matching.len(), 1, "{metric} {labels:?}: {matching:?}");
    matching[0]
}

/// Applies a policy file's text to a node in-process, as `hybridge acl apply` would.
pub fn apply_policy(node: &Node, text: &str) {
    let policy = hybridge::acl::parse_acl_file(Path::new("policy.toml"), text).unwrap();
    node.state.acl.apply(policy, "test", false).unwrap();
}

/// A demo `inventory` upstream on loopback and the options of a cloud node that exports it
/// over HTTP/1.1 (start them, or change them first).
pub async fn inventory_cloud(
    pki: &Pki,
    cancel: &tokio_util::sync::CancellationToken,
) -> (hybridge::demo::DemoUpstream, NodeOptions) {
    let inventory = demo_upstream("inventory", cancel).await;
    let mut cloud = NodeOptions::cloud(pki, "cloud-1");
    cloud
        .exports
        .push(ExportSpec::http1("inventory", &[inventory.local_addr()]));
    (inventory, cloud)
}
