//! The QUIC transport: building the quinn endpoint, its TLS configs and transport tuning.
//!
//! It knows TLS material and socket addresses, not services or HTTP. The stateless-reset key
//! is derived from the node's private key, so a node that restarts on the same address
//! resets its peers' stale connections at once instead of leaving them to time out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hybridge_ca::tls::{self, PeerExpectation, TlsMaterial};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use sha2::{Digest, Sha256};

/// ALPN of the tunnel protocol.
pub const ALPN: &[u8] = b"hybridge/1";

/// Transport tuning shared by both ends.
#[derive(Clone, Debug)]
pub struct TransportTuning {
    pub keepalive: Duration,
    pub idle_timeout: Duration,
    pub max_streams: u32,
    pub stream_window: u32,
    pub connection_window: u32,
}

impl Default for TransportTuning {
    fn default() -> Self {
        // Like cloudflared: a 1 s keepalive and a short idle timeout notice a dead path fast.
        Self {
            keepalive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            max_streams: 8192,
            stream_window: 4 * 1024 * 1024,
            connection_window: 64 * 1024 * 1024,
        }
    }
}

fn transport_config(t: &TransportTuning) -> Arc<quinn::TransportConfig> {
    let mut c = quinn::TransportConfig::default();
    c.keep_alive_interval(Some(t.keepalive));
    c.max_idle_timeout(quinn::IdleTimeout::try_from(t.idle_timeout).ok());
    c.max_concurrent_bidi_streams(quinn::VarInt::from_u32(t.max_streams));
    c.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    c.stream_receive_window(quinn::VarInt::from_u32(t.stream_window));
    c.receive_window(quinn::VarInt::from_u32(t.connection_window));
    c.send_window(u64::from(t.connection_window));
    Arc::new(c)
}

/// Builds the server side config: client certificates required, checked against `expect`.
pub fn server_config(
    material: &TlsMaterial,
    expect: PeerExpectation,
    tuning: &TransportTuning,
) -> anyhow::Result<quinn::ServerConfig> {
    let tls = tls::server_config(material, expect, &[ALPN], true)?;
    let quic = QuicServerConfig::try_from(Arc::new(tls))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport_config(tuning));
    Ok(config)
}

/// Builds the dialing config for one peer.
pub fn client_config(
    material: &TlsMaterial,
    expect: PeerExpectation,
    tuning: &TransportTuning,
) -> anyhow::Result<quinn::ClientConfig> {
    let tls = tls::client_config(material, expect, &[ALPN])?;
    let quic = QuicClientConfig::try_from(Arc::new(tls))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport_config(tuning));
    Ok(config)
}

/// Binds a quinn endpoint. `server` is `None` for a node that only dials out.
pub fn bind_endpoint(
    bind: SocketAddr,
    server: Option<quinn::ServerConfig>,
    reset_key_seed: &[u8],
) -> anyhow::Result<quinn::Endpoint> {
    let digest = Sha256::new()
        .chain_update(b"hybridge stateless reset v1")
        .chain_update(reset_key_seed)
        .finalize();
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &digest);
    let endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    let socket = std::net::UdpSocket::bind(bind)
        .map_err(|e| anyhow::anyhow!("binding the tunnel UDP socket {bind}: {e}"))?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| anyhow::anyhow!("no async runtime for the tunnel endpoint"))?;
    Ok(quinn::Endpoint::new(
        endpoint_config,
        server,
        socket,
        runtime,
    )?)
}

/// The SNI name to present when dialing `host`. Peers are identified by their SPIFFE id, not
/// by this name, so any syntactically valid name works; we use the host when it is one.
pub fn server_name_for(host: &str) -> String {
    if rustls_pki_types::ServerName::try_from(host.to_owned()).is_ok() {
        host.to_owned()
    } else {
        "hybridge".into()
    }
}
