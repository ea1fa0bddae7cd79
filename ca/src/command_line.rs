//! What the `hybridge` and `hybridge-ca` command lines share beyond clap itself: an invalid
//! value taken from an environment variable is reported naming the variable, and shell
//! completions and man pages are generated from the clap definitions.
//! No subcommand logic lives here.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::error::{ContextKind, ContextValue, ErrorKind};

/// The one-line message for a parse error whose bad value came from an environment variable
/// (clap names only the flag): `error: environment variable HYBRIDGE_X: invalid value ...`.
/// `None` when the value was typed on the command line or the error is about something else.
pub fn env_error_line(
    error: &clap::Error,
    command: &clap::Command,
    args: &[OsString],
) -> Option<String> {
    if !matches!(
        error.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return None;
    }
    let Some(ContextValue::String(invalid_arg)) = error.get(ContextKind::InvalidArg) else {
        return None;
    };
    let long = invalid_arg
        .split_whitespace()
        .next()?
        .strip_prefix("--")?
        .to_owned();
    let typed = args.iter().filter_map(|a| a.to_str()).any(|a| {
        a.strip_prefix("--")
            .is_some_and(|a| a == long || a.starts_with(&format!("{long}=")))
    });
    if typed {
        return None;
    }
    let variable = find_env(command, &long)?;
    let value = std::env::var_os(&variable)?;
    let reason = first_reason(&error.render().to_string());
    Some(format!(
        "error: environment variable {variable}={:?} is invalid for --{long}: {reason}",
        value.to_string_lossy()
    ))
}

/// The reason clap gives after `invalid value 'x' for '--flag <V>': `, or the whole first line.
fn first_reason(rendered: &str) -> String {
    let line = rendered.lines().next().unwrap_or_default();
    let line = line.strip_prefix("error: ").unwrap_or(line);
    match line.split_once(">': ") {
        Some((_, reason)) => reason.to_owned(),
        None => line.to_owned(),
    }
}

/// The environment variable of the argument `--long` anywhere in the command tree.
fn find_env(command: &clap::Command, long: &str) -> Option<String> {
    command
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .map(|v| v.to_string_lossy().into_owned())
        .or_else(|| {
            command
                .get_subcommands()
                .find_map(|sub| find_env(sub, long))
        })
}

/// Writes the completion script of `command` for `shell` to `out`.
pub fn write_completion(
    mut command: clap::Command,
    shell: clap_complete::Shell,
    out: &mut dyn std::io::Write,
) {
    let name = command.get_name().to_owned();
    clap_complete::generate(shell, &mut command, name, out);
}

/// Writes one man page per command and visible subcommand (`NAME.1`, `NAME-SUB.1`, ...) into
/// `dir`, creating it; returns the `*.1` files the folder then holds, sorted.
pub fn write_man_pages(command: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(command, dir)?;
    let mut pages = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "1") {
            pages.push(path);
        }
    }
    pages.sort();
    Ok(pages)
}

/// Every argument of `command` and its subcommands that has no help text, as
/// `command path: --flag`; what the tests of both binaries assert is empty.
pub fn undocumented_arguments(command: &clap::Command) -> Vec<String> {
    let mut command = command.clone();
    command.build();
    let mut missing = Vec::new();
    walk(&command, command.get_name(), &mut missing);
    missing
}

fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
    for arg in command.get_arguments() {
        if arg.is_hide_set() || arg.get_help().is_some() || arg.get_long_help().is_some() {
            continue;
        }
        let name = arg
            .get_long()
            .map(|l| format!("--{l}"))
            .unwrap_or_else(|| arg.get_id().to_string().to_uppercase());
        missing.push(format!("{path}: {name}"));
    }
    for sub in command.get_subcommands() {
        if sub.is_hide_set() {
            continue;
        }
        if sub.get_about().is_none() && sub.get_long_about().is_none() {
            missing.push(format!("{path} {}: (no about)", sub.get_name()));
        }
        walk(sub, &format!("{path} {}", sub.get_name()), missing);
    }
}
