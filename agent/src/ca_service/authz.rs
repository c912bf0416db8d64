//! Who may obtain which identity: a caller its own ServiceAccount's; the
//! node agent's ServiceAccount, for the pods scheduled on the node its
//! token is bound to, as the CA's view of pods says. Everything else is
//! refused with a reason from a fixed set.

#![forbid(unsafe_code)]

use super::jwt::K8sClaims;
use crate::identity::Identity;
use crate::state::Snapshot;

/// Why an identity is refused. Each kind is a log and metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthzError {
    /// `ImpersonatedIdentity` is not a SPIFFE ID.
    #[error("requested identity: {0}")]
    BadIdentity(String),
    /// Another trust domain than the CA's.
    #[error("{requested} is not in trust domain {trust_domain}")]
    WrongTrustDomain {
        /// Asked for.
        requested: String,
        /// The CA's.
        trust_domain: String,
    },
    /// Someone else's identity, and the caller is not the node agent.
    #[error("{caller} may not obtain {requested}")]
    NotOwnIdentity {
        /// The caller's identity.
        caller: String,
        /// Asked for.
        requested: String,
    },
    /// The node agent's token names no node, nor a live pod the CA knows.
    #[error("the node agent's token names no node (kubernetes.io.node.name) nor a live pod the CA knows")]
    NoNode,
    /// The token is bound to a pod the CA's view does not hold live: it
    /// was deleted (or finished), so its token speaks for nothing.
    #[error("the token's pod {pod} is gone (deleted, finished, or unknown to the CA)")]
    PodGone {
        /// `namespace/name`.
        pod: String,
    },
    /// The token's pod of that name is another pod (a re-created one).
    #[error("the token's pod {pod} has uid {token_uid}; the live pod of that name is another ({live_uid})")]
    PodUidMismatch {
        /// `namespace/name`.
        pod: String,
        /// The token's `kubernetes.io.pod.uid`.
        token_uid: String,
        /// The live pod's.
        live_uid: String,
    },
    /// No pod of that identity on the caller's node.
    #[error("no pod of {requested} is scheduled on node {node}")]
    NotOnNode {
        /// Asked for.
        requested: String,
        /// The caller's node.
        node: String,
    },
}

impl AuthzError {
    /// A fixed label for logs and counters.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            AuthzError::BadIdentity(_) => "bad_identity",
            AuthzError::WrongTrustDomain { .. } => "wrong_trust_domain",
            AuthzError::NotOwnIdentity { .. } => "not_own_identity",
            AuthzError::NoNode => "no_node",
            AuthzError::PodGone { .. } => "pod_gone",
            AuthzError::PodUidMismatch { .. } => "pod_uid_mismatch",
            AuthzError::NotOnNode { .. } => "not_on_node",
        }
    }
}

/// What the CA authorizes against.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    /// The CA's trust domain.
    pub(crate) trust_domain: String,
    /// The node agent's ServiceAccount, `namespace/name`.
    pub(crate) node_agent: (String, String),
}

/// The identity to issue for a caller with `claims` asking for `requested`
/// (its own when `None`), or why not.
pub(crate) fn authorize(
    claims: &K8sClaims,
    requested: Option<&str>,
    rules: &Rules,
    pods: &Snapshot,
) -> Result<Identity, AuthzError> {
    bound_pod_lives(claims, pods)?;
    let own = Identity::new(&rules.trust_domain, &claims.namespace, &claims.service_account);
    let Some(requested) = requested else {
        return Ok(own);
    };
    let want = Identity::parse(requested).map_err(|e| AuthzError::BadIdentity(e.to_string()))?;
    if want.trust_domain != rules.trust_domain {
        return Err(AuthzError::WrongTrustDomain {
            requested: want.to_string(),
            trust_domain: rules.trust_domain.clone(),
        });
    }
    if want == own {
        return Ok(own);
    }
    let is_node_agent = claims.namespace == rules.node_agent.0 && claims.service_account == rules.node_agent.1;
    if !is_node_agent {
        return Err(AuthzError::NotOwnIdentity {
            caller: own.to_string(),
            requested: want.to_string(),
        });
    }
    // The token's node claim; without one (API servers before 1.30), the
    // node of the pod the token is bound to, as the CA sees it.
    let node = match claims.node.as_deref().filter(|n| !n.is_empty()) {
        Some(n) => n.to_string(),
        None => claims
            .pod
            .as_deref()
            .and_then(|p| pods.pods.get(&format!("{}/{p}", claims.namespace)))
            .filter(|p| !p.deleting && !p.finished())
            .map(|p| p.node_name.clone())
            .filter(|n| !n.is_empty())
            .ok_or(AuthzError::NoNode)?,
    };
    let scheduled = pods.pods.values().any(|p| {
        p.node_name == node
            && p.namespace == want.namespace
            && p.service_account == want.service_account
            && !p.deleting
            && !p.finished()
    });
    if scheduled {
        Ok(want)
    } else {
        Err(AuthzError::NotOnNode {
            requested: want.to_string(),
            node,
        })
    }
}

/// A token bound to a pod (every projected token is) speaks only while
/// that very pod lives: a token copied out of a deleted pod, or kept from
/// an earlier pod of the same name, mints nothing even before it expires.
/// A token bound to no pod (`kubectl create token`) is the ServiceAccount's
/// own and passes; it can still never be a node agent's (no node, no pod).
fn bound_pod_lives(claims: &K8sClaims, pods: &Snapshot) -> Result<(), AuthzError> {
    let Some(name) = claims.pod.as_deref() else {
        return Ok(());
    };
    let key = format!("{}/{name}", claims.namespace);
    let live = pods
        .pods
        .get(&key)
        .filter(|p| !p.deleting && !p.finished())
        .ok_or_else(|| AuthzError::PodGone { pod: key.clone() })?;
    match claims.pod_uid.as_deref() {
        Some(uid) if uid != live.uid => Err(AuthzError::PodUidMismatch {
            pod: key,
            token_uid: uid.to_string(),
            live_uid: live.uid.clone(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::state::workload::Pod;

    fn rules() -> Rules {
        Rules {
            trust_domain: "cluster.local".into(),
            node_agent: ("nodeward-system".into(), "nodeward".into()),
        }
    }

    fn pods() -> Snapshot {
        let mut s = Snapshot::default();
        for (name, ns, sa, node, phase) in [
            ("web-1", "shop", "web", "node-1", "Running"),
            ("db-1", "shop", "db", "node-2", "Running"),
            ("old-1", "shop", "old", "node-1", "Succeeded"),
            // The callers' own pods, which their tokens are bound to.
            ("p", "shop", "web", "node-1", "Running"),
            ("p", "nodeward-system", "nodeward", "", "Running"),
        ] {
            let p = Pod {
                namespace: ns.into(),
                name: name.into(),
                uid: format!("uid-{ns}-{name}"),
                node_name: node.into(),
                service_account: sa.into(),
                phase: phase.into(),
                ..Pod::default()
            };
            s.pods.insert(format!("{ns}/{name}"), Arc::new(p));
        }
        s
    }

    fn claims(ns: &str, sa: &str, node: Option<&str>) -> K8sClaims {
        K8sClaims {
            namespace: ns.into(),
            service_account: sa.into(),
            pod: Some("p".into()),
            pod_uid: Some(format!("uid-{ns}-p")),
            node: node.map(Into::into),
        }
    }

    #[test]
    fn a_token_of_a_deleted_or_replaced_pod_mints_nothing() {
        let own = claims("shop", "web", None);
        authorize(&own, None, &rules(), &pods()).unwrap();
        let mut view = pods();
        // Deleted.
        view.pods.remove("shop/p");
        assert_eq!(
            authorize(&own, None, &rules(), &view),
            Err(AuthzError::PodGone { pod: "shop/p".into() })
        );
        // Being deleted, or finished.
        for edit in [|p: &mut Pod| p.deleting = true, |p: &mut Pod| p.phase = "Failed".into()] {
            let mut view = pods();
            let mut p = (*view.pods["shop/p"]).clone();
            edit(&mut p);
            view.pods.insert("shop/p".into(), Arc::new(p));
            assert!(matches!(
                authorize(&own, Some(WEB), &rules(), &view),
                Err(AuthzError::PodGone { .. })
            ));
        }
        // Re-created under the same name: another uid.
        let mut view = pods();
        let mut p = (*view.pods["shop/p"]).clone();
        p.uid = "uid-of-the-new-pod".into();
        view.pods.insert("shop/p".into(), Arc::new(p));
        assert!(matches!(
            authorize(&own, None, &rules(), &view),
            Err(AuthzError::PodUidMismatch { .. })
        ));
        // The node agent's token is bound to its pod too.
        let mut view = pods();
        view.pods.remove("nodeward-system/p");
        let agent1 = claims("nodeward-system", "nodeward", Some("node-1"));
        assert!(matches!(
            authorize(&agent1, Some(WEB), &rules(), &view),
            Err(AuthzError::PodGone { .. })
        ));
        // A token bound to no pod is the ServiceAccount's own.
        let unbound = K8sClaims {
            pod: None,
            pod_uid: None,
            ..claims("shop", "web", None)
        };
        authorize(&unbound, None, &rules(), &view).unwrap();
    }

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

    #[test]
    fn a_caller_gets_its_own_identity() {
        let c = claims("shop", "web", None);
        assert_eq!(authorize(&c, None, &rules(), &pods()).unwrap().to_string(), WEB);
        assert_eq!(authorize(&c, Some(WEB), &rules(), &pods()).unwrap().to_string(), WEB);
    }

    #[test]
    fn a_workload_cannot_impersonate_another() {
        let c = claims("shop", "web", Some("node-2"));
        assert!(matches!(
            authorize(&c, Some(DB), &rules(), &pods()),
            Err(AuthzError::NotOwnIdentity { .. })
        ));
    }

    #[test]
    fn the_node_agent_gets_only_identities_of_pods_on_its_node() {
        let agent1 = claims("nodeward-system", "nodeward", Some("node-1"));
        assert_eq!(
            authorize(&agent1, Some(WEB), &rules(), &pods()).unwrap().to_string(),
            WEB
        );
        assert_eq!(
            authorize(&agent1, Some(DB), &rules(), &pods()),
            Err(AuthzError::NotOnNode {
                requested: DB.into(),
                node: "node-1".into()
            })
        );
        let finished = "spiffe://cluster.local/ns/shop/sa/old";
        assert!(matches!(
            authorize(&agent1, Some(finished), &rules(), &pods()),
            Err(AuthzError::NotOnNode { .. })
        ));
        let nodeless = claims("nodeward-system", "nodeward", None);
        assert_eq!(
            authorize(&nodeless, Some(WEB), &rules(), &pods()),
            Err(AuthzError::NoNode)
        );
        // Without a node claim, the node of the agent's own pod.
        let mut view = pods();
        let agent_pod = Pod {
            namespace: "nodeward-system".into(),
            name: "p".into(),
            uid: "uid-nodeward-system-p".into(),
            node_name: "node-2".into(),
            service_account: "nodeward".into(),
            phase: "Running".into(),
            ..Pod::default()
        };
        view.pods.insert("nodeward-system/p".into(), Arc::new(agent_pod));
        assert_eq!(authorize(&nodeless, Some(DB), &rules(), &view).unwrap().to_string(), DB);
        assert!(matches!(
            authorize(&nodeless, Some(WEB), &rules(), &view),
            Err(AuthzError::NotOnNode { .. })
        ));
    }

    #[test]
    fn other_trust_domains_and_garbage_are_refused() {
        let agent1 = claims("nodeward-system", "nodeward", Some("node-1"));
        assert!(matches!(
            authorize(&agent1, Some("spiffe://evil.org/ns/shop/sa/web"), &rules(), &pods()),
            Err(AuthzError::WrongTrustDomain { .. })
        ));
        assert!(matches!(
            authorize(&agent1, Some("shop/web"), &rules(), &pods()),
            Err(AuthzError::BadIdentity(_))
        ));
    }
}
