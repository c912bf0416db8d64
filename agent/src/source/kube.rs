//! The Kubernetes API as the config source.
//!
//! One watcher per kind, each cluster-wide: Pods (every node's: a
//! connection to a pod on another node is tunnelled and checked against its
//! identity, so the agent needs every pod's IP and service account, as
//! ztunnel gets them from istiod), Namespaces, Services, EndpointSlices
//! (Service resolution), Nodes (their addresses, where `nodePort`s are
//! answered), and Istio's `PeerAuthentication` and
//! `AuthorizationPolicy` (`security.istio.io/v1`, `v1beta1` where v1 is not
//! served). Each object is converted into the model as it arrives, by the
//! same functions as the directory source ([`super::objects`],
//! [`super::services`]), so no Kubernetes object outlives its event and
//! only the model's small structs are held.
//!
//! A dropped or failed watch resumes from its last resource version; when
//! that version is gone (`410 Gone`, e.g. after an API server restart) the
//! kind is listed again. Each retry waits kube's jittered exponential
//! backoff (0.8 s to 30 s). A relist replaces its kind's objects only once
//! it is complete, so the last synced state keeps serving meanwhile. Nothing is
//! published before every kind has been listed once: a snapshot with pods
//! but no policies would open what policies close. Until then readiness
//! names the kinds still missing ([`SourceHealth`]). After it, a kind whose
//! watch has been failing for `--source-stale-after` (no event since its
//! first error, and errors still coming) makes readiness fail, naming the
//! kind: its last synced objects keep serving, but may be stale. Each
//! failed attempt is counted (`nodeward_source_watch_failures_total`), and
//! each kind going stale (`nodeward_source_stale_total`), logged once.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1 as k8s;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Assembler;
use super::objects::{self, Object, PolicyKind};
use super::services;
use crate::metrics::{KindLabels, Metrics};
use crate::state::Store;

/// A failing watch errs again within its backoff (at most 30 s) plus one
/// failed request (kube's connect timeout, 30 s): this long without an
/// error, a watch that sent no event either is taken as watching again
/// (kube's watcher reports a resumed watch only by its next event).
const RECOVERED_AFTER: Duration = Duration::from_secs(90);

#[cfg(test)]
mod tests;

/// Why the API source could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The `--kubeconfig` file could not be read or used.
    #[error("--kubeconfig {}: {source}", .path.display())]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// Why.
        source: kube::config::KubeconfigError,
    },
    /// Neither a local kubeconfig nor in-cluster settings were found.
    #[error(
        "no Kubernetes API settings: no kubeconfig and not in a cluster (KUBERNETES_SERVICE_HOST, service-account token): {0}"
    )]
    Infer(#[from] kube::config::InferConfigError),
    /// The client could not be built from the settings (TLS, auth).
    #[error("Kubernetes API client: {0}")]
    Client(#[from] kube::Error),
}

/// A client for the API server: from `kubeconfig` when given (development),
/// else as kube infers it: the local kubeconfig (`$KUBECONFIG`,
/// `~/.kube/config`) if there is one, else in-cluster settings
/// (service-account token and CA, `KUBERNETES_SERVICE_HOST`). TLS and
/// credentials are checked here, before capture starts.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |source| KubeError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(err)?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// The kinds the source watches, each with its own sync state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Every node's pods.
    Pods,
    /// Every namespace.
    Namespaces,
    /// Every `v1/Service`.
    Services,
    /// Every `discovery.k8s.io/v1` EndpointSlice.
    EndpointSlices,
    /// Every `v1/Node`.
    Nodes,
    /// Every `PeerAuthentication`.
    PeerAuthentications,
    /// Every `AuthorizationPolicy`.
    AuthorizationPolicies,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::Pods,
        Kind::Namespaces,
        Kind::Services,
        Kind::EndpointSlices,
        Kind::Nodes,
        Kind::PeerAuthentications,
        Kind::AuthorizationPolicies,
    ];
}

impl Kind {
    /// The kind as a metric label: its resource's plural, as the API names it.
    fn label(self) -> &'static str {
        match self {
            Kind::Pods => "pods",
            Kind::Namespaces => "namespaces",
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices",
            Kind::Nodes => "nodes",
            Kind::PeerAuthentications => "peerauthentications",
            Kind::AuthorizationPolicies => "authorizationpolicies",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Pods => "Pods",
            Kind::Namespaces => "Namespaces",
            Kind::Services => "Services",
            Kind::EndpointSlices => "EndpointSlices",
            Kind::Nodes => "Nodes",
            Kind::PeerAuthentications => "PeerAuthentications",
            Kind::AuthorizationPolicies => "AuthorizationPolicies",
        })
    }
}

#[derive(Debug, Default)]
struct KindHealth {
    synced: bool,
    last_error: Option<String>,
    /// The first error since the kind's last event; `None`: working.
    failing_since: Option<Instant>,
    /// The latest error.
    failed_at: Option<Instant>,
    /// This failing stretch has been logged and counted as stale.
    reported: bool,
}

impl KindHealth {
    /// How long the kind has been failing, if it is stale by `stale_after`.
    fn stale(&self, stale_after: Duration) -> Option<Duration> {
        let since = self.failing_since?.elapsed();
        let erring = self.failed_at.is_some_and(|t| t.elapsed() < RECOVERED_AFTER);
        (self.synced && erring && since >= stale_after).then_some(since)
    }
}

/// Which kinds have been listed in full at least once, and which synced
/// kinds have been failing too long since, for readiness.
#[derive(Clone, Debug)]
pub struct SourceHealth {
    kinds: Arc<Mutex<BTreeMap<Kind, KindHealth>>>,
    /// The kinds the source watches.
    watched: Arc<[Kind]>,
    stale_after: Duration,
}

impl SourceHealth {
    fn of(watched: &[Kind]) -> Self {
        SourceHealth {
            kinds: Arc::default(),
            watched: watched.into(),
            stale_after: crate::config::defaults::SOURCE_STALE_AFTER,
        }
    }
}

impl SourceHealth {
    /// One line per kind not listed yet, with its last error if any, and
    /// per synced kind whose watch is stale; empty when neither.
    pub fn problems(&self) -> Vec<String> {
        let map = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for &k in self.watched.iter() {
            let h = map.get(&k);
            let error = h.and_then(|h| h.last_error.as_deref()).unwrap_or("none");
            if !h.is_some_and(|h| h.synced) {
                out.push(match h.and_then(|h| h.last_error.as_deref()) {
                    Some(e) => format!("Kubernetes API: {k} not synced yet (last error: {e})"),
                    None => format!("Kubernetes API: {k} not synced yet"),
                });
            } else if let Some(since) = h.and_then(|h| h.stale(self.stale_after)) {
                out.push(format!(
                    "Kubernetes API: {k} watch failing for {}s, its objects may be stale (last error: {error})",
                    since.as_secs()
                ));
            }
        }
        out
    }

    fn update(&self, kind: Kind, f: impl FnOnce(&mut KindHealth)) {
        let mut map = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        f(map.entry(kind).or_default());
    }

    /// Kinds that became stale since the last call (each failing stretch
    /// once), with how long they have been failing and their last error.
    fn newly_stale(&self) -> Vec<(Kind, Duration, String)> {
        let mut map = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (kind, h) in map.iter_mut() {
            if let Some(since) = h.stale(self.stale_after)
                && !h.reported
            {
                h.reported = true;
                out.push((*kind, since, h.last_error.clone().unwrap_or_default()));
            }
        }
        out
    }
}

/// What a watcher reports, already converted into the model.
enum Change {
    /// A (re)list starts: the objects that follow replace the kind's.
    Init,
    /// An object of the (re)list.
    InitApply(String, Result<Object, String>),
    /// The (re)list is complete.
    InitDone,
    /// An object was added or changed.
    Apply(String, Result<Object, String>),
    /// An object was deleted.
    Delete(String),
    /// The watch failed; the watcher retries after its backoff.
    Error(String),
}

/// One kind's objects by `namespace/name`.
#[derive(Default)]
struct KindSet {
    objects: BTreeMap<String, Object>,
    /// Filled during a (re)list; replaces `objects` when it is complete.
    listing: Option<BTreeMap<String, Object>>,
    synced: bool,
}

/// The Kubernetes API source.
pub struct KubeSource {
    client: Client,
    node: String,
    assembler: Assembler,
    health: SourceHealth,
    sets: BTreeMap<Kind, KindSet>,
    /// Where watch failures and stale kinds are counted.
    metrics: Option<Arc<Metrics>>,
}

impl KubeSource {
    /// A source reading through `client` for node `node`. It holds every
    /// node's pods; which are this node's is decided by the state
    /// (`spec.nodeName`), as for the directory source.
    pub fn new(client: Client, node: &str, assembler: Assembler) -> Self {
        Self::watching(client, node, assembler, &Kind::ALL)
    }

    /// A source that watches only `kinds`, and publishes once those are
    /// listed: the CA service needs the pods alone (who runs where, as
    /// which ServiceAccount), and its RBAC grants no more.
    pub fn watching(client: Client, node: &str, assembler: Assembler, kinds: &[Kind]) -> Self {
        KubeSource {
            client,
            node: node.to_string(),
            assembler,
            health: SourceHealth::of(kinds),
            sets: kinds.iter().map(|k| (*k, KindSet::default())).collect(),
            metrics: None,
        }
    }

    /// Fails readiness for a synced kind whose watch has been failing for
    /// `stale_after`, and counts failures and stale kinds into `metrics`.
    pub(crate) fn with_staleness(mut self, stale_after: Duration, metrics: Arc<Metrics>) -> Self {
        self.health.stale_after = stale_after;
        self.metrics = Some(metrics);
        self
    }

    /// Its readiness, to hand to the admin endpoint.
    pub fn health(&self) -> SourceHealth {
        self.health.clone()
    }

    /// Watches until cancelled, publishing a snapshot after each batch of
    /// changes once every kind has been listed.
    pub async fn run(mut self, store: Store, cancel: CancellationToken) {
        let (tx, mut rx) = mpsc::channel(1024);
        let client = &self.client;
        let tasks: Vec<_> = self
            .sets
            .keys()
            .map(|&kind| match kind {
                Kind::Pods => tokio::spawn(watch(
                    Api::<k8s::Pod>::all(client.clone()),
                    watcher::Config::default(),
                    kind,
                    pod_object,
                    tx.clone(),
                )),
                Kind::Namespaces => tokio::spawn(watch(
                    Api::<k8s::Namespace>::all(client.clone()),
                    watcher::Config::default(),
                    kind,
                    namespace_object,
                    tx.clone(),
                )),
                Kind::Services => tokio::spawn(watch(
                    Api::<k8s::Service>::all(client.clone()),
                    watcher::Config::default(),
                    kind,
                    service_object,
                    tx.clone(),
                )),
                Kind::EndpointSlices => tokio::spawn(watch(
                    Api::<EndpointSlice>::all(client.clone()),
                    watcher::Config::default(),
                    kind,
                    endpoint_slice_object,
                    tx.clone(),
                )),
                Kind::Nodes => tokio::spawn(watch(
                    Api::<k8s::Node>::all(client.clone()),
                    watcher::Config::default(),
                    kind,
                    node_object,
                    tx.clone(),
                )),
                Kind::PeerAuthentications => tokio::spawn(watch_policies(
                    client.clone(),
                    PolicyKind::PeerAuthentication,
                    tx.clone(),
                )),
                Kind::AuthorizationPolicies => tokio::spawn(watch_policies(
                    client.clone(),
                    PolicyKind::AuthorizationPolicy,
                    tx.clone(),
                )),
            })
            .collect();
        drop(tx);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let (kind, change) = tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {
                    self.report_stale();
                    continue;
                }
                got = rx.recv() => match got {
                    Some(u) => u,
                    None => break,
                },
            };
            let mut changed = self.apply(kind, change);
            while let Ok((kind, change)) = rx.try_recv() {
                changed |= self.apply(kind, change);
            }
            if changed && self.sets.values().all(|s| s.synced) {
                let snap = self
                    .assembler
                    .snapshot(self.sets.values().flat_map(|s| s.objects.iter()));
                tracing::info!(
                    pods = snap.pods.len(),
                    local_pods = snap.pods.values().filter(|p| p.node_name == self.node).count(),
                    namespaces = snap.namespaces.len(),
                    services = snap.services.len(),
                    "config applied"
                );
                store.publish(snap);
            }
        }
        for t in tasks {
            t.abort();
        }
    }

    /// Logs and counts each kind that just became stale.
    fn report_stale(&self) {
        for (kind, since, error) in self.health.newly_stale() {
            tracing::error!(%kind, failing_s = since.as_secs(), "Kubernetes API watch failing too long: its objects may be stale, readiness fails until it works again (last error: {error})");
            if let Some(m) = &self.metrics {
                m.source_stale.get_or_create(&KindLabels { kind: kind.label() }).inc();
            }
        }
    }

    /// Applies one change to its kind; true when the published objects changed.
    fn apply(&mut self, kind: Kind, change: Change) -> bool {
        let Some(set) = self.sets.get_mut(&kind) else {
            return false;
        };
        if !matches!(change, Change::Error(_) | Change::Init) {
            // Objects arrive: the watch works (`Init` comes before the
            // list request, so it proves nothing).
            self.health.update(kind, |h| {
                h.failing_since = None;
                h.reported = false;
            });
        }
        match change {
            Change::Init => {
                set.listing = Some(BTreeMap::new());
                false
            }
            Change::InitApply(key, obj) => {
                let previous = set.objects.get(&key);
                let obj = match last_good(kind, &key, obj, previous) {
                    Some(o) => o,
                    None => return false,
                };
                match &mut set.listing {
                    Some(listing) => {
                        listing.insert(key, obj);
                        false
                    }
                    None => set.objects.insert(key, obj.clone()).as_ref() != Some(&obj),
                }
            }
            Change::InitDone => {
                let listed = set.listing.take().unwrap_or_default();
                let changed = !set.synced || listed != set.objects;
                set.objects = listed;
                if !set.synced {
                    tracing::info!(%kind, objects = set.objects.len(), "Kubernetes API: listed");
                }
                set.synced = true;
                self.health.update(kind, |h| {
                    h.synced = true;
                    h.last_error = None;
                });
                changed
            }
            Change::Apply(key, obj) => {
                let Some(obj) = last_good(kind, &key, obj, set.objects.get(&key)) else {
                    return false;
                };
                if let Some(listing) = &mut set.listing {
                    listing.insert(key.clone(), obj.clone());
                }
                set.objects.insert(key, obj.clone()).as_ref() != Some(&obj)
            }
            Change::Delete(key) => {
                if let Some(listing) = &mut set.listing {
                    listing.remove(&key);
                }
                set.objects.remove(&key).is_some()
            }
            Change::Error(e) => {
                tracing::warn!(%kind, "Kubernetes API watch failed, retrying; the last synced state stays in force: {e}");
                if let Some(m) = &self.metrics {
                    m.source_watch_failures
                        .get_or_create(&KindLabels { kind: kind.label() })
                        .inc();
                }
                let now = Instant::now();
                self.health.update(kind, |h| {
                    h.last_error = Some(e);
                    h.failed_at = Some(now);
                    h.failing_since.get_or_insert(now);
                });
                false
            }
        }
    }
}

/// The converted object, or (for one that cannot be converted) its last
/// good version, if any, with the error logged.
fn last_good(kind: Kind, key: &str, obj: Result<Object, String>, previous: Option<&Object>) -> Option<Object> {
    match obj {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::error!(%kind, object = %key, "rejected object, keeping its last good version if any: {e}");
            previous.cloned()
        }
    }
}

/// `namespace/name` of an object (`name` for cluster-scoped ones).
fn key_of<K: Resource>(obj: &K) -> String {
    match obj.namespace() {
        Some(ns) => format!("{ns}/{}", obj.name_any()),
        None => obj.name_any(),
    }
}

fn pod_object(pod: k8s::Pod) -> Result<Object, String> {
    objects::pod_from_k8s(&pod).map(Object::Pod).map_err(|e| e.to_string())
}

fn namespace_object(ns: k8s::Namespace) -> Result<Object, String> {
    objects::namespace_from_k8s(&ns)
        .map(Object::Namespace)
        .map_err(|e| e.to_string())
}

/// A Node reduced to its addresses as it arrives: its images and
/// conditions (most of its size) are never held.
fn node_object(node: k8s::Node) -> Result<Object, String> {
    objects::node_from_k8s(&node)
        .map(|n| Object::Node(Arc::new(n)))
        .map_err(|e| e.to_string())
}

/// A Service through the directory source's reader: its JSON metadata,
/// spec and status become the YAML values it reads.
fn service_object(mut svc: k8s::Service) -> Result<Object, String> {
    svc.metadata.managed_fields = None;
    let metadata = to_yaml(&svc.metadata);
    let spec = svc.spec.as_ref().map(to_yaml).unwrap_or(serde_norway::Value::Null);
    let status = svc.status.as_ref().map(to_yaml).unwrap_or(serde_norway::Value::Null);
    services::service_from(&metadata, &spec, &status)
        .map(|s| Object::Service(Arc::new(s)))
        .map_err(|e| e.to_string())
}

/// An EndpointSlice through the directory source's reader, which takes the
/// whole body (a slice has no `spec`).
fn endpoint_slice_object(mut slice: EndpointSlice) -> Result<Object, String> {
    slice.metadata.managed_fields = None;
    let metadata = to_yaml(&slice.metadata);
    let body = to_yaml(&slice);
    services::endpoint_slice_from(&metadata, &body)
        .map(|s| Object::EndpointSlice(Arc::new(s)))
        .map_err(|e| e.to_string())
}

/// A policy through the same walk as the directory's: its JSON metadata and
/// spec become the YAML value the walk reads. A spec that cannot be
/// converted becomes a string, which the walk rejects, so the policy is kept
/// as invalid and fails safe rather than being dropped.
fn policy_object(kind: PolicyKind, mut obj: DynamicObject) -> Object {
    obj.metadata.managed_fields = None;
    let metadata = to_yaml(&obj.metadata);
    let spec = obj.data.get("spec").map(to_yaml).unwrap_or(serde_norway::Value::Null);
    objects::policy_object(kind, &metadata, &spec)
}

/// `v` as the YAML value type the policy walk reads; an error as a string.
fn to_yaml<T: serde::Serialize>(v: &T) -> serde_norway::Value {
    serde_norway::to_value(v).unwrap_or_else(|e| serde_norway::Value::String(format!("not convertible: {e}")))
}

/// Runs one kind's watcher, converting each object as it arrives and
/// sending the changes on; restarts (with kube's jittered backoff) on errors.
async fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    convert: impl Fn(K) -> Result<Object, String>,
    tx: mpsc::Sender<(Kind, Change)>,
) where
    K: Resource + Clone + DeserializeOwned + fmt::Debug + Send + 'static,
{
    // A panicking conversion rejects its object like an invalid one (its
    // last good version stays) instead of ending this kind's watch.
    let convert = |o: K| {
        super::dir::catch_panic(|| convert(o)).unwrap_or_else(|message| Err(format!("conversion panicked: {message}")))
    };
    let mut events = std::pin::pin!(watcher::watcher(api, config).default_backoff());
    while let Some(event) = events.next().await {
        let change = match event {
            Ok(Event::Init) => Change::Init,
            Ok(Event::InitApply(o)) => Change::InitApply(key_of(&o), convert(o)),
            Ok(Event::InitDone) => Change::InitDone,
            Ok(Event::Apply(o)) => Change::Apply(key_of(&o), convert(o)),
            Ok(Event::Delete(o)) => Change::Delete(key_of(&o)),
            Err(e) => Change::Error(e.to_string()),
        };
        if tx.send((kind, change)).await.is_err() {
            return;
        }
    }
}

/// The versions of `security.istio.io` tried, best first.
const ISTIO_VERSIONS: [&str; 2] = ["v1", "v1beta1"];

/// Finds which version of `security.istio.io` serves `kind`, retrying with
/// jittered backoff until one does, then watches it.
async fn watch_policies(client: Client, kind: PolicyKind, tx: mpsc::Sender<(Kind, Change)>) {
    let watched = match kind {
        PolicyKind::PeerAuthentication => Kind::PeerAuthentications,
        PolicyKind::AuthorizationPolicy => Kind::AuthorizationPolicies,
    };
    let mut delay = Duration::from_millis(800);
    let resource = loop {
        match resolve(&client, kind).await {
            Ok(r) => break r,
            Err(e) => {
                if tx.send((watched, Change::Error(e))).await.is_err() {
                    return;
                }
                tokio::time::sleep(jitter(delay)).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    };
    tracing::info!(kind = kind.name(), api_version = %resource.api_version, "Kubernetes API: watching");
    let api = Api::<DynamicObject>::all_with(client, &resource);
    let convert = move |o: DynamicObject| Ok(policy_object(kind, o));
    watch(api, watcher::Config::default(), watched, convert, tx).await;
}

/// The `security.istio.io` resource serving `kind`: v1, else v1beta1.
async fn resolve(client: &Client, kind: PolicyKind) -> Result<ApiResource, String> {
    let mut errors = Vec::new();
    for version in ISTIO_VERSIONS {
        let gvk = GroupVersionKind::gvk("security.istio.io", version, kind.name());
        match kube::discovery::pinned_kind(client, &gvk).await {
            Ok((resource, _)) => return Ok(resource),
            Err(e) => errors.push(format!("{version}: {e}")),
        }
    }
    Err(format!(
        "security.istio.io serves no {} ({})",
        kind.name(),
        errors.join("; ")
    ))
}

/// `d` scaled by a random factor in [0.5, 1), so agents restarted together
/// do not retry in step.
fn jitter(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new().build_hasher().finish();
    d.mul_f64(0.5 + (r % 1000) as f64 / 2000.0)
}
