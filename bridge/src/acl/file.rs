//! The declarative ACL file (`acl.toml`): TOML with one `[[rule]]` table per rule and one
//! `[[export]]` table per export declaration, parsed into a checked `PolicySpec` with
//! `FILE:LINE` errors. Parsing only: it never touches the store.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::model::{Action, ExportDeclaration, PolicySpec, RuleSpec};

/// Which table of the file an error is in: the kind (`rule`, `export`) and its 1-based
/// position among the tables of that kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TablePosition {
    pub(crate) kind: &'static str,
    pub(crate) index: usize,
}

/// A rejected ACL file: where (file, line, table, field) and why. Displays as
/// `FILE:LINE: rule N: field `x`: message`, leaving out the parts that do not apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct AclFileError {
    pub(crate) file: String,
    /// 1-based line.
    pub(crate) line: usize,
    /// The `[[rule]]` or `[[export]]` table, when the error is inside one.
    pub(crate) table: Option<TablePosition>,
    pub(crate) field: Option<String>,
    pub(crate) message: String,
}

impl fmt::Display for AclFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file, self.line)?;
        if let Some(table) = self.table {
            write!(f, "{} {}: ", table.kind, table.index)?;
        }
        if let Some(field) = &self.field {
            write!(f, "field `{field}`: ")?;
        }
        f.write_str(&self.message)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
    #[serde(default)]
    export: Vec<Spanned<RawExport>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExport {
    service: Spanned<String>,
    sites: Spanned<OneOrMany>,
    description: Option<Spanned<String>>,
}

/// `"dc1"` or `["dc1", "dc2"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(name) => vec![name],
            OneOrMany::Many(names) => names,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: Option<Spanned<String>>,
    source: Spanned<String>,
    source_site: Option<Spanned<OneOrMany>>,
    destination: Spanned<String>,
    action: Spanned<String>,
    methods: Option<Spanned<Vec<String>>>,
    path_prefix: Option<Spanned<String>>,
    description: Option<Spanned<String>>,
}

/// Parses and checks an ACL file. `path` is only used in messages. On any error nothing is
/// returned, so callers change nothing.
pub fn parse_acl_file(path: &Path, text: &str) -> Result<PolicySpec, AclFileError> {
    let source = Source {
        file: path.display().to_string(),
        text,
    };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        let table = table_at(text, offset);
        source.error_at(offset, table, None, e.message().trim().to_string())
    })?;
    let rules = source.rules(raw.rule)?;
    let exports = source.exports(raw.export)?;
    Ok(PolicySpec { rules, exports })
}

/// The ACL file being parsed, as its errors name it (`file`) and locate them (`text`).
struct Source<'a> {
    file: String,
    text: &'a str,
}

impl Source<'_> {
    /// An error at byte `offset` of the file, in `table` and about `field` when known.
    fn error_at(
        &self,
        offset: usize,
        table: Option<TablePosition>,
        field: Option<&str>,
        message: String,
    ) -> AclFileError {
        AclFileError {
            file: self.file.clone(),
            line: line_of(self.text, offset),
            table,
            field: field.map(str::to_string),
            message,
        }
    }

    /// Every `[[rule]]` checked through [`Self::rule`], in file order; an `id` may be used
    /// by one rule only.
    fn rules(&self, raw: Vec<Spanned<RawRule>>) -> Result<Vec<RuleSpec>, AclFileError> {
        let mut specs = Vec::with_capacity(raw.len());
        let mut ids: HashMap<String, usize> = HashMap::new();
        for (i, spanned) in raw.into_iter().enumerate() {
            specs.push(self.rule(i + 1, spanned, &mut ids)?);
        }
        Ok(specs)
    }

    /// Rule `n` (1-based) as a checked `RuleSpec`, its id (if any) recorded in `ids`; an error
    /// points at the field it is about, else at the table.
    fn rule(
        &self,
        n: usize,
        spanned: Spanned<RawRule>,
        ids: &mut HashMap<String, usize>,
    ) -> Result<RuleSpec, AclFileError> {
        let at = Some(TablePosition {
            kind: "rule",
            index: n,
        });
        let table_span = spanned.span();
        let raw = spanned.into_inner();
        let field_span = |field: &str| -> Range<usize> {
            match field {
                "id" => raw.id.as_ref().map(Spanned::span),
                "source" => Some(raw.source.span()),
                "source_site" => raw.source_site.as_ref().map(Spanned::span),
                "destination" => Some(raw.destination.span()),
                "action" => Some(raw.action.span()),
                "methods" => raw.methods.as_ref().map(Spanned::span),
                "path_prefix" => raw.path_prefix.as_ref().map(Spanned::span),
                "description" => raw.description.as_ref().map(Spanned::span),
                _ => None,
            }
            .unwrap_or_else(|| table_span.clone())
        };
        let action = Action::parse(raw.action.get_ref()).ok_or_else(|| {
            self.error_at(
                field_span("action").start,
                at,
                Some("action"),
                format!(
                    "{:?} is not an action; use \"allow\" or \"deny\"",
                    raw.action.get_ref()
                ),
            )
        })?;
        let spec = rule_spec(&raw, action)
            .validate()
            .map_err(|e| self.error_at(field_span(e.field).start, at, Some(e.field), e.message))?;
        if let Some(id) = &spec.id
            && let Some(first) = ids.insert(id.clone(), n)
        {
            return Err(self.error_at(
                field_span("id").start,
                at,
                Some("id"),
                format!("duplicate id {id:?} (first used by rule {first})"),
            ));
        }
        Ok(spec)
    }

    /// Every `[[export]]` checked as an `ExportDeclaration`, in file order; a service may be
    /// declared by one export only.
    fn exports(
        &self,
        raw: Vec<Spanned<RawExport>>,
    ) -> Result<Vec<ExportDeclaration>, AclFileError> {
        let mut exports = Vec::with_capacity(raw.len());
        let mut services: HashMap<String, usize> = HashMap::new();
        for (i, spanned) in raw.into_iter().enumerate() {
            let n = i + 1;
            let at = Some(TablePosition {
                kind: "export",
                index: n,
            });
            let raw = spanned.into_inner();
            let spans = [("service", raw.service.span()), ("sites", raw.sites.span())];
            let field_start = |field: &str| {
                spans
                    .iter()
                    .find(|(name, _)| *name == field)
                    .map_or(0, |(_, span)| span.start)
            };
            let declaration = ExportDeclaration {
                service: raw.service.get_ref().clone(),
                sites: raw.sites.into_inner().into_vec(),
                description: raw.description.map(Spanned::into_inner).unwrap_or_default(),
            }
            .validate()
            .map_err(|e| self.error_at(field_start(e.field), at, Some(e.field), e.message))?;
            if let Some(first) = services.insert(declaration.service.clone(), n) {
                return Err(self.error_at(
                    field_start("service"),
                    at,
                    Some("service"),
                    format!(
                        "service {:?} is already declared by export {first}",
                        declaration.service
                    ),
                ));
            }
            exports.push(declaration);
        }
        Ok(exports)
    }
}

/// The rule as written, with its parsed `action`; not yet validated.
fn rule_spec(raw: &RawRule, action: Action) -> RuleSpec {
    RuleSpec {
        id: raw.id.as_ref().map(|s| s.get_ref().clone()),
        source: raw.source.get_ref().clone(),
        source_site: raw.source_site.as_ref().map(|s| match s.get_ref() {
            OneOrMany::One(name) => vec![name.clone()],
            OneOrMany::Many(names) => names.clone(),
        }),
        destination: raw.destination.get_ref().clone(),
        action,
        methods: raw.methods.as_ref().map(|s| s.get_ref().clone()),
        path_prefix: raw.path_prefix.as_ref().map(|s| s.get_ref().clone()),
        description: raw.description.as_ref().map(|s| s.get_ref().clone()),
    }
}

/// 1-based line holding byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Which `[[rule]]` or `[[export]]` table a byte offset falls in, judged from the table
/// headers before it.
fn table_at(text: &str, offset: usize) -> Option<TablePosition> {
    let end = offset.min(text.len());
    let mut last = None;
    let mut counts = [("rule", 0usize), ("export", 0usize)];
    for line in text.as_bytes()[..end].split(|&b| b == b'\n') {
        let line = line.trim_ascii_start();
        for (kind, count) in &mut counts {
            if line.starts_with(format!("[[{kind}]]").as_bytes()) {
                *count += 1;
                last = Some(TablePosition {
                    kind,
                    index: *count,
                });
            }
        }
        if line.starts_with(b"[")
            && !line.starts_with(b"[[rule]]")
            && !line.starts_with(b"[[export]]")
        {
            last = None;
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<RuleSpec>, String> {
        parse_acl_file(Path::new("acl.toml"), text)
            .map(|policy| policy.rules)
            .map_err(|e| e.to_string())
    }

    const GOOD: &str = r#"
[[rule]]
source = "web"
destination = "billing"
action = "allow"
methods = ["get", "POST"]
path_prefix = "/api"

[[rule]]
id = "no-admin"
source = "*"
destination = "payments-admin"
action = "deny"
"#;

    #[test]
    fn parses_rules() {
        let specs = parse(GOOD);
        let specs = specs.as_deref().unwrap_or_default();
        assert_eq!(specs.len(), 2);
        assert_eq!(
            specs[0].methods,
            Some(vec!["GET".to_string(), "POST".to_string()])
        );
        assert_eq!(specs[1].id.as_deref(), Some("no-admin"));
        assert_eq!(specs[1].action, Action::Deny);
        assert_eq!(parse(""), Ok(vec![]));
    }

    #[test]
    fn errors_name_file_line_rule_and_field() {
        let bad_action = GOOD.replace("action = \"deny\"", "action = \"block\"");
        assert_eq!(
            parse(&bad_action),
            Err("acl.toml:13: rule 2: field `action`: \"block\" is not an action; use \"allow\" or \"deny\"".into())
        );
        let empty_name = GOOD.replace("source = \"web\"", "source = \"\"");
        assert_eq!(
            parse(&empty_name),
            Err("acl.toml:3: rule 1: field `source`: service name must not be empty (use \"*\" for any service)".into())
        );
        let bad_method = GOOD.replace("\"get\"", "\"GE T\"");
        assert_eq!(
            parse(&bad_method),
            Err("acl.toml:6: rule 1: field `methods`: \"GE T\" is not an HTTP method token".into())
        );
        let bad_path = GOOD.replace("\"/api\"", "\"api\"");
        assert_eq!(
            parse(&bad_path),
            Err(
                "acl.toml:7: rule 1: field `path_prefix`: path prefix \"api\" must start with '/'"
                    .into()
            )
        );
        let dup = format!(
            "{GOOD}\n[[rule]]\nid = \"no-admin\"\nsource = \"a\"\ndestination = \"b\"\naction = \"allow\"\n"
        );
        assert_eq!(
            parse(&dup),
            Err(
                "acl.toml:16: rule 3: field `id`: duplicate id \"no-admin\" (first used by rule 2)"
                    .into()
            )
        );
    }

    #[test]
    fn unknown_keys_and_syntax_errors_name_the_line() {
        let unknown = GOOD.replace(
            "path_prefix = \"/api\"",
            "path_prefix = \"/api\"\nport = 80",
        );
        let err = parse(&unknown).err().unwrap_or_default();
        assert!(
            err.starts_with("acl.toml:8: rule 1: unknown field `port`"),
            "{err}"
        );
        let syntax = GOOD.replace("action = \"deny\"", "action = deny");
        let err = parse(&syntax).err().unwrap_or_default();
        assert!(err.starts_with("acl.toml:13: rule 2: "), "{err}");
        let top = "[[rules]]\nsource = \"a\"\n";
        let err = parse(top).err().unwrap_or_default();
        assert!(
            err.starts_with("acl.toml:1: unknown field `rules`"),
            "{err}"
        );
    }

    #[test]
    fn site_bound_rules_and_export_declarations() {
        let text = format!(
            "{GOOD}\n[[rule]]\nsource = \"cron\"\nsource_site = [\"dc2\", \"dc1\", \"dc1\"]\ndestination = \"ledger\"\naction = \"allow\"\n\n[[export]]\nservice = \"ledger\"\nsites = \"dc1\"\n"
        );
        let policy = parse_acl_file(Path::new("acl.toml"), &text);
        let policy = policy.unwrap_or_default();
        assert_eq!(
            policy.rules[2].source_site,
            Some(vec!["dc1".to_string(), "dc2".to_string()])
        );
        assert_eq!(
            policy.exports,
            vec![ExportDeclaration {
                service: "ledger".into(),
                sites: vec!["dc1".into()],
                description: String::new(),
            }]
        );
        let bad_site = text.replace("\"dc2\", ", "\"DC 2\", ");
        assert_eq!(
            parse(&bad_site),
            Err("acl.toml:17: rule 3: field `source_site`: site \"DC 2\" cannot appear in a node certificate; sites use only a-z 0-9 . _ -".into())
        );
        let bad_export = text.replace("sites = \"dc1\"", "sites = \"dc/1\"");
        assert_eq!(
            parse(&bad_export),
            Err("acl.toml:23: export 1: field `sites`: site \"dc/1\" cannot appear in a node certificate; sites use only a-z 0-9 . _ -".into())
        );
        let twice = format!("{text}\n[[export]]\nservice = \"ledger\"\nsites = \"dc2\"\n");
        assert_eq!(
            parse(&twice),
            Err("acl.toml:26: export 2: field `service`: service \"ledger\" is already declared by export 1".into())
        );
        let unknown = format!("{text}nodes = [\"a\"]\n");
        let err = parse(&unknown).err().unwrap_or_default();
        assert!(
            err.starts_with("acl.toml:24: export 1: unknown field `nodes`"),
            "{err}"
        );
    }

    #[test]
    fn example_policy_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config-examples/acl.toml");
        let text = std::fs::read_to_string(&path);
        assert!(text.is_ok(), "reading {}: {text:?}", path.display());
        let text = text.unwrap_or_default();
        let specs = parse_acl_file(&path, &text);
        assert!(specs.is_ok(), "{specs:?}");
        let specs = specs.unwrap_or_default().rules;
        assert!(specs.len() >= 5, "example has {} rules", specs.len());
        assert!(
            specs
                .iter()
                .any(|s| s.destination == "payments-admin" && s.action == Action::Deny)
        );
    }
}
