//! The cluster's objects as the agents read them: Namespace and Pod YAML,
//! written the way an API server returns them.

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
