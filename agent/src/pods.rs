//! Keeps the set of captured pods equal to the set the state says this node
//! manages: finds each pod's namespace, binds its listeners, fills the maps,
//! attaches steering, and undoes all of it when the pod goes.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nodeward_common::{DIRECTION_INBOUND, DIRECTION_OUTBOUND, POD_HAS_IPV4, POD_HAS_IPV6, PodInfo, PortKey};

use crate::capture::{Capture, CaptureError};
use crate::identity::Identity;
use crate::identity::ca::CaError;
use crate::identity::manager::CertManager;
use crate::netns::{Netns, NetnsError, NetnsFinder};
use crate::proxy::{Lifecycle, Mesh, PodContext, PodListeners, ProxyConfig, ip_words};
use crate::state::Store;
use crate::state::workload::ManagedPod;

/// How often unresolved pods trigger a namespace scan at most.
const SCAN_INTERVAL: Duration = Duration::from_millis(500);
/// Reconcile at least this often, even without config changes.
const TICK: Duration = Duration::from_millis(500);

/// Why a pod could not be captured (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// No namespace holds the pod's IP yet.
    #[error("no network namespace on this node holds {0:?} yet")]
    NoNamespace(Vec<IpAddr>),
    /// Several namespaces hold the IP: capturing either could be wrong.
    #[error("{ip} is held by several network namespaces: {paths:?}")]
    Ambiguous {
        /// The IP.
        ip: IpAddr,
        /// The namespaces.
        paths: Vec<PathBuf>,
    },
    /// Namespace trouble.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// eBPF trouble.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// A map write failed.
    #[error("updating eBPF maps: {0}")]
    Map(#[from] std::io::Error),
    /// The pod's certificate could not be issued.
    #[error("issuing the pod's certificate: {0}")]
    Identity(#[from] CaError),
}

struct ActivePod {
    ctx: Arc<PodContext>,
    /// The latest spec; `ctx.pod` keeps the one the pod was captured with.
    spec: ManagedPod,
    /// The identity whose certificate this pod holds a share of.
    identity: Option<Identity>,
}

/// The reconciler.
pub struct PodManager {
    node: String,
    store: Store,
    capture: Arc<Capture>,
    config: Arc<ProxyConfig>,
    lifecycle: Lifecycle,
    finder: NetnsFinder,
    active: HashMap<String, ActivePod>,
    ip_cache: HashMap<IpAddr, Vec<PathBuf>>,
    last_scan: Option<(Instant, u64)>,
    warned: HashMap<String, String>,
    adopted_previous_run: bool,
    identity: Option<Arc<CertManager>>,
    mesh: Arc<Mesh>,
    revalidated: u64,
}

impl PodManager {
    /// A manager for `node`.
    pub fn new(
        node: String,
        store: Store,
        capture: Arc<Capture>,
        config: Arc<ProxyConfig>,
        lifecycle: Lifecycle,
        mesh: Arc<Mesh>,
    ) -> Self {
        PodManager {
            node,
            store,
            capture,
            config,
            lifecycle,
            finder: NetnsFinder::default(),
            active: HashMap::new(),
            ip_cache: HashMap::new(),
            last_scan: None,
            warned: HashMap::new(),
            adopted_previous_run: false,
            identity: mesh.certs.clone(),
            mesh,
            revalidated: 0,
        }
    }

    /// Reconciles on every state change and every tick until drain begins,
    /// then stops managing pods (their pins stay, for fail-closed).
    pub async fn run(mut self) {
        let mut rx = self.store.subscribe();
        // Connections of a previous run died with it; their entries go
        // before any new connection can make one.
        purge_connection_entries(&self.capture, None);
        let stop = self.lifecycle.stop_accepting.clone();
        loop {
            self.reconcile().await;
            tokio::select! {
                _ = stop.cancelled() => break,
                r = rx.changed() => if r.is_err() { break },
                _ = tokio::time::sleep(TICK) => {}
            }
        }
        tracing::info!(
            pods = self.active.len(),
            "stopped managing pods; capture stays attached"
        );
    }

    async fn reconcile(&mut self) {
        let snap = self.store.current();
        if snap.generation != self.revalidated {
            // Policy may have changed: close what it no longer allows.
            self.revalidated = snap.generation;
            for a in self.active.values() {
                if let Some(pod) = snap.pods.get(&a.ctx.pod.key) {
                    a.ctx.live.revalidate(&snap, pod);
                }
            }
        }
        let (desired, _skipped) = snap.managed_pods(&self.node);

        let gone: Vec<String> = self
            .active
            .iter()
            .filter(|(uid, a)| desired.get(*uid).is_none_or(|d| d.ips != a.spec.ips))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            if let Some(a) = self.active.remove(&uid) {
                self.stop_pod(&a);
            }
        }

        for (uid, want) in &desired {
            if let Some(active) = self.active.get_mut(uid) {
                if active.spec != *want {
                    let cookie = active.ctx.netns.cookie();
                    update_exclusions(&self.capture, cookie, &active.spec, want);
                    if let Err(e) = self.capture.maps.pods.insert(&cookie, &pod_info(want)) {
                        tracing::error!(pod = %want.key, "updating pod capture: {e}");
                    }
                    active.spec = want.clone();
                }
                continue;
            }
            match self.start_pod(want).await {
                Ok(a) => {
                    self.warned.remove(uid);
                    self.active.insert(uid.clone(), a);
                }
                Err(e) => {
                    let msg = e.to_string();
                    if self.warned.get(uid) != Some(&msg) {
                        tracing::warn!(pod = %want.key, "cannot capture pod yet, will retry: {msg}");
                        self.warned.insert(uid.clone(), msg);
                    }
                }
            }
        }
        self.warned.retain(|uid, _| desired.contains_key(uid));

        if !self.adopted_previous_run {
            self.adopted_previous_run = true;
            self.purge_stale();
        }
    }

    async fn start_pod(&mut self, pod: &ManagedPod) -> Result<ActivePod, PodError> {
        let path = self.resolve(pod).await?;
        let netns = Netns::open(&path)?;
        let identity = match &self.identity {
            Some(m) => {
                let id = m.identity_of(&pod.namespace, &pod.service_account);
                m.acquire(&id)?;
                Some(id)
            }
            None => None,
        };
        let started = self.capture_pod(pod, netns, identity.clone()).await;
        match started {
            Ok(ctx) => Ok(ActivePod {
                ctx,
                spec: pod.clone(),
                identity,
            }),
            Err(e) => {
                if let (Some(m), Some(id)) = (&self.identity, &identity) {
                    m.release(id);
                }
                Err(e)
            }
        }
    }

    async fn capture_pod(
        &self,
        pod: &ManagedPod,
        netns: Netns,
        identity: Option<Identity>,
    ) -> Result<Arc<PodContext>, PodError> {
        let cookie = netns.cookie();
        let tunnel_tls = match (&self.mesh.certs, &identity) {
            (Some(m), Some(id)) => Some(crate::identity::tls::server_config(m.clone(), id.clone(), m.trust())),
            _ => None,
        };
        let ctx = Arc::new(PodContext {
            pod: pod.clone(),
            netns: Arc::new(netns),
            identity,
            tunnel_tls,
            live: Default::default(),
            mesh: self.mesh.clone(),
            config: self.config.clone(),
            capture: self.capture.clone(),
            cancel: self.lifecycle.hard_stop.child_token(),
            lifecycle: self.lifecycle.clone(),
        });
        // Order matters for fail-closed: listeners and their sock-hash
        // entries first, then steering, then outbound capture.
        let listeners = PodListeners::bind(&ctx)?;
        self.capture.attach_pod(&ctx.netns)?;
        let info = pod_info(pod);
        update_exclusions(&self.capture, cookie, &empty_like(pod), pod);
        for ip in &pod.ips {
            self.capture.maps.pod_addrs.insert(&ip_words(*ip), &1)?;
        }
        self.capture.maps.pods.insert(&cookie, &info)?;
        listeners.serve(ctx.clone());
        tracing::info!(
            pod = %pod.key,
            netns = %ctx.netns.path().display(),
            cookie,
            ips = ?pod.ips,
            exclude_inbound = ?pod.exclude_inbound,
            exclude_outbound = ?pod.exclude_outbound,
            "pod captured"
        );
        Ok(ctx)
    }

    fn stop_pod(&self, a: &ActivePod) {
        let cookie = a.ctx.netns.cookie();
        let pod = &a.spec;
        let _ = self.capture.maps.pods.remove(&cookie);
        for ip in &pod.ips {
            let _ = self.capture.maps.pod_addrs.remove(&ip_words(*ip));
        }
        if let Err(e) = self.capture.detach_pod(cookie) {
            tracing::error!(pod = %pod.key, "detaching inbound steering: {e}");
        }
        update_exclusions(&self.capture, cookie, pod, &empty_like(pod));
        a.ctx.cancel.cancel();
        purge_connection_entries(&self.capture, Some(cookie));
        if let (Some(m), Some(id)) = (&self.identity, &a.identity) {
            m.release(id);
        }
        tracing::info!(pod = %pod.key, cookie, "pod released");
    }

    /// Removes what a previous run left for pods that are no longer managed.
    fn purge_stale(&self) {
        let live: HashSet<u64> = self.active.values().map(|a| a.ctx.netns.cookie()).collect();
        let mut stale: HashSet<u64> = self.capture.pinned_pods().into_iter().collect();
        stale.extend(self.capture.maps.pods.keys().unwrap_or_default());
        for cookie in stale.difference(&live) {
            let _ = self.capture.maps.pods.remove(cookie);
            let _ = self.capture.detach_pod(*cookie);
            for k in self.capture.maps.excluded_ports.keys().unwrap_or_default() {
                if k.netns == *cookie {
                    let _ = self.capture.maps.excluded_ports.remove(&k);
                }
            }
            tracing::info!(cookie, "removed capture of a pod no longer managed");
        }
        let live_addrs: HashSet<[u32; 4]> = self
            .active
            .values()
            .flat_map(|a| a.spec.ips.iter().map(|ip| ip_words(*ip)))
            .collect();
        for k in self.capture.maps.pod_addrs.keys().unwrap_or_default() {
            if !live_addrs.contains(&k) {
                let _ = self.capture.maps.pod_addrs.remove(&k);
            }
        }
    }

    async fn resolve(&mut self, pod: &ManagedPod) -> Result<PathBuf, PodError> {
        let cached = pod.ips.iter().find_map(|ip| match self.ip_cache.get(ip) {
            Some(paths) if paths.len() == 1 => Some(paths[0].clone()),
            _ => None,
        });
        if let Some(path) = cached {
            // The cache may be stale: confirm the namespace still has the IP.
            if let Ok(ns) = Netns::open(&path)
                && ns.addresses().is_ok_and(|a| pod.ips.iter().any(|ip| a.contains(ip)))
            {
                return Ok(path);
            }
        }
        // Scan at once for a new config (a pod just appeared), otherwise
        // at most every SCAN_INTERVAL while some pod is unresolved.
        let snap = self.store.current();
        let due = self
            .last_scan
            .is_none_or(|(t, generation)| t.elapsed() >= SCAN_INTERVAL || generation != snap.generation);
        if due {
            let (desired, _) = snap.managed_pods(&self.node);
            let wanted: HashSet<IpAddr> = desired
                .values()
                .filter(|p| !self.active.contains_key(&p.uid))
                .flat_map(|p| p.ips.iter().copied())
                .collect();
            let finder = NetnsFinder {
                extra_dirs: self.finder.extra_dirs.clone(),
            };
            self.ip_cache = tokio::task::spawn_blocking(move || finder.scan(&wanted))
                .await
                .unwrap_or_default();
            self.last_scan = Some((Instant::now(), snap.generation));
        }
        for ip in &pod.ips {
            match self.ip_cache.get(ip).map(Vec::as_slice) {
                Some([one]) => return Ok(one.clone()),
                Some(many) if many.len() > 1 => {
                    return Err(PodError::Ambiguous {
                        ip: *ip,
                        paths: many.to_vec(),
                    });
                }
                _ => {}
            }
        }
        Err(PodError::NoNamespace(pod.ips.clone()))
    }
}

fn empty_like(pod: &ManagedPod) -> ManagedPod {
    ManagedPod {
        exclude_inbound: Vec::new(),
        exclude_outbound: Vec::new(),
        ..pod.clone()
    }
}

/// The `PODS` entry of a pod: its addresses.
fn pod_info(pod: &ManagedPod) -> PodInfo {
    let mut info = PodInfo::default();
    for ip in &pod.ips {
        match ip {
            IpAddr::V4(_) => {
                info.ipv4 = ip_words(*ip)[3];
                info.flags |= POD_HAS_IPV4;
            }
            IpAddr::V6(_) => {
                info.ipv6 = ip_words(*ip);
                info.flags |= POD_HAS_IPV6;
            }
        }
    }
    info
}

/// Applies the difference in excluded ports between two versions of a pod.
fn update_exclusions(capture: &Capture, cookie: u64, old: &ManagedPod, new: &ManagedPod) {
    let key = |port, direction| PortKey {
        netns: cookie,
        port,
        direction,
        pad: [0; 5],
    };
    let sets = [
        (&old.exclude_inbound, &new.exclude_inbound, DIRECTION_INBOUND),
        (&old.exclude_outbound, &new.exclude_outbound, DIRECTION_OUTBOUND),
    ];
    for (before, after, dir) in sets {
        for p in before.iter().filter(|p| !after.contains(p)) {
            let _ = capture.maps.excluded_ports.remove(&key(*p, dir));
        }
        for p in after.iter().filter(|p| !before.contains(p)) {
            if let Err(e) = capture.maps.excluded_ports.insert(&key(*p, dir), &1) {
                tracing::error!(pod = %new.key, port = p, "cannot exclude port: {e}");
            }
        }
    }
}

/// Drops per-connection map entries of one namespace, or of all.
fn purge_connection_entries(capture: &Capture, cookie: Option<u64>) {
    for k in capture.maps.orig_dst.keys().unwrap_or_default() {
        if cookie.is_none_or(|c| c == k.netns) {
            let _ = capture.maps.orig_dst.remove(&k);
        }
    }
    for k in capture.maps.inbound_peer.keys().unwrap_or_default() {
        if cookie.is_none_or(|c| c == k.netns) {
            let _ = capture.maps.inbound_peer.remove(&k);
        }
    }
}
