//! The admin API: health, readiness, Prometheus metrics, status JSON and the ACL routes, behind
//! three kinds of listener (README "Admin access model"): the Unix socket (`admin.socket`, the
//! whole API, callers named by uid), the read-only TCP listener (`admin.listen`), and the
//! optional remote mTLS listener for administrator certificates (`[admin.remote]`).
//!
//! `access` decides what a request may do, `server` accepts and routes, `unix` owns the socket
//! file and peer credentials, `client` is the one client, `status` fills the `/v1/status`
//! types of `document` that `client` reads back. It reads node state and delegates policy
//! changes to `acl`; it never touches the data path.

mod access;
pub mod client;
pub(crate) mod document;
mod server;
pub mod status;
pub(crate) mod unix;

pub(crate) use access::ListenerKind;
pub(crate) use server::{serve_remote, serve_socket, serve_tcp};
