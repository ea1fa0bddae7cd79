//! The `hybridge` command line as an operator meets it: help, and one clear line naming
//! the file, line and field for a broken config.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn hybridge(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hybridge"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_lists_every_command() {
    let (code, stdout, _) = hybridge(&["--help"]);
    assert_eq!(code, 0);
    for command in ["run", "dev", "check-config", "status", "acl"] {
        assert!(
            stdout.contains(command),
            "{command} missing from:\n{stdout}"
        );
    }
}

#[test]
fn a_broken_config_is_one_line_naming_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hybridge.toml");
    std::fs::write(&path, "[node]\nname = \"a\"\nsite = \"onprem\"\ntrust_domain = \"td\"\ndata_dir = \"/tmp/x\"\nlisten_port = 5\n").unwrap();
    let (code, _, stderr) = hybridge(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "error: {}:6: unknown field `listen_port`",
            path.display()
        )),
        "{stderr}"
    );

    let (code, _, stderr) = hybridge(&["run", "--config", "/nonexistent/hybridge.toml"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("/nonexistent/hybridge.toml: cannot read config"),
        "{stderr}"
    );
}
