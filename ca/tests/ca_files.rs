//! On-disk behaviour of the CA directory: permissions, refusing to overwrite, clear
//! errors for missing, corrupt, unreadable and expired CAs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use hybridge_ca::authority::CaError;
use hybridge_ca::{CertificateAuthority, InitOptions};

fn mode(path: &std::path::Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn keys_are_0600_and_dir_0700() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = CertificateAuthority::init(&ca_dir, "td", InitOptions::default()).unwrap();
    assert_eq!(mode(&ca_dir.join("ca.key")), 0o600);
    assert_eq!(mode(&ca_dir), 0o700);
    let leaf = ca
        .issue_node("onprem", "a", &[], &[], Duration::from_secs(3600))
        .unwrap();
    let (pem, key) = leaf.write(&dir.path().join("out-a")).unwrap();
    assert_eq!(key, dir.path().join("out-a.key"));
    assert_eq!(pem, dir.path().join("out-a.pem"));
    assert_eq!(mode(&key), 0o600);
    assert_eq!(fs::read_to_string(&key).unwrap(), leaf.key_pem);
    assert_eq!(fs::read_to_string(&pem).unwrap(), leaf.cert_chain_pem);
    // No temp files left behind.
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, vec!["ca", "out-a.key", "out-a.pem"]);

    // Renewal overwrites the files with a new serial; the key stays 0600.
    let renewed = ca
        .issue_node("onprem", "a", &[], &[], Duration::from_secs(3600))
        .unwrap();
    renewed.write(&dir.path().join("out-a")).unwrap();
    assert_ne!(renewed.serial_hex, leaf.serial_hex);
    assert_eq!(mode(&key), 0o600);
    assert_eq!(fs::read_to_string(&key).unwrap(), renewed.key_pem);
    assert_eq!(ca.list().unwrap().len(), 2);
}

#[test]
fn init_twice_fails_and_leaves_files_identical() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    CertificateAuthority::init(&ca_dir, "td", InitOptions::default()).unwrap();
    let pem = fs::read(ca_dir.join("ca.pem")).unwrap();
    let key = fs::read(ca_dir.join("ca.key")).unwrap();
    let redb = fs::read(ca_dir.join("ca.redb")).unwrap();

    let err = CertificateAuthority::init(&ca_dir, "other", InitOptions::default()).unwrap_err();
    assert!(matches!(err, CaError::AlreadyInitialized { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "a CA already exists in {}; refusing to overwrite it",
            ca_dir.display()
        )
    );
    assert_eq!(fs::read(ca_dir.join("ca.pem")).unwrap(), pem);
    assert_eq!(fs::read(ca_dir.join("ca.key")).unwrap(), key);
    assert_eq!(fs::read(ca_dir.join("ca.redb")).unwrap(), redb);
    assert_eq!(fs::read_dir(&ca_dir).unwrap().count(), 3);

    // A stray key alone also blocks init (and survives).
    let other = dir.path().join("half");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("ca.key"), b"precious").unwrap();
    assert!(CertificateAuthority::init(&other, "td", InitOptions::default()).is_err());
    assert_eq!(fs::read(other.join("ca.key")).unwrap(), b"precious");
    assert_eq!(fs::read_dir(&other).unwrap().count(), 1);
}

#[test]
fn open_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");

    let err = CertificateAuthority::open(&ca_dir).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "no CA in {} (ca.pem not found); run `hybridge-ca init` first",
            ca_dir.display()
        )
    );

    CertificateAuthority::init(&ca_dir, "td", InitOptions::default()).unwrap();
    let key_path = ca_dir.join("ca.key");
    let good_key = fs::read(&key_path).unwrap();

    // Unreadable key: a directory where the key should be (root can read any file).
    fs::remove_file(&key_path).unwrap();
    fs::create_dir(&key_path).unwrap();
    let err = CertificateAuthority::open(&ca_dir).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("reading CA key {}: ", key_path.display())),
        "{err}"
    );
    fs::remove_dir(&key_path).unwrap();

    // Corrupt key.
    fs::write(
        &key_path,
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = CertificateAuthority::open(&ca_dir).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("corrupt CA key {}: ", key_path.display())),
        "{err}"
    );

    // Key of another CA.
    let other = tempfile::tempdir().unwrap();
    CertificateAuthority::init(other.path(), "td", InitOptions::default()).unwrap();
    fs::copy(other.path().join("ca.key"), &key_path).unwrap();
    let err = CertificateAuthority::open(&ca_dir).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "CA key {} does not match CA certificate {}",
            key_path.display(),
            ca_dir.join("ca.pem").display()
        )
    );
    fs::write(&key_path, &good_key).unwrap();

    // Corrupt registry.
    let redb = ca_dir.join("ca.redb");
    let saved = fs::read(&redb).unwrap();
    fs::write(&redb, b"not a database").unwrap();
    let err = CertificateAuthority::open(&ca_dir).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("CA registry {}: ", redb.display())),
        "{err}"
    );
    fs::write(&redb, saved).unwrap();
    CertificateAuthority::open(&ca_dir).unwrap();
}

#[test]
fn expired_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    CertificateAuthority::init(&ca_dir, "td", InitOptions::default()).unwrap();
    // Re-sign the CA certificate with the same key but a validity in the past.
    let key =
        rcgen::KeyPair::from_pem(&fs::read_to_string(ca_dir.join("ca.key")).unwrap()).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let cert = params.self_signed(&key).unwrap();
    fs::write(ca_dir.join("ca.pem"), cert.pem()).unwrap();

    let err = CertificateAuthority::open(&ca_dir).unwrap_err();
    assert!(matches!(err, CaError::Expired { .. }), "{err}");
    assert!(
        err.to_string().starts_with(&format!(
            "CA certificate {} expired at 2021-01-01",
            ca_dir.join("ca.pem").display()
        )),
        "{err}"
    );
}
