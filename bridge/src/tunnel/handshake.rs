//! Keeps the CA verifier's typed rejection of one QUIC handshake for whoever awaits it.
//!
//! quinn turns a TLS failure into a transport error carrying only an alert number and text,
//! so the check that failed is lost by the time `Connecting` resolves. Each connection gets
//! its own thin wrapper around the shared quinn crypto config; the wrapper runs the session's
//! handshake processing inside [`capture_rejection`] (rustls verifies synchronously there)
//! and stores what the verifier rejected in the connection's [`RejectionSlot`]. It changes
//! nothing in the handshake itself.

use std::any::Any;
use std::sync::{Arc, Mutex};

use hybridge_ca::tls::{PeerRejected, capture_rejection};
use quinn::crypto::{
    self, ExportKeyingMaterialError, KeyPair, Keys, PacketKey, UnsupportedVersion,
};
use quinn::{ConnectError, ConnectionId, Side};
use quinn_proto::TransportError;
use quinn_proto::transport_parameters::TransportParameters;

/// Where the verifier's rejection of one connection's handshake is kept.
#[derive(Clone, Default)]
pub(crate) struct RejectionSlot(Arc<Mutex<Option<PeerRejected>>>);

impl RejectionSlot {
    /// The rejection, if the verifier made one during this handshake.
    pub(crate) fn take(&self) -> Option<PeerRejected> {
        match self.0.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }

    fn keep(&self, rejection: PeerRejected) {
        match self.0.lock() {
            Ok(mut slot) => *slot = Some(rejection),
            Err(poisoned) => *poisoned.into_inner() = Some(rejection),
        }
    }
}

/// `config` for one incoming connection: a rejection by our verifier lands in `slot`.
pub(crate) fn observed_server(
    config: &quinn::ServerConfig,
    slot: &RejectionSlot,
) -> quinn::ServerConfig {
    let mut config = config.clone();
    config.crypto = Arc::new(ObservedServer {
        inner: config.crypto.clone(),
        slot: slot.clone(),
    });
    config
}

/// A quinn client crypto config whose sessions report rejections to `slot`.
pub(crate) fn observed_client(
    inner: Arc<dyn crypto::ClientConfig>,
    slot: &RejectionSlot,
) -> Arc<dyn crypto::ClientConfig> {
    Arc::new(ObservedClient {
        inner,
        slot: slot.clone(),
    })
}

struct ObservedServer {
    inner: Arc<dyn crypto::ServerConfig>,
    slot: RejectionSlot,
}

impl crypto::ServerConfig for ObservedServer {
    fn initial_keys(
        &self,
        version: u32,
        dst_cid: &ConnectionId,
    ) -> Result<Keys, UnsupportedVersion> {
        self.inner.initial_keys(version, dst_cid)
    }

    fn retry_tag(&self, version: u32, orig_dst_cid: &ConnectionId, packet: &[u8]) -> [u8; 16] {
        self.inner.retry_tag(version, orig_dst_cid, packet)
    }

    fn start_session(
        self: Arc<Self>,
        version: u32,
        params: &TransportParameters,
    ) -> Box<dyn crypto::Session> {
        Box::new(ObservedSession {
            inner: self.inner.clone().start_session(version, params),
            slot: self.slot.clone(),
        })
    }
}

struct ObservedClient {
    inner: Arc<dyn crypto::ClientConfig>,
    slot: RejectionSlot,
}

impl crypto::ClientConfig for ObservedClient {
    fn start_session(
        self: Arc<Self>,
        version: u32,
        server_name: &str,
        params: &TransportParameters,
    ) -> Result<Box<dyn crypto::Session>, ConnectError> {
        Ok(Box::new(ObservedSession {
            inner: self
                .inner
                .clone()
                .start_session(version, server_name, params)?,
            slot: self.slot.clone(),
        }))
    }
}

struct ObservedSession {
    inner: Box<dyn crypto::Session>,
    slot: RejectionSlot,
}

impl crypto::Session for ObservedSession {
    fn initial_keys(&self, dst_cid: &ConnectionId, side: Side) -> Keys {
        self.inner.initial_keys(dst_cid, side)
    }

    fn handshake_data(&self) -> Option<Box<dyn Any>> {
        self.inner.handshake_data()
    }

    fn peer_identity(&self) -> Option<Box<dyn Any>> {
        self.inner.peer_identity()
    }

    fn early_crypto(&self) -> Option<(Box<dyn crypto::HeaderKey>, Box<dyn PacketKey>)> {
        self.inner.early_crypto()
    }

    fn early_data_accepted(&self) -> Option<bool> {
        self.inner.early_data_accepted()
    }

    fn is_handshaking(&self) -> bool {
        self.inner.is_handshaking()
    }

    fn read_handshake(&mut self, buf: &[u8]) -> Result<bool, TransportError> {
        let (result, rejection) = capture_rejection(|| self.inner.read_handshake(buf));
        if let Some(rejection) = rejection {
            self.slot.keep(rejection);
        }
        result
    }

    fn transport_parameters(&self) -> Result<Option<TransportParameters>, TransportError> {
        self.inner.transport_parameters()
    }

    fn write_handshake(&mut self, buf: &mut Vec<u8>) -> Option<Keys> {
        self.inner.write_handshake(buf)
    }

    fn next_1rtt_keys(&mut self) -> Option<KeyPair<Box<dyn PacketKey>>> {
        self.inner.next_1rtt_keys()
    }

    fn is_valid_retry(&self, orig_dst_cid: &ConnectionId, header: &[u8], payload: &[u8]) -> bool {
        self.inner.is_valid_retry(orig_dst_cid, header, payload)
    }

    fn export_keying_material(
        &self,
        output: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), ExportKeyingMaterialError> {
        self.inner.export_keying_material(output, label, context)
    }
}
