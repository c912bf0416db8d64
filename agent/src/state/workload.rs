//! Namespaces and pods as the agent understands them, and which pods it
//! manages: the enrolment rules of Istio ambient mode.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// Label that enrols a namespace or pod (`ambient`) or opts a pod out (`none`).
pub(crate) const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Annotation listing inbound ports (comma-separated) the agent never captures.
pub(crate) const EXCLUDE_INBOUND_ANNOTATION: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
/// Annotation listing outbound destination ports the agent never captures.
pub(crate) const EXCLUDE_OUTBOUND_ANNOTATION: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";

/// Annotation (Namespace or Pod; the strictest of them and
/// `--egress-default` applies) choosing what the pod's connections outside
/// the mesh may carry: `passthrough` or `tls-only`.
pub(crate) const EGRESS_ANNOTATION: &str = "nodeward.io/egress";
/// Annotation (Namespace only: a pod's is ignored) listing destinations
/// outside the mesh reached even in plaintext under `tls-only`:
/// `CIDR[:PORT],...`.
pub(crate) const EGRESS_ALLOW_ANNOTATION: &str = "nodeward.io/egress-allow";
/// Annotation (Namespace or Pod; `drop` on either wins) making the pod's
/// `sk_lookup` program drop inbound UDP from outside the pod, excluded
/// inbound ports aside: `drop` or `allow` (the default).
pub(crate) const INBOUND_UDP_ANNOTATION: &str = "nodeward.io/inbound-udp";

/// A Kubernetes namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Namespace {
    /// Name.
    pub(crate) name: String,
    /// Labels.
    pub(crate) labels: BTreeMap<String, String>,
    /// Annotations (the egress settings).
    pub(crate) annotations: BTreeMap<String, String>,
}

/// A Kubernetes pod, reduced to what the mesh needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID; a pod re-created under the same name has a new one.
    pub uid: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// `spec.nodeName`.
    pub node_name: String,
    /// `spec.serviceAccountName`, `default` when empty.
    pub service_account: String,
    /// `spec.hostNetwork`: such pods share the node's namespace and are never enrolled.
    pub host_network: bool,
    /// `status.podIPs` (with `status.podIP`), de-duplicated.
    pub ips: Vec<IpAddr>,
    /// `status.phase`.
    pub phase: String,
    /// `metadata.deletionTimestamp` is set: the pod is being deleted.
    pub deleting: bool,
    /// The UDP and SCTP ports its containers declare (`ports[]` with
    /// `protocol: UDP`/`SCTP`), sorted: what STRICT does not cover, for
    /// `nodeward audit`. Usually empty.
    pub datagram_ports: Vec<DatagramPort>,
}

/// A non-TCP transport a container port may declare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DatagramProtocol {
    /// `protocol: UDP`.
    Udp,
    /// `protocol: SCTP`.
    Sctp,
}

impl DatagramProtocol {
    /// Kubernetes' spelling.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DatagramProtocol::Udp => "UDP",
            DatagramProtocol::Sctp => "SCTP",
        }
    }
}

/// A declared UDP or SCTP container port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DatagramPort {
    /// Its transport.
    pub protocol: DatagramProtocol,
    /// `containerPort`.
    pub port: u16,
}

impl Pod {
    /// `namespace/name`, for logs.
    pub(crate) fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// `Succeeded` or `Failed`: its containers are gone for good.
    pub(crate) fn finished(&self) -> bool {
        matches!(self.phase.as_str(), "Succeeded" | "Failed")
    }

    /// Whether the pod still holds its IPs: not finished and not being
    /// deleted, since either may have given them to a new pod already.
    /// A `hostNetwork` pod holds none of its own: its IPs are its node's
    /// (kube-proxy, CNI daemons and static control-plane pods all report
    /// them), so they identify no workload.
    pub(crate) fn claims_ips(&self) -> bool {
        !self.finished() && !self.deleting && !self.host_network
    }
}

/// Why a pod on this node is or is not managed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Enrolment {
    /// Enrolled by its own label or its namespace's.
    Enrolled,
    /// Not enrolled: no ambient label on pod or namespace.
    NotEnrolled,
    /// Opted out with `istio.io/dataplane-mode=none`.
    OptedOut,
    /// Uses the node's network: capturing it would capture the node.
    HostNetwork,
    /// Finished (`Succeeded`/`Failed`), without an IP yet, or being
    /// deleted while a live pod already holds its IP.
    NotRunning,
}

/// Applies Istio ambient's enrolment rules to a pod.
pub(crate) fn enrolment(pod: &Pod, ns: Option<&Namespace>) -> Enrolment {
    let pod_mode = pod.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str);
    let ns_mode = ns.and_then(|n| n.labels.get(DATAPLANE_MODE_LABEL)).map(String::as_str);
    if pod_mode == Some("none") {
        return Enrolment::OptedOut;
    }
    if pod_mode != Some("ambient") && ns_mode != Some("ambient") {
        return Enrolment::NotEnrolled;
    }
    if pod.host_network {
        return Enrolment::HostNetwork;
    }
    if pod.ips.is_empty() || pod.finished() {
        return Enrolment::NotRunning;
    }
    Enrolment::Enrolled
}

/// A pod this node's agent captures: what the capture and proxy layers need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ManagedPod {
    /// `namespace/name`.
    pub(crate) key: String,
    /// Pod UID.
    pub(crate) uid: String,
    /// Namespace.
    pub(crate) namespace: String,
    /// Service account (the basis of its identity).
    pub(crate) service_account: String,
    /// Pod IPs.
    pub(crate) ips: Vec<IpAddr>,
    /// Inbound ports left uncaptured.
    pub(crate) exclude_inbound: Vec<u16>,
    /// Outbound destination ports left uncaptured.
    pub(crate) exclude_outbound: Vec<u16>,
    /// Inbound UDP from outside the pod is dropped (`nodeward.io/inbound-udp`).
    pub(crate) drop_inbound_udp: bool,
}

/// Parses a port-list annotation (`"8080, 9090"`). Bad entries are reported
/// and skipped, which captures more, never less.
pub(crate) fn parse_port_list(value: &str) -> (Vec<u16>, Vec<String>) {
    let mut ports = Vec::new();
    let mut bad = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part == "*" {
            bad.push(format!("{part:?} (excluding every port is not supported)"));
            continue;
        }
        match part.parse::<u16>() {
            Ok(p) if p != 0 => {
                if !ports.contains(&p) {
                    ports.push(p);
                }
            }
            _ => bad.push(format!("{part:?} is not a port number")),
        }
    }
    ports.sort_unstable();
    (ports, bad)
}

/// What a pod's connections to destinations outside the mesh may carry.
/// Ordered from the most permissive to the strictest: the strictest that
/// any of flag, namespace and pod says applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub(crate) enum EgressMode {
    /// Anything, passed through unchanged (the default: the mesh does not
    /// break what worked before it).
    #[default]
    Passthrough,
    /// Only TLS (the app's first bytes are a ClientHello), unless the
    /// destination is allow-listed.
    TlsOnly,
}

/// Why an egress annotation or flag value was not understood.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EgressParseError {
    /// An egress mode other than `passthrough` or `tls-only`.
    #[error("{0:?} is not an egress mode (passthrough or tls-only)")]
    Mode(String),
    /// An allow-list entry that is not `CIDR[:PORT]`.
    #[error("{0:?} is not CIDR[:PORT] (e.g. 10.0.0.0/8, 192.0.2.1:443, [2001:db8::]/32:443)")]
    Allow(String),
}

impl std::str::FromStr for EgressMode {
    type Err = EgressParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "passthrough" => Ok(EgressMode::Passthrough),
            "tls-only" => Ok(EgressMode::TlsOnly),
            other => Err(EgressParseError::Mode(other.to_string())),
        }
    }
}

/// One allow-list entry: a network and, optionally, one port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EgressAllow {
    /// Network address (canonical: IPv4-mapped addresses are IPv4).
    pub(crate) net: IpAddr,
    /// Prefix length.
    pub(crate) prefix: u8,
    /// The only port allowed, or every port.
    pub(crate) port: Option<u16>,
}

impl std::str::FromStr for EgressAllow {
    type Err = EgressParseError;

    /// `10.0.0.0/8`, `10.0.0.0/8:443`, `192.0.2.1`, `192.0.2.1:443`,
    /// `2001:db8::/32`, `[2001:db8::]/32:443`, `[2001:db8::1]:443`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || EgressParseError::Allow(s.to_string());
        let s = s.trim();
        let (addr, prefix, port) = match s.split_once('/') {
            Some((addr, rest)) => {
                let (prefix, port) = match rest.split_once(':') {
                    Some((p, port)) => (p, Some(port)),
                    None => (rest, None),
                };
                let addr = addr.trim_start_matches('[').trim_end_matches(']');
                let addr: IpAddr = addr.parse().map_err(|_| bad())?;
                (addr, Some(prefix.parse::<u8>().map_err(|_| bad())?), port)
            }
            None => match s.parse::<IpAddr>() {
                Ok(addr) => (addr, None, None),
                Err(_) => {
                    let sa: std::net::SocketAddr = s.parse().map_err(|_| bad())?;
                    (sa.ip(), None, Some(s.rsplit_once(':').map_or("", |(_, p)| p)))
                }
            },
        };
        let addr = addr.to_canonical();
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(bits);
        if prefix > bits {
            return Err(bad());
        }
        let port = match port {
            Some(p) => Some(p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(bad)?),
            None => None,
        };
        Ok(EgressAllow {
            net: addr,
            prefix,
            port,
        })
    }
}

impl EgressAllow {
    /// Whether `dst` is in the network (and on the port, if one is named).
    pub(crate) fn matches(&self, dst: std::net::SocketAddr) -> bool {
        if self.port.is_some_and(|p| p != dst.port()) {
            return false;
        }
        match (self.net, dst.ip().to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(u32::from(n).into(), u32::from(a).into(), self.prefix, 32),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(u128::from(n), u128::from(a), self.prefix, 128),
            _ => false,
        }
    }
}

/// Whether the first `prefix` of `bits` bits of `a` and `b` agree.
fn prefix_eq(a: u128, b: u128, prefix: u8, bits: u32) -> bool {
    let drop = bits - u32::from(prefix);
    drop >= 128 || (a >> drop) == (b >> drop)
}

/// Parses an allow list (`"10.0.0.0/8, 192.0.2.1:443"`). Bad entries are
/// returned apart and skipped, which allows less, never more.
pub(crate) fn parse_allow_list(value: &str) -> (Vec<EgressAllow>, Vec<EgressParseError>) {
    let mut allow = Vec::new();
    let mut bad = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse() {
            Ok(a) => allow.push(a),
            Err(e) => bad.push(e),
        }
    }
    (allow, bad)
}

/// A pod's egress setting, from its annotations and its namespace's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Egress {
    /// The mode.
    pub(crate) mode: EgressMode,
    /// Destinations the annotations allow-list (the flag's come on top).
    pub(crate) allow: Vec<EgressAllow>,
}

/// The egress setting of `pod`: the strictest of `default`
/// (`--egress-default`), the namespace's `nodeward.io/egress` and the
/// pod's, so that whoever may create a pod can only tighten what the
/// operator and the namespace set, never relax it. An invalid value is
/// `tls-only` (fail closed), warned about once per pod and value. Only the
/// namespace's allow list opens destinations (the flag's come on top); a
/// pod's own `nodeward.io/egress-allow` is ignored and warned about once,
/// since a pod that could allow-list itself would make `tls-only` moot.
pub(crate) fn egress(pod: &Pod, ns: Option<&Namespace>, default: EgressMode) -> Egress {
    let ns_annotations = ns.map(|n| &n.annotations);
    // Reported apart (the namespace's and the pod's may both be bad), so
    // that neither warning resets the other's "already said".
    let said = [
        (ns_annotations.and_then(|a| a.get(EGRESS_ANNOTATION)), NS_EGRESS_REPORT),
        (pod.annotations.get(EGRESS_ANNOTATION), EGRESS_ANNOTATION),
    ];
    let mode = said.into_iter().fold(default, |mode, (value, report)| {
        let Some(value) = value else { return mode };
        let said = value.parse().unwrap_or_else(|e: EgressParseError| {
            if first_report(&pod.uid, report, value) {
                tracing::warn!(pod = %pod.key(), annotation = EGRESS_ANNOTATION, value = %value, "{e}; using tls-only");
            }
            EgressMode::TlsOnly
        });
        mode.max(said)
    });
    if let Some(value) = pod.annotations.get(EGRESS_ALLOW_ANNOTATION)
        && first_report(&pod.uid, EGRESS_ALLOW_ANNOTATION, value)
    {
        tracing::warn!(pod = %pod.key(), annotation = EGRESS_ALLOW_ANNOTATION, value = %value, "ignored on a pod: only the namespace's allow list (or --egress-allow) opens destinations");
    }
    let mut allow = Vec::new();
    if let Some(value) = ns_annotations.and_then(|a| a.get(EGRESS_ALLOW_ANNOTATION)) {
        let (mut entries, bad) = parse_allow_list(value);
        if !bad.is_empty() && first_report(&pod.uid, NS_EGRESS_ALLOW_REPORT, value) {
            let bad: Vec<String> = bad.iter().map(ToString::to_string).collect();
            tracing::warn!(pod = %pod.key(), annotation = EGRESS_ALLOW_ANNOTATION, value = %value, "ignoring bad allow-list entries: {}", bad.join(", "));
        }
        allow.append(&mut entries);
    }
    Egress { mode, allow }
}

/// [`REPORTED`]'s keys for the namespace's egress annotations, seen
/// through each of its pods.
const NS_EGRESS_REPORT: &str = "namespace nodeward.io/egress";
const NS_EGRESS_ALLOW_REPORT: &str = "namespace nodeward.io/egress-allow";
const NS_INBOUND_UDP_REPORT: &str = "namespace nodeward.io/inbound-udp";
/// Whether inbound UDP from outside `pod` is dropped: `drop` on the pod or
/// its namespace (the stricter wins, so a namespace's `drop` cannot be
/// undone by the annotation of a pod; the pod's `excludeInboundPorts`
/// still reopen those ports, as they lift STRICT on them, and audit lists
/// them as exceptions); a value other than `drop` or `allow` counts as `drop`
/// (the owner asked for something, and dropping is the safe reading),
/// warned about once per pod and value.
pub(crate) fn drop_inbound_udp(pod: &Pod, ns: Option<&Namespace>) -> bool {
    let values = [
        (pod.annotations.get(INBOUND_UDP_ANNOTATION), INBOUND_UDP_ANNOTATION),
        (
            ns.and_then(|n| n.annotations.get(INBOUND_UDP_ANNOTATION)),
            NS_INBOUND_UDP_REPORT,
        ),
    ];
    let mut drop = false;
    for (value, report) in values {
        let Some(value) = value else { continue };
        match value.trim() {
            "drop" => drop = true,
            "allow" => {}
            other => {
                if first_report(&pod.uid, report, value) {
                    tracing::warn!(pod = %pod.key(), annotation = INBOUND_UDP_ANNOTATION, value = %other, "{other:?} is not drop or allow; using drop");
                }
                drop = true;
            }
        }
    }
    drop
}

/// Bad port annotations already reported, by (pod UID, annotation), with
/// the value reported: the state is re-read on every reconcile tick, and a
/// bad value is worth one warning, not one every tick.
static REPORTED: Mutex<BTreeMap<(String, &'static str), String>> = Mutex::new(BTreeMap::new());

/// Entries kept in [`REPORTED`] at most; past that it starts over (a
/// value may then be reported once more), so pod churn cannot grow it.
const REPORTED_MAX: usize = 4096;

/// The ports a pod's port-list `annotation` names. Bad entries are skipped
/// (which captures more, never less) and warned about once per pod and
/// value: again only if the value changes.
pub(crate) fn annotated_ports(pod: &Pod, annotation: &'static str) -> Vec<u16> {
    let value = pod.annotations.get(annotation).map(String::as_str).unwrap_or("");
    let (ports, bad) = parse_port_list(value);
    if !bad.is_empty() && first_report(&pod.uid, annotation, value) {
        tracing::warn!(pod = %pod.key(), annotation, value, "ignoring bad port entries: {}", bad.join(", "));
    }
    ports
}

/// Records that `value` of the pod's `annotation` is being reported;
/// false if it already was.
fn first_report(uid: &str, annotation: &'static str, value: &str) -> bool {
    let mut reported = REPORTED.lock().unwrap_or_else(|e| e.into_inner());
    let key = (uid.to_string(), annotation);
    if reported.get(&key).is_some_and(|v| v == value) {
        return false;
    }
    if reported.len() >= REPORTED_MAX {
        reported.clear();
    }
    reported.insert(key, value.to_string());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(labels: &[(&str, &str)]) -> Pod {
        Pod {
            namespace: "shop".into(),
            name: "web".into(),
            uid: "u1".into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            node_name: "n1".into(),
            ips: vec!["10.0.0.2".parse().unwrap()],
            phase: "Running".into(),
            ..Default::default()
        }
    }

    fn ns(ambient: bool) -> Namespace {
        let mut labels = BTreeMap::new();
        if ambient {
            labels.insert(DATAPLANE_MODE_LABEL.to_string(), "ambient".to_string());
        }
        Namespace {
            name: "shop".into(),
            labels,
            ..Default::default()
        }
    }

    #[test]
    fn enrolment_follows_istio_ambient_labels() {
        let cases = [
            (
                "namespace label enrols its pods",
                pod(&[]),
                Some(ns(true)),
                Enrolment::Enrolled,
            ),
            (
                "pod label enrols alone",
                pod(&[(DATAPLANE_MODE_LABEL, "ambient")]),
                Some(ns(false)),
                Enrolment::Enrolled,
            ),
            ("no label anywhere", pod(&[]), Some(ns(false)), Enrolment::NotEnrolled),
            (
                "unknown namespace, no pod label",
                pod(&[]),
                None,
                Enrolment::NotEnrolled,
            ),
            (
                "pod opts out of an ambient namespace",
                pod(&[(DATAPLANE_MODE_LABEL, "none")]),
                Some(ns(true)),
                Enrolment::OptedOut,
            ),
        ];
        for (name, p, n, want) in cases {
            assert_eq!(enrolment(&p, n.as_ref()), want, "{name}");
        }
    }

    #[test]
    fn host_network_and_finished_pods_are_never_enrolled() {
        let mut p = pod(&[]);
        p.host_network = true;
        assert_eq!(enrolment(&p, Some(&ns(true))), Enrolment::HostNetwork);
        let mut p = pod(&[]);
        p.phase = "Succeeded".into();
        assert_eq!(enrolment(&p, Some(&ns(true))), Enrolment::NotRunning);
        let mut p = pod(&[]);
        p.ips.clear();
        assert_eq!(enrolment(&p, Some(&ns(true))), Enrolment::NotRunning);
    }

    /// Counts WARN events.
    struct CountWarnings(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountWarnings {
        fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            if *e.metadata().level() == tracing::Level::WARN {
                self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    #[test]
    fn a_bad_port_annotation_is_reported_once_not_on_every_reconcile() {
        use tracing_subscriber::layer::SubscriberExt;
        let warnings = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry().with(CountWarnings(warnings.clone()));
        let mut p = pod(&[]);
        p.uid = "uid-bad-annotation".into();
        p.annotations
            .insert(EXCLUDE_INBOUND_ANNOTATION.into(), "abc,9100".into());
        let mut snap = crate::state::Snapshot::default();
        snap.namespaces.insert("shop".into(), ns(true));
        snap.pods.insert(p.key(), std::sync::Arc::new(p.clone()));
        let count = || warnings.load(std::sync::atomic::Ordering::Relaxed);
        tracing::subscriber::with_default(subscriber, || {
            for _tick in 0..5 {
                let (managed, _) = snap.managed_pods("n1");
                assert_eq!(managed["uid-bad-annotation"].exclude_inbound, vec![9100]);
            }
            assert_eq!(count(), 1, "one warning for five reconciles");
            // A new bad value is news.
            p.annotations
                .insert(EXCLUDE_INBOUND_ANNOTATION.into(), "abc,xyz".into());
            snap.pods.insert(p.key(), std::sync::Arc::new(p.clone()));
            snap.managed_pods("n1");
            snap.managed_pods("n1");
            assert_eq!(count(), 2);
        });
    }

    #[test]
    fn inbound_udp_drop_is_the_stricter_of_pod_and_namespace_and_a_bad_value_drops() {
        let with = |v: Option<&str>| {
            let mut p = pod(&[]);
            if let Some(v) = v {
                p.annotations.insert(INBOUND_UDP_ANNOTATION.into(), v.into());
            }
            p
        };
        let ns_with = |v: Option<&str>| {
            let mut n = ns(true);
            if let Some(v) = v {
                n.annotations.insert(INBOUND_UDP_ANNOTATION.into(), v.into());
            }
            n
        };
        let cases = [
            (None, None, false),
            (Some("drop"), None, true),
            (None, Some("drop"), true),
            (Some("allow"), Some("drop"), true),
            (Some("drop"), Some("allow"), true),
            (Some("allow"), Some("allow"), false),
            (Some("dorp"), None, true),
        ];
        for (p, n, want) in cases {
            assert_eq!(
                drop_inbound_udp(&with(p), Some(&ns_with(n))),
                want,
                "pod {p:?} namespace {n:?}"
            );
        }
        assert!(!drop_inbound_udp(&with(None), None));
    }

    #[test]
    fn port_lists_skip_bad_entries_and_report_them() {
        let (ports, bad) = parse_port_list("8080, 9090,8080,,x,0,70000,*");
        assert_eq!(ports, vec![8080, 9090]);
        assert_eq!(bad.len(), 4, "{bad:?}");
    }
}
