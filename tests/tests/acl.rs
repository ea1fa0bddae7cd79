//! ACLs through real nodes, driven by the real `hybridge acl` command line against each
//! node's admin socket: default deny, allow → 200, `acl rm` → 403 on the very next request with
//! no restart, `apply --dry-run` changes nothing, `check` explains, `log` audits; and a real
//! daemon killed with SIGKILL in the middle of a stream of applies comes back with one whole
//! policy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use bytes::Bytes;
use hybridge::acl::Action;
use hybridge_tests::*;
use tokio_util::sync::CancellationToken;

/// Runs `hybridge acl ARGS --admin unix:SOCKET` off the async runtime; returns (exit code,
/// stdout, stderr).
async fn acl_cli(socket: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let admin = unix_admin(socket);
    let mut full: Vec<String> = vec!["acl".into()];
    full.extend(args.iter().map(|a| (*a).to_owned()));
    full.extend(["--admin".into(), admin]);
    tokio::task::spawn_blocking(move || {
        hybridge_cli(&full.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_changes_take_effect_on_the_next_request_without_restart() {
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let upstream = demo_upstream("inventory", &cancel).await;
    let mut cloud = NodeOptions::cloud(&pki, "cloud-1");
    cloud
        .exports
        .push(ExportSpec::http1("inventory", &[upstream.local_addr()]));
    let cloud = cloud.start().await;
    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[cloud.addresses().tunnel.unwrap()]);
    onprem.imports.push(("inventory".into(), "web".into()));
    let onprem = onprem.start().await;
    assert!(onprem.wait_for_route("inventory", WAIT).await);
    let import = import_addr(&onprem, "inventory");
    let cloud_admin = &cloud.addresses().admin_socket;
    let onprem_admin = &onprem.addresses().admin_socket;
    let get = || http1(import, "GET", "/echo/x", &[], Bytes::new());

    // Default deny: a fresh pair forwards nothing.
    let denied = get().await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.header("x-hybridge-error"), Some("acl-denied"));
    // Rule ids are internal policy: the caller is not told which rule denied it.
    assert_eq!(denied.header("x-hybridge-acl-rule"), None);
    assert_eq!(upstream.hits(), 0, "a denied request reached the upstream");

    // Allow on both nodes (import pre-check and export authority), through the CLI.
    for admin in [onprem_admin, cloud_admin] {
        let (code, stdout, stderr) = acl_cli(
            admin,
            &[
                "add",
                "--from",
                "web",
                "--to",
                "inventory",
                "--allow",
                "--description",
                "storefront reads stock",
            ],
        )
        .await;
        assert_eq!(code, 0, "acl add: {stdout}{stderr}");
        assert!(stdout.contains("web-to-inventory"), "{stdout}");
    }
    assert_eq!(get().await.status, 200);

    // ls --json shows the rule and the version.
    let (code, stdout, _) = acl_cli(cloud_admin, &["ls", "--json"]).await;
    assert_eq!(code, 0);
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let rules = listed["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{listed}");
    assert_eq!(rules[0]["id"], "web-to-inventory");
    assert_eq!(rules[0]["action"], "allow");
    let version = listed["version"].as_u64().unwrap();

    // check explains the decision.
    let (code, stdout, _) = acl_cli(
        cloud_admin,
        &["check", "--from", "web", "--to", "inventory", "GET", "/x"],
    )
    .await;
    assert_eq!(code, 0);
    assert!(stdout.starts_with("allow"), "{stdout}");
    assert!(stdout.contains("web-to-inventory"), "{stdout}");

    // apply --dry-run with an empty policy reports the removal and changes nothing.
    let empty = pki.path("empty-acl.toml");
    std::fs::write(&empty, "# no rules: deny everything\n").unwrap();
    let (code, stdout, stderr) = acl_cli(
        cloud_admin,
        &["apply", "-f", empty.to_str().unwrap(), "--dry-run"],
    )
    .await;
    assert_eq!(code, 2, "changes pending: {stdout}{stderr}");
    assert!(stdout.contains("web-to-inventory"), "{stdout}");
    assert!(stdout.to_lowercase().contains("remove"), "{stdout}");
    assert_eq!(cloud.state.acl.version(), version);
    assert_eq!(cloud.state.acl.list().len(), 1);
    assert_eq!(get().await.status, 200);

    // apply warns about a destination nobody exports, but applies.
    let typo = pki.path("typo-acl.toml");
    std::fs::write(
        &typo,
        "[[rule]]\nid = \"web-to-inventory\"\nsource = \"web\"\ndestination = \"inventory\"\naction = \"allow\"\ndescription = \"storefront reads stock\"\n\n[[rule]]\nsource = \"web\"\ndestination = \"inventroy\"\naction = \"allow\"\n",
    )
    .unwrap();
    let (code, stdout, stderr) =
        acl_cli(cloud_admin, &["apply", "-f", typo.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let output = format!("{stdout}{stderr}");
    assert!(
        output.contains("\"inventroy\" is not a known service"),
        "{output}"
    );
    assert!(!output.contains("\"inventory\" is not"), "{output}");
    assert_eq!(cloud.state.acl.list().len(), 2);

    // rm on the export node: the very next request is denied there, authoritatively, even
    // though the on-prem node still allows it.
    let (code, stdout, stderr) = acl_cli(cloud_admin, &["rm", "web-to-inventory"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let denied = get().await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.header("x-hybridge-error"), Some("acl-denied"));
    // Rule ids are internal policy: the caller is not told which rule denied it.
    assert_eq!(denied.header("x-hybridge-acl-rule"), None);
    let (_, stdout, _) = acl_cli(
        cloud_admin,
        &["check", "--from", "web", "--to", "inventory", "GET", "/x"],
    )
    .await;
    assert!(stdout.starts_with("deny"), "{stdout}");

    // The audit log names every change, newest first.
    let (code, stdout, _) = acl_cli(cloud_admin, &["log", "--limit", "10"]).await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = stdout.lines().filter(|l| l.contains("web-to-")).collect();
    assert!(lines.len() >= 3, "{stdout}");
    assert!(lines[0].contains("remove"), "{stdout}");
    // Every change names the local user who made it, from the socket's peer credentials.
    let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
    let changes: Vec<&str> = stdout.lines().filter(|l| l.contains(" by ")).collect();
    assert_eq!(changes.len(), 3, "{stdout}");
    assert!(
        changes
            .iter()
            .all(|l| l.contains(&format!(" by uid:{uid}"))),
        "{stdout}"
    );

    onprem.shutdown().await;
    cloud.shutdown().await;
    cancel.cancel();
}

#[test]
fn a_daemon_killed_during_applies_restarts_with_one_whole_policy() {
    let pki = Pki::new();
    let base = free_port_block();
    let mut options = NodeOptions::cloud(&pki, "cloud-1");
    options.tunnel_listen = Some(format!("127.0.0.1:{base}").parse().unwrap());
    options.admin = format!("127.0.0.1:{}", base + 1).parse().unwrap();
    let config = options.write();
    let start = || run_daemon(&config);
    // Two policies of 200 rules each; every apply swaps the whole set in one transaction.
    let policy = |generation: usize| {
        let mut text = String::new();
        for i in 0..200 {
            text += &format!(
                "[[rule]]\nid = \"g{generation}-r{i}\"\nsource = \"svc-{i}\"\ndestination = \"dst-{generation}\"\naction = \"allow\"\n\n"
            );
        }
        let path = pki.path(&format!("policy-{generation}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    };
    let policies = [policy(0), policy(1)];
    let admin = unix_admin(&options.admin_socket);
    let mut daemon = start();
    // A client applies the two policies alternately, back to back, from its own thread; the
    // daemon is killed (SIGKILL) right after the 5th success, so the next apply is in flight.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<bool>();
    let applier = {
        let policies = policies.clone();
        let admin = admin.clone();
        std::thread::spawn(move || {
            for round in 0..1000 {
                let ok = Command::new(binary("hybridge"))
                    .args(["acl", "apply", "-f"])
                    .arg(&policies[round % 2])
                    .args(["--admin", &admin])
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false);
                if done_tx.send(ok).is_err() || !ok {
                    return;
                }
            }
        })
    };
    for _ in 0..5 {
        assert_eq!(done_rx.recv_timeout(WAIT), Ok(true));
    }
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    drop(done_rx);
    applier.join().unwrap();

    // The killed daemon left its socket file behind; the restarted one replaces it.
    assert!(options.admin_socket.exists());
    // The file is readable offline, holds exactly one of the two whole policies, and a
    // restarted daemon serves it.
    let db = options.data_dir.join("hybridge.redb");
    let out = Command::new(binary("hybridge"))
        .args(["acl", "ls", "--json", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rules = listed["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 200);
    let generation = rules[0]["destination"].as_str().unwrap().to_owned();
    assert!(
        rules
            .iter()
            .all(|r| r["destination"] == generation.as_str()),
        "rules from two policies mixed"
    );
    let _daemon = start();
    let out = Command::new(binary("hybridge"))
        .args([
            "acl",
            "check",
            "--from",
            "svc-7",
            "--to",
            &generation,
            "--admin",
        ])
        .arg(&admin)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("allow"), "{stdout}");
    // While the daemon holds the file, --db names the problem instead of corrupting it.
    let out = Command::new(binary("hybridge"))
        .args(["acl", "ls", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use by a running hybridge"), "{stderr}");
}

#[test]
fn the_example_policy_loads_and_decides_as_documented() {
    let path = repo_root().join("config-examples/acl.toml");
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hybridge.redb");
    let apply = [
        "acl",
        "apply",
        "-f",
        path.to_str().unwrap(),
        "--db",
        db.to_str().unwrap(),
    ];
    let (code, stdout, stderr) = hybridge_cli(&apply);
    assert_eq!(code, 0, "{stdout}{stderr}");
    // Applying the same file again is a no-op.
    let (code, again, _) = hybridge_cli(&apply);
    assert_eq!(code, 0);
    assert!(again.contains("no changes"), "{again}");
    let acl = hybridge::acl::AclService::open(&db).unwrap();
    assert!(acl.list().len() >= 5);
    // Something the example must deny explicitly, and an unknown caller denied by default.
    let deny = acl.explain(
        Some("aws"),
        "web",
        "payments-admin",
        Some("POST"),
        Some("/refunds"),
    );
    assert_eq!(deny.action, Action::Deny, "{deny:?}");
    assert_eq!(deny.rule, "no-payments-admin");
    let internal = acl.explain(
        Some("aws"),
        "web",
        "billing",
        Some("GET"),
        Some("/api/internal/x"),
    );
    assert_eq!(internal.action, Action::Deny);
    assert_eq!(internal.rule, "web-no-billing-internal");
    let allowed = acl.explain(
        Some("aws"),
        "web",
        "billing",
        Some("POST"),
        Some("/api/invoices"),
    );
    assert_eq!(allowed.action, Action::Allow);
    assert_eq!(allowed.rule, "web-to-billing");
    // The same caller name vouched for by a node of another site is not the storefront.
    let elsewhere = acl.explain(
        Some("dc1"),
        "web",
        "billing",
        Some("POST"),
        Some("/api/invoices"),
    );
    assert_eq!(elsewhere.action, Action::Deny);
    assert!(elsewhere.default_deny);
    assert_eq!(acl.may_serve("billing", "dc1"), Some(true));
    assert_eq!(acl.may_serve("billing", "aws"), Some(false));
    let unknown = acl.explain(
        Some("aws"),
        "intruder",
        "billing",
        Some("GET"),
        Some("/api/x"),
    );
    assert_eq!(unknown.action, Action::Deny);
    assert!(unknown.default_deny);
}

/// The exit codes scripts rely on: `acl check` 0 allow / 1 deny / 2 error, `acl apply
/// --dry-run` 0 no change / 2 changes pending / 1 error, and JSON where asked.
#[test]
fn acl_commands_tell_scripts_their_result_by_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hybridge.redb");
    let db = db.to_str().unwrap();
    let policy = repo_root().join("config-examples/acl.toml");
    let policy = policy.to_str().unwrap();

    let (code, stdout, stderr) =
        hybridge_cli(&["acl", "apply", "-f", policy, "--dry-run", "--db", db]);
    assert_eq!(code, 2, "changes pending: {stdout}{stderr}");
    let (code, stdout, _) = hybridge_cli(&["acl", "apply", "-f", policy, "--db", db]);
    assert_eq!(code, 0, "{stdout}");
    let (code, stdout, _) = hybridge_cli(&[
        "acl",
        "apply",
        "-f",
        policy,
        "--dry-run",
        "--json",
        "--db",
        db,
    ]);
    assert_eq!(code, 0, "nothing pending: {stdout}");
    let diff: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(diff["added"].as_array().map(Vec::len), Some(0));
    let (code, _, stderr) = hybridge_cli(&[
        "acl",
        "apply",
        "-f",
        "/nonexistent.toml",
        "--dry-run",
        "--db",
        db,
    ]);
    assert_eq!(code, 1, "an error is not 'changes pending': {stderr}");

    let check = |args: &[&str]| {
        let mut full = vec!["acl", "check", "--db", db];
        full.extend_from_slice(args);
        hybridge_cli(&full)
    };
    let allowed = [
        "--from",
        "web",
        "--from-site",
        "aws",
        "--to",
        "billing",
        "GET",
        "/api/x",
    ];
    let (code, stdout, _) = check(&allowed);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.starts_with("allow"), "{stdout}");
    let (code, stdout, _) = check(&[
        "--from",
        "web",
        "--from-site",
        "aws",
        "--to",
        "billing",
        "GET",
        "/api/internal/x",
    ]);
    assert_eq!(code, 1, "denied: {stdout}");
    let mut json = allowed.to_vec();
    json.push("--json");
    let (code, stdout, _) = check(&json);
    assert_eq!(code, 0);
    let explanation: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(explanation["action"], "allow");
    assert_eq!(explanation["rule"], "web-to-billing");
    let (code, _, stderr) = check(&["--from", "web", "--to", "billing", "GET", "/api/a%2fb"]);
    assert_eq!(code, 2, "an error is neither allow nor deny: {stderr}");
}
