//! Benchmarks `AclSnapshot::decide` at 10 and 10,000 rules: the decision must cost a few hash
//! lookups whatever the rule count. Measures only the in-memory snapshot, never redb.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use hybridge::acl::{AclService, AclSnapshot, Action, PolicySpec, Rule, RuleSpec};

/// `n` rules spread over `n / 5` destinations, each with exact, wildcard and L7 rules, so the
/// benchmarked destination has a realistic bucket and the rest only add index size.
fn policy(n: usize) -> Vec<Rule> {
    (0..n)
        .map(|i| {
            let destination = format!("svc-{}", i / 5);
            let (source, methods, path_prefix, action) = match i % 5 {
                0 => (format!("caller-{i}"), None, None, Action::Allow),
                1 => (
                    "web".to_string(),
                    Some(vec!["GET".to_string()]),
                    Some("/api/".to_string()),
                    Action::Allow,
                ),
                2 => (
                    "web".to_string(),
                    None,
                    Some("/api/internal/".to_string()),
                    Action::Deny,
                ),
                3 => ("*".to_string(), None, None, Action::Deny),
                _ => (
                    format!("caller-{i}"),
                    Some(vec!["POST".to_string()]),
                    None,
                    Action::Allow,
                ),
            };
            Rule {
                id: format!("rule-{i}"),
                source,
                source_site: None,
                destination,
                action,
                methods,
                path_prefix,
                description: String::new(),
            }
        })
        .collect()
}

fn decide(c: &mut Criterion) {
    let mut group = c.benchmark_group("acl_decide");
    for n in [10usize, 10_000] {
        let snapshot = AclSnapshot::new(1, policy(n), Vec::new());
        group.bench_function(format!("{n}_rules_allow_l7"), |b| {
            b.iter(|| {
                black_box(&snapshot).decide(
                    "dc1",
                    black_box("web"),
                    black_box("svc-1"),
                    "GET",
                    "/api/invoices",
                )
            })
        });
        group.bench_function(format!("{n}_rules_wildcard_deny"), |b| {
            b.iter(|| {
                black_box(&snapshot).decide(
                    "dc1",
                    black_box("cron"),
                    black_box("svc-1"),
                    "GET",
                    "/",
                )
            })
        });
        group.bench_function(format!("{n}_rules_default_deny"), |b| {
            b.iter(|| {
                black_box(&snapshot).decide(
                    "dc1",
                    black_box("cron"),
                    black_box("unknown"),
                    "GET",
                    "/",
                )
            })
        });
    }
    group.finish();
}

/// The full request-path call: snapshot load through `ArcSwap`, decision and counters.
fn service_decide(c: &mut Criterion) {
    let Ok(dir) = tempfile::tempdir() else { return };
    let Ok(service) = AclService::open(&dir.path().join("hybridge.redb")) else {
        return;
    };
    let rules: Vec<RuleSpec> = policy(10_000).into_iter().map(|r| r.to_spec()).collect();
    let policy = PolicySpec {
        rules,
        exports: Vec::new(),
    };
    if service.apply(policy, "bench", false).is_err() {
        return;
    }
    c.bench_function("acl_service_decide/10000_rules_allow_l7", |b| {
        b.iter(|| {
            service.decide(
                "dc1",
                black_box("web"),
                black_box("svc-1"),
                "GET",
                "/api/invoices",
            )
        })
    });
}

criterion_group!(benches, decide, service_decide);
criterion_main!(benches);
