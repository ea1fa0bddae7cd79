//! Tunnels between nodes: wire format (`frame`), the frame order of a request stream
//! (`exchange`), the transport seam (`connection`, `stream`), QUIC and TLS/TCP specifics
//! (`quic`, `tcp`), the handshake's verdicts (`handshake`, `outcome`), the control stream
//! (`control`), live links and routing (`peers`), who may serve what (`serving`), a
//! connection's life (`session`), dialing out (`dialer`), a link to every member of a peer
//! site (`members`) and the UDP socket under quinn (`udp`).
//!
//! Nothing here knows HTTP semantics: requests are opaque frames to this module.

pub mod connection;
pub mod control;
pub(crate) mod dialer;
pub(crate) mod exchange;
pub mod frame;
pub(crate) mod handshake;
pub(crate) mod members;
pub mod outcome;
pub(crate) mod peers;
pub mod quic;
pub(crate) mod serving;
pub(crate) mod session;
pub mod stream;
pub(crate) mod tcp;
pub(crate) mod udp;
