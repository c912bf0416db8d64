//! The agent's metrics: one registry of typed families, rendered in the
//! Prometheus/OpenMetrics text format on `:15020/metrics`.
//!
//! Istio's standard TCP metrics carry Istio's names and labels, so existing
//! dashboards work; Nodeward's own are named `nodeward_*`. Every label value
//! comes from an enum of `crate::outcome` or from names the cluster bounds
//! (namespaces, workloads, identities, policies): never a port or an IP.
//! Recording is an atomic add on a family's entry; rendering happens on the
//! scrape, off the connection path.

#![forbid(unsafe_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of Istio's `istio_tcp_*` metrics, as Istio names them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TcpLabels {
    /// `source` on the client's node, `destination` on the server's.
    pub(crate) reporter: &'static str,
    /// Client workload, `unknown` outside the mesh.
    pub(crate) source_workload: String,
    /// Client namespace, `unknown` outside the mesh.
    pub(crate) source_workload_namespace: String,
    /// Client SPIFFE principal, `unknown` without mTLS.
    pub(crate) source_principal: String,
    /// Server workload, `unknown` outside the mesh.
    pub(crate) destination_workload: String,
    /// Server namespace, `unknown` outside the mesh.
    pub(crate) destination_workload_namespace: String,
    /// Server SPIFFE principal, `unknown` without mTLS.
    pub(crate) destination_principal: String,
    /// The Service the client called (its ClusterIP), `unknown` for a
    /// direct call: bounded by the cluster's Services.
    pub(crate) destination_service_name: String,
    /// That Service's namespace, `unknown` for a direct call.
    pub(crate) destination_service_namespace: String,
    /// `mutual_tls` or `none`.
    pub(crate) connection_security_policy: &'static str,
    /// What cut the connection short (close reason or refusal), `-` when nothing did.
    pub(crate) response_flags: &'static str,
}

/// Connections by direction and security, per namespace of the local pod.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SecurityLabels {
    /// `inbound` or `outbound`.
    pub(crate) direction: &'static str,
    /// `mutual_tls` or `plaintext`.
    pub(crate) security: &'static str,
    /// Namespace of the local pod.
    pub(crate) namespace: String,
}

/// Connections that ended, by direction, close reason and refusal kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ClosedLabels {
    /// `crate::outcome::Direction`.
    pub(crate) direction: &'static str,
    /// `crate::outcome::Counted`.
    pub(crate) reason: &'static str,
    /// `crate::outcome::Refusal`, empty when nothing refused it.
    pub(crate) refusal: &'static str,
}

/// A local workload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WorkloadLabels {
    /// Namespace.
    pub(crate) namespace: String,
    /// Workload name.
    pub(crate) workload: String,
}

/// A TLS handshake that failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HandshakeLabels {
    /// `inbound` or `outbound`.
    pub(crate) direction: &'static str,
    /// `crate::outcome::CertRefusal`, or `protocol`, `http2`, `timeout`.
    pub(crate) reason: &'static str,
}

/// A connection denied by authorization.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DenialLabels {
    /// Namespace of the protected workload.
    pub(crate) namespace: String,
    /// The protected workload.
    pub(crate) workload: String,
    /// Deciding policy `namespace/name`, `-` when none decided by itself
    /// (no ALLOW matched).
    pub(crate) policy: String,
    /// `crate::outcome::PolicyReason`.
    pub(crate) reason: &'static str,
}

/// A workload identity's current certificate.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CertLabels {
    /// SPIFFE ID.
    pub(crate) identity: String,
    /// The certificate's serial, hex: `nodeward audit --issuance-log
    /// --agent-metrics` checks each against the CA service's log.
    pub(crate) serial: String,
}

/// A certificate signing.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct IssueLabels {
    /// `issue` (first certificate of an identity) or `renew`.
    pub(crate) kind: &'static str,
    /// `success` or `failure`.
    pub(crate) result: &'static str,
}

/// A pod's capture.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PodLabels {
    /// Namespace.
    pub(crate) namespace: String,
    /// Pod name.
    pub(crate) pod: String,
}

/// A config directory reload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    /// `success` or `failure`.
    pub(crate) result: &'static str,
}

/// A kind the `kube` source watches.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabels {
    /// The resource's plural (`pods`, `peerauthentications`, ...).
    pub(crate) kind: &'static str,
}

/// Every family the agent records, and the registry that renders them.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    /// `istio_tcp_connections_opened_total`.
    pub(crate) tcp_opened: Family<TcpLabels, Counter>,
    /// `istio_tcp_connections_closed_total`.
    pub(crate) tcp_closed: Family<TcpLabels, Counter>,
    /// `istio_tcp_sent_bytes_total`: bytes from client to server.
    pub(crate) tcp_sent: Family<TcpLabels, Counter>,
    /// `istio_tcp_received_bytes_total`: bytes from server to client.
    pub(crate) tcp_received: Family<TcpLabels, Counter>,
    /// `nodeward_connections_total`: mTLS coverage is computed from it.
    pub(crate) connections: Family<SecurityLabels, Counter>,
    /// `nodeward_connections_closed_total`.
    pub(crate) closed: Family<ClosedLabels, Counter>,
    /// `nodeward_plaintext_refused_total`: plaintext refused by STRICT.
    pub(crate) plaintext_refused: Family<WorkloadLabels, Counter>,
    /// `nodeward_tls_handshake_failures_total`.
    pub(crate) handshake_failures: Family<HandshakeLabels, Counter>,
    /// `nodeward_authorization_denials_total`.
    pub(crate) denials: Family<DenialLabels, Counter>,
    /// `nodeward_certificate_expiry_timestamp_seconds`, set at each scrape.
    pub(crate) cert_expiry: Family<CertLabels, Gauge>,
    /// `nodeward_certificate_issuances_total`.
    pub(crate) cert_issuances: Family<IssueLabels, Counter>,
    /// `nodeward_ebpf_attached`, set at each scrape.
    pub(crate) ebpf_attached: Family<PodLabels, Gauge>,
    /// `nodeward_config_reloads_total`.
    pub(crate) config_reloads: Family<ResultLabels, Counter>,
    /// `nodeward_source_watch_failures_total`: failed watch (or list) attempts.
    pub(crate) source_watch_failures: Family<KindLabels, Counter>,
    /// `nodeward_source_stale_total`: times a kind's watch failed longer
    /// than `--source-stale-after`.
    pub(crate) source_stale: Family<KindLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family.
    pub(crate) fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            connections: Family::default(),
            closed: Family::default(),
            plaintext_refused: Family::default(),
            handshake_failures: Family::default(),
            denials: Family::default(),
            cert_expiry: Family::default(),
            cert_issuances: Family::default(),
            ebpf_attached: Family::default(),
            config_reloads: Family::default(),
            source_watch_failures: Family::default(),
            source_stale: Family::default(),
        };
        // Counters get their `_total` suffix from the encoder.
        let r = &mut registry;
        r.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.tcp_opened.clone(),
        );
        r.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.tcp_closed.clone(),
        );
        r.register("istio_tcp_sent_bytes", "Bytes sent by the client", m.tcp_sent.clone());
        r.register(
            "istio_tcp_received_bytes",
            "Bytes sent back to the client",
            m.tcp_received.clone(),
        );
        r.register(
            "nodeward_connections",
            "Proxied connections by direction and security, per local namespace",
            m.connections.clone(),
        );
        r.register(
            "nodeward_connections_closed",
            "Ended connections by close reason and refusal",
            m.closed.clone(),
        );
        r.register(
            "nodeward_plaintext_refused",
            "Plaintext connections refused because the port is STRICT",
            m.plaintext_refused.clone(),
        );
        r.register(
            "nodeward_tls_handshake_failures",
            "TLS handshakes that failed, by reason",
            m.handshake_failures.clone(),
        );
        r.register(
            "nodeward_authorization_denials",
            "Connections denied by authorization policy",
            m.denials.clone(),
        );
        r.register(
            "nodeward_certificate_expiry_timestamp_seconds",
            "Unix time at which the identity's current certificate (by serial) expires",
            m.cert_expiry.clone(),
        );
        r.register(
            "nodeward_certificate_issuances",
            "Workload certificates signed, by kind and result",
            m.cert_issuances.clone(),
        );
        r.register(
            "nodeward_ebpf_attached",
            "1 when the pod's capture is attached, 0 when it is not (yet)",
            m.ebpf_attached.clone(),
        );
        r.register(
            "nodeward_config_reloads",
            "Config directory reloads, by result",
            m.config_reloads.clone(),
        );
        r.register(
            "nodeward_source_watch_failures",
            "Kubernetes API watch or list attempts that failed, by kind",
            m.source_watch_failures.clone(),
        );
        r.register(
            "nodeward_source_stale",
            "Times a kind's watch failed for longer than --source-stale-after, by kind",
            m.source_stale.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The text exposition of every family.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Seconds since the Unix epoch of `t` (0 before it).
pub(crate) fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_names_and_labels_are_rendered_as_istio_writes_them() {
        let m = Metrics::new();
        let l = TcpLabels {
            reporter: "source",
            source_workload: "a".into(),
            source_workload_namespace: "ns".into(),
            source_principal: "spiffe://cluster.local/ns/ns/sa/a".into(),
            destination_workload: "c".into(),
            destination_workload_namespace: "ns".into(),
            destination_principal: "spiffe://cluster.local/ns/ns/sa/c".into(),
            destination_service_name: "unknown".into(),
            destination_service_namespace: "unknown".into(),
            connection_security_policy: "mutual_tls",
            response_flags: "-",
        };
        m.tcp_opened.get_or_create(&l).inc_by(3);
        m.plaintext_refused
            .get_or_create(&WorkloadLabels {
                namespace: "ns".into(),
                workload: "c".into(),
            })
            .inc();
        let text = m.render();
        assert!(
            text.contains(
                "istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"a\",\
                 source_workload_namespace=\"ns\",source_principal=\"spiffe://cluster.local/ns/ns/sa/a\",\
                 destination_workload=\"c\",destination_workload_namespace=\"ns\",\
                 destination_principal=\"spiffe://cluster.local/ns/ns/sa/c\",\
                 destination_service_name=\"unknown\",destination_service_namespace=\"unknown\",\
                 connection_security_policy=\"mutual_tls\",response_flags=\"-\"} 3\n"
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE nodeward_plaintext_refused counter"), "{text}");
        assert!(
            text.contains("nodeward_plaintext_refused_total{namespace=\"ns\",workload=\"c\"} 1\n"),
            "{text}"
        );
    }

    /// Every metric the Grafana dashboard queries is one the agent exports.
    #[test]
    fn the_dashboard_queries_only_exported_metrics() {
        let m = Metrics::new();
        let w = || WorkloadLabels {
            namespace: "n".into(),
            workload: "w".into(),
        };
        let tcp = TcpLabels {
            reporter: "source",
            source_workload: "a".into(),
            source_workload_namespace: "n".into(),
            source_principal: "p".into(),
            destination_workload: "c".into(),
            destination_workload_namespace: "n".into(),
            destination_principal: "p".into(),
            destination_service_name: "unknown".into(),
            destination_service_namespace: "unknown".into(),
            connection_security_policy: "none",
            response_flags: "-",
        };
        for f in [&m.tcp_opened, &m.tcp_closed, &m.tcp_sent, &m.tcp_received] {
            f.get_or_create(&tcp).inc();
        }
        m.connections
            .get_or_create(&SecurityLabels {
                direction: "inbound",
                security: "plaintext",
                namespace: "n".into(),
            })
            .inc();
        m.closed
            .get_or_create(&ClosedLabels {
                direction: "outbound",
                reason: "done",
                refusal: "",
            })
            .inc();
        m.plaintext_refused.get_or_create(&w()).inc();
        m.handshake_failures
            .get_or_create(&HandshakeLabels {
                direction: "inbound",
                reason: "expired",
            })
            .inc();
        m.denials
            .get_or_create(&DenialLabels {
                namespace: "n".into(),
                workload: "w".into(),
                policy: "-".into(),
                reason: "denied",
            })
            .inc();
        m.cert_expiry
            .get_or_create(&CertLabels {
                identity: "i".into(),
                serial: "01".into(),
            })
            .set(1);
        m.cert_issuances
            .get_or_create(&IssueLabels {
                kind: "issue",
                result: "success",
            })
            .inc();
        m.ebpf_attached
            .get_or_create(&PodLabels {
                namespace: "n".into(),
                pod: "p".into(),
            })
            .set(1);
        m.config_reloads
            .get_or_create(&ResultLabels { result: "success" })
            .inc();
        let text = m.render();
        let exported: std::collections::BTreeSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let dashboard = include_str!("../../deploy/grafana/nodeward.json");
        let mut queried = 0;
        for word in dashboard.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("nodeward_") || word.starts_with("istio_tcp_") {
                queried += 1;
                assert!(
                    exported.contains(word),
                    "the dashboard queries {word}, not exported:\n{text}"
                );
            }
        }
        assert!(queried >= 8, "the dashboard queries the metrics");
    }
}
