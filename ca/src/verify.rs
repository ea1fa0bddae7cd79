//! rustls certificate verifiers for hybridge peers: CA chain, validity, EKU and CRL
//! revocation via webpki, then the SPIFFE URI SAN against a [`PeerExpectation`].
//!
//! Host names are deliberately not checked: a peer's identity is its SPIFFE id, as in SPIFFE.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, RevocationCheckDepth,
    RevocationOptionsBuilder, UnknownStatusPolicy,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::SpiffeId;
use crate::tls::{CrlStale, PeerExpectation, TlsMaterial, spiffe_id_of};

/// Which side of the handshake the peer is on; selects the EKU to require.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerRole {
    /// The peer is a TLS client (we are the server): require clientAuth.
    Client,
    /// The peer is a TLS server (we are the client): require serverAuth.
    Server,
}

/// Which check a peer's certificate failed: a closed set a caller can count and act on
/// without reading the message (which carries details such as the serial).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectionKind {
    /// Not issued by a CA in the bundle (unknown issuer, or a signature the CA key does not
    /// verify).
    UnknownCa,
    /// Past its notAfter.
    Expired,
    /// Before its notBefore.
    NotYetValid,
    /// Listed by a CRL in force.
    Revoked,
    /// Lacks the extended key usage for its side of the handshake.
    BadEku,
    /// No usable SPIFFE id, or one of the wrong kind or trust domain.
    WrongIdentity,
    /// A node certificate of the right trust domain, but of a site this side does not accept.
    WrongSite,
    /// Unparseable, or refused by the chain check for another reason.
    Malformed,
    /// Not the peer's fault: our CRL is past its nextUpdate and `tls.crl_stale = "refuse"`.
    StaleCrl,
}

/// A failed peer check: which one (`kind`) and a message naming it with its details. Debug
/// prints the message, because rustls renders `CertificateError::Other` with `{:?}`.
#[derive(Clone)]
pub struct PeerRejected {
    /// The check that failed.
    pub kind: RejectionKind,
    /// What failed, for logs (may name the certificate's serial and dates).
    pub(crate) message: String,
}

impl PeerRejected {
    /// A rejection of `kind`, described by `message`.
    pub fn new(kind: RejectionKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for PeerRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for PeerRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PeerRejected {}

/// The rejection inside a rustls error, if a hybridge verifier made it.
pub fn rejection_of(error: &rustls::Error) -> Option<&PeerRejected> {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            other.0.downcast_ref::<PeerRejected>()
        }
        _ => None,
    }
}

thread_local! {
    /// Set while [`capture_rejection`] runs on this thread: where verifiers report.
    static CAPTURE: std::cell::RefCell<Option<Option<PeerRejected>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` and returns what it returned with the last rejection a hybridge verifier made
/// while it ran on this thread. rustls runs verifiers synchronously inside the call that
/// processes the peer's handshake message, so wrapping that call attributes a rejection to
/// exactly the handshake that caused it, which the error rustls returns (a TLS alert and a
/// text) no longer can.
pub fn capture_rejection<R>(f: impl FnOnce() -> R) -> (R, Option<PeerRejected>) {
    let outer = CAPTURE.with(|slot| slot.borrow_mut().replace(None));
    let result = f();
    let captured = CAPTURE.with(|slot| {
        let mut slot = slot.borrow_mut();
        let captured = slot.take().flatten();
        *slot = outer;
        captured
    });
    (result, captured)
}

fn reject(rejection: PeerRejected) -> rustls::Error {
    CAPTURE.with(|slot| {
        if let Some(captured) = slot.borrow_mut().as_mut() {
            *captured = Some(rejection.clone());
        }
    });
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(rejection))))
}

fn unix_to_text(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs} (UNIX)"))
}

/// Everything a verifier needs, owned, so configs can outlive the material they came from.
#[derive(Debug)]
pub(crate) struct PeerPolicy {
    roots: Vec<rustls::pki_types::TrustAnchor<'static>>,
    root_hints: Vec<DistinguishedName>,
    crls: Vec<CertRevocationList<'static>>,
    /// With `tls.crl_stale = "refuse"`: the earliest nextUpdate of the CRLs, from which on
    /// every peer is refused.
    refuse_from: Option<StaleCrl>,
    expect: PeerExpectation,
    algorithms: WebPkiSupportedAlgorithms,
}

/// The first CRL to go stale, for the refusal message.
#[derive(Clone, Copy, Debug)]
struct StaleCrl {
    /// 1-based position of the CRL in its file.
    position: usize,
    next_update: u64,
}

impl PeerPolicy {
    pub(crate) fn new(
        material: &TlsMaterial,
        expect: PeerExpectation,
        provider: &CryptoProvider,
    ) -> Result<Self, String> {
        let mut roots = Vec::new();
        let mut root_hints = Vec::new();
        for (i, ca) in material.ca_certs.iter().enumerate() {
            let anchor = webpki::anchor_from_trusted_cert(ca).map_err(|e| {
                format!(
                    "CA certificate #{} is not usable as a trust anchor: {e}",
                    i + 1
                )
            })?;
            // A CertificateRequest names each CA as a DER `Name`: the anchor keeps only the
            // contents of that SEQUENCE, and OpenSSL clients refuse a bare one.
            root_hints.push(DistinguishedName::in_sequence(anchor.subject.as_ref()));
            roots.push(anchor.to_owned());
        }
        if roots.is_empty() {
            return Err("no CA certificates to trust".into());
        }
        let mut crls = Vec::new();
        let mut refuse_from: Option<StaleCrl> = None;
        for (i, crl) in material.crls.iter().enumerate() {
            let owned = webpki::OwnedCertRevocationList::from_der(crl.as_ref())
                .map_err(|e| format!("CRL #{} is invalid: {e}", i + 1))?;
            crls.push(CertRevocationList::from(owned));
            if material.crl_stale == CrlStale::Refuse {
                let summary = crate::inspect::summarize_crl(crl.as_ref())
                    .map_err(|e| format!("CRL #{} is invalid: {e}", i + 1))?;
                let next_update = summary
                    .next_update
                    .map(|t| u64::try_from(t.unix_timestamp()).unwrap_or(0));
                if let Some(next_update) = next_update
                    && refuse_from.is_none_or(|first| next_update < first.next_update)
                {
                    refuse_from = Some(StaleCrl {
                        position: i + 1,
                        next_update,
                    });
                }
            }
        }
        Ok(PeerPolicy {
            roots,
            root_hints,
            crls,
            refuse_from,
            expect,
            algorithms: provider.signature_verification_algorithms,
        })
    }

    /// Runs every check and returns the peer's id, or a rustls error naming the failed check.
    pub(crate) fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        role: PeerRole,
    ) -> Result<SpiffeId, rustls::Error> {
        if let Some(stale) = self.refuse_from
            && now.as_secs() >= stale.next_update
        {
            return Err(reject(PeerRejected::new(
                RejectionKind::StaleCrl,
                format!(
                    "the CRL in force (#{} of its file) is past its nextUpdate {} and tls.crl_stale = \"refuse\" refuses every peer until a current CRL is loaded",
                    stale.position,
                    unix_to_text(stale.next_update)
                ),
            )));
        }
        let serial = X509Certificate::from_der(end_entity.as_ref())
            .map(|(_, c)| hex::encode(c.raw_serial()))
            .map_err(|_| malformed())?;
        let cert = EndEntityCert::try_from(end_entity).map_err(|_| malformed())?;
        let crl_refs: Vec<&CertRevocationList<'_>> = self.crls.iter().collect();
        let revocation = match RevocationOptionsBuilder::new(&crl_refs) {
            // Every certificate hybridge issues is a leaf directly under the CA, so only the
            // end entity can be revoked. A CRL past its nextUpdate is still applied here
            // (`CrlStale::Warn`, the default: an outdated CRL still lists everything revoked
            // before it was made); `CrlStale::Refuse` refuses every peer above instead.
            // Unknown status (no CRL from this issuer) is allowed so a node works before its
            // first CRL exists.
            Ok(builder) => Some(
                builder
                    .with_depth(RevocationCheckDepth::EndEntity)
                    .with_status_policy(UnknownStatusPolicy::Allow)
                    .with_expiration_policy(ExpirationPolicy::Ignore)
                    .build(),
            ),
            Err(_) => None, // no CRLs configured
        };
        let usage = match role {
            PeerRole::Client => KeyUsage::client_auth(),
            PeerRole::Server => KeyUsage::server_auth(),
        };
        cert.verify_for_usage(
            self.algorithms.all,
            &self.roots,
            intermediates,
            now,
            usage,
            revocation,
            None,
        )
        .map_err(|e| reject(describe_webpki_error(e, &serial, role)))?;

        let id = spiffe_id_of(end_entity).map_err(|e| {
            reject(PeerRejected::new(
                RejectionKind::WrongIdentity,
                e.to_string(),
            ))
        })?;
        check_expectation(&self.expect, &id).map_err(reject)?;
        Ok(id)
    }
}

fn malformed() -> rustls::Error {
    reject(PeerRejected::new(
        RejectionKind::Malformed,
        "certificate is not valid X.509",
    ))
}

fn describe_webpki_error(e: webpki::Error, serial: &str, role: PeerRole) -> PeerRejected {
    use webpki::Error as E;
    let (kind, message) = match e {
        E::UnknownIssuer => (
            RejectionKind::UnknownCa,
            "certificate not issued by the hybridge CA".to_owned(),
        ),
        E::CertRevoked => (
            RejectionKind::Revoked,
            format!("certificate revoked (serial {serial})"),
        ),
        E::CertExpired { not_after, .. } => (
            RejectionKind::Expired,
            format!(
                "certificate expired (serial {serial}, not valid after {})",
                unix_to_text(not_after.as_secs())
            ),
        ),
        E::CertNotValidYet { not_before, .. } => (
            RejectionKind::NotYetValid,
            format!(
                "certificate not valid yet (serial {serial}, not valid before {})",
                unix_to_text(not_before.as_secs())
            ),
        ),
        E::RequiredEkuNotFoundContext(_) => (
            RejectionKind::BadEku,
            format!(
                "certificate lacks the {} extended key usage",
                match role {
                    PeerRole::Client => "clientAuth",
                    PeerRole::Server => "serverAuth",
                }
            ),
        ),
        // An issuer with the CA's name but another key (e.g. a second CA for the same
        // trust domain) fails here rather than with UnknownIssuer.
        E::InvalidSignatureForPublicKey => (
            RejectionKind::UnknownCa,
            "certificate not issued by the hybridge CA (signature does not verify with the CA key)"
                .to_owned(),
        ),
        other => (
            RejectionKind::Malformed,
            format!("certificate chain check failed: {other}"),
        ),
    };
    PeerRejected::new(kind, message)
}

/// Compares a verified peer id with what this connection expects.
pub(crate) fn check_expectation(
    expect: &PeerExpectation,
    id: &SpiffeId,
) -> Result<(), PeerRejected> {
    let wrong = |message: String| Err(PeerRejected::new(RejectionKind::WrongIdentity, message));
    match expect {
        PeerExpectation::NodeOfSites {
            trust_domain,
            sites,
        } => {
            let wanted = if sites.is_empty() {
                "a node of any site".to_string()
            } else {
                format!("a node of site {}", sites.join(" or "))
            };
            match id {
                SpiffeId::Node {
                    trust_domain: td,
                    site,
                    ..
                } if td == trust_domain && (sites.is_empty() || sites.contains(site)) => Ok(()),
                SpiffeId::Node {
                    trust_domain: td, ..
                } if td == trust_domain => Err(PeerRejected::new(
                    RejectionKind::WrongSite,
                    format!("peer is {id} but expected {wanted} in trust domain {trust_domain}"),
                )),
                _ => wrong(format!(
                    "peer is {id} but expected {wanted} in trust domain {trust_domain}"
                )),
            }
        }
        PeerExpectation::AnyService { trust_domain } => match id {
            SpiffeId::Service {
                trust_domain: td, ..
            } if td == trust_domain => Ok(()),
            _ => wrong(format!(
                "peer is {id} but expected a service in trust domain {trust_domain}"
            )),
        },
        PeerExpectation::AnyAdmin { trust_domain } => match id {
            SpiffeId::Admin {
                trust_domain: td, ..
            } if td == trust_domain => Ok(()),
            _ => wrong(format!(
                "peer is {id} but expected an administrator (spiffe://{trust_domain}/admin/NAME)"
            )),
        },
        PeerExpectation::Exact(want) => {
            if want == id {
                Ok(())
            } else {
                wrong(format!("peer is {id} but expected {want}"))
            }
        }
    }
}

/// Server side: requires and verifies the client's certificate.
#[derive(Debug)]
pub(crate) struct HybridgeClientVerifier {
    pub(crate) policy: PeerPolicy,
}

impl ClientCertVerifier for HybridgeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.policy.root_hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.policy
            .verify(end_entity, intermediates, now, PeerRole::Client)
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.policy.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.policy.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.policy.algorithms.supported_schemes()
    }
}

/// Client side: verifies the server's certificate, ignoring the server name.
#[derive(Debug)]
pub(crate) struct HybridgeServerVerifier {
    pub(crate) policy: PeerPolicy,
}

impl ServerCertVerifier for HybridgeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.policy
            .verify(end_entity, intermediates, now, PeerRole::Server)
            .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.policy.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.policy.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.policy.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(site: &str) -> SpiffeId {
        SpiffeId::node("td", site, "a").unwrap()
    }

    #[test]
    fn node_site_expectation() {
        let expect = PeerExpectation::NodeOfSites {
            trust_domain: "td".into(),
            sites: vec!["onprem".into()],
        };
        assert!(check_expectation(&expect, &node("onprem")).is_ok());
        let other_site = check_expectation(&expect, &node("cloud")).unwrap_err();
        assert_eq!(
            other_site.to_string(),
            "peer is spiffe://td/site/cloud/node/a but expected a node of site onprem in trust domain td"
        );
        assert_eq!(other_site.kind, RejectionKind::WrongSite);
        let svc = SpiffeId::service("td", "s").unwrap();
        assert_eq!(
            check_expectation(&expect, &svc).unwrap_err().kind,
            RejectionKind::WrongIdentity
        );
        let other_td = SpiffeId::node("other", "onprem", "a").unwrap();
        assert_eq!(
            check_expectation(&expect, &other_td).unwrap_err().kind,
            RejectionKind::WrongIdentity
        );
    }

    #[test]
    fn rejections_are_captured_on_the_thread_that_made_them() {
        let (error, captured) = capture_rejection(malformed);
        assert_eq!(
            rejection_of(&error).map(|r| r.kind),
            Some(RejectionKind::Malformed)
        );
        assert_eq!(captured.map(|r| r.kind), Some(RejectionKind::Malformed));
        // Outside a capture nothing is kept; a nested capture leaves the outer one intact.
        drop(malformed());
        let ((), outer) = capture_rejection(|| {
            drop(reject(PeerRejected::new(RejectionKind::Revoked, "r")));
            let ((), inner) = capture_rejection(|| ());
            assert!(inner.is_none());
        });
        assert_eq!(outer.map(|r| r.kind), Some(RejectionKind::Revoked));
    }

    #[test]
    fn service_and_exact_expectations() {
        let svc = SpiffeId::service("td", "s").unwrap();
        let any = PeerExpectation::AnyService {
            trust_domain: "td".into(),
        };
        assert!(check_expectation(&any, &svc).is_ok());
        assert!(check_expectation(&any, &node("x")).is_err());
        let admin = PeerExpectation::AnyAdmin {
            trust_domain: "td".into(),
        };
        let alice = SpiffeId::admin("td", "alice").unwrap();
        assert!(check_expectation(&admin, &alice).is_ok());
        assert_eq!(
            check_expectation(&admin, &svc).unwrap_err().to_string(),
            "peer is spiffe://td/svc/s but expected an administrator (spiffe://td/admin/NAME)"
        );
        assert!(check_expectation(&admin, &node("x")).is_err());
        assert!(check_expectation(&admin, &SpiffeId::admin("other", "alice").unwrap()).is_err());
        assert!(check_expectation(&any, &alice).is_err());
        let exact = PeerExpectation::Exact(svc.clone());
        assert!(check_expectation(&exact, &svc).is_ok());
        assert_eq!(
            check_expectation(&exact, &SpiffeId::service("td", "t").unwrap())
                .unwrap_err()
                .to_string(),
            "peer is spiffe://td/svc/t but expected spiffe://td/svc/s"
        );
    }
}
