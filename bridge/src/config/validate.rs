//! The checking half of `Config::parse`: the deserialized `RawConfig` turned section by section
//! into checked values, each mistake a `ConfigError` naming the file, the line and the field.
//!
//! Sections are checked in a fixed order (the first mistake is the one reported); nothing here
//! reads a file. Lines come from the spans of the parsed document: a value that fails to
//! deserialise (a bad address, service name or duration) carries its own span, and a check
//! across fields finds the key it names with [`Source::line`].

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::{
    AdminSection, CallerIdentity, ConfigError, ExportConfig, GatewayConfig, ImportConfig,
    LimitsSection, MAX_ANNOUNCED_MEMBERS, MAX_SOCKET_PATH, NodeSection, PeerConfig, RawConfig,
    RawListener, TlsSection, TunnelSection,
};
use crate::acl::model::ServiceName;
use crate::http::path::EscapedSlashes;
use crate::upstream::UpstreamSettings;

/// The config text being checked, its parsed document (every key and value with its span)
/// and the file it was read from: errors name that file, and relative paths resolve against
/// its folder.
pub(super) struct Source<'a> {
    path: &'a Path,
    text: &'a str,
    doc: DeTable<'a>,
}

/// A listener table that passed the checks shared by imports and the gateway: the table, the
/// line of its header and who its callers are.
struct CheckedListener {
    raw: RawListener,
    line: Option<usize>,
    caller: CallerIdentity,
}

impl<'a> Source<'a> {
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

    /// Parses `text` (read from `path`) and deserialises it into `RawConfig`. A syntax or
    /// type error names its line and, when the parser's message does not, the key there.
    pub(super) fn read(path: &'a Path, text: &'a str) -> Result<(Self, RawConfig), ConfigError> {
        let mut source = Self {
            path,
            text,
            doc: DeTable::new(),
        };
        source.doc = DeTable::parse(text)
            .map_err(|e| source.toml_error(&e, None, ""))?
            .into_inner();
        let raw = toml::from_str(text).map_err(|e| source.toml_error(&e, None, ""))?;
        Ok((source, raw))
    }

    /// `value` deserialised as a `T`; an error is located by its own span (else the value's)
    /// and its message follows `context`.
    fn value<T: DeserializeOwned>(
        &self,
        value: Spanned<DeValue<'a>>,
        context: &str,
    ) -> Result<T, ConfigError> {
        let span = value.span();
        T::deserialize(ValueDeserializer::from(value))
            .map_err(|e| self.toml_error(&e, Some(span), context))
    }

    /// A deserialising error as a `ConfigError`: at the line of its span (else of `fallback`),
    /// its message after `context` and, unless the message names it, the key it is about.
    fn toml_error(
        &self,
        error: &toml::de::Error,
        fallback: Option<Range<usize>>,
        context: &str,
    ) -> ConfigError {
        let message = error.message().trim_end().replace('\n', " ");
        let span = error.span().or(fallback);
        let key = span
            .as_ref()
            .and_then(|span| key_in_table(&self.doc, span.start))
            .filter(|k| !message.contains(&format!("`{k}`")));
        let line = span.map(|s| line_of(self.text, s.start));
        match key {
            Some(k) => self.error(line, format!("{context}field `{k}`: {message}")),
            None => self.error(line, format!("{context}{message}")),
        }
    }

    /// 1-based line of the key at `path`, written as in error messages: dotted keys, and
    /// `[i]` for the i-th table of an array (`admin.remote.listen`, `peer[0].site`,
    /// `export[1].circuit_breaker.max_connections`). When the last keys are not written, the
    /// line of the deepest table on the path that is.
    fn line(&self, path: &str) -> Option<usize> {
        let mut table = &self.doc;
        let mut found: Option<Range<usize>> = None;
        for step in path.split('.') {
            let (key, index) = match step.split_once('[') {
                Some((key, index)) => (key, index.trim_end_matches(']').parse::<usize>().ok()),
                None => (step, None),
            };
            let Some((key, mut value)) = table.get_key_value(key) else {
                break;
            };
            found = Some(key.span());
            if let (Some(index), DeValue::Array(items)) = (index, value.get_ref()) {
                let Some(item) = items.get(index) else {
                    break;
                };
                found = Some(item.span());
                value = item;
            }
            match value.get_ref() {
                DeValue::Table(inner) => table = inner,
                _ => break,
            }
        }
        found.map(|span| line_of(self.text, span.start))
    }

    /// `[node]`: name, site and trust domain are SPIFFE path segments; `data_dir` is resolved.
    pub(super) fn node(&self, mut node: NodeSection) -> Result<NodeSection, ConfigError> {
        for (field, value) in [
            ("node.name", &node.name),
            ("node.site", &node.site),
            ("node.trust_domain", &node.trust_domain),
        ] {
            hybridge_ca::spiffe::validate_segment(field, value)
                .map_err(|e| self.error(self.line(field), format!("field `{field}`: {e}")))?;
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
        if tunnel.listen.is_some() && tunnel.allowed_sites.is_empty() {
            return Err(self.error(
                self.line("tunnel.listen"),
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
            hybridge_ca::spiffe::validate_segment("site", site).map_err(|e| {
                self.error(
                    self.line("tunnel.allowed_sites"),
                    format!("field `tunnel.allowed_sites`: {e}"),
                )
            })?;
        }
        if tunnel.idle_timeout <= tunnel.keepalive {
            return Err(self.error(
                self.line("tunnel.idle_timeout")
                    .or_else(|| self.line("tunnel.keepalive")),
                "field `tunnel.idle_timeout`: must be longer than `tunnel.keepalive`".into(),
            ));
        }
        if tunnel.tcp_fallback_after.is_zero()
            || tunnel.tcp_fallback_after > Duration::from_secs(60)
        {
            return Err(self.error(
                self.line("tunnel.tcp_fallback_after"),
                "field `tunnel.tcp_fallback_after`: must be between 1ms and 60s".into(),
            ));
        }
        if tunnel.quic_reprobe_interval < Duration::from_secs(1) {
            return Err(self.error(
                self.line("tunnel.quic_reprobe_interval"),
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

    /// The `index`th `[[peer]]` (its `address` was checked as a `HostPort`): `site` is a
    /// SPIFFE segment, `connections` in 1..=16, and a peer pinned to one node (`name`) learns
    /// no members.
    fn peer(&self, index: usize, peer: &PeerConfig) -> Result<(), ConfigError> {
        let field = |f: &str| format!("field `peer[{index}].{f}`");
        let line = |f: &str| self.line(&format!("peer[{index}].{f}"));
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
        validate_announce(tunnel).map_err(|e| self.error(self.line("tunnel.announce"), e))
    }

    /// `[admin]`: a non-loopback `listen` needs `allow_remote`, the socket path is resolved
    /// and fits a Unix socket, and `[admin.remote]` does not reuse another admin address.
    pub(super) fn admin(&self, mut admin: AdminSection) -> Result<AdminSection, ConfigError> {
        if !admin.listen.ip().is_loopback() && !admin.allow_remote {
            return Err(self.error(
                self.line("admin.listen"),
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
                self.line("admin.socket"),
                format!(
                    "field `admin.socket`: `{}` names no file",
                    admin.socket.display()
                ),
            ));
        }
        if socket_len > MAX_SOCKET_PATH {
            return Err(self.error(
                self.line("admin.socket"),
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
                    self.line("admin.remote.listen"),
                    format!(
                        "field `admin.remote.listen`: {} is already used by `admin.listen` or `admin.health_listen`",
                        remote.listen
                    ),
                ));
            }
        }
        Ok(admin)
    }

    /// Every `[[export]]` of the document, in order, through [`Self::export`]; a name may
    /// appear only once.
    pub(super) fn exports(&self) -> Result<Vec<ExportConfig>, ConfigError> {
        let tables = match self.doc.get("export").map(Spanned::get_ref) {
            Some(DeValue::Array(tables)) => tables.to_vec(),
            _ => Vec::new(),
        };
        let mut names = HashSet::new();
        tables
            .into_iter()
            .enumerate()
            .map(|(index, table)| self.export(index, table, &mut names))
            .collect()
    }

    /// The `index`th `[[export]]` table: a valid, unused service `name`, `escaped_slashes`,
    /// and the rest as `UpstreamSettings` checked as the upstream would check them when it
    /// starts.
    fn export(
        &self,
        index: usize,
        table: Spanned<DeValue<'a>>,
        names: &mut HashSet<ServiceName>,
    ) -> Result<ExportConfig, ConfigError> {
        let line = Some(line_of(self.text, table.span().start));
        let span = table.span();
        let DeValue::Table(mut table) = table.into_inner() else {
            return Err(self.error(line, "export: must be a table (`[[export]]`)".into()));
        };
        let name: ServiceName = match table.remove("name") {
            None => return Err(self.error(line, "export: missing field `name`".into())),
            Some(name) => {
                let context = match name.get_ref() {
                    DeValue::String(written) => format!("export `{written}`: "),
                    _ => "export: ".to_owned(),
                };
                self.value(name, &context)?
            }
        };
        if !names.insert(name.clone()) {
            return Err(self.error(line, format!("export `{name}` is defined twice")));
        }
        let context = format!("export `{name}`: ");
        // Not an upstream setting: how this node treats request paths for the export.
        let escaped_slashes = match table.remove("escaped_slashes") {
            None => EscapedSlashes::default(),
            Some(value) => self.value(value, &context)?,
        };
        let upstream: UpstreamSettings =
            self.value(Spanned::new(span, DeValue::Table(table)), &context)?;
        upstream.validate(&name).map_err(|e| {
            let (field, message) = upstream_problem(e);
            self.error(
                self.line(&format!("export[{index}].{field}")),
                format!("{context}field `{field}`: {message}"),
            )
        })?;
        Ok(ExportConfig {
            name,
            upstream,
            escaped_slashes,
        })
    }

    /// The checks an import and the gateway share, `what` naming which in errors: exactly
    /// one of `caller` and `mtls`. Each then checks the fields only it has.
    fn listener(
        &self,
        raw: toml::Spanned<RawListener>,
        what: &str,
    ) -> Result<CheckedListener, ConfigError> {
        let line = Some(line_of(self.text, raw.span().start));
        let raw = raw.into_inner();
        let caller = self.caller(&raw, line, what)?;
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
            (Some(c), false) => Ok(CallerIdentity::Fixed(c.clone())),
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
            let CheckedListener { raw, line, caller } = self.listener(raw, "import")?;
            let Some(service) = raw.service else {
                return Err(self.error(line, "import: missing field `service`".into()));
            };
            if raw.suffix.is_some() {
                return Err(self.error(
                    line,
                    "import: unknown field `suffix` (only the gateway has one)".into(),
                ));
            }
            if !listens.insert(raw.listen) && raw.listen.port() != 0 {
                return Err(self.error(
                    line,
                    format!("import: address {} is used twice", raw.listen),
                ));
            }
            imports.push(ImportConfig {
                service,
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
        let CheckedListener { raw, line, caller } = self.listener(raw, "gateway")?;
        if raw.service.is_some() {
            return Err(self.error(
                line,
                "gateway: unknown field `service` (the gateway routes by Host)".into(),
            ));
        }
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
                self.line("limits.max_connections"),
                "field `limits.max_connections`: must be at least 1".into(),
            ));
        }
        if limits.idle_timeout < Duration::from_secs(1) {
            return Err(self.error(
                self.line("limits.idle_timeout"),
                "field `limits.idle_timeout`: must be at least 1s".into(),
            ));
        }
        Ok(())
    }
}

/// The field and message of an upstream setting `UpstreamSettings::validate` refused.
fn upstream_problem(error: crate::upstream::UpstreamConfigError) -> (String, String) {
    use crate::upstream::UpstreamConfigError as E;
    match error {
        E::NoEndpoints { .. } => (
            "endpoints".to_owned(),
            "must list at least one \"host:port\"".to_owned(),
        ),
        E::InvalidSetting { field, reason, .. } => (field.to_owned(), reason),
        // Not produced by validation (it does no I/O); kept whole if it ever is.
        other @ E::Resolve { .. } => ("endpoints".to_owned(), other.to_string()),
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

/// The key (in `table` or below it) whose name or value holds byte `at`: `keepalive` for an
/// error in `keepalive = "5"`, the array `endpoints` for one in an element of it. `None` when
/// `at` is in a table but in none of its keys and values (a missing field).
fn key_in_table<'t>(table: &'t DeTable<'_>, at: usize) -> Option<&'t str> {
    table.iter().find_map(|(key, value)| {
        if key.span().contains(&at) {
            return Some(key.get_ref().as_ref());
        }
        key_in_value(key.get_ref(), value, at)
    })
}

/// [`key_in_table`] for the value of `key`: tables and arrays of tables are searched, any
/// other value answers `key` when it holds `at`.
fn key_in_value<'t>(key: &'t str, value: &'t Spanned<DeValue<'_>>, at: usize) -> Option<&'t str> {
    match value.get_ref() {
        DeValue::Table(table) => key_in_table(table, at),
        DeValue::Array(items) => items
            .iter()
            .find_map(|item| key_in_value(key, item, at))
            .or_else(|| {
                let of_tables = items
                    .iter()
                    .all(|i| matches!(i.get_ref(), DeValue::Table(_)));
                (!of_tables && value.span().contains(&at)).then_some(key)
            }),
        _ => value.span().contains(&at).then_some(key),
    }
}

/// 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}
