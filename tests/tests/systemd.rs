//! The shipped systemd unit: `systemd-analyze verify` accepts it and `systemd-analyze
//! security` rates its exposure "OK" or better (≤ 2.0). Skipped, saying so, only where
//! systemd-analyze is not installed (`.ci/run` installs it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use hybridge_tests::{binary, repo_root};

fn systemd_analyze_available() -> bool {
    Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The unit as shipped, with the binary path pointed at the freshly built `hybridge`
/// (`verify` checks that ExecStart's executable exists); every other line is untouched.
fn unit_under_test(dir: &Path) -> PathBuf {
    let shipped = repo_root().join("systemd/hybridge.service");
    let text = std::fs::read_to_string(&shipped).unwrap();
    assert!(text.contains("ExecStart=/usr/bin/hybridge run"), "{text}");
    let binary = binary("hybridge");
    let path = dir.join("hybridge.service");
    std::fs::write(
        &path,
        text.replace("/usr/bin/hybridge", binary.to_str().unwrap()),
    )
    .unwrap();
    path
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    if !systemd_analyze_available() {
        eprintln!("skipped: systemd-analyze not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_under_test(dir.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "verify failed: {stderr}");
    // verify also reports problems of the unit as warnings on stderr without failing.
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("hybridge.service"))
        .collect();
    assert!(about_unit.is_empty(), "{stderr}");
}

#[test]
fn the_unit_exposure_score_is_ok_or_better() {
    if !systemd_analyze_available() {
        eprintln!("skipped: systemd-analyze not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_under_test(dir.path());
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no score in: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    // "→ Overall exposure level for hybridge.service: 1.2 OK 🙂"
    let score: f64 = line
        .rsplit(':')
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unparsable score line: {line}"));
    eprintln!("{line}");
    assert!(score <= 2.0, "{line}");
}

#[test]
fn sysusers_and_tmpfiles_snippets_declare_the_account_and_directories() {
    let dir = repo_root().join("systemd");
    let sysusers = std::fs::read_to_string(dir.join("hybridge.sysusers")).unwrap();
    let user_line = sysusers
        .lines()
        .find(|l| l.starts_with("u "))
        .expect("a `u` line");
    assert_eq!(user_line.split_whitespace().nth(1), Some("hybridge"));
    let tmpfiles = std::fs::read_to_string(dir.join("hybridge.tmpfiles")).unwrap();
    let entries: Vec<Vec<&str>> = tmpfiles
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(entries.contains(&vec![
        "d",
        "/var/lib/hybridge",
        "0750",
        "hybridge",
        "hybridge",
        "-",
        "-"
    ]));
    assert!(entries.contains(&vec![
        "d",
        "/etc/hybridge",
        "0750",
        "root",
        "hybridge",
        "-",
        "-"
    ]));
    // Where tmpfiles exists, let it parse the file for real (into a throwaway root).
    if Command::new("systemd-tmpfiles")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        // The account must exist in the root for tmpfiles to resolve its owner.
        let users = Command::new("systemd-sysusers")
            .arg(format!("--root={}", root.path().display()))
            .arg(dir.join("hybridge.sysusers"))
            .output()
            .unwrap();
        assert!(users.status.success(), "{users:?}");
        let out = Command::new("systemd-tmpfiles")
            .args(["--create", &format!("--root={}", root.path().display())])
            .arg(dir.join("hybridge.tmpfiles"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let state = std::fs::metadata(root.path().join("var/lib/hybridge")).unwrap();
        assert_eq!(state.permissions().mode() & 0o7777, 0o750);
        let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
        let uid: u32 = passwd
            .lines()
            .find(|l| l.starts_with("hybridge:"))
            .and_then(|l| l.split(':').nth(2))
            .and_then(|u| u.parse().ok())
            .unwrap();
        assert_eq!(state.uid(), uid);
        let etc = std::fs::metadata(root.path().join("etc/hybridge")).unwrap();
        assert_eq!(etc.permissions().mode() & 0o7777, 0o750);
        assert_eq!(etc.uid(), 0);
    }
}
