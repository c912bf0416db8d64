//! The API source against kube's mock service (`tower-test`), replaying
//! the API server's exact JSON: lists with a resourceVersion, watch events
//! as newline-delimited JSON (ADDED, MODIFIED, DELETED, BOOKMARK), a
//! `410 Gone` ERROR event, failing lists, a dropped watch, and discovery.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::*;
use crate::state::Snapshot;

const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";
const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const NODES: &str = "/api/v1/nodes";
const PEER_AUTHN: &str = "peerauthentications";
const AUTHZ: &str = "authorizationpolicies";

/// A response body the test can keep writing to: a held-open watch.
struct ChanBody(mpsc::UnboundedReceiver<Bytes>);

impl http_body::Body for ChanBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(http_body::Frame::data(b))))
    }
}

/// What the fake API server answers, by path (query ignored but `watch`).
#[derive(Default)]
struct State {
    /// List responses (status, body) by path.
    lists: HashMap<String, (StatusCode, Value)>,
    /// The open watch of each path, with its field selector.
    watches: HashMap<String, (mpsc::UnboundedSender<Bytes>, Option<String>)>,
    /// Requests seen, as `path` or `path?watch`.
    seen: Vec<String>,
    /// Every request's path and query.
    queries: Vec<String>,
    /// Versions of security.istio.io that are served.
    istio_versions: Vec<&'static str>,
}

#[derive(Clone, Default)]
struct FakeApi(Arc<Mutex<State>>);

impl FakeApi {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    fn list(&self, path: &str, kind: &str, rv: &str, items: Vec<Value>) {
        let body = json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": items});
        self.state().lists.insert(path.to_string(), (StatusCode::OK, body));
    }

    fn fail_list(&self, path: &str) {
        let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "etcdserver: leader changed", "reason": "InternalError", "code": 500});
        self.state()
            .lists
            .insert(path.to_string(), (StatusCode::INTERNAL_SERVER_ERROR, body));
    }

    /// Appends one watch event to the open watch of `path`, waiting for the
    /// watcher to open it; an object's event is dropped, as the API server
    /// would, when the watch's field selector does not select the object.
    async fn send(&self, path: &str, event: Value) {
        for _ in 0..500 {
            if let Some((tx, selector)) = self.state().watches.get(path) {
                let object_event = ["ADDED", "MODIFIED", "DELETED"].contains(&event["type"].as_str().unwrap_or(""));
                if object_event && !selects(selector.as_deref(), &event["object"]) {
                    return;
                }
                let mut line = serde_json::to_vec(&event).unwrap();
                line.push(b'\n');
                if tx.send(line.into()).is_ok() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no watch open on {path}");
    }

    /// Ends the watch of `path` as a dropped connection would.
    fn drop_watch(&self, path: &str) {
        self.state().watches.remove(path);
    }

    fn count(&self, request: &str) -> usize {
        self.state().seen.iter().filter(|s| *s == request).count()
    }

    fn respond(&self, req: &Request<kube::client::Body>) -> Response<ChanBody> {
        let path = req.uri().path().to_string();
        let watch = req.uri().query().is_some_and(|q| q.contains("watch=true"));
        let mut state = self.state();
        state
            .seen
            .push(if watch { format!("{path}?watch") } else { path.clone() });
        state
            .queries
            .push(format!("{path}?{}", req.uri().query().unwrap_or("")));
        if let Some(version) = path.strip_prefix("/apis/security.istio.io/")
            && !version.contains('/')
        {
            if !state.istio_versions.contains(&version) {
                return reply(StatusCode::NOT_FOUND, &not_found());
            }
            let resource = |name: &str, kind: &str| {
                json!({"name": name, "singularName": name.trim_end_matches('s'), "namespaced": true,
                    "kind": kind, "verbs": ["get", "list", "watch"]})
            };
            let body = json!({"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": format!("security.istio.io/{version}"),
                "resources": [resource(PEER_AUTHN, "PeerAuthentication"), resource(AUTHZ, "AuthorizationPolicy")]});
            return reply(StatusCode::OK, &body);
        }
        let selector = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("fieldSelector="))
            .map(|s| s.replace("%21", "!").replace("%3D", "="));
        if watch {
            let (tx, rx) = mpsc::unbounded_channel();
            state.watches.insert(path, (tx, selector));
            return response(StatusCode::OK, rx);
        }
        match state.lists.get(&path).cloned() {
            Some((status, mut body)) => {
                if let Some(items) = body["items"].as_array_mut() {
                    items.retain(|o| selects(selector.as_deref(), o));
                }
                reply(status, &body)
            }
            None => reply(StatusCode::NOT_FOUND, &not_found()),
        }
    }
}

/// Whether a `spec.nodeName` field selector (`=` or `!=`) selects `obj`.
fn selects(selector: Option<&str>, obj: &Value) -> bool {
    let node = obj["spec"]["nodeName"].as_str().unwrap_or("");
    match selector {
        None => true,
        Some(s) => match (s.strip_prefix("spec.nodeName!="), s.strip_prefix("spec.nodeName=")) {
            (Some(n), _) => node != n,
            (None, Some(n)) => node == n,
            (None, None) => panic!("unexpected field selector {s}"),
        },
    }
}

fn response(status: StatusCode, body: mpsc::UnboundedReceiver<Bytes>) -> Response<ChanBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(ChanBody(body))
        .unwrap()
}

/// A complete response of `body`.
fn reply(status: StatusCode, body: &Value) -> Response<ChanBody> {
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = tx.send(serde_json::to_vec(body).unwrap().into());
    response(status, rx)
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "the server could not find the requested resource", "reason": "NotFound", "code": 404})
}

fn istio(version: &str, kind: &str) -> String {
    format!("/apis/security.istio.io/{version}/{kind}")
}

/// A pod of node `n1` in namespace `shop` as the API server sends it,
/// managed fields and containers included.
fn pod(name: &str, ip: &str, rv: &str) -> Value {
    pod_on("n1", name, ip, rv)
}

/// A pod of `node` in namespace `shop`.
fn pod_on(node: &str, name: &str, ip: &str, rv: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "resourceVersion": rv,
            "labels": {"app": name},
            "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                "time": "2026-11-29T10:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}}]},
        "spec": {"nodeName": node, "serviceAccountName": name,
            "containers": [{"name": "app", "image": "registry.example/app:1", "ports": [{"containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn namespace(name: &str, rv: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "resourceVersion": rv, "labels": {"istio.io/dataplane-mode": "ambient"}},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

fn deny_policy(version: &str, rv: &str) -> Value {
    json!({"apiVersion": format!("security.istio.io/{version}"), "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-9", "namespace": "shop", "resourceVersion": rv},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9"]}}]}]}})
}

/// Service `shop/web` (ClusterIP 10.96.0.10, port 80 to 8080) as the API
/// server sends it.
fn service(rv: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop", "uid": "uid-svc-web", "resourceVersion": rv,
            "managedFields": [{"manager": "kubectl", "operation": "Apply", "apiVersion": "v1",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
            "ipFamilies": ["IPv4"], "selector": {"app": "web"}, "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
        "status": {"loadBalancer": {}}})
}

/// The EndpointSlice of `shop/web`: one ready endpoint, `ip` on `node`.
fn endpoint_slice(ip: &str, node: &str, rv: &str) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abcde", "namespace": "shop", "resourceVersion": rv,
            "labels": {"kubernetes.io/service-name": "web", "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false},
            "nodeName": node, "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web", "uid": "uid-web"}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

/// Node `name` at `ip` as the kubelet reports it: addresses, images and
/// conditions (which the agent does not keep).
fn node(name: &str, ip: &str, rv: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "resourceVersion": rv, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": "10.1.0.0/24"},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
            "images": [{"names": ["registry.example/app:1"], "sizeBytes": 1_000_000}],
            "conditions": [{"type": "Ready", "status": "True"}]}})
}

fn event(kind: &str, object: Value) -> Value {
    json!({"type": kind, "object": object})
}

fn bookmark(kind: &str, rv: &str) -> Value {
    event(
        "BOOKMARK",
        json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": rv}}),
    )
}

/// Starts a source for node `n1` against `api`.
fn start(api: &FakeApi) -> (Store, SourceHealth, CancellationToken) {
    let (service, mut handle) = tower_test::mock::pair::<Request<kube::client::Body>, Response<ChanBody>>();
    let server = api.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            send.send_response(server.respond(&req));
        }
    });
    let client = Client::new(service, "default");
    let source = KubeSource::new(client, "n1", Assembler::default());
    let health = source.health();
    let store = Store::new();
    let cancel = CancellationToken::new();
    tokio::spawn(source.run(store.clone(), cancel.clone()));
    (store, health, cancel)
}

/// Waits up to 10 s (the watcher's backoff is 0.8 s and up) for `cond`.
async fn eventually(store: &Store, what: &str, cond: impl Fn(&Snapshot) -> bool) {
    for _ in 0..1000 {
        if cond(&store.current()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{what}: not reached; state: {:?}",
        store.current().pods.keys().collect::<Vec<_>>()
    );
}

fn pod_ips(snap: &Snapshot) -> Vec<(String, String)> {
    snap.pods
        .values()
        .map(|p| {
            (
                p.key(),
                p.ips.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","),
            )
        })
        .collect()
}

fn served(api: &FakeApi) {
    api.list(PODS, "PodList", "10", vec![pod("web", "10.1.0.2", "9")]);
    api.list(NAMESPACES, "NamespaceList", "20", vec![namespace("shop", "19")]);
    api.list(
        &istio("v1", AUTHZ),
        "AuthorizationPolicyList",
        "30",
        vec![deny_policy("v1", "29")],
    );
    api.list(&istio("v1", PEER_AUTHN), "PeerAuthenticationList", "40", vec![]);
    api.list(SERVICES, "ServiceList", "50", vec![]);
    api.list(SLICES, "EndpointSliceList", "60", vec![]);
    api.list(NODES, "NodeList", "70", vec![]);
}

#[tokio::test]
async fn nothing_is_published_or_ready_until_every_kind_is_listed_then_watch_events_apply() {
    let api = FakeApi::default();
    api.state().istio_versions = vec!["v1", "v1beta1"];
    served(&api);
    // PeerAuthentications cannot be listed yet.
    api.fail_list(&istio("v1", PEER_AUTHN));
    let (store, health, _cancel) = start(&api);

    // The other kinds list at once; readiness then names only the missing
    // one, with the error that keeps it missing.
    for _ in 0..500 {
        let problems = health.problems();
        if problems.len() == 1 && problems[0].contains("leader changed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let problems = health.problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("PeerAuthentications not synced yet") && problems[0].contains("leader changed"),
        "{problems:?}"
    );
    assert_eq!(
        store.current().generation,
        0,
        "nothing is published while a kind is missing: pods without their policies would be open"
    );

    api.list(&istio("v1", PEER_AUTHN), "PeerAuthenticationList", "40", vec![]);
    eventually(&store, "first full sync", |s| s.generation > 0).await;
    assert!(health.problems().is_empty(), "{:?}", health.problems());
    let snap = store.current();
    assert_eq!(pod_ips(&snap), vec![("shop/web".to_string(), "10.1.0.2".to_string())]);
    let web = &snap.pods["shop/web"];
    assert_eq!((web.uid.as_str(), web.service_account.as_str()), ("uid-web", "web"));
    assert_eq!(snap.namespaces["shop"].labels["istio.io/dataplane-mode"], "ambient");
    assert_eq!(snap.authorization_policies.len(), 1);
    assert!(snap.authorization_policies[0].meta.error.is_none());

    let queries = api.state().queries.clone();
    let pod_requests: Vec<&String> = queries.iter().filter(|q| q.starts_with(&format!("{PODS}?"))).collect();
    assert!(
        !pod_requests.is_empty() && pod_requests.iter().all(|q| !q.contains("fieldSelector")),
        "pods of every node are listed and watched: {pod_requests:?}"
    );

    api.send(PODS, event("ADDED", pod("api", "10.1.0.3", "11"))).await;
    eventually(&store, "ADDED", |s| s.pods.contains_key("shop/api")).await;
    api.send(PODS, event("MODIFIED", pod("web", "10.1.0.4", "12"))).await;
    eventually(&store, "MODIFIED", |s| {
        pod_ips(s).contains(&("shop/web".into(), "10.1.0.4".into()))
    })
    .await;
    let before = store.current().generation;
    api.send(PODS, bookmark("Pod", "13")).await;
    api.send(PODS, event("DELETED", pod("api", "10.1.0.3", "14"))).await;
    eventually(&store, "DELETED", |s| !s.pods.contains_key("shop/api")).await;
    assert_eq!(
        store.current().generation,
        before + 1,
        "the bookmark changed nothing, the deletion published once"
    );
    api.send(&istio("v1", AUTHZ), event("DELETED", deny_policy("v1", "31")))
        .await;
    eventually(&store, "policy DELETED", |s| s.authorization_policies.is_empty()).await;
}

#[tokio::test]
async fn after_410_gone_the_last_synced_state_serves_until_the_relist_completes() {
    let api = FakeApi::default();
    api.state().istio_versions = vec!["v1"];
    served(&api);
    let (store, health, _cancel) = start(&api);
    eventually(&store, "first full sync", |s| s.pods.contains_key("shop/web")).await;
    api.send(PODS, event("ADDED", pod("api", "10.1.0.3", "11"))).await;
    eventually(&store, "ADDED", |s| s.pods.contains_key("shop/api")).await;

    // The API server compacted its history: the watch gets 410 Gone and the
    // relist fails for a while (the API server restarts).
    api.fail_list(PODS);
    let lists = api.count(PODS);
    api.send(
        PODS,
        event(
            "ERROR",
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "too old resource version: 11 (15)", "reason": "Expired", "code": 410}),
        ),
    )
    .await;
    for _ in 0..1000 {
        if api.count(PODS) >= lists + 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        api.count(PODS) >= lists + 2,
        "the watcher relists, with backoff, after 410 and failures"
    );
    assert_eq!(
        pod_ips(&store.current()),
        vec![
            ("shop/api".to_string(), "10.1.0.3".to_string()),
            ("shop/web".to_string(), "10.1.0.2".to_string())
        ],
        "the last synced state keeps serving"
    );
    assert!(health.problems().is_empty(), "synced once: still ready");

    // The relist succeeds: `api` is gone, `db` appeared meanwhile.
    api.list(
        PODS,
        "PodList",
        "20",
        vec![pod("web", "10.1.0.2", "9"), pod("db", "10.1.0.5", "18")],
    );
    eventually(&store, "relisted", |s| {
        s.pods.contains_key("shop/db") && !s.pods.contains_key("shop/api")
    })
    .await;
    api.send(PODS, event("ADDED", pod("cache", "10.1.0.6", "21"))).await;
    eventually(&store, "watching again", |s| s.pods.contains_key("shop/cache")).await;
}

#[tokio::test]
async fn a_dropped_watch_is_resumed_and_v1beta1_is_used_where_v1_is_not_served() {
    let api = FakeApi::default();
    api.state().istio_versions = vec!["v1beta1"];
    api.list(PODS, "PodList", "10", vec![]);
    api.list(NAMESPACES, "NamespaceList", "20", vec![namespace("shop", "19")]);
    api.list(
        &istio("v1beta1", AUTHZ),
        "AuthorizationPolicyList",
        "30",
        vec![deny_policy("v1beta1", "29")],
    );
    api.list(&istio("v1beta1", PEER_AUTHN), "PeerAuthenticationList", "40", vec![]);
    api.list(SERVICES, "ServiceList", "50", vec![]);
    api.list(SLICES, "EndpointSliceList", "60", vec![]);
    api.list(NODES, "NodeList", "70", vec![]);
    let (store, health, _cancel) = start(&api);
    eventually(&store, "synced from v1beta1", |s| s.authorization_policies.len() == 1).await;
    assert!(health.problems().is_empty());
    assert_eq!(api.count(&istio("v1", AUTHZ)), 0, "v1 is not served");

    let watches = api.count(&format!("{NAMESPACES}?watch"));
    let lists = api.count(NAMESPACES);
    api.drop_watch(NAMESPACES);
    for _ in 0..1000 {
        if api.count(&format!("{NAMESPACES}?watch")) > watches {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    api.send(NAMESPACES, event("ADDED", namespace("web", "21"))).await;
    eventually(&store, "namespace from the resumed watch", |s| {
        s.namespaces.contains_key("web")
    })
    .await;
    assert!(store.current().namespaces.contains_key("shop"));
    assert_eq!(api.count(NAMESPACES), lists, "a dropped watch resumes without a relist");
}

#[tokio::test]
async fn a_pod_that_cannot_be_converted_keeps_its_last_good_version() {
    let api = FakeApi::default();
    api.state().istio_versions = vec!["v1"];
    served(&api);
    let (store, _health, _cancel) = start(&api);
    eventually(&store, "first full sync", |s| s.pods.contains_key("shop/web")).await;
    api.send(PODS, event("MODIFIED", pod("web", "10.1.0.300", "12"))).await;
    api.send(PODS, event("ADDED", pod("api", "10.1.0.3", "13"))).await;
    eventually(&store, "later event", |s| s.pods.contains_key("shop/api")).await;
    assert_eq!(
        pod_ips(&store.current())[1],
        ("shop/web".to_string(), "10.1.0.2".to_string())
    );
}

#[tokio::test]
async fn a_bad_kubeconfig_is_refused_naming_the_file() {
    let path = std::env::temp_dir().join(format!("nodeward-kubeconfig-{}", std::process::id()));
    std::fs::write(&path, "apiVersion: v1\nkind: Config\nclusters: [oops\n").unwrap();
    let err = client(Some(&path)).await.err().expect("a broken kubeconfig is refused");
    let text = err.to_string();
    let _ = std::fs::remove_file(&path);
    assert!(
        matches!(err, KubeError::Kubeconfig { .. }) && text.contains(&path.display().to_string()),
        "{text}"
    );
}

#[tokio::test]
async fn a_pod_of_another_node_is_an_enrolled_destination_with_its_identity() {
    let api = FakeApi::default();
    api.state().istio_versions = vec!["v1"];
    served(&api);
    api.list(
        PODS,
        "PodList",
        "10",
        vec![pod("web", "10.1.0.2", "9"), pod_on("n2", "db", "10.2.0.7", "8")],
    );
    let (store, _health, _cancel) = start(&api);
    eventually(&store, "first full sync", |s| s.generation > 0).await;
    let db = store
        .current()
        .enrolled_workload("10.2.0.7".parse().unwrap())
        .expect("a pod on another node is an enrolled destination, reached through its tunnel");
    assert_eq!(
        (db.key().as_str(), db.node_name.as_str(), db.service_account.as_str()),
        ("shop/db", "n2", "db")
    );

    // One that appears later on a third node, from the watch stream.
    api.send(PODS, event("ADDED", pod_on("n3", "cache", "10.3.0.4", "11")))
        .await;
    eventually(&store, "remote pod ADDED", |s| {
        s.enrolled_workload("10.3.0.4".parse().unwrap())
            .is_some_and(|p| p.service_account == "cache" && p.node_name == "n3")
    })
    .await;
}

#[tokio::test]
async fn services_and_endpoint_slices_are_watched_and_resolve_the_cluster_ip() {
    let api = FakeApi::default();
    api.state().istio_versions = vec!["v1"];
    served(&api);
    // Not ready until Services and EndpointSlices are listed too.
    api.fail_list(SLICES);
    api.list(SERVICES, "ServiceList", "50", vec![service("49")]);
    let (store, health, _cancel) = start(&api);
    for _ in 0..500 {
        if health.problems().len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let problems = health.problems();
    assert!(
        problems.len() == 1 && problems[0].contains("EndpointSlices not synced yet"),
        "{problems:?}"
    );
    assert_eq!(store.current().generation, 0);

    api.list(
        SLICES,
        "EndpointSliceList",
        "60",
        vec![endpoint_slice("10.1.0.2", "n1", "59")],
    );
    let vip = "10.96.0.10:80".parse().unwrap();
    eventually(&store, "Service resolved", |s| s.service(vip).is_some()).await;
    let target = store.current().service(vip).unwrap();
    assert_eq!(target.service, "shop/web");
    assert_eq!(
        target.candidates.iter().map(|c| (c.addr, c.ready)).collect::<Vec<_>>(),
        vec![("10.1.0.2:8080".parse().unwrap(), true)]
    );

    // The slice's endpoint moves (watch MODIFIED); the Service is deleted.
    api.send(SLICES, event("MODIFIED", endpoint_slice("10.2.0.7", "n2", "61")))
        .await;
    eventually(&store, "slice MODIFIED", |s| {
        s.service(vip).is_some_and(|t| {
            t.candidates
                .iter()
                .map(|c| c.addr)
                .eq(["10.2.0.7:8080".parse().unwrap()])
        })
    })
    .await;
    api.send(SERVICES, event("DELETED", service("51"))).await;
    eventually(&store, "Service DELETED", |s| s.service(vip).is_none()).await;
}

#[tokio::test]
async fn nodes_are_watched_and_a_node_port_on_their_addresses_resolves_like_the_cluster_ip() {
    let api = FakeApi::default();
    api.state().istio_versions = vec!["v1"];
    served(&api);
    // Not ready, and nothing published, until Nodes are listed too.
    api.fail_list(NODES);
    let mut svc = service("49");
    svc["spec"]["type"] = json!("NodePort");
    svc["spec"]["ports"][0]["nodePort"] = json!(30080);
    api.list(SERVICES, "ServiceList", "50", vec![svc]);
    api.list(
        SLICES,
        "EndpointSliceList",
        "60",
        vec![endpoint_slice("10.1.0.2", "n1", "59")],
    );
    let (store, health, _cancel) = start(&api);
    for _ in 0..500 {
        if health.problems().len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let problems = health.problems();
    assert!(
        problems.len() == 1 && problems[0].contains("Nodes not synced yet"),
        "{problems:?}"
    );
    assert_eq!(store.current().generation, 0);

    api.list(NODES, "NodeList", "70", vec![node("n1", "192.168.0.1", "69")]);
    let on_n1 = "192.168.0.1:30080".parse().unwrap();
    eventually(&store, "NodePort resolved", |s| s.service(on_n1).is_some()).await;
    let via_node = store.current().service(on_n1).unwrap();
    let via_vip = store.current().service("10.96.0.10:80".parse().unwrap()).unwrap();
    assert_eq!(via_node.service, "shop/web");
    assert_eq!(via_node.candidates, via_vip.candidates, "the ClusterIP's endpoints");

    // A node joins from the watch stream; one leaves.
    api.send(NODES, event("ADDED", node("n2", "192.168.0.2", "71"))).await;
    let on_n2 = "192.168.0.2:30080".parse().unwrap();
    eventually(&store, "node ADDED", |s| s.service(on_n2).is_some()).await;
    api.send(NODES, event("DELETED", node("n1", "192.168.0.1", "72"))).await;
    eventually(&store, "node DELETED", |s| s.service(on_n1).is_none()).await;
}
