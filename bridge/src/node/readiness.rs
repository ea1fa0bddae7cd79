//! Whether a node is ready, per role, and why not: the one definition `/readyz`, `/v1/status`
//! (`hybridge status` exit code 3) and systemd's `READY=1` share.
//!
//! It only reads node state; it does not wait, notify or decide what a caller does with it.
//!
//! - Every node: not draining; its own certificate is within its validity window; the CA
//!   bundle in force holds a certificate; no CRL in force is refusing every peer
//!   (`tls.crl_stale = "refuse"` past a nextUpdate).
//! - A listening node (`tunnel.listen`): its tunnel listener is bound. That is all it needs
//!   to accept tunnels, so a cloud node nobody has dialled yet is ready (the load balancer's
//!   health check must pass before any on-prem node can reach it).
//! - A dialling node (`[[peer]]`): every configured peer site has at least one tunnel up that
//!   is not draining.
//! - A node that does both: both.

use std::fmt::Write as _;
use std::sync::Arc;

use time::OffsetDateTime;

use super::NodeState;
use crate::config::Config;
use crate::trust::Trust;
use crate::tunnel::peers::PeerLink;

/// Whether the node is ready now, and each condition that fails.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Readiness {
    /// Why the node is not ready, one short sentence per failed condition; empty when ready.
    pub(crate) reasons: Vec<String>,
}

impl Readiness {
    pub(crate) fn is_ready(&self) -> bool {
        self.reasons.is_empty()
    }

    /// `ready`, or the failed conditions joined by `; `.
    pub(crate) fn summary(&self) -> String {
        if self.is_ready() {
            "ready".to_owned()
        } else {
            self.reasons.join("; ")
        }
    }
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

/// The failed conditions on the node's TLS material at `now`: its own certificate unreadable
/// or outside its validity window, no CA certificate, a CRL refusing every peer.
fn trust_reasons(config: &Config, trust: &Trust, now: OffsetDateTime) -> Vec<String> {
    let mut reasons = Vec::new();
    match trust.node_certificate() {
        None => reasons.push(format!(
            "node certificate {} is unreadable",
            config.tls.cert.display()
        )),
        Some(validity) if now < validity.not_before => reasons.push(format!(
            "node certificate not valid until {}",
            rfc3339(validity.not_before)
        )),
        Some(validity) if now >= validity.not_after => reasons.push(format!(
            "node certificate expired at {}",
            rfc3339(validity.not_after)
        )),
        Some(_) => {}
    }
    if trust.ca_certificates() == 0 {
        reasons.push(format!(
            "no CA certificate loaded from {}",
            config.tls.ca.display()
        ));
    }
    if let Some(from) = trust.refuses_from()
        && now >= from
    {
        reasons.push(format!(
            "a CRL in force is past its nextUpdate ({}) and tls.crl_stale = \"refuse\" refuses every peer",
            rfc3339(from)
        ));
    }
    reasons
}

/// The sites of the configured peers, each once, in the order they are first configured.
fn peer_sites(config: &Config) -> Vec<&str> {
    let mut sites: Vec<&str> = Vec::new();
    for peer in &config.peers {
        if !sites.contains(&peer.site.as_str()) {
            sites.push(&peer.site);
        }
    }
    sites
}

impl NodeState {
    /// The node's readiness at `now` (see the module doc for the definition).
    pub(crate) fn readiness_at(&self, now: OffsetDateTime) -> Readiness {
        let mut reasons = Vec::new();
        if self.is_draining() {
            reasons.push("draining".to_owned());
        }
        let config = self.config.load();
        reasons.extend(trust_reasons(&config, &self.trust.current(), now));
        if config.tunnel.listen.is_some() && self.addresses.tunnel.is_none() {
            reasons.push("the tunnel listener is not bound".to_owned());
        }
        let links = self.peers.links();
        for site in peer_sites(&config) {
            if links.iter().any(|l| l.site() == site && !l.is_draining()) {
                continue;
            }
            reasons.push(self.waiting_for_site(&config, &links, site));
        }
        Readiness { reasons }
    }

    /// Why `site` has no tunnel up that is not draining, e.g. `waiting for a tunnel to site
    /// cloud (peer cloud.example:4433: not connected yet)`.
    fn waiting_for_site(&self, config: &Config, links: &[Arc<PeerLink>], site: &str) -> String {
        let mut reason = format!("waiting for a tunnel to site {site} (");
        let addresses: Vec<&str> = config
            .peers
            .iter()
            .filter(|p| p.site == site)
            .map(|p| p.address.as_str())
            .collect();
        let _ = write!(
            reason,
            "{} {}",
            if addresses.len() == 1 {
                "peer"
            } else {
                "peers"
            },
            addresses.join(", ")
        );
        if links.iter().any(|l| l.site() == site) {
            reason += ": every tunnel is draining";
        } else {
            self.write_why_not_connected(&mut reason, site);
        }
        reason.push(')');
        reason
    }

    /// Appends to `reason` why no tunnel to `site` is up: how the last one went down, or, when
    /// none has been up, the last dial error if there is one.
    fn write_why_not_connected(&self, reason: &mut String, site: &str) {
        match self.peers.last_down(site) {
            Some(down) => {
                let _ = write!(
                    reason,
                    ": last tunnel down {}s ago, {}: {}",
                    down.at.elapsed().as_secs(),
                    down.reason,
                    down.detail
                );
            }
            None => {
                let last_error = self
                    .dial_states
                    .all()
                    .into_iter()
                    .filter(|slot| slot.site == site)
                    .find_map(|slot| slot.last_error);
                match last_error {
                    Some(error) => {
                        let _ = write!(reason, ": not connected yet, last attempt: {error}");
                    }
                    None => *reason += ": not connected yet",
                }
            }
        }
    }

    /// The node's readiness now.
    pub(crate) fn readiness(&self) -> Readiness {
        self.readiness_at(OffsetDateTime::now_utc())
    }
}
