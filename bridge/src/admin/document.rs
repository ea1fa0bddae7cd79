//! The `/v1/status` document as types: `admin::status` fills them on the node, `hybridge
//! status` (`admin::client`) reads them. The field names and shapes are the API scripts and
//! tests read; this module holds no logic.

use serde::{Deserialize, Serialize};

use crate::upstream::UpstreamStats;

/// `GET /v1/status`. A field a node leaves out reads as its default.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusDocument {
    /// The node's SPIFFE id.
    pub(crate) node: String,
    pub(crate) name: String,
    pub(crate) site: String,
    pub(crate) uptime_seconds: u64,
    pub(crate) workers: usize,
    pub(crate) ready: bool,
    /// Why the node is not ready (empty when it is).
    pub(crate) not_ready_reasons: Vec<String>,
    pub(crate) draining: bool,
    pub(crate) policy_version: u64,
    pub(crate) policy_digest: String,
    /// Linked peers announcing a policy digest other than this node's.
    pub(crate) peers_disagreeing: usize,
    pub(crate) tunnel_listen: Option<String>,
    pub(crate) tunnel_listen_tcp: Option<String>,
    pub(crate) gateway: Option<String>,
    /// One per live tunnel connection.
    pub(crate) peers: Vec<PeerStatus>,
    /// One per dialer slot, whether or not its link is up.
    pub(crate) dialing: Vec<DialingStatus>,
    pub(crate) exports: Vec<ExportStatus>,
    pub(crate) imports: Vec<ImportStatus>,
    /// `tls.crl_stale`: what the node does with a stale CRL.
    pub(crate) crl_stale: String,
    pub(crate) crls: Vec<CrlStatus>,
}

/// One live tunnel connection.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct PeerStatus {
    /// The peer node's SPIFFE id.
    pub(crate) peer: String,
    pub(crate) remote: String,
    /// `quic` or `tcp`.
    pub(crate) carrier: String,
    /// `dialed` or `accepted`.
    pub(crate) direction: String,
    pub(crate) worker: usize,
    pub(crate) connected_seconds: u64,
    pub(crate) rtt_ms: f64,
    pub(crate) lost_packets: u64,
    pub(crate) sent_packets: u64,
    pub(crate) path_mtu: u16,
    pub(crate) streams_stopped: u64,
    pub(crate) streams_reset: u64,
    /// The services the peer exports, sorted.
    pub(crate) exports: Vec<String>,
    pub(crate) draining: bool,
    pub(crate) active_streams: usize,
    pub(crate) total_streams: u64,
    pub(crate) policy_version: u64,
    pub(crate) policy_digest: String,
    /// Whether the peer's policy digest equals this node's; `None` when it announces none.
    pub(crate) policy_agrees: Option<bool>,
    pub(crate) certificate: Option<PeerCertificate>,
}

/// The certificate a peer presented.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct PeerCertificate {
    pub(crate) serial: String,
    pub(crate) not_after: String,
}

/// One dialer slot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct DialingStatus {
    pub(crate) address: String,
    pub(crate) site: String,
    pub(crate) slot: usize,
    /// Dialled because the peer site announced the address, not because it is configured.
    pub(crate) learned: bool,
    /// `connecting`, `up`, `silent` or `failed` (waiting to retry).
    pub(crate) state: String,
    /// `quic` or `tcp` once chosen.
    pub(crate) carrier: Option<String>,
    pub(crate) carrier_reason: Option<String>,
    pub(crate) last_error: Option<String>,
    /// How long the slot has been in its state.
    pub(crate) state_seconds: u64,
    /// When the next attempt starts (`failed` only).
    pub(crate) next_retry_ms: Option<u64>,
}

/// One exported service and its upstream.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct ExportStatus {
    pub(crate) service: String,
    pub(crate) upstream: UpstreamStats,
}

/// One import listener.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct ImportStatus {
    pub(crate) service: String,
    pub(crate) listen: String,
}

/// One CRL in force.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct CrlStatus {
    /// Its place in the CRL file, from 1.
    pub(crate) position: usize,
    pub(crate) issuer: String,
    pub(crate) number: Option<String>,
    pub(crate) revoked: usize,
    /// RFC 3339.
    pub(crate) this_update: String,
    pub(crate) next_update: Option<String>,
    /// Signed seconds to nextUpdate: negative once stale.
    pub(crate) next_update_seconds: Option<i64>,
    pub(crate) stale: bool,
}
