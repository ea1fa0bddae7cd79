//! hybridge: a boundary bridge between an on-prem site and a cloud site.
//!
//! The crate reads as the architecture (see `shared/ARCHITECTURE.md`): `config` turns
//! TOML into checked types, `tunnel` owns the authenticated peer connections and the
//! wire format, `http` owns the import listeners and the export side, `upstream` owns
//! pooled connections to a service's endpoints (load balancing, health, circuit
//! breaking), `acl` owns policy, `trust` re-checks live peers' certificates, `admin` the operator API, `node` composes them, `workers`
//! spreads a node's data plane over threads, `daemon` runs a node as a service, `dev` runs
//! a whole demo, `cli` is the command line.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod acl;
pub mod admin;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod dev;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod node;
mod p2c;
pub mod trust;
pub mod tunnel;
pub mod upstream;
pub mod workers;
