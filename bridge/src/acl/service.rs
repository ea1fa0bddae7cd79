//! `AclService`: the one object the node shares. It owns the store, swaps in a fresh
//! `AclSnapshot` after every commit, and counts decisions; the request path reads only the
//! snapshot (no redb, no lock). It must not parse files or speak HTTP.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use arc_swap::ArcSwap;

use super::denylog::DenyLogLimiter;
use super::error::AclError;
use super::model::{Action, ExportDeclaration, PolicySpec, Rule, RuleSpec};
use super::snapshot::{AclSnapshot, Decision, Explanation};
use super::store::{AclStore, ApplyDiff, AuditEntry, resolve_ids};
use crate::metrics::UNKNOWN_SERVICE;

type CounterMap = HashMap<Arc<str>, Arc<[AtomicU64; 2]>>;

/// Allow/deny counters: a pair per destination the node is configured with or its policy
/// names, and one pair shared by every other name a request carries ([`UNKNOWN_SERVICE`]),
/// so a caller or peer sending made-up names adds no series. Reads and increments are
/// lock-free; a newly counted destination copies the map under a mutex (rare, and bounded by
/// what operators configure).
struct DecisionCounters {
    map: ArcSwap<CounterMap>,
    unknown: [AtomicU64; 2],
    insert_lock: Mutex<()>,
}

impl Default for DecisionCounters {
    fn default() -> Self {
        Self {
            map: ArcSwap::from_pointee(HashMap::new()),
            unknown: [AtomicU64::new(0), AtomicU64::new(0)],
            insert_lock: Mutex::new(()),
        }
    }
}

fn slot(action: Action) -> usize {
    match action {
        Action::Allow => 0,
        Action::Deny => 1,
    }
}

impl DecisionCounters {
    /// Counts a decision; `named` says whether the policy deciding it names the destination
    /// (asked only for a destination not counted yet).
    fn record(&self, destination: &str, action: Action, named: impl FnOnce() -> bool) {
        if let Some(counters) = self.map.load().get(destination) {
            counters[slot(action)].fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !named() {
            self.unknown[slot(action)].fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.add([destination]);
        match self.map.load().get(destination) {
            Some(counters) => counters[slot(action)].fetch_add(1, Ordering::Relaxed),
            None => self.unknown[slot(action)].fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Counts `destinations` under their own names from now on.
    fn add<'a>(&self, destinations: impl IntoIterator<Item = &'a str>) {
        let _guard = lock(&self.insert_lock);
        let current = self.map.load_full();
        let new: Vec<&str> = destinations
            .into_iter()
            .filter(|d| !current.contains_key(*d))
            .collect();
        if new.is_empty() {
            return;
        }
        let mut next = (*current).clone();
        for destination in new {
            next.entry(Arc::from(destination))
                .or_insert_with(|| Arc::new([AtomicU64::new(0), AtomicU64::new(0)]));
        }
        self.map.store(Arc::new(next));
    }

    fn snapshot(&self) -> Vec<((String, Action), u64)> {
        let mut out = Vec::new();
        let counted = self.map.load();
        let pairs = counted
            .iter()
            .map(|(destination, counters)| (destination.to_string(), &counters[..]))
            .chain([(UNKNOWN_SERVICE.to_owned(), &self.unknown[..])]);
        for (destination, counters) in pairs {
            for action in [Action::Allow, Action::Deny] {
                out.push((
                    (destination.clone(), action),
                    counters[slot(action)].load(Ordering::Relaxed),
                ));
            }
        }
        out.sort();
        out
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// The node's ACL subsystem: durable store, current snapshot, decision counters.
pub struct AclService {
    store: AclStore,
    current: ArcSwap<AclSnapshot>,
    /// Serialises commit + snapshot swap so snapshots never go back in version.
    write_lock: Mutex<()>,
    counters: DecisionCounters,
    deny_log: DenyLogLimiter,
    known_services: Mutex<Option<KnownServices>>,
    /// The version of the snapshot in force, for whoever must act on a change (peers are
    /// told the new digest).
    changes: tokio::sync::watch::Sender<u64>,
}

impl AclService {
    /// Opens (or creates) the redb file at `path`. A file held by a running daemon fails with
    /// [`AclError::InUse`].
    pub fn open(path: &Path) -> Result<Arc<Self>, AclError> {
        AclService::with_store(AclStore::open(path)?)
    }

    fn with_store(store: AclStore) -> Result<Arc<Self>, AclError> {
        let stored = store.load()?;
        Ok(Arc::new(AclService {
            store,
            current: ArcSwap::from_pointee(AclSnapshot::new(
                stored.version,
                stored.rules,
                stored.exports,
            )),
            write_lock: Mutex::new(()),
            counters: DecisionCounters::default(),
            deny_log: DenyLogLimiter::default(),
            known_services: Mutex::new(None),
            changes: tokio::sync::watch::channel(stored.version).0,
        }))
    }

    /// The policy's identity (see [`AclSnapshot::digest`]).
    pub fn digest(&self) -> String {
        self.current.load().digest().to_owned()
    }

    /// Sees the policy version change after every committed change.
    pub(crate) fn subscribe_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The current snapshot; an `Arc` clone.
    pub(crate) fn snapshot(&self) -> Arc<AclSnapshot> {
        self.current.load_full()
    }

    /// Decides a request from `source` vouched for by a node of `site` against the current
    /// snapshot, counts it per (destination, action) and logs denies at most once per
    /// (source, destination, rule) per minute.
    pub fn decide(
        &self,
        site: &str,
        source: &str,
        destination: &str,
        method: &str,
        path: &str,
    ) -> Decision {
        let snapshot = self.current.load();
        let decision = snapshot.decide(site, source, destination, method, path);
        self.counters.record(destination, decision.action, || {
            snapshot.names_destination(destination)
        });
        if !decision.allowed()
            && let Some(suppressed) =
                self.deny_log
                    .check(source, destination, decision.rule_label(), Instant::now())
        {
            tracing::info!(
                source,
                source_site = site,
                destination,
                method,
                path,
                rule = decision.rule_label(),
                suppressed_since_last = suppressed,
                "acl denied request"
            );
        }
        decision
    }

    /// Service names `apply` should know, as sources and destinations; others are accepted
    /// with a warning. `None` turns the check off (the default).
    #[cfg(test)]
    pub(crate) fn set_known_services(&self, services: Option<Vec<String>>) {
        *lock(&self.known_services) = services.map(|names| KnownServices {
            names: Arc::new(move || names.clone()),
            check_sources: true,
        });
    }

    /// Like `set_known_services` (unit tests only), but the names are computed at each `apply`
    /// (a running node knows its own exports and its peers' current ones) and only
    /// destinations are checked: a source is any holder of a service certificate, which no
    /// node can enumerate.
    pub(crate) fn set_known_destinations(&self, names: Arc<dyn Fn() -> Vec<String> + Send + Sync>) {
        *lock(&self.known_services) = Some(KnownServices {
            names,
            check_sources: false,
        });
    }

    /// Adds one rule (id generated as `src-to-dst[-N]` when absent).
    pub fn add(&self, rule: RuleSpec, actor: &str) -> Result<Rule, AclError> {
        let spec = validate(rule, 1)?;
        let _guard = lock(&self.write_lock);
        let (rule, _version) = self.store.add(spec, actor)?;
        self.reload_locked()?;
        Ok(rule)
    }

    /// Removes a rule by id and returns it.
    pub(crate) fn remove(&self, id: &str, actor: &str) -> Result<Rule, AclError> {
        let _guard = lock(&self.write_lock);
        let (rule, _version) = self.store.remove(id, actor)?;
        self.reload_locked()?;
        Ok(rule)
    }

    /// Makes the stored rules equal `rules` in one transaction (one version step), or with
    /// `dry_run` only reports the diff. Applying the same list twice gives an empty diff and
    /// no version change. Warns about service names outside the known ones
    /// ([`AclService::set_known_destinations`]).
    pub fn apply(
        &self,
        policy: PolicySpec,
        actor: &str,
        dry_run: bool,
    ) -> Result<ApplyDiff, AclError> {
        let exports = policy
            .exports
            .into_iter()
            .enumerate()
            .map(|(i, declaration)| {
                declaration.validate().map_err(|e| AclError::InvalidExport {
                    index: i + 1,
                    field: e.field,
                    message: e.message,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let specs = policy
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, spec)| validate(spec, i + 1))
            .collect::<Result<Vec<_>, _>>()?;
        let desired = resolve_ids(specs)?;
        let mut warnings = self.unknown_service_warnings(&desired);
        warnings.extend(site_warnings(&desired));
        let _guard = lock(&self.write_lock);
        let mut diff = self.store.apply(desired, exports, actor, dry_run)?;
        diff.warnings = warnings;
        if diff.version_after != diff.version_before {
            self.reload_locked()?;
        }
        Ok(diff)
    }

    /// Every rule, sorted by id (from the snapshot).
    pub fn list(&self) -> Vec<Rule> {
        self.current.load().rules().to_vec()
    }

    /// Every export declaration, sorted by service (from the snapshot).
    pub(crate) fn exports(&self) -> Vec<ExportDeclaration> {
        self.current.load().exports()
    }

    /// Whether a node of `site` may serve `service` by the policy's export declarations
    /// (`None`: the policy does not declare the service).
    pub fn may_serve(&self, service: &str, site: &str) -> Option<bool> {
        self.current.load().may_serve(service, site)
    }

    /// The newest `limit` audit entries, newest first.
    pub fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>, AclError> {
        self.store.audit(limit)
    }

    /// The policy version of the current snapshot.
    pub fn version(&self) -> u64 {
        self.current.load().version()
    }

    /// The decision with its reasoning (see [`AclSnapshot::explain`]). Not counted.
    pub fn explain(
        &self,
        site: Option<&str>,
        source: &str,
        destination: &str,
        method: Option<&str>,
        path: Option<&str>,
    ) -> Explanation {
        self.current
            .load()
            .explain(site, source, destination, method, path)
    }

    /// Counts decisions on `destinations` (the node's configured imports and exports) under
    /// their own names; others are counted under their name only while a policy names them,
    /// and under [`UNKNOWN_SERVICE`] otherwise.
    pub(crate) fn count_destinations<'a>(&self, destinations: impl IntoIterator<Item = &'a str>) {
        self.counters.add(destinations);
    }

    /// Decisions so far per (destination, action), sorted, for `/metrics`.
    pub(crate) fn decision_counts(&self) -> Vec<((String, Action), u64)> {
        self.counters.snapshot()
    }

    fn reload_locked(&self) -> Result<(), AclError> {
        let stored = self.store.load()?;
        let version = stored.version;
        self.current.store(Arc::new(AclSnapshot::new(
            stored.version,
            stored.rules,
            stored.exports,
        )));
        self.changes.send_replace(version);
        Ok(())
    }

    fn unknown_service_warnings(&self, rules: &[Rule]) -> Vec<String> {
        let Some(known) = lock(&self.known_services).clone() else {
            return Vec::new();
        };
        let names = (known.names)();
        let mut unknown = BTreeSet::new();
        for rule in rules {
            let fields = [
                ("source", &rule.source, known.check_sources),
                ("destination", &rule.destination, true),
            ];
            for (field, name, _) in fields.into_iter().filter(|f| f.2) {
                if name != "*" && !names.iter().any(|k| k == name) {
                    unknown.insert(format!(
                        "rule {}: {field} {name:?} is not a known service",
                        rule.id
                    ));
                }
            }
        }
        unknown.into_iter().collect()
    }
}

/// At most this many warnings of one kind are listed; the rest are counted.
const MAX_WARNINGS_PER_KIND: usize = 20;

/// Warnings about callers that are not bound to sites, for `apply`:
/// - an allow naming a source with no `source_site` lets a node of any connected site call
///   as that source;
/// - a deny without `source_site` is outranked by a site-bound allow for the same source and
///   destination (site-bound is more specific), so it no longer applies to that site's
///   callers: give the deny the same `source_site`.
fn site_warnings(rules: &[Rule]) -> Vec<String> {
    let mut unbound = Vec::new();
    let mut shadowed = Vec::new();
    for rule in rules {
        if rule.source_site.is_some() || rule.source == "*" {
            continue;
        }
        match rule.action {
            Action::Allow => unbound.push(format!(
                "rule {}: allows {} from any site; add source_site so a node of another site cannot call as {}",
                rule.id, rule.source, rule.source
            )),
            Action::Deny => {
                for allow in rules.iter().filter(|a| {
                    a.action == Action::Allow
                        && a.source == rule.source
                        && a.destination == rule.destination
                        && a.source_site.is_some()
                }) {
                    shadowed.push(format!(
                        "rule {}: this deny does not apply to callers from {} — site-bound rule {} outranks it; give it source_site too",
                        rule.id,
                        allow.source_site.as_deref().unwrap_or_default().join(","),
                        allow.id
                    ));
                }
            }
        }
    }
    let mut out = Vec::new();
    for list in [shadowed, unbound] {
        let more = list.len().saturating_sub(MAX_WARNINGS_PER_KIND);
        out.extend(list.into_iter().take(MAX_WARNINGS_PER_KIND));
        if more > 0 {
            out.push(format!("… and {more} more like the one above"));
        }
    }
    out
}

/// Where `apply` learns which service names exist, for its warnings.
#[derive(Clone)]
struct KnownServices {
    names: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
    check_sources: bool,
}

fn validate(spec: RuleSpec, index: usize) -> Result<RuleSpec, AclError> {
    spec.validate().map_err(|e| AclError::InvalidRule {
        index,
        field: e.field,
        message: e.message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::file::parse_acl_file;

    const POLICY: &str = r#"
[[rule]]
source = "web"
source_site = "dc1"
destination = "billing"
action = "allow"
methods = ["GET"]
path_prefix = "/api"

[[rule]]
id = "no-admin"
source = "*"
destination = "payments-admin"
action = "deny"
"#;

    fn open() -> Result<(tempfile::TempDir, Arc<AclService>), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let svc = AclService::open(&dir.path().join("hybridge.redb"))?;
        Ok((dir, svc))
    }

    #[test]
    fn second_open_in_process_is_in_use() -> Result<(), Box<dyn std::error::Error>> {
        let (dir, _svc) = open()?;
        let path = dir.path().join("hybridge.redb");
        let err = AclService::open(&path).err().map(|e| e.to_string());
        assert_eq!(
            err,
            Some(format!(
                "acl database {} is in use by a running hybridge (use --admin to talk to it)",
                path.display()
            ))
        );
        Ok(())
    }

    #[test]
    fn snapshot_follows_commits_and_decisions_are_counted() -> Result<(), Box<dyn std::error::Error>>
    {
        let (_dir, svc) = open()?;
        assert_eq!(
            svc.decide("dc1", "web", "billing", "GET", "/api/x")
                .rule_label(),
            "default-deny"
        );
        let specs = parse_acl_file(Path::new("acl.toml"), POLICY)?;
        let diff = svc.apply(specs.clone(), "test", false)?;
        assert_eq!((diff.added.len(), diff.version_after), (2, 1));
        let before = svc.snapshot();
        assert_eq!(before.version(), 1);
        let d = svc.decide("dc1", "web", "billing", "GET", "/api/x");
        assert!(d.allowed());
        assert_eq!(d.rule_label(), "web-to-billing");
        assert_eq!(
            svc.decide("dc1", "web", "payments-admin", "GET", "/")
                .rule_label(),
            "no-admin"
        );
        assert_eq!(
            svc.decide("dc1", "web", "billing", "POST", "/api/x")
                .rule_label(),
            "default-deny"
        );

        let again = svc.apply(specs, "test", false)?;
        assert!(again.is_empty());
        assert_eq!(svc.version(), 1);

        svc.remove("no-admin", "test")?;
        assert_eq!(svc.version(), 2);
        assert_eq!(before.version(), 1, "old snapshots are immutable");
        assert_eq!(svc.list().len(), 1);
        // The first decision came before any policy named `billing`: counted as unknown.
        assert_eq!(
            svc.decision_counts(),
            vec![
                (("billing".to_string(), Action::Allow), 1),
                (("billing".to_string(), Action::Deny), 1),
                (("payments-admin".to_string(), Action::Allow), 0),
                (("payments-admin".to_string(), Action::Deny), 1),
                (("unknown".to_string(), Action::Allow), 0),
                (("unknown".to_string(), Action::Deny), 1),
            ]
        );
        Ok(())
    }

    #[test]
    fn apply_warns_about_unknown_services_and_rejects_bad_rules()
    -> Result<(), Box<dyn std::error::Error>> {
        let (_dir, svc) = open()?;
        svc.set_known_services(Some(vec!["web".into(), "billing".into()]));
        let specs = parse_acl_file(Path::new("acl.toml"), POLICY)?;
        let diff = svc.apply(specs.clone(), "test", true)?;
        assert_eq!(
            diff.warnings,
            vec![
                "rule no-admin: destination \"payments-admin\" is not a known service".to_string()
            ]
        );
        assert_eq!(svc.version(), 0);
        let mut bad = specs;
        bad.rules[1].path_prefix = Some("nope".into());
        let err = svc.apply(bad, "test", false).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("rule 2: field `path_prefix`: path prefix \"nope\" must start with '/'")
        );
        assert_eq!(svc.version(), 0);
        Ok(())
    }

    #[test]
    fn apply_warns_about_callers_not_bound_to_sites() -> Result<(), Box<dyn std::error::Error>> {
        let (_dir, svc) = open()?;
        let text = r#"
[[rule]]
id = "web-any-site"
source = "web"
destination = "billing"
action = "allow"

[[rule]]
id = "web-aws"
source = "web"
source_site = "aws"
destination = "billing"
action = "allow"

[[rule]]
id = "no-internal"
source = "web"
destination = "billing"
action = "deny"
path_prefix = "/internal"
"#;
        let policy = parse_acl_file(Path::new("acl.toml"), text)?;
        let diff = svc.apply(policy, "test", true)?;
        assert_eq!(
            diff.warnings,
            vec![
                "rule no-internal: this deny does not apply to callers from aws — site-bound rule web-aws outranks it; give it source_site too".to_string(),
                "rule web-any-site: allows web from any site; add source_site so a node of another site cannot call as web".to_string(),
            ]
        );
        Ok(())
    }

    #[test]
    fn destinations_neither_configured_nor_named_share_one_pair() {
        let counters = DecisionCounters::default();
        counters.add(["inventory"]);
        for i in 0..1_000 {
            counters.record(&format!("svc-{i}"), Action::Deny, || false);
        }
        counters.record("a\"b", Action::Allow, || false);
        counters.record("inventory", Action::Allow, || false);
        counters.record("ledger", Action::Allow, || true);
        assert_eq!(
            counters.snapshot(),
            vec![
                (("inventory".to_string(), Action::Allow), 1),
                (("inventory".to_string(), Action::Deny), 0),
                (("ledger".to_string(), Action::Allow), 1),
                (("ledger".to_string(), Action::Deny), 0),
                ((UNKNOWN_SERVICE.to_string(), Action::Allow), 1),
                ((UNKNOWN_SERVICE.to_string(), Action::Deny), 1_000),
            ]
        );
    }
}
