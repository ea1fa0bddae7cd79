//! The ACL rule model: `Action`, the operator-supplied `RuleSpec`, the stored `Rule`, and the
//! field checks and id generation they need. Pure values: no storage, no I/O, no decisions.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::http::path;

/// Longest service name we accept; keeps keys, labels and log lines bounded.
pub(crate) const MAX_NAME_LEN: usize = 128;
/// Longest rule id: room for a generated `source-to-destination-N` of two maximal names.
pub(crate) const MAX_ID_LEN: usize = 2 * MAX_NAME_LEN + 32;

/// What a rule does to a request it decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    /// `"allow"` or `"deny"`, as written in files, JSON and metrics labels.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }

    /// Parses `allow` / `deny` (exact, lowercase).
    pub(crate) fn parse(text: &str) -> Option<Action> {
        match text {
            "allow" => Some(Action::Allow),
            "deny" => Some(Action::Deny),
            _ => None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rule as an operator writes it (file, CLI, admin API): the id is optional and generated
/// when absent. Not yet checked; [`RuleSpec::validate`] turns it into a normalised spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) id: Option<String>,
    pub(crate) source: String,
    /// Sites whose nodes may vouch for `source` (`None`: any site). A caller's site is the
    /// site of the node it entered through, taken from that node's certificate.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "one_or_many"
    )]
    pub source_site: Option<Vec<String>>,
    pub(crate) destination: String,
    pub(crate) action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) methods: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) description: Option<String>,
}

/// A stored rule: a checked spec with its id resolved. `methods` are upper-case HTTP tokens;
/// `None` means any method, as `path_prefix: None` means any path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub id: String,
    pub source: String,
    /// Sorted, without duplicates; `None` means any site.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "one_or_many"
    )]
    pub source_site: Option<Vec<String>>,
    pub destination: String,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub description: String,
}

impl Rule {
    /// Whether the rule carries L7 (method or path) conditions.
    pub(crate) fn is_l7(&self) -> bool {
        self.methods.is_some() || self.path_prefix.is_some()
    }

    /// Builds a rule from a spec already passed through [`RuleSpec::validate`].
    pub(crate) fn from_valid_spec(spec: RuleSpec, id: String) -> Rule {
        Rule {
            id,
            source: spec.source,
            source_site: spec.source_site,
            destination: spec.destination,
            action: spec.action,
            methods: spec.methods,
            path_prefix: spec.path_prefix,
            description: spec.description.unwrap_or_default(),
        }
    }

    /// The spec that reproduces this rule (id included).
    pub fn to_spec(&self) -> RuleSpec {
        RuleSpec {
            id: Some(self.id.clone()),
            source: self.source.clone(),
            source_site: self.source_site.clone(),
            destination: self.destination.clone(),
            action: self.action,
            methods: self.methods.clone(),
            path_prefix: self.path_prefix.clone(),
            description: (!self.description.is_empty()).then(|| self.description.clone()),
        }
    }
}

/// One rejected field of a rule: which field and why, for messages that name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    pub(crate) field: &'static str,
    pub(crate) message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field `{}`: {}", self.field, self.message)
    }
}

impl RuleSpec {
    /// Checks every field and normalises it (methods upper-cased, empty description dropped).
    pub(crate) fn validate(mut self) -> Result<RuleSpec, FieldError> {
        if let Some(id) = &self.id {
            check_id(id).map_err(|message| FieldError {
                field: "id",
                message,
            })?;
        }
        check_service(&self.source).map_err(|message| FieldError {
            field: "source",
            message,
        })?;
        check_service(&self.destination).map_err(|message| FieldError {
            field: "destination",
            message,
        })?;
        if let Some(sites) = self.source_site.take() {
            let sites = normalise_sites(sites).map_err(|message| FieldError {
                field: "source_site",
                message,
            })?;
            self.source_site = Some(sites);
        }
        if let Some(methods) = self.methods.take() {
            let methods = normalise_methods(methods).map_err(|message| FieldError {
                field: "methods",
                message,
            })?;
            self.methods = Some(methods);
        }
        if let Some(prefix) = &self.path_prefix {
            check_path_prefix(prefix).map_err(|message| FieldError {
                field: "path_prefix",
                message,
            })?;
        }
        if self.description.as_deref().is_some_and(str::is_empty) {
            self.description = None;
        }
        Ok(self)
    }
}

/// A service name (`[a-z0-9._-]+`) or the wildcard `*`.
pub(crate) fn check_service(name: &str) -> Result<(), String> {
    if name == "*" {
        return Ok(());
    }
    if name.is_empty() {
        return Err("service name must not be empty (use \"*\" for any service)".into());
    }
    check_service_name(name)
}

/// A service name that passed [`check_service_name`]. The config deserialises exports,
/// imports and callers into it, so a bad name is refused at its own line in the file.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub(crate) struct ServiceName(String);

impl ServiceName {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ServiceName {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        check_service_name(&name)?;
        Ok(Self(name))
    }
}

impl std::ops::Deref for ServiceName {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ServiceName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for ServiceName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for ServiceName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl From<ServiceName> for String {
    fn from(name: ServiceName) -> String {
        name.0
    }
}

/// A service name as the config, the policy and the gateway all take it: `[a-z0-9._-]+`,
/// at most [`MAX_NAME_LEN`] bytes, so every service a node can export or import can also be
/// named in a rule.
pub(crate) fn check_service_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("service name must not be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("service name longer than {MAX_NAME_LEN} bytes"));
    }
    match name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '-'))
    {
        Some(bad) => Err(format!(
            "service name {name:?} contains {bad:?}; allowed are a-z 0-9 . _ - (and \"*\" alone in a rule)"
        )),
        None => Ok(()),
    }
}

/// Checks site names as a node certificate carries them (`[a-z0-9._-]+`), then sorts and
/// dedups them, so equal rules compare and digest equal whatever order they were written in.
pub(crate) fn normalise_sites(sites: Vec<String>) -> Result<Vec<String>, String> {
    if sites.is_empty() {
        return Err("must list at least one site (omit the key to allow any site)".into());
    }
    for site in &sites {
        if site == "*" {
            return Err("\"*\" is not a site; omit the key to allow any site".into());
        }
        hybridge_ca::spiffe::validate_segment("site", site).map_err(|_| {
            format!(
                "site {site:?} cannot appear in a node certificate; sites use only a-z 0-9 . _ -"
            )
        })?;
        if site.len() > MAX_NAME_LEN {
            return Err(format!("site name longer than {MAX_NAME_LEN} bytes"));
        }
    }
    let mut sites = sites;
    sites.sort();
    sites.dedup();
    Ok(sites)
}

/// Accepts `"dc1"` or `["dc1", "dc2"]` for a list of names.
fn one_or_many<'de, D>(deserializer: D) -> Result<Option<Vec<String>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(deserializer)? {
        None => None,
        Some(OneOrMany::One(name)) => Some(vec![name]),
        Some(OneOrMany::Many(names)) => Some(names),
    })
}

/// Which sites may serve a service: a peer of another site that announces it is not routed
/// to. Part of the policy, applied with the rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportDeclaration {
    pub(crate) service: String,
    /// Sorted, without duplicates.
    #[serde(deserialize_with = "required_one_or_many")]
    pub(crate) sites: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) description: String,
}

fn required_one_or_many<'de, D>(deserializer: D) -> Result<Vec<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    one_or_many(deserializer)?.ok_or_else(|| serde::de::Error::missing_field("sites"))
}

impl ExportDeclaration {
    /// Checks the fields and normalises the site list.
    pub(crate) fn validate(mut self) -> Result<ExportDeclaration, FieldError> {
        if self.service == "*" {
            return Err(FieldError {
                field: "service",
                message: "an export declaration names one service, not \"*\"".into(),
            });
        }
        check_service(&self.service).map_err(|message| FieldError {
            field: "service",
            message,
        })?;
        self.sites = normalise_sites(self.sites).map_err(|message| FieldError {
            field: "sites",
            message,
        })?;
        Ok(self)
    }
}

/// A whole policy as an operator applies it: rules and export declarations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySpec {
    pub rules: Vec<RuleSpec>,
    #[serde(default)]
    pub exports: Vec<ExportDeclaration>,
}

/// A rule id: `[A-Za-z0-9._-]+`, so it is safe in URLs, logs and metrics.
pub(crate) fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("rule id must not be empty".into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!("rule id longer than {MAX_ID_LEN} bytes"));
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(bad) => Err(format!(
            "rule id {id:?} contains {bad:?}; allowed are A-Z a-z 0-9 . _ -"
        )),
        None => Ok(()),
    }
}

/// Whether `method` is an HTTP token (RFC 9110 `tchar`+).
pub(crate) fn is_http_token(method: &str) -> bool {
    !method.is_empty()
        && method.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

fn normalise_methods(methods: Vec<String>) -> Result<Vec<String>, String> {
    if methods.is_empty() {
        return Err("must list at least one method (omit the key to allow every method)".into());
    }
    let mut out: Vec<String> = Vec::with_capacity(methods.len());
    for method in methods {
        if !is_http_token(&method) {
            return Err(format!("{method:?} is not an HTTP method token"));
        }
        let upper = method.to_ascii_uppercase();
        if !out.contains(&upper) {
            out.push(upper);
        }
    }
    Ok(out)
}

/// A path prefix starts with `/`, holds no whitespace or control characters, and is a
/// canonical path (`crate::http::path`): requests are decided on their canonical path, which
/// a non-canonical prefix (`/api/../x`, `//x`, `/%7Ex`) would silently never match.
pub(crate) fn check_path_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.starts_with('/') {
        return Err(format!("path prefix {prefix:?} must start with '/'"));
    }
    if prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "path prefix {prefix:?} contains whitespace or a control character"
        ));
    }
    match path::check_canonical(prefix) {
        Ok(None) => Ok(()),
        Ok(Some(canonical)) => Err(format!(
            "path prefix {prefix:?} is not canonical; requests are matched by their canonical path, write {canonical:?}"
        )),
        Err(e) => Err(format!(
            "path prefix {prefix:?} is not a canonical path: {e}"
        )),
    }
}

/// The slug a rule without an id is named after: `web-to-billing`, `any-to-payments-admin`.
pub(crate) fn slug_base(source: &str, destination: &str) -> String {
    let part = |name: &str| {
        if name == "*" {
            "any".to_string()
        } else {
            name.to_string()
        }
    };
    format!("{}-to-{}", part(source), part(destination))
}

/// The first of `base`, `base-2`, `base-3`, … for which `taken` is false.
pub(crate) fn first_free_id(base: &str, mut taken: impl FnMut(&str) -> bool) -> String {
    if !taken(base) {
        return base.to_string();
    }
    let mut n: u64 = 2;
    loop {
        let candidate = format!("{base}-{n}");
        if !taken(&candidate) {
            return candidate;
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(source: &str, destination: &str) -> RuleSpec {
        RuleSpec {
            id: None,
            source: source.into(),
            source_site: None,
            destination: destination.into(),
            action: Action::Allow,
            methods: None,
            path_prefix: None,
            description: None,
        }
    }

    #[test]
    fn validate_names_the_field() {
        let err = spec("", "billing").validate().err();
        assert_eq!(err.map(|e| e.field), Some("source"));
        let err = spec("web", "Billing").validate().err();
        assert_eq!(err.map(|e| e.field), Some("destination"));
        let mut s = spec("web", "billing");
        s.methods = Some(vec!["GE T".into()]);
        assert_eq!(s.validate().err().map(|e| e.field), Some("methods"));
        let mut s = spec("web", "billing");
        s.path_prefix = Some("api".into());
        assert_eq!(s.validate().err().map(|e| e.field), Some("path_prefix"));
        let mut s = spec("web", "billing");
        s.id = Some("a b".into());
        assert_eq!(s.validate().err().map(|e| e.field), Some("id"));
    }

    #[test]
    fn path_prefixes_must_be_canonical() {
        let check = |prefix: &str| {
            let mut s = spec("web", "billing");
            s.path_prefix = Some(prefix.into());
            s.validate().map(|_| ()).map_err(|e| e.to_string())
        };
        for good in ["/", "/api", "/api/", "/payments.v1.Payments/", "/~u/a%3Fb"] {
            assert_eq!(check(good), Ok(()), "{good}");
        }
        assert_eq!(
            check("/api/../x"),
            Err("field `path_prefix`: path prefix \"/api/../x\" is not canonical; requests are matched by their canonical path, write \"/x\"".into())
        );
        assert_eq!(
            check("//x"),
            Err("field `path_prefix`: path prefix \"//x\" is not canonical; requests are matched by their canonical path, write \"/x\"".into())
        );
        assert_eq!(
            check("/a%7e"),
            Err("field `path_prefix`: path prefix \"/a%7e\" is not canonical; requests are matched by their canonical path, write \"/a~\"".into())
        );
        let refused = check("/a%2Fb").err().unwrap_or_default();
        assert!(
            refused.starts_with("field `path_prefix`: path prefix \"/a%2Fb\" is not a canonical path: escaped slash `%2F`"),
            "{refused}"
        );
        let refused = check("/a;b").err().unwrap_or_default();
        assert!(
            refused.starts_with("field `path_prefix`: path prefix \"/a;b\" is not a canonical path: path parameter `;`"),
            "{refused}"
        );
        let refused = check("/a\\b").err().unwrap_or_default();
        assert!(refused.contains("backslash"), "{refused}");
    }

    #[test]
    fn validate_normalises_methods() {
        let mut s = spec("web", "*");
        s.methods = Some(vec!["get".into(), "GET".into(), "post".into()]);
        let s = s.validate().ok();
        assert_eq!(
            s.and_then(|s| s.methods),
            Some(vec!["GET".to_string(), "POST".to_string()])
        );
    }

    #[test]
    fn slugs_skip_taken_ids() {
        assert_eq!(slug_base("*", "billing"), "any-to-billing");
        let taken = ["web-to-billing", "web-to-billing-2"];
        assert_eq!(
            first_free_id("web-to-billing", |id| taken.contains(&id)),
            "web-to-billing-3"
        );
    }
}
