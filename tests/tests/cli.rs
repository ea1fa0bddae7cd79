//! The operator command lines as scripts use them, through the real binaries: `check-config`
//! refusing what `run` refuses (a directory of invalid configs, each with its message) and
//! warning without failing, environment variables, `acl apply` on several nodes at once,
//! `--json` output, and a second stop signal ending a drain at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hybridge_tests::*;

/// Runs a workspace binary with extra environment; returns (exit code, stdout, stderr).
fn run_with_env(binary_name: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = Command::new(binary(binary_name));
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    // The test's own environment must not choose for the command.
    for key in [
        "HYBRIDGE_CONFIG",
        "HYBRIDGE_ADMIN",
        "HYBRIDGE_LOG",
        "HYBRIDGE_CA_DIR",
        "HYBRIDGE_WORKER_THREADS",
    ] {
        if !env.iter().any(|(k, _)| *k == key) {
            command.env_remove(key);
        }
    }
    let out = command.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn every_invalid_config_is_refused_with_its_file_line_and_field_by_check_config_and_run() {
    let dir = repo_root().join("tests/config_invalid");
    let mut configs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    configs.sort();
    assert!(configs.len() >= 14, "{configs:?}");
    for config in &configs {
        let expected = std::fs::read_to_string(config.with_extension("err"))
            .unwrap_or_else(|e| panic!("{}: no .err beside it: {e}", config.display()));
        let expected = expected.trim();
        let path = config.to_str().unwrap();
        let (code, stdout, stderr) = run_with_env("hybridge", &["check-config", "-c", path], &[]);
        assert_eq!(code, 1, "{path}: {stdout}{stderr}");
        assert!(
            stderr.starts_with(&format!("error: {}", dir.display())) && stderr.contains(expected),
            "{path}: expected {expected:?} in {stderr:?}"
        );
        assert_eq!(stdout, "", "{path}");

        let (code, stdout, _) =
            run_with_env("hybridge", &["check-config", "-c", path, "--json"], &[]);
        assert_eq!(code, 1, "{path}");
        let doc = json(&stdout);
        assert_eq!(doc["ok"], false, "{stdout}");
        assert_eq!(doc["config"], path, "{stdout}");
        assert!(
            doc["error"].as_str().unwrap().contains(expected),
            "{stdout}"
        );

        // `run` parses with the same code: it refuses the file before binding anything.
        let (code, _, stderr) = run_with_env("hybridge", &["run", "-c", path], &[]);
        assert_eq!(code, 1, "{path}: {stderr}");
        assert!(stderr.contains(expected), "run {path}: {stderr}");
    }
}

/// A node certificate signed by the test CA, valid from `not_before` to `not_after`.
fn node_certificate_valid(
    pki: &Pki,
    name: &str,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> (PathBuf, PathBuf) {
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.path("ca/ca.key")).unwrap()).unwrap();
    let ca_pem = std::fs::read_to_string(pki.path("ca.pem")).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        format!("spiffe://{TRUST_DOMAIN}/site/cloud/node/{name}")
            .try_into()
            .unwrap(),
    ));
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let cert_path = pki.path(&format!("{name}-custom.pem"));
    let key_path = pki.path(&format!("{name}-custom.key"));
    std::fs::write(&cert_path, cert.pem() + &ca_pem).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

#[test]
fn check_config_warns_on_a_certificate_expiring_soon_and_a_port_in_use_and_still_passes() {
    let pki = Pki::new();
    let mut node = NodeOptions::cloud(&pki, "cloud-1");
    let now = time::OffsetDateTime::now_utc();
    let (cert, key) = node_certificate_valid(
        &pki,
        "cloud-1",
        now - time::Duration::days(80),
        now + time::Duration::days(5) + time::Duration::hours(1),
    );
    node.files.cert = cert;
    node.files.key = key;
    // The admin listener's port is held by someone else.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    node.admin = held.local_addr().unwrap();
    let config = node.write();
    let path = config.to_str().unwrap();

    let (code, stdout, stderr) = run_with_env("hybridge", &["check-config", "-c", path], &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.starts_with(&format!(
            "{path}: ok — node spiffe://{TRUST_DOMAIN}/site/cloud/node/cloud-1"
        )) && stdout.contains("certificate valid for 5 more days, 2 warning(s)"),
        "{stdout}"
    );
    let warnings: Vec<&str> = stderr.lines().collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    assert!(
        warnings[0].starts_with("warning: node certificate ")
            && warnings[0].contains("(in 5 days); renew it with `hybridge-ca issue node`"),
        "{stderr}"
    );
    assert!(
        warnings[1].starts_with(&format!(
            "warning: admin.listen: TCP {} is not free",
            node.admin
        )),
        "{stderr}"
    );

    let (code, stdout, stderr) =
        run_with_env("hybridge", &["check-config", "-c", path, "--json"], &[]);
    assert_eq!(code, 0, "{stderr}");
    let doc = json(&stdout);
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["config"], path);
    assert_eq!(
        doc["node"],
        format!("spiffe://{TRUST_DOMAIN}/site/cloud/node/cloud-1")
    );
    assert_eq!(doc["certificate_days_left"], 5);
    assert_eq!(doc["warnings"].as_array().unwrap().len(), 2, "{stdout}");
    assert_eq!(
        (&doc["exports"], &doc["imports"], &doc["peers"]),
        (&0.into(), &0.into(), &0.into())
    );
    drop(held);

    // With the port free and a certificate of 90 days, nothing to say.
    let mut fresh = NodeOptions::cloud(&pki, "cloud-2");
    fresh.admin = "127.0.0.1:0".parse().unwrap();
    let (code, stdout, stderr) = run_with_env(
        "hybridge",
        &["check-config", "-c", fresh.write().to_str().unwrap()],
        &[],
    );
    assert_eq!((code, stderr.as_str()), (0, ""), "{stdout}");
    assert!(stdout.trim_end().ends_with("more days"), "{stdout}");
}

#[test]
fn check_config_refuses_an_expired_or_not_yet_valid_certificate() {
    let pki = Pki::new();
    let now = time::OffsetDateTime::now_utc();
    for (name, not_before, not_after) in [
        (
            "expired",
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        ),
        (
            "future",
            now + time::Duration::days(1),
            now + time::Duration::days(30),
        ),
    ] {
        let mut node = NodeOptions::cloud(&pki, name);
        let (cert, key) = node_certificate_valid(&pki, name, not_before, not_after);
        node.files.cert = cert.clone();
        node.files.key = key;
        let (code, stdout, stderr) = run_with_env(
            "hybridge",
            &["check-config", "-c", node.write().to_str().unwrap()],
            &[],
        );
        assert_eq!(code, 1, "{name}: {stdout}{stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(&cert.display().to_string()),
            "{name}: {stderr}"
        );
        let reason = if name == "expired" {
            "certificate expired (serial "
        } else {
            "certificate not valid yet (serial "
        };
        assert!(stderr.contains(reason), "{name}: {stderr}");
    }
}

#[test]
fn environment_variables_choose_the_config_and_ca_and_invalid_values_are_named() {
    let pki = Pki::new();
    let mut node = NodeOptions::cloud(&pki, "cloud-1");
    node.admin = "127.0.0.1:0".parse().unwrap();
    let config = node.write();
    let config = config.to_str().unwrap();

    // HYBRIDGE_CONFIG is the config `check-config` (and `run`, `reload`, `status`) reads when
    // --config is not given; --config still wins.
    let (code, stdout, stderr) = run_with_env(
        "hybridge",
        &["check-config"],
        &[("HYBRIDGE_CONFIG", config)],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with(&format!("{config}: ok")), "{stdout}");
    let (code, _, stderr) = run_with_env(
        "hybridge",
        &["check-config", "-c", "/nonexistent/h.toml"],
        &[("HYBRIDGE_CONFIG", config)],
    );
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("error: /nonexistent/h.toml: cannot read config"),
        "{stderr}"
    );
    // `status` finds the admin socket the config names.
    let (code, _, stderr) = run_with_env("hybridge", &["status"], &[("HYBRIDGE_CONFIG", config)]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&format!(
            "no admin socket at {}",
            node.admin_socket.display()
        )),
        "{stderr}"
    );

    // An invalid value is an error naming the variable, before anything runs.
    for (variable, value, args, code) in [
        ("HYBRIDGE_LOG", "hybridge=[", &["check-config"][..], 2),
        ("HYBRIDGE_WORKER_THREADS", "0", &["run"], 2),
        ("HYBRIDGE_ADMIN", "localhost:7180", &["status"], 1),
        ("HYBRIDGE_ADMIN", "unix:/a.sock,bogus", &["status"], 1),
    ] {
        let (got, stdout, stderr) = run_with_env(
            "hybridge",
            args,
            &[(variable, value), ("HYBRIDGE_CONFIG", config)],
        );
        assert_eq!(got, code, "{variable}={value}: {stdout}{stderr}");
        assert!(
            stderr.starts_with("error: ")
                && stderr.contains(&format!("environment variable {variable}="))
                && stderr.lines().count() == 1,
            "{variable}={value}: {stderr}"
        );
    }
    // The same value typed as a flag is clap's error about the flag.
    let (code, _, stderr) = run_with_env("hybridge", &["--log", "hybridge=[", "check-config"], &[]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("invalid value 'hybridge=[' for '--log <FILTER>'")
            && !stderr.contains("environment variable"),
        "{stderr}"
    );

    // HYBRIDGE_CA_DIR is hybridge-ca's --dir.
    let ca_dir = pki.path("ca");
    let ca_dir = ca_dir.to_str().unwrap();
    let (code, stdout, stderr) = run_with_env(
        "hybridge-ca",
        &["list", "--json"],
        &[("HYBRIDGE_CA_DIR", ca_dir)],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        json(&stdout)
            .as_array()
            .is_some_and(|rows| !rows.is_empty())
    );
    let (code, _, stderr) = run_with_env(
        "hybridge-ca",
        &["list"],
        &[("HYBRIDGE_CA_DIR", "/nonexistent/ca")],
    );
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("error: opening CA in /nonexistent/ca (from HYBRIDGE_CA_DIR)"),
        "{stderr}"
    );
    let (code, _, stderr) = run_with_env("hybridge-ca", &["list"], &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--dir"), "{stderr}");
}

#[test]
fn hybridge_ca_prints_json_for_issue_inspect_list_and_revoke() {
    let work = tempfile::tempdir().unwrap();
    let ca_dir = work.path().join("ca");
    let ca = ca_dir.to_str().unwrap();
    let run = |args: &[&str]| {
        let (code, stdout, stderr) = run_with_env("hybridge-ca", args, &[("HYBRIDGE_CA_DIR", ca)]);
        assert_eq!(code, 0, "{args:?}: {stderr}");
        json(&stdout)
    };
    let (code, _, stderr) = run_with_env(
        "hybridge-ca",
        &["init", "--trust-domain", "json.test"],
        &[("HYBRIDGE_CA_DIR", ca)],
    );
    assert_eq!(code, 0, "{stderr}");
    let out = work.path().join("web");
    let issued = run(&[
        "issue",
        "service",
        "--name",
        "web",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(issued["spiffe_id"], "spiffe://json.test/svc/web");
    let serial = issued["serial"].as_str().unwrap().to_owned();
    let pem = issued["certificate"].as_str().unwrap().to_owned();
    assert!(Path::new(&pem).exists() && Path::new(issued["key"].as_str().unwrap()).exists());
    assert!(issued["not_after"].as_str().is_some());

    let inspected = run(&["inspect", &pem, "--json"]);
    assert_eq!(inspected["serial"], serial.as_str());
    assert_eq!(inspected["status"], "valid");
    assert_eq!(inspected["uris"][0], "spiffe://json.test/svc/web");
    assert_eq!(inspected["is_ca"], false);

    let listed = run(&["list", "--json"]);
    assert_eq!(listed[0]["serial"], serial.as_str());

    let revoked = run(&["revoke", &serial, "--reason", "superseded", "--json"]);
    assert_eq!(revoked["revoked"], 1);
    assert_eq!(revoked["serial"], serial.as_str());
    assert_eq!(revoked["reason"], "superseded");
    assert_eq!(run(&["inspect", &pem, "--json"])["status"], "revoked");
    assert_eq!(run(&["list", "--json"])[0]["status"], "revoked");
}

const POLICY: &str = r#"
[[rule]]
source = "web"
source_site = "onprem"
destination = "inventory"
action = "allow"

[[rule]]
source = "*"
destination = "inventory"
action = "deny"
"#;

#[test]
fn acl_apply_reaches_several_nodes_and_names_the_one_that_failed() {
    let pki = Pki::new();
    let nodes: Vec<NodeOptions> = ["cloud-1", "cloud-2"]
        .into_iter()
        .map(|name| NodeOptions::cloud(&pki, name))
        .collect();
    let _daemons: Vec<ChildGuard> = nodes.iter().map(|n| run_daemon(&n.write())).collect();
    let admins: Vec<String> = nodes.iter().map(|n| unix_admin(&n.admin_socket)).collect();
    let unreachable = format!("unix:{}", pki.path("nobody-here.sock").display());
    let policy = pki.path("acl.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let policy = policy.to_str().unwrap();
    let hybridge = |args: &[&str]| run_with_env("hybridge", args, &[]);

    // A dry run on both: changes pending on each, exit 2, one JSON object per node.
    let (code, stdout, stderr) = hybridge(&[
        "acl",
        "apply",
        "-f",
        policy,
        "--dry-run",
        "--json",
        "--admin",
        &admins[0],
        "--admin",
        &admins[1],
    ]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    let doc = json(&stdout);
    let per_node = doc.as_array().unwrap();
    assert_eq!(per_node.len(), 2);
    for (node, admin) in per_node.iter().zip(&admins) {
        assert_eq!(node["node"], admin.as_str());
        assert_eq!(node["result"], "pending");
        assert_eq!(node["diff"]["added"].as_array().unwrap().len(), 2);
        assert_eq!(node["error"], serde_json::Value::Null);
    }

    // Three nodes, one unreachable: the two are applied, the third is named, exit 1.
    let list = format!("{},{}", admins[0], unreachable);
    let (code, stdout, stderr) = hybridge(&[
        "acl", "apply", "-f", policy, "--admin", &list, "--admin", &admins[1],
    ]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    // Each node's warnings follow its line, indented.
    let warnings = stdout
        .lines()
        .filter(|l| l.starts_with("  warning: rule "))
        .count();
    assert_eq!(warnings, 4, "{stdout}");
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.starts_with("  ")).collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert!(
        lines[0].starts_with(&format!(
            "{}: applied 2 added, 0 changed, 0 removed (policy version 0 -> 1); policy ",
            admins[0]
        )),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with(&format!("{unreachable}: failed: "))
            && lines[1].contains("no admin socket at"),
        "{stdout}"
    );
    assert!(
        lines[2].starts_with(&format!("{}: applied 2 added", admins[1])),
        "{stdout}"
    );
    assert!(
        lines[3].starts_with("3 node(s): 2 applied, 0 unchanged, 0 pending, 1 failed; policy ")
            && lines[3].ends_with(" on every node that answered"),
        "{stdout}"
    );
    assert_eq!(
        stderr.trim_end(),
        format!(
            "error: acl apply failed on 1 of 3 node(s): {unreachable} (the others were applied)"
        )
    );
    // Both nodes hold the same policy now.
    let digests: Vec<String> = admins
        .iter()
        .map(|admin| {
            let (code, stdout, stderr) = hybridge(&["acl", "list", "--json", "--admin", admin]);
            assert_eq!(code, 0, "{stderr}");
            let doc = json(&stdout);
            assert_eq!(doc["rules"].as_array().unwrap().len(), 2);
            doc["digest"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(digests[0], digests[1]);
    assert!(
        lines[0].ends_with(&format!("; policy {}", digests[0])),
        "{stdout}"
    );

    // Again, both from HYBRIDGE_ADMIN: nothing to change, exit 0 (dry run too).
    let both = admins.join(",");
    for dry_run in [true, false] {
        let mut args = vec!["acl", "apply", "-f", policy];
        if dry_run {
            args.push("--dry-run");
        }
        let (code, stdout, stderr) =
            run_with_env("hybridge", &args, &[("HYBRIDGE_ADMIN", both.as_str())]);
        assert_eq!((code, stderr.as_str()), (0, ""), "{stdout}");
        assert!(
            stdout.starts_with(&format!("{}: unchanged (policy version 1)", admins[0]))
                && stdout.contains(&format!(
                    "2 node(s): 0 applied, 2 unchanged, 0 pending, 0 failed; policy {}",
                    digests[0]
                )),
            "{stdout}"
        );
    }

    // A malformed address is an error naming it, before any node is asked.
    let (code, _, stderr) = hybridge(&[
        "acl",
        "apply",
        "-f",
        policy,
        "--admin",
        &format!("{},localhost:7180", admins[0]),
    ]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("invalid value 'localhost:7180' for '--admin <ADDRESS>'"),
        "{stderr}"
    );
    // Only `acl apply` takes several nodes.
    let (code, _, stderr) = hybridge(&["acl", "list", "--admin", &both]);
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("error: 2 admin addresses given")
            && stderr.contains("only `acl apply` takes several"),
        "{stderr}"
    );
    // The policy file's words work as flags, the old ones still parse.
    for args in [
        [
            "--source",
            "web",
            "--source-site",
            "onprem",
            "--destination",
            "inventory",
        ],
        [
            "--from",
            "web",
            "--from-site",
            "onprem",
            "--to",
            "inventory",
        ],
    ] {
        let mut full = vec!["acl", "check", "--admin", &admins[0]];
        full.extend(args);
        let (code, stdout, stderr) = hybridge(&full);
        assert_eq!(code, 0, "{args:?}: {stdout}{stderr}");
        assert!(stdout.starts_with("allow\n"), "{stdout}");
    }
    // `acl log --json` lists the apply.
    let (code, stdout, _) = hybridge(&["acl", "log", "--json", "--admin", &admins[1]]);
    assert_eq!(code, 0);
    let log = json(&stdout);
    assert_eq!(log["entries"][0]["op"], "apply", "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_signal_during_a_drain_exits_at_once() {
    use tokio::io::AsyncReadExt as _;
    let pki = Pki::new();
    // An upstream that takes requests and never answers: the request stays in flight.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let (arrived, mut arrivals) = tokio::sync::mpsc::channel(1);
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = upstream.accept().await {
            let mut head = vec![0; 4096];
            let _ = stream.read(&mut head).await;
            held.push(stream);
            let _ = arrived.send(()).await;
        }
    });
    let base = free_port_block();
    let mut cloud = NodeOptions::cloud_process(&pki, "cloud-1", base, upstream_addr);
    // Long enough that only the second signal can end the drain within the test's waits.
    cloud.extra = "\n[limits]\ndrain_timeout = \"120s\"\n".into();
    cloud.exports[0].extra = "request_timeout = \"0s\"".into();
    let mut process = run_daemon(&cloud.write());

    let mut onprem = NodeOptions::onprem(&pki, "onprem-1", &[cloud.tunnel_listen.unwrap()]);
    onprem.imports.push(("inventory".into(), "web".into()));
    let onprem = onprem.start().await;
    allow(&onprem, "web", "inventory");
    assert!(onprem.wait_for_route("inventory", WAIT).await);
    let import = import_addr(&onprem, "inventory");
    let request =
        tokio::spawn(async move { http1(import, "GET", "/held", &[], bytes::Bytes::new()).await });
    tokio::time::timeout(WAIT, arrivals.recv())
        .await
        .expect("the request reaches the upstream");

    process.signal(libc::SIGTERM);
    process.wait_for_line(WAIT, |l| l.contains("draining"));
    // The drain waits on the request in flight...
    assert_eq!(
        process.child.try_wait().unwrap(),
        None,
        "{:?}",
        process.drain()
    );
    // ...until a second signal ends the process at once, saying so.
    process.signal(libc::SIGTERM);
    assert_eq!(
        process.wait_exit(Duration::from_secs(10)),
        Some(128 + libc::SIGTERM),
        "{:?}",
        process.drain()
    );
    let seen = process.drain().join("\n");
    assert!(
        seen.contains("second stop signal while draining: exiting now"),
        "{seen}"
    );
    // The caller learns its request is gone rather than waiting forever.
    let answer = tokio::time::timeout(WAIT, request).await.unwrap().unwrap();
    assert!(matches!(answer.status, 502..=504), "{}", answer.status);
    onprem.shutdown().await;
    holder.abort();
}

/// The completion scripts and man pages the .deb ships (`bridge/debian/completions`,
/// `bridge/debian/man`) are what the binaries generate from their clap definitions now.
/// `HYBRIDGE_UPDATE_GENERATED=1 cargo test -p hybridge-tests --test cli generated` rewrites
/// them after a change to a flag or its help.
#[test]
fn the_shipped_completions_and_man_pages_are_generated_from_the_current_binaries() {
    let update = std::env::var_os("HYBRIDGE_UPDATE_GENERATED").is_some();
    let shipped = repo_root().join("bridge/debian");
    let mut stale = Vec::new();
    for name in ["hybridge", "hybridge-ca"] {
        for (shell, file) in [
            ("bash", format!("{name}.bash")),
            ("zsh", format!("_{name}")),
            ("fish", format!("{name}.fish")),
        ] {
            let (code, script, stderr) = run_with_env(name, &["completions", shell], &[]);
            assert_eq!(code, 0, "{name} completions {shell}: {stderr}");
            assert!(script.contains(name), "{name} {shell}: {script}");
            let path = shipped.join("completions").join(&file);
            if update {
                std::fs::write(&path, &script).unwrap();
            } else if std::fs::read_to_string(&path).ok().as_deref() != Some(script.as_str()) {
                stale.push(path.display().to_string());
            }
        }
    }
    let generated = tempfile::tempdir().unwrap();
    for name in ["hybridge", "hybridge-ca"] {
        let (code, stdout, stderr) =
            run_with_env(name, &["man", generated.path().to_str().unwrap()], &[]);
        assert_eq!(code, 0, "{name} man: {stderr}");
        assert!(stdout.starts_with("wrote "), "{stdout}");
    }
    let pages = |dir: &Path| -> std::collections::BTreeMap<String, String> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .map(|e| e.unwrap().path())
                    .filter(|p| p.extension().is_some_and(|e| e == "1"))
                    .map(|p| {
                        let name = p.file_name().unwrap().to_string_lossy().into_owned();
                        (name, std::fs::read_to_string(&p).unwrap())
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let fresh = pages(generated.path());
    for page in [
        "hybridge.1",
        "hybridge-acl-apply.1",
        "hybridge-check-config.1",
        "hybridge-ca.1",
        "hybridge-ca-issue-node.1",
    ] {
        assert!(
            fresh.contains_key(page),
            "{page} not generated: {:?}",
            fresh.keys()
        );
    }
    let man_dir = shipped.join("man");
    if update {
        let _ = std::fs::remove_dir_all(&man_dir);
        std::fs::create_dir_all(&man_dir).unwrap();
        for (name, text) in &fresh {
            std::fs::write(man_dir.join(name), text).unwrap();
        }
    } else if pages(&man_dir) != fresh {
        stale.push(man_dir.display().to_string());
    }
    assert!(
        stale.is_empty(),
        "{stale:?} differ from what the binaries generate: rerun with HYBRIDGE_UPDATE_GENERATED=1 \
         cargo test -p hybridge-tests --test cli generated, and commit the result"
    );
}
