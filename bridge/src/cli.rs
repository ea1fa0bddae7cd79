//! The operator command line: `run`, `reload`, `dev`, `check-config`, `status`, `acl …`.
//!
//! Parses arguments, sets up logging and the runtime, and calls into the library; every
//! failure ends as one line `error: …` naming the file and the step, and a non-zero exit.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, CommandFactory as _, Parser, Subcommand};

use crate::workers::Workers;

#[derive(Parser)]
#[command(
    name = "hybridge",
    version,
    about = "Hybrid-cloud boundary bridge: mTLS QUIC tunnels, service ACLs, HTTP/gRPC forwarding"
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info`, `hybridge=debug`; an invalid one is
    /// an error (exit 2), naming HYBRIDGE_LOG when it came from there.
    #[arg(long, global = true, env = LOG_ENV, default_value = "info", value_name = "FILTER", value_parser = parse_log_filter)]
    log: String,
    /// Log format: `auto` is human-readable on a terminal and JSON lines otherwise.
    #[arg(long, global = true, value_name = "FORMAT", value_parser = ["auto", "json", "text"], default_value = "auto")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

/// The log filter when `--log` is not given.
pub(crate) const LOG_ENV: &str = "HYBRIDGE_LOG";
/// The config file when `--config` is not given.
pub(crate) const CONFIG_ENV: &str = "HYBRIDGE_CONFIG";
/// The config file when neither `--config` nor `HYBRIDGE_CONFIG` names one.
pub(crate) const DEFAULT_CONFIG: &str = "/etc/hybridge/hybridge.toml";

fn parse_log_filter(text: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(text)
        .map(|_| text.to_owned())
        .map_err(|e| format!("not a log filter: {e}"))
}

/// Options of the commands that serve traffic (`run`, `dev`).
#[derive(Args)]
struct ServeArgs {
    /// Worker threads (default: one per CPU), like Envoy's `--concurrency`. Each worker has
    /// its own listeners, tunnel connections and upstream connections, so a request stays
    /// on one thread; the admin API and health checks run on the main thread. One thread
    /// (asked for, or on a one-CPU host) runs everything on the main thread, like one nginx
    /// or HAProxy worker.
    #[arg(long, value_name = "N", env = "HYBRIDGE_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node from its config file (under systemd: Type=notify).
    Run {
        /// The node's config file.
        #[arg(long, short, value_name = "FILE", env = CONFIG_ENV, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Ask the running node to reload its config, certificates, CA bundle and CRL.
    ///
    /// Does what SIGHUP does and waits for the outcome: exits non-zero, with the node's reason, when
    /// the node refused the new configuration; names every change left for a restart.
    /// `systemctl reload hybridge` runs this.
    Reload {
        /// The node's config file: its `admin.socket` is where the node is asked (unless
        /// --admin or HYBRIDGE_ADMIN say otherwise). The node re-reads the file it runs from.
        #[arg(long, short, value_name = "FILE", env = CONFIG_ENV)]
        config: Option<PathBuf>,
        #[command(flatten)]
        admin: crate::admin::client::AdminArgs,
    },
    /// Start a complete demo on loopback: CA, on-prem and cloud node, demo upstreams, sample ACLs.
    Dev {
        /// First port of the block the demo listens on (0 = pick free ports).
        #[arg(long, value_name = "PORT", default_value_t = 18000)]
        base_port: u16,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Check a config file and the files it references with the checks `run` makes.
    ///
    /// Exit code: 0 when `run` would start (warnings, such as a certificate expiring within
    /// 14 days or a port already in use, go to stderr), 1 when it would refuse.
    CheckConfig {
        /// The config file to check.
        #[arg(long, short, value_name = "FILE", env = CONFIG_ENV, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Print the result as JSON (warnings included) on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Show a running node's tunnels, services and policy version.
    ///
    /// Asks through the admin socket by default; the read-only listener
    /// http://127.0.0.1:7180 serves it too. Exit code: 0 ready, 3 not ready, 1 error.
    Status {
        /// The node's config file: its `admin.socket` is where the node is asked (unless
        /// --admin or HYBRIDGE_ADMIN say otherwise).
        #[arg(long, short, value_name = "FILE", env = CONFIG_ENV)]
        config: Option<PathBuf>,
        #[command(flatten)]
        admin: crate::admin::client::AdminArgs,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Manage service ACLs.
    ///
    /// Through the admin socket or the remote admin listener, or directly on a stopped node's
    /// database (`--db`).
    Acl {
        #[command(flatten)]
        target: crate::acl::cli::AclTarget,
        #[command(subcommand)]
        command: crate::acl::cli::AclCommand,
    },
    /// Print a shell completion script for hybridge to stdout.
    ///
    /// E.g. `hybridge completions bash > ~/.local/share/bash-completion/completions/hybridge`;
    /// the .deb installs them for bash, zsh and fish.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages for hybridge and each of its subcommands into DIR.
    Man {
        /// Folder to write hybridge.1, hybridge-acl-apply.1, ... into (created if missing).
        dir: PathBuf,
    },
}

/// Parses the process's arguments; a parse error exits 2 (help and version 0) with clap's
/// message, or with one naming the environment variable the bad value came from.
fn parse() -> Cli {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => {
            if let Some(line) =
                hybridge_ca::command_line::env_error_line(&e, &Cli::command(), &args)
            {
                eprintln!("{line}");
                std::process::exit(2);
            }
            e.exit()
        }
    }
}

/// Entry point of the `hybridge` binary.
pub fn main() -> ExitCode {
    let cli = parse();
    init_logging(&cli.log, &cli.log_format);
    // One thread (asked for, or all a one-CPU host has) runs everything on one current-thread
    // runtime, like one nginx or HAProxy worker. More run a node as that many workers, each
    // a current-thread runtime of its own (see `workers`), with the control plane on the
    // main thread: a work-stealing runtime paid 2–4 cross-thread wake-ups per request per
    // node and served 18% fewer small requests than one thread in bench/run.
    let serve = match &cli.command {
        Command::Run { serve, .. } | Command::Dev { serve, .. } => Some(serve),
        _ => None,
    };
    let threads = serve.map_or(1, |serve| {
        serve
            .worker_threads
            .map_or_else(crate::workers::cpus, usize::from)
    });
    let workers = if threads > 1 {
        Workers::spawn(threads)
    } else {
        Ok(Workers::inline())
    };
    let runtime = workers.and_then(|workers| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok((runtime, Arc::new(workers)))
    });
    let (runtime, workers) = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A script reads `acl check`'s exit code as the decision, so its errors are 2, not 1.
    let error_code = match &cli.command {
        Command::Acl {
            command: crate::acl::cli::AclCommand::Check { .. },
            ..
        } => crate::acl::cli::EXIT_CHECK_ERROR,
        _ => 1,
    };
    let result = runtime.block_on(dispatch(cli.command, workers.clone()));
    drop(runtime);
    workers.stop();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(error_code)
        }
    }
}

/// Exit code of `hybridge status` when the node answers but is not ready (like `systemctl
/// status` for a unit that is not running); 1 is an error, such as an unreachable node.
pub(crate) const EXIT_NOT_READY: u8 = 3;

/// Runs the command; `Ok` carries its exit code (0, or a documented negative result).
async fn dispatch(command: Command, workers: Arc<Workers>) -> anyhow::Result<u8> {
    match command {
        Command::Run { config, .. } => crate::daemon::run(&config, workers).await,
        Command::Dev { base_port, .. } => crate::dev::run(base_port, workers).await,
        Command::Reload { config, admin } => {
            let report = crate::daemon::reload(&admin, config.as_deref()).await?;
            println!("{report}");
            Ok(0)
        }
        Command::CheckConfig { config, json } => {
            crate::daemon::check_config_command(&config, json).await
        }
        Command::Status {
            config,
            admin,
            json,
        } => status(&admin, config.as_deref(), json).await,
        Command::Acl { target, command } => crate::acl::cli::run(target, command).await,
        Command::Completions { shell } => {
            hybridge_ca::command_line::write_completion(
                Cli::command(),
                shell,
                &mut std::io::stdout(),
            );
            Ok(0)
        }
        Command::Man { dir } => {
            let pages = hybridge_ca::command_line::write_man_pages(Cli::command(), &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
            println!("wrote {} man page(s) into {}", pages.len(), dir.display());
            Ok(0)
        }
    }
}

fn init_logging(filter: &str, format: &str) {
    // Checked by clap (`parse_log_filter`): an invalid filter never gets here.
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match format {
        "json" => true,
        "text" => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

async fn status(
    admin: &crate::admin::client::AdminArgs,
    config: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<u8> {
    let (admin, _) = crate::daemon::admin_of_config(admin, config);
    let client = admin.client()?;
    let body = client.get("/v1/status").await?;
    let doc: serde_json::Value = serde_json::from_slice(&body)
        .with_context(|| format!("{}/v1/status did not return JSON", client.endpoint()))?;
    let status: crate::admin::document::StatusDocument = serde_json::from_value(doc.clone())
        .with_context(|| format!("{}/v1/status is not a status document", client.endpoint()))?;
    if json {
        // The node's JSON as it sent it, fields this build does not know included.
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", crate::admin::client::render_status(&status));
    }
    Ok(if status.ready { 0 } else { EXIT_NOT_READY })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_argument_and_subcommand_has_help() {
        let missing = hybridge_ca::command_line::undocumented_arguments(&Cli::command());
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }

    /// Each subcommand shows only the flags that apply to it: worker threads only where the
    /// node serves, the admin and database targets only where a node is asked.
    #[test]
    fn subcommands_show_only_their_flags() {
        let mut command = Cli::command();
        command.build();
        let flags = |path: &[&str]| -> Vec<String> {
            let mut cmd = &command;
            for name in path {
                cmd = cmd
                    .find_subcommand(name)
                    .unwrap_or_else(|| panic!("{name}"));
            }
            cmd.get_arguments()
                .filter(|a| !a.is_hide_set())
                .filter_map(|a| a.get_long().map(str::to_owned))
                .collect()
        };
        for path in [&["run"][..], &["dev"]] {
            assert!(
                flags(path).contains(&"worker-threads".to_owned()),
                "{path:?}"
            );
        }
        for path in [
            &["acl", "list"][..],
            &["acl", "apply"],
            &["acl", "check"],
            &["status"],
            &["check-config"],
            &["reload"],
            &["completions"],
        ] {
            let shown = flags(path);
            assert!(
                !shown.contains(&"worker-threads".to_owned()),
                "{path:?}: {shown:?}"
            );
        }
        for path in [&["run"][..], &["check-config"], &["dev"], &["completions"]] {
            let shown = flags(path);
            assert!(
                !shown.contains(&"admin".to_owned()) && !shown.contains(&"db".to_owned()),
                "{path:?}: {shown:?}"
            );
        }
        // The policy file's words are the flags' words; the old ones still parse, unshown.
        let add = flags(&["acl", "add"]);
        for flag in ["source", "source-site", "destination"] {
            assert!(add.contains(&flag.to_owned()), "{add:?}");
        }
        for flag in ["from", "to", "from-site"] {
            assert!(!add.contains(&flag.to_owned()), "{add:?}");
        }
    }
}
