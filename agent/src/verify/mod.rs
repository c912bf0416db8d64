//! `nodeward verify`: proves, on a node, that what the config says is what
//! the data path does, for every enrolled pod of the node (or those
//! `--namespace`/`--pod` pick):
//!
//! * **plaintext**: a plaintext connection from the node to each port the
//!   pod listens on must be refused (`probe.rs` says how the probe avoids
//!   the node's probe-source exemption). A port that accepts plaintext
//!   fails, whatever its mode: a STRICT one means enforcement is broken,
//!   any other means STRICT is missing there.
//! * **foreign identity** (with `--ca-dir`): an mTLS connection with a
//!   throwaway certificate of `spiffe://<td>/ns/nodeward-verify/sa/denied`
//!   must be refused where policy says it is; where no policy would
//!   refuse it, that is reported as not tested, never as a pass.
//! * **outbound mTLS**: the agent's counters (`/metrics`) must show the
//!   pod's connections to enrolled peers as `mutual_tls` (`counters.rs`).
//! * **udp / sctp**: every UDP socket taking datagrams from anyone and
//!   every SCTP listener on a STRICT port is listed as *not covered*:
//!   STRICT covers TCP only. A UDP port the pod's `nodeward.io/inbound-udp:
//!   drop` closes to the outside is listed as not tested (a dropped
//!   datagram and a received one look alike from outside).

#![forbid(unsafe_code)]

pub(crate) mod counters;
mod foreign;
mod probe;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::netns::{Netns, NetnsFinder};
use crate::policy::model::Mode;
use crate::proxy::hop::is_agent_port;
use crate::source::dir::DirSource;
use crate::state::Snapshot;
use crate::state::workload::{DatagramProtocol, INBOUND_UDP_ANNOTATION, ManagedPod, Pod};

/// The checks verify runs, a closed set for machines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum CheckKind {
    /// A plaintext connection to a port of the pod.
    Plaintext,
    /// An mTLS connection with an identity policy should refuse.
    ForeignIdentity,
    /// The pod's outbound connections to enrolled peers, from the counters.
    OutboundMtls,
    /// A UDP socket of the pod, which STRICT does not cover.
    Udp,
    /// An SCTP listener of the pod, which STRICT does not cover.
    Sctp,
    /// Finding the pod on this node at all.
    Pod,
    /// A config file the agent rejects: what verify compares against is
    /// not what the agent enforces.
    Config,
}

impl CheckKind {
    /// The snake_case label used in tables and JSON.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CheckKind::Plaintext => "plaintext",
            CheckKind::ForeignIdentity => "foreign_identity",
            CheckKind::OutboundMtls => "outbound_mtls",
            CheckKind::Udp => "udp",
            CheckKind::Sctp => "sctp",
            CheckKind::Pod => "pod",
            CheckKind::Config => "config",
        }
    }
}

/// The outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Status {
    /// Enforced as it should be.
    Pass,
    /// Not enforced: the mesh is less secure than it should be.
    Fail,
    /// Could not be tested; the detail says why. Never counts as a pass.
    NotTested,
    /// Outside what the mesh protects (UDP, SCTP): listed so nobody
    /// takes STRICT for covering it. Not a failure of the config.
    NotCovered,
}

impl Status {
    /// The label used in tables and JSON.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Fail => "FAIL",
            Status::NotTested => "not tested",
            Status::NotCovered => "not covered",
        }
    }
}

/// One row of the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// `namespace/name` of the pod.
    pub(crate) pod: String,
    /// Which check.
    pub(crate) check: CheckKind,
    /// The port, for per-port checks.
    pub(crate) port: Option<u16>,
    /// The outcome.
    pub(crate) status: Status,
    /// What was seen and what was expected.
    pub(crate) detail: String,
}

/// What to verify and how.
#[derive(Clone, Debug)]
pub struct Options {
    /// This node's name.
    pub node_name: String,
    /// The config directory the agent reads.
    pub config_dir: PathBuf,
    /// Istio's root namespace.
    pub root_namespace: String,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Only pods of this namespace.
    pub namespace: Option<String>,
    /// Only this pod (name, or `namespace/name`).
    pub pod: Option<String>,
    /// CA directory to issue the foreign identity's certificate from.
    pub ca_dir: Option<PathBuf>,
    /// Where the agent serves `/metrics`.
    pub metrics_addr: SocketAddr,
    /// How long each probe waits.
    pub timeout: Duration,
}

/// Why verify could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The config directory cannot be listed.
    #[error("cannot read config directory {dir}: {source}")]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No enrolled pod of this node matches the filters.
    #[error("no enrolled pod on node {node} matches{filter} in {dir}")]
    NoPods {
        /// The node.
        node: String,
        /// The filters given.
        filter: String,
        /// The config directory.
        dir: PathBuf,
    },
    /// The CA directory for the foreign identity cannot be used.
    #[error("--ca-dir {dir}: {message}")]
    Ca {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Runs every check; the report is in pod, check, port order.
pub fn run(opts: &Options) -> Result<Vec<Check>, VerifyError> {
    crate::netns::init_home();
    std::fs::read_dir(&opts.config_dir).map_err(|source| VerifyError::ReadDir {
        dir: opts.config_dir.clone(),
        source,
    })?;
    let mut source = DirSource::new(&opts.config_dir).with_assembler(crate::source::Assembler::new(
        &opts.root_namespace,
        &opts.trust_domain,
        &[],
    ));
    source.refresh();
    let mut out = rejected_files(&source);
    let snap = source.snapshot();
    let pods = selected(&snap, opts)?;
    let foreign = match &opts.ca_dir {
        Some(dir) => Some(
            foreign::Client::new(dir, &opts.trust_domain).map_err(|message| VerifyError::Ca {
                dir: dir.clone(),
                message,
            })?,
        ),
        None => None,
    };
    let metrics = counters::scrape(opts.metrics_addr, opts.timeout);
    let wanted: HashSet<IpAddr> = pods.iter().flat_map(|(m, _)| m.ips.iter().copied()).collect();
    let scan = NetnsFinder::default().scan(&wanted, &HashSet::new());
    for (managed, pod) in &pods {
        let netns = managed
            .ips
            .iter()
            .find_map(|ip| match scan.by_ip.get(ip).map(Vec::as_slice) {
                Some([one]) => Some(one.clone()),
                _ => None,
            });
        let Some(netns) = netns else {
            out.push(Check {
                pod: managed.key.clone(),
                check: CheckKind::Pod,
                port: None,
                status: Status::Fail,
                detail: "no single network namespace on this node holds the pod's IPs".into(),
            });
            continue;
        };
        let ports = ports_to_probe(&snap, pod, managed, &netns);
        for (port, target) in &ports {
            out.push(plaintext_check(&snap, pod, managed, *port, *target, opts.timeout));
        }
        match &foreign {
            Some(client) => {
                for (port, target) in ports.iter().filter_map(|(p, t)| t.map(|t| (*p, t))) {
                    out.push(client.check(&snap, pod, &managed.key, target, port, opts.timeout));
                }
            }
            None => out.push(Check {
                pod: managed.key.clone(),
                check: CheckKind::ForeignIdentity,
                port: None,
                status: Status::NotTested,
                detail: "no --ca-dir to issue a foreign identity's certificate from".into(),
            }),
        }
        out.push(counters::check(
            &metrics,
            &snap,
            pod,
            &opts.trust_domain,
            opts.metrics_addr,
        ));
        out.extend(datagram_checks(&snap, pod, managed, &netns));
    }
    Ok(out)
}

/// A failed check per config file the agent rejects (it keeps enforcing
/// that file's last good version, which verify cannot see).
fn rejected_files(source: &DirSource) -> Vec<Check> {
    source
        .errors()
        .into_iter()
        .map(|(path, e)| Check {
            pod: "-".into(),
            check: CheckKind::Config,
            port: None,
            status: Status::Fail,
            detail: format!("{} is rejected by the agent: {e}", path.display()),
        })
        .collect()
}

/// The enrolled pods of this node that the filters pick, with their objects.
fn selected(snap: &Snapshot, opts: &Options) -> Result<Vec<(ManagedPod, std::sync::Arc<Pod>)>, VerifyError> {
    let (managed, _) = snap.managed_pods(&opts.node_name);
    let mut pods: Vec<(ManagedPod, std::sync::Arc<Pod>)> = managed
        .into_values()
        .filter(|m| opts.namespace.as_ref().is_none_or(|ns| *ns == m.namespace))
        .filter(|m| {
            opts.pod
                .as_ref()
                .is_none_or(|p| *p == m.key || m.key.split_once('/').is_some_and(|(_, name)| name == p))
        })
        .filter_map(|m| snap.pods.get(&m.key).cloned().map(|p| (m, p)))
        .collect();
    pods.sort_by(|a, b| a.0.key.cmp(&b.0.key));
    if pods.is_empty() {
        let mut filter = String::new();
        if let Some(ns) = &opts.namespace {
            let _ = write!(filter, " --namespace {ns}");
        }
        if let Some(p) = &opts.pod {
            let _ = write!(filter, " --pod {p}");
        }
        return Err(VerifyError::NoPods {
            node: opts.node_name.clone(),
            filter,
            dir: opts.config_dir.clone(),
        });
    }
    Ok(pods)
}

/// The ports to probe: every port the pod listens on (not the agent's own,
/// not on loopback), with the address to reach it at; and port-level mTLS
/// ports nothing listens on, with `None` (reported as not tested).
fn ports_to_probe(snap: &Snapshot, pod: &Pod, managed: &ManagedPod, netns: &Netns) -> BTreeMap<u16, Option<IpAddr>> {
    let v4 = managed.ips.iter().copied().find(IpAddr::is_ipv4);
    let v6 = managed.ips.iter().copied().find(IpAddr::is_ipv6);
    let mut out: BTreeMap<u16, Option<IpAddr>> = BTreeMap::new();
    for l in probe::listeners(netns) {
        let addr = l.addr.to_canonical();
        if addr.is_loopback() || is_agent_port(l.port) {
            continue;
        }
        let target = match addr {
            IpAddr::V4(_) => v4,
            IpAddr::V6(a) if a.is_unspecified() => v4.or(v6),
            IpAddr::V6(_) => v6,
        };
        if let Some(t) = target {
            out.entry(l.port).or_insert(Some(t));
        }
    }
    let configured: BTreeSet<u16> = snap.mtls(pod).ports.keys().copied().collect();
    for port in configured {
        out.entry(port).or_insert(None);
    }
    out
}

/// One row per UDP socket taking datagrams from anyone and per SCTP
/// listener on a port where the pod's mode is STRICT (elsewhere plaintext
/// is accepted anyway, and the plaintext check says so): STRICT covers
/// TCP only.
fn datagram_checks(snap: &Snapshot, pod: &Pod, managed: &ManagedPod, netns: &Netns) -> Vec<Check> {
    let mtls = snap.mtls(pod);
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for l in probe::datagram_listeners(netns) {
        if l.addr.to_canonical().is_loopback() || mtls.mode(l.port) != Mode::Strict {
            continue;
        }
        if !seen.insert((l.protocol, l.port)) {
            continue;
        }
        let (check, status, detail) = match l.protocol {
            DatagramProtocol::Udp if managed.drop_inbound_udp && !managed.exclude_inbound.contains(&l.port) => (
                CheckKind::Udp,
                Status::NotTested,
                format!(
                    "UDP not covered by STRICT, but datagrams from outside the pod are dropped ({INBOUND_UDP_ANNOTATION}: drop); a drop cannot be seen from outside"
                ),
            ),
            DatagramProtocol::Udp if managed.drop_inbound_udp => (
                CheckKind::Udp,
                Status::NotCovered,
                format!(
                    "UDP not covered by STRICT: an excluded inbound port, so {INBOUND_UDP_ANNOTATION}: drop leaves it open; datagrams from anyone reach the app"
                ),
            ),
            DatagramProtocol::Udp => (
                CheckKind::Udp,
                Status::NotCovered,
                format!(
                    "UDP not covered by STRICT: datagrams from anyone reach the app in plaintext ({INBOUND_UDP_ANNOTATION}: drop drops those from outside the pod)"
                ),
            ),
            DatagramProtocol::Sctp => (
                CheckKind::Sctp,
                Status::NotCovered,
                "SCTP not covered by STRICT (nor by an inbound-udp drop): associations from anyone reach the app"
                    .into(),
            ),
        };
        out.push(Check {
            pod: managed.key.clone(),
            check,
            port: Some(l.port),
            status,
            detail,
        });
    }
    out
}

fn plaintext_check(
    snap: &Snapshot,
    pod: &Pod,
    managed: &ManagedPod,
    port: u16,
    target: Option<IpAddr>,
    timeout: Duration,
) -> Check {
    let mtls = snap.mtls(pod);
    let mode = mtls.mode(port);
    let level = if mtls.ports.contains_key(&port) {
        "port-level "
    } else {
        ""
    };
    let check = |status, detail: String| Check {
        pod: managed.key.clone(),
        check: CheckKind::Plaintext,
        port: Some(port),
        status,
        detail,
    };
    if managed.exclude_inbound.contains(&port) {
        return check(
            Status::NotTested,
            "excluded from capture (traffic.sidecar.istio.io/excludeInboundPorts): see nodeward audit's exceptions"
                .into(),
        );
    }
    let Some(target) = target else {
        return check(
            Status::NotTested,
            format!("{level}mode {} but nothing listens on the port", mode.as_str()),
        );
    };
    match probe::plaintext(SocketAddr::new(target, port), timeout) {
        Ok(probe::Outcome::Refused(how)) => check(
            Status::Pass,
            format!("plaintext refused ({how}); {level}mode {}", mode.as_str()),
        ),
        Ok(probe::Outcome::Accepted) if mode == Mode::Strict => check(
            Status::Fail,
            format!("plaintext ACCEPTED although the {level}mode is STRICT: enforcement is broken"),
        ),
        Ok(probe::Outcome::Accepted) => check(
            Status::Fail,
            format!(
                "plaintext accepted: {level}mode {}, STRICT missing on this port",
                mode.as_str()
            ),
        ),
        Err(e) => check(Status::NotTested, format!("probe failed: {e}")),
    }
}

/// Whether any check failed (the exit status).
pub fn failed(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.status == Status::Fail)
}

/// A table for people, then a summary line.
pub fn table(checks: &[Check]) -> String {
    let w_pod = checks.iter().map(|c| c.pod.len()).max().unwrap_or(0).max(3);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<w_pod$} {:<16} {:<5} {:<11} DETAIL",
        "POD", "CHECK", "PORT", "STATUS"
    );
    for c in checks {
        let port = c.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<w_pod$} {:<16} {:<5} {:<11} {}",
            c.pod,
            c.check.as_str(),
            port,
            c.status.as_str(),
            c.detail
        );
    }
    let count = |s| checks.iter().filter(|c| c.status == s).count();
    let _ = write!(
        out,
        "\n{} checks: {} passed, {} failed, {} not tested",
        checks.len(),
        count(Status::Pass),
        count(Status::Fail),
        count(Status::NotTested)
    );
    let _ = match count(Status::NotCovered) {
        0 => writeln!(out),
        n => writeln!(out, ", {n} not covered (UDP/SCTP)"),
    };
    out
}

/// JSON for machines: `{"ok": bool, "checks": [...]}`.
pub fn json(checks: &[Check]) -> String {
    #[derive(Serialize)]
    struct Report<'a> {
        ok: bool,
        checks: &'a [Check],
    }
    serde_json::to_string_pretty(&Report {
        ok: !failed(checks),
        checks,
    })
    .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rejected_config_file_fails_verify_naming_it() {
        let dir = std::env::temp_dir().join(format!("nodeward-verify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("bad.yaml"), "apiVersion: v1\nkind: Pod\nmetadata: [\n").unwrap();
        std::fs::write(
            dir.join("good.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
        )
        .unwrap();
        let mut source = DirSource::new(&dir);
        source.refresh();
        let checks = rejected_files(&source);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(checks.len(), 1, "{checks:?}");
        assert_eq!((checks[0].check, checks[0].status), (CheckKind::Config, Status::Fail));
        assert!(checks[0].detail.contains("bad.yaml"), "{:?}", checks[0]);
        assert!(failed(&checks));
    }
}
