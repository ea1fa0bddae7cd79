//! The QUIC transport: building the quinn endpoint, its TLS configs and transport tuning.
//!
//! It knows TLS material and socket addresses, not services or HTTP. The stateless-reset key
//! is derived from the node's private key, so a node that restarts on the same address
//! resets its peers' stale connections at once instead of leaving them to time out.
//!
//! Two settings decide bulk throughput more than anything in our own code (measured with
//! `bench/run`, 1 MiB responses: 440 → 820 MB/s together):
//! - the socket's kernel buffers: at the default 208 KiB a burst of datagrams overflows the
//!   receive queue, QUIC sees ~1% loss and congestion control backs off; at 8 MiB the loss
//!   is gone (quic-go and cloudflared ask for the same, for the same reason);
//! - path-MTU discovery above the 1,452-byte default: quinn hands the kernel at most ten
//!   datagrams per send (GSO), so larger datagrams mean fewer sends, packets and ACKs on
//!   jumbo-frame paths (loopback, VPC, Direct Connect); on a 1,500-byte path the probes are
//!   lost and discovery settles at what the path carries.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use crate::config::Congestion;
use hybridge_ca::tls::{self, PeerExpectation, TlsMaterial};
use quinn::congestion;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use sha2::{Digest, Sha256};

/// ALPN of the tunnel protocol.
pub const ALPN: &[u8] = b"hybridge/1";

/// Kernel send and receive buffer wanted for the tunnel socket.
pub const SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// Largest UDP payload path-MTU discovery may reach and that we accept. Ten GSO segments of
/// this size plus one UDP header must fit one 64 KiB send (10 × 6,500 + 8 ≤ 65,535); above
/// that the kernel refuses the send, quinn counts the datagrams lost and its black-hole
/// detection drops the path to 1,200 bytes.
pub const MAX_UDP_PAYLOAD: u16 = 6_500;
const _: () = assert!(10 * MAX_UDP_PAYLOAD as usize + 8 <= 65_535);

/// Transport tuning shared by both ends.
#[derive(Clone, Debug)]
pub struct TransportTuning {
    pub keepalive: Duration,
    pub idle_timeout: Duration,
    pub max_streams: u32,
    pub stream_window: u32,
    pub connection_window: u32,
    /// The controller of what this node sends, on both carriers.
    pub(crate) congestion: Congestion,
    /// Packets a later one may be acknowledged ahead of before a packet is declared lost.
    pub(crate) packet_threshold: u32,
    /// How long, as a multiple of the RTT, a packet may stay unacknowledged after a later one
    /// was acknowledged before it is declared lost.
    pub(crate) time_threshold: f32,
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
            congestion: Congestion::default(),
            // Loss is told from reordering by time alone, as Linux TCP's RACK does: a packet
            // is lost once a later one is acknowledged and it is 5/4 RTT old (RACK's window of
            // RTT + min_rtt/4; RFC 9002's 9/8 leaves too little for jitter and a packet held
            // back). A packet threshold would have to exceed the packets sent while one is held
            // back, hundreds at tens of MB/s, so it is set out of the way.
            packet_threshold: 1000,
            time_threshold: 5.0 / 4.0,
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
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    c.mtu_discovery_config(Some(mtu));
    c.packet_threshold(t.packet_threshold);
    c.time_threshold(t.time_threshold);
    let controller: Arc<dyn congestion::ControllerFactory + Send + Sync> = match t.congestion {
        Congestion::Bbr => Arc::new(congestion::BbrConfig::default()),
        Congestion::Cubic => Arc::new(congestion::CubicConfig::default()),
        Congestion::NewReno => Arc::new(congestion::NewRenoConfig::default()),
    };
    c.congestion_controller_factory(controller);
    Arc::new(c)
}

/// Builds the server side config: client certificates required, checked against `expect`.
pub(crate) fn server_config(
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

/// The dialing config of one peer, for both carriers: each QUIC attempt gets its own quinn
/// config (see [`DialConfig::for_attempt`]); TLS/TCP attempts share `tcp`.
pub(crate) struct DialConfig {
    crypto: Arc<dyn quinn::crypto::ClientConfig>,
    transport: Arc<quinn::TransportConfig>,
    pub(crate) tcp: Arc<rustls::ClientConfig>,
    pub(crate) tuning: TransportTuning,
}

impl DialConfig {
    /// Builds the dialing config for one peer.
    pub(crate) fn new(
        material: &TlsMaterial,
        expect: PeerExpectation,
        tuning: &TransportTuning,
    ) -> anyhow::Result<DialConfig> {
        let tls = tls::client_config(material, expect.clone(), &[ALPN])?;
        Ok(DialConfig {
            crypto: Arc::new(QuicClientConfig::try_from(Arc::new(tls))?),
            transport: transport_config(tuning),
            tcp: super::tcp::client_config(material, expect)?,
            tuning: tuning.clone(),
        })
    }

    /// The quinn config of one connection attempt; a rejection of the peer's certificate by
    /// our verifier lands in `rejection`.
    pub(crate) fn for_attempt(
        &self,
        rejection: &super::handshake::RejectionSlot,
    ) -> quinn::ClientConfig {
        let mut config = quinn::ClientConfig::new(super::handshake::observed_client(
            self.crypto.clone(),
            rejection,
        ));
        config.transport_config(self.transport.clone());
        config
    }
}

/// Builds a plain dialing config for one peer (tools and tests that dial a node themselves).
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

/// Binds a tunnel UDP socket with the kernel buffers it needs.
///
/// `share_port` binds with `SO_REUSEPORT`, so each worker's endpoint can listen on the same
/// address and the kernel keeps every peer 4-tuple on one of them. Only listen-only
/// endpoints may share: a dialled connection's replies could land on another worker's
/// socket, which does not know the connection. Bind every socket of a group before any
/// endpoint reads: a socket joining later would move some peers' packets to itself.
pub(crate) fn bind_socket(
    bind: SocketAddr,
    share_port: bool,
) -> anyhow::Result<std::net::UdpSocket> {
    let socket = if share_port {
        shared_udp_socket(bind)
    } else {
        std::net::UdpSocket::bind(bind)
    }
    .map_err(|e| anyhow::anyhow!("binding the tunnel UDP socket {bind}: {e}"))?;
    size_socket_buffers(&socket, bind);
    Ok(socket)
}

/// A quinn endpoint on `socket`, driven by the current runtime. `server` is `None` for a
/// node that only dials out. `sharing` is the hand-off and this worker's index for a
/// socket of a shared port (see `tunnel::udp`).
pub(crate) fn endpoint(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
    reset_key_seed: &[u8],
    sharing: Option<(&Arc<super::udp::Handoff>, usize)>,
) -> anyhow::Result<quinn::Endpoint> {
    let digest = Sha256::new()
        .chain_update(b"hybridge stateless reset v1")
        .chain_update(reset_key_seed)
        .finalize();
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &digest);
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    endpoint_config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| anyhow::anyhow!("tunnel UDP payload size: {e}"))?;
    let local = socket.local_addr()?;
    let socket = match sharing {
        Some((handoff, worker)) => {
            endpoint_config.cid_generator(handoff.cid_generator(worker));
            super::udp::TunnelSocket::sharing(socket, handoff.clone(), worker)
        }
        None => super::udp::TunnelSocket::new(socket),
    }
    .map_err(|e| anyhow::anyhow!("registering the tunnel UDP socket {local}: {e}"))?;
    Ok(quinn::Endpoint::new_with_abstract_socket(
        endpoint_config,
        server,
        Arc::new(socket),
        Arc::new(quinn::TokioRuntime),
    )?)
}

fn shared_udp_socket(bind: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};
    let family = if bind.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rustix::net::socket_with(family, SocketType::DGRAM, SocketFlags::CLOEXEC, None)?;
    sockopt::set_socket_reuseport(&fd, true)?;
    rustix::net::bind(&fd, &bind)?;
    Ok(std::net::UdpSocket::from(fd))
}

/// Sizes of a socket's kernel buffers as the kernel reports them (Linux doubles the request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SocketBuffers {
    pub(crate) receive: usize,
    pub(crate) send: usize,
}

/// Asks for `SOCKET_BUFFER` in both directions. Unprivileged requests are capped by
/// `net.core.rmem_max`/`wmem_max`; with CAP_NET_ADMIN the cap is bypassed. What cannot be had
/// is logged with the sysctl that fixes it — the node still runs, with lower throughput.
pub(crate) fn size_socket_buffers(socket: &std::net::UdpSocket, bind: SocketAddr) -> SocketBuffers {
    use rustix::net::sockopt;
    let receive = grow_buffer(
        || sockopt::set_socket_recv_buffer_size(socket, SOCKET_BUFFER),
        || sockopt::set_socket_recv_buffer_size_force(socket, SOCKET_BUFFER),
        || sockopt::socket_recv_buffer_size(socket),
    );
    let send = grow_buffer(
        || sockopt::set_socket_send_buffer_size(socket, SOCKET_BUFFER),
        || sockopt::set_socket_send_buffer_size_force(socket, SOCKET_BUFFER),
        || sockopt::socket_send_buffer_size(socket),
    );
    for (size, sysctl, what) in [
        (receive, "net.core.rmem_max", "receive"),
        (send, "net.core.wmem_max", "send"),
    ] {
        if size < SOCKET_BUFFER {
            tracing::warn!(
                socket = %bind,
                have_kib = size / 1024,
                want_kib = SOCKET_BUFFER / 1024,
                "tunnel UDP {what} buffer is smaller than wanted, so bursts will be dropped and \
                 throughput fall; fix: sysctl -w {sysctl}={SOCKET_BUFFER} (the .deb ships \
                 /usr/lib/sysctl.d/60-hybridge.conf with it)"
            );
        }
    }
    SocketBuffers { receive, send }
}

/// Plain request first (capped by the sysctl), the privileged one only if that fell short.
fn grow_buffer(
    set: impl Fn() -> rustix::io::Result<()>,
    force: impl Fn() -> rustix::io::Result<()>,
    get: impl Fn() -> rustix::io::Result<usize>,
) -> usize {
    let _ = set();
    let have = get().unwrap_or(0);
    if have >= SOCKET_BUFFER {
        return have;
    }
    // Fails with EPERM without CAP_NET_ADMIN; then the capped size stays.
    let _ = force();
    get().unwrap_or(have)
}

/// The SNI name to present when dialing `host`. Peers are identified by their SPIFFE id, not
/// by this name, so any syntactically valid name works; we use the host when it is one.
pub(crate) fn server_name_for(host: &str) -> String {
    if rustls_pki_types::ServerName::try_from(host.to_owned()).is_ok() {
        host.to_owned()
    } else {
        "hybridge".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_buffers_report_what_the_kernel_granted() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let bind = socket.local_addr().unwrap();
        let got = size_socket_buffers(&socket, bind);
        let kernel = SocketBuffers {
            receive: rustix::net::sockopt::socket_recv_buffer_size(&socket).unwrap(),
            send: rustix::net::sockopt::socket_send_buffer_size(&socket).unwrap(),
        };
        assert_eq!(got, kernel);
        let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        // Granted either by the sysctl (Linux doubles the request) or by CAP_NET_ADMIN.
        if rmem_max * 2 >= SOCKET_BUFFER || rustix::process::geteuid().is_root() {
            assert!(got.receive >= SOCKET_BUFFER, "{got:?}");
        }
    }
}
