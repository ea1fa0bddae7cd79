//! Helpers shared by the integration tests: the real `openssl` binary and a fresh CA.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use hybridge_ca::{CertificateAuthority, InitOptions};

/// Runs `openssl ARGS`, failing the test with a useful message if it is not installed.
pub fn openssl(args: &[&str]) -> Output {
    match Command::new("openssl").args(args).output() {
        Ok(out) => out,
        Err(e) => panic!(
            "could not run the openssl binary ({e}); .ci/run installs it (apt-get install openssl)"
        ),
    }
}

/// `openssl ARGS` that must succeed; returns stdout.
pub fn openssl_ok(args: &[&str]) -> String {
    let out = openssl(args);
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A new CA for trust domain `td` in `dir/ca`.
pub fn new_ca(dir: &Path, td: &str) -> CertificateAuthority {
    CertificateAuthority::init(&dir.join("ca"), td, InitOptions::default()).unwrap()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}
