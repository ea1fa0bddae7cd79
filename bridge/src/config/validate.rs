//! The checking half of `Config::parse`: the deserialized `RawConfig` turned section by section
//! into checked values, each mistake a `ConfigError` naming the file, the line and the field.
//!
//! Sections are checked in a fixed order (the first mistake is the one reported); nothing here
//! reads a file, and the line of a key is found in the config text itself.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    AdminSection, CallerIdentity, ConfigError, ExportConfig, GatewayConfig, ImportConfig,
    LimitsSection, MAX_ANNOUNCED_MEMBERS, MAX_SOCKET_PATH, NodeSection, PeerConfig, RawConfig,
    RawListener, TlsSection, TunnelSection,
};
use crate::http::path::EscapedSlashes;
use crate::upstream::UpstreamSettings;

/// The config text being checked and the file it was read from: errors name that file, and
/// relative paths resolve against its folder.
pub(super) struct Source<'a> {
    pub(super) path: &'a Path,
    pub(super) text: &'a str,
}

/// A listener table that passed the checks shared by imports and the gateway: the table, the
/// line of its header and who its callers are.
struct CheckedListener {
    raw: RawListener,
    line: Option<usize>,
    caller: CallerIdentity,
}

impl Source<'_> {
    /// A `ConfigError` in this file at `line`.
    fn error(&self, line: Option<usize>, message: String) -> ConfigError {
        ConfigError {
            path: self.path.to_owned(),
            line,
            message,
        }
    }

    /// `path` itself when absolute, otherwise joined to the config file's folder.
    fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            let base = self
                .path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default();
            base.join(path)
        }
    }

    /// The text deserialized into `RawConfig`. A syntax or type error names its line and, when
    /// the parser's message does not (a bad address, a bad duration), the key on that line.
    pub(super) fn deserialize(&self) -> Result<RawConfig, ConfigError> {
        let text = self.text;
        toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            let message = e.message().trim_end().replace('\n', " ");
            let key = line
                .and_then(|l| text.lines().nth(l - 1))
                .and_then(|l| l.split_once('='))
                .map(|(k, _)| k.trim())
                .filter(|k| !k.is_empty() && !message.contains(&format!("`{k}`")));
            match key {
                Some(k) => self.error(line, format!("field `{k}`: {message}")),
                None => self.error(line, message),
            }
        })
    }

    /// `[node]`: name, site and trust domain are SPIFFE path segments; `data_dir` is resolved.
    pub(super) fn node(&self, mut node: NodeSection) -> Result<NodeSection, ConfigError> {
        for (field, value) in [
            ("node.name", &node.name),
            ("node.site", &node.site),
            ("node.trust_domain", &node.trust_domain),
        ] {
            hybridge_ca::spiffe::validate_segment(field, value)
                .map_err(|e| self.error(None, format!("field `{field}`: {e}")))?;
        }
        node.data_dir = self.resolve(&node.data_dir);
        Ok(node)
    }

    /// `[tls]`: every file path resolved; the files themselves are loaded by the node.
    pub(super) fn tls(&self, mut tls: TlsSection) -> TlsSection {
        tls.ca = self.resolve(&tls.ca);
        tls.cert = self.resolve(&tls.cert);
        tls.key = self.resolve(&tls.key);
        tls.crl = tls.crl.as_deref().map(|crl| self.resolve(crl));
        tls
    }

    /// `[tunnel]`: a listening node names the sites it admits, a node listens or dials (has a
    /// `[[peer]]`), and the timers are in range. `announce` is checked by [`Self::announce`].
    pub(super) fn tunnel(
        &self,
        tunnel: &TunnelSection,
        peers: &[PeerConfig],
    ) -> Result<(), ConfigError> {
        let text = self.text;
        if tunnel.listen.is_some() && tunnel.allowed_sites.is_empty() {
            return Err(self.error(
                key_line(text, "tunnel", "listen"),
                "field `tunnel.allowed_sites`: must name at least one site when `tunnel.listen` is set".into(),
            ));
        }
        if tunnel.listen.is_none() && peers.is_empty() {
            return Err(self.error(
                None,
                "the node neither accepts tunnels (`tunnel.listen`) nor dials any (`[[peer]]`)"
                    .into(),
            ));
        }
        for site in &tunnel.allowed_sites {
            hybridge_ca::spiffe::validate_segment("site", site)
                .map_err(|e| self.error(None, format!("field `tunnel.allowed_sites`: {e}")))?;
        }
        if tunnel.idle_timeout <= tunnel.keepalive {
            return Err(self.error(
                key_line(text, "tunnel", "idle_timeout")
                    .or_else(|| key_line(text, "tunnel", "keepalive")),
                "field `tunnel.idle_timeout`: must be longer than `tunnel.keepalive`".into(),
            ));
        }
        if tunnel.tcp_fallback_after.is_zero()
            || tunnel.tcp_fallback_after > Duration::from_secs(60)
        {
            return Err(self.error(
                None,
                "field `tunnel.tcp_fallback_after`: must be between 1ms and 60s".into(),
            ));
        }
        if tunnel.quic_reprobe_interval < Duration::from_secs(1) {
            return Err(self.error(
                None,
                "field `tunnel.quic_reprobe_interval`: must be at least 1s".into(),
            ));
        }
        Ok(())
    }

    /// Every `[[peer]]`, in order, through [`Self::peer`].
    pub(super) fn peers(&self, peers: &[PeerConfig]) -> Result<(), ConfigError> {
        for (index, peer) in peers.iter().enumerate() {
            self.peer(index, peer)?;
        }
        Ok(())
    }

    /// The `index`th `[[peer]]`: `address` is HOST:PORT, `site` a SPIFFE segment,
    /// `connections` in 1..=16, and a peer pinned to one node (`name`) learns no members.
    fn peer(&self, index: usize, peer: &PeerConfig) -> Result<(), ConfigError> {
        let field = |f: &str| format!("field `peer[{index}].{f}`");
        let line = |f: &str| array_key_line(self.text, "peer", index, f);
        if peer
            .address
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return Err(self.error(
                line("address"),
                format!("{}: `{}` is not HOST:PORT", field("address"), peer.address),
            ));
        }
        hybridge_ca::spiffe::validate_segment("site", &peer.site)
            .map_err(|e| self.error(line("site"), format!("{}: {e}", field("site"))))?;
        if peer.connections == 0 || peer.connections > 16 {
            return Err(self.error(
                line("connections"),
                format!("{}: must be between 1 and 16", field("connections")),
            ));
        }
        if peer.name.is_some() && !peer.member_networks.is_empty() {
            return Err(self.error(
                line("member_networks"),
                format!(
                    "{}: a peer pinned to one node (`name`) has no other members to learn",
                    field("member_networks")
                ),
            ));
        }
        Ok(())
    }

    /// `tunnel.announce`, through [`validate_announce`], located at its key.
    pub(super) fn announce(&self, tunnel: &TunnelSection) -> Result<(), ConfigError> {
        validate_announce(tunnel)
            .map_err(|e| self.error(key_line(self.text, "tunnel", "announce"), e))
    }

    /// `[admin]`: a non-loopback `listen` needs `allow_remote`, the socket path is resolved
    /// and fits a Unix socket, and `[admin.remote]` does not reuse another admin address.
    pub(super) fn admin(&self, mut admin: AdminSection) -> Result<AdminSection, ConfigError> {
        let text = self.text;
        if !admin.listen.ip().is_loopback() && !admin.allow_remote {
            return Err(self.error(
                key_line(text, "admin", "listen"),
                format!(
                    "field `admin.listen`: {} is not loopback; the read-only admin listener shows status and metrics, set `admin.allow_remote = true` to expose it (writes always need `admin.socket` or `[admin.remote]`)",
                    admin.listen
                ),
            ));
        }
        admin.socket = self.resolve(&admin.socket);
        let socket_len = admin.socket.as_os_str().len();
        if admin.socket.file_name().is_none() || admin.socket.as_os_str().is_empty() {
            return Err(self.error(
                key_line(text, "admin", "socket"),
                format!(
                    "field `admin.socket`: `{}` names no file",
                    admin.socket.display()
                ),
            ));
        }
        if socket_len > MAX_SOCKET_PATH {
            return Err(self.error(
                key_line(text, "admin", "socket"),
                format!(
                    "field `admin.socket`: `{}` is {socket_len} bytes long; a Unix socket path holds at most {MAX_SOCKET_PATH}",
                    admin.socket.display()
                ),
            ));
        }
        if let Some(remote) = &admin.remote {
            let taken = [Some(admin.listen), admin.health_listen]
                .into_iter()
                .flatten()
                .any(|a| a == remote.listen && a.port() != 0);
            if taken {
                return Err(self.error(
                    key_line(text, "admin.remote", "listen"),
                    format!(
                        "field `admin.remote.listen`: {} is already used by `admin.listen` or `admin.health_listen`",
                        remote.listen
                    ),
                ));
            }
        }
        Ok(admin)
    }

    /// Every `[[export]]`, in order, through [`Self::export`]; a name may appear only once.
    pub(super) fn exports(
        &self,
        raw: Vec<toml::Spanned<toml::Table>>,
    ) -> Result<Vec<ExportConfig>, ConfigError> {
        let mut names = HashSet::new();
        raw.into_iter()
            .map(|spanned| self.export(spanned, &mut names))
            .collect()
    }

    /// One `[[export]]` table: a valid, unused service `name`, `escaped_slashes`, and the rest
    /// as `UpstreamSettings` checked as the upstream would check them when it starts.
    fn export(
        &self,
        spanned: toml::Spanned<toml::Table>,
        names: &mut HashSet<String>,
    ) -> Result<ExportConfig, ConfigError> {
        let text = self.text;
        let line = Some(line_of(text, spanned.span().start));
        let mut table = spanned.into_inner();
        let name = match table.remove("name") {
            Some(toml::Value::String(s)) => s,
            Some(_) => return Err(self.error(line, "export: field `name` must be a string".into())),
            None => return Err(self.error(line, "export: missing field `name`".into())),
        };
        crate::acl::model::check_service_name(&name)
            .map_err(|e| self.error(line, format!("export `{name}`: field `name`: {e}")))?;
        if !names.insert(name.clone()) {
            return Err(self.error(line, format!("export `{name}` is defined twice")));
        }
        // Not an upstream setting: how this node treats request paths for the export.
        let escaped_slashes = match table.remove("escaped_slashes") {
            None => EscapedSlashes::default(),
            Some(value) => value.try_into().map_err(|e: toml::de::Error| {
                let message = e.message().trim_end().to_owned();
                self.error(
                    field_line(text, line, "`escaped_slashes`").or(line),
                    format!("export `{name}`: field `escaped_slashes`: {message}"),
                )
            })?,
        };
        let upstream: UpstreamSettings =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    let message = e.message().trim_end().to_owned();
                    self.error(
                        field_line(text, line, &message).or(line),
                        format!("export `{name}`: {message}"),
                    )
                })?;
        self.upstream(&name, line, &upstream)?;
        Ok(ExportConfig {
            name,
            upstream,
            escaped_slashes,
        })
    }

    /// The checks the upstream of export `name` (its table at `line`) makes when it starts,
    /// made here so that `check-config` and a reload refuse what `run` would (one validation
    /// path), and every endpoint is a valid "host:port" authority.
    fn upstream(
        &self,
        name: &str,
        line: Option<usize>,
        upstream: &UpstreamSettings,
    ) -> Result<(), ConfigError> {
        upstream.validate(name).map_err(|e| ConfigError {
            path: self.path.to_owned(),
            ..upstream_error(self.text, line, name, e)
        })?;
        if let Some(endpoint) = upstream
            .endpoints
            .iter()
            .find(|e| e.parse::<http::uri::Authority>().is_err())
        {
            return Err(self.error(
                field_line(self.text, line, "`endpoints`").or(line),
                format!(
                    "export `{name}`: field `endpoints`: {endpoint:?} is not a valid \"host:port\""
                ),
            ));
        }
        Ok(())
    }

    /// The checks an import (`needs_service`) and the gateway share, `what` naming which in
    /// errors: exactly one of `caller` and `mtls`, and `service`/`suffix` only where they belong.
    fn listener(
        &self,
        raw: toml::Spanned<RawListener>,
        what: &str,
        needs_service: bool,
    ) -> Result<CheckedListener, ConfigError> {
        let line = Some(line_of(self.text, raw.span().start));
        let raw = raw.into_inner();
        let caller = self.caller(&raw, line, what)?;
        match (&raw.service, needs_service) {
            (None, true) => {
                return Err(self.error(line, format!("{what}: missing field `service`")));
            }
            (Some(_), false) => {
                return Err(self.error(
                    line,
                    format!("{what}: unknown field `service` (the gateway routes by Host)"),
                ));
            }
            (Some(s), true) => crate::acl::model::check_service_name(s)
                .map_err(|e| self.error(line, format!("{what}: field `service`: {e}")))?,
            (None, false) => {}
        }
        if needs_service && raw.suffix.is_some() {
            return Err(self.error(
                line,
                format!("{what}: unknown field `suffix` (only the gateway has one)"),
            ));
        }
        Ok(CheckedListener { raw, line, caller })
    }

    /// Who calls through the listener `raw` (`what`, at `line`): a fixed, valid service name
    /// (`caller`) or the service certificate each client presents (`mtls = true`).
    fn caller(
        &self,
        raw: &RawListener,
        line: Option<usize>,
        what: &str,
    ) -> Result<CallerIdentity, ConfigError> {
        match (&raw.caller, raw.mtls) {
            (Some(_), true) => Err(self.error(
                line,
                format!("{what}: set either `caller` or `mtls = true`, not both"),
            )),
            (None, false) => Err(self.error(
                line,
                format!("{what}: missing `caller = \"SERVICE\"` (fixed identity) or `mtls = true`"),
            )),
            (Some(c), false) => {
                crate::acl::model::check_service_name(c)
                    .map_err(|e| self.error(line, format!("{what}: field `caller`: {e}")))?;
                Ok(CallerIdentity::Fixed(c.clone()))
            }
            (None, true) => Ok(CallerIdentity::Mtls),
        }
    }

    /// Every `[[import]]`, in order: a checked listener on an address (port 0 aside) no other
    /// import uses; each address taken is added to `listens`.
    pub(super) fn imports(
        &self,
        raw: Vec<toml::Spanned<RawListener>>,
        listens: &mut HashSet<SocketAddr>,
    ) -> Result<Vec<ImportConfig>, ConfigError> {
        let mut imports = Vec::new();
        for raw in raw {
            let CheckedListener { raw, line, caller } = self.listener(raw, "import", true)?;
            if !listens.insert(raw.listen) && raw.listen.port() != 0 {
                return Err(self.error(
                    line,
                    format!("import: address {} is used twice", raw.listen),
                ));
            }
            imports.push(ImportConfig {
                service: raw.service.unwrap_or_default(),
                listen: raw.listen,
                caller,
                request_timeout: raw.request_timeout,
                escaped_slashes: raw.escaped_slashes,
            });
        }
        Ok(imports)
    }

    /// `[gateway]`, if any: a checked listener on an address (port 0 aside) not in `listens`
    /// (the imports'), with its Host suffix (default `hybridge`) written without a leading dot.
    pub(super) fn gateway(
        &self,
        raw: Option<toml::Spanned<RawListener>>,
        listens: &mut HashSet<SocketAddr>,
    ) -> Result<Option<GatewayConfig>, ConfigError> {
        let Some(raw) = raw else {
            return Ok(None);
        };
        let CheckedListener { raw, line, caller } = self.listener(raw, "gateway", false)?;
        if !listens.insert(raw.listen) && raw.listen.port() != 0 {
            return Err(self.error(
                line,
                format!(
                    "gateway: address {} is already used by an import",
                    raw.listen
                ),
            ));
        }
        let suffix = raw
            .suffix
            .unwrap_or_else(|| "hybridge".into())
            .trim_start_matches('.')
            .to_owned();
        Ok(Some(GatewayConfig {
            listen: raw.listen,
            suffix,
            caller,
            request_timeout: raw.request_timeout,
            escaped_slashes: raw.escaped_slashes,
        }))
    }

    /// `[limits]`: at least one connection per listener, and an idle timeout of at least 1s.
    pub(super) fn limits(&self, limits: &LimitsSection) -> Result<(), ConfigError> {
        if limits.max_connections == 0 {
            return Err(self.error(
                key_line(self.text, "limits", "max_connections"),
                "field `limits.max_connections`: must be at least 1".into(),
            ));
        }
        if limits.idle_timeout < Duration::from_secs(1) {
            return Err(self.error(
                key_line(self.text, "limits", "idle_timeout"),
                "field `limits.idle_timeout`: must be at least 1s".into(),
            ));
        }
        Ok(())
    }
}

/// The line of the key an error message names (`unknown field `x``, `missing field`...),
/// searching forward from the table's first line; deserializing a sub-table loses spans.
fn field_line(text: &str, from: Option<usize>, message: &str) -> Option<usize> {
    let key = message.split('`').nth(1)?;
    let from = from?;
    text.lines()
        .enumerate()
        .skip(from)
        .take_while(|(_, l)| {
            !l.trim_start().starts_with("[[")
                && !l.trim_start().starts_with("[tls")
                && !l.trim_start().starts_with("[node")
        })
        .find(|(_, l)| l.split_once('=').is_some_and(|(k, _)| k.trim() == key))
        .map(|(i, _)| i + 1)
}

/// An upstream setting `UpstreamSettings::validate` refused, as a `ConfigError` naming the
/// export, the field and, when it is written as `key = value` under the export, its line.
fn upstream_error(
    text: &str,
    export_line: Option<usize>,
    name: &str,
    error: crate::upstream::UpstreamConfigError,
) -> ConfigError {
    use crate::upstream::UpstreamConfigError as E;
    let (field, message) = match error {
        E::NoEndpoints { .. } => (
            "endpoints".to_owned(),
            "must list at least one \"host:port\"".to_owned(),
        ),
        E::InvalidEndpoint {
            endpoint, reason, ..
        } => (
            "endpoints".to_owned(),
            format!("{endpoint:?} is invalid: {reason}"),
        ),
        E::InvalidSetting { field, reason, .. } => (field.to_owned(), reason),
        // Not produced by validation (it does no I/O); kept whole if it ever is.
        other @ E::Resolve { .. } => ("endpoints".to_owned(), other.to_string()),
    };
    let key = field.rsplit('.').next().unwrap_or(&field);
    ConfigError {
        path: PathBuf::new(),
        line: field_line(text, export_line, &format!("`{key}`")).or(export_line),
        message: format!("export `{name}`: field `{field}`: {message}"),
    }
}

/// `tunnel.announce` names dialable addresses of listening nodes, a bounded number of them.
fn validate_announce(tunnel: &TunnelSection) -> Result<(), String> {
    let field = "field `tunnel.announce`";
    if tunnel.announce.is_empty() {
        return Ok(());
    }
    if tunnel.listen.is_none() {
        return Err(format!(
            "{field}: only a listening node (`tunnel.listen`) has members to announce"
        ));
    }
    if tunnel.announce.len() > MAX_ANNOUNCED_MEMBERS {
        return Err(format!(
            "{field}: at most {MAX_ANNOUNCED_MEMBERS} addresses, not {}",
            tunnel.announce.len()
        ));
    }
    match tunnel
        .announce
        .iter()
        .find(|a| !crate::tunnel::control::is_dialable(a))
    {
        Some(bad) => Err(format!(
            "{field}: `{bad}` cannot be dialled (give each node's own address and port)"
        )),
        None => Ok(()),
    }
}

/// 1-based line of `key = ...` inside the table `[table]`, for errors about a value that
/// deserialized fine but fails a check across fields.
fn key_line(text: &str, table: &str, key: &str) -> Option<usize> {
    let header = format!("[{table}]");
    let mut in_table = false;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('[') {
            in_table = line == header;
        } else if in_table && line.split_once('=').is_some_and(|(k, _)| k.trim() == key) {
            return Some(i + 1);
        }
    }
    None
}

/// 1-based line of `key` in the `index`th (from 0) `[[table]]` of `text`, or of that table's
/// header when the key is not written there.
fn array_key_line(text: &str, table: &str, index: usize, key: &str) -> Option<usize> {
    let header = format!("[[{table}]]");
    let mut seen = 0;
    let mut header_line = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('[') {
            if header_line.is_some() {
                break;
            }
            if line == header {
                if seen == index {
                    header_line = Some(i + 1);
                }
                seen += 1;
            }
        } else if header_line.is_some()
            && line.split_once('=').is_some_and(|(k, _)| k.trim() == key)
        {
            return Some(i + 1);
        }
    }
    header_line
}

/// 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}
