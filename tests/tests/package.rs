//! The Debian package: `cargo deb` builds it from the binaries the tests already built, its
//! contents and control data are what an operator needs, and it installs, upgrades and
//! purges cleanly in a throwaway root (`dpkg --root` with maintainer scripts honouring
//! DPKG_ROOT), creating the `hybridge` user, its directories with the right owners and modes,
//! and an enabled-but-not-started unit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};

use hybridge_tests::*;

fn run(command: &mut Command) -> Output {
    run_checked(command)
}

/// `name → (uid, gid)` from a root's /etc/passwd.
fn user_in(root: &Path, name: &str) -> (u32, u32) {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no user {name} in {passwd}"));
    let fields: Vec<&str> = line.split(':').collect();
    assert_eq!(fields[6], "/usr/sbin/nologin", "{line}");
    (fields[2].parse().unwrap(), fields[3].parse().unwrap())
}

fn mode_owner(path: &Path) -> (u32, u32, u32) {
    let meta =
        std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.permissions().mode() & 0o7777, meta.uid(), meta.gid())
}

fn dpkg(root: &Path, args: &[&str]) -> Output {
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-depends",
            "--log=/dev/null",
        ])
        .args(args))
}

#[test]
fn the_deb_has_what_an_operator_needs_and_installs_into_a_throwaway_root() {
    let work = tempfile::tempdir().unwrap();
    let deb = build_deb(work.path());

    // Contents: path → mode.
    let listing =
        String::from_utf8(run(Command::new("dpkg-deb").arg("-c").arg(&deb)).stdout).unwrap();
    for (path, mode) in [
        ("./usr/bin/hybridge", "-rwxr-xr-x"),
        ("./usr/bin/hybridge-ca", "-rwxr-xr-x"),
        ("./usr/lib/systemd/system/hybridge.service", "-rw-r--r--"),
        ("./usr/lib/sysusers.d/hybridge.conf", "-rw-r--r--"),
        ("./usr/lib/tmpfiles.d/hybridge.conf", "-rw-r--r--"),
        ("./usr/lib/sysctl.d/60-hybridge.conf", "-rw-r--r--"),
        ("./etc/default/hybridge", "-rw-r--r--"),
        (
            "./usr/share/doc/hybridge/examples/onprem.toml",
            "-rw-r--r--",
        ),
        ("./usr/share/doc/hybridge/examples/cloud.toml", "-rw-r--r--"),
        ("./usr/share/doc/hybridge/examples/acl.toml", "-rw-r--r--"),
        (
            "./usr/share/doc/hybridge/examples/grafana-dashboard.json",
            "-rw-r--r--",
        ),
        ("./usr/share/doc/hybridge/copyright", "-rw-r--r--"),
        // Completions and man pages generated from the clap definitions (cargo-deb gzips
        // man pages, as Debian policy asks).
        (
            "./usr/share/bash-completion/completions/hybridge",
            "-rw-r--r--",
        ),
        (
            "./usr/share/bash-completion/completions/hybridge-ca",
            "-rw-r--r--",
        ),
        ("./usr/share/zsh/vendor-completions/_hybridge", "-rw-r--r--"),
        (
            "./usr/share/zsh/vendor-completions/_hybridge-ca",
            "-rw-r--r--",
        ),
        (
            "./usr/share/fish/vendor_completions.d/hybridge.fish",
            "-rw-r--r--",
        ),
        (
            "./usr/share/fish/vendor_completions.d/hybridge-ca.fish",
            "-rw-r--r--",
        ),
        ("./usr/share/man/man1/hybridge.1.gz", "-rw-r--r--"),
        ("./usr/share/man/man1/hybridge-acl-apply.1.gz", "-rw-r--r--"),
        ("./usr/share/man/man1/hybridge-ca.1.gz", "-rw-r--r--"),
        (
            "./usr/share/man/man1/hybridge-ca-issue-node.1.gz",
            "-rw-r--r--",
        ),
    ] {
        let line = listing
            .lines()
            .find(|l| l.ends_with(&format!(" {path}")))
            .unwrap_or_else(|| panic!("{path} missing from the package:\n{listing}"));
        assert!(line.starts_with(mode), "{path}: {line}");
        assert!(
            line.contains(" 0/0 ") || line.contains(" root/root "),
            "{path} not owned by root: {line}"
        );
    }
    assert!(
        !listing.contains("./etc/hybridge/"),
        "the package must not ship /etc/hybridge contents (a config there would start the unit)"
    );

    // Control data.
    let info = String::from_utf8(run(Command::new("dpkg-deb").arg("-I").arg(&deb)).stdout).unwrap();
    assert!(info.contains("Package: hybridge"), "{info}");
    assert!(
        info.contains("Depends: ") && info.contains("systemd"),
        "{info}"
    );
    for script in ["postinst", "prerm", "postrm"] {
        assert!(info.contains(script), "no {script}: {info}");
    }
    let control = work.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    assert_eq!(
        std::fs::read_to_string(control.join("conffiles"))
            .unwrap()
            .trim(),
        "/etc/default/hybridge"
    );

    // Install into a throwaway root.
    let root = work.path().join("root");
    for dir in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    let deb_arg = deb.to_str().unwrap();
    dpkg(&root, &["-i", deb_arg]);

    let (uid, gid) = user_in(&root, "hybridge");
    assert_ne!(uid, 0);
    assert_eq!(
        mode_owner(&root.join("var/lib/hybridge")),
        (0o750, uid, gid)
    );
    assert_eq!(mode_owner(&root.join("etc/hybridge")), (0o750, 0, gid));
    assert_eq!(mode_owner(&root.join("usr/bin/hybridge")), (0o755, 0, 0));
    assert_eq!(mode_owner(&root.join("usr/bin/hybridge-ca")), (0o755, 0, 0));
    // Enabled (multi-user.target wants it) but not configured, so it does not start.
    let wants = root.join("etc/systemd/system/multi-user.target.wants/hybridge.service");
    assert_eq!(
        std::fs::read_link(&wants).unwrap(),
        Path::new("/usr/lib/systemd/system/hybridge.service")
    );
    let unit =
        std::fs::read_to_string(root.join("usr/lib/systemd/system/hybridge.service")).unwrap();
    assert!(unit.contains("ConditionPathExists=/etc/hybridge/hybridge.toml"));
    assert!(!root.join("etc/hybridge/hybridge.toml").exists());
    // The UDP socket-buffer ceiling the tunnel asks for (it warns at start-up without it).
    let sysctl = std::fs::read_to_string(root.join("usr/lib/sysctl.d/60-hybridge.conf")).unwrap();
    let wanted = hybridge::tunnel::quic::SOCKET_BUFFER.to_string();
    for key in ["net.core.rmem_max", "net.core.wmem_max"] {
        let value = sysctl
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().strip_prefix('='))
            .map(str::trim);
        assert_eq!(value, Some(wanted.as_str()), "{key} in the sysctl drop-in");
    }
    // The installed binary runs.
    let version = run(Command::new(root.join("usr/bin/hybridge")).arg("--version"));
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("hybridge "));
    // Every man page the binaries generate is installed, and bash loads the completion.
    let pages = std::fs::read_dir(root.join("usr/share/man/man1"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("hybridge")
        })
        .count();
    let shipped = std::fs::read_dir(repo_root().join("bridge/debian/man"))
        .unwrap()
        .count();
    assert_eq!(pages, shipped);
    let completion = root.join("usr/share/bash-completion/completions/hybridge");
    let loaded = run(Command::new("bash").arg("-c").arg(format!(
        "source {} && complete -p hybridge",
        completion.display()
    )));
    assert!(
        String::from_utf8_lossy(&loaded.stdout).contains("hybridge"),
        "{loaded:?}"
    );

    // Upgrade (reinstall) keeps the operator's conffile edits and their state.
    let default = root.join("etc/default/hybridge");
    let edited = std::fs::read_to_string(&default).unwrap() + "HYBRIDGE_WORKER_THREADS=2\n";
    std::fs::write(&default, &edited).unwrap();
    std::fs::write(root.join("var/lib/hybridge/hybridge.redb"), b"policy").unwrap();
    dpkg(&root, &["--force-confold", "-i", deb_arg]);
    assert_eq!(std::fs::read_to_string(&default).unwrap(), edited);
    assert!(root.join("var/lib/hybridge/hybridge.redb").exists());
    assert_eq!(
        user_in(&root, "hybridge"),
        (uid, gid),
        "upgrade must reuse the user"
    );

    // Remove keeps configuration and state; purge deletes the state.
    dpkg(&root, &["-r", "hybridge"]);
    assert!(!root.join("usr/bin/hybridge").exists());
    assert!(
        std::fs::symlink_metadata(&wants).is_err(),
        "unit still enabled after remove"
    );
    assert!(default.exists());
    assert!(root.join("var/lib/hybridge/hybridge.redb").exists());
    dpkg(&root, &["--purge", "hybridge"]);
    assert!(!default.exists());
    assert!(!root.join("var/lib/hybridge").exists());
}
