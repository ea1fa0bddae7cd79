//! Peer trust over a connection's whole life. The checks a handshake makes (chain to the CA
//! bundle, validity, CRL) are made again when the node reloads its CA bundle or CRL and when
//! the peer's certificate expires, so a revoked or expired peer loses its live connections,
//! not only its next handshake.
//!
//! It decides and waits; closing a connection is the job of whoever owns it.

use std::sync::Arc;
use std::time::Duration;

use hybridge_ca::tls::{PeerChecker, PeerExpectation, PeerRole, TlsMaterial};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::sync::watch;
use tokio::time::Instant;

/// What kind of identity a connection's peer was admitted as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerKind {
    /// A node at the other end of a tunnel.
    Node,
    /// A service presenting its certificate to an mTLS import or gateway listener.
    Service,
    /// An administrator on the remote admin listener.
    Admin,
}

/// The checks in force, built from one set of TLS material.
pub struct Trust {
    nodes: PeerChecker,
    services: PeerChecker,
    admins: PeerChecker,
}

impl Trust {
    /// Checks for `material`. Identity rules beyond the kind (which sites a listener accepts)
    /// were applied at the handshake and are not re-checked here.
    pub fn new(material: &TlsMaterial, trust_domain: &str) -> anyhow::Result<Trust> {
        Ok(Trust {
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
    pub fn check(
        &self,
        kind: PeerKind,
        chain: &[CertificateDer<'_>],
        role: PeerRole,
    ) -> Result<(), String> {
        let checker = match kind {
            PeerKind::Node => &self.nodes,
            PeerKind::Service => &self.services,
            PeerKind::Admin => &self.admins,
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
}

/// Publishes the trust in force to every live connection.
pub struct TrustUpdates {
    current: watch::Sender<Arc<Trust>>,
}

impl TrustUpdates {
    pub fn new(trust: Trust) -> TrustUpdates {
        TrustUpdates {
            current: watch::channel(Arc::new(trust)).0,
        }
    }

    /// Makes `trust` the one in force; every live connection checks its peer against it.
    pub fn publish(&self, trust: Trust) {
        self.current.send_replace(Arc::new(trust));
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Trust>> {
        self.current.subscribe()
    }
}

/// Resolves, with the failed check, once the peer presenting `chain` is no longer trusted:
/// a reload brought a CRL that revokes it or a CA bundle that does not issue it, or its leaf
/// certificate expired. Pending forever while neither happens.
pub async fn lost(
    mut updates: watch::Receiver<Arc<Trust>>,
    chain: Vec<CertificateDer<'static>>,
    kind: PeerKind,
    role: PeerRole,
) -> String {
    let mut expiry = expiry_of(&chain);
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
        }
        let trust = updates.borrow_and_update().clone();
        if let Err(reason) = trust.check(kind, &chain, role) {
            return reason;
        }
    }
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
