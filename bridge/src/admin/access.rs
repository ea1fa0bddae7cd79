//! Who may ask what on which admin listener, judged from the request head alone: the
//! browser defences (no `Origin`, `Host` naming the listener, JSON or TOML writes) and the
//! read-only scope of the TCP listener. Pure: no I/O, every refusal unit tested here.
//!
//! It must not authenticate: the socket's file mode and the remote listener's TLS verifier
//! decide who gets a connection at all; this decides what a connection may do.

use std::fmt;
use std::net::SocketAddr;

use http::{HeaderMap, Method, Uri, header};
use hybridge_ca::SpiffeId;

use super::unix::PeerCredentials;

/// Value of `x-hybridge-error` on every refusal made here.
pub(crate) const NOT_AUTHORISED: &str = "not-authorised";

/// Paths the read-only listener serves (GET and HEAD only).
const READ_ONLY_PATHS: [&str; 4] = ["/healthz", "/readyz", "/metrics", "/v1/status"];

/// What a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ListenerKind {
    /// `admin.listen`: GET/HEAD of health, readiness, metrics and status; nothing else.
    ReadOnly,
    /// `admin.health_listen`: `/healthz` and `/readyz` only, for load balancers.
    HealthOnly,
    /// `admin.socket`: the whole API for local processes allowed by the socket's mode.
    Socket,
    /// `[admin.remote]`: the whole API for administrator certificates (mTLS).
    Remote,
}

impl ListenerKind {
    /// Whether the listener serves writes and the ACL routes.
    pub(crate) fn is_full(self) -> bool {
        matches!(self, ListenerKind::Socket | ListenerKind::Remote)
    }
}

/// The parts of a listener the checks need.
#[derive(Clone, Debug)]
pub(crate) struct ListenerPolicy {
    pub(crate) kind: ListenerKind,
    /// Host names besides the connection's own address that name this listener, as
    /// `host:port` or bare `host` (the node certificate's DNS and IP SANs on the remote
    /// listener). Lowercase.
    pub(crate) extra_hosts: Vec<String>,
    /// Where writes go instead, named in read-only refusals.
    pub(crate) socket: String,
    /// Whether remote administration is configured, for the same message.
    pub(crate) remote: Option<SocketAddr>,
}

/// Who is on the other end of a connection, as far as the listener can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Caller {
    /// A local process on the admin socket (`SO_PEERCRED`).
    Local(PeerCredentials),
    /// A verified administrator certificate on the remote listener.
    Admin(SpiffeId),
    /// A TCP client of a read-only or health listener: only its address is known.
    Network(SocketAddr),
}

impl Caller {
    /// The actor recorded in the audit log: `uid:1000(alice)`, `spiffe://TD/admin/alice`.
    pub(crate) fn actor(&self) -> String {
        match self {
            Caller::Local(credentials) => credentials.actor(),
            Caller::Admin(id) => id.to_uri(),
            Caller::Network(addr) => format!("tcp:{addr}"),
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Local(credentials) => credentials.fmt(f),
            Caller::Admin(id) => id.fmt(f),
            Caller::Network(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// A request refused here: 403 with `x-hybridge-error: not-authorised` and this reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) reason: String,
}

/// The request head the checks look at.
pub(crate) struct RequestHead<'a> {
    pub method: &'a Method,
    pub(crate) uri: &'a Uri,
    pub headers: &'a HeaderMap,
}

/// Runs every check for `request` arriving on `policy`'s listener over a connection whose
/// local address is `local` (none for the socket). `Ok` lets the router answer (which may
/// still be 404 or 405).
pub(crate) fn check(
    policy: &ListenerPolicy,
    local: Option<SocketAddr>,
    request: &RequestHead<'_>,
) -> Result<(), Refusal> {
    let refuse = |reason: String| Err(Refusal { reason });
    if let Some(origin) = request.headers.get(header::ORIGIN) {
        return refuse(format!(
            "requests carrying an Origin header ({}) come from a web page and are refused: the admin API takes no cross-site requests",
            printable(origin.as_bytes())
        ));
    }
    match host_of(request) {
        Err(reason) => return refuse(reason),
        Ok(Some(host)) if !host_allowed(policy, local, &host) => {
            return refuse(format!(
                "Host {:?} does not name this listener ({}); a browser on a rebound DNS name sends that",
                host,
                expected_hosts(policy, local)
            ));
        }
        Ok(_) => {}
    }
    let read = request.method == Method::GET || request.method == Method::HEAD;
    let path = request.uri.path();
    if policy.kind == ListenerKind::ReadOnly && (path.starts_with("/v1/acl") || !read) {
        let what = if path.starts_with("/v1/acl") {
            "does not serve the ACL API (rules are internal policy)".to_string()
        } else {
            format!(
                "is read-only (GET/HEAD of {} only)",
                READ_ONLY_PATHS.join(", ")
            )
        };
        return refuse(format!(
            "the TCP admin listener {what}; use the admin socket (hybridge acl --admin unix:{}) or https:// with an administrator certificate{}",
            policy.socket,
            match policy.remote {
                Some(addr) => format!(
                    " (hybridge acl --admin https://HOST:{} --cert --key --ca)",
                    addr.port()
                ),
                None => " (configure [admin.remote])".to_string(),
            }
        ));
    }
    if policy.kind.is_full() && !read {
        let content_type = request
            .headers
            .get(header::CONTENT_TYPE)
            .map(|v| printable(v.as_bytes()));
        let media = content_type
            .as_deref()
            .and_then(|t| t.split(';').next())
            .map(|t| t.trim().to_ascii_lowercase());
        if !matches!(
            media.as_deref(),
            Some("application/json" | "application/toml")
        ) {
            return refuse(format!(
                "a {} needs Content-Type application/json or application/toml, not {}; web forms cannot send those across sites",
                request.method,
                content_type.map_or("none".to_string(), |t| format!("{t:?}"))
            ));
        }
    }
    Ok(())
}

/// The host the request names: `:authority` (HTTP/2, absolute-form) or `Host`; `None` when
/// absent (HTTP/1.0 tools; a browser always sends one).
fn host_of(request: &RequestHead<'_>) -> Result<Option<String>, String> {
    if let Some(authority) = request.uri.authority() {
        return Ok(Some(authority.as_str().to_ascii_lowercase()));
    }
    let mut hosts = request.headers.get_all(header::HOST).iter();
    let Some(first) = hosts.next() else {
        return Ok(None);
    };
    if hosts.next().is_some() {
        return Err("more than one Host header".to_string());
    }
    match first.to_str() {
        Ok(host) => Ok(Some(host.trim().to_ascii_lowercase())),
        Err(_) => Err(format!(
            "Host {} is not printable ASCII",
            printable(first.as_bytes())
        )),
    }
}

fn host_allowed(policy: &ListenerPolicy, local: Option<SocketAddr>, host: &str) -> bool {
    let Some(local) = local else {
        // The socket: what curl --unix-socket and our client send.
        return host == "localhost";
    };
    // A browser names every non-default port in Host, so a port-less Host never comes from
    // a page talking to this listener; health checkers (load balancers) do send the bare
    // address. What rebinding changes is the name, and that is checked either way.
    let (name, host_port) = split_host(host);
    if host_port.is_some_and(|p| p != local.port()) {
        return false;
    }
    let own_ip = match local.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or_else(|| format!("[{v6}]"), |v4| v4.to_string()),
        v4 => v4.to_string(),
    };
    ["localhost", "127.0.0.1", "[::1]", own_ip.as_str()].contains(&name)
        || policy
            .extra_hosts
            .iter()
            .any(|extra| extra == name || extra == host)
}

/// `name` and port of `host[:port]`, `[v6][:port]`.
fn split_host(host: &str) -> (&str, Option<u16>) {
    if host.starts_with('[') {
        return match host.rsplit_once("]:") {
            Some((name, port)) => (&host[..name.len() + 1], port.parse().ok().or(Some(0))),
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        // A port that does not parse names no port of ours: 0 never matches a listener.
        Some((name, port)) => (name, Some(port.parse().unwrap_or(0))),
        None => (host, None),
    }
}

fn expected_hosts(policy: &ListenerPolicy, local: Option<SocketAddr>) -> String {
    match local {
        None => "localhost, or no Host".to_string(),
        Some(local) => {
            let port = local.port();
            let mut names = vec![
                format!("127.0.0.1:{port}"),
                format!("localhost:{port}"),
                format!("[::1]:{port}"),
            ];
            let own = local.to_string();
            if !names.contains(&own) {
                names.push(own);
            }
            names.extend(policy.extra_hosts.iter().map(|h| format!("{h}:{port}")));
            format!("expected {}", names.join(", "))
        }
    }
}

/// Header bytes for a log line or message: lossy, bounded.
fn printable(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
    if text.chars().count() > 200 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(kind: ListenerKind) -> ListenerPolicy {
        ListenerPolicy {
            kind,
            extra_hosts: vec!["cloud-1.corp.example".into()],
            socket: "/run/hybridge/admin.sock".into(),
            remote: None,
        }
    }

    fn run(
        kind: ListenerKind,
        local: Option<&str>,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Result<(), String> {
        let uri: Uri = uri.parse().unwrap();
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        check(
            &policy(kind),
            local.map(|l| l.parse().unwrap()),
            &RequestHead {
                method: &method,
                uri: &uri,
                headers: &map,
            },
        )
        .map_err(|r| r.reason)
    }

    const TCP: Option<&str> = Some("127.0.0.1:7180");

    #[test]
    fn read_only_listener_serves_reads_of_its_four_paths_only() {
        use ListenerKind::ReadOnly;
        for path in READ_ONLY_PATHS {
            let host = [("host", "127.0.0.1:7180")];
            assert_eq!(run(ReadOnly, TCP, Method::GET, path, &host), Ok(()));
            assert_eq!(run(ReadOnly, TCP, Method::HEAD, path, &host), Ok(()));
        }
        // Unknown reads go on to the router's 404.
        assert_eq!(run(ReadOnly, TCP, Method::GET, "/nope", &[]), Ok(()));
        let acl = run(ReadOnly, TCP, Method::GET, "/v1/acl/rules", &[]).unwrap_err();
        assert_eq!(
            acl,
            "the TCP admin listener does not serve the ACL API (rules are internal policy); use the admin socket (hybridge acl --admin unix:/run/hybridge/admin.sock) or https:// with an administrator certificate (configure [admin.remote])"
        );
        let write = run(
            ReadOnly,
            TCP,
            Method::POST,
            "/v1/acl/apply",
            &[("content-type", "application/toml")],
        )
        .unwrap_err();
        assert!(write.contains("use the admin socket"), "{write}");
        let delete = run(ReadOnly, TCP, Method::DELETE, "/v1/status", &[]).unwrap_err();
        assert!(
            delete.starts_with(
                "the TCP admin listener is read-only (GET/HEAD of /healthz, /readyz, /metrics, /v1/status only)"
            ),
            "{delete}"
        );
    }

    #[test]
    fn origin_is_refused_everywhere() {
        for (kind, local) in [
            (ListenerKind::ReadOnly, TCP),
            (ListenerKind::HealthOnly, TCP),
            (ListenerKind::Socket, None),
            (ListenerKind::Remote, Some("10.0.0.5:7182")),
        ] {
            let err = run(
                kind,
                local,
                Method::GET,
                "/healthz",
                &[("origin", "http://evil.example")],
            )
            .unwrap_err();
            assert!(
                err.starts_with("requests carrying an Origin header (http://evil.example)"),
                "{kind:?}: {err}"
            );
        }
        // Even "null", which sandboxed frames and file:// pages send.
        assert!(
            run(
                ListenerKind::Socket,
                None,
                Method::GET,
                "/v1/status",
                &[("origin", "null")]
            )
            .is_err()
        );
    }

    #[test]
    fn host_must_name_the_listener() {
        use ListenerKind::{ReadOnly, Remote, Socket};
        for good in [
            "127.0.0.1:7180",
            "localhost:7180",
            "LOCALHOST:7180",
            "[::1]:7180",
        ] {
            assert_eq!(
                run(ReadOnly, TCP, Method::GET, "/metrics", &[("host", good)]),
                Ok(()),
                "{good}"
            );
        }
        for bad in [
            "evil.example:7180",
            "127.0.0.1:7181",
            "localhost:x",
            "[::1]:1",
            "attacker.example",
        ] {
            let err = run(ReadOnly, TCP, Method::GET, "/metrics", &[("host", bad)]).unwrap_err();
            assert!(err.contains("does not name this listener"), "{bad}: {err}");
        }
        let err = run(
            ReadOnly,
            TCP,
            Method::GET,
            "/metrics",
            &[("host", "evil.example:7180")],
        )
        .unwrap_err();
        assert_eq!(
            err,
            "Host \"evil.example:7180\" does not name this listener (expected 127.0.0.1:7180, localhost:7180, [::1]:7180, cloud-1.corp.example:7180); a browser on a rebound DNS name sends that"
        );
        // HTTP/2 and absolute-form requests carry the authority in the URI.
        assert!(
            run(
                ReadOnly,
                TCP,
                Method::GET,
                "http://evil.example:7180/metrics",
                &[]
            )
            .is_err()
        );
        assert_eq!(
            run(
                ReadOnly,
                TCP,
                Method::GET,
                "http://localhost:7180/metrics",
                &[]
            ),
            Ok(())
        );
        assert!(
            run(
                ReadOnly,
                TCP,
                Method::GET,
                "/metrics",
                &[("host", "localhost:7180"), ("host", "evil:7180")]
            )
            .is_err()
        );
        // A wildcard listener: the address the client reached, and the node's names.
        let wildcard = Some("10.0.0.5:7182");
        for good in [
            "10.0.0.5:7182",
            "cloud-1.corp.example:7182",
            "localhost:7182",
        ] {
            assert_eq!(
                run(
                    Remote,
                    wildcard,
                    Method::GET,
                    "/v1/status",
                    &[("host", good)]
                ),
                Ok(()),
                "{good}"
            );
        }
        assert!(
            run(
                Remote,
                Some("[::ffff:10.0.0.5]:7182"),
                Method::GET,
                "/v1/status",
                &[("host", "10.0.0.5:7182")]
            )
            .is_ok()
        );
        assert!(
            run(
                Remote,
                wildcard,
                Method::GET,
                "/v1/status",
                &[("host", "10.0.0.6:7182")]
            )
            .is_err()
        );
        // The socket: localhost or nothing.
        assert_eq!(
            run(
                Socket,
                None,
                Method::GET,
                "/v1/status",
                &[("host", "localhost")]
            ),
            Ok(())
        );
        assert_eq!(run(Socket, None, Method::GET, "/v1/status", &[]), Ok(()));
        let err = run(
            Socket,
            None,
            Method::GET,
            "/v1/status",
            &[("host", "evil.example")],
        )
        .unwrap_err();
        assert!(err.contains("(localhost, or no Host)"), "{err}");
    }

    #[test]
    fn writes_need_json_or_toml() {
        use ListenerKind::{Remote, Socket};
        for good in [
            "application/json",
            "application/toml",
            "Application/JSON; charset=utf-8",
        ] {
            assert_eq!(
                run(
                    Socket,
                    None,
                    Method::POST,
                    "/v1/acl/rules",
                    &[("content-type", good)]
                ),
                Ok(()),
                "{good}"
            );
        }
        let err = run(
            Socket,
            None,
            Method::POST,
            "/v1/acl/rules",
            &[("content-type", "text/plain")],
        )
        .unwrap_err();
        assert_eq!(
            err,
            "a POST needs Content-Type application/json or application/toml, not \"text/plain\"; web forms cannot send those across sites"
        );
        for bad in [
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
        ] {
            assert!(
                run(
                    Remote,
                    Some("127.0.0.1:7182"),
                    Method::POST,
                    "/v1/acl/apply",
                    &[("content-type", bad)]
                )
                .is_err()
            );
        }
        assert!(
            run(Socket, None, Method::DELETE, "/v1/acl/rules/x", &[])
                .unwrap_err()
                .contains("not none")
        );
        // Reads need no content type.
        assert_eq!(run(Socket, None, Method::GET, "/v1/acl/rules", &[]), Ok(()));
    }

    #[test]
    fn actors_name_the_caller() {
        let local = Caller::Local(PeerCredentials {
            uid: 0,
            gid: 0,
            pid: Some(9),
            user: Some("root".into()),
        });
        assert_eq!(local.actor(), "uid:0(root)");
        assert_eq!(local.to_string(), "uid:0(root) gid:0 pid:9");
        let admin = Caller::Admin(SpiffeId::admin("td", "alice").unwrap());
        assert_eq!(admin.actor(), "spiffe://td/admin/alice");
        let network = Caller::Network("127.0.0.1:5000".parse().unwrap());
        assert_eq!(network.to_string(), "tcp:127.0.0.1:5000");
    }
}
