//! Who may talk to whom, and whether plaintext is allowed, from Istio's
//! `PeerAuthentication` and `AuthorizationPolicy`, evaluated at L4 per
//! connection.
//!
//! * `model` — the objects, parsed so that invalid ones fail safe.
//! * [`mtls_mode`] — the mode of a workload's port: workload-level policy
//!   (with port-level overrides) over namespace-level over mesh-level (root
//!   namespace), `UNSET` inheriting, the oldest winning within a scope,
//!   PERMISSIVE when nothing applies.
//! * [`authorize`] — CUSTOM (unsupported: fails closed), then DENY, then
//!   ALLOW; AUDIT only reports.

pub mod model;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use model::{Action, AuthorizationPolicy, Cidr, Condition, Key, Mode, PeerAuthentication, Rule, Source, StrMatch};

use crate::identity::Identity;
use crate::state::workload::Pod;

/// The facts of one connection that policy can look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// The client's address (for tunnels: the authenticated TCP peer).
    pub src_ip: IpAddr,
    /// The client's identity; `None` for plaintext.
    pub src_identity: Option<Identity>,
    /// Destination address (this pod's).
    pub dst_ip: IpAddr,
    /// Destination port.
    pub dst_port: u16,
}

/// The outcome of authorization.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the connection may proceed.
    pub allowed: bool,
    /// Why, as a fixed label: `allowed`, `denied`, `no_allow_match`,
    /// `invalid_deny_policy`, `custom_unsupported`.
    pub reason: &'static str,
    /// The policy that decided (`namespace/name`), if one did.
    pub policy: Option<String>,
    /// AUDIT policies that matched.
    pub audited: Vec<String>,
}

fn selects(selector: &Option<BTreeMap<String, String>>, labels: &BTreeMap<String, String>) -> bool {
    selector
        .as_ref()
        .is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn oldest(mut v: Vec<&PeerAuthentication>) -> Option<&PeerAuthentication> {
    v.sort_by(|a, b| (&a.meta.created, &a.meta.name).cmp(&(&b.meta.created, &b.meta.name)));
    v.into_iter().next()
}

/// A workload's resolved mTLS modes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadMtls {
    /// The mode of every port without an override; never `Unset`.
    pub default: Mode,
    /// Port-level modes; never `Unset`.
    pub ports: BTreeMap<u16, Mode>,
}

impl WorkloadMtls {
    /// The mode of `port`.
    pub fn mode(&self, port: u16) -> Mode {
        self.ports.get(&port).copied().unwrap_or(self.default)
    }
}

/// Resolves the mTLS modes of `pod` under `policies`.
pub fn mtls_mode<'a, I>(policies: I, root_ns: &str, pod: &Pod) -> WorkloadMtls
where
    I: IntoIterator<Item = &'a Arc<PeerAuthentication>> + Clone,
{
    let mesh = oldest(
        policies
            .clone()
            .into_iter()
            .map(Arc::as_ref)
            .filter(|p| p.meta.namespace == root_ns && p.meta.selector.is_none())
            .collect(),
    );
    let namespace = oldest(
        policies
            .clone()
            .into_iter()
            .map(Arc::as_ref)
            .filter(|p| p.meta.namespace == pod.namespace && p.meta.selector.is_none())
            .collect(),
    );
    let workload = oldest(
        policies
            .clone()
            .into_iter()
            .map(Arc::as_ref)
            .filter(|p| p.meta.namespace == pod.namespace && p.meta.selector.is_some())
            .filter(|p| selects(&p.meta.selector, &pod.labels))
            .collect(),
    );
    let inherit = |m: Option<&PeerAuthentication>, parent: Mode| match m.map(|p| p.mode) {
        None | Some(Mode::Unset) => parent,
        Some(m) => m,
    };
    let mesh_mode = inherit(mesh, Mode::Permissive);
    let ns_mode = inherit(namespace, mesh_mode);
    let wl_mode = inherit(workload, ns_mode);
    let ports = workload
        .map(|w| {
            w.port_modes
                .iter()
                .map(|(p, m)| (*p, if *m == Mode::Unset { wl_mode } else { *m }))
                .collect()
        })
        .unwrap_or_default();
    WorkloadMtls {
        default: wl_mode,
        ports,
    }
}

/// Authorizes a connection to `pod` under `policies`.
pub fn authorize<'a>(
    policies: impl IntoIterator<Item = &'a Arc<AuthorizationPolicy>>,
    root_ns: &str,
    pod: &Pod,
    conn: &ConnInfo,
) -> Decision {
    let applicable: Vec<&AuthorizationPolicy> = policies
        .into_iter()
        .map(Arc::as_ref)
        .filter(|p| p.meta.namespace == root_ns || p.meta.namespace == pod.namespace)
        .filter(|p| selects(&p.meta.selector, &pod.labels))
        .collect();
    let decide = |allowed, reason, p: Option<&AuthorizationPolicy>, audited: Vec<String>| Decision {
        allowed,
        reason,
        policy: p.map(|p| p.meta.key()),
        audited,
    };
    let facts = Facts {
        conn,
        principal: conn.src_identity.as_ref().map(Identity::principal),
    };
    let audited: Vec<String> = applicable
        .iter()
        .filter(|p| p.action == Action::Audit && p.meta.error.is_none())
        .filter(|p| p.rules.iter().any(|r| rule_matches(r, &facts, false)))
        .map(|p| p.meta.key())
        .collect();
    if let Some(p) = applicable.iter().find(|p| p.action == Action::Custom) {
        return decide(false, "custom_unsupported", Some(p), audited);
    }
    for p in applicable.iter().filter(|p| p.action == Action::Deny) {
        if p.meta.error.is_some() {
            return decide(false, "invalid_deny_policy", Some(p), audited);
        }
        // L7-only fields were dropped at parse time: the rule denies more.
        if p.rules.iter().any(|r| rule_matches(r, &facts, false)) {
            return decide(false, "denied", Some(p), audited);
        }
    }
    let allows: Vec<&&AuthorizationPolicy> = applicable.iter().filter(|p| p.action == Action::Allow).collect();
    if allows.is_empty() {
        return decide(true, "allowed", None, audited);
    }
    for p in &allows {
        // A broken ALLOW matches nothing; an L7-only rule matches nothing.
        if p.meta.error.is_none() && p.rules.iter().any(|r| rule_matches(r, &facts, true)) {
            return decide(true, "allowed", Some(p), audited);
        }
    }
    decide(false, "no_allow_match", None, audited)
}

/// A connection's attributes in the form rules compare, computed once.
struct Facts<'a> {
    conn: &'a ConnInfo,
    principal: Option<String>,
}

fn rule_matches(r: &Rule, f: &Facts<'_>, l7_means_nothing: bool) -> bool {
    let c = f.conn;
    if l7_means_nothing && r.has_l7 {
        return false;
    }
    let from = match &r.from {
        Some(sources) if !sources.is_empty() => sources.iter().any(|s| source_matches(s, f)),
        _ => true,
    };
    let to = match &r.to {
        Some(ops) if !ops.is_empty() => ops
            .iter()
            .any(|o| (o.ports.is_empty() || o.ports.contains(&c.dst_port)) && !o.not_ports.contains(&c.dst_port)),
        _ => true,
    };
    from && to && r.when.iter().all(|w| condition_matches(w, f))
}

fn namespace(c: &ConnInfo) -> Option<&str> {
    c.src_identity.as_ref().map(|i| i.namespace.as_str())
}

/// Positive string conditions need the attribute (plaintext has no
/// principal or namespace, so they cannot match it); negative ones hold
/// when it is absent.
fn positive(list: &[StrMatch], v: Option<&str>) -> bool {
    list.is_empty() || v.is_some_and(|v| list.iter().any(|m| m.matches(v)))
}

fn negative(list: &[StrMatch], v: Option<&str>) -> bool {
    list.is_empty() || v.is_none_or(|v| !list.iter().any(|m| m.matches(v)))
}

fn source_matches(s: &Source, f: &Facts<'_>) -> bool {
    let (c, p) = (f.conn, f.principal.as_deref());
    positive(&s.principals, p)
        && negative(&s.not_principals, p)
        && positive(&s.namespaces, namespace(c))
        && negative(&s.not_namespaces, namespace(c))
        && (s.ip_blocks.is_empty() || s.ip_blocks.iter().any(|b| b.contains(c.src_ip)))
        && !s.not_ip_blocks.iter().any(|b| b.contains(c.src_ip))
}

fn condition_matches(w: &Condition, f: &Facts<'_>) -> bool {
    let c = f.conn;
    let strs = |v: &[String]| v.iter().map(|s| StrMatch::parse(s)).collect::<Vec<_>>();
    match w.key {
        Key::SourceIp | Key::DestinationIp => {
            let ip = if w.key == Key::SourceIp { c.src_ip } else { c.dst_ip };
            let cidrs = |v: &[String]| v.iter().filter_map(|s| Cidr::parse(s)).collect::<Vec<_>>();
            (w.values.is_empty() || cidrs(&w.values).iter().any(|b| b.contains(ip)))
                && !cidrs(&w.not_values).iter().any(|b| b.contains(ip))
        }
        Key::DestinationPort => {
            let port = c.dst_port.to_string();
            (w.values.is_empty() || w.values.contains(&port)) && !w.not_values.contains(&port)
        }
        Key::SourceNamespace => {
            positive(&strs(&w.values), namespace(c)) && negative(&strs(&w.not_values), namespace(c))
        }
        Key::SourcePrincipal => {
            let p = f.principal.as_deref();
            positive(&strs(&w.values), p) && negative(&strs(&w.not_values), p)
        }
    }
}

#[cfg(test)]
mod tests;
