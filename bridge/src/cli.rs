//! The operator command line: `run`, `reload`, `dev`, `check-config`, `status`, `acl …`.
//!
//! Parses arguments, sets up logging and the runtime, and calls into the library; every
//! failure ends as one line `error: …` naming the file and the step, and a non-zero exit.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::workers::Workers;

#[derive(Parser)]
#[command(
    name = "hybridge",
    version,
    about = "Hybrid-cloud boundary bridge: mTLS QUIC tunnels, service ACLs, HTTP/gRPC forwarding"
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info`, `hybridge=debug`.
    #[arg(long, global = true, env = "HYBRIDGE_LOG", default_value = "info")]
    log: String,
    /// Log format: `auto` is human-readable on a terminal and JSON lines otherwise.
    #[arg(long, global = true, value_parser = ["auto", "json", "text"], default_value = "auto")]
    log_format: String,
    /// Worker threads (default: one per CPU), like Envoy's `--concurrency`. Each worker has
    /// its own listeners, tunnel connections and upstream connections, so a request stays
    /// on one thread; the admin API and health checks run on the main thread. One thread
    /// (asked for, or on a one-CPU host) runs everything on the main thread, like one nginx
    /// or HAProxy worker.
    #[arg(long, global = true, env = "HYBRIDGE_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node from its config file (under systemd: Type=notify).
    Run {
        #[arg(long, short, default_value = "/etc/hybridge/hybridge.toml")]
        config: PathBuf,
    },
    /// Ask the running node to reload its configuration file, certificates, CA bundle and CRL
    /// (as SIGHUP does) and wait for the outcome: exits non-zero, with the node's reason, when
    /// the node refused the new configuration; names every change left for a restart.
    /// `systemctl reload hybridge` runs this.
    Reload {
        /// The node's config file: its `admin.socket` is where the node is asked (unless
        /// --admin or HYBRIDGE_ADMIN say otherwise). The node re-reads the file it runs from.
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[command(flatten)]
        admin: crate::admin::client::AdminArgs,
    },
    /// Start a complete demo on loopback: CA, on-prem and cloud node, demo upstreams, sample ACLs.
    Dev {
        /// First port of the block the demo listens on (0 = pick free ports).
        #[arg(long, default_value_t = 18000)]
        base_port: u16,
    },
    /// Check a config file and the files it references, then exit.
    CheckConfig {
        #[arg(long, short, default_value = "/etc/hybridge/hybridge.toml")]
        config: PathBuf,
    },
    /// Show a running node's tunnels, services and policy version (through the admin socket by
    /// default; the read-only listener http://127.0.0.1:7180 serves it too).
    Status {
        #[command(flatten)]
        admin: crate::admin::client::AdminArgs,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Manage service ACLs (through the admin socket or the remote admin listener, or directly
    /// on a stopped node's database).
    Acl {
        #[command(flatten)]
        target: crate::acl::cli::AclTarget,
        #[command(subcommand)]
        command: crate::acl::cli::AclCommand,
    },
}

/// Entry point of the `hybridge` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, &cli.log_format);
    // One thread (asked for, or all a one-CPU host has) runs everything on one current-thread
    // runtime, like one nginx or HAProxy worker. More run a node as that many workers, each
    // a current-thread runtime of its own (see `workers`), with the control plane on the
    // main thread: a work-stealing runtime paid 2–4 cross-thread wake-ups per request per
    // node and served 18% fewer small requests than one thread in bench/run.
    let threads = cli.worker_threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        usize::from,
    );
    let serves = matches!(cli.command, Command::Run { .. } | Command::Dev { .. });
    let workers = if serves && threads > 1 {
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
pub const EXIT_NOT_READY: u8 = 3;

/// Runs the command; `Ok` carries its exit code (0, or a documented negative result).
async fn dispatch(command: Command, workers: Arc<Workers>) -> anyhow::Result<u8> {
    match command {
        Command::Run { config } => crate::daemon::run(&config, workers).await.map(|()| 0),
        Command::Dev { base_port } => crate::dev::run(base_port, workers).await.map(|()| 0),
        Command::Reload { config, admin } => {
            let report = crate::daemon::reload(&admin, config.as_deref()).await?;
            println!("{report}");
            Ok(0)
        }
        Command::CheckConfig { config } => {
            let report = crate::daemon::check_config(&config)?;
            println!("{report}");
            Ok(0)
        }
        Command::Status { admin, json } => status(&admin, json).await,
        Command::Acl { target, command } => crate::acl::cli::run(target, command).await,
    }
}

fn init_logging(filter: &str, format: &str) {
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

async fn status(admin: &crate::admin::client::AdminArgs, json: bool) -> anyhow::Result<u8> {
    let client = admin.client()?;
    let body = client.get("/v1/status").await?;
    let doc: serde_json::Value = serde_json::from_slice(&body)
        .with_context(|| format!("{}/v1/status did not return JSON", client.endpoint()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", crate::admin::client::render_status(&doc));
    }
    let ready = doc["ready"].as_bool() == Some(true);
    Ok(if ready { 0 } else { EXIT_NOT_READY })
}
