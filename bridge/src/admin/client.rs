//! The one client of a node's admin API, for `hybridge status`, `hybridge acl` and tests:
//! `unix:/PATH` (the admin socket), `http://HOST:PORT` (the read-only listener) or
//! `https://HOST:PORT` with an administrator certificate (the remote listener). One HTTP/1.1
//! request per connection; plus the status table rendering.

use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Args;
use http::{HeaderMap, Method, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hybridge_ca::SpiffeId;
use hybridge_ca::tls::{PeerExpectation, TlsMaterial};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use super::document::{CrlStatus, StatusDocument};
use crate::config::DEFAULT_ADMIN_SOCKET;

/// Content type of the policy file `acl apply` sends.
pub(crate) const TOML: &str = "application/toml";
/// Content type of every other write.
pub(crate) const JSON: &str = "application/json";

/// Where a node's admin API is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminEndpoint {
    /// The admin socket: the whole API, for root and the socket's group.
    Unix(PathBuf),
    /// The read-only TCP listener (`admin.listen`): status, metrics, health.
    Http { authority: String },
    /// The remote mTLS listener (`[admin.remote]`), with an administrator certificate.
    Https { authority: String },
}

/// A malformed `--admin` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid admin address `{0}`: expected unix:/PATH, http://HOST:PORT or https://HOST:PORT")]
pub struct InvalidEndpoint(pub String);

impl FromStr for AdminEndpoint {
    type Err = InvalidEndpoint;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidEndpoint(text.to_string());
        if let Some(path) = text.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            if !path.is_absolute() || path.file_name().is_none() {
                return Err(invalid());
            }
            return Ok(AdminEndpoint::Unix(path));
        }
        let (https, rest) = match (text.strip_prefix("http://"), text.strip_prefix("https://")) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => return Err(invalid()),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        let valid = authority.parse::<http::uri::Authority>().is_ok_and(|a| {
            a.port_u16().is_some() && !a.host().is_empty() && !a.as_str().contains('@')
        });
        if !valid {
            return Err(invalid());
        }
        let authority = authority.to_string();
        Ok(if https {
            AdminEndpoint::Https { authority }
        } else {
            AdminEndpoint::Http { authority }
        })
    }
}

impl fmt::Display for AdminEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminEndpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            AdminEndpoint::Http { authority } => write!(f, "http://{authority}"),
            AdminEndpoint::Https { authority } => write!(f, "https://{authority}"),
        }
    }
}

impl Default for AdminEndpoint {
    fn default() -> Self {
        AdminEndpoint::Unix(PathBuf::from(DEFAULT_ADMIN_SOCKET))
    }
}

/// `--admin` and the administrator certificate, shared by `hybridge status` and `hybridge acl`.
#[derive(Clone, Debug, Default, Args)]
pub(crate) struct AdminArgs {
    /// The node's admin API: unix:/PATH (the admin socket), http://HOST:PORT (the read-only
    /// listener: status only) or https://HOST:PORT (the remote listener, with --cert, --key
    /// and --ca). Default: $HYBRIDGE_ADMIN, else unix:/run/hybridge/admin.sock. `acl apply`
    /// takes several (repeat --admin, or separate them with commas, here or in
    /// HYBRIDGE_ADMIN) and applies the file to each.
    #[arg(long, value_name = "ADDRESS", global = true, action = clap::ArgAction::Append, value_delimiter = ',')]
    pub(crate) admin: Vec<AdminEndpoint>,
    /// Administrator certificate chain for https:// (`hybridge-ca issue admin`).
    #[arg(long, value_name = "PEM", env = "HYBRIDGE_ADMIN_CERT", global = true)]
    pub(crate) cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, value_name = "PEM", env = "HYBRIDGE_ADMIN_KEY", global = true)]
    pub(crate) key: Option<PathBuf>,
    /// The hybridge CA bundle the node's certificate must chain to.
    #[arg(long, value_name = "PEM", env = "HYBRIDGE_ADMIN_CA", global = true)]
    pub(crate) ca: Option<PathBuf>,
}

/// Names the admin endpoint when `--admin` is not given. Read by hand rather than by clap so
/// that a value in the environment does not conflict with `hybridge acl --db`.
pub(crate) const ADMIN_ENV: &str = "HYBRIDGE_ADMIN";

impl AdminArgs {
    /// The one node asked: `--admin`, else `$HYBRIDGE_ADMIN`, else the default admin socket.
    /// Several are an error: only `acl apply` acts on several nodes ([`Self::endpoints`]).
    pub(crate) fn endpoint(&self) -> anyhow::Result<AdminEndpoint> {
        let mut endpoints = self.endpoints()?;
        if endpoints.len() > 1 {
            bail!(
                "{} admin addresses given ({}); this command asks one node (only `acl apply` takes several)",
                endpoints.len(),
                endpoints
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(endpoints.remove(0))
    }

    /// Every node asked, in order and at least one: `--admin` (repeated or comma-separated),
    /// else `$HYBRIDGE_ADMIN` (comma-separated), else the default admin socket. A malformed
    /// value in the environment is an error naming the variable and the value.
    pub(crate) fn endpoints(&self) -> anyhow::Result<Vec<AdminEndpoint>> {
        if !self.admin.is_empty() {
            return Ok(self.admin.clone());
        }
        match std::env::var(ADMIN_ENV) {
            Ok(value) if !value.trim().is_empty() => value
                .split(',')
                .map(|one| {
                    one.trim()
                        .parse::<AdminEndpoint>()
                        .with_context(|| format!("environment variable {ADMIN_ENV}={value:?}"))
                })
                .collect(),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(vec![AdminEndpoint::default()]),
            Err(std::env::VarError::NotUnicode(_)) => {
                bail!("environment variable {ADMIN_ENV} is not UTF-8")
            }
        }
    }

    /// A client for the chosen endpoint; https:// loads the certificate now, so a missing or
    /// mismatched file is reported before anything is sent.
    pub(crate) fn client(&self) -> anyhow::Result<AdminClient> {
        self.client_of(self.endpoint()?)
    }

    /// A client for each of [`Self::endpoints`].
    pub(crate) fn clients(&self) -> anyhow::Result<Vec<AdminClient>> {
        self.endpoints()?
            .into_iter()
            .map(|endpoint| self.client_of(endpoint))
            .collect()
    }

    fn client_of(&self, endpoint: AdminEndpoint) -> anyhow::Result<AdminClient> {
        let tls = match &endpoint {
            AdminEndpoint::Https { .. } => {
                let (Some(cert), Some(key), Some(ca)) = (&self.cert, &self.key, &self.ca) else {
                    bail!(
                        "--admin {endpoint} needs --cert, --key and --ca: an administrator certificate (`hybridge-ca issue admin`) and the CA bundle"
                    );
                };
                Some(ClientTls::load(cert, key, ca)?)
            }
            AdminEndpoint::Unix(_) | AdminEndpoint::Http { .. } => None,
        };
        Ok(AdminClient { endpoint, tls })
    }
}

/// The administrator certificate a https:// client presents.
#[derive(Clone)]
struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    identity: SpiffeId,
}

impl ClientTls {
    fn load(cert: &Path, key: &Path, ca: &Path) -> anyhow::Result<ClientTls> {
        let material = TlsMaterial::load(ca, cert, key, None)?;
        // The server must be a node of our trust domain; any site (names are not checked).
        let expect = PeerExpectation::NodeOfSites {
            trust_domain: material.own_id.trust_domain().to_string(),
            sites: Vec::new(),
        };
        let config = hybridge_ca::tls::client_config(&material, expect, &[b"http/1.1"])?;
        Ok(ClientTls {
            config: Arc::new(config),
            identity: material.own_id,
        })
    }
}

/// A response: status, headers and the whole body.
#[derive(Debug)]
pub(crate) struct AdminResponse {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl AdminResponse {
    /// The `error` of a JSON error body, or the body as text.
    pub(crate) fn message(&self) -> String {
        #[derive(serde::Deserialize)]
        struct ErrorBody {
            error: String,
        }
        serde_json::from_slice::<ErrorBody>(&self.body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&self.body).trim().to_string())
    }

    /// Fails with the node's reason unless the answer is 2xx.
    fn success(self, what: &str) -> anyhow::Result<AdminResponse> {
        if self.status.is_success() {
            return Ok(self);
        }
        let code = self
            .headers
            .get("x-hybridge-error")
            .and_then(|v| v.to_str().ok())
            .map(|c| format!(", {c}"))
            .unwrap_or_default();
        bail!("{}: {} ({}{code})", what, self.message(), self.status);
    }
}

/// A client of one admin endpoint.
#[derive(Clone)]
pub struct AdminClient {
    endpoint: AdminEndpoint,
    tls: Option<ClientTls>,
}

impl fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminClient")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    /// A client of the socket or the read-only listener (https:// needs [`AdminArgs::client`]).
    pub fn plain(endpoint: AdminEndpoint) -> anyhow::Result<AdminClient> {
        if matches!(endpoint, AdminEndpoint::Https { .. }) {
            bail!("--admin {endpoint} needs an administrator certificate");
        }
        Ok(AdminClient {
            endpoint,
            tls: None,
        })
    }

    pub(crate) fn endpoint(&self) -> &AdminEndpoint {
        &self.endpoint
    }

    /// Sends one request (`body` with its content type) and returns whatever the node answered.
    pub(crate) async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> anyhow::Result<AdminResponse> {
        let request = self.build_request(method, path, body)?;
        let response = match &self.endpoint {
            AdminEndpoint::Unix(socket) => {
                let stream = tokio::net::UnixStream::connect(socket)
                    .await
                    .map_err(|e| unix_connect_error(socket, &e))?;
                send(stream, request).await
            }
            AdminEndpoint::Http { authority } => {
                let stream = tokio::net::TcpStream::connect(authority.as_str())
                    .await
                    .with_context(|| {
                        format!(
                            "connecting to the admin listener at {} (is the node running?)",
                            self.endpoint
                        )
                    })?;
                send(stream, request).await
            }
            AdminEndpoint::Https { authority } => {
                return self.request_https(authority, request).await;
            }
        };
        response.with_context(|| format!("{}{path}", self.endpoint))
    }

    /// The request for `path`, addressed to the node and typed like its body (JSON for a
    /// write without one).
    fn build_request(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> anyhow::Result<http::Request<Full<Bytes>>> {
        let host = match &self.endpoint {
            // What curl --unix-socket sends; the socket refuses any other name.
            AdminEndpoint::Unix(_) => "localhost".to_string(),
            AdminEndpoint::Http { authority } | AdminEndpoint::Https { authority } => {
                authority.clone()
            }
        };
        let write = method != Method::GET && method != Method::HEAD;
        let mut builder = http::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, host);
        let body = match body {
            Some((content_type, bytes)) => {
                builder = builder.header(header::CONTENT_TYPE, content_type);
                bytes
            }
            None => {
                if write {
                    builder = builder.header(header::CONTENT_TYPE, JSON);
                }
                Bytes::new()
            }
        };
        builder
            .body(Full::new(body))
            .with_context(|| format!("building a request for {}{path}", self.endpoint))
    }

    /// Sends `request` to a remote admin listener over mTLS with the administrator
    /// certificate; a refused certificate is reported as such.
    async fn request_https(
        &self,
        authority: &str,
        request: http::Request<Full<Bytes>>,
    ) -> anyhow::Result<AdminResponse> {
        let tls = self
            .tls
            .as_ref()
            .context("https:// needs an administrator certificate (--cert, --key, --ca)")?;
        let stream = tokio::net::TcpStream::connect(authority)
                    .await
                    .with_context(|| {
                        format!("connecting to the remote admin listener at {} (is `[admin.remote]` configured?)", self.endpoint)
                    })?;
        let host = authority
            .parse::<http::uri::Authority>()
            .map(|a| a.host().trim_matches(|c| c == '[' || c == ']').to_string())
            .unwrap_or_default();
        // The node is checked by its SPIFFE id, not its name; SNI only needs a valid one.
        let name = rustls::pki_types::ServerName::try_from(host).unwrap_or_else(|_| {
            rustls::pki_types::ServerName::from(std::net::IpAddr::from(
                std::net::Ipv4Addr::LOCALHOST,
            ))
        });
        let refused = |e: &dyn fmt::Display| {
            anyhow::anyhow!(
                "the remote admin listener at {} refused this client ({e}); it accepts only administrator certificates (spiffe://{}/admin/NAME) from its CA that are not revoked, and this one is {}",
                self.endpoint,
                tls.identity.trust_domain(),
                tls.identity
            )
        };
        let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
        let stream = connector
            .connect(name, stream)
            .await
            .map_err(|e| refused(&e))?;
        // In TLS 1.3 the server judges the client certificate after the client's
        // handshake is done: a refusal arrives as an alert in place of the answer.
        send(stream, request)
            .await
            .map_err(|e| refused(&format_args!("{e:#}")))
    }

    /// GET that fails unless the answer is 2xx.
    pub async fn get(&self, path: &str) -> anyhow::Result<Bytes> {
        let response = self.request(Method::GET, path, None).await?;
        Ok(response.success(&format!("{}{path}", self.endpoint))?.body)
    }

    /// A JSON call: fails with the node's reason unless 2xx, else decodes the body.
    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> anyhow::Result<T> {
        let response = self
            .request(method, path, body)
            .await?
            .success("the admin API refused")?;
        serde_json::from_slice(&response.body)
            .with_context(|| format!("decoding the answer of {}{path}", self.endpoint))
    }
}

fn unix_connect_error(socket: &Path, error: &std::io::Error) -> anyhow::Error {
    let socket = socket.display();
    match error.kind() {
        std::io::ErrorKind::NotFound => anyhow::anyhow!(
            "no admin socket at {socket}: is the node running, and is that its `admin.socket`? (choose another with --admin unix:PATH or HYBRIDGE_ADMIN)"
        ),
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "permission denied on the admin socket {socket}: it admits root and members of its group (hybridge); join it (usermod -aG hybridge USER) or use --admin https://NODE:PORT with an administrator certificate"
        ),
        std::io::ErrorKind::ConnectionRefused => anyhow::anyhow!(
            "nothing answers on the admin socket {socket} (left by a node that did not stop cleanly?)"
        ),
        _ => anyhow::anyhow!("connecting to the admin socket {socket}: {error}"),
    }
}

async fn send<S>(stream: S, request: http::Request<Full<Bytes>>) -> anyhow::Result<AdminResponse>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(connection);
    let response = sender.send_request(request).await;
    let result = async {
        let response = response?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        Ok(AdminResponse {
            status,
            headers,
            body,
        })
    }
    .await;
    drop(sender);
    let _ = driver.await;
    result
}

/// Renders `/v1/status` as the human-readable `hybridge status` output.
pub fn render_status(doc: &StatusDocument) -> String {
    let mut out = String::new();
    render_node(&mut out, doc);
    render_peers(&mut out, doc);
    render_dialing(&mut out, doc);
    render_exports(&mut out, doc);
    let _ = writeln!(out, "\nIMPORT              LISTEN");
    for i in &doc.imports {
        let _ = writeln!(out, "{:<19} {}", i.service, i.listen);
    }
    if let Some(g) = &doc.gateway {
        let _ = writeln!(out, "(gateway)           {g}");
    }
    out
}

/// The first twelve characters of a policy digest.
fn short_digest(digest: &str) -> String {
    digest.chars().take(12).collect::<String>()
}

/// The node's identity, state, policy and CRL lines.
fn render_node(out: &mut String, doc: &StatusDocument) {
    let _ = writeln!(out, "node      {}", doc.node);
    let state = if doc.ready {
        "ready".to_owned()
    } else if doc.not_ready_reasons.is_empty() {
        "not ready".to_owned()
    } else {
        format!("not ready: {}", doc.not_ready_reasons.join("; "))
    };
    let _ = writeln!(
        out,
        "state     {}   uptime {}s   policy version {}   workers {}",
        state, doc.uptime_seconds, doc.policy_version, doc.workers
    );
    let disagreeing = doc.peers_disagreeing;
    let _ = writeln!(
        out,
        "policy    {}{}",
        short_digest(&doc.policy_digest),
        if disagreeing > 0 {
            format!("   {disagreeing} peer(s) DISAGREE")
        } else {
            String::new()
        }
    );
    for crl in &doc.crls {
        let _ = writeln!(out, "{}", crl_line(crl, &doc.crl_stale));
    }
}

/// The table of tunnel links.
fn render_peers(out: &mut String, doc: &StatusDocument) {
    let _ = writeln!(
        out,
        "\nPEER                                             REMOTE                 CARRIER  DIR       WORKER  RTT(ms)  STREAMS  POLICY                   EXPORTS"
    );
    for p in &doc.peers {
        let _ = writeln!(
            out,
            "{:<48} {:<22} {:<8} {:<9} {:>6}  {:>7.2}  {:>7}  {:<23}  {}{}",
            p.peer,
            p.remote,
            p.carrier,
            p.direction,
            p.worker,
            p.rtt_ms,
            p.active_streams,
            match p.policy_agrees {
                Some(true) => format!("{} agrees", short_digest(&p.policy_digest)),
                Some(false) => format!("{} DIFFERS", short_digest(&p.policy_digest)),
                None => "-".to_owned(),
            },
            p.exports.join(","),
            if p.draining { " (draining)" } else { "" }
        );
    }
}

/// The table of dialer slots, when there are any.
fn render_dialing(out: &mut String, doc: &StatusDocument) {
    if !doc.dialing.is_empty() {
        let _ = writeln!(
            out,
            "\nDIALING                        SLOT  STATE       FOR   CARRIER  WHY / LAST ERROR"
        );
        for d in &doc.dialing {
            let mut detail = Vec::new();
            if d.state == "up" {
                detail.extend(d.carrier_reason.clone());
            } else if let Some(error) = &d.last_error {
                detail.push(error.clone());
            }
            if let Some(ms) = d.next_retry_ms {
                detail.push(format!("retry in {ms} ms"));
            }
            let _ = writeln!(
                out,
                "{:<30} {:>4}  {:<10} {:>4}s  {:<7}  {}",
                if d.learned {
                    format!("{} ({}, announced)", d.address, d.site)
                } else {
                    format!("{} ({})", d.address, d.site)
                },
                d.slot,
                d.state,
                d.state_seconds,
                d.carrier.as_deref().unwrap_or("-"),
                detail.join("; ")
            );
        }
    }
}

/// The table of export endpoints, with failing DNS names and protection counters.
fn render_exports(out: &mut String, doc: &StatusDocument) {
    let _ = writeln!(
        out,
        "\nEXPORT              ENDPOINT                       ADDRESS                STATE      ACTIVE  REQUESTS  FAILURES  IDLE"
    );
    for e in &doc.exports {
        let upstream = &e.upstream;
        for endpoint in &upstream.endpoints {
            let state = if endpoint.ejected {
                "ejected"
            } else if !endpoint.healthy {
                "unhealthy"
            } else {
                "up"
            };
            let _ = writeln!(
                out,
                "{:<19} {:<30} {:<22} {:<9}  {:>6}  {:>8}  {:>8}  {:>4}",
                e.service,
                endpoint.name,
                endpoint.addr.to_string(),
                state,
                endpoint.active,
                endpoint.total_requests,
                endpoint.failures,
                endpoint.idle_connections,
            );
        }
        // A host name whose lookups fail keeps its last addresses; say so until it resolves.
        for name in &upstream.names {
            if let Some(error) = &name.dns_error {
                let _ = writeln!(
                    out,
                    "{:<19} {}: DNS lookup failing ({} failures: {error}); keeping its last addresses",
                    "", name.name, name.dns_failures,
                );
            }
        }
        let (pending, trips, retries) = (
            upstream.pending_requests,
            upstream.circuit_breaker_trips,
            upstream.retries,
        );
        if pending != 0 || trips != 0 || retries != 0 {
            let _ = writeln!(
                out,
                "{:<19} pending {pending}, circuit breaker trips {trips}, retries {retries}",
                ""
            );
        }
    }
}

/// `crl       #1 (number 3, 2 revoked)   next update in 3599s` or, once past it, when it
/// became stale and what the node does about it.
fn crl_line(crl: &CrlStatus, policy: &str) -> String {
    let number = crl
        .number
        .as_ref()
        .map(|n| format!("number {n}, "))
        .unwrap_or_default();
    let head = format!(
        "crl       #{} ({number}{} revoked)",
        crl.position, crl.revoked
    );
    match crl.next_update_seconds {
        None => format!("{head}   no nextUpdate"),
        Some(left) if crl.stale => {
            let effect = if policy == "refuse" {
                "every peer refused"
            } else {
                "still applied"
            };
            format!(
                "{head}   STALE: past its nextUpdate by {}s (tls.crl_stale = {policy}: {effect})",
                left.saturating_neg()
            )
        }
        Some(left) => format!("{head}   next update in {left}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses_parse_or_name_the_mistake() {
        assert_eq!(
            "unix:/run/hybridge/admin.sock".parse(),
            Ok(AdminEndpoint::Unix("/run/hybridge/admin.sock".into()))
        );
        assert_eq!(
            "http://127.0.0.1:7180".parse(),
            Ok(AdminEndpoint::Http {
                authority: "127.0.0.1:7180".into()
            })
        );
        assert_eq!(
            "https://cloud-1.corp.example:7182/".parse(),
            Ok(AdminEndpoint::Https {
                authority: "cloud-1.corp.example:7182".into()
            })
        );
        assert_eq!(
            "https://[::1]:7182"
                .parse::<AdminEndpoint>()
                .map(|e| e.to_string()),
            Ok("https://[::1]:7182".into())
        );
        for bad in [
            "127.0.0.1:7180",
            "http://127.0.0.1",
            "http://127.0.0.1:7180/v1",
            "http://user@host:1",
            "unix:relative.sock",
            "unix:",
            "ftp://h:1",
            "",
        ] {
            assert_eq!(
                bad.parse::<AdminEndpoint>().map_err(|e| e.to_string()),
                Err(format!(
                    "invalid admin address `{bad}`: expected unix:/PATH, http://HOST:PORT or https://HOST:PORT"
                )),
            );
        }
        assert_eq!(
            AdminEndpoint::default().to_string(),
            "unix:/run/hybridge/admin.sock"
        );
    }

    #[test]
    fn https_needs_a_certificate() {
        let args = AdminArgs {
            admin: vec!["https://h:1".parse().unwrap()],
            ..AdminArgs::default()
        };
        let err = args.client().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "--admin https://h:1 needs --cert, --key and --ca: an administrator certificate (`hybridge-ca issue admin`) and the CA bundle"
            )
        );
    }

    #[test]
    fn status_renders_tunnels_per_worker_and_one_row_per_upstream_endpoint() {
        let doc = serde_json::json!({
            "node": "spiffe://td/site/cloud/node/cloud-1",
            "ready": true,
            "draining": false,
            "uptime_seconds": 7,
            "policy_version": 3,
            "workers": 2,
            "peers": [{
                "peer": "spiffe://td/site/onprem/node/onprem-1",
                "remote": "10.0.0.5:40000",
                "carrier": "quic",
                "direction": "accepted",
                "worker": 2,
                "rtt_ms": 1.5,
                "active_streams": 4,
                "exports": ["ledger"],
                "draining": false,
            }],
            "exports": [{
                "service": "inventory",
                "upstream": {
                    "service": "inventory",
                    "endpoints": [
                        {"name": "10.1.0.1:8080", "addr": "10.1.0.1:8080", "healthy": true,
                         "ejected": false, "active": 1, "total_requests": 120, "failures": 0,
                         "idle_connections": 5},
                        {"name": "api.internal:8080", "addr": "10.1.0.2:8080", "healthy": false,
                         "ejected": false, "active": 0, "total_requests": 9, "failures": 9,
                         "idle_connections": 0},
                    ],
                    "names": [
                        {"name": "10.1.0.1:8080", "refreshed": false,
                         "addresses": ["10.1.0.1:8080"], "total_requests": 120, "failures": 0,
                         "dns_failures": 0, "dns_error": null},
                        {"name": "api.internal:8080", "refreshed": true,
                         "addresses": ["10.1.0.2:8080"], "total_requests": 9, "failures": 9,
                         "dns_failures": 3, "dns_error": "no addresses"},
                    ],
                    "active_requests": 1,
                    "pending_requests": 0,
                    "circuit_breaker_trips": 2,
                    "retries": 0,
                },
            }],
            "imports": [],
            "gateway": null,
            "crl_stale": "warn",
            "crls": [
                {"position": 1, "number": "3", "revoked": 2, "next_update_seconds": 3599, "stale": false},
                {"position": 2, "number": null, "revoked": 0, "next_update_seconds": -12, "stale": true},
            ],
        });
        let text = render_status(&serde_json::from_value(doc).unwrap());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].ends_with("policy version 3   workers 2"), "{text}");
        assert!(lines[2].starts_with("policy    "), "{text}");
        assert_eq!(
            lines[3],
            "crl       #1 (number 3, 2 revoked)   next update in 3599s"
        );
        assert_eq!(
            lines[4],
            "crl       #2 (0 revoked)   STALE: past its nextUpdate by 12s (tls.crl_stale = warn: still applied)"
        );
        let tunnel = lines.iter().find(|l| l.contains("10.0.0.5:40000")).unwrap();
        let columns: Vec<&str> = tunnel.split_whitespace().collect();
        assert_eq!(
            columns[2..7],
            ["quic", "accepted", "2", "1.50", "4"],
            "{text}"
        );
        let rows: Vec<Vec<&str>> = lines
            .iter()
            .filter(|l| l.starts_with("inventory "))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            [
                vec![
                    "inventory",
                    "10.1.0.1:8080",
                    "10.1.0.1:8080",
                    "up",
                    "1",
                    "120",
                    "0",
                    "5"
                ],
                vec![
                    "inventory",
                    "api.internal:8080",
                    "10.1.0.2:8080",
                    "unhealthy",
                    "0",
                    "9",
                    "9",
                    "0"
                ],
            ],
            "{text}"
        );
        assert!(
            text.contains(
                "api.internal:8080: DNS lookup failing (3 failures: no addresses); keeping its last addresses"
            ),
            "{text}"
        );
        assert!(
            text.contains("pending 0, circuit breaker trips 2, retries 0"),
            "{text}"
        );
    }
}
