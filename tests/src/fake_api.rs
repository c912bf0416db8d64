//! A tiny Kubernetes API server for the agent's `--source kube`: plain
//! HTTP/1.1 on the loopback of a node's namespace, answering lists with
//! the API server's JSON and holding watches open so a test can append
//! events (newline-delimited JSON, as the API server streams them).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::cluster::PlacedPod;
use crate::netns::run_in;

#[derive(Default)]
struct State {
    /// List responses (status code, body) by path.
    lists: HashMap<String, (u16, Value)>,
    /// Open watches by path, each with its field selector.
    watches: HashMap<String, Vec<(TcpStream, Option<String>)>>,
    /// Requests seen: `path` or `path?watch`.
    seen: Vec<String>,
    /// Paths whose watches fail (500) until healed.
    failing_watches: std::collections::HashSet<String>,
}

/// The fake API server; it runs until the test process ends.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    /// Where it listens, inside the namespace it was started in.
    pub addr: SocketAddr,
}

/// Path of Pods (a `spec.nodeName` field selector is honoured).
pub const PODS: &str = "/api/v1/pods";
/// Path of Namespaces.
pub const NAMESPACES: &str = "/api/v1/namespaces";
/// Path of Services.
pub const SERVICES: &str = "/api/v1/services";
/// Path of EndpointSlices (`discovery.k8s.io/v1`).
pub const ENDPOINT_SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
/// Path of Nodes.
pub const NODES: &str = "/api/v1/nodes";
/// Path of PeerAuthentications (`security.istio.io/v1`).
pub const PEER_AUTHENTICATIONS: &str = "/apis/security.istio.io/v1/peerauthentications";
/// The API server's OIDC discovery document.
pub const OIDC_DISCOVERY: &str = "/.well-known/openid-configuration";
/// The service-account issuer's keys.
pub const OIDC_JWKS: &str = "/openid/v1/jwks";
/// Path of AuthorizationPolicies (`security.istio.io/v1`).
pub const AUTHORIZATION_POLICIES: &str = "/apis/security.istio.io/v1/authorizationpolicies";

impl FakeApi {
    /// Starts a server on `127.0.0.1` inside network namespace `netns`,
    /// serving empty lists of every kind the agent watches.
    pub fn start_in(netns: &str) -> FakeApi {
        let listener = run_in(netns, || {
            TcpListener::bind("127.0.0.1:0").expect("bind fake API server")
        });
        let addr = listener.local_addr().expect("fake API address");
        let api = FakeApi {
            state: Arc::default(),
            addr,
        };
        for (path, kind) in [
            (PODS, "PodList"),
            (NAMESPACES, "NamespaceList"),
            (SERVICES, "ServiceList"),
            (ENDPOINT_SLICES, "EndpointSliceList"),
            (NODES, "NodeList"),
            (PEER_AUTHENTICATIONS, "PeerAuthenticationList"),
            (AUTHORIZATION_POLICIES, "AuthorizationPolicyList"),
        ] {
            api.list(path, kind, "1", Vec::new());
        }
        let server = api.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let server = server.clone();
                std::thread::spawn(move || server.serve(conn));
            }
        });
        api
    }

    /// Sets the list response of `path`.
    pub fn list(&self, path: &str, kind: &str, resource_version: &str, items: Vec<Value>) {
        let body = json!({"kind": kind, "apiVersion": "v1",
            "metadata": {"resourceVersion": resource_version}, "items": items});
        self.state.lock().unwrap().lists.insert(path.into(), (200, body));
    }

    /// Sets the answer of `path` to any document (OIDC discovery, JWKS).
    pub fn set(&self, path: &str, body: Value) {
        self.state.lock().unwrap().lists.insert(path.into(), (200, body));
    }

    /// Makes lists of `path` fail with a 500 Status.
    pub fn fail_list(&self, path: &str) {
        let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500});
        self.state.lock().unwrap().lists.insert(path.into(), (500, body));
    }

    /// Makes watches of `path` fail: open ones are closed, new ones get a
    /// 500 Status (lists still work), until [`FakeApi::heal_watch`].
    pub fn fail_watch(&self, path: &str) {
        let mut state = self.state.lock().unwrap();
        state.failing_watches.insert(path.into());
        state.watches.remove(path);
    }

    /// Lets watches of `path` work again.
    pub fn heal_watch(&self, path: &str) {
        self.state.lock().unwrap().failing_watches.remove(path);
    }

    /// How many requests of `what` (`path` or `path?watch`) were seen.
    pub fn count(&self, what: &str) -> usize {
        self.state.lock().unwrap().seen.iter().filter(|s| *s == what).count()
    }

    /// Appends a watch event to every open watch of `path` whose field
    /// selector selects its object, waiting up to 10 s for one to be open.
    pub fn send(&self, path: &str, event: &Value) {
        let mut line = serde_json::to_vec(event).expect("event JSON");
        line.push(b'\n');
        let object_event = ["ADDED", "MODIFIED", "DELETED"].contains(&event["type"].as_str().unwrap_or(""));
        for _ in 0..1000 {
            let mut state = self.state.lock().unwrap();
            if let Some(watches) = state.watches.get_mut(path) {
                watches.retain_mut(|(w, selector)| {
                    (object_event && !selects(selector.as_deref(), &event["object"])) || w.write_all(&line).is_ok()
                });
                if !watches.is_empty() {
                    return;
                }
            }
            drop(state);
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no watch open on {path}");
    }

    /// Writes a kubeconfig for this server (plain HTTP, no credentials) into `dir`.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\n",
            self.addr
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Answers requests on one keep-alive connection; a watch keeps it.
    fn serve(&self, mut conn: TcpStream) {
        let mut buf = Vec::new();
        loop {
            let Some(end) = read_head(&mut conn, &mut buf) else {
                return;
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end);
            let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
            let (path, query) = target.split_once('?').unwrap_or((&target, ""));
            let watch = query.split('&').any(|kv| kv == "watch=true" || kv == "watch=1");
            let selector = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("fieldSelector="))
                .map(|s| s.replace("%21", "!").replace("%3D", "="));
            let mut state = self.state.lock().unwrap();
            state.seen.push(if watch {
                format!("{path}?watch")
            } else {
                path.to_string()
            });
            if watch && !state.failing_watches.contains(path) {
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n";
                if conn.write_all(head.as_bytes()).is_ok() {
                    state
                        .watches
                        .entry(path.to_string())
                        .or_default()
                        .push((conn, selector));
                }
                return;
            }
            let (status, mut body) = if watch {
                (
                    500,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": "etcdserver: leader changed", "reason": "InternalError", "code": 500}),
                )
            } else if path == "/apis/security.istio.io/v1" {
                (200, discovery())
            } else {
                state.lists.get(path).cloned().unwrap_or_else(|| {
                    (
                        404,
                        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "reason": "NotFound", "code": 404}),
                    )
                })
            };
            drop(state);
            if let Some(items) = body["items"].as_array_mut() {
                items.retain(|o| selects(selector.as_deref(), o));
            }
            let body = serde_json::to_vec(&body).expect("JSON");
            let head = format!(
                "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                if status == 200 { "OK" } else { "Error" },
                body.len()
            );
            if conn.write_all(head.as_bytes()).is_err() || conn.write_all(&body).is_err() {
                return;
            }
        }
    }
}

/// Whether a `spec.nodeName` field selector (`=` or `!=`) selects `obj`,
/// as the API server decides it.
fn selects(selector: Option<&str>, obj: &Value) -> bool {
    let node = obj["spec"]["nodeName"].as_str().unwrap_or("");
    match selector {
        None => true,
        Some(s) => match (s.strip_prefix("spec.nodeName!="), s.strip_prefix("spec.nodeName=")) {
            (Some(n), _) => node != n,
            (None, Some(n)) => node == n,
            (None, None) => panic!("fake API server: unsupported field selector {s}"),
        },
    }
}

/// Reads until a request head is complete; the head's length, or `None` at EOF.
fn read_head(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        let mut chunk = [0u8; 4096];
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn discovery() -> Value {
    let resource = |name: &str, kind: &str| {
        json!({"name": name, "singularName": name.trim_end_matches('s'), "namespaced": true,
            "kind": kind, "verbs": ["get", "list", "watch"]})
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "security.istio.io/v1",
        "resources": [resource("peerauthentications", "PeerAuthentication"),
            resource("authorizationpolicies", "AuthorizationPolicy")]})
}

/// A placed pod as the API server returns it (managed fields and a
/// container included, as a real one has them).
pub fn pod_json(p: &PlacedPod, resource_version: &str) -> Value {
    let labels: serde_json::Map<String, Value> = p
        .spec
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
        .collect();
    let ips: Vec<Value> = p.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": p.spec.name, "namespace": p.spec.namespace, "uid": p.uid,
            "resourceVersion": resource_version, "labels": labels,
            "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:podIPs": {}}}}]},
        "spec": {"nodeName": p.node, "serviceAccountName": p.spec.service_account,
            "containers": [{"name": "app", "image": "registry.example/app:1"}]},
        "status": {"phase": "Running", "podIP": p.ips.first().map(|ip| ip.to_string()), "podIPs": ips}})
}

/// A namespace as the API server returns it, enrolled or not.
pub fn namespace_json(name: &str, ambient: bool, resource_version: &str) -> Value {
    let labels = if ambient {
        json!({"istio.io/dataplane-mode": "ambient", "kubernetes.io/metadata.name": name})
    } else {
        json!({"kubernetes.io/metadata.name": name})
    };
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "resourceVersion": resource_version, "labels": labels},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}
