//! The immutable policy snapshot: an index of rules by (destination, source) buckets and the
//! decision and explanation over it. Pure and lock-free; it never touches redb or the clock.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::model::{Action, ExportDeclaration, Rule};

/// The outcome of a decision: the action and the rule that decided it (`None`: default-deny).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub(crate) action: Action,
    pub(crate) rule_id: Option<Arc<str>>,
}

impl Decision {
    /// Label used when no rule matches.
    pub(crate) const DEFAULT_DENY: &'static str = "default-deny";

    /// The decision taken when no rule matches.
    pub(crate) fn default_deny() -> Decision {
        Decision {
            action: Action::Deny,
            rule_id: None,
        }
    }

    pub(crate) fn allowed(&self) -> bool {
        self.action == Action::Allow
    }

    /// The deciding rule's id, or `"default-deny"`.
    pub(crate) fn rule_label(&self) -> &str {
        self.rule_id.as_deref().unwrap_or(Self::DEFAULT_DENY)
    }
}

/// Precedence of a rule, compared field by field, greater wins: exact destination, exact
/// source, site-qualified source, L7 conditions, longer path prefix, deny. Equal ranks fall back to the smaller id so
/// that every decision is deterministic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Rank {
    pub(crate) exact_destination: bool,
    pub(crate) exact_source: bool,
    pub(crate) site_qualified: bool,
    pub(crate) l7: bool,
    pub(crate) path_prefix_len: usize,
    pub(crate) deny: bool,
}

impl Rank {
    pub(crate) fn of(rule: &Rule) -> Rank {
        Rank {
            exact_destination: rule.destination != "*",
            exact_source: rule.source != "*",
            site_qualified: rule.source_site.is_some(),
            l7: rule.is_l7(),
            path_prefix_len: rule.path_prefix.as_deref().map_or(0, str::len),
            deny: rule.action == Action::Deny,
        }
    }
}

/// Orders two rules best first: higher rank, then smaller id.
pub(crate) fn precedence(a: &Rule, b: &Rule) -> Ordering {
    Rank::of(b).cmp(&Rank::of(a)).then_with(|| a.id.cmp(&b.id))
}

/// A rule prepared for the hot path: id shared with decisions, conditions ready to test.
#[derive(Debug)]
struct CompiledRule {
    id: Arc<str>,
    action: Action,
    source_sites: Option<Box<[Box<str>]>>,
    methods: Option<Box<[String]>>,
    path_prefix: Option<Box<str>>,
}

impl CompiledRule {
    fn matches(&self, site: &str, method: &str, path: &str) -> bool {
        self.source_sites
            .as_deref()
            .is_none_or(|sites| sites.iter().any(|s| &**s == site))
            && self.matches_l7(method, path)
    }

    fn matches_l7(&self, method: &str, path: &str) -> bool {
        let method_ok = self
            .methods
            .as_deref()
            .is_none_or(|ms| ms.iter().any(|m| m.eq_ignore_ascii_case(method)));
        method_ok
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|prefix| under_prefix(path, prefix))
    }
}

/// Whether `path` is `prefix` or lies below it, on segment boundaries: `/api` covers `/api`,
/// `/api/` and `/api/x` but not `/apiary`; `/api/` covers `/api/` and `/api/x` but not `/api`.
/// Both are canonical (rule prefixes are checked so; request paths are made so before any
/// decision), so comparing bytes compares what upstreams route on.
fn under_prefix(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'))
}

/// Rules of one destination bucket (an exact name or `*`), split by source.
#[derive(Debug, Default)]
struct DestinationBucket {
    by_source: HashMap<Arc<str>, Vec<CompiledRule>>,
    any_source: Vec<CompiledRule>,
}

/// An immutable, versioned view of the policy. Cheap to share; decisions take at most four
/// hash lookups plus a scan of pre-sorted buckets, whatever the total rule count.
#[derive(Debug, Default)]
pub struct AclSnapshot {
    version: u64,
    by_destination: HashMap<Arc<str>, DestinationBucket>,
    any_destination: DestinationBucket,
    /// Every rule, sorted by id, for listing and explaining.
    rules: Vec<Rule>,
    /// Export declarations by service.
    exports: HashMap<String, ExportDeclaration>,
    /// The policy's identity: see [`AclSnapshot::digest`].
    digest: String,
}

impl AclSnapshot {
    /// Builds the index. Rules must have unique ids and declarations unique services (the
    /// store guarantees both).
    pub fn new(version: u64, mut rules: Vec<Rule>, exports: Vec<ExportDeclaration>) -> AclSnapshot {
        rules.sort_by(|a, b| a.id.cmp(&b.id));
        let mut sorted: Vec<&Rule> = rules.iter().collect();
        sorted.sort_by(|a, b| precedence(a, b));
        let mut by_destination: HashMap<Arc<str>, DestinationBucket> = HashMap::new();
        let mut any_destination = DestinationBucket::default();
        for rule in sorted {
            let compiled = CompiledRule {
                id: Arc::from(rule.id.as_str()),
                action: rule.action,
                source_sites: rule
                    .source_site
                    .as_ref()
                    .map(|sites| sites.iter().map(|s| Box::from(s.as_str())).collect()),
                methods: rule.methods.clone().map(Vec::into_boxed_slice),
                path_prefix: rule.path_prefix.as_deref().map(Box::from),
            };
            let bucket = if rule.destination == "*" {
                &mut any_destination
            } else {
                by_destination
                    .entry(Arc::from(rule.destination.as_str()))
                    .or_default()
            };
            if rule.source == "*" {
                bucket.any_source.push(compiled);
            } else {
                bucket
                    .by_source
                    .entry(Arc::from(rule.source.as_str()))
                    .or_default()
                    .push(compiled);
            }
        }
        let mut exports = exports;
        exports.sort_by(|a, b| a.service.cmp(&b.service));
        let digest = policy_digest(&rules, &exports);
        AclSnapshot {
            version,
            by_destination,
            any_destination,
            rules,
            exports: exports
                .into_iter()
                .map(|d| (d.service.clone(), d))
                .collect(),
            digest,
        }
    }

    /// The policy's identity: a SHA-256 of its canonical content (rules sorted by id and
    /// export declarations sorted by service, each in its normalised form), hex. Equal on
    /// every node holding the same policy, whatever order it was written in; the local
    /// `version` counter is not part of it.
    pub(crate) fn digest(&self) -> &str {
        &self.digest
    }

    /// Every export declaration, sorted by service.
    pub(crate) fn exports(&self) -> Vec<ExportDeclaration> {
        let mut out: Vec<ExportDeclaration> = self.exports.values().cloned().collect();
        out.sort_by(|a, b| a.service.cmp(&b.service));
        out
    }

    /// Whether a rule names `service` as its destination or an export declaration names it:
    /// names that come from the operator, not from a request.
    pub(crate) fn names_destination(&self, service: &str) -> bool {
        self.by_destination.contains_key(service) || self.exports.contains_key(service)
    }

    /// Whether a node of `site` may serve `service`: `Some(answer)` when the policy declares
    /// the service, `None` when it does not (the node's configuration then decides).
    pub(crate) fn may_serve(&self, service: &str, site: &str) -> Option<bool> {
        self.exports
            .get(service)
            .map(|d| d.sites.iter().any(|s| s == site))
    }

    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    /// Every rule, sorted by id.
    pub(crate) fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Decides a request from `source` vouched for by a node of `site`. Buckets are visited in
    /// precedence order (exact/exact, exact destination/any source, any destination/exact
    /// source, any/any); inside a bucket rules are sorted best first, so the first match
    /// decides.
    pub fn decide(
        &self,
        site: &str,
        source: &str,
        destination: &str,
        method: &str,
        path: &str,
    ) -> Decision {
        let exact = self.by_destination.get(destination);
        let buckets = [
            exact.and_then(|b| b.by_source.get(source)),
            exact.map(|b| &b.any_source),
            self.any_destination.by_source.get(source),
            Some(&self.any_destination.any_source),
        ];
        for bucket in buckets.into_iter().flatten() {
            if let Some(rule) = bucket.iter().find(|r| r.matches(site, method, path)) {
                return Decision {
                    action: rule.action,
                    rule_id: Some(rule.id.clone()),
                };
            }
        }
        Decision::default_deny()
    }

    /// Decides like [`AclSnapshot::decide`] and says, for every other rule, why it did not
    /// decide. A missing site, method or path fails every rule that conditions on it.
    pub(crate) fn explain(
        &self,
        site: Option<&str>,
        source: &str,
        destination: &str,
        method: Option<&str>,
        path: Option<&str>,
    ) -> Explanation {
        let mut matching: Vec<&Rule> = Vec::new();
        let mut others: Vec<RuleVerdict> = Vec::new();
        for rule in &self.rules {
            let request = RequestFacts {
                site,
                source,
                destination,
                method,
                path,
            };
            match mismatch(rule, &request) {
                Some(field) => others.push(RuleVerdict {
                    rule_id: rule.id.clone(),
                    action: rule.action,
                    reason: Reason::DidNotMatch {
                        field,
                        detail: mismatch_detail(rule, field, &request),
                    },
                }),
                None => matching.push(rule),
            }
        }
        matching.sort_by(|a, b| precedence(a, b));
        let winner = matching.first().copied();
        for rule in matching.iter().skip(1) {
            if let Some(winner) = winner {
                others.push(RuleVerdict {
                    rule_id: rule.id.clone(),
                    action: rule.action,
                    reason: Reason::LostOnPrecedence {
                        to: winner.id.clone(),
                        detail: lost_because(winner, rule),
                    },
                });
            }
        }
        others.sort_by(|a, b| a.rule_id.cmp(&b.rule_id));
        Explanation {
            version: self.version,
            site: site.map(str::to_string),
            source: source.to_string(),
            destination: destination.to_string(),
            method: method.map(str::to_string),
            path: path.map(str::to_string),
            action: winner.map_or(Action::Deny, |r| r.action),
            rule: winner.map_or_else(|| Decision::DEFAULT_DENY.to_string(), |r| r.id.clone()),
            default_deny: winner.is_none(),
            others,
        }
    }
}

/// What `explain` knows of a request; `None` for what the operator left out.
struct RequestFacts<'a> {
    site: Option<&'a str>,
    source: &'a str,
    destination: &'a str,
    method: Option<&'a str>,
    path: Option<&'a str>,
}

/// See [`AclSnapshot::digest`]. `rules` sorted by id, `exports` by service.
fn policy_digest(rules: &[Rule], exports: &[ExportDeclaration]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(b"hybridge policy v1\n");
    // serde_json writes struct fields in declaration order and these types hold no maps, so
    // the encoding of equal values is equal.
    for rule in rules {
        hasher.update(serde_json::to_vec(rule).unwrap_or_default());
        hasher.update(b"\n");
    }
    hasher.update(b"exports\n");
    for declaration in exports {
        hasher.update(serde_json::to_vec(declaration).unwrap_or_default());
        hasher.update(b"\n");
    }
    hex::encode(hasher.finalize())
}

/// The first field of `rule` that does not match the request, in the order a reader checks.
fn mismatch(rule: &Rule, request: &RequestFacts<'_>) -> Option<Field> {
    let RequestFacts {
        site,
        source,
        destination,
        method,
        path,
    } = *request;
    if rule.destination != "*" && rule.destination != destination {
        return Some(Field::Destination);
    }
    if rule.source != "*" && rule.source != source {
        return Some(Field::Source);
    }
    if let Some(sites) = &rule.source_site
        && !site.is_some_and(|s| sites.iter().any(|x| x == s))
    {
        return Some(Field::Site);
    }
    if let Some(methods) = &rule.methods {
        let ok = method.is_some_and(|m| methods.iter().any(|x| x.eq_ignore_ascii_case(m)));
        if !ok {
            return Some(Field::Method);
        }
    }
    if let Some(prefix) = &rule.path_prefix
        && !path.is_some_and(|p| under_prefix(p, prefix))
    {
        return Some(Field::Path);
    }
    None
}

fn mismatch_detail(rule: &Rule, field: Field, request: &RequestFacts<'_>) -> String {
    let RequestFacts {
        site,
        source,
        destination,
        method,
        path,
    } = *request;
    match field {
        Field::Destination => format!(
            "rule is for destination {}, not {destination}",
            rule.destination
        ),
        Field::Source => format!("rule is for source {}, not {source}", rule.source),
        Field::Site => {
            let listed = rule.source_site.as_deref().unwrap_or_default().join(",");
            match site {
                Some(s) => format!("caller site {s} not in [{listed}]"),
                None => format!("no caller site given; rule requires one of [{listed}]"),
            }
        }
        Field::Method => {
            let listed = rule.methods.as_deref().unwrap_or_default().join(",");
            match method {
                Some(m) => format!("method {m} not in [{listed}]"),
                None => format!("no method given; rule requires one of [{listed}]"),
            }
        }
        Field::Path => {
            let prefix = rule.path_prefix.as_deref().unwrap_or_default();
            match path {
                Some(p) => format!("path {p} is not {prefix} or below it"),
                None => format!("no path given; rule requires prefix {prefix}"),
            }
        }
    }
}

fn lost_because(winner: &Rule, loser: &Rule) -> String {
    let (w, l) = (Rank::of(winner), Rank::of(loser));
    if w.exact_destination != l.exact_destination {
        "exact destination beats *".into()
    } else if w.exact_source != l.exact_source {
        "exact source beats *".into()
    } else if w.site_qualified != l.site_qualified {
        "rule restricted to caller sites beats one without".into()
    } else if w.l7 != l.l7 {
        "rule with method/path conditions beats one without".into()
    } else if w.path_prefix_len != l.path_prefix_len {
        "longer path prefix is more specific".into()
    } else if w.deny != l.deny {
        "equal precedence: deny wins".into()
    } else {
        "equal precedence and action: smaller id decides".into()
    }
}

/// The request field a rule failed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Field {
    Source,
    Site,
    Destination,
    Method,
    Path,
}

impl Field {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Field::Source => "source",
            Field::Site => "site",
            Field::Destination => "destination",
            Field::Method => "method",
            Field::Path => "path",
        }
    }
}

/// Why a rule did not decide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Reason {
    DidNotMatch { field: Field, detail: String },
    LostOnPrecedence { to: String, detail: String },
}

/// One rule that did not decide, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleVerdict {
    pub(crate) rule_id: String,
    pub(crate) action: Action,
    pub(crate) reason: Reason,
}

/// A decision with its reasoning, for `hybridge acl check` and `GET /v1/acl/check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub(crate) version: u64,
    /// The caller's site, when given.
    pub(crate) site: Option<String>,
    pub(crate) source: String,
    pub(crate) destination: String,
    pub(crate) method: Option<String>,
    pub(crate) path: Option<String>,
    pub action: Action,
    /// The deciding rule's id, or `default-deny`.
    pub rule: String,
    pub default_deny: bool,
    /// Every other rule, sorted by id.
    pub(crate) others: Vec<RuleVerdict>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rule(id: &str, src: &str, dst: &str, action: Action, l7: Option<(&[&str], &str)>) -> Rule {
        Rule {
            id: id.into(),
            source: src.into(),
            source_site: None,
            destination: dst.into(),
            action,
            methods: l7.map(|(ms, _)| ms.iter().map(|m| m.to_string()).collect()),
            path_prefix: l7.map(|(_, p)| p.to_string()),
            description: String::new(),
        }
    }

    /// The reference: scan every rule, keep the matching ones, take the best by precedence.
    fn brute_force(
        rules: &[Rule],
        site: &str,
        src: &str,
        dst: &str,
        method: &str,
        path: &str,
    ) -> Decision {
        let request = RequestFacts {
            site: Some(site),
            source: src,
            destination: dst,
            method: Some(method),
            path: Some(path),
        };
        rules
            .iter()
            .filter(|r| mismatch(r, &request).is_none())
            .min_by(|a, b| precedence(a, b))
            .map_or_else(Decision::default_deny, |r| Decision {
                action: r.action,
                rule_id: Some(Arc::from(r.id.as_str())),
            })
    }

    /// Every combination of exact/wildcard source × exact/wildcard destination × L4/L7 ×
    /// allow/deny, pairwise: the expected winner follows the table in the module docs.
    #[test]
    fn precedence_table() {
        let mut kinds = Vec::new();
        for dst_exact in [true, false] {
            for src_exact in [true, false] {
                for l7 in [true, false] {
                    for action in [Action::Allow, Action::Deny] {
                        kinds.push((dst_exact, src_exact, l7, action));
                    }
                }
            }
        }
        assert_eq!(kinds.len(), 16);
        let make = |id: &str, (dst_exact, src_exact, l7, action): (bool, bool, bool, Action)| {
            rule(
                id,
                if src_exact { "web" } else { "*" },
                if dst_exact { "billing" } else { "*" },
                action,
                l7.then_some((&["GET"][..], "/api")),
            )
        };
        let mut checked = 0;
        for &a in &kinds {
            // Alone: the rule decides.
            let snap = AclSnapshot::new(1, vec![make("a", a)], Vec::new());
            let d = snap.decide("dc1", "web", "billing", "GET", "/api/x");
            assert_eq!((d.action, d.rule_label()), (a.3, "a"));
            for &b in &kinds {
                if a == b {
                    continue;
                }
                let snap = AclSnapshot::new(1, vec![make("a", a), make("b", b)], Vec::new());
                let d = snap.decide("dc1", "web", "billing", "GET", "/api/x");
                // Expected, spelled out step by step as in the docs.
                let expected = if a.0 != b.0 {
                    if a.0 { "a" } else { "b" }
                } else if a.1 != b.1 {
                    if a.1 { "a" } else { "b" }
                } else if a.2 != b.2 {
                    if a.2 { "a" } else { "b" }
                } else if a.3 == Action::Deny {
                    "a"
                } else {
                    "b"
                };
                assert_eq!(d.rule_label(), expected, "a={a:?} b={b:?}");
                // An L7 rule that does not match never decides.
                let d = snap.decide("dc1", "web", "billing", "PUT", "/api/x");
                let l4: Vec<_> = [("a", a), ("b", b)]
                    .into_iter()
                    .filter(|(_, k)| !k.2)
                    .collect();
                let expected_l4 = match l4.as_slice() {
                    [] => Decision::DEFAULT_DENY,
                    [(id, _)] => id,
                    _ => expected,
                };
                assert_eq!(d.rule_label(), expected_l4, "PUT a={a:?} b={b:?}");
                checked += 1;
            }
        }
        assert_eq!(checked, 16 * 15);
    }

    #[test]
    fn longer_prefix_wins_then_deny() {
        let rules = vec![
            rule(
                "short-deny",
                "web",
                "billing",
                Action::Deny,
                Some((&["GET"], "/api")),
            ),
            rule(
                "long-allow",
                "web",
                "billing",
                Action::Allow,
                Some((&["GET"], "/api/v1")),
            ),
            rule(
                "long-deny",
                "*",
                "billing",
                Action::Deny,
                Some((&["GET"], "/api/v1/x")),
            ),
        ];
        let snap = AclSnapshot::new(3, rules, Vec::new());
        assert_eq!(
            snap.decide("dc1", "web", "billing", "GET", "/api/v1/x")
                .rule_label(),
            "long-allow"
        );
        assert_eq!(
            snap.decide("dc1", "web", "billing", "GET", "/api/v2")
                .rule_label(),
            "short-deny"
        );
        assert_eq!(
            snap.decide("dc1", "web", "billing", "get", "/api/v1")
                .rule_label(),
            "long-allow"
        );
        assert_eq!(
            snap.decide("dc1", "web", "other", "GET", "/").rule_label(),
            "default-deny"
        );
        assert!(!snap.decide("dc1", "web", "other", "GET", "/").allowed());
        assert_eq!(snap.version(), 3);
    }

    #[test]
    fn explain_says_why_each_rule_did_not_decide() {
        let rules = vec![
            rule(
                "web-to-billing",
                "web",
                "billing",
                Action::Allow,
                Some((&["GET", "POST"], "/api")),
            ),
            rule("any-to-billing", "*", "billing", Action::Deny, None),
            rule("web-to-other", "web", "other", Action::Allow, None),
            rule("reporting", "reporting", "billing", Action::Allow, None),
        ];
        let snap = AclSnapshot::new(1, rules, Vec::new());
        let e = snap.explain(
            Some("dc1"),
            "web",
            "billing",
            Some("GET"),
            Some("/api/invoices"),
        );
        assert_eq!(
            (e.action, e.rule.as_str()),
            (Action::Allow, "web-to-billing")
        );
        let reasons: Vec<_> = e
            .others
            .iter()
            .map(|v| (v.rule_id.as_str(), v.reason.clone()))
            .collect();
        assert_eq!(reasons.len(), 3);
        assert!(
            matches!(&reasons[0], ("any-to-billing", Reason::LostOnPrecedence { to, .. }) if to == "web-to-billing")
        );
        assert!(matches!(
            &reasons[1],
            (
                "reporting",
                Reason::DidNotMatch {
                    field: Field::Source,
                    ..
                }
            )
        ));
        assert!(matches!(
            &reasons[2],
            (
                "web-to-other",
                Reason::DidNotMatch {
                    field: Field::Destination,
                    ..
                }
            )
        ));
        let e = snap.explain(Some("dc1"), "web", "billing", None, None);
        assert_eq!(e.rule, "any-to-billing");
        assert!(e.others.iter().any(|v| v.rule_id == "web-to-billing"
            && matches!(
                v.reason,
                Reason::DidNotMatch {
                    field: Field::Method,
                    ..
                }
            )));
        let e = snap.explain(Some("dc1"), "x", "y", None, None);
        assert!(e.default_deny);
        assert_eq!(e.rule, "default-deny");
    }

    /// A caller is qualified by its site: a site-bound allow lets only that site's callers
    /// through, beats the same rule without a site, and loses to an exact-source rule.
    #[test]
    fn site_bound_rules() {
        let mut web_dc1 = rule("web-dc1", "web", "billing", Action::Allow, None);
        web_dc1.source_site = Some(vec!["dc1".into()]);
        let web_any = rule("web-any", "web", "billing", Action::Deny, None);
        let snap = AclSnapshot::new(1, vec![web_dc1.clone()], Vec::new());
        assert!(snap.decide("dc1", "web", "billing", "GET", "/").allowed());
        let d = snap.decide("dc2", "web", "billing", "GET", "/");
        assert_eq!((d.allowed(), d.rule_label()), (false, "default-deny"));
        // Site-qualified beats unqualified at the same source/destination, whatever the action.
        let snap = AclSnapshot::new(1, vec![web_dc1.clone(), web_any], Vec::new());
        assert_eq!(
            snap.decide("dc1", "web", "billing", "GET", "/")
                .rule_label(),
            "web-dc1"
        );
        assert_eq!(
            snap.decide("dc2", "web", "billing", "GET", "/")
                .rule_label(),
            "web-any"
        );
        // An exact source beats a site-bound wildcard source.
        let mut any_dc1 = rule("any-dc1", "*", "billing", Action::Deny, None);
        any_dc1.source_site = Some(vec!["dc1".into()]);
        let snap = AclSnapshot::new(1, vec![web_dc1, any_dc1], Vec::new());
        assert_eq!(
            snap.decide("dc1", "web", "billing", "GET", "/")
                .rule_label(),
            "web-dc1"
        );
        assert_eq!(
            snap.decide("dc1", "cron", "billing", "GET", "/")
                .rule_label(),
            "any-dc1"
        );
        let e = snap.explain(None, "web", "billing", None, None);
        assert!(e.default_deny);
        assert!(e.others.iter().any(|v| matches!(
            v.reason,
            Reason::DidNotMatch {
                field: Field::Site,
                ..
            }
        )));
    }

    #[test]
    fn the_digest_is_the_content_whatever_its_order_or_version() {
        let a = rule("a", "web", "billing", Action::Allow, None);
        let b = rule("b", "*", "billing", Action::Deny, Some((&["GET"], "/x")));
        let ledger = ExportDeclaration {
            service: "ledger".into(),
            sites: vec!["dc1".into()],
            description: String::new(),
        };
        let billing = ExportDeclaration {
            service: "billing".into(),
            sites: vec!["dc2".into()],
            description: String::new(),
        };
        let one = AclSnapshot::new(
            1,
            vec![a.clone(), b.clone()],
            vec![ledger.clone(), billing.clone()],
        );
        let two = AclSnapshot::new(7, vec![b.clone(), a.clone()], vec![billing, ledger]);
        assert_eq!(one.digest(), two.digest());
        assert_eq!(one.digest().len(), 64);
        let mut changed = b;
        changed.action = Action::Allow;
        let three = AclSnapshot::new(1, vec![a, changed], Vec::new());
        assert_ne!(one.digest(), three.digest());
        assert_ne!(
            AclSnapshot::new(0, Vec::new(), Vec::new()).digest(),
            three.digest()
        );
    }

    #[test]
    fn export_declarations_say_which_sites_serve() {
        let declaration = ExportDeclaration {
            service: "ledger".into(),
            sites: vec!["dc1".into()],
            description: String::new(),
        };
        let snap = AclSnapshot::new(1, Vec::new(), vec![declaration]);
        assert_eq!(snap.may_serve("ledger", "dc1"), Some(true));
        assert_eq!(snap.may_serve("ledger", "dc2"), Some(false));
        assert_eq!(snap.may_serve("billing", "dc2"), None);
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        for (prefix, path, expected) in [
            ("/api", "/api", true),
            ("/api", "/api/", true),
            ("/api", "/api/x", true),
            ("/api", "/apiary", false),
            ("/api", "/ap", false),
            ("/api", "/", false),
            ("/api/", "/api/", true),
            ("/api/", "/api/x", true),
            ("/api/", "/api", false),
            ("/api/", "/apiary", false),
            ("/", "/", true),
            ("/", "/anything/at/all", true),
            ("/pub", "/pubx", false),
            ("/pub", "/pub/x", true),
            ("/api/internal/", "/api/internal/x", true),
            ("/api/internal/", "/api/internalx/y", false),
            (
                "/payments.v1.Payments/",
                "/payments.v1.Payments/Authorize",
                true,
            ),
            (
                "/payments.v1.Payments",
                "/payments.v1.PaymentsAdmin/Drop",
                false,
            ),
        ] {
            assert_eq!(under_prefix(path, prefix), expected, "{prefix} vs {path}");
        }
        let rules = vec![
            rule(
                "api",
                "web",
                "billing",
                Action::Allow,
                Some((&["GET"], "/api")),
            ),
            rule(
                "pub",
                "web",
                "billing",
                Action::Allow,
                Some((&["GET"], "/pub/")),
            ),
        ];
        let snap = AclSnapshot::new(1, rules, Vec::new());
        assert_eq!(
            snap.decide("dc1", "web", "billing", "GET", "/apiary")
                .rule_label(),
            "default-deny"
        );
        assert_eq!(
            snap.decide("dc1", "web", "billing", "GET", "/api")
                .rule_label(),
            "api"
        );
        assert_eq!(
            snap.decide("dc1", "web", "billing", "GET", "/pub")
                .rule_label(),
            "default-deny"
        );
        let e = snap.explain(Some("dc1"), "web", "billing", Some("GET"), Some("/apiary"));
        let api = e.others.iter().find(|v| v.rule_id == "api");
        assert_eq!(
            api.map(|v| &v.reason),
            Some(&Reason::DidNotMatch {
                field: Field::Path,
                detail: "path /apiary is not /api or below it".into(),
            })
        );
    }

    fn arb_rules() -> impl Strategy<Value = Vec<Rule>> {
        let name = prop::sample::select(vec!["a", "b", "*"]);
        let methods = prop::option::of(prop::sample::subsequence(vec!["GET", "POST"], 1..=2));
        let prefix = prop::option::of(prop::sample::select(vec!["/", "/a", "/a/", "/a/b", "/b"]));
        let action = prop::sample::select(vec![Action::Allow, Action::Deny]);
        let sites = prop::option::of(prop::sample::subsequence(vec!["dc1", "dc2"], 1..=2));
        prop::collection::vec((name.clone(), name, action, methods, prefix, sites), 0..24).prop_map(
            |specs| {
                specs
                    .into_iter()
                    .enumerate()
                    .map(|(i, (src, dst, action, methods, prefix, sites))| Rule {
                        id: format!("r{i:02}"),
                        source: src.into(),
                        source_site: sites
                            .map(|s: Vec<&str>| s.into_iter().map(String::from).collect()),
                        destination: dst.into(),
                        action,
                        methods: methods.map(|ms| ms.into_iter().map(String::from).collect()),
                        path_prefix: prefix.map(String::from),
                        description: String::new(),
                    })
                    .collect()
            },
        )
    }

    proptest! {
        #[test]
        fn decide_equals_brute_force(
            rules in arb_rules(),
            site in prop::sample::select(vec!["dc1", "dc2", "dc3"]),
            src in prop::sample::select(vec!["a", "b", "c"]),
            dst in prop::sample::select(vec!["a", "b", "c"]),
            method in prop::sample::select(vec!["GET", "POST", "PUT"]),
            path in prop::sample::select(vec!["/", "/a", "/a/", "/a/b/c", "/ab", "/a/bc", "/b", "/c"]),
        ) {
            let expected = brute_force(&rules, site, src, dst, method, path);
            let snap = AclSnapshot::new(7, rules, Vec::new());
            prop_assert_eq!(snap.decide(site, src, dst, method, path), expected.clone());
            let e = snap.explain(Some(site), src, dst, Some(method), Some(path));
            prop_assert_eq!(e.rule.as_str(), expected.rule_label());
            prop_assert_eq!(e.action, expected.action);
            prop_assert_eq!(e.others.len() + usize::from(!e.default_deny), snap.rules().len());
        }
    }
}
