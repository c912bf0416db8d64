//! `v1/Service` and `discovery.k8s.io/v1` EndpointSlice into the agent's
//! model. Every source (the config directory, the Kubernetes API) hands the
//! object's `metadata` and `spec` (and a slice's whole body) here, so both
//! read the same fields the same way.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::state::service::{DEFAULT_AFFINITY_TIMEOUT, Endpoint, EndpointSlice, Service, ServicePort, SlicePort};

/// Label naming a slice's Service.
pub(crate) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Why a Service or EndpointSlice was rejected; the message names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ServiceError {
    /// `metadata.name` or `metadata.namespace` is missing.
    #[error("metadata.name and metadata.namespace are required")]
    MissingName,
    /// A field has the wrong type or an invalid value.
    #[error("{field}: {message}")]
    Field {
        /// The field's path.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn field(field: &'static str) -> impl Fn(serde_norway::Error) -> ServiceError {
    move |e| ServiceError::Field {
        field,
        message: e.to_string(),
    }
}

#[derive(Deserialize, Default)]
struct Meta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct SpecDoc {
    #[serde(default, rename = "clusterIP")]
    cluster_ip: String,
    #[serde(default, rename = "clusterIPs")]
    cluster_ips: Vec<String>,
    #[serde(default)]
    ports: Vec<PortDoc>,
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    selector: Option<BTreeMap<String, String>>,
    #[serde(default)]
    internal_traffic_policy: String,
    #[serde(default)]
    session_affinity: String,
    #[serde(default)]
    session_affinity_config: Option<AffinityConfigDoc>,
    #[serde(default, rename = "externalIPs")]
    external_ips: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct StatusDoc {
    #[serde(default)]
    load_balancer: Option<LoadBalancerDoc>,
}

#[derive(Deserialize)]
struct LoadBalancerDoc {
    #[serde(default)]
    ingress: Option<Vec<IngressDoc>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IngressDoc {
    #[serde(default)]
    ip: Option<String>,
    #[serde(default)]
    ip_mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AffinityConfigDoc {
    #[serde(default, rename = "clientIP")]
    client_ip: Option<ClientIpDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClientIpDoc {
    #[serde(default)]
    timeout_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PortDoc {
    #[serde(default)]
    name: String,
    port: u16,
    #[serde(default)]
    target_port: Option<serde_norway::Value>,
    #[serde(default)]
    protocol: String,
    #[serde(default)]
    node_port: Option<u16>,
}

fn protocol(p: String) -> String {
    if p.is_empty() { "TCP".into() } else { p }
}

/// The IP addresses `values` of `field`, de-duplicated (empty ones and
/// `None` skipped).
fn ips<'a>(field: &'static str, values: impl IntoIterator<Item = &'a String>) -> Result<Vec<IpAddr>, ServiceError> {
    let mut out: Vec<IpAddr> = Vec::new();
    for s in values.into_iter().filter(|s| !s.is_empty() && s.as_str() != "None") {
        let ip: IpAddr = s.parse().map_err(|_| ServiceError::Field {
            field,
            message: format!("{s:?} is not an IP address"),
        })?;
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// Reads a `v1/Service` from its `metadata`, `spec` and `status` (the
/// load balancer's addresses).
pub(crate) fn service_from(
    metadata: &serde_norway::Value,
    spec: &serde_norway::Value,
    status: &serde_norway::Value,
) -> Result<Service, ServiceError> {
    let meta: Meta = from_value(metadata, "metadata")?;
    if meta.name.is_empty() || meta.namespace.is_empty() {
        return Err(ServiceError::MissingName);
    }
    let spec: SpecDoc = from_value(spec, "spec")?;
    let status: StatusDoc = from_value(status, "status")?;
    let kind = if spec.kind.is_empty() {
        "ClusterIP".to_string()
    } else {
        spec.kind
    };
    let cluster_ips = ips(
        "spec.clusterIPs",
        std::iter::once(&spec.cluster_ip).chain(&spec.cluster_ips),
    )?;
    let external_ips = ips("spec.externalIPs", &spec.external_ips)?;
    // kube-proxy answers for a load balancer's addresses only on
    // LoadBalancer Services, and not for those the load balancer proxies.
    let ingress = status
        .load_balancer
        .and_then(|lb| lb.ingress)
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i.ip_mode.as_deref().is_none_or(|m| m == "VIP"))
        .filter_map(|i| i.ip)
        .collect::<Vec<_>>();
    let load_balancer_ips = if kind == "LoadBalancer" {
        ips("status.loadBalancer.ingress[].ip", &ingress)?
    } else {
        Vec::new()
    };
    let has_node_ports = kind == "NodePort" || kind == "LoadBalancer";
    let mut ports = Vec::new();
    for p in spec.ports {
        let target_port = match p.target_port {
            None | Some(serde_norway::Value::Null) => p.port.to_string(),
            Some(serde_norway::Value::Number(n)) => n.to_string(),
            Some(serde_norway::Value::String(s)) => s,
            Some(other) => {
                return Err(ServiceError::Field {
                    field: "spec.ports[].targetPort",
                    message: format!("{other:?} is neither a number nor a name"),
                });
            }
        };
        ports.push(ServicePort {
            name: p.name,
            port: p.port,
            target_port,
            protocol: protocol(p.protocol),
            node_port: p.node_port.filter(|p| has_node_ports && *p != 0),
        });
    }
    let affinity = (spec.session_affinity == "ClientIP").then(|| {
        spec.session_affinity_config
            .and_then(|c| c.client_ip)
            .and_then(|c| c.timeout_seconds)
            .filter(|s| (1..=86_400).contains(s))
            .map_or(DEFAULT_AFFINITY_TIMEOUT, Duration::from_secs)
    });
    Ok(Service {
        namespace: meta.namespace,
        name: meta.name,
        cluster_ips,
        ports,
        kind,
        has_selector: spec.selector.is_some_and(|s| !s.is_empty()),
        internal_local: spec.internal_traffic_policy == "Local",
        affinity,
        external_ips,
        load_balancer_ips,
    })
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct SliceDoc {
    #[serde(default)]
    address_type: String,
    #[serde(default)]
    ports: Option<Vec<SlicePortDoc>>,
    #[serde(default)]
    endpoints: Option<Vec<EndpointDoc>>,
}

#[derive(Deserialize)]
struct SlicePortDoc {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointDoc {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: ConditionsDoc,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    target_ref: Option<TargetRefDoc>,
}

#[derive(Deserialize, Default)]
struct ConditionsDoc {
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
}

#[derive(Deserialize)]
struct TargetRefDoc {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    name: String,
}

/// Reads a `discovery.k8s.io/v1` EndpointSlice from its `metadata` and
/// its body (the object itself: a slice has no `spec`).
pub(crate) fn endpoint_slice_from(
    metadata: &serde_norway::Value,
    body: &serde_norway::Value,
) -> Result<EndpointSlice, ServiceError> {
    let meta: Meta = from_value(metadata, "metadata")?;
    if meta.name.is_empty() || meta.namespace.is_empty() {
        return Err(ServiceError::MissingName);
    }
    let doc: SliceDoc = from_value(body, "endpoints")?;
    let service = meta.labels.get(SERVICE_NAME_LABEL).cloned().unwrap_or_default();
    let mut endpoints = Vec::new();
    for e in doc.endpoints.unwrap_or_default() {
        let mut addresses = Vec::new();
        if doc.address_type != "FQDN" {
            for a in &e.addresses {
                addresses.push(a.parse::<IpAddr>().map_err(|_| ServiceError::Field {
                    field: "endpoints[].addresses",
                    message: format!("{a:?} is not an IP address"),
                })?);
            }
        }
        let ready = e.conditions.ready.unwrap_or(true);
        let pod = e.target_ref.filter(|r| r.kind == "Pod").map(|r| {
            format!(
                "{}/{}",
                if r.namespace.is_empty() {
                    &meta.namespace
                } else {
                    &r.namespace
                },
                r.name
            )
        });
        endpoints.push(Endpoint {
            addresses,
            ready,
            serving: e.conditions.serving.unwrap_or(ready),
            terminating: e.conditions.terminating.unwrap_or(false),
            node_name: e.node_name.unwrap_or_default(),
            pod,
        });
    }
    Ok(EndpointSlice {
        namespace: meta.namespace,
        name: meta.name,
        service,
        address_type: doc.address_type,
        ports: doc
            .ports
            .unwrap_or_default()
            .into_iter()
            .map(|p| SlicePort {
                name: p.name.unwrap_or_default(),
                port: p.port,
                protocol: protocol(p.protocol.unwrap_or_default()),
            })
            .collect(),
        endpoints,
    })
}

fn from_value<T: for<'de> Deserialize<'de> + Default>(
    v: &serde_norway::Value,
    name: &'static str,
) -> Result<T, ServiceError> {
    if v.is_null() {
        return Ok(T::default());
    }
    serde_norway::from_value(v.clone()).map_err(field(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> serde_norway::Value {
        serde_norway::from_str(s).unwrap()
    }

    #[test]
    fn reads_a_dual_stack_service_with_named_target_port_and_affinity() {
        let s = service_from(
            &yaml("{name: web, namespace: shop}"),
            &yaml("{clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00::10'], selector: {app: web}, ports: [{name: http, port: 80, targetPort: web}], internalTrafficPolicy: Local, sessionAffinity: ClientIP}"),
            &serde_norway::Value::Null,
        )
        .unwrap();
        assert_eq!(s.cluster_ips.len(), 2);
        assert_eq!(s.ports[0].target_port, "web");
        assert_eq!(s.ports[0].protocol, "TCP");
        assert!(s.internal_local && s.has_selector);
        assert_eq!(s.affinity, Some(DEFAULT_AFFINITY_TIMEOUT));
    }

    #[test]
    fn headless_has_no_cluster_ip_and_bad_ips_name_the_field() {
        let none = serde_norway::Value::Null;
        let s = service_from(&yaml("{name: h, namespace: shop}"), &yaml("{clusterIP: None}"), &none).unwrap();
        assert!(s.cluster_ips.is_empty());
        let e = service_from(
            &yaml("{name: h, namespace: shop}"),
            &yaml("{clusterIP: 10.0.0.300}"),
            &none,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("spec.clusterIPs") && e.to_string().contains("10.0.0.300"),
            "{e}"
        );
    }

    #[test]
    fn external_load_balancer_and_node_port_addresses_are_read_where_kube_proxy_answers_for_them() {
        let meta = yaml("{name: web, namespace: shop}");
        let status = yaml(
            "{loadBalancer: {ingress: [{ip: 203.0.113.7}, {ip: 203.0.113.8, ipMode: Proxy}, {hostname: lb.example}]}}",
        );
        let spec = |kind: &str| {
            yaml(&format!(
                "{{type: {kind}, clusterIP: 10.96.0.10, externalIPs: [192.0.2.10, 192.0.2.10], ports: [{{port: 80, nodePort: 30080}}]}}"
            ))
        };
        let lb = service_from(&meta, &spec("LoadBalancer"), &status).unwrap();
        assert_eq!(lb.external_ips, vec!["192.0.2.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            lb.load_balancer_ips,
            vec!["203.0.113.7".parse::<IpAddr>().unwrap()],
            "ipMode Proxy is the load balancer's"
        );
        assert_eq!(lb.ports[0].node_port, Some(30080));
        let np = service_from(&meta, &spec("NodePort"), &status).unwrap();
        assert!(np.load_balancer_ips.is_empty(), "only LoadBalancer Services have them");
        assert_eq!(np.ports[0].node_port, Some(30080));
        let cip = service_from(&meta, &spec("ClusterIP"), &status).unwrap();
        assert_eq!(cip.ports[0].node_port, None, "a ClusterIP Service has no node port");
        assert_eq!(cip.external_ips.len(), 1, "externalIPs apply to every type");
        let e = service_from(&meta, &yaml("{externalIPs: [nope]}"), &status).unwrap_err();
        assert!(e.to_string().contains("spec.externalIPs"), "{e}");
    }

    #[test]
    fn slice_conditions_default_as_in_the_api() {
        let s = endpoint_slice_from(
            &yaml("{name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}"),
            &yaml("{addressType: IPv4, ports: [{name: http, port: 8080}], endpoints: [{addresses: [10.1.1.1], nodeName: n1, targetRef: {kind: Pod, name: a}}, {addresses: [10.1.1.2], conditions: {ready: false, serving: true, terminating: true}}]}"),
        )
        .unwrap();
        assert_eq!(s.service, "web");
        assert_eq!(s.ports[0].port, Some(8080));
        assert!(s.endpoints[0].ready && s.endpoints[0].serving && !s.endpoints[0].terminating);
        assert_eq!(s.endpoints[0].pod.as_deref(), Some("shop/a"));
        assert!(!s.endpoints[1].ready && s.endpoints[1].serving && s.endpoints[1].terminating);
    }
}
