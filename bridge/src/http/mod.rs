//! HTTP at the edges of the tunnel: import listeners (callers in), the export side
//! (upstreams out), canonical paths, header rules, body streaming and bridge-generated errors.

pub mod body;
pub mod error;
pub mod export;
pub mod headers;
pub mod import;
pub mod path;
pub mod percent;
