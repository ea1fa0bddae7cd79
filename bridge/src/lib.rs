//! hybridge: a boundary bridge between an on-prem site and a cloud site.
//!
//! The crate reads as the architecture (see `shared/ARCHITECTURE.md`): `config` turns
//! TOML into checked types, `tunnel` owns the authenticated peer connections and the
//! wire format, `http` owns the import listeners and the export side, `upstream` owns
//! pooled connections to a service's endpoints (load balancing, health, circuit
//! breaking), `acl` owns policy, `trust` re-checks live peers' certificates, `admin` the operator API, `node` composes them, `workers`
//! spreads a node's data plane over threads, `daemon` runs a node as a service, `dev` runs
//! a whole demo, `cli` is the command line.
//!
//! Public API: everything is `pub(crate)` unless another crate needs it. The `pub mod`s below
//! are what the binary (`cli::main`), the end-to-end tests crate and the benches drive: a
//! `node` started from a `config`, its state read through `admin` (status, metrics, the
//! admin client), policy from `acl`, upstreams from `demo`, threads from `workers`, and the
//! wire format and peer connections of `tunnel` and the path and header rules of `http`, which
//! tests and benches use to play a peer or a client. Inside them only what those callers
//! name is `pub`; a `pub` item in a `pub(crate)` module is one the tests reach through a
//! public field or return value (a node's peers, its upstreams, its metrics).

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod acl;
pub mod admin;
pub mod cli;
pub mod config;
pub(crate) mod daemon;
pub mod demo;
pub(crate) mod dev;
pub mod http;
pub(crate) mod listener;
pub(crate) mod metrics;
pub mod node;
mod p2c;
pub(crate) mod trust;
pub mod tunnel;
pub(crate) mod upstream;
pub mod workers;
