//! Loading PEM TLS material and building rustls server/client configs that require
//! mutual TLS against the hybridge CA, its CRLs and an expected SPIFFE id.
//!
//! Always uses the ring provider explicitly; never touches a process-default provider.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::{ClientConfig, ServerConfig, SupportedProtocolVersion};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::spiffe::SpiffeId;
use crate::verify::{HybridgeClientVerifier, HybridgeServerVerifier, PeerPolicy};
pub use crate::verify::{PeerRejected, PeerRole, RejectionKind, capture_rejection, rejection_of};

/// Errors loading material or building configs; each names the file (when there is one) and the step.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A problem with a specific file.
    #[error("{step} {}: {detail}", path.display())]
    File {
        /// What was being done ("reading CA bundle", "parsing private key", ...).
        step: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// A problem with in-memory PEM material.
    #[error("{step}: {detail}")]
    Material {
        /// What was being done.
        step: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// A certificate has no usable SPIFFE id.
    #[error("{0}")]
    Identity(String),
    /// rustls refused the configuration.
    #[error("building TLS config: {0}")]
    Config(#[from] rustls::Error),
}

/// Which of the inputs a step concerns; lets `load` and `from_pem` share parsing but
/// report file paths or in-memory labels.
#[derive(Clone, Copy)]
enum Input {
    CaBundle,
    Chain,
    Key,
    Crl,
}

impl Input {
    fn parse_step(self) -> &'static str {
        match self {
            Input::CaBundle => "parsing CA bundle",
            Input::Chain => "parsing certificate chain",
            Input::Key => "parsing private key",
            Input::Crl => "parsing CRL",
        }
    }
}

struct StepError {
    input: Input,
    step: &'static str,
    detail: String,
}

impl StepError {
    fn parse(input: Input, detail: impl fmt::Display) -> Self {
        StepError {
            input,
            step: input.parse_step(),
            detail: detail.to_string(),
        }
    }
}

/// Trust bundle, own chain and key, CRLs and own identity, ready for [`server_config`]
/// and [`client_config`].
pub struct TlsMaterial {
    /// Trusted CA certificates.
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// Our certificate first, then any further chain certificates.
    pub chain: Vec<CertificateDer<'static>>,
    /// Our private key (matches `chain[0]`).
    pub key: PrivateKeyDer<'static>,
    /// CRLs applied to peers.
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    /// The SPIFFE id in our own certificate.
    pub own_id: SpiffeId,
    /// What peer checks do once a CRL is past its nextUpdate; [`CrlStale::Warn`] as loaded.
    pub crl_stale: CrlStale,
}

/// What peer checks built from [`TlsMaterial`] do with a CRL past its nextUpdate
/// (`tls.crl_stale` in the node config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrlStale {
    /// Keep checking peers against it (fail-open): an outdated CRL still lists everything
    /// revoked before it was made, and refusing every peer because a refresh was late would
    /// turn a missed chore into an outage. The node warns.
    #[default]
    Warn,
    /// Refuse every peer while any CRL in force is past its nextUpdate (fail-closed): a
    /// revocation made since cannot be known.
    Refuse,
}

impl CrlStale {
    /// `"warn"` or `"refuse"`, as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            CrlStale::Warn => "warn",
            CrlStale::Refuse => "refuse",
        }
    }
}

impl fmt::Debug for TlsMaterial {
    // Never print the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("own_id", &self.own_id)
            .field("ca_certs", &self.ca_certs.len())
            .field("chain", &self.chain.len())
            .field("crls", &self.crls.len())
            .field("crl_stale", &self.crl_stale)
            .finish_non_exhaustive()
    }
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        TlsMaterial {
            ca_certs: self.ca_certs.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            crls: self.crls.clone(),
            own_id: self.own_id.clone(),
            crl_stale: self.crl_stale,
        }
    }
}

fn read_file(path: &Path, step: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        step,
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsMaterial {
    /// Reads and checks PEM files: the CA bundle, our chain (leaf first), our key and,
    /// if configured, a CRL file (which must then exist). Checks the key matches the
    /// leaf, the leaf chains to the bundle and is in date, and the leaf has a SPIFFE id.
    pub fn load(
        ca_bundle: &Path,
        cert: &Path,
        key: &Path,
        crl: Option<&Path>,
    ) -> Result<Self, TlsError> {
        let ca_pem = read_file(ca_bundle, "reading CA bundle")?;
        let chain_pem = read_file(cert, "reading certificate")?;
        let key_pem = read_file(key, "reading private key")?;
        let crl_pem = match crl {
            Some(p) => Some(read_file(p, "reading CRL")?),
            None => None,
        };
        Self::parse(&ca_pem, &chain_pem, &key_pem, crl_pem.as_deref()).map_err(|e| {
            let path = match e.input {
                Input::CaBundle => ca_bundle,
                Input::Chain => cert,
                Input::Key => key,
                Input::Crl => crl.unwrap_or(ca_bundle),
            };
            TlsError::File {
                step: e.step,
                path: path.to_path_buf(),
                detail: e.detail,
            }
        })
    }

    /// Same checks as [`Self::load`] on in-memory PEM (as produced by the CA library).
    pub fn from_pem(
        ca_pem: &str,
        chain_pem: &str,
        key_pem: &str,
        crl_pem: Option<&str>,
    ) -> Result<Self, TlsError> {
        Self::parse(
            ca_pem.as_bytes(),
            chain_pem.as_bytes(),
            key_pem.as_bytes(),
            crl_pem.map(str::as_bytes),
        )
        .map_err(|e| TlsError::Material {
            step: e.step,
            detail: e.detail,
        })
    }

    fn parse(
        ca_pem: &[u8],
        chain_pem: &[u8],
        key_pem: &[u8],
        crl_pem: Option<&[u8]>,
    ) -> Result<Self, StepError> {
        let ca_certs = parse_certs(ca_pem).map_err(|e| StepError::parse(Input::CaBundle, e))?;
        let chain = parse_certs(chain_pem).map_err(|e| StepError::parse(Input::Chain, e))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| StepError::parse(Input::Key, format!("no usable private key: {e}")))?;
        let mut crls = Vec::new();
        if let Some(pem) = crl_pem {
            for item in CertificateRevocationListDer::pem_slice_iter(pem) {
                crls.push(item.map_err(|e| StepError::parse(Input::Crl, e))?);
            }
            if crls.is_empty() {
                return Err(StepError::parse(Input::Crl, "no X509 CRL PEM block found"));
            }
            for crl in &crls {
                webpki::OwnedCertRevocationList::from_der(crl.as_ref())
                    .map_err(|e| StepError::parse(Input::Crl, format!("invalid CRL: {e}")))?;
            }
        }

        let provider = provider();
        let certified =
            rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider)
                .map_err(|e| StepError {
                    input: Input::Key,
                    step: "checking private key against certificate",
                    detail: match e {
                        rustls::Error::InconsistentKeys(_) => {
                            "key does not match the certificate".to_string()
                        }
                        other => other.to_string(),
                    },
                })?;
        drop(certified);

        let own_id = spiffe_id_of(&chain[0]).map_err(|e| StepError {
            input: Input::Chain,
            step: "reading SPIFFE id",
            detail: e.to_string(),
        })?;

        let material = TlsMaterial {
            ca_certs,
            chain,
            key,
            crls,
            own_id,
            // Our own certificate is checked below whatever the policy: a stale CRL must not
            // stop a node from loading its material (the node reports and applies staleness).
            crl_stale: CrlStale::Warn,
        };
        // Catch a certificate from another CA, or an expired one, at load time with a
        // message naming the file, instead of at the first handshake.
        let policy = PeerPolicy::new(
            &material,
            PeerExpectation::Exact(material.own_id.clone()),
            &provider,
        )
        .map_err(|e| StepError::parse(Input::CaBundle, e))?;
        policy
            .verify(
                &material.chain[0],
                &material.chain[1..],
                UnixTime::now(),
                PeerRole::Client,
            )
            .map_err(|e| StepError {
                input: Input::Chain,
                step: "checking certificate against CA bundle and CRL",
                detail: e.to_string(),
            })?;
        Ok(material)
    }
}

fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut out = Vec::new();
    for item in CertificateDer::pem_slice_iter(pem) {
        out.push(item.map_err(|e| e.to_string())?);
    }
    if out.is_empty() {
        return Err("no CERTIFICATE PEM block found".into());
    }
    for (i, cert) in out.iter().enumerate() {
        X509Certificate::from_der(cert.as_ref())
            .map_err(|e| format!("certificate #{} is not valid X.509: {e}", i + 1))?;
    }
    Ok(out)
}

/// Which peers a config accepts.
#[derive(Clone, Debug)]
pub enum PeerExpectation {
    /// Any node of one of these sites (any site if empty) in the trust domain.
    NodeOfSites {
        /// Required trust domain.
        trust_domain: String,
        /// Accepted sites.
        sites: Vec<String>,
    },
    /// Any service in the trust domain.
    AnyService {
        /// Required trust domain.
        trust_domain: String,
    },
    /// Any administrator (`spiffe://TD/admin/NAME`) in the trust domain: what a node's remote
    /// admin listener accepts. Node and service certificates are refused.
    AnyAdmin {
        /// Required trust domain.
        trust_domain: String,
    },
    /// Exactly this identity.
    Exact(SpiffeId),
}

/// Server config that REQUIRES a client certificate chaining to the CA, within its
/// validity, with clientAuth EKU, not revoked by the CRLs, whose SPIFFE id meets `expect`.
/// TLS 1.3 only when `tls13_only`, otherwise TLS 1.2 and 1.3.
pub fn server_config(
    m: &TlsMaterial,
    expect: PeerExpectation,
    alpn: &[&[u8]],
    tls13_only: bool,
) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let policy = PeerPolicy::new(m, expect, &provider).map_err(|detail| TlsError::Material {
        step: "building client certificate verifier",
        detail,
    })?;
    let versions: &[&'static SupportedProtocolVersion] = if tls13_only {
        &[&rustls::version::TLS13]
    } else {
        rustls::ALL_VERSIONS
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_client_cert_verifier(Arc::new(HybridgeClientVerifier { policy }))
        .with_single_cert(m.chain.clone(), m.key.clone_key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// TLS 1.3 client config presenting our chain and verifying the server like
/// [`server_config`] does (serverAuth EKU); the server name is not checked.
pub fn client_config(
    m: &TlsMaterial,
    expect: PeerExpectation,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let policy = PeerPolicy::new(m, expect, &provider).map_err(|detail| TlsError::Material {
        step: "building server certificate verifier",
        detail,
    })?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(HybridgeServerVerifier { policy }))
        .with_client_auth_cert(m.chain.clone(), m.key.clone_key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Runs the same checks the verifiers run, at a chosen time (for tools and tests).
/// `chain` is the peer's chain, leaf first.
pub fn verify_peer_chain(
    m: &TlsMaterial,
    expect: PeerExpectation,
    chain: &[CertificateDer<'_>],
    now: UnixTime,
    role: PeerRole,
) -> Result<SpiffeId, rustls::Error> {
    PeerChecker::new(m, expect)
        .map_err(|e| rustls::Error::General(e.to_string()))?
        .check(chain, now, role)
}

/// The checks the verifiers run (chain to the CA bundle, validity at a time, EKU, CRLs,
/// expected identity), built once from one set of material so live connections can be
/// checked again when the CA bundle or CRL changes, or when a certificate expires.
pub struct PeerChecker {
    policy: PeerPolicy,
}

impl PeerChecker {
    pub fn new(m: &TlsMaterial, expect: PeerExpectation) -> Result<Self, TlsError> {
        let policy =
            PeerPolicy::new(m, expect, &provider()).map_err(|detail| TlsError::Material {
                step: "building the peer certificate checker",
                detail,
            })?;
        Ok(Self { policy })
    }

    /// Checks `chain` (leaf first) at `now`; the error names the failed check.
    pub fn check(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
        role: PeerRole,
    ) -> Result<SpiffeId, rustls::Error> {
        let (leaf, rest) = chain
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        self.policy.verify(leaf, rest, now, role)
    }
}

/// The SPIFFE id in a (peer's) certificate: its single `spiffe://` URI SAN.
pub fn peer_spiffe_id(cert: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    spiffe_id_of(cert)
}

pub(crate) fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    let (_, x509) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| TlsError::Identity(format!("certificate is not valid X.509: {e}")))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| {
            TlsError::Identity(format!("certificate has a malformed subjectAltName: {e}"))
        })?
        .ok_or_else(|| TlsError::Identity("certificate has no subjectAltName".into()))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => SpiffeId::parse(one).map_err(|e| TlsError::Identity(e.to_string())),
        [] => Err(TlsError::Identity(
            "certificate has no spiffe:// URI SAN".into(),
        )),
        _ => Err(TlsError::Identity(
            "certificate has more than one spiffe:// URI SAN".into(),
        )),
    }
}
