//! The redb registry (`ca.redb`) of every certificate the CA issued, and the CRL counter.
//!
//! Storage only: it records and flips status; it never signs anything (see `authority`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::authority::CaError;

/// serial (lowercase hex) -> JSON of [`StoredRecord`].
const CERTIFICATES: TableDefinition<&str, &str> = TableDefinition::new("certificates");
/// Small settings: `trust_domain`.
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// Monotonic counters: `crl_number`.
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// Why a certificate was revoked (RFC 5280 reason codes hybridge offers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevocationReason {
    /// No reason given.
    Unspecified,
    /// The private key leaked or may have.
    KeyCompromise,
    /// The CA key leaked or may have.
    CaCompromise,
    /// The holder changed role or owner.
    AffiliationChanged,
    /// Replaced by a newer certificate.
    Superseded,
    /// The node or service was retired.
    CessationOfOperation,
    /// Access was withdrawn.
    PrivilegeWithdrawn,
}

impl RevocationReason {
    const ALL: [(RevocationReason, &'static str); 7] = [
        (RevocationReason::Unspecified, "unspecified"),
        (RevocationReason::KeyCompromise, "key-compromise"),
        (RevocationReason::CaCompromise, "ca-compromise"),
        (RevocationReason::AffiliationChanged, "affiliation-changed"),
        (RevocationReason::Superseded, "superseded"),
        (
            RevocationReason::CessationOfOperation,
            "cessation-of-operation",
        ),
        (RevocationReason::PrivilegeWithdrawn, "privilege-withdrawn"),
    ];

    /// Kebab-case name used on the command line and in JSON.
    pub(crate) fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(r, _)| *r == self)
            .map_or("unspecified", |(_, s)| s)
    }

    pub(crate) fn to_rcgen(self) -> rcgen::RevocationReason {
        match self {
            RevocationReason::Unspecified => rcgen::RevocationReason::Unspecified,
            RevocationReason::KeyCompromise => rcgen::RevocationReason::KeyCompromise,
            RevocationReason::CaCompromise => rcgen::RevocationReason::CaCompromise,
            RevocationReason::AffiliationChanged => rcgen::RevocationReason::AffiliationChanged,
            RevocationReason::Superseded => rcgen::RevocationReason::Superseded,
            RevocationReason::CessationOfOperation => rcgen::RevocationReason::CessationOfOperation,
            RevocationReason::PrivilegeWithdrawn => rcgen::RevocationReason::PrivilegeWithdrawn,
        }
    }
}

impl fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for an unknown revocation reason name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown revocation reason {0:?} (use unspecified, key-compromise, ca-compromise, affiliation-changed, superseded, cessation-of-operation or privilege-withdrawn)"
)]
pub struct UnknownReason(pub String);

impl FromStr for RevocationReason {
    type Err = UnknownReason;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Accept the kebab-case names and the RFC 5280 camelCase spellings.
        let folded: String = s
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .flat_map(char::to_lowercase)
            .collect();
        Self::ALL
            .iter()
            .find(|(_, name)| name.replace('-', "") == folded)
            .map(|(r, _)| *r)
            .ok_or_else(|| UnknownReason(s.to_string()))
    }
}

/// What an issued certificate identifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertKind {
    /// A bridge node (`spiffe://TD/site/SITE/node/NAME`).
    Node,
    /// A service (`spiffe://TD/svc/NAME`).
    Service,
    /// An administrator (`spiffe://TD/admin/NAME`).
    Admin,
}

impl CertKind {
    /// `"node"`, `"service"` or `"admin"`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CertKind::Node => "node",
            CertKind::Service => "service",
            CertKind::Admin => "admin",
        }
    }
}

/// When and why a certificate was revoked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    /// Reason given by the operator.
    pub(crate) reason: RevocationReason,
    /// When the CA processed the revocation.
    pub(crate) at: OffsetDateTime,
}

/// Current standing of an issued certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertStatus {
    /// Within its validity period and not revoked.
    Valid,
    /// Past `not_after` (and not revoked).
    Expired,
    /// Revoked; it stays in every CRL.
    Revoked,
}

impl CertStatus {
    /// `"valid"`, `"expired"` or `"revoked"`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CertStatus::Valid => "valid",
            CertStatus::Expired => "expired",
            CertStatus::Revoked => "revoked",
        }
    }
}

/// One row of the registry: a certificate the CA issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedRecord {
    /// Serial number, lowercase hex without separators.
    pub(crate) serial_hex: String,
    /// Subject distinguished name, as text.
    pub(crate) subject: String,
    /// The URI SAN.
    pub(crate) spiffe_id: String,
    /// Node, service or administrator.
    pub(crate) kind: CertKind,
    /// Start of validity.
    pub(crate) not_before: OffsetDateTime,
    /// End of validity.
    pub(crate) not_after: OffsetDateTime,
    /// Set once revoked.
    pub(crate) revocation: Option<Revocation>,
}

impl IssuedRecord {
    /// Status at `now`; revocation wins over expiry.
    pub(crate) fn status_at(&self, now: OffsetDateTime) -> CertStatus {
        if self.revocation.is_some() {
            CertStatus::Revoked
        } else if now > self.not_after {
            CertStatus::Expired
        } else {
            CertStatus::Valid
        }
    }

    /// Status now.
    pub(crate) fn status(&self) -> CertStatus {
        self.status_at(OffsetDateTime::now_utc())
    }
}

/// On-disk form: plain integers so the file does not depend on a date format.
#[derive(Serialize, Deserialize)]
struct StoredRecord {
    subject: String,
    spiffe_id: String,
    kind: CertKind,
    not_before_unix: i64,
    not_after_unix: i64,
    revoked_reason: Option<RevocationReason>,
    revoked_at_unix: Option<i64>,
}

impl StoredRecord {
    fn from_record(r: &IssuedRecord) -> Self {
        StoredRecord {
            subject: r.subject.clone(),
            spiffe_id: r.spiffe_id.clone(),
            kind: r.kind,
            not_before_unix: r.not_before.unix_timestamp(),
            not_after_unix: r.not_after.unix_timestamp(),
            revoked_reason: r.revocation.as_ref().map(|x| x.reason),
            revoked_at_unix: r.revocation.as_ref().map(|x| x.at.unix_timestamp()),
        }
    }

    fn into_record(self, serial_hex: &str) -> Option<IssuedRecord> {
        let ts = |t| OffsetDateTime::from_unix_timestamp(t).ok();
        let revocation = match (self.revoked_reason, self.revoked_at_unix) {
            (Some(reason), Some(at)) => Some(Revocation {
                reason,
                at: ts(at)?,
            }),
            _ => None,
        };
        Some(IssuedRecord {
            serial_hex: serial_hex.to_string(),
            subject: self.subject,
            spiffe_id: self.spiffe_id,
            kind: self.kind,
            not_before: ts(self.not_before_unix)?,
            not_after: ts(self.not_after_unix)?,
            revocation,
        })
    }
}

/// Handle on `ca.redb`. The database is opened per operation so the CLI, the
/// daemon's `dev` mode and tests never hold its lock longer than one transaction;
/// operations through one handle (and its clones) are serialised by a mutex, because
/// redb refuses a second open of the same file within a process.
#[derive(Clone, Debug)]
pub(crate) struct Registry {
    path: PathBuf,
    lock: Arc<Mutex<()>>,
}

fn storage<'a>(path: &'a Path, step: &'static str) -> impl Fn(&dyn fmt::Display) -> CaError + 'a {
    move |e| CaError::Registry {
        path: path.to_path_buf(),
        detail: format!("{step}: {e}"),
    }
}

impl Registry {
    /// Creates a new registry file (the caller ensured nothing is there) recording the trust domain.
    pub(crate) fn create(path: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let db = Database::create(path).map_err(|e| storage(path, "creating database")(&e))?;
        let txn = db
            .begin_write()
            .map_err(|e| storage(path, "starting transaction")(&e))?;
        {
            let err = storage(path, "initialising tables");
            let mut meta = txn.open_table(META).map_err(|e| err(&e))?;
            meta.insert("trust_domain", trust_domain)
                .map_err(|e| err(&e))?;
            txn.open_table(CERTIFICATES).map_err(|e| err(&e))?;
            let mut counters = txn.open_table(COUNTERS).map_err(|e| err(&e))?;
            counters.insert("crl_number", 0).map_err(|e| err(&e))?;
        }
        txn.commit().map_err(|e| storage(path, "committing")(&e))?;
        Ok(Registry {
            path: path.to_path_buf(),
            lock: Arc::default(),
        })
    }

    /// Opens an existing registry and returns it with the recorded trust domain.
    pub(crate) fn open(path: &Path) -> Result<(Self, String), CaError> {
        if !path.exists() {
            return Err(CaError::Registry {
                path: path.to_path_buf(),
                detail: "registry file is missing".into(),
            });
        }
        let reg = Registry {
            path: path.to_path_buf(),
            lock: Arc::default(),
        };
        let td = reg.trust_domain()?;
        Ok((reg, td))
    }

    fn trust_domain(&self) -> Result<String, CaError> {
        let path = &self.path;
        let (_guard, db) = self.db()?;
        let err = storage(path, "reading trust domain");
        let txn = db.begin_read().map_err(|e| err(&e))?;
        let meta = txn.open_table(META).map_err(|e| err(&e))?;
        let td = meta
            .get("trust_domain")
            .map_err(|e| err(&e))?
            .map(|v| v.value().to_string());
        td.ok_or_else(|| CaError::Registry {
            path: path.to_path_buf(),
            detail: "no trust domain recorded".into(),
        })
    }

    /// Opens the database while holding the in-process lock; keep the guard alive
    /// for as long as the database.
    fn db(&self) -> Result<(MutexGuard<'_, ()>, Database), CaError> {
        // A panic while holding the lock cannot leave redb inconsistent (transactions
        // are atomic), so a poisoned lock is still usable.
        let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let db =
            Database::open(&self.path).map_err(|e| storage(&self.path, "opening database")(&e))?;
        Ok((guard, db))
    }

    /// Records a newly issued certificate.
    pub(crate) fn insert(&self, record: &IssuedRecord) -> Result<(), CaError> {
        let (_guard, db) = self.db()?;
        let err = storage(&self.path, "recording certificate");
        let json =
            serde_json::to_string(&StoredRecord::from_record(record)).map_err(|e| err(&e))?;
        let txn = db.begin_write().map_err(|e| err(&e))?;
        {
            let mut table = txn.open_table(CERTIFICATES).map_err(|e| err(&e))?;
            table
                .insert(record.serial_hex.as_str(), json.as_str())
                .map_err(|e| err(&e))?;
        }
        txn.commit().map_err(|e| err(&e))
    }

    /// All records, oldest first.
    pub(crate) fn list(&self) -> Result<Vec<IssuedRecord>, CaError> {
        let (_guard, db) = self.db()?;
        let err = storage(&self.path, "listing certificates");
        let txn = db.begin_read().map_err(|e| err(&e))?;
        let table = txn.open_table(CERTIFICATES).map_err(|e| err(&e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| err(&e))? {
            let (k, v) = row.map_err(|e| err(&e))?;
            out.push(decode(&self.path, k.value(), v.value())?);
        }
        out.sort_by(|a, b| (a.not_before, &a.serial_hex).cmp(&(b.not_before, &b.serial_hex)));
        Ok(out)
    }

    /// Marks the certificates chosen by `select` as revoked, in one transaction.
    /// Returns the revoked serials. `select` sees every not-yet-revoked record.
    pub(crate) fn revoke_where(
        &self,
        reason: RevocationReason,
        at: OffsetDateTime,
        select: impl Fn(&IssuedRecord) -> bool,
    ) -> Result<Vec<String>, CaError> {
        let (_guard, db) = self.db()?;
        let err = storage(&self.path, "revoking");
        let txn = db.begin_write().map_err(|e| err(&e))?;
        let mut revoked = Vec::new();
        {
            let mut table = txn.open_table(CERTIFICATES).map_err(|e| err(&e))?;
            let mut updates = Vec::new();
            for row in table.iter().map_err(|e| err(&e))? {
                let (k, v) = row.map_err(|e| err(&e))?;
                let mut rec = decode(&self.path, k.value(), v.value())?;
                if rec.revocation.is_none() && select(&rec) {
                    rec.revocation = Some(Revocation { reason, at });
                    updates.push(rec);
                }
            }
            for rec in updates {
                let json =
                    serde_json::to_string(&StoredRecord::from_record(&rec)).map_err(|e| err(&e))?;
                table
                    .insert(rec.serial_hex.as_str(), json.as_str())
                    .map_err(|e| err(&e))?;
                revoked.push(rec.serial_hex);
            }
        }
        txn.commit().map_err(|e| err(&e))?;
        Ok(revoked)
    }

    /// Increments and returns the CRL number (first CRL is 1).
    pub(crate) fn next_crl_number(&self) -> Result<u64, CaError> {
        let (_guard, db) = self.db()?;
        let err = storage(&self.path, "advancing CRL number");
        let txn = db.begin_write().map_err(|e| err(&e))?;
        let next;
        {
            let mut counters = txn.open_table(COUNTERS).map_err(|e| err(&e))?;
            let current = counters
                .get("crl_number")
                .map_err(|e| err(&e))?
                .map_or(0, |v| v.value());
            next = current + 1;
            counters.insert("crl_number", next).map_err(|e| err(&e))?;
        }
        txn.commit().map_err(|e| err(&e))?;
        Ok(next)
    }

    /// Path of the database file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

fn decode(path: &Path, serial: &str, json: &str) -> Result<IssuedRecord, CaError> {
    let corrupt = || CaError::Registry {
        path: path.to_path_buf(),
        detail: format!("record {serial} is corrupt"),
    };
    let stored: StoredRecord = serde_json::from_str(json).map_err(|_| corrupt())?;
    stored.into_record(serial).ok_or_else(corrupt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_parse_both_spellings() {
        assert_eq!(
            "keyCompromise".parse::<RevocationReason>().unwrap(),
            RevocationReason::KeyCompromise
        );
        assert_eq!(
            "cessation-of-operation"
                .parse::<RevocationReason>()
                .unwrap(),
            RevocationReason::CessationOfOperation
        );
        assert!("stolen".parse::<RevocationReason>().is_err());
        assert_eq!(RevocationReason::Superseded.to_string(), "superseded");
    }

    #[test]
    fn records_round_trip_and_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        let reg = Registry::create(&path, "td").unwrap();
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let rec = IssuedRecord {
            serial_hex: "0a".into(),
            subject: "CN=a".into(),
            spiffe_id: "spiffe://td/svc/a".into(),
            kind: CertKind::Service,
            not_before: now,
            not_after: now + time::Duration::days(1),
            revocation: None,
        };
        reg.insert(&rec).unwrap();
        let (reg, td) = Registry::open(&path).unwrap();
        assert_eq!(td, "td");
        assert_eq!(reg.list().unwrap(), vec![rec.clone()]);
        assert_eq!(reg.list().unwrap()[0].status_at(now), CertStatus::Valid);
        let revoked = reg
            .revoke_where(RevocationReason::Superseded, now, |r| r.serial_hex == "0a")
            .unwrap();
        assert_eq!(revoked, vec!["0a".to_string()]);
        let again = reg
            .revoke_where(RevocationReason::Superseded, now, |_| true)
            .unwrap();
        assert!(again.is_empty());
        assert_eq!(reg.list().unwrap()[0].status_at(now), CertStatus::Revoked);
        assert_eq!(reg.next_crl_number().unwrap(), 1);
        assert_eq!(reg.next_crl_number().unwrap(), 2);
    }
}
