//! The built `hybridge-ca` binary end to end: happy path and bad input, asserting exit
//! codes, file modes, JSON output and one-line error messages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::{openssl_ok, path_str};

fn ca_tool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hybridge-ca"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = ca_tool(args);
    assert!(
        out.status.success(),
        "hybridge-ca {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail; returns its single stderr line.
fn fails(args: &[&str]) -> String {
    let out = ca_tool(args);
    assert!(
        !out.status.success(),
        "hybridge-ca {args:?} unexpectedly succeeded"
    );
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "expected one line, got: {err}");
    assert!(err.starts_with("error: "), "{err}");
    err.trim_end().to_string()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn list_json(dir: &str) -> Vec<serde_json::Value> {
    serde_json::from_str(&ok(&["list", "--dir", dir, "--json"])).unwrap()
}

#[test]
fn full_lifecycle() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    let dir = path_str(&ca_dir);

    let out = ok(&[
        "init",
        "--dir",
        dir,
        "--trust-domain",
        "corp.example",
        "--validity",
        "5y",
    ]);
    assert!(
        out.starts_with("created CA for trust domain corp.example in "),
        "{out}"
    );
    assert_eq!(mode(&ca_dir.join("ca.key")), 0o600);

    let node_prefix = tmp.path().join("edge-1");
    let out = ok(&[
        "issue",
        "node",
        "--dir",
        dir,
        "--site",
        "onprem",
        "--name",
        "edge-1",
        "--dns",
        "edge-1.corp.example",
        "--dns",
        "edge-1",
        "--ip",
        "10.0.0.7",
        "--validity",
        "90d",
        "--out",
        path_str(&node_prefix),
    ]);
    assert!(
        out.starts_with("issued spiffe://corp.example/site/onprem/node/edge-1 serial "),
        "{out}"
    );
    let node_pem = tmp.path().join("edge-1.pem");
    assert_eq!(mode(&tmp.path().join("edge-1.key")), 0o600);
    openssl_ok(&[
        "verify",
        "-CAfile",
        path_str(&ca_dir.join("ca.pem")),
        path_str(&node_pem),
    ]);
    let text = openssl_ok(&["x509", "-in", path_str(&node_pem), "-noout", "-text"]);
    assert!(
        text.contains("URI:spiffe://corp.example/site/onprem/node/edge-1"),
        "{text}"
    );
    assert!(
        text.contains("DNS:edge-1.corp.example, DNS:edge-1"),
        "{text}"
    );

    let svc_prefix = tmp.path().join("billing");
    ok(&[
        "issue",
        "service",
        "--dir",
        dir,
        "--name",
        "billing",
        "--out",
        path_str(&svc_prefix),
    ]);
    // Renewal: same name again gives a new serial; both stay valid.
    ok(&[
        "issue",
        "service",
        "--dir",
        dir,
        "--name",
        "billing",
        "--validity",
        "12h",
        "--out",
        path_str(&tmp.path().join("billing-2")),
    ]);

    let rows = list_json(dir);
    assert_eq!(rows.len(), 3);
    let billing: Vec<_> = rows
        .iter()
        .filter(|r| r["spiffe_id"] == "spiffe://corp.example/svc/billing")
        .collect();
    assert_eq!(billing.len(), 2);
    assert_ne!(billing[0]["serial"], billing[1]["serial"]);
    for r in &rows {
        assert_eq!(r["status"], "valid");
        assert!(r["revocation_reason"].is_null());
    }
    let node_row = rows.iter().find(|r| r["kind"] == "node").unwrap();
    assert_eq!(node_row["subject"], "O=hybridge, OU=onprem, CN=edge-1");
    let node_serial = node_row["serial"].as_str().unwrap().to_string();

    let table = ok(&["list", "--dir", dir]);
    assert_eq!(table.lines().count(), 4, "{table}");
    assert!(table.contains(&node_serial));

    // Revoke by serial (uppercase with colons is accepted), then by SPIFFE id.
    let colon_serial: Vec<String> = node_serial
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    ok(&[
        "revoke",
        "--dir",
        dir,
        &colon_serial.join(":"),
        "--reason",
        "key-compromise",
    ]);
    let out = ok(&[
        "revoke",
        "--dir",
        dir,
        "--spiffe",
        "spiffe://corp.example/svc/billing",
        "--reason",
        "superseded",
    ]);
    assert!(
        out.starts_with("revoked 2 certificate(s) of spiffe://corp.example/svc/billing"),
        "{out}"
    );
    let rows = list_json(dir);
    assert!(rows.iter().all(|r| r["status"] == "revoked"));
    let node_row = rows
        .iter()
        .find(|r| r["serial"] == node_serial.as_str())
        .unwrap();
    assert_eq!(node_row["revocation_reason"], "key-compromise");
    assert!(node_row["revoked_at"].is_string());

    let crl = tmp.path().join("crl.pem");
    ok(&["crl", "--dir", dir, "--out", path_str(&crl)]);
    let text = openssl_ok(&["crl", "-in", path_str(&crl), "-noout", "-text"]);
    assert!(
        text.contains(&format!("Serial Number: {}", node_serial.to_uppercase())),
        "{text}"
    );
    assert_eq!(text.matches("Serial Number:").count(), 3, "{text}");

    let out = ok(&["inspect", path_str(&node_pem), "--dir", dir]);
    assert!(
        out.contains("URI SANs:    spiffe://corp.example/site/onprem/node/edge-1"),
        "{out}"
    );
    assert!(
        out.contains(&format!("serial:      {node_serial}")),
        "{out}"
    );
    assert!(out.contains("IP SANs:     10.0.0.7"), "{out}");
    assert!(
        out.contains("issuer:      O=hybridge, CN=hybridge CA corp.example"),
        "{out}"
    );
    assert!(out.contains("status:      REVOKED at "), "{out}");
    let fp = openssl_ok(&[
        "x509",
        "-in",
        path_str(&node_pem),
        "-noout",
        "-fingerprint",
        "-sha256",
    ]);
    let fp = fp.trim().rsplit('=').next().unwrap();
    assert!(out.contains(&format!("SHA-256:     {fp}")), "{out} vs {fp}");

    let out = ok(&["inspect", path_str(&ca_dir.join("ca.pem"))]);
    assert!(out.contains("CA:          yes"), "{out}");
}

/// `issue admin` writes a clientAuth-only certificate for spiffe://TD/admin/NAME that
/// `list`, `inspect` and `revoke --spiffe` all know as an administrator.
#[test]
fn administrator_certificates_issue_list_inspect_and_revoke() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    let dir = path_str(&ca_dir);
    ok(&["init", "--dir", dir, "--trust-domain", "corp.example"]);
    let prefix = tmp.path().join("alice");
    let out = ok(&[
        "issue",
        "admin",
        "--dir",
        dir,
        "--name",
        "alice",
        "--out",
        path_str(&prefix),
    ]);
    assert!(
        out.starts_with("issued spiffe://corp.example/admin/alice serial "),
        "{out}"
    );
    let pem = tmp.path().join("alice.pem");
    assert_eq!(mode(&tmp.path().join("alice.key")), 0o600);
    openssl_ok(&[
        "verify",
        "-CAfile",
        path_str(&ca_dir.join("ca.pem")),
        "-purpose",
        "sslclient",
        path_str(&pem),
    ]);
    let text = openssl_ok(&["x509", "-in", path_str(&pem), "-noout", "-text"]);
    assert!(
        text.contains("URI:spiffe://corp.example/admin/alice"),
        "{text}"
    );
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(!text.contains("TLS Web Server Authentication"), "{text}");

    let rows = list_json(dir);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["kind"], "admin");
    assert_eq!(rows[0]["subject"], "O=hybridge, OU=admin, CN=alice");
    let table = ok(&["list", "--dir", dir]);
    assert!(table.contains("admin    valid"), "{table}");

    let out = ok(&["inspect", path_str(&pem), "--dir", dir]);
    assert!(
        out.contains("URI SANs:    spiffe://corp.example/admin/alice"),
        "{out}"
    );
    assert!(out.contains("key usage:   clientAuth\n"), "{out}");
    assert!(out.contains("status:      valid"), "{out}");

    let out = ok(&[
        "revoke",
        "--dir",
        dir,
        "--spiffe",
        "spiffe://corp.example/admin/alice",
        "--reason",
        "privilege-withdrawn",
    ]);
    assert!(
        out.starts_with("revoked 1 certificate(s) of spiffe://corp.example/admin/alice"),
        "{out}"
    );
    assert_eq!(list_json(dir)[0]["status"], "revoked");

    let err = fails(&[
        "issue",
        "admin",
        "--dir",
        dir,
        "--name",
        "Alice Smith",
        "--out",
        path_str(&prefix),
    ]);
    assert_eq!(
        err,
        "error: issuing administrator certificate: invalid administrator name \"Alice Smith\": must be non-empty and use only a-z 0-9 . _ -"
    );
}

#[test]
fn ed25519_init_works() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    ok(&[
        "init",
        "--dir",
        path_str(&dir),
        "--trust-domain",
        "td",
        "--key-type",
        "ed25519",
    ]);
    let text = openssl_ok(&[
        "x509",
        "-in",
        path_str(&dir.join("ca.pem")),
        "-noout",
        "-text",
    ]);
    assert!(text.contains("ED25519"), "{text}");
}

#[test]
fn bad_input_gives_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    let dir = path_str(&ca_dir);
    let out_prefix = tmp.path().join("x");
    let out = path_str(&out_prefix);

    // Missing CA directory names the path.
    let missing = tmp.path().join("nope");
    let err = fails(&["list", "--dir", path_str(&missing)]);
    assert_eq!(
        err,
        format!(
            "error: opening CA in {0}: no CA in {0} (ca.pem not found); run `hybridge-ca init` first",
            missing.display()
        )
    );

    // Invalid trust domain.
    let err = fails(&["init", "--dir", dir, "--trust-domain", "Corp"]);
    assert!(err.contains("invalid trust domain \"Corp\""), "{err}");
    assert!(!ca_dir.join("ca.pem").exists());

    ok(&["init", "--dir", dir, "--trust-domain", "td"]);
    let before = std::fs::read(ca_dir.join("ca.key")).unwrap();
    let err = fails(&["init", "--dir", dir, "--trust-domain", "td"]);
    assert_eq!(
        err,
        format!(
            "error: initialising CA in {0}: a CA already exists in {0}; refusing to overwrite it",
            ca_dir.display()
        )
    );
    assert_eq!(std::fs::read(ca_dir.join("ca.key")).unwrap(), before);

    // Invalid site name names the field.
    let err = fails(&[
        "issue", "node", "--dir", dir, "--site", "Bad Site", "--name", "a", "--out", out,
    ]);
    assert_eq!(
        err,
        "error: issuing node certificate: invalid site \"Bad Site\": must be non-empty and use only a-z 0-9 . _ -"
    );
    assert!(!tmp.path().join("x.pem").exists());
    let err = fails(&["issue", "service", "--dir", dir, "--name", "", "--out", out]);
    assert!(err.contains("invalid service name \"\""), "{err}");
    let err = fails(&[
        "issue", "node", "--dir", dir, "--site", "a", "--name", "b", "--dns", "bad host", "--out",
        out,
    ]);
    assert!(err.contains("invalid DNS name \"bad host\""), "{err}");

    // Revoking a serial that does not exist names the registry.
    let err = fails(&["revoke", "--dir", dir, "deadbeef"]);
    assert_eq!(
        err,
        format!(
            "error: revoking serial deadbeef: no certificate with serial deadbeef in {}",
            ca_dir.join("ca.redb").display()
        )
    );
    let err = fails(&["revoke", "--dir", dir, "--spiffe", "spiffe://td/svc/ghost"]);
    assert!(err.contains("no still-valid certificate"), "{err}");
    let err = fails(&["revoke", "--dir", dir, "--spiffe", "http://td/svc/a"]);
    assert!(
        err.starts_with("error: --spiffe: invalid SPIFFE id \"http://td/svc/a\""),
        "{err}"
    );
    let err = fails(&["revoke", "--dir", dir, "ab", "--reason", "stolen"]);
    assert!(
        err.contains("unknown revocation reason \"stolen\""),
        "{err}"
    );

    // Wrong flags, bad durations: clap errors squeezed to one line.
    let err = fails(&["list", "--dir", dir, "--frobnicate"]);
    assert!(err.contains("--frobnicate"), "{err}");
    let err = fails(&[
        "issue",
        "node",
        "--dir",
        dir,
        "--site",
        "a",
        "--name",
        "b",
        "--out",
        out,
        "--validity",
        "10x",
    ]);
    assert!(err.contains("invalid duration \"10x\""), "{err}");
    let err = fails(&["list"]);
    assert!(err.contains("--dir"), "{err}");

    // Corrupt CA key names the file.
    std::fs::write(ca_dir.join("ca.key"), "junk").unwrap();
    let err = fails(&[
        "issue", "service", "--dir", dir, "--name", "a", "--out", out,
    ]);
    assert!(
        err.starts_with(&format!(
            "error: opening CA in {}: corrupt CA key {}: ",
            ca_dir.display(),
            ca_dir.join("ca.key").display()
        )),
        "{err}"
    );

    // Inspecting garbage names the file.
    let junk = tmp.path().join("junk.pem");
    std::fs::write(&junk, "junk").unwrap();
    let err = fails(&["inspect", path_str(&junk)]);
    assert!(
        err.starts_with(&format!("error: inspecting {}: ", junk.display())),
        "{err}"
    );
    let err = fails(&["inspect", path_str(&tmp.path().join("absent.pem"))]);
    assert!(err.starts_with("error: reading certificate "), "{err}");
}
