//! The declarative ACL file (`acl.toml`): TOML with one `[[rule]]` table per rule, parsed into
//! checked `RuleSpec`s with `FILE:LINE` errors. Parsing only: it never touches the store.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::model::{Action, RuleSpec};

/// A rejected ACL file: where (file, line, rule, field) and why. Displays as
/// `FILE:LINE: rule N: field `x`: message`, leaving out the parts that do not apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct AclFileError {
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based position of the `[[rule]]` table, when the error is inside one.
    pub rule: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for AclFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file, self.line)?;
        if let Some(rule) = self.rule {
            write!(f, "rule {rule}: ")?;
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: Option<Spanned<String>>,
    source: Spanned<String>,
    destination: Spanned<String>,
    action: Spanned<String>,
    methods: Option<Spanned<Vec<String>>>,
    path_prefix: Option<Spanned<String>>,
    description: Option<Spanned<String>>,
}

/// Parses and checks an ACL file. `path` is only used in messages. On any error nothing is
/// returned, so callers change nothing.
pub fn parse_acl_file(path: &Path, text: &str) -> Result<Vec<RuleSpec>, AclFileError> {
    let file = path.display().to_string();
    let error_at =
        |offset: usize, rule: Option<usize>, field: Option<&str>, message: String| AclFileError {
            file: file.clone(),
            line: line_of(text, offset),
            rule,
            field: field.map(str::to_string),
            message,
        };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        let rule = rule_index_at(text, offset);
        error_at(offset, rule, None, e.message().trim().to_string())
    })?;

    let mut specs = Vec::with_capacity(raw.rule.len());
    let mut ids: HashMap<String, usize> = HashMap::new();
    for (i, spanned) in raw.rule.into_iter().enumerate() {
        let n = i + 1;
        let table_span = spanned.span();
        let raw = spanned.into_inner();
        let field_span = |field: &str| -> Range<usize> {
            match field {
                "id" => raw.id.as_ref().map(Spanned::span),
                "source" => Some(raw.source.span()),
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
            error_at(
                field_span("action").start,
                Some(n),
                Some("action"),
                format!(
                    "{:?} is not an action; use \"allow\" or \"deny\"",
                    raw.action.get_ref()
                ),
            )
        })?;
        let spec = RuleSpec {
            id: raw.id.as_ref().map(|s| s.get_ref().clone()),
            source: raw.source.get_ref().clone(),
            destination: raw.destination.get_ref().clone(),
            action,
            methods: raw.methods.as_ref().map(|s| s.get_ref().clone()),
            path_prefix: raw.path_prefix.as_ref().map(|s| s.get_ref().clone()),
            description: raw.description.as_ref().map(|s| s.get_ref().clone()),
        };
        let spec = spec
            .validate()
            .map_err(|e| error_at(field_span(e.field).start, Some(n), Some(e.field), e.message))?;
        if let Some(id) = &spec.id
            && let Some(first) = ids.insert(id.clone(), n)
        {
            return Err(error_at(
                field_span("id").start,
                Some(n),
                Some("id"),
                format!("duplicate id {id:?} (first used by rule {first})"),
            ));
        }
        specs.push(spec);
    }
    Ok(specs)
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

/// Which `[[rule]]` table (1-based) a byte offset falls in, judged from the headers before it.
fn rule_index_at(text: &str, offset: usize) -> Option<usize> {
    let end = offset.min(text.len());
    let headers = text.as_bytes()[..end]
        .split(|&b| b == b'\n')
        .filter(|line| line.trim_ascii_start().starts_with(b"[[rule]]"))
        .count();
    (headers > 0).then_some(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<RuleSpec>, String> {
        parse_acl_file(Path::new("acl.toml"), text).map_err(|e| e.to_string())
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
    fn example_policy_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config-examples/acl.toml");
        let text = std::fs::read_to_string(&path);
        assert!(text.is_ok(), "reading {}: {text:?}", path.display());
        let text = text.unwrap_or_default();
        let specs = parse_acl_file(&path, &text);
        assert!(specs.is_ok(), "{specs:?}");
        let specs = specs.unwrap_or_default();
        assert!(specs.len() >= 5, "example has {} rules", specs.len());
        assert!(
            specs
                .iter()
                .any(|s| s.destination == "payments-admin" && s.action == Action::Deny)
        );
    }
}
