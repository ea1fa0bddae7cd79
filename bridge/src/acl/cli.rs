//! `hybridge acl …`: clap arguments and human output, either straight on the redb file
//! (`--db`) or through a running node's admin API (`--admin`, by default the admin socket).
//! No policy logic and no HTTP of its own (`admin::client` speaks to the node).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Subcommand};
use http::Method;

use super::api::{AuditLog, RuleChanged, RuleList};
use super::file::parse_acl_file;
use super::model::{Action, ExportDeclaration, Rule, RuleSpec};
use super::service::AclService;
use super::snapshot::{Explanation, Reason};
use super::store::{ApplyDiff, AuditEntry};
use crate::admin::client::{AdminArgs, AdminClient, JSON, TOML};
use crate::http::path::decision_path;
use crate::http::percent::percent_encode;

/// Ids `acl log` prints per kind of change of an apply (the entry keeps more; `--json`).
const LOG_IDS_SHOWN: usize = 10;

/// Where `hybridge acl` acts: a node's admin API (default: its admin socket) or the redb
/// file directly.
#[derive(Debug, Clone, Args)]
pub(crate) struct AclTarget {
    /// Operate directly on this redb file (the daemon using it must be stopped) instead of
    /// through a node's admin API.
    #[arg(long, value_name = "PATH", conflicts_with = "admin", global = true)]
    pub(crate) db: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) admin: AdminArgs,
}

/// `hybridge acl` subcommands. Flags use the policy file's words (`--source`,
/// `--source-site`, `--destination`); the older `--from`, `--from-site` and `--to` still
/// parse, unshown, so scripts written against them keep working.
#[derive(Debug, Clone, Subcommand)]
pub(crate) enum AclCommand {
    /// List the rules, export declarations and the policy version.
    #[command(visible_alias = "ls")]
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add one rule.
    #[command(group = clap::ArgGroup::new("action").required(true).args(["allow", "deny"]))]
    Add {
        /// Calling service, or "*" (the policy file's `source`).
        #[arg(long, alias = "from", value_name = "SERVICE")]
        source: String,
        /// Only callers entering through a node of this site (repeatable; default any site;
        /// the policy file's `source_site`).
        #[arg(long = "source-site", alias = "from-site", value_name = "SITE")]
        source_sites: Vec<String>,
        /// Called service, or "*" (the policy file's `destination`).
        #[arg(long, alias = "to", value_name = "SERVICE")]
        destination: String,
        /// The rule allows the calls it matches.
        #[arg(long)]
        allow: bool,
        /// The rule denies the calls it matches.
        #[arg(long)]
        deny: bool,
        /// Restrict to this HTTP method (repeatable).
        #[arg(long = "method", value_name = "METHOD")]
        methods: Vec<String>,
        /// Restrict to paths starting with this prefix (on segment boundaries).
        #[arg(long, value_name = "PATH")]
        path_prefix: Option<String>,
        /// Free text kept with the rule and shown by `acl list`.
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
        /// Rule id (default: SOURCE-to-DESTINATION[-N]).
        #[arg(long)]
        id: Option<String>,
    },
    /// Remove a rule by id.
    #[command(visible_alias = "rm")]
    Remove {
        /// The rule's id, as `acl list` shows it.
        id: String,
    },
    /// Make the rules and export declarations equal a policy file, on one node or several.
    ///
    /// Several nodes: `--admin A --admin B`, or `--admin A,B`. Each node is applied to even
    /// when another fails, and reported on its own line. Exit code: 0 every node done (or,
    /// with `--dry-run`, no node would change), 2 with `--dry-run` when a node would change
    /// (like `terraform plan -detailed-exitcode`), 1 when any node failed, named on stderr.
    Apply {
        /// The policy file.
        #[arg(short = 'f', long, value_name = "FILE")]
        file: PathBuf,
        /// Show the diff without changing anything.
        #[arg(long)]
        dry_run: bool,
        /// Print the diff as JSON (an array of one object per node when several are given).
        #[arg(long)]
        json: bool,
    },
    /// Explain the decision for a request. Exit code: 0 allowed, 1 denied, 2 error.
    Check {
        /// Calling service (the policy file's `source`).
        #[arg(long, alias = "from", value_name = "SERVICE")]
        source: String,
        /// Site of the node the caller enters through (rules with `source_site` need it).
        #[arg(long = "source-site", alias = "from-site", value_name = "SITE")]
        source_site: Option<String>,
        /// Called service (the policy file's `destination`).
        #[arg(long, alias = "to", value_name = "SERVICE")]
        destination: String,
        /// HTTP method, e.g. GET.
        method: Option<String>,
        /// Request path, e.g. /api/invoices.
        path: Option<String>,
        /// Print the explanation as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the audit log, newest first.
    Log {
        /// How many entries to show.
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: usize,
        /// Print JSON (every id an apply entry kept) instead of lines.
        #[arg(long)]
        json: bool,
    },
}

/// What a command printed and the exit code that tells a script its result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Report {
    pub(crate) text: String,
    /// What goes to stderr (a multi-node apply names the nodes that failed).
    pub(crate) errors: String,
    /// 0, or the command's documented code for a negative result (`check`: 1 denied;
    /// `apply --dry-run`: 2 changes pending). Errors are not reports.
    pub(crate) exit_code: u8,
}

/// Exit code of `acl check` when the request would be denied.
pub(crate) const EXIT_DENIED: u8 = 1;
/// Exit code of `acl apply --dry-run` when the file differs from the node's policy.
pub(crate) const EXIT_CHANGES_PENDING: u8 = 2;
/// Exit code of `acl check` when it could not decide (any error).
pub(crate) const EXIT_CHECK_ERROR: u8 = 2;

/// Runs one command, prints its output and returns its exit code.
pub(crate) async fn run(target: AclTarget, cmd: AclCommand) -> anyhow::Result<u8> {
    let report = execute(&target, cmd).await?;
    print!("{}", report.text);
    eprint!("{}", report.errors);
    Ok(report.exit_code)
}

/// Runs one command and returns what [`run`] prints and its exit code.
pub(crate) async fn execute(target: &AclTarget, cmd: AclCommand) -> anyhow::Result<Report> {
    if let AclCommand::Apply {
        file,
        dry_run,
        json,
    } = &cmd
        && target.db.is_none()
    {
        let clients = target.admin.clients()?;
        if clients.len() > 1 {
            return apply_to_nodes(clients, file, *dry_run, *json).await;
        }
    }
    let backend = match &target.db {
        Some(path) => Backend::Local(
            AclService::open(path)
                .with_context(|| format!("opening acl database {}", path.display()))?,
        ),
        None => Backend::Remote(Box::new(target.admin.client()?)),
    };
    let mut out = String::new();
    let exit_code = run_command(&backend, cmd, &mut out).await?;
    Ok(Report {
        text: out,
        errors: String::new(),
        exit_code,
    })
}

/// Runs one command against one node or database, writing its output to `out`; returns the
/// exit code.
async fn run_command(backend: &Backend, cmd: AclCommand, out: &mut String) -> anyhow::Result<u8> {
    match cmd {
        AclCommand::List { json } => {
            let list = backend.list().await?;
            if json {
                *out = serde_json::to_string_pretty(&list)? + "\n";
            } else {
                print_list(out, &list)?;
            }
        }
        AclCommand::Add {
            source,
            source_sites,
            destination,
            allow: _,
            deny,
            methods,
            path_prefix,
            description,
            id,
        } => {
            let spec = RuleSpec {
                id,
                source,
                source_site: (!source_sites.is_empty()).then_some(source_sites),
                destination,
                action: if deny { Action::Deny } else { Action::Allow },
                methods: (!methods.is_empty()).then_some(methods),
                path_prefix,
                description,
            };
            let changed = backend.add(spec).await?;
            print_changed(out, "added", &changed)?;
        }
        AclCommand::Remove { id } => {
            let changed = backend.remove(&id).await?;
            print_changed(out, "removed", &changed)?;
        }
        AclCommand::Apply {
            file,
            dry_run,
            json,
        } => return apply_file(backend, &file, dry_run, json, out).await,
        AclCommand::Check {
            source,
            source_site,
            destination,
            method,
            path,
            json,
        } => {
            // Decided on the canonical path, as a listener would; one a listener refuses is
            // an error saying why.
            let typed = path;
            let path = canonical_path(typed.as_deref())?;
            let explanation = backend
                .check(
                    source_site.as_deref(),
                    &source,
                    &destination,
                    method.as_deref(),
                    path.as_deref(),
                )
                .await?;
            return write_check(out, &explanation, json, typed.as_deref(), path.as_deref());
        }
        AclCommand::Log { limit, json } => {
            let log = backend.log(limit).await?;
            if json {
                *out = serde_json::to_string_pretty(&log)? + "\n";
            } else {
                for entry in &log.entries {
                    print_audit_entry(out, entry)?;
                }
            }
        }
    }
    Ok(0)
}

/// `VERB RULE (policy version N)` for a rule added or removed.
fn print_changed(out: &mut String, verb: &str, changed: &RuleChanged) -> std::fmt::Result {
    writeln!(
        out,
        "{verb} {} (policy version {})",
        describe(&changed.rule),
        changed.version
    )
}

/// `acl apply` on one node or database; exits `EXIT_CHANGES_PENDING` for a dry run that would
/// change the policy.
async fn apply_file(
    backend: &Backend,
    file: &Path,
    dry_run: bool,
    json: bool,
    out: &mut String,
) -> anyhow::Result<u8> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading acl file {}", file.display()))?;
    let diff = backend.apply(file, &text, dry_run).await?;
    if json {
        *out = serde_json::to_string_pretty(&diff)? + "\n";
    } else {
        print_diff(out, &diff)?;
    }
    Ok(if dry_run && !diff.is_empty() {
        EXIT_CHANGES_PENDING
    } else {
        0
    })
}

/// The canonical form of the path `acl check` was given; an error saying why for a path a
/// listener refuses.
fn canonical_path(typed: Option<&str>) -> anyhow::Result<Option<String>> {
    Ok(match typed {
        Some(typed) => Some(decision_path(typed).map_err(|e| {
            anyhow::anyhow!("path {typed:?} is refused with 400 invalid-path: {e}")
        })?),
        None => None,
    })
}

/// Writes `acl check`'s answer (and, when the path was made canonical, which path was
/// decided); exits `EXIT_DENIED` unless the call is allowed.
fn write_check(
    out: &mut String,
    explanation: &Explanation,
    json: bool,
    typed: Option<&str>,
    path: Option<&str>,
) -> anyhow::Result<u8> {
    let mut exit_code = 0;
    if !explanation.action.eq(&Action::Allow) {
        exit_code = EXIT_DENIED;
    }
    if json {
        *out = serde_json::to_string_pretty(explanation)? + "\n";
    } else {
        print_explanation(out, explanation)?;
    }
    if let (false, Some(typed), Some(canonical)) = (json, typed, path)
        && typed != canonical
    {
        writeln!(
            out,
            "path {typed} was decided as its canonical form {canonical}"
        )?;
    }
    Ok(exit_code)
}

/// One node's part of a multi-node `acl apply`.
#[derive(Debug, Clone, serde::Serialize)]
struct NodeApply {
    /// The admin address the node was asked at, as given.
    node: String,
    /// `applied`, `unchanged`, `pending` (a dry run that would change it) or `failed`.
    result: &'static str,
    /// The node's policy digest after the apply (before it, for a dry run).
    digest: Option<String>,
    diff: Option<ApplyDiff>,
    error: Option<String>,
}

/// Applies the file to every node at once; one failing node does not stop the others.
async fn apply_to_nodes(
    clients: Vec<AdminClient>,
    file: &Path,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<Report> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading acl file {}", file.display()))?;
    // A file the node would refuse is refused here once, not once per node.
    parse_acl_file(file, &text)?;
    let applies = clients
        .into_iter()
        .map(|client| apply_on_node(client, file, &text, dry_run));
    let nodes = futures_util::future::join_all(applies).await;
    let failed: Vec<&NodeApply> = nodes.iter().filter(|n| n.error.is_some()).collect();
    let mut out = String::new();
    if json {
        out = serde_json::to_string_pretty(&nodes)? + "\n";
    } else {
        print_nodes_apply(&mut out, &nodes, failed.len())?;
    }
    let mut errors = String::new();
    if !failed.is_empty() {
        let names: Vec<&str> = failed.iter().map(|n| n.node.as_str()).collect();
        writeln!(
            errors,
            "error: acl apply failed on {} of {} node(s): {} (the others were {})",
            failed.len(),
            nodes.len(),
            names.join(", "),
            if dry_run { "checked" } else { "applied" }
        )?;
    }
    let exit_code = if !failed.is_empty() {
        1
    } else if nodes.iter().any(|n| n.result == "pending") {
        EXIT_CHANGES_PENDING
    } else {
        0
    };
    Ok(Report {
        text: out,
        errors,
        exit_code,
    })
}

/// Applies `text` (read from `file`) to one node and says how that went.
async fn apply_on_node(client: AdminClient, file: &Path, text: &str, dry_run: bool) -> NodeApply {
    let node = client.endpoint().to_string();
    let backend = Backend::Remote(Box::new(client));
    let outcome = async {
        let diff = backend.apply(file, text, dry_run).await?;
        let digest = backend.list().await?.digest;
        anyhow::Ok((diff, digest))
    }
    .await;
    match outcome {
        Ok((diff, digest)) => NodeApply {
            node,
            result: match (diff.is_empty(), dry_run) {
                (true, _) => "unchanged",
                (false, true) => "pending",
                (false, false) => "applied",
            },
            digest: Some(digest),
            diff: Some(diff),
            error: None,
        },
        Err(e) => NodeApply {
            node,
            result: "failed",
            digest: None,
            diff: None,
            error: Some(format!("{e:#}")),
        },
    }
}

/// Each node's line, then the count of each result and whether the nodes' policies agree.
fn print_nodes_apply(out: &mut String, nodes: &[NodeApply], failed: usize) -> std::fmt::Result {
    for node in nodes {
        print_node_apply(out, node)?;
    }
    let mut digests: Vec<&str> = nodes.iter().filter_map(|n| n.digest.as_deref()).collect();
    digests.sort_unstable();
    digests.dedup();
    let count = |result| nodes.iter().filter(|n| n.result == result).count();
    writeln!(
        out,
        "{} node(s): {} applied, {} unchanged, {} pending, {} failed{}",
        nodes.len(),
        count("applied"),
        count("unchanged"),
        count("pending"),
        failed,
        match digests.as_slice() {
            [one] => format!("; policy {one} on every node that answered"),
            [] => String::new(),
            _ => "; the nodes' policies differ".into(),
        }
    )
}

/// `NODE: applied 1 added, 0 changed, 0 removed (policy version 3 -> 4); policy DIGEST`, the
/// node's warnings under it.
fn print_node_apply(out: &mut String, node: &NodeApply) -> std::fmt::Result {
    let digest = node
        .digest
        .as_deref()
        .map(|d| format!("; policy {d}"))
        .unwrap_or_default();
    match (&node.diff, &node.error) {
        (_, Some(error)) => writeln!(out, "{}: failed: {error}", node.node)?,
        (Some(diff), None) if diff.is_empty() => writeln!(
            out,
            "{}: unchanged (policy version {}){digest}",
            node.node, diff.version_before
        )?,
        (Some(diff), None) if diff.dry_run => writeln!(
            out,
            "{}: would change: {} (policy version {}){digest}",
            node.node,
            diff_counts(diff),
            diff.version_before
        )?,
        (Some(diff), None) => writeln!(
            out,
            "{}: applied {} (policy version {} -> {}){digest}",
            node.node,
            diff_counts(diff),
            diff.version_before,
            diff.version_after
        )?,
        (None, None) => writeln!(out, "{}: no answer", node.node)?,
    }
    for warning in node.diff.iter().flat_map(|d| &d.warnings) {
        writeln!(out, "  warning: {warning}")?;
    }
    Ok(())
}

enum Backend {
    Local(Arc<AclService>),
    Remote(Box<AdminClient>),
}

impl Backend {
    async fn list(&self) -> anyhow::Result<RuleList> {
        match self {
            Backend::Local(svc) => Ok(RuleList {
                version: svc.version(),
                digest: svc.digest(),
                rules: svc.list(),
                exports: svc.exports(),
            }),
            Backend::Remote(client) => client.call(Method::GET, "/v1/acl/rules", None).await,
        }
    }

    async fn add(&self, spec: RuleSpec) -> anyhow::Result<RuleChanged> {
        match self {
            Backend::Local(svc) => {
                let rule = svc.add(spec, &process_actor())?;
                Ok(RuleChanged {
                    version: svc.version(),
                    rule,
                })
            }
            Backend::Remote(client) => {
                let body = Bytes::from(serde_json::to_vec(&spec)?);
                client
                    .call(Method::POST, "/v1/acl/rules", Some((JSON, body)))
                    .await
            }
        }
    }

    async fn remove(&self, id: &str) -> anyhow::Result<RuleChanged> {
        match self {
            Backend::Local(svc) => {
                let rule = svc.remove(id, &process_actor())?;
                Ok(RuleChanged {
                    version: svc.version(),
                    rule,
                })
            }
            Backend::Remote(client) => {
                let path = format!("/v1/acl/rules/{}", percent_encode(id));
                client.call(Method::DELETE, &path, None).await
            }
        }
    }

    async fn apply(&self, file: &Path, text: &str, dry_run: bool) -> anyhow::Result<ApplyDiff> {
        match self {
            Backend::Local(svc) => {
                let specs = parse_acl_file(file, text)?;
                Ok(svc.apply(specs, &process_actor(), dry_run)?)
            }
            Backend::Remote(client) => {
                let path = format!(
                    "/v1/acl/apply?dry_run={dry_run}&file={}",
                    percent_encode(&file.display().to_string())
                );
                let body = Bytes::copy_from_slice(text.as_bytes());
                client.call(Method::POST, &path, Some((TOML, body))).await
            }
        }
    }

    async fn check(
        &self,
        site: Option<&str>,
        from: &str,
        to: &str,
        method: Option<&str>,
        path: Option<&str>,
    ) -> anyhow::Result<Explanation> {
        match self {
            Backend::Local(svc) => Ok(svc.explain(site, from, to, method, path)),
            Backend::Remote(client) => {
                let mut query = format!(
                    "/v1/acl/check?from={}&to={}",
                    percent_encode(from),
                    percent_encode(to)
                );
                if let Some(site) = site {
                    write!(query, "&site={}", percent_encode(site))?;
                }
                if let Some(method) = method {
                    write!(query, "&method={}", percent_encode(method))?;
                }
                if let Some(path) = path {
                    write!(query, "&path={}", percent_encode(path))?;
                }
                client.call(Method::GET, &query, None).await
            }
        }
    }

    async fn log(&self, limit: usize) -> anyhow::Result<AuditLog> {
        match self {
            Backend::Local(svc) => Ok(AuditLog {
                entries: svc.audit(limit)?,
            }),
            Backend::Remote(client) => {
                client
                    .call(Method::GET, &format!("/v1/acl/log?limit={limit}"), None)
                    .await
            }
        }
    }
}

/// The actor `--db` changes are recorded under.
fn process_actor() -> String {
    crate::admin::unix::process_actor()
}

/// One audit entry: a line, and for an apply a line per kind of change naming its first ids.
fn print_audit_entry(out: &mut String, e: &AuditEntry) -> std::fmt::Result {
    let what = match &e.summary {
        Some(s) => format!("+{} ~{} -{}", s.added, s.changed, s.removed),
        None => e.rule_id.clone(),
    };
    let exports = e
        .summary
        .as_ref()
        .filter(|s| s.exports_added + s.exports_changed + s.exports_removed > 0)
        .map(|s| {
            format!(
                ", exports +{} ~{} -{} ({})",
                s.exports_added,
                s.exports_changed,
                s.exports_removed,
                s.export_services.join(", ")
            )
        })
        .unwrap_or_default();
    writeln!(
        out,
        "{:>5}  {}  v{}  {:<6} {:<24} by {}{exports}",
        e.seq,
        e.time,
        e.version,
        e.op.as_str(),
        what,
        e.actor
    )?;
    if let Some(s) = &e.summary {
        for (sign, count, ids) in [
            ('+', s.added, &s.added_ids),
            ('~', s.changed, &s.changed_ids),
            ('-', s.removed, &s.removed_ids),
        ] {
            if count == 0 {
                continue;
            }
            let shown: Vec<&str> = ids.iter().take(LOG_IDS_SHOWN).map(String::as_str).collect();
            let more = count.saturating_sub(shown.len());
            write!(out, "       {sign} {}", shown.join(", "))?;
            if more > 0 {
                write!(out, " … and {more} more")?;
            }
            writeln!(out)?;
        }
    }
    Ok(())
}

/// One line per rule: `id: allow web -> billing GET,POST /api "description"`.
fn describe(rule: &Rule) -> String {
    let mut text = format!("{}: {} {}", rule.id, rule.action, rule.source);
    if let Some(sites) = &rule.source_site {
        text.push('@');
        text.push_str(&sites.join(","));
    }
    text.push_str(" -> ");
    text.push_str(&rule.destination);
    if let Some(methods) = &rule.methods {
        text.push(' ');
        text.push_str(&methods.join(","));
    }
    if let Some(prefix) = &rule.path_prefix {
        text.push(' ');
        text.push_str(prefix);
        text.push('*');
    }
    if !rule.description.is_empty() {
        text.push_str(&format!(" {:?}", rule.description));
    }
    text
}

fn print_list(out: &mut String, list: &RuleList) -> std::fmt::Result {
    writeln!(
        out,
        "policy {} (local revision {}), {} rule(s)",
        list.digest,
        list.version,
        list.rules.len()
    )?;
    for rule in &list.rules {
        writeln!(out, "  {}", describe(rule))?;
    }
    if !list.exports.is_empty() {
        writeln!(out, "{} export declaration(s)", list.exports.len())?;
    }
    for declaration in &list.exports {
        writeln!(out, "  {}", describe_export(declaration))?;
    }
    Ok(())
}

/// `ledger: served by dc1,dc2 "description"`.
fn describe_export(declaration: &ExportDeclaration) -> String {
    let mut text = format!(
        "export {}: served by {}",
        declaration.service,
        declaration.sites.join(",")
    );
    if !declaration.description.is_empty() {
        text.push_str(&format!(" {:?}", declaration.description));
    }
    text
}

fn print_diff(out: &mut String, diff: &ApplyDiff) -> std::fmt::Result {
    for rule in &diff.added {
        writeln!(out, "+ {}", describe(rule))?;
    }
    for change in &diff.changed {
        writeln!(out, "~ {}", describe(&change.old))?;
        writeln!(out, "  -> {}", describe(&change.new))?;
    }
    for rule in &diff.removed {
        writeln!(out, "- {}", describe(rule))?;
    }
    for declaration in &diff.exports.added {
        writeln!(out, "+ {}", describe_export(declaration))?;
    }
    for change in &diff.exports.changed {
        writeln!(out, "~ {}", describe_export(&change.old))?;
        writeln!(out, "  -> {}", describe_export(&change.new))?;
    }
    for declaration in &diff.exports.removed {
        writeln!(out, "- {}", describe_export(declaration))?;
    }
    for warning in &diff.warnings {
        writeln!(out, "warning: {warning}")?;
    }
    let counts = diff_counts(diff);
    if diff.is_empty() {
        writeln!(out, "no changes (policy version {})", diff.version_before)
    } else if diff.dry_run {
        writeln!(
            out,
            "dry run: {counts}; nothing changed (policy version {})",
            diff.version_before
        )
    } else {
        writeln!(
            out,
            "applied: {counts} (policy version {} -> {})",
            diff.version_before, diff.version_after
        )
    }
}

/// `2 added, 0 changed, 1 removed[; export declarations ...]`.
fn diff_counts(diff: &ApplyDiff) -> String {
    let mut counts = format!(
        "{} added, {} changed, {} removed",
        diff.added.len(),
        diff.changed.len(),
        diff.removed.len()
    );
    if !diff.exports.is_empty() {
        counts.push_str(&format!(
            "; export declarations {} added, {} changed, {} removed",
            diff.exports.added.len(),
            diff.exports.changed.len(),
            diff.exports.removed.len()
        ));
    }
    counts
}

fn print_explanation(out: &mut String, e: &Explanation) -> std::fmt::Result {
    writeln!(out, "{}", e.action)?;
    if let Some(site) = &e.site {
        writeln!(out, "caller {}@{site} -> {}", e.source, e.destination)?;
    }
    if e.default_deny {
        writeln!(out, "default-deny")?;
    } else {
        writeln!(out, "rule {}", e.rule)?;
    }
    if !e.others.is_empty() {
        writeln!(out, "other rules:")?;
    }
    for verdict in &e.others {
        match &verdict.reason {
            Reason::DidNotMatch { field, detail } => writeln!(
                out,
                "  {} ({}): did not match {}: {detail}",
                verdict.rule_id,
                verdict.action,
                field.as_str(),
            )?,
            Reason::LostOnPrecedence { to, detail } => writeln!(
                out,
                "  {} ({}): matched but lost to {to}: {detail}",
                verdict.rule_id, verdict.action
            )?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    #[derive(Parser)]
    struct TestCli {
        #[command(flatten)]
        target: AclTarget,
        #[command(subcommand)]
        cmd: AclCommand,
    }

    fn parse(args: &[&str]) -> Result<TestCli, clap::Error> {
        TestCli::try_parse_from(std::iter::once("acl").chain(args.iter().copied()))
    }

    const POLICY: &str = r#"
[[rule]]
source = "web"
source_site = "dc1"
destination = "billing"
action = "allow"
methods = ["GET", "POST"]
path_prefix = "/api"

[[rule]]
source = "*"
destination = "billing"
action = "deny"
"#;

    /// Runs the same command list against a target and returns every output.
    async fn script(target_args: &[&str], policy: &Path) -> anyhow::Result<Vec<String>> {
        let policy = policy.to_string_lossy().to_string();
        let commands: Vec<Vec<&str>> = vec![
            vec!["apply", "-f", &policy, "--dry-run"],
            vec!["apply", "-f", &policy],
            vec!["apply", "-f", &policy],
            vec![
                "add",
                "--from",
                "reporting",
                "--to",
                "billing",
                "--allow",
                "--method",
                "get",
            ],
            vec![
                "check",
                "--from",
                "web",
                "--from-site",
                "dc1",
                "--to",
                "billing",
                "GET",
                "/api/invoices",
            ],
            vec!["check", "--from", "cron", "--to", "ledger"],
            vec!["rm", "reporting-to-billing"],
            vec!["ls"],
            vec!["log", "--limit", "2"],
            vec![
                "check",
                "--from",
                "web",
                "--from-site",
                "dc1",
                "--to",
                "billing",
                "GET",
                "/x/../api//invoices",
            ],
        ];
        let mut outputs = Vec::new();
        for command in commands {
            let args: Vec<&str> = target_args.iter().copied().chain(command).collect();
            let cli = parse(&args)?;
            outputs.push(execute(&cli.target, cli.cmd).await?.text);
        }
        Ok(outputs)
    }

    fn check_outputs(outputs: &[String], policy: &Path) {
        let _ = policy;
        assert!(
            outputs[0].contains(
                "dry run: 2 added, 0 changed, 0 removed; nothing changed (policy version 0)"
            ),
            "{}",
            outputs[0]
        );
        assert!(
            outputs[1]
                .ends_with("applied: 2 added, 0 changed, 0 removed (policy version 0 -> 1)\n"),
            "{}",
            outputs[1]
        );
        assert_eq!(outputs[2], "no changes (policy version 1)\n");
        assert_eq!(
            outputs[3],
            "added reporting-to-billing: allow reporting -> billing GET (policy version 2)\n"
        );
        assert_eq!(
            outputs[4],
            "allow\ncaller web@dc1 -> billing\nrule web-to-billing\nother rules:\n  \
             any-to-billing (deny): matched but lost to web-to-billing: exact source beats *\n  \
             reporting-to-billing (allow): did not match source: rule is for source reporting, not web\n"
        );
        assert!(
            outputs[5].starts_with("deny\ndefault-deny\nother rules:\n"),
            "{}",
            outputs[5]
        );
        assert!(
            outputs[6].starts_with("removed reporting-to-billing"),
            "{}",
            outputs[6]
        );
        assert!(
            outputs[7].starts_with("policy ")
                && outputs[7].contains(" (local revision 3), 2 rule(s)\n"),
            "{}",
            outputs[7]
        );
        assert_eq!(outputs[8].lines().count(), 2);
        assert!(
            outputs[8]
                .lines()
                .next()
                .is_some_and(|l| l.contains("v3  remove")),
            "{}",
            outputs[8]
        );
        assert_eq!(
            outputs[9],
            "allow\ncaller web@dc1 -> billing\nrule web-to-billing\nother rules:\n  \
             any-to-billing (deny): matched but lost to web-to-billing: exact source beats *\n\
             path /x/../api//invoices was decided as its canonical form /api/invoices\n"
        );
    }

    #[tokio::test]
    async fn db_target_works_on_the_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let policy = dir.path().join("acl.toml");
        std::fs::write(&policy, POLICY)?;
        let db = dir.path().join("hybridge.redb");
        let db = db.to_string_lossy().to_string();
        let outputs = script(&["--db", &db], &policy).await?;
        check_outputs(&outputs, &policy);
        assert!(outputs[8].contains("by cli:uid:"), "{}", outputs[8]);

        // A path a listener would refuse is an error saying why.
        let cli = parse(&[
            "--db", &db, "check", "--from", "web", "--to", "billing", "GET", "/api%2Fx",
        ])?;
        let err = execute(&cli.target, cli.cmd)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.starts_with(
                "path \"/api%2Fx\" is refused with 400 invalid-path: escaped slash `%2F`"
            ),
            "{err}"
        );

        // A broken file names its line and changes nothing.
        std::fs::write(&policy, POLICY.replace("\"/api\"", "\"api\""))?;
        let cli = parse(&["--db", &db, "apply", "-f", &policy.to_string_lossy()])?;
        let err = execute(&cli.target, cli.cmd)
            .await
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err,
            Some(format!(
                "{}:8: rule 1: field `path_prefix`: path prefix \"api\" must start with '/'",
                policy.display()
            ))
        );

        // While a "daemon" holds the file, --db says so.
        let _held = AclService::open(Path::new(&db))?;
        let cli = parse(&["--db", &db, "ls"])?;
        let err = execute(&cli.target, cli.cmd)
            .await
            .err()
            .map(|e| format!("{e:#}"));
        assert!(err.is_some_and(|e| {
            e.contains("is in use by a running hybridge (use --admin to talk to it)")
        }));
        Ok(())
    }

    // Multi-threaded so the routes' redb calls go through `block_in_place`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn admin_target_talks_to_the_routes_over_a_socket() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let policy = dir.path().join("acl.toml");
        std::fs::write(&policy, POLICY)?;
        let svc = AclService::open(&dir.path().join("hybridge.redb"))?;
        let socket = dir.path().join("admin.sock");
        let listener = tokio::net::UnixListener::bind(&socket)?;
        let server_svc = svc.clone();
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let svc = server_svc.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let svc = svc.clone();
                        async move {
                            let response =
                                crate::acl::api::handle_admin(&svc, req, "uid:1000(alice)")
                                    .await
                                    .unwrap_or_else(|| {
                                        let mut r = http::Response::new(http_body_util::Full::new(
                                            Bytes::new(),
                                        ));
                                        *r.status_mut() = http::StatusCode::NOT_FOUND;
                                        r
                                    });
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let admin = format!("unix:{}", socket.display());
        let outputs = script(&["--admin", &admin], &policy).await;
        server.abort();
        let outputs = outputs?;
        check_outputs(&outputs, &policy);
        assert!(outputs[8].contains("by uid:1000(alice)"), "{}", outputs[8]);
        assert_eq!(svc.version(), 3);

        // Nothing there: the message says where it looked and what to do.
        let missing = dir.path().join("absent.sock");
        let cli = parse(&["--admin", &format!("unix:{}", missing.display()), "ls"])?;
        let err = execute(&cli.target, cli.cmd)
            .await
            .err()
            .map(|e| format!("{e:#}"));
        assert!(
            err.as_ref().is_some_and(|e| e.contains(&format!(
                "no admin socket at {}: is the node running",
                missing.display()
            ))),
            "{err:?}"
        );
        Ok(())
    }

    #[test]
    fn apply_entries_print_counts_and_the_first_ids() {
        let entry = AuditEntry {
            seq: 7,
            time: "2025-01-01T00:00:00Z".into(),
            actor: "uid:0(root)".into(),
            op: crate::acl::store::AuditOp::Apply,
            rule_id: String::new(),
            old: None,
            new: None,
            version: 4,
            summary: Some(crate::acl::store::ApplySummary {
                added: 12,
                changed: 1,
                removed: 0,
                added_ids: (0..12).map(|i| format!("r{i:02}")).collect(),
                changed_ids: vec!["x".into()],
                removed_ids: vec![],
                exports_changed: 1,
                export_services: vec!["billing".into()],
                ..crate::acl::store::ApplySummary::default()
            }),
        };
        let mut out = String::new();
        print_audit_entry(&mut out, &entry).unwrap();
        assert_eq!(
            out,
            "    7  2025-01-01T00:00:00Z  v4  apply  +12 ~1 -0                by uid:0(root), exports +0 ~1 -0 (billing)\n       + r00, r01, r02, r03, r04, r05, r06, r07, r08, r09 … and 2 more\n       ~ x\n"
        );
    }

    #[test]
    fn add_requires_an_action() {
        assert!(parse(&["add", "--from", "a", "--to", "b"]).is_err());
        assert!(parse(&["add", "--from", "a", "--to", "b", "--allow", "--deny"]).is_err());
        assert!(parse(&["--db", "x", "--admin", "http://h:1", "ls"]).is_err());
        let cli = parse(&["ls"]);
        assert!(cli.is_ok_and(|c| { c.target.admin.admin.is_empty() && c.target.db.is_none() }));
        let err = parse(&["ls", "--admin", "localhost:7180"])
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_ref().is_some_and(|e| e.contains(
                "invalid value 'localhost:7180' for '--admin <ADDRESS>': invalid admin address `localhost:7180`: expected unix:/PATH, http://HOST:PORT or https://HOST:PORT"
            )),
            "{err:?}"
        );
    }
}
