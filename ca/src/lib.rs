//! hybridge-ca: the certificate authority library shared by the `hybridge-ca` tool,
//! `hybridge dev` and tests: SPIFFE ids, the on-disk CA, and rustls configs that check them.
//!
//! The `pub` modules are what `hybridge`, the tests and the `hybridge-ca` binary use; `files`
//! (atomic writes) and `verify` (the rustls verifiers behind `tls`) are internal, and inside
//! every module what no other crate names is `pub(crate)`.

// Tests may unwrap; library code may not (workspace lints warn, CI denies warnings).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod authority;
pub mod cli;
pub mod command_line;
pub mod duration;
pub(crate) mod files;
pub mod inspect;
pub mod registry;
pub mod spiffe;
pub mod tls;
mod verify;

pub use authority::{CaError, CertificateAuthority, InitOptions, IssuedCertificate, KeyType};
pub use spiffe::SpiffeId;
