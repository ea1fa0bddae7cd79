//! Durable ACL state in redb: the rules table, the policy version counter and the append-only
//! audit log. Every change is one write transaction. It never decides requests (see snapshot).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::error::AclError;
use super::model::{ExportDeclaration, Rule, RuleSpec, first_free_id, slug_base};

/// Rule id → rule JSON.
const RULES: TableDefinition<&str, &str> = TableDefinition::new("acl_rules");
/// Service → export declaration JSON.
const EXPORTS: TableDefinition<&str, &str> = TableDefinition::new("acl_exports");
/// `"version"` → policy version (monotonic, +1 per committed change).
const META: TableDefinition<&str, u64> = TableDefinition::new("acl_meta");
/// Sequence number → audit entry JSON; append-only.
const AUDIT: TableDefinition<u64, &str> = TableDefinition::new("acl_audit");
const VERSION_KEY: &str = "version";

/// Rule ids an `apply` audit entry lists per kind of change (added, changed, removed); the
/// counts are always complete. Keeps one entry bounded whatever the size of the policy.
pub const AUDIT_IDS_PER_KIND: usize = 100;

/// The kind of change an audit entry records: `add` and `remove` one rule each; `apply` one
/// whole declarative apply, with an [`ApplySummary`] (databases written before that also hold
/// one `apply` or `update` entry per rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum AuditOp {
    Add,
    Remove,
    Apply,
    Update,
}

impl AuditOp {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AuditOp::Add => "add",
            AuditOp::Remove => "remove",
            AuditOp::Apply => "apply",
            AuditOp::Update => "update",
        }
    }
}

/// One audit log entry: one per committed change, so one per policy version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub(crate) seq: u64,
    /// RFC 3339, UTC.
    pub(crate) time: String,
    /// Who made the change: `uid:1000(alice)` (admin socket), `spiffe://TD/admin/alice`
    /// (remote admin listener), `cli:uid:0(root)` (`--db`).
    pub(crate) actor: String,
    pub(crate) op: AuditOp,
    /// The rule of an `add` or `remove`; empty for an `apply` (see `summary`).
    pub(crate) rule_id: String,
    pub(crate) old: Option<Rule>,
    pub(crate) new: Option<Rule>,
    /// The policy version this change produced.
    pub(crate) version: u64,
    /// What an `apply` changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<ApplySummary>,
}

/// The diff of one `apply`, as its audit entry keeps it: complete counts, and the ids of the
/// first [`AUDIT_IDS_PER_KIND`] rules of each kind (sorted); likewise for export declarations,
/// named by service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplySummary {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
    pub added_ids: Vec<String>,
    pub(crate) changed_ids: Vec<String>,
    pub(crate) removed_ids: Vec<String>,
    /// Export declarations added, changed and removed.
    #[serde(default)]
    pub(crate) exports_added: usize,
    #[serde(default)]
    pub(crate) exports_changed: usize,
    #[serde(default)]
    pub(crate) exports_removed: usize,
    /// The services of those declarations (first [`AUDIT_IDS_PER_KIND`], sorted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) export_services: Vec<String>,
}

impl ApplySummary {
    fn of(diff: &ApplyDiff) -> ApplySummary {
        let first = |ids: &mut dyn Iterator<Item = &String>| {
            let mut ids: Vec<String> = ids.take(AUDIT_IDS_PER_KIND).cloned().collect();
            ids.sort();
            ids
        };
        // `added` is sorted by id, `removed` comes from a BTreeMap: the first ids are the
        // smallest. `changed` follows the file; sort all of it before cutting.
        let mut changed: Vec<&String> = diff.changed.iter().map(|c| &c.new.id).collect();
        changed.sort();
        let exports = &diff.exports;
        let mut services: Vec<&String> = exports
            .added
            .iter()
            .chain(&exports.removed)
            .map(|d| &d.service)
            .chain(exports.changed.iter().map(|c| &c.new.service))
            .collect();
        services.sort();
        ApplySummary {
            added: diff.added.len(),
            changed: diff.changed.len(),
            removed: diff.removed.len(),
            added_ids: first(&mut diff.added.iter().map(|r| &r.id)),
            changed_ids: first(&mut changed.into_iter()),
            removed_ids: first(&mut diff.removed.iter().map(|r| &r.id)),
            exports_added: exports.added.len(),
            exports_changed: exports.changed.len(),
            exports_removed: exports.removed.len(),
            export_services: first(&mut services.into_iter()),
        }
    }
}

/// A rule whose content `apply` changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RuleChange {
    pub(crate) old: Rule,
    pub(crate) new: Rule,
}

/// An export declaration whose sites `apply` changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ExportChange {
    pub(crate) old: ExportDeclaration,
    pub(crate) new: ExportDeclaration,
}

/// What `apply` did to the export declarations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ExportsDiff {
    pub(crate) added: Vec<ExportDeclaration>,
    pub(crate) removed: Vec<ExportDeclaration>,
    pub(crate) changed: Vec<ExportChange>,
}

impl ExportsDiff {
    pub(crate) fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// What `apply` did (or, with `dry_run`, would do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyDiff {
    pub(crate) dry_run: bool,
    pub(crate) added: Vec<Rule>,
    pub(crate) removed: Vec<Rule>,
    pub(crate) changed: Vec<RuleChange>,
    #[serde(default)]
    pub(crate) exports: ExportsDiff,
    /// Version before the apply.
    pub(crate) version_before: u64,
    /// Version after the apply (equal to `version_before` when nothing changed or dry run).
    pub(crate) version_after: u64,
    /// Non-fatal findings, such as service names the node does not know.
    pub(crate) warnings: Vec<String>,
}

impl ApplyDiff {
    pub(crate) fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.exports.is_empty()
    }
}

/// Everything the store holds of the policy, as one read transaction saw it.
#[derive(Debug, Clone, Default)]
pub(crate) struct StoredPolicy {
    pub(crate) version: u64,
    pub(crate) rules: Vec<Rule>,
    pub(crate) exports: Vec<ExportDeclaration>,
}

/// The ACL tables inside a (possibly shared) redb database.
pub(crate) struct AclStore {
    db: Arc<Database>,
}

impl AclStore {
    /// Opens or creates the redb file at `path`. A file held by another process (the daemon)
    /// fails with [`AclError::InUse`].
    ///
    /// The file holds the whole policy and its audit trail: it is created 0600 whatever the
    /// umask, and an existing file readable by others is narrowed to 0600.
    pub(crate) fn open(path: &Path) -> Result<AclStore, AclError> {
        restrict_to_owner(path).map_err(|e| AclError::Permissions {
            path: PathBuf::from(path),
            message: e.to_string(),
        })?;
        let db = Database::builder().create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => AclError::InUse {
                path: PathBuf::from(path),
            },
            other => AclError::from(other),
        })?;
        AclStore::with_database(Arc::new(db))
    }

    /// Uses an already open database.
    fn with_database(db: Arc<Database>) -> Result<AclStore, AclError> {
        // Create the tables once so read transactions never meet a missing table.
        let txn = db.begin_write()?;
        {
            txn.open_table(RULES)?;
            txn.open_table(META)?;
            txn.open_table(AUDIT)?;
        }
        txn.commit()?;
        Ok(AclStore { db })
    }

    /// Current version, every rule and every export declaration, in one read transaction.
    pub(crate) fn load(&self) -> Result<StoredPolicy, AclError> {
        let txn = self.db.begin_read()?;
        let version = txn
            .open_table(META)?
            .get(VERSION_KEY)?
            .map_or(0, |v| v.value());
        let rules = read_rules(&txn.open_table(RULES)?)?;
        let exports = match txn.open_table(EXPORTS) {
            Ok(table) => read_exports(&table)?,
            // A database written before export declarations existed has no such table.
            Err(redb::TableError::TableDoesNotExist(_)) => BTreeMap::new(),
            Err(e) => return Err(e.into()),
        };
        Ok(StoredPolicy {
            version,
            rules: rules.into_values().collect(),
            exports: exports.into_values().collect(),
        })
    }

    /// Adds one checked rule; resolves a missing id to the first free `src-to-dst[-N]` slug.
    /// Returns the stored rule and the new version.
    pub(crate) fn add(&self, spec: RuleSpec, actor: &str) -> Result<(Rule, u64), AclError> {
        let txn = self.db.begin_write()?;
        let result = {
            let mut rules = txn.open_table(RULES)?;
            let id = match &spec.id {
                Some(id) => {
                    if rules.get(id.as_str())?.is_some() {
                        return Err(AclError::DuplicateId(id.clone()));
                    }
                    id.clone()
                }
                None => {
                    let base = slug_base(&spec.source, &spec.destination);
                    let existing = read_rules(&rules)?;
                    first_free_id(&base, |id| existing.contains_key(id))
                }
            };
            let rule = Rule::from_valid_spec(spec, id);
            rules.insert(rule.id.as_str(), to_json(&rule)?.as_str())?;
            let version = bump_version(&txn)?;
            append_audit(
                &txn,
                AuditRecord {
                    actor,
                    op: AuditOp::Add,
                    rule_id: &rule.id,
                    old: None,
                    new: Some(&rule),
                    summary: None,
                },
                version,
            )?;
            (rule, version)
        };
        txn.commit()?;
        Ok(result)
    }

    /// Removes a rule by id; returns it and the new version.
    pub(crate) fn remove(&self, id: &str, actor: &str) -> Result<(Rule, u64), AclError> {
        let txn = self.db.begin_write()?;
        let result = {
            let mut rules = txn.open_table(RULES)?;
            let old = match rules.remove(id)? {
                Some(json) => from_json::<Rule>(id, json.value())?,
                None => return Err(AclError::NotFound(id.to_string())),
            };
            let version = bump_version(&txn)?;
            append_audit(
                &txn,
                AuditRecord {
                    actor,
                    op: AuditOp::Remove,
                    rule_id: id,
                    old: Some(&old),
                    new: None,
                    summary: None,
                },
                version,
            )?;
            (old, version)
        };
        txn.commit()?;
        Ok(result)
    }

    /// Makes the rules and export declarations equal `desired` and `desired_exports` (ids
    /// resolved and unique, one declaration per service) in one transaction, with one audit
    /// entry summarising the diff. Nothing is written when the diff is empty or `dry_run` is
    /// set. O(n log n) in the number of rules.
    pub(crate) fn apply(
        &self,
        desired: Vec<Rule>,
        desired_exports: Vec<ExportDeclaration>,
        actor: &str,
        dry_run: bool,
    ) -> Result<ApplyDiff, AclError> {
        check_unique(&desired, &desired_exports)?;
        let txn = self.db.begin_write()?;
        let diff = {
            let version_before = txn
                .open_table(META)?
                .get(VERSION_KEY)?
                .map_or(0, |v| v.value());
            let mut rules = txn.open_table(RULES)?;
            let mut exports = txn.open_table(EXPORTS)?;
            let current = read_rules(&rules)?;
            let current_exports = read_exports(&exports)?;
            let mut diff = ApplyDiff {
                dry_run,
                added: Vec::new(),
                removed: Vec::new(),
                changed: Vec::new(),
                exports: exports_diff(current_exports, desired_exports),
                version_before,
                version_after: version_before,
                warnings: Vec::new(),
            };
            diff_rules(&mut diff, current, desired);
            if diff.is_empty() || dry_run {
                drop(rules);
                drop(exports);
                txn.abort()?;
                return Ok(diff);
            }
            let version = bump_version(&txn)?;
            write_changes(&mut rules, &mut exports, &diff)?;
            append_audit(
                &txn,
                AuditRecord {
                    actor,
                    op: AuditOp::Apply,
                    rule_id: "",
                    old: None,
                    new: None,
                    summary: Some(ApplySummary::of(&diff)),
                },
                version,
            )?;
            diff.version_after = version;
            diff
        };
        txn.commit()?;
        Ok(diff)
    }

    /// The newest `limit` audit entries, newest first.
    pub(crate) fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>, AclError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(AUDIT)?;
        let mut out = Vec::new();
        for item in table.iter()?.rev().take(limit) {
            let (seq, json) = item?;
            out.push(from_json::<AuditEntry>(
                &format!("audit {}", seq.value()),
                json.value(),
            )?);
        }
        Ok(out)
    }
}

/// Resolves ids for a declarative rule list deterministically, so applying the same file twice
/// yields the same ids: explicit ids are kept, the others get the first free `src-to-dst[-N]`
/// in file order. Specs must already be validated.
pub(crate) fn resolve_ids(specs: Vec<RuleSpec>) -> Result<Vec<Rule>, AclError> {
    let mut taken: HashSet<String> = HashSet::new();
    for spec in &specs {
        if let Some(id) = &spec.id
            && !taken.insert(id.clone())
        {
            return Err(AclError::DuplicateId(id.clone()));
        }
    }
    // Next suffix to try per slug base: a policy of many rules between the same two services
    // would otherwise probe base, base-2, … from the start for each (quadratic). Every
    // candidate below the counter is taken (it was then, and ids are never freed here).
    let mut next_suffix: HashMap<String, u64> = HashMap::new();
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let id = match &spec.id {
            Some(id) => id.clone(),
            None => {
                let base = slug_base(&spec.source, &spec.destination);
                let suffix = next_suffix.entry(base.clone()).or_insert(1);
                let id = loop {
                    let candidate = if *suffix == 1 {
                        base.clone()
                    } else {
                        format!("{base}-{suffix}")
                    };
                    *suffix += 1;
                    if !taken.contains(&candidate) {
                        break candidate;
                    }
                };
                taken.insert(id.clone());
                id
            }
        };
        out.push(Rule::from_valid_spec(spec, id));
    }
    Ok(out)
}

/// Refuses a desired policy that uses a rule id twice or declares a service twice.
fn check_unique(rules: &[Rule], exports: &[ExportDeclaration]) -> Result<(), AclError> {
    let mut seen = HashSet::new();
    for rule in rules {
        if !seen.insert(rule.id.as_str()) {
            return Err(AclError::DuplicateId(rule.id.clone()));
        }
    }
    let mut seen = HashSet::new();
    for declaration in exports {
        if !seen.insert(declaration.service.as_str()) {
            return Err(AclError::DuplicateExport(declaration.service.clone()));
        }
    }
    Ok(())
}

/// Fills the rule half of `diff`: rules of `desired` not in `current` (sorted by id), rules
/// of `current` not in `desired` (in id order), and rules whose content changed.
fn diff_rules(diff: &mut ApplyDiff, mut current: BTreeMap<String, Rule>, desired: Vec<Rule>) {
    for rule in desired {
        match current.remove(&rule.id) {
            None => diff.added.push(rule),
            Some(old) if old != rule => diff.changed.push(RuleChange { old, new: rule }),
            Some(_) => {}
        }
    }
    diff.removed = current.into_values().collect();
    diff.added.sort_by(|a, b| a.id.cmp(&b.id));
}

/// The export declarations to add (sorted by service), remove (in service order) and change
/// to go from `current` to `desired`.
fn exports_diff(
    mut current: BTreeMap<String, ExportDeclaration>,
    desired: Vec<ExportDeclaration>,
) -> ExportsDiff {
    let mut diff = ExportsDiff::default();
    for declaration in desired {
        match current.remove(&declaration.service) {
            None => diff.added.push(declaration),
            Some(old) if old != declaration => diff.changed.push(ExportChange {
                old,
                new: declaration,
            }),
            Some(_) => {}
        }
    }
    diff.removed = current.into_values().collect();
    diff.added.sort_by(|a, b| a.service.cmp(&b.service));
    diff
}

/// Writes `diff` into the rule and export tables of an open write transaction.
fn write_changes(
    rules: &mut redb::Table<&str, &str>,
    exports: &mut redb::Table<&str, &str>,
    diff: &ApplyDiff,
) -> Result<(), AclError> {
    for rule in &diff.added {
        rules.insert(rule.id.as_str(), to_json(rule)?.as_str())?;
    }
    for change in &diff.changed {
        rules.insert(change.new.id.as_str(), to_json(&change.new)?.as_str())?;
    }
    for declaration in &diff.exports.added {
        exports.insert(declaration.service.as_str(), to_json(declaration)?.as_str())?;
    }
    for change in &diff.exports.changed {
        exports.insert(change.new.service.as_str(), to_json(&change.new)?.as_str())?;
    }
    for declaration in &diff.exports.removed {
        exports.remove(declaration.service.as_str())?;
    }
    for rule in &diff.removed {
        rules.remove(rule.id.as_str())?;
    }
    Ok(())
}

fn read_rules(
    table: &impl ReadableTable<&'static str, &'static str>,
) -> Result<BTreeMap<String, Rule>, AclError> {
    let mut out = BTreeMap::new();
    for item in table.iter()? {
        let (id, json) = item?;
        let rule: Rule = from_json(id.value(), json.value())?;
        out.insert(id.value().to_string(), rule);
    }
    Ok(out)
}

/// Creates `path` empty with mode 0600 if it is missing (redb initialises an empty file),
/// and takes group and other permissions away from an existing one.
fn restrict_to_owner(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let mode = file.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o700))?;
    }
    Ok(())
}

fn read_exports(
    table: &impl ReadableTable<&'static str, &'static str>,
) -> Result<BTreeMap<String, ExportDeclaration>, AclError> {
    let mut out = BTreeMap::new();
    for item in table.iter()? {
        let (service, json) = item?;
        let declaration: ExportDeclaration = from_json(service.value(), json.value())?;
        out.insert(service.value().to_string(), declaration);
    }
    Ok(out)
}

fn bump_version(txn: &redb::WriteTransaction) -> Result<u64, AclError> {
    let mut meta = txn.open_table(META)?;
    let next = meta.get(VERSION_KEY)?.map_or(0, |v| v.value()) + 1;
    meta.insert(VERSION_KEY, next)?;
    Ok(next)
}

/// What one audit entry says, before it gets its sequence number and time.
struct AuditRecord<'a> {
    actor: &'a str,
    op: AuditOp,
    rule_id: &'a str,
    old: Option<&'a Rule>,
    new: Option<&'a Rule>,
    summary: Option<ApplySummary>,
}

fn append_audit(
    txn: &redb::WriteTransaction,
    record: AuditRecord<'_>,
    version: u64,
) -> Result<(), AclError> {
    let mut audit = txn.open_table(AUDIT)?;
    let seq = audit.last()?.map_or(0, |(k, _)| k.value()) + 1;
    let entry = AuditEntry {
        seq,
        time: OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_else(|_| "unknown".into()),
        actor: record.actor.to_string(),
        op: record.op,
        rule_id: record.rule_id.to_string(),
        old: record.old.cloned(),
        new: record.new.cloned(),
        version,
        summary: record.summary,
    };
    audit.insert(seq, to_json(&entry)?.as_str())?;
    Ok(())
}

fn to_json<T: Serialize>(value: &T) -> Result<String, AclError> {
    serde_json::to_string(value).map_err(|e| AclError::Corrupt {
        key: "(encoding)".into(),
        message: e.to_string(),
    })
}

fn from_json<T: for<'de> Deserialize<'de>>(key: &str, json: &str) -> Result<T, AclError> {
    serde_json::from_str(json).map_err(|e| AclError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    use super::*;

    #[test]
    fn the_database_is_private_to_its_owner() -> Result<(), Box<dyn std::error::Error>> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("hybridge.redb");
        drop(AclStore::open(&path)?);
        let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode(&path)?, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        let store = AclStore::open(&path)?;
        assert_eq!(
            mode(&path)?,
            0o600,
            "an existing world-readable file is narrowed"
        );
        assert_eq!(store.load()?.version, 0);
        Ok(())
    }
    use crate::acl::model::Action;

    fn spec(id: Option<&str>, src: &str, dst: &str, action: Action) -> RuleSpec {
        RuleSpec {
            id: id.map(String::from),
            source: src.into(),
            source_site: None,
            destination: dst.into(),
            action,
            methods: None,
            path_prefix: None,
            description: None,
        }
    }

    /// Two large policies that differ in every way apply can differ: adds, changes, removes.
    fn crash_policy(which: u64) -> Vec<Rule> {
        let specs: Vec<RuleSpec> = if which.is_multiple_of(2) {
            (0..300)
                .map(|n| {
                    spec(
                        Some(&format!("a-{n}")),
                        &format!("svc-{n}"),
                        "billing",
                        Action::Allow,
                    )
                })
                .collect()
        } else {
            (0..150)
                .map(|n| {
                    spec(
                        Some(&format!("a-{n}")),
                        &format!("svc-{n}"),
                        "billing",
                        Action::Deny,
                    )
                })
                .chain((150..300).map(|n| {
                    spec(
                        Some(&format!("b-{n}")),
                        "*",
                        &format!("svc-{n}"),
                        Action::Allow,
                    )
                }))
                .collect()
        };
        resolve_ids(specs).unwrap_or_default()
    }

    const CHILD_ENV: &str = "HYBRIDGE_ACL_CHILD";
    const CHILD_DB_ENV: &str = "HYBRIDGE_ACL_CHILD_DB";

    /// Child mode of `killed_writer_leaves_one_whole_policy`; a no-op in a normal test run.
    #[test]
    fn crash_child() -> Result<(), AclError> {
        if std::env::var(CHILD_ENV).as_deref() != Ok("1") {
            return Ok(());
        }
        let Ok(path) = std::env::var(CHILD_DB_ENV) else {
            return Ok(());
        };
        let store = AclStore::open(Path::new(&path))?;
        for i in 0u64.. {
            store.apply(crash_policy(i), Vec::new(), "crash-child", false)?;
            println!("applied {i}");
        }
        Ok(())
    }

    #[test]
    fn killed_writer_leaves_one_whole_policy() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("hybridge.redb");
        let mut child = Command::new(std::env::current_exe()?)
            .args([
                "--exact",
                "acl::store::tests::crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .env(CHILD_DB_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("child stdout")?;
        let mut applied = 0;
        let mut lines = BufReader::new(stdout).lines();
        while applied < 5 {
            let line = lines.next().ok_or("child exited early")??;
            if line.starts_with("applied ") {
                applied += 1;
            }
        }
        // While the child holds the file, opening it names the problem.
        let err = AclStore::open(&path).err().map(|e| e.to_string());
        assert_eq!(
            err,
            Some(format!(
                "acl database {} is in use by a running hybridge (use --admin to talk to it)",
                path.display()
            ))
        );
        child.kill()?; // SIGKILL: no destructors, no clean shutdown.
        child.wait()?;
        drop(lines);

        let store = AclStore::open(&path)?;
        let loaded = store.load()?;
        let (version, mut stored) = (loaded.version, loaded.rules);
        stored.sort_by(|a, b| a.id.cmp(&b.id));
        let matches_one = [crash_policy(0), crash_policy(1)].into_iter().any(|mut p| {
            p.sort_by(|a, b| a.id.cmp(&b.id));
            p == stored
        });
        assert!(matches_one, "rule set is a mix of both policies");
        assert!(version >= 5, "version {version}");
        // Version and audit agree: every version 1..=version has entries, none beyond.
        let audit = store.audit(usize::MAX)?;
        assert_eq!(audit.first().map(|e| e.version), Some(version));
        let versions: std::collections::BTreeSet<u64> = audit.iter().map(|e| e.version).collect();
        assert_eq!(versions, (1..=version).collect());
        assert_eq!(audit.len() as u64, audit.first().map_or(0, |e| e.seq));
        Ok(())
    }

    fn version(store: &AclStore) -> u64 {
        store.load().map(|p| p.version).unwrap_or(u64::MAX)
    }

    #[test]
    fn changes_bump_version_once_and_are_audited() -> Result<(), AclError> {
        let dir = tempfile::tempdir().map_err(redb::StorageError::from)?;
        let path = dir.path().join("hybridge.redb");
        let store = AclStore::open(&path)?;
        assert_eq!(version(&store), 0);

        let (rule, v) = store.add(spec(None, "web", "billing", Action::Allow), "alice")?;
        assert_eq!((rule.id.as_str(), v), ("web-to-billing", 1));
        let (rule2, v) = store.add(spec(None, "web", "billing", Action::Deny), "alice")?;
        assert_eq!((rule2.id.as_str(), v), ("web-to-billing-2", 2));
        assert!(matches!(
            store.add(
                spec(Some("web-to-billing"), "a", "b", Action::Allow),
                "alice"
            ),
            Err(AclError::DuplicateId(_))
        ));
        assert_eq!(version(&store), 2);
        let (removed, v) = store.remove("web-to-billing-2", "bob")?;
        assert_eq!((removed, v), (rule2.clone(), 3));
        assert!(matches!(
            store.remove("nope", "bob"),
            Err(AclError::NotFound(_))
        ));

        // Apply: one version step for the whole diff.
        let mut changed = rule.clone();
        changed.action = Action::Deny;
        let desired = vec![
            changed.clone(),
            Rule::from_valid_spec(
                spec(None, "*", "payments-admin", Action::Deny),
                "no-admin".into(),
            ),
        ];
        let dry = store.apply(desired.clone(), Vec::new(), "ci", true)?;
        assert_eq!(
            (dry.added.len(), dry.changed.len(), dry.removed.len()),
            (1, 1, 0)
        );
        assert_eq!((dry.version_before, dry.version_after), (3, 3));
        assert_eq!(version(&store), 3, "dry run changes nothing");
        assert_eq!(store.load()?.rules, vec![rule.clone()]);

        let diff = store.apply(desired.clone(), Vec::new(), "ci", false)?;
        assert_eq!((diff.version_before, diff.version_after), (3, 4));
        assert_eq!(
            diff.changed,
            vec![RuleChange {
                old: rule.clone(),
                new: changed.clone()
            }]
        );
        let again = store.apply(desired.clone(), Vec::new(), "ci", false)?;
        assert!(again.is_empty());
        assert_eq!((again.version_after, version(&store)), (4, 4));

        let removal = store.apply(vec![changed.clone()], Vec::new(), "ci", false)?;
        assert_eq!(removal.removed.len(), 1);
        assert_eq!(version(&store), 5);

        let log = store.audit(100)?;
        let summary: Vec<_> = log
            .iter()
            .map(|e| (e.seq, e.op, e.rule_id.as_str(), e.version, e.actor.as_str()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (5, AuditOp::Apply, "", 5, "ci"),
                (4, AuditOp::Apply, "", 4, "ci"),
                (3, AuditOp::Remove, "web-to-billing-2", 3, "bob"),
                (2, AuditOp::Add, "web-to-billing-2", 2, "alice"),
                (1, AuditOp::Add, "web-to-billing", 1, "alice"),
            ]
        );
        assert_eq!(
            log[1].summary,
            Some(ApplySummary {
                added: 1,
                changed: 1,
                removed: 0,
                added_ids: vec!["no-admin".into()],
                changed_ids: vec!["web-to-billing".into()],
                removed_ids: vec![],
                ..ApplySummary::default()
            })
        );
        assert_eq!(
            log[0]
                .summary
                .as_ref()
                .map(|s| (s.removed, s.removed_ids.clone())),
            Some((1, vec!["no-admin".to_string()]))
        );
        assert_eq!(
            (log[2].old.as_ref(), log[2].new.as_ref()),
            (Some(&rule2), None)
        );
        assert_eq!(log[2].summary, None);
        assert!(time::OffsetDateTime::parse(&log[0].time, &Rfc3339).is_ok());
        assert_eq!(store.audit(2)?.len(), 2);
        drop(store);

        // Re-open: everything is still there.
        let store = AclStore::open(&path)?;
        assert_eq!(version(&store), 5);
        assert_eq!(store.load()?.rules, vec![changed]);
        assert_eq!(store.audit(100)?.len(), 5);
        Ok(())
    }

    #[test]
    fn a_large_apply_is_one_bounded_audit_entry() -> Result<(), AclError> {
        let dir = tempfile::tempdir().map_err(redb::StorageError::from)?;
        let store = AclStore::open(&dir.path().join("hybridge.redb"))?;
        let policy = |n: usize, action: Action| {
            (0..n)
                .map(|i| {
                    spec(
                        Some(&format!("r{i:05}")),
                        &format!("svc-{i}"),
                        "billing",
                        action,
                    )
                })
                .collect::<Vec<_>>()
        };
        let diff = store.apply(
            resolve_ids(policy(10_000, Action::Allow))?,
            Vec::new(),
            "uid:0(root)",
            false,
        )?;
        assert_eq!((diff.added.len(), diff.version_after), (10_000, 1));
        // Half changed, half removed, 300 added.
        let mut next = policy(5_000, Action::Deny);
        next.extend((0..300).map(|i| spec(Some(&format!("new{i:03}")), "web", "x", Action::Allow)));
        store.apply(
            resolve_ids(next)?,
            Vec::new(),
            "spiffe://td/admin/alice",
            false,
        )?;
        let log = store.audit(10)?;
        assert_eq!(log.len(), 2);
        let summary = log[0].summary.clone().unwrap_or_default();
        assert_eq!(
            (summary.added, summary.changed, summary.removed),
            (300, 5_000, 5_000)
        );
        assert_eq!(log[0].actor, "spiffe://td/admin/alice");
        for ids in [
            &summary.added_ids,
            &summary.changed_ids,
            &summary.removed_ids,
        ] {
            assert_eq!(ids.len(), AUDIT_IDS_PER_KIND);
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        }
        assert_eq!(summary.changed_ids[0], "r00000");
        assert_eq!(summary.removed_ids[0], "r05000");
        assert_eq!(summary.added_ids[0], "new000");
        let encoded = serde_json::to_string(&log[0]).unwrap_or_default();
        assert!(encoded.len() < 16 * 1024, "{} bytes", encoded.len());
        Ok(())
    }

    #[test]
    fn generated_ids_skip_explicit_ones_without_rescanning() -> Result<(), AclError> {
        let mut specs = vec![spec(Some("a-to-b-3"), "x", "y", Action::Allow)];
        specs.extend((0..4).map(|_| spec(None, "a", "b", Action::Allow)));
        specs.push(spec(None, "*", "b", Action::Deny));
        let ids: Vec<String> = resolve_ids(specs)?.into_iter().map(|r| r.id).collect();
        assert_eq!(
            ids,
            [
                "a-to-b-3", "a-to-b", "a-to-b-2", "a-to-b-4", "a-to-b-5", "any-to-b"
            ]
        );
        // Many rules between one pair of services: linear, ids in order.
        let many = resolve_ids(
            (0..20_000)
                .map(|_| spec(None, "a", "b", Action::Allow))
                .collect(),
        )?;
        assert_eq!(many[19_999].id, "a-to-b-20000");
        Ok(())
    }
}
