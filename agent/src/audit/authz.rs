//! AuthorizationPolicy checks: invalid policies, L7 fields, ALLOW rules
//! open to any source, policies selecting no workload, shadowed rules.
//!
//! The shadow check is a sound subset test (it never reports a rule that
//! is not covered; it may miss some that are): rule A is shadowed by rule B
//! of the same action, namespace and selector when every source of A lies
//! within one source of B (each positive list of B empty, or covering each
//! entry of A's list; each negative list of B also in A), every operation
//! of A within one of B (ports, notPorts), and every `when` condition of B
//! also a condition of A. String patterns cover by `*`, prefix and suffix;
//! IP blocks by containment; principals by pattern when both are written
//! with the same trust domain.

#![forbid(unsafe_code)]

use super::{Finding, Kind, Severity};
use crate::policy::model::{
    Action, AuthorizationPolicy, Cidr, Condition, Operation, Principal, Rule, Source, StrMatch,
};
use crate::state::Snapshot;

fn object(p: &AuthorizationPolicy) -> String {
    format!("AuthorizationPolicy {}", p.meta.key())
}

/// Every AuthorizationPolicy check.
pub(super) fn check(snap: &Snapshot, out: &mut Vec<Finding>) {
    // Policies of waypoints and gateways are not the node's to enforce.
    let policies: Vec<&AuthorizationPolicy> = snap
        .authorization_policies
        .iter()
        .map(AsRef::as_ref)
        .filter(|p| !p.target_ref)
        .collect();
    for p in &policies {
        if let Some(e) = &p.meta.error {
            let fails = if p.action == Action::Deny {
                "denies everything it selects"
            } else {
                "matches nothing"
            };
            out.push(Finding::new(
                Severity::High,
                Kind::InvalidPolicy,
                object(p),
                format!("invalid, so it {fails}: {e}"),
            ));
            continue;
        }
        if !p.warnings.is_empty() {
            let effect = match p.action {
                Action::Deny => "those conditions are dropped, so the rule denies more",
                _ => "the rule matches nothing at L4",
            };
            out.push(Finding::new(
                Severity::Medium,
                Kind::L7Fields,
                object(p),
                format!("{}; {effect}", p.warnings.join("; ")),
            ));
        }
        if p.action == Action::Allow && !p.dry_run {
            for (i, r) in p.rules.iter().enumerate().filter(|(_, r)| !r.has_l7) {
                if let Some(why) = open_source(r) {
                    out.push(Finding::new(
                        Severity::Medium,
                        Kind::AllowAnySource,
                        object(p),
                        format!("rule {i} {why}"),
                    ));
                }
            }
        }
        if matches!(p.action, Action::Allow | Action::Deny) && !selects_any(snap, p) {
            out.push(Finding::new(
                Severity::Low,
                Kind::SelectsNothing,
                object(p),
                format!("{} policy selects no workload in the config", p.action.as_str()),
            ));
        }
    }
    shadowed(&policies, out);
}

/// Why an ALLOW rule admits any source, if it does.
fn open_source(r: &Rule) -> Option<&'static str> {
    let when_on_source = r.when.iter().any(|c| matches!(c, Condition::Source(_)));
    match &r.from {
        None if !when_on_source => Some("has no source constraint: any client, plaintext included, is allowed"),
        Some(sources)
            if sources
                .iter()
                .any(|s| s.principals.iter().any(|p| p.pattern == StrMatch::Any)) =>
        {
            Some("allows principals [\"*\"]: any workload with a certificate of the mesh")
        }
        _ => None,
    }
}

fn selects_any(snap: &Snapshot, p: &AuthorizationPolicy) -> bool {
    snap.pods.values().any(|pod| {
        (p.meta.namespace == snap.root_namespace || p.meta.namespace == pod.namespace)
            && p.meta
                .selector
                .as_ref()
                .is_none_or(|sel| sel.iter().all(|(k, v)| pod.labels.get(k) == Some(v)))
    })
}

/// Reports each rule covered by another rule of the same scope (action,
/// namespace, selector); of two equal rules, the later one.
fn shadowed(policies: &[&AuthorizationPolicy], out: &mut Vec<Finding>) {
    let rules: Vec<(&AuthorizationPolicy, usize, &Rule)> = policies
        .iter()
        .filter(|p| p.meta.error.is_none() && !p.dry_run && matches!(p.action, Action::Allow | Action::Deny))
        .flat_map(|p| p.rules.iter().enumerate().map(move |(i, r)| (*p, i, r)))
        .filter(|(_, _, r)| !r.has_l7)
        .collect();
    for (a_at, (pa, ia, ra)) in rules.iter().enumerate() {
        let by = rules.iter().enumerate().find(|(b_at, (pb, _, rb))| {
            *b_at != a_at
                && pb.action == pa.action
                && pb.meta.namespace == pa.meta.namespace
                && pb.meta.selector == pa.meta.selector
                && rule_covers(rb, ra)
                && (!rule_covers(ra, rb) || *b_at < a_at)
        });
        if let Some((_, (pb, ib, _))) = by {
            let other = if pb.meta.key() == pa.meta.key() {
                format!("its rule {ib}")
            } else {
                format!("rule {ib} of {}", pb.meta.key())
            };
            out.push(Finding::new(
                Severity::Low,
                Kind::ShadowedRule,
                object(pa),
                format!(
                    "rule {ia} is shadowed by {other}, which already matches every connection it matches ({})",
                    pa.action.as_str()
                ),
            ));
        }
    }
}

/// Whether every connection `a` matches, `b` matches too.
fn rule_covers(b: &Rule, a: &Rule) -> bool {
    let from = match (&b.from, &a.from) {
        (None, _) => true,
        (Some(bs), _) if bs.is_empty() => true,
        (Some(_), None) => false,
        (Some(bs), Some(as_)) => !as_.is_empty() && as_.iter().all(|s| bs.iter().any(|t| source_covers(t, s))),
    };
    let to = match (&b.to, &a.to) {
        (None, _) => true,
        (Some(bo), _) if bo.is_empty() => true,
        (Some(_), None) => false,
        (Some(bo), Some(ao)) => !ao.is_empty() && ao.iter().all(|o| bo.iter().any(|t| operation_covers(t, o))),
    };
    from && to && b.when.iter().all(|c| a.when.contains(c))
}

/// A positive list of `b` covers `a`'s: no constraint, or every entry of a
/// non-empty `a` is within some entry of `b`.
fn positive<T>(b: &[T], a: &[T], covers: impl Fn(&T, &T) -> bool) -> bool {
    b.is_empty() || (!a.is_empty() && a.iter().all(|x| b.iter().any(|y| covers(y, x))))
}

/// What `b` excludes, `a` excludes too (compared as written).
fn negative<T: PartialEq>(b: &[T], a: &[T]) -> bool {
    b.iter().all(|x| a.contains(x))
}

fn source_covers(b: &Source, a: &Source) -> bool {
    positive(&b.principals, &a.principals, principal_covers)
        && negative(&b.not_principals, &a.not_principals)
        && positive(&b.service_accounts, &a.service_accounts, |y, x| y == x)
        && negative(&b.not_service_accounts, &a.not_service_accounts)
        && positive(&b.namespaces, &a.namespaces, str_covers)
        && negative(&b.not_namespaces, &a.not_namespaces)
        && positive(&b.ip_blocks, &a.ip_blocks, cidr_covers)
        && negative(&b.not_ip_blocks, &a.not_ip_blocks)
}

fn operation_covers(b: &Operation, a: &Operation) -> bool {
    let excluded_by_b = |p: &u16| b.not_ports.contains(p) || (!b.ports.is_empty() && !b.ports.contains(p));
    if a.ports.is_empty() {
        // `a` is every port but its notPorts.
        b.ports.is_empty() && b.not_ports.iter().all(|p| a.not_ports.contains(p))
    } else {
        a.ports
            .iter()
            .filter(|p| !a.not_ports.contains(p))
            .all(|p| !excluded_by_b(p))
    }
}

/// Whether pattern `b` matches every value pattern `a` matches.
fn str_covers(b: &StrMatch, a: &StrMatch) -> bool {
    match (b, a) {
        (StrMatch::Any, _) => true,
        (StrMatch::Exact(x), StrMatch::Exact(y)) => x == y,
        (StrMatch::Prefix(p), StrMatch::Exact(y) | StrMatch::Prefix(y)) => y.starts_with(p.as_str()),
        (StrMatch::Suffix(s), StrMatch::Exact(y) | StrMatch::Suffix(y)) => y.ends_with(s.as_str()),
        _ => false,
    }
}

/// Principals: `*`, or both written with the same trust domain (or none)
/// and the pattern of `b` covering that of `a`.
fn principal_covers(b: &Principal, a: &Principal) -> bool {
    match (&b.domain, &a.domain) {
        _ if b.pattern == StrMatch::Any => true,
        (Some((tb, rb)), Some((ta, ra))) => tb == ta && str_covers(rb, ra),
        (None, None) => str_covers(&b.pattern, &a.pattern),
        _ => false,
    }
}

fn cidr_covers(b: &Cidr, a: &Cidr) -> bool {
    b.addr.is_ipv4() == a.addr.is_ipv4() && b.len <= a.len && b.contains(a.addr)
}
