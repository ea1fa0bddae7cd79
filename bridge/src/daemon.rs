//! `hybridge run`, `hybridge reload` and `hybridge check-config`: the process around a node —
//! systemd notification, signals (SIGHUP reload, SIGTERM/SIGINT drain, a second one exits),
//! asking a running node to reload and waiting for its answer, and the checks `run` makes
//! before it starts, which `check-config` shares.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use hybridge_ca::tls::TlsMaterial;
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
/// outcome itself, as it does for `hybridge reload`). A second SIGTERM/SIGINT while the node
/// drains ends the process at once, with 128 + the signal's number (130 for Ctrl-C), like a
/// shell's child killed by it: the operator asked twice, so requests still in flight are cut.
/// `Ok` is the exit code.
///
/// systemd hears `READY=1` once the node is ready (`NodeState::readiness`: a listening node as
/// soon as its listeners are bound, a dialling node once every peer site has a tunnel), or
/// after `limits.ready_timeout` if it is not ready by then, with `STATUS=` saying what is
/// missing: a WAN outage at boot must neither fail the start nor restart the service in a loop.
pub(crate) async fn run(path: &Path, workers: Arc<Workers>) -> anyhow::Result<u8> {
    let config = Config::load(path)?;
    // Its warnings are `check-config`'s business: the node reports a stale CRL itself, and
    // status and metrics show the certificate's end.
    preflight(&config).await?;
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
    let signal_number = tokio::select! {
        () = node.shutdown() => return Ok(0),
        _ = terminate.recv() => libc::SIGTERM,
        _ = interrupt.recv() => libc::SIGINT,
    };
    exit_on_second_signal(signal_number)
}

/// Ends the process now (no destructor waits on requests still in flight), logging why.
pub(crate) fn exit_on_second_signal(signal_number: i32) -> ! {
    let code = 128 + signal_number;
    warn!(
        signal = signal_number,
        exit_code = code,
        "second stop signal while draining: exiting now, requests still in flight are cut"
    );
    std::process::exit(code)
}

/// Days before a certificate's end from which `check-config` warns (and still exits 0): a
/// replacement instance must boot while its certificate is being renewed.
pub(crate) const EXPIRY_WARNING_DAYS: i64 = 14;

/// What the checks `run` makes before it starts found, besides errors.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ConfigCheck {
    /// The config file.
    pub(crate) config: String,
    /// The node's SPIFFE id, from its certificate.
    pub(crate) node: String,
    pub(crate) exports: usize,
    /// Import listeners, the gateway counted as one.
    pub(crate) imports: usize,
    pub(crate) peers: usize,
    /// End of the node certificate (RFC 3339) and whole days left until then.
    pub(crate) certificate_not_after: String,
    pub(crate) certificate_days_left: i64,
    /// Things that do not stop `run` but need the operator: a certificate expiring soon, a
    /// stale CRL it still applies, a port something already holds.
    pub(crate) warnings: Vec<String>,
}

/// The checks `run` makes before it starts a node; `check-config` makes exactly these and adds
/// warnings of its own ([`check_config`]). The config is already parsed and validated
/// (`Config::load`, upstream settings included); this loads the TLS material as the node
/// does (the key matches, the certificate chains to the CA, is in date and names this node)
/// and resolves every upstream endpoint as the upstreams do at start.
pub(crate) async fn preflight(config: &Config) -> anyhow::Result<ConfigCheck> {
    let material = node::load_tls(config)?;
    resolve_upstream_endpoints(config).await?;
    let not_after = certificate_not_after(config, &material)?;
    let now = time::OffsetDateTime::now_utc();
    let remaining = not_after - now;
    let mut warnings = Vec::new();
    if remaining < time::Duration::days(EXPIRY_WARNING_DAYS) {
        warnings.push(format!(
            "node certificate {} expires {} (in {} days); renew it with `hybridge-ca issue node` and reload",
            config.tls.cert.display(),
            not_after,
            remaining.whole_days()
        ));
    }
    warnings.extend(stale_crl_warnings(config, &material, now)?);
    Ok(ConfigCheck {
        config: config.source.display().to_string(),
        node: material.own_id.to_string(),
        exports: config.exports.len(),
        imports: config.imports.len() + usize::from(config.gateway.is_some()),
        peers: config.peers.len(),
        certificate_not_after: not_after
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| not_after.to_string()),
        certificate_days_left: remaining.whole_days(),
        warnings,
    })
}

/// Resolves every upstream endpoint of every export, each within 10 s, as the upstreams do at
/// start; the first that does not resolve to at least one address is the error.
async fn resolve_upstream_endpoints(config: &Config) -> anyhow::Result<()> {
    for export in &config.exports {
        for endpoint in &export.upstream.endpoints {
            let resolved = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                tokio::net::lookup_host(endpoint.as_str()),
            )
            .await
            .map_err(|_| anyhow::anyhow!("DNS lookup timed out"))
            .and_then(|r| r.map_err(anyhow::Error::from))
            .and_then(|mut addrs| {
                addrs
                    .next()
                    .map(|_| ())
                    .ok_or_else(|| anyhow::anyhow!("no address"))
            });
            resolved.with_context(|| {
                format!(
                    "{}: export `{}`: upstream endpoint {endpoint:?} did not resolve",
                    config.source.display(),
                    export.name
                )
            })?;
        }
    }
    Ok(())
}

/// When the node's own certificate (the first of `tls.cert`) stops being valid.
fn certificate_not_after(
    config: &Config,
    material: &TlsMaterial,
) -> anyhow::Result<time::OffsetDateTime> {
    let leaf = material
        .chain
        .first()
        .with_context(|| format!("{} holds no certificate", config.tls.cert.display()))?;
    Ok(hybridge_ca::inspect::summarize(leaf.as_ref())
        .map_err(|e| {
            anyhow::anyhow!(
                "reading the validity of {}: {}",
                config.tls.cert.display(),
                e.0
            )
        })?
        .not_after)
}

/// A warning for every CRL past its nextUpdate at `now`, or an error when `tls.crl_stale =
/// "refuse"` would make the node refuse every peer for it.
fn stale_crl_warnings(
    config: &Config,
    material: &TlsMaterial,
    now: time::OffsetDateTime,
) -> anyhow::Result<Vec<String>> {
    let mut warnings = Vec::new();
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
            warnings.push(format!(
                "{stale} (tls.crl_stale = \"warn\": still applied; issue a current one with `hybridge-ca crl`)"
            ));
        }
    }
    Ok(warnings)
}

/// `hybridge check-config`: the checks of [`preflight`], plus a warning for every address the
/// node would listen on that something already holds (the node itself, when it runs: so a
/// warning, not an error).
pub(crate) async fn check_config(path: &Path) -> anyhow::Result<ConfigCheck> {
    let config = Config::load(path)?;
    let mut checked = preflight(&config).await?;
    checked.warnings.extend(ports_in_use(&config));
    Ok(checked)
}

/// Runs `check-config` and prints its result; `Ok` is the exit code (0 `run` would start, with
/// warnings on stderr; 1 it would not, the reason on stderr and, with `--json`, on stdout).
pub(crate) async fn check_config_command(path: &Path, json: bool) -> anyhow::Result<u8> {
    match check_config(path).await {
        Ok(checked) => {
            for warning in &checked.warnings {
                eprintln!("warning: {warning}");
            }
            if json {
                let mut doc = serde_json::to_value(&checked)?;
                doc["ok"] = serde_json::Value::Bool(true);
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                println!(
                    "{}: ok — node {} ({} exports, {} imports, {} peers), certificate valid for {} more days{}",
                    checked.config,
                    checked.node,
                    checked.exports,
                    checked.imports,
                    checked.peers,
                    checked.certificate_days_left,
                    match checked.warnings.len() {
                        0 => String::new(),
                        n => format!(", {n} warning(s)"),
                    }
                );
            }
            Ok(0)
        }
        Err(error) if json => {
            let doc = serde_json::json!({
                "ok": false,
                "config": path.display().to_string(),
                "error": format!("{error:#}"),
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
            eprintln!("error: {error:#}");
            Ok(1)
        }
        Err(error) => Err(error),
    }
}

/// A warning for each address of `config` that cannot be bound now (port 0 is never taken).
fn ports_in_use(config: &Config) -> Vec<String> {
    let mut tcp: Vec<(String, std::net::SocketAddr)> = Vec::new();
    for import in &config.imports {
        tcp.push((format!("import `{}`", import.service), import.listen));
    }
    if let Some(gateway) = &config.gateway {
        tcp.push(("gateway".into(), gateway.listen));
    }
    tcp.push(("admin.listen".into(), config.admin.listen));
    if let Some(health) = config.admin.health_listen {
        tcp.push(("admin.health_listen".into(), health));
    }
    if let Some(remote) = &config.admin.remote {
        tcp.push(("admin.remote.listen".into(), remote.listen));
    }
    let mut warnings = Vec::new();
    let taken = |what: &str, addr: std::net::SocketAddr, protocol: &str, e: std::io::Error| {
        format!(
            "{what}: {protocol} {addr} is not free ({e}): `run` would fail to bind it, unless it is this node's own, running"
        )
    };
    for (what, addr) in tcp.into_iter().filter(|(_, a)| a.port() != 0) {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            warnings.push(taken(&what, addr, "TCP", e));
        }
    }
    if let Some(listen) = config.tunnel.listen.filter(|a| a.port() != 0)
        && let Err(e) = std::net::UdpSocket::bind(listen)
    {
        warnings.push(taken("tunnel.listen", listen, "UDP", e));
    }
    warnings
}

/// `hybridge reload`: asks the running node to reload its configuration file (the same reload
/// as SIGHUP) and waits for the outcome. `Ok` is the report to print, naming any field left
/// for a restart; a refused configuration is an error carrying the node's reason (file, line
/// and field), so `systemctl reload` fails when the node did not take the new config.
///
/// The node is reached at `--admin`, else `$HYBRIDGE_ADMIN`, else the `admin.socket` that
/// `config` names, else the default socket.
pub(crate) async fn reload(
    admin: &crate::admin::client::AdminArgs,
    config: Option<&Path>,
) -> anyhow::Result<String> {
    let (admin, socket_note) = admin_of_config(admin, config);
    let client = admin.client()?;
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

/// `admin` with the admin socket `config` names filled in, when neither `--admin` nor
/// `HYBRIDGE_ADMIN` says where the node is; and, when the file could not be read, why (for
/// the message of a failed connection).
pub(crate) fn admin_of_config(
    admin: &crate::admin::client::AdminArgs,
    config: Option<&Path>,
) -> (crate::admin::client::AdminArgs, Option<String>) {
    use crate::admin::client::{ADMIN_ENV, AdminEndpoint};
    let mut admin = admin.clone();
    let mut socket_note = None;
    if admin.admin.is_empty()
        && std::env::var_os(ADMIN_ENV).is_none_or(|v| v.is_empty())
        && let Some(config) = config
    {
        match admin_socket_in(config) {
            Ok(socket) => admin.admin = vec![AdminEndpoint::Unix(socket)],
            Err(why) => socket_note = Some(why),
        }
    }
    (admin, socket_note)
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
