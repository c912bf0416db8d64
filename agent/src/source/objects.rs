//! Kubernetes YAML into the agent's model: `Namespace`, `Pod` and `List`
//! documents, with errors that name the file, the document and the line.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use crate::policy::model::{
    AuthorizationPolicy, PeerAuthentication, parse_authorization_policy, parse_peer_authentication,
};
use crate::state::workload::{Namespace, Pod};

/// A parsed object from the config directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    /// A `v1/Namespace`.
    Namespace(Namespace),
    /// A `v1/Pod`.
    Pod(Pod),
    /// A `security.istio.io` PeerAuthentication (kept even when invalid).
    PeerAuthentication(Arc<PeerAuthentication>),
    /// A `security.istio.io` AuthorizationPolicy (kept even when invalid).
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
}

/// Why a file was rejected. The file's previous good content stays in force.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
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
    /// A kind this agent does not read.
    #[error(
        "{file}: document {doc} (line {line}): unknown kind {kind:?} (apiVersion {api_version:?}); expected Namespace, Pod or List"
    )]
    UnknownKind {
        /// File.
        file: String,
        /// 1-based document number.
        doc: usize,
        /// 1-based line where the document starts.
        line: usize,
        /// The kind found.
        kind: String,
        /// The apiVersion found.
        api_version: String,
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

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Meta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    deletion_timestamp: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodSpecDoc {
    #[serde(default)]
    node_name: String,
    #[serde(default)]
    service_account_name: String,
    #[serde(default)]
    host_network: bool,
}

#[derive(Deserialize)]
struct PodIpDoc {
    ip: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodStatusDoc {
    #[serde(default, rename = "podIP")]
    pod_ip: String,
    #[serde(default, rename = "podIPs")]
    pod_ips: Vec<PodIpDoc>,
    #[serde(default)]
    phase: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Doc {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: serde_norway::Value,
    #[serde(default)]
    spec: serde_norway::Value,
    #[serde(default)]
    status: serde_norway::Value,
    #[serde(default)]
    items: Vec<serde_norway::Value>,
}

/// Where a document sits, for error messages.
struct At<'a> {
    file: &'a str,
    doc: usize,
    line: usize,
}

/// Parses one file of (possibly multi-document) Kubernetes YAML.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<Object>, ParseError> {
    let file = path.display().to_string();
    let mut out = Vec::new();
    for (i, (start_line, body)) in split_documents(text).into_iter().enumerate() {
        let at = At {
            file: &file,
            doc: i + 1,
            line: start_line,
        };
        let value: serde_norway::Value = serde_norway::from_str(body).map_err(|e| ParseError::Syntax {
            file: file.clone(),
            doc: at.doc,
            line: start_line + e.location().map_or(0, |l| l.line().saturating_sub(1)),
            message: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        parse_value(value, &at, &mut out)?;
    }
    Ok(out)
}

fn parse_value(value: serde_norway::Value, at: &At<'_>, out: &mut Vec<Object>) -> Result<(), ParseError> {
    let syntax = |e: serde_norway::Error| ParseError::Syntax {
        file: at.file.to_string(),
        doc: at.doc,
        line: at.line,
        message: e.to_string(),
    };
    let doc: Doc = serde_norway::from_value(value).map_err(syntax)?;
    let metadata: Meta = if doc.metadata.is_null() {
        Meta::default()
    } else {
        serde_norway::from_value(doc.metadata.clone()).map_err(|e| ParseError::Syntax {
            file: at.file.to_string(),
            doc: at.doc,
            line: at.line,
            message: format!("metadata: {e}"),
        })?
    };
    let invalid = |name: &str, message: String| ParseError::Invalid {
        file: at.file.to_string(),
        doc: at.doc,
        line: at.line,
        kind: doc.kind.clone(),
        name: name.to_string(),
        message,
    };
    match (doc.api_version.as_str(), doc.kind.as_str()) {
        ("v1", "List") => {
            for item in doc.items {
                parse_value(item, at, out)?;
            }
        }
        (
            "security.istio.io/v1" | "security.istio.io/v1beta1",
            kind @ ("PeerAuthentication" | "AuthorizationPolicy"),
        ) => {
            if metadata.name.is_empty() || metadata.namespace.is_empty() {
                return Err(invalid("", "metadata.name and metadata.namespace are required".into()));
            }
            let spec = if doc.spec.is_null() {
                serde_norway::Value::Mapping(Default::default())
            } else {
                doc.spec.clone()
            };
            out.push(if kind == "PeerAuthentication" {
                Object::PeerAuthentication(Arc::new(parse_peer_authentication(&doc.metadata, &spec)))
            } else {
                Object::AuthorizationPolicy(Arc::new(parse_authorization_policy(&doc.metadata, &spec)))
            });
        }
        ("v1", "Namespace") => {
            if metadata.name.is_empty() {
                return Err(invalid("", "metadata.name is required".into()));
            }
            out.push(Object::Namespace(Namespace {
                name: metadata.name,
                labels: metadata.labels,
                annotations: metadata.annotations,
            }));
        }
        ("v1", "Pod") => {
            let meta = metadata;
            let key = format!("{}/{}", meta.namespace, meta.name);
            if meta.name.is_empty() || meta.namespace.is_empty() {
                return Err(invalid(
                    &key,
                    "metadata.name and metadata.namespace are required".into(),
                ));
            }
            let spec: PodSpecDoc = if doc.spec.is_null() {
                PodSpecDoc::default()
            } else {
                serde_norway::from_value(doc.spec).map_err(|e| invalid(&key, format!("spec: {e}")))?
            };
            let status: PodStatusDoc = if doc.status.is_null() {
                PodStatusDoc::default()
            } else {
                serde_norway::from_value(doc.status).map_err(|e| invalid(&key, format!("status: {e}")))?
            };
            let mut ips: Vec<IpAddr> = Vec::new();
            let all = std::iter::once(status.pod_ip.as_str())
                .chain(status.pod_ips.iter().map(|p| p.ip.as_str()))
                .filter(|s| !s.is_empty());
            for s in all {
                let ip: IpAddr = s
                    .parse()
                    .map_err(|_| invalid(&key, format!("status.podIPs: {s:?} is not an IP address")))?;
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
            let uid = if meta.uid.is_empty() { key.clone() } else { meta.uid };
            out.push(Object::Pod(Pod {
                namespace: meta.namespace,
                name: meta.name,
                uid,
                labels: meta.labels,
                annotations: meta.annotations,
                node_name: spec.node_name,
                service_account: if spec.service_account_name.is_empty() {
                    "default".to_string()
                } else {
                    spec.service_account_name
                },
                host_network: spec.host_network,
                ips,
                phase: status.phase,
                deleting: meta.deletion_timestamp.is_some(),
            }));
        }
        (api_version, kind) => {
            return Err(ParseError::UnknownKind {
                file: at.file.to_string(),
                doc: at.doc,
                line: at.line,
                kind: kind.to_string(),
                api_version: api_version.to_string(),
            });
        }
    }
    Ok(())
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

    fn parse(text: &str) -> Result<Vec<Object>, ParseError> {
        parse_file(Path::new("cfg/pods.yaml"), text)
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
    fn unknown_kind_names_file_document_and_line() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: apps/v1\nkind: Deployment\n";
        let err = parse(text).unwrap_err();
        assert_eq!(
            err,
            ParseError::UnknownKind {
                file: "cfg/pods.yaml".into(),
                doc: 2,
                line: 5,
                kind: "Deployment".into(),
                api_version: "apps/v1".into(),
            }
        );
        assert!(err.to_string().contains("cfg/pods.yaml: document 2 (line 5)"), "{err}");
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
