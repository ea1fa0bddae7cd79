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
    pub node: String,
    pub name: String,
    pub site: String,
    pub uptime_seconds: u64,
    pub workers: usize,
    pub ready: bool,
    /// Why the node is not ready (empty when it is).
    pub not_ready_reasons: Vec<String>,
    pub draining: bool,
    pub policy_version: u64,
    pub policy_digest: String,
    /// Linked peers announcing a policy digest other than this node's.
    pub peers_disagreeing: usize,
    pub tunnel_listen: Option<String>,
    pub tunnel_listen_tcp: Option<String>,
    pub gateway: Option<String>,
    /// One per live tunnel connection.
    pub peers: Vec<PeerStatus>,
    /// One per dialer slot, whether or not its link is up.
    pub dialing: Vec<DialingStatus>,
    pub exports: Vec<ExportStatus>,
    pub imports: Vec<ImportStatus>,
    /// `tls.crl_stale`: what the node does with a stale CRL.
    pub crl_stale: String,
    pub crls: Vec<CrlStatus>,
}

/// One live tunnel connection.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerStatus {
    /// The peer node's SPIFFE id.
    pub peer: String,
    pub remote: String,
    /// `quic` or `tcp`.
    pub carrier: String,
    /// `dialed` or `accepted`.
    pub direction: String,
    pub worker: usize,
    pub connected_seconds: u64,
    pub rtt_ms: f64,
    pub lost_packets: u64,
    pub sent_packets: u64,
    pub path_mtu: u16,
    pub streams_stopped: u64,
    pub streams_reset: u64,
    /// The services the peer exports, sorted.
    pub exports: Vec<String>,
    pub draining: bool,
    pub active_streams: usize,
    pub total_streams: u64,
    pub policy_version: u64,
    pub policy_digest: String,
    /// Whether the peer's policy digest equals this node's; `None` when it announces none.
    pub policy_agrees: Option<bool>,
    pub certificate: Option<PeerCertificate>,
}

/// The certificate a peer presented.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerCertificate {
    pub serial: String,
    pub not_after: String,
}

/// One dialer slot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DialingStatus {
    pub address: String,
    pub site: String,
    pub slot: usize,
    /// Dialled because the peer site announced the address, not because it is configured.
    pub learned: bool,
    /// `connecting`, `up`, `silent` or `failed` (waiting to retry).
    pub state: String,
    /// `quic` or `tcp` once chosen.
    pub carrier: Option<String>,
    pub carrier_reason: Option<String>,
    pub last_error: Option<String>,
    /// How long the slot has been in its state.
    pub state_seconds: u64,
    /// When the next attempt starts (`failed` only).
    pub next_retry_ms: Option<u64>,
}

/// One exported service and its upstream.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExportStatus {
    pub service: String,
    pub upstream: UpstreamStats,
}

/// One import listener.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImportStatus {
    pub service: String,
    pub listen: String,
}

/// One CRL in force.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CrlStatus {
    /// Its place in the CRL file, from 1.
    pub position: usize,
    pub issuer: String,
    pub number: Option<String>,
    pub revoked: usize,
    /// RFC 3339.
    pub this_update: String,
    pub next_update: Option<String>,
    /// Signed seconds to nextUpdate: negative once stale.
    pub next_update_seconds: Option<i64>,
    pub stale: bool,
}
