//! mTLS checks (DISABLE, PERMISSIVE in production, enrolled namespaces
//! without STRICT, invalid PeerAuthentications) and the exceptions
//! register (opted-out pods, excluded ports).

#![forbid(unsafe_code)]

use std::collections::BTreeSet;

use super::{EXCEPTION_REASON_ANNOTATION, Finding, Kind, Production, Severity};
use crate::policy::model::{Mode, PeerAuthentication};
use crate::state::Snapshot;
use crate::state::workload::{
    DATAPLANE_MODE_LABEL, DatagramProtocol, EXCLUDE_INBOUND_ANNOTATION, EXCLUDE_OUTBOUND_ANNOTATION, Enrolment,
    INBOUND_UDP_ANNOTATION, Pod, drop_inbound_udp, enrolment, parse_port_list,
};

fn object(p: &PeerAuthentication) -> String {
    format!("PeerAuthentication {}", p.meta.key())
}

/// The modes a PeerAuthentication sets, workload mode and port modes.
fn modes(p: &PeerAuthentication) -> impl Iterator<Item = Mode> + '_ {
    std::iter::once(p.mode).chain(p.port_modes.values().copied())
}

/// DISABLE, PERMISSIVE in production, enrolled namespaces with no STRICT,
/// invalid PeerAuthentications.
pub(super) fn check(snap: &Snapshot, production: &Production, out: &mut Vec<Finding>) {
    for p in &snap.peer_authentications {
        if let Some(e) = &p.meta.error {
            out.push(Finding::new(
                Severity::High,
                Kind::InvalidPolicy,
                object(p),
                format!("invalid, so it counts as STRICT for everything it selects: {e}"),
            ));
            continue;
        }
        let ports = |m: Mode| -> Vec<String> {
            p.port_modes
                .iter()
                .filter(|(_, pm)| **pm == m)
                .map(|(port, _)| port.to_string())
                .collect()
        };
        let at = |m: Mode| {
            let ports = ports(m);
            match (p.mode == m, ports.is_empty()) {
                (true, true) => "for every port it selects".to_string(),
                (true, false) => format!("for every port it selects (and port-level on {})", ports.join(", ")),
                (false, _) => format!("on port {}", ports.join(", ")),
            }
        };
        if modes(p).any(|m| m == Mode::Disable) {
            out.push(Finding::new(
                Severity::High,
                Kind::MtlsDisable,
                object(p),
                format!(
                    "mTLS DISABLE {}: plaintext accepted, no peer identity",
                    at(Mode::Disable)
                ),
            ));
        }
        let ns = &p.meta.namespace;
        let prod = if *ns == snap.root_namespace && p.meta.selector.is_none() {
            // A mesh-wide policy reaches the production namespaces whose
            // namespace-level mode it decides.
            snap.namespaces
                .keys()
                .chain(snap.pods.values().map(|p| &p.namespace))
                .filter(|n| production.matches(n, snap.namespaces.get(*n)))
                .any(|n| namespace_mode(snap, n) == Mode::Permissive)
        } else {
            production.matches(ns, snap.namespaces.get(ns))
        };
        if prod && modes(p).any(|m| m == Mode::Permissive) {
            out.push(Finding::new(
                Severity::Medium,
                Kind::PermissiveInProduction,
                object(p),
                format!(
                    "PERMISSIVE {} in a production namespace: plaintext accepted",
                    at(Mode::Permissive)
                ),
            ));
        }
    }
    for ns in enrolled_namespaces(snap) {
        if !any_strict(snap, &ns) {
            out.push(Finding::new(
                Severity::Medium,
                Kind::NoStrict,
                format!("Namespace {ns}"),
                "enrolled, but no STRICT applies to it or any of its workloads: plaintext is accepted everywhere"
                    .into(),
            ));
        }
    }
}

/// Namespaces labelled ambient, and those of pods enrolled by their own label.
fn enrolled_namespaces(snap: &Snapshot) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = snap
        .namespaces
        .values()
        .filter(|n| n.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some("ambient"))
        .map(|n| n.name.clone())
        .collect();
    out.extend(
        snap.pods
            .values()
            .filter(|p| p.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some("ambient"))
            .map(|p| p.namespace.clone()),
    );
    out.remove(&snap.root_namespace);
    out
}

/// Whether STRICT applies anywhere in `ns`: by inheritance at namespace
/// level (mesh-wide, or its own namespace-wide policy), or set by one of
/// its PeerAuthentications (mode or port; an invalid one counts as STRICT,
/// as the agent treats it).
fn any_strict(snap: &Snapshot, ns: &str) -> bool {
    namespace_mode(snap, ns) == Mode::Strict
        || snap
            .peer_authentications
            .iter()
            .filter(|p| p.meta.namespace == ns)
            .any(|p| p.meta.error.is_some() || modes(p).any(|m| m == Mode::Strict))
}

/// The mode of `ns` at namespace level: what a pod no workload policy
/// selects gets.
fn namespace_mode(snap: &Snapshot, ns: &str) -> Mode {
    let unlabelled = Pod {
        namespace: ns.to_string(),
        ..Default::default()
    };
    crate::policy::mtls_mode(&snap.peer_authentications, &snap.root_namespace, &unlabelled).default
}

/// The exceptions register: opted-out pods and pods with excluded ports,
/// medium without [`EXCEPTION_REASON_ANNOTATION`], info with it.
pub(super) fn exceptions(snap: &Snapshot, out: &mut Vec<Finding>) {
    for pod in snap.pods.values() {
        let mut what = Vec::new();
        if enrolment(pod, snap.namespaces.get(&pod.namespace)) == Enrolment::OptedOut {
            what.push(format!("opted out ({DATAPLANE_MODE_LABEL}=none)"));
        }
        for (annotation, direction) in [
            (EXCLUDE_INBOUND_ANNOTATION, "inbound"),
            (EXCLUDE_OUTBOUND_ANNOTATION, "outbound"),
        ] {
            let (ports, _) = parse_port_list(pod.annotations.get(annotation).map(String::as_str).unwrap_or(""));
            if !ports.is_empty() {
                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                what.push(format!("{direction} ports {} not captured", list.join(", ")));
            }
        }
        if what.is_empty() {
            continue;
        }
        let reason = pod
            .annotations
            .get(EXCEPTION_REASON_ANNOTATION)
            .map(|r| r.trim())
            .filter(|r| !r.is_empty());
        let object = format!("Pod {}", pod.key());
        out.push(match reason {
            Some(r) => Finding::new(
                Severity::Info,
                Kind::DocumentedException,
                object,
                format!("{}; reason: {r}", what.join("; ")),
            ),
            None => Finding::new(
                Severity::Medium,
                Kind::UndocumentedException,
                object,
                format!(
                    "{}: outside mTLS and policy, with no {EXCEPTION_REASON_ANNOTATION} annotation",
                    what.join("; ")
                ),
            ),
        });
    }
}

/// Enrolled pods whose containers declare UDP or SCTP ports where their
/// mode is STRICT: STRICT covers TCP only, so those ports take plaintext
/// from anyone. A UDP port `nodeward.io/inbound-udp: drop` closes to the
/// outside (not excluded) is not reported; SCTP always is (`sk_lookup`
/// never sees it). Audit reads the config only, so what it can see is what
/// the pod spec declares; `nodeward verify` lists the sockets really open.
pub(super) fn datagram_ports(snap: &Snapshot, out: &mut Vec<Finding>) {
    for pod in snap.pods.values().filter(|p| !p.datagram_ports.is_empty()) {
        let ns = snap.namespaces.get(&pod.namespace);
        if !matches!(enrolment(pod, ns), Enrolment::Enrolled | Enrolment::NotRunning) {
            continue;
        }
        let mtls = snap.mtls(pod);
        let dropped = drop_inbound_udp(pod, ns);
        let (excluded, _) = parse_port_list(
            pod.annotations
                .get(EXCLUDE_INBOUND_ANNOTATION)
                .map(String::as_str)
                .unwrap_or(""),
        );
        let open = |protocol: DatagramProtocol| -> Vec<String> {
            pod.datagram_ports
                .iter()
                .filter(|d| d.protocol == protocol && mtls.mode(d.port) == Mode::Strict)
                .filter(|d| protocol == DatagramProtocol::Sctp || !dropped || excluded.contains(&d.port))
                .map(|d| d.port.to_string())
                .collect()
        };
        let what: Vec<String> = [DatagramProtocol::Udp, DatagramProtocol::Sctp]
            .into_iter()
            .filter_map(|proto| {
                let ports = open(proto);
                (!ports.is_empty()).then(|| format!("{} ports {}", proto.as_str(), ports.join(", ")))
            })
            .collect();
        if what.is_empty() {
            continue;
        }
        out.push(Finding::new(
            Severity::Medium,
            Kind::UdpNotCovered,
            format!("Pod {}", pod.key()),
            format!(
                "STRICT covers TCP only: {} declared by its containers take plaintext from anyone{}",
                what.join(" and "),
                if dropped {
                    String::new()
                } else {
                    format!(" ({INBOUND_UDP_ANNOTATION}: drop drops UDP from outside the pod)")
                }
            ),
        ));
    }
}
