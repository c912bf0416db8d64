//! Who may talk to whom, and whether plaintext is allowed, from Istio's
//! `PeerAuthentication` and `AuthorizationPolicy`, evaluated at L4 per
//! connection.
//!
//! * `model` — the objects; `parse` — the strict walk that reads them, so
//!   that invalid ones fail safe.
//! * [`mtls_mode`] — the mode of a workload's port: workload-level policy
//!   (with port-level overrides) over namespace-level over mesh-level (root
//!   namespace), `UNSET` inheriting, the oldest winning within a scope,
//!   PERMISSIVE when nothing applies.
//! * [`authorize`] — CUSTOM (unsupported: fails closed), then DENY, then
//!   ALLOW; AUDIT and dry-run policies only report. Policies attached to
//!   waypoints or gateways (`targetRef`) are not the node's and are skipped.

#![forbid(unsafe_code)]

pub mod model;
mod parse;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use model::{
    Action, AuthorizationPolicy, Condition, Mode, Operation, PeerAuthentication, Principal, Rule, ServiceAccount,
    Source, StrMatch,
};

use crate::identity::Identity;
use crate::outcome::PolicyReason;
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
    /// Why, as a fixed label.
    pub(crate) reason: PolicyReason,
    /// The policy that decided (`namespace/name`), if one did.
    pub(crate) policy: Option<String>,
    /// AUDIT policies that matched.
    pub(crate) audited: Vec<String>,
    /// What each dry-run policy selecting the workload would have decided.
    pub(crate) dry_run: Vec<DryRun>,
}

/// The outcome of one `istio.io/dry-run` policy, logged, never enforced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DryRun {
    /// `namespace/name`.
    pub(crate) policy: String,
    /// Its action.
    pub(crate) action: Action,
    /// Whether one of its rules matched (an invalid policy fails safe here
    /// too: a DENY matches, an ALLOW does not).
    pub(crate) matched: bool,
}

impl DryRun {
    /// What enforcing it would have done, as a fixed label: `deny`,
    /// `allow`, `no_match`, `audit`, `refuse` (CUSTOM).
    pub(crate) fn would(&self) -> &'static str {
        match (self.action, self.matched) {
            (Action::Custom, _) => "refuse",
            (_, false) => "no_match",
            (Action::Deny, true) => "deny",
            (Action::Allow, true) => "allow",
            (Action::Audit, true) => "audit",
        }
    }
}

/// The trust domains policies treat as this mesh's: `--trust-domain` and
/// `--trust-domain-aliases`. A principal written with `cluster.local` or
/// any of these matches a peer of any of them, as in Istio.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TrustDomains {
    /// `--trust-domain`.
    pub(crate) local: String,
    /// `--trust-domain-aliases`.
    pub(crate) aliases: Vec<String>,
}

impl Default for TrustDomains {
    fn default() -> Self {
        TrustDomains {
            local: "cluster.local".into(),
            aliases: Vec::new(),
        }
    }
}

impl TrustDomains {
    /// Whether a peer of trust domain `td` is local.
    fn peer_is_local(&self, td: &str) -> bool {
        td == self.local || self.aliases.iter().any(|a| a == td)
    }

    /// Whether a policy's trust domain `td` stands for the local ones.
    fn policy_means_local(&self, td: &str) -> bool {
        td == "cluster.local" || self.peer_is_local(td)
    }
}

fn selects(selector: &Option<BTreeMap<String, String>>, labels: &BTreeMap<String, String>) -> bool {
    selector
        .as_ref()
        .is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// The oldest policy; one without `creationTimestamp` sorts after every
/// dated one (it cannot claim to be older), ties by name.
fn oldest(mut v: Vec<&PeerAuthentication>) -> Option<&PeerAuthentication> {
    let key = |p: &&PeerAuthentication| (p.meta.created.is_none(), p.meta.created.clone(), p.meta.name.clone());
    v.sort_by_key(key);
    v.into_iter().next()
}

/// A workload's resolved mTLS modes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WorkloadMtls {
    /// The mode of every port without an override; never `Unset`.
    pub(crate) default: Mode,
    /// Port-level modes; never `Unset`.
    pub(crate) ports: BTreeMap<u16, Mode>,
    /// The PeerAuthentication (`namespace/name`) that set `default`;
    /// `None`: the mesh default, PERMISSIVE.
    pub(crate) default_from: Option<String>,
    /// The workload PeerAuthentication that set `ports`, if any.
    pub(crate) ports_from: Option<String>,
}

impl WorkloadMtls {
    /// The mode of `port`.
    pub(crate) fn mode(&self, port: u16) -> Mode {
        self.ports.get(&port).copied().unwrap_or(self.default)
    }
}

/// Resolves the mTLS modes of `pod` under `policies`.
pub(crate) fn mtls_mode<'a, I>(policies: I, root_ns: &str, pod: &Pod) -> WorkloadMtls
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
    let default_from = [workload, namespace, mesh]
        .into_iter()
        .flatten()
        .find(|p| p.mode != Mode::Unset)
        .map(|p| p.meta.key());
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
        ports_from: workload.filter(|w| !w.port_modes.is_empty()).map(|w| w.meta.key()),
        ports,
        default_from,
    }
}

/// Authorizes a connection to `pod` under `policies`.
pub(crate) fn authorize<'a>(
    policies: impl IntoIterator<Item = &'a Arc<AuthorizationPolicy>>,
    root_ns: &str,
    trust: &TrustDomains,
    pod: &Pod,
    conn: &ConnInfo,
) -> Decision {
    let selecting: Vec<&AuthorizationPolicy> = policies
        .into_iter()
        .map(Arc::as_ref)
        .filter(|p| !p.target_ref)
        .filter(|p| p.meta.namespace == root_ns || p.meta.namespace == pod.namespace)
        .filter(|p| selects(&p.meta.selector, &pod.labels))
        .collect();
    let facts = Facts::new(conn, trust);
    // A broken DENY matches everything, a broken ALLOW or AUDIT nothing.
    let matches = |p: &AuthorizationPolicy, l7_means_nothing: bool| match &p.meta.error {
        Some(_) => p.action == Action::Deny,
        None => p.rules.iter().any(|r| rule_matches(r, &facts, l7_means_nothing)),
    };
    let dry_run: Vec<DryRun> = selecting
        .iter()
        .filter(|p| p.dry_run)
        .map(|p| DryRun {
            policy: p.meta.key(),
            action: p.action,
            matched: matches(p, p.action != Action::Deny),
        })
        .collect();
    let applicable: Vec<&AuthorizationPolicy> = selecting.into_iter().filter(|p| !p.dry_run).collect();
    let audited: Vec<String> = applicable
        .iter()
        .filter(|p| p.action == Action::Audit && matches(p, false))
        .map(|p| p.meta.key())
        .collect();
    let decide = |allowed, reason, p: Option<&AuthorizationPolicy>| Decision {
        allowed,
        reason,
        policy: p.map(|p| p.meta.key()),
        audited: audited.clone(),
        dry_run: dry_run.clone(),
    };
    if let Some(p) = applicable.iter().find(|p| p.action == Action::Custom) {
        return decide(false, PolicyReason::CustomUnsupported, Some(p));
    }
    for p in applicable.iter().filter(|p| p.action == Action::Deny) {
        if p.meta.error.is_some() {
            return decide(false, PolicyReason::InvalidDenyPolicy, Some(p));
        }
        // L7-only fields were dropped at parse time: the rule denies more.
        if matches(p, false) {
            return decide(false, PolicyReason::Denied, Some(p));
        }
    }
    let allows: Vec<&&AuthorizationPolicy> = applicable.iter().filter(|p| p.action == Action::Allow).collect();
    if allows.is_empty() {
        return decide(true, PolicyReason::Allowed, None);
    }
    for p in &allows {
        // A broken ALLOW matches nothing; an L7-only rule matches nothing.
        if matches(p, true) {
            return decide(true, PolicyReason::Allowed, Some(p));
        }
    }
    decide(false, PolicyReason::NoAllowMatch, None)
}

/// A connection's attributes in the form rules compare, computed once.
struct Facts<'a> {
    conn: &'a ConnInfo,
    trust: &'a TrustDomains,
    /// `td/ns/<ns>/sa/<sa>` of the peer; `None` for plaintext.
    principal: Option<String>,
}

impl<'a> Facts<'a> {
    fn new(conn: &'a ConnInfo, trust: &'a TrustDomains) -> Self {
        Facts {
            conn,
            trust,
            principal: conn.src_identity.as_ref().map(Identity::principal),
        }
    }

    fn identity(&self) -> Option<&Identity> {
        self.conn.src_identity.as_ref()
    }
}

fn rule_matches(r: &Rule, f: &Facts<'_>, l7_means_nothing: bool) -> bool {
    if l7_means_nothing && r.has_l7 {
        return false;
    }
    let from = match &r.from {
        Some(sources) if !sources.is_empty() => sources.iter().any(|s| source_matches(s, f)),
        _ => true,
    };
    let to = match &r.to {
        Some(ops) if !ops.is_empty() => ops.iter().any(|o| operation_matches(o, f.conn.dst_port)),
        _ => true,
    };
    from && to && r.when.iter().all(|w| condition_matches(w, f))
}

fn operation_matches(o: &Operation, port: u16) -> bool {
    (o.ports.is_empty() || o.ports.contains(&port)) && !o.not_ports.contains(&port)
}

/// Positive conditions need the attribute (plaintext has no principal,
/// namespace or service account, so they cannot match it); negative ones
/// hold when it is absent.
fn positive<T>(list: &[T], present: bool, m: impl Fn(&T) -> bool) -> bool {
    list.is_empty() || (present && list.iter().any(m))
}

fn negative<T>(list: &[T], m: impl Fn(&T) -> bool) -> bool {
    !list.iter().any(m)
}

fn principal_matches(p: &Principal, f: &Facts<'_>) -> bool {
    let (Some(id), Some(full)) = (f.identity(), f.principal.as_deref()) else {
        return false;
    };
    match &p.domain {
        Some((td, rest)) if f.trust.policy_means_local(td) => {
            f.trust.peer_is_local(&id.trust_domain) && rest.matches(&full[id.trust_domain.len() + 1..])
        }
        _ => p.pattern.matches(full),
    }
}

fn service_account_matches(sa: &ServiceAccount, f: &Facts<'_>) -> bool {
    f.identity()
        .is_some_and(|id| id.namespace == sa.namespace && id.service_account == sa.name)
}

fn namespace_matches(m: &StrMatch, f: &Facts<'_>) -> bool {
    f.identity().is_some_and(|id| m.matches(&id.namespace))
}

fn source_matches(s: &Source, f: &Facts<'_>) -> bool {
    let (c, meshed) = (f.conn, f.identity().is_some());
    positive(&s.principals, meshed, |p| principal_matches(p, f))
        && negative(&s.not_principals, |p| principal_matches(p, f))
        && positive(&s.service_accounts, meshed, |sa| service_account_matches(sa, f))
        && negative(&s.not_service_accounts, |sa| service_account_matches(sa, f))
        && positive(&s.namespaces, meshed, |n| namespace_matches(n, f))
        && negative(&s.not_namespaces, |n| namespace_matches(n, f))
        && (s.ip_blocks.is_empty() || s.ip_blocks.iter().any(|b| b.contains(c.src_ip)))
        && !s.not_ip_blocks.iter().any(|b| b.contains(c.src_ip))
}

fn condition_matches(w: &Condition, f: &Facts<'_>) -> bool {
    match w {
        Condition::Source(s) => source_matches(s, f),
        Condition::Operation(o) => operation_matches(o, f.conn.dst_port),
        Condition::DestinationIp(values, not_values) => {
            let ip = f.conn.dst_ip;
            (values.is_empty() || values.iter().any(|b| b.contains(ip))) && !not_values.iter().any(|b| b.contains(ip))
        }
    }
}

#[cfg(test)]
mod tests;
