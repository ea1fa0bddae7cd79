//! Peer trust over a connection's whole life. The checks a handshake makes (chain to the CA
//! bundle, validity, CRL, the sites a tunnel listener admits) are made again when the node
//! reloads its CA bundle, CRL or sites, when the peer's certificate expires, and, under
//! `tls.crl_stale = "refuse"`, when a CRL goes stale, so a revoked or expired peer loses its
//! live connections, not only its next handshake.
//!
//! It decides and waits; closing a connection is the job of whoever owns it.

use std::sync::Arc;
use std::time::Duration;

use hybridge_ca::inspect::CrlSummary;
use hybridge_ca::tls::{CrlStale, PeerChecker, PeerExpectation, PeerRole, TlsMaterial};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::sync::watch;
use tokio::time::Instant;

/// What kind of identity a connection's peer was admitted as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PeerKind {
    /// A node at the other end of a tunnel.
    Node,
    /// A service presenting its certificate to an mTLS import or gateway listener.
    Service,
    /// An administrator on the remote admin listener.
    Admin,
}

/// The checks in force, built from one set of TLS material.
pub(crate) struct Trust {
    /// Nodes we dialled (any site: a dialler's expectations were checked at its handshake).
    nodes: PeerChecker,
    /// Nodes that dialled us: only the sites the tunnel listener admits.
    accepted_nodes: PeerChecker,
    services: PeerChecker,
    admins: PeerChecker,
    /// The CRLs in force, in file order, and the file they came from.
    crls: Vec<CrlSummary>,
    crl_file: Option<std::path::PathBuf>,
    crl_stale: CrlStale,
    /// The validity window of the node's own certificate (`None` if it could not be read).
    node_certificate: Option<Validity>,
    /// How many CA certificates the bundle in force holds.
    ca_certificates: usize,
}

/// When a certificate starts and stops being valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Validity {
    pub(crate) not_before: time::OffsetDateTime,
    pub(crate) not_after: time::OffsetDateTime,
}

impl Trust {
    /// Checks for `material` (its CRLs read from `crl_file`, for messages); nodes that dialled
    /// us must be of `accepted_sites`. Identity rules beyond the kind and site (a peer's exact
    /// name) were applied at the handshake and are not re-checked here.
    pub(crate) fn new(
        material: &TlsMaterial,
        trust_domain: &str,
        accepted_sites: &[String],
        crl_file: Option<&std::path::Path>,
    ) -> anyhow::Result<Trust> {
        let crls = material
            .crls
            .iter()
            .enumerate()
            .map(|(i, crl)| {
                hybridge_ca::inspect::summarize_crl(crl.as_ref())
                    .map_err(|e| anyhow::anyhow!("CRL #{}: {e}", i + 1))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Trust {
            accepted_nodes: PeerChecker::new(
                material,
                PeerExpectation::NodeOfSites {
                    trust_domain: trust_domain.to_owned(),
                    sites: accepted_sites.to_vec(),
                },
            )?,
            crls,
            crl_file: crl_file.map(std::path::Path::to_path_buf),
            crl_stale: material.crl_stale,
            node_certificate: material
                .chain
                .first()
                .and_then(|leaf| hybridge_ca::inspect::summarize(leaf.as_ref()).ok())
                .map(|summary| Validity {
                    not_before: summary.not_before,
                    not_after: summary.not_after,
                }),
            ca_certificates: material.ca_certs.len(),
            nodes: PeerChecker::new(
                material,
                PeerExpectation::NodeOfSites {
                    trust_domain: trust_domain.to_owned(),
                    sites: Vec::new(),
                },
            )?,
            services: PeerChecker::new(
                material,
                PeerExpectation::AnyService {
                    trust_domain: trust_domain.to_owned(),
                },
            )?,
            admins: PeerChecker::new(
                material,
                PeerExpectation::AnyAdmin {
                    trust_domain: trust_domain.to_owned(),
                },
            )?,
        })
    }

    /// Checks a peer's chain now; the error says which check failed.
    pub(crate) fn check(
        &self,
        kind: PeerKind,
        chain: &[CertificateDer<'_>],
        role: PeerRole,
    ) -> Result<(), String> {
        let checker = match (kind, role) {
            (PeerKind::Node, PeerRole::Client) => &self.accepted_nodes,
            (PeerKind::Node, PeerRole::Server) => &self.nodes,
            (PeerKind::Service, _) => &self.services,
            (PeerKind::Admin, _) => &self.admins,
        };
        checker
            .check(chain, UnixTime::now(), role)
            .map(drop)
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
                    other.to_string()
                }
                other => other.to_string(),
            })
    }

    /// The CRLs in force, in file order.
    pub(crate) fn crls(&self) -> &[CrlSummary] {
        &self.crls
    }

    pub(crate) fn crl_stale(&self) -> CrlStale {
        self.crl_stale
    }

    /// The validity window of the node's own certificate in force.
    pub(crate) fn node_certificate(&self) -> Option<Validity> {
        self.node_certificate
    }

    /// How many CA certificates the bundle in force holds.
    pub(crate) fn ca_certificates(&self) -> usize {
        self.ca_certificates
    }

    /// Under `tls.crl_stale = "refuse"`, when the first CRL goes stale and every peer check
    /// starts failing; `None` under `warn` or without a CRL.
    pub(crate) fn refuses_from(&self) -> Option<time::OffsetDateTime> {
        match self.crl_stale {
            CrlStale::Warn => None,
            CrlStale::Refuse => self.crls.iter().filter_map(|c| c.next_update).min(),
        }
    }
}

/// Publishes the trust in force to every live connection.
pub(crate) struct TrustUpdates {
    current: watch::Sender<Arc<Trust>>,
}

impl TrustUpdates {
    pub(crate) fn new(trust: Trust) -> TrustUpdates {
        TrustUpdates {
            current: watch::channel(Arc::new(trust)).0,
        }
    }

    /// Makes `trust` the one in force; every live connection checks its peer against it.
    pub(crate) fn publish(&self, trust: Trust) {
        self.current.send_replace(Arc::new(trust));
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<Trust>> {
        self.current.subscribe()
    }

    /// The trust in force now.
    pub(crate) fn current(&self) -> Arc<Trust> {
        self.current.borrow().clone()
    }
}

/// Resolves, with the failed check, once the peer presenting `chain` is no longer trusted:
/// a reload brought a CRL that revokes it, a CA bundle that does not issue it or sites that
/// exclude it, its leaf certificate expired, or (under `tls.crl_stale = "refuse"`) the CRL
/// went stale. Pending forever while none of that happens.
pub(crate) async fn lost(
    mut updates: watch::Receiver<Arc<Trust>>,
    chain: Vec<CertificateDer<'static>>,
    kind: PeerKind,
    role: PeerRole,
) -> String {
    let mut expiry = expiry_of(&chain);
    let mut stale = stale_check_at(&updates.borrow());
    let mut publisher_gone = false;
    // The handshake has just checked the chain; it is checked again only when the trust in
    // force changes (a receiver cloned before a reload sees that change at once) or the
    // certificate expires.
    loop {
        let expired = async {
            match expiry {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let crl_stale = async {
            match stale {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = updates.changed(), if !publisher_gone => {
                if changed.is_err() {
                    publisher_gone = true;
                    continue;
                }
            }
            () = expired => {
                // A clock that disagrees with the certificate by a second gets another.
                expiry = Some(Instant::now() + Duration::from_secs(1));
            }
            () = crl_stale => {}
        }
        let trust = updates.borrow_and_update().clone();
        stale = stale_check_at(&trust);
        if let Err(reason) = trust.check(kind, &chain, role) {
            return reason;
        }
    }
}

/// When to check again because `trust` starts refusing every peer (a CRL going stale under
/// `tls.crl_stale = "refuse"`): just after that instant, or in a second when a check that
/// should have failed passed (the clocks disagree by a rounding).
fn stale_check_at(trust: &Trust) -> Option<Instant> {
    let at = trust.refuses_from()?;
    let left = Duration::try_from(at - time::OffsetDateTime::now_utc()).unwrap_or(Duration::ZERO);
    Some(if left.is_zero() {
        Instant::now() + Duration::from_secs(1)
    } else {
        Instant::now() + left + Duration::from_millis(500)
    })
}

/// When the leaf certificate stops being valid (just past its notAfter), as a tokio instant.
fn expiry_of(chain: &[CertificateDer<'static>]) -> Option<Instant> {
    let leaf = chain.first()?;
    let not_after = hybridge_ca::inspect::summarize(leaf.as_ref())
        .ok()?
        .not_after;
    let left = not_after - time::OffsetDateTime::now_utc();
    let left = Duration::try_from(left).unwrap_or(Duration::ZERO);
    Some(Instant::now() + left + Duration::from_millis(500))
}

/// Logs a warning for each CRL in force that is past its nextUpdate (at start and on every
/// reload), saying what the node does about it under `tls.crl_stale`.
pub(crate) fn warn_stale_crls(trust: &Trust) {
    let now = time::OffsetDateTime::now_utc();
    for (i, crl) in trust.crls().iter().enumerate() {
        if crl.is_stale(now) {
            log_stale_crl(trust, i, now);
        }
    }
}

/// One warning about the CRL at `index` (0-based) of `trust` being stale at `now`.
fn log_stale_crl(trust: &Trust, index: usize, now: time::OffsetDateTime) {
    let Some(crl) = trust.crls.get(index) else {
        return;
    };
    let file = trust
        .crl_file
        .as_deref()
        .map_or_else(|| "-".to_string(), |p| p.display().to_string());
    let crl_number = crl.number.as_deref().unwrap_or("-");
    let next_update = crl.next_update.map(rfc3339).unwrap_or_default();
    let stale_seconds = crl
        .seconds_to_next_update(now)
        .map_or(0, |left| left.saturating_neg());
    match trust.crl_stale {
        CrlStale::Warn => tracing::warn!(
            crl = %file,
            position = index + 1,
            crl_number,
            next_update,
            stale_seconds,
            "CRL is past its nextUpdate: peers are still checked against it (tls.crl_stale = \"warn\"), but a revocation made since is unknown; issue a new one (hybridge-ca crl) and reload"
        ),
        CrlStale::Refuse => tracing::error!(
            crl = %file,
            position = index + 1,
            crl_number,
            next_update,
            stale_seconds,
            "CRL is past its nextUpdate: every peer is refused and live connections are closed (tls.crl_stale = \"refuse\") until a current CRL is loaded; issue a new one (hybridge-ca crl) and reload"
        ),
    }
}

fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

/// Logs once, as it happens, each CRL in force going past its nextUpdate while the node runs,
/// until `cancel` fires. A reload brings new CRLs to watch (its own warnings come from
/// [`warn_stale_crls`]).
pub(crate) async fn watch_crl_freshness(
    mut updates: watch::Receiver<Arc<Trust>>,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        let trust = updates.borrow_and_update().clone();
        let now = time::OffsetDateTime::now_utc();
        // The next CRL to go stale, if any is still current.
        let next = trust
            .crls()
            .iter()
            .enumerate()
            .filter_map(|(i, crl)| crl.next_update.filter(|at| *at > now).map(|at| (at, i)))
            .min();
        let passes = async {
            match next {
                Some((at, _)) => {
                    let left = Duration::try_from(at - now).unwrap_or(Duration::ZERO);
                    tokio::time::sleep(left).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = updates.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = passes => {
                // Logged once: the next turn looks only at CRLs still current.
                let now = time::OffsetDateTime::now_utc();
                if let Some((_, i)) = next
                    && trust.crls()[i].is_stale(now)
                {
                    log_stale_crl(&trust, i, now);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hybridge_ca::authority::{CertificateAuthority, InitOptions};

    fn material(ca: &CertificateAuthority, site: &str, crl: Option<&str>) -> TlsMaterial {
        let leaf = ca
            .issue_node(site, "n", &[], &[], Duration::from_secs(3600))
            .unwrap();
        TlsMaterial::from_pem(&ca.ca_cert_pem(), &leaf.cert_chain_pem, &leaf.key_pem, crl).unwrap()
    }

    #[test]
    fn accepted_tunnels_are_held_to_the_allowed_sites_and_dialled_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::init(dir.path(), "td", InitOptions::default()).unwrap();
        let ours = material(&ca, "cloud", None);
        let lab = material(&ca, "lab", None).chain;
        let trust = Trust::new(&ours, "td", &["onprem".to_string()], None).unwrap();
        let refused = trust
            .check(PeerKind::Node, &lab, PeerRole::Client)
            .unwrap_err();
        assert!(
            refused.contains("expected a node of site onprem"),
            "{refused}"
        );
        assert_eq!(trust.check(PeerKind::Node, &lab, PeerRole::Server), Ok(()));
        let widened = Trust::new(&ours, "td", &["onprem".into(), "lab".into()], None).unwrap();
        assert_eq!(
            widened.check(PeerKind::Node, &lab, PeerRole::Client),
            Ok(())
        );
    }

    #[test]
    fn only_the_refuse_policy_has_a_moment_from_which_every_peer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::init(dir.path(), "td", InitOptions::default()).unwrap();
        let crl = ca.crl_pem_valid_for(Duration::from_secs(600)).unwrap();
        let mut with_crl = material(&ca, "cloud", Some(&crl));
        let warn = Trust::new(&with_crl, "td", &[], None).unwrap();
        assert_eq!(warn.crl_stale(), CrlStale::Warn);
        assert_eq!(warn.refuses_from(), None);
        with_crl.crl_stale = CrlStale::Refuse;
        let refuse = Trust::new(&with_crl, "td", &[], None).unwrap();
        assert_eq!(refuse.crls().len(), 1);
        assert_eq!(refuse.refuses_from(), refuse.crls()[0].next_update);
        let mut without = material(&ca, "cloud", None);
        without.crl_stale = CrlStale::Refuse;
        assert_eq!(
            Trust::new(&without, "td", &[], None)
                .unwrap()
                .refuses_from(),
            None
        );
    }
}
