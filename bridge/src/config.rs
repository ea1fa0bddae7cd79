//! The node configuration: TOML parsed once into checked, typed values.
//!
//! Every mistake becomes a `ConfigError` naming the file, the line and the field; nothing
//! downstream re-validates. It does not open files other than the config itself (TLS
//! material is loaded by the node, so `check-config` and reload share one path).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::acl::model::ServiceName;
use crate::http::path::EscapedSlashes;
use crate::upstream::UpstreamSettings;

pub(crate) use hybridge_ca::tls::CrlStale;

mod host_port;
pub(crate) mod reload;
mod validate;

pub(crate) use host_port::HostPort;

/// A configuration mistake, displayed as `FILE:LINE: message`.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    pub(crate) path: PathBuf,
    pub(crate) line: Option<usize>,
    pub(crate) message: String,
}

/// A checked node configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file this came from (relative paths inside it are resolved against its folder).
    pub(crate) source: PathBuf,
    pub node: NodeSection,
    pub(crate) tls: TlsSection,
    pub tunnel: TunnelSection,
    pub peers: Vec<PeerConfig>,
    pub admin: AdminSection,
    pub(crate) limits: LimitsSection,
    pub(crate) exports: Vec<ExportConfig>,
    pub imports: Vec<ImportConfig>,
    pub(crate) gateway: Option<GatewayConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    pub(crate) name: String,
    pub site: String,
    pub(crate) trust_domain: String,
    pub data_dir: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsSection {
    pub(crate) ca: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    #[serde(default)]
    pub(crate) crl: Option<PathBuf>,
    /// A CRL past its nextUpdate: warn and keep checking against it (default, fail-open), or
    /// refuse every peer until a current one is loaded.
    #[serde(default)]
    pub(crate) crl_stale: CrlStale,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelSection {
    /// UDP address to accept tunnels on (the cloud side); none for a dial-only node.
    #[serde(default)]
    pub(crate) listen: Option<SocketAddr>,
    /// Sites whose nodes may connect to `listen`.
    #[serde(default)]
    pub allowed_sites: Vec<String>,
    /// Local UDP address used when dialing out (when there is no `listen`).
    #[serde(default = "default_dial_bind")]
    pub(crate) bind: SocketAddr,
    #[serde(default = "default_keepalive", with = "hybridge_ca::duration::setting")]
    pub(crate) keepalive: Duration,
    #[serde(
        default = "default_idle_timeout",
        with = "hybridge_ca::duration::setting"
    )]
    pub(crate) idle_timeout: Duration,
    #[serde(
        default = "default_backoff_max",
        with = "hybridge_ca::duration::setting"
    )]
    pub(crate) reconnect_max_backoff: Duration,
    /// Which carrier tunnels use: `auto` (QUIC, with TLS/TCP when QUIC does not come up),
    /// `quic` or `tcp`. A listening node accepts TLS/TCP tunnels unless this is `quic`.
    #[serde(default)]
    pub(crate) transport: Transport,
    /// TCP address to accept TLS/TCP tunnels on; the same address as `listen` by default.
    #[serde(default)]
    pub(crate) listen_tcp: Option<SocketAddr>,
    /// `auto`: how long a QUIC handshake may go unanswered before TLS/TCP is tried beside it.
    #[serde(
        default = "default_tcp_fallback_after",
        with = "hybridge_ca::duration::setting"
    )]
    pub(crate) tcp_fallback_after: Duration,
    /// `auto`: while a link runs on TLS/TCP, how often QUIC is tried again.
    #[serde(
        default = "default_quic_reprobe_interval",
        with = "hybridge_ca::duration::setting"
    )]
    pub(crate) quic_reprobe_interval: Duration,
    /// The congestion controller of this node's sending side, on both carriers: quinn's for
    /// QUIC, the kernel's (`TCP_CONGESTION`) for TLS/TCP. See [`Congestion`].
    #[serde(default)]
    pub(crate) congestion: Congestion,
    /// The tunnel addresses of this site's listening nodes, this one included, that nodes
    /// dialling in through a load balancer should each keep a direct link to (their
    /// `[[peer]] member_networks` must hold them). Told to every dialling peer, so a
    /// request entering any of these nodes finds a link to every connected site. IP
    /// literals, at most [`MAX_ANNOUNCED_MEMBERS`].
    #[serde(default)]
    pub announce: Vec<SocketAddr>,
}

/// Most member addresses a node announces, and most a dialling node takes from one site.
pub(crate) const MAX_ANNOUNCED_MEMBERS: usize = 64;

/// The congestion controller (`tunnel.congestion`). Each node picks its own for what it
/// sends: downloads follow the listening node's choice, uploads the dialling node's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Congestion {
    /// Paces at the measured bottleneck rate and does not read random loss as congestion.
    #[default]
    Bbr,
    /// Loss-based: halves (QUIC: 0.7×) its window at every loss.
    Cubic,
    /// Loss-based, the RFC 9002 reference controller.
    NewReno,
}

impl Congestion {
    /// The Linux name of the same algorithm, for `TCP_CONGESTION`.
    pub(crate) fn kernel_name(self) -> &'static str {
        match self {
            Congestion::Bbr => "bbr",
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "reno",
        }
    }
}

/// The tunnel carrier (`tunnel.transport`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Transport {
    /// QUIC first; TLS/TCP when QUIC does not come up, and back to QUIC once it does.
    #[default]
    Auto,
    Quic,
    Tcp,
}

impl TunnelSection {
    /// The TCP address TLS/TCP tunnels are accepted on, if this node accepts them.
    pub(crate) fn tcp_listen_address(&self) -> Option<SocketAddr> {
        match (self.listen, self.transport) {
            (None, _) | (_, Transport::Quic) => None,
            (Some(listen), _) => Some(self.listen_tcp.unwrap_or(listen)),
        }
    }
}

impl Default for TunnelSection {
    fn default() -> Self {
        Self {
            listen: None,
            allowed_sites: Vec::new(),
            bind: default_dial_bind(),
            keepalive: default_keepalive(),
            idle_timeout: default_idle_timeout(),
            reconnect_max_backoff: default_backoff_max(),
            transport: Transport::default(),
            listen_tcp: None,
            tcp_fallback_after: default_tcp_fallback_after(),
            quic_reprobe_interval: default_quic_reprobe_interval(),
            congestion: Congestion::default(),
            announce: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// `host:port` of the peer's tunnel listener, resolved at every dial.
    pub(crate) address: HostPort,
    /// The site the peer's certificate must name.
    pub site: String,
    /// Optionally, the exact node name the peer's certificate must carry.
    #[serde(default)]
    pub(crate) name: Option<String>,
    /// Parallel connections kept to this peer (at least one per worker thread).
    #[serde(default = "default_connections")]
    pub(crate) connections: u8,
    /// Networks (CIDR) from which this peer site's nodes may announce their own tunnel
    /// addresses (`tunnel.announce` on their side); this node then keeps one more link to
    /// each announced node, so every node of that site has a link to this one. Empty: only
    /// `address` is dialled.
    #[serde(default)]
    pub(crate) member_networks: Vec<ipnet::IpNet>,
}

/// The admin API's three doors (README "Admin access model"): a Unix socket serving the whole
/// API to local administrators, a read-only TCP listener for health, metrics and status, and,
/// only when configured, a remote mTLS listener for administrator certificates.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Read-only HTTP listener: GET/HEAD of `/healthz`, `/readyz`, `/metrics`, `/v1/status`.
    #[serde(default = "default_admin_listen")]
    pub(crate) listen: SocketAddr,
    /// Must be set for `listen` to be anything but loopback: even read-only, status and
    /// metrics describe the node's peers and services. It never enables writes.
    #[serde(default)]
    pub(crate) allow_remote: bool,
    /// Optional second listener serving only `/healthz` and `/readyz`, for load balancer
    /// health checks; it exposes nothing else, so it may listen on any address.
    #[serde(default)]
    pub health_listen: Option<SocketAddr>,
    /// Unix socket serving the whole API (reads and writes) to local processes, mode 0660 in
    /// the daemon's group (`hybridge` under systemd); the caller's uid is audited.
    #[serde(default = "default_admin_socket")]
    pub(crate) socket: PathBuf,
    /// Remote administration (`[admin.remote]`): off unless configured.
    #[serde(default)]
    pub(crate) remote: Option<AdminRemoteSection>,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            allow_remote: false,
            health_listen: None,
            socket: default_admin_socket(),
            remote: None,
        }
    }
}

/// `[admin.remote]`: an mTLS (TLS 1.3) listener serving the whole API to clients presenting an
/// administrator certificate (`spiffe://TD/admin/NAME`) from the node's CA, not revoked by its
/// CRL. Node and service certificates are refused in the handshake.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminRemoteSection {
    /// TCP address of the listener, e.g. `0.0.0.0:7182`.
    pub(crate) listen: SocketAddr,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsSection {
    /// Largest request header block accepted from a caller (431 beyond it).
    #[serde(default = "default_max_header_bytes")]
    pub(crate) max_header_bytes: usize,
    /// How long SIGTERM waits for in-flight requests before closing tunnels anyway.
    #[serde(
        default = "default_drain_timeout",
        with = "hybridge_ca::duration::setting"
    )]
    pub(crate) drain_timeout: Duration,
    /// Most connections each import and gateway listener holds open; a new one over it is
    /// closed at once (and counted). Sized well under the unit's `LimitNOFILE` (65536).
    #[serde(default = "default_max_connections")]
    pub(crate) max_connections: usize,
    /// A caller connection with no request in flight for this long is closed (HTTP/1.1
    /// keep-alive, HTTP/2, and a connection that never sends a whole request).
    #[serde(
        default = "default_connection_idle_timeout",
        with = "hybridge_ca::duration::setting"
    )]
    pub(crate) idle_timeout: Duration,
    /// How long `hybridge run` holds back systemd's `READY=1` at start while a dialling node
    /// is not ready (a tunnel to a peer site missing); then READY=1 goes anyway, with
    /// `STATUS=` naming what is missing, so a WAN outage at boot neither fails the start nor
    /// restarts the service in a loop. `"0s"`: READY=1 as soon as the listeners are bound.
    #[serde(
        default = "default_ready_timeout",
        with = "hybridge_ca::duration::setting"
    )]
    pub(crate) ready_timeout: Duration,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_header_bytes: default_max_header_bytes(),
            drain_timeout: default_drain_timeout(),
            max_connections: default_max_connections(),
            idle_timeout: default_connection_idle_timeout(),
            ready_timeout: default_ready_timeout(),
        }
    }
}

/// A service this node makes reachable from the other site.
#[derive(Clone, Debug)]
pub(crate) struct ExportConfig {
    pub(crate) name: ServiceName,
    pub(crate) upstream: UpstreamSettings,
    /// `%2F`/`%5C` in a request path: refused (default) or kept, for this export's decisions.
    pub(crate) escaped_slashes: EscapedSlashes,
}

/// How a listener learns who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CallerIdentity {
    /// Every connection is this service (legacy plain-HTTP callers).
    Fixed(ServiceName),
    /// The caller presents a service certificate from our CA; its SPIFFE id names it.
    Mtls,
}

/// A listener for one remote service.
#[derive(Clone, Debug)]
pub struct ImportConfig {
    pub(crate) service: ServiceName,
    pub listen: SocketAddr,
    pub(crate) caller: CallerIdentity,
    pub(crate) request_timeout: Option<Duration>,
    /// `%2F`/`%5C` in a request path: refused (default) or kept.
    pub(crate) escaped_slashes: EscapedSlashes,
}

/// The shared listener that routes by `Host`/`:authority` = `SERVICE.SUFFIX`.
#[derive(Clone, Debug)]
pub(crate) struct GatewayConfig {
    pub(crate) listen: SocketAddr,
    pub(crate) suffix: String,
    pub(crate) caller: CallerIdentity,
    pub(crate) request_timeout: Option<Duration>,
    /// `%2F`/`%5C` in a request path: refused (default) or kept.
    pub(crate) escaped_slashes: EscapedSlashes,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: NodeSection,
    tls: TlsSection,
    #[serde(default)]
    tunnel: TunnelSection,
    #[serde(default, rename = "peer")]
    peers: Vec<PeerConfig>,
    #[serde(default)]
    admin: AdminSection,
    #[serde(default)]
    limits: LimitsSection,
    /// Read again from the parsed document by `Source::exports`, where each table keeps the
    /// spans of its keys (an `[[export]]` is a service name beside upstream settings).
    #[serde(default, rename = "export")]
    _exports: Vec<serde::de::IgnoredAny>,
    #[serde(default, rename = "import")]
    imports: Vec<toml::Spanned<RawListener>>,
    #[serde(default)]
    gateway: Option<toml::Spanned<RawListener>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    #[serde(default)]
    service: Option<ServiceName>,
    listen: SocketAddr,
    #[serde(default)]
    caller: Option<ServiceName>,
    #[serde(default)]
    mtls: bool,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default, with = "hybridge_ca::duration::setting")]
    request_timeout: Option<Duration>,
    #[serde(default)]
    escaped_slashes: EscapedSlashes,
}

fn default_dial_bind() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}
fn default_keepalive() -> Duration {
    Duration::from_secs(1)
}
fn default_idle_timeout() -> Duration {
    // Five missed 1 s keepalives: a crashed peer stops receiving requests within 5 s, while a
    // few seconds of packet loss on a healthy WAN path does not drop the tunnel.
    Duration::from_secs(5)
}
fn default_tcp_fallback_after() -> Duration {
    // A QUIC handshake takes one round trip; a second without an answer means UDP is lost or
    // blocked, and TLS/TCP raced beside it then costs a blocked network about one second.
    Duration::from_secs(1)
}
fn default_quic_reprobe_interval() -> Duration {
    Duration::from_secs(120)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(2)
}
fn default_connections() -> u8 {
    2
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7180))
}
/// The admin socket when the config names none; also where `hybridge acl` and `hybridge
/// status` look by default. systemd creates `/run/hybridge` (`RuntimeDirectory=`).
pub(crate) const DEFAULT_ADMIN_SOCKET: &str = "/run/hybridge/admin.sock";
/// Longest Unix socket path: `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
fn default_admin_socket() -> PathBuf {
    PathBuf::from(DEFAULT_ADMIN_SOCKET)
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_connection_idle_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_ready_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Config {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_owned(),
            line: None,
            message: format!("cannot read config: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Parses `text` as if read from `path` (relative paths resolve against its folder).
    ///
    /// The sections are checked in the order below, so a file with several mistakes always
    /// reports the same one first.
    pub(crate) fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let (source, raw) = validate::Source::read(path, text)?;
        let node = source.node(raw.node)?;
        let tls = source.tls(raw.tls);
        source.tunnel(&raw.tunnel, &raw.peers)?;
        source.peers(&raw.peers)?;
        source.announce(&raw.tunnel)?;
        let admin = source.admin(raw.admin)?;
        let exports = source.exports()?;
        let mut listens = HashSet::new();
        let imports = source.imports(raw.imports, &mut listens)?;
        let gateway = source.gateway(raw.gateway, &mut listens)?;
        source.limits(&raw.limits)?;
        Ok(Config {
            source: path.to_owned(),
            node,
            tls,
            tunnel: raw.tunnel,
            peers: raw.peers,
            admin,
            limits: raw.limits,
            exports,
            imports,
            gateway,
        })
    }

    /// The redb file holding this node's policy.
    pub fn database_path(&self) -> PathBuf {
        self.node.data_dir.join("hybridge.redb")
    }

    /// Names of the services this node exports, sorted.
    pub fn export_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.exports.iter().map(|e| e.name.to_string()).collect();
        names.sort();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
name = "onprem-1"
site = "onprem"
trust_domain = "example.internal"
data_dir = "state"

[tls]
ca = "ca.pem"
cert = "/etc/hybridge/node.pem"
key = "node.key"

[[peer]]
address = "cloud.example.com:4433"
site = "cloud"

[[export]]
name = "ledger"
endpoints = ["127.0.0.1:9000"]

[[import]]
service = "inventory"
listen = "127.0.0.1:8081"
caller = "web"

[gateway]
listen = "127.0.0.1:8080"
mtls = true
"#;

    #[test]
    fn a_good_config_parses_with_paths_resolved() {
        let c = Config::parse(Path::new("/etc/hybridge/hybridge.toml"), GOOD).unwrap();
        assert_eq!(c.node.data_dir, PathBuf::from("/etc/hybridge/state"));
        assert_eq!(c.tls.key, PathBuf::from("/etc/hybridge/node.key"));
        assert_eq!(c.peers[0].connections, 2);
        assert_eq!(c.exports[0].name, "ledger");
        assert_eq!(
            c.imports[0].caller,
            CallerIdentity::Fixed(ServiceName::try_from("web".to_owned()).unwrap())
        );
        let gateway = c.gateway.unwrap();
        assert_eq!(
            (gateway.caller, gateway.suffix.as_str()),
            (CallerIdentity::Mtls, "hybridge")
        );
        assert_eq!(c.admin.listen, "127.0.0.1:7180".parse().unwrap());
        assert_eq!(c.admin.socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
        assert_eq!(c.admin.remote, None);
    }

    #[test]
    fn admin_socket_and_remote_listener_parse_and_are_checked() {
        let with_admin = |lines: &str| format!("{GOOD}\n[admin]\n{lines}\n");
        let c = Config::parse(
            Path::new("/etc/hybridge/hybridge.toml"),
            &with_admin("socket = \"run/admin.sock\"\n\n[admin.remote]\nlisten = \"0.0.0.0:7182\""),
        )
        .unwrap();
        assert_eq!(
            c.admin.socket,
            PathBuf::from("/etc/hybridge/run/admin.sock")
        );
        assert_eq!(
            c.admin.remote.map(|r| r.listen),
            Some("0.0.0.0:7182".parse().unwrap())
        );

        let long = format!("socket = \"/{}\"", "x".repeat(120));
        let e = error_of(&with_admin(&long));
        assert!(
            e.starts_with("/x/h.toml:31: field `admin.socket`: `/xxx")
                && e.ends_with("is 121 bytes long; a Unix socket path holds at most 107"),
            "{e}"
        );
        let e = error_of(&with_admin(
            "listen = \"127.0.0.1:7180\"\n\n[admin.remote]\nlisten = \"127.0.0.1:7180\"",
        ));
        assert_eq!(
            e,
            "/x/h.toml:34: field `admin.remote.listen`: 127.0.0.1:7180 is already used by `admin.listen` or `admin.health_listen`"
        );
        let e = error_of(&with_admin(
            "[admin.remote]\nlisten = \"0.0.0.0:7182\"\nmtls = true",
        ));
        assert!(
            e.starts_with("/x/h.toml:33: ") && e.contains("unknown field `mtls`"),
            "{e}"
        );
        let e = error_of(&with_admin("[admin.remote]\n"));
        assert!(e.contains("missing field `listen`"), "{e}");
    }

    #[test]
    fn escaped_slashes_default_to_reject_and_can_be_kept() {
        let c = Config::parse(Path::new("/x/h.toml"), GOOD).unwrap();
        assert_eq!(c.exports[0].escaped_slashes, EscapedSlashes::Reject);
        assert_eq!(c.imports[0].escaped_slashes, EscapedSlashes::Reject);
        assert_eq!(
            c.gateway.as_ref().map(|g| g.escaped_slashes),
            Some(EscapedSlashes::Reject)
        );
        let kept = GOOD
            .replace(
                "endpoints = [\"127.0.0.1:9000\"]",
                "endpoints = [\"127.0.0.1:9000\"]\nescaped_slashes = \"keep\"",
            )
            .replace(
                "caller = \"web\"",
                "caller = \"web\"\nescaped_slashes = \"keep\"",
            )
            .replace("mtls = true", "mtls = true\nescaped_slashes = \"reject\"");
        let c = Config::parse(Path::new("/x/h.toml"), &kept).unwrap();
        assert_eq!(c.exports[0].escaped_slashes, EscapedSlashes::Keep);
        assert_eq!(c.imports[0].escaped_slashes, EscapedSlashes::Keep);
        assert_eq!(
            c.gateway.map(|g| g.escaped_slashes),
            Some(EscapedSlashes::Reject)
        );
    }

    #[test]
    fn bad_escaped_slashes_name_file_line_and_field() {
        let e = error_of(&GOOD.replace(
            "endpoints = [\"127.0.0.1:9000\"]",
            "endpoints = [\"127.0.0.1:9000\"]\nescaped_slashes = \"decode\"",
        ));
        assert_eq!(
            e,
            "/x/h.toml:20: export `ledger`: field `escaped_slashes`: unknown variant `decode`, expected `reject` or `keep`"
        );
        let e = error_of(&GOOD.replace(
            "caller = \"web\"",
            "caller = \"web\"\nescaped_slashes = true",
        ));
        assert!(
            e.starts_with("/x/h.toml:25: field `escaped_slashes`: "),
            "{e}"
        );
        let e = error_of(&GOOD.replace("mtls = true", "mtls = true\nescaped_slashes = \"Keep\""));
        assert_eq!(
            e,
            "/x/h.toml:29: field `escaped_slashes`: unknown variant `Keep`, expected `reject` or `keep`"
        );
    }

    fn error_of(text: &str) -> String {
        Config::parse(Path::new("/x/h.toml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let bad = GOOD.replace("site = \"cloud\"", "site = \"cloud\"\nconections = 3");
        let e = error_of(&bad);
        assert!(e.starts_with("/x/h.toml:16: "), "{e}");
        assert!(e.contains("unknown field `conections`"), "{e}");
    }

    #[test]
    fn errors_are_located_by_the_spans_of_the_document() {
        let export = |extra: &str| {
            GOOD.replace(
                "endpoints = [\"127.0.0.1:9000\"]",
                &format!("endpoints = [\"127.0.0.1:9000\"]\n{extra}"),
            )
        };
        for (text, expected) in [
            (
                GOOD.replace("site = \"cloud\"", "site = \"Cloud\""),
                "/x/h.toml:15: field `peer[0].site`: invalid site \"Cloud\"",
            ),
            (
                GOOD.replace(":4433", ":0"),
                "/x/h.toml:14: field `address`: \"cloud.example.com:0\" is invalid: port 0 is not a destination",
            ),
            (
                GOOD.replace(
                    "endpoints = [\"127.0.0.1:9000\"]",
                    "endpoints = [\n  \"127.0.0.1:9000\",\n  \"[::1:9001\",\n]",
                ),
                "/x/h.toml:19: export `ledger`: field `endpoints`: \"[::1:9001\" is invalid: ",
            ),
            (
                export("[export.retry]\nmax_retries = \"two\""),
                "/x/h.toml:21: export `ledger`: field `max_retries`: invalid type",
            ),
            (
                GOOD.replace("caller = \"web\"", "caller = \"web\"\nservice = \"x\""),
                "/x/h.toml:25: ",
            ),
            (
                format!("{GOOD}\n[tunnel]\ntcp_fallback_after = \"2m\"\n"),
                "/x/h.toml:31: field `tunnel.tcp_fallback_after`: must be between 1ms and 60s",
            ),
        ] {
            let e = error_of(&text);
            assert!(e.starts_with(expected), "{e}\nexpected: {expected}");
        }
    }

    #[test]
    fn bad_values_are_named() {
        let e = error_of(&GOOD.replace("127.0.0.1:8081", "localhost-8081"));
        assert!(
            e.starts_with("/x/h.toml:23: field `listen`: invalid socket address"),
            "{e}"
        );
        let e = error_of(&GOOD.replace("name = \"ledger\"", "name = \"Ledger Svc\""));
        assert!(e.contains("export `Ledger Svc`: field `name`"), "{e}");
        let e = error_of(&GOOD.replace("caller = \"web\"", ""));
        assert!(
            e.starts_with("/x/h.toml:21: import: missing `caller"),
            "{e}"
        );
        let e = error_of(&GOOD.replace(
            "[[peer]]\naddress = \"cloud.example.com:4433\"\nsite = \"cloud\"",
            "",
        ));
        assert!(e.contains("neither accepts tunnels"), "{e}");
        let e = error_of(&format!("{GOOD}\n[limits]\nmax_connections = 0\n"));
        assert_eq!(
            e,
            "/x/h.toml:31: field `limits.max_connections`: must be at least 1"
        );
        let e = error_of(&format!("{GOOD}\n[limits]\nidle_timeout = \"10ms\"\n"));
        assert_eq!(
            e,
            "/x/h.toml:31: field `limits.idle_timeout`: must be at least 1s"
        );
        let e = error_of(&format!("{GOOD}\n[admin]\nlisten = \"0.0.0.0:7180\"\n"));
        assert!(
            e.starts_with("/x/h.toml:31: field `admin.listen`") && e.contains("allow_remote"),
            "{e}"
        );
        let e = error_of(&GOOD.replace(
            "endpoints = [\"127.0.0.1:9000\"]",
            "endpoints = [\"127.0.0.1:9000\"]\nprotocl = \"h2c\"",
        ));
        assert!(
            e.starts_with("/x/h.toml:20: export `ledger`: unknown field `protocl`"),
            "{e}"
        );
    }
}
