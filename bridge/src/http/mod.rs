//! HTTP at the edges of the tunnel: import listeners (callers in), the export side
//! (upstreams out), canonical paths, header rules, body streaming and bridge-generated errors.

pub(crate) mod body;
pub mod error;
pub(crate) mod export;
pub mod headers;
pub(crate) mod import;
pub mod path;
pub(crate) mod percent;
