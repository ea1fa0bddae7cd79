//! Human-readable summary of a certificate file for `hybridge-ca inspect`.
//!
//! Parsing and formatting only; registry lookups are the caller's job.

use std::fmt;

use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Why a file could not be summarised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InspectError(pub String);

/// The facts an operator wants from a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateSummary {
    /// Subject DN.
    pub(crate) subject: String,
    /// Issuer DN.
    pub(crate) issuer: String,
    /// Serial, lowercase hex.
    pub serial_hex: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// URI SANs (the SPIFFE id among them).
    pub(crate) uris: Vec<String>,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// IP SANs.
    pub ips: Vec<String>,
    /// Extended key usages by name (`serverAuth`, `clientAuth`, ...); empty when absent.
    pub(crate) extended_key_usage: Vec<String>,
    /// SHA-256 of the DER, colon-separated uppercase hex (as `openssl x509 -fingerprint -sha256`).
    pub(crate) sha256_fingerprint: String,
    /// Whether it is a CA certificate.
    pub(crate) is_ca: bool,
    /// How many certificates the file held (the first is summarised).
    pub(crate) certificates_in_file: usize,
}

/// Summarises the first certificate of a PEM file (DER is accepted too).
pub fn summarize(bytes: &[u8]) -> Result<CertificateSummary, InspectError> {
    let (der, count) = match pem::parse_many(bytes) {
        Ok(blocks) if !blocks.is_empty() => {
            let certs: Vec<_> = blocks
                .into_iter()
                .filter(|b| b.tag() == "CERTIFICATE")
                .collect();
            let count = certs.len();
            let first = certs
                .into_iter()
                .next()
                .ok_or_else(|| InspectError("no CERTIFICATE PEM block found".into()))?;
            (first.into_contents(), count)
        }
        _ => (bytes.to_vec(), 1),
    };
    let (_, cert) = X509Certificate::from_der(&der)
        .map_err(|e| InspectError(format!("not a PEM or DER X.509 certificate: {e}")))?;
    let mut uris = Vec::new();
    let mut dns_names = Vec::new();
    let mut ips = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => uris.push((*u).to_string()),
                GeneralName::DNSName(d) => dns_names.push((*d).to_string()),
                GeneralName::IPAddress(raw) => ips.push(ip_text(raw)),
                _ => {}
            }
        }
    }
    let mut extended_key_usage = Vec::new();
    if let Ok(Some(eku)) = cert.extended_key_usage() {
        let eku = eku.value;
        for (present, name) in [
            (eku.server_auth, "serverAuth"),
            (eku.client_auth, "clientAuth"),
            (eku.code_signing, "codeSigning"),
            (eku.email_protection, "emailProtection"),
            (eku.time_stamping, "timeStamping"),
            (eku.ocsp_signing, "OCSPSigning"),
            (eku.any, "any"),
        ] {
            if present {
                extended_key_usage.push(name.to_string());
            }
        }
    }
    let digest = Sha256::digest(&der);
    let sha256_fingerprint = digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    Ok(CertificateSummary {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial_hex: hex::encode(cert.raw_serial()),
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        uris,
        dns_names,
        ips,
        extended_key_usage,
        sha256_fingerprint,
        is_ca: cert.is_ca(),
        certificates_in_file: count,
    })
}

/// The facts about a CRL a node reports: who made it, which one it is and until when it is
/// current.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrlSummary {
    /// Issuer DN.
    pub issuer: String,
    /// The CRL number (decimal), when the CRL carries one.
    pub number: Option<String>,
    /// When it was made (thisUpdate).
    pub this_update: OffsetDateTime,
    /// When the next one is due (nextUpdate); after it the CRL is stale. `None` when absent
    /// (RFC 5280 requires it; a CRL without one never goes stale).
    pub next_update: Option<OffsetDateTime>,
    /// How many certificates it revokes.
    pub revoked: usize,
}

impl CrlSummary {
    /// Signed seconds from `now` to nextUpdate: positive while current, negative (or zero)
    /// once stale; `None` without a nextUpdate.
    pub fn seconds_to_next_update(&self, now: OffsetDateTime) -> Option<i64> {
        self.next_update.map(|at| (at - now).whole_seconds())
    }

    /// Whether the CRL is past its nextUpdate at `now` (stale from that instant on, as
    /// webpki's expiration check counts it).
    pub fn is_stale(&self, now: OffsetDateTime) -> bool {
        self.next_update.is_some_and(|at| now >= at)
    }
}

/// Summarises one DER-encoded CRL.
pub fn summarize_crl(der: &[u8]) -> Result<CrlSummary, InspectError> {
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der)
        .map_err(|e| InspectError(format!("not a DER X.509 CRL: {e}")))?;
    Ok(CrlSummary {
        issuer: crl.issuer().to_string(),
        number: crl.crl_number().map(ToString::to_string),
        this_update: crl.last_update().to_datetime(),
        next_update: crl.next_update().map(|t| t.to_datetime()),
        revoked: crl.iter_revoked_certificates().count(),
    })
}

fn ip_text(raw: &[u8]) -> String {
    match raw.len() {
        4 => {
            let b: [u8; 4] = [raw[0], raw[1], raw[2], raw[3]];
            std::net::Ipv4Addr::from(b).to_string()
        }
        16 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(raw);
            std::net::Ipv6Addr::from(b).to_string()
        }
        _ => hex::encode(raw),
    }
}

fn time_text(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

impl fmt::Display for CertificateSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(", ")
            }
        };
        writeln!(f, "subject:     {}", self.subject)?;
        writeln!(f, "issuer:      {}", self.issuer)?;
        writeln!(f, "serial:      {}", self.serial_hex)?;
        writeln!(f, "not before:  {}", time_text(self.not_before))?;
        writeln!(f, "not after:   {}", time_text(self.not_after))?;
        writeln!(f, "URI SANs:    {}", list(&self.uris))?;
        writeln!(f, "DNS SANs:    {}", list(&self.dns_names))?;
        writeln!(f, "IP SANs:     {}", list(&self.ips))?;
        writeln!(f, "key usage:   {}", list(&self.extended_key_usage))?;
        writeln!(f, "CA:          {}", if self.is_ca { "yes" } else { "no" })?;
        write!(f, "SHA-256:     {}", self.sha256_fingerprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::{CertificateAuthority, InitOptions};

    #[test]
    fn summarises_issued_node() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::init(dir.path(), "td", InitOptions::default()).unwrap();
        let ips = ["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
        let leaf = ca
            .issue_node(
                "onprem",
                "a",
                &["a.local".into()],
                &ips,
                std::time::Duration::from_secs(3600),
            )
            .unwrap();
        let s = summarize(leaf.cert_chain_pem.as_bytes()).unwrap();
        assert_eq!(s.serial_hex, leaf.serial_hex);
        assert_eq!(s.uris, vec!["spiffe://td/site/onprem/node/a".to_string()]);
        assert_eq!(s.dns_names, vec!["a.local".to_string()]);
        assert_eq!(s.ips, vec!["127.0.0.1".to_string(), "::1".to_string()]);
        assert_eq!(s.certificates_in_file, 2);
        assert_eq!(s.extended_key_usage, ["serverAuth", "clientAuth"]);
        let admin = ca
            .issue_admin("alice", std::time::Duration::from_secs(3600))
            .unwrap();
        let a = summarize(admin.cert_chain_pem.as_bytes()).unwrap();
        assert_eq!(a.uris, ["spiffe://td/admin/alice"]);
        assert_eq!(a.extended_key_usage, ["clientAuth"]);
        assert!(a.to_string().contains("key usage:   clientAuth\n"), "{a}");
        assert!(!s.is_ca);
        assert_eq!(s.issuer, "O=hybridge, CN=hybridge CA td");
        assert_eq!(s.sha256_fingerprint.len(), 32 * 3 - 1);
        assert!(summarize(b"nonsense").is_err());
    }

    #[test]
    fn a_crl_is_stale_from_its_next_update_on() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::init(dir.path(), "td", InitOptions::default()).unwrap();
        let before = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let pem = ca
            .crl_pem_valid_for(std::time::Duration::from_secs(3600))
            .unwrap();
        let der = pem::parse(pem.as_bytes()).unwrap().into_contents();
        let crl = summarize_crl(&der).unwrap();
        assert_eq!(crl.issuer, "O=hybridge, CN=hybridge CA td");
        assert_eq!(crl.revoked, 0);
        assert!(crl.number.is_some());
        let next = crl.next_update.unwrap();
        assert!(next >= before + time::Duration::hours(1), "{next} {before}");
        assert!(crl.this_update < next);
        // Counted against an explicit clock: current before, stale at and after nextUpdate.
        let second = time::Duration::seconds(1);
        assert_eq!(crl.seconds_to_next_update(next - 90 * second), Some(90));
        assert!(!crl.is_stale(next - second));
        assert_eq!(crl.seconds_to_next_update(next), Some(0));
        assert!(crl.is_stale(next));
        assert_eq!(crl.seconds_to_next_update(next + 12 * second), Some(-12));
        assert!(crl.is_stale(next + 12 * second));
        assert!(summarize_crl(b"nonsense").is_err());
    }
}
