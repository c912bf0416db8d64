//! The one in-memory state every part of the agent reads.
//!
//! A config source (the YAML directory now, the Kubernetes API later)
//! publishes complete, immutable snapshots; readers take the current one with
//! a cheap `Arc` clone and never see a half-applied change.

#![forbid(unsafe_code)]

pub(crate) mod node;
pub(crate) mod service;
pub mod workload;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::sync::watch;

use crate::policy::model::{AuthorizationPolicy, PeerAuthentication};
use crate::policy::{ConnInfo, Decision, TrustDomains, WorkloadMtls};

use service::{Balancer, EndpointSlice, Service, ServiceTarget};
use workload::{
    EXCLUDE_INBOUND_ANNOTATION, EXCLUDE_OUTBOUND_ANNOTATION, Enrolment, ManagedPod, Namespace, Pod, enrolment,
};

/// Everything the agent knows about the cluster at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Namespaces by name.
    pub(crate) namespaces: HashMap<String, Namespace>,
    /// Pods by `namespace/name`.
    pub(crate) pods: BTreeMap<String, Arc<Pod>>,
    /// PeerAuthentications.
    pub(crate) peer_authentications: Vec<Arc<PeerAuthentication>>,
    /// AuthorizationPolicies.
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    /// Istio's root namespace: its policies apply mesh-wide.
    pub root_namespace: String,
    /// The trust domains policies treat as local.
    pub(crate) trust_domains: TrustDomains,
    /// Services (v1).
    pub(crate) services: Vec<Arc<Service>>,
    /// EndpointSlices (`discovery.k8s.io/v1`).
    pub(crate) endpoint_slices: Vec<Arc<EndpointSlice>>,
    /// Nodes (their addresses, for `nodePort`s).
    pub(crate) nodes: Vec<Arc<node::Node>>,
    /// Increases with every published snapshot.
    pub(crate) generation: u64,
    /// What each Service address reaches, built by [`Snapshot::index`].
    by_service_addr: service::Targets,
    /// Every node's addresses, built by [`Snapshot::index`]: where a
    /// nodePort is answered.
    node_addresses: HashSet<IpAddr>,
    /// Who holds each IP, built by [`Snapshot::index`] from live pods only.
    by_ip: HashMap<IpAddr, IpClaim>,
    /// AuthorizationPolicies by namespace, built by [`Snapshot::index`]:
    /// a connection only ever consults its pod's namespace and the root.
    authz_by_ns: HashMap<String, Vec<Arc<AuthorizationPolicy>>>,
    /// PeerAuthentications by namespace, likewise.
    peer_auth_by_ns: HashMap<String, Vec<Arc<PeerAuthentication>>>,
}

/// Who holds an IP according to the state.
#[derive(Clone, Debug, PartialEq, Eq)]
enum IpClaim {
    /// One live pod.
    Pod(Arc<Pod>),
    /// Several live pods (`namespace/name`, sorted): the state cannot say
    /// which one is there now.
    Ambiguous(Vec<String>),
}

/// Where a connection to an IP goes, as far as the mesh is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Destination {
    /// An enrolled pod: reached through an HBONE tunnel, expecting its identity.
    Enrolled(Arc<Pod>),
    /// Not an enrolled pod (a pod outside the mesh, or no pod at all).
    Outside,
    /// Several live pods claim the IP (`namespace/name` of each): neither
    /// an identity nor plaintext is safe, the connection is refused.
    Ambiguous(Vec<String>),
}

impl Snapshot {
    /// Builds the lookup indices; sources call it before publishing.
    ///
    /// Only live pods claim their IPs: a finished pod (`Succeeded`,
    /// `Failed`) or one being deleted has given its IP back, and a new pod
    /// may already hold it. Two live pods holding one IP make it ambiguous.
    /// A `hostNetwork` pod claims nothing: its IPs are its node's, shared
    /// by every such pod there, and traffic to them is node traffic.
    pub fn index(mut self) -> Self {
        let mut claims: HashMap<IpAddr, Vec<Arc<Pod>>> = HashMap::new();
        for p in self.pods.values().filter(|p| p.claims_ips()) {
            for ip in &p.ips {
                claims.entry(ip.to_canonical()).or_default().push(p.clone());
            }
        }
        self.by_ip = claims
            .into_iter()
            .map(|(ip, mut pods)| {
                let claim = if pods.len() == 1 {
                    IpClaim::Pod(pods.remove(0))
                } else {
                    let mut keys: Vec<String> = pods.iter().map(|p| p.key()).collect();
                    keys.sort();
                    tracing::warn!(%ip, pods = ?keys, "IP claimed by several live pods; connections to it are refused until one goes");
                    IpClaim::Ambiguous(keys)
                };
                (ip, claim)
            })
            .collect();
        self.node_addresses = self
            .nodes
            .iter()
            .flat_map(|n| n.addresses.iter().map(|ip| ip.to_canonical()))
            .collect();
        self.by_service_addr = service::targets(
            &self.services,
            &self.endpoint_slices,
            |ip| self.by_ip.contains_key(&ip.to_canonical()),
            |ip| self.node_addresses.contains(&ip.to_canonical()),
        );
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
    pub(crate) fn mtls(&self, pod: &Pod) -> WorkloadMtls {
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
            &self.trust_domains,
            pod,
            conn,
        )
    }

    /// What a connection to `ip` reaches: an enrolled pod (on any node),
    /// something outside the mesh, or an IP several live pods claim.
    pub(crate) fn destination(&self, ip: IpAddr) -> Destination {
        match self.by_ip.get(&ip.to_canonical()) {
            None => Destination::Outside,
            Some(IpClaim::Ambiguous(keys)) => Destination::Ambiguous(keys.clone()),
            Some(IpClaim::Pod(pod)) => {
                if enrolment(pod, self.namespaces.get(&pod.namespace)) == Enrolment::Enrolled {
                    Destination::Enrolled(pod.clone())
                } else {
                    Destination::Outside
                }
            }
        }
    }

    /// The Service a connection to `dst` (a ClusterIP, external IP or
    /// load-balancer IP and Service port, or a node address and nodePort)
    /// reaches, with its endpoints for that port; `None` for any other
    /// address, which is then a pod or outside the mesh.
    ///
    /// A node address that a pod of the pod network claims (stale state)
    /// is that pod's, as for external IPs.
    pub(crate) fn service(&self, dst: SocketAddr) -> Option<Arc<ServiceTarget>> {
        let ip = dst.ip().to_canonical();
        if let Some(t) = self.by_service_addr.by_addr.get(&SocketAddr::new(ip, dst.port())) {
            return Some(t.clone());
        }
        if self.node_addresses.contains(&ip) && !self.by_ip.contains_key(&ip) {
            return self
                .by_service_addr
                .by_node_port
                .get(&(dst.port(), ip.is_ipv4()))
                .cloned();
        }
        None
    }

    /// The node a pod of the state runs on (`namespace/name`).
    pub(crate) fn node_of(&self, pod: &str) -> Option<&str> {
        self.pods.get(pod).map(|p| p.node_name.as_str())
    }

    /// The enrolled pod (on any node) that owns `ip`: a destination that
    /// is reached through an HBONE tunnel. `None` also for an ambiguous
    /// IP; callers that could send plaintext use [`Snapshot::destination`].
    /// Whether a live pod claims `ip` (one or several: a pod's address,
    /// not an unknown one).
    pub(crate) fn claims_ip(&self, ip: IpAddr) -> bool {
        self.by_ip.contains_key(&ip.to_canonical())
    }

    pub(crate) fn enrolled_workload(&self, ip: IpAddr) -> Option<Arc<Pod>> {
        match self.destination(ip) {
            Destination::Enrolled(pod) => Some(pod),
            Destination::Outside | Destination::Ambiguous(_) => None,
        }
    }

    /// Whether a live pod other than `pod` claims one of `pod`'s IPs.
    fn ip_reused(&self, pod: &Pod) -> bool {
        pod.ips.iter().any(|ip| match self.by_ip.get(&ip.to_canonical()) {
            Some(IpClaim::Pod(other)) => other.uid != pod.uid,
            Some(IpClaim::Ambiguous(_)) => true,
            None => false,
        })
    }

    /// The pods this node's agent must capture, by UID, with the reasons
    /// for the pods of this node it must not.
    pub(crate) fn managed_pods(&self, node: &str) -> (HashMap<String, ManagedPod>, Vec<(String, Enrolment)>) {
        self.managed_pods_given(node, &HashMap::new())
    }

    /// [`Snapshot::managed_pods`], with the addresses the container
    /// runtime gave pods' current sandboxes (by UID, from their CNI ADD)
    /// in place of the source's. On a real node the kubelet reports a
    /// sandbox's IP to the API server only after the sandbox is up, so for
    /// a moment the source has no address for a new pod, or the previous
    /// sandbox's for a pod whose sandbox was re-created; the app may
    /// already be connecting. The runtime's result is what the namespace
    /// holds (the API's `podIPs` are the kubelet's copy of it), so it
    /// stands while the runtime's record of the sandbox does: a late or
    /// stale source never re-captures the pod, which would leave it
    /// uncaptured between release and capture.
    pub(crate) fn managed_pods_given(
        &self,
        node: &str,
        runtime_ips: &HashMap<String, Vec<IpAddr>>,
    ) -> (HashMap<String, ManagedPod>, Vec<(String, Enrolment)>) {
        let mut managed = HashMap::new();
        let mut skipped = Vec::new();
        for pod in self.pods.values().filter(|p| p.node_name == node) {
            let given = runtime_ips
                .get(&pod.uid)
                .filter(|ips| !ips.is_empty() && !pod.finished() && !pod.deleting);
            let pod_ips = given.unwrap_or(&pod.ips);
            let with_ips;
            let pod = if given.is_some() {
                with_ips = Pod {
                    ips: pod_ips.clone(),
                    ..(**pod).clone()
                };
                &with_ips
            } else {
                &**pod
            };
            let enrolled = match enrolment(pod, self.namespaces.get(&pod.namespace)) {
                // A pod being deleted whose IP a live pod already holds is
                // gone: capturing "it" would capture the new pod under the
                // old pod's identity.
                Enrolment::Enrolled if !pod.claims_ips() && self.ip_reused(pod) => Enrolment::NotRunning,
                other => other,
            };
            match enrolled {
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
                            drop_inbound_udp: workload::drop_inbound_udp(pod, self.namespaces.get(&pod.namespace)),
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
pub(crate) struct Store {
    tx: Arc<watch::Sender<Arc<Snapshot>>>,
    /// Endpoint choice for Services: its open-connection counts and
    /// affinities outlive any one snapshot.
    balancer: Arc<Balancer>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty store.
    pub(crate) fn new() -> Self {
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        Store {
            tx: Arc::new(tx),
            balancer: Arc::default(),
        }
    }

    /// Replaces the state; readers see the new snapshot as a whole.
    pub(crate) fn publish(&self, mut snapshot: Snapshot) {
        snapshot.generation = self.tx.borrow().generation + 1;
        self.tx.send_replace(Arc::new(snapshot));
    }

    /// The current snapshot.
    pub(crate) fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// The node's endpoint chooser for Services.
    pub(crate) fn balancer(&self) -> &Arc<Balancer> {
        &self.balancer
    }

    /// A receiver that wakes on every publish.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::workload::DATAPLANE_MODE_LABEL;
    use super::*;

    const IP: &str = "10.0.0.7";

    /// An enrolled pod of `shop` holding `IP`.
    fn pod(name: &str, sa: &str, phase: &str, deleting: bool) -> Pod {
        Pod {
            namespace: "shop".into(),
            name: name.into(),
            uid: name.into(),
            node_name: "n2".into(),
            service_account: sa.into(),
            ips: vec![IP.parse().unwrap()],
            phase: phase.into(),
            deleting,
            ..Default::default()
        }
    }

    fn snapshot(pods: Vec<Pod>) -> Snapshot {
        let mut snap = Snapshot::default();
        snap.namespaces.insert(
            "shop".into(),
            Namespace {
                name: "shop".into(),
                labels: [(DATAPLANE_MODE_LABEL.to_string(), "ambient".to_string())].into(),
                ..Default::default()
            },
        );
        for p in pods {
            snap.pods.insert(p.key(), Arc::new(p));
        }
        snap.index()
    }

    /// Which pod a connection to `IP` is tunnelled to, by `namespace/name`.
    fn tunnelled_to(snap: &Snapshot) -> Option<String> {
        snap.enrolled_workload(IP.parse().unwrap()).map(|p| p.key())
    }

    #[test]
    fn only_live_pods_claim_their_ip() {
        // The old pods sort after the new one, so "the last entry wins"
        // would pick them.
        let cases = [
            (
                "a finished (Succeeded) pod gives its IP to the new pod",
                vec![
                    pod("new", "web", "Running", false),
                    pod("old", "db", "Succeeded", false),
                ],
                Some("shop/new"),
            ),
            (
                "a Failed pod gives its IP to the new pod",
                vec![pod("new", "web", "Pending", false), pod("old", "db", "Failed", false)],
                Some("shop/new"),
            ),
            (
                "a pod being deleted gives its IP to the new pod",
                vec![pod("new", "web", "Running", false), pod("old", "db", "Running", true)],
                Some("shop/new"),
            ),
            (
                "a finished pod alone does not make its IP a mesh destination",
                vec![pod("old", "db", "Succeeded", false)],
                None,
            ),
            (
                "a pod being deleted alone does not either",
                vec![pod("old", "db", "Running", true)],
                None,
            ),
            (
                "one live pod owns its IP",
                vec![pod("new", "web", "Running", false)],
                Some("shop/new"),
            ),
        ];
        for (name, pods, want) in cases {
            assert_eq!(tunnelled_to(&snapshot(pods)).as_deref(), want, "{name}");
        }
    }

    #[test]
    fn a_deleted_pod_whose_ip_is_reused_on_its_node_is_no_longer_captured() {
        let mut old = pod("old", "db", "Running", true);
        let mut new = pod("new", "web", "Running", false);
        old.node_name = "n1".into();
        new.node_name = "n1".into();
        let snap = snapshot(vec![new, old.clone()]);
        let (managed, skipped) = snap.managed_pods("n1");
        assert_eq!(managed.keys().collect::<Vec<_>>(), vec!["new"]);
        assert_eq!(skipped, vec![("shop/old".to_string(), Enrolment::NotRunning)]);
        // Still terminating with nobody else on its IP: still captured.
        let (managed, _) = snapshot(vec![old]).managed_pods("n1");
        assert!(managed.contains_key("old"));
    }

    #[test]
    fn a_pod_the_runtime_handed_over_is_managed_with_its_current_sandboxs_addresses_whatever_the_source_says() {
        let runtime: HashMap<String, Vec<IpAddr>> = [
            ("pending".to_string(), vec!["10.0.0.9".parse().unwrap()]),
            ("running".to_string(), vec!["10.0.0.8".parse().unwrap()]),
            ("done".to_string(), vec!["10.0.0.6".parse().unwrap()]),
        ]
        .into();
        let mut pending = pod("pending", "web", "Pending", false);
        pending.ips.clear();
        let mut done = pod("done", "web", "Succeeded", false);
        done.ips.clear();
        let mut gone = pod("gone", "web", "Pending", true);
        gone.ips.clear();
        let running = pod("running", "web", "Running", false);
        let snap = snapshot(vec![pending.clone(), done, gone, running]);
        let (managed, _) = snap.managed_pods_given("n2", &runtime);
        let ips = |uid: &str| managed.get(uid).map(|p| p.ips.clone());
        assert_eq!(
            ips("pending"),
            Some(vec!["10.0.0.9".parse().unwrap()]),
            "the runtime's address stands in"
        );
        assert_eq!(
            ips("running"),
            Some(vec!["10.0.0.8".parse().unwrap()]),
            "a stale address from the source (the previous sandbox's) does not win over the runtime's"
        );
        // Without the runtime's word the source's address is the pod's.
        let (managed, _) = snap.managed_pods("n2");
        assert_eq!(
            managed.get("running").map(|p| p.ips.clone()),
            Some(vec![IP.parse().unwrap()])
        );
        assert_eq!(ips("done"), None, "a finished pod is not brought back");
        assert_eq!(ips("gone"), None, "nor one being deleted");
        // Without the runtime's word, a pod without an address waits.
        let (managed, skipped) = snapshot(vec![pending]).managed_pods("n2");
        assert!(managed.is_empty());
        assert_eq!(skipped, vec![("shop/pending".to_string(), Enrolment::NotRunning)]);
    }

    #[test]
    fn an_ip_two_live_pods_claim_is_ambiguous_and_never_identified() {
        let snap = snapshot(vec![
            pod("a", "web", "Running", false),
            pod("b", "db", "Pending", false),
        ]);
        let ip: IpAddr = IP.parse().unwrap();
        assert_eq!(
            snap.destination(ip),
            Destination::Ambiguous(vec!["shop/a".into(), "shop/b".into()])
        );
        assert_eq!(tunnelled_to(&snap), None, "no identity is guessed for an ambiguous IP");
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        assert!(matches!(snap.destination(mapped), Destination::Ambiguous(_)));
    }

    #[test]
    fn host_network_pods_claim_no_ip_so_the_node_ip_is_outside_the_mesh() {
        let host = |name: &str| {
            let mut p = pod(name, name, "Running", false);
            p.host_network = true;
            p
        };
        let snap = snapshot(vec![host("kube-proxy"), host("cni")]);
        let ip: IpAddr = IP.parse().unwrap();
        assert_eq!(
            snap.destination(ip),
            Destination::Outside,
            "node traffic: not ambiguous, not a workload"
        );
        // Beside a pod of the pod network holding the IP (stale state), the
        // pod is the one identified, as if the host pods were not there.
        let snap = snapshot(vec![host("kube-proxy"), pod("web", "web", "Running", false)]);
        assert_eq!(tunnelled_to(&snap).as_deref(), Some("shop/web"));
    }

    #[test]
    fn a_service_backed_by_host_network_pods_resolves_to_the_node_ip_outside_the_mesh() {
        use service::{Endpoint, ServicePort, SlicePort};
        let mut host = pod("apiserver", "apiserver", "Running", false);
        host.host_network = true;
        let mut snap = snapshot(vec![host]);
        let node_ip: IpAddr = IP.parse().unwrap();
        snap.nodes.push(Arc::new(node::Node {
            name: "n2".into(),
            addresses: vec![node_ip],
        }));
        snap.services.push(Arc::new(Service {
            namespace: "shop".into(),
            name: "api".into(),
            cluster_ips: vec!["10.96.0.1".parse().unwrap()],
            ports: vec![ServicePort {
                name: "https".into(),
                port: 443,
                target_port: "6443".into(),
                protocol: "TCP".into(),
                node_port: Some(30443),
            }],
            kind: "NodePort".into(),
            has_selector: true,
            internal_local: false,
            affinity: None,
            external_ips: vec![],
            load_balancer_ips: vec![],
        }));
        snap.endpoint_slices.push(Arc::new(EndpointSlice {
            namespace: "shop".into(),
            name: "api-1".into(),
            service: "api".into(),
            address_type: "IPv4".into(),
            ports: vec![SlicePort {
                name: "https".into(),
                port: Some(6443),
                protocol: "TCP".into(),
            }],
            endpoints: vec![Endpoint {
                addresses: vec![node_ip],
                ready: true,
                serving: true,
                terminating: false,
                node_name: "n2".into(),
                pod: None,
            }],
        }));
        let snap = snap.index();
        let vip = snap.service("10.96.0.1:443".parse().unwrap()).expect("resolved");
        assert_eq!(vip.candidates[0].addr, SocketAddr::new(node_ip, 6443));
        assert_eq!(snap.destination(node_ip), Destination::Outside, "reached in plaintext");
        let node_port = snap
            .service(SocketAddr::new(node_ip, 30443))
            .expect("nodePort resolved");
        assert_eq!(node_port.candidates, vip.candidates);
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        assert!(snap.service(SocketAddr::new(mapped, 30443)).is_some(), "IPv4-mapped");
        assert!(
            snap.service("10.0.0.8:30443".parse().unwrap()).is_none(),
            "only a node's address"
        );
        // A pod of the pod network reporting the node's IP (stale state)
        // keeps it: the nodePort is not resolved there.
        let mut snap = snap;
        let web = pod("web", "web", "Running", false);
        snap.pods.insert(web.key(), Arc::new(web));
        let snap = snap.index();
        assert!(snap.service(SocketAddr::new(node_ip, 30443)).is_none());
    }
}
