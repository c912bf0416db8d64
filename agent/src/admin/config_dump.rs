//! `/config_dump`: what the agent enforces on this node, per workload: its
//! identity, effective mTLS mode per port with the PeerAuthentication that
//! decided it, the AuthorizationPolicies that select it, the ports left
//! uncaptured and why, and its eBPF capture; plus rejected config files.

#![forbid(unsafe_code)]

use serde_json::{Value, json};

use super::AdminState;
use crate::policy::model::Mode;
use crate::state::workload::{EXCLUDE_INBOUND_ANNOTATION, EXCLUDE_OUTBOUND_ANNOTATION, Pod};

/// The dump, as JSON.
pub(crate) fn dump(state: &AdminState) -> Value {
    let snap = state.store.current();
    let (managed, _) = snap.managed_pods(&state.node);
    let captures = state.captures.pods();
    let mut workloads = Vec::new();
    let mut managed: Vec<_> = managed.into_values().collect();
    managed.sort_by(|a, b| a.key.cmp(&b.key));
    for m in managed {
        let Some(pod) = snap.pods.get(&m.key) else { continue };
        let mtls = snap.mtls(pod);
        let mode = |mode: Mode, from: &Option<String>| json!({"mode": mode.as_str(), "policy": from});
        let ports: serde_json::Map<String, Value> = mtls
            .ports
            .iter()
            .map(|(p, m)| (p.to_string(), mode(*m, &mtls.ports_from)))
            .collect();
        let excluded = |ports: &[u16], annotation: &str| -> Vec<Value> {
            ports
                .iter()
                .map(|p| json!({"port": p, "reason": format!("annotation {annotation}")}))
                .collect()
        };
        let identity = state
            .certs
            .as_ref()
            .map(|c| c.identity_of(&m.namespace, &m.service_account).to_string());
        let ebpf = match captures.get(&m.key) {
            Some(c) => {
                json!({"captured": c.netns_cookie.is_some(), "netns_cookie": c.netns_cookie, "problem": c.problem})
            }
            None => json!({"captured": false, "problem": "not reconciled yet"}),
        };
        workloads.push(json!({
            "pod": m.key,
            "uid": m.uid,
            "workload": crate::proxy::report::workload_name(pod),
            "service_account": m.service_account,
            "identity": identity,
            "ips": m.ips,
            "mtls": {"default": mode(mtls.default, &mtls.default_from), "ports": ports},
            "authorization_policies": authorization_policies(&snap, pod),
            "excluded_ports": {
                "inbound": excluded(&m.exclude_inbound, EXCLUDE_INBOUND_ANNOTATION),
                "outbound": excluded(&m.exclude_outbound, EXCLUDE_OUTBOUND_ANNOTATION),
            },
            "ebpf": ebpf,
        }));
    }
    let rejected: Vec<Value> = state
        .config
        .rejected()
        .into_iter()
        .map(|(file, error)| json!({"file": file.display().to_string(), "error": error}))
        .collect();
    json!({
        "node": state.node,
        "generation": snap.generation,
        "root_namespace": snap.root_namespace,
        "rejected_files": rejected,
        "workloads": workloads,
    })
}

/// The AuthorizationPolicies that apply to `pod`: those of the root
/// namespace and of its own whose selector matches, as the node evaluates
/// them (policies for waypoints are listed as ignored).
fn authorization_policies(snap: &crate::state::Snapshot, pod: &Pod) -> Vec<Value> {
    snap.authorization_policies
        .iter()
        .filter(|p| p.meta.namespace == snap.root_namespace || p.meta.namespace == pod.namespace)
        .filter(|p| {
            p.meta
                .selector
                .as_ref()
                .is_none_or(|sel| sel.iter().all(|(k, v)| pod.labels.get(k) == Some(v)))
        })
        .map(|p| {
            json!({
                "policy": p.meta.key(),
                "action": format!("{:?}", p.action).to_uppercase(),
                "rules": p.rules.len(),
                "dry_run": p.dry_run,
                "ignored_target_ref": p.target_ref,
                "error": p.meta.error,
            })
        })
        .collect()
}
