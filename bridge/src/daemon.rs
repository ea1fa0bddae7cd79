//! `hybridge run`, `hybridge reload` and `hybridge check-config`: the process around a node —
//! systemd notification, signals (SIGHUP reload, SIGTERM/SIGINT drain), asking a running node
//! to reload and waiting for its answer, and config checking.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::config::Config;
use crate::node::{self, Node};
use crate::workers::Workers;

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    // Outside systemd NOTIFY_SOCKET is unset and this is a no-op.
    let _ = sd_notify::notify(states);
}

/// Runs a node until SIGTERM/SIGINT, reloading on SIGHUP (the reload tells systemd and logs its
/// outcome itself, as it does for `hybridge reload`).
///
/// systemd hears `READY=1` once the node is ready (`NodeState::readiness`: a listening node as
/// soon as its listeners are bound, a dialling node once every peer site has a tunnel), or
/// after `limits.ready_timeout` if it is not ready by then, with `STATUS=` saying what is
/// missing: a WAN outage at boot must neither fail the start nor restart the service in a loop.
pub async fn run(path: &Path, workers: Arc<Workers>) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let ready_timeout = config.limits.ready_timeout;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let node = Node::start_on(config, workers).await?;
    info!(config = %path.display(), "hybridge running");
    let state = node.state.clone();
    let ready = || state.readiness();
    let became_ready = state.peers.wait_until(|_| ready().is_ready());
    tokio::pin!(became_ready);
    let mut waiting = !ready().is_ready();
    let mut stopping = false;
    if waiting {
        let status = format!("starting, not ready: {}", ready().summary());
        notify(&[sd_notify::NotifyState::Status(&status)]);
        let bound = tokio::time::sleep(ready_timeout);
        tokio::select! {
            () = &mut became_ready => waiting = false,
            () = bound => {}
            _ = terminate.recv() => stopping = true,
            _ = interrupt.recv() => stopping = true,
        }
    }
    if !stopping {
        if waiting {
            let summary = ready().summary();
            let status = format!("running, not ready: {summary}");
            notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(&status),
            ]);
            warn!(waited = ?ready_timeout, reason = %summary, "not ready within limits.ready_timeout; told systemd READY=1 anyway");
        } else {
            notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status("running, ready"),
            ]);
            info!("ready");
        }
    }
    while !stopping {
        tokio::select! {
            _ = terminate.recv() => stopping = true,
            _ = interrupt.recv() => stopping = true,
            _ = hangup.recv() => {
                // Refused or not, the outcome is logged by the reload; nothing more to do.
                let _ = node.reload("SIGHUP").await;
            }
            () = &mut became_ready, if waiting => {
                waiting = false;
                notify(&[sd_notify::NotifyState::Status("running, ready")]);
                info!("ready");
            }
        }
    }
    notify(&[sd_notify::NotifyState::Stopping]);
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
    let mut stale_crls = String::new();
    let now = time::OffsetDateTime::now_utc();
    for (i, der) in material.crls.iter().enumerate() {
        let crl = hybridge_ca::inspect::summarize_crl(der.as_ref())
            .map_err(|e| anyhow::anyhow!("CRL #{} of {:?}: {e}", i + 1, config.tls.crl))?;
        if let Some(left) = crl
            .seconds_to_next_update(now)
            .filter(|_| crl.is_stale(now))
        {
            let crl_file = config
                .tls
                .crl
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let stale = format!(
                "CRL #{} of {crl_file} is past its nextUpdate by {}s",
                i + 1,
                left.saturating_neg()
            );
            if config.tls.crl_stale == crate::config::CrlStale::Refuse {
                anyhow::bail!(
                    "{stale} and tls.crl_stale = \"refuse\" would refuse every peer; issue a current one with `hybridge-ca crl`"
                );
            }
            stale_crls += &format!(
                "; warning: {stale} (tls.crl_stale = \"warn\": still applied; issue a current one with `hybridge-ca crl`)"
            );
        }
    }
    Ok(format!(
        "{}: ok — node {} ({} exports, {} imports, {} peers), certificate valid for {} more days{stale_crls}",
        path.display(),
        material.own_id,
        config.exports.len(),
        config.imports.len() + usize::from(config.gateway.is_some()),
        config.peers.len(),
        remaining.whole_days()
    ))
}

/// `hybridge reload`: asks the running node to reload its configuration file (the same reload
/// as SIGHUP) and waits for the outcome. `Ok` is the report to print, naming any field left
/// for a restart; a refused configuration is an error carrying the node's reason (file, line
/// and field), so `systemctl reload` fails when the node did not take the new config.
///
/// The node is reached at `--admin`, else `$HYBRIDGE_ADMIN`, else the `admin.socket` that
/// `config` names, else the default socket.
pub async fn reload(
    admin: &crate::admin::client::AdminArgs,
    config: Option<&Path>,
) -> anyhow::Result<String> {
    use crate::admin::client::{ADMIN_ENV, AdminArgs, AdminEndpoint};
    let mut admin = admin.clone();
    // Why the socket could not be taken from `config`, for a failed connection's message.
    let mut socket_note = None;
    if admin.admin.is_none()
        && std::env::var_os(ADMIN_ENV).is_none_or(|v| v.is_empty())
        && let Some(config) = config
    {
        match admin_socket_in(config) {
            Ok(socket) => admin.admin = Some(AdminEndpoint::Unix(socket)),
            Err(why) => socket_note = Some(why),
        }
    }
    let client = AdminArgs::client(&admin)?;
    let response = client
        .request(http::Method::POST, "/v1/reload", None)
        .await
        .map_err(|e| match &socket_note {
            Some(why) => e.context(format!("asking the node to reload ({why})")),
            None => e.context("asking the node to reload"),
        })?;
    if !response.status.is_success() {
        anyhow::bail!(
            "the node refused the reload; the running configuration stays in force: {}",
            response.message()
        );
    }
    let report: crate::node::ReloadReport = serde_json::from_slice(&response.body)
        .with_context(|| format!("decoding the answer of {}/v1/reload", client.endpoint()))?;
    let mut out = format!("reloaded {}: {}", report.config, report.summary);
    if !report.applied.is_empty() {
        out += &format!("\napplied: {}", report.applied.join(", "));
    }
    if !report.needs_restart.is_empty() {
        out += &format!(
            "\nnot applied, running values kept until a restart (systemctl restart hybridge): {}",
            report.not_applied()
        );
    }
    Ok(out)
}

/// The admin socket a config file names (`admin.socket`, relative to the file's folder), or
/// the default; read leniently, since the file may be the broken one the node will refuse.
fn admin_socket_in(config: &Path) -> Result<std::path::PathBuf, String> {
    let text = std::fs::read_to_string(config)
        .map_err(|e| format!("admin.socket not read from {}: {e}", config.display()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        format!(
            "admin.socket not read from {}: {}",
            config.display(),
            e.message().trim_end()
        )
    })?;
    let socket = table
        .get("admin")
        .and_then(|admin| admin.get("socket"))
        .and_then(toml::Value::as_str)
        .map_or_else(
            || std::path::PathBuf::from(crate::config::DEFAULT_ADMIN_SOCKET),
            std::path::PathBuf::from,
        );
    Ok(if socket.is_absolute() {
        socket
    } else {
        config
            .parent()
            .map(|dir| dir.join(&socket))
            .unwrap_or(socket)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reload_command_finds_the_socket_the_config_names() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("hybridge.toml");
        let socket_of = |text: &str| {
            std::fs::write(&config, text).unwrap();
            admin_socket_in(&config)
        };
        assert_eq!(
            socket_of("[admin]\nsocket = \"/run/x/admin.sock\"\n"),
            Ok("/run/x/admin.sock".into())
        );
        assert_eq!(
            socket_of("[admin]\nsocket = \"run/admin.sock\"\n"),
            Ok(dir.path().join("run/admin.sock"))
        );
        // A file the node would refuse for other reasons still names its socket.
        assert_eq!(
            socket_of("[node]\nname = 3\n[admin]\nlisten_typo = 1\nsocket = \"/s.sock\"\n"),
            Ok("/s.sock".into())
        );
        assert_eq!(
            socket_of("[node]\n"),
            Ok(crate::config::DEFAULT_ADMIN_SOCKET.into())
        );
        let unparsable = socket_of("[admin\n").unwrap_err();
        assert!(
            unparsable.starts_with(&format!(
                "admin.socket not read from {}: ",
                config.display()
            )),
            "{unparsable}"
        );
    }
}
