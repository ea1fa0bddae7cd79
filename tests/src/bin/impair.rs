//! `impair`: the impairment harness for scripts (`bench/run --impair`). Starts a link or a
//! balancer, prints one JSON line once it is ready (names and addresses), takes commands on
//! stdin (see `hybridge_tests::impair::control`), and removes everything on SIGTERM or
//! SIGINT.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use hybridge_tests::impair::{
    Balancer, BalancerOptions, Direction, HealthMode, Impairment, Link, LinkOptions, control,
};
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(about = "Impaired links and flow-hashing balancers between network namespaces")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Two namespaces joined by an impaired link (needs root).
    Link(Box<LinkArgs>),
    /// A flow-hashing UDP+TCP balancer, optionally inside a namespace.
    Balancer(BalancerArgs),
}

#[derive(Parser)]
struct LinkArgs {
    /// Part of the namespace names.
    #[arg(long, default_value = "impair")]
    name: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Impairment both ways, e.g. `loss=2%,delay=50ms,jitter=5ms,rate=100mbit`.
    #[arg(long, default_value = "clean")]
    impair: Impairment,
    /// Replaces `--impair` from A to B.
    #[arg(long)]
    a_to_b: Option<Impairment>,
    /// Replaces `--impair` from B to A.
    #[arg(long)]
    b_to_a: Option<Impairment>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Health {
    SkipDown,
    Ignore,
}

#[derive(Parser)]
struct BalancerArgs {
    /// UDP and TCP listen address; port 0 picks one free for both.
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long = "backend", required = true)]
    backends: Vec<SocketAddr>,
    /// Run inside this network namespace (`ip netns` name).
    #[arg(long)]
    netns: Option<String>,
    #[arg(long, value_enum, default_value = "skip-down")]
    health: Health,
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    udp_idle_timeout: Duration,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Link(args) => {
            let link = Link::start(LinkOptions {
                seed: args.seed,
                impairment: args.impair.clone(),
                ..LinkOptions::new(&args.name)
            })?;
            if let Some(profile) = args.a_to_b {
                link.set_direction(Direction::AtoB, profile);
            }
            if let Some(profile) = args.b_to_a {
                link.set_direction(Direction::BtoA, profile);
            }
            let mut ready = link.describe();
            ready["ready"] = json!("link");
            ready["impairment"] = control::link_state(&link);
            serve(ready, |line| control::link_command(&link, line)).await
        }
        Command::Balancer(args) => {
            let backends = args.backends.len();
            let balancer = Balancer::start(BalancerOptions {
                namespace: args.netns,
                health: match args.health {
                    Health::SkipDown => HealthMode::SkipDown,
                    Health::Ignore => HealthMode::Ignore,
                },
                udp_idle_timeout: args.udp_idle_timeout,
                seed: args.seed,
                ..BalancerOptions::new(args.listen, &args.backends)
            })?;
            let ready = json!({ "ready": "balancer", "listen": balancer.local_addr().to_string() });
            serve(ready, |line| {
                control::balancer_command(&balancer, backends, line)
            })
            .await
        }
    }
}

/// Prints `ready`, then answers stdin commands until SIGTERM or SIGINT (a closed stdin only
/// ends the commands).
async fn serve(ready: Value, mut command: impl FnMut(&str) -> Value) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if lines_tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    println!("{ready}");
    let mut stdin_open = true;
    loop {
        tokio::select! {
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
            line = lines.recv(), if stdin_open => match line {
                Some(line) if line.trim().is_empty() => {}
                Some(line) => println!("{}", command(line.trim())),
                None => stdin_open = false,
            },
        }
    }
}
