//! Reload as an operator meets it, through the command the systemd unit runs
//! (`hybridge reload --config FILE`) against a real `hybridge run` process: a live change
//! takes effect without a restart (proved with requests), a restart-only change is applied
//! around and named, a broken file fails the command with its file, line and field while the
//! node keeps serving, and SIGHUP by hand does the same reload. CRL freshness: a CRL made to
//! go stale shows in `/v1/status`, `hybridge status` and `/metrics`; under
//! `tls.crl_stale = "refuse"` it closes the tunnel when it passes, and `warn` brings it back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use bytes::Bytes;
use hybridge_tests::*;
use tokio_util::sync::CancellationToken;

/// Runs `hybridge ARGS` off the runtime (the CLI waits for the node's answer).
async fn hybridge(args: &[&str]) -> Output {
    let mut command = Command::new(binary("hybridge"));
    command.args(args).env_remove("HYBRIDGE_ADMIN");
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

/// `hybridge reload --config FILE`, exactly as `ExecReload=` runs it.
async fn systemctl_reload(config: &Path) -> (i32, String, String) {
    let out = hybridge(&["reload", "--config", config.to_str().unwrap()]).await;
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `hybridge run --config CONFIG` with one worker thread (one tunnel, so the first
/// "tunnel up" line means requests have their route) and waits until it runs.
fn run_one_worker(config: &Path) -> ChildGuard {
    let mut command = Command::new(binary("hybridge"));
    command
        .args(["run", "--config"])
        .arg(config)
        .env("HYBRIDGE_LOG", "info")
        .env("HYBRIDGE_WORKER_THREADS", "1");
    let mut child = ChildGuard::spawn(command);
    child.wait_for_line(WAIT, |l| l.contains("hybridge running"));
    child
}

/// Waits (off the runtime) for the daemon's next log line containing every one of `needles`.
fn log_line(daemon: &mut ChildGuard, needles: &[&str]) -> String {
    tokio::task::block_in_place(|| {
        daemon.wait_for_line(WAIT, |l| needles.iter().all(|n| l.contains(n)))
    })
}

/// Replaces the one occurrence of `from` in the file at `path`.
fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert_eq!(text.matches(from).count(), 1, "`{from}` in {text}");
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    http1(addr, "GET", path, headers, Bytes::new()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybridge_reload_applies_live_fields_names_restart_fields_and_refuses_broken_files() {
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let upstream = demo_upstream("inventory", &cancel).await;
    let mut cloud = NodeOptions::cloud(&pki, "cloud-1");
    cloud
        .exports
        .push(ExportSpec::http1("inventory", &[upstream.local_addr()]));
    let cloud = cloud.start().await;
    allow(&cloud, "web", "inventory");

    // The importing node is the process: its import's request_timeout and the header limit
    // are what the reloads change.
    let base = free_port_block();
    let import = SocketAddr::from(([127, 0, 0, 1], base));
    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[cloud.addresses().tunnel.unwrap()]);
    onprem.admin = SocketAddr::from(([127, 0, 0, 1], base + 1));
    onprem.extra = format!(
        "\n[limits]\nmax_header_bytes = 65536\n\n[[import]]\nservice = \"inventory\"\nlisten = \"{import}\"\ncaller = \"web\"\nrequest_timeout = \"30s\"\n"
    );
    preallow(&onprem.data_dir, "web", "inventory");
    let config = onprem.write();
    edit(
        &config,
        "[tunnel]\nbind = \"127.0.0.1:0\"\n",
        "[tunnel]\nbind = \"127.0.0.1:0\"\nkeepalive = \"1s\"\n",
    );
    let mut daemon = run_one_worker(&config);
    log_line(&mut daemon, &["tunnel up", "inventory"]);

    // Before: a 1.5 s answer is waited for, a 6 kB header block is accepted (hyper's own
    // parser limit stays above it: the refusal below is the bridge's, with its reason).
    let big_header = "x".repeat(6 * 1024);
    let slow = get(import, "/slow?ms=1500", &[]).await;
    assert_eq!(slow.status, 200, "{:?}", slow.body);
    let big = get(import, "/echo", &[("x-big", &big_header)]).await;
    assert_eq!(big.status, 200, "{:?}", big.body);

    // 1. Live fields: applied by the running process, proved by the same requests.
    edit(
        &config,
        "request_timeout = \"30s\"",
        "request_timeout = \"300ms\"",
    );
    edit(
        &config,
        "max_header_bytes = 65536",
        "max_header_bytes = 4096",
    );
    let (code, stdout, stderr) = systemctl_reload(&config).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("reloaded {}: ", config.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains("applied: limits.max_header_bytes, import[0].request_timeout"),
        "{stdout}"
    );
    assert!(!stdout.contains("needs a restart"), "{stdout}");
    let line = log_line(&mut daemon, &["configuration reloaded"]);
    assert!(line.contains("uid:"), "the caller is named: {line}");
    let slow = get(import, "/slow?ms=1500", &[]).await;
    assert_eq!(slow.status, 504, "{:?}", slow.body);
    assert_eq!(slow.header("x-hybridge-error"), Some("timeout"));
    let big = get(import, "/echo", &[("x-big", &big_header)]).await;
    assert_eq!(big.status, 431, "{:?}", big.body);
    assert_eq!(big.header("x-hybridge-error"), Some("headers-too-large"));

    // 2. A restart-only field: the rest of the file applies, the field is named (exit 0) and
    // keeps its running value.
    edit(&config, "keepalive = \"1s\"", "keepalive = \"2s\"");
    edit(
        &config,
        "request_timeout = \"300ms\"",
        "request_timeout = \"400ms\"",
    );
    let (code, stdout, stderr) = systemctl_reload(&config).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("applied: import[0].request_timeout"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "not applied, running values kept until a restart (systemctl restart hybridge): tunnel.keepalive (needs a restart)"
        ),
        "{stdout}"
    );
    let line = log_line(
        &mut daemon,
        &["configuration reloaded except what needs a restart"],
    );
    assert!(
        line.contains("tunnel.keepalive (needs a restart)"),
        "{line}"
    );
    let echo = get(import, "/echo", &[]).await;
    assert_eq!(echo.status, 200, "{:?}", echo.body);

    // 3. A broken file: the command fails naming file, line and field; nothing changes.
    let good = std::fs::read_to_string(&config).unwrap();
    edit(&config, "[admin]\n", "[admin]\nlisten_typo = 1\n");
    let typo_line = std::fs::read_to_string(&config)
        .unwrap()
        .lines()
        .position(|l| l == "listen_typo = 1")
        .unwrap()
        + 1;
    let (code, stdout, stderr) = systemctl_reload(&config).await;
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("{}:{typo_line}: ", config.display()))
            && stderr.contains("unknown field `listen_typo`")
            && stderr.contains("the node refused the reload"),
        "{stderr}"
    );
    log_line(&mut daemon, &["reload refused", "listen_typo"]);
    // Still serving, with the configuration in force before: 400 ms timeout, 4 kB headers.
    let slow = get(import, "/slow?ms=1500", &[]).await;
    assert_eq!(slow.status, 504, "{:?}", slow.body);
    let big = get(import, "/echo", &[("x-big", &big_header)]).await;
    assert_eq!(big.status, 431, "{:?}", big.body);
    let echo = get(import, "/echo", &[]).await;
    assert_eq!(echo.status, 200, "{:?}", echo.body);

    // 4. A value that fails a check, not the parser: named the same way.
    std::fs::write(&config, &good).unwrap();
    edit(&config, "[limits]\n", "[limits]\nmax_connections = 0\n");
    let zero_line = std::fs::read_to_string(&config)
        .unwrap()
        .lines()
        .position(|l| l == "max_connections = 0")
        .unwrap()
        + 1;
    let (code, _, stderr) = systemctl_reload(&config).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:{zero_line}: field `limits.max_connections`: must be at least 1",
            config.display()
        )),
        "{stderr}"
    );
    log_line(&mut daemon, &["reload refused"]);

    // 5. SIGHUP by hand takes the same path: back to a 30 s timeout, the slow answer arrives.
    std::fs::write(&config, &good).unwrap();
    edit(
        &config,
        "request_timeout = \"400ms\"",
        "request_timeout = \"30s\"",
    );
    daemon.signal(libc::SIGHUP);
    let line = log_line(&mut daemon, &["configuration reloaded", "SIGHUP"]);
    assert!(
        line.contains("tunnel.keepalive (needs a restart)"),
        "{line}"
    );
    let slow = get(import, "/slow?ms=1500", &[]).await;
    assert_eq!(slow.status, 200, "{:?}", slow.body);

    // 6. The read-only listener never reloads.
    let refused = http1(
        onprem.admin,
        "POST",
        "/v1/reload",
        &[("content-type", "application/json")],
        Bytes::new(),
    )
    .await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.header("x-hybridge-error"), Some("not-authorised"));

    // No restart happened: the process that started is the one that answered throughout.
    assert_eq!(daemon.child.try_wait().unwrap(), None);
    daemon.signal(libc::SIGTERM);
    let exit = tokio::task::block_in_place(|| daemon.wait_exit(Duration::from_secs(30)));
    assert_eq!(exit, Some(0));
    cloud.shutdown().await;
    cancel.cancel();
}

/// `/v1/status` of a node through its admin socket.
async fn status(socket: &Path) -> serde_json::Value {
    unix_http1(socket, "GET", "/v1/status", &[], Bytes::new())
        .await
        .json()
}

/// The `hybridge_crl_next_update_seconds` sample of the first CRL.
async fn crl_gauge(admin: SocketAddr) -> i64 {
    let metrics = get(admin, "/metrics", &[]).await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(
        text.contains("# TYPE hybridge_crl_next_update_seconds gauge"),
        "{text}"
    );
    let sample = text
        .lines()
        .find(|l| l.starts_with("hybridge_crl_next_update_seconds{crl=\"1\",issuer=\""))
        .unwrap_or_else(|| panic!("no CRL sample in {text}"));
    sample.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_crl_is_shown_and_under_refuse_closes_the_tunnel_when_it_passes() {
    const VALIDITY: u64 = 15;
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let upstream = demo_upstream("inventory", &cancel).await;
    let base = free_port_block();
    let cloud = NodeOptions::cloud_process(&pki, "cloud-1", base, upstream.local_addr());
    let crl: PathBuf = pki.path("crl.pem");
    std::fs::write(&crl, pki.ca.crl_pem().unwrap()).unwrap();
    let config = cloud.write();
    let key_line = format!("key = {:?}\n", cloud.files.key.display().to_string());
    edit(
        &config,
        &key_line,
        &format!(
            "{key_line}crl = {:?}\ncrl_stale = \"refuse\"\n",
            crl.display().to_string()
        ),
    );
    let mut daemon = run_daemon(&config);

    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[cloud.tunnel_listen.unwrap()]);
    onprem.imports.push(("inventory".into(), "web".into()));
    let onprem = onprem.start().await;
    allow(&onprem, "web", "inventory");
    assert!(onprem.wait_for_route("inventory", WAIT).await);
    let import = import_addr(&onprem, "inventory");

    // A CRL that goes stale VALIDITY seconds from now, loaded by the unit's reload command.
    std::fs::write(
        &crl,
        pki.ca
            .crl_pem_valid_for(Duration::from_secs(VALIDITY))
            .unwrap(),
    )
    .unwrap();
    let (code, stdout, stderr) = systemctl_reload(&config).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let current = status(&cloud.admin_socket).await;
    assert_eq!(current["crl_stale"], "refuse");
    let left = current["crls"][0]["next_update_seconds"].as_i64().unwrap();
    assert!((1..=VALIDITY as i64).contains(&left), "{current}");
    assert_eq!(current["crls"][0]["stale"], false);
    let gauge = crl_gauge(cloud.admin).await;
    assert!((1..=VALIDITY as i64).contains(&gauge), "{gauge}");
    assert_eq!(get(import, "/echo", &[]).await.status, 200);

    // It passes while the node runs: one line says so, and the live tunnel is closed (the
    // two lines may come in either order).
    let (mut passed, mut closed) = (None, false);
    while passed.is_none() || !closed {
        let line = log_line(&mut daemon, &["past its nextUpdate"]);
        if line.contains("CRL is past its nextUpdate") {
            passed = Some(line);
        } else if line.contains("closing the tunnel") {
            closed = true;
        }
    }
    let passed = passed.unwrap_or_default();
    assert!(
        passed.contains("every peer is refused") && passed.contains("crl.pem"),
        "{passed}"
    );
    tokio::time::timeout(
        WAIT,
        onprem.state.peers.wait_until(|links| links.is_empty()),
    )
    .await
    .expect("the tunnel was closed when the CRL went stale");
    let stale = status(&cloud.admin_socket).await;
    assert_eq!(stale["crls"][0]["stale"], true, "{stale}");
    assert!(
        stale["crls"][0]["next_update_seconds"].as_i64().unwrap() <= 0,
        "{stale}"
    );
    assert!(crl_gauge(cloud.admin).await <= 0);
    let out = hybridge(&["status", "--admin", &unix_admin(&cloud.admin_socket)]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("STALE: past its nextUpdate by")
            && text.contains("(tls.crl_stale = refuse: every peer refused)"),
        "{text}"
    );
    // Its redials are refused in the handshake: no route while the CRL is stale.
    let refused = get(import, "/echo", &[]).await;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    log_line(
        &mut daemon,
        &["tunnel handshake refused", "past its nextUpdate"],
    );

    // Fail-open instead: a reload to "warn" warns about the stale CRL and admits the peer.
    edit(&config, "crl_stale = \"refuse\"", "crl_stale = \"warn\"");
    let (code, stdout, stderr) = systemctl_reload(&config).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("applied: tls.crl_stale"), "{stdout}");
    log_line(
        &mut daemon,
        &[
            "CRL is past its nextUpdate",
            "peers are still checked against it",
        ],
    );
    assert!(onprem.wait_for_route("inventory", WAIT).await);
    assert_eq!(get(import, "/echo", &[]).await.status, 200);

    onprem.shutdown().await;
    daemon.signal(libc::SIGTERM);
    let exit = tokio::task::block_in_place(|| daemon.wait_exit(Duration::from_secs(30)));
    assert_eq!(exit, Some(0));
    cancel.cancel();
}
