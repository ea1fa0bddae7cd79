//! Applying a reload to a running node: re-read the config file and TLS material, classify
//! the changes (`config::reload::diff`), build everything new, then swap it in.
//!
//! One reload runs at a time and always to completion, whoever asked (SIGHUP, or
//! `POST /v1/reload` from `hybridge reload`, which `systemctl reload` runs). It never stops
//! listeners or tunnels: what cannot change live keeps its running value and is named.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use hybridge_ca::tls::TlsMaterial;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{
    NodeState, admin_remote_tls, count_configured_services, escaped_slashes_by_export,
    import_tls_config, listener_settings, load_tls, peer_client_config,
};
use crate::config::Config;
use crate::http::import::{ListenerSettings, ListenerSpec};
use crate::trust::Trust;
use crate::tunnel::control::ControlMessage;
use crate::tunnel::quic::{self, TransportTuning};
use crate::upstream::Upstream;

/// What a reload did, as `POST /v1/reload` answers it and `hybridge reload` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// The file re-read.
    pub(crate) config: String,
    /// Changed fields now in force, e.g. `limits.max_header_bytes`.
    pub(crate) applied: Vec<String>,
    /// Changed fields not applied: their running value stays until a restart.
    pub(crate) needs_restart: Vec<String>,
    /// Exports whose upstream was started anew (added or changed).
    pub(crate) upstreams_restarted: Vec<String>,
    /// One line for people: what was re-read and swapped.
    pub(crate) summary: String,
}

impl ReloadReport {
    /// `tunnel.keepalive (needs a restart), …`: the ignored fields as the log line and
    /// `hybridge reload` name them.
    pub(crate) fn not_applied(&self) -> String {
        self.needs_restart
            .iter()
            .map(|field| format!("{field} (needs a restart)"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A reload asked for over the admin API.
pub(crate) struct ReloadRequest {
    /// Who asked, for the log line (`uid:1000(alice)`, `spiffe://TD/admin/alice`).
    pub(crate) by: String,
    pub(crate) reply: tokio::sync::oneshot::Sender<Result<ReloadReport, String>>,
}

/// Everything built at start that a reload swaps.
pub(crate) struct Reloadable {
    pub(crate) state: Arc<NodeState>,
    /// One tunnel endpoint per worker when the tunnel can be shared out, else one.
    pub(crate) endpoints: Vec<quinn::Endpoint>,
    /// Endpoints dialers opened for their connections (dial-only nodes, see `tunnel::dialer`).
    pub(crate) dial_endpoints: Arc<crate::tunnel::dialer::DialEndpoints>,
    /// Dialing TLS config per peer address.
    pub(crate) peer_clients: Vec<(String, Arc<ArcSwap<quic::DialConfig>>)>,
    /// The tunnel listener's config, from which each incoming connection gets its own (see
    /// `tunnel::handshake`).
    pub(crate) tunnel_server: Option<Arc<ArcSwap<quinn::ServerConfig>>>,
    /// The TLS/TCP tunnel listener's config, taken by each connection it accepts.
    pub(crate) tunnel_tcp_server: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    /// The remote admin listener's TLS config (certificate, CA, CRL).
    pub(crate) admin_remote_tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    /// Import listeners, then the gateway: mTLS configs, settings and limits.
    pub(crate) listener_specs: Vec<Arc<ListenerSpec>>,
    /// `tunnel.reconnect_max_backoff`, read by every dialer before each wait.
    pub(crate) dial_backoff: tokio::sync::watch::Sender<std::time::Duration>,
    /// QUIC transport settings of the running tunnels (`tunnel.keepalive`, `idle_timeout`).
    pub(crate) tuning: TransportTuning,
    /// Parent of the tokens of upstreams a reload starts.
    pub(crate) stop_rest: CancellationToken,
    pub(crate) one_at_a_time: tokio::sync::Mutex<()>,
}

/// Serves `POST /v1/reload` requests until `cancel` fires; each reload runs here, so a caller
/// that goes away cannot leave one half applied.
pub(crate) async fn serve_requests(
    mut requests: tokio::sync::mpsc::Receiver<ReloadRequest>,
    live: Arc<Reloadable>,
    cancel: CancellationToken,
) {
    loop {
        let request = tokio::select! {
            () = cancel.cancelled() => break,
            request = requests.recv() => match request {
                Some(request) => request,
                None => break,
            },
        };
        let outcome = live.reload(&request.by).await.map_err(|e| format!("{e:#}"));
        // The caller may have gone; the reload is done either way.
        let _ = request.reply.send(outcome);
    }
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    // Outside systemd NOTIFY_SOCKET is unset and this is a no-op.
    let _ = sd_notify::notify(states);
}

impl Reloadable {
    /// Runs one reload: systemd hears RELOADING=1 before and READY=1 after, and one log line
    /// tells the outcome, naming every field left for a restart.
    pub(crate) async fn reload(&self, by: &str) -> anyhow::Result<ReloadReport> {
        let _one = self.one_at_a_time.lock().await;
        notify(&[sd_notify::NotifyState::Reloading]);
        let outcome = self.apply().await;
        match &outcome {
            Ok(report) if report.needs_restart.is_empty() => {
                info!(by, config = %report.config, applied = %report.applied.join(", "), summary = %report.summary, "configuration reloaded");
                notify(&[
                    sd_notify::NotifyState::Ready,
                    sd_notify::NotifyState::Status("running; configuration reloaded"),
                ]);
            }
            Ok(report) => {
                let not_applied = report.not_applied();
                warn!(by, config = %report.config, applied = %report.applied.join(", "), not_applied = %not_applied, summary = %report.summary, "configuration reloaded except what needs a restart");
                let status =
                    format!("running; reloaded, not applied until a restart: {not_applied}");
                notify(&[
                    sd_notify::NotifyState::Ready,
                    sd_notify::NotifyState::Status(&status),
                ]);
            }
            Err(e) => {
                error!(by, error = %format!("{e:#}"), "reload refused; the running configuration stays in force");
                notify(&[
                    sd_notify::NotifyState::Ready,
                    sd_notify::NotifyState::Status("running; last reload refused (see the log)"),
                ]);
            }
        }
        outcome
    }

    /// Re-reads and applies; on any error nothing has been swapped.
    async fn apply(&self) -> anyhow::Result<ReloadReport> {
        let running = self.state.config.load_full();
        let path = running.source.clone();
        let new = Config::load(&path)?;
        let plan = crate::config::reload::diff(&running, &new);
        // From here on, the configuration this node will run with: the new one, with every
        // field that needs a restart at its running value.
        let prepared = self
            .prepare(&running, plan.in_force, &plan.needs_restart)
            .await?;
        let upstreams_restarted = prepared.upstreams_restarted.clone();
        let summary = self.swap(prepared, &running);
        Ok(ReloadReport {
            config: path.display().to_string(),
            applied: plan.applied,
            needs_restart: plan.needs_restart,
            upstreams_restarted,
            summary,
        })
    }

    /// Builds everything `config` needs from freshly read TLS material, starting the
    /// upstreams of added or changed exports; swaps nothing, so an error leaves the running
    /// node as it was.
    async fn prepare<'a>(
        &'a self,
        running: &Config,
        config: Config,
        needs_restart: &[String],
    ) -> anyhow::Result<Prepared<'a>> {
        let material = load_tls_for_reload(&config, needs_restart)?;
        let trust_domain = &config.node.trust_domain;
        let (server, tcp_server) = self.tunnel_servers(&material, &config)?;
        let clients = self.peer_client_configs(&material, &config)?;
        let admin_remote_tls = match &self.admin_remote_tls {
            Some(slot) => Some((slot, admin_remote_tls(&material, &config)?)),
            None => None,
        };
        let (services, upstreams_restarted) = self.services(running, &config).await?;
        let trust = Trust::new(
            &material,
            trust_domain,
            &config.tunnel.allowed_sites,
            config.tls.crl.as_deref(),
        )?;
        let import_tls = if self
            .listener_specs
            .iter()
            .any(|spec| spec.tls.load().is_some())
        {
            Some(import_tls_config(&material, trust_domain)?)
        } else {
            None
        };
        let settings = listener_settings(&config);
        anyhow::ensure!(
            settings.len() == self.listener_specs.len(),
            "internal: {} listeners run but the configuration in force has {}",
            self.listener_specs.len(),
            settings.len()
        );
        Ok(Prepared {
            config,
            server,
            tcp_server,
            clients,
            admin_remote_tls,
            services,
            upstreams_restarted,
            trust,
            import_tls,
            settings,
        })
    }

    /// The tunnel listeners' new server configs, for the QUIC listener when `tunnel.listen` is
    /// set and for the TLS/TCP listener when one runs; both admit `tunnel.allowed_sites`.
    fn tunnel_servers(
        &self,
        material: &TlsMaterial,
        config: &Config,
    ) -> anyhow::Result<(
        Option<quinn::ServerConfig>,
        Option<Arc<rustls::ServerConfig>>,
    )> {
        let expectation = || hybridge_ca::tls::PeerExpectation::NodeOfSites {
            trust_domain: config.node.trust_domain.clone(),
            sites: config.tunnel.allowed_sites.clone(),
        };
        let server = match config.tunnel.listen {
            Some(_) => Some(quic::server_config(material, expectation(), &self.tuning)?),
            None => None,
        };
        let tcp_server = match &self.tunnel_tcp_server {
            Some(_) => Some(crate::tunnel::tcp::server_config(material, expectation())?),
            None => None,
        };
        Ok((server, tcp_server))
    }

    /// A new dialing config for every peer, paired with the slot its dialer reads; the peers
    /// in force are the running ones (`peer` needs a restart), in the same order.
    fn peer_client_configs(
        &self,
        material: &TlsMaterial,
        config: &Config,
    ) -> anyhow::Result<Vec<(&Slot<quic::DialConfig>, quic::DialConfig)>> {
        let mut clients = Vec::new();
        for (peer, (address, slot)) in config.peers.iter().zip(&self.peer_clients) {
            anyhow::ensure!(
                peer.address.as_str() == address,
                "internal: peer {address} is dialled but the configuration in force has {}",
                peer.address
            );
            clients.push((
                slot,
                peer_client_config(material, &config.node.trust_domain, peer, &self.tuning)?,
            ));
        }
        Ok(clients)
    }

    /// The upstream of every export in `config` by name (the running one when the export is
    /// unchanged from `running`, else one started anew), and the names of those started anew.
    async fn services(
        &self,
        running: &Config,
        config: &Config,
    ) -> anyhow::Result<(HashMap<String, Arc<Upstream>>, Vec<String>)> {
        let current = self.state.export.services.load_full();
        let mut services = HashMap::new();
        let mut upstreams_restarted = Vec::new();
        for export in &config.exports {
            let unchanged = running
                .exports
                .iter()
                .any(|e| e.name == export.name && e.upstream == export.upstream);
            match current.get(export.name.as_str()) {
                Some(upstream) if unchanged => {
                    services.insert(export.name.to_string(), upstream.clone());
                }
                _ => {
                    let upstream = Upstream::start(
                        &export.name,
                        &export.upstream,
                        self.stop_rest.child_token(),
                    )
                    .await
                    .with_context(|| {
                        format!("{}: export `{}`", running.source.display(), export.name)
                    })?;
                    upstreams_restarted.push(export.name.to_string());
                    services.insert(export.name.to_string(), upstream);
                }
            }
        }
        Ok((services, upstreams_restarted))
    }

    /// Puts everything `prepared` holds in force, then announces the node to its peers;
    /// returns the one-line summary of the report.
    fn swap(&self, prepared: Prepared<'_>, running: &Config) -> String {
        let state = &self.state;
        let Prepared {
            config,
            server,
            tcp_server,
            clients,
            admin_remote_tls,
            services,
            upstreams_restarted,
            trust,
            import_tls,
            settings,
        } = prepared;
        if let Some(server) = server {
            for endpoint in &self.endpoints {
                endpoint.set_server_config(Some(server.clone()));
            }
            if let Some(current) = &self.tunnel_server {
                current.store(Arc::new(server));
            }
        }
        if let (Some(current), Some(tcp_server)) = (&self.tunnel_tcp_server, tcp_server) {
            current.store(tcp_server);
        }
        for (spec, settings) in self.listener_specs.iter().zip(settings) {
            if let Some(import_tls) = &import_tls
                && spec.tls.load().is_some()
            {
                spec.tls.store(Some(import_tls.clone()));
            }
            spec.settings.store(Arc::new(settings));
            spec.limits
                .reconfigure(config.limits.max_connections, config.limits.idle_timeout);
        }
        crate::trust::warn_stale_crls(&trust);
        // Live tunnels and mTLS connections check their peers against the new material and
        // sites, and close if they no longer admit them (revoked, expired, another CA, a site
        // no longer allowed, a stale CRL under `tls.crl_stale = "refuse"`).
        state.trust.publish(trust);
        for (slot, client) in clients {
            slot.store(Arc::new(client));
        }
        if let Some((slot, tls)) = admin_remote_tls {
            slot.store(Arc::new(tls));
        }
        self.dial_backoff
            .send_replace(config.tunnel.reconnect_max_backoff);
        count_configured_services(&state.metrics, &state.acl, &config);
        state.export.services.store(Arc::new(services));
        state.serving.reconfigure(&config);
        state
            .export
            .escaped_slashes
            .store(Arc::new(escaped_slashes_by_export(&config)));
        let exports_changed = config.export_names() != running.export_names();
        let export_count = config.exports.len();
        state.config.store(Arc::new(config));
        state
            .peers
            .broadcast(&ControlMessage::update(state.announcement()));
        format!(
            "certificates, CA bundle and CRL re-read and in force on every listener and live connection; {export_count} export(s), {} upstream(s) started anew{}",
            upstreams_restarted.len(),
            if exports_changed {
                ", export list announced to peers"
            } else {
                ""
            }
        )
    }
}

/// A config running tasks read at each use; a reload stores a new one in it.
type Slot<T> = Arc<ArcSwap<T>>;

/// Everything a reload builds before it swaps anything, each new piece beside the slot it
/// replaces where the slot is one of several.
struct Prepared<'a> {
    /// The configuration in force after the swap.
    config: Config,
    /// The QUIC tunnel listener's config, when the node listens.
    server: Option<quinn::ServerConfig>,
    /// The TLS/TCP tunnel listener's config, when that listener runs.
    tcp_server: Option<Arc<rustls::ServerConfig>>,
    /// Each peer's dialing config and the slot it goes into.
    clients: Vec<(&'a Slot<quic::DialConfig>, quic::DialConfig)>,
    /// The remote admin listener's TLS config and its slot, when that listener runs.
    admin_remote_tls: Option<(&'a Slot<rustls::ServerConfig>, rustls::ServerConfig)>,
    /// The upstream of every export.
    services: HashMap<String, Arc<Upstream>>,
    /// Exports whose upstream was started anew.
    upstreams_restarted: Vec<String>,
    trust: Trust,
    /// The mTLS config of import and gateway listeners, when any of them uses mTLS.
    import_tls: Option<Arc<rustls::ServerConfig>>,
    /// Import listeners', then the gateway's settings, in `listener_specs` order.
    settings: Vec<ListenerSettings>,
}

/// The node's TLS material as `config` names it. When a changed node identity waits for a
/// restart, an error says that the certificate must still name the running identity.
fn load_tls_for_reload(config: &Config, needs_restart: &[String]) -> anyhow::Result<TlsMaterial> {
    let identity_kept = needs_restart
        .iter()
        .any(|field| ["node.name", "node.site", "node.trust_domain"].contains(&field.as_str()));
    load_tls(config).map_err(|e| {
        if identity_kept {
            e.context("the node keeps its running identity until a restart (node.name, node.site and node.trust_domain need one), so its certificate must still name it")
        } else {
            e
        }
    })
}
