//! The control stream: the first stream of every tunnel connection.
//!
//! Carries the versioned hello (who I am, which services I export, my policy version and
//! digest, the tunnel addresses of my site's listening nodes), later updates when those
//! change, and GOAWAY when a node drains. Messages are JSON inside
//! CONTROL frames: rare, small and easy to extend (unknown fields are ignored so a newer peer
//! can add some). It does not route or forward requests.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::frame::{self, Frame, PROTOCOL_VERSION};
use super::stream::{ReadError, RecvHalf, SendHalf, StreamError, WriteError, encoded};
use crate::config::MAX_ANNOUNCED_MEMBERS;

/// One message on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlMessage {
    /// First message each way.
    Hello {
        version: u8,
        node: String,
        exports: Vec<String>,
        policy_version: u64,
        /// The sender's policy digest (empty from a peer that predates it).
        #[serde(default)]
        policy_digest: String,
        /// Tunnel addresses of the sender's site's listening nodes (`tunnel.announce`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        members: Vec<String>,
    },
    /// The sender's exported services changed (config reload) or its policy changed.
    Exports {
        exports: Vec<String>,
        policy_version: u64,
        #[serde(default)]
        policy_digest: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        members: Vec<String>,
    },
    /// The sender is draining: open no new streams to it; in-flight streams finish.
    GoAway { reason: String },
    /// Answer to GOAWAY: the sender routes no new requests to this connection, and those it
    /// had sent over it have finished (so the connection can close without cutting one).
    DrainAck,
}

/// What a peer says about itself in its hello and in later updates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerAnnouncement {
    pub exports: Vec<String>,
    pub policy_version: u64,
    pub policy_digest: String,
    /// Where the peer's site's listening nodes take tunnels (see `tunnel::members`).
    pub members: Vec<SocketAddr>,
}

impl ControlMessage {
    pub fn hello(node: &str, announcement: PeerAnnouncement) -> Self {
        Self::Hello {
            version: PROTOCOL_VERSION,
            node: node.to_owned(),
            exports: announcement.exports,
            policy_version: announcement.policy_version,
            policy_digest: announcement.policy_digest,
            members: wire_members(&announcement.members),
        }
    }

    /// The update a node sends when its exports or its policy change.
    pub(crate) fn update(announcement: PeerAnnouncement) -> Self {
        Self::Exports {
            exports: announcement.exports,
            policy_version: announcement.policy_version,
            policy_digest: announcement.policy_digest,
            members: wire_members(&announcement.members),
        }
    }

    /// The update that says what this hello says; `None` for any other message.
    pub(crate) fn into_update(self) -> Option<Self> {
        match self {
            Self::Hello {
                exports,
                policy_version,
                policy_digest,
                members,
                ..
            } => Some(Self::Exports {
                exports,
                policy_version,
                policy_digest,
                members,
            }),
            _ => None,
        }
    }
}

fn wire_members(members: &[SocketAddr]) -> Vec<String> {
    members.iter().map(ToString::to_string).collect()
}

/// Whether a member address names one node's port (not "any address", not port 0): the
/// rule for what a node announces and for what it takes from a peer.
pub(crate) fn is_dialable(address: &SocketAddr) -> bool {
    !address.ip().is_unspecified() && address.port() != 0
}

/// The member addresses a peer announced that can be dialled: socket-address literals
/// (never names, so a peer cannot make this node resolve or look anything up), not
/// unspecified, at most [`MAX_ANNOUNCED_MEMBERS`]; anything else is dropped.
pub(crate) fn parse_members(announced: &[String]) -> Vec<SocketAddr> {
    let mut members: Vec<SocketAddr> = announced
        .iter()
        .filter_map(|a| a.parse::<SocketAddr>().ok())
        .filter(is_dialable)
        .take(MAX_ANNOUNCED_MEMBERS)
        .collect();
    members.sort_unstable();
    members.dedup();
    members
}

/// Writes one control message.
pub async fn send(out: &mut SendHalf, message: &ControlMessage) -> Result<(), StreamError> {
    let json = serde_json::to_vec(message).map_err(WriteError::EncodeControl)?;
    let bytes = encoded(|b| frame::encode_control(&json, b))?;
    out.write_encoded(bytes).await
}

/// Reads the next control message; `Ok(None)` when the peer closed the control stream.
pub async fn receive(input: &mut RecvHalf) -> Result<Option<ControlMessage>, StreamError> {
    match input.read_frame().await? {
        None => Ok(None),
        Some(Frame::Control(payload)) => serde_json::from_slice(&payload)
            .map(Some)
            .map_err(|e| ReadError::MalformedControl(e).into()),
        Some(_) => Err(StreamError::Unexpected(
            "non-control frame on the control stream",
        )),
    }
}

/// Why a peer's first control message is not a hello this node can take.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HelloError {
    #[error("peer speaks tunnel protocol version {0}, this node speaks {PROTOCOL_VERSION}")]
    Version(u8),
    #[error("expected hello on the control stream, got {0:?}")]
    NotHello(Box<ControlMessage>),
}

/// Checks a peer's hello and returns what it announced.
pub(crate) fn check_hello(message: ControlMessage) -> Result<PeerAnnouncement, HelloError> {
    match message {
        ControlMessage::Hello {
            version,
            exports,
            policy_version,
            policy_digest,
            members,
            ..
        } if version == PROTOCOL_VERSION => Ok(PeerAnnouncement {
            exports,
            policy_version,
            policy_digest,
            members: parse_members(&members),
        }),
        ControlMessage::Hello { version, .. } => Err(HelloError::Version(version)),
        other => Err(HelloError::NotHello(Box::new(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_is_stable_json_and_ignores_unknown_fields() {
        let hello = ControlMessage::hello(
            "spiffe://td/site/a/node/n",
            PeerAnnouncement {
                exports: vec!["billing".into()],
                policy_version: 7,
                policy_digest: "ab".into(),
                members: vec![],
            },
        );
        let json = serde_json::to_string(&hello).unwrap();
        assert_eq!(
            json,
            r#"{"type":"hello","version":1,"node":"spiffe://td/site/a/node/n","exports":["billing"],"policy_version":7,"policy_digest":"ab"}"#
        );
        // A peer that predates the digest still says hello.
        let older = r#"{"type":"hello","version":1,"node":"n","exports":[],"policy_version":3}"#;
        let older = check_hello(serde_json::from_str(older).unwrap()).unwrap();
        assert_eq!(
            (older.policy_version, older.policy_digest.as_str()),
            (3, "")
        );
        let newer = r#"{"type":"go_away","reason":"drain","future_field":1}"#;
        assert_eq!(
            serde_json::from_str::<ControlMessage>(newer).unwrap(),
            ControlMessage::GoAway {
                reason: "drain".into()
            }
        );
    }

    #[test]
    fn version_mismatch_is_explained() {
        let hello = ControlMessage::Hello {
            version: 9,
            node: "n".into(),
            exports: vec![],
            policy_version: 0,
            policy_digest: String::new(),
            members: vec![],
        };
        let refused = check_hello(hello).unwrap_err();
        assert!(matches!(refused, HelloError::Version(9)), "{refused:?}");
        assert!(refused.to_string().contains("version 9"));
    }

    #[test]
    fn members_travel_as_literals_and_only_dialable_literals_are_taken() {
        let hello = ControlMessage::hello(
            "n",
            PeerAnnouncement {
                members: vec![
                    "10.0.1.5:4433".parse().unwrap(),
                    "[fd00::7]:4433".parse().unwrap(),
                ],
                ..PeerAnnouncement::default()
            },
        );
        let json = serde_json::to_string(&hello).unwrap();
        assert!(
            json.ends_with(r#""members":["10.0.1.5:4433","[fd00::7]:4433"]}"#),
            "{json}"
        );
        assert_eq!(check_hello(hello).unwrap().members.len(), 2);
        let announced: Vec<String> = [
            "10.0.1.6:4433",
            "cloud-2.internal:4433",
            "0.0.0.0:4433",
            "10.0.1.7:0",
            "10.0.1.6:4433",
            "10.0.1.5",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            parse_members(&announced),
            vec!["10.0.1.6:4433".parse::<SocketAddr>().unwrap()]
        );
        let many: Vec<String> = (0..1000)
            .map(|i| format!("10.1.{}.{}:1", i / 250, i % 250))
            .collect();
        assert_eq!(parse_members(&many).len(), MAX_ANNOUNCED_MEMBERS);
    }
}
