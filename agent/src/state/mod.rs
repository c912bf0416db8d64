//! The one in-memory state every part of the agent reads.
//!
//! A config source (the YAML directory now, the Kubernetes API later)
//! publishes complete, immutable snapshots; readers take the current one with
//! a cheap `Arc` clone and never see a half-applied change.

pub mod workload;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::watch;

use crate::policy::model::{AuthorizationPolicy, PeerAuthentication};
use crate::policy::{ConnInfo, Decision, WorkloadMtls};

use workload::{
    EXCLUDE_INBOUND_ANNOTATION, EXCLUDE_OUTBOUND_ANNOTATION, Enrolment, ManagedPod, Namespace, Pod, enrolment,
};

/// Everything the agent knows about the cluster at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Namespaces by name.
    pub namespaces: HashMap<String, Namespace>,
    /// Pods by `namespace/name`.
    pub pods: BTreeMap<String, Arc<Pod>>,
    /// PeerAuthentications.
    pub peer_authentications: Vec<Arc<PeerAuthentication>>,
    /// AuthorizationPolicies.
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    /// Istio's root namespace: its policies apply mesh-wide.
    pub root_namespace: String,
    /// Increases with every published snapshot.
    pub generation: u64,
    /// Pods by IP, built by [`Snapshot::index`].
    by_ip: HashMap<std::net::IpAddr, Arc<Pod>>,
    /// AuthorizationPolicies by namespace, built by [`Snapshot::index`]:
    /// a connection only ever consults its pod's namespace and the root.
    authz_by_ns: HashMap<String, Vec<Arc<AuthorizationPolicy>>>,
    /// PeerAuthentications by namespace, likewise.
    peer_auth_by_ns: HashMap<String, Vec<Arc<PeerAuthentication>>>,
}

impl Snapshot {
    /// Builds the lookup indices; sources call it before publishing.
    pub fn index(mut self) -> Self {
        self.by_ip = self
            .pods
            .values()
            .flat_map(|p| p.ips.iter().map(move |ip| (*ip, p.clone())))
            .collect();
        self.authz_by_ns.clear();
        for p in &self.authorization_policies {
            self.authz_by_ns
                .entry(p.meta.namespace.clone())
                .or_default()
                .push(p.clone());
        }
        self.peer_auth_by_ns.clear();
        for p in &self.peer_authentications {
            self.peer_auth_by_ns
                .entry(p.meta.namespace.clone())
                .or_default()
                .push(p.clone());
        }
        self
    }

    /// The policies of the root namespace and of `ns`, without copying.
    fn by_ns<'a, T>(
        &'a self,
        map: &'a HashMap<String, Vec<Arc<T>>>,
        ns: &str,
    ) -> impl Iterator<Item = &'a Arc<T>> + Clone {
        let own = (ns != self.root_namespace).then(|| map.get(ns)).flatten();
        map.get(&self.root_namespace).into_iter().chain(own).flatten()
    }

    /// The mTLS modes of a pod.
    pub fn mtls(&self, pod: &Pod) -> WorkloadMtls {
        crate::policy::mtls_mode(
            self.by_ns(&self.peer_auth_by_ns, &pod.namespace),
            &self.root_namespace,
            pod,
        )
    }

    /// Authorizes a connection to `pod`, consulting only the policies of
    /// its namespace and the root namespace.
    pub fn authorize(&self, pod: &Pod, conn: &ConnInfo) -> Decision {
        crate::policy::authorize(
            self.by_ns(&self.authz_by_ns, &pod.namespace),
            &self.root_namespace,
            pod,
            conn,
        )
    }

    /// The enrolled pod (on any node) that owns `ip`: a destination that
    /// is reached through an HBONE tunnel.
    pub fn enrolled_workload(&self, ip: std::net::IpAddr) -> Option<Arc<Pod>> {
        let pod = self.by_ip.get(&ip)?;
        (enrolment(pod, self.namespaces.get(&pod.namespace)) == Enrolment::Enrolled).then(|| pod.clone())
    }

    /// The pods this node's agent must capture, by UID, with the reasons
    /// for the pods of this node it must not.
    pub fn managed_pods(&self, node: &str) -> (HashMap<String, ManagedPod>, Vec<(String, Enrolment)>) {
        let mut managed = HashMap::new();
        let mut skipped = Vec::new();
        for pod in self.pods.values().filter(|p| p.node_name == node) {
            match enrolment(pod, self.namespaces.get(&pod.namespace)) {
                Enrolment::Enrolled => {
                    let ports = |annotation| workload::annotated_ports(pod, annotation);
                    managed.insert(
                        pod.uid.clone(),
                        ManagedPod {
                            key: pod.key(),
                            uid: pod.uid.clone(),
                            namespace: pod.namespace.clone(),
                            service_account: pod.service_account.clone(),
                            ips: pod.ips.clone(),
                            exclude_inbound: ports(EXCLUDE_INBOUND_ANNOTATION),
                            exclude_outbound: ports(EXCLUDE_OUTBOUND_ANNOTATION),
                        },
                    );
                }
                other => skipped.push((pod.key(), other)),
            }
        }
        (managed, skipped)
    }
}

/// Publishes snapshots to any number of readers.
#[derive(Clone, Debug)]
pub struct Store {
    tx: Arc<watch::Sender<Arc<Snapshot>>>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        Store { tx: Arc::new(tx) }
    }

    /// Replaces the state; readers see the new snapshot as a whole.
    pub fn publish(&self, mut snapshot: Snapshot) {
        snapshot.generation = self.tx.borrow().generation + 1;
        self.tx.send_replace(Arc::new(snapshot));
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// A receiver that wakes on every publish.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }
}
