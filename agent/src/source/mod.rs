//! Config sources: where the cluster's objects come from.
//!
//! A directory of Kubernetes YAML ([`dir::DirSource`], the embedded default
//! and the test bed's) or the Kubernetes API ([`kube::KubeSource`], the
//! default inside a cluster). Both convert objects with the same functions
//! ([`objects`]) and build snapshots with the same [`Assembler`], and feed
//! the same [`crate::state::Store`].

#![forbid(unsafe_code)]

pub(crate) mod dir;
pub(crate) mod kube;
pub(crate) mod objects;
pub(crate) mod services;

use std::collections::BTreeSet;
use std::fmt::Display;

use crate::policy::TrustDomains;
use crate::state::Snapshot;
use objects::Object;

/// Builds the snapshot a source publishes from its objects, with the
/// settings every snapshot carries, and reports the policies in force.
#[derive(Debug)]
pub(crate) struct Assembler {
    root_namespace: String,
    trust_domains: TrustDomains,
    /// Policies already reported as ignored (`targetRef`), so each is
    /// logged once, not on every change.
    ignored_reported: BTreeSet<String>,
}

impl Default for Assembler {
    fn default() -> Self {
        Assembler::new(
            crate::config::defaults::ROOT_NAMESPACE,
            crate::config::defaults::TRUST_DOMAIN,
            &[],
        )
    }
}

impl Assembler {
    /// Istio's root namespace (mesh-wide policies), the local trust domain
    /// and its aliases (blank ones dropped), which policies treat as local.
    pub(crate) fn new(root_namespace: &str, trust_domain: &str, aliases: &[String]) -> Self {
        Assembler {
            root_namespace: root_namespace.to_string(),
            trust_domains: TrustDomains {
                local: trust_domain.to_string(),
                aliases: aliases
                    .iter()
                    .map(|a| a.trim().to_string())
                    .filter(|a| !a.is_empty())
                    .collect(),
            },
            ignored_reported: BTreeSet::new(),
        }
    }

    /// The indexed snapshot of `objects`, each with where it came from (for
    /// warnings). A pod or namespace given twice: the last wins, with a
    /// warning naming where the winner came from.
    pub(crate) fn snapshot<'a, D: Display>(&mut self, objects: impl IntoIterator<Item = (D, &'a Object)>) -> Snapshot {
        let mut snap = Snapshot::default();
        for (origin, obj) in objects {
            match obj {
                Object::Namespace(ns) => {
                    if snap.namespaces.insert(ns.name.clone(), ns.clone()).is_some() {
                        tracing::warn!(file = %origin, namespace = %ns.name, "namespace defined more than once; the last definition wins");
                    }
                }
                Object::PeerAuthentication(p) => snap.peer_authentications.push(p.clone()),
                Object::AuthorizationPolicy(p) => snap.authorization_policies.push(p.clone()),
                Object::Service(s) => snap.services.push(s.clone()),
                Object::EndpointSlice(s) => snap.endpoint_slices.push(s.clone()),
                Object::Node(n) => snap.nodes.push(n.clone()),
                Object::Pod(pod) => {
                    if snap.pods.insert(pod.key(), std::sync::Arc::new(pod.clone())).is_some() {
                        tracing::warn!(file = %origin, pod = %pod.key(), "pod defined more than once; the last definition wins");
                    }
                }
            }
        }
        snap.root_namespace = self.root_namespace.clone();
        snap.trust_domains = self.trust_domains.clone();
        report_policies(&snap, &mut self.ignored_reported);
        snap.index()
    }
}

/// Logs what operators must know about the policies now in force: invalid
/// ones (and how they fail safe), unsupported ones, L7-only fields, DISABLE,
/// dry-run ones; and, once each, the ones the node ignores (`targetRef`).
fn report_policies(snap: &Snapshot, ignored_reported: &mut BTreeSet<String>) {
    use crate::policy::model::{Action, Mode};
    for p in &snap.peer_authentications {
        if let Some(e) = &p.meta.error {
            tracing::error!(policy = %p.meta.key(), kind = "PeerAuthentication", "invalid policy {}, treated as STRICT: {e}", p.meta.key());
        }
        let disabled = p.mode == Mode::Disable || p.port_modes.values().any(|m| *m == Mode::Disable);
        if disabled {
            tracing::warn!(policy = %p.meta.key(), kind = "PeerAuthentication", "mTLS DISABLE in force: plaintext allowed");
        }
        if p.meta.selector.is_none() && !p.port_modes.is_empty() {
            tracing::warn!(policy = %p.meta.key(), kind = "PeerAuthentication", "portLevelMtls needs a selector; ignored as in Istio");
        }
    }
    let mut ignored = BTreeSet::new();
    for p in &snap.authorization_policies {
        if p.target_ref {
            let key = p.meta.key();
            if !ignored_reported.contains(&key) {
                tracing::info!(policy = %key, kind = "AuthorizationPolicy", "policy with targetRef(s) belongs to a waypoint or gateway; ignored by the node");
            }
            ignored.insert(key);
            continue;
        }
        if p.dry_run {
            tracing::info!(policy = %p.meta.key(), kind = "AuthorizationPolicy", "dry-run policy: evaluated and logged (target nodeward::audit), not enforced");
        }
        match (&p.meta.error, p.action) {
            (Some(e), Action::Deny) => {
                tracing::error!(policy = %p.meta.key(), kind = "AuthorizationPolicy", "invalid DENY policy {}, denies everything it selects: {e}", p.meta.key())
            }
            (Some(e), _) => {
                tracing::error!(policy = %p.meta.key(), kind = "AuthorizationPolicy", "invalid policy {}, matches nothing: {e}", p.meta.key())
            }
            (None, Action::Custom) => tracing::error!(
                policy = %p.meta.key(),
                kind = "AuthorizationPolicy",
                status = "unsupported",
                "CUSTOM authorization is unsupported at L4; the workloads it selects are refused"
            ),
            _ => {}
        }
        for w in &p.warnings {
            tracing::warn!(policy = %p.meta.key(), kind = "AuthorizationPolicy", "{w}: in ALLOW rules it matches nothing, in DENY rules it is ignored");
        }
    }
    *ignored_reported = ignored;
}
