//! The errors of the ACL library (`AclError`), one variant per thing a caller can act on.
//! Declarative-file errors live in `file.rs`; this file does no formatting beyond messages.

use std::path::PathBuf;

use super::file::AclFileError;

/// Why an ACL operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    /// Another process (normally the running daemon) holds the database lock.
    #[error("acl database {} is in use by a running hybridge (use --admin to talk to it)", path.display())]
    InUse { path: PathBuf },
    /// The redb file could not be created 0600 or narrowed to it.
    #[error("acl database {}: setting owner-only permissions: {message}", path.display())]
    Permissions { path: PathBuf, message: String },
    /// The redb file could not be opened, read or written.
    #[error("acl database: {0}")]
    Storage(#[from] redb::Error),
    /// A stored value could not be decoded: the file was written by something else.
    #[error("acl database holds a malformed entry under {key}: {message}")]
    Corrupt { key: String, message: String },
    /// An export declaration failed validation.
    #[error("export {index}: field `{field}`: {message}")]
    InvalidExport {
        /// 1-based position in the submitted list.
        index: usize,
        field: &'static str,
        message: String,
    },
    /// A rule failed validation.
    #[error("rule {index}: field `{field}`: {message}")]
    InvalidRule {
        /// 1-based position in the submitted list (1 for a single rule).
        index: usize,
        field: &'static str,
        message: String,
    },
    /// `add` with an id that already exists, or two rules with one id in `apply`.
    #[error("a rule with id {0:?} already exists")]
    DuplicateId(String),
    /// Two export declarations for one service in `apply`.
    #[error("service {0:?} is declared twice in the export declarations")]
    DuplicateExport(String),
    #[error("no rule with id {0:?}")]
    NotFound(String),
    /// A declarative file failed to parse.
    #[error(transparent)]
    File(#[from] AclFileError),
}

macro_rules! storage_from {
    ($($ty:ty),*) => {$(
        impl From<$ty> for AclError {
            fn from(e: $ty) -> Self {
                AclError::Storage(e.into())
            }
        }
    )*};
}

storage_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
