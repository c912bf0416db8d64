//! Kubernetes objects into the agent's model, for both sources.
//!
//! Pods and namespaces are read into `k8s-openapi`'s types (the directory
//! source from YAML, the API source from the server's JSON) and converted
//! by the one pair of functions here, [`pod_from_k8s`] and
//! [`namespace_from_k8s`]; policies of either source go through
//! [`policy_object`] into `policy/parse.rs`; Services and EndpointSlices
//! through `services.rs`. So field handling cannot differ between sources.
//! YAML files add `List` documents and errors that name the file, the
//! document and the line. Other kinds are skipped with a debug line: a
//! directory may hold a whole cluster dump.

#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use k8s_openapi::api::core::v1 as k8s;
use serde::Deserialize;

use crate::policy::model::{
    AuthorizationPolicy, PeerAuthentication, parse_authorization_policy, parse_peer_authentication,
};
use crate::state::node::Node;
use crate::state::service::{EndpointSlice, Service};
use crate::state::workload::{DatagramPort, DatagramProtocol, Namespace, Pod};

/// A parsed object from the config directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Object {
    /// A `v1/Namespace`.
    Namespace(Namespace),
    /// A `v1/Pod`.
    Pod(Pod),
    /// A `security.istio.io` PeerAuthentication (kept even when invalid).
    PeerAuthentication(Arc<PeerAuthentication>),
    /// A `security.istio.io` AuthorizationPolicy (kept even when invalid).
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
    /// A `v1/Service`.
    Service(Arc<Service>),
    /// A `discovery.k8s.io/v1` EndpointSlice.
    EndpointSlice(Arc<EndpointSlice>),
    /// A `v1/Node` (its addresses).
    Node(Arc<Node>),
}

/// Why a file (a YAML syntax error: its previous good content stays in
/// force) or one document of it (its object's previous good version stays)
/// was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ParseError {
    /// Not valid YAML, or a field of the wrong type.
    #[error("{file}: document {doc} (line {line}): {message}")]
    Syntax {
        /// File.
        file: String,
        /// 1-based document number within the file.
        doc: usize,
        /// 1-based line within the file.
        line: usize,
        /// What the parser said.
        message: String,
    },
    /// A required field is missing or a value is invalid.
    #[error("{file}: document {doc} (line {line}): {kind} {name:?}: {message}")]
    Invalid {
        /// File.
        file: String,
        /// 1-based document number.
        doc: usize,
        /// 1-based line where the document starts.
        line: usize,
        /// The kind of the object.
        kind: String,
        /// `namespace/name` of the object, as far as known.
        name: String,
        /// What is wrong.
        message: String,
    },
}

/// What every document says it is; the rest is read per kind.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Doc {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

/// Where a document sits, for error messages.
struct At<'a> {
    file: &'a str,
    doc: usize,
    line: usize,
}

/// Which object a document is, as far as its own text says: what a
/// rejected document is matched by to its last good version.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ObjectId {
    /// `kind:`.
    pub(crate) kind: String,
    /// `metadata.namespace` (empty for a Namespace).
    pub(crate) namespace: String,
    /// `metadata.name`.
    pub(crate) name: String,
}

impl Object {
    /// The object's kind, namespace and name.
    pub(crate) fn id(&self) -> ObjectId {
        let (kind, namespace, name) = match self {
            Object::Namespace(ns) => ("Namespace", "", ns.name.as_str()),
            Object::Pod(p) => ("Pod", p.namespace.as_str(), p.name.as_str()),
            Object::PeerAuthentication(p) => ("PeerAuthentication", p.meta.namespace.as_str(), p.meta.name.as_str()),
            Object::AuthorizationPolicy(p) => ("AuthorizationPolicy", p.meta.namespace.as_str(), p.meta.name.as_str()),
            Object::Service(s) => ("Service", s.namespace.as_str(), s.name.as_str()),
            Object::EndpointSlice(s) => ("EndpointSlice", s.namespace.as_str(), s.name.as_str()),
            Object::Node(n) => ("Node", "", n.name.as_str()),
        };
        ObjectId {
            kind: kind.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

/// One document (or `List` item) the agent rejects, the others of its file
/// standing.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Rejected {
    /// Why, naming the file, the document and its line.
    pub(crate) error: ParseError,
    /// The object it meant to be, when its kind and name say so; `None`
    /// when they do not (then no last good version can be told apart).
    pub(crate) id: Option<ObjectId>,
}

/// A file whose YAML parsed: its valid objects and its rejected documents.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Parsed {
    /// The objects of its valid documents.
    pub(crate) objects: Vec<Object>,
    /// Its invalid documents.
    pub(crate) rejected: Vec<Rejected>,
}

/// Parses one file of (possibly multi-document) Kubernetes YAML. Documents
/// are independent: an invalid one is rejected alone ([`Parsed::rejected`]).
/// Only YAML that does not parse fails the whole file, with the line: the
/// text around a syntax error cannot be trusted to be what it looks like.
pub(crate) fn parse_file(path: &Path, text: &str) -> Result<Parsed, ParseError> {
    let file = path.display().to_string();
    let mut values = Vec::new();
    for (i, (start_line, body)) in split_documents(text).into_iter().enumerate() {
        let value: serde_norway::Value = serde_norway::from_str(body).map_err(|e| ParseError::Syntax {
            file: file.clone(),
            doc: i + 1,
            line: start_line + e.location().map_or(0, |l| l.line().saturating_sub(1)),
            message: e.to_string(),
        })?;
        values.push((i + 1, start_line, value));
    }
    let mut out = Parsed::default();
    for (doc, line, value) in values {
        if value.is_null() {
            continue;
        }
        let at = At { file: &file, doc, line };
        parse_document(value, &at, &mut out);
    }
    Ok(out)
}

/// One document, or one item of a `List`: its object, or its rejection.
fn parse_document(value: serde_norway::Value, at: &At<'_>, out: &mut Parsed) {
    let field = |f: &str| value.get(f).and_then(serde_norway::Value::as_str).map(str::to_string);
    if field("apiVersion").as_deref() == Some("v1") && field("kind").as_deref() == Some("List") {
        match value.get("items") {
            None | Some(serde_norway::Value::Null) => {}
            Some(serde_norway::Value::Sequence(items)) => {
                for item in items {
                    parse_document(item.clone(), at, out);
                }
            }
            Some(_) => out.rejected.push(Rejected {
                error: ParseError::Syntax {
                    file: at.file.to_string(),
                    doc: at.doc,
                    line: at.line,
                    message: "items: not a list".into(),
                },
                id: None,
            }),
        }
        return;
    }
    let id = object_id(&value);
    if let Err(error) = parse_value(value, at, &mut out.objects) {
        out.rejected.push(Rejected { error, id });
    }
}

/// The kind, namespace and name a document gives, if it names itself
/// whole. A namespaced kind without its namespace names nothing: it could
/// be the broken version of the object of any namespace (a deleted
/// `namespace:` line), so its file keeps every last good object.
fn object_id(value: &serde_norway::Value) -> Option<ObjectId> {
    let text = |v: Option<&serde_norway::Value>| v.and_then(serde_norway::Value::as_str).unwrap_or("").to_string();
    let kind = text(value.get("kind"));
    // A kind the agent does not know (a misspelt `PeerAuthenticaton`)
    // names no object it holds: the document could be the broken version
    // of any of them.
    if !KNOWN_KINDS.contains(&kind.as_str()) {
        return None;
    }
    let metadata = value.get("metadata");
    let name = text(metadata.and_then(|m| m.get("name")));
    let namespace = if matches!(kind.as_str(), "Namespace" | "Node") {
        String::new()
    } else {
        let ns = text(metadata.and_then(|m| m.get("namespace")));
        if ns.is_empty() {
            return None;
        }
        ns
    };
    (!kind.is_empty() && !name.is_empty()).then_some(ObjectId { kind, namespace, name })
}

/// The kinds the agent holds objects of.
const KNOWN_KINDS: [&str; 7] = [
    "Namespace",
    "Pod",
    "Service",
    "EndpointSlice",
    "Node",
    "PeerAuthentication",
    "AuthorizationPolicy",
];

/// Istio's security kinds the agent reads or knowingly leaves to L7
/// proxies; any other kind in that group is a typo, not an unknown object.
const ISTIO_SECURITY_KINDS: [&str; 3] = ["PeerAuthentication", "AuthorizationPolicy", "RequestAuthentication"];

/// One object (not a `List`) into `out`, or why it is invalid.
fn parse_value(value: serde_norway::Value, at: &At<'_>, out: &mut Vec<Object>) -> Result<(), ParseError> {
    let syntax = |message: String| ParseError::Syntax {
        file: at.file.to_string(),
        doc: at.doc,
        line: at.line,
        message,
    };
    let doc = Doc::deserialize(&value).map_err(|e| syntax(e.to_string()))?;
    let null = serde_norway::Value::Null;
    let metadata = value.get("metadata").unwrap_or(&null);
    if !metadata.is_null() && !metadata.is_mapping() {
        return Err(syntax("metadata: not a mapping".into()));
    }
    let field = |f: &str| metadata.get(f).and_then(serde_norway::Value::as_str).unwrap_or("");
    let key = format!("{}/{}", field("namespace"), field("name"));
    let invalid = |name: &str, message: String| ParseError::Invalid {
        file: at.file.to_string(),
        doc: at.doc,
        line: at.line,
        kind: doc.kind.clone(),
        name: name.to_string(),
        message,
    };
    let policy = matches!(
        doc.api_version.as_str(),
        "security.istio.io/v1" | "security.istio.io/v1beta1"
    );
    if let (true, Some(kind)) = (policy, PolicyKind::of(&doc.kind)) {
        if field("name").is_empty() || field("namespace").is_empty() {
            return Err(invalid("", "metadata.name and metadata.namespace are required".into()));
        }
        out.push(policy_object(kind, metadata, value.get("spec").unwrap_or(&null)));
        return Ok(());
    }
    match (doc.api_version.as_str(), doc.kind.as_str()) {
        ("v1", "Namespace") => {
            let ns: k8s::Namespace = serde_norway::from_value(value).map_err(|e| syntax(e.to_string()))?;
            out.push(Object::Namespace(
                namespace_from_k8s(&ns).map_err(|e| invalid(&key, e.to_string()))?,
            ));
        }
        ("v1", "Pod") => {
            let pod: k8s::Pod = serde_norway::from_value(value).map_err(|e| invalid(&key, e.to_string()))?;
            out.push(Object::Pod(
                pod_from_k8s(&pod).map_err(|e| invalid(&key, e.to_string()))?,
            ));
        }
        ("v1", "Service") => {
            let svc = super::services::service_from(
                metadata,
                value.get("spec").unwrap_or(&null),
                value.get("status").unwrap_or(&null),
            )
            .map_err(|e| invalid(&key, e.to_string()))?;
            out.push(Object::Service(Arc::new(svc)));
        }
        ("v1", "Node") => {
            let node: k8s::Node = serde_norway::from_value(value).map_err(|e| invalid(&key, e.to_string()))?;
            out.push(Object::Node(Arc::new(
                node_from_k8s(&node).map_err(|e| invalid(&key, e.to_string()))?,
            )));
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            // A slice has no `spec`: its fields sit beside `metadata`.
            let slice =
                super::services::endpoint_slice_from(metadata, &value).map_err(|e| invalid(&key, e.to_string()))?;
            out.push(Object::EndpointSlice(Arc::new(slice)));
        }
        // A policy the agent cannot read must not vanish quietly: a typo in
        // its kind or version would otherwise drop it (and its last good
        // version) with only a debug line, and what it closed would open.
        (api_version, kind)
            if (api_version.starts_with("security.istio.io/") && !ISTIO_SECURITY_KINDS.contains(&kind))
                || (PolicyKind::of(kind).is_some() && !policy) =>
        {
            return Err(invalid(
                &key,
                format!(
                    "{api_version} {kind} is not a policy the agent reads (PeerAuthentication or AuthorizationPolicy of security.istio.io/v1 or v1beta1): a typo would leave it unenforced"
                ),
            ));
        }
        (api_version, kind) => {
            tracing::debug!(
                file = at.file,
                doc = at.doc,
                line = at.line,
                kind,
                api_version,
                "kind not used by the agent; skipped"
            );
        }
    }
    Ok(())
}

/// The Istio policy kinds the agent enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PolicyKind {
    /// `PeerAuthentication`.
    PeerAuthentication,
    /// `AuthorizationPolicy`.
    AuthorizationPolicy,
}

impl PolicyKind {
    /// The kind named `kind`, if it is one of them.
    pub(crate) fn of(kind: &str) -> Option<PolicyKind> {
        match kind {
            "PeerAuthentication" => Some(PolicyKind::PeerAuthentication),
            "AuthorizationPolicy" => Some(PolicyKind::AuthorizationPolicy),
            _ => None,
        }
    }

    /// The kind's name, as in `kind:`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            PolicyKind::PeerAuthentication => "PeerAuthentication",
            PolicyKind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }
}

/// A policy from its metadata and spec, as either source holds them: the
/// strict walk of `policy/parse.rs` keeps an invalid one with its error, so
/// it fails safe. A missing or null spec is an empty one.
pub(crate) fn policy_object(kind: PolicyKind, metadata: &serde_norway::Value, spec: &serde_norway::Value) -> Object {
    let empty = serde_norway::Value::Mapping(Default::default());
    let spec = if spec.is_null() { &empty } else { spec };
    match kind {
        PolicyKind::PeerAuthentication => {
            Object::PeerAuthentication(Arc::new(parse_peer_authentication(metadata, spec)))
        }
        PolicyKind::AuthorizationPolicy => {
            Object::AuthorizationPolicy(Arc::new(parse_authorization_policy(metadata, spec)))
        }
    }
}

/// Why a Kubernetes object cannot be converted into the model.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ConvertError {
    /// A field every object of its kind has is missing.
    #[error("{0} is required")]
    Missing(&'static str),
    /// A pod IP that is not an IP address.
    #[error("status.podIPs: {0:?} is not an IP address")]
    BadIp(String),
    /// A node address of an IP type that is not an IP address.
    #[error("status.addresses: {0:?} is not an IP address")]
    BadNodeAddress(String),
}

/// A `v1/Node` as the model holds it: its name and its `InternalIP` and
/// `ExternalIP` addresses (where kube-proxy answers for `nodePort`s);
/// hostnames, images, conditions are dropped here.
pub(crate) fn node_from_k8s(node: &k8s::Node) -> Result<Node, ConvertError> {
    let name = node.metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(ConvertError::Missing("metadata.name"));
    }
    let mut addresses: Vec<IpAddr> = Vec::new();
    let all = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    for a in all
        .iter()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
    {
        let ip: IpAddr = a
            .address
            .parse()
            .map_err(|_| ConvertError::BadNodeAddress(a.address.clone()))?;
        if !addresses.contains(&ip) {
            addresses.push(ip);
        }
    }
    Ok(Node { name, addresses })
}

/// A `v1/Namespace` as the model holds it: name and labels, nothing else.
pub(crate) fn namespace_from_k8s(ns: &k8s::Namespace) -> Result<Namespace, ConvertError> {
    let name = ns.metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(ConvertError::Missing("metadata.name"));
    }
    Ok(Namespace {
        name,
        labels: ns.metadata.labels.clone().unwrap_or_default(),
        annotations: ns.metadata.annotations.clone().unwrap_or_default(),
    })
}

/// A `v1/Pod` as the model holds it: identity, placement, IPs and
/// lifecycle, and of its containers only the UDP/SCTP ports they declare;
/// everything else (managed fields, conditions) is dropped here.
pub(crate) fn pod_from_k8s(pod: &k8s::Pod) -> Result<Pod, ConvertError> {
    let meta = &pod.metadata;
    let name = meta.name.clone().unwrap_or_default();
    let namespace = meta.namespace.clone().unwrap_or_default();
    if name.is_empty() || namespace.is_empty() {
        return Err(ConvertError::Missing("metadata.name and metadata.namespace"));
    }
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = Vec::new();
    let first = status.and_then(|s| s.pod_ip.as_deref());
    let all = status.and_then(|s| s.pod_ips.as_deref()).unwrap_or_default();
    for s in first
        .into_iter()
        .chain(all.iter().map(|p| p.ip.as_str()))
        .filter(|s| !s.is_empty())
    {
        let ip: IpAddr = s.parse().map_err(|_| ConvertError::BadIp(s.to_string()))?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let key = format!("{namespace}/{name}");
    let service_account = spec
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_string());
    Ok(Pod {
        uid: meta.uid.clone().filter(|u| !u.is_empty()).unwrap_or(key),
        namespace,
        name,
        labels: meta.labels.clone().unwrap_or_default(),
        annotations: meta.annotations.clone().unwrap_or_default(),
        node_name: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        service_account,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        ips,
        phase: status.and_then(|s| s.phase.clone()).unwrap_or_default(),
        deleting: meta.deletion_timestamp.is_some(),
        datagram_ports: spec.map(datagram_ports).unwrap_or_default(),
    })
}

/// The UDP and SCTP ports a pod's containers (init containers included:
/// sidecars are init containers) declare, sorted and de-duplicated.
fn datagram_ports(spec: &k8s::PodSpec) -> Vec<DatagramPort> {
    let containers = spec.containers.iter().chain(spec.init_containers.iter().flatten());
    let mut out: Vec<DatagramPort> = containers
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let protocol = match p.protocol.as_deref() {
                Some("UDP") => DatagramProtocol::Udp,
                Some("SCTP") => DatagramProtocol::Sctp,
                _ => return None,
            };
            Some(DatagramPort {
                protocol,
                port: u16::try_from(p.container_port).ok().filter(|p| *p != 0)?,
            })
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Splits YAML text at `---` document markers, keeping each document's
/// 1-based starting line so errors point into the file, not the fragment.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start = 0usize;
    let mut start_line = 1usize;
    let mut offset = 0usize;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end();
        let is_marker = trimmed == "---" || trimmed.starts_with("--- ") || trimmed == "...";
        if is_marker {
            docs.push((start_line, &text[start..offset]));
            let after = if trimmed.starts_with("--- ") { 4 } else { line.len() };
            start = offset + after.min(line.len());
            start_line = i + 1 + usize::from(after >= line.len());
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start..]));
    docs.into_iter().filter(|(_, d)| !d.trim().is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file's objects, or its first error (file or document).
    fn parse(text: &str) -> Result<Vec<Object>, ParseError> {
        let mut parsed = parse_file(Path::new("cfg/pods.yaml"), text)?;
        match parsed.rejected.is_empty() {
            true => Ok(parsed.objects),
            false => Err(parsed.rejected.remove(0).error),
        }
    }

    #[test]
    fn an_invalid_document_is_rejected_alone_and_named() {
        let text = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: b}\nstatus: {podIP: nope}\n---\napiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: x}}\n- {apiVersion: v1, kind: Pod, metadata: {name: c}}\n";
        let parsed = parse_file(Path::new("cfg/mixed.yaml"), text).unwrap();
        let kinds: Vec<String> = parsed.objects.iter().map(|o| o.id().kind).collect();
        assert_eq!(kinds, ["PeerAuthentication", "Namespace"]);
        let ids: Vec<Option<ObjectId>> = parsed.rejected.iter().map(|r| r.id.clone()).collect();
        let id = |namespace: &str, name: &str| ObjectId {
            kind: "Pod".into(),
            namespace: namespace.into(),
            name: name.into(),
        };
        // A pod without its namespace names no object: it could be any.
        assert_eq!(ids, [Some(id("b", "a")), None]);
        let first = parsed.rejected[0].error.to_string();
        assert!(first.contains("cfg/mixed.yaml: document 2 (line 6)"), "{first}");
        // Broken YAML anywhere fails the whole file, with its line.
        let err = parse_file(Path::new("cfg/mixed.yaml"), &format!("{text}---\nkind: [\n")).unwrap_err();
        assert!(matches!(err, ParseError::Syntax { doc: 4, .. }), "{err}");
    }

    const POD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  uid: '1234'
  labels: {app: web}
spec:
  nodeName: node-1
  serviceAccountName: web-sa
status:
  podIP: 10.1.1.2
  podIPs:
  - ip: 10.1.1.2
  - ip: fd00::2
";

    #[test]
    fn reads_pods_and_namespaces_from_multi_document_files() {
        let text = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n---\n{POD}---\n");
        let objs = parse(&text).unwrap();
        assert_eq!(objs.len(), 2);
        let Object::Pod(p) = &objs[1] else { panic!("not a pod") };
        assert_eq!(p.key(), "shop/web");
        assert_eq!(p.uid, "1234");
        assert_eq!(p.service_account, "web-sa");
        assert_eq!(p.node_name, "node-1");
        assert_eq!(
            p.ips,
            vec!["10.1.1.2".parse::<IpAddr>().unwrap(), "fd00::2".parse().unwrap()]
        );
    }

    #[test]
    fn a_pod_from_the_api_and_the_same_pod_from_yaml_are_one_model() {
        let json = serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "shop", "uid": "1234", "labels": {"app": "web"},
                "resourceVersion": "77", "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
            "spec": {"nodeName": "node-1", "serviceAccountName": "web-sa",
                "containers": [{"name": "app", "image": "app:1"}]},
            "status": {"podIP": "10.1.1.2", "podIPs": [{"ip": "10.1.1.2"}, {"ip": "fd00::2"}]}});
        let from_api = pod_from_k8s(&serde_json::from_value(json).unwrap()).unwrap();
        let [Object::Pod(from_yaml)] = &parse(POD).unwrap()[..] else {
            panic!("one pod expected")
        };
        assert_eq!(&from_api, from_yaml);
    }

    #[test]
    fn a_pod_field_of_the_wrong_type_is_invalid_with_its_name() {
        let err = parse("apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: b}\nspec: {hostNetwork: [1]}\n")
            .unwrap_err();
        assert!(
            matches!(err, ParseError::Invalid { .. }) && err.to_string().contains("b/a"),
            "{err}"
        );
    }

    #[test]
    fn finished_and_deleting_pods_are_marked() {
        let objs = parse(&format!(
            "{POD}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: b, namespace: shop, deletionTimestamp: '2026-01-01T00:00:00Z'}}\nstatus: {{phase: Running, podIP: 10.1.1.3}}\n"
        ))
        .unwrap();
        let [Object::Pod(live), Object::Pod(deleting)] = &objs[..] else {
            panic!("two pods expected")
        };
        assert!(live.claims_ips() && !live.deleting);
        assert!(deleting.deleting && !deleting.claims_ips());
    }

    #[test]
    fn a_policy_with_an_unknown_field_is_kept_and_marked_invalid() {
        let objs = parse(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  rules:\n  - to:\n    - operation: {port: ['80']}\n",
        )
        .unwrap();
        let [Object::AuthorizationPolicy(p)] = &objs[..] else {
            panic!("one policy expected")
        };
        let e = p.meta.error.as_deref().unwrap_or_default();
        assert!(e.contains("spec.rules[0].to[0].operation.port: unknown field"), "{e}");
    }

    #[test]
    fn namespace_annotations_are_read() {
        let objs = parse(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  annotations: {nodeward.io/egress: tls-only}\n",
        )
        .unwrap();
        let [Object::Namespace(ns)] = &objs[..] else {
            panic!("one namespace expected")
        };
        assert_eq!(ns.annotations["nodeward.io/egress"], "tls-only");
    }

    #[test]
    fn empty_service_account_means_default() {
        let objs = parse("apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: b}\n").unwrap();
        let Object::Pod(p) = &objs[0] else { panic!() };
        assert_eq!(p.service_account, "default");
    }

    #[test]
    fn lists_are_unpacked() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: x}\n";
        assert_eq!(parse(text).unwrap().len(), 1);
    }

    #[test]
    fn kinds_the_agent_does_not_use_are_skipped_not_fatal() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d, namespace: a}\n";
        assert_eq!(parse(text).unwrap().len(), 1);
    }

    #[test]
    fn services_and_endpoint_slices_are_read() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{port: 80, targetPort: http}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-x, namespace: shop, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: '', port: 8080}]\nendpoints: [{addresses: [10.1.1.1]}]\n";
        let objs = parse(text).unwrap();
        let [Object::Service(s), Object::EndpointSlice(e)] = &objs[..] else {
            panic!("a Service and a slice expected: {objs:?}")
        };
        assert_eq!(s.key(), "shop/web");
        assert_eq!(e.endpoints[0].addresses, vec!["10.1.1.1".parse::<IpAddr>().unwrap()]);
        let err =
            parse("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: nope}\n")
                .unwrap_err();
        assert!(
            err.to_string().contains("shop/web") && err.to_string().contains("spec.clusterIPs"),
            "{err}"
        );
    }

    #[test]
    fn nodes_keep_their_ip_addresses_only() {
        let text = "apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {kubernetes.io/os: linux}}\nstatus:\n  addresses:\n  - {type: InternalIP, address: 10.0.0.1}\n  - {type: InternalIP, address: 'fd00::1'}\n  - {type: ExternalIP, address: 198.51.100.1}\n  - {type: Hostname, address: n1}\n  images: [{names: [app:1], sizeBytes: 100}]\n";
        let [Object::Node(n)] = &parse(text).unwrap()[..] else {
            panic!("one node expected")
        };
        assert_eq!(n.name, "n1");
        let want: Vec<IpAddr> = ["10.0.0.1", "fd00::1", "198.51.100.1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(n.addresses, want);
        let err = parse("apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nstatus: {addresses: [{type: InternalIP, address: nope}]}\n")
            .unwrap_err();
        assert!(
            err.to_string().contains("n1") && err.to_string().contains("nope"),
            "{err}"
        );
    }

    #[test]
    fn malformed_yaml_reports_the_line_in_the_file() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: [unclosed\n";
        match parse(text).unwrap_err() {
            ParseError::Syntax { doc, line, .. } => {
                assert_eq!(doc, 2);
                assert!(line >= 7, "line {line} should point into the second document");
            }
            other => panic!("expected a syntax error, got {other}"),
        }
    }

    #[test]
    fn bad_pod_ip_is_invalid() {
        let err = parse("apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: b}\nstatus: {podIP: 10.0.0.300}\n")
            .unwrap_err();
        assert!(matches!(err, ParseError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("b/a"), "{err}");
        assert!(err.to_string().contains("10.0.0.300"), "{err}");
    }

    #[test]
    fn pod_without_namespace_is_invalid() {
        let err = parse("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n").unwrap_err();
        assert!(err.to_string().contains("metadata.namespace"), "{err}");
    }
}
