//! `hybridge run` and `hybridge check-config`: the process around a node — systemd
//! notification, signals (SIGHUP reload, SIGTERM/SIGINT drain) and config checking.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

use crate::config::Config;
use crate::node::{self, Node};
use crate::workers::Workers;

fn notify(state: sd_notify::NotifyState<'_>) {
    // Outside systemd NOTIFY_SOCKET is unset and this is a no-op.
    let _ = sd_notify::notify(&[state]);
}

/// Runs a node until SIGTERM/SIGINT, reloading on SIGHUP.
pub async fn run(path: &Path, workers: Arc<Workers>) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let node = Node::start_on(config, workers).await?;
    notify(sd_notify::NotifyState::Ready);
    info!(config = %path.display(), "hybridge running");
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => {
                notify(sd_notify::NotifyState::Reloading);
                match node.reload(path).await {
                    Ok(summary) => info!(%summary, "configuration reloaded"),
                    Err(e) => error!(error = %format!("{e:#}"), "reload refused; the running configuration stays in force"),
                }
                notify(sd_notify::NotifyState::Ready);
            }
        }
    }
    notify(sd_notify::NotifyState::Stopping);
    info!("draining");
    node.shutdown().await;
    Ok(())
}

/// Checks the config and every file it references; returns a short report.
pub fn check_config(path: &Path) -> anyhow::Result<String> {
    let config = Config::load(path)?;
    let material = node::load_tls(&config)?;
    let leaf = material
        .chain
        .first()
        .with_context(|| format!("{} holds no certificate", config.tls.cert.display()))?;
    let not_after = hybridge_ca::inspect::summarize(leaf.as_ref())
        .map_err(|e| {
            anyhow::anyhow!(
                "reading the validity of {}: {}",
                config.tls.cert.display(),
                e.0
            )
        })?
        .not_after;
    let remaining = not_after - time::OffsetDateTime::now_utc();
    if remaining < time::Duration::days(14) {
        anyhow::bail!(
            "node certificate {} expires {} (in {} days); renew it with `hybridge-ca issue node`",
            config.tls.cert.display(),
            not_after,
            remaining.whole_days()
        );
    }
    Ok(format!(
        "{}: ok — node {} ({} exports, {} imports, {} peers), certificate valid for {} more days",
        path.display(),
        material.own_id,
        config.exports.len(),
        config.imports.len() + usize::from(config.gateway.is_some()),
        config.peers.len(),
        remaining.whole_days()
    ))
}
