//! The cluster's objects as the agents read them: Namespace, Node and Pod
//! YAML, written the way an API server returns them.

use std::fmt::Write as _;
use std::net::IpAddr;

/// A pod to place on a node.
#[derive(Clone, Debug, Default)]
pub struct PodSpec {
    /// Pod name, unique within the topology.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Extra pod labels.
    pub labels: Vec<(String, String)>,
    /// Pod annotations.
    pub annotations: Vec<(String, String)>,
    /// Service account.
    pub service_account: String,
    /// Left out of the config entirely (a pod the cluster does not know).
    pub unlisted: bool,
}

impl PodSpec {
    /// A pod in `namespace`.
    pub fn new(name: &str, namespace: &str) -> Self {
        PodSpec {
            name: name.into(),
            namespace: namespace.into(),
            service_account: name.into(),
            ..Default::default()
        }
    }

    /// Adds a label.
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.push((k.into(), v.into()));
        self
    }

    /// Adds an annotation.
    pub fn annotation(mut self, k: &str, v: &str) -> Self {
        self.annotations.push((k.into(), v.into()));
        self
    }
}

/// A pod as placed: its spec plus where it landed.
#[derive(Clone, Debug)]
pub struct PlacedPod {
    /// The spec.
    pub spec: PodSpec,
    /// Kubernetes node name.
    pub node: String,
    /// Pod IPs.
    pub ips: Vec<IpAddr>,
    /// UID.
    pub uid: String,
}

/// All namespaces and pods of a topology.
#[derive(Clone, Debug, Default)]
pub struct Workloads {
    /// (namespace, enrolled with the ambient label).
    pub namespaces: Vec<(String, bool)>,
    /// Pods.
    pub pods: Vec<PlacedPod>,
    /// Nodes: (name, `InternalIP` addresses).
    pub nodes: Vec<(String, Vec<IpAddr>)>,
}

impl Workloads {
    /// Renders the objects as one multi-document YAML file.
    pub fn to_yaml(&self) -> String {
        let mut y = String::new();
        for (ns, ambient) in &self.namespaces {
            let _ = writeln!(y, "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}");
            if *ambient {
                let _ = writeln!(y, "  labels:\n    istio.io/dataplane-mode: ambient");
            }
            y.push_str("---\n");
        }
        for (name, addresses) in &self.nodes {
            let _ = writeln!(
                y,
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nstatus:\n  addresses:"
            );
            for a in addresses {
                let _ = writeln!(y, "  - type: InternalIP\n    address: \"{a}\"");
            }
            y.push_str("---\n");
        }
        for p in self.pods.iter().filter(|p| !p.spec.unlisted) {
            let _ = writeln!(
                y,
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {}",
                p.spec.name, p.spec.namespace, p.uid
            );
            if !p.spec.labels.is_empty() {
                y.push_str("  labels:\n");
                for (k, v) in &p.spec.labels {
                    let _ = writeln!(y, "    {k}: {v:?}");
                }
            }
            if !p.spec.annotations.is_empty() {
                y.push_str("  annotations:\n");
                for (k, v) in &p.spec.annotations {
                    let _ = writeln!(y, "    {k}: {v:?}");
                }
            }
            let _ = writeln!(
                y,
                "spec:\n  nodeName: {}\n  serviceAccountName: {}\nstatus:\n  phase: Running",
                p.node, p.spec.service_account
            );
            if let Some(first) = p.ips.first() {
                let _ = writeln!(y, "  podIP: \"{first}\"\n  podIPs:");
                for ip in &p.ips {
                    let _ = writeln!(y, "  - ip: \"{ip}\"");
                }
            }
            y.push_str("---\n");
        }
        y
    }
}

/// One endpoint of a [`ServiceSpec`], rendered into its EndpointSlices.
#[derive(Clone, Debug)]
pub struct EndpointSpec {
    /// Its addresses (each goes into the slice of its family).
    pub ips: Vec<IpAddr>,
    /// Kubernetes node name.
    pub node: String,
    /// The pod it is (`targetRef`), by name, if any.
    pub pod: Option<String>,
    /// `conditions.ready` (and `serving`).
    pub ready: bool,
    /// `conditions.terminating`.
    pub terminating: bool,
}

impl EndpointSpec {
    /// A ready endpoint: pod `pod` at `ips` on `node`.
    pub fn pod(pod: &str, ips: &[IpAddr], node: &str) -> Self {
        EndpointSpec {
            ips: ips.to_vec(),
            node: node.into(),
            pod: Some(pod.into()),
            ready: true,
            terminating: false,
        }
    }
}

/// A `v1/Service` with its EndpointSlices, as the endpoints controller writes them.
#[derive(Clone, Debug, Default)]
pub struct ServiceSpec {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// `spec.clusterIPs`, first the primary.
    pub cluster_ips: Vec<IpAddr>,
    /// `(name, port, targetPort, endpoint port)`: the slice ports carry the
    /// resolved endpoint port under the Service port's name.
    pub ports: Vec<(String, u16, String, u16)>,
    /// `internalTrafficPolicy: Local`.
    pub local: bool,
    /// `sessionAffinity: ClientIP`.
    pub affinity: bool,
    /// Endpoints.
    pub endpoints: Vec<EndpointSpec>,
    /// `spec.type` (`ClusterIP` when empty).
    pub kind: String,
    /// `spec.ports[].nodePort`, in the order of `ports` (missing ones: none).
    pub node_ports: Vec<u16>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<IpAddr>,
    /// No `spec.selector` (its slices written by hand, as for `kubernetes`).
    pub selectorless: bool,
}

impl ServiceSpec {
    /// Renders the Service and one EndpointSlice per address family.
    pub fn to_yaml(&self) -> String {
        let (ns, name) = (&self.namespace, &self.name);
        let mut y = format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n");
        if let Some(first) = self.cluster_ips.first() {
            let _ = writeln!(y, "  clusterIP: \"{first}\"\n  clusterIPs:");
            for ip in &self.cluster_ips {
                let _ = writeln!(y, "  - \"{ip}\"");
            }
        }
        if !self.selectorless {
            let _ = writeln!(y, "  selector:\n    app: {name}");
        }
        if !self.kind.is_empty() {
            let _ = writeln!(y, "  type: {}", self.kind);
        }
        if !self.external_ips.is_empty() {
            y.push_str("  externalIPs:\n");
            for ip in &self.external_ips {
                let _ = writeln!(y, "  - \"{ip}\"");
            }
        }
        y.push_str("  ports:\n");
        for (i, (pname, port, target, _)) in self.ports.iter().enumerate() {
            let _ = writeln!(
                y,
                "  - name: \"{pname}\"\n    port: {port}\n    protocol: TCP\n    targetPort: {target}"
            );
            if let Some(node_port) = self.node_ports.get(i) {
                let _ = writeln!(y, "    nodePort: {node_port}");
            }
        }
        if self.local {
            y.push_str("  internalTrafficPolicy: Local\n");
        }
        if self.affinity {
            y.push_str("  sessionAffinity: ClientIP\n");
        }
        for (family, v4) in [("IPv4", true), ("IPv6", false)] {
            let _ = writeln!(
                y,
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{}\n  namespace: {ns}\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: {family}\nports:",
                family.to_lowercase()
            );
            for (pname, _, _, endpoint_port) in &self.ports {
                let _ = writeln!(y, "- name: \"{pname}\"\n  port: {endpoint_port}\n  protocol: TCP");
            }
            y.push_str("endpoints:\n");
            for e in &self.endpoints {
                let ips: Vec<String> = e
                    .ips
                    .iter()
                    .filter(|ip| ip.is_ipv4() == v4)
                    .map(|ip| format!("\"{ip}\""))
                    .collect();
                if ips.is_empty() {
                    continue;
                }
                let _ = writeln!(
                    y,
                    "- addresses: [{}]\n  nodeName: {}\n  conditions: {{ready: {}, serving: {}, terminating: {}}}",
                    ips.join(", "),
                    e.node,
                    e.ready,
                    e.ready || e.terminating,
                    e.terminating
                );
                if let Some(pod) = &e.pod {
                    let _ = writeln!(y, "  targetRef: {{kind: Pod, namespace: {ns}, name: {pod}}}");
                }
            }
        }
        y
    }
}
