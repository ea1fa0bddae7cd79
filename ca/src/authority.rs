//! The on-disk certificate authority: `ca.pem`, `ca.key` (0600) and the `ca.redb` registry.
//!
//! Owns key generation, signing of node/service/administrator certificates and CRLs; it
//! does no TLS.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::files::{self, PUBLIC_MODE, SECRET_MODE, StagedFile};
use crate::registry::Registry;
pub use crate::registry::{
    CertKind, CertStatus, IssuedRecord, Revocation, RevocationReason, UnknownReason,
};
use crate::spiffe::{SpiffeError, SpiffeId, validate_segment};

/// CA certificate file name inside the CA directory.
pub(crate) const CA_CERT_FILE: &str = "ca.pem";
/// CA private key file name inside the CA directory.
pub(crate) const CA_KEY_FILE: &str = "ca.key";
/// Registry file name inside the CA directory.
pub(crate) const REGISTRY_FILE: &str = "ca.redb";

/// How long a CRL from [`CertificateAuthority::crl_pem`] claims to be current.
pub(crate) const DEFAULT_CRL_VALIDITY: Duration = Duration::from_secs(7 * 86_400);

/// Leaf and CA certificates start this far in the past to absorb clock skew between hosts.
const BACKDATE: time::Duration = time::Duration::minutes(5);

/// Everything that can go wrong running the CA; each message names the file or field.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file or directory operation failed.
    #[error("{step} {}: {source}", path.display())]
    Io {
        /// What was being done ("reading CA key", ...).
        step: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// `init` found an existing CA (nothing was changed).
    #[error("a CA already exists in {}; refusing to overwrite it", dir.display())]
    AlreadyInitialized {
        /// The CA directory.
        dir: PathBuf,
    },
    /// `open` found no CA.
    #[error("no CA in {} ({CA_CERT_FILE} not found); run `hybridge-ca init` first", dir.display())]
    NotInitialized {
        /// The CA directory.
        dir: PathBuf,
    },
    /// A CA file exists but cannot be parsed.
    #[error("corrupt {what} {}: {detail}", path.display())]
    Corrupt {
        /// "CA certificate" or "CA key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Parser message.
        detail: String,
    },
    /// `ca.key` is not the key of `ca.pem`.
    #[error("CA key {} does not match CA certificate {}", key.display(), cert.display())]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// The CA certificate is past its `notAfter`.
    #[error("CA certificate {} expired at {not_after}; create a new CA", path.display())]
    Expired {
        /// The certificate file.
        path: PathBuf,
        /// Its end of validity.
        not_after: OffsetDateTime,
    },
    /// A trust domain, site, node or service name is invalid.
    #[error(transparent)]
    InvalidName(#[from] SpiffeError),
    /// A DNS SAN is not a plausible host name.
    #[error("invalid DNS name {0:?}: use letters, digits, '-' and '.' (optionally a leading '*.')")]
    InvalidDnsName(String),
    /// A SPIFFE id from another trust domain was given.
    #[error("{id} is not in this CA's trust domain {expected}")]
    WrongTrustDomain {
        /// The id given.
        id: String,
        /// This CA's trust domain.
        expected: String,
    },
    /// The registry database failed.
    #[error("CA registry {}: {detail}", path.display())]
    Registry {
        /// The `ca.redb` file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// Not a hexadecimal serial number.
    #[error("invalid serial {0:?}: expected hexadecimal digits (colons allowed)")]
    InvalidSerial(String),
    /// No certificate with this serial was ever issued by this CA.
    #[error("no certificate with serial {serial} in {}", path.display())]
    UnknownSerial {
        /// Normalised serial.
        serial: String,
        /// The registry searched.
        path: PathBuf,
    },
    /// The certificate was revoked before.
    #[error("certificate {serial} is already revoked")]
    AlreadyRevoked {
        /// Normalised serial.
        serial: String,
    },
    /// Validity too short or too long.
    #[error("invalid validity: {0}")]
    InvalidValidity(String),
    /// Key generation or signing failed.
    #[error("{step}: {detail}")]
    Signing {
        /// What was being signed.
        step: &'static str,
        /// rcgen's message.
        detail: String,
    },
}

fn io_err<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CaError + 'a {
    move |source| CaError::Io {
        step,
        path: path.to_path_buf(),
        source,
    }
}

fn signing(step: &'static str) -> impl FnOnce(rcgen::Error) -> CaError {
    move |e| CaError::Signing {
        step,
        detail: e.to_string(),
    }
}

/// Algorithm of the CA key (leaf keys use the same one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256 (default: widest support).
    #[default]
    EcdsaP256,
    /// Ed25519.
    Ed25519,
}

impl KeyType {
    fn algorithm(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

/// Options for [`CertificateAuthority::init`].
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// Lifetime of the CA certificate (default 10 years).
    pub validity: Duration,
    /// CA key algorithm (default ECDSA P-256).
    pub key_type: KeyType,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            validity: Duration::from_secs(10 * 365 * 86_400),
            key_type: KeyType::EcdsaP256,
        }
    }
}

/// A freshly issued certificate with its private key, ready to be written or used in memory.
#[derive(Clone)]
pub struct IssuedCertificate {
    /// Serial, lowercase hex.
    pub serial_hex: String,
    /// The identity in the URI SAN.
    pub spiffe_id: SpiffeId,
    /// Leaf certificate followed by the CA certificate, PEM.
    pub cert_chain_pem: String,
    /// PKCS#8 private key, PEM.
    pub key_pem: String,
    /// End of validity.
    pub(crate) not_after: OffsetDateTime,
}

impl std::fmt::Debug for IssuedCertificate {
    // Never print the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("serial_hex", &self.serial_hex)
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl IssuedCertificate {
    /// Writes `PREFIX.pem` (chain) and `PREFIX.key` (0600), each atomically, replacing
    /// older files (renewal). Returns `(pem_path, key_path)`.
    pub fn write(&self, prefix: &Path) -> Result<(PathBuf, PathBuf), CaError> {
        let pem_path = files::with_suffix(prefix, ".pem");
        let key_path = files::with_suffix(prefix, ".key");
        let key = StagedFile::write(&key_path, self.key_pem.as_bytes(), SECRET_MODE)
            .map_err(io_err("writing private key", &key_path))?;
        let pem = StagedFile::write(&pem_path, self.cert_chain_pem.as_bytes(), PUBLIC_MODE)
            .map_err(io_err("writing certificate", &pem_path))?;
        key.commit_replace()
            .map_err(io_err("writing private key", &key_path))?;
        pem.commit_replace()
            .map_err(io_err("writing certificate", &pem_path))?;
        Ok((pem_path, key_path))
    }
}

/// An opened CA directory.
pub struct CertificateAuthority {
    dir: PathBuf,
    trust_domain: String,
    cert_pem: String,
    cert_der: Vec<u8>,
    not_after: OffsetDateTime,
    key: KeyPair,
    registry: Registry,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    // 16 random bytes, first byte in 1..=0x7f: positive, minimal DER, always 32 hex digits.
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::from_slice(&bytes)
}

fn add_validity(now: OffsetDateTime, validity: Duration) -> Result<OffsetDateTime, CaError> {
    let v = time::Duration::try_from(validity)
        .map_err(|_| CaError::InvalidValidity(format!("{validity:?} is too long")))?;
    // Short-lived certificates are legitimate (a CI job, a test of expiry); shorter than
    // this is a typo of units.
    if v < time::Duration::seconds(10) {
        return Err(CaError::InvalidValidity(
            "must be at least 10 seconds".into(),
        ));
    }
    now.checked_add(v)
        .ok_or_else(|| CaError::InvalidValidity(format!("{validity:?} is too long")))
}

fn valid_dns_name(name: &str) -> bool {
    let host = name.strip_prefix("*.").unwrap_or(name);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Normalises an operator-typed serial: strips colons, lowercases, drops leading zero bytes.
pub(crate) fn normalize_serial(serial: &str) -> Result<String, CaError> {
    let cleaned: String = serial
        .trim()
        .chars()
        .filter(|c| *c != ':')
        .flat_map(char::to_lowercase)
        .collect();
    let cleaned = cleaned.strip_prefix("0x").unwrap_or(&cleaned).to_string();
    if cleaned.is_empty() || !cleaned.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CaError::InvalidSerial(serial.to_string()));
    }
    let padded = if cleaned.len() % 2 == 1 {
        format!("0{cleaned}")
    } else {
        cleaned
    };
    // Serials are stored as minimal big-endian bytes; "00ab" and "ab" are the same number.
    let mut trimmed = padded.as_str();
    while trimmed.len() > 2 && trimmed.starts_with("00") {
        trimmed = &trimmed[2..];
    }
    Ok(trimmed.to_string())
}

fn parse_pem_cert(path: &Path, pem_text: &str) -> Result<Vec<u8>, CaError> {
    let corrupt = |detail: String| CaError::Corrupt {
        what: "CA certificate",
        path: path.to_path_buf(),
        detail,
    };
    let block = pem::parse(pem_text).map_err(|e| corrupt(e.to_string()))?;
    if block.tag() != "CERTIFICATE" {
        return Err(corrupt(format!(
            "expected a CERTIFICATE PEM block, found {}",
            block.tag()
        )));
    }
    Ok(block.into_contents())
}

/// The three files of a CA directory.
struct CaFiles {
    cert: PathBuf,
    key: PathBuf,
    registry: PathBuf,
    /// The directory holding them.
    dir: PathBuf,
}

impl CaFiles {
    /// Creates `dir` (mode 0700) if missing and names its files; refuses a directory that
    /// already holds any of them.
    fn in_new_dir(dir: &Path) -> Result<Self, CaError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("creating CA directory", dir))?;
        let files = CaFiles {
            cert: dir.join(CA_CERT_FILE),
            key: dir.join(CA_KEY_FILE),
            registry: dir.join(REGISTRY_FILE),
            dir: dir.to_path_buf(),
        };
        for p in [&files.cert, &files.key, &files.registry] {
            if p.exists() {
                return Err(CaError::AlreadyInitialized {
                    dir: dir.to_path_buf(),
                });
            }
        }
        Ok(files)
    }

    /// Links the staged registry, key and certificate into place, in that order (the
    /// certificate last), none over an existing file, then syncs the directory. Each file
    /// placed is pushed to `placed`, for the caller to remove if a later step fails.
    fn place<'a>(
        &'a self,
        staged_registry: &Path,
        staged_key: StagedFile,
        staged_cert: StagedFile,
        placed: &mut Vec<&'a Path>,
    ) -> Result<(), CaError> {
        let dir = self.dir.as_path();
        let already = |e: io::Error, step, path: &Path| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                CaError::AlreadyInitialized {
                    dir: dir.to_path_buf(),
                }
            } else {
                io_err(step, path)(e)
            }
        };
        fs::hard_link(staged_registry, &self.registry)
            .map_err(|e| already(e, "creating registry", &self.registry))?;
        placed.push(&self.registry);
        staged_key
            .commit_new()
            .map_err(|e| already(e, "writing CA key", &self.key))?;
        placed.push(&self.key);
        staged_cert
            .commit_new()
            .map_err(|e| already(e, "writing CA certificate", &self.cert))?;
        files::sync_dir(dir).map_err(io_err("syncing CA directory", dir))
    }
}

/// A new, empty registry for `trust_domain` written and synced beside the final one in `dir`,
/// under a random hidden name; removed again if that fails.
fn stage_registry(dir: &Path, trust_domain: &str) -> Result<PathBuf, CaError> {
    let staged = dir.join(format!(
        ".{REGISTRY_FILE}.init-{:016x}",
        rand::random::<u64>()
    ));
    let result = Registry::create(&staged, trust_domain).and_then(|_| {
        fs::File::open(&staged)
            .and_then(|f| f.sync_all())
            .map_err(io_err("syncing registry", &staged))
    });
    if let Err(e) = result {
        let _ = fs::remove_file(&staged);
        return Err(e);
    }
    Ok(staged)
}

/// The CA certificate (PEM) of `trust_domain`, self-signed with `key`: a CA for end-entity
/// certificates only (path length 0) carrying the trust domain URI, valid until `not_after`.
fn self_signed_ca_pem(
    key: &KeyPair,
    trust_domain: &str,
    now: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<String, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "hybridge");
    dn.push(DnType::CommonName, format!("hybridge CA {trust_domain}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // SPIFFE convention: a CA carries the trust domain URI.
    let td_uri = format!("spiffe://{trust_domain}");
    params.subject_alt_names = vec![SanType::URI(
        td_uri
            .try_into()
            .map_err(signing("encoding trust domain URI"))?,
    )];
    params.not_before = now - BACKDATE;
    params.not_after = not_after;
    params.serial_number = Some(random_serial());
    params.key_identifier_method = KeyIdMethod::Sha256;
    let cert = params
        .self_signed(key)
        .map_err(signing("self-signing CA certificate"))?;
    Ok(cert.pem())
}

/// The SANs of a leaf certificate: its SPIFFE URI, then each DNS name (refused unless
/// valid), then each IP address.
fn leaf_subject_alt_names(
    id: &SpiffeId,
    dns: &[String],
    ips: &[IpAddr],
) -> Result<Vec<SanType>, CaError> {
    let mut sans = vec![SanType::URI(
        id.to_uri()
            .try_into()
            .map_err(signing("encoding SPIFFE URI"))?,
    )];
    for name in dns {
        if !valid_dns_name(name) {
            return Err(CaError::InvalidDnsName(name.clone()));
        }
        sans.push(SanType::DnsName(
            name.clone()
                .try_into()
                .map_err(|_| CaError::InvalidDnsName(name.clone()))?,
        ));
    }
    sans.extend(ips.iter().copied().map(SanType::IpAddress));
    Ok(sans)
}

/// The parameters of a leaf certificate for `id`, validity and serial aside: its subject
/// (O=hybridge, OU=site for a node or `admin`, CN=`common_name`), `sans`, and the key usages
/// of its kind.
fn leaf_params(id: &SpiffeId, common_name: &str, sans: Vec<SanType>) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "hybridge");
    match id {
        SpiffeId::Node { site, .. } => {
            dn.push(DnType::OrganizationalUnitName, site.clone());
        }
        SpiffeId::Admin { .. } => dn.push(DnType::OrganizationalUnitName, "admin"),
        SpiffeId::Service { .. } => {}
    }
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match id {
        // An administrator only ever connects to a node; a server EKU would let the
        // certificate impersonate a TLS server to anything trusting the CA.
        SpiffeId::Admin { .. } => vec![ExtendedKeyUsagePurpose::ClientAuth],
        SpiffeId::Node { .. } | SpiffeId::Service { .. } => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    };
    params.use_authority_key_identifier_extension = true;
    params
}

impl CertificateAuthority {
    /// Creates a new CA in `dir` (created with mode 0700 if missing). Refuses, leaving
    /// every file untouched, if `dir` already holds any CA file.
    pub fn init(dir: &Path, trust_domain: &str, opts: InitOptions) -> Result<Self, CaError> {
        validate_segment("trust domain", trust_domain)?;
        let now = OffsetDateTime::now_utc();
        let not_after = add_validity(now, opts.validity)?;
        let files = CaFiles::in_new_dir(dir)?;
        let key = KeyPair::generate_for(opts.key_type.algorithm())
            .map_err(signing("generating CA key"))?;
        let cert_pem = self_signed_ca_pem(&key, trust_domain, now, not_after)?;

        // Stage everything first, then link into place; ca.pem goes last because its
        // presence is what marks the directory as an initialised CA.
        let staged_registry = stage_registry(dir, trust_domain)?;
        let cleanup_registry = || {
            let _ = fs::remove_file(&staged_registry);
        };
        let staged_key = StagedFile::write(&files.key, key.serialize_pem().as_bytes(), SECRET_MODE)
            .map_err(io_err("writing CA key", &files.key));
        let staged_cert = StagedFile::write(&files.cert, cert_pem.as_bytes(), PUBLIC_MODE)
            .map_err(io_err("writing CA certificate", &files.cert));
        let (staged_key, staged_cert) = match (staged_key, staged_cert) {
            (Ok(k), Ok(c)) => (k, c),
            (Err(e), _) | (_, Err(e)) => {
                cleanup_registry();
                return Err(e);
            }
        };
        let mut placed: Vec<&Path> = Vec::new();
        let result = files.place(&staged_registry, staged_key, staged_cert, &mut placed);
        cleanup_registry();
        if let Err(e) = result {
            // Only remove what this call created; a concurrent init keeps its files.
            for p in placed {
                let _ = fs::remove_file(p);
            }
            return Err(e);
        }
        Self::open(dir)
    }

    /// Opens an existing CA directory, checking that the certificate parses, the key
    /// matches it, it has not expired and the registry is readable.
    pub fn open(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = match fs::read_to_string(&cert_path) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(CaError::NotInitialized {
                    dir: dir.to_path_buf(),
                });
            }
            Err(e) => return Err(io_err("reading CA certificate", &cert_path)(e)),
        };
        let cert_der = parse_pem_cert(&cert_path, &cert_pem)?;
        let (_, x509) = X509Certificate::from_der(&cert_der).map_err(|e| CaError::Corrupt {
            what: "CA certificate",
            path: cert_path.clone(),
            detail: e.to_string(),
        })?;
        let key_pem = fs::read_to_string(&key_path).map_err(io_err("reading CA key", &key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Corrupt {
            what: "CA key",
            path: key_path.clone(),
            detail: e.to_string(),
        })?;
        if rcgen::PublicKeyData::subject_public_key_info(&key) != x509.public_key().raw {
            return Err(CaError::KeyMismatch {
                key: key_path,
                cert: cert_path,
            });
        }
        let not_after = x509.validity().not_after.to_datetime();
        if not_after < OffsetDateTime::now_utc() {
            return Err(CaError::Expired {
                path: cert_path,
                not_after,
            });
        }
        let (registry, trust_domain) = Registry::open(&dir.join(REGISTRY_FILE))?;
        drop(x509);
        Ok(CertificateAuthority {
            dir: dir.to_path_buf(),
            trust_domain,
            cert_pem,
            cert_der,
            not_after,
            key,
            registry,
        })
    }

    /// The trust domain every issued id lives in.
    pub(crate) fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificate, PEM (the trust bundle for nodes).
    pub fn ca_cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// End of the CA certificate's validity; leaves never outlive it.
    pub(crate) fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Issues a node certificate for `spiffe://TD/site/SITE/node/NAME` (server+client auth),
    /// with a new random serial (issuing again renews; older certificates stay valid).
    /// Validity is capped at the CA's own `not_after`.
    pub fn issue_node(
        &self,
        site: &str,
        name: &str,
        dns: &[String],
        ips: &[IpAddr],
        validity: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        let id = SpiffeId::node(&self.trust_domain, site, name)?;
        self.issue(id, name, dns, ips, validity)
    }

    /// Issues a service certificate for `spiffe://TD/svc/NAME` (server+client auth);
    /// renewal and validity as for [`Self::issue_node`].
    pub fn issue_service(
        &self,
        name: &str,
        dns: &[String],
        validity: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        let id = SpiffeId::service(&self.trust_domain, name)?;
        self.issue(id, name, dns, &[], validity)
    }

    /// Issues an administrator certificate for `spiffe://TD/admin/NAME`: clientAuth only (an
    /// administrator never serves TLS), accepted by a node's remote admin listener. Renewal
    /// and validity as for [`Self::issue_node`].
    pub fn issue_admin(
        &self,
        name: &str,
        validity: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        let id = SpiffeId::admin(&self.trust_domain, name)?;
        self.issue(id, name, &[], &[], validity)
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, CaError> {
        Issuer::from_ca_cert_der(&self.cert_der.clone().into(), &self.key)
            .map_err(signing("loading CA certificate as issuer"))
    }

    fn issue(
        &self,
        id: SpiffeId,
        common_name: &str,
        dns: &[String],
        ips: &[IpAddr],
        validity: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        // Certificates carry whole seconds; keep the returned not_after equal to the cert's.
        let now = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap_or_else(|_| OffsetDateTime::now_utc());
        if self.not_after < now {
            return Err(CaError::Expired {
                path: self.dir.join(CA_CERT_FILE),
                not_after: self.not_after,
            });
        }
        let not_after = add_validity(now, validity)?.min(self.not_after);

        let sans = leaf_subject_alt_names(&id, dns, ips)?;
        let mut params = leaf_params(&id, common_name, sans);
        params.not_before = now - BACKDATE;
        params.not_after = not_after;
        let serial = random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);

        let leaf_key =
            KeyPair::generate_for(self.key.algorithm()).map_err(signing("generating key"))?;
        let cert = params
            .signed_by(&leaf_key, &self.issuer()?)
            .map_err(signing("signing certificate"))?;
        let subject = X509Certificate::from_der(cert.der())
            .map(|(_, c)| c.subject().to_string())
            .map_err(|e| CaError::Signing {
                step: "re-reading issued certificate",
                detail: e.to_string(),
            })?;

        self.registry.insert(&IssuedRecord {
            serial_hex: serial_hex.clone(),
            subject,
            spiffe_id: id.to_uri(),
            kind: match id {
                SpiffeId::Node { .. } => CertKind::Node,
                SpiffeId::Service { .. } => CertKind::Service,
                SpiffeId::Admin { .. } => CertKind::Admin,
            },
            not_before: params.not_before,
            not_after,
            revocation: None,
        })?;

        let mut chain = cert.pem();
        chain.push_str(&self.cert_pem);
        Ok(IssuedCertificate {
            serial_hex,
            spiffe_id: id,
            cert_chain_pem: chain,
            key_pem: leaf_key.serialize_pem(),
            not_after,
        })
    }

    /// Revokes one certificate by serial (hex, colons and case ignored).
    pub fn revoke_serial(&self, serial_hex: &str, reason: RevocationReason) -> Result<(), CaError> {
        let serial = normalize_serial(serial_hex)?;
        let revoked = self
            .registry
            .revoke_where(reason, OffsetDateTime::now_utc(), |r| {
                r.serial_hex == serial
            })?;
        if !revoked.is_empty() {
            return Ok(());
        }
        if self.list()?.iter().any(|r| r.serial_hex == serial) {
            Err(CaError::AlreadyRevoked { serial })
        } else {
            Err(CaError::UnknownSerial {
                serial,
                path: self.registry.path().to_path_buf(),
            })
        }
    }

    /// Revokes every still-valid (not expired, not revoked) certificate for `id`;
    /// returns how many were revoked.
    pub fn revoke_spiffe(&self, id: &SpiffeId, reason: RevocationReason) -> Result<usize, CaError> {
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::WrongTrustDomain {
                id: id.to_uri(),
                expected: self.trust_domain.clone(),
            });
        }
        let uri = id.to_uri();
        let now = OffsetDateTime::now_utc();
        let revoked = self.registry.revoke_where(reason, now, |r| {
            r.spiffe_id == uri && r.status_at(now) == CertStatus::Valid
        })?;
        Ok(revoked.len())
    }

    /// Every certificate this CA issued, oldest first.
    pub fn list(&self) -> Result<Vec<IssuedRecord>, CaError> {
        self.registry.list()
    }

    /// The record for one serial, if issued here.
    pub(crate) fn find_serial(&self, serial_hex: &str) -> Result<Option<IssuedRecord>, CaError> {
        let serial = normalize_serial(serial_hex)?;
        Ok(self.list()?.into_iter().find(|r| r.serial_hex == serial))
    }

    /// A signed CRL (PEM) listing every revoked certificate, valid for
    /// [`DEFAULT_CRL_VALIDITY`], with a CRL number one higher than the last.
    pub fn crl_pem(&self) -> Result<String, CaError> {
        self.crl_pem_valid_for(DEFAULT_CRL_VALIDITY)
    }

    /// Like [`Self::crl_pem`] with an explicit nextUpdate distance.
    pub fn crl_pem_valid_for(&self, validity: Duration) -> Result<String, CaError> {
        let now = OffsetDateTime::now_utc();
        let next_update = add_validity(now, validity)?;
        let mut revoked_certs = Vec::new();
        for record in self.list()? {
            if let Some(rev) = &record.revocation {
                let bytes = hex::decode(&record.serial_hex).map_err(|_| CaError::Registry {
                    path: self.registry.path().to_path_buf(),
                    detail: format!("record {} has a non-hex serial", record.serial_hex),
                })?;
                revoked_certs.push(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&bytes),
                    revocation_time: rev.at,
                    reason_code: Some(rev.reason.to_rcgen()),
                    invalidity_date: None,
                });
            }
        }
        let number = self.registry.next_crl_number()?;
        let number_bytes = number.to_be_bytes();
        let first = number_bytes.iter().position(|b| *b != 0).unwrap_or(7);
        let mut crl_number = number_bytes[first..].to_vec();
        if crl_number[0] & 0x80 != 0 {
            crl_number.insert(0, 0);
        }
        let params = CertificateRevocationListParams {
            this_update: now - BACKDATE,
            next_update,
            crl_number: SerialNumber::from_slice(&crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer()?)
            .map_err(signing("signing CRL"))?;
        crl.pem().map_err(signing("encoding CRL"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shareable_across_tasks() {
        // `hybridge dev` keeps one CA behind an Arc and issues from several tasks.
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CertificateAuthority>();
        assert_send_sync::<IssuedCertificate>();
    }

    #[test]
    fn concurrent_issues_in_one_process_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let ca = std::sync::Arc::new(
            CertificateAuthority::init(dir.path(), "td", InitOptions::default()).unwrap(),
        );
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let ca = ca.clone();
                std::thread::spawn(move || {
                    ca.issue_service(&format!("s{i}"), &[], Duration::from_secs(600))
                        .unwrap()
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(ca.list().unwrap().len(), 4);
    }

    #[test]
    fn serials_normalise() {
        assert_eq!(normalize_serial("0A:BC").unwrap(), "0abc");
        assert_eq!(normalize_serial("00ab").unwrap(), "ab");
        assert_eq!(normalize_serial("abc").unwrap(), "0abc");
        assert!(normalize_serial("xyz").is_err());
        assert!(normalize_serial("").is_err());
    }

    #[test]
    fn dns_names_checked() {
        assert!(valid_dns_name("edge-1.corp.example"));
        assert!(valid_dns_name("*.corp.example"));
        assert!(valid_dns_name("localhost"));
        assert!(!valid_dns_name("bad name"));
        assert!(!valid_dns_name("-a.example"));
        assert!(!valid_dns_name("a..b"));
        assert!(!valid_dns_name(""));
    }

    #[test]
    fn init_issue_revoke_in_process() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let ca =
            CertificateAuthority::init(&ca_dir, "corp.example", InitOptions::default()).unwrap();
        assert_eq!(ca.trust_domain(), "corp.example");
        let a = ca
            .issue_service("billing", &[], Duration::from_secs(3600))
            .unwrap();
        let b = ca
            .issue_service("billing", &[], Duration::from_secs(3600))
            .unwrap();
        assert_ne!(a.serial_hex, b.serial_hex);
        assert_eq!(a.serial_hex.len(), 32);
        assert!(a.cert_chain_pem.ends_with(&ca.ca_cert_pem()));
        let list = ca.list().unwrap();
        assert_eq!(list.len(), 2);
        assert!(list.iter().all(|r| r.status() == CertStatus::Valid));
        assert!(list.iter().all(|r| r.kind == CertKind::Service));
        assert_eq!(list[0].subject, "O=hybridge, CN=billing");

        ca.revoke_serial(
            &a.serial_hex.to_uppercase(),
            RevocationReason::KeyCompromise,
        )
        .unwrap();
        assert!(matches!(
            ca.revoke_serial(&a.serial_hex, RevocationReason::KeyCompromise),
            Err(CaError::AlreadyRevoked { .. })
        ));
        let n = ca
            .revoke_spiffe(&b.spiffe_id, RevocationReason::Superseded)
            .unwrap();
        assert_eq!(n, 1);
        let rec = ca.find_serial(&a.serial_hex).unwrap().unwrap();
        assert_eq!(
            rec.revocation.unwrap().reason,
            RevocationReason::KeyCompromise
        );
        let err = ca
            .revoke_serial("deadbeef", RevocationReason::Unspecified)
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("no certificate with serial deadbeef in ")
        );

        // Reopening sees the same state.
        drop(ca);
        let ca = CertificateAuthority::open(&ca_dir).unwrap();
        assert_eq!(ca.list().unwrap().len(), 2);
        assert!(
            ca.crl_pem()
                .unwrap()
                .starts_with("-----BEGIN X509 CRL-----")
        );
    }

    #[test]
    fn admin_certificates_are_client_only_and_listed_as_admin() {
        let dir = tempfile::tempdir().unwrap();
        let ca =
            CertificateAuthority::init(dir.path(), "corp.example", InitOptions::default()).unwrap();
        let alice = ca.issue_admin("alice", Duration::from_secs(3600)).unwrap();
        assert_eq!(
            alice.spiffe_id.to_uri(),
            "spiffe://corp.example/admin/alice"
        );
        let list = ca.list().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].kind, CertKind::Admin);
        assert_eq!(list[0].kind.as_str(), "admin");
        assert_eq!(list[0].subject, "O=hybridge, OU=admin, CN=alice");
        let pem = pem::parse(&alice.cert_chain_pem).unwrap();
        let (_, cert) = X509Certificate::from_der(pem.contents()).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth, "{eku:?}");
        assert!(matches!(
            ca.issue_admin("Alice Smith", Duration::from_secs(3600)),
            Err(CaError::InvalidName(_))
        ));
        let n = ca
            .revoke_spiffe(&alice.spiffe_id, RevocationReason::PrivilegeWithdrawn)
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn open_reports_missing_and_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let err = CertificateAuthority::open(dir.path()).unwrap_err();
        assert!(matches!(err, CaError::NotInitialized { .. }), "{err}");
        fs::write(dir.path().join(CA_CERT_FILE), "garbage").unwrap();
        let err = CertificateAuthority::open(dir.path()).unwrap_err();
        assert!(
            err.to_string().starts_with("corrupt CA certificate "),
            "{err}"
        );
    }

    #[test]
    fn ed25519_ca_issues() {
        let dir = tempfile::tempdir().unwrap();
        let opts = InitOptions {
            key_type: KeyType::Ed25519,
            ..InitOptions::default()
        };
        let ca = CertificateAuthority::init(dir.path(), "td", opts).unwrap();
        let leaf = ca
            .issue_node(
                "onprem",
                "a",
                &["a.local".into()],
                &[],
                Duration::from_secs(600),
            )
            .unwrap();
        assert_eq!(leaf.spiffe_id.to_uri(), "spiffe://td/site/onprem/node/a");
    }

    #[test]
    fn invalid_names_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::init(dir.path(), "td", InitOptions::default()).unwrap();
        let err = ca
            .issue_node("Bad Site", "a", &[], &[], Duration::from_secs(600))
            .unwrap_err();
        assert!(
            err.to_string().starts_with("invalid site \"Bad Site\""),
            "{err}"
        );
        assert!(
            CertificateAuthority::init(&dir.path().join("x"), "TD", InitOptions::default())
                .is_err()
        );
    }
}
